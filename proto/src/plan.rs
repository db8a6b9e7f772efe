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
//! freeze_oh = median over recent cutovers of max(0, frozen_s - their passes' duration
//!             - a tracked proof's read),
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
    let rates: Vec<f64> = passes
        .windows(2)
        .filter(|w| !w[1].first)
        .map(|w| {
            let dt = (w[1].start_unix_s - w[0].start_unix_s).max(1e-3);
            w[1].changed_bytes as f64 / dt
        })
        .collect();
    let rates = recent(&rates);
    if rates.is_empty() {
        return None;
    }
    let change_rate = rates.iter().sum::<f64>() / rates.len() as f64;
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
    let pass_overhead_s = median(recent(&residuals)).unwrap_or(0.0);
    let freezes: Vec<f64> = history
        .cutovers
        .iter()
        .map(|c| (c.frozen_s - c.passes_s - c.proof_s).max(0.0))
        .collect();
    let freeze_overhead_s =
        median(recent(&freezes)).unwrap_or_else(|| default_freeze_overhead_s(last.size_bytes));
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
            tracked: false,
        }
    }

    fn history(passes: &[PassFigures]) -> History {
        History {
            passes: passes.to_vec(),
            ..History::default()
        }
    }

    #[test]
    fn no_forecast_from_a_first_pass_alone() {
        assert_eq!(
            forecast(&history(&[pass(0.0, 100.0, 1000, true)]), 100.0),
            None
        );
        assert_eq!(forecast(&History::default(), 100.0), None);
    }

    #[test]
    fn forecast_by_hand() {
        // read rate 1000 B / 10 s = 100 B/s: scan 10 s.
        // delta passes: 200 B over 100 s (2 B/s), 100 B over 50 s (2 B/s): change rate 2 B/s.
        // now is 40 s after the last start: 80 B pending.
        // send rate: best of 1000/100, 200/20, 100/10 = 10 B/s: 8 s, hidden behind the 10 s scan.
        // pass overhead: 20 - max(10, 200/10) = 0 and 10 - max(10, 100/10) = 0.
        // no cutover yet: the default freeze overhead.
        let passes = history(&[
            pass(0.0, 100.0, 1000, true),
            pass(100.0, 20.0, 200, false),
            pass(150.0, 10.0, 100, false),
        ]);
        let f = forecast(&passes, 190.0).unwrap();
        assert!((f.scan_s - 10.0).abs() < 1e-9);
        assert!((f.change_rate_bps - 2.0).abs() < 1e-9);
        assert!((f.pending_bytes - 80.0).abs() < 1e-9);
        assert!((f.send_s - 8.0).abs() < 1e-9);
        assert_eq!(f.pass_overhead_s, 0.0);
        assert!((f.total_s - (10.0 + default_freeze_overhead_s(1000))).abs() < 1e-9);
        // 200 s later 480 B are pending: 48 s of sending dominates.
        let f = forecast(&passes, 390.0).unwrap();
        assert!((f.total_s - (48.0 + default_freeze_overhead_s(1000))).abs() < 1e-9);
    }

    #[test]
    fn forecast_takes_medians_and_learns_overheads() {
        let mut passes = vec![
            pass(0.0, 100.0, 1000, true), // send rate 10 B/s, the best; its read rate is not used
            PassFigures {
                read_busy_s: 5.0,              // 200 B/s
                ..pass(100.0, 7.0, 20, false)  // overhead 7 - max(5, 2) = 2
            },
            PassFigures {
                read_busy_s: 12.5,              // 80 B/s
                ..pass(150.0, 13.5, 10, false)  // overhead 1
            },
        ];
        // Two delta passes: read rate (200 + 80) / 2 = 140 B/s; overhead (2 + 1) / 2.
        let f = forecast(&history(&passes), 190.0).unwrap();
        assert!((f.scan_s - 1000.0 / 140.0).abs() < 1e-9);
        assert!((f.pass_overhead_s - 1.5).abs() < 1e-9);
        passes.push(pass(160.0, 11.0, 4, false)); // 100 B/s, overhead 1
        passes.push(pass(200.0, 11.5, 40, false)); // 100 B/s, overhead 1.5
        let mut h = history(&passes);
        // The last three delta passes read at 80, 100, 100 B/s: median 100 (the
        // 200 B/s pass is no longer recent); overheads 1, 1, 1.5: median 1.
        let f = forecast(&h, 230.0).unwrap();
        assert!((f.scan_s - 10.0).abs() < 1e-9);
        assert!((f.pass_overhead_s - 1.0).abs() < 1e-9);
        // change rates 10/50, 4/10, 40/40 B/s: mean 0.5333; 30 s pending = 16 B; 1.6 s to send.
        assert!((f.pending_bytes - 16.0).abs() < 1e-9);
        assert!((f.send_s - 1.6).abs() < 1e-9);
        assert!((f.freeze_overhead_s - default_freeze_overhead_s(1000)).abs() < 1e-9);
        assert!((f.total_s - (10.0 + 1.0 + default_freeze_overhead_s(1000))).abs() < 1e-9);
        // Cutovers measured their freeze: 0.3 s and 0.2 s beyond their
        // passes (and, for the second, its tracked proof's read).
        h.cutovers = vec![
            CutoverFigures {
                frozen_s: 20.0,
                passes_s: 19.7,
                proof_s: 0.0,
            },
            CutoverFigures {
                frozen_s: 15.0,
                passes_s: 10.8,
                proof_s: 4.0,
            },
        ];
        let f = forecast(&h, 230.0).unwrap();
        assert!((f.freeze_overhead_s - 0.25).abs() < 1e-9);
        assert!((f.total_s - 11.25).abs() < 1e-9);
        // The receiver read its target at 50 B/s in recent rehearsals (the
        // median of 40, 50, 200; an older 10 B/s read is not recent): the
        // frozen pass waits 20 s for it. A faster target changes nothing.
        h.target_read_rates = vec![10.0, 40.0, 200.0, 50.0];
        let f = forecast(&h, 230.0).unwrap();
        assert!((f.scan_s - 20.0).abs() < 1e-9);
        h.target_read_rates = vec![500.0];
        let f = forecast(&h, 230.0).unwrap();
        assert!((f.scan_s - 10.0).abs() < 1e-9);
    }

    #[test]
    fn a_tracked_final_pass_costs_what_changed_and_its_proof() {
        // A full pass reads 1000 B at 100 B/s; then tracked passes read
        // 60 B (20 changed + 40 audit) and 40 B (0 changed + 40 audit).
        let tracked = |start: f64, scanned: u64, changed: u64| PassFigures {
            scanned_bytes: scanned,
            tracked: true,
            read_busy_s: scanned as f64 / 100.0,
            ..pass(start, 1.0, changed, false)
        };
        let passes = history(&[
            pass(0.0, 100.0, 1000, true),
            pass(100.0, 20.0, 200, false),
            tracked(150.0, 60, 20),
            tracked(160.0, 40, 0),
        ]);
        // A no-change tracked pass still forecasts.
        let f = forecast(&passes, 170.0).unwrap();
        assert!(f.tracked);
        // change rate: (200/100 + 20/50 + 0/10) / 3 = 0.8 B/s; 10 s pending = 8 B;
        // plus the audit's 40 B (median of 40, 40): 48 B at 100 B/s, twice.
        assert!((f.pending_bytes - 8.0).abs() < 1e-9, "{f:?}");
        assert!((f.scan_s - 0.48).abs() < 1e-9, "{f:?}");
        assert!((f.proof_s - 0.48).abs() < 1e-9, "{f:?}");
        let full = forecast(&history(&passes.passes[..2]), 170.0).unwrap();
        assert!(!full.tracked && full.scan_s > 10.0 * f.scan_s, "{full:?}");
        // A live record that names 160 B of chunks replaces the rate's
        // guess: (160 + 40) B at 100 B/s, twice; even after a full pass,
        // whose successor the record makes tracked.
        let known = History {
            final_scan: FinalScan::Tracked {
                changed_bytes: 160.0,
            },
            ..passes.clone()
        };
        let f = forecast(&known, 170.0).unwrap();
        assert!((f.pending_bytes - 160.0).abs() < 1e-9, "{f:?}");
        assert!(
            (f.scan_s - 2.0).abs() < 1e-9 && (f.proof_s - 2.0).abs() < 1e-9,
            "{f:?}"
        );
        let after_full = History {
            final_scan: known.final_scan,
            ..history(&passes.passes[..2])
        };
        assert!(forecast(&after_full, 170.0).unwrap().tracked);
        // A final pass forced full reads the volume, whatever the last was.
        let forced = History {
            final_scan: FinalScan::Full,
            ..passes.clone()
        };
        let f = forecast(&forced, 170.0).unwrap();
        assert!(!f.tracked && (f.scan_s - 10.0).abs() < 1e-9, "{f:?}");
    }

    #[test]
    fn what_changed_is_never_more_than_the_volume() {
        // 200 B changed in 100 s of a 1000 B volume: 2 B/s, so a week
        // later the rate alone would say 1.2 MB changed.
        let h = history(&[pass(0.0, 100.0, 1000, true), pass(100.0, 20.0, 200, false)]);
        let f = forecast(&h, 100.0 + 7.0 * 86400.0).unwrap();
        assert_eq!(f.pending_bytes, 1000.0, "{f:?}");
    }

    #[test]
    fn read_rate_settles_on_agreement_or_three_passes() {
        let busy = |t: f64| PassFigures {
            read_busy_s: t,
            ..pass(0.0, t, 0, false)
        };
        let first = pass(0.0, 100.0, 1000, true);
        assert!(!read_rate_settled(std::slice::from_ref(&first)));
        assert!(!read_rate_settled(&[first.clone(), busy(10.0)]));
        assert!(read_rate_settled(&[first.clone(), busy(10.0), busy(10.5)]));
        assert!(!read_rate_settled(&[first.clone(), busy(10.0), busy(20.0)]));
        assert!(read_rate_settled(&[
            first,
            busy(10.0),
            busy(20.0),
            busy(11.0)
        ]));
    }

    #[test]
    fn medians_and_recency() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(recent(&[1.0, 2.0, 3.0, 4.0]), &[2.0, 3.0, 4.0]);
    }
}
