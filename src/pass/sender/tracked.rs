//! What a pass reads: the whole volume, or only the blocks the change
//! tracker (`nightpass track`) recorded since the previous pass's scan
//! began, when its record proves unbroken.
//!
//! Owns the sender's side of change tracking: asking the tracker for a cut
//! before the pass reads anything, deciding whether the cut chains to the
//! previous completed pass, and the volume's `tracked-pending` set (see
//! [`crate::store::tracking`]), which keeps what a pass took from the
//! tracker until the pass has completed. It must not read the source or
//! speak to the receiver.
//!
//! The chain: `tracked-pending` holds the tracker's epoch, the number of
//! the last cut taken and whether its blocks cover every write since the
//! scan of the last completed pass began. A cut chains when the tracker's
//! epoch is the one recorded and its previous cut for this volume is the
//! one recorded: then the pending blocks plus the cut's are every block
//! written since that scan began, and the pass reads only them (and any
//! chunk the target does not hold). Anything else (no tracker, a new
//! epoch, a first cut, a pass that read everything and failed) reads the
//! whole volume and says why.

use std::path::Path;
use std::time::Duration;

use nightpass_proto::changes::BlockRuns;
use nightpass_proto::chunk::Geometry;
use nightpass_proto::chunkset::{ChunkSet, Scope};
use serde::{Deserialize, Serialize};

use super::SyncConfig;
use crate::error::{Error, Result};
use crate::progress::ScanKind;
use crate::store::tracking::{self, Answer, Request};

/// How a pass may choose what to read (`--scan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScanChoice {
    /// Tracked when the record is unbroken, otherwise full.
    #[default]
    Auto,
    /// Always the whole volume.
    Full,
    /// Tracked, or refuse.
    Tracked,
}

impl ScanChoice {
    /// The flag's value.
    pub fn name(self) -> &'static str {
        match self {
            ScanChoice::Auto => "auto",
            ScanChoice::Full => "full",
            ScanChoice::Tracked => "tracked",
        }
    }
}

/// Where the tracker of a pass's source answers, and who asks.
struct Tracker {
    /// The source, canonical (as the tracker keys its record).
    source: std::path::PathBuf,
    /// The tracker's record directory.
    dir: std::path::PathBuf,
    /// This volume as the tracker's consumer: receiver fingerprint/name.
    consumer: String,
}

impl Tracker {
    fn of(cfg: &SyncConfig) -> Tracker {
        let source = std::fs::canonicalize(&cfg.source).unwrap_or_else(|_| cfg.source.clone());
        Tracker {
            dir: tracking::tracking_dir(&cfg.state_dir, &source),
            consumer: format!("{}/{}", cfg.server_fingerprint, cfg.dest.name),
            source,
        }
    }
}

/// How long a pass waits for the tracker's cut (it drains its events first).
const CUT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a pass reads, and why.
#[derive(Debug, Clone)]
pub(super) struct ScanPlan {
    /// The chunks (as bytes, before the chunk size is agreed).
    pub(super) scope: Scope,
    /// Tracked, or full and why.
    pub(super) kind: ScanKind,
    /// The cut this pass took: (epoch, number), to record as the chain's
    /// new start once the pass completes.
    cut: Option<(String, u64)>,
    /// Where the pass reads, when not from the source itself (an LVM thin
    /// volume's snapshot for this pass).
    pub(super) read_from: Option<std::path::PathBuf>,
    /// The thin snapshot this pass took, to chain from once it completes.
    thin: Option<std::sync::Arc<super::thin::ThinPass>>,
}

/// The head of a volume's `tracked-pending` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PendingHead {
    /// The tracker's epoch the blocks belong to.
    epoch: String,
    /// The last cut taken from it.
    through: u64,
    /// The blocks cover every write since the last completed pass's scan began.
    complete: bool,
}

/// Decides what the pass of `cfg` reads, taking a cut from the tracker of
/// its source when one runs (even for a full pass: the cut starts the
/// chain the next pass continues). Refuses `--scan tracked` without an
/// unbroken record, before anything is sent.
///
/// `whole`: the caller needs every chunk's hash as read (a cutover's full
/// proof): the pass reads everything, though it still takes the cut.
pub(super) fn plan_scan(
    cfg: &SyncConfig,
    volume_dir: &Path,
    whole: bool,
    volume: (u64, u64),
) -> Result<ScanPlan> {
    let plan = take_cut(cfg, volume_dir, volume)?;
    if whole && !cfg.tracked_proof {
        if cfg.scan_choice == ScanChoice::Tracked {
            return Err(Error::input(
                "--scan tracked: this pass must read every chunk for its proof",
            ));
        }
        let why = cfg.scan_reason.as_deref();
        return Ok(ScanPlan {
            scope: Scope::Full,
            kind: ScanKind::Full(
                why.unwrap_or("the cutover's proof reads every chunk")
                    .into(),
            ),
            ..plan
        });
    }
    match (cfg.scan_choice, &plan.kind) {
        (ScanChoice::Full, _) => Ok(ScanPlan {
            scope: Scope::Full,
            kind: ScanKind::Full(cfg.scan_reason.as_deref().unwrap_or("--scan full").into()),
            ..plan
        }),
        (ScanChoice::Tracked, ScanKind::Full(why)) => Err(Error::input(format!(
            "--scan tracked: {why}; nothing was sent (without --scan tracked the pass reads the whole volume)"
        ))),
        _ => Ok(plan),
    }
}

