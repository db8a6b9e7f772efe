//! The receiver: the serve loop, volume exports, sessions and the writer.
//!
//! Owns the target side of a session, and admission: handshakes are bounded
//! in number and time, a session slot is taken only after authentication
//! (see [`serve`]), and every wait on a peer has a deadline, so no peer,
//! authorized or not, holds a slot or a volume for long without working.
//! Per connection: the control stream
//! carries the handshake, manifest exchange, acknowledgements and the end of
//! the pass; data arrives on unidirectional streams, one chunk per frame.
//! Every chunk is checked before anything is written: index inside the
//! volume, length equal to the chunk's, payload decoding to exactly that
//! length, BLAKE3 equal to the announced hash. Verified chunks go to one
//! writer thread per session, which commits them in batches:
//!
//! 1. entries about to be overwritten are set to UNKNOWN and msynced,
//! 2. the data is written (`pwrite`, or `BLKZEROOUT`/hole punching for zero chunks),
//! 3. `fdatasync` of the target,
//! 4. the new entries are set and msynced,
//! 5. the batch is acknowledged to the sender.
//!
//! So the manifest is never ahead of the data, even across a crash at any
//! point. The receiver writes only to the exported paths and only below the
//! source size it accepted, which the target was checked to hold.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nightpass_proto::chunk::{ChunkSize, Geometry};
use nightpass_proto::chunkset::ChunkSet;
use nightpass_proto::manifest::{self, Hash, Summary, UNKNOWN};
use nightpass_proto::patch;
use nightpass_proto::wire::{self, control::Msg, Encoding, Mode, RefuseCode};
use tokio::sync::{mpsc, oneshot};

use crate::device::{Created, Volume};
use crate::error::{Error, Result};
use crate::hash::{self, ScanOptions};
use crate::progress::Quiet;
use crate::state::{self, Fill, ManifestFile};
use crate::transport::{self, DataFrame, Identity, Tuning};

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Exported volumes: name → path.
    pub volumes: HashMap<String, PathBuf>,
    /// Fingerprints of the senders allowed in.
    pub allowed: HashSet<String>,
    /// Senders limited to some volumes (fingerprint → volume names); a
    /// fingerprint of `allowed` missing here may use every volume.
    pub limits: HashMap<String, HashSet<String>>,
    /// Largest target file a sender may make this receiver create; `None`:
    /// the size of the filesystem that would hold it.
    pub max_size: Option<u64>,
    /// Where manifests and journals live.
    pub state_dir: PathBuf,
    /// QUIC tuning.
    pub tuning: Tuning,
    /// Most authenticated connections served at once; more are closed
    /// with a reason (`--max-sessions`).
    pub max_sessions: usize,
    /// Most of those from one sender fingerprint (`--max-sessions-per-sender`).
    pub max_sessions_per_sender: usize,
}

/// Handshakes in progress at most; more connections are refused before any
/// cryptography. Counted apart from sessions, so peers that never finish a
/// handshake cannot keep authenticated senders out.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one address (an IPv6 /64) at most: one host
/// cannot take every handshake slot.
const MAX_HANDSHAKES_PER_ADDRESS: usize = 64;
/// With more handshakes than this in progress, a client must first prove it
/// owns its address (a QUIC Retry, one round trip) before a handshake begins.
const RETRY_ABOVE: usize = MAX_HANDSHAKES / 8;
/// A TLS handshake must complete within this; the connection is dropped then.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// From the end of the handshake to a complete Hello, at most.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// A sync session with no control message for this long (three heartbeat
/// intervals) has ended; so has one whose sender leaves what it asked for
/// unread this long.
const CONTROL_IDLE: Duration = Duration::from_secs(3 * wire::HEARTBEAT_INTERVAL_S);
/// Close code of a connection refused after authentication (a limit).
const CLOSE_BUSY: u32 = 5;
/// Close code of a session whose peer stopped answering and whose volume
/// another session took over (and of one superseded by its own resumption).
const CLOSE_SUPERSEDED: u32 = 3;

/// Bytes of verified chunks a writer batches before one durable commit.
const BATCH_BYTES: usize = 32 << 20;
/// Chunks per batch at most.
const BATCH_CHUNKS: usize = 2048;
/// How long a writer lingers for more chunks before committing a small batch.
const LINGER: Duration = Duration::from_millis(5);

/// Who holds a volume: the pass and its connection.
struct Holder {
    pass_id: Vec<u8>,
    conn: Option<quinn::Connection>,
}

struct Shared {
    cfg: ServeConfig,
    busy: Mutex<HashMap<String, Holder>>,
    writers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// Holds a volume for one session; released on drop.
struct BusyGuard {
    shared: Arc<Shared>,
    name: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.shared
            .busy
            .lock()
            .expect("not poisoned")
            .remove(&self.name);
    }
}

/// A session refusal: sent to the peer, then the connection closes.
struct Refuse(RefuseCode, String);

impl From<Error> for Refuse {
    fn from(e: Error) -> Self {
        Refuse(e.refuse_code(), e.to_string())
    }
}

/// Runs the receiver until `shutdown` resolves. `ready` is called once with
/// the bound address and this receiver's fingerprint.
pub async fn serve(
    cfg: ServeConfig,
    identity: Identity,
    ready: impl FnOnce(SocketAddr, &str),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if cfg.allowed.is_empty() {
        return Err(Error::input(
            "no sender is allowed: give --allow or --allow-file",
        ));
    }
    if cfg.volumes.is_empty() {
        return Err(Error::input(
            "no volume is exported: give --volume NAME=PATH",
        ));
    }
    let mut cfg = cfg;
    cfg.volumes = check_exports(&cfg)?;
    let ep = transport::server_endpoint(&identity, cfg.allowed.clone(), cfg.listen, &cfg.tuning)?;
    let local = ep
        .local_addr()
        .map_err(|e| Error::io("listening socket", e))?;
    ready(local, &identity.fingerprint());
    let shared = Arc::new(Shared {
        cfg,
        busy: Mutex::new(HashMap::new()),
        writers: Mutex::new(Vec::new()),
    });
    let limits = Arc::new(Limits {
        handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
        handshakes_per_address: Mutex::new(HashMap::new()),
        sessions: Arc::new(tokio::sync::Semaphore::new(shared.cfg.max_sessions.max(1))),
        per_sender: Mutex::new(HashMap::new()),
    });
    tokio::pin!(shutdown);
    let mut flush = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            incoming = ep.accept() => {
                let Some(incoming) = incoming else { break };
                admit(&shared, &limits, incoming);
            }
            _ = flush.tick() => transport::flush_refusals(),
            _ = &mut shutdown => break,
        }
    }
    ep.close(0u32.into(), b"receiver shutting down");
    // Finish durable writes: every writer commits its batch and stops.
    let writers: Vec<_> = shared
        .writers
        .lock()
        .expect("not poisoned")
        .drain(..)
        .collect();
    for w in writers {
        let _ = tokio::task::spawn_blocking(move || w.join()).await;
    }
    ep.wait_idle().await;
    Ok(())
}

/// What makes two exports the same target.
#[derive(PartialEq, Eq, Hash)]
enum ExportKey {
    File(u64, u64),
    Block(u64),
    Missing(PathBuf),
}

/// Checks every export when `serve` starts, so that a problem shows now and
/// not at the first session, at night: the state directory is writable
/// (created 0700 when missing), each export is a regular file or a block
/// device that is not mounted or held, or a missing file whose directory
/// exists; no two names share one file or device (compared by identity,
/// after resolving symbolic links); every volume an `--allow FP=NAME`
/// names is exported. Returns each export's canonical path: sessions use
/// these, so a symbolic link changed after the start is not followed.
pub fn check_exports(cfg: &ServeConfig) -> Result<HashMap<String, PathBuf>> {
    let mut fps: Vec<_> = cfg.limits.iter().collect();
    fps.sort_by(|a, b| a.0.cmp(b.0));
    for (fp, names) in fps {
        let mut names: Vec<_> = names.iter().collect();
        names.sort();
        if let Some(n) = names.iter().find(|n| !cfg.volumes.contains_key(n.as_str())) {
            return Err(Error::input(format!(
                "--allow {fp}={}: volume '{n}' is not exported (give --volume {n}=PATH, or drop it from the allow entry)",
                names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
            )));
        }
    }
    let mut names: Vec<&String> = cfg.volumes.keys().collect();
    names.sort();
    let mut seen: HashMap<ExportKey, &str> = HashMap::new();
    let mut pinned = HashMap::new();
    for name in names {
        let (canonical, key) = resolve_export(name, &cfg.volumes[name])?;
        if let Some(other) = seen.insert(key, name) {
            return Err(Error::input(format!(
                "volumes '{other}' and '{name}' are the same target ({}): export each file or device under one name only",
                canonical.display()
            )));
        }
        pinned.insert(name.clone(), canonical);
    }
    // Last, as it creates the state directory when missing: a refusal
    // above leaves nothing behind.
    state::check_writable(&cfg.state_dir)?;
    state::check_writable(&cfg.state_dir.join("volumes"))?;
    Ok(pinned)
}

/// The canonical path of export `name` and what identifies its target.
fn resolve_export(name: &str, path: &Path) -> Result<(PathBuf, ExportKey)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let bad = |why: String| Error::input(format!("volume '{name}' ({}): {why}", path.display()));
    match std::fs::metadata(path) {
        Ok(m) => {
            let canonical = path
                .canonicalize()
                .map_err(|e| bad(format!("cannot resolve the path: {e}")))?;
            if m.file_type().is_block_device() {
                crate::device::check_not_held(&canonical).map_err(|e| bad(e.to_string()))?;
                Ok((canonical, ExportKey::Block(m.rdev())))
            } else if m.file_type().is_file() {
                Ok((canonical, ExportKey::File(m.dev(), m.ino())))
            } else {
                Err(bad("is neither a block device nor a regular file".into()))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(bad(
                    "is a symbolic link to nothing; export the path it should point to".into(),
                ));
            }
            let file = path
                .file_name()
                .ok_or_else(|| bad("names no file".into()))?;
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let dir = parent.canonicalize().map_err(|e| {
                bad(format!(
                    "its directory {} does not exist ({e}); create it, or fix the path",
                    parent.display()
                ))
            })?;
            if !dir.is_dir() {
                return Err(bad(format!("{} is not a directory", parent.display())));
            }
            let canonical = dir.join(file);
            Ok((canonical.clone(), ExportKey::Missing(canonical)))
        }
        Err(e) => Err(bad(format!("cannot stat it: {e}"))),
    }
}

