//! The read-and-hash pipeline: a dispatcher thread handing out blocks in
//! volume order (and pacing `--read-limit`) as jobs to the process's one
//! pool of hashing threads ([`crate::io::pool`], one per core, shared by
//! every scan running), which read and hash them.
//!
//! A job reads its block of `max(chunk size, 4 MiB)` into a fresh buffer
//! (or, for a hole of a sparse image file, reads nothing), so the copies out
//! of the page cache or the device spread over the cores; it cuts the block
//! into chunks (zero-copy
//! `Bytes` slices), hashes each with BLAKE3 (SIMD, one thread per chunk: per
//! BLAKE3's own docs, multithreading a single hash does not pay below 128 KiB,
//! and parallelism across blocks keeps every core busy anyway), and runs the
//! caller's `work` on it (the sender compares and compresses there; verify
//! only keeps the hash). Results leave through a bounded channel, block by
//! block, in completion order with a sequence number for callers that need
//! order. A scan has at most `workers + 1` blocks queued, being read or
//! waiting for its consumer (its tokens): memory in flight is bounded, a
//! job never waits for the consumer (its token reserved room for its
//! block), and volumes scanned at once (a plan run) share the cores instead
//! of each taking them all.
//!
//! Owns no sockets and no manifests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nightpass_proto::chunk::Geometry;
use nightpass_proto::chunkset::ChunkSet;
use nightpass_proto::manifest::{self, Hash};

use crate::error::{Error, Result};
use crate::io::device::{ReadMode, Volume};
use crate::io::pool::{InFlight, Pool, Token, Tokens};
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
    /// The scan's token for this block: given back when the consumer drops
    /// the block, so the scan reads on.
    _token: Token,
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

/// A running scan: the results and the dispatcher producing them.
pub struct Scan<T> {
    /// Blocks of results; an `Err` ends the stream.
    pub rx: tokio::sync::mpsc::Receiver<Result<Block<T>>>,
    /// The dispatcher thread: returns the bytes handed out and the time
    /// spent pacing them, once every job of the scan ended and released
    /// the work closure (and what it holds).
    dispatcher: std::thread::JoinHandle<(u64, Duration)>,
    figures: ScanFigures,
}

/// What the jobs of a scan measure of their own time.
struct ScanFigures {
    start: Instant,
    /// Jobs the scan may have in flight at once.
    parallel: usize,
    /// Nanoseconds its jobs spent reading, hashing and working, summed.
    work_ns: Arc<AtomicU64>,
}

