//! Sealed volumes, on the receiver.
//!
//! Owns each exported volume's seal record (its type, and its file
//! `volumes/<key>/seal` under the receiver's state directory, which the
//! [`FileStore`] keeps), and when the `cutover` and
//! `unsealed` records of that volume's journal are written (their format is
//! [`crate::store::journal`]'s). Seals and journal records go through the
//! [`Store`]; the manifest and its rebuild mark stay in the local volume
//! directory. After a cutover the receiver seals the volume: the
//! new site owns the target now, and every later sync (or cutover) of it is
//! refused until the operator runs `nightpass unseal NAME` on the receiver
//! host. The seal is read fresh at each session, so an unseal takes effect
//! while `serve` runs.
//!
//! A cutover is recorded only when its consistency point is the root of the
//! receiver's own manifest of the volume: a peer cannot write an arbitrary
//! "cutover complete" into a journal, nor seal a volume it did not copy.
//!
//! Unsealing marks the volume's manifest to be rebuilt ([`state::mark_for_rebuild`]):
//! the new site has written to the target since the cutover, behind
//! nightpass's back, and may still be writing, so no read made at unseal
//! time can be trusted. The next sync session, which holds the volume,
//! rebuilds the manifest from a fresh read of the target and clears the
//! mark; until then no cutover is recorded against the old manifest.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nightpass_proto::manifest;
use nightpass_proto::wire;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::store::journal::{self, ReceiverCutoverRecord, ReceiverRecord, ReceiverUnsealedRecord};
use crate::store::state::{self, ManifestFile};
use crate::store::{FileStore, Store};

/// Length of a consistency point: the hex of a 32-byte root.
pub const CONSISTENCY_POINT_LEN: usize = 2 * manifest::ENTRY_LEN;

/// A volume's seal: which cutover made the new site its owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seal {
    /// The exported volume's name.
    pub volume: String,
    /// The cutover's consistency point (hex root of the receiver's manifest).
    pub consistency_point: String,
    /// When the cutover froze the source, seconds since the Unix epoch.
    pub cutover_unix_s: f64,
    /// The same, RFC 3339 UTC.
    pub cutover_at: String,
    /// Seconds the source stayed frozen.
    pub frozen_s: f64,
    /// When this receiver sealed the volume, seconds since the Unix epoch.
    pub sealed_unix_s: f64,
}

/// The seal record's path in a volume's state directory.
pub fn seal_path(volume_dir: &Path) -> PathBuf {
    volume_dir.join("seal")
}

/// The volume's seal as the file store keeps it in the volume's directory:
/// `Ok(None)` when it is not sealed, `Err` (a sentence) when a seal record
/// exists but cannot be read, which counts as sealed. Callers that know the
/// volume's name ask the [`Store`] ([`Store::seal`]).
pub fn read(volume_dir: &Path) -> std::result::Result<Option<Seal>, String> {
    let path = seal_path(volume_dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("its seal record {} cannot be read ({e})", path.display())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "its seal record {} cannot be read ({e})",
            path.display()
        )),
    }
}

/// The refusal of a pass of sealed volume `name`, naming the cutover and how
/// to unseal.
pub fn sealed_message(name: &str, seal: std::result::Result<&Seal, &str>) -> String {
    let what = match seal {
        Ok(s) => format!(
            "it was cut over at {} (consistency point {}), and the new site may have written to it since",
            s.cutover_at, s.consistency_point
        ),
        Err(why) => format!("it is sealed, but {why}"),
    };
    format!(
        "volume '{name}' is sealed: {what}; nothing was written. If another pass into it is really wanted, run `nightpass unseal {name}` on the receiver host (with the receiver's --state-dir) first"
    )
}

/// Checks the shape of a cutover record from a peer: a consistency point of
/// exactly 64 hex characters, times that are finite and in range.
pub fn check_mark(mark: &wire::Mark) -> std::result::Result<(), String> {
    let cp = &mark.consistency_point;
    if cp.len() != CONSISTENCY_POINT_LEN || !cp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "its consistency point is not {CONSISTENCY_POINT_LEN} hex characters (it is {} bytes long)",
            cp.len()
        ));
    }
    if !(0.0..=crate::progress::LATEST_UNIX_S).contains(&mark.freeze_unix_s) {
        return Err("its freeze time is not a time".into());
    }
    if !(0.0..=crate::progress::LATEST_UNIX_S).contains(&mark.frozen_s) {
        return Err("its frozen duration is not a duration".into());
    }
    Ok(())
}

