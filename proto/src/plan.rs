//! Pass planning as pure functions over numbers: the compression policy,
//! coalescing chunk indices into byte ranges, and the forecast of a frozen
//! final pass from the pass journal.
//!
//! # The forecast model
//! A frozen final pass must (a) read the whole volume once, (b) send what
//! changed since the last pass, (c) pay a fixed overhead (connection, final
//! commit). So, from the journal's recent passes:
//!
//! ```text
//! scan_s    = volume_size / read_rate            read_rate: bytes read per second the reader was busy, last pass
//! change_r  = mean over the last 3 delta passes of changed_bytes_k / (start_k - start_{k-1})
//! pending   = change_r * (now - start_last)      data written since the last pass began reading
//! send_s    = pending / send_rate                send_rate: changed bytes per second of the passes that moved data
//! forecast  = max(scan_s, send_s) + OVERHEAD_S   reading and sending overlap in the pipeline
//! ```
//! With fewer than two passes there is no change rate, and no forecast.

use crate::chunk::Geometry;

/// Fixed cost of a pass beyond reading and sending: connection, handshake,
/// final durable commit. Measured on loopback at well under a second; kept
/// conservative.
pub const OVERHEAD_S: f64 = 1.0;

/// Decides whether to spend CPU on compressing the next chunk.
///
/// Each attempt that saves less than 1/8 of the chunk counts as a miss. After
/// [`CompressPolicy::GIVE_UP_AFTER`] misses in a row, compression is skipped,
/// and retried once after a pause that doubles on every further miss (up to
/// [`CompressPolicy::MAX_PAUSE`] chunks), so incompressible volumes cost almost
/// nothing and a volume whose content turns compressible is noticed.
#[derive(Debug, Clone)]
pub struct CompressPolicy {
    misses: u32,
    pause: u32,
    skip_left: u32,
}

impl Default for CompressPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl CompressPolicy {
    /// Misses in a row before compression is paused.
    pub const GIVE_UP_AFTER: u32 = 8;
    /// Longest pause between probes, in chunks.
    pub const MAX_PAUSE: u32 = 1024;

    /// A policy that starts by trying.
    pub fn new() -> Self {
        CompressPolicy {
            misses: 0,
            pause: 16,
            skip_left: 0,
        }
    }

    /// True when the next chunk should be compressed.
    pub fn should_try(&mut self) -> bool {
        if self.skip_left > 0 {
            self.skip_left -= 1;
            return false;
        }
        true
    }

    /// Records the outcome of an attempt on `original` bytes.
    pub fn record(&mut self, original: usize, compressed: usize) {
        if Self::pays(original, compressed) {
            self.misses = 0;
            self.pause = 16;
        } else {
            self.misses += 1;
            if self.misses >= Self::GIVE_UP_AFTER {
                self.skip_left = self.pause;
                self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
            }
        }
    }

    /// True when sending `compressed` bytes instead of `original` is worth it.
    pub fn pays(original: usize, compressed: usize) -> bool {
        compressed + original / 8 <= original
    }
}

/// Coalesces sorted, distinct chunk indices into `(offset, length)` byte
/// ranges, merging adjacent chunks. Indices past the end are ignored.
pub fn coalesce(geometry: &Geometry, sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in sorted {
        let Some(r) = geometry.range(i) else { continue };
        match out.last_mut() {
            Some((off, len)) if *off + *len == r.start => *len += r.end - r.start,
            _ => out.push((r.start, r.end - r.start)),
        }
    }
    out
}

/// The figures of one pass, as the journal keeps them.
#[derive(Debug, Clone, PartialEq)]
pub struct PassFigures {
    /// Seconds since the Unix epoch when reading began.
    pub start_unix_s: f64,
    /// Wall time of the pass in seconds.
    pub duration_s: f64,
    /// Volume size.
    pub size_bytes: u64,
    /// Bytes read and hashed.
    pub scanned_bytes: u64,
    /// Chunks that differed from what the target held.
    pub changed_chunks: u64,
    /// Uncompressed bytes of those chunks.
    pub changed_bytes: u64,
    /// Seconds the reader was busy reading and hashing (not waiting on the link).
    pub read_busy_s: f64,
    /// True for the first pass of a volume (everything changed: no change rate).
    pub first: bool,
}

/// A forecast of a frozen final pass, with its parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Total seconds.
    pub total_s: f64,
    /// Seconds to read the volume.
    pub scan_s: f64,
    /// Seconds to send the data expected to have changed.
    pub send_s: f64,
    /// Bytes expected to have changed since the last pass began.
    pub pending_bytes: f64,
    /// Measured change rate in bytes per second.
    pub change_rate_bps: f64,
}

