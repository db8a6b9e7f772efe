//! One attempt at a pass: what each scanned chunk becomes (skipped, a
//! zero marker, compressed, raw, or a probe of block hints and later a
//! patch: [`SendSession`] decides), handing chunks to the data streams,
//! the acknowledgements, and the end of the pass. Owns no state on disk
//! but the manifest entries acknowledged chunks set.

use super::*;

/// One chunk leaving on a data stream.
pub(super) struct Outgoing {
    pub(super) chunk: OutChunk,
    /// A probe's chunk bytes, held by the session until the chunk is acknowledged.
    keep: Option<Bytes>,
    /// The payload is a slice of a whole read block.
    in_block: bool,
}

impl Outgoing {
    /// A chunk frame with no patch bitmap, nothing held, and a payload of its own.
    fn new(index: u64, hash: Hash, encoding: Encoding, len: u32, payload: Bytes) -> Outgoing {
        Outgoing::from(OutChunk {
            index,
            hash,
            encoding,
            len,
            blocks: Vec::new(),
            payload,
        })
    }
}

impl From<OutChunk> for Outgoing {
    fn from(chunk: OutChunk) -> Outgoing {
        Outgoing {
            chunk,
            keep: None,
            in_block: false,
        }
    }
}

/// Bytes of probed chunks held at once.
pub(super) const PROBE_BUDGET: u64 = 64 << 20;

/// The attempt's session ([`SendSession`]: the ledger, the probes held, the
/// Finish count) and the budget that bounds the bytes of probed chunks it
/// holds while they wait for the receiver's answer and acknowledgement.
pub(super) struct Shared {
    session: Mutex<SendSession>,
    budget: tokio::sync::Semaphore,
    permits: u32,
    /// Where the answers to probes leave; `None` once every probe is answered.
    patches: Mutex<Option<mpsc::UnboundedSender<Outgoing>>>,
    /// The blocks a change record says were written (a tracked pass), and
    /// the chunk size that maps them onto chunks.
    written: Option<(Arc<BlockRuns>, u64)>,
}

impl Shared {
    fn new(
        session: SendSession,
        chunk: u64,
        patches: mpsc::UnboundedSender<Outgoing>,
        written: Option<Arc<BlockRuns>>,
    ) -> Shared {
        let permits = (PROBE_BUDGET / chunk).clamp(4, 4096) as u32;
        Shared {
            session: Mutex::new(session),
            budget: tokio::sync::Semaphore::new(permits as usize),
            permits,
            patches: Mutex::new(Some(patches)),
            written: written.map(|w| (w, chunk)),
        }
    }

    /// The bitmap of chunk `index`'s blocks (of a chunk `len` bytes long)
    /// the change record names, in a tracked pass.
    fn written_blocks(&self, index: u64, len: usize) -> Option<Vec<u8>> {
        let (runs, chunk) = self.written.as_ref()?;
        let first = index * chunk / nightpass_proto::changes::BLOCK;
        Some(runs.bitmap(first, wire::blocks_in(len)))
    }

    fn session(&self) -> std::sync::MutexGuard<'_, SendSession> {
        self.session.lock().expect("not poisoned")
    }

    fn resume_point(&self) -> u64 {
        self.session().resume_point()
    }
}

thread_local! {
    static POLICY: RefCell<CompressPolicy> = RefCell::new(CompressPolicy::new());
}

/// Decides what to send for a scanned chunk ([`SendSession::plan`]); runs
/// on the hashing threads. `in_block`: the chunk's bytes are a slice of a
/// whole read block. A probe carries block hints and keeps the chunk's
/// bytes for the patch to come.
pub(super) fn plan_chunk(
    s: Scanned,
    known: &Hash,
    in_block: bool,
    shared: &Shared,
) -> Option<Outgoing> {
    if *known == s.hash {
        return None;
    }
    let len = s.data.len() as u32;
    let written = shared.written_blocks(s.index, s.data.len());
    let plan = shared.session().plan(&tx::Scanned {
        hash: &s.hash,
        known,
        zero: s.zero,
        len: s.data.len(),
        written: written.as_deref(),
    });
    let encoding = match plan {
        Plan::Skip => return None,
        Plan::Zero => {
            return Some(Outgoing::new(
                s.index,
                s.hash,
                Encoding::Zero,
                len,
                Bytes::new(),
            ))
        }
        Plan::Probe => {
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
        Plan::Patch => {
            let blocks = written.expect("a patch is planned from written blocks");
            let payload = Bytes::from(nightpass_proto::patch::payload(&s.data, &blocks));
            let keep = Bytes::copy_from_slice(&s.data);
            return Some(Outgoing {
                keep: Some(keep),
                chunk: OutChunk {
                    blocks,
                    ..Outgoing::new(s.index, s.hash, Encoding::Patch, len, payload).chunk
                },
                in_block: false,
            });
        }
        Plan::Whole => Encoding::Raw,
    };
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
            ..Outgoing::new(s.index, s.hash, encoding, len, s.data)
        },
    })
}

