//! The read-and-hash pipeline: a dispatcher thread handing out blocks in
//! volume order (and pacing `--read-limit`), and one worker per core that
//! reads and hashes them, joined by bounded queues.
//!
//! A worker reads its block of `max(chunk size, 4 MiB)` into a fresh buffer
//! (or, for a hole of a sparse image file, reads nothing), so the copies out
//! of the page cache or the device spread over the cores; it cuts the block
//! into chunks (zero-copy
//! `Bytes` slices), hashes each with BLAKE3 (SIMD, one thread per chunk: per
//! BLAKE3's own docs, multithreading a single hash does not pay below 128 KiB,
//! and parallelism across blocks keeps every core busy anyway), and runs the
//! caller's `work` on it (the sender compares and compresses there; verify
//! only keeps the hash). Results leave through a bounded channel, block by
//! block, in completion order with a sequence number for callers that need
//! order. Memory in flight is bounded by the queue depths: about
//! `2 × workers + 2` blocks.
//!
//! One pool of hashing slots, one per core, is shared by every scan of the
//! process ([`HashSlots`]): a worker holds a slot while it reads and
//! hashes a block, so that the volumes of a plan run (or the sessions of a
//! receiver) scanned at once share the cores instead of each taking them
//! all. A worker waiting for a slot is not busy (see [`ScanStats::busy_s`]).
//!
//! Owns no sockets and no manifests.

use std::sync::mpsc::{sync_channel, Receiver as StdReceiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use nightpass_proto::chunk::Geometry;
use nightpass_proto::chunkset::ChunkSet;
use nightpass_proto::manifest::{self, Hash};

use crate::error::{Error, Result};
use crate::io::device::{ReadMode, Volume};
use crate::progress::Progress;

/// A block for a worker to read: (seq, first chunk index, offset, length).
type ReadTask = (u64, u64, u64, usize);

/// What a worker found at one block.
enum Read {
    /// The block's bytes.
    Data(Bytes),
    /// The block lies in a hole of a sparse image file: this many zero bytes.
    Hole(usize),
}

/// One chunk as read and hashed.
#[derive(Debug, Clone)]
pub struct Scanned {
    /// Chunk index.
    pub index: u64,
    /// BLAKE3 of its bytes.
    pub hash: Hash,
    /// Its bytes.
    pub data: Bytes,
    /// True when every byte is zero.
    pub zero: bool,
    /// `data` is a live view of the source (a memory map): a concurrent
    /// writer may change it after `hash` was taken. Call
    /// [`Scanned::stable`] before keeping or sending the bytes.
    pub mapped: bool,
}

thread_local! {
    /// Chunks the current worker copied out of a map ([`Scanned::stable`])
    /// in the block it is working on: where most chunks are kept (a first
    /// pass), reading the next block into a buffer costs less than mapping
    /// it, hashing it and then copying and hashing again.
    static STABILIZED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Scanned {
    /// The chunk with bytes of its own and the hash of exactly those bytes:
    /// a mapped chunk is copied and hashed again (the source may have been
    /// written since it was hashed); any other is returned as it is.
    pub fn stable(self) -> Scanned {
        if !self.mapped {
            return self;
        }
        STABILIZED.with(|c| c.set(c.get() + 1));
        let data = Bytes::copy_from_slice(&self.data);
        let hash = *blake3::hash(&data).as_bytes();
        let zero = if hash == self.hash {
            self.zero
        } else {
            data.iter().all(|&b| b == 0)
        };
        Scanned {
            index: self.index,
            hash,
            data,
            zero,
            mapped: false,
        }
    }
}

/// The results of one block, in chunk order.
#[derive(Debug)]
pub struct Block<T> {
    /// Block sequence number (0, 1, …) in volume order.
    pub seq: u64,
    /// The block's chunks end before this index.
    pub end: u64,
    /// Results of the block's chunks for which `work` returned `Some`.
    pub items: Vec<T>,
}

/// Scan settings.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Hashing threads; 0 = one per core.
    pub workers: usize,
    /// Limit on source reads in bytes per second.
    pub read_limit: Option<u64>,
    /// Drop read pages from the page cache behind the reader.
    pub drop_cache: bool,
    /// Read with `O_DIRECT`, bypassing the page cache (see
    /// [`Volume::open_source_reader`]); applied where the source is opened.
    pub direct: bool,
}

impl ScanOptions {
    /// How a source scanned with these options is to be opened: `O_DIRECT`
    /// when asked for; buffered reads when pages are dropped behind the
    /// reader (a mapped page cannot be dropped while mapped); otherwise
    /// memory maps, which spare the copy out of the page cache.
    pub fn read_mode(&self) -> ReadMode {
        if self.direct {
            ReadMode::Direct
        } else if self.drop_cache {
            ReadMode::Buffered
        } else {
            ReadMode::Mapped
        }
    }
}

/// Figures of a finished scan.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanStats {
    /// Bytes read.
    pub bytes: u64,
    /// Seconds the scan was busy reading and hashing: neither paced by
    /// `--read-limit` nor waiting for the consumer (the link).
    pub busy_s: f64,
}

