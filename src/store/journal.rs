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
//! A PostgreSQL store for the fleet would keep the same records (one table
//! per journal, keyed by volume, the event and `v` as columns, the rest as
//! JSON or columns), append in a transaction, and answer the reads here
//! ([`passes`], [`sealed_cutover`], [`figures`], [`last_unsealed`]) as
//! queries.

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

/// The sender's journal of one volume.
pub type SenderJournal = Journal<SenderRecord>;
/// The receiver's journal of one exported volume.
pub type ReceiverJournal = Journal<ReceiverRecord>;

/// A journal file holding records of type `R`.
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
            }),
            SenderRecord::TargetRead(t) if t.duration_s > 0.0 => {
                h.target_read_rates.push(t.size_bytes as f64 / t.duration_s)
            }
            // Older records lack the time spent in passes: no measurement.
            SenderRecord::Cutover(CutoverRecord {
                frozen_s,
                passes_s: Some(passes_s),
                ..
            }) => h.cutovers.push(CutoverFigures {
                frozen_s: *frozen_s,
                passes_s: *passes_s,
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
mod tests {
    use super::*;

    /// A sender's journal as the release before typed records wrote it
    /// (two syncs, a cutover with `--assume-frozen`, its unseal, a sync).
    const SENDER_LINES: &str = r#"{"attempts":1,"changed_bytes":8388608,"changed_chunks":128,"chunk_size":65536,"duration_s":0.237829448,"event":"pass","first":true,"kind":"sync","pass":1,"proof_read":false,"read_busy_s":0.01828006,"read_rate_bps":458893898.597707,"root":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","scanned_bytes":8388608,"send_rate_bps":35271527.85554125,"sent_bytes":8388608,"size_bytes":8388608,"source":"source.img","start_unix_s":1795987709.3569689,"volume":"127.0.0.1:46901/v","zero_chunks":0}
{"attempts":1,"changed_bytes":0,"changed_chunks":0,"chunk_size":65536,"duration_s":0.029614599,"event":"pass","first":false,"kind":"sync","pass":2,"proof_read":false,"read_busy_s":0.006968401,"read_rate_bps":1203806726.9664876,"root":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","scanned_bytes":8388608,"send_rate_bps":0.0,"sent_bytes":0,"size_bytes":8388608,"source":"source.img","start_unix_s":1795987709.6149466,"volume":"127.0.0.1:46901/v","zero_chunks":0}
{"attempts":1,"changed_bytes":0,"changed_chunks":0,"chunk_size":65536,"duration_s":0.011365334,"event":"pass","first":false,"kind":"cutover","pass":3,"proof_read":true,"read_busy_s":0.003276009,"read_rate_bps":2560618117.9599934,"root":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","scanned_bytes":8388608,"send_rate_bps":0.0,"sent_bytes":0,"size_bytes":8388608,"source":"source.img","start_unix_s":1795987709.7111144,"volume":"127.0.0.1:46901/v","zero_chunks":0}
{"duration_s":0.025707167,"event":"target_read","size_bytes":8388608}
{"consistency_point":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","event":"cutover","forecast_s":0.104770849,"freeze_unix_s":1795987709.672407,"frozen_s":0.051266855,"method":"assume-frozen","passes_s":0.011365334,"proved":true,"volume":"127.0.0.1:46901/v"}
{"consistency_point":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","event":"unsealed","unix_s":1795987709.8095195}
{"attempts":1,"changed_bytes":0,"changed_chunks":0,"chunk_size":65536,"duration_s":0.033076107,"event":"pass","first":false,"kind":"sync","pass":4,"proof_read":false,"read_busy_s":0.003740584,"read_rate_bps":2242593135.189585,"root":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","scanned_bytes":8388608,"send_rate_bps":0.0,"sent_bytes":0,"size_bytes":8388608,"source":"source.img","start_unix_s":1795987709.9121883,"volume":"127.0.0.1:46901/v","zero_chunks":0}
"#;

    /// The receiver's journal of the same volume, as that release wrote it.
    const RECEIVER_LINES: &str = r#"{"consistency_point":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","event":"cutover","freeze_unix_s":1795987709.672407,"frozen_s":0.051266855,"sealed_at":"2026-11-29T21:28:29Z","volume":"v"}
{"consistency_point":"9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98","cutover_at":"2026-11-29T21:28:29Z","event":"unsealed","unsealed_at":"2026-11-29T21:28:29Z","volume":"v"}
"#;

    const CP: &str = "9137b92f9eb30df78b349e8be29d63210f6c06bff39fe2d20439ac7a525eaa98";

    fn sender(text: &str) -> Vec<SenderRecord> {
        decode(text.as_bytes()).unwrap()
    }

    fn pass(n: u64) -> PassRecord {
        PassRecord {
            kind: "sync".into(),
            source: "/dev/vg0/filer01".into(),
            volume: "10.0.0.2:7400/filer01".into(),
            pass: n,
            first: n == 1,
            proof_read: Some(false),
            attempts: Some(2),
            start_unix_s: 1_796_000_000.25,
            duration_s: 12.5,
            size_bytes: 1 << 30,
            chunk_size: 65536,
            scanned_bytes: 1 << 30,
            read_busy_s: 2.0,
            changed_chunks: 3,
            changed_bytes: 3 * 65536,
            sent_bytes: 100_000,
            zero_chunks: 1,
            read_rate_bps: 536_870_912.0,
            send_rate_bps: 8000.0,
            root: CP.into(),
        }
    }

    fn every_sender_record() -> Vec<SenderRecord> {
        vec![
            SenderRecord::Pass(pass(1)),
            SenderRecord::TargetRead(TargetReadRecord {
                size_bytes: 1 << 30,
                duration_s: 4.0,
            }),
            SenderRecord::Cutover(CutoverRecord {
                volume: "10.0.0.2:7400/filer01".into(),
                consistency_point: CP.into(),
                freeze_unix_s: 1_796_000_100.5,
                frozen_s: 3.25,
                passes_s: Some(3.0),
                method: "fsfreeze".into(),
                proved: true,
                forecast_s: None,
            }),
            SenderRecord::Unsealed(UnsealedRecord {
                consistency_point: CP.into(),
                unix_s: 1_796_000_200.0,
            }),
        ]
    }

    fn every_receiver_record() -> Vec<ReceiverRecord> {
        vec![
            ReceiverRecord::Cutover(ReceiverCutoverRecord {
                volume: "filer01".into(),
                consistency_point: CP.into(),
                freeze_unix_s: 1_796_000_100.5,
                frozen_s: 3.25,
                sealed_at: Some("2026-11-30T01:12:09Z".into()),
            }),
            ReceiverRecord::Unsealed(ReceiverUnsealedRecord {
                volume: "filer01".into(),
                consistency_point: CP.into(),
                cutover_at: "2026-11-30T01:12:09Z".into(),
                unsealed_at: "2026-11-30T09:00:00Z".into(),
            }),
        ]
    }

    #[test]
    fn every_record_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = SenderJournal::in_dir(&dir.path().join("targets/x/v"));
        for r in every_sender_record() {
            s.append(&r).unwrap();
        }
        assert_eq!(s.read().unwrap(), every_sender_record());
        let r = ReceiverJournal::in_dir(&dir.path().join("volumes/v"));
        for rec in every_receiver_record() {
            r.append(&rec).unwrap();
        }
        assert_eq!(r.read().unwrap(), every_receiver_record());
        // Each line carries the format version and the event name.
        let text = fs::read_to_string(s.path()).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["v"], 1, "{line}");
            assert!(v["event"].is_string(), "{line}");
        }
        assert!(text.starts_with(r#"{"v":1,"event":"pass","#), "{text}");
    }

    #[test]
    fn a_journal_of_the_previous_format_reads_as_it_was() {
        let records = sender(SENDER_LINES);
        assert_eq!(records.len(), 7);
        let passes: Vec<_> = passes(&records).collect();
        assert_eq!(
            passes.iter().map(|p| p.pass).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(passes[0].changed_chunks, 128);
        assert_eq!(passes[2].kind, "cutover");
        assert_eq!(passes[2].proof_read, Some(true));
        let h = figures(&records);
        assert_eq!(h.passes.len(), 4);
        assert!(h.passes[0].first && !h.passes[1].first);
        assert_eq!(h.passes[1].read_busy_s, 0.006968401);
        assert_eq!(h.target_read_rates, [8388608.0 / 0.025707167]);
        assert_eq!(
            h.cutovers,
            [CutoverFigures {
                frozen_s: 0.051266855,
                passes_s: 0.011365334
            }]
        );
        // Unsealed after the cutover: nothing holds passes back.
        assert_eq!(sealed_cutover(&records), None);
        let upto_cutover: String = SENDER_LINES
            .lines()
            .take(5)
            .map(|l| format!("{l}\n"))
            .collect();
        let records = sender(&upto_cutover);
        let cut = sealed_cutover(&records).expect("the cutover seals it");
        assert_eq!(cut.consistency_point, CP);
        assert_eq!(cut.freeze_unix_s, 1795987709.672407);
        let rx: Vec<ReceiverRecord> = decode(RECEIVER_LINES.as_bytes()).unwrap();
        assert_eq!(rx.len(), 2);
        assert_eq!(last_unsealed(&rx), Some(CP));
        assert_eq!(last_unsealed(&rx[..1]), None);
    }

    #[test]
    fn pass_records_print_the_fields_the_journal_kept() {
        // `status --json` prints pass records: typed, they must show the
        // same fields and values as the lines they were read from.
        for line in SENDER_LINES
            .lines()
            .filter(|l| l.contains(r#""event":"pass""#))
        {
            let kept: serde_json::Value = serde_json::from_str(line).unwrap();
            let record: SenderRecord = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_value(&record).unwrap(), kept);
        }
        // Older passes, without `proof_read` and `attempts`, print without them.
        let old = r#"{"event":"pass","kind":"sync","source":"s","volume":"h:1/v","pass":1,"first":true,"start_unix_s":1.5,"duration_s":2.0,"size_bytes":4096,"chunk_size":4096,"scanned_bytes":4096,"read_busy_s":0.5,"changed_chunks":1,"changed_bytes":4096,"sent_bytes":4096,"zero_chunks":0,"read_rate_bps":8192.0,"send_rate_bps":2048.0,"root":"ab"}"#;
        let kept: serde_json::Value = serde_json::from_str(old).unwrap();
        let record: SenderRecord = serde_json::from_str(old).unwrap();
        assert_eq!(serde_json::to_value(&record).unwrap(), kept);
        // And a cutover recorded without passes_s is no measurement.
        let old_cut = r#"{"event":"cutover","volume":"h:1/v","consistency_point":"ab","freeze_unix_s":1.0,"frozen_s":2.0,"method":"fsfreeze","proved":true,"forecast_s":null}"#;
        let records = sender(old_cut);
        assert!(figures(&records).cutovers.is_empty());
        assert!(sealed_cutover(&records).is_some());
    }

    #[test]
    fn torn_lines_and_unknown_events_are_skipped() {
        let mut text = String::from(SENDER_LINES);
        text.push_str("{\"event\":\"rebased\",\"v\":1,\"to\":\"elsewhere\"}\n");
        text.push('\n');
        // A crash in the middle of an append.
        let torn = SENDER_LINES.lines().next().unwrap();
        text.push_str(&torn[..torn.len() / 2]);
        let records = sender(&text);
        assert_eq!(records, sender(SENDER_LINES));
    }

    #[test]
    fn a_newer_format_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let j = SenderJournal::in_dir(dir.path());
        j.append(&SenderRecord::Pass(pass(1))).unwrap();
        let mut f = OpenOptions::new().append(true).open(j.path()).unwrap();
        f.write_all(b"{\"v\":2,\"event\":\"pass\",\"pass\":2}\n")
            .unwrap();
        let e = j.read().unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("format 2"), "{e}");
    }

    #[test]
    fn a_missing_journal_is_empty_and_an_unreadable_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let j = SenderJournal::in_dir(dir.path());
        assert_eq!(j.read().unwrap(), Vec::new());
        fs::create_dir(j.path()).unwrap();
        let e = j.read().unwrap_err();
        assert!(matches!(e, Error::Io(_)), "{e:?}");
        assert_eq!(e.exit_code(), 3);
        assert!(
            e.to_string().contains(&j.path().display().to_string()),
            "{e}"
        );
    }
}