impl ScanPlan {
    /// The same cut, read whole for `reason`.
    pub(super) fn into_full(self, reason: String) -> ScanPlan {
        ScanPlan {
            scope: Scope::Full,
            kind: ScanKind::Full(reason),
            ..self
        }
    }

    /// A pass of an LVM thin volume, read from its snapshot `read_from`.
    pub(super) fn thin(
        scope: Scope,
        kind: ScanKind,
        read_from: std::path::PathBuf,
        pass: std::sync::Arc<super::thin::ThinPass>,
    ) -> ScanPlan {
        ScanPlan {
            scope,
            kind,
            cut: None,
            read_from: Some(read_from),
            thin: Some(pass),
        }
    }

    /// The blocks written, for a tracked pass (its chunks the target holds
    /// a version of go as patches of those blocks).
    pub(super) fn written(&self) -> Option<std::sync::Arc<BlockRuns>> {
        match (&self.kind, &self.scope) {
            (ScanKind::Tracked, Scope::Bytes(ranges)) => {
                Some(std::sync::Arc::new(BlockRuns::from_byte_ranges(ranges)))
            }
            _ => None,
        }
    }

    /// Whether a tracker answered (or left a record) for this source: then
    /// a full scan is news worth a note; without one it is the rule.
    pub(super) fn tracker_seen(&self) -> bool {
        self.cut.is_some()
            || matches!(&self.kind, ScanKind::Full(why) if why.contains("the last one's record ended"))
    }
}

fn full(reason: String, cut: Option<(String, u64)>) -> ScanPlan {
    ScanPlan {
        scope: Scope::Full,
        kind: ScanKind::Full(reason),
        cut,
        read_from: None,
        thin: None,
    }
}

/// Takes a cut from the tracker of the source, records it in the pending
/// set, and says whether it chains to the previous completed pass: a
/// tracked plan when it does, a full one saying why otherwise.
///
/// Without a tracker, an LVM thin volume's change set comes from its
/// snapshots instead ([`super::thin`]); `volume` is (size, pass number).
fn take_cut(cfg: &SyncConfig, volume_dir: &Path, volume: (u64, u64)) -> Result<ScanPlan> {
    if cfg.read_from.is_some() {
        return Ok(full(
            "a pass from an LVM snapshot reads the whole snapshot".into(),
            None,
        ));
    }
    let Tracker {
        source,
        dir: tdir,
        consumer,
    } = Tracker::of(cfg);
    let answer = tracking::ask(&tdir, &Request::Cut { consumer }, CUT_TIMEOUT)?;
    let (epoch, seq, previous, file) = match answer {
        Some(Answer::Cut {
            epoch,
            seq,
            previous,
            file,
            ..
        }) => (epoch, seq, previous, file),
        None => {
            let (size, pass_no) = volume;
            if let Some(plan) = super::thin::plan(cfg, volume_dir, size, pass_no)? {
                return Ok(plan);
            }
            return Ok(full(no_tracker(&tdir, &source), None));
        }
        Some(Answer::Error { message }) => {
            let why = format!("the tracker of {} failed: {message}", source.display());
            return Ok(full(why, None));
        }
        Some(other) => {
            return Ok(full(
                format!("the tracker answered a cut with {other:?}"),
                None,
            ));
        }
    };
    let cut = tracking::read_blocks(&file)?;
    let pending_path = tracking::pending_path(volume_dir);
    let (head, mut blocks) = read_pending(&pending_path)?;
    let chained = head
        .as_ref()
        .is_some_and(|h| h.complete && h.epoch == epoch.id && previous == Some(h.through));
    if chained {
        blocks.extend(&cut);
    } else {
        blocks = cut;
    }
    let head = PendingHead {
        epoch: epoch.id.clone(),
        through: seq,
        complete: chained,
    };
    // Durable before the pass reads anything: a pass that fails hands
    // these blocks to the next.
    write_pending(&pending_path, &head, &blocks)?;
    let _ = std::fs::remove_file(&file);
    let taken = Some((epoch.id.clone(), seq));
    if chained {
        return Ok(ScanPlan {
            scope: Scope::Bytes(blocks.byte_ranges()),
            kind: ScanKind::Tracked,
            cut: taken,
            read_from: None,
            thin: None,
        });
    }
    Ok(full(unchained(previous, &tdir, &source, &epoch.id), taken))
}

