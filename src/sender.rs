//! The sender: drives one pass from the source side.
//!
//! Owns the sender's view of the target (its manifest under
//! `state/targets/<dest>/`) and the pass journal. A pass: open the source,
//! connect and handshake, reconcile manifests (adopt the receiver's table when
//! the summaries disagree), then run the pipeline
//! `reader → hashers (compare, compress) → N data streams`, while a task
//! applies acknowledgements to our manifest. Only acknowledged chunks are
//! recorded; at the end both sides' roots must agree. There is no per-chunk
//! round trip: the data streams never wait for acknowledgements.

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

use crate::device::Volume;
use crate::error::{Error, Result};
use crate::hash::{self, ScanOptions, Scanned};
use crate::progress::{now_unix, PassEnd, PassStart, Progress};
use crate::receiver::msg_name;
use crate::state::journal::{self, PassRecord, SenderJournal, SenderRecord, UnsealedRecord};
use crate::state::{self, Fill, ManifestFile, SourceRecord};
use crate::transport::{self, Identity, RemoteVolume, Tuning};

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

/// One chunk leaving on a data stream.
struct Outgoing {
    index: u64,
    hash: Hash,
    encoding: Encoding,
    len: u32,
    /// Bitmap of the blocks in a patch's payload.
    blocks: Vec<u8>,
    payload: Bytes,
    /// A probe's chunk bytes, held (see [`Probes`]) until the chunk is acknowledged.
    keep: Option<Bytes>,
    /// The payload is a slice of a whole read block.
    in_block: bool,
}

impl Outgoing {
    /// A chunk frame with no patch bitmap, nothing held, and a payload of its own.
    fn new(index: u64, hash: Hash, encoding: Encoding, len: u32, payload: Bytes) -> Outgoing {
        Outgoing {
            index,
            hash,
            encoding,
            len,
            blocks: Vec::new(),
            payload,
            keep: None,
            in_block: false,
        }
    }
}

/// Chunks sent as probes (block hints; see [`Encoding::Probe`]) whose bytes
/// wait for the receiver's answer.
///
/// Delta transfer below the chunk: after scattered small writes, most of a
/// changed 64 KiB chunk is still what the target holds. For a chunk the
/// target is known to hold a version of, the sender sends a hint of each
/// 4 KiB block; the receiver compares them with its own copy and asks
/// ([`wire::Need`]) for the blocks that differ; the sender sends them as a
/// patch, which the receiver writes only if the patched chunk matches the
/// chunk's full hash. The bytes of every probed chunk are held until it is
/// acknowledged (the receiver may ask again for the whole chunk), bounded by
/// `budget`. There is still no round trip in the pipeline: probes, patches
/// and whole chunks all flow at once.
struct Probes {
    /// The volume's chunk size, and the hash of a chunk of zeros.
    chunk: usize,
    zero: Hash,
    held: Mutex<HashMap<u64, (Bytes, tokio::sync::OwnedSemaphorePermit)>>,
    budget: Arc<tokio::sync::Semaphore>,
    permits: u32,
    /// Where patches leave; `None` once every probe is answered.
    patches: Mutex<Option<mpsc::UnboundedSender<Outgoing>>>,
    /// Blocks probed, and blocks the receiver asked for.
    probed_blocks: AtomicU64,
    needed_blocks: AtomicU64,
    probes: AtomicU64,
}

/// Bytes of probed chunks held at once.
const PROBE_BUDGET: u64 = 64 << 20;

impl Probes {
    fn new(chunk: u64, patches: mpsc::UnboundedSender<Outgoing>) -> Probes {
        let permits = (PROBE_BUDGET / chunk).clamp(4, 4096) as u32;
        Probes {
            chunk: chunk as usize,
            zero: manifest::zero_hash(chunk as usize),
            held: Mutex::default(),
            budget: Arc::new(tokio::sync::Semaphore::new(permits as usize)),
            permits,
            patches: Mutex::new(Some(patches)),
            probed_blocks: AtomicU64::new(0),
            needed_blocks: AtomicU64::new(0),
            probes: AtomicU64::new(0),
        }
    }

