//! A sync session: the handshake answer, the control loop, the data streams
//! and the check of every chunk before it goes to the writer. Writes
//! nothing itself: the writer (`writer`) does.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) async fn sync_session(
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
    let unsealed_cutover = match crate::store::seal::last_unsealed(&shared.store, &hello.volume) {
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
            target_is_block: volume.kind() == crate::io::device::Kind::Block,
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
pub(super) async fn data_stream(
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
pub(super) enum Checked {
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
pub(super) fn check_chunk(
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
