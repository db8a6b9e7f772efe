//! A whole filer in one run: the plan file, checked whole before anything
//! starts, and the run of a command over every volume it names.
//!
//! Owns the plan file's format (TOML, unknown keys refused) and its checks
//! ([`Plan::load`]), the scheduling of volumes within `jobs` and
//! `max_failures` with the red button on SIGINT/SIGTERM ([`run`]), the
//! per-volume reporter that tags every event with the plan's volume name
//! ([`tagged`]), and `status --plan` ([`status`]). It must not run a pass
//! itself (that is [`crate::pass::sender`] through the commands) nor touch
//! the state directory except to read it for `status`.

pub mod commands;
pub mod run;
pub mod status;
pub mod tagged;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nightpass_proto::chunk::ChunkSize;
use serde::Deserialize;

use crate::app::cli::{parse_chunk_size, parse_size};
use crate::error::{Error, Result};
use crate::net::transport::{parse_fingerprint, RemoteVolume};

/// The plan file as written (see docs/CLI.md, "The plan file").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    receiver: String,
    server_fingerprint: String,
    jobs: Option<usize>,
    max_failures: Option<usize>,
    #[serde(default)]
    assume_frozen: bool,
    pre: Option<String>,
    post: Option<String>,
    bwlimit: Option<SizeValue>,
    chunk_size: Option<SizeValue>,
    #[serde(default, rename = "volume")]
    volumes: Vec<VolumeEntry>,
}

/// One `[[volume]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeEntry {
    name: String,
    source: PathBuf,
    fsfreeze: Option<PathBuf>,
}

/// A size written as a number of bytes or as text with a suffix (`"100M"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn text(&self) -> String {
        match self {
            SizeValue::Bytes(b) => b.to_string(),
            SizeValue::Text(t) => t.clone(),
        }
    }
}

/// The filer's freeze at cutover, as the plan gives it (for the group
/// cutover; the passes of sync, converge and verify do not freeze).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilerFreeze {
    /// The operator's stop command.
    pub pre: Option<String>,
    /// The operator's restart command.
    pub post: Option<String>,
    /// The operator has stopped every writer.
    pub assume_frozen: bool,
}

/// One volume of a checked plan.
#[derive(Debug, Clone)]
pub struct PlanVolume {
    /// The name the receiver exports, and the volume's name in every event.
    pub name: String,
    /// The source as written in the plan.
    pub source: PathBuf,
    /// The mount to freeze at cutover, if any.
    pub fsfreeze: Option<PathBuf>,
    /// `RECEIVER/NAME`.
    pub dest: RemoteVolume,
    /// The source's size in bytes when the plan was checked.
    pub size: u64,
}

/// A plan checked whole: every volume readable, names and sources unique,
/// the receiver's address and fingerprint well formed.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The plan file.
    pub path: PathBuf,
    /// `HOST:PORT` of the receiver.
    pub receiver: String,
    /// The receiver's fingerprint, checked.
    pub server_fingerprint: String,
    /// Volumes in flight at once.
    pub jobs: usize,
    /// After this many failed volumes no new one starts.
    pub max_failures: Option<usize>,
    /// One limit on payload bytes per second for all the volumes.
    pub bwlimit: Option<u64>,
    /// Chunk size of the volumes' first passes.
    pub chunk_size: Option<ChunkSize>,
    /// The filer's freeze at cutover.
    pub freeze: FilerFreeze,
    /// The volumes, in the plan's order.
    pub volumes: Vec<PlanVolume>,
}

/// A refusal of the plan at `path` (exit 2).
fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::input(format!(
        "plan {}: {why}; nothing was started",
        path.display()
    ))
}

impl Plan {
    /// Reads and checks the plan at `path`; any defect refuses it whole
    /// (exit 2) before anything is connected, read or written.
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::input(format!("cannot read plan {}: {e}", path.display())))?;
        Plan::parse(path, &text)
    }

    /// Checks plan `text` (read from `path`, for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Plan> {
        Plan::parse_with(path, text, Sources::Here)
    }

    /// Checks plan `text` for a filer whose sources are on another host
    /// (`fleet add --host`): everything but the sources themselves, which
    /// must then be absolute paths; each volume's `size` is 0 (unknown
    /// here). The agent on that host checks them at every pass.
    pub fn parse_elsewhere(path: &Path, text: &str) -> Result<Plan> {
        Plan::parse_with(path, text, Sources::Elsewhere)
    }

    fn parse_with(path: &Path, text: &str, sources: Sources) -> Result<Plan> {
        let file: PlanFile = toml::from_str(text).map_err(|e| {
            bad(
                path,
                e.to_string()
                    .trim_end()
                    .replace('\n', " ")
                    .replace("  ", " "),
            )
        })?;
        let server_fingerprint = parse_fingerprint(&file.server_fingerprint)
            .map_err(|e| bad(path, format!("server_fingerprint: {e}")))?;
        if file.volumes.is_empty() {
            return Err(bad(path, "it names no [[volume]]"));
        }
        let jobs = match file.jobs {
            Some(0) => return Err(bad(path, "jobs = 0: at least one volume must be in flight")),
            Some(j) => j,
            None => file.volumes.len(),
        };
        if file.max_failures == Some(0) {
            return Err(bad(
                path,
                "max_failures = 0 would start nothing; leave it out for no limit",
            ));
        }
        let freeze = freeze(path, &file)?;
        let bwlimit = match &file.bwlimit {
            Some(v) => match parse_size(&v.text()) {
                Ok(0) => return Err(bad(path, "bwlimit must be more than 0")),
                Ok(b) => Some(b),
                Err(e) => return Err(bad(path, format!("bwlimit: {e}"))),
            },
            None => None,
        };
        let chunk_size = match &file.chunk_size {
            Some(v) => Some(
                parse_chunk_size(&v.text()).map_err(|e| bad(path, format!("chunk_size: {e}")))?,
            ),
            None => None,
        };
        let volumes = volumes(path, &file.receiver, file.volumes, sources)?;
        Ok(Plan {
            path: path.to_owned(),
            receiver: file.receiver,
            server_fingerprint,
            jobs,
            max_failures: file.max_failures,
            bwlimit,
            chunk_size,
            freeze,
            volumes,
        })
    }

    /// The volumes' names, in the plan's order.
    pub fn names(&self) -> Vec<&str> {
        self.volumes.iter().map(|v| v.name.as_str()).collect()
    }
}