    /// Whether to probe a changed chunk of `len` bytes the target holds a
    /// version of (`known`, a hash the target's manifest records; not the
    /// zero chunk's, whose blocks the sender knows are zeros: such a chunk
    /// compresses to about its data anyway): whole chunks (not a short last
    /// one) of 4 blocks or more, up to 4 MiB; and while the receiver keeps
    /// asking for more than 3/4 of the blocks probed (whole chunks
    /// rewritten), only one chunk in 16, to notice when that changes.
    fn worth(&self, known: &Hash, len: usize) -> bool {
        if *known == manifest::UNKNOWN
            || *known == self.zero
            || len != self.chunk
            || !(4 * wire::BLOCK..=4 << 20).contains(&len)
        {
            return false;
        }
        let probed = self.probed_blocks.load(Ordering::Relaxed);
        let needed = self.needed_blocks.load(Ordering::Relaxed);
        if probed >= 1024 && needed * 4 > probed * 3 {
            return self
                .probes
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(16);
        }
        self.probes.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Answers the receiver's [`wire::Need`]: queues the patch (or the whole
    /// chunk, when every block is wanted).
    fn answer(&self, need: wire::Need, hash_of: impl Fn(u64) -> Option<Hash>) -> Result<()> {
        let data = self
            .held
            .lock()
            .expect("not poisoned")
            .get(&need.index)
            .map(|(d, _)| d.clone());
        let (Some(data), Some(hash)) = (data, hash_of(need.index)) else {
            return Err(Error::Peer(format!(
                "receiver asked for blocks of chunk {}, which was not probed",
                need.index
            )));
        };
        let n = wire::blocks_in(data.len());
        if need.blocks.len() != n.div_ceil(8) {
            return Err(Error::Peer(format!(
                "receiver asked for blocks of chunk {} with a bitmap of {} bytes (expected {})",
                need.index,
                need.blocks.len(),
                n.div_ceil(8)
            )));
        }
        let wanted = wire::named_blocks(&need.blocks, n).count();
        self.probed_blocks.fetch_add(n as u64, Ordering::Relaxed);
        self.needed_blocks
            .fetch_add(wanted as u64, Ordering::Relaxed);
        let len = data.len() as u32;
        let out = if wanted == n {
            Outgoing::new(need.index, hash, Encoding::Raw, len, data)
        } else {
            let payload = nightpass_proto::patch::payload(&data, &need.blocks);
            Outgoing {
                blocks: need.blocks,
                ..Outgoing::new(need.index, hash, Encoding::Patch, len, Bytes::from(payload))
            }
        };
        match &*self.patches.lock().expect("not poisoned") {
            Some(tx) => tx
                .send(out)
                .map_err(|_| Error::Network("the patch stream ended".into())),
            None => Err(Error::Peer(format!(
                "receiver asked for blocks of chunk {} after every probe was answered",
                need.index
            ))),
        }
    }
}

#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    changed_bytes: AtomicU64,
    sent_bytes: AtomicU64,
    zero_chunks: AtomicU64,
}

/// Paces payload bytes to a rate.
struct Pacer {
    limit: u64,
    start: Instant,
    sent: Mutex<u64>,
}

impl Pacer {
    async fn pace(&self, n: u64) {
        let due = {
            let mut s = self.sent.lock().expect("not poisoned");
            *s += n;
            Duration::from_secs_f64(*s as f64 / self.limit as f64)
        };
        let el = self.start.elapsed();
        if due > el {
            tokio::time::sleep(due - el).await;
        }
    }
}

thread_local! {
    static POLICY: RefCell<CompressPolicy> = RefCell::new(CompressPolicy::new());
}

/// Decides what to send for a scanned chunk; runs on the hashing threads.
/// `in_block`: the chunk's bytes are a slice of a whole read block;
/// `probes`: where a changed chunk that is not all zeros may go as block
/// hints first (see [`Probes`]).
fn plan_chunk(s: Scanned, known: &Hash, in_block: bool, probes: &Probes) -> Option<Outgoing> {
    if *known == s.hash {
        return None;
    }
    let len = s.data.len() as u32;
    if s.zero {
        return Some(Outgoing::new(
            s.index,
            s.hash,
            Encoding::Zero,
            len,
            Bytes::new(),
        ));
    }
    if probes.worth(known, s.data.len()) {
        let hints = nightpass_proto::patch::hints(&s.data);
        // Held apart from the read block (which can then be freed).
        let keep = if in_block {
            Bytes::copy_from_slice(&s.data)
        } else {
            s.data
        };
        return Some(Outgoing {
            keep: Some(keep),
            ..Outgoing::new(s.index, s.hash, Encoding::Probe, len, Bytes::from(hints))
        });
    }
    let compressed = POLICY.with(|p| {
        let mut p = p.borrow_mut();
        if !p.should_try() {
            return None;
        }
        let c = zstd::bulk::compress(&s.data, 1).ok()?;
        p.record(s.data.len(), c.len());
        CompressPolicy::pays(s.data.len(), c.len()).then_some(c)
    });
    Some(match compressed {
        Some(c) => Outgoing::new(s.index, s.hash, Encoding::Zstd, len, Bytes::from(c)),
        None => Outgoing {
            in_block,
            ..Outgoing::new(s.index, s.hash, Encoding::Raw, len, s.data)
        },
    })
}

/// Where the sender keeps its state of volume `dest` on the receiver whose
/// fingerprint is `server_fp`: `targets/<fingerprint>/<name>/`. Keyed by
/// who the receiver is and what the volume is called there, not by how its
/// address was typed: `newfiler:7400/filer01` and `10.99.0.2:7400/filer01`
/// are one volume with one history.
pub fn target_dir(state_dir: &Path, server_fp: &str, dest: &RemoteVolume) -> PathBuf {
    state_dir
        .join("targets")
        .join(state::key_for(server_fp))
        .join(state::key_for(&dest.name))
}

