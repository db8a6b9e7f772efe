//! LVM thin volumes' change sets: the blocks whose mapping differs between
//! two thin snapshots of one pool, as `thin_delta` reports them (the
//! method of wyng-backup), and the identity of a thin volume that the
//! epoch rules compare.
//!
//! Owns running `thin_delta` (thin-provisioning-tools) and `lvs`, reading
//! their output ([`delta`], [`lvs`]), the device-mapper names of a pool's
//! layers, and ([`snap`]) the commands that write: a thin snapshot per
//! pass, its removal, the pool's metadata snapshot. Must not decide when
//! to take, keep or remove a snapshot, or when a change set may be used:
//! those belong to the pass (`pass::sender::thin`) and its records, which
//! this module does not touch.
//!
//! ## How a pass uses it (wyng-backup's method: `get_lvm_deltas` and
//! `update_delta_digest_lvm` in its `src/wyng`)
//! 1. **A thin snapshot per pass.** When pass N begins (for a cutover,
//!    after the freeze), it takes `lvcreate -s -n NAME VG/LV`: without
//!    `--size` that is a thin snapshot in the same pool, with a thin id of
//!    its own (lvmthin(7), "Create SnapLV"; it carries the activation-skip
//!    flag, and `lvchange -ay -K` activates it: "Activation of thin
//!    snapshots"). The pass reads that snapshot, so what it read is
//!    exactly what the next delta starts from; the first pass, with no
//!    snapshot before it, reads everything. [`thin_volume`] gives its identity ([`ThinVolume`]: VG, pool,
//!    thin id, LV UUID), which the pass's record keeps with the origin's
//!    LV UUID and size.
//! 2. **The next pass's change set.** Pass N+1 takes snapshot S(N+1) the
//!    same way, then `thin_delta --snap1 id(S(N)) --snap2 id(S(N+1))`
//!    between the last *completed* pass's snapshot and its own. Every data
//!    block whose mapping is not `same` changed: a write to a block shared
//!    with an older snapshot is copied to a new data block (`different`),
//!    a block first written since is `right_only`, a discarded one
//!    `left_only`. Mappings, not data: a block rewritten with the same
//!    bytes still counts (the set may be larger, never smaller). A 4 KiB
//!    write marks a whole data block (64 KiB to 1 GiB, "between 64KB
//!    (128 sectors) and 1GB (2097152 sectors)" in the kernel's
//!    documentation; [`Delta::data_block_sectors`]).
//! 3. **Epoch rules** (issue 15): the set is used only if the origin's LV
//!    UUID, its size and its pool are those recorded, and S(N) still exists
//!    with its recorded LV UUID and thin id (a removed and recreated LV may
//!    reuse a thin id; its UUID is new). Otherwise the pass reads everything
//!    and says why. S(N) is removed only once pass N+1 is durable, so a
//!    failed pass N+1 leaves S(N) for the next one to diff from.
//! 4. **Metadata.** `thin_delta` reads the pool's metadata device, the
//!    hidden `POOL_tmeta` LV ([`ThinVolume::tmeta_path`]: lvmthin(7),
//!    "ThinMetaLV is renamed to hidden ThinPoolLV_tmeta"). On a live pool
//!    it must read a metadata snapshot: thin_delta(8) says "This tool
//!    cannot be run on live metadata unless the --metadata-snap option is
//!    used". The pass sends `dmsetup message VG-POOL-tpool 0
//!    reserve_metadata_snap` to the pool ([`ThinVolume::pool_dm_name`]),
//!    runs [`thin_delta_live`], then `release_metadata_snap`, also on
//!    failure. The kernel's
//!    Documentation/admin-guide/device-mapper/thin-provisioning.rst, "Pool
//!    messages": `reserve_metadata_snap` "Reserve\[s\] a copy of the data
//!    mapping btree for use by userland. This allows userland to inspect
//!    the mappings as they were when this message was executed";
//!    `release_metadata_snap` releases it, and the pool's status shows the
//!    held root. wyng-backup does the same around its `thin_delta
//!    --metadata-snap`. The same document says "The pool doesn't store
//!    any size against the thin devices": a delta may name blocks past a
//!    shrunk LV's end, which is one more reason a size change ends the
//!    epoch.
//!    The metadata of a pool restored to a file (`thin_restore`) is read
//!    directly ([`thin_delta`]): that is how the tests run here, where the
//!    kernel has no device-mapper.

pub mod delta;
pub mod lvs;
pub mod snap;

