//! Admission: handshakes under their caps, session slots counted after
//! authentication, and who may take a volume now (version, export,
//! authorization, seal, a holder that no longer answers). Writes nothing.

use super::*;

/// Handshakes in progress at most; more connections are refused before any
/// cryptography. Counted apart from sessions, so peers that never finish a
/// handshake cannot keep authenticated senders out.
pub(super) const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one address (an IPv6 /64) at most: one host
/// cannot take every handshake slot.
pub(super) const MAX_HANDSHAKES_PER_ADDRESS: usize = 64;
/// With more handshakes than this in progress, a client must first prove it
/// owns its address (a QUIC Retry, one round trip) before a handshake begins.
pub(super) const RETRY_ABOVE: usize = MAX_HANDSHAKES / 8;
/// A TLS handshake must complete within this; the connection is dropped then.
pub(super) const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Close code of a connection refused after authentication (a limit).
pub(super) const CLOSE_BUSY: u32 = 5;
/// Close code of a session whose peer stopped answering and whose volume
/// another session took over (and of one superseded by its own resumption).
pub(super) const CLOSE_SUPERSEDED: u32 = 3;

/// What the serve loop counts: handshakes in progress, and sessions (in
/// all and per sender fingerprint), which are counted only once a peer has
/// authenticated.
pub(super) struct Limits {
    handshakes: Arc<tokio::sync::Semaphore>,
    handshakes_per_address: Mutex<HashMap<std::net::IpAddr, usize>>,
    sessions: Arc<tokio::sync::Semaphore>,
    per_sender: Mutex<HashMap<String, usize>>,
}

/// A session's place under `--max-sessions` and `--max-sessions-per-sender`;
/// given back on drop.
pub(super) struct SessionSlot {
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
pub(super) struct AddressSlot {
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
pub(super) fn handshake_source(remote: SocketAddr) -> std::net::IpAddr {
    match remote.ip().to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

impl Limits {
    /// No handshake or session in progress; at most `max_sessions`
    /// sessions at once (at least 1).
    pub(super) fn new(max_sessions: usize) -> Limits {
        Limits {
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            handshakes_per_address: Mutex::new(HashMap::new()),
            sessions: Arc::new(tokio::sync::Semaphore::new(max_sessions.max(1))),
            per_sender: Mutex::new(HashMap::new()),
        }
    }

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
pub(super) fn admit(shared: &Arc<Shared>, limits: &Arc<Limits>, incoming: quinn::Incoming) {
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
        let (ended, refused) = REFUSED
            .scope(std::cell::Cell::new(false), async {
                let ended = session(shared, conn.clone()).await;
                (ended, REFUSED.with(|r| r.get()))
            })
            .await;
        match ended {
            Ok(()) => crate::metrics::session_ended(if refused { "refused" } else { "ok" }),
            Err(e) => {
                crate::metrics::session_ended("error");
                tracing::warn!("session from {remote} ended with an error: {e}");
                conn.close(1u32.into(), e.to_string().as_bytes());
            }
        }
    });
}

/// A sender resuming a pass after a lost link: end that pass's old session
/// (its connection is presumed dead) and wait for its writer to let go.
pub(super) async fn supersede(shared: &Arc<Shared>, hello: &wire::Hello) {
    let old = {
        let busy = shared.busy.lock().expect("not poisoned");
        busy.get(&hello.volume)
            .filter(|h| !hello.pass_id.is_empty() && h.pass_id == hello.pass_id)
            .and_then(|h| h.conn.clone())
    };
    let Some(old) = old else { return };
    tracing::info!(
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
pub(super) async fn await_release(shared: &Arc<Shared>, name: &str) {
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
pub(super) async fn release_if_unanswered(shared: &Arc<Shared>, name: &str) {
    let old = {
        let busy = shared.busy.lock().expect("not poisoned");
        busy.get(name).and_then(|h| h.conn.clone())
    };
    let Some(old) = old else { return };
    if old.close_reason().is_some() || answers(&old).await {
        return;
    }
    tracing::info!(
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
pub(super) async fn answers(conn: &quinn::Connection) -> bool {
    for _ in 0..3 {
        if !answers_within_window(conn).await {
            return false;
        }
    }
    true
}

/// Whether any datagram arrives from the peer of `conn`, pinged every
/// 50 ms meanwhile, over a whole window of 4 x RTT + 200 ms (at most 3 s).
pub(super) async fn answers_within_window(conn: &quinn::Connection) -> bool {
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
pub(super) async fn await_closed_holder(shared: &Arc<Shared>, name: &str) {
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
pub(super) fn admissible(
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

pub(super) fn accept(
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

/// Refuses a sync or a preflight of a sealed volume (see [`crate::store::seal`]).
/// The seal is read fresh: `nightpass unseal` works while `serve` runs.
pub(super) fn sealed_refusal(shared: &Shared, hello: &wire::Hello) -> Option<Refuse> {
    if !matches!(Mode::try_from(hello.mode), Ok(Mode::Sync | Mode::Preflight)) {
        return None;
    }
    let message = match shared.store.seal(&hello.volume) {
        Ok(None) => return None,
        Ok(Some(seal)) => crate::store::seal::sealed_message(&hello.volume, Ok(&seal)),
        Err(why) => crate::store::seal::sealed_message(&hello.volume, Err(&why.to_string())),
    };
    Some(Refuse(RefuseCode::Sealed, message))
}