/// Refuses a session of `volume` from a sender limited to other volumes
/// (`--allow FP=NAME,...`).
fn authorized(shared: &Shared, fp: Option<&str>, volume: &str) -> std::result::Result<(), Refuse> {
    let ok = match fp {
        Some(fp) => match shared.cfg.limits.get(fp) {
            None => shared.cfg.allowed.contains(fp),
            Some(names) => names.contains(volume),
        },
        None => false,
    };
    if ok {
        return Ok(());
    }
    Err(Refuse(
        RefuseCode::NotAuthorized,
        format!(
            "sender {} is not authorized for volume '{volume}' (the receiver's --allow limits it to other volumes)",
            fp.unwrap_or("without a certificate")
        ),
    ))
}

/// What the serve loop counts: handshakes in progress, and sessions (in
/// all and per sender fingerprint), which are counted only once a peer has
/// authenticated.
struct Limits {
    handshakes: Arc<tokio::sync::Semaphore>,
    handshakes_per_address: Mutex<HashMap<std::net::IpAddr, usize>>,
    sessions: Arc<tokio::sync::Semaphore>,
    per_sender: Mutex<HashMap<String, usize>>,
}

/// A session's place under `--max-sessions` and `--max-sessions-per-sender`;
/// given back on drop.
struct SessionSlot {
    limits: Arc<Limits>,
    fingerprint: String,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut per = self.limits.per_sender.lock().expect("not poisoned");
        if let Some(n) = per.get_mut(&self.fingerprint) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.fingerprint);
            }
        }
    }
}

/// A handshake's place under [`MAX_HANDSHAKES_PER_ADDRESS`]; given back on drop.
struct AddressSlot {
    limits: Arc<Limits>,
    address: std::net::IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut per = self
            .limits
            .handshakes_per_address
            .lock()
            .expect("not poisoned");
        if let Some(n) = per.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.address);
            }
        }
    }
}

/// Whose handshakes count together: an IPv4 address, or the /64 prefix of
/// an IPv6 one (a single host commonly holds a whole /64).
fn handshake_source(remote: SocketAddr) -> std::net::IpAddr {
    match remote.ip().to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

impl Limits {
    /// A place for one more handshake from `remote`'s address, or none when
    /// that address already has [`MAX_HANDSHAKES_PER_ADDRESS`] in progress.
    fn address_slot(self: &Arc<Self>, remote: SocketAddr) -> Option<AddressSlot> {
        let address = handshake_source(remote);
        let mut per = self.handshakes_per_address.lock().expect("not poisoned");
        let n = per.entry(address).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            limits: self.clone(),
            address,
        })
    }

    /// A slot for an authenticated sender, or why it gets none.
    fn session_slot(
        self: &Arc<Self>,
        fingerprint: &str,
        cfg: &ServeConfig,
    ) -> std::result::Result<SessionSlot, String> {
        let mut per = self.per_sender.lock().expect("not poisoned");
        let held = per.get(fingerprint).copied().unwrap_or(0);
        if held >= cfg.max_sessions_per_sender.max(1) {
            return Err(format!(
                "receiver busy: sender {fingerprint} already has {held} sessions open (--max-sessions-per-sender {}); try again when one ends",
                cfg.max_sessions_per_sender.max(1)
            ));
        }
        let permit = self.sessions.clone().try_acquire_owned().map_err(|_| {
            format!(
                "receiver busy: {} sessions already open (--max-sessions); try again later",
                cfg.max_sessions.max(1)
            )
        })?;
        per.insert(fingerprint.to_string(), held + 1);
        Ok(SessionSlot {
            limits: self.clone(),
            fingerprint: fingerprint.to_string(),
            _permit: permit,
        })
    }
}

/// Takes a connection attempt through the handshake (bounded in number and
/// time, the client's address validated under load) and, once the peer has
/// authenticated, into a session if a slot is free.
fn admit(shared: &Arc<Shared>, limits: &Arc<Limits>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let in_progress = MAX_HANDSHAKES - limits.handshakes.available_permits();
    if in_progress >= RETRY_ABOVE && !incoming.remote_address_validated() && incoming.may_retry() {
        // A client that spoofs its address never sees the Retry: it cannot
        // start a handshake, and costs us one packet.
        let _ = incoming.retry();
        return;
    }
    let Ok(handshake) = limits.handshakes.clone().try_acquire_owned() else {
        transport::log_refusal("handshakes", || {
            format!("refused a connection from {remote}: {MAX_HANDSHAKES} handshakes already in progress")
        });
        incoming.refuse();
        return;
    };
    let Some(from_address) = limits.address_slot(remote) else {
        transport::log_refusal("handshakes per address", || {
            format!(
                "refused a connection from {remote}: {MAX_HANDSHAKES_PER_ADDRESS} handshakes from {} already in progress",
                handshake_source(remote)
            )
        });
        incoming.refuse();
        return;
    };
    let (shared, limits) = (shared.clone(), limits.clone());
    tokio::spawn(async move {
        // Dropping an unfinished handshake closes its connection.
        let conn = match tokio::time::timeout(HANDSHAKE_DEADLINE, incoming).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                transport::log_refusal("handshake failed", || {
                    format!("connection from {remote} failed during the handshake: {e}")
                });
                return;
            }
            Err(_) => {
                transport::log_refusal("handshake timed out", || {
                    format!(
                        "connection from {remote} did not complete its handshake within {} s; dropped",
                        HANDSHAKE_DEADLINE.as_secs()
                    )
                });
                return;
            }
        };
        drop((handshake, from_address));
        let Some(fingerprint) = transport::peer_fingerprint(&conn) else {
            conn.close(1u32.into(), b"no client certificate");
            return;
        };
        let slot = match limits.session_slot(&fingerprint, &shared.cfg) {
            Ok(slot) => slot,
            Err(why) => {
                transport::log_refusal("busy", || {
                    format!("refused a session from {remote}: {why}")
                });
                conn.close(CLOSE_BUSY.into(), why.as_bytes());
                return;
            }
        };
        let _slot = slot;
        if let Err(e) = session(shared, conn.clone()).await {
            eprintln!("session from {remote} ended with an error: {e}");
            conn.close(1u32.into(), e.to_string().as_bytes());
        }
    });
}

fn summary_to_wire(s: &Summary) -> wire::WireSummary {
    wire::WireSummary {
        volume_id: s.volume_id.to_vec(),
        generation: s.generation,
        root: s.root.to_vec(),
    }
}

/// Frees the volume, then refuses: an operator who fixes the mistake and
/// reruns at once must not be told the volume is in use.
async fn refuse_freeing(
    guard: BusyGuard,
    send: &mut quinn::SendStream,
    conn: &quinn::Connection,
    r: Refuse,
) -> Result<()> {
    drop(guard);
    refuse(send, conn, r).await
}

