//! The wire side of an attempt: the data streams (pacing, chunk frames
//! out, counting), heartbeats on the control stream, and giving up
//! cleanly. Owns no session decisions (those are [`SendSession`]'s) and no
//! state on disk.

use super::*;

/// What the data streams put on the wire, over every attempt of a pass.
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
    /// The same, and the bytes scanned, as Prometheus counters of the volume.
    pub(super) meters: crate::metrics::SenderMeters,
}

impl Counters {
    /// Zeroed counters of a pass of `volume`.
    pub(super) fn of(volume: &str) -> Counters {
        Counters {
            meters: crate::metrics::SenderMeters::new(volume),
            ..Counters::default()
        }
    }
}

/// Paces payload bytes to a rate: one per pass, or one shared by every
/// pass of a plan run, so that their sum keeps to the limit.
#[derive(Debug)]
pub struct Pacer {
    limit: u64,
    /// When the first payload was paced: time spent connecting before it
    /// earns no credit.
    start: std::sync::OnceLock<Instant>,
    sent: Mutex<u64>,
}

impl Pacer {
    /// A pacer of `limit` payload bytes per second, from its first payload.
    pub fn new(limit: u64) -> Pacer {
        Pacer {
            limit,
            start: std::sync::OnceLock::new(),
            sent: Mutex::new(0),
        }
    }

    async fn pace(&self, n: u64) {
        let due = {
            let mut s = self.sent.lock().expect("not poisoned");
            *s += n;
            Duration::from_secs_f64(*s as f64 / self.limit as f64)
        };
        let el = self.start.get_or_init(Instant::now).elapsed();
        if due > el {
            tokio::time::sleep(due - el).await;
        }
    }
}

/// Where a data stream takes its chunks from: the scan (bounded) or the
/// answers to probes (unbounded; bounded by the probe budget instead).
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
        let o = o.chunk;
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
        counters.meters.sent.increment(n);
        if o.encoding != Encoding::Probe {
            // A probe is counted when its patch (or whole chunk) leaves.
            counters.chunks.fetch_add(1, Ordering::Relaxed);
            counters.meters.chunks.increment(1);
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
pub(super) struct AbortOnDrop(pub(super) tokio::task::AbortHandle);

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