/// A running scan: the results and the threads producing them.
pub struct Scan<T> {
    /// Blocks of results; an `Err` ends the stream.
    pub rx: tokio::sync::mpsc::Receiver<Result<Block<T>>>,
    /// The dispatcher thread: returns the bytes handed out and the time
    /// spent pacing them.
    dispatcher: std::thread::JoinHandle<(u64, Duration)>,
    /// The hashing threads; they own the work closure (and what it holds).
    workers: Vec<std::thread::JoinHandle<()>>,
    figures: ScanFigures,
}

/// What the threads of a scan measure of their own time.
struct ScanFigures {
    start: Instant,
    workers: usize,
    blocked_ns: Arc<AtomicU64>,
    ended_ns: Arc<AtomicU64>,
}

impl<T> Scan<T> {
    /// Stops taking results, waits for the dispatcher and every worker (so
    /// whatever the work closure holds is released), and returns the scan's
    /// figures.
    pub fn finish(self) -> Result<ScanStats> {
        drop(self.rx);
        let dispatched = self
            .dispatcher
            .join()
            .map_err(|_| Error::Io("block dispatcher panicked".into()));
        for w in self.workers {
            let _ = w.join();
        }
        let (bytes, paced) = dispatched?;
        let f = &self.figures;
        let ended = Duration::from_nanos(f.ended_ns.load(Ordering::Relaxed));
        let ended = if ended.is_zero() {
            f.start.elapsed()
        } else {
            ended
        };
        let blocked =
            Duration::from_nanos(f.blocked_ns.load(Ordering::Relaxed) / f.workers.max(1) as u64);
        let busy = ended.saturating_sub(blocked).saturating_sub(paced);
        Ok(ScanStats {
            bytes,
            busy_s: busy.as_secs_f64(),
        })
    }
}

/// The process's hashing slots: at most one block read and hashed per
/// core at a time, over every scan running.
pub struct HashSlots {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

impl HashSlots {
    /// The process's pool, one slot per core.
    pub fn global() -> &'static HashSlots {
        static SLOTS: std::sync::OnceLock<HashSlots> = std::sync::OnceLock::new();
        SLOTS.get_or_init(|| HashSlots::new(worker_count(0)))
    }

    /// A pool of `n` slots.
    pub fn new(n: usize) -> HashSlots {
        HashSlots {
            free: Mutex::new(n.max(1)),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Waits for a free slot and holds it until the guard drops.
    pub fn take(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().expect("not poisoned");
        while *free == 0 {
            free = self.freed.wait(free).expect("not poisoned");
        }
        *free -= 1;
        SlotGuard(self)
    }
}

/// A hashing slot held; freed on drop.
pub struct SlotGuard<'a>(&'a HashSlots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().expect("not poisoned") += 1;
        self.0.freed.notify_one();
    }
}

/// Number of hashing workers to use.
pub fn worker_count(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    }
}

/// Zero-chunk hashes for a geometry: (full chunk, last chunk).
fn zero_hashes(g: &Geometry) -> (Hash, Hash) {
    let full = manifest::zero_hash(g.chunk_size().usize());
    let last = match g.chunk_count() {
        0 => full,
        n => manifest::zero_hash(g.chunk_len(n - 1).expect("last chunk exists")),
    };
    (full, last)
}

