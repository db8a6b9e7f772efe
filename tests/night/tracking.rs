//! Change tracking as a sender sees it without a tracker: `--scan` and the
//! `pass_end` fields that say how a pass chose what to read.

use crate::harness::*;

/// Without a tracker every pass reads the whole volume and says why;
/// `--scan full` says so; `--scan tracked` is refused before anything is
/// sent (the target is never created); a bad value is bad usage.
#[test]
fn without_a_tracker_passes_read_everything_and_tracked_is_refused() {
    let s = Setup::new();
    let mut rng = Rng::new(41);
    let size = 4 * MIB;
    let source = s.path("source.img");
    let target = s.path("target.img");
    write_random_file(&source, size, &mut rng);
    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("vol");

    let refused = tx.sync(&source, &dest, &["--scan", "tracked"]);
    refused.assert_refused("--scan tracked");
    assert!(
        refused.stderr.contains("no tracker is recording"),
        "the refusal says why: {}",
        refused.stderr
    );
    assert!(
        !target.exists(),
        "a refused tracked pass created the target"
    );

    let r = tx.sync(&source, &dest, &[]);
    r.ok();
    let end = r.event("pass_end");
    assert_eq!(end["scan"], "full", "{end}");
    assert_eq!(end["read_bytes"], size, "{end}");
    let why = end["scan_reason"].as_str().unwrap_or_default();
    assert!(why.contains("no tracker is recording"), "{end}");
    assert_same_file(&source, &target);

    let r = tx.sync(&source, &dest, &["--scan", "full"]);
    r.ok();
    assert_eq!(r.event("pass_end")["scan_reason"], "--scan full");

    let bad = tx.sync(&source, &dest, &["--scan", "sometimes"]);
    assert_eq!(bad.code, 2, "{}", bad.context());
}
