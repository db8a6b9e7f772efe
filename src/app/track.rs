//! `nightpass track SOURCE...`: records every write to each source block
//! device, so that passes read only what changed.
//!
//! Owns the tracker's policy: which sources may be tracked (block devices,
//! not already tracked into this state directory), the epoch of each
//! record and when it ends (the tracker stops or crashes, an event is
//! lost, the device changes size or identity), the blocks written since
//! each consumer's (volume's) last cut, and answering the passes' requests
//! on each source's socket. The kernel's events come from
//! [`crate::io::track`]; the files and the request format from
//! [`crate::store::tracking`]. It must not read or write volume data.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nightpass_proto::changes::{blocks_of_sectors, BlockRuns};

use crate::error::{Error, IoContext, Result};
use crate::io::sys;
use crate::io::track::{BlockEvent, TraceSession};
use crate::progress::{now_unix, Progress};
use crate::store::state;
use crate::store::tracking::{self, Answer, Epoch, Request};

/// The blocks written since one consumer's last cut.
#[derive(Debug, Default)]
struct Consumer {
    /// Cuts taken in this epoch.
    seq: u64,
    blocks: BlockRuns,
}

/// One tracked source: its record's directory, lock and socket, its epoch,
/// and its consumers.
#[derive(Debug)]
pub struct Tracked {
    /// The source as given, canonical.
    pub path: PathBuf,
    /// Its device number, kernel encoding.
    pub dev: u32,
    /// The device whose events carry its writes: itself, or for a
    /// partition its disk (the block layer remaps a partition's bios to
    /// the disk before they are traced).
    pub trace_dev: u32,
    /// Where it starts on `trace_dev`, in sectors.
    start: u64,
    size: u64,
    dir: PathBuf,
    _lock: File,
    listener: UnixListener,
    epoch: Epoch,
    consumers: HashMap<String, Consumer>,
}

impl Tracked {
    /// Takes `source` for tracking into `state_dir`: refuses (exit 2) a
    /// source that is not a block device or is tracked already.
    pub fn open(state_dir: &Path, source: &Path) -> Result<Tracked> {
        let path = std::fs::canonicalize(source)
            .map_err(|e| Error::input(format!("{}: {e}", source.display())))?;
        let meta = std::fs::metadata(&path).ctx(path.display())?;
        if !meta.file_type().is_block_device() {
            return Err(Error::input(format!(
                "{} is not a block device: nightpass track records the writes the kernel sends to a block device (passes of an image file read the whole file)",
                path.display()
            )));
        }
        let dir = tracking::tracking_dir(state_dir, &path);
        state::create_private_dir(&dir)?;
        let lock = File::create(tracking::lock_path(&dir)).ctx(dir.display())?;
        if !sys::flock_exclusive(&lock) {
            return Err(Error::input(format!(
                "{} is already tracked into {} by another nightpass track",
                path.display(),
                state_dir.display()
            )));
        }
        let sock = tracking::socket_path(&dir);
        let _ = std::fs::remove_file(&sock); // a crashed tracker's, under our lock
        let listener = UnixListener::bind(&sock).ctx(sock.display())?;
        listener.set_nonblocking(true).ctx(sock.display())?;
        let size = crate::io::device::Volume::open_source(&path)?.size();
        let dev = crate::io::track::tracefs::kernel_dev(meta.rdev());
        let epoch = new_epoch(dev, size)?;
        epoch.write(&dir)?;
        let (trace_dev, start) = match crate::io::track::partition_of(dev)? {
            Some(p) => (p.disk, p.start),
            None => (dev, 0),
        };
        Ok(Tracked {
            path,
            dev,
            trace_dev,
            start,
            size,
            dir,
            _lock: lock,
            listener,
            epoch,
            consumers: HashMap::new(),
        })
    }

    /// A write (or discard, write-zeroes) of `sectors` sectors at `sector`
    /// of device `dev` (kernel encoding), as traced: recorded for every
    /// consumer when it falls on this source.
    pub fn mark(&mut self, dev: u32, sector: u64, sectors: u64) {
        if dev != self.trace_dev {
            return;
        }
        let end = sector.saturating_add(sectors);
        let (lo, hi) = (self.start, self.start + self.size.div_ceil(512));
        if end <= lo || sector >= hi {
            return;
        }
        let (first, last) = (sector.max(lo) - lo, end.min(hi) - lo);
        let blocks = blocks_of_sectors(first, last - first);
        for c in self.consumers.values_mut() {
            c.blocks.insert(blocks.clone());
        }
    }

    /// Ends the epoch (`reason` goes to the record's log) and begins a new
    /// one: every consumer is forgotten, so its next pass reads everything.
    pub fn end_epoch(&mut self, reason: &str) -> Result<()> {
        tracking::log_ended(&self.dir, &self.epoch.id, reason)?;
        tracing::warn!(
            "{}: change record ended: {reason}; the next pass of each volume reads everything",
            self.path.display()
        );
        self.consumers.clear();
        self.epoch = new_epoch(self.dev, self.size)?;
        self.epoch.write(&self.dir)
    }

