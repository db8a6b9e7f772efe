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
//! Owns no sockets and no manifests.

use std::sync::mpsc::{sync_channel, Receiver as StdReceiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use nightpass_proto::chunk::Geometry;
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
    geometry: Geometry,
    first: u64,
    opts: ScanOptions,
    work: F,
    progress: Arc<dyn Progress>,
) -> Scan<T>
where
    T: Send + 'static,
    F: Fn(Scanned) -> Option<T> + Send + Sync + 'static,
{
    let workers = worker_count(opts.workers);
    let chunk = geometry.chunk_size().bytes();
    let block = chunk.max(4 << 20);
    let per_block = block / chunk;
    // Blocks to read: (seq, first chunk index, offset, length). Each worker
    // reads its own blocks, so the copies out of the page cache (or the
    // device) spread over every core instead of bounding the scan on one.
    let (btx, brx) = sync_channel::<ReadTask>(workers);
    let (otx, orx) = tokio::sync::mpsc::channel::<Result<Block<T>>>(workers + 1);
    let brx = Arc::new(Mutex::new(brx));
    let work = Arc::new(work);
    let zeros = zero_hashes(&geometry);
    let mut worker_threads = Vec::with_capacity(workers);
    let start = Instant::now();
    // Nanoseconds workers spent blocked on the consumer (summed), and the
    // end of the last worker, since `start`: the scan's busy time excludes
    // waiting on the link.
    let blocked_ns = Arc::new(AtomicU64::new(0));
    let ended_ns = Arc::new(AtomicU64::new(0));
    for _ in 0..workers {
        let brx: Arc<Mutex<StdReceiver<ReadTask>>> = brx.clone();
        let otx = otx.clone();
        let vol = vol.clone();
        let (blocked_ns, ended_ns) = (blocked_ns.clone(), ended_ns.clone());
        let drop_cache = opts.drop_cache;
        let work = work.clone();
        let progress = progress.clone();
        let mut zero_chunk = Bytes::new();
        // Read the next block into a buffer instead of mapping it (see
        // STABILIZED).
        let mut copy_next = false;
        worker_threads.push(std::thread::spawn(move || loop {
            let next = brx.lock().expect("not poisoned").recv();
            let Ok((seq, first_index, off, len)) = next else {
                ended_ns.fetch_max(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                return;
            };
            let read = if vol.is_hole(off, len as u64) {
                Read::Hole(len)
            } else {
                match vol.read_block(len, off, copy_next) {
                    Ok(b) => Read::Data(b),
                    Err(e) => {
                        let _ = otx.blocking_send(Err(e));
                        return;
                    }
                }
            };
            if drop_cache {
                vol.drop_cache(off, len as u64);
            }
            let mapped = vol.reads_mapped() && !copy_next && matches!(read, Read::Data(_));
            STABILIZED.with(|c| c.set(0));
            // A hole is `n` bytes of zeros: neither read nor hashed.
            let (data, hole) = match read {
                Read::Data(d) => (d, None),
                Read::Hole(n) => {
                    if zero_chunk.is_empty() {
                        zero_chunk = Bytes::from(vec![0u8; chunk as usize]);
                    }
                    (Bytes::new(), Some(n))
                }
            };
            let total = hole.unwrap_or(data.len());
            let mut items = Vec::new();
            let mut off = 0usize;
            let mut index = first_index;
            while off < total {
                let len = (total - off).min(chunk as usize);
                let (bytes, hash, zero) = if hole.is_some() {
                    let hash = if len == chunk as usize {
                        zeros.0
                    } else {
                        zeros.1
                    };
                    (zero_chunk.slice(..len), hash, true)
                } else {
                    let bytes = data.slice(off..off + len);
                    let hash = *blake3::hash(&bytes).as_bytes();
                    let zero = hash == zeros.0 || hash == zeros.1;
                    (bytes, hash, zero)
                };
                if let Some(t) = work(Scanned {
                    index,
                    hash,
                    data: bytes,
                    zero,
                    mapped,
                }) {
                    items.push(t);
                }
                off += len;
                index += 1;
            }
            if vol.reads_mapped() && hole.is_none() {
                let chunks = total.div_ceil(chunk as usize);
                copy_next = 2 * STABILIZED.with(|c| c.get()) > chunks
                    || (copy_next && 2 * items.len() > chunks);
            }
            progress.scanned(total as u64);
            let t = Instant::now();
            if otx.blocking_send(Ok(Block { seq, items })).is_err() {
                return;
            }
            blocked_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }));
    }
    let dispatcher = std::thread::spawn(move || {
        let mut paced = Duration::ZERO;
        let mut bytes = 0u64;
        let mut index = first;
        let mut seq = 0u64;
        let count = geometry.chunk_count();
        while index < count {
            let off = index * chunk;
            let len = (geometry.size() - off).min(block) as usize;
            bytes += len as u64;
            if let Some(limit) = opts.read_limit {
                let due = Duration::from_secs_f64(bytes as f64 / limit as f64);
                let el = start.elapsed();
                if due > el {
                    std::thread::sleep(due - el);
                    paced += due - el;
                }
            }
            if btx.send((seq, index, off, len)).is_err() {
                break;
            }
            index += per_block;
            seq += 1;
        }
        drop(btx);
        (bytes, paced)
    });
    let figures = ScanFigures {
        start,
        workers,
        blocked_ns,
        ended_ns,
    };
    Scan {
        rx: orx,
        dispatcher,
        workers: worker_threads,
        figures,
    }
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
        geometry,
        0,
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