/// Why a cut that does not chain to the previous completed pass makes a
/// full pass: the record's first cut for this volume, or a gap.
fn unchained(previous: Option<u64>, tdir: &Path, source: &Path, epoch: &str) -> String {
    match previous {
        None => {
            let before = tracking::last_ended(tdir)
                .map(|r| format!("; the record before it ended: {r}"))
                .unwrap_or_default();
            format!(
                "first pass since the tracker of {} began its record (epoch {}){before}",
                source.display(),
                short(epoch)
            )
        }
        Some(_) => format!(
            "the record of {} does not reach back to the previous completed pass (epoch {})",
            source.display(),
            short(epoch)
        ),
    }
}

/// Why there is no record to use when no tracker answers.
fn no_tracker(tdir: &Path, source: &Path) -> String {
    match tracking::last_ended(tdir) {
        Some(r) => format!(
            "no tracker is recording {} (the last one's record ended: {r})",
            source.display()
        ),
        None => format!(
            "no change record: no tracker is recording {} (start `nightpass track {}`)",
            source.display(),
            source.display()
        ),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Whether a pass of `cfg` run now would be tracked: a tracker answers,
/// and its next cut would chain to the previous completed pass (nothing is
/// taken). A cutover asks before it freezes, and again once frozen.
pub fn would_be_tracked(cfg: &SyncConfig) -> Result<bool> {
    Ok(tracked_outlook(cfg, None)?.is_some())
}

/// What a tracked pass of `cfg` run now would read as changed, when it
/// would be tracked (see [`would_be_tracked`]): the bytes of the chunks of
/// `chunk_size` holding a block written since the previous completed pass
/// (the tracker's count since its last cut, plus what a failed pass left
/// pending; the two may overlap, so this errs high). Without a chunk size,
/// `Some(0)` says only that the pass would be tracked.
pub fn tracked_outlook(cfg: &SyncConfig, chunk_size: Option<u64>) -> Result<Option<u64>> {
    if cfg.read_from.is_some() || cfg.scan_choice == ScanChoice::Full {
        return Ok(None);
    }
    let Tracker {
        dir: tdir,
        consumer,
        ..
    } = Tracker::of(cfg);
    let request = Request::Peek {
        consumer,
        chunk_size,
    };
    let Some(Answer::Peek {
        epoch, seq, chunks, ..
    }) = tracking::ask(&tdir, &request, CUT_TIMEOUT)?
    else {
        return Ok(None);
    };
    let dir = super::volume_state_dir(cfg)?;
    let (head, pending) = read_pending(&tracking::pending_path(&dir))?;
    if !head.is_some_and(|h| h.complete && h.epoch == epoch.id && seq == Some(h.through)) {
        return Ok(None);
    }
    Ok(Some(chunk_size.map_or(0, |cs| {
        let left = pending.chunks_touched(cs / nightpass_proto::changes::BLOCK);
        (chunks + left) * cs
    })))
}

/// The forecast's inputs for a pass of `cfg` run now: the journal's
/// figures, and what the final pass will read: the whole volume when
/// `--scan full` says so or no unbroken record would make the pass
/// tracked, what the change record names as changed when it would (a
/// tracker whose answer cannot be read leaves the journal's guess).
pub fn history_now(
    cfg: &SyncConfig,
    records: &[crate::store::journal::SenderRecord],
) -> nightpass_proto::plan::History {
    use nightpass_proto::plan::FinalScan;
    let mut history = crate::store::journal::figures(records);
    let chunk_size = crate::store::journal::passes(records)
        .last()
        .map(|p| p.chunk_size);
    history.final_scan = if cfg.scan_choice == ScanChoice::Full || cfg.read_from.is_some() {
        FinalScan::Full
    } else if chunk_size.is_none() {
        FinalScan::Unknown
    } else {
        match tracked_outlook(cfg, chunk_size) {
            Ok(Some(b)) => FinalScan::Tracked {
                changed_bytes: b as f64,
            },
            // No tracker, or a record that does not chain: a full read.
            Ok(None) => FinalScan::Full,
            Err(e) => {
                tracing::debug!("no change count from the tracker: {e}");
                FinalScan::Unknown
            }
        }
    };
    history
}

/// Asks the tracker of `cfg`'s source to end its epoch (an audit found the
/// record wrong); a tracker that does not answer has ended it already.
pub(super) fn end_epoch(cfg: &SyncConfig, reason: &str) {
    if let Ok(dir) = super::volume_state_dir(cfg) {
        super::thin::forget(&dir);
    }
    let Tracker {
        source, dir: tdir, ..
    } = Tracker::of(cfg);
    let request = Request::EndEpoch {
        reason: reason.to_string(),
    };
    if let Err(e) = tracking::ask(&tdir, &request, CUT_TIMEOUT) {
        tracing::warn!(
            "could not tell the tracker of {} to end its record: {e}",
            source.display()
        );
    }
}

/// The pass completed: everything up to its cut is on the target, so the
/// chain starts again from that cut, with no pending block.
pub(super) fn pass_completed(plan: &ScanPlan, volume_dir: &Path) -> Result<()> {
    if let Some(t) = &plan.thin {
        super::thin::completed(t, volume_dir)?;
    }
    let Some((epoch, seq)) = &plan.cut else {
        return Ok(());
    };
    let head = PendingHead {
        epoch: epoch.clone(),
        through: *seq,
        complete: true,
    };
    write_pending(
        &tracking::pending_path(volume_dir),
        &head,
        &BlockRuns::new(),
    )
}

fn read_pending(path: &Path) -> Result<(Option<PendingHead>, BlockRuns)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, BlockRuns::new())),
        Err(e) => return Err(Error::io(path.display(), e)),
    };
    let damaged = || {
        Error::Io(format!(
            "{}: damaged; remove it to start over",
            path.display()
        ))
    };
    let split = bytes.iter().position(|&b| b == b'\n').ok_or_else(damaged)?;
    let head: PendingHead = serde_json::from_slice(&bytes[..split]).map_err(|_| damaged())?;
    let blocks = BlockRuns::decode(&bytes[split + 1..]).ok_or_else(damaged)?;
    Ok((Some(head), blocks))
}

