//! One private tracing instance, from `mkdir` to `rmdir`: set up, read,
//! drained and checked for loss.
//!
//! Owns the instance directory and the open per-CPU readers; must not keep
//! any record of what it read (the caller does).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::format::{BlockFormat, Decoder, EventFormat, MarkerFormat, Record};
use super::page::{Page, PageLayout};
use super::tracefs::{self, PREFIX};
use super::{BlockEvent, Health, Phase};
use crate::error::{Error, IoContext, Result};

/// The tag of our drain markers in `trace_marker_raw` ("npdr").
const MARKER_TAG: u32 = u32::from_le_bytes(*b"npdr");
/// The block events we enable, and when each sees an operation.
const EVENTS: [(&str, Phase); 3] = [
    ("block_bio_queue", Phase::Queued),
    ("block_rq_complete", Phase::Completed),
    ("block_bio_complete", Phase::Completed),
];
/// At most this many pages are read from one CPU per call, so a writer
/// faster than us cannot keep one call going for ever.
const PAGES_PER_CALL: usize = 4096;
/// How long a wake-up lets events gather before reading them: 5 ms, while
/// the default buffer (1410 KiB per CPU, about 22 000 block events) takes
/// over 100 ms to fill at 100 000 events per second on one CPU.
const BATCH: Duration = Duration::from_millis(5);

/// One CPU's buffer, open non-blocking.
struct CpuReader {
    cpu: usize,
    file: File,
}

/// A private tracefs instance tracing the block operations of some devices.
/// Dropping it turns tracing off and removes the instance.
pub struct TraceSession {
    dir: PathBuf,
    devices: Vec<u32>,
    cpus: Vec<CpuReader>,
    marker: Option<File>,
    layout: PageLayout,
    decoder: Decoder,
    missed_pages: u64,
    nonce: u64,
    seq: u64,
    page: Vec<u8>,
}

/// What setting up an instance gives.
struct Setup {
    layout: PageLayout,
    decoder: Decoder,
    cpus: Vec<CpuReader>,
    marker: File,
}

