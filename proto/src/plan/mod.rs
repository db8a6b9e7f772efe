//! Pass planning as pure functions over numbers: the compression policy,
//! coalescing chunk indices into byte ranges (through [`ChunkSet`]), and the forecast of a frozen
//! final pass from the pass journal.
//!
//! # The forecast model
//! A frozen final pass must (a) read the whole volume once while the
//! receiver reads its whole target for the proof, (b) send what changed
//! since the last pass, (c) pay the fixed cost of a pass (connection,
//! final durable commit) and (d) pay the cost of the freeze itself (the
//! freeze's own flush, the proof's sessions and its re-check of the chunks
//! the pass rewrote, the thaw). Every term is measured, from the journal's
//! recent passes and cutovers ("recent": the last 3; the first pass of a
//! volume copies everything and measures neither reading nor overhead):
//!
//! ```text
//! read_rate = median over recent delta passes of scanned / read_busy   bytes per second the reader was busy
//! target_r  = median over recent whole-target reads alongside a pass of size / their duration
//! scan_s    = size / min(read_rate, target_r)      the proof's read of the target runs alongside
//! change_r  = mean over recent delta passes of changed_bytes_k / (start_k - start_{k-1})
//! pending   = change_r * (now - start_last)       data written since the last pass began reading,
//!             or, with an unbroken change record, the bytes of the chunks it names now
//! send_rate = best changed_bytes / duration of the passes that moved data
//! send_s    = pending / send_rate
//! pass_oh   = median over recent delta passes of max(0, duration - max(read_busy, changed / send_rate))
//! freeze_oh = median over recent cutovers (of the same kind, tracked or full, when
//!             any) of max(0, frozen_s - their passes' duration - a tracked proof's read),
//!             else default_freeze_overhead_s(size) (0.075 s + 0.02 s per GiB, measured here)
//! forecast  = max(scan_s, send_s) + pass_oh + freeze_oh   reading and sending overlap in the pipeline
//! ```
//! Medians, because a pass's speed on a shared machine varies from one pass
//! to the next by more than the model's other terms. With fewer than two
//! passes there is no change rate, and no forecast.
//!
//! `converge` runs its passes after the first as rehearsals of the frozen
//! pass (the receiver reads its target alongside, as for the proof), so the
//! read rates measured are those of the cutover's pass, contention included.

use crate::chunk::Geometry;
use crate::chunkset::ChunkSet;

/// Cost of the freeze beyond its passes, before any cutover of the volume
/// has measured its own: the freeze's flush (after a `syncfs` while writers
/// still run), the proof's two verify sessions, dropping the source's cached
/// pages, exchanging and comparing the chunk tables, the re-check of the
/// chunks the pass rewrote after the receiver's read of them. Measured with
/// `scripts/cutover-figures.sh` on loopback: 0.09 to 0.11 s for 1 GiB, 0.155
/// to 0.16 s for 4 GiB, so a fixed part and a part per GiB.
pub fn default_freeze_overhead_s(size_bytes: u64) -> f64 {
    0.075 + 0.02 * size_bytes as f64 / (1u64 << 30) as f64
}

/// How many recent passes or cutovers a measured term is taken over.
const RECENT: usize = 3;

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

/// Coalesces chunk indices into `(offset, length)` byte ranges, merging
/// adjacent chunks; indices past the end are ignored. A thin wrapper over
/// [`ChunkSet`], which owns the conversion.
pub fn coalesce(geometry: &Geometry, sorted: &[u64]) -> Vec<(u64, u64)> {
    ChunkSet::from_indices(geometry, sorted.iter().copied())
        .byte_ranges()
        .collect()
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
    /// The pass read only what a change record named (and an audit
    /// sample), not the whole volume.
    pub tracked: bool,
}

/// The figures of one finished cutover, as the journal keeps them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CutoverFigures {
    /// Seconds the source was frozen.
    pub frozen_s: f64,
    /// Seconds of that spent in the cutover's passes.
    pub passes_s: f64,
    /// Seconds of it spent in a tracked proof's read after the passes
    /// (forecast as its own term; 0 for a full proof, whose recheck is
    /// part of the freeze's overhead).
    pub proof_s: f64,
    /// The cutover's proof was tracked: its overhead is a tracked
    /// cutover's (a full proof's recheck of what the pass rewrote is not).
    pub tracked: bool,
}

