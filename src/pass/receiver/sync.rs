//! A sync session: the handshake answer, the control loop, the data streams
//! and the check of every chunk before it goes to the writer. Writes
//! nothing itself: the writer (`writer`) does.

use super::*;

/// A sync session, from the Hello to the end of the pass: every check
/// that can refuse before the target is created or opened, the Welcome,
/// then the writer, the data streams and the control stream.
pub(super) async fn sync_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    hello: wire::Hello,
    guard: BusyGuard,
    path: PathBuf,
) -> Result<()> {
    let opened = match rx::check_offer(&hello) {
        Ok(offer) => open_for_sync(&shared, &hello.volume, &path, offer).await?,
        Err(e) => Err(e.into()),
    };
    let (volume, mut manifest, unsealed_cutover) = match opened {
        Ok(o) => o,
        Err(r) => return refuse_freeing(guard, &mut send, &conn, r).await,
    };
    let geometry = manifest.geometry();
    let welcome = welcome(&volume, &mut manifest, unsealed_cutover)?;
    transport::send_control(&mut send, Msg::Welcome(welcome)).await?;

    let (ctl_tx, ctl_task) = spawn_control_sender(send);
    let slots = in_flight_chunks(geometry.chunk_size());
    let writer = spawn_writer(
        &shared,
        guard,
        volume,
        manifest,
        &ctl_tx,
        &hello.volume,
        slots,
    );
    let (wtx, table_tx) = writer;
    // Probes read the target's current copy of a chunk through a
    // descriptor of their own (the writer's is exclusive).
    let reader = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || Volume::open_export(&path))
            .await
            .map_err(|_| Error::Io("open task failed".into()))?
            .map(Arc::new)?
    };
    let each = Arc::new(StreamContext {
        geometry,
        wtx: wtx.clone(),
        budget: Arc::new(tokio::sync::Semaphore::new(slots)),
        target: reader,
        ctl: ctl_tx.clone(),
        abandoned: Arc::default(),
        log: SessionLog::current(),
    });
    let abandoned = each.abandoned.clone();
    let data = DataStreams {
        conn: conn.clone(),
        name: hello.volume.clone(),
        each,
    };
    let data_task = tokio::spawn(data.run());

    let result = control_loop(&mut recv, &ctl_tx, &wtx, &table_tx, geometry, &abandoned).await;
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

/// The Welcome of a sync session: the target's size and kind, the chunk
/// size in force, the manifest's summary, and a cutover unsealed since.
fn welcome(
    volume: &Volume,
    manifest: &mut ManifestFile,
    unsealed_cutover: String,
) -> Result<wire::Welcome> {
    Ok(wire::Welcome {
        version: wire::PROTOCOL_VERSION,
        target_size: volume.size(),
        chunk_size: manifest.geometry().chunk_size().bytes() as u32,
        summary: Some(summary_to_wire(&manifest.summary_now()?)),
        target_is_block: volume.kind() == crate::io::device::Kind::Block,
        unsealed_cutover,
    })
}

/// Control replies and acks leave through one task that owns the send
/// stream; it ends (and finishes the stream) once every sender is dropped.
fn spawn_control_sender(
    mut send: quinn::SendStream,
) -> (
    mpsc::Sender<Msg>,
    tokio::task::JoinHandle<Result<quinn::SendStream>>,
) {
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Msg>(64);
    let task = tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            transport::send_control(&mut send, m).await?;
        }
        let _ = send.finish();
        Ok::<_, Error>(send)
    });
    (ctl_tx, task)
}

/// A volume opened for a sync session, with its manifest and the
/// consistency point of a cutover unsealed since (or why not).
type Opened = std::result::Result<(Volume, ManifestFile, String), Refuse>;

/// Opens the target and its manifest for `offer`. Everything that can
/// refuse is checked before the target is created, so that a refusal
/// writes nothing (the volume's journal neither), and a target this
/// session created is removed again when its manifest cannot be opened.
async fn open_for_sync(
    shared: &Shared,
    name: &str,
    path: &Path,
    offer: rx::Offer,
) -> Result<Opened> {
    let dir = volume_dir(shared, name);
    let unsealed_cutover = match crate::store::seal::last_unsealed(&shared.store, name) {
        Ok(cp) => cp,
        Err(e) => return Ok(Err(e.into())),
    };
    let (cfg, name, path) = (shared.cfg.clone(), name.to_string(), path.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let rx::Offer {
            size,
            chunk,
            explicit,
        } = offer;
        prepare_target(&cfg, &dir, &path, size, chunk, explicit)?;
        let (volume, created) = Volume::open_target(&path, size)?;
        match open_manifest(&dir, &name, &path, &volume, created, &offer) {
            Ok(m) => Ok((volume, m, unsealed_cutover)),
            Err(r) => {
                if created == Created::New {
                    // Nothing of ours may stay behind a refusal: the file
                    // was created by this session.
                    drop(volume);
                    let _ = std::fs::remove_file(&path);
                }
                Err(r)
            }
        }
    })
    .await
    .map_err(|_| Error::Io("open task failed".into()))
}