/// Records a cutover of volume `name` (whose manifest lives in
/// `volume_dir`) in `store` and seals it, when `mark` (checked by
/// [`check_mark`]) names the root of the receiver's manifest as it is now.
/// The caller holds the volume, so no pass runs meanwhile. A mismatch is
/// [`Error::Input`] and writes nothing.
pub fn record_cutover(
    store: &dyn Store,
    volume_dir: &Path,
    name: &str,
    mark: &wire::Mark,
) -> Result<Seal> {
    let seal = prepare_cutover(volume_dir, name, mark)?;
    apply_cutover(store, &seal, mark)?;
    Ok(seal)
}

/// The seal `mark` would set on volume `name`, when its consistency point
/// is the root of the manifest in `volume_dir` as it is now; writes
/// nothing (a group is checked whole before any volume is sealed).
pub fn prepare_cutover(volume_dir: &Path, name: &str, mark: &wire::Mark) -> Result<Seal> {
    if state::marked_for_rebuild(volume_dir) {
        return Err(Error::input(format!(
            "this receiver's manifest of volume '{name}' is to be rebuilt since it was unsealed; run a pass first"
        )));
    }
    let have = match ManifestFile::open(&volume_dir.join("manifest"))? {
        Some(Ok(m)) => manifest::to_hex(&m.current_root()),
        Some(Err(e)) => {
            return Err(Error::input(format!(
                "this receiver's manifest of volume '{name}' cannot be trusted ({e})"
            )))
        }
        None => {
            return Err(Error::input(format!(
                "this receiver holds no copy of volume '{name}'"
            )))
        }
    };
    if !have.eq_ignore_ascii_case(&mark.consistency_point) {
        return Err(Error::input(format!(
            "its consistency point {} is not what this receiver holds of volume '{name}' (root {have})",
            mark.consistency_point
        )));
    }
    Ok(Seal {
        volume: name.to_string(),
        consistency_point: have,
        cutover_unix_s: mark.freeze_unix_s,
        cutover_at: crate::progress::rfc3339_seconds(mark.freeze_unix_s),
        frozen_s: mark.frozen_s,
        sealed_unix_s: crate::progress::now_unix(),
    })
}

/// Seals the volume of `seal` (from [`prepare_cutover`]) and journals the
/// cutover `mark` recorded, with its group's point when it has one.
pub fn apply_cutover(store: &dyn Store, seal: &Seal, mark: &wire::Mark) -> Result<()> {
    let name = seal.volume.as_str();
    // Sealed first: a crash before the journal line leaves the volume
    // sealed (safe) rather than a recorded cutover without a seal.
    store.set_seal(name, seal)?;
    store.append_receiver_record(
        name,
        &ReceiverRecord::Cutover(ReceiverCutoverRecord {
            volume: name.to_string(),
            consistency_point: seal.consistency_point.clone(),
            freeze_unix_s: seal.cutover_unix_s,
            frozen_s: seal.frozen_s,
            sealed_at: Some(crate::progress::rfc3339_seconds(seal.sealed_unix_s)),
            group_point: (!mark.group_point.is_empty()).then(|| mark.group_point.clone()),
            group_volumes: mark.group_volumes.clone(),
        }),
    )
}

/// Writes the seal record into the volume's directory, durably (the file
/// store's [`Store::set_seal`]).
pub(crate) fn write(volume_dir: &Path, seal: &Seal) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = seal_path(volume_dir);
    let bytes = serde_json::to_vec_pretty(seal).expect("a seal serializes");
    state::write_atomic(&path, &bytes)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .ctx(format!("chmod 0600 {}", path.display()))
}

/// Removes the seal record from the volume's directory, durably (the file
/// store's [`Store::remove_seal`]).
pub(crate) fn remove(volume_dir: &Path) -> Result<()> {
    let path = seal_path(volume_dir);
    fs::remove_file(&path).ctx(format!("remove {}", path.display()))?;
    fs::File::open(volume_dir)
        .and_then(|d| d.sync_all())
        .ctx(format!("fsync directory {}", volume_dir.display()))
}