impl TraceSession {
    /// Mounts tracefs if absent (root), creates a private instance
    /// `nightpass-<pid>-<random>`, sets `buffer_size_kb` per CPU (0 = the
    /// kernel's default), enables `block:block_bio_queue`,
    /// `block:block_rq_complete` and `block:block_bio_complete`, each
    /// filtered to `devices` (kernel dev_t, `MAJOR<<20 | MINOR`), non-reads
    /// and operations with sectors, and starts tracing: every operation
    /// submitted after this returns is seen.
    ///
    /// Refused (exit 2): no devices, a device that does not exist, a
    /// partition (its events carry the disk's dev_t: trace the disk, see
    /// [`super::partition_of`]), no tracefs.
    pub fn start(devices: &[u32], buffer_kb: u32) -> Result<TraceSession> {
        check_devices(devices)?;
        let root = tracefs::root()?;
        let name = format!(
            "{PREFIX}{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let dir = root.join("instances").join(name);
        fs::create_dir(&dir).map_err(|e| {
            Error::input(format!(
                "cannot create the tracing instance {}: {e}",
                dir.display()
            ))
        })?;
        let setup = match setup(&dir, devices, buffer_kb) {
            Ok(s) => s,
            Err(e) => {
                let _ = tracefs::remove_instance(&dir);
                return Err(e);
            }
        };
        tracing::debug!(instance = %dir.display(), cpus = setup.cpus.len(), "tracing started");
        Ok(TraceSession {
            page: vec![0; setup.layout.page_size],
            dir,
            devices: devices.to_vec(),
            cpus: setup.cpus,
            marker: Some(setup.marker),
            layout: setup.layout,
            decoder: setup.decoder,
            missed_pages: 0,
            nonce: rand::random(),
            seq: 0,
        })
    }

    /// The instance's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every event available now from every CPU, waiting at most
    /// `timeout` for the first, or until one of `wake` is readable (a
    /// pass's request on the tracker's socket: answered at once, not after
    /// the timeout of a quiet device); returns the non-read events with
    /// sectors of the traced devices (possibly none).
    pub fn poll(&mut self, timeout: Duration, wake: &[BorrowedFd<'_>]) -> Result<Vec<BlockEvent>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut markers = Vec::new();
        loop {
            let pages = self.read_available(&mut out, &mut markers)?;
            if !out.is_empty() {
                return Ok(out);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.wait(left, pages, wake)? {
                return Ok(out);
            }
        }
    }

    /// Reads until a marker written now has come through every CPU's
    /// buffer, and returns every event read: each event recorded before
    /// this call (the submission of every operation submitted before it,
    /// the completion of every one completed before it) is among them or
    /// was returned earlier. An operation still in flight completes later:
    /// its [`Phase::Completed`] event comes in a later poll.
    ///
    /// The argument: a marker is written to `trace_marker_raw` by a thread
    /// pinned to each CPU in turn, so it lands in that CPU's buffer after
    /// every event recorded there before (a tracepoint records with
    /// preemption disabled, so an event begun on a CPU is committed before
    /// our thread runs there), and each buffer is read in order. A CPU we
    /// may not run on is read until empty instead (logged).
    pub fn drain(&mut self, timeout: Duration) -> Result<Vec<BlockEvent>> {
        self.seq += 1;
        let want = [self.nonce, self.seq];
        let marked = self.write_markers(want)?;
        let mut seen: Vec<bool> = marked.iter().map(|m| !m).collect();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut markers = Vec::new();
        loop {
            markers.clear();
            let pages = self.read_available(&mut out, &mut markers)?;
            for (i, words) in &markers {
                if *words == want {
                    seen[*i] = true;
                }
            }
            if seen.iter().all(|s| *s) {
                return Ok(out);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<String> = (self.cpus.iter().zip(&seen))
                    .filter(|(_, s)| !**s)
                    .map(|(c, _)| c.cpu.to_string())
                    .collect();
                return Err(Error::Io(format!(
                    "drain of {}: the marker did not come through CPU {} within {timeout:?}",
                    self.dir.display(),
                    missing.join(", ")
                )));
            }
            self.wait(left, pages, &[])?;
        }
    }

    /// Events lost so far, and whether the instance still delivers.
    pub fn health(&self) -> Result<Health> {
        let mut h = Health {
            missed_pages: self.missed_pages,
            present: self.dir.is_dir(),
            ..Health::default()
        };
        if !h.present {
            return Ok(h);
        }
        for c in &self.cpus {
            let path = self.dir.join(format!("per_cpu/cpu{}/stats", c.cpu));
            let Ok(text) = tracefs::read(&path) else {
                h.present = self.dir.is_dir();
                if !h.present {
                    return Ok(h);
                }
                return Err(Error::Io(format!("cannot read {}", path.display())));
            };
            let s = tracefs::parse_stats(&text);
            h.overrun = h.overrun.saturating_add(s.overrun);
            h.commit_overrun = h.commit_overrun.saturating_add(s.commit_overrun);
            h.dropped = h.dropped.saturating_add(s.dropped);
        }
        h.tracing_on = tracefs::read(&self.dir.join("tracing_on")).is_ok_and(|v| v.trim() == "1");
        h.events_on = EVENTS.iter().all(|(name, _)| {
            tracefs::read(&self.dir.join(format!("events/block/{name}/enable")))
                .is_ok_and(|v| v.trim_start().starts_with('1'))
        });
        Ok(h)
    }

    /// Reads every CPU until it has nothing more (or [`PAGES_PER_CALL`]
    /// pages), adding our devices' events to `out` and our markers to
    /// `markers` (by CPU index). Returns the number of pages read.
    fn read_available(
        &mut self,
        out: &mut Vec<BlockEvent>,
        markers: &mut Vec<(usize, [u64; 2])>,
    ) -> Result<usize> {
        let mut pages = 0;
        for (i, c) in self.cpus.iter_mut().enumerate() {
            for _ in 0..PAGES_PER_CALL {
                let n = match c.file.read(&mut self.page) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(Error::io(
                            format!(
                                "read {}/per_cpu/cpu{}/trace_pipe_raw",
                                self.dir.display(),
                                c.cpu
                            ),
                            e,
                        ))
                    }
                };
                pages += 1;
                let Some(page) = Page::new(&self.page[..n], &self.layout) else {
                    continue;
                };
                if page.missed {
                    self.missed_pages += 1;
                }
                for payload in page {
                    match self.decoder.decode(payload) {
                        Record::Block(e) if self.devices.contains(&e.dev) => out.push(e),
                        Record::Marker { tag, words } if tag == MARKER_TAG => {
                            markers.push((i, words))
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(pages)
    }

    /// Waits up to `left` for any CPU's buffer to become readable (poll(2)
    /// on the per-CPU files; the instance's `buffer_percent` is 0, so any
    /// data wakes us), then [`BATCH`] more so events come in pages, not
    /// one by one; a file that polls readable without data cannot spin.
    /// Returns true, without the extra wait, when one of `wake` is readable.
    fn wait(&self, left: Duration, pages_read: usize, wake: &[BorrowedFd<'_>]) -> Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let ms = u16::try_from(left.as_millis().clamp(1, 1000)).unwrap_or(1000);
        let mut fds: Vec<PollFd> = (self.cpus.iter())
            .map(|c| PollFd::new(c.file.as_fd(), PollFlags::POLLIN))
            .chain(wake.iter().map(|w| PollFd::new(*w, PollFlags::POLLIN)))
            .collect();
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::Io(format!("poll the tracing buffers: {e}"))),
        }
        let woken = fds[self.cpus.len()..]
            .iter()
            .any(|f| f.revents().is_some_and(|r| !r.is_empty()));
        if woken {
            return Ok(true);
        }
        // Let events gather before reading: one wake-up per event would cost
        // more CPU than the events (a full default buffer takes far longer
        // than BATCH to fill at any rate measured here).
        let _ = pages_read;
        std::thread::sleep(left.min(BATCH));
        Ok(false)
    }

    /// Writes the marker `words` into every CPU's buffer from a thread
    /// pinned to that CPU; returns, by CPU index, whether it was written.
    fn write_markers(&self, words: [u64; 2]) -> Result<Vec<bool>> {
        let Some(marker) = &self.marker else {
            return Err(Error::Io("the tracing session is closed".into()));
        };
        let mut bytes = Vec::with_capacity(20);
        bytes.extend_from_slice(&MARKER_TAG.to_le_bytes());
        bytes.extend_from_slice(&words[0].to_le_bytes());
        bytes.extend_from_slice(&words[1].to_le_bytes());
        let cpus: Vec<usize> = self.cpus.iter().map(|c| c.cpu).collect();
        let written = std::thread::scope(|s| {
            s.spawn(|| {
                cpus.iter()
                    .map(|&cpu| mark_on(cpu, marker, &bytes))
                    .collect::<Result<Vec<bool>>>()
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Io("the drain marker thread panicked".into())))
        })?;
        Ok(written)
    }
}

/// Pins the calling thread to `cpu` and writes `bytes` to the marker file:
/// false when the thread may not run there (the CPU is offline or outside
/// our cpuset).
fn mark_on(cpu: usize, mut marker: &File, bytes: &[u8]) -> Result<bool> {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_err()
        || nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_err()
    {
        tracing::warn!(
            cpu,
            "cannot run on this CPU to drain its tracing buffer; reading it until empty"
        );
        return Ok(false);
    }
    match marker.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(true),
        Ok(n) => Err(Error::Io(format!(
            "trace_marker_raw took {n} of {} bytes",
            bytes.len()
        ))),
        Err(e) => Err(Error::io("write the drain marker to trace_marker_raw", e)),
    }
}

/// Refuses no devices, devices that do not exist, and partitions.
fn check_devices(devices: &[u32]) -> Result<()> {
    if devices.is_empty() {
        return Err(Error::input("no device to trace"));
    }
    for &dev in devices {
        let name = format!("{}:{}", dev >> 20, dev & 0xF_FFFF);
        if !tracefs::exists(dev) {
            return Err(Error::input(format!("no block device {name} to trace")));
        }
        if let Some(p) = tracefs::partition_of(dev)? {
            return Err(Error::input(format!(
                "block device {name} is a partition: the kernel names its writes by its disk \
                 {}:{} at the disk's sectors (start {}); trace the disk",
                p.disk >> 20,
                p.disk & 0xF_FFFF,
                p.start
            )));
        }
    }
    Ok(())
}

/// Configures a fresh instance: buffer, formats, filters, events, readers,
/// then tracing on.
fn setup(dir: &Path, devices: &[u32], buffer_kb: u32) -> Result<Setup> {
    tracefs::write(&dir.join("tracing_on"), "0")?;
    if buffer_kb > 0 {
        tracefs::write(&dir.join("buffer_size_kb"), &buffer_kb.to_string())?;
    }
    if dir.join("buffer_percent").exists() {
        tracefs::write(&dir.join("buffer_percent"), "0")?;
    }
    let header = tracefs::read(&dir.join("events/header_page"))?;
    let layout = PageLayout::parse(&header)
        .ok_or_else(|| Error::Io(format!("cannot read the page layout from {header:?}")))?;
    let format = |rel: &str| -> Result<EventFormat> {
        let path = dir.join("events").join(rel).join("format");
        EventFormat::parse(&tracefs::read(&path)?)
            .ok_or_else(|| Error::Io(format!("{} has no event id", path.display())))
    };
    let mut blocks = Vec::new();
    for (name, phase) in EVENTS {
        let f = format(&format!("block/{name}"))?;
        blocks.push(BlockFormat::new(&f, phase).ok_or_else(|| {
            Error::Io(format!("block:{name} lacks dev, sector, nr_sector or rwbs"))
        })?);
    }
    let marker = MarkerFormat::new(&format("ftrace/raw_data")?)
        .ok_or_else(|| Error::Io("ftrace:raw_data lacks id or buf".into()))?;
    let devs: Vec<String> = devices.iter().map(|d| format!("dev == {d}")).collect();
    let filter = format!(
        "({}) && nr_sector > 0 && !(rwbs ~ \"R*\")",
        devs.join(" || ")
    );
    for (name, _) in EVENTS {
        let event = dir.join(format!("events/block/{name}"));
        tracefs::write(&event.join("filter"), &filter)?;
        tracefs::write(&event.join("enable"), "1")?;
    }
    let mut cpus = Vec::new();
    for cpu in tracefs::cpus(dir)? {
        let path = dir.join(format!("per_cpu/cpu{cpu}/trace_pipe_raw"));
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .ctx(format!("open {}", path.display()))?;
        cpus.push(CpuReader { cpu, file });
    }
    let path = dir.join("trace_marker_raw");
    let marker_file = OpenOptions::new()
        .write(true)
        .open(&path)
        .ctx(format!("open {}", path.display()))?;
    tracefs::write(&dir.join("tracing_on"), "1")?;
    Ok(Setup {
        layout,
        decoder: Decoder { blocks, marker },
        cpus,
        marker: marker_file,
    })
}

impl Drop for TraceSession {
    /// Turns tracing and the events off, closes the readers (an instance
    /// with open files cannot be removed) and removes the instance.
    fn drop(&mut self) {
        let _ = tracefs::write(&self.dir.join("tracing_on"), "0");
        for (name, _) in EVENTS {
            let _ = tracefs::write(&self.dir.join(format!("events/block/{name}/enable")), "0");
        }
        self.cpus.clear();
        self.marker = None;
        let mut last = None;
        for _ in 0..20 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(e) = last {
            tracing::warn!(instance = %self.dir.display(), error = %e, "cannot remove the tracing instance");
        }
    }
}

/// Removes every `nightpass-<pid>-*` tracing instance whose process is
/// dead (a tracker killed by SIGKILL leaves its instance behind); returns
/// the names removed. Nothing to do without tracefs. An instance whose pid
/// was reused by a live process stays (we cannot tell it from a live
/// tracker's).
pub fn remove_stale_instances() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for root in [tracefs::TRACEFS, "/sys/kernel/debug/tracing"] {
        let instances = Path::new(root).join("instances");
        let Ok(entries) = fs::read_dir(&instances) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = tracefs::pid_of(&name) else {
                continue;
            };
            if tracefs::alive(pid) {
                continue;
            }
            match tracefs::remove_instance(&entry.path()) {
                Ok(()) => removed.push(name),
                Err(e) => tracing::warn!(error = %e, "cannot remove a stale tracing instance"),
            }
        }
        break;
    }
    Ok(removed)
}
