//! The system: tools on the PATH, loop devices, mounts and ext4 (root
//! only; ask [`super::need_root`] first).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Whether `tool` is on the PATH.
pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a system command, panicking with its output on failure; returns stdout.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device over a backing file; detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    /// `losetup --find --show FILE`.
    pub fn attach(file: &Path) -> Loop {
        let file = file.to_str().expect("UTF-8 path");
        let out = run_tool("losetup", &["--find", "--show", file]);
        let dev = PathBuf::from(out.trim());
        assert!(
            dev.starts_with("/dev/"),
            "losetup printed {out:?}, not a device"
        );
        Loop { dev }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for _ in 0..20 {
            if Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A mounted filesystem; thawed (best effort) and unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// `mount -o OPTS DEV DIR`, creating `dir`.
    #[allow(clippy::self_named_constructors)]
    pub fn mount(dev: &Path, dir: &Path, opts: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-o", opts])
            .arg(dev)
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount {} failed", dev.display());
        Mount {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Makes an ext4 filesystem on `dev`.
pub fn mkfs_ext4(dev: &Path) {
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(dev)
        .status()
        .unwrap();
    assert!(st.success());
}
