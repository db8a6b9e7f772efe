//! How far a pass is: bytes scanned and sent, their rates, the bytes the
//! pass can be expected to send, and an ETA that follows the slower of
//! scanning and sending. Feeds the terminal's bars and, without a
//! terminal, a progress line every interval (`--progress-interval`) on
//! stderr, so that a pass under systemd or nohup is seen moving.
//!
//! Owns these numbers and the ticker thread; knows nothing of a pass but
//! what [`super::Progress`] reports.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::human_bytes;

/// Running totals of one pass (or one verify).
#[derive(Debug)]
pub struct Meter {
    /// What the line calls the work (`pass 3 of HOST:PORT/NAME`).
    label: String,
    /// Bytes to scan in all.
    total: AtomicU64,
    /// Whether the work sends (a pass) or only reads (a verify).
    sends: bool,
    started: Instant,
    scanned: AtomicU64,
    /// When the scan ended, in ns after the start (0: not yet).
    scan_end_ns: AtomicU64,
    queued: AtomicU64,
    sent: AtomicU64,
}

/// The numbers of a [`Meter`] at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Bytes to scan in all.
    pub total: u64,
    /// Bytes scanned so far.
    pub scanned: u64,
    /// Payload bytes of the chunks found to send so far (sent or queued).
    pub queued: u64,
    /// Payload bytes sent so far.
    pub sent: u64,
    /// Time since the start.
    pub elapsed: Duration,
    /// Time the scan took, or has taken so far.
    pub scanning: Duration,
}

impl Meter {
    /// A meter of `total` bytes to scan, started now; `sends` when the
    /// work also sends (a pass).
    pub fn new(label: &str, total: u64, sends: bool) -> Meter {
        Meter {
            label: label.to_string(),
            total: AtomicU64::new(total),
            sends,
            started: Instant::now(),
            scanned: AtomicU64::new(0),
            scan_end_ns: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }

    /// The work reads `total` bytes in all after all (a tracked pass reads
    /// part of the volume).
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// `n` more bytes scanned.
    pub fn scanned(&self, n: u64) {
        let total = self.total.load(Ordering::Relaxed);
        let before = self.scanned.fetch_add(n, Ordering::Relaxed);
        if before < total && before + n >= total {
            let ns = self.started.elapsed().as_nanos().max(1) as u64;
            self.scan_end_ns.store(ns, Ordering::Relaxed);
        }
    }

    /// Chunks of `n` payload bytes found to send (queued for the streams).
    pub fn queued(&self, n: u64) {
        self.queued.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more payload bytes sent.
    pub fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// The numbers now.
    pub fn read(&self) -> Reading {
        let elapsed = self.started.elapsed();
        let scanning = match self.scan_end_ns.load(Ordering::Relaxed) {
            0 => elapsed,
            ns => Duration::from_nanos(ns),
        };
        let total = self.total.load(Ordering::Relaxed);
        Reading {
            scanning,
            total,
            scanned: self.scanned.load(Ordering::Relaxed).min(total),
            queued: self.queued.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            elapsed,
        }
    }

    /// The progress line now.
    pub fn line(&self) -> String {
        let r = self.read();
        if self.sends {
            return r.line(&self.label);
        }
        let eta = match r.scanned {
            0 => "unknown".to_string(),
            n => short_duration(Duration::from_secs_f64(
                ((r.total.saturating_sub(n)) as f64 / r.scan_rate()).min(1e9),
            )),
        };
        format!(
            "{}: {} of {} at {}/s, ETA {eta}",
            self.label,
            human_bytes(r.scanned),
            human_bytes(r.total),
            human_bytes(r.scan_rate() as u64)
        )
    }
}

impl Reading {
    /// Bytes scanned per second while scanning.
    pub fn scan_rate(&self) -> f64 {
        self.scanned as f64 / self.scanning.as_secs_f64().max(1e-3)
    }

    /// Payload bytes sent per second since the start.
    pub fn send_rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }

    /// The payload bytes the whole pass can be expected to send: those
    /// found to send so far, and as many again in the proportion of the
    /// volume left to scan; the scan total before any is found (or before a
    /// pass reports what it finds). Never less than what was sent.
    pub fn expected_sent(&self) -> u64 {
        let found = self.queued.max(self.sent);
        if self.scanned == 0 || found == 0 {
            return self.total.max(self.sent);
        }
        let projected = found as f64 * self.total as f64 / self.scanned as f64;
        // A pass sends at most its chunks whole (and again what a lost link
        // dropped, which is already sent): a chunk found just before its
        // block's bytes are counted as scanned must not inflate this.
        (projected as u64).min(self.total).max(found)
    }

    /// Time left, by the slower of scanning (the bytes left to read at the
    /// scan rate) and sending (the bytes expected but not yet sent, at the
    /// send rate): under `--bwlimit`, sending, which lags the scan by what
    /// is queued. `None` before there is a rate.
    pub fn eta(&self) -> Option<Duration> {
        let send = self.send_eta();
        if self.scanned >= self.total {
            return send;
        }
        if self.scanned == 0 {
            return None;
        }
        let scan = (self.total - self.scanned) as f64 / self.scan_rate();
        let send = send?.as_secs_f64();
        Some(Duration::from_secs_f64(scan.max(send).min(1e9)))
    }

    /// Time to send what is expected and not yet sent, at the send rate:
    /// zero while nothing was found to send; unknown while something was
    /// but nothing has left yet.
    fn send_eta(&self) -> Option<Duration> {
        if self.queued.max(self.sent) == 0 {
            return Some(Duration::ZERO);
        }
        let left = self.expected_sent().saturating_sub(self.sent);
        if left == 0 {
            return Some(Duration::ZERO);
        }
        let rate = self.send_rate();
        if self.sent == 0 || rate <= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64((left as f64 / rate).min(1e9)))
    }