/// The state directory of a pass's volume, ready for writing: the state
/// directory must be writable (else a refusal, exit 2, before anything is
/// read or sent), and a volume's state kept by an older release under
/// `targets/<HOST:PORT/NAME as typed>/` moves to [`target_dir`].
pub fn volume_state_dir(cfg: &SyncConfig) -> Result<PathBuf> {
    state::check_writable(&cfg.state_dir)?;
    let dir = target_dir(&cfg.state_dir, &cfg.server_fingerprint, &cfg.dest);
    let legacy = cfg
        .state_dir
        .join("targets")
        .join(state::key_for(&cfg.dest.to_string()));
    if !dir.exists() && legacy.join(journal::FILE_NAME).exists() {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        }
        std::fs::rename(&legacy, &dir)
            .map_err(|e| Error::io(format!("move {} to {}", legacy.display(), dir.display()), e))?;
    }
    Ok(dir)
}

/// The path a source is known by: symlinks resolved (`/dev/vg0/filer01`
/// and `/dev/dm-3` are one source), else as given.
pub fn canonical_source(source: &Path) -> String {
    source
        .canonicalize()
        .unwrap_or_else(|_| source.to_owned())
        .display()
        .to_string()
}

/// The source earlier passes of the volume in `dir` read, if any: the
/// `source` record, else (state of an older release) the last pass's.
fn recorded_source(dir: &Path, records: &[SenderRecord]) -> Option<String> {
    if let Some(r) = SourceRecord::read(dir) {
        return Some(r.path);
    }
    journal::passes(records)
        .last()
        .map(|p| canonical_source(Path::new(&p.source)))
}

/// Refuses a source other than the one earlier passes of this volume read,
/// unless the operator said so (`--new-source`): copying another volume's
/// bytes over a target is a mistake a typo makes.
fn check_source(cfg: &SyncConfig, dir: &Path, records: &[SenderRecord]) -> Result<()> {
    let now = canonical_source(&cfg.source);
    match recorded_source(dir, records) {
        Some(before) if before != now && !cfg.new_source => Err(Error::input(format!(
            "earlier passes of {} read {before}, but this one would read {now}: refusing to copy another source over it. If the volume really moved to {now}, rerun with --new-source",
            cfg.dest
        ))),
        _ => Ok(()),
    }
}

/// Records the source this volume is copied from (see [`check_source`]).
fn record_source(cfg: &SyncConfig, dir: &Path) -> Result<()> {
    let now = canonical_source(&cfg.source);
    if SourceRecord::read(dir).is_some_and(|r| r.path == now) {
        return Ok(());
    }
    SourceRecord {
        path: now,
        recorded_unix_s: now_unix(),
    }
    .write(dir)
}

/// A sender passes again over a volume it cut over only when the receiver
/// says the operator unsealed that very cutover there (`nightpass unseal`);
/// then the lift is journaled here too.
fn check_not_cut_over(
    cfg: &SyncConfig,
    journal: &SenderJournal,
    records: &[SenderRecord],
    welcome: &wire::Welcome,
) -> Result<()> {
    let Some(cut) = journal::sealed_cutover(records) else {
        return Ok(());
    };
    let (point, at) = (&cut.consistency_point, cut.freeze_unix_s);
    if welcome.unsealed_cutover == *point {
        return journal.append(&SenderRecord::Unsealed(UnsealedRecord {
            consistency_point: point.clone(),
            unix_s: now_unix(),
        }));
    }
    Err(Error::input(format!(
        "{} was cut over at {} (consistency point {point}): the new site owns it, and further passes are refused so that nothing overwrites what it wrote. To copy it again anyway, run 'nightpass unseal {}' on the receiver host first",
        cfg.dest,
        crate::progress::rfc3339(at),
        cfg.dest.name
    )))
}

fn parse_summary(w: Option<wire::WireSummary>) -> Result<Summary> {
    let w = w.ok_or_else(|| Error::Peer("receiver sent no manifest summary".into()))?;
    Ok(Summary {
        volume_id: w
            .volume_id
            .as_slice()
            .try_into()
            .map_err(|_| Error::Peer("receiver sent a volume id of the wrong length".into()))?,
        generation: w.generation,
        root: w
            .root
            .as_slice()
            .try_into()
            .map_err(|_| Error::Peer("receiver sent a root hash of the wrong length".into()))?,
    })
}

/// A connected, accepted session.
pub struct Session {
    /// The QUIC endpoint (kept so the close reaches the peer).
    pub endpoint: quinn::Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
    /// Control stream, send half.
    pub send: quinn::SendStream,
    /// Control stream, receive half.
    pub recv: quinn::RecvStream,
    /// The receiver's answer.
    pub welcome: wire::Welcome,
}

