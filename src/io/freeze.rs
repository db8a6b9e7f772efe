//! Freezing the source for the cutover pass, and the guard that always thaws.
//!
//! Owns every way of stopping writes to the source: `fsfreeze` (the FIFREEZE
//! and FITHAW ioctls on the mount point), an LVM snapshot (`lvcreate -s`, the
//! pass reads the snapshot, `lvremove -y` afterwards), the operator's own
//! `--pre`/`--post` commands, or `--assume-frozen`. A [`FreezeGuard`] undoes
//! the freeze exactly once: explicitly through [`FreezeGuard::thaw`], or from
//! `Drop` on every other path (error, panic unwinding, the future being
//! dropped on SIGINT/SIGTERM or on `--max-freeze`). Only SIGKILL can skip it;
//! then `fsfreeze -u MOUNTPOINT` thaws by hand.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::io::sys;

/// How the source is frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// Freeze the filesystem mounted at this path (it must live on the source).
    Fsfreeze(PathBuf),
    /// Snapshot the source logical volume; the pass reads the snapshot.
    LvmSnapshot {
        /// Copy-on-write space for the snapshot in bytes (`lvcreate --size`).
        size: u64,
    },
    /// Run the operator's stop command, and the restart command afterwards.
    Hooks {
        /// Stop command (`sh -c`).
        pre: String,
        /// Restart command (`sh -c`), run in every case once `pre` ran.
        post: String,
    },
    /// The operator has stopped all writers.
    AssumeFrozen,
}

impl Method {
    /// Operator's name for the method.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Fsfreeze(_) => "fsfreeze",
            Method::LvmSnapshot { .. } => "lvm-snapshot",
            Method::Hooks { .. } => "pre/post commands",
            Method::AssumeFrozen => "assume-frozen",
        }
    }
}

enum Undo {
    Thaw(std::fs::File, PathBuf),
    RemoveSnapshot(String),
    Post(String),
    Nothing,
}

/// An active freeze. Thaws on drop.
pub struct FreezeGuard {
    undo: Option<Undo>,
    read_from: PathBuf,
    since: Instant,
}

impl std::fmt::Debug for FreezeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FreezeGuard(read_from={})", self.read_from.display())
    }
}

/// Runs `sh -c cmd`, its stdout going to our stderr (stdout may be JSON only).
pub fn run_hook(what: &str, cmd: &str) -> Result<()> {
    tracing::info!("running {what} command: {cmd}");
    let stdout = sys::dup_stdio(std::io::stderr().as_fd())
        .map_err(|e| Error::Io(format!("dup stderr: {e}")))?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .status()
        .map_err(|e| Error::Io(format!("cannot run {what} command: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Io(format!(
            "{what} command '{cmd}' failed with {status}"
        )))
    }
}

/// Checks that the filesystem mounted at `mountpoint` lives on the block device `source`.
pub fn check_mount_on_source(mountpoint: &Path, source: &Path) -> Result<()> {
    let src = std::fs::metadata(source)
        .map_err(|e| Error::input(format!("cannot stat {}: {e}", source.display())))?;
    if !src.file_type().is_block_device() {
        return Err(Error::input(format!(
            "--fsfreeze needs SOURCE to be the block device the filesystem is mounted from; {} is not a block device",
            source.display()
        )));
    }
    let mp = std::fs::metadata(mountpoint).map_err(|e| {
        Error::input(format!(
            "cannot stat mount point {}: {e}",
            mountpoint.display()
        ))
    })?;
    if mp.dev() != src.rdev() {
        return Err(Error::input(format!(
            "the filesystem at {} does not live on {}: refusing to freeze one thing and copy another",
            mountpoint.display(),
            source.display()
        )));
    }
    Ok(())
}

