//! One attempt at a pass on the wire: what each scanned chunk becomes
//! (skipped, a zero marker, compressed, raw, or a probe of block hints and
//! later a patch), the data streams, the acknowledgements and heartbeats on
//! the control stream, and giving up cleanly. Owns no state on disk but
//! the manifest entries acknowledged chunks set.

use super::*;

/// One chunk leaving on a data stream.
pub(super) struct Outgoing {
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
pub(super) struct Probes {
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
pub(super) const PROBE_BUDGET: u64 = 64 << 20;

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
pub(super) struct Counters {
    /// Chunks sent (a probe counts once, when its patch or chunk leaves).
    pub(super) chunks: AtomicU64,
    /// Uncompressed bytes of those chunks.
    pub(super) changed_bytes: AtomicU64,
    /// Payload bytes put on the wire.
    pub(super) sent_bytes: AtomicU64,
    /// Chunks sent as zero markers.
    pub(super) zero_chunks: AtomicU64,
}

/// Paces payload bytes to a rate.
pub(super) struct Pacer {
    limit: u64,
    start: Instant,
    sent: Mutex<u64>,
}

impl Pacer {
    /// A pacer of `limit` payload bytes per second, starting now.
    pub(super) fn new(limit: u64) -> Pacer {
        Pacer {
            limit,
            start: Instant::now(),
            sent: Mutex::new(0),
        }
    }

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
pub(super) fn plan_chunk(
    s: Scanned,
    known: &Hash,
    in_block: bool,
    probes: &Probes,
) -> Option<Outgoing> {
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

pub(super) async fn ack_loop(
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
pub(super) enum ChunkQueue {
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

pub(super) async fn stream_task(
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
pub(super) struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A data stream that is reset, its unsent data discarded, when dropped
/// before it finished (its task aborted because the pass failed). quinn
/// would otherwise finish it on drop and keep sending what was queued.
pub(super) struct ResetOnDrop(Option<quinn::SendStream>);

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
pub(super) async fn give_up(
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

/// Sends a heartbeat on the control stream every
/// [`wire::HEARTBEAT_INTERVAL_S`] until `stop`. A heartbeat being written
/// is never cut off (half a frame would corrupt the control stream); one
/// that fails ends the heartbeats, and the pass learns of the failure from
/// its streams or its acknowledgements.
pub(super) async fn heartbeats(send: &mut quinn::SendStream, mut stop: oneshot::Receiver<()>) {
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
pub(super) async fn stream_pass(
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
