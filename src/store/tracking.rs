//! Change tracking's records in a sender's state directory, and how a pass
//! asks the tracker for them.
//!
//! Owns the files under `tracking/<key of the source>/` (the running
//! tracker's `epoch` record, its `lock`, its `sock`et, the `ended.jsonl`
//! log of epochs that ended and why, and the `cuts/` it hands to passes)
//! and a volume's `tracked-pending` set (blocks a pass took from the
//! tracker and has not yet made durable on the target). It also owns the
//! request and answer a pass and the tracker exchange on the socket. It
//! must not decide whether a pass may trust a cut: that is the sender's
//! ([`crate::pass::sender`]), from the epoch and cut numbers it journaled.
//!
//! ## The record and its epochs
//! A tracker (`nightpass track`) keeps, in memory, the blocks written since
//! each consumer's (a volume's: receiver fingerprint and name) last cut,
//! and hands them over on request, after draining every event up to the
//! request. Its epoch (a random id, the boot id, the device's dev_t and
//! size, and an LV's UUID where present) begins when it starts and ends
//! when it stops, crashes, loses an event or sees the device resized; a
//! new tracker or a new epoch forgets every consumer, so the next pass of
//! each reads everything and says why. Nothing in memory needs to survive
//! a crash: a crash ends the epoch. What must survive is what a pass took:
//! the cut file is written and fsynced before the answer, and the pass
//! adds it to its volume's `tracked-pending` (fsynced, renamed into place)
//! before it reads anything, and clears it only once the pass has
//! completed; so a pass that fails hands its blocks to the next.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nightpass_proto::changes::BlockRuns;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::store::state;

/// Where the tracker of `source` (its canonical path) keeps its records.
pub fn tracking_dir(state_dir: &Path, source: &Path) -> PathBuf {
    state_dir
        .join("tracking")
        .join(state::key_for(&source.display().to_string()))
}

/// The socket a running tracker answers on.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("sock")
}

/// The lock a running tracker holds.
pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join("lock")
}

/// A tracker's epoch: what must stay the same for its record to hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Epoch {
    /// Random id (hex) of this epoch.
    pub id: String,
    /// The kernel's boot id when it began.
    pub boot_id: String,
    /// The device's dev_t (kernel encoding, MAJOR << 20 | MINOR).
    pub dev: u32,
    /// The device's size in bytes.
    pub size: u64,
    /// The LVM logical volume's UUID, where the source is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lv_uuid: Option<String>,
    /// When it began, seconds since the Unix epoch.
    pub started_unix_s: f64,
    /// The tracker's process id.
    pub pid: u32,
}

impl Epoch {
    /// Writes the epoch record of a tracker (durably).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("an epoch serializes");
        state::write_atomic(&dir.join("epoch"), &json)
    }

    /// The last epoch record a tracker wrote in `dir`, if any.
    pub fn read(dir: &Path) -> Result<Option<Epoch>> {
        let path = dir.join("epoch");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Io(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path.display(), e)),
        }
    }
}

/// The kernel's boot id, which changes at every boot.
pub fn boot_id() -> Result<String> {
    let path = "/proc/sys/kernel/random/boot_id";
    Ok(std::fs::read_to_string(path).ctx(path)?.trim().to_string())
}

