//! Refusals: each ends the sender with exit status 2 and a clear message,
//! and leaves the target's bytes as they were.

use std::time::Duration;

use crate::harness::*;

/// A receiver that allows someone else refuses our sender.
#[test]
fn unauthorized_sender_refused() {
    let s = Setup::new();
    let mut rng = Rng::new(11);
    let other_fp = keygen_at(&s.root.path().join("someone-else"));
    let source = s.path("source.img");
    let target = s.path("target.img");
    write_random_file(&source, 4 * MIB, &mut rng);
    write_random_file(&target, 4 * MIB, &mut rng);
    let before = file_hash(&target);

    let rx = Receiver::start(
        &s.receiver_ident(),
        &s.receiver_state,
        &[("vol", &target)],
        &[other_fp.as_str()],
        0,
    );
    let tx = s.sender(&rx);
    let r = tx.sync(&source, &rx.dest("vol"), &[]);
    r.assert_refused("not authorized");
    assert_eq!(
        file_hash(&target),
        before,
        "a refused sender changed the target"
    );
}

/// A sender that pinned another fingerprint than the receiver's refuses to talk.
#[test]
fn wrong_server_fingerprint_refused() {
    let s = Setup::new();
    let mut rng = Rng::new(12);
    let other_fp = keygen_at(&s.root.path().join("someone-else"));
    let source = s.path("source.img");
    let target = s.path("target.img");
    write_random_file(&source, 4 * MIB, &mut rng);
    write_random_file(&target, 4 * MIB, &mut rng);
    let before = file_hash(&target);

    let rx = s.start_receiver(&[("vol", &target)]);
    let mut tx = s.sender(&rx);
    tx.server_fp = other_fp;
    let r = tx.sync(&source, &rx.dest("vol"), &[]);
    r.assert_refused("fingerprint");
    assert_eq!(
        file_hash(&target),
        before,
        "a refused pass changed the target"
    );
}

/// A volume name the receiver does not export.
#[test]
fn unknown_volume_refused() {
    let s = Setup::new();
    let mut rng = Rng::new(13);
    let source = s.path("source.img");
    let target = s.path("target.img");
    write_random_file(&source, 4 * MIB, &mut rng);
    write_random_file(&target, 4 * MIB, &mut rng);
    let before = file_hash(&target);

    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let r = tx.sync(&source, &rx.dest("nosuch"), &[]);
    r.assert_refused("not exported");
    assert_eq!(
        file_hash(&target),
        before,
        "an unknown volume changed the exported one"
    );
    assert!(!s.path("nosuch").exists());
}

/// An existing target file smaller than the source.
#[test]
fn target_smaller_than_source_refused() {
    let s = Setup::new();
    let mut rng = Rng::new(14);
    let source = s.path("source.img");
    let target = s.path("small-target.img");
    write_random_file(&source, 16 * MIB, &mut rng);
    write_random_file(&target, 8 * MIB, &mut rng);
    let before = file_hash(&target);

    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let r = tx.sync(&source, &rx.dest("vol"), &[]);
    r.assert_refused("smaller than");
    assert_eq!(file_len(&target), 8 * MIB, "the target was resized");
    assert_eq!(
        file_hash(&target),
        before,
        "a refused pass changed the target"
    );
}

/// The chunk size is fixed at a volume's first pass: a later pass with an
/// explicit different size is refused, from the same sender state and from a
/// fresh one; a later pass without `--chunk-size` keeps 64 KiB.
#[test]
fn different_chunk_size_on_later_pass_refused() {
    let s = Setup::new();
    let mut rng = Rng::new(15);
    let size = 16 * MIB;
    let source = s.path("source.img");
    let target = s.path("target.img");
    write_random_file(&source, size, &mut rng);

    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("vol");
    tx.sync(&source, &dest, &["--chunk-size", "64K"])
        .assert_pass(1, size, CHUNK);
    assert_same_file(&source, &target);
    let after_first = file_hash(&target);

    let touched = scatter_writes(&source, size, 40, CHUNK, &mut rng);
    let r = tx.sync(&source, &dest, &["--chunk-size", "128K"]);
    r.assert_refused("chunk size");
    assert_eq!(
        file_hash(&target),
        after_first,
        "a refused pass changed the target"
    );

    // A sender without local state learns it from the receiver's refusal.
    let mut fresh = tx.clone();
    fresh.state_dir = s.new_dir("fresh-sender-state");
    let r = fresh.sync(&source, &dest, &["--chunk-size", "128K"]);
    r.assert_refused("chunk size");
    assert_eq!(
        file_hash(&target),
        after_first,
        "a refused pass changed the target"
    );

    // Without --chunk-size, the volume's chunk size stays.
    let p2 = tx.sync(&source, &dest, &[]);
    p2.assert_pass(2, size, CHUNK);
    assert_eq!(p2.changed_chunks(), touched.len() as u64);
    assert_same_file(&source, &target);
}

/// A second sender on a volume that another sender is writing is refused,
/// and the first pass completes undisturbed.
#[test]
fn second_concurrent_sender_refused() {
    let s = Setup::new();
    let mut rng = Rng::new(16);
    let size = 64 * MIB;
    let source = s.path("source.img");
    let other_source = s.path("other-source.img");
    let target = s.path("target.img");
    write_random_file(&source, size, &mut rng);
    write_random_file(&other_source, 16 * MIB, &mut rng);

    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("vol");
    // About 4 s of sending at 16 MiB/s.
    let first = tx.spawn_sync(&source, &dest, &["--bwlimit", "16M"]);
    first.wait_for_event("pass_start", Duration::from_secs(60));

    let mut second = tx.clone();
    second.state_dir = s.new_dir("second-sender-state");
    let r = second.sync(&other_source, &dest, &[]);
    r.assert_refused("in use");

    let first = first.finish(COMMAND_TIMEOUT);
    first.assert_pass(1, size, CHUNK);
    assert_eq!(first.changed_chunks(), chunk_count(size, CHUNK));
    assert_same_file(&source, &target);
}

/// A refused session frees the volume at once: the operator who fixes the
/// mistake and runs again right away is served, not told "in use".
#[test]
fn refusal_does_not_keep_volume_busy() {
    let s = Setup::new();
    let mut rng = Rng::new(17);
    let big = s.path("big-source.img");
    let source = s.path("source.img");
    let target = s.path("target.img");
    write_random_file(&big, 8 * MIB, &mut rng);
    write_random_file(&source, 4 * MIB, &mut rng);
    write_random_file(&target, 4 * MIB, &mut rng);

    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("vol");
    for round in 1..=3 {
        // (--new-source: the volume's recorded source is `source`.)
        tx.sync(&big, &dest, &["--new-source"])
            .assert_refused("smaller than");
        let r = tx.sync(&source, &dest, &[]);
        assert_eq!(
            r.code, 0,
            "round {round}: a sync right after a refusal failed: {}",
            r.stderr
        );
        assert_same_file(&source, &target);
    }
}
