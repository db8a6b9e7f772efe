//! Sessions with a receiver: connect, say hello, read the answer (a
//! refusal keeps its code), the cutover's preflight, and fetching the
//! receiver's manifest.

use super::*;

pub(super) fn parse_summary(w: Option<wire::WireSummary>) -> Result<Summary> {
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
/// must have), piece by piece, and returns the root of what arrived.
pub(super) async fn fetch_table(s: &mut Session, into: &mut ManifestFile) -> Result<Hash> {
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