/// The filer's freeze: `pre` and `post` together, or `assume_frozen`, or
/// neither.
fn freeze(path: &Path, file: &PlanFile) -> Result<FilerFreeze> {
    match (&file.pre, &file.post) {
        (Some(_), None) | (None, Some(_)) => {
            return Err(bad(
                path,
                "pre and post go together (the stop and the restart command)",
            ))
        }
        (Some(_), Some(_)) if file.assume_frozen => {
            return Err(bad(
                path,
                "pre/post and assume_frozen = true are two freezes; give one",
            ))
        }
        _ => {}
    }
    Ok(FilerFreeze {
        pre: file.pre.clone(),
        post: file.post.clone(),
        assume_frozen: file.assume_frozen,
    })
}

/// Where a plan's sources are, for its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sources {
    /// On this host: each must be readable, a block device or a regular
    /// file, not empty.
    Here,
    /// On another host: each must be an absolute path; nothing is read.
    Elsewhere,
}

/// Checks every volume: its name, its destination, its source readable
/// (when here), and no name or source (after resolving symlinks, when
/// here) given twice.
fn volumes(
    path: &Path,
    receiver: &str,
    entries: Vec<VolumeEntry>,
    sources_are: Sources,
) -> Result<Vec<PlanVolume>> {
    if receiver.contains('/') || RemoteVolume::parse(&format!("{receiver}/x")).is_none() {
        return Err(bad(
            path,
            format!("receiver = {receiver:?} is not HOST:PORT (e.g. \"10.1.2.3:7400\")"),
        ));
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut sources: HashMap<PathBuf, String> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, v) in entries.into_iter().enumerate() {
        let dest = RemoteVolume::parse(&format!("{receiver}/{}", v.name))
            .filter(|_| !v.name.trim().is_empty())
            .ok_or_else(|| {
                bad(
                    path,
                    format!("volume {}: name {:?} is not a volume name", i + 1, v.name),
                )
            })?;
        if let Some(first) = names.insert(v.name.clone(), i) {
            return Err(bad(
                path,
                format!(
                    "volume name '{}' is given twice (volumes {} and {})",
                    v.name,
                    first + 1,
                    i + 1
                ),
            ));
        }
        let unreadable = |e: &dyn std::fmt::Display| {
            bad(
                path,
                format!(
                    "volume '{}': cannot read source {}: {e}",
                    v.name,
                    v.source.display()
                ),
            )
        };
        let canonical = match sources_are {
            Sources::Here => v.source.canonicalize().map_err(|e| unreadable(&e))?,
            Sources::Elsewhere if v.source.is_absolute() => v.source.clone(),
            Sources::Elsewhere => {
                return Err(bad(
                    path,
                    format!(
                        "volume '{}': source {} is not an absolute path (its host reads it)",
                        v.name,
                        v.source.display()
                    ),
                ))
            }
        };
        if let Some(other) = sources.insert(canonical.clone(), v.name.clone()) {
            return Err(bad(
                path,
                format!(
                    "volumes '{other}' and '{}' have one source ({}): two copies of one device would fight over it",
                    v.name,
                    canonical.display()
                ),
            ));
        }
        let size = match sources_are {
            Sources::Here => readable_size(&v.source).map_err(|e| unreadable(&e))?,
            Sources::Elsewhere => 0,
        };
        if let Some(mp) = &v.fsfreeze {
            if !mp.is_absolute() {
                return Err(bad(
                    path,
                    format!(
                        "volume '{}': fsfreeze = {} is not an absolute mount point",
                        v.name,
                        mp.display()
                    ),
                ));
            }
        }
        out.push(PlanVolume {
            name: v.name,
            source: v.source,
            fsfreeze: v.fsfreeze,
            dest,
            size,
        });
    }
    Ok(out)
}