/// Starts scanning chunks `first..geometry.chunk_count()` of `vol`.
pub fn scan<T, F>(
    vol: Arc<Volume>,
    set: ChunkSet,
    opts: ScanOptions,
    work: F,
    progress: Arc<dyn Progress>,
) -> Scan<T>
where
    T: Send + 'static,
    F: Fn(Scanned) -> Option<T> + Send + Sync + 'static,
{
    let workers = worker_count(opts.workers);
    let geometry = *set.geometry();
    let chunk = geometry.chunk_size().bytes();
    let block = chunk.max(4 << 20);
    // Blocks to read: (seq, first chunk index, offset, length). Each worker
    // reads its own blocks, so the copies out of the page cache (or the
    // device) spread over every core instead of bounding the scan on one.
    let (btx, brx) = sync_channel::<ReadTask>(workers);
    let (otx, orx) = tokio::sync::mpsc::channel::<Result<Block<T>>>(workers + 1);
    let figures = ScanFigures {
        start: Instant::now(),
        workers,
        blocked_ns: Arc::new(AtomicU64::new(0)),
        ended_ns: Arc::new(AtomicU64::new(0)),
    };
    let shared = Arc::new(WorkerShared {
        tasks: Mutex::new(brx),
        out: otx,
        vol,
        chunk: chunk as usize,
        zeros: zero_hashes(&geometry),
        drop_cache: opts.drop_cache,
        work,
        progress,
        start: figures.start,
        blocked_ns: figures.blocked_ns.clone(),
        ended_ns: figures.ended_ns.clone(),
    });
    let worker_threads = (0..workers)
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || Worker::new(shared).run())
        })
        .collect();
    let (start, read_limit) = (figures.start, opts.read_limit);
    let dispatcher =
        std::thread::spawn(move || dispatch(&btx, blocks(&set, block), read_limit, start));
    Scan {
        rx: orx,
        dispatcher,
        workers: worker_threads,
        figures,
    }
}

/// The blocks of a scan of `set`, in volume order, walked lazily:
/// (seq, first chunk index, offset, length), each a run of the set's
/// consecutive chunks of at most `block` bytes (a whole number of chunks;
/// the volume's last chunk may be short).
fn blocks(set: &ChunkSet, block: u64) -> impl Iterator<Item = ReadTask> + '_ {
    let geometry = *set.geometry();
    let chunk = geometry.chunk_size().bytes();
    let per_block = (block / chunk).max(1);
    set.ranges_at_most(per_block)
        .enumerate()
        .map(move |(seq, run)| {
            let off = run.start * chunk;
            let end = (run.end * chunk).min(geometry.size());
            (seq as u64, run.start, off, (end - off) as usize)
        })
}

/// How long to wait before reading on, when `bytes` handed out by
/// `elapsed` must not outrun `limit` bytes per second.
fn pace(bytes: u64, limit: u64, elapsed: Duration) -> Duration {
    Duration::from_secs_f64(bytes as f64 / limit as f64).saturating_sub(elapsed)
}

/// The dispatcher: hands `tasks` to the workers in order, pacing them to
/// `read_limit`; returns the bytes handed out and the time spent pacing.
fn dispatch(
    btx: &SyncSender<ReadTask>,
    tasks: impl Iterator<Item = ReadTask>,
    read_limit: Option<u64>,
    start: Instant,
) -> (u64, Duration) {
    let mut paced = Duration::ZERO;
    let mut bytes = 0u64;
    for task in tasks {
        bytes += task.3 as u64;
        if let Some(limit) = read_limit {
            let wait = pace(bytes, limit, start.elapsed());
            if !wait.is_zero() {
                std::thread::sleep(wait);
                paced += wait;
            }
        }
        if btx.send(task).is_err() {
            break;
        }
    }
    (bytes, paced)
}

/// What every worker of one scan shares.
struct WorkerShared<T, F> {
    tasks: Mutex<StdReceiver<ReadTask>>,
    out: tokio::sync::mpsc::Sender<Result<Block<T>>>,
    vol: Arc<Volume>,
    chunk: usize,
    /// Hashes of an all-zero chunk: (full, last).
    zeros: (Hash, Hash),
    drop_cache: bool,
    work: F,
    progress: Arc<dyn Progress>,
    start: Instant,
    /// Nanoseconds workers spent blocked on the consumer (summed), and the
    /// end of the last worker, since `start`: the scan's busy time
    /// excludes waiting on the link.
    blocked_ns: Arc<AtomicU64>,
    ended_ns: Arc<AtomicU64>,
}

