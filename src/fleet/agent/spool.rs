//! The agent's spool: what it must tell the database and could not yet.
//!
//! Owns `STATE_DIR/fleet-spool/`: a pass's or a night's record is written
//! there (crash-safely) before it is sent, and removed once the database
//! has committed it; the agent sends what is left whenever it can, and a
//! restarted agent sends what its predecessor left. The records are
//! idempotent ([`crate::fleet::record::record_pass`],
//! [`crate::fleet::night::finish`]), so one sent twice changes nothing.
//! It never interprets a record.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fleet::db::Pool;
use crate::fleet::night::{self, NightRecord};
use crate::fleet::record::{self, PassRecord, Recorded};
use crate::store::state::write_atomic;

/// A record waiting for the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Spooled {
    /// A pass's outcome.
    Pass(PassRecord),
    /// A night's outcome.
    Night(NightRecord),
}

impl Spooled {
    /// The file it is kept in: one per lease (a night by its first).
    fn file_name(&self) -> String {
        match self {
            Spooled::Pass(p) => format!("pass-{}-{}.json", p.lease.volume, p.lease.token),
            Spooled::Night(n) => format!(
                "night-{}-{}.json",
                n.leases.first().map_or(0, |l| l.volume),
                n.leases.first().map_or(0, |l| l.token)
            ),
        }
    }

    /// Sends it: what the pass's record did, if it was a pass.
    pub async fn send(&self, pool: &Pool) -> Result<Option<Recorded>> {
        match self {
            Spooled::Pass(p) => record::record_pass(pool, p).await.map(Some),
            Spooled::Night(n) => night::finish(pool, n).await.map(|_| None),
        }
    }
}

/// The spool of one state directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// The spool under `state_dir`.
    pub fn new(state_dir: &Path) -> Spool {
        Spool {
            dir: state_dir.join("fleet-spool"),
        }
    }

    /// Where it is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps `s` durably until [`Spool::done`].
    pub fn keep(&self, s: &Spooled) -> Result<PathBuf> {
        let path = self.dir.join(s.file_name());
        let bytes = serde_json::to_vec_pretty(s)
            .map_err(|e| Error::Io(format!("encoding a spooled record: {e}")))?;
        write_atomic(&path, &bytes)?;
        Ok(path)
    }

    /// The database has `path`'s record: forget it.
    pub fn done(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("cannot remove the sent record {}: {e}", path.display());
        }
    }

    /// The records waiting, oldest name first; an unreadable one is set
    /// aside as `.bad` (and said) rather than blocking the others.
    pub fn waiting(&self) -> Vec<(PathBuf, Spooled)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .filter_map(|p| match read(&p) {
                Ok(s) => Some((p, s)),
                Err(e) => {
                    tracing::error!("spooled record {} set aside: {e}", p.display());
                    let _ = std::fs::rename(&p, p.with_extension("bad"));
                    None
                }
            })
            .collect()
    }
}

/// The record in `path`.
fn read(path: &Path) -> std::result::Result<Spooled, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}
