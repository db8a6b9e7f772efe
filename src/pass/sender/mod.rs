//! The sender: drives one pass from the source side.
//!
//! Owns the sender's view of the target (its manifest under
//! `state/targets/<receiver fingerprint>/<volume>/`) and the pass journal.
//! A pass: open the source,
//! connect and handshake, reconcile manifests (adopt the receiver's table when
//! the summaries disagree), then run the pipeline
//! `reader → hashers (compare, compress) → N data streams`, while a task
//! applies acknowledgements to our manifest. Only acknowledged chunks are
//! recorded; at the end both sides' roots must agree. There is no per-chunk
//! round trip: the data streams never wait for acknowledgements.
//!
//! ## Parts
//! This module holds the pass with its retries after a lost link
//! ([`run_pass_collecting`]); `records` the sender's own records of a
//! volume (state directory, source, cutover, `status`), `session` the
//! sessions with a receiver (hello, preflight, manifest fetch), and
//! `stream` one attempt (chunk planning, dispatch, acknowledgements, the
//! end of the pass, over the [`SendSession`]), and `streams` its wire side
//! (data streams, pacing, heartbeats, giving up).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nightpass_proto::changes::BlockRuns;
use nightpass_proto::chunk::{ChunkSize, Geometry};
use nightpass_proto::chunkset::{ChunkSet, Scope};
use nightpass_proto::manifest::{self, Hash, Summary};
use nightpass_proto::plan::{self, CompressPolicy, Forecast};
use nightpass_proto::session::sender::{
    self as tx, Fetched, OutChunk, Plan, SendEvent, Sending, TableFetch,
};
use nightpass_proto::session::{SendSession, SessionError};
use nightpass_proto::wire::{self, control::Msg, Encoding, Mode};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::io::device::Volume;
use crate::io::hash::{self, ScanOptions, Scanned};
use crate::net::transport::{self, Identity, RemoteVolume, Tuning};
use crate::progress::{now_unix, PassEnd, PassStart, Progress, ScanKind};
use crate::store::journal::{self, Journal, PassRecord, SenderRecord, UnsealedRecord};
use crate::store::state::{self, Fill, ManifestFile, SourceRecord};
use crate::store::{FileStore, SenderJournal, SenderVolume};

mod dryrun;
mod records;
mod retry;
mod session;
mod stream;
mod streams;
mod thin;
mod tracked;

pub use dryrun::{dry_run, DryRunEnd};
use records::*;
pub use records::{canonical_source, journal, status, target_dir, volume_state_dir};
use retry::*;
use session::*;
pub use session::{open_session, preflight, Session};
use stream::*;
pub use streams::Pacer;
use streams::*;
use tracked::*;
pub use tracked::{history_now, tracked_outlook, would_be_tracked, ScanChoice};

/// Settings of a pass.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Source volume path.
    pub source: PathBuf,
    /// Destination volume.
    pub dest: RemoteVolume,
    /// Pinned fingerprint of the receiver.
    pub server_fingerprint: String,
    /// Sender state directory.
    pub state_dir: PathBuf,
    /// Chunk size the operator asked for, if any.
    pub chunk_size: Option<ChunkSize>,
    /// Parallel data streams.
    pub streams: usize,
    /// Limit on payload bytes per second.
    pub bwlimit: Option<u64>,
    /// A pacer shared with other passes (a plan run's one `--bwlimit` for
    /// all its volumes); when set, `bwlimit` is not paced on its own.
    pub shared_pacer: Option<Arc<Pacer>>,
    /// Reader settings.
    pub scan: ScanOptions,
    /// QUIC settings.
    pub tuning: Tuning,
    /// Journal label: "sync", "converge" or "cutover".
    pub kind: &'static str,
    /// Read this path instead of `source` (an LVM snapshot of it).
    pub read_from: Option<PathBuf>,
    /// How long to keep reconnecting after the link is lost (0 = fail at once).
    pub retry_for: Duration,
    /// The receiver reads its whole target while this pass runs (the proof
    /// of a cutover, or a rehearsal of it); journaled for the forecast.
    pub proof_read: bool,
    /// The operator accepts a source other than the one earlier passes of
    /// this volume read (`--new-source`).
    pub new_source: bool,
    /// The receiver has already answered this command (a cutover's
    /// preflight, an earlier pass of `converge`): a first connection that
    /// fails is then a lost link, retried for `retry_for`, not a wrong
    /// address.
    pub receiver_answered: bool,
    /// How the pass may choose what to read (`--scan`).
    pub scan_choice: ScanChoice,
    /// Percent of the chunks a change record says are unchanged that a
    /// tracked pass reads anyway and checks (`--audit`).
    pub audit_percent: f64,
    /// A cutover proves this pass by the chunks it reads (a tracked
    /// proof): a pass that collects its chunks' hashes may then be tracked.
    pub tracked_proof: bool,
    /// Why this pass reads everything though a change record may be
    /// unbroken, when its caller chose so (a cutover whose forecast says a
    /// full pass is faster); shown as `scan_reason`.
    pub scan_reason: Option<String>,
}