/// One hashing thread: reads its blocks, cuts them into chunks, hashes
/// them and runs the work on each.
struct Worker<T, F> {
    shared: Arc<WorkerShared<T, F>>,
    /// A chunk of zeros, made at the first hole.
    zero_chunk: Bytes,
    /// Read the next block into a buffer instead of mapping it (see
    /// STABILIZED).
    copy_next: bool,
}

impl<T, F> Worker<T, F>
where
    T: Send + 'static,
    F: Fn(Scanned) -> Option<T> + Send + Sync + 'static,
{
    fn new(shared: Arc<WorkerShared<T, F>>) -> Self {
        Worker {
            shared,
            zero_chunk: Bytes::new(),
            copy_next: false,
        }
    }

    /// Takes blocks until there are none or the consumer is gone.
    fn run(mut self) {
        let s = self.shared.clone();
        loop {
            let next = s.tasks.lock().expect("not poisoned").recv();
            let Ok((seq, first_index, off, len)) = next else {
                let ended = s.start.elapsed().as_nanos() as u64;
                s.ended_ns.fetch_max(ended, Ordering::Relaxed);
                return;
            };
            let t = Instant::now();
            let slot = HashSlots::global().take();
            let waited = t.elapsed().as_nanos() as u64;
            s.blocked_ns.fetch_add(waited, Ordering::Relaxed);
            let read = match self.read(off, len) {
                Ok(r) => r,
                Err(e) => {
                    drop(slot);
                    let _ = s.out.blocking_send(Err(e));
                    return;
                }
            };
            let end = first_index + (len as u64).div_ceil(s.chunk as u64);
            let (items, total) = self.chunks(read, first_index);
            drop(slot);
            s.progress.scanned(total as u64);
            let t = Instant::now();
            if s.out.blocking_send(Ok(Block { seq, end, items })).is_err() {
                return;
            }
            let blocked = t.elapsed().as_nanos() as u64;
            s.blocked_ns.fetch_add(blocked, Ordering::Relaxed);
        }
    }

    /// Reads the block at `off` (a hole is not read), dropping its pages
    /// behind when asked to.
    fn read(&self, off: u64, len: usize) -> Result<Read> {
        let vol = &self.shared.vol;
        let read = if vol.is_hole(off, len as u64) {
            Read::Hole(len)
        } else {
            Read::Data(vol.read_block(len, off, self.copy_next)?)
        };
        if self.shared.drop_cache {
            vol.drop_cache(off, len as u64);
        }
        Ok(read)
    }

    /// Cuts a block into chunks from `first_index` on, hashes each and runs
    /// the work on it; returns the work's results and the block's length.
    fn chunks(&mut self, read: Read, first_index: u64) -> (Vec<T>, usize) {
        let s = &self.shared;
        let chunk = s.chunk;
        let mapped = s.vol.reads_mapped() && !self.copy_next && matches!(read, Read::Data(_));
        STABILIZED.with(|c| c.set(0));
        // A hole is `n` bytes of zeros: neither read nor hashed.
        let (data, hole) = match read {
            Read::Data(d) => (d, None),
            Read::Hole(n) => {
                if self.zero_chunk.is_empty() {
                    self.zero_chunk = Bytes::from(vec![0u8; chunk]);
                }
                (Bytes::new(), Some(n))
            }
        };
        let total = hole.unwrap_or(data.len());
        let mut items = Vec::new();
        for (i, off) in (0..total).step_by(chunk).enumerate() {
            let len = (total - off).min(chunk);
            let (data, hash, zero) = if hole.is_some() {
                let hash = if len == chunk { s.zeros.0 } else { s.zeros.1 };
                (self.zero_chunk.slice(..len), hash, true)
            } else {
                let bytes = data.slice(off..off + len);
                let hash = *blake3::hash(&bytes).as_bytes();
                (bytes, hash, hash == s.zeros.0 || hash == s.zeros.1)
            };
            let index = first_index + i as u64;
            let scanned = Scanned {
                index,
                hash,
                data,
                zero,
                mapped,
            };
            items.extend((s.work)(scanned));
        }
        if s.vol.reads_mapped() && hole.is_none() {
            let chunks = total.div_ceil(chunk);
            let stabilized = STABILIZED.with(|c| c.get());
            self.copy_next = copy_next(stabilized, items.len(), chunks, self.copy_next);
        }
        (items, total)
    }
}