async fn refuse(send: &mut quinn::SendStream, conn: &quinn::Connection, r: Refuse) -> Result<()> {
    eprintln!("refused a session: {}", r.1);
    let _ = transport::send_control(
        send,
        Msg::Refusal(wire::Refusal {
            code: r.0 as i32,
            message: r.1.clone(),
        }),
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

async fn session(shared: Arc<Shared>, conn: quinn::Connection) -> Result<()> {
    // A peer gets one deadline from its handshake to a complete Hello: it
    // cannot hold a session slot by opening no stream, or by sending part
    // of a frame.
    let opening = async {
        let (send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| Error::Network(format!("control stream: {e}")))?;
        let first = transport::recv_control(&mut recv).await?;
        Ok::<_, Error>((send, recv, first))
    };
    let (mut send, recv, first) = tokio::time::timeout(HELLO_DEADLINE, opening)
        .await
        .map_err(|_| {
            Error::Peer(format!(
                "no hello within {} s of the handshake",
                HELLO_DEADLINE.as_secs()
            ))
        })??;
    let hello = match first {
        Some(Msg::Hello(h)) => h,
        Some(_) => return Err(Error::Peer("first message was not a hello".into())),
        None => return Ok(()),
    };
    // Before anything touches another session (supersede, the liveness
    // check): a peer limited to other volumes must not reach this one's holder.
    if let Err(r) = admissible(&shared, &hello, &conn) {
        return refuse(&mut send, &conn, r).await;
    }
    let exclusive = hello.mode == Mode::Sync as i32;
    if exclusive && hello.resumes {
        supersede(&shared, &hello).await;
    }
    // A preflight answers what a sync would be told: a holder that is
    // going away, or that no longer answers, does not make the volume busy.
    if exclusive || hello.mode == Mode::Preflight as i32 {
        await_closed_holder(&shared, &hello.volume).await;
        release_if_unanswered(&shared, &hello.volume).await;
    }
    let accepted = accept(&shared, &hello, exclusive, &conn);
    let (guard, path) = match accepted {
        Ok(x) => x,
        Err(r) => return refuse(&mut send, &conn, r).await,
    };
    match Mode::try_from(hello.mode) {
        Ok(Mode::Sync) => match guard {
            Some(guard) => sync_session(shared, conn, send, recv, hello, guard, path).await,
            None => Err(Error::Io("sync session without the volume".into())),
        },
        Ok(Mode::Verify) => verify_session(shared, conn, send, recv, hello, path).await,
        Ok(Mode::Record) => record_session(shared, conn, send, recv, hello).await,
        Ok(Mode::Preflight) => preflight_session(&shared, &conn, send, &hello, &path).await,
        _ => {
            refuse(
                &mut send,
                &conn,
                Refuse(RefuseCode::BadRequest, "unknown session mode".into()),
            )
            .await
        }
    }
}

/// A sender resuming a pass after a lost link: end that pass's old session
/// (its connection is presumed dead) and wait for its writer to let go.
async fn supersede(shared: &Arc<Shared>, hello: &wire::Hello) {
    let old = {
        let busy = shared.busy.lock().expect("not poisoned");
        busy.get(&hello.volume)
            .filter(|h| !hello.pass_id.is_empty() && h.pass_id == hello.pass_id)
            .and_then(|h| h.conn.clone())
    };
    let Some(old) = old else { return };
    eprintln!(
        "volume '{}': the sender resumed its pass; ending its previous session",
        hello.volume
    );
    old.close(
        CLOSE_SUPERSEDED.into(),
        b"superseded by the resumed session",
    );
    await_release(shared, &hello.volume).await;
}

/// Waits (up to 15 s) for the session holding `name`, whose connection was
/// just closed, to commit what it has and let go of the volume.
async fn await_release(shared: &Arc<Shared>, name: &str) {
    for _ in 0..300 {
        if !shared.busy.lock().expect("not poisoned").contains_key(name) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sync Hello found `name` held: when the holder's peer no longer answers
/// (a sender killed mid-pass leaves its session to the 15 s idle timeout),
/// end that session and wait for its writer to let go, so the rerun is
/// accepted at once. A holder that answers keeps the volume (the new session
/// is then refused `IN_USE`).
async fn release_if_unanswered(shared: &Arc<Shared>, name: &str) {
    let old = {
        let busy = shared.busy.lock().expect("not poisoned");
        busy.get(name).and_then(|h| h.conn.clone())
    };
    let Some(old) = old else { return };
    if old.close_reason().is_some() || answers(&old).await {
        return;
    }
    eprintln!(
        "volume '{name}': the session holding it (from {}) does not answer; ending it and giving the volume to the new session",
        old.remote_address()
    );
    old.close(
        CLOSE_SUPERSEDED.into(),
        b"the peer stopped answering; its volume was given to a new session",
    );
    await_release(shared, name).await;
}

/// Whether the peer of `conn` answers: it is asked with QUIC DATAGRAM
/// frames, which any live QUIC stack acknowledges within its ack delay
/// (25 ms) whatever its application is doing, and which need no stream of
/// the session. It answers when datagrams arrive from it in each of three
/// windows of a few round trips: datagrams it sent before it died, still
/// queued in our socket buffer, cannot fill all three.
async fn answers(conn: &quinn::Connection) -> bool {
    for _ in 0..3 {
        if !answers_within_window(conn).await {
            return false;
        }
    }
    true
}

/// Whether any datagram arrives from the peer of `conn`, pinged every
/// 50 ms meanwhile, over a whole window of 4 x RTT + 200 ms (at most 3 s).
async fn answers_within_window(conn: &quinn::Connection) -> bool {
    let window = (conn.rtt() * 4 + Duration::from_millis(200)).min(Duration::from_secs(3));
    let before = conn.stats().udp_rx.datagrams;
    let until = tokio::time::Instant::now() + window;
    loop {
        if conn.send_datagram(Bytes::from_static(b"?")).is_err() {
            // We cannot ask (the peer takes no datagrams): presume it lives.
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return conn.stats().udp_rx.datagrams != before;
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
    }
}

/// A volume held by a session whose connection has already ended (its
/// sender closed it, or it failed) is about to be let go, once its writer has
/// stopped: wait for that (up to 5 s) rather than refusing a sender that
/// reruns at once.
async fn await_closed_holder(shared: &Arc<Shared>, name: &str) {
    for _ in 0..250 {
        let closing = shared
            .busy
            .lock()
            .expect("not poisoned")
            .get(name)
            .is_some_and(|h| h.conn.as_ref().is_some_and(|c| c.close_reason().is_some()));
        if !closing {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The checks every session passes first: the protocol version, the
/// volume exported, the sender authorized for it. Returns the export's path.
fn admissible(
    shared: &Shared,
    hello: &wire::Hello,
    conn: &quinn::Connection,
) -> std::result::Result<PathBuf, Refuse> {
    if hello.version != wire::PROTOCOL_VERSION {
        return Err(Refuse(
            RefuseCode::Version,
            format!(
                "protocol version {} is not supported by this receiver (it speaks {}); run the same nightpass release on both sides",
                hello.version,
                wire::PROTOCOL_VERSION
            ),
        ));
    }
    let Some(path) = shared.cfg.volumes.get(&hello.volume).cloned() else {
        return Err(Refuse(
            RefuseCode::UnknownVolume,
            format!("volume '{}' is not exported by this receiver", hello.volume),
        ));
    };
    authorized(
        shared,
        transport::peer_fingerprint(conn).as_deref(),
        &hello.volume,
    )?;
    Ok(path)
}

fn accept(
    shared: &Arc<Shared>,
    hello: &wire::Hello,
    exclusive: bool,
    conn: &quinn::Connection,
) -> std::result::Result<(Option<BusyGuard>, PathBuf), Refuse> {
    let path = admissible(shared, hello, conn)?;
    if !exclusive {
        sealed_refusal(shared, hello).map_or(Ok(()), Err)?;
        return Ok((None, path));
    }
    let holder = Holder {
        pass_id: hello.pass_id.clone(),
        conn: Some(conn.clone()),
    };
    let guard = take_volume(shared, &hello.volume, holder)?;
    // Checked holding the volume: a record session seals while holding it.
    sealed_refusal(shared, hello).map_or(Ok(()), Err)?;
    Ok((Some(guard), path))
}

/// Refuses a sync or a preflight of a sealed volume (see [`crate::seal`]).
/// The seal is read fresh: `nightpass unseal` works while `serve` runs.
fn sealed_refusal(shared: &Shared, hello: &wire::Hello) -> Option<Refuse> {
    if !matches!(Mode::try_from(hello.mode), Ok(Mode::Sync | Mode::Preflight)) {
        return None;
    }
    let message = match crate::seal::read(&volume_dir(shared, &hello.volume)) {
        Ok(None) => return None,
        Ok(Some(seal)) => crate::seal::sealed_message(&hello.volume, Ok(&seal)),
        Err(why) => crate::seal::sealed_message(&hello.volume, Err(&why)),
    };
    Some(Refuse(RefuseCode::Sealed, message))
}

fn take_volume(
    shared: &Arc<Shared>,
    name: &str,
    holder: Holder,
) -> std::result::Result<BusyGuard, Refuse> {
    let mut busy = shared.busy.lock().expect("not poisoned");
    if busy.contains_key(name) {
        return Err(Refuse(
            RefuseCode::InUse,
            format!("volume '{name}' is in use by another sender's session"),
        ));
    }
    busy.insert(name.to_string(), holder);
    drop(busy);
    Ok(BusyGuard {
        shared: shared.clone(),
        name: name.to_string(),
    })
}

fn volume_dir(shared: &Shared, name: &str) -> PathBuf {
    shared
        .cfg
        .state_dir
        .join("volumes")
        .join(state::key_for(name))
}

/// The checks of a sync session that can refuse, made before the target is
/// opened or created: the geometry, the state directory writable with room
/// for the manifest, and the size of a target file this session would create
/// (`--max-size`, by default the size of the filesystem that would hold it).
fn prepare_target(
    cfg: &ServeConfig,
    dir: &Path,
    path: &Path,
    size: u64,
    chunk: ChunkSize,
    explicit: bool,
) -> std::result::Result<(), Refuse> {
    let mpath = dir.join("manifest");
    let have = state::peek_geometry(&mpath);
    let chunk = match have {
        Some(g) if !explicit => g.chunk_size(),
        _ => chunk,
    };
    let geometry = Geometry::new(size, chunk).map_err(|e| {
        Refuse(
            RefuseCode::BadRequest,
            format!("a source of {size} bytes in chunks of {chunk}: {e}"),
        )
    })?;
    state::check_writable(dir)?;
    if have != Some(geometry) {
        let need = state::manifest_len(&geometry);
        let free = state::free_bytes(dir)?;
        if need.saturating_add(1 << 20) > free {
            return Err(Refuse(
                RefuseCode::BadRequest,
                format!(
                    "the receiver's state directory {} has {free} bytes free; the manifest of a {size}-byte source in chunks of {chunk} needs {need}: free space there, or use a larger chunk size",
                    dir.display()
                ),
            ));
        }
    }
    if std::fs::symlink_metadata(path).is_err() {
        let parent = path.parent().unwrap_or(Path::new("/"));
        let limit = match cfg.max_size {
            Some(m) => m,
            None => crate::device::filesystem_size(parent)?,
        };
        if size > limit {
            return Err(Refuse(
                RefuseCode::BadRequest,
                format!(
                    "the source ({size} bytes) is larger than the largest target file this receiver creates at {} ({limit} bytes{})",
                    path.display(),
                    if cfg.max_size.is_some() { ", --max-size" } else { ": its filesystem's size" }
                ),
            ));
        }
    }
    Ok(())
}

/// Chunks of a manifest's claims re-read and hashed at every sync session's
/// start; any mismatch and the whole manifest is distrusted.
const SAMPLE_CHUNKS: usize = 16;

/// Opens the manifest that describes `target`, or starts a new one.
///
/// A manifest belongs to one target: the record next to it names the
/// target's path and identity ([`state::TargetRecord`]), and a target that
/// is another file or device than the one recorded (removed and created
/// again, a device swapped) starts from nothing known. A manifest that does
/// describe this target is still checked against a random sample of the
/// chunks it claims, read fresh: bytes changed behind the receiver's back
/// distrust it whole.
#[allow(clippy::too_many_arguments)]
fn open_manifest(
    dir: &Path,
    name: &str,
    target: &Path,
    volume: &Volume,
    created: Created,
    source_size: u64,
    chunk: ChunkSize,
    explicit: bool,
) -> std::result::Result<ManifestFile, Refuse> {
    let mpath = dir.join("manifest");
    let record = state::TargetRecord {
        path: target.to_owned(),
        identity: volume.identity()?,
    };
    let bound = is_bound(name, dir, &record, created);
    let mut rebuild = false;
    let mut existing = if !bound {
        None
    } else {
        match ManifestFile::open(&mpath)? {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                eprintln!("volume '{name}': manifest cannot be trusted ({e}); rebuilding it from a fresh read of the target");
                rebuild = true;
                None
            }
            None => None,
        }
    };
    // Unsealed since the manifest was last written: the new site wrote to
    // the target meanwhile; only a read made now, holding the volume, counts.
    let marked = state::marked_for_rebuild(dir);
    if existing.is_some() && marked {
        eprintln!("volume '{name}': unsealed since its last pass; rebuilding its manifest from a fresh read of the target");
        rebuild = true;
    } else if let Some(m) = &existing {
        if let Some(why) = sample_mismatch(volume, m)? {
            eprintln!("volume '{name}': {why}: the target was changed behind this receiver's back; distrusting its whole manifest and starting from nothing known");
            existing = None;
        }
    }
    let chunk = match &existing {
        Some(m) => {
            let have = m.geometry().chunk_size();
            if explicit && have != chunk {
                return Err(Refuse(
                    RefuseCode::ChunkSize,
                    format!(
                        "volume '{name}' was first copied with chunk size {have}; a pass with chunk size {chunk} would re-chunk it. Drop --chunk-size to keep {have}, or remove the receiver's state of this volume to start over"
                    ),
                ));
            }
            if !rebuild {
                if m.geometry().size() == source_size {
                    return Ok(existing.expect("matched Some"));
                }
                eprintln!(
                    "volume '{name}': source size changed from {} to {source_size} bytes; starting from nothing known",
                    m.geometry().size()
                );
            }
            have
        }
        None => chunk,
    };
    drop(existing);
    let geometry = Geometry::new(source_size, chunk)
        .map_err(|e| Refuse(RefuseCode::BadRequest, e.to_string()))?;
    let fill = if created == Created::New {
        Fill::Zeros
    } else {
        Fill::Unknown
    };
    let mut m = ManifestFile::create(&mpath, geometry, rand::random(), fill)?;
    if rebuild && volume.size() >= source_size {
        // What the target holds, read fresh and made durable first, so the
        // rebuilt entries describe bytes that are on the disk.
        volume.sync_data()?;
        let table = rebuild_table(volume, geometry)?;
        m.replace_table(&table);
        let root = m.current_root();
        m.commit(2, root)?;
    }
    record.write(dir)?;
    if marked {
        state::clear_rebuild_mark(dir)?;
    }
    Ok(m)
}

/// True when the manifest in `dir` was made for the target `record`
/// describes; says why not in the receiver log when one existed.
fn is_bound(name: &str, dir: &Path, record: &state::TargetRecord, created: Created) -> bool {
    let Some(old) = state::TargetRecord::read(dir) else {
        if dir.join("manifest").exists() {
            eprintln!("volume '{name}': its manifest has no record of the target it describes; starting from nothing known");
        }
        return false;
    };
    if created == Created::New {
        eprintln!(
            "volume '{name}': target {} was missing and has been created; the old manifest described another file, starting from nothing known",
            record.path.display()
        );
        return false;
    }
    if old.path != record.path {
        eprintln!(
            "volume '{name}': the manifest describes {}, not {}; starting from nothing known",
            old.path.display(),
            record.path.display()
        );
        return false;
    }
    if old.identity != record.identity {
        eprintln!(
            "volume '{name}': target {} is not the file or device the manifest describes (was {:?}, now {:?}); it was replaced: starting from nothing known",
            record.path.display(),
            old.identity,
            record.identity
        );
        return false;
    }
    true
}

/// Re-reads up to [`SAMPLE_CHUNKS`] random chunks the manifest claims and
/// says which one differs, if any. Claims of data come first: a target
/// re-created sparse (all zeros) matches every claim of a zero chunk, so
/// those are sampled only when too few others are found.
fn sample_mismatch(volume: &Volume, m: &ManifestFile) -> Result<Option<String>> {
    let g = m.geometry();
    if g.chunk_count() == 0 || volume.size() < g.size() {
        return Ok(None);
    }
    for i in sample_indices(m) {
        let claimed = m.entry(i);
        let r = g.range(i).expect("index below count");
        let bytes = volume.read_vec_at((r.end - r.start) as usize, r.start)?;
        if blake3::hash(&bytes).as_bytes() != &claimed {
            return Ok(Some(format!(
                "chunk {i} (offset {}) does not hold what the manifest claims",
                r.start
            )));
        }
    }
    Ok(None)
}

/// Up to [`SAMPLE_CHUNKS`] random indices of known entries, preferring
/// entries that are not the hash of a zero chunk. A small table is searched
/// whole for them; a large one by random probes.
fn sample_indices(m: &ManifestFile) -> Vec<u64> {
    /// Tables of at most this many entries (2 MiB) are searched whole.
    const SEARCH_WHOLE: u64 = 1 << 16;
    let g = m.geometry();
    let count = g.chunk_count();
    let zero = *blake3::hash(&vec![0u8; g.chunk_size().usize()]).as_bytes();
    let (mut data, mut zeros) = (Vec::new(), Vec::new());
    let mut take = |i: u64| match m.entry(i) {
        e if e == UNKNOWN => {}
        e if e == zero => zeros.push(i),
        _ => data.push(i),
    };
    if count <= SEARCH_WHOLE {
        (0..count).for_each(&mut take);
    } else {
        (0..SAMPLE_CHUNKS as u64 * 256).for_each(|_| take(rand::random::<u64>() % count));
        for v in [&mut data, &mut zeros] {
            v.sort_unstable();
            v.dedup();
        }
    }
    let mut picked = pick(data, SAMPLE_CHUNKS);
    let more = SAMPLE_CHUNKS - picked.len();
    picked.extend(pick(zeros, more));
    picked
}

/// Up to `n` of `from`, at random.
fn pick(mut from: Vec<u64>, n: usize) -> Vec<u64> {
    for k in 0..n.min(from.len()) {
        let j = k + (rand::random::<u64>() % (from.len() - k) as u64) as usize;
        from.swap(k, j);
    }
    from.truncate(n);
    from
}

/// Hashes the target's first `geometry.size()` bytes fresh.
fn rebuild_table(volume: &Volume, geometry: Geometry) -> Result<Vec<u8>> {
    let v = Arc::new(Volume::open_export(volume.path())?);
    hash::hash_all(v, geometry, ScanOptions::default(), Arc::new(Quiet))
}

/// What to write of a verified chunk.
enum Content {
    /// The whole chunk.
    Whole(Bytes),
    /// The whole chunk is zeros.
    Zero,
    /// These blocks (named by the bitmap, in order in the payload) over the
    /// target's current copy; the writer checks the result against the
    /// chunk's hash before it writes them.
    Patch {
        /// Which blocks, one bit each.
        blocks: Vec<u8>,
        /// The blocks' bytes.
        payload: Bytes,
    },
}

impl Content {
    /// Bytes of data held.
    fn len(&self) -> usize {
        match self {
            Content::Whole(b) => b.len(),
            Content::Zero => 0,
            Content::Patch { payload, .. } => payload.len(),
        }
    }
}

/// One verified chunk on its way to the writer, or the end-of-pass request.
enum WriterMsg {
    Chunk {
        index: u64,
        hash: Hash,
        data: Content,
    },
    Finalize {
        expected: u64,
        reply: oneshot::Sender<Result<Summary>>,
    },
}

#[allow(clippy::too_many_arguments)]
async fn sync_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    hello: wire::Hello,
    guard: BusyGuard,
    path: PathBuf,
) -> Result<()> {
    if hello.source_size == 0 {
        return refuse_freeing(
            guard,
            &mut send,
            &conn,
            Refuse(
                RefuseCode::BadRequest,
                "the source is empty (0 bytes): nothing to copy".into(),
            ),
        )
        .await;
    }
    let chunk = match ChunkSize::new(u64::from(hello.chunk_size)) {
        Ok(c) => c,
        Err(e) => {
            return refuse_freeing(
                guard,
                &mut send,
                &conn,
                Refuse(RefuseCode::ChunkSize, e.to_string()),
            )
            .await
        }
    };
    let size = hello.source_size;
    let dir = volume_dir(&shared, &hello.volume);
    // Everything that can refuse is checked before the target is created,
    // so that a refusal writes nothing: the volume's journal too.
    let unsealed_cutover = match crate::seal::last_unsealed(&dir) {
        Ok(cp) => cp,
        Err(e) => return refuse_freeing(guard, &mut send, &conn, e.into()).await,
    };
    let checked = {
        let (cfg, dir, path) = (shared.cfg.clone(), dir.clone(), path.clone());
        let explicit = hello.chunk_size_explicit;
        tokio::task::spawn_blocking(move || {
            prepare_target(&cfg, &dir, &path, size, chunk, explicit)
        })
        .await
        .map_err(|_| Error::Io("check task failed".into()))?
    };
    if let Err(r) = checked {
        return refuse_freeing(guard, &mut send, &conn, r).await;
    }
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || Volume::open_target(&path, size))
            .await
            .map_err(|_| Error::Io("open task failed".into()))?
    };
    let (volume, created) = match opened {
        Ok(v) => v,
        Err(e) => return refuse_freeing(guard, &mut send, &conn, e.into()).await,
    };
    let opened = {
        let (name, path, explicit) = (
            hello.volume.clone(),
            path.clone(),
            hello.chunk_size_explicit,
        );
        tokio::task::spawn_blocking(move || {
            let m = open_manifest(&dir, &name, &path, &volume, created, size, chunk, explicit);
            if m.is_err() && created == Created::New {
                // Nothing of ours may stay behind a refusal: the file was
                // created by this session.
                drop(volume);
                let _ = std::fs::remove_file(&path);
                return (m, None);
            }
            (m, Some(volume))
        })
        .await
        .map_err(|_| Error::Io("manifest task failed".into()))?
    };
    let (volume, mut manifest) = match opened {
        (Ok(m), Some(v)) => (v, m),
        (Err(r), _) => return refuse_freeing(guard, &mut send, &conn, r).await,
        (Ok(_), None) => return Err(Error::Io("target closed early".into())),
    };
    let summary = manifest.summary_now()?;
    let geometry = manifest.geometry();
    transport::send_control(
        &mut send,
        Msg::Welcome(wire::Welcome {
            version: wire::PROTOCOL_VERSION,
            target_size: volume.size(),
            chunk_size: geometry.chunk_size().bytes() as u32,
            summary: Some(summary_to_wire(&summary)),
            target_is_block: volume.kind() == crate::device::Kind::Block,
            unsealed_cutover,
        }),
    )
    .await?;

    // Control replies and acks leave through one task that owns the send stream.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Msg>(64);
    let ctl_task = tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            transport::send_control(&mut send, m).await?;
        }
        let _ = send.finish();
        Ok::<_, Error>(send)
    });

    // The writer thread owns the target, the manifest and the volume's busy slot.
    let slots = in_flight_chunks(geometry.chunk_size());
    let (wtx, wrx) = sync_channel::<WriterMsg>(slots);
    let budget = Arc::new(tokio::sync::Semaphore::new(slots));
    let writer_ctl = ctl_tx.clone();
    let name = hello.volume.clone();
    let (table_tx, table_rx) = std::sync::mpsc::channel::<mpsc::Sender<Bytes>>();
    let writer = std::thread::spawn(move || {
        // Declared first so it is dropped last: the volume is free again only
        // once the target and the manifest (and its lock) are closed.
        let _guard = guard;
        let mut manifest = manifest;
        let volume = volume;
        if let Err(e) = writer_loop(&volume, &mut manifest, wrx, table_rx, &writer_ctl) {
            eprintln!("volume '{name}': writer stopped: {e}");
            let _ = writer_ctl.blocking_send(Msg::Failure(wire::Failure {
                message: format!("receiver failed writing volume '{name}': {e}"),
            }));
        }
    });
    shared.writers.lock().expect("not poisoned").push(writer);

    // Probes read the target's current copy of a chunk through a
    // descriptor of their own (the writer's is exclusive).
    let reader = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || Volume::open_export(&path))
            .await
            .map_err(|_| Error::Io("open task failed".into()))?
            .map(Arc::new)?
    };
    // Data streams. One that the sender reset ends without error, but the
    // frames it dropped leave the pass unfinishable: see Finish below.
    let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let data_abandoned = abandoned.clone();
    let data_conn = conn.clone();
    let data_ctl = ctl_tx.clone();
    let data_wtx = wtx.clone();
    let data_name = hello.volume.clone();
    let data_task = tokio::spawn(async move {
        let mut streams = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                s = data_conn.accept_uni() => match s {
                    Ok(s) => { streams.spawn(data_stream(s, geometry, data_wtx.clone(), budget.clone(), reader.clone(), data_ctl.clone(), data_abandoned.clone())); }
                    Err(_) => break,
                },
                Some(r) = streams.join_next(), if !streams.is_empty() => {
                    if let Ok(Err(e)) = r {
                        eprintln!("volume '{data_name}': session ended: {e}");
                        data_conn.close(2u32.into(), e.to_string().as_bytes());
                        return Err(e);
                    }
                }
            }
        }
        while let Some(r) = streams.join_next().await {
            if let Ok(Err(e)) = r {
                return Err(e);
            }
        }
        Ok(())
    });

    let result = async {
        loop {
            let next = next_control(&mut recv, &ctl_tx).await?;
            match next {
                None => return Ok(()),
                Some(Msg::Heartbeat(_)) => {}
                Some(Msg::ManifestRequest(_)) => {
                    // The table comes from the writer in pieces, a few at a
                    // time: a 1 TiB volume's table is 512 MiB.
                    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
                    table_tx
                        .send(tx)
                        .map_err(|_| Error::Io("writer stopped".into()))?;
                    let total = geometry.chunk_count() * manifest::ENTRY_LEN as u64;
                    let mut first = 0u64;
                    loop {
                        let piece = rx
                            .recv()
                            .await
                            .ok_or_else(|| Error::Io("writer stopped".into()))?;
                        let n = (piece.len() / manifest::ENTRY_LEN) as u64;
                        let last = (first + n) * manifest::ENTRY_LEN as u64 >= total;
                        // The writer waits on this hand-off: a sender that
                        // never reads the parts must not keep it (and the
                        // volume) forever.
                        let part = Msg::ManifestPart(wire::HashRun {
                            first,
                            hashes: piece,
                            last,
                        });
                        tokio::time::timeout(CONTROL_IDLE, ctl_tx.send(part))
                            .await
                            .map_err(|_| {
                                Error::Peer(format!(
                                    "the sender read none of the manifest it asked for in {} s; ending the session",
                                    CONTROL_IDLE.as_secs()
                                ))
                            })?
                            .map_err(|_| Error::Network("control stream closed".into()))?;
                        if last {
                            break;
                        }
                        first += n;
                    }
                }
                Some(Msg::Finish(_)) if abandoned.load(std::sync::atomic::Ordering::Relaxed) => {
                    return Err(Error::Peer(
                        "the sender reset a data stream and then finished the pass: chunks may be missing".into(),
                    ));
                }
                Some(Msg::Finish(f)) => {
                    let (tx, rx) = oneshot::channel();
                    let w = wtx.clone();
                    tokio::task::spawn_blocking(move || {
                        w.send(WriterMsg::Finalize {
                            expected: f.chunks_sent,
                            reply: tx,
                        })
                    })
                    .await
                    .map_err(|_| Error::Io("writer stopped".into()))?
                    .map_err(|_| Error::Io("writer stopped".into()))?;
                    let s = rx.await.map_err(|_| {
                        Error::Io("writer stopped before the end of the pass".into())
                    })??;
                    ctl_tx
                        .send(Msg::Done(wire::Done {
                            summary: Some(summary_to_wire(&s)),
                        }))
                        .await
                        .map_err(|_| Error::Network("control stream closed".into()))?;
                    // One pass per session: nothing may follow Done.
                    return Ok(());
                }
                Some(Msg::Failure(f)) => {
                    // The sender gave up the pass (a source read error, an
                    // interrupt): end the session now; what was written and
                    // acknowledged stays recorded.
                    return Err(Error::Peer(format!(
                        "the sender stopped the pass: {}",
                        f.message
                    )));
                }
                Some(other) => {
                    return Err(Error::Peer(format!(
                        "unexpected control message: {}",
                        msg_name(&other)
                    )))
                }
            }
        }
    }
    .await;
    drop(wtx);
    drop(ctl_tx);
    if let Err(e) = result {
        // The caller logs the error, then closes the connection with it (in
        // that order: whoever sees the close finds the reason in the log).
        data_task.abort();
        return Err(e);
    }
    // The pass is over (Done sent, or the sender ended its control stream).
    // Stop accepting data now rather than when the connection closes, so the
    // writer lets go of the volume even if the sender's stream end or
    // CONNECTION_CLOSE is lost on the way (it would otherwise hold the volume
    // until the idle timeout, and an immediate rerun would be refused).
    data_task.abort();
    let _ = ctl_task.await;
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
    Ok(())
}