/// Connects to `dest` and performs the handshake for `hello`.
pub async fn open_session(
    id: &Identity,
    dest: &RemoteVolume,
    server_fp: &str,
    tuning: &Tuning,
    hello: wire::Hello,
) -> Result<Session> {
    let addr = dest.resolve().await?;
    let (endpoint, conn) = transport::connect(id, addr, server_fp, tuning).await?;
    let our_fp = id.fingerprint();
    let attempt = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| transport::explain(&e, addr, &our_fp))?;
        transport::send_control(&mut send, Msg::Hello(hello)).await?;
        match transport::recv_control(&mut recv).await? {
            Some(Msg::Welcome(w)) => {
                if w.version != wire::PROTOCOL_VERSION {
                    return Err(Error::input(format!(
                        "receiver at {dest} speaks protocol version {}, this sender {}",
                        w.version,
                        wire::PROTOCOL_VERSION
                    )));
                }
                Ok((send, recv, w))
            }
            // The code decides the exit status: the receiver failing to
            // read or write its own disk is a runtime failure (exit 3),
            // every other refusal bad input (2).
            Some(Msg::Refusal(r)) => {
                let code =
                    wire::RefuseCode::try_from(r.code).unwrap_or(wire::RefuseCode::Unspecified);
                let verb = if code == wire::RefuseCode::Io {
                    "failed"
                } else {
                    "refused"
                };
                Err(Error::Refused {
                    code,
                    message: format!("receiver at {} {verb}: {}", dest.host_port, r.message),
                })
            }
            Some(other) => Err(Error::Peer(format!(
                "receiver answered the hello with a {}",
                msg_name(&other)
            ))),
            None => Err(Error::Network(format!(
                "receiver at {} closed the session without an answer",
                dest.host_port
            ))),
        }
    };
    match attempt.await {
        Ok((send, recv, welcome)) => Ok(Session {
            endpoint,
            conn,
            send,
            recv,
            welcome,
        }),
        Err(e) => match conn.close_reason() {
            None => {
                // Refused or failed: close now so the receiver is not left waiting.
                conn.close(0u32.into(), b"session refused");
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
                Err(e)
            }
            Some(
                reason @ (quinn::ConnectionError::ConnectionClosed(_)
                | quinn::ConnectionError::TransportError(_)),
            ) => Err(transport::explain(&reason, addr, &our_fp)),
            _ => Err(e),
        },
    }
}

/// Asks the receiver whether a sync session of `cfg`'s volume would be
/// accepted now (exported, authorized, not sealed, not busy, the target's
/// size and the chunk size), without taking the volume or writing
/// anything; checks this sender's own records too (the source is the one
/// earlier passes read, the volume was not cut over). A cutover calls it
/// before freezing, so every refusal leaves the source never frozen.
/// Returns the receiver's answer (its `target_size` is 0 when the target
/// file does not exist yet).
pub async fn preflight(cfg: &SyncConfig, id: &Identity) -> Result<wire::Welcome> {
    let dir = volume_state_dir(cfg)?;
    let journal = SenderJournal::in_dir(&dir);
    let records = journal.read()?;
    check_source(cfg, &dir, &records)?;
    let source = cfg.read_from.as_deref().unwrap_or(&cfg.source);
    let size = Volume::open_source(source)?.size();
    let known = match ManifestFile::open(&dir.join("manifest"))? {
        Some(Ok(m)) => Some(m.geometry().chunk_size()),
        _ => None,
    };
    let chunk = cfg.chunk_size.or(known).unwrap_or(ChunkSize::DEFAULT);
    let hello = wire::Hello {
        version: wire::PROTOCOL_VERSION,
        volume: cfg.dest.name.clone(),
        mode: Mode::Preflight as i32,
        source_size: size,
        chunk_size: chunk.bytes() as u32,
        chunk_size_explicit: cfg.chunk_size.is_some(),
        ..Default::default()
    };
    let s = open_session(id, &cfg.dest, &cfg.server_fingerprint, &cfg.tuning, hello).await?;
    let welcome = s.welcome.clone();
    transport::close_session(&s.endpoint, &s.conn, b"preflight complete").await;
    check_not_cut_over(cfg, &journal, &records, &welcome)?;
    Ok(welcome)
}

/// Fetches the receiver's manifest table into `into` (whose geometry it
/// must have), piece by piece, and returns the root of what arrived.
async fn fetch_table(s: &mut Session, into: &mut ManifestFile) -> Result<Hash> {
    transport::send_control(&mut s.send, Msg::ManifestRequest(wire::ManifestRequest {})).await?;
    let geometry = into.geometry();
    let mut root = manifest::RootHasher::new(&geometry);
    let mut next = 0u64;
    loop {
        match transport::recv_control(&mut s.recv).await? {
            Some(Msg::ManifestPart(run)) => {
                let n = (run.hashes.len() / manifest::ENTRY_LEN) as u64;
                let whole = run.hashes.len() % manifest::ENTRY_LEN == 0;
                if !whole || run.first != next || next + n > geometry.chunk_count() {
                    return Err(Error::Peer(
                        "receiver sent a manifest part out of order or outside the volume".into(),
                    ));
                }
                into.set_run(next, &run.hashes);
                root.update(&run.hashes);
                next += n;
                if run.last {
                    if next != geometry.chunk_count() {
                        return Err(Error::Peer(format!(
                            "receiver's manifest ended after {next} of {} entries",
                            geometry.chunk_count()
                        )));
                    }
                    return Ok(root.finalize());
                }
            }
            Some(other) => {
                return Err(Error::Peer(format!(
                    "expected a manifest part, got a {}",
                    msg_name(&other)
                )))
            }
            None => {
                return Err(Error::Network(
                    "receiver closed the session during the manifest exchange".into(),
                ))
            }
        }
    }
}