fn write_pending(path: &Path, head: &PendingHead, blocks: &BlockRuns) -> Result<()> {
    let mut bytes = serde_json::to_vec(head).expect("a head serializes");
    bytes.push(b'\n');
    bytes.extend_from_slice(&blocks.encode());
    crate::store::state::write_atomic(path, &bytes)
}

/// Audited chunks come in runs of this many (4 MiB at 64 KiB chunks), so
/// the audit reads in long sequential stretches.
pub(super) const AUDIT_RUN: u64 = 64;

/// The audit sample of pass `pass_no`: one run of [`AUDIT_RUN`] chunks in
/// every `100 / percent`, shifted by one run each pass, so that successive
/// passes audit the whole volume (at 1%, every 100 passes).
pub(super) fn audit_sample(geometry: &Geometry, percent: f64, pass_no: u64) -> ChunkSet {
    if percent <= 0.0 {
        return ChunkSet::empty(geometry);
    }
    let stride = (100.0 / percent.min(100.0)).round().max(1.0) as u64;
    let runs = geometry.chunk_count().div_ceil(AUDIT_RUN);
    let picked = (pass_no % stride..runs)
        .step_by(stride as usize)
        .flat_map(|r| r * AUDIT_RUN..(r + 1) * AUDIT_RUN);
    ChunkSet::from_indices(geometry, picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_survives_the_disk_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tracked-pending");
        assert_eq!(read_pending(&p).unwrap().0, None);
        let head = PendingHead {
            epoch: "e1".into(),
            through: 4,
            complete: true,
        };
        let mut blocks = BlockRuns::new();
        blocks.insert(7..9);
        write_pending(&p, &head, &blocks).unwrap();
        assert_eq!(read_pending(&p).unwrap(), (Some(head), blocks));
        std::fs::write(&p, b"{\"epoch\":1}\nxx").unwrap();
        assert!(read_pending(&p).is_err());
    }

    #[test]
    fn successive_audits_cover_the_whole_volume() {
        let g =
            Geometry::new(1000 * 65536 + 5, nightpass_proto::chunk::ChunkSize::DEFAULT).unwrap();
        assert!(audit_sample(&g, 0.0, 3).is_empty());
        let stride = 50u64;
        let mut seen = ChunkSet::empty(&g);
        for pass in 1..=stride {
            let s = audit_sample(&g, 2.0, pass);
            assert!(s.len() <= AUDIT_RUN * g.chunk_count().div_ceil(AUDIT_RUN * stride));
            seen = seen.union(&s);
        }
        assert_eq!(seen, ChunkSet::all(&g), "50 passes at 2% audit every chunk");
        assert_eq!(audit_sample(&g, 100.0, 7), ChunkSet::all(&g));
    }
}