/// The next control message of a sync session. A sender sends at least a
/// heartbeat every few seconds during its pass; one silent for
/// [`CONTROL_IDLE`] is gone, or holding the volume, and the session ends.
/// The clock stands still while our own replies (`ctl`) are queued: a
/// sender still receiving the manifest it asked for is not idle.
async fn next_control(
    recv: &mut quinn::RecvStream,
    ctl: &mpsc::Sender<Msg>,
) -> Result<Option<Msg>> {
    let message = transport::recv_control(recv);
    tokio::pin!(message);
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            m = &mut message => return m,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if ctl.is_closed() {
                    // Our replies could not be written (the sender stopped
                    // reading them): see transport::FRAME_DEADLINE.
                    return Err(Error::Network("the control stream to the sender failed".into()));
                }
                if ctl.capacity() < ctl.max_capacity() {
                    quiet_since = tokio::time::Instant::now();
                } else if quiet_since.elapsed() >= CONTROL_IDLE {
                    return Err(Error::Peer(format!(
                        "no control message from the sender for {} s (a sender sends a heartbeat every {} s); ending the session",
                        CONTROL_IDLE.as_secs(),
                        wire::HEARTBEAT_INTERVAL_S
                    )));
                }
            }
        }
    }
}

/// Name of a control message, for errors.
pub fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello(_) => "hello",
        Msg::Welcome(_) => "welcome",
        Msg::Refusal(_) => "refusal",
        Msg::ManifestRequest(_) => "manifest request",
        Msg::ManifestPart(_) => "manifest part",
        Msg::Ack(_) => "ack",
        Msg::Finish(_) => "finish",
        Msg::Done(_) => "done",
        Msg::VerifyPart(_) => "verify part",
        Msg::Forget(_) => "forget",
        Msg::Failure(_) => "failure",
        Msg::Mark(_) => "mark",
        Msg::Need(_) => "need",
        Msg::Heartbeat(_) => "heartbeat",
    }
}

