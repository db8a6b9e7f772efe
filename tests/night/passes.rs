//! Passes on image files: full, delta and no-change passes, zero chunks,
//! short last chunks and compression, as the JSON events and the target's
//! bytes show them.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::harness::*;

/// A full pass to a missing target, a delta pass after 1% scattered 4 KiB
/// writes, and a pass with nothing changed.
#[test]
fn full_then_delta_then_noop_pass() {
    let s = Setup::new();
    let mut rng = Rng::new(1);
    let size = 64 * MIB;
    let source = s.path("source.img");
    let target = s.path("target.img");
    write_random_file(&source, size, &mut rng);
    assert!(!target.exists());

    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("vol");

    // Pass 1: everything travels, uncompressed (random data).
    let p1 = tx.sync(&source, &dest, &[]);
    p1.assert_pass(1, size, CHUNK);
    assert_same_file(&source, &target);
    assert_eq!(p1.changed_chunks(), chunk_count(size, CHUNK));
    let sent = p1.sent_bytes();
    assert!(
        sent as f64 >= size as f64 * 0.99,
        "first pass of random data sent only {sent} of {size} bytes"
    );
    assert!(
        sent as f64 <= size as f64 * 1.02,
        "first pass sent {sent} bytes for {size} bytes of data"
    );

    // Pass 2: 1% of the volume rewritten in scattered 4 KiB blocks. Each
    // changed chunk travels as a probe (a 16-byte hint per 4 KiB block) and
    // a patch of exactly the blocks that differ.
    delta_pass(&tx, &dest, (&source, &target), size, 2, &mut rng);

    // Again with none of the target in the page cache: the receiver reads
    // its copies of the changed chunks from the disk (not from the cache
    // without waiting, its fast path) and must come to the same bytes.
    if let Some(cached) = evict_from_cache(&target) {
        assert!(
            cached < size / 100,
            "{cached} bytes of the target stayed cached"
        );
    }
    delta_pass(&tx, &dest, (&source, &target), size, 3, &mut rng);

    // Pass 4: nothing changed, nothing travels.
    let p3 = tx.sync(&source, &dest, &[]);
    p3.assert_pass(4, size, CHUNK);
    assert_eq!(p3.changed_chunks(), 0);
    assert_eq!(p3.sent_bytes(), 0);
    assert_same_file(&source, &target);
}

/// Rewrites 1% of `source` in scattered 4 KiB blocks, runs pass `pass` and
/// checks the target and the exact bytes sent: the blocks written, plus 16
/// bytes of hint per 4 KiB block of each changed chunk.
fn delta_pass(
    tx: &Sender,
    dest: &str,
    (source, target): (&Path, &Path),
    size: u64,
    pass: u64,
    rng: &mut Rng,
) {
    let writes = (size / 100 / 4096) as usize;
    let blocks = scatter_blocks(source, size, writes, rng);
    let touched: BTreeSet<u64> = blocks.iter().map(|b| b / CHUNK).collect();
    assert!(touched.len() > 50, "the test should touch many chunks");
    let p = tx.sync(source, dest, &[]);
    p.assert_pass(pass, size, CHUNK);
    assert_same_file(source, target);
    let n = touched.len() as u64;
    assert_eq!(
        p.changed_chunks(),
        n,
        "{writes} writes touched {n} distinct chunks"
    );
    let hints = n * (CHUNK / 4096) * 16;
    let expect = blocks.len() as u64 * 4096 + hints;
    assert_eq!(
        p.sent_bytes(),
        expect,
        "delta pass {pass}: {} blocks of 4 KiB in {n} chunks ({} bytes of hints) should send {expect} bytes",
        blocks.len(),
        hints
    );
}

