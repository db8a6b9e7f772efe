//! The journals: typed records, one JSON object a line, and the reads made
//! of them.
//!
//! Owns the records of both journals and their file format: a sender's
//! `targets/<fingerprint>/<name>/journal.jsonl` ([`SenderRecord`]: passes,
//! target reads, cutovers, unseals seen) and a receiver's
//! `volumes/<name>/journal.jsonl` ([`ReceiverRecord`]: cutovers recorded
//! there, unseals). The two share event names (`cutover`, `unsealed`) but
//! not fields, so each journal has its own enum and a [`Journal`] of one
//! kind cannot take the other's records. It must not decide anything: what
//! a record means for a pass is for the sender, the seal and the forecast.
//!
//! Format: each line is one record, `{"v":1,"event":"pass",...}`. The
//! field names are those written before records were typed, so journals of
//! older releases read as they are; their lines carry no `v`, which reads
//! as 1. Fields added since the first release are optional. A line of a
//! format newer than [`FORMAT`] is refused rather than misread.
//!
//! The file is the file store's ([`crate::store::FileStore`]); callers
//! reach a journal through the [`crate::store::Store`] trait. A PostgreSQL
//! store for the fleet would keep the same records (one table per journal,
//! keyed by volume, the event and `v` as columns, the rest as JSON or
//! columns), append in a transaction, refuse a row of a newer `v` as
//! [`Journal::read`] refuses a line, and answer the reads here ([`passes`],
//! [`sealed_cutover`], [`figures`], [`last_unsealed`]) on the records it
//! returns (or as queries).

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::marker::PhantomData;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nightpass_proto::plan::{CutoverFigures, History, PassFigures};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// The journal format this release writes, and the newest it reads.
pub const FORMAT: u32 = 1;

/// The journal's file name in a volume's state directory.
pub const FILE_NAME: &str = "journal.jsonl";

/// A record of a sender's journal of one volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SenderRecord {
    /// A completed pass.
    Pass(PassRecord),
    /// The receiver's read of the whole target alongside a pass.
    TargetRead(TargetReadRecord),
    /// A completed cutover: the receiver sealed the volume.
    Cutover(CutoverRecord),
    /// The receiver said the operator unsealed the last cutover.
    Unsealed(UnsealedRecord),
    /// A group cutover this volume was part of: every volume of the group
    /// proven and recorded, under one group consistency point.
    GroupCutover(GroupCutoverRecord),
}

/// A record of a receiver's journal of one exported volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ReceiverRecord {
    /// A cutover recorded here, and the seal it set.
    Cutover(ReceiverCutoverRecord),
    /// The operator lifted the seal (`nightpass unseal`).
    Unsealed(ReceiverUnsealedRecord),
}

/// The figures of one completed pass. Every field defaults when missing,
/// as readers before typed records took them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PassRecord {
    /// What ran it: `sync`, `converge` or `cutover`.
    pub kind: String,
    /// The source as given on the command line.
    pub source: String,
    /// The destination as given (`HOST:PORT/NAME`).
    pub volume: String,
    /// The pass's number in this volume's history, from 1.
    pub pass: u64,
    /// True for the volume's first pass.
    pub first: bool,
    /// True when the receiver read its target alongside (absent in older records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof_read: Option<bool>,
    /// Connections the pass needed (absent in older records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// When reading began, seconds since the Unix epoch.
    pub start_unix_s: f64,
    /// Wall time of the pass in seconds.
    pub duration_s: f64,
    /// Volume size in bytes.
    pub size_bytes: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Bytes read and hashed.
    pub scanned_bytes: u64,
    /// Seconds the reader was busy (not waiting on the link).
    pub read_busy_s: f64,
    /// Chunks sent (they differed from what the target held).
    pub changed_chunks: u64,
    /// Uncompressed bytes of those chunks.
    pub changed_bytes: u64,
    /// Bytes sent on the wire.
    pub sent_bytes: u64,
    /// Chunks sent as zero markers.
    pub zero_chunks: u64,
    /// `scanned_bytes / read_busy_s`.
    pub read_rate_bps: f64,
    /// `sent_bytes / duration_s`.
    pub send_rate_bps: f64,
    /// The root of the manifest after the pass (hex).
    pub root: String,
    /// How the pass chose what to read: `"full"` or `"tracked"` (absent
    /// in records of releases before change tracking: full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<String>,
    /// Why a full scan read the whole volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_reason: Option<String>,
}

/// The receiver's read of the whole target alongside a pass (rehearsals and
/// cutovers): what the forecast knows of the target's read rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetReadRecord {
    /// Bytes read.
    pub size_bytes: u64,
    /// Seconds the read took, seen from the sender.
    pub duration_s: f64,
}