/// Bytes of chunk data a session may hold in memory between the network and
/// the writer's queue (each bound separately).
const SESSION_BUFFER: u64 = 48 << 20;

/// Largest chunk checked on the async worker that read it (see `data_stream`).
const INLINE_CHECK_MAX: usize = 256 << 10;

/// Chunks a session may hold per stage: 48 MiB worth, at least 2, at most 256.
fn in_flight_chunks(chunk: ChunkSize) -> usize {
    (SESSION_BUFFER / chunk.bytes()).clamp(2, 256) as usize
}

/// Reads, checks and forwards the chunks of one data stream.
async fn data_stream(
    mut s: quinn::RecvStream,
    geometry: Geometry,
    wtx: SyncSender<WriterMsg>,
    budget: Arc<tokio::sync::Semaphore>,
    target: Arc<Volume>,
    ctl: mpsc::Sender<Msg>,
    abandoned: Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let max = geometry.chunk_size().usize() + 4096;
    loop {
        // A frame buffer exists only while holding a permit: the session's
        // memory stays bounded whatever the peer sends or fails to read.
        let permit = budget
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Io("session closing".into()))?;
        let body = match transport::read_data_frame(&mut s, max).await? {
            DataFrame::Frame(body) => body,
            DataFrame::Finished => break,
            DataFrame::Abandoned => {
                // The sender gave up (its control stream says why); what
                // it sent whole on this stream before is still written.
                abandoned.store(true, std::sync::atomic::Ordering::Relaxed);
                break;
            }
        };
        // Checking a chunk of up to 256 KiB is tens of microseconds of
        // hashing (or decompressing) and runs here; larger chunks, a target
        // read that would wait for the disk, or a full writer queue move to
        // a blocking thread. (A hand-off per chunk cost the receiver a third
        // of its CPU time in thread wake-ups.)
        let inline = if geometry.chunk_size().usize() <= INLINE_CHECK_MAX {
            check_chunk(body.clone(), &geometry, &target, false)?
        } else {
            None
        };
        let checked = match inline {
            Some(c) => c,
            None => {
                let target = target.clone();
                tokio::task::spawn_blocking(move || check_chunk(body, &geometry, &target, true))
                    .await
                    .map_err(|_| Error::Io("chunk check task failed".into()))??
                    .expect("a check that may wait for the disk always answers")
            }
        };
        match checked {
            Checked::Write(msg) => {
                match wtx.try_send(msg) {
                    Ok(()) => {}
                    Err(TrySendError::Full(msg)) => {
                        let wtx = wtx.clone();
                        tokio::task::spawn_blocking(move || wtx.send(msg))
                            .await
                            .map_err(|_| Error::Io("chunk queue task failed".into()))?
                            .map_err(|_| Error::Io("writer stopped".into()))?;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        return Err(Error::Io("writer stopped".into()))
                    }
                }
                drop(permit);
            }
            Checked::Need(n) => {
                drop(permit);
                ctl.send(Msg::Need(n))
                    .await
                    .map_err(|_| Error::Network("control stream closed".into()))?;
            }
        }
    }
    Ok(())
}