/// Starts the session's writer thread, which owns the target, the manifest
/// and the volume's busy slot (`guard`); returns where verified chunks and
/// table requests go to it.
fn spawn_writer(
    shared: &Shared,
    guard: BusyGuard,
    volume: Volume,
    manifest: ManifestFile,
    ctl: &mpsc::Sender<Msg>,
    name: &str,
    slots: usize,
) -> (
    SyncSender<WriterMsg>,
    std::sync::mpsc::Sender<mpsc::Sender<Bytes>>,
) {
    let (wtx, wrx) = sync_channel::<WriterMsg>(slots);
    let (table_tx, table_rx) = std::sync::mpsc::channel::<mpsc::Sender<Bytes>>();
    let (ctl, name) = (ctl.clone(), name.to_string());
    let writer = std::thread::spawn(move || {
        // Declared first so it is dropped last: the volume is free again only
        // once the target and the manifest (and its lock) are closed.
        let _guard = guard;
        let mut manifest = manifest;
        let volume = volume;
        let meters = crate::metrics::ReceiverMeters::new(&name);
        if let Err(e) = writer_loop(&volume, &mut manifest, wrx, table_rx, &ctl, &meters) {
            tracing::error!("volume '{name}': writer stopped: {e}");
            let _ = ctl.blocking_send(Msg::Failure(wire::Failure {
                message: format!("receiver failed writing volume '{name}': {e}"),
            }));
        }
    });
    shared.writers.lock().expect("not poisoned").push(writer);
    (wtx, table_tx)
}

/// The data side of a sync session: every data stream the sender opens,
/// each read, checked and handed to the writer.
struct DataStreams {
    conn: quinn::Connection,
    name: String,
    each: Arc<StreamContext>,
}

/// What every data stream of a session shares.
pub(super) struct StreamContext {
    geometry: Geometry,
    wtx: SyncSender<WriterMsg>,
    /// Frames held between the network and the writer's queue.
    budget: Arc<tokio::sync::Semaphore>,
    /// The target, read by probes.
    target: Arc<Volume>,
    ctl: mpsc::Sender<Msg>,
    /// A stream the sender reset ends without error, but the frames it
    /// dropped leave the pass unfinishable: see [`ReceiverSession`].
    abandoned: Arc<std::sync::atomic::AtomicBool>,
    /// The session's log, which counts the chunks received.
    log: Option<Arc<SessionLog>>,
}