async fn ack_loop(
    mut recv: quinn::RecvStream,
    ours: Arc<Mutex<ManifestFile>>,
    ledger: Arc<Mutex<SendLedger>>,
    probes: Arc<Probes>,
) -> Result<Summary> {
    loop {
        match transport::recv_control(&mut recv).await? {
            Some(Msg::Ack(a)) => {
                let mut m = ours.lock().expect("not poisoned");
                let mut ledger = ledger.lock().expect("not poisoned");
                let mut held = probes.held.lock().expect("not poisoned");
                for i in a.indices {
                    let h = ledger
                        .handle_ack(i)
                        .map_err(|e| Error::Peer(e.to_string()))?;
                    m.set(i, &h);
                    held.remove(&i);
                }
            }
            Some(Msg::Need(n)) => {
                probes.answer(n, |i| ledger.lock().expect("not poisoned").hash_of(i))?
            }
            Some(Msg::Done(d)) => return parse_summary(d.summary),
            Some(Msg::Heartbeat(_)) => {}
            Some(Msg::Failure(f)) => return Err(Error::Io(f.message)),
            Some(other) => {
                return Err(Error::Peer(format!(
                    "unexpected {} during the pass",
                    msg_name(&other)
                )))
            }
            None => {
                return Err(Error::Network(
                    "receiver closed the control stream before the end of the pass".into(),
                ))
            }
        }
    }
}

/// Where a data stream takes its chunks from: the scan (bounded) or the
/// answers to probes (unbounded; bounded by [`Probes`]' budget instead).
enum ChunkQueue {
    Scan(mpsc::Receiver<Outgoing>),
    Patches(mpsc::UnboundedReceiver<Outgoing>),
}

impl ChunkQueue {
    async fn recv(&mut self) -> Option<Outgoing> {
        match self {
            ChunkQueue::Scan(rx) => rx.recv().await,
            ChunkQueue::Patches(rx) => rx.recv().await,
        }
    }
}

async fn stream_task(
    conn: quinn::Connection,
    mut rx: ChunkQueue,
    counters: Arc<Counters>,
    pacer: Option<Arc<Pacer>>,
    progress: Arc<dyn Progress>,
) -> Result<()> {
    let mut s =
        ResetOnDrop(Some(conn.open_uni().await.map_err(|e| {
            Error::Network(format!("cannot open a data stream: {e}"))
        })?));
    while let Some(o) = rx.recv().await {
        if let Some(p) = &pacer {
            p.pace(o.payload.len() as u64).await;
        }
        let n = o.payload.len() as u64;
        let head = wire::Chunk {
            index: o.index,
            hash: o.hash.to_vec(),
            encoding: o.encoding as i32,
            len: o.len,
            blocks: o.blocks,
            payload: Bytes::new(),
        };
        let mut bufs = wire::encode_chunk_frame(&head, o.payload);
        transport::write_bufs(s.stream(), &mut bufs).await?;
        counters.sent_bytes.fetch_add(n, Ordering::Relaxed);
        if o.encoding != Encoding::Probe {
            // A probe is counted when its patch (or whole chunk) leaves.
            counters.chunks.fetch_add(1, Ordering::Relaxed);
            counters
                .changed_bytes
                .fetch_add(u64::from(o.len), Ordering::Relaxed);
        }
        if o.encoding == Encoding::Zero {
            counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
        }
        progress.sent(n);
    }
    s.finish()
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A data stream that is reset, its unsent data discarded, when dropped
/// before it finished (its task aborted because the pass failed). quinn
/// would otherwise finish it on drop and keep sending what was queued.
struct ResetOnDrop(Option<quinn::SendStream>);

impl ResetOnDrop {
    fn stream(&mut self) -> &mut quinn::SendStream {
        self.0.as_mut().expect("present until finished or dropped")
    }

    fn finish(mut self) -> Result<()> {
        let mut s = self.0.take().expect("present until finished or dropped");
        s.finish()
            .map_err(|e| Error::Network(format!("data stream: {e}")))
    }
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(s) = &mut self.0 {
            let _ = s.reset(quinn::VarInt::from_u32(1));
        }
    }
}