/// A volume's journal as forecast inputs, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Every pass.
    pub passes: Vec<PassFigures>,
    /// Every finished cutover.
    pub cutovers: Vec<CutoverFigures>,
    /// Bytes per second of every whole-target read by the receiver alongside
    /// a pass (rehearsals and cutovers), measured from the sender's side.
    pub target_read_rates: Vec<f64>,
    /// What the final pass will read, when the caller knows.
    pub final_scan: FinalScan,
}

/// What the final pass will read, as its caller knows it now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum FinalScan {
    /// Not known: tracked when the last pass was, with what the change
    /// rate predicts as changed.
    #[default]
    Unknown,
    /// The whole volume (`--scan full`, a full proof).
    Full,
    /// Tracked, over the chunks an unbroken change record names as
    /// written since the last pass's scan began, counted now.
    Tracked {
        /// Bytes of those chunks.
        changed_bytes: f64,
    },
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
    /// Fixed cost of a pass.
    pub pass_overhead_s: f64,
    /// Cost of the freeze beyond its passes.
    pub freeze_overhead_s: f64,
    /// The final pass is assumed tracked (the last pass was): it reads the
    /// chunks changed since and the audit sample, not the volume.
    pub tracked: bool,
    /// Seconds for a tracked proof: the receiver reads fresh what the
    /// frozen pass read, after it (0 for a full pass, whose proof reads
    /// the target alongside).
    pub proof_s: f64,
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn recent(v: &[f64]) -> &[f64] {
    &v[v.len().saturating_sub(RECENT)..]
}

/// Read rates of the delta passes that read something, oldest first (a
/// first pass reads while it writes everything: not the rate of a delta).
/// The read rates of delta passes: of full ones when there are any (a
/// tracked pass reads little, scattered, and its rate says little about a
/// whole read), else of tracked ones.
fn delta_read_rates(passes: &[PassFigures]) -> Vec<f64> {
    let rates = |tracked: bool| -> Vec<f64> {
        passes
            .iter()
            .filter(|p| !p.first && p.scanned_bytes > 0 && p.tracked == tracked)
            .map(PassFigures::read_rate)
            .collect()
    };
    let full = rates(false);
    if full.is_empty() {
        rates(true)
    } else {
        full
    }
}

/// The read rate of tracked passes (scattered chunks read one run at a
/// time, slower per byte than a whole read), when any read enough to say.
fn tracked_read_rate(passes: &[PassFigures]) -> Option<f64> {
    let rates: Vec<f64> = passes
        .iter()
        .filter(|p| p.tracked && p.scanned_bytes >= 16 << 20)
        .map(PassFigures::read_rate)
        .collect();
    median(recent(&rates))
}

/// The best rate at which a pass sent what changed.
fn send_rate(passes: &[PassFigures]) -> f64 {
    passes
        .iter()
        .filter(|p| p.changed_bytes > 0 && p.duration_s > 0.0)
        .map(|p| p.changed_bytes as f64 / p.duration_s)
        .fold(0.0f64, f64::max)
}

/// Bytes a tracked pass reads beyond what changed (its audit sample, and
/// chunks the record named whose content came back unchanged): the median
/// over recent tracked passes.
fn tracked_extra_bytes(passes: &[PassFigures]) -> f64 {
    let extra: Vec<f64> = passes
        .iter()
        .filter(|p| p.tracked)
        .map(|p| p.scanned_bytes.saturating_sub(p.changed_bytes) as f64)
        .collect();
    median(recent(&extra)).unwrap_or(0.0)
}

impl PassFigures {
    fn read_rate(&self) -> f64 {
        self.scanned_bytes as f64 / self.read_busy_s.max(1e-3)
    }
}

