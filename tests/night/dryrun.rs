//! `sync --dry-run`: it scans and compares, reports per volume the chunks
//! and bytes a pass would send (`dry_run_end`), and writes and records
//! nothing on either side: the target, the receiver's state directory and
//! the sender's are byte for byte what they were (every file hashed before
//! and after), and the next real pass sends exactly what it reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

/// Every file and directory under each of `roots` (and each root itself):
/// a directory as `None`, a file as its BLAKE3 hash; a root that does not
/// exist is absent.
fn snapshot(roots: &[&Path]) -> BTreeMap<PathBuf, Option<String>> {
    fn walk(p: &Path, out: &mut BTreeMap<PathBuf, Option<String>>) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        if meta.is_dir() {
            out.insert(p.to_owned(), None);
            let mut entries: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out);
            }
        } else {
            out.insert(p.to_owned(), Some(file_hash(p).to_hex().to_string()));
        }
    }
    let mut out = BTreeMap::new();
    for r in roots {
        walk(r, &mut out);
    }
    out
}

/// Asserts the dry run `r` succeeded and returns its `dry_run_end`, after
/// checking it ran no pass and that its event has the fields operators read.
fn dry_run_end(r: &Run, volume: &str, size: u64) -> serde_json::Value {
    assert_eq!(r.code, 0, "dry run failed:\n{}", r.context());
    assert!(
        r.all("pass_start").is_empty() && r.all("pass_end").is_empty(),
        "a dry run ran a pass:\n{}",
        r.context()
    );
    let e = r.only("dry_run_end").clone();
    assert_eq!(e["volume"], volume, "{e}");
    assert_eq!(
        e["scanned_bytes"], size,
        "a dry run reads the whole volume: {e}"
    );
    assert!(e["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
    e
}

/// After a first pass and writes to 7 chunks of the source: the dry run
/// reports those 7 chunks and leaves everything as it was; the next pass
/// then sends exactly 7 chunks.
#[test]
fn a_dry_run_writes_nothing_and_the_next_pass_sends_what_it_reported() {
    let s = Setup::new();
    let size = 16 * MIB;
    let (source, target) = (s.path("source.img"), s.path("target.img"));
    random_file(&source, size, 160);
    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("vol");
    let p1 = tx.sync(&source, &dest, &[]);
    p1.ok();

    // 7 distinct chunks rewritten, one 4 KiB block each.
    for k in [0u64, 3, 17, 40, 99, 200, 255] {
        write_at(&source, k * CHUNK + 4096, &[0xa5; 4096]);
    }
    let roots = [target.as_path(), &s.receiver_state, &s.sender_state];
    let before = snapshot(&roots);
    let r = tx.sync(&source, &dest, &["--dry-run"]);
    let e = dry_run_end(&r, &dest, size);
    assert_eq!(e["chunks"], 7, "{e}");
    assert_eq!(e["bytes"], 7 * CHUNK, "{e}");
    assert_eq!(e["zero_chunks"], 0, "{e}");
    assert_eq!(
        snapshot(&roots),
        before,
        "the dry run changed the target or a state directory"
    );

    let p2 = tx.sync(&source, &dest, &[]);
    p2.ok();
    assert_eq!(p2.changed_chunks(), 7, "{}", p2.context());
    assert_eq!(
        p2.num("pass_end", "pass"),
        2,
        "the dry run was counted as a pass"
    );
    assert_same_file(&source, &target);
}

/// A dry run into a target that does not exist yet (a first pass) creates
/// nothing on the receiver (no target file, no state of the volume) nor on
/// the sender, and reports the whole volume; the first pass then sends it.
#[test]
fn a_dry_run_to_a_missing_target_creates_nothing_and_reports_the_whole_volume() {
    let s = Setup::new();
    let size = 8 * MIB + 12345;
    let (source, target) = (s.path("source.img"), s.path("target.img"));
    random_file(&source, size, 161);
    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("vol");
    let roots = [s.data.as_path(), &s.receiver_state, &s.sender_state];
    let before = snapshot(&roots);

    let r = tx.sync(&source, &dest, &["--dry-run"]);
    let e = dry_run_end(&r, &dest, size);
    let all = chunk_count(size, CHUNK);
    assert_eq!(e["chunks"], all, "{e}");
    assert_eq!(e["bytes"], size, "{e}");
    assert!(!target.exists(), "the dry run created the target");
    assert_eq!(
        snapshot(&roots),
        before,
        "the dry run created or changed files"
    );

    let p1 = tx.sync(&source, &dest, &[]);
    p1.ok();
    assert_eq!(p1.changed_chunks(), all, "{}", p1.context());
    assert_same_file(&source, &target);
}

/// A sealed volume (cut over) still answers a dry run, which writes
/// nothing there either; a real pass stays refused.
#[test]
fn a_dry_run_to_a_sealed_volume_answers_and_writes_nothing() {
    let (dir, source, target, sender, rx) =
        source_and_volume("source.img", "target.img", 8 * MIB, 162);
    let dest = rx.dest("v");
    sender.sync_ok(&source, &rx, "v", "first sync");
    write_at(&source, 3 * MIB, &[0x5a; 200_000]);
    sender.sync_ok(&source, &rx, "v", "second sync");
    let r = sender.run("cutover", &source, &dest, &rx.fp, &["--assume-frozen"]);
    assert_eq!(r.code, 0, "cutover: {}", r.stderr);
    assert!(
        rx.state.join("volumes/v/seal").exists(),
        "no seal after the cutover"
    );

    // The source moves on after the cutover: 2 chunks.
    write_at(&source, 0, &[1; 10]);
    write_at(&source, 5 * MIB, &[2; 10]);
    let roots = [target.as_path(), &rx.state, &sender.state];
    let before = snapshot(&roots);
    let r = sender.run("sync", &source, &dest, &rx.fp, &["--dry-run"]);
    let e = dry_run_end(&r, &dest, 8 * MIB);
    assert_eq!(e["chunks"], 2, "{e}");
    assert_eq!(
        snapshot(&roots),
        before,
        "the dry run wrote to a sealed volume"
    );

    let r = sender.run("sync", &source, &dest, &rx.fp, &[]);
    assert_eq!(r.code, 2, "a pass into the sealed volume: {}", r.context());
    drop(dir);
}

/// A peer that opens a dry run and then sends what belongs to a pass (a
/// Finish) has its session ended; nothing is created, and the volume is
/// free again for a real pass at once. An empty source is refused.
#[test]
fn a_dry_run_session_that_strays_is_ended_and_writes_nothing() {
    use nightpass::net::transport::{self, Identity, Tuning};
    use nightpass_proto::wire::{self, control::Msg, Mode, RefuseCode};

    let s = Setup::new();
    let (source, target) = (s.path("source.img"), s.path("target.img"));
    random_file(&source, 2 * MIB, 163);
    let rx = s.start_receiver(&[("vol", &target)]);
    let roots = [s.data.as_path(), &s.receiver_state];
    let before = snapshot(&roots);
    let id = Identity::load(&s.sender_id).unwrap();
    runtime().block_on(async {
        let mut peer = AuthorizedPeer::connect(&id, rx.port, &rx.fp, &Tuning::default()).await;
        peer.hello(hello_for("vol", Mode::DryRun, 2 * MIB, 64 << 10))
            .await
            .unwrap();
        let w = peer.expect_welcome().await;
        assert_eq!((w.target_size, w.chunk_size), (2 * MIB, 64 << 10));
        let finish = Msg::Finish(wire::Finish { chunks_sent: 3 });
        transport::send_control(&mut peer.send, finish)
            .await
            .unwrap();
        assert!(
            peer.answer_within(Duration::from_secs(10)).await.is_none(),
            "the receiver answered a Finish in a dry run"
        );
        peer.close().await;

        let mut peer = AuthorizedPeer::connect(&id, rx.port, &rx.fp, &Tuning::default()).await;
        peer.hello(hello_for("vol", Mode::DryRun, 0, 64 << 10))
            .await
            .unwrap();
        let r = peer.expect_refusal().await;
        assert_eq!(r.code, RefuseCode::BadRequest as i32, "{}", r.message);
        peer.close().await;
    });
    assert_eq!(
        snapshot(&roots),
        before,
        "a stray dry run created or changed files"
    );
    let tx = s.sender(&rx);
    tx.sync(&source, &rx.dest("vol"), &[]).ok();
    assert_same_file(&source, &target);
}