/// What a checked chunk frame asks of the receiver.
enum Checked {
    /// A verified chunk to write.
    Write(WriterMsg),
    /// Ask the sender for these blocks (a probe's answer).
    Need(wire::Need),
}

/// Decodes and verifies one chunk frame; a probe reads the target's current
/// copy of the chunk (a patch is checked by the writer). Nothing unverified
/// leaves this function. Unless `wait`, a probe's read comes only from the
/// page cache and `None` means it would have waited for the disk: nothing
/// was done, ask again with `wait`.
fn check_chunk(
    body: Bytes,
    geometry: &Geometry,
    target: &Volume,
    wait: bool,
) -> Result<Option<Checked>> {
    let c = wire::decode_chunk(body).map_err(|e| Error::Peer(format!("bad chunk frame: {e}")))?;
    let Some(len) = geometry.chunk_len(c.index) else {
        return Err(Error::Peer(format!(
            "chunk {} lies past the end of the volume ({} chunks); nothing written",
            c.index,
            geometry.chunk_count()
        )));
    };
    if c.len as usize != len {
        return Err(Error::Peer(format!(
            "chunk {} announces {} bytes, but it is {len} bytes long; nothing written",
            c.index, c.len
        )));
    }
    let hash: Hash = c.hash.as_slice().try_into().map_err(|_| {
        Error::Peer(format!(
            "chunk {} carries a hash of {} bytes",
            c.index,
            c.hash.len()
        ))
    })?;
    let data = match Encoding::try_from(c.encoding) {
        Ok(Encoding::Probe) => {
            let start = geometry.range(c.index).expect("index checked above").start;
            let old = if wait {
                Some(target.read_vec_at(len, start)?)
            } else {
                target.read_vec_cached(len, start)?
            };
            let Some(old) = old else {
                return Ok(None);
            };
            return patch::answer_probe(c.index, &c.payload, &old)
                .map(|n| Some(Checked::Need(n)))
                .map_err(|e| Error::Peer(e.to_string()));
        }
        Ok(Encoding::Patch) => {
            // Checked against the hash by the writer, in order with the
            // chunk's other writes: see `commit_batch`.
            patch::check_shape(c.index, len, &c.blocks, c.payload.len())
                .map_err(|e| Error::Peer(e.to_string()))?;
            return Ok(Some(Checked::Write(WriterMsg::Chunk {
                index: c.index,
                hash,
                data: Content::Patch {
                    blocks: c.blocks,
                    payload: c.payload,
                },
            })));
        }
        Ok(Encoding::Raw) => Some(c.payload),
        Ok(Encoding::Zstd) => {
            let out = zstd::bulk::decompress(&c.payload, len)
                .map_err(|e| Error::Peer(format!("chunk {} does not decompress: {e}", c.index)))?;
            Some(Bytes::from(out))
        }
        Ok(Encoding::Zero) => None,
        Err(_) => {
            return Err(Error::Peer(format!(
                "chunk {} has an unknown encoding",
                c.index
            )))
        }
    };
    let actual = match &data {
        Some(d) if d.len() != len => {
            return Err(Error::Peer(format!(
                "chunk {} payload is {} bytes, expected {len}; nothing written",
                c.index,
                d.len()
            )))
        }
        Some(d) => *blake3::hash(d).as_bytes(),
        None => manifest::zero_hash(len),
    };
    if actual != hash {
        return Err(Error::Peer(format!(
            "chunk {} failed its hash check (corrupted in transit or a faulty sender); nothing of it was written",
            c.index
        )));
    }
    Ok(Some(Checked::Write(WriterMsg::Chunk {
        index: c.index,
        hash,
        data: data.map_or(Content::Zero, Content::Whole),
    })))
}