/// Runs one pass and returns its report.
pub async fn run_pass(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
) -> Result<PassEnd> {
    Ok(run_pass_collecting(cfg, id, progress, false).await?.0)
}

/// How one attempt at a pass ended when the link failed.
struct Interrupted {
    error: Error,
    /// First chunk index not known to be done: the pass resumes there.
    resume_at: u64,
}

/// What an attempt that reached the end of the pass brings back.
struct AttemptDone {
    root: Hash,
}

/// Runs one pass; with `collect`, also returns the hash of every source
/// chunk as read in this pass (a table of 32-byte entries), for the cutover's proof.
///
/// A lost link does not end the pass: the sender reconnects with backoff for
/// up to `retry_for`, re-reads the receiver's manifest (which holds every
/// chunk made durable before the loss) and resumes the scan at the first
/// chunk not known to be done.
pub async fn run_pass_collecting(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
    collect: bool,
) -> Result<(PassEnd, Option<Vec<u8>>)> {
    let mut run = PassRun::open(cfg, id, progress, collect).await?;
    let mut retry = Retry::new(cfg);
    let mut resume = 0u64;
    let done = loop {
        let mut connected = false;
        let outcome = run.attempt(resume, &mut connected).await;
        match outcome {
            Ok(done) => {
                let found = run.audit_found();
                if found.is_empty() {
                    break done;
                }
                run.audit_failed(&found)?;
                resume = 0;
            }
            Err(i) => {
                resume = i.resume_at;
                let wait = retry.after(i.error, connected)?;
                run.progress.note(&format!(
                    "link to {} lost ({}); reconnecting in {:.1} s, then resuming the pass at chunk {resume}",
                    cfg.dest.host_port,
                    retry.last_error,
                    wait.as_secs_f64()
                ));
                tokio::time::sleep(wait).await;
            }
        }
    };
    run.record(done)
}

/// One pass across its attempts: what was read of the sender's records,
/// our view of the target, and the figures gathered.
struct PassRun<'a> {
    cfg: &'a SyncConfig,
    id: &'a Identity,
    progress: Arc<dyn Progress>,
    dir: PathBuf,
    journal: SenderJournal,
    records: Vec<SenderRecord>,
    size: u64,
    chunk: ChunkSize,
    explicit: bool,
    pass_no: u64,
    pass_id: [u8; 16],
    attempts: u32,
    ours: Option<ManifestFile>,
    started: Option<(PassStart, Instant, f64)>,
    collect: bool,
    shared: PassShared,
    scanned: ScanStatsSum,
    /// What the pass reads (every chunk, or the blocks the change tracker
    /// recorded since the previous pass) and why; an attempt resumed after
    /// a lost link reads what remains of it.
    plan: ScanPlan,
    /// The volume's `nightpass_pass_in_progress` is 1 while this lives.
    _in_progress: crate::metrics::PassInProgress,
}