use std::ffi::OsStr;
use std::io::{BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use nightpass_proto::changes::BlockRuns;

pub use delta::{parse_delta, parse_delta_from, Delta};
pub use lvs::{parse_lvs, thin_volume, ThinVolume};

use crate::error::{Error, Result};

/// The Debian package that has `thin_delta`.
pub const PACKAGE: &str = "thin-provisioning-tools";

/// Most bytes of the tool's stderr kept for a message.
const STDERR_KEPT: u64 = 16 * 1024;

/// The 4 KiB blocks whose mapping differs between thin ids `snap1` and
/// `snap2` in the pool metadata at `metadata` (a file or an inactive
/// pool's metadata device).
pub fn thin_delta(metadata: &Path, snap1: u64, snap2: u64) -> Result<BlockRuns> {
    run(OsStr::new("thin_delta"), metadata, snap1, snap2, false)
}

/// [`thin_delta`] on a live pool's metadata device (`POOL_tmeta`), read
/// through the metadata snapshot the caller reserved
/// (`reserve_metadata_snap`; see the module's docs).
pub fn thin_delta_live(tmeta: &Path, snap1: u64, snap2: u64) -> Result<BlockRuns> {
    run(OsStr::new("thin_delta"), tmeta, snap1, snap2, true)
}

/// Runs `program` as `thin_delta` and reads its output as it comes.
fn run(
    program: &OsStr,
    metadata: &Path,
    snap1: u64,
    snap2: u64,
    metadata_snap: bool,
) -> Result<BlockRuns> {
    let mut cmd = Command::new(program);
    if metadata_snap {
        cmd.arg("--metadata-snap");
    }
    cmd.arg("--snap1")
        .arg(snap1.to_string())
        .arg("--snap2")
        .arg(snap2.to_string())
        .arg(metadata)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!(
        "thin_delta{} --snap1 {snap1} --snap2 {snap2} {}",
        if metadata_snap {
            " --metadata-snap"
        } else {
            ""
        },
        metadata.display()
    );
    let mut child = cmd.spawn().map_err(|e| spawn_error(program, e))?;
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let _ = (&mut err).take(STDERR_KEPT).read_to_end(&mut kept);
            let _ = std::io::copy(&mut err, &mut std::io::sink());
            String::from_utf8_lossy(&kept).trim().to_string()
        })
    });
    let parsed = match child.stdout.take() {
        Some(out) => parse_delta_from(BufReader::new(out)),
        None => Err(Error::Io(format!("{what}: no output pipe"))),
    };
    if parsed.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| Error::io(&what, e))?;
    let said = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    // A tool that failed by itself says why; one we killed for output we
    // could not read does not.
    let killed = parsed.is_err() && status.code().is_none();
    if !status.success() && !killed {
        let first = said.lines().next().unwrap_or("no message");
        return Err(Error::Io(format!("{what} failed ({status}): {first}")));
    }
    let delta = parsed?;
    if !said.is_empty() {
        return Err(Error::Io(format!(
            "{what} succeeded but said {said:?}: refusing a change set it may not stand behind"
        )));
    }
    if delta.left != Some(snap1) || delta.right != Some(snap2) {
        return Err(Error::Io(format!(
            "{what} reported a diff of {:?} and {:?}, not of {snap1} and {snap2}",
            delta.left, delta.right
        )));
    }
    Ok(delta.changed)
}

/// A tool that could not be started: not installed is the operator's to
/// fix (exit 2, naming the package).
fn spawn_error(program: &OsStr, e: std::io::Error) -> Error {
    let name = program.to_string_lossy();
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::input(format!(
            "'{name}' is not installed: an LVM thin volume's change set needs it \
             (apt-get install {PACKAGE})"
        ))
    } else {
        Error::Io(format!("cannot run {name}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_missing_tool_is_an_exit_2_naming_the_package() {
        let e = run(
            OsStr::new("/nonexistent/thin_delta"),
            Path::new("/x"),
            1,
            2,
            false,
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .contains("apt-get install thin-provisioning-tools"),
            "{e}"
        );
    }

    /// A stand-in tool: prints `out` to stdout, `err` to stderr, exits `code`.
    fn fake(dir: &Path, out: &str, err: &str, code: i32) -> std::path::PathBuf {
        let p = dir.join("thin_delta");
        std::fs::write(dir.join("out"), out).unwrap();
        let script = format!(
            "#!/bin/sh\ncat '{}'\nprintf '%s' '{err}' >&2\nexit {code}\n",
            dir.join("out").display()
        );
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    const GOOD: &str = "<superblock data_block_size=\"128\">\n<diff left=\"1\" right=\"2\">\n\
        <different begin=\"1\" length=\"1\"/>\n</diff>\n</superblock>\n";

    #[test]
    fn exit_status_stderr_and_sides_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Path::new("/meta");
        let ok = fake(dir.path(), GOOD, "", 0);
        let runs = run(ok.as_os_str(), meta, 1, 2, false).unwrap();
        assert_eq!(runs.runs().collect::<Vec<_>>(), vec![16..32]);
        let e = run(ok.as_os_str(), meta, 1, 3, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not of 1 and 3"), "{e}");
        let noisy = fake(dir.path(), GOOD, "warning: odd", 0);
        let e = run(noisy.as_os_str(), meta, 1, 2, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("warning: odd"), "{e}");
        let failed = fake(dir.path(), GOOD, "bad checksum in superblock", 1);
        let e = run(failed.as_os_str(), meta, 1, 2, true).unwrap_err();
        assert_eq!(e.exit_code(), 3);
        let e = e.to_string();
        assert!(
            e.contains("--metadata-snap") && e.contains("bad checksum"),
            "{e}"
        );
        let garbled = fake(dir.path(), "<superblock>", "", 0);
        let e = run(garbled.as_os_str(), meta, 1, 2, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not understood"), "{e}");
    }
}