/// Reads the control stream during the pass: acknowledgements recorded in
/// our manifest, probes answered, until the receiver's Done.
pub(super) async fn ack_loop(
    mut recv: quinn::RecvStream,
    ours: Arc<Mutex<ManifestFile>>,
    shared: Arc<Shared>,
) -> Result<Summary> {
    loop {
        let Some(msg) = transport::recv_control(&mut recv).await? else {
            return Err(Error::Network(
                "receiver closed the control stream before the end of the pass".into(),
            ));
        };
        let event = shared.session().handle_control(msg).map_err(|e| match e {
            // The receiver's own failure (its disk): a runtime failure.
            SessionError::Stopped(m) => Error::Io(m),
            e => Error::from(e),
        })?;
        match event {
            SendEvent::Nothing => {}
            SendEvent::Acked {
                entries,
                released_probes,
            } => {
                let mut m = ours.lock().expect("not poisoned");
                for (i, h) in entries {
                    m.set(i, &h);
                }
                shared.budget.add_permits(released_probes);
            }
            SendEvent::Send(out) => match &*shared.patches.lock().expect("not poisoned") {
                Some(tx) => tx
                    .send(Outgoing::from(out))
                    .map_err(|_| Error::Network("the patch stream ended".into()))?,
                None => {
                    return Err(Error::Peer(
                        "the receiver asked for a patch after the pass ended".into(),
                    ))
                }
            },
            SendEvent::Done(summary) => return Ok(summary),
        }
    }
}

/// What the attempts of one pass share: counters, the bandwidth limit,
/// progress, and (for a cutover's proof) the table of every chunk's hash
/// as read.
pub(super) struct PassShared {
    pub(super) counters: Arc<Counters>,
    pub(super) pacer: Option<Arc<Pacer>>,
    pub(super) progress: Arc<dyn Progress>,
    pub(super) collected: Option<Arc<Mutex<Vec<u8>>>>,
    /// The blocks a change record says were written, in a tracked pass.
    pub(super) written: Option<Arc<BlockRuns>>,
    /// The audit of a tracked pass: chunks the record says are unchanged,
    /// read anyway and compared with our view of the target.
    pub(super) audit: Option<Arc<Audit>>,
    /// Where the pass reads when its plan says (an LVM thin volume's
    /// snapshot), instead of the source.
    pub(super) read_from: Option<std::path::PathBuf>,
}

/// The chunks a tracked pass audits, and those it found changed.
pub(super) struct Audit {
    /// Chunks read for the audit.
    pub(super) sample: ChunkSet,
    /// Chunks the record names (or the target lacks): not audited.
    pub(super) named: ChunkSet,
    /// Audited chunks whose bytes differ from what the target holds.
    pub(super) found: Mutex<Vec<u64>>,
}

impl Audit {
    /// A chunk read with hash `hash`, the target holding `known`: an
    /// audited chunk that changed behind the record is noted.
    fn check(&self, index: u64, hash: &Hash, known: &Hash) {
        if hash != known
            && *known != manifest::UNKNOWN
            && self.sample.contains(index)
            && !self.named.contains(index)
        {
            self.found.lock().expect("not poisoned").push(index);
        }
    }
}

/// Read blocks of chunks: at least 4 MiB each.
fn chunks_per_block(geometry: &Geometry) -> u64 {
    (geometry.chunk_size().bytes().max(4 << 20) / geometry.chunk_size().bytes()).max(1)
}

/// Streams the chunks of `set` (what remains of the pass for this
/// attempt) and ends the pass with the receiver; on failure, says where a
/// new attempt must resume.
pub(super) async fn stream_pass(
    cfg: &SyncConfig,
    wire: Session,
    set: ChunkSet,
    ours: Arc<Mutex<ManifestFile>>,
    pass: &PassShared,
    scanned: &mut ScanStatsSum,
) -> std::result::Result<AttemptDone, Interrupted> {
    let (geometry, resume) = (*set.geometry(), set.first());
    let (patch_tx, patch_rx) = mpsc::unbounded_channel::<Outgoing>();
    let session = SendSession::new(&geometry, &set);
    let shared = Arc::new(Shared::new(
        session,
        geometry.chunk_size().bytes(),
        patch_tx,
        pass.written.clone(),
    ));
    let mut scan = start_scan(cfg, set, &ours, pass, &shared).map_err(|error| Interrupted {
        error,
        resume_at: resume,
    })?;
    let Session {
        endpoint,
        conn,
        mut send,
        recv,
        ..
    } = wire;
    // Holds a clone of `ours`: every exit path below must have it finished
    // (awaited, not only aborted) so the caller gets the manifest back.
    let mut ack_task = tokio::spawn(ack_loop(recv, ours.clone(), shared.clone()));
    let dispatch = dispatch(
        &conn,
        &mut scan.rx,
        patch_rx,
        &shared,
        pass,
        cfg.streams.max(1),
        &geometry,
    );
    let (dispatched, ack_finished) =
        with_acks_and_heartbeats(dispatch, &mut ack_task, &mut send).await;
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
        let resume_at = shared.resume_point();
        return Err(Interrupted { error, resume_at });
    }
    let ended = end_pass(&mut send, ack_task, &shared, &ours).await;
    let root = ended.map_err(|error| Interrupted {
        error,
        resume_at: shared.resume_point(),
    })?;
    let _ = send.finish();
    transport::close_session(&endpoint, &conn, b"pass complete").await;
    Ok(AttemptDone { root })
}