impl<'a> PassRun<'a> {
    /// Checks the source, the sender's own records and its view of the
    /// target before anything is sent.
    async fn open(
        cfg: &'a SyncConfig,
        id: &'a Identity,
        progress: Arc<dyn Progress>,
        collect: bool,
    ) -> Result<PassRun<'a>> {
        let source = cfg.read_from.clone().unwrap_or_else(|| cfg.source.clone());
        let size = Volume::open_source_reader(&source, cfg.scan.read_mode())?.size();
        if size == 0 {
            return Err(Error::input(format!(
                "source {} is empty (0 bytes): nothing to copy",
                source.display()
            )));
        }
        let dir = volume_state_dir(cfg)?;
        let journal = journal(cfg);
        let mut records = journal.read()?;
        check_source(cfg, &journal, &records)?;
        if journal::sealed_cutover(&records).is_some() {
            // Cut over by this sender: ask in a session that prepares nothing
            // on the receiver (a sync session opens, and may create, the
            // target and its manifest before its Welcome) whether the
            // operator unsealed that cutover there.
            preflight(cfg, id).await?;
            records = journal.read()?;
        }
        let ours = open_own_manifest(cfg, &dir.join("manifest"), progress.as_ref())?;
        let (chunk, explicit) = chunk_size(cfg, ours.as_ref())?;
        let pass_no = journal::passes(&records).count() as u64 + 1;
        let plan = plan_scan(cfg, &dir, collect, (size, pass_no))?;
        if let (ScanKind::Full(why), true) = (&plan.kind, plan.tracker_seen()) {
            progress.note(&format!("reading the whole volume: {why}"));
        }
        let shared = PassShared {
            counters: Arc::new(Counters::of(&cfg.dest.to_string())),
            pacer: cfg
                .shared_pacer
                .clone()
                .or_else(|| cfg.bwlimit.map(|limit| Arc::new(Pacer::new(limit)))),
            progress: progress.clone(),
            collected: None,
            written: plan.written(),
            audit: None,
            read_from: plan.read_from.clone(),
        };
        Ok(PassRun {
            pass_no,
            cfg,
            id,
            progress,
            dir,
            journal,
            records,
            size,
            chunk,
            explicit,
            pass_id: rand::random(),
            attempts: 0,
            ours,
            started: None,
            collect,
            shared,
            scanned: ScanStatsSum::default(),
            plan,
            _in_progress: crate::metrics::PassInProgress::start(&cfg.dest.to_string()),
        })
    }

    fn hello(&self) -> wire::Hello {
        wire::Hello {
            version: wire::PROTOCOL_VERSION,
            volume: self.cfg.dest.name.clone(),
            mode: Mode::Sync as i32,
            source_size: self.size,
            chunk_size: self.chunk.bytes() as u32,
            chunk_size_explicit: self.explicit,
            ranges: Vec::new(),
            known: self.ours.as_ref().map(|m| {
                let s = m.header().summary();
                wire::WireSummary {
                    volume_id: s.volume_id.to_vec(),
                    generation: s.generation,
                    root: s.root.to_vec(),
                }
            }),
            pass_id: self.pass_id.to_vec(),
            resumes: self.attempts > 1,
            pass: self.pass_no,
        }
    }

    /// One attempt: connect, check the answer against our own records,
    /// reconcile our view of the target, then stream chunks `resume..`.
    async fn attempt(
        &mut self,
        resume: u64,
        connected: &mut bool,
    ) -> std::result::Result<AttemptDone, Interrupted> {
        self.attempts += 1;
        let at = |error| Interrupted {
            error,
            resume_at: resume,
        };
        let cfg = self.cfg;
        let mut session = open_session(
            self.id,
            &cfg.dest,
            &cfg.server_fingerprint,
            &cfg.tuning,
            self.hello(),
        )
        .await
        .map_err(at)?;
        *connected = true;
        let checked = check_not_cut_over(cfg, &self.journal, &self.records, &session.welcome)
            .and_then(|()| record_source(cfg, &self.journal));
        if let Err(e) = checked {
            transport::close_session(
                &session.endpoint,
                &session.conn,
                b"pass refused by the sender",
            )
            .await;
            return Err(at(e));
        }
        let before = self
            .started
            .as_ref()
            .and_then(|(s, _, _)| ChunkSize::new(s.chunk_size).ok());
        let geometry =
            tx::agreed_geometry(&session.welcome, self.size, before).map_err(|e| at(e.into()))?;
        let theirs = parse_summary(session.welcome.summary.clone()).map_err(at)?;
        self.reconcile(&mut session, geometry, &theirs)
            .await
            .map_err(at)?;
        let fresh = self.started.is_none();
        self.start(geometry);
        let set = self.chunks_to_read(&geometry).at_or_after(resume);
        if fresh && set.len() < geometry.chunk_count() {
            // A tracked pass: its progress is out of what it reads.
            let bytes = set.len().saturating_mul(geometry.chunk_size().bytes());
            self.progress.reads(bytes.min(self.size));
        }
        let m = self.ours.take().expect("reconciled");
        let ours = Arc::new(Mutex::new(m));
        let r = stream_pass(
            cfg,
            session,
            set,
            ours.clone(),
            &self.shared,
            &mut self.scanned,
        )
        .await;
        let m = Arc::try_unwrap(ours)
            .map_err(|_| at(Error::Io("manifest still shared after the pass".into())))?
            .into_inner()
            .expect("not poisoned");
        self.ours = Some(m);
        r
    }

    /// Trusts our view of the target only when it is exactly the
    /// receiver's; otherwise rebuilds it from the receiver's table, in a
    /// fresh manifest committed only once the root checks out (until then
    /// its header claims nothing).
    async fn reconcile(
        &mut self,
        session: &mut Session,
        geometry: Geometry,
        theirs: &Summary,
    ) -> Result<()> {
        let view = self
            .ours
            .as_ref()
            .map(|m| (m.geometry(), m.header().summary()));
        if tx::trusts_own_view(view, &geometry, theirs) {
            return Ok(());
        }
        drop(self.ours.take());
        // Writing a large table takes a while (512 MiB per TiB): off the
        // async workers, with heartbeats so the receiver does not take the
        // silence for a sender gone.
        let create = {
            let (mpath, id) = (self.dir.join("manifest"), theirs.volume_id);
            tokio::task::spawn_blocking(move || {
                ManifestFile::create(&mpath, geometry, id, Fill::Unknown)
            })
        };
        let mut m = transport::with_heartbeats(&mut session.send, create)
            .await?
            .map_err(|_| Error::Io("manifest task failed".into()))??;
        fetch_table(session, &mut m, theirs).await?;
        m.commit(theirs.generation, theirs.root)?;
        self.ours = Some(m);
        Ok(())
    }

    /// The chunks the pass reads: every chunk, or those the change record
    /// names plus any our view of the target does not know it holds.
    ///
    /// A tracked pass also reads an audit sample of the chunks the record
    /// says are unchanged ([`audit_sample`]) and compares them with our view.
    fn chunks_to_read(&mut self, geometry: &Geometry) -> ChunkSet {
        let named = self.plan.scope.chunks(geometry);
        if self.plan.scope == Scope::Full {
            self.shared.audit = None;
            return named;
        }
        let Some(ours) = &self.ours else {
            return ChunkSet::all(geometry);
        };
        let unknown = (0..geometry.chunk_count()).filter(|&i| ours.entry(i) == manifest::UNKNOWN);
        let named = named.union(&ChunkSet::from_indices(geometry, unknown));
        let sample = audit_sample(geometry, self.cfg.audit_percent, self.pass_no);
        let set = named.union(&sample);
        // What an earlier attempt of this pass found stays found: the
        // chunk it read may lie before this attempt's resume point.
        let found = self.audit_found();
        self.shared.audit = Some(Arc::new(Audit {
            sample,
            named,
            found: Mutex::new(found),
        }));
        set
    }

    /// Chunks an audit found changed behind the change record, if any.
    fn audit_found(&self) -> Vec<u64> {
        match &self.shared.audit {
            Some(a) => std::mem::take(&mut *a.found.lock().expect("not poisoned")),
            None => Vec::new(),
        }
    }

    /// An audit found chunks changed that the record does not name: says so
    /// loudly, ends the tracker's epoch, and makes this pass a full one.
    fn audit_failed(&mut self, found: &[u64]) -> Result<()> {
        let shown: Vec<String> = found.iter().take(10).map(u64::to_string).collect();
        let message = format!(
            "the audit found {} chunk(s) of {} changed that the change record does not name (chunk {}): the record is not trusted; this pass reads the whole volume",
            found.len(),
            self.cfg.source.display(),
            shown.join(", ")
        );
        tracing::error!("{message}");
        let event = serde_json::json!({
            "event": "error",
            "message": message,
            "audit": true,
            "volume": self.cfg.dest.to_string(),
            "chunks": found.iter().take(1000).collect::<Vec<_>>(),
        });
        self.progress.event(&event, &message);
        end_epoch(self.cfg, &message);
        self.plan = self.plan.clone().into_full(message);
        self.shared.written = None;
        Ok(())
    }

    /// The pass starts with its first attempt that reaches the streams.
    fn start(&mut self, geometry: Geometry) {
        if self.started.is_some() {
            return;
        }
        let start = PassStart {
            volume: self.cfg.dest.to_string(),
            pass: self.pass_no,
            size_bytes: self.size,
            chunk_size: geometry.chunk_size().bytes(),
        };
        self.progress.pass_start(&start);
        self.started = Some((start, Instant::now(), now_unix()));
        let entries = geometry.chunk_count() as usize * manifest::ENTRY_LEN;
        self.shared.collected = self
            .collect
            .then(|| Arc::new(Mutex::new(vec![0u8; entries])));
    }

    /// Journals the pass that ended and reports it.
    fn record(mut self, done: AttemptDone) -> Result<(PassEnd, Option<Vec<u8>>)> {
        let (start, began, start_unix) =
            self.started.take().expect("a pass that ended had started");
        let c = &self.shared.counters;
        let (chunks, changed_bytes) = (
            c.chunks.load(Ordering::Relaxed),
            c.changed_bytes.load(Ordering::Relaxed),
        );
        let (sent_bytes, zero_chunks) = (
            c.sent_bytes.load(Ordering::Relaxed),
            c.zero_chunks.load(Ordering::Relaxed),
        );
        let duration_s = began.elapsed().as_secs_f64();
        let root = manifest::to_hex(&done.root);
        let record = SenderRecord::Pass(PassRecord {
            kind: self.cfg.kind.to_string(),
            source: self.cfg.source.display().to_string(),
            volume: self.cfg.dest.to_string(),
            pass: self.pass_no,
            first: self.pass_no == 1,
            proof_read: Some(self.cfg.proof_read),
            attempts: Some(self.attempts),
            start_unix_s: start_unix,
            duration_s,
            size_bytes: self.size,
            chunk_size: start.chunk_size,
            scanned_bytes: self.scanned.bytes,
            read_busy_s: self.scanned.busy_s,
            changed_chunks: chunks,
            changed_bytes,
            sent_bytes,
            zero_chunks,
            read_rate_bps: self.scanned.bytes as f64 / self.scanned.busy_s.max(1e-6),
            send_rate_bps: sent_bytes as f64 / duration_s.max(1e-6),
            root: root.clone(),
            scan: Some(self.plan.kind.name().to_string()),
            scan_reason: self.plan.kind.reason().map(str::to_string),
        });
        self.journal.append(&record)?;
        pass_completed(&self.plan, &self.dir)?;
        self.records.push(record);
        let forecast =
            plan::forecast(&history_now(self.cfg, &self.records), now_unix()).map(|f| f.total_s);
        crate::metrics::pass_completed(&self.cfg.dest.to_string(), duration_s, forecast);
        let end = PassEnd {
            start,
            scanned_bytes: self.scanned.bytes,
            changed_chunks: chunks,
            changed_bytes,
            sent_bytes,
            zero_chunks,
            duration_s,
            forecast_final_pass_s: forecast,
            root,
            scan: self.plan.kind.clone(),
        };
        self.progress.pass_end(&end);
        let table = self
            .shared
            .collected
            .map(|t| std::mem::take(&mut *t.lock().expect("not poisoned")));
        Ok((end, table))
    }
}

