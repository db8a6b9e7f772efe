//! The tracefs file system: finding or mounting it, our instances'
//! directories and files, per-CPU statistics, stale instances, and what
//! sysfs says about a device (a partition's disk and start).
//!
//! Owns paths and small text files; must not parse pages or decide what
//! an event means.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Where tracefs is mounted on current systems.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The prefix of our instances' names: `nightpass-<pid>-<random>`.
pub const PREFIX: &str = "nightpass-";

/// The tracefs root holding `instances/`, mounting tracefs at
/// [`TRACEFS`] when it is absent (which needs root).
pub fn root() -> Result<PathBuf> {
    let root = PathBuf::from(TRACEFS);
    if root.join("instances").is_dir() {
        return Ok(root);
    }
    let legacy = PathBuf::from("/sys/kernel/debug/tracing");
    if legacy.join("instances").is_dir() {
        return Ok(legacy);
    }
    nix::mount::mount(
        Some("nodev"),
        &root,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        Error::input(format!(
            "no tracefs: {TRACEFS} is not mounted and mounting it failed ({e}); \
             change tracking needs tracefs (mount -t tracefs nodev {TRACEFS}, as root)"
        ))
    })?;
    if root.join("instances").is_dir() {
        Ok(root)
    } else {
        Err(Error::input(format!(
            "no tracefs: {TRACEFS} has no instances/ after mounting tracefs there"
        )))
    }
}

/// Writes `value` to the control file `path` in one write(2), as tracefs
/// expects.
pub fn write(path: &Path, value: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .ctx(format!("open {}", path.display()))?;
    f.write_all(value.as_bytes())
        .ctx(format!("write '{}' to {}", value.trim(), path.display()))
}

/// Reads the text file `path`, the first read(2) asking for 64 KiB: some
/// tracefs files (`events/header_page`) answer only a read at offset 0, so
/// a small first read (as `read_to_string` makes) would cut them short.
pub fn read(path: &Path) -> Result<String> {
    let what = || format!("read {}", path.display());
    let mut f = fs::File::open(path).ctx(what())?;
    let mut bytes = vec![0u8; 64 * 1024];
    let mut len = 0;
    loop {
        if len == bytes.len() {
            bytes.resize(len * 2, 0);
        }
        match f.read(&mut bytes[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(what(), e)),
        }
    }
    bytes.truncate(len);
    String::from_utf8(bytes).map_err(|_| Error::Io(format!("{} is not UTF-8", path.display())))
}

/// The CPUs with a buffer in the instance (`per_cpu/cpuN`), ascending.
pub fn cpus(instance: &Path) -> Result<Vec<usize>> {
    let dir = instance.join("per_cpu");
    let mut cpus: Vec<usize> = fs::read_dir(&dir)
        .ctx(format!("list {}", dir.display()))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("cpu")?
                .parse()
                .ok()
        })
        .collect();
    cpus.sort_unstable();
    Ok(cpus)
}

/// One CPU's loss counters from `per_cpu/cpuN/stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// `overrun`: events overwritten before they were read.
    pub overrun: u64,
    /// `commit overrun`: events lost while nested writers filled a page.
    pub commit_overrun: u64,
    /// `dropped events`: events refused because the buffer was full.
    pub dropped: u64,
}

/// Parses a `stats` file; a counter that is missing reads as 0.
pub fn parse_stats(text: &str) -> CpuStats {
    let mut s = CpuStats::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<u64>() else {
            continue;
        };
        match key.trim() {
            "overrun" => s.overrun = v,
            "commit overrun" => s.commit_overrun = v,
            "dropped events" => s.dropped = v,
            _ => {}
        }
    }
    s
}

/// The pid in an instance name `nightpass-<pid>-<random>`.
pub fn pid_of(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, random) = rest.split_once('-')?;
    (!random.is_empty()).then_some(())?;
    pid.parse().ok().filter(|p: &i32| *p > 0)
}

/// Whether a process with `pid` exists (signal 0; EPERM means it does).
pub fn alive(pid: i32) -> bool {
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Turns tracing off in an instance and removes it.
pub fn remove_instance(dir: &Path) -> Result<()> {
    let _ = write(&dir.join("tracing_on"), "0");
    fs::remove_dir(dir).ctx(format!("remove tracing instance {}", dir.display()))
}

/// A partition as sysfs describes it: its disk and where it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The whole disk's dev_t (`MAJOR<<20 | MINOR`), which its events carry.
    pub disk: u32,
    /// The partition's first sector on the disk.
    pub start: u64,
    /// The partition's size in sectors.
    pub sectors: u64,
}

/// The kernel's `MAJOR<<20 | MINOR` of a userspace dev_t (`st_rdev`).
pub fn kernel_dev(rdev: u64) -> u32 {
    let major = nix::sys::stat::major(rdev) as u32;
    let minor = nix::sys::stat::minor(rdev) as u32;
    (major << 20) | (minor & 0xF_FFFF)
}

/// The sysfs directory of a kernel dev_t (`/sys/dev/block/M:m`).
fn sysfs(dev: u32) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{}:{}", dev >> 20, dev & 0xF_FFFF))
}

/// Whether the kernel dev_t names a block device that exists.
pub fn exists(dev: u32) -> bool {
    sysfs(dev).join("dev").exists()
}

/// The partition `dev` is, or `None` for a whole disk (or a device sysfs
/// does not know).
pub fn partition_of(dev: u32) -> Result<Option<Partition>> {
    let dir = sysfs(dev);
    if !dir.join("partition").exists() {
        return Ok(None);
    }
    let number = |p: PathBuf| -> Result<u64> {
        read(&p)?
            .trim()
            .parse()
            .map_err(|_| Error::Io(format!("{} is not a number", p.display())))
    };
    let start = number(dir.join("start"))?;
    let sectors = number(dir.join("size"))?;
    let parent = read(&dir.join("../dev"))?;
    let (major, minor) = parent
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| Error::Io(format!("{}/../dev is not MAJOR:MINOR", dir.display())))?;
    Ok(Some(Partition {
        disk: (major << 20) | minor,
        start,
        sectors,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_this_kernel() {
        let text = "entries: 0\noverrun: 12\ncommit overrun: 1\nbytes: 0\n\
                    oldest event ts:     0.000000\nnow ts: 12370.937434\n\
                    dropped events: 3\nread events: 9\n";
        let s = parse_stats(text);
        assert_eq!((s.overrun, s.commit_overrun, s.dropped), (12, 1, 3));
    }

    #[test]
    fn instance_names() {
        assert_eq!(pid_of("nightpass-123-a1b2c3d4"), Some(123));
        assert_eq!(pid_of("nightpass-123-"), None);
        assert_eq!(pid_of("nightpass-x-1"), None);
        assert_eq!(pid_of("other-123-1"), None);
    }
}