/// Ends the session of a pass that failed on this side, so the receiver
/// lets go of the volume at once rather than at its idle timeout (an
/// immediate rerun would be refused as "in use" meanwhile). Unless the link
/// itself failed, the receiver is told on the control stream and closes the
/// connection itself: quinn 0.11.19 does not send a CONNECTION_CLOSE while
/// the congestion window is full of data in flight (quinn-rs/quinn#2785,
/// fixed upstream after that release), which is exactly the state of a
/// pass that fails mid-transfer; the receiver's close is awaited for a few
/// round trips at most.
async fn give_up(
    endpoint: &quinn::Endpoint,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    error: &Error,
) {
    let reason = format!("sender: {error}");
    if !matches!(error, Error::Network(_)) {
        let limit = (conn.rtt() * 4 + Duration::from_millis(200)).min(Duration::from_secs(3));
        let told = async {
            let failure = Msg::Failure(wire::Failure {
                message: error.to_string(),
            });
            if transport::send_control(send, failure).await.is_ok() {
                conn.closed().await;
            }
        };
        let _ = tokio::time::timeout(limit, told).await;
    }
    conn.close(1u32.into(), reason.as_bytes());
    let _ = tokio::time::timeout(Duration::from_millis(50), endpoint.wait_idle()).await;
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
    let journal = SenderJournal::in_dir(&dir);
    let mut records = journal.read()?;
    check_source(cfg, &dir, &records)?;
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
    let pacer = cfg.bwlimit.map(|limit| {
        Arc::new(Pacer {
            limit,
            start: Instant::now(),
            sent: Mutex::new(0),
        })
    });
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
                .and_then(|()| record_source(cfg, &dir));
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
                let (stop, stopped) = oneshot::channel::<()>();
                let (created, ()) = tokio::join!(
                    async {
                        let r = create.await;
                        let _ = stop.send(());
                        r
                    },
                    heartbeats(&mut session.send, stopped),
                );
                let mut m = created
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

/// Sends a heartbeat on the control stream every
/// [`wire::HEARTBEAT_INTERVAL_S`] until `stop`. A heartbeat being written
/// is never cut off (half a frame would corrupt the control stream); one
/// that fails ends the heartbeats, and the pass learns of the failure from
/// its streams or its acknowledgements.
async fn heartbeats(send: &mut quinn::SendStream, mut stop: oneshot::Receiver<()>) {
    let every = Duration::from_secs(wire::HEARTBEAT_INTERVAL_S);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
        let beat = Msg::Heartbeat(wire::Heartbeat {});
        if transport::send_control(send, beat).await.is_err() {
            return;
        }
    }
}