    /// The device changed size (or can no longer be read): the record no
    /// longer describes it.
    pub fn check_size(&mut self) -> Result<()> {
        let now = crate::io::device::Volume::open_source(&self.path).map(|v| v.size());
        match now {
            Ok(size) if size == self.size => Ok(()),
            Ok(size) => {
                let why = format!("the device was resized from {} to {size} bytes", self.size);
                self.size = size;
                self.end_epoch(&why)
            }
            Err(e) => self.end_epoch(&format!("the device cannot be read: {e}")),
        }
    }

    /// The next pass request waiting on the socket, if any.
    pub fn next_request(&self) -> Option<(UnixStream, Request)> {
        let (stream, _) = self.listener.accept().ok()?;
        stream.set_nonblocking(false).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).ok()?;
        match serde_json::from_str(&line) {
            Ok(r) => Some((stream, r)),
            Err(e) => {
                reply(
                    stream,
                    &Answer::Error {
                        message: format!("bad request: {e}"),
                    },
                );
                None
            }
        }
    }

    /// Answers a request; a cut takes the consumer's blocks (the caller has
    /// drained every event up to now into the record first).
    pub fn answer(&mut self, stream: UnixStream, request: Request, lost: u64) {
        let answer = match request {
            Request::Status => Answer::Status {
                epoch: self.epoch.clone(),
                lost,
            },
            Request::Cut { consumer } => self.cut(&consumer).unwrap_or_else(|e| Answer::Error {
                message: e.to_string(),
            }),
            Request::Peek {
                consumer,
                chunk_size,
            } => self.peek(&consumer, chunk_size),
            Request::EndEpoch { reason } => match self.end_epoch(&reason) {
                Ok(()) => Answer::Status {
                    epoch: self.epoch.clone(),
                    lost,
                },
                Err(e) => Answer::Error {
                    message: e.to_string(),
                },
            },
        };
        reply(stream, &answer);
    }

    /// The consumer's last cut and what its next would hold, without
    /// taking it. Blocks recorded before the consumer's first cut belong
    /// to no chain: a consumer not seen yet has none.
    fn peek(&self, consumer: &str, chunk_size: Option<u64>) -> Answer {
        let c = self.consumers.get(consumer);
        let blocks = c.map_or(0, |c| c.blocks.blocks());
        let chunks = match (c, chunk_size) {
            (Some(c), Some(cs)) => c
                .blocks
                .chunks_touched(cs / nightpass_proto::changes::BLOCK),
            _ => 0,
        };
        Answer::Peek {
            epoch: self.epoch.clone(),
            seq: c.map(|c| c.seq),
            blocks,
            chunks,
        }
    }

    fn cut(&mut self, consumer: &str) -> Result<Answer> {
        let c = self.consumers.entry(consumer.to_string()).or_default();
        let previous = (c.seq > 0).then_some(c.seq);
        c.seq += 1;
        let seq = c.seq;
        let blocks = c.blocks.take();
        let file = self
            .dir
            .join("cuts")
            .join(format!("{}-{seq}", state::key_for(consumer)));
        tracking::write_blocks(&file, &blocks)?;
        Ok(Answer::Cut {
            epoch: self.epoch.clone(),
            seq,
            previous,
            file,
            blocks: blocks.blocks(),
        })
    }

    /// The tracker stops: the record ends with it.
    pub fn close(self, reason: &str) {
        let _ = tracking::log_ended(&self.dir, &self.epoch.id, reason);
        let _ = std::fs::remove_file(tracking::socket_path(&self.dir));
    }
}

fn reply(mut stream: UnixStream, answer: &Answer) {
    let mut line = serde_json::to_string(answer).expect("an answer serializes");
    line.push('\n');
    let _ = stream.write_all(line.as_bytes());
}

fn new_epoch(dev: u32, size: u64) -> Result<Epoch> {
    let id: [u8; 16] = rand::random();
    Ok(Epoch {
        id: id.iter().map(|b| format!("{b:02x}")).collect(),
        boot_id: tracking::boot_id()?,
        dev,
        size,
        lv_uuid: None,
        started_unix_s: now_unix(),
        pid: std::process::id(),
    })
}

/// Tells systemd (a `Type=notify` unit) that recording has started, when
/// run under it.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let path = PathBuf::from(path);
    let sent = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(b"READY=1", &a))
        }
        None => sock.send_to(b"READY=1", &path),
    };
    if let Err(e) = sent {
        tracing::warn!("cannot tell systemd we are ready: {e}");
    }
}

/// Settings of `nightpass track`.
#[derive(Debug, Clone)]
pub struct TrackConfig {
    /// The sources to track.
    pub sources: Vec<PathBuf>,
    /// The sender's state directory (where passes look for the record).
    pub state_dir: PathBuf,
    /// Trace buffer per CPU in KiB (0: the kernel's default).
    pub buffer_kb: u32,
    /// `--json`: also emit a `track_start` event on stdout.
    pub json: bool,
}