/// The LVM `VG/LV` of a logical volume path, asked of `lvs`.
fn lv_name(source: &Path) -> Result<String> {
    let out = Command::new("lvs")
        .args(["--noheadings", "-o", "vg_name,lv_name"])
        .arg(source)
        .output()
        .map_err(|e| Error::input(format!("cannot run lvs: {e}")))?;
    if !out.status.success() {
        return Err(Error::input(format!(
            "{} is not an LVM logical volume (lvs: {})",
            source.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    match (words.next(), words.next()) {
        (Some(vg), Some(lv)) => Ok(format!("{vg}/{lv}")),
        _ => Err(Error::input(format!(
            "lvs gave no volume group for {}",
            source.display()
        ))),
    }
}

/// The `lvcreate` arguments for a snapshot named `name` of `vg_lv` with
/// `size` bytes of copy-on-write space (given in KiB, rounded up: every
/// LVM release takes the `k` unit; LVM rounds up to its extent size).
pub fn lvcreate_args(vg_lv: &str, name: &str, size: u64) -> Vec<String> {
    vec![
        "--snapshot".into(),
        "--size".into(),
        format!("{}k", size.div_ceil(1024)),
        "--name".into(),
        name.into(),
        vg_lv.into(),
    ]
}

/// True when `tool` is on the PATH.
pub fn have_tool(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

impl Method {
    /// Checks, before anything is frozen, what can be checked of freezing
    /// `source` this way: the mount lives on SOURCE, SOURCE is a logical
    /// volume. A cutover calls it first, so a wrong freeze is said at once.
    pub fn check(&self, source: &Path) -> Result<()> {
        match self {
            Method::Fsfreeze(mp) => check_mount_on_source(mp, source),
            Method::LvmSnapshot { .. } => lv_name(source).map(drop),
            Method::Hooks { .. } | Method::AssumeFrozen => Ok(()),
        }
    }
}

impl FreezeGuard {
    /// Freezes `source` by `method`.
    pub fn freeze(method: &Method, source: &Path) -> Result<FreezeGuard> {
        let mut since = Instant::now();
        let (undo, read_from) = match method {
            Method::AssumeFrozen => (Undo::Nothing, source.to_owned()),
            Method::Hooks { pre, post } => {
                // `post` runs in every case once `pre` was started.
                let guard = FreezeGuard {
                    undo: Some(Undo::Post(post.clone())),
                    read_from: source.to_owned(),
                    since,
                };
                run_hook("--pre", pre)?;
                return Ok(guard);
            }
            Method::Fsfreeze(mp) => {
                check_mount_on_source(mp, source)?;
                let dir = std::fs::File::open(mp).map_err(|e| {
                    Error::input(format!("cannot open mount point {}: {e}", mp.display()))
                })?;
                // Write back what is dirty while writers still run, so that
                // FIFREEZE (which blocks writers, then flushes) has little
                // left to flush: the frozen time starts at the ioctl.
                nix::unistd::syncfs(dir.as_raw_fd())
                    .map_err(|e| Error::Io(format!("syncfs of {} failed: {e}", mp.display())))?;
                since = Instant::now();
                sys::fifreeze(&dir)
                    .map_err(|e| Error::Io(format!("FIFREEZE of {} failed: {e}", mp.display())))?;
                (Undo::Thaw(dir, mp.clone()), source.to_owned())
            }
            Method::LvmSnapshot { size } => {
                for tool in ["lvs", "lvcreate", "lvremove"] {
                    if !have_tool(tool) {
                        return Err(Error::input(format!(
                            "--lvm-snapshot needs the LVM tools, and '{tool}' is not installed (apt install lvm2)"
                        )));
                    }
                }
                let vg_lv = lv_name(source)?;
                let vg = vg_lv.split('/').next().unwrap_or_default().to_string();
                let name = format!("nightpass-cutover-{}", std::process::id());
                let out = Command::new("lvcreate")
                    .args(lvcreate_args(&vg_lv, &name, *size))
                    .output()
                    .map_err(|e| Error::Io(format!("cannot run lvcreate: {e}")))?;
                if !out.status.success() {
                    return Err(Error::Io(format!(
                        "lvcreate of a snapshot of {vg_lv} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                (
                    Undo::RemoveSnapshot(format!("{vg}/{name}")),
                    PathBuf::from(format!("/dev/{vg}/{name}")),
                )
            }
        };
        Ok(FreezeGuard {
            undo: Some(undo),
            read_from,
            since,
        })
    }

    /// The path the final pass must read (the snapshot, or the source).
    pub fn read_from(&self) -> &Path {
        &self.read_from
    }

    /// Seconds since the freeze began.
    pub fn frozen_for(&self) -> f64 {
        self.since.elapsed().as_secs_f64()
    }

    /// Ends the freeze. Idempotent; reports a failed thaw.
    pub fn thaw(&mut self) -> Result<()> {
        match self.undo.take() {
            None | Some(Undo::Nothing) => Ok(()),
            Some(Undo::Thaw(dir, mp)) => {
                // On the descriptor FIFREEZE was issued on.
                sys::fithaw(&dir).map_err(|e| {
                    Error::Io(format!(
                        "FITHAW of {} failed: {e}; thaw by hand: fsfreeze -u {}",
                        mp.display(),
                        mp.display()
                    ))
                })
            }
            Some(Undo::RemoveSnapshot(name)) => {
                let st = Command::new("lvremove")
                    .args(["-y", &name])
                    .status()
                    .map_err(|e| Error::Io(format!("cannot run lvremove: {e}")))?;
                if st.success() {
                    Ok(())
                } else {
                    Err(Error::Io(format!(
                        "lvremove -y {name} failed: remove the snapshot by hand"
                    )))
                }
            }
            Some(Undo::Post(cmd)) => run_hook("--post", &cmd),
        }
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            tracing::error!("nightpass: error: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvcreate_command_is_a_snapshot_of_the_lv() {
        assert_eq!(
            lvcreate_args("vg0/filer01", "snap", 10 << 30),
            [
                "--snapshot",
                "--size",
                "10485760k",
                "--name",
                "snap",
                "vg0/filer01"
            ]
        );
    }

    #[test]
    fn hooks_run_post_even_when_pre_fails() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("post-ran");
        let method = Method::Hooks {
            pre: "exit 3".into(),
            post: format!("touch {}", marker.display()),
        };
        let e = FreezeGuard::freeze(&method, Path::new("/dev/null")).unwrap_err();
        assert!(
            e.to_string().contains("--pre command 'exit 3' failed"),
            "{e}"
        );
        assert!(marker.exists(), "--post must run after a failed --pre");
    }

    #[test]
    fn fsfreeze_refuses_a_source_that_is_not_a_block_device() {
        let e = check_mount_on_source(Path::new("/"), Path::new("/etc/hostname")).unwrap_err();
        assert!(e.to_string().contains("not a block device"), "{e}");
    }

    #[test]
    fn lvm_without_tools_says_so() {
        if have_tool("lvcreate") {
            eprintln!("SKIP: LVM tools are installed; the missing-tools path cannot be shown");
            return;
        }
        let e = FreezeGuard::freeze(
            &Method::LvmSnapshot { size: 1 << 30 },
            Path::new("/dev/null"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("needs the LVM tools"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }
}