    /// `LABEL: scanned A of B (P%) at R/s, sent C of ~D at S/s, ETA T`.
    pub fn line(&self, label: &str) -> String {
        let pct = if self.total == 0 {
            100.0
        } else {
            self.scanned as f64 * 100.0 / self.total as f64
        };
        let eta = self.eta().map_or("unknown".to_string(), short_duration);
        format!(
            "{label}: scanned {} of {} ({pct:.0}%) at {}/s, sent {} of ~{} at {}/s, ETA {eta}",
            human_bytes(self.scanned),
            human_bytes(self.total),
            human_bytes(self.scan_rate() as u64),
            human_bytes(self.sent),
            human_bytes(self.expected_sent()),
            human_bytes(self.send_rate() as u64),
        )
    }
}

/// `2h05m`, `4m30s`, `12s` (to the nearest second).
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Writes a [`Meter`]'s line on stderr every interval until dropped.
#[derive(Debug)]
pub struct Ticker {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts writing `meter`'s line every `every` (which must not be 0).
    pub fn start(meter: Arc<Meter>, every: Duration) -> Ticker {
        let (stop, stopped) = channel::<()>();
        let thread = std::thread::spawn(move || loop {
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {
                    let mut e = std::io::stderr().lock();
                    let _ = writeln!(e, "{}", meter.line());
                }
                _ => return,
            }
        });
        Ticker {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(total: u64, scanned: u64, queued: u64, sent: u64, secs: u64) -> Reading {
        Reading {
            total,
            scanned,
            queued,
            sent,
            elapsed: Duration::from_secs(secs),
            scanning: Duration::from_secs(secs),
        }
    }

    #[test]
    fn the_eta_follows_the_slower_of_scanning_and_sending() {
        // Scanning is the slower: 100 of 1000 read in 10 s, 90 s to go;
        // a tenth changes and leaves at once.
        let r = at(1000, 100, 10, 10, 10);
        assert_eq!(r.eta(), Some(Duration::from_secs(90)));
        // Sending is the slower (a bandwidth limit): everything changes,
        // 400 read and queued in 10 s, 100 sent: 900 left at 10/s.
        let r = at(1000, 400, 400, 100, 10);
        assert_eq!(r.expected_sent(), 1000);
        assert_eq!(r.eta(), Some(Duration::from_secs(90)));
        // The scan is over; what is queued still has to leave.
        let r = at(1000, 1000, 300, 100, 10);
        assert_eq!(r.expected_sent(), 300);
        assert_eq!(r.eta(), Some(Duration::from_secs(20)));
        assert_eq!(at(1000, 1000, 300, 300, 10).eta(), Some(Duration::ZERO));
        assert_eq!(at(1000, 0, 0, 0, 1).eta(), None);
        // Found but nothing sent yet (connecting, or a slow first send):
        // unknown, not the scan's.
        assert_eq!(at(1000, 500, 100, 0, 1).eta(), None);
        // Nothing found to send: the scan alone.
        assert_eq!(at(1000, 500, 0, 0, 10).eta(), Some(Duration::from_secs(10)));
    }

    #[test]
    fn the_sent_total_is_the_scan_total_until_a_projection() {
        assert_eq!(at(1000, 0, 0, 0, 1).expected_sent(), 1000);
        assert_eq!(at(1000, 500, 0, 0, 1).expected_sent(), 1000);
        assert_eq!(at(1000, 500, 100, 50, 1).expected_sent(), 200);
        // Found ahead of what is counted scanned: never more than the total.
        assert_eq!(at(1000, 100, 300, 0, 1).expected_sent(), 1000);
        // A reporter that is not told what is queued projects what was sent.
        assert_eq!(at(1000, 500, 0, 100, 1).expected_sent(), 200);
    }

    #[test]
    fn the_line_says_everything() {
        let line = at(4 << 30, 1 << 30, 256 << 20, 256 << 20, 10).line("pass 2 of h:1/v");
        assert!(
            line.starts_with("pass 2 of h:1/v: scanned 1.00 GiB of 4.00 GiB (25%)"),
            "{line}"
        );
        assert!(line.contains("sent 256.00 MiB of ~1.00 GiB"), "{line}");
        assert!(line.contains("ETA 30s"), "{line}");
        assert_eq!(short_duration(Duration::from_secs(7500)), "2h05m");
        assert_eq!(short_duration(Duration::from_secs(270)), "4m30s");
    }
}