fn writer_loop(
    volume: &Volume,
    manifest: &mut ManifestFile,
    rx: std::sync::mpsc::Receiver<WriterMsg>,
    table_rx: std::sync::mpsc::Receiver<mpsc::Sender<Bytes>>,
    ctl: &mpsc::Sender<Msg>,
) -> Result<()> {
    let geometry = manifest.geometry();
    let mut committed = 0u64;
    let mut finalize: Option<(u64, oneshot::Sender<Result<Summary>>)> = None;
    let mut batch: Vec<(u64, Hash, Content)> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut closed = false;
    loop {
        while let Ok(reply) = table_rx.try_recv() {
            manifest.for_each_piece(wire::HASHES_PER_PART, |piece| {
                reply.blocking_send(Bytes::copy_from_slice(piece)).is_ok()
            });
        }
        let timeout = if batch.is_empty() {
            Duration::from_millis(50)
        } else {
            LINGER
        };
        match rx.recv_timeout(timeout) {
            Ok(WriterMsg::Chunk { index, hash, data }) => {
                batch_bytes += data.len();
                batch.push((index, hash, data));
                while batch_bytes < BATCH_BYTES && batch.len() < BATCH_CHUNKS {
                    match rx.try_recv() {
                        Ok(WriterMsg::Chunk { index, hash, data }) => {
                            batch_bytes += data.len();
                            batch.push((index, hash, data));
                        }
                        Ok(WriterMsg::Finalize { expected, reply }) => {
                            finalize = Some((expected, reply))
                        }
                        Err(_) => break,
                    }
                }
                if batch_bytes < BATCH_BYTES && batch.len() < BATCH_CHUNKS && finalize.is_none() {
                    continue; // linger for more before paying for a durable commit
                }
            }
            Ok(WriterMsg::Finalize { expected, reply }) => finalize = Some((expected, reply)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => closed = true,
        }
        if !batch.is_empty() {
            batch_bytes = 0;
            let (indices, refused) =
                commit_batch(volume, manifest, &geometry, std::mem::take(&mut batch))?;
            // A refused patch arrived too (the sender counts it), though
            // nothing of it was written.
            committed += (indices.len() + refused.len()) as u64;
            for need in refused {
                if ctl.blocking_send(Msg::Need(need)).is_err() {
                    closed = true;
                }
            }
            let generation = manifest.header().generation;
            if !indices.is_empty()
                && ctl
                    .blocking_send(Msg::Ack(wire::Ack {
                        indices,
                        generation,
                    }))
                    .is_err()
            {
                closed = true;
            }
        }
        if let Some((expected, _)) = &finalize {
            if committed >= *expected {
                let (expected, reply) = finalize.take().expect("checked Some");
                let result = if committed == expected {
                    manifest.summary_now()
                } else {
                    Err(Error::Peer(format!(
                        "sender announced {expected} chunks but {committed} arrived"
                    )))
                };
                let _ = reply.send(result);
            }
        }
        if closed {
            manifest.summary_now()?;
            return Ok(());
        }
    }
}

/// Commits one batch durably (see the module docs). Returns the indices
/// written, and a request for the whole chunk for each patch refused.
///
/// A patch is checked here, in order with the batch's other writes, not when
/// its frame arrives: the blocks it keeps are read from the target after
/// every earlier write of the session, so what is written and recorded is
/// exactly what matched the chunk's hash, whatever a sender sent before it.
fn commit_batch(
    volume: &Volume,
    manifest: &mut ManifestFile,
    geometry: &Geometry,
    batch: Vec<(u64, Hash, Content)>,
) -> Result<(Vec<u64>, Vec<wire::Need>)> {
    let mut invalidated = false;
    for (index, _, _) in &batch {
        if manifest.entry(*index) != UNKNOWN {
            manifest.set(*index, &UNKNOWN);
            invalidated = true;
        }
    }
    if invalidated {
        manifest.flush_table()?;
    }
    let mut written = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    for (index, hash, data) in &batch {
        let range = geometry
            .range(*index)
            .expect("index checked against geometry");
        match data {
            Content::Whole(d) => volume.write_all_at(d, range.start)?,
            Content::Zero => volume.zero_range(range.start, range.end - range.start)?,
            Content::Patch { blocks, payload } => {
                let len = (range.end - range.start) as usize;
                let mut chunk = volume.read_vec_at(len, range.start)?;
                patch::apply(&mut chunk, blocks, payload);
                if blake3::hash(&chunk).as_bytes() != hash {
                    // The blocks kept from the target are not what the
                    // sender has (a hint that collided, a target changed
                    // behind the session): ask for the whole chunk.
                    refused.push(patch::whole_chunk(*index, len));
                    continue;
                }
                for run in patch::runs(blocks, len) {
                    volume.write_all_at(&chunk[run.clone()], range.start + run.start as u64)?;
                }
            }
        }
        written.push((*index, *hash));
    }
    volume.sync_data()?;
    for (index, hash) in &written {
        manifest.set(*index, hash);
    }
    manifest.flush_table()?;
    Ok((written.into_iter().map(|(i, _)| i).collect(), refused))
}

async fn verify_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    hello: wire::Hello,
    path: PathBuf,
) -> Result<()> {
    let asked = match ChunkSize::new(u64::from(hello.chunk_size)) {
        Ok(c) => c,
        Err(e) => {
            return refuse(
                &mut send,
                &conn,
                Refuse(RefuseCode::ChunkSize, e.to_string()),
            )
            .await
        }
    };
    if !hello.ranges.len().is_multiple_of(2) || hello.ranges.len() > 2 * wire::MAX_VERIFY_RANGES {
        let r = Refuse(
            RefuseCode::BadRequest,
            format!(
                "a verify names at most {} byte ranges (offset, length pairs); {} numbers were sent",
                wire::MAX_VERIFY_RANGES,
                hello.ranges.len()
            ),
        );
        return refuse(&mut send, &conn, r).await;
    }
    let chunk = verify_chunk(&shared, &hello.volume, asked);
    if std::fs::symlink_metadata(&path).is_err() {
        // A target file not created yet (a first cutover's proof starts
        // before its pass creates it): an empty target.
        return verify_missing(shared, send, recv, hello, path, chunk).await;
    }
    let volume = match Volume::open_export(&path) {
        Ok(v) => Arc::new(v),
        Err(e) => return refuse(&mut send, &conn, e.into()).await,
    };
    // Both sides hash the common extent, so their chunks line up; but the
    // peer does not pick where a short last chunk ends.
    let recorded = state::peek_geometry(&volume_dir(&shared, &hello.volume).join("manifest"))
        .map(|g| g.size());
    let extent = verify_extent(volume.size(), recorded, hello.source_size, chunk);
    let geometry = Geometry::new(extent, chunk).map_err(|e| Error::input(e.to_string()))?;
    transport::send_control(
        &mut send,
        Msg::Welcome(wire::Welcome {
            version: wire::PROTOCOL_VERSION,
            target_size: volume.size(),
            chunk_size: chunk.bytes() as u32,
            summary: None,
            target_is_block: volume.kind() == crate::device::Kind::Block,
            unsealed_cutover: String::new(),
        }),
    )
    .await?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Msg>(16);
    let ctl_task = tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            transport::send_control(&mut send, m).await?;
        }
        let _ = send.finish();
        Ok::<_, Error>(send)
    });
    if !hello.ranges.is_empty() {
        let (v, ranges, tx) = (volume.clone(), hello.ranges.clone(), ctl_tx.clone());
        tokio::task::spawn_blocking(move || hash_ranges(&v, &geometry, &ranges, &tx))
            .await
            .map_err(|_| Error::Io("hash task failed".into()))??;
        return finish_verify(shared, recv, ctl_tx, ctl_task, &hello, &path).await;
    }
    // Stream fresh hashes of the target in order, run by run.
    let mut scan = hash::scan(
        volume,
        geometry,
        0,
        ScanOptions::default(),
        |s| Some((s.index, s.hash)),
        Arc::new(Quiet),
    );
    let mut pending: std::collections::BTreeMap<u64, Vec<(u64, Hash)>> = Default::default();
    let mut next_seq = 0u64;
    let mut run: Vec<u8> = Vec::new();
    let mut run_first = 0u64;
    while let Some(block) = scan.rx.recv().await {
        let block = block?;
        pending.insert(block.seq, block.items);
        while let Some(items) = pending.remove(&next_seq) {
            next_seq += 1;
            for (i, h) in items {
                if run.is_empty() {
                    run_first = i;
                }
                run.extend_from_slice(&h);
                if run.len() >= wire::HASHES_PER_PART * manifest::ENTRY_LEN {
                    let hashes = Bytes::from(std::mem::take(&mut run));
                    ctl_tx
                        .send(Msg::VerifyPart(wire::HashRun {
                            first: run_first,
                            hashes,
                            last: false,
                        }))
                        .await
                        .map_err(|_| Error::Network("control stream closed".into()))?;
                }
            }
        }
    }
    tokio::task::spawn_blocking(move || scan.finish())
        .await
        .map_err(|_| Error::Io("reader failed".into()))??;
    ctl_tx
        .send(Msg::VerifyPart(wire::HashRun {
            first: run_first,
            hashes: Bytes::from(run),
            last: true,
        }))
        .await
        .map_err(|_| Error::Network("control stream closed".into()))?;
    finish_verify(shared, recv, ctl_tx, ctl_task, &hello, &path).await
}

/// A verify of an export whose file does not exist yet: zero bytes to hash.
async fn verify_missing(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    hello: wire::Hello,
    path: PathBuf,
    chunk: ChunkSize,
) -> Result<()> {
    for m in [
        Msg::Welcome(wire::Welcome {
            version: wire::PROTOCOL_VERSION,
            target_size: 0,
            chunk_size: chunk.bytes() as u32,
            ..Default::default()
        }),
        Msg::VerifyPart(wire::HashRun {
            last: true,
            ..Default::default()
        }),
    ] {
        transport::send_control(&mut send, m).await?;
    }
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Msg>(4);
    let ctl_task = tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            transport::send_control(&mut send, m).await?;
        }
        let _ = send.finish();
        Ok::<_, Error>(send)
    });
    finish_verify(shared, recv, ctl_tx, ctl_task, &hello, &path).await
}

/// The chunk size a verify of `volume` hashes in: the volume's own (its
/// manifest's) when it has one, else what the sender asked for but never
/// below the default (64 KiB). Fresh hashes of small blocks would let a
/// sender test guesses of their contents offline.
fn verify_chunk(shared: &Shared, volume: &str, asked: ChunkSize) -> ChunkSize {
    let own =
        state::peek_geometry(&volume_dir(shared, volume).join("manifest")).map(|g| g.chunk_size());
    let chunk = own.unwrap_or(if asked.bytes() < ChunkSize::DEFAULT.bytes() {
        ChunkSize::DEFAULT
    } else {
        asked
    });
    if chunk != asked {
        eprintln!("volume '{volume}': a verify asked for chunks of {asked}; hashing in the volume's chunks of {chunk}");
    }
    chunk
}

/// The extent a verify hashes: the common extent of the source (the size
/// the peer claims) and the target, but a short last chunk ends only where
/// this receiver itself knows an end: the target's own size, or the source
/// size the volume's manifest records. Anywhere else the extent is rounded
/// down to whole chunks, or a peer would choose the end of a chunk and learn
/// the target's bytes one at a time by guessing the hash offline.
fn verify_extent(
    target_size: u64,
    recorded: Option<u64>,
    source_size: u64,
    chunk: ChunkSize,
) -> u64 {
    if source_size >= target_size {
        return target_size;
    }
    if recorded == Some(source_size) {
        return source_size;
    }
    source_size - source_size % chunk.bytes()
}

/// Hashes the chunks overlapping byte ranges fresh, in index order, and
/// sends them as parts of at most [`wire::HASHES_PER_PART`] consecutive
/// chunks, the last flagged: memory stays bounded whatever the ranges cover.
fn hash_ranges(
    volume: &Volume,
    geometry: &Geometry,
    ranges: &[u64],
    tx: &mpsc::Sender<Msg>,
) -> Result<()> {
    let send = |run: wire::HashRun| {
        tx.blocking_send(Msg::VerifyPart(run))
            .map_err(|_| Error::Network("control stream closed".into()))
    };
    volume.drop_cache(0, volume.size());
    let mut pending: Option<wire::HashRun> = None;
    let mut buf = vec![0u8; geometry.chunk_size().usize()];
    let set = ChunkSet::from_flat_byte_ranges(geometry, ranges);
    for run in set.ranges_at_most(wire::HASHES_PER_PART as u64) {
        let mut hashes = Vec::with_capacity((run.end - run.start) as usize * manifest::ENTRY_LEN);
        for k in run.clone() {
            let r = geometry
                .range(k)
                .expect("a set's indices lie below the chunk count");
            let b = &mut buf[..(r.end - r.start) as usize];
            volume.read_exact_at(b, r.start)?;
            hashes.extend_from_slice(blake3::hash(b).as_bytes());
        }
        if let Some(p) = pending.take() {
            send(p)?;
        }
        pending = Some(wire::HashRun {
            first: run.start,
            hashes: Bytes::from(hashes),
            last: false,
        });
    }
    let mut end = pending.unwrap_or_default();
    end.last = true;
    send(end)
}

type CtlTask = tokio::task::JoinHandle<Result<quinn::SendStream>>;