/// The consistency point of volume `name`'s last cutover that the operator
/// unsealed (its journal's last `unsealed` record), or empty: what a sync
/// session's Welcome carries as `unsealed_cutover`. A journal that exists
/// but cannot be read is an error ([`Store::receiver_records`]).
pub fn last_unsealed(store: &dyn Store, name: &str) -> Result<String> {
    let records = store.receiver_records(name)?;
    Ok(journal::last_unsealed(&records)
        .filter(|cp| cp.len() == CONSISTENCY_POINT_LEN)
        .unwrap_or_default()
        .to_string())
}

/// What `nightpass unseal` did.
#[derive(Debug, Clone)]
pub struct Unsealed {
    /// The seal removed.
    pub seal: Seal,
    /// What became of the volume's manifest.
    pub manifest: Rebuilt,
}

/// What unsealing did to a volume's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuilt {
    /// Marked to be rebuilt from a fresh read of the target by the next
    /// sync session, which holds the volume while it reads.
    Deferred,
    /// There was no manifest: the next pass starts from nothing.
    None,
}

/// Unseals volume `name` in the receiver state directory `state_dir`:
/// marks its manifest to be rebuilt by the next sync session, journals an
/// `unsealed` record, then removes the seal. Not sealed, or no such state
/// directory, is [`Error::Input`].
pub fn unseal(state_dir: &Path, name: &str, progress: &dyn Progress) -> Result<Unsealed> {
    if name.is_empty() || name.chars().all(|c| c == '.') {
        return Err(Error::input(format!("'{name}' is not a volume name")));
    }
    if !state_dir.is_dir() {
        return Err(Error::input(format!(
            "receiver state directory {} does not exist: give the --state-dir that `nightpass serve` uses",
            state_dir.display()
        )));
    }
    let store = FileStore::new(state_dir);
    let dir = store.receiver_dir(name);
    let seal = match store.seal(name) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(Error::input(format!(
                "volume '{name}' is not sealed (no seal record in {}): nothing to unseal",
                dir.display()
            )))
        }
        Err(why) => {
            return Err(Error::Io(format!(
                "volume '{name}': {why}; move it aside by hand to unseal"
            )))
        }
    };
    let manifest = rebuild_manifest(&dir, name, progress)?;
    // Journaled before the seal goes: a crash in between leaves the volume
    // sealed, and the operator runs unseal again.
    store.append_receiver_record(
        name,
        &ReceiverRecord::Unsealed(ReceiverUnsealedRecord {
            volume: name.to_string(),
            consistency_point: seal.consistency_point.clone(),
            cutover_at: seal.cutover_at.clone(),
            unsealed_at: crate::progress::rfc3339_seconds(crate::progress::now_unix()),
        }),
    )?;
    store.remove_seal(name)?;
    Ok(Unsealed { seal, manifest })
}

/// Marks the manifest to be rebuilt from a fresh read of the target by the
/// next sync session: the new site may still be writing, so a read made
/// now would go stale before that session holds the volume.
fn rebuild_manifest(dir: &Path, name: &str, progress: &dyn Progress) -> Result<Rebuilt> {
    if !dir.join("manifest").exists() {
        return Ok(Rebuilt::None);
    }
    state::mark_for_rebuild(dir)?;
    progress.note(&format!(
        "volume '{name}': its manifest will be rebuilt from a fresh read of the target at the next pass"
    ));
    Ok(Rebuilt::Deferred)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Quiet;

    fn mark(cp: &str) -> wire::Mark {
        wire::Mark {
            consistency_point: cp.into(),
            freeze_unix_s: 1_796_000_000.0,
            frozen_s: 1.5,
            ..Default::default()
        }
    }

    #[test]
    fn marks_are_bounded() {
        assert!(check_mark(&mark(&"ab".repeat(32))).is_ok());
        assert!(check_mark(&mark(&"a".repeat(1 << 20))).is_err());
        assert!(check_mark(&mark(&"zz".repeat(32))).is_err());
        let mut m = mark(&"ab".repeat(32));
        m.frozen_s = f64::NAN;
        assert!(check_mark(&m).is_err());
        m.frozen_s = 1.0;
        m.freeze_unix_s = f64::INFINITY;
        assert!(check_mark(&m).is_err());
    }

    #[test]
    fn unseal_without_seal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = unseal(dir.path(), "v", &Quiet).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("not sealed"), "{e}");
        let e = unseal(&dir.path().join("nope"), "v", &Quiet).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