/// Streams chunks `resume..` of one attempt and ends the pass with the
/// receiver; on failure, says where a new attempt must resume.
#[allow(clippy::too_many_arguments)]
async fn stream_pass(
    cfg: &SyncConfig,
    session: Session,
    geometry: Geometry,
    resume: u64,
    ours: Arc<Mutex<ManifestFile>>,
    collected: Option<Arc<Mutex<Vec<u8>>>>,
    counters: Arc<Counters>,
    pacer: Option<Arc<Pacer>>,
    progress: Arc<dyn Progress>,
    scanned: &mut ScanStatsSum,
) -> std::result::Result<AttemptDone, Interrupted> {
    let source = cfg.read_from.clone().unwrap_or_else(|| cfg.source.clone());
    let vol = Arc::new(
        Volume::open_source_reader(&source, cfg.scan.read_mode()).map_err(|error| Interrupted {
            error,
            resume_at: resume,
        })?,
    );
    let chunks_per_block =
        (geometry.chunk_size().bytes().max(4 << 20) / geometry.chunk_size().bytes()).max(1);
    let sink = collected.clone();
    // Compared with our live table (what the target is known to hold,
    // acks included), not a copy: a copy would cost 32 bytes per chunk of
    // memory (512 MiB for 1 TiB at 64 KiB chunks). Each chunk is scanned
    // once per attempt, so acks of this attempt never touch an entry before
    // its comparison.
    let scan_known = ours.clone();
    let (patch_tx, patch_rx) = mpsc::unbounded_channel::<Outgoing>();
    let probes = Arc::new(Probes::new(geometry.chunk_size().bytes(), patch_tx));
    let scan_probes = probes.clone();
    let mut scan = hash::scan(
        vol,
        geometry,
        resume,
        cfg.scan.clone(),
        move |s| {
            let known = scan_known.lock().expect("not poisoned").entry(s.index);
            // A chunk to send needs bytes of its own, hashed as they are sent.
            let in_block = !s.mapped;
            let s = if s.hash == known { s } else { s.stable() };
            if let Some(t) = &sink {
                manifest::set_entry(&mut t.lock().expect("not poisoned"), s.index, &s.hash);
            }
            plan_chunk(s, &known, in_block, &scan_probes)
        },
        progress.clone(),
    );
    let Session {
        endpoint,
        conn,
        mut send,
        recv,
        ..
    } = session;
    let ledger = Arc::new(Mutex::new(SendLedger::new(
        resume,
        chunks_per_block,
        geometry.chunk_count(),
    )));
    let resume_at =
        |ledger: &Mutex<SendLedger>| ledger.lock().expect("not poisoned").resume_point();
    // Holds a clone of `ours`: every exit path below must have it finished
    // (awaited, not only aborted) so the caller gets the manifest back.
    let mut ack_task = tokio::spawn(ack_loop(recv, ours.clone(), ledger.clone(), probes.clone()));
    let mut ack_finished = false;
    let streams = cfg.streams.max(1);
    let chunks_before = counters.chunks.load(Ordering::Relaxed);
    let dispatch = async {
        let mut txs = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let (tx, rx) = mpsc::channel::<Outgoing>(8);
            txs.push(tx);
            tasks.spawn(stream_task(
                conn.clone(),
                ChunkQueue::Scan(rx),
                counters.clone(),
                pacer.clone(),
                progress.clone(),
            ));
        }
        let mut patch_task = tokio::spawn(stream_task(
            conn.clone(),
            ChunkQueue::Patches(patch_rx),
            counters.clone(),
            pacer.clone(),
            progress.clone(),
        ));
        // Should this future be dropped (the receiver ended the session
        // first), the patch stream stops too, like the JoinSet's streams.
        let _stop_patches = AbortOnDrop(patch_task.abort_handle());
        let mut next = 0usize;
        let mut failed: Option<Error> = None;
        'blocks: while let Some(block) = scan.rx.recv().await {
            let block = match block {
                Ok(b) => b,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            // A raw payload is a slice of its whole read block; when few chunks
            // of a block changed, copy them out so the block can be freed
            // instead of waiting in send queues (bounds the sender's memory).
            let sparse = (block.items.len() as u64) * 2 < chunks_per_block;
            for mut o in block.items {
                if sparse && o.in_block {
                    o.payload = Bytes::copy_from_slice(&o.payload);
                }
                if let Some(keep) = o.keep.take() {
                    let Ok(permit) = probes.budget.clone().acquire_owned().await else {
                        break 'blocks;
                    };
                    probes
                        .held
                        .lock()
                        .expect("not poisoned")
                        .insert(o.index, (keep, permit));
                }
                ledger
                    .lock()
                    .expect("not poisoned")
                    .handle_sent(o.index, o.hash);
                if txs[next % streams].send(o).await.is_err() {
                    break 'blocks;
                }
                next += 1;
            }
            ledger
                .lock()
                .expect("not poisoned")
                .handle_block_handed(block.seq);
        }
        drop(txs);
        if failed.is_some() {
            // Stop sending: what is queued would only delay the receiver
            // hearing of the failure (see `give_up`).
            tasks.abort_all();
            patch_task.abort();
        }
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(e) if e.is_cancelled() => {}
                Err(_) => {
                    failed = failed.or(Some(Error::Network("a data stream task failed".into())))
                }
            }
        }
        if failed.is_none() {
            // Every probe answered and its chunk acknowledged: every permit
            // is back. Then the patch stream may end.
            tokio::select! {
                r = probes.budget.acquire_many(probes.permits) => {
                    if r.is_err() {
                        failed = Some(Error::Io("probe budget closed".into()));
                    }
                }
                r = &mut patch_task => {
                    failed = Some(match r {
                        Ok(Err(e)) => e,
                        _ => Error::Network("the patch stream ended early".into()),
                    });
                }
            }
        }
        probes.patches.lock().expect("not poisoned").take();
        if !patch_task.is_finished() || failed.is_none() {
            match patch_task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(e) if e.is_cancelled() => {}
                Err(_) => {
                    failed = failed.or(Some(Error::Network("the patch stream task failed".into())))
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    };
    // Heartbeats tell the receiver the pass goes on while no control
    // message is due (a mostly unchanged volume may send nothing for hours).
    let (stop_heartbeats, stopped) = oneshot::channel::<()>();
    let (dispatched, ()) = tokio::join!(
        async {
            let r = tokio::select! {
                r = dispatch => r,
                r = &mut ack_task => {
                    ack_finished = true;
                    Err(match r {
                        Ok(Err(e)) => e,
                        _ => Error::Network("receiver ended the session before the pass finished".into()),
                    })
                }
            };
            let _ = stop_heartbeats.send(());
            r
        },
        heartbeats(&mut send, stopped),
    );
    // Let the reader and hashers go (finish drops the results first) and
    // count what was read.
    if let Ok(Ok(stats)) = tokio::task::spawn_blocking(move || scan.finish()).await {
        scanned.bytes += stats.bytes;
        scanned.busy_s += stats.busy_s;
    }
    if let Err(error) = dispatched {
        // The ack task keeps reading the control stream meanwhile (ending it
        // would look to the receiver like the sender going away).
        give_up(&endpoint, &conn, &mut send, &error).await;
        // Acks that arrived are recorded; resume at the first chunk not done.
        if !ack_finished {
            ack_task.abort();
            let _ = ack_task.await;
        }
        return Err(Interrupted {
            error,
            resume_at: resume_at(&ledger),
        });
    }
    let sent_chunks = counters.chunks.load(Ordering::Relaxed) - chunks_before;
    let fail = |error| Interrupted {
        error,
        resume_at: resume_at(&ledger),
    };
    let finish = transport::send_control(
        &mut send,
        Msg::Finish(wire::Finish {
            chunks_sent: sent_chunks,
        }),
    )
    .await;
    if let Err(e) = finish {
        ack_task.abort();
        let _ = ack_task.await;
        return Err(fail(e));
    }
    let done = match ack_task.await {
        Ok(r) => r.map_err(fail)?,
        Err(_) => return Err(fail(Error::Network("acknowledgement task failed".into()))),
    };
    if !ledger.lock().expect("not poisoned").all_acked() {
        return Err(fail(Error::Peer(
            "the receiver ended the pass with chunks unacknowledged".into(),
        )));
    }
    let root = {
        let mut m = ours.lock().expect("not poisoned");
        let root = m.current_root();
        if root != done.root {
            m.flush_table().map_err(fail)?;
            return Err(fail(Error::Peer(format!(
                "after the pass the receiver's manifest root {} differs from ours {}; the next pass will rebuild our view from the receiver",
                manifest::to_hex(&done.root),
                manifest::to_hex(&root)
            ))));
        }
        m.set_volume_id(done.volume_id);
        m.commit(done.generation, root).map_err(fail)?;
        root
    };
    let _ = send.finish();
    transport::close_session(&endpoint, &conn, b"pass complete").await;
    Ok(AttemptDone { root })
}