/// Runs `dispatch` while the acknowledgements task reads the receiver's
/// answers and heartbeats tell the receiver the pass goes on while no
/// control message is due (a mostly unchanged volume may send nothing for
/// hours). Returns how the dispatch ended, and whether the acknowledgements
/// task ended first (the receiver ended the session).
async fn with_acks_and_heartbeats(
    dispatch: impl std::future::Future<Output = Result<()>>,
    ack_task: &mut tokio::task::JoinHandle<Result<Summary>>,
    send: &mut quinn::SendStream,
) -> (Result<()>, bool) {
    let mut ack_finished = false;
    let (stop_heartbeats, stopped) = oneshot::channel::<()>();
    let (dispatched, ()) = tokio::join!(
        async {
            let r = tokio::select! {
                r = dispatch => r,
                r = &mut *ack_task => {
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
        heartbeats(send, stopped),
    );
    (dispatched, ack_finished)
}

/// Starts reading and hashing the chunks of `set`, each planned against
/// our live table (what the target is known to hold, acks included).
fn start_scan(
    cfg: &SyncConfig,
    set: ChunkSet,
    ours: &Arc<Mutex<ManifestFile>>,
    pass: &PassShared,
    shared: &Arc<Shared>,
) -> Result<hash::Scan<Outgoing>> {
    let source = (pass.read_from.clone())
        .or_else(|| cfg.read_from.clone())
        .unwrap_or_else(|| cfg.source.clone());
    let vol = Arc::new(Volume::open_source_reader(&source, cfg.scan.read_mode())?);
    let sink = pass.collected.clone();
    // Compared with our live table, not a copy: a copy would cost 32 bytes
    // per chunk of memory (512 MiB for 1 TiB at 64 KiB chunks). Each chunk
    // is scanned once per attempt, so acks of this attempt never touch an
    // entry before its comparison.
    let (scan_known, scan_shared) = (ours.clone(), shared.clone());
    let audit = pass.audit.clone();
    let scanned = pass.counters.meters.scanned.clone();
    let progress = pass.progress.clone();
    Ok(hash::scan(
        vol,
        set,
        cfg.scan.clone(),
        move |s| {
            scanned.increment(s.data.len() as u64);
            let known = scan_known.lock().expect("not poisoned").entry(s.index);
            if let Some(a) = &audit {
                a.check(s.index, &s.hash, &known);
            }
            // A chunk to send needs bytes of its own, hashed as they are sent.
            let in_block = !s.mapped;
            let s = if s.hash == known { s } else { s.stable() };
            if let Some(t) = &sink {
                manifest::set_entry(&mut t.lock().expect("not poisoned"), s.index, &s.hash);
            }
            let out = plan_chunk(s, &known, in_block, &scan_shared);
            if let Some(o) = &out {
                // Told as the chunk is read: the ETA counts what waits to leave.
                progress.queued(o.chunk.payload.len() as u64);
            }
            out
        },
        pass.progress.clone(),
    ))
}

/// Hands every planned chunk to the data streams (round robin) and every
/// probe's answer to the patch stream, until the scan ends and every probe
/// is answered and acknowledged.
async fn dispatch(
    conn: &quinn::Connection,
    scan: &mut mpsc::Receiver<Result<hash::Block<Outgoing>>>,
    patch_rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: &Shared,
    pass: &PassShared,
    streams: usize,
    geometry: &Geometry,
) -> Result<()> {
    let stream = |queue| {
        stream_task(
            conn.clone(),
            queue,
            pass.counters.clone(),
            pass.pacer.clone(),
            pass.progress.clone(),
        )
    };
    let mut txs = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (tx, rx) = mpsc::channel::<Outgoing>(8);
        txs.push(tx);
        tasks.spawn(stream(ChunkQueue::Scan(rx)));
    }
    let mut patch_task = tokio::spawn(stream(ChunkQueue::Patches(patch_rx)));
    // Should this future be dropped (the receiver ended the session
    // first), the patch stream stops too, like the JoinSet's streams.
    let _stop_patches = AbortOnDrop(patch_task.abort_handle());
    let mut failed = hand_blocks(scan, &txs, shared, chunks_per_block(geometry))
        .await
        .err();
    drop(txs);
    if failed.is_some() {
        // Stop sending: what is queued would only delay the receiver
        // hearing of the failure (see `give_up`).
        tasks.abort_all();
        patch_task.abort();
    }
    while let Some(r) = tasks.join_next().await {
        failed = failed.or(joined(r, "a data stream task failed"));
    }
    if failed.is_none() {
        failed = answer_every_probe(shared, &mut patch_task).await.err();
    }
    shared.patches.lock().expect("not poisoned").take();
    if !patch_task.is_finished() || failed.is_none() {
        failed = failed.or(joined(patch_task.await, "the patch stream task failed"));
    }
    failed.map_or(Ok(()), Err)
}

/// The error of a finished stream task, if it failed (not when cancelled).
fn joined(r: std::result::Result<Result<()>, tokio::task::JoinError>, what: &str) -> Option<Error> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) if e.is_cancelled() => None,
        Err(_) => Some(Error::Network(what.into())),
    }
}