/// The end of a verify session: the sender may ask us to forget ranges
/// that differ. A sender still hashing its source sends heartbeats; one
/// silent for [`CONTROL_IDLE`] once our hashes are out is gone, and the
/// session ends (see [`next_control`]).
async fn finish_verify(
    shared: Arc<Shared>,
    mut recv: quinn::RecvStream,
    ctl_tx: mpsc::Sender<Msg>,
    ctl_task: CtlTask,
    hello: &wire::Hello,
    path: &Path,
) -> Result<()> {
    loop {
        match next_control(&mut recv, &ctl_tx).await? {
            None => break,
            Some(Msg::Heartbeat(_)) => {}
            Some(Msg::Forget(f)) => {
                let dir = volume_dir(&shared, &hello.volume);
                // Wait for a sync session that is just ending to let go of the volume.
                let mut guard = None;
                for _ in 0..100 {
                    let holder = Holder {
                        pass_id: Vec::new(),
                        conn: None,
                    };
                    if let Ok(g) = take_volume(&shared, &hello.volume, holder) {
                        guard = Some(g);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let Some(_guard) = guard else {
                    return Err(Error::Io(format!(
                        "volume '{}' stayed in use; cannot forget ranges",
                        hello.volume
                    )));
                };
                let (d, p, r) = (dir.clone(), path.to_owned(), f.ranges.clone());
                let n = tokio::task::spawn_blocking(move || forget_ranges(&d, &p, &r))
                    .await
                    .map_err(|_| Error::Io("forget task failed".into()))??;
                if n > 0 {
                    eprintln!("volume '{}': verify found differences; {n} manifest entries marked unknown", hello.volume);
                }
                ctl_tx
                    .send(Msg::Done(wire::Done { summary: None }))
                    .await
                    .map_err(|_| Error::Network("control stream closed".into()))?;
            }
            Some(other) => {
                return Err(Error::Peer(format!(
                    "unexpected control message: {}",
                    msg_name(&other)
                )))
            }
        }
    }
    drop(ctl_tx);
    let _ = ctl_task.await;
    Ok(())
}

/// Answers a cutover's question before it freezes its source: would a sync
/// session of this volume be accepted now? `accept` has checked the
/// version, the export (and what else every session must pass); this adds
/// what a sync would find when it opens the volume: not held by another
/// session, a chunk size the volume's manifest agrees with, a target not
/// smaller than the source, and what [`prepare_target`] checks (room for
/// the manifest, `--max-size`). Takes nothing and writes no data (the
/// volume's state directory may be created).
async fn preflight_session(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    hello: &wire::Hello,
    path: &Path,
) -> Result<()> {
    let answer = {
        let (shared, hello, path) = (shared.clone(), hello.clone(), path.to_owned());
        tokio::task::spawn_blocking(move || preflight_answer(&shared, &hello, &path))
            .await
            .map_err(|_| Error::Io("preflight task failed".into()))?
    };
    match answer {
        Ok(welcome) => {
            transport::send_control(&mut send, Msg::Welcome(welcome)).await?;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            Ok(())
        }
        Err(r) => refuse(&mut send, conn, r).await,
    }
}

/// True when a block device cannot be opened exclusively (`O_EXCL`): it is
/// mounted, or held by device-mapper, md or another nightpass.
fn exclusively_held(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let r = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path);
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

/// The checks of [`preflight_session`], on a blocking thread.
fn preflight_answer(
    shared: &Shared,
    hello: &wire::Hello,
    path: &Path,
) -> std::result::Result<wire::Welcome, Refuse> {
    let name = &hello.volume;
    if shared.busy.lock().expect("not poisoned").contains_key(name) {
        return Err(Refuse(
            RefuseCode::InUse,
            format!("volume '{name}' is in use by another sender's session"),
        ));
    }
    let chunk = ChunkSize::new(u64::from(hello.chunk_size))
        .map_err(|e| Refuse(RefuseCode::ChunkSize, e.to_string()))?;
    if hello.source_size == 0 {
        return Err(Refuse(
            RefuseCode::BadRequest,
            "the source is empty (0 bytes): nothing to copy".into(),
        ));
    }
    let (target_size, is_block) = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, false),
        Err(e) => return Err(Error::io(format!("target {}", path.display()), e).into()),
        Ok(_) => {
            let v = Volume::open_for_verify(path)?;
            let is_block = v.kind() == crate::device::Kind::Block;
            if is_block && exclusively_held(path) {
                return Err(Refuse(
                    RefuseCode::InUse,
                    format!(
                        "target {} of volume '{name}' is in use (mounted, or held open exclusively by another program)",
                        path.display()
                    ),
                ));
            }
            (v.size(), is_block)
        }
    };
    if target_size != 0 && target_size < hello.source_size {
        return Err(Refuse(
            RefuseCode::TooSmall,
            format!(
                "target of volume '{name}' ({target_size} bytes) is smaller than the source ({} bytes)",
                hello.source_size
            ),
        ));
    }
    let dir = volume_dir(shared, name);
    // What a sync checks before it opens or creates the target: geometry,
    // the state directory and room for a manifest, --max-size.
    prepare_target(
        &shared.cfg,
        &dir,
        path,
        hello.source_size,
        chunk,
        hello.chunk_size_explicit,
    )?;
    // Read without the manifest's lock: a sync of the volume opening it at
    // this moment must not be refused "in use".
    let have = state::peek_geometry(&dir.join("manifest")).map(|g| g.chunk_size());
    if let Some(have) = have.filter(|h| hello.chunk_size_explicit && *h != chunk) {
        return Err(Refuse(
            RefuseCode::ChunkSize,
            format!(
                "volume '{name}' was first copied with chunk size {have}; a pass with chunk size {chunk} would re-chunk it. Drop --chunk-size to keep {have}"
            ),
        ));
    }
    Ok(wire::Welcome {
        version: wire::PROTOCOL_VERSION,
        target_size,
        chunk_size: have.unwrap_or(chunk).bytes() as u32,
        summary: None,
        target_is_block: is_block,
        unsealed_cutover: crate::seal::last_unsealed(&volume_dir(shared, name))?,
    })
}

/// Records a cutover's consistency point in the volume's journal and seals
/// the volume, when the point is the root of what this receiver holds (see
/// [`crate::seal::record_cutover`]); otherwise answers `Failure` and writes
/// nothing.
async fn record_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    hello: wire::Hello,
) -> Result<()> {
    transport::send_control(
        &mut send,
        Msg::Welcome(wire::Welcome {
            version: wire::PROTOCOL_VERSION,
            ..Default::default()
        }),
    )
    .await?;
    // A mark is one small message, sent right after the Welcome.
    let mark = tokio::time::timeout(HELLO_DEADLINE, transport::recv_control(&mut recv))
        .await
        .map_err(|_| {
            Error::Peer(format!(
                "no mark within {} s of the record session's welcome; ending the session",
                HELLO_DEADLINE.as_secs()
            ))
        })?;
    let mark = match mark? {
        Some(Msg::Mark(m)) => m,
        _ => return Err(Error::Peer("record session without a mark".into())),
    };
    let name = hello.volume.clone();
    let recorded = match crate::seal::check_mark(&mark) {
        Err(why) => Err(Error::input(why)),
        Ok(()) => match take_volume_waiting(&shared, &name).await {
            None => Err(Error::Io(format!(
                "volume '{name}' stayed in use by another session"
            ))),
            Some(guard) => {
                let dir = volume_dir(&shared, &name);
                let n = name.clone();
                let sealed = tokio::task::spawn_blocking(move || {
                    crate::seal::record_cutover(&dir, &n, &mark)
                })
                .await
                .map_err(|_| Error::Io("record task failed".into()))
                .and_then(|r| r);
                drop(guard);
                sealed
            }
        },
    };
    let reply = match recorded {
        Ok(seal) => {
            eprintln!(
                "volume '{name}': cutover complete, consistency point {}; the volume is sealed until `nightpass unseal {name}`",
                seal.consistency_point
            );
            Msg::Done(wire::Done { summary: None })
        }
        Err(e) => {
            let message = format!(
                "receiver refused to record the cutover of volume '{name}': {e}; nothing recorded, the volume is not sealed"
            );
            eprintln!("{message}");
            Msg::Failure(wire::Failure { message })
        }
    };
    transport::send_control(&mut send, reply).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

/// Takes the volume for a short piece of work, waiting up to 10 s for a
/// session that is just ending to let go of it.
async fn take_volume_waiting(shared: &Arc<Shared>, name: &str) -> Option<BusyGuard> {
    for _ in 0..100 {
        let holder = Holder {
            pass_id: Vec::new(),
            conn: None,
        };
        if let Ok(g) = take_volume(shared, name, holder) {
            return Some(g);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Marks every manifest entry overlapping the byte ranges unknown; returns how many changed.
///
/// Only a manifest that describes this very target (its record's path
/// and identity) is touched, and a sealed volume's not at all (it holds
/// the cutover's consistency point; unsealing rebuilds it from the target).
pub fn forget_ranges(dir: &Path, target: &Path, ranges: &[u64]) -> Result<u64> {
    if !matches!(crate::seal::read(dir), Ok(None)) {
        return Ok(0);
    }
    let Some(record) = state::TargetRecord::read(dir) else {
        return Ok(0);
    };
    let identity = Volume::open_export(target)?.identity()?;
    if record.path != target || record.identity != identity {
        return Ok(0);
    }
    let mut m = match ManifestFile::open(&dir.join("manifest"))? {
        Some(Ok(m)) => m,
        _ => return Ok(0),
    };
    let n = forget_in(&mut m, ranges);
    if n > 0 {
        let root = m.current_root();
        let g = m.header().generation + 1;
        m.commit(g, root)?;
    }
    Ok(n)
}

/// Marks entries of `m` overlapping `(offset, length)` pairs unknown, in memory.
pub fn forget_in(m: &mut ManifestFile, ranges: &[u64]) -> u64 {
    let set = ChunkSet::from_flat_byte_ranges(&m.geometry(), ranges);
    let mut n = 0;
    for i in set.indices() {
        if m.entry(i) != UNKNOWN {
            m.set(i, &UNKNOWN);
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_extent_ends_a_short_chunk_only_where_the_receiver_knows_an_end() {
        let c = ChunkSize::new(65536).unwrap();
        let p = 200_000;
        assert_eq!(verify_extent(1 << 20, None, p + 1, c), 196_608);
        assert_eq!(verify_extent(1 << 20, None, p + 2, c), 196_608);
        assert_eq!(verify_extent(1 << 20, Some(p + 1), p + 1, c), p + 1);
        assert_eq!(verify_extent(p + 1, None, 1 << 20, c), p + 1);
        assert_eq!(verify_extent(p + 1, None, p + 1, c), p + 1);
    }
}
