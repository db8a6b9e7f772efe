//! What a pass of an LVM thin volume reads when no tracker records it:
//! the blocks `thin_delta` names between the thin snapshot of the last
//! completed pass and this pass's own (wyng-backup's method; the steps and
//! their sources are in [`crate::io::thin`]).
//!
//! Owns the volume's `thin-chain` file (the last completed pass's
//! snapshot, with the origin's identity) and the decisions: take a
//! snapshot per pass and read it, use a delta only when the chain proves
//! itself unbroken, move the chain and remove the older snapshot only once
//! a pass completed. Must not run LVM commands itself (`io::thin::snap`
//! does) or speak to the receiver.
//!
//! The epoch rules, as for a tracker's record: the delta is used only when
//! the origin's LV UUID, its size and its pool are those the chain
//! recorded, and the chain's snapshot still exists with its recorded LV
//! UUID and thin id (a removed and recreated LV may reuse a thin id, never
//! a UUID). Anything else reads the whole snapshot and says why, and the
//! pass, once complete, starts a new chain from its snapshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nightpass_proto::chunkset::Scope;
use serde::{Deserialize, Serialize};

use super::tracked::ScanPlan;
use super::SyncConfig;
use crate::error::{Error, Result};
use crate::io::thin::{self, snap, ThinVolume};
use crate::progress::ScanKind;

/// The chain's file in the volume's state directory.
fn chain_path(volume_dir: &Path) -> PathBuf {
    volume_dir.join("thin-chain")
}

/// The last completed pass's snapshot, and what it was a snapshot of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Chain {
    /// The origin's LV UUID.
    origin_uuid: String,
    /// The origin's size when the snapshot was taken.
    size: u64,
    /// The volume group.
    vg: String,
    /// The pool.
    pool: String,
    /// The snapshot's LV name.
    snap_lv: String,
    /// Its LV UUID.
    snap_uuid: String,
    /// Its thin id in the pool.
    snap_thin_id: u64,
}

/// A pass's own snapshot, to chain from once the pass completes.
#[derive(Debug)]
pub(super) struct ThinPass {
    origin: ThinVolume,
    snap: ThinVolume,
    size: u64,
    /// The snapshot the chain held when the pass began, removed once the
    /// pass completed.
    prior: Option<(String, String)>,
}

/// The plan of a pass of an LVM thin volume `cfg.source` of `size` bytes,
/// when it is one (a device-mapper device `lvs` calls a thin volume):
/// a snapshot to read, and the change set since the chain's snapshot, or
/// the whole snapshot and why. `None` for any other source.
pub(super) fn plan(
    cfg: &SyncConfig,
    volume_dir: &Path,
    size: u64,
    pass_no: u64,
) -> Result<Option<ScanPlan>> {
    if !snap::is_device_mapper(&cfg.source) {
        return Ok(None);
    }
    let Ok(origin) = thin::thin_volume(&cfg.source.to_string_lossy()) else {
        return Ok(None);
    };
    let name = snap::snapshot_name(&origin.lv, pass_no);
    if snap::find(&origin.vg, &name).is_some() {
        // Left by a pass of the same number that failed.
        snap::remove(&origin.vg, &name)?;
    }
    let taken = snap::create(&origin, &name)?;
    let chain = read_chain(volume_dir)?;
    let prior_now = chain.as_ref().and_then(|c| snap::find(&c.vg, &c.snap_lv));
    let scope = match chains(chain.as_ref(), &origin, size, prior_now.as_ref()) {
        Ok(from) => match snap::delta(&origin, from, taken.thin_id) {
            Ok(changed) => Ok(changed),
            Err(e) => Err(format!("thin_delta could not give the change set: {e}")),
        },
        Err(why) => Err(why),
    };
    let read_from = PathBuf::from(format!("/dev/{}/{}", taken.vg, taken.lv));
    let pass = Arc::new(ThinPass {
        prior: chain.map(|c| (c.vg, c.snap_lv)),
        origin,
        snap: taken,
        size,
    });
    Ok(Some(match scope {
        Ok(changed) => ScanPlan::thin(
            Scope::Bytes(changed.byte_ranges()),
            ScanKind::Tracked,
            read_from,
            pass,
        ),
        Err(why) => ScanPlan::thin(Scope::Full, ScanKind::Full(why), read_from, pass),
    }))
}