/// Forecasts a frozen final pass run at `now_unix_s`, from passes oldest first.
pub fn forecast(passes: &[PassFigures], now_unix_s: f64) -> Option<Forecast> {
    let last = passes.last()?;
    let read_rate = last.scanned_bytes as f64 / last.read_busy_s.max(1e-3);
    if last.scanned_bytes == 0 && last.size_bytes > 0 {
        return None;
    }
    let scan_s = if last.size_bytes == 0 {
        0.0
    } else {
        last.size_bytes as f64 / read_rate
    };
    let rates: Vec<f64> = passes
        .windows(2)
        .filter(|w| !w[1].first)
        .map(|w| {
            let dt = (w[1].start_unix_s - w[0].start_unix_s).max(1e-3);
            w[1].changed_bytes as f64 / dt
        })
        .collect();
    let recent = &rates[rates.len().saturating_sub(3)..];
    if recent.is_empty() {
        return None;
    }
    let change_rate = recent.iter().sum::<f64>() / recent.len() as f64;
    let pending = change_rate * (now_unix_s - last.start_unix_s).max(0.0);
    let send_rate = passes
        .iter()
        .filter(|p| p.changed_bytes > 0 && p.duration_s > 0.0)
        .map(|p| p.changed_bytes as f64 / p.duration_s)
        .fold(0.0f64, f64::max);
    let send_s = if pending <= 0.0 {
        0.0
    } else if send_rate > 0.0 {
        pending / send_rate
    } else {
        f64::INFINITY
    };
    Some(Forecast {
        total_s: scan_s.max(send_s) + OVERHEAD_S,
        scan_s,
        send_s,
        pending_bytes: pending,
        change_rate_bps: change_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkSize;

    #[test]
    fn policy_gives_up_and_probes_again() {
        let mut p = CompressPolicy::new();
        for _ in 0..CompressPolicy::GIVE_UP_AFTER {
            assert!(p.should_try());
            p.record(65536, 65600);
        }
        let skipped = (0..100).filter(|_| !p.should_try()).count();
        assert_eq!(skipped, 16, "pauses 16 chunks after giving up");
        p.record(65536, 1000);
        assert!(p.should_try(), "a success resets the policy");
    }

    #[test]
    fn pays_needs_an_eighth() {
        assert!(CompressPolicy::pays(800, 700));
        assert!(!CompressPolicy::pays(800, 701));
    }

    #[test]
    fn coalesce_merges_adjacent_chunks() {
        let g = Geometry::new(10 * 4096 + 100, ChunkSize::new(4096).unwrap()).unwrap();
        assert_eq!(
            coalesce(&g, &[0, 1, 3, 9, 10, 11]),
            vec![(0, 8192), (3 * 4096, 4096), (9 * 4096, 4096 + 100)]
        );
        assert!(coalesce(&g, &[]).is_empty());
    }

    fn pass(start: f64, dur: f64, changed: u64, first: bool) -> PassFigures {
        PassFigures {
            start_unix_s: start,
            duration_s: dur,
            size_bytes: 1000,
            scanned_bytes: 1000,
            changed_chunks: changed / 10,
            changed_bytes: changed,
            read_busy_s: 10.0,
            first,
        }
    }

    #[test]
    fn no_forecast_from_a_first_pass_alone() {
        assert_eq!(forecast(&[pass(0.0, 100.0, 1000, true)], 100.0), None);
        assert_eq!(forecast(&[], 100.0), None);
    }

    #[test]
    fn forecast_by_hand() {
        // read rate 1000 B / 10 s = 100 B/s: scan 10 s.
        // delta passes: 200 B over 100 s (2 B/s), 100 B over 50 s (2 B/s): change rate 2 B/s.
        // now is 40 s after the last start: 80 B pending.
        // send rate: best of 1000/100, 200/20, 100/10 = 10 B/s: 8 s, hidden behind the 10 s scan.
        let passes = [
            pass(0.0, 100.0, 1000, true),
            pass(100.0, 20.0, 200, false),
            pass(150.0, 10.0, 100, false),
        ];
        let f = forecast(&passes, 190.0).unwrap();
        assert!((f.scan_s - 10.0).abs() < 1e-9);
        assert!((f.change_rate_bps - 2.0).abs() < 1e-9);
        assert!((f.pending_bytes - 80.0).abs() < 1e-9);
        assert!((f.send_s - 8.0).abs() < 1e-9);
        assert!((f.total_s - (10.0 + OVERHEAD_S)).abs() < 1e-9);
        // 200 s later 480 B are pending: 48 s of sending dominates.
        let f = forecast(&passes, 390.0).unwrap();
        assert!((f.total_s - (48.0 + OVERHEAD_S)).abs() < 1e-9);
    }
}