impl<T> Scan<T> {
    /// Stops taking results, waits for the dispatcher and every job (so
    /// whatever the work closure holds is released), and returns the scan's
    /// figures.
    pub fn finish(self) -> Result<ScanStats> {
        drop(self.rx);
        let (bytes, paced) = self
            .dispatcher
            .join()
            .map_err(|_| Error::Io("block dispatcher panicked".into()))?;
        let f = &self.figures;
        // Busy: the jobs' own time spread over the scan's parallelism,
        // which excludes waiting for the pool (other scans), the consumer
        // (the link) and the pacing.
        let spread = f.work_ns.load(Ordering::Relaxed) / f.parallel.max(1) as u64;
        let wall = f.start.elapsed().saturating_sub(paced);
        let busy = Duration::from_nanos(spread).min(wall);
        Ok(ScanStats {
            bytes,
            busy_s: busy.as_secs_f64(),
        })
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

/// Starts scanning the chunks of `set` in `vol` on the process's pool.
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
    let pool = Pool::global();
    let parallel = worker_count(opts.workers).min(pool.threads());
    let tokens = parallel + 1;
    let geometry = *set.geometry();
    let chunk = geometry.chunk_size().bytes();
    let block = chunk.max(4 << 20);
    // Room for every token's block: a job never waits for the consumer.
    let (otx, orx) = tokio::sync::mpsc::channel::<Result<Block<T>>>(tokens);
    let figures = ScanFigures {
        start: Instant::now(),
        parallel,
        work_ns: Arc::new(AtomicU64::new(0)),
    };
    let shared = Arc::new(ScanShared {
        out: otx,
        vol,
        chunk: chunk as usize,
        zeros: zero_hashes(&geometry),
        zero_chunk: std::sync::OnceLock::new(),
        copy_next: AtomicBool::new(false),
        failed: AtomicBool::new(false),
        drop_cache: opts.drop_cache,
        work,
        progress,
        work_ns: figures.work_ns.clone(),
    });
    let (start, read_limit) = (figures.start, opts.read_limit);
    let dispatcher = std::thread::spawn(move || {
        let tokens = Tokens::new(tokens);
        let in_flight = Arc::new(InFlight::default());
        let tasks = blocks(&set, block);
        let r = dispatch(&shared, &tokens, &in_flight, tasks, read_limit, start);
        // The jobs hold the work closure: let them end first.
        drop(shared);
        in_flight.wait_idle();
        r
    });
    Scan {
        rx: orx,
        dispatcher,
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

/// The dispatcher: hands `tasks` to the pool as jobs, in order, each once
/// a token is free, pacing them to `read_limit`; stops when the consumer
/// is gone or a job failed. Returns the bytes handed out and the time
/// spent pacing.
fn dispatch<T, F>(
    shared: &Arc<ScanShared<T, F>>,
    tokens: &Tokens,
    in_flight: &Arc<InFlight>,
    tasks: impl Iterator<Item = ReadTask>,
    read_limit: Option<u64>,
    start: Instant,
) -> (u64, Duration)
where
    T: Send + 'static,
    F: Fn(Scanned) -> Option<T> + Send + Sync + 'static,
{
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
        let token = tokens.take();
        if shared.out.is_closed() || shared.failed.load(Ordering::Relaxed) {
            break;
        }
        in_flight.start();
        let (s, done) = (shared.clone(), in_flight.clone());
        Pool::global().submit(Box::new(move || {
            run_job(&s, task, token);
            // Release the work closure before saying the job ended.
            drop(s);
            done.end();
        }));
    }
    (bytes, paced)
}

/// What every job of one scan shares.
struct ScanShared<T, F> {
    out: tokio::sync::mpsc::Sender<Result<Block<T>>>,
    vol: Arc<Volume>,
    chunk: usize,
    /// Hashes of an all-zero chunk: (full, last).
    zeros: (Hash, Hash),
    /// A chunk of zeros, made at the first hole.
    zero_chunk: std::sync::OnceLock<Bytes>,
    /// Read the next block into a buffer instead of mapping it (see
    /// STABILIZED).
    copy_next: AtomicBool,
    /// A job failed: the scan hands out no more.
    failed: AtomicBool,
    drop_cache: bool,
    work: F,
    progress: Arc<dyn Progress>,
    /// Nanoseconds the jobs spent reading, hashing and working, summed.
    work_ns: Arc<AtomicU64>,
}

/// One job: reads the block of `task`, cuts it into chunks, hashes them,
/// runs the work on each, and puts the block (or the error) in the
/// channel, where `token` reserved room for it.
fn run_job<T, F>(s: &ScanShared<T, F>, task: ReadTask, token: Token)
where
    T: Send + 'static,
    F: Fn(Scanned) -> Option<T> + Send + Sync + 'static,
{
    let (seq, first_index, off, len) = task;
    if s.out.is_closed() {
        return;
    }
    let t = Instant::now();
    let read = match read(s, off, len) {
        Ok(r) => r,
        Err(e) => {
            s.failed.store(true, Ordering::Relaxed);
            drop(token);
            let _ = s.out.try_send(Err(e));
            return;
        }
    };
    let end = first_index + (len as u64).div_ceil(s.chunk as u64);
    let (items, total) = chunks(s, read, first_index);
    s.work_ns
        .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    s.progress.scanned(total as u64);
    let _ = s.out.try_send(Ok(Block {
        seq,
        end,
        items,
        _token: token,
    }));
}

/// Reads the block at `off` (a hole is not read), dropping its pages
/// behind when asked to.
fn read<T, F>(s: &ScanShared<T, F>, off: u64, len: usize) -> Result<Read> {
    let copy = s.copy_next.load(Ordering::Relaxed);
    let read = if s.vol.is_hole(off, len as u64) {
        Read::Hole(len)
    } else {
        Read::Data(s.vol.read_block(len, off, copy)?)
    };
    if s.drop_cache {
        s.vol.drop_cache(off, len as u64);
    }
    Ok(read)
}

/// Cuts a block into chunks from `first_index` on, hashes each and runs
/// the work on it; returns the work's results and the block's length.
fn chunks<T, F>(s: &ScanShared<T, F>, read: Read, first_index: u64) -> (Vec<T>, usize)
where
    F: Fn(Scanned) -> Option<T>,
{
    let chunk = s.chunk;
    let copying = s.copy_next.load(Ordering::Relaxed);
    let mapped = s.vol.reads_mapped() && !copying && matches!(read, Read::Data(_));
    STABILIZED.with(|c| c.set(0));
    // A hole is `n` bytes of zeros: neither read nor hashed.
    let (data, hole) = match read {
        Read::Data(d) => (d, None),
        Read::Hole(n) => (Bytes::new(), Some(n)),
    };
    let zero_chunk = || s.zero_chunk.get_or_init(|| Bytes::from(vec![0u8; chunk]));
    let total = hole.unwrap_or(data.len());
    let mut items = Vec::new();
    for (i, off) in (0..total).step_by(chunk).enumerate() {
        let len = (total - off).min(chunk);
        let (data, hash, zero) = if hole.is_some() {
            let hash = if len == chunk { s.zeros.0 } else { s.zeros.1 };
            (zero_chunk().slice(..len), hash, true)
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
        let next = copy_next(stabilized, items.len(), chunks, copying);
        s.copy_next.store(next, Ordering::Relaxed);
    }
    (items, total)
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
