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
//! `stream` one attempt on the wire (chunk planning, probes and patches,
//! data streams, acknowledgements, heartbeats, giving up).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nightpass_proto::chunk::{ChunkSize, Geometry};
use nightpass_proto::manifest::{self, Hash, Summary};
use nightpass_proto::plan::{self, CompressPolicy, Forecast};
use nightpass_proto::session::SendLedger;
use nightpass_proto::wire::{self, control::Msg, Encoding, Mode};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::io::device::Volume;
use crate::io::hash::{self, ScanOptions, Scanned};
use crate::net::transport::{self, Identity, RemoteVolume, Tuning};
use crate::pass::receiver::msg_name;
use crate::progress::{now_unix, PassEnd, PassStart, Progress};
use crate::store::journal::{self, Journal, PassRecord, SenderRecord, UnsealedRecord};
use crate::store::state::{self, Fill, ManifestFile, SourceRecord};
use crate::store::{FileStore, SenderJournal, SenderVolume};

mod records;
mod session;
mod stream;

use records::*;
pub use records::{canonical_source, journal, status, target_dir, volume_state_dir};
use session::*;
pub use session::{open_session, preflight, Session};
use stream::*;

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
    let source = cfg.read_from.clone().unwrap_or_else(|| cfg.source.clone());
    let vol = Arc::new(Volume::open_source_reader(&source, cfg.scan.read_mode())?);
    let size = vol.size();
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
    let mpath = dir.join("manifest");
    let mut ours = match ManifestFile::open(&mpath)? {
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            progress.note(&format!(
                "our manifest of {} cannot be trusted ({e}); rebuilding it from the receiver's",
                cfg.dest
            ));
            None
        }
        None => None,
    };
    let have = ours.as_ref().map(|m| m.geometry().chunk_size());
    let (chunk, explicit) = match (cfg.chunk_size, have) {
        (Some(c), Some(h)) if c != h => {
            return Err(Error::input(format!(
                "{} was first copied with chunk size {h}; a pass with chunk size {c} would re-chunk it. Drop --chunk-size to keep {h}",
                cfg.dest
            )))
        }
        (Some(c), _) => (c, true),
        (None, Some(h)) => (h, false),
        (None, None) => (ChunkSize::DEFAULT, false),
    };
    let pass_no = journal::passes(&records).count() as u64 + 1;
    let pass_id: [u8; 16] = rand::random();
    let counters: Arc<Counters> = Arc::default();
    let pacer = cfg.bwlimit.map(|limit| Arc::new(Pacer::new(limit)));
    let mut collected: Option<Arc<Mutex<Vec<u8>>>> = None;
    let mut started: Option<(PassStart, Instant, f64)> = None;
    let mut scanned = ScanStatsSum::default();
    let mut resume = 0u64;
    let mut attempt = 0u32;
    let mut gave_up_at: Option<Instant> = None;
    let mut backoff = Duration::from_millis(500);
    // Only a link that was up and then lost is ridden out: a receiver that
    // never answered is a wrong address, port or firewall, said at once.
    let mut ever_connected = cfg.receiver_answered;
    let done = loop {
        attempt += 1;
        let hello = wire::Hello {
            version: wire::PROTOCOL_VERSION,
            volume: cfg.dest.name.clone(),
            mode: Mode::Sync as i32,
            source_size: size,
            chunk_size: chunk.bytes() as u32,
            chunk_size_explicit: explicit,
            ranges: Vec::new(),
            known: ours.as_ref().map(|m| {
                let s = m.header().summary();
                wire::WireSummary {
                    volume_id: s.volume_id.to_vec(),
                    generation: s.generation,
                    root: s.root.to_vec(),
                }
            }),
            pass_id: pass_id.to_vec(),
            resumes: attempt > 1,
        };
        let mut connected = false;
        let outcome = async {
            let mut session =
                open_session(id, &cfg.dest, &cfg.server_fingerprint, &cfg.tuning, hello)
                    .await
                    .map_err(|error| Interrupted {
                        error,
                        resume_at: resume,
                    })?;
            connected = true;
            let at = |error| Interrupted {
                error,
                resume_at: resume,
            };
            let checked = check_not_cut_over(cfg, &journal, &records, &session.welcome)
                .and_then(|()| record_source(cfg, &journal));
            if let Err(e) = checked {
                transport::close_session(
                    &session.endpoint,
                    &session.conn,
                    b"pass refused by the sender",
                )
                .await;
                return Err(at(e));
            }
            let agreed = ChunkSize::new(u64::from(session.welcome.chunk_size)).map_err(|e| {
                at(Error::Peer(format!(
                    "receiver chose an invalid chunk size: {e}"
                )))
            })?;
            let geometry =
                Geometry::new(size, agreed).map_err(|e| at(Error::input(e.to_string())))?;
            if let Some((s, _, _)) = &started {
                if s.chunk_size != agreed.bytes() {
                    return Err(at(Error::Peer(
                        "receiver changed the chunk size between attempts".into(),
                    )));
                }
            }
            let theirs = parse_summary(session.welcome.summary.clone()).map_err(at)?;
            // Reconcile: trust our view only when it is exactly the receiver's.
            let agree = ours
                .as_ref()
                .is_some_and(|m| m.geometry() == geometry && m.header().summary() == theirs);
            if !agree {
                // Rebuilt in a fresh manifest, committed only once the root
                // checks out: until then its header claims nothing.
                drop(ours.take());
                // Writing a large table takes a while (512 MiB per TiB):
                // off the async workers, with heartbeats so the receiver
                // does not take the silence for a sender gone.
                let create = {
                    let (mpath, id) = (mpath.clone(), theirs.volume_id);
                    tokio::task::spawn_blocking(move || {
                        ManifestFile::create(&mpath, geometry, id, Fill::Unknown)
                    })
                };
                let mut m = transport::with_heartbeats(&mut session.send, create)
                    .await
                    .map_err(at)?
                    .map_err(|_| at(Error::Io("manifest task failed".into())))?
                    .map_err(at)?;
                let root = fetch_table(&mut session, &mut m).await.map_err(at)?;
                if root != theirs.root {
                    return Err(at(Error::Peer(
                        "the receiver's manifest does not match its own root hash".into(),
                    )));
                }
                m.commit(theirs.generation, theirs.root).map_err(at)?;
                ours = Some(m);
            }
            if started.is_none() {
                let start = PassStart {
                    volume: cfg.dest.to_string(),
                    pass: pass_no,
                    size_bytes: size,
                    chunk_size: agreed.bytes(),
                };
                progress.pass_start(&start);
                started = Some((start, Instant::now(), now_unix()));
                collected = collect.then(|| {
                    Arc::new(Mutex::new(vec![
                        0u8;
                        geometry.chunk_count() as usize
                            * manifest::ENTRY_LEN
                    ]))
                });
            }
            let m = ours.take().expect("set above");
            let shared = Arc::new(Mutex::new(m));
            let r = stream_pass(
                cfg,
                session,
                geometry,
                resume,
                shared.clone(),
                collected.clone(),
                counters.clone(),
                pacer.clone(),
                progress.clone(),
                &mut scanned,
            )
            .await;
            ours = Some(
                Arc::try_unwrap(shared)
                    .map_err(|_| at(Error::Io("manifest still shared after the pass".into())))?
                    .into_inner()
                    .expect("not poisoned"),
            );
            r
        }
        .await;
        ever_connected |= connected;
        match outcome {
            Ok(done) => break done,
            Err(i) if !ever_connected => return Err(i.error),
            Err(Interrupted {
                error: Error::Network(msg),
                resume_at,
            }) if !cfg.retry_for.is_zero() => {
                // --retry-for bounds each outage: a session that was
                // established ended the previous one.
                if connected {
                    gave_up_at = None;
                    backoff = Duration::from_millis(500);
                }
                let limit = *gave_up_at.get_or_insert_with(|| Instant::now() + cfg.retry_for);
                if Instant::now() >= limit {
                    return Err(Error::Network(format!(
                        "gave up after waiting {} s for the receiver at {} (--retry-for): {msg}",
                        cfg.retry_for.as_secs(),
                        cfg.dest.host_port
                    )));
                }
                resume = resume_at;
                progress.note(&format!(
                    "link to {} lost ({msg}); reconnecting in {:.1} s, then resuming the pass at chunk {resume}",
                    cfg.dest.host_port,
                    backoff.as_secs_f64()
                ));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
            Err(i) => return Err(i.error),
        }
    };
    let (start, began, start_unix) = started.expect("a pass that ended had started");
    let root = done.root;
    let chunk = start.chunk_size;
    let sent_chunks = counters.chunks.load(Ordering::Relaxed);
    let duration_s = began.elapsed().as_secs_f64();
    let changed_bytes = counters.changed_bytes.load(Ordering::Relaxed);
    let record = SenderRecord::Pass(PassRecord {
        kind: cfg.kind.to_string(),
        source: cfg.source.display().to_string(),
        volume: cfg.dest.to_string(),
        pass: pass_no,
        first: pass_no == 1,
        proof_read: Some(cfg.proof_read),
        attempts: Some(attempt),
        start_unix_s: start_unix,
        duration_s,
        size_bytes: size,
        chunk_size: chunk,
        scanned_bytes: scanned.bytes,
        read_busy_s: scanned.busy_s,
        changed_chunks: sent_chunks,
        changed_bytes,
        sent_bytes: counters.sent_bytes.load(Ordering::Relaxed),
        zero_chunks: counters.zero_chunks.load(Ordering::Relaxed),
        read_rate_bps: scanned.bytes as f64 / scanned.busy_s.max(1e-6),
        send_rate_bps: counters.sent_bytes.load(Ordering::Relaxed) as f64 / duration_s.max(1e-6),
        root: manifest::to_hex(&root),
    });
    journal.append(&record)?;
    records.push(record);
    let forecast = plan::forecast(&journal::figures(&records), now_unix()).map(|f| f.total_s);
    let end = PassEnd {
        start,
        scanned_bytes: scanned.bytes,
        changed_chunks: sent_chunks,
        changed_bytes,
        sent_bytes: counters.sent_bytes.load(Ordering::Relaxed),
        zero_chunks: counters.zero_chunks.load(Ordering::Relaxed),
        duration_s,
        forecast_final_pass_s: forecast,
        root: manifest::to_hex(&root),
    };
    progress.pass_end(&end);
    let table = collected.map(|t| std::mem::take(&mut *t.lock().expect("not poisoned")));
    Ok((end, table))
}

/// Reader figures summed over the attempts of a pass.
#[derive(Debug, Default)]
struct ScanStatsSum {
    bytes: u64,
    busy_s: f64,
}
