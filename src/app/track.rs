//! `nightpass track SOURCE...`: records every write to each source block
//! device, so that passes read only what changed.
//!
//! Owns the tracker's policy: which sources may be tracked (block devices,
//! not already tracked into this state directory), the epoch of each
//! record and when it ends (the tracker stops or crashes, an event is
//! lost, the device changes size or identity), the blocks written since
//! each consumer's (volume's) last cut, and answering the passes' requests
//! on each source's socket. The kernel's events come from
//! `crate::io::track`; the files and the request format from
//! [`crate::store::tracking`]. It must not read or write volume data.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nightpass_proto::changes::{blocks_of_sectors, BlockRuns};

use crate::error::{Error, IoContext, Result};
use crate::io::sys;
use crate::progress::now_unix;
use crate::store::state;
use crate::store::tracking::{self, Answer, Epoch, Request};

/// The kernel's encoding of a device number in block trace events
/// (`MAJOR << 20 | MINOR`).
pub fn kernel_dev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (major << 20) | (minor & ((1 << 20) - 1))
}

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
        let dev = kernel_dev(meta.rdev());
        let epoch = new_epoch(dev, size)?;
        epoch.write(&dir)?;
        let (trace_dev, start) = (dev, 0);
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