/// Every volume's state directory under `targets`: `<fingerprint>/<name>/`,
/// and `<HOST:PORT/NAME>/` as older releases kept them (until their next
/// pass moves them); sorted.
fn volume_dirs(targets: &Path) -> Vec<PathBuf> {
    let list = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for d in list(targets) {
        if d.join(journal::FILE_NAME).exists() {
            out.push(d);
        } else {
            out.extend(list(&d));
        }
    }
    out.sort();
    out
}

/// Prints the pass history and the current forecast of every volume in the
/// sender state directory (only those copied from `source`, when given).
pub fn status(
    state_dir: &std::path::Path,
    source: Option<&std::path::Path>,
    progress: &dyn Progress,
) -> Result<()> {
    if !state_dir.is_dir() {
        return Err(Error::input(format!(
            "state directory {} does not exist (give the --state-dir the passes used)",
            state_dir.display()
        )));
    }
    let want = source.map(canonical_source);
    let mut any = false;
    for dir in volume_dirs(&state_dir.join("targets")) {
        let records = SenderJournal::in_dir(&dir).read()?;
        let Some(last) = journal::passes(&records).last() else {
            continue;
        };
        if let Some(w) = &want {
            let read = recorded_source(&dir, &records);
            if read.as_deref() != Some(w.as_str()) {
                continue;
            }
        }
        any = true;
        let forecast = plan::forecast(&journal::figures(&records), now_unix());
        // The pass records as the journal keeps them (without the format
        // version, which is the journal's and not the pass's).
        let passes: Vec<&SenderRecord> = records.iter().filter(|r| r.as_pass().is_some()).collect();
        progress.event(
            &json!({
                "event": "status",
                "volume": last.volume,
                "source": last.source,
                "passes": passes,
                "forecast_final_pass_s": forecast.map(|f| f.total_s),
            }),
            &status_text(last, &records, forecast),
        );
    }
    if !any {
        progress.note(&format!("no passes recorded in {}", state_dir.display()));
    }
    Ok(())
}

/// What `status` prints of one volume: its passes and the forecast.
fn status_text(last: &PassRecord, records: &[SenderRecord], forecast: Option<Forecast>) -> String {
    let mut text = format!(
        "{} (source {})\n  pass kind      duration  scanned     changed     sent\n",
        last.volume, last.source
    );
    for p in journal::passes(records) {
        text.push_str(&format!(
            "  {} {:<9} {:>7.1}s  {:<11} {:<11} {}\n",
            p.pass,
            p.kind,
            p.duration_s,
            crate::progress::human_bytes(p.scanned_bytes),
            crate::progress::human_bytes(p.changed_bytes),
            crate::progress::human_bytes(p.sent_bytes),
        ));
    }
    text.push_str(&match forecast {
        Some(f) => format!(
            "  forecast of a frozen final pass now: {:.1} s (scan {:.1} s, send {:.1} s of {} changed at {}/s; overheads: pass {:.2} s, freeze {:.2} s)",
            f.total_s,
            f.scan_s,
            f.send_s,
            crate::progress::human_bytes(f.pending_bytes as u64),
            crate::progress::human_bytes(f.change_rate_bps as u64),
            f.pass_overhead_s,
            f.freeze_overhead_s
        ),
        None => "  forecast: needs at least two passes".into(),
    });
    text
}