impl DataStreams {
    async fn run(self) -> Result<()> {
        let mut streams = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                s = self.conn.accept_uni() => match s {
                    Ok(s) => {
                        streams.spawn(data_stream(s, self.each.clone()));
                    }
                    Err(_) => break,
                },
                Some(r) = streams.join_next(), if !streams.is_empty() => {
                    if let Ok(Err(e)) = r {
                        tracing::warn!("volume '{}': session ended: {e}", self.name);
                        self.conn.close(2u32.into(), e.to_string().as_bytes());
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
    }
}

/// The control stream of a sync session after the Welcome, in the order
/// [`ReceiverSession`] allows: heartbeats, table requests, then Finish
/// (answered with Done once every chunk announced is durable).
async fn control_loop(
    recv: &mut quinn::RecvStream,
    ctl_tx: &mpsc::Sender<Msg>,
    wtx: &SyncSender<WriterMsg>,
    table_tx: &std::sync::mpsc::Sender<mpsc::Sender<Bytes>>,
    geometry: Geometry,
    abandoned: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let mut session = ReceiverSession::new();
    loop {
        let next = next_control(recv, ctl_tx).await?;
        if abandoned.load(std::sync::atomic::Ordering::Relaxed) {
            session.handle_abandoned();
        }
        match session.handle_control(next)? {
            ControlAction::Nothing => {}
            ControlAction::End => return Ok(()),
            ControlAction::SendTable => send_table(ctl_tx, table_tx, geometry).await?,
            ControlAction::Finalize { expected } => {
                let summary = finalize(wtx, expected).await?;
                ctl_tx
                    .send(rx::done(&summary))
                    .await
                    .map_err(|_| Error::Network("control stream closed".into()))?;
                if let Some(log) = SessionLog::current() {
                    log.done();
                }
                // One pass per session: nothing may follow Done.
                return Ok(());
            }
        }
    }
}

/// Sends the manifest table, which comes from the writer in pieces, a few
/// at a time: a 1 TiB volume's table is 512 MiB.
async fn send_table(
    ctl_tx: &mpsc::Sender<Msg>,
    table_tx: &std::sync::mpsc::Sender<mpsc::Sender<Bytes>>,
    geometry: Geometry,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    table_tx
        .send(tx)
        .map_err(|_| Error::Io("writer stopped".into()))?;
    let mut parts = TableParts::new(&geometry);
    loop {
        let piece = rx
            .recv()
            .await
            .ok_or_else(|| Error::Io("writer stopped".into()))?;
        let part = parts.part(piece);
        let last = part.last;
        // The writer waits on this hand-off: a sender that never reads the
        // parts must not keep it (and the volume) forever.
        tokio::time::timeout(CONTROL_IDLE, ctl_tx.send(Msg::ManifestPart(part)))
            .await
            .map_err(|_| {
                Error::Peer(format!(
                    "the sender read none of the manifest it asked for in {} s; ending the session",
                    CONTROL_IDLE.as_secs()
                ))
            })?
            .map_err(|_| Error::Network("control stream closed".into()))?;
        if last {
            return Ok(());
        }
    }
}

/// Asks the writer for the end of the pass: the summary once `expected`
/// chunks are durable.
async fn finalize(wtx: &SyncSender<WriterMsg>, expected: u64) -> Result<Summary> {
    let (tx, rx) = oneshot::channel();
    let w = wtx.clone();
    tokio::task::spawn_blocking(move || {
        w.send(WriterMsg::Finalize {
            expected,
            reply: tx,
        })
    })
    .await
    .map_err(|_| Error::Io("writer stopped".into()))?
    .map_err(|_| Error::Io("writer stopped".into()))?;
    rx.await
        .map_err(|_| Error::Io("writer stopped before the end of the pass".into()))?
}

/// The next control message of a sync session. A sender sends at least a
/// heartbeat every few seconds during its pass; one silent for
/// [`CONTROL_IDLE`] is gone, or holding the volume, and the session ends.
/// The clock stands still while our own replies (`ctl`) are queued: a
/// sender still receiving the manifest it asked for is not idle.
pub(super) async fn next_control(
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

/// Bytes of chunk data a session may hold in memory between the network and
/// the writer's queue (each bound separately).
pub(super) const SESSION_BUFFER: u64 = 48 << 20;

/// Largest chunk checked on the async worker that read it (see `data_stream`).
pub(super) const INLINE_CHECK_MAX: usize = 256 << 10;

/// Chunks a session may hold per stage: 48 MiB worth, at least 2, at most 256.
pub(super) fn in_flight_chunks(chunk: ChunkSize) -> usize {
    (SESSION_BUFFER / chunk.bytes()).clamp(2, 256) as usize
}

/// Reads, checks and forwards the chunks of one data stream.
pub(super) async fn data_stream(mut s: quinn::RecvStream, each: Arc<StreamContext>) -> Result<()> {
    let StreamContext {
        geometry,
        wtx,
        budget,
        target,
        ctl,
        abandoned,
        log,
    } = &*each;
    let geometry = *geometry;
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
        let payload = body.len();
        let inline = if geometry.chunk_size().usize() <= INLINE_CHECK_MAX {
            check_chunk(body.clone(), &geometry, target, false)?
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
                if let Some(log) = log {
                    log.chunk(payload);
                }
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
pub(super) enum Checked {
    /// A verified chunk to write.
    Write(WriterMsg),
    /// Ask the sender for these blocks (a probe's answer).
    Need(wire::Need),
}

/// Decodes and verifies one chunk frame ([`rx::check_chunk`]); a probe
/// reads the target's current copy of the chunk (a patch is checked by the
/// writer). Nothing unverified leaves this function. Unless `wait`, a
/// probe's read comes only from the page cache and `None` means it would
/// have waited for the disk: nothing was done, ask again with `wait`.
pub(super) fn check_chunk(
    body: Bytes,
    geometry: &Geometry,
    target: &Volume,
    wait: bool,
) -> Result<Option<Checked>> {
    let decompress = |p: &[u8], len| zstd::bulk::decompress(p, len).map_err(|e| e.to_string());
    match rx::check_chunk(body, geometry, decompress)? {
        rx::Checked::Write {
            index,
            hash,
            content,
        } => Ok(Some(Checked::Write(WriterMsg::Chunk {
            index,
            hash,
            data: content,
        }))),
        rx::Checked::Probe {
            index,
            range,
            hints,
        } => {
            let len = (range.end - range.start) as usize;
            let old = if wait {
                Some(target.read_vec_at(len, range.start)?)
            } else {
                target.read_vec_cached(len, range.start)?
            };
            let Some(old) = old else {
                return Ok(None);
            };
            patch::answer_probe(index, &hints, &old)
                .map(|n| Some(Checked::Need(n)))
                .map_err(|e| Error::Peer(e.to_string()))
        }
    }
}