/// A cutover as the sender recorded it, once the receiver sealed the volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CutoverRecord {
    /// The destination as given (`HOST:PORT/NAME`).
    pub volume: String,
    /// The hex root of the copy as frozen.
    pub consistency_point: String,
    /// When the source was frozen, seconds since the Unix epoch.
    pub freeze_unix_s: f64,
    /// Seconds the source stayed frozen.
    pub frozen_s: f64,
    /// Seconds of that spent in the cutover's passes (absent in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passes_s: Option<f64>,
    /// How the source was frozen.
    pub method: String,
    /// True when the target was proven identical by fresh reads.
    pub proved: bool,
    /// The forecast of the frozen pass, when there was one.
    #[serde(default)]
    pub forecast_s: Option<f64>,
    /// Which proof was made: `"full"` (both sides read whole), `"tracked"`
    /// (the chunks the final pass read, by fresh reads on both sides), or
    /// `"none"`; absent in records of releases before change tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    /// Seconds of the freeze spent re-reading chunks on the receiver after
    /// the passes (absent in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof_s: Option<f64>,
}

/// A group cutover, in the journal of each of its volumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupCutoverRecord {
    /// BLAKE3 over the volumes' consistency points in name order (hex).
    pub consistency_point: String,
    /// The group's volumes, in name order.
    pub volumes: Vec<String>,
    /// When the group was frozen, seconds since the Unix epoch.
    pub freeze_unix_s: f64,
    /// Seconds the group stayed frozen.
    pub frozen_s: f64,
}

/// The sender's note that the operator unsealed a cutover on the receiver,
/// so that passes of the volume may run again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnsealedRecord {
    /// The consistency point of the cutover lifted.
    pub consistency_point: String,
    /// When the sender learnt it, seconds since the Unix epoch.
    pub unix_s: f64,
}

/// A cutover recorded by the receiver, which sealed the volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiverCutoverRecord {
    /// The exported volume's name.
    pub volume: String,
    /// The root of the receiver's manifest, the cutover's consistency point.
    pub consistency_point: String,
    /// When the source was frozen, seconds since the Unix epoch.
    pub freeze_unix_s: f64,
    /// Seconds the source stayed frozen.
    pub frozen_s: f64,
    /// When the volume was sealed, RFC 3339 UTC (absent in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_at: Option<String>,
    /// The group consistency point of a group cutover (absent for one
    /// volume's): BLAKE3 over the group's volumes' points in name order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_point: Option<String>,
    /// The group's volumes, in name order (empty for one volume's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_volumes: Vec<String>,
}

/// The operator unsealed a volume on the receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiverUnsealedRecord {
    /// The exported volume's name.
    pub volume: String,
    /// The consistency point of the cutover lifted.
    pub consistency_point: String,
    /// When that cutover froze the source, RFC 3339 UTC.
    pub cutover_at: String,
    /// When it was unsealed, RFC 3339 UTC.
    pub unsealed_at: String,
}

/// The records of one kind of journal.
pub trait Record: Serialize + DeserializeOwned {}
impl Record for SenderRecord {}
impl Record for ReceiverRecord {}

/// A journal file holding records of type `R`: how the file store
/// ([`crate::store::FileStore`]) keeps a volume's journal. Callers go
/// through the [`crate::store::Store`] trait.
#[derive(Debug, Clone)]
pub struct Journal<R> {
    path: PathBuf,
    records: PhantomData<fn() -> R>,
}

/// One line as written: the format version, then the record.
#[derive(Serialize)]
struct Line<'a, R> {
    v: u32,
    #[serde(flatten)]
    record: &'a R,
}

/// The format version of a line that is JSON; a line without one is from
/// before versions (1).
#[derive(Deserialize)]
struct Version {
    #[serde(default = "first_format")]
    v: u64,
}

fn first_format() -> u64 {
    1
}