/// Opens `source` for reading (and nothing else) and returns its size: a
/// block device or a regular file, not empty.
fn readable_size(source: &Path) -> std::result::Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let mut f = std::fs::File::open(source).map_err(|e| e.to_string())?;
    let kind = f.metadata().map_err(|e| e.to_string())?.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err("not a block device or a regular file".into());
    }
    let size = f.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if size == 0 {
        return Err("it is empty (0 bytes)".into());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> String {
        format!("np1-{}", "a".repeat(52))
    }

    fn plan(dir: &Path, body: &str) -> Result<Plan> {
        std::fs::write(dir.join("a.img"), [1u8; 4096]).unwrap();
        std::fs::write(dir.join("b.img"), [2u8; 4096]).unwrap();
        let text = format!(
            "receiver = \"127.0.0.1:7400\"\nserver_fingerprint = \"{}\"\n{body}",
            fp()
        );
        Plan::parse(&dir.join("plan.toml"), &text)
    }

    fn vol(dir: &Path, name: &str, file: &str) -> String {
        format!(
            "[[volume]]\nname = \"{name}\"\nsource = \"{}\"\n",
            dir.join(file).display()
        )
    }

    fn refused(r: Result<Plan>, words: &str) {
        let e = r.expect_err("the plan should be refused");
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(e.to_string().contains(words), "{e} does not say {words:?}");
    }

    #[test]
    fn a_plan_for_another_host_checks_all_but_its_sources() {
        let dir = tempfile::tempdir().unwrap();
        let text = |src: &str| {
            format!(
                "receiver = \"127.0.0.1:7400\"\nserver_fingerprint = \"{}\"\n\
                 [[volume]]\nname = \"a\"\nsource = \"{src}\"\n",
                fp()
            )
        };
        let path = dir.path().join("plan.toml");
        // Not here: refused by the local check, taken for another host.
        let far = text("/dev/vg9/not-on-this-host");
        assert_eq!(Plan::parse(&path, &far).unwrap_err().exit_code(), 2);
        let p = Plan::parse_elsewhere(&path, &far).unwrap();
        assert_eq!(p.volumes[0].size, 0);
        // A relative source means nothing on another host.
        let e = Plan::parse_elsewhere(&path, &text("vg9/a")).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        // The rest is still checked.
        let dup = format!("{far}[[volume]]\nname = \"a\"\nsource = \"/dev/b\"\n");
        assert!(Plan::parse_elsewhere(&path, &dup).is_err());
    }

    #[test]
    fn a_good_plan_and_its_defaults() {
        let d = tempfile::tempdir().unwrap();
        let body = format!(
            "bwlimit = \"10M\"\n{}{}",
            vol(d.path(), "a", "a.img"),
            vol(d.path(), "b", "b.img")
        );
        let p = plan(d.path(), &body).unwrap();
        assert_eq!(p.jobs, 2);
        assert_eq!(p.max_failures, None);
        assert_eq!(p.bwlimit, Some(10 << 20));
        assert_eq!(p.names(), ["a", "b"]);
        assert_eq!(p.volumes[1].dest.to_string(), "127.0.0.1:7400/b");
        assert_eq!(p.volumes[0].size, 4096);
    }

    #[test]
    fn defects_refuse_the_plan_whole() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (vol(d.path(), "a", "a.img"), vol(d.path(), "b", "b.img"));
        refused(
            plan(d.path(), &format!("{a}{}", vol(d.path(), "a", "b.img"))),
            "'a' is given twice",
        );
        refused(
            plan(d.path(), &format!("{a}{}", vol(d.path(), "c", "a.img"))),
            "one source",
        );
        refused(plan(d.path(), &format!("jobs = 0\n{a}")), "jobs = 0");
        refused(
            plan(d.path(), &format!("max_failures = 0\n{a}")),
            "max_failures = 0",
        );
        refused(plan(d.path(), &format!("colour = \"red\"\n{a}")), "colour");
        refused(plan(d.path(), &format!("{a}speed = 1\n")), "speed");
        refused(
            plan(
                d.path(),
                &format!("{a}{}", vol(d.path(), "m", "missing.img")),
            ),
            "cannot read source",
        );
        refused(plan(d.path(), &format!("pre = \"x\"\n{a}")), "pre and post");
        refused(
            plan(d.path(), &format!("bwlimit = \"fast\"\n{a}")),
            "bwlimit",
        );
        refused(plan(d.path(), ""), "no [[volume]]");
        refused(
            plan(d.path(), &format!("{a}{b}").replace("\"b\"", "\"x/y\"")),
            "not a volume name",
        );
        let text = format!(
            "receiver = \"nowhere\"\nserver_fingerprint = \"{}\"\n{a}",
            fp()
        );
        refused(Plan::parse(Path::new("p"), &text), "not HOST:PORT");
        let text = format!("receiver = \"h:1\"\nserver_fingerprint = \"np1-short\"\n{a}");
        refused(Plan::parse(Path::new("p"), &text), "server_fingerprint");
    }
}