/// How often the tracker looks at its devices' sizes.
const SIZE_CHECK: Duration = Duration::from_secs(1);
/// How long a cut may wait for the events before it to come through.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the tracker until `stop` is set: every source checked and taken
/// first (nothing is traced when one is refused), then one trace session
/// for all of them.
pub fn run(cfg: &TrackConfig, progress: &dyn Progress, stop: &AtomicBool) -> Result<i32> {
    if cfg.sources.is_empty() {
        return Err(Error::input(
            "give at least one SOURCE block device to track",
        ));
    }
    let mut tracked = Vec::new();
    for s in &cfg.sources {
        tracked.push(Tracked::open(&cfg.state_dir, s)?);
    }
    let _ = crate::io::track::remove_stale_instances();
    let mut devs: Vec<u32> = tracked.iter().map(|t| t.trace_dev).collect();
    devs.sort_unstable();
    devs.dedup();
    let mut session = TraceSession::start(&devs, cfg.buffer_kb)?;
    let mut lost = session.health()?.lost();
    // Said with SOURCE as the operator gave it (a symlink such as
    // /dev/vg0/filer01 stays so), once every source is recording.
    for (t, given) in tracked.iter().zip(&cfg.sources) {
        tracing::info!("tracking {}", given.display());
        if cfg.json {
            let v = serde_json::json!({
                "event": "track_start",
                "source": given.display().to_string(),
                "device": t.path.display().to_string(),
                "epoch": t.epoch.id,
            });
            progress.event(&v, "");
        }
    }
    notify_ready();
    let mut sized = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let events = session.poll(Duration::from_millis(100))?;
        apply(&mut tracked, &events);
        lost = check_health(&mut session, &mut tracked, lost, &devs, cfg.buffer_kb)?;
        if sized.elapsed() >= SIZE_CHECK {
            for t in &mut tracked {
                t.check_size()?;
            }
            sized = Instant::now();
        }
        lost = serve_requests(&mut session, &mut tracked, lost, &devs, cfg.buffer_kb)?;
    }
    for t in tracked {
        t.close("the tracker stopped");
    }
    Ok(0)
}

fn apply(tracked: &mut [Tracked], events: &[BlockEvent]) {
    for e in events {
        for t in tracked.iter_mut() {
            t.mark(e.dev, e.sector, u64::from(e.sectors));
        }
    }
}

/// Ends every record's epoch at the first lost event, and starts a new
/// trace session when the instance stopped delivering (removed, tracing
/// or an event turned off by someone else). Returns the loss count now.
fn check_health(
    session: &mut TraceSession,
    tracked: &mut [Tracked],
    lost: u64,
    devs: &[u32],
    buffer_kb: u32,
) -> Result<u64> {
    let h = session.health()?;
    if h.lost() > lost {
        let why = format!(
            "{} trace events were lost (the trace buffer overran; a larger --trace-buffer helps)",
            h.lost() - lost
        );
        for t in tracked.iter_mut() {
            t.end_epoch(&why)?;
        }
        return Ok(h.lost());
    }
    if h.present && h.tracing_on && h.events_on {
        return Ok(lost);
    }
    let why =
        "the trace instance stopped delivering events (removed or turned off by someone else)";
    for t in tracked.iter_mut() {
        t.end_epoch(why)?;
    }
    *session = TraceSession::start(devs, buffer_kb)?;
    Ok(session.health()?.lost())
}

/// Answers the passes' requests: a cut (and a peek, which counts what the
/// next cut would hold) drains every event up to now into the record
/// first, and checks nothing was lost before it answers.
fn serve_requests(
    session: &mut TraceSession,
    tracked: &mut [Tracked],
    mut lost: u64,
    devs: &[u32],
    buffer_kb: u32,
) -> Result<u64> {
    let mut waiting = Vec::new();
    for (i, t) in tracked.iter().enumerate() {
        while let Some((stream, request)) = t.next_request() {
            waiting.push((i, stream, request));
        }
    }
    if waiting.is_empty() {
        return Ok(lost);
    }
    if waiting
        .iter()
        .any(|(_, _, r)| matches!(r, Request::Cut { .. } | Request::Peek { .. }))
    {
        match session.drain(DRAIN_TIMEOUT) {
            Ok(drained) => apply(tracked, &drained),
            Err(e) => {
                // Without a drain the cut might miss writes before it.
                let why = format!("the events before a pass's cut could not be drained: {e}");
                for t in tracked.iter_mut() {
                    t.end_epoch(&why)?;
                }
            }
        }
        lost = check_health(session, tracked, lost, devs, buffer_kb)?;
    }
    for (i, stream, request) in waiting {
        tracked[i].answer(stream, request, lost);
    }
    Ok(lost)
}