/// Appends why an epoch ended to `dir`'s log (one JSON object a line).
pub fn log_ended(dir: &Path, epoch: &str, reason: &str) -> Result<()> {
    let path = dir.join("ended.jsonl");
    let line = serde_json::json!({
        "epoch": epoch,
        "reason": reason,
        "unix_s": crate::progress::now_unix(),
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .ctx(path.display())?;
    writeln!(f, "{line}").ctx(path.display())?;
    f.sync_data().ctx(path.display())
}

/// Why the last epoch recorded in `dir` ended, if the log says.
pub fn last_ended(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("ended.jsonl")).ok()?;
    let line = text.lines().last()?;
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["reason"].as_str().map(str::to_string)
}

/// Writes a set of blocks durably to `path` (temp file, fsync, rename).
pub fn write_blocks(path: &Path, set: &BlockRuns) -> Result<()> {
    state::write_atomic(path, &set.encode())
}

/// Reads a set of blocks written by [`write_blocks`]; an absent file is the
/// empty set, a damaged one an error.
pub fn read_blocks(path: &Path) -> Result<BlockRuns> {
    match std::fs::read(path) {
        Ok(b) => BlockRuns::decode(&b)
            .ok_or_else(|| Error::Io(format!("{}: not a set of blocks", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BlockRuns::new()),
        Err(e) => Err(Error::io(path.display(), e)),
    }
}

/// The blocks a volume's passes took from the tracker and have not yet
/// made durable on the target.
pub fn pending_path(volume_dir: &Path) -> PathBuf {
    volume_dir.join("tracked-pending")
}

/// A pass's request to the tracker, one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Drain every event up to now, then hand over the blocks written
    /// since `consumer`'s last cut and start its next one.
    Cut {
        /// The volume asking: receiver fingerprint and volume name.
        consumer: String,
    },
    /// The tracker's epoch and health.
    Status,
    /// The epoch and the number of `consumer`'s last cut, without taking
    /// one: whether the next cut would chain.
    Peek {
        /// The volume asking.
        consumer: String,
        /// The volume's chunk size, to count the chunks its next cut
        /// would touch (`None`: count blocks only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chunk_size: Option<u64>,
    },
    /// End the epoch (a pass's audit found a chunk changed that the record
    /// does not name): every volume's next pass reads everything.
    EndEpoch {
        /// Why, for the record's log.
        reason: String,
    },
}

/// The tracker's answer, one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// A cut: the blocks written since the consumer's previous cut.
    Cut {
        /// The epoch the cut belongs to.
        epoch: Epoch,
        /// This cut's number for the consumer, from 1 in the epoch.
        seq: u64,
        /// The number of the consumer's previous cut in this epoch: `None`
        /// when this is its first (the blocks before it are unknown).
        previous: Option<u64>,
        /// The file holding the blocks ([`read_blocks`]).
        file: PathBuf,
        /// Blocks in it.
        blocks: u64,
    },
    /// The epoch and its health.
    Status {
        /// The epoch running.
        epoch: Epoch,
        /// Events lost in it so far (the epoch ends at the first).
        lost: u64,
    },
    /// The epoch and a consumer's last cut in it (`None`: none yet).
    Peek {
        /// The epoch running.
        epoch: Epoch,
        /// The number of the consumer's last cut.
        seq: Option<u64>,
        /// 4 KiB blocks written since that cut (what the next would hold).
        #[serde(default)]
        blocks: u64,
        /// Chunks of the asked size those blocks touch (0 when not asked).
        #[serde(default)]
        chunks: u64,
    },
    /// The request could not be served.
    Error {
        /// Why.
        message: String,
    },
}

/// Asks the tracker whose records are in `dir`; `None` when no tracker
/// answers there (none running, or one that crashed and left its socket).
pub fn ask(dir: &Path, request: &Request, timeout: Duration) -> Result<Option<Answer>> {
    let path = socket_path(dir);
    let Ok(mut stream) = UnixStream::connect(&path) else {
        return Ok(None);
    };
    let what = format!("the tracker at {}", path.display());
    stream.set_read_timeout(Some(timeout)).ctx(&what)?;
    stream.set_write_timeout(Some(timeout)).ctx(&what)?;
    let mut line = serde_json::to_string(request).expect("a request serializes");
    line.push('\n');
    stream.write_all(line.as_bytes()).ctx(&what)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).ctx(&what)?;
    if reply.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&reply)
        .map(Some)
        .map_err(|e| Error::Io(format!("{what} answered {reply:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip_as_json_lines() {
        let r = Request::Cut {
            consumer: "np1-x/v".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"cut","consumer":"np1-x/v"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let a = Answer::Error {
            message: "x".into(),
        };
        let s = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Answer>(&s).unwrap(), a);
    }

    #[test]
    fn block_sets_survive_the_disk_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("set");
        assert!(read_blocks(&p).unwrap().is_empty());
        let mut set = BlockRuns::new();
        set.insert(3..9);
        set.insert(100..101);
        write_blocks(&p, &set).unwrap();
        assert_eq!(read_blocks(&p).unwrap(), set);
        std::fs::write(&p, b"short").unwrap();
        assert!(read_blocks(&p).is_err());
    }

    #[test]
    fn no_tracker_answers_where_none_runs() {
        let dir = tempfile::tempdir().unwrap();
        let got = ask(dir.path(), &Request::Status, Duration::from_secs(1)).unwrap();
        assert!(got.is_none());
    }
}