/// A sparse source: only the chunks holding data carry payload; zeroing a
/// chunk that held data later makes the target's copy zero too.
#[test]
fn zero_chunks_travel_as_markers() {
    let s = Setup::new();
    let mut rng = Rng::new(2);
    let size = 32 * MIB;
    let source = s.path("sparse.img");
    let target = s.path("target.img");
    File::create(&source).unwrap().set_len(size).unwrap();
    // Data in a few places: one full chunk, pieces that straddle chunk
    // boundaries, and a piece at the very end.
    let full_chunk = 100u64;
    write_at(&source, full_chunk * CHUNK, &rng.bytes(CHUNK as usize));
    write_at(&source, 5 * CHUNK - 1000, &rng.bytes(3000));
    write_at(&source, 3 * MIB + 12345, &rng.bytes(200_000));
    write_at(&source, 17 * MIB, &rng.bytes(4096));
    write_at(&source, size - 777, &rng.bytes(777));
    assert_eq!(file_len(&source), size);
    let nonzero = nonzero_chunks(&source, size, CHUNK);
    assert_eq!(nonzero, 1 + 2 + 4 + 1 + 1, "test data layout");

    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("vol");

    let p1 = tx.sync(&source, &dest, &[]);
    p1.assert_pass(1, size, CHUNK);
    assert_same_file(&source, &target);
    let changed = p1.changed_chunks();
    assert!(
        (nonzero..=chunk_count(size, CHUNK)).contains(&changed),
        "changed_chunks {changed}: at least the {nonzero} chunks with data must be sent"
    );
    let sent = p1.sent_bytes();
    assert!(sent > 0, "chunks with data were sent, yet sent_bytes is 0");
    assert!(
        sent <= nonzero * CHUNK + nonzero * CHUNK / 50,
        "sent {sent} bytes, more than the {nonzero} chunks holding data"
    );
    assert!(
        sent < size / 20,
        "sent {sent} of a mostly empty {size}-byte volume"
    );

    // Zero the chunk that was full of data.
    write_at(&source, full_chunk * CHUNK, &vec![0u8; CHUNK as usize]);
    let p2 = tx.sync(&source, &dest, &[]);
    p2.assert_pass(2, size, CHUNK);
    assert_same_file(&source, &target);
    assert_eq!(
        p2.changed_chunks(),
        1,
        "exactly one chunk became zero and differs from the target"
    );
    assert!(
        p2.sent_bytes() < 4096,
        "a zeroed chunk should travel as a marker, not as {} bytes",
        p2.sent_bytes()
    );

    // And nothing more afterwards.
    let p3 = tx.sync(&source, &dest, &[]);
    p3.assert_pass(3, size, CHUNK);
    assert_eq!(p3.changed_chunks(), 0);
    assert_eq!(p3.sent_bytes(), 0);
    assert_same_file(&source, &target);
}

/// A sparse source over an existing target full of other data: the zero
/// regions must overwrite the stale data, without carrying 64 KiB each.
#[test]
fn zero_chunks_overwrite_stale_target_data() {
    let s = Setup::new();
    let mut rng = Rng::new(3);
    let size = 16 * MIB;
    let source = s.path("sparse.img");
    let target = s.path("target.img");
    File::create(&source).unwrap().set_len(size).unwrap();
    write_at(&source, 2 * MIB, &rng.bytes(CHUNK as usize));
    write_random_file(&target, size, &mut rng);

    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let p1 = tx.sync(&source, &rx.dest("vol"), &[]);
    p1.assert_pass(1, size, CHUNK);
    assert_same_file(&source, &target);
    // Every chunk of the target differed from the source.
    assert_eq!(p1.changed_chunks(), chunk_count(size, CHUNK));
    let sent = p1.sent_bytes();
    assert!(
        sent < size / 20,
        "sent {sent} bytes for one chunk of data and {} zero chunks",
        chunk_count(size, CHUNK) - 1
    );
}

