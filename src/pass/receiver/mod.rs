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
//!
//! ## Parts
//! This module holds the serve loop, the session dispatch and the volumes'
//! busy slots; the parts, each touching only what its top comment says:
//! `exports` (what `serve` checks at start, who may use which volume),
//! `admission` (handshakes, slots, taking a volume), `target` (opening a
//! volume and trusting its manifest), `sync` (a sync session and the check
//! of every chunk), `writer` (the only code that writes a target),
//! `verify` (fresh reads, forgetting entries), `record` (the cutover's
//! preflight and the record that seals) and `dryrun` (what a sync would
//! start from, answered without writing anything).

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
use nightpass_proto::session::receiver::{
    self as rx, summary_to_wire, Content, ControlAction, TableParts,
};
use nightpass_proto::session::{ReceiverSession, SessionError, WriterLedger};
use nightpass_proto::wire::{self, control::Msg, Mode, RefuseCode};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::io::device::{Created, Volume};
use crate::io::hash::{self, ScanOptions};
use crate::net::transport::{self, DataFrame, Identity, Tuning};
use crate::progress::Quiet;
use crate::store::state::{self, Fill, ManifestFile};
use crate::store::{FileStore, Store};

mod admission;
mod dryrun;
mod exports;
mod log;
mod record;
mod sync;
mod target;
mod verify;
mod writer;

use admission::*;
use dryrun::*;
pub use exports::check_exports;
use exports::*;
use log::SessionLog;
use record::*;
use sync::*;
use target::*;
use verify::*;
pub use verify::{forget_in, forget_ranges};
use writer::*;

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
    /// New lists of allowed senders (`serve` re-reads its `--allow-file`
    /// on SIGHUP): each replaces `allowed` and `limits` for the handshakes
    /// and sessions that follow; sessions in progress run to their end.
    pub access_updates: Option<tokio::sync::watch::Receiver<Access>>,
}

/// Who may come in, and on which volumes: [`ServeConfig::allowed`] and
/// [`ServeConfig::limits`] as one value, as an update brings them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Fingerprints of the senders allowed in.
    pub allowed: HashSet<String>,
    /// Senders limited to some volumes; one of `allowed` missing here may
    /// use every volume.
    pub limits: HashMap<String, HashSet<String>>,
}

/// From the end of the handshake to a complete Hello, at most.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// A sync session with no control message for this long (three heartbeat
/// intervals) has ended; so has one whose sender leaves what it asked for
/// unread this long.
const CONTROL_IDLE: Duration = Duration::from_secs(3 * wire::HEARTBEAT_INTERVAL_S);
/// Who holds a volume: the pass and its connection.
struct Holder {
    pass_id: Vec<u8>,
    conn: Option<quinn::Connection>,
}

struct Shared {
    cfg: ServeConfig,
    /// The records of `cfg.state_dir` that go through the store (journals,
    /// seals; see [`crate::store`]).
    store: FileStore,
    busy: Mutex<HashMap<String, Holder>>,
    writers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The senders allowed now: `cfg.allowed` and `cfg.limits` at start,
    /// then the latest update.
    access: std::sync::RwLock<Access>,
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

impl From<SessionError> for Refuse {
    fn from(e: SessionError) -> Self {
        Error::from(e).into()
    }
}

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
    let mut updates = cfg.access_updates.take();
    let shared = Arc::new(Shared {
        store: FileStore::new(&cfg.state_dir),
        access: std::sync::RwLock::new(Access {
            allowed: cfg.allowed.clone(),
            limits: cfg.limits.clone(),
        }),
        cfg,
        busy: Mutex::new(HashMap::new()),
        writers: Mutex::new(Vec::new()),
    });
    let limits = Arc::new(Limits::new(shared.cfg.max_sessions));
    tokio::pin!(shutdown);
    let mut flush = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            incoming = ep.accept() => {
                let Some(incoming) = incoming else { break };
                admit(&shared, &limits, incoming);
            }
            _ = flush.tick() => transport::flush_refusals(),
            Some(access) = next_access(&mut updates) => {
                apply_access(&shared, &ep, &identity, access);
            }
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

/// The next update of the allowed senders; never, without updates (or
/// once their sender is gone).
async fn next_access(updates: &mut Option<tokio::sync::watch::Receiver<Access>>) -> Option<Access> {
    let Some(rx) = updates.as_mut() else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        *updates = None;
        return std::future::pending().await;
    }
    let access = rx.borrow_and_update().clone();
    Some(access)
}

/// Lets in the senders of `access` from now on: the endpoint's TLS
/// settings for the handshakes that follow, and the volumes each may use
/// for the sessions that follow.
fn apply_access(shared: &Shared, ep: &quinn::Endpoint, identity: &Identity, access: Access) {
    if access.allowed.is_empty() {
        tracing::error!("an update allows no sender; keeping the senders allowed before");
        return;
    }
    let unknown = access
        .limits
        .iter()
        .flat_map(|(fp, names)| names.iter().map(move |n| (fp, n)))
        .find(|(_, n)| !shared.cfg.volumes.contains_key(n.as_str()));
    if let Some((fp, name)) = unknown {
        tracing::error!(
            "an update allows {fp} on volume '{name}', which is not exported; keeping the senders allowed before"
        );
        return;
    }
    match transport::server_config(identity, access.allowed.clone(), &shared.cfg.tuning) {
        Ok(cfg) => ep.set_server_config(Some(cfg)),
        Err(e) => {
            tracing::error!("cannot apply the allowed senders: {e}; keeping those allowed before");
            return;
        }
    }
    *shared.access.write().expect("not poisoned") = access;
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

tokio::task_local! {
    /// Set by [`refuse`] in the task of a session it refused: that session
    /// ends `refused` in `nightpass_sessions_total`, not `ok`.
    static REFUSED: std::cell::Cell<bool>;
}

async fn refuse(send: &mut quinn::SendStream, conn: &quinn::Connection, r: Refuse) -> Result<()> {
    crate::metrics::refused(&format!("{:?}", r.0));
    let _ = REFUSED.try_with(|c| c.set(true));
    match SessionLog::current() {
        // Said in the session's end line.
        Some(log) => log.refused(&r.1),
        None => tracing::info!("refused a session: {}", r.1),
    }
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
    let (send, recv, first) = tokio::time::timeout(HELLO_DEADLINE, opening)
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
    let log = SessionLog::begin(&hello, &conn);
    let result = log
        .scope(dispatch(shared, conn.clone(), send, recv, hello))
        .await;
    log.end(&result);
    if let Err(e) = result {
        // Logged first: whoever sees the close finds the reason in the log.
        conn.close(1u32.into(), e.to_string().as_bytes());
    }
    Ok(())
}

/// A session after its Hello: admission, then the work of its mode.
async fn dispatch(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    hello: wire::Hello,
) -> Result<()> {
    // Before anything touches another session (supersede, the liveness
    // check): a peer limited to other volumes must not reach this one's holder.
    if let Err(r) = admissible(&shared, &hello, &conn) {
        return refuse(&mut send, &conn, r).await;
    }
    let sync = hello.mode == Mode::Sync as i32;
    // A dry run holds the volume too (in memory only) while it reads the
    // table it answers with.
    let exclusive = sync || hello.mode == Mode::DryRun as i32;
    if sync && hello.resumes {
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
        Ok(Mode::DryRun) => match guard {
            Some(guard) => dry_run_session(shared, conn, send, recv, hello, guard, path).await,
            None => Err(Error::Io("dry run session without the volume".into())),
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
    shared.store.receiver_dir(name)
}

pub use nightpass_proto::wire::msg_name;

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