/// Our view of the target, or none: a manifest that cannot be trusted is
/// rebuilt from the receiver's.
fn open_own_manifest(
    cfg: &SyncConfig,
    mpath: &Path,
    progress: &dyn Progress,
) -> Result<Option<ManifestFile>> {
    Ok(match ManifestFile::open(mpath)? {
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            progress.note(&format!(
                "our manifest of {} cannot be trusted ({e}); rebuilding it from the receiver's",
                cfg.dest
            ));
            None
        }
        None => None,
    })
}

/// The chunk size to propose, and whether the operator chose it: a volume
/// keeps the chunk size of its first pass.
fn chunk_size(cfg: &SyncConfig, ours: Option<&ManifestFile>) -> Result<(ChunkSize, bool)> {
    let have = ours.map(|m| m.geometry().chunk_size());
    match (cfg.chunk_size, have) {
        (Some(c), Some(h)) if c != h => Err(Error::input(format!(
            "{} was first copied with chunk size {h}; a pass with chunk size {c} would re-chunk it. Drop --chunk-size to keep {h}",
            cfg.dest
        ))),
        (Some(c), _) => Ok((c, true)),
        (None, Some(h)) => Ok((h, false)),
        (None, None) => Ok((ChunkSize::DEFAULT, false)),
    }
}

/// Reader figures summed over the attempts of a pass.
#[derive(Debug, Default)]
struct ScanStatsSum {
    bytes: u64,
    busy_s: f64,
}