/// Whether the chain's snapshot may be the start of this pass's change
/// set: its thin id when it may, why not otherwise.
fn chains(
    chain: Option<&Chain>,
    origin: &ThinVolume,
    size: u64,
    prior_now: Option<&ThinVolume>,
) -> std::result::Result<u64, String> {
    let what = format!("{}/{}", origin.vg, origin.lv);
    let Some(c) = chain else {
        return Err(format!(
            "first pass of the thin volume {what} (no snapshot of a completed pass to compare with)"
        ));
    };
    if c.origin_uuid != origin.lv_uuid {
        return Err(format!(
            "{what} is not the volume the last pass read (LV UUID {} then, {} now)",
            c.origin_uuid, origin.lv_uuid
        ));
    }
    if c.size != size {
        return Err(format!(
            "{what} changed size since the last pass ({} then, {size} now)",
            c.size
        ));
    }
    if c.pool != origin.pool || c.vg != origin.vg {
        return Err(format!("{what} moved to another pool since the last pass"));
    }
    match prior_now {
        Some(p) if p.lv_uuid == c.snap_uuid && p.thin_id == c.snap_thin_id => Ok(c.snap_thin_id),
        Some(_) => Err(format!(
            "the last pass's snapshot {}/{} was replaced since",
            c.vg, c.snap_lv
        )),
        None => Err(format!(
            "the last pass's snapshot {}/{} no longer exists",
            c.vg, c.snap_lv
        )),
    }
}

fn read_chain(volume_dir: &Path) -> Result<Option<Chain>> {
    let path = chain_path(volume_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Io(format!("{} is damaged: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path.display(), e)),
    }
}

/// The pass completed: its snapshot is the chain's start from now on, and
/// the one before it goes.
pub(super) fn completed(t: &ThinPass, volume_dir: &Path) -> Result<()> {
    let chain = Chain {
        origin_uuid: t.origin.lv_uuid.clone(),
        size: t.size,
        vg: t.snap.vg.clone(),
        pool: t.snap.pool.clone(),
        snap_lv: t.snap.lv.clone(),
        snap_uuid: t.snap.lv_uuid.clone(),
        snap_thin_id: t.snap.thin_id,
    };
    let bytes = serde_json::to_vec_pretty(&chain).expect("a chain serializes");
    crate::store::state::write_atomic(&chain_path(volume_dir), &bytes)?;
    if let Some((vg, lv)) = &t.prior {
        if *lv != t.snap.lv {
            if let Err(e) = snap::remove(vg, lv) {
                tracing::warn!("could not remove the previous pass's snapshot {vg}/{lv}: {e}");
            }
        }
    }
    Ok(())
}

/// An audit found the change set wrong: the next pass reads everything
/// (its snapshot then starts a new chain).
pub(super) fn forget(volume_dir: &Path) {
    let _ = std::fs::remove_file(chain_path(volume_dir));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(lv: &str, uuid: &str, thin_id: u64) -> ThinVolume {
        ThinVolume {
            lv: lv.into(),
            vg: "vg0".into(),
            lv_uuid: uuid.into(),
            pool: "pool0".into(),
            thin_id,
        }
    }

    fn chain() -> Chain {
        Chain {
            origin_uuid: "U-ORIGIN".into(),
            size: 1 << 30,
            vg: "vg0".into(),
            pool: "pool0".into(),
            snap_lv: "filer01_nightpass_3".into(),
            snap_uuid: "U-SNAP3".into(),
            snap_thin_id: 7,
        }
    }

    #[test]
    fn a_delta_is_used_only_when_the_chain_proves_itself() {
        let origin = vol("filer01", "U-ORIGIN", 1);
        let prior = vol("filer01_nightpass_3", "U-SNAP3", 7);
        let c = chain();
        assert_eq!(chains(Some(&c), &origin, 1 << 30, Some(&prior)), Ok(7));
        let why = |r: std::result::Result<u64, String>| r.unwrap_err();
        assert!(why(chains(None, &origin, 1 << 30, Some(&prior))).contains("first pass"));
        let other = vol("filer01", "U-OTHER", 1);
        assert!(why(chains(Some(&c), &other, 1 << 30, Some(&prior))).contains("LV UUID"));
        assert!(why(chains(Some(&c), &origin, 2 << 30, Some(&prior))).contains("size"));
        assert!(why(chains(Some(&c), &origin, 1 << 30, None)).contains("no longer exists"));
        // Removed and recreated under the same name, even with the same thin id.
        let recreated = vol("filer01_nightpass_3", "U-NEW", 7);
        assert!(why(chains(Some(&c), &origin, 1 << 30, Some(&recreated))).contains("replaced"));
        let moved = ThinVolume {
            pool: "pool1".into(),
            ..origin.clone()
        };
        assert!(why(chains(Some(&c), &moved, 1 << 30, Some(&prior))).contains("another pool"));
    }

    #[test]
    fn the_chain_survives_the_disk_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_chain(dir.path()).unwrap(), None);
        let bytes = serde_json::to_vec(&chain()).unwrap();
        std::fs::write(chain_path(dir.path()), bytes).unwrap();
        assert_eq!(read_chain(dir.path()).unwrap(), Some(chain()));
        std::fs::write(chain_path(dir.path()), b"{\"origin_uuid\":").unwrap();
        assert!(read_chain(dir.path()).is_err());
        forget(dir.path());
        assert_eq!(read_chain(dir.path()).unwrap(), None);
    }
}
