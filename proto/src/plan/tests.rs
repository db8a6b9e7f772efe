//! The forecast's and the planning functions' tests.

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