/// Hands the scan's blocks to the streams, recording each chunk in the
/// session as it goes. A raw payload is a slice of its whole read block;
/// when few chunks of a block changed, they are copied out so the block
/// can be freed instead of waiting in send queues (bounds the sender's
/// memory). A probe waits for room in the probe budget.
async fn hand_blocks(
    scan: &mut mpsc::Receiver<Result<hash::Block<Outgoing>>>,
    txs: &[mpsc::Sender<Outgoing>],
    shared: &Shared,
    chunks_per_block: u64,
) -> Result<()> {
    let mut next = 0usize;
    while let Some(block) = scan.recv().await {
        let block = block?;
        let sparse = (block.items.len() as u64) * 2 < chunks_per_block;
        for mut o in block.items {
            if sparse && o.in_block {
                o.chunk.payload = Bytes::copy_from_slice(&o.chunk.payload);
            }
            let keep = o.keep.take();
            if keep.is_some() {
                let Ok(permit) = shared.budget.acquire().await else {
                    return Ok(());
                };
                permit.forget();
            }
            let how = match keep {
                None => Sending::Whole,
                Some(k) if o.chunk.encoding == Encoding::Probe => Sending::Probe(k),
                Some(k) => Sending::Patch(k),
            };
            shared
                .session()
                .handle_sent(o.chunk.index, o.chunk.hash, how);
            if txs[next % txs.len()].send(o).await.is_err() {
                return Ok(());
            }
            next += 1;
        }
        shared.session().handle_block_handed(block.seq, block.end);
    }
    Ok(())
}

/// Waits until every probe is answered and its chunk acknowledged (every
/// permit of the budget is back); the patch stream may end then.
async fn answer_every_probe(
    shared: &Shared,
    patch_task: &mut tokio::task::JoinHandle<Result<()>>,
) -> Result<()> {
    tokio::select! {
        r = shared.budget.acquire_many(shared.permits) => {
            r.map(|p| p.forget()).map_err(|_| Error::Io("probe budget closed".into()))
        }
        r = patch_task => Err(match r {
            Ok(Err(e)) => e,
            _ => Error::Network("the patch stream ended early".into()),
        }),
    }
}

/// Ends the pass with the receiver: Finish, then its Done, which must
/// acknowledge everything and agree with our root; then our manifest is
/// committed. Returns the root.
async fn end_pass(
    send: &mut quinn::SendStream,
    ack_task: tokio::task::JoinHandle<Result<Summary>>,
    shared: &Shared,
    ours: &Mutex<ManifestFile>,
) -> Result<Hash> {
    let finish = shared.session().finish().map_err(Error::from);
    if let Err(e) = match finish {
        Ok(msg) => transport::send_control(send, msg).await,
        Err(e) => Err(e),
    } {
        ack_task.abort();
        let _ = ack_task.await;
        return Err(e);
    }
    let done = match ack_task.await {
        Ok(r) => r?,
        Err(_) => return Err(Error::Network("acknowledgement task failed".into())),
    };
    let mut m = ours.lock().expect("not poisoned");
    let root = m.current_root();
    if let Err(e) = shared.session().check_done(&done, &root) {
        m.flush_table()?;
        return Err(e.into());
    }
    m.set_volume_id(done.volume_id);
    m.commit(done.generation, root)?;
    Ok(root)
}
