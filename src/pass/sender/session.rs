//! Sessions with a receiver: connect, say hello, read the answer (a
//! refusal keeps its code), the cutover's preflight, and fetching the
//! receiver's manifest.

use super::*;

pub(super) fn parse_summary(w: Option<wire::WireSummary>) -> Result<Summary> {
    Ok(tx::parse_summary(w)?)
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
        let Some(answer) = transport::recv_control(&mut recv).await? else {
            return Err(Error::Network(format!(
                "receiver at {} closed the session without an answer",
                dest.host_port
            )));
        };
        match tx::handle_answer(answer) {
            Ok(w) => Ok((send, recv, w)),
            // The code decides the exit status: the receiver failing to
            // read or write its own disk is a runtime failure (exit 3),
            // every other refusal bad input (2).
            Err(SessionError::Refused { code, message }) => {
                let verb = if code == wire::RefuseCode::Io {
                    "failed"
                } else {
                    "refused"
                };
                Err(Error::Refused {
                    code,
                    message: format!("receiver at {} {verb}: {message}", dest.host_port),
                })
            }
            Err(e) => Err(e.into()),
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
    let journal = journal(cfg);
    let records = journal.read()?;
    check_source(cfg, &journal, &records)?;
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
/// must have), piece by piece, checked in order and against the root the
/// receiver announced (`theirs`) by [`TableFetch`].
pub(super) async fn fetch_table(
    s: &mut Session,
    into: &mut ManifestFile,
    theirs: &Summary,
) -> Result<()> {
    transport::send_control(&mut s.send, TableFetch::request()).await?;
    let mut fetch = TableFetch::new(&into.geometry(), theirs);
    loop {
        let Some(msg) = transport::recv_control(&mut s.recv).await? else {
            return Err(Error::Network(
                "receiver closed the session during the manifest exchange".into(),
            ));
        };
        let hashes = match &msg {
            Msg::ManifestPart(run) => run.hashes.clone(),
            _ => Bytes::new(),
        };
        match fetch.handle(msg)? {
            Fetched::Part { first } => into.set_run(first, &hashes),
            Fetched::Complete { first } => {
                into.set_run(first, &hashes);
                return Ok(());
            }
        }
    }
}