impl<R: Record> Journal<R> {
    /// The journal of the volume whose state lives in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self::at(dir.join(FILE_NAME))
    }

    /// The journal at `path`.
    pub fn at(path: PathBuf) -> Self {
        Journal {
            path,
            records: PhantomData,
        }
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` and makes it durable.
    ///
    /// A crash can leave a torn last line; [`Journal::read`] skips it.
    pub fn append(&self, record: &R) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            super::state::create_private_dir(dir)?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .ctx(format!("open {}", self.path.display()))?;
        f.write_all(&encode(record))
            .ctx(format!("append {}", self.path.display()))?;
        f.sync_data().ctx(format!("fsync {}", self.path.display()))
    }

    /// Every record of the journal, oldest first; none when the file does
    /// not exist.
    ///
    /// Skipped, as no record: a line that is not JSON (a torn last line,
    /// left by a crash in the middle of an append), and a line that is JSON
    /// but not a record this release knows (an event a newer release added,
    /// or a record missing a field it needs), for forward compatibility.
    ///
    /// Errors: the file exists but cannot be read (a directory, no
    /// permission, an I/O error) is [`Error::Io`] naming it, never an empty
    /// history (which would start the volume over as its first pass); a
    /// line of a format newer than [`FORMAT`] is [`Error::Input`].
    pub fn read(&self) -> Result<Vec<R>> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::io(
                    format!("cannot read the journal {}", self.path.display()),
                    e,
                ))
            }
        };
        decode(&bytes).map_err(|v| {
            Error::input(format!(
                "the journal {} holds records of format {v}, newer than this nightpass reads ({FORMAT}): run a newer release",
                self.path.display()
            ))
        })
    }
}

/// One record as a journal line, newline included.
fn encode<R: Record>(record: &R) -> Vec<u8> {
    let line = Line { v: FORMAT, record };
    // Records are structs of strings, numbers and booleans: they serialize.
    let mut bytes = serde_json::to_vec(&line).expect("journal records serialize");
    bytes.push(b'\n');
    bytes
}

/// The records of a journal's bytes (see [`Journal::read`]); `Err` names
/// the format of a line newer than [`FORMAT`].
fn decode<R: Record>(bytes: &[u8]) -> std::result::Result<Vec<R>, u64> {
    let mut out = Vec::new();
    for line in bytes.split(|&b| b == b'\n') {
        let Ok(version) = serde_json::from_slice::<Version>(line) else {
            continue;
        };
        if version.v > u64::from(FORMAT) {
            return Err(version.v);
        }
        if let Ok(record) = serde_json::from_slice::<R>(line) {
            out.push(record);
        }
    }
    Ok(out)
}

impl SenderRecord {
    /// The pass, when this is a pass record.
    pub fn as_pass(&self) -> Option<&PassRecord> {
        match self {
            SenderRecord::Pass(p) => Some(p),
            _ => None,
        }
    }
}

/// The pass records of a sender's journal, oldest first.
pub fn passes(records: &[SenderRecord]) -> impl Iterator<Item = &PassRecord> {
    records.iter().filter_map(SenderRecord::as_pass)
}

/// The cutover of this volume that the sender recorded and that no later
/// `unsealed` record lifts.
pub fn sealed_cutover(records: &[SenderRecord]) -> Option<&CutoverRecord> {
    records.iter().rev().find_map(|r| match r {
        SenderRecord::Cutover(c) => Some(Some(c)),
        SenderRecord::Unsealed(_) => Some(None),
        _ => None,
    })?
}

/// A sender journal's pass, target read and cutover records as forecast
/// inputs, oldest first.
pub fn figures(records: &[SenderRecord]) -> History {
    let mut h = History::default();
    for r in records {
        match r {
            SenderRecord::Pass(p) => h.passes.push(PassFigures {
                start_unix_s: p.start_unix_s,
                duration_s: p.duration_s,
                size_bytes: p.size_bytes,
                scanned_bytes: p.scanned_bytes,
                changed_chunks: p.changed_chunks,
                changed_bytes: p.changed_bytes,
                read_busy_s: p.read_busy_s,
                first: p.first,
                tracked: p.scan.as_deref() == Some("tracked"),
            }),
            SenderRecord::TargetRead(t) if t.duration_s > 0.0 => {
                h.target_read_rates.push(t.size_bytes as f64 / t.duration_s)
            }
            // Older records lack the time spent in passes: no measurement.
            // A tracked proof's read is forecast on its own (Forecast::proof_s),
            // so it is not part of the freeze's overhead.
            SenderRecord::Cutover(CutoverRecord {
                frozen_s,
                passes_s: Some(passes_s),
                proof,
                proof_s,
                ..
            }) => h.cutovers.push(CutoverFigures {
                frozen_s: *frozen_s,
                passes_s: *passes_s,
                proof_s: match proof.as_deref() {
                    Some("tracked") => proof_s.unwrap_or(0.0),
                    _ => 0.0,
                },
            }),
            _ => {}
        }
    }
    h
}

/// The consistency point named by the last `unsealed` record of a
/// receiver's journal, if any.
pub fn last_unsealed(records: &[ReceiverRecord]) -> Option<&str> {
    records.iter().rev().find_map(|r| match r {
        ReceiverRecord::Unsealed(u) => Some(u.consistency_point.as_str()),
        ReceiverRecord::Cutover(_) => None,
    })
}

#[cfg(test)]
mod tests;
