//! The LVM commands that change something for a thin change set: a thin
//! snapshot per pass (`lvcreate --snapshot` without a size, lvmthin(7)
//! "Create SnapLV"), its removal (`lvremove`), and the pool's metadata
//! snapshot around a `thin_delta` of a live pool (`dmsetup message POOL-tpool
//! 0 reserve_metadata_snap` / `release_metadata_snap`, the kernel's
//! device-mapper thin-provisioning document, "Pool messages").
//!
//! Owns running those commands and nothing else: when to snapshot, which
//! snapshot a change set starts from and when one may be removed belong to
//! the pass (`pass::sender::thin`). Snapshot names carry [`SNAP_TAG`], so
//! nothing here ever removes an LV it did not create.

use std::path::Path;

use super::{thin_delta_live, thin_volume, ThinVolume};
use crate::error::{Error, Result};
use nightpass_proto::changes::BlockRuns;

/// What every snapshot name nightpass makes contains.
pub const SNAP_TAG: &str = "_nightpass_";

/// The name of the thin snapshot of `origin` for pass `pass_no`.
pub fn snapshot_name(origin: &str, pass_no: u64) -> String {
    format!("{origin}{SNAP_TAG}{pass_no}")
}

/// Runs an LVM or device-mapper command; its stderr is the error.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = super::lvs::lvm_tool(program, args)?;
    if !out.status.success() {
        return Err(Error::Io(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Takes a thin snapshot of `origin` named `name` in its pool, active so
/// that it can be read (`--setactivationskip n`: thin snapshots skip
/// activation by default, lvmthin(7) "Activation of thin snapshots"), and
/// returns its identity.
pub fn create(origin: &ThinVolume, name: &str) -> Result<ThinVolume> {
    let vg_lv = format!("{}/{}", origin.vg, origin.lv);
    run(
        "lvcreate",
        &[
            "--snapshot",
            "--setactivationskip",
            "n",
            "--activate",
            "y",
            "--name",
            name,
            &vg_lv,
        ],
    )?;
    let snap = thin_volume(&format!("{}/{name}", origin.vg))?;
    if snap.pool != origin.pool {
        return Err(Error::Io(format!(
            "the snapshot {}/{name} is in pool '{}', not in its origin's '{}'",
            origin.vg, snap.pool, origin.pool
        )));
    }
    Ok(snap)
}

/// Removes a snapshot nightpass made (its name carries [`SNAP_TAG`]).
pub fn remove(vg: &str, lv: &str) -> Result<()> {
    if !lv.contains(SNAP_TAG) {
        return Err(Error::Io(format!(
            "refusing to remove {vg}/{lv}: not a snapshot nightpass made"
        )));
    }
    run("lvremove", &["--yes", &format!("{vg}/{lv}")])
}

/// The identity of `vg/lv` now, or `None` when it no longer exists.
pub fn find(vg: &str, lv: &str) -> Option<ThinVolume> {
    thin_volume(&format!("{vg}/{lv}")).ok()
}

/// The blocks whose mapping differs between thin ids `from` and `to` of
/// `pool`'s live metadata, read through a metadata snapshot reserved for
/// the read and released after it, also on failure.
pub fn delta(pool: &ThinVolume, from: u64, to: u64) -> Result<BlockRuns> {
    let dm = pool.pool_dm_name();
    run("dmsetup", &["message", &dm, "0", "reserve_metadata_snap"])?;
    let changed = thin_delta_live(&pool.tmeta_path(), from, to);
    let released = run("dmsetup", &["message", &dm, "0", "release_metadata_snap"]);
    let changed = changed?;
    released?;
    Ok(changed)
}

/// Whether `path` is a device-mapper device (LVM's logical volumes are):
/// its major number is the one `/proc/devices` gives `device-mapper`.
pub fn is_device_mapper(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let major = nix::sys::stat::major(meta.rdev());
    std::fs::read_to_string("/proc/devices").is_ok_and(|d| dm_major(&d) == Some(major))
}

/// The block major of `device-mapper` in a `/proc/devices` listing.
fn dm_major(devices: &str) -> Option<u64> {
    devices
        .split("Block devices:")
        .nth(1)?
        .lines()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [n, "device-mapper"] => n.parse().ok(),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_mapper_major_comes_from_proc_devices() {
        let listing = "Character devices:\n  1 mem\n253 device-mapper\n\nBlock devices:\n  7 loop\n  8 sd\n252 device-mapper\n259 blkext\n";
        assert_eq!(dm_major(listing), Some(252));
        assert_eq!(dm_major("Block devices:\n  7 loop\n"), None);
        // A loop device on this machine is not one.
        assert!(!is_device_mapper(Path::new("/dev/null")));
    }

    #[test]
    fn only_our_snapshots_are_removed() {
        let e = remove("vg0", "filer01").unwrap_err();
        assert!(
            e.to_string().contains("not a snapshot nightpass made"),
            "{e}"
        );
        assert_eq!(snapshot_name("filer01", 7), "filer01_nightpass_7");
    }
}