/// Sizes that are not a multiple of the chunk size (nor of 4096): the short
/// last chunk is copied exactly, and a change in it is found.
#[test]
fn short_last_chunk() {
    let s = Setup::new();
    let mut rng = Rng::new(4);
    let size = 10 * MIB + 1234;
    let source = s.path("odd.img");
    let target = s.path("odd-target.img");
    write_random_file(&source, size, &mut rng);

    let rx = s.start_receiver(&[("odd", &target)]);
    let tx = s.sender(&rx);
    let dest = rx.dest("odd");
    let p1 = tx.sync(&source, &dest, &[]);
    p1.assert_pass(1, size, CHUNK);
    assert_same_file(&source, &target);
    assert_eq!(p1.changed_chunks(), 161);
    assert!(p1.sent_bytes() >= size);

    // Change only the last byte.
    let mut last = [0u8; 1];
    File::open(&source)
        .unwrap()
        .read_exact_at(&mut last, size - 1)
        .unwrap();
    write_at(&source, size - 1, &[!last[0]]);
    let p2 = tx.sync(&source, &dest, &[]);
    p2.assert_pass(2, size, CHUNK);
    assert_same_file(&source, &target);
    assert_eq!(p2.changed_chunks(), 1);
    assert!(
        (1234..=1234 + 1234 / 50 + 64).contains(&p2.sent_bytes()),
        "a 1234-byte last chunk of random data went out as {} bytes",
        p2.sent_bytes()
    );
}

/// A one-byte source.
#[test]
fn one_byte_source() {
    let s = Setup::new();
    let source = s.path("one.img");
    let target = s.path("one-target.img");
    fs::write(&source, [0x5a]).unwrap();

    let rx = s.start_receiver(&[("one", &target)]);
    let tx = s.sender(&rx);
    let p1 = tx.sync(&source, &rx.dest("one"), &[]);
    p1.assert_pass(1, 1, CHUNK);
    assert_eq!(fs::read(&target).unwrap(), vec![0x5a]);
    assert_eq!(p1.changed_chunks(), 1);

    fs::write(&source, [0xa5]).unwrap();
    let p2 = tx.sync(&source, &rx.dest("one"), &[]);
    p2.assert_pass(2, 1, CHUNK);
    assert_eq!(fs::read(&target).unwrap(), vec![0xa5]);
    assert_eq!(p2.changed_chunks(), 1);
}

/// A zero-byte source is refused as bad input; an existing target is untouched.
#[test]
fn empty_source_refused() {
    let s = Setup::new();
    let mut rng = Rng::new(6);
    let source = s.path("empty.img");
    let target = s.path("target.img");
    File::create(&source).unwrap();
    write_random_file(&target, MIB, &mut rng);
    let before = file_hash(&target);

    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let r = tx.sync(&source, &rx.dest("vol"), &[]);
    r.assert_refused("empty");
    assert_eq!(file_len(&target), MIB);
    assert_eq!(
        file_hash(&target),
        before,
        "a refused pass changed the target"
    );
}

/// Compressible data travels compressed.
#[test]
fn compressible_data_is_compressed() {
    let s = Setup::new();
    let source = s.path("text.img");
    let target = s.path("text-target.img");
    let mut f = File::create(&source).unwrap();
    let mut n = 0u64;
    let mut written = 0u64;
    let size = 16 * MIB;
    while written < size {
        let line = format!(
            "{n:08} nightpass copies block devices in delta passes over QUIC; the quick brown fox jumps over the lazy dog\n"
        );
        let take = (size - written).min(line.len() as u64) as usize;
        f.write_all(&line.as_bytes()[..take]).unwrap();
        written += take as u64;
        n += 1;
    }
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(file_len(&source), size);

    let rx = s.start_receiver(&[("text", &target)]);
    let tx = s.sender(&rx);
    let p1 = tx.sync(&source, &rx.dest("text"), &[]);
    p1.assert_pass(1, size, CHUNK);
    assert_same_file(&source, &target);
    assert_eq!(p1.changed_chunks(), chunk_count(size, CHUNK));
    let sent = p1.sent_bytes();
    assert!(sent > 0);
    assert!(
        sent < size / 4,
        "{size} bytes of repetitive text went out as {sent} bytes: not compressed"
    );
}