/// Whether a worker reading from maps should read its next block into a
/// buffer: when most chunks of this block were copied out of the map
/// (`stabilized` of `chunks`), or, already copying, when most were kept.
fn copy_next(stabilized: usize, kept: usize, chunks: usize, copying: bool) -> bool {
    2 * stabilized > chunks || (copying && 2 * kept > chunks)
}

/// Hashes every chunk of `vol` fresh and returns the hashes in index order
/// (verify mode; 32 bytes per chunk are kept).
pub fn hash_all(
    vol: Arc<Volume>,
    geometry: Geometry,
    opts: ScanOptions,
    progress: Arc<dyn Progress>,
) -> Result<Vec<u8>> {
    let mut scan = scan(
        vol,
        ChunkSet::all(&geometry),
        opts,
        |s| Some((s.index, s.hash)),
        progress,
    );
    let mut table = vec![0u8; geometry.chunk_count() as usize * manifest::ENTRY_LEN];
    while let Some(block) = scan.rx.blocking_recv() {
        for (i, h) in block?.items {
            manifest::set_entry(&mut table, i, &h);
        }
    }
    scan.finish()?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightpass_proto::chunk::ChunkSize;

    fn geometry(size: u64, chunk: u64) -> Geometry {
        Geometry::new(size, ChunkSize::new(chunk).unwrap()).unwrap()
    }

    #[test]
    fn blocks_cover_the_chunks_of_the_set_in_order() {
        // 10 MiB in chunks of 1 MiB, blocks of 4 MiB: 4 + 4 + 2.
        let g = geometry(10 << 20, 1 << 20);
        let all: Vec<_> = blocks(&ChunkSet::all(&g), 4 << 20).collect();
        assert_eq!(
            all,
            [
                (0, 0, 0, 4 << 20),
                (1, 4, 4 << 20, 4 << 20),
                (2, 8, 8 << 20, 2 << 20)
            ]
        );
        // A resume from chunk 5 numbers its blocks from 0 again.
        let rest: Vec<_> = blocks(&ChunkSet::span(&g, 5..), 4 << 20).collect();
        assert_eq!(rest, [(0, 5, 5 << 20, 4 << 20), (1, 9, 9 << 20, 1 << 20)]);
        assert_eq!(blocks(&ChunkSet::span(&g, 10..), 4 << 20).count(), 0);
        // A set with gaps: a block never spans a gap.
        let set = ChunkSet::from_indices(&g, [1, 2, 6, 7, 8, 9]);
        let some: Vec<_> = blocks(&set, 4 << 20).collect();
        assert_eq!(some, [(0, 1, 1 << 20, 2 << 20), (1, 6, 6 << 20, 4 << 20)]);
        // A last chunk shorter than the others ends the last block.
        let odd = geometry((8 << 20) + 5, 8 << 20);
        let all: Vec<_> = blocks(&ChunkSet::all(&odd), 8 << 20).collect();
        assert_eq!(all, [(0, 0, 0, 8 << 20), (1, 1, 8 << 20, 5)]);
    }

    #[test]
    fn hashing_slots_bound_the_work_in_flight() {
        let slots = Arc::new(HashSlots::new(2));
        let busy = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (slots, busy, most) = (slots.clone(), busy.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let _g = slots.take();
                        let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(200));
                        busy.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn pacing_waits_only_when_ahead_of_the_limit() {
        let s = Duration::from_secs;
        assert_eq!(pace(100, 100, s(0)), s(1));
        assert_eq!(
            pace(100, 100, Duration::from_millis(250)),
            Duration::from_millis(750)
        );
        assert_eq!(pace(100, 100, s(2)), Duration::ZERO);
    }

    #[test]
    fn a_worker_copies_when_most_chunks_were_copied_or_kept() {
        // Most chunks copied out of the map: read the next block into a buffer.
        assert!(copy_next(3, 0, 4, false));
        assert!(!copy_next(2, 4, 4, false));
        // Already copying: stay while most chunks are kept.
        assert!(copy_next(0, 3, 4, true));
        assert!(!copy_next(0, 2, 4, true));
    }
}