/// The mean change rate (bytes per second) over recent delta passes, from
/// what each sent and the time since the one before; none before a delta.
fn change_rate(passes: &[PassFigures]) -> Option<f64> {
    let rates: Vec<f64> = passes
        .windows(2)
        .filter(|w| !w[1].first)
        .map(|w| {
            let dt = (w[1].start_unix_s - w[0].start_unix_s).max(1e-3);
            w[1].changed_bytes as f64 / dt
        })
        .collect();
    let rates = recent(&rates);
    (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
}

/// A pass's fixed cost: the median over recent delta passes of what their
/// duration had beyond reading and sending.
fn pass_overhead(passes: &[PassFigures], send_rate: f64) -> f64 {
    let residuals: Vec<f64> = passes
        .iter()
        .filter(|p| !p.first)
        .map(|p| {
            let sending = if send_rate > 0.0 {
                p.changed_bytes as f64 / send_rate
            } else {
                0.0
            };
            (p.duration_s - p.read_busy_s.max(sending)).max(0.0)
        })
        .collect();
    median(recent(&residuals)).unwrap_or(0.0)
}

/// The freeze's cost beyond its passes (and a tracked proof's read): the
/// median over recent cutovers of the kind forecast (`tracked` or full)
/// when there are any, else over all; none before the first cutover.
fn freeze_overhead(cutovers: &[CutoverFigures], tracked: bool) -> Option<f64> {
    let kind = |same: bool| -> Vec<f64> {
        (cutovers.iter())
            .filter(|c| !same || c.tracked == tracked)
            .map(|c| (c.frozen_s - c.passes_s - c.proof_s).max(0.0))
            .collect()
    };
    let freezes = match kind(true) {
        same if !same.is_empty() => same,
        _ => kind(false),
    };
    median(recent(&freezes))
}

/// Forecasts a frozen final pass run at `now_unix_s` (see the module docs).
pub fn forecast(history: &History, now_unix_s: f64) -> Option<Forecast> {
    let passes = &history.passes;
    let last = passes.last()?;
    if last.scanned_bytes == 0 && last.size_bytes > 0 && !last.tracked {
        return None;
    }
    let source_rate = median(recent(&delta_read_rates(passes))).unwrap_or_else(|| last.read_rate());
    let target_rate = median(recent(&history.target_read_rates)).filter(|t| *t > 0.0);
    // A full proof's read of the target runs alongside: the slower read bounds.
    let read_rate = target_rate.map_or(source_rate, |t| source_rate.min(t));
    let change_rate = change_rate(passes)?;
    // Never more than the volume holds, however long since the last pass.
    let predicted =
        (change_rate * (now_unix_s - last.start_unix_s).max(0.0)).min(last.size_bytes as f64);
    let (tracked, pending) = match history.final_scan {
        FinalScan::Unknown => (last.tracked, predicted),
        FinalScan::Full => (false, predicted),
        FinalScan::Tracked { changed_bytes } => (true, changed_bytes),
    };
    // A full pass reads the volume; a tracked one what changed and its
    // audit, and its proof then has the receiver read the same again.
    let (scan_s, proof_s) = if last.size_bytes == 0 {
        (0.0, 0.0)
    } else if tracked {
        let bytes = (pending + tracked_extra_bytes(passes)).min(last.size_bytes as f64);
        // Scattered reads on both sides: at the rate tracked passes read,
        // slowed as whole reads of the target are slower than the source's.
        let rate = tracked_read_rate(passes).unwrap_or(source_rate);
        let target = target_rate.map_or(rate, |t| rate * (t / source_rate).min(1.0));
        (bytes / rate, bytes / target)
    } else {
        (last.size_bytes as f64 / read_rate, 0.0)
    };
    let send_rate = send_rate(passes);
    let send_s = if pending <= 0.0 {
        0.0
    } else if send_rate > 0.0 {
        pending / send_rate
    } else {
        f64::INFINITY
    };
    let pass_overhead_s = pass_overhead(passes, send_rate);
    let freeze_overhead_s = freeze_overhead(&history.cutovers, tracked)
        .unwrap_or_else(|| default_freeze_overhead_s(last.size_bytes));
    Some(Forecast {
        total_s: scan_s.max(send_s) + proof_s + pass_overhead_s + freeze_overhead_s,
        scan_s,
        send_s,
        pending_bytes: pending,
        change_rate_bps: change_rate,
        pass_overhead_s,
        freeze_overhead_s,
        tracked,
        proof_s,
    })
}

/// True when the journal's read rate can be trusted for a go/no-go: at
/// least two delta passes, and either three or more, whose median shrugs off
/// one pass slowed by something else on the machine, or the last two
/// reading within 10% of each other.
pub fn read_rate_settled(passes: &[PassFigures]) -> bool {
    match delta_read_rates(passes).as_slice() {
        [] | [_] => false,
        [a, b] => (a - b).abs() <= 0.1 * a.max(*b),
        _ => true,
    }
}

#[cfg(test)]
mod tests;
