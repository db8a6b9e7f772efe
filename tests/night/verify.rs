//! `nightpass verify`: local and remote comparisons by fresh reads, exact
//! coalesced ranges, size handling, refusals, loop devices, and the
//! forget-then-resend contract with `sync`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::harness::*;

const CHUNK: u64 = 64 << 10;

/// `nightpass verify A B --json` with local paths.
fn verify_local(a: &Path, b: &Path, home: &Path, extra: &[&str]) -> Run {
    let mut c = Command::new(bin());
    c.arg("verify")
        .arg(a)
        .arg(b)
        .arg("--json")
        .args(extra)
        .env("NIGHTPASS_HOME", home);
    run_command(c)
}

/// The `mismatched_ranges` of a `verify_end` as pairs.
fn ranges(end: &Value) -> Vec<(u64, u64)> {
    end["mismatched_ranges"]
        .as_array()
        .unwrap_or_else(|| panic!("no mismatched_ranges in {end}"))
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect()
}

/// Coalesced byte ranges of a set of chunk indices, the last chunk cut at `size`.
fn expected_ranges(chunks: &BTreeSet<u64>, chunk: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in chunks {
        let start = i * chunk;
        let end = ((i + 1) * chunk).min(size);
        match out.last_mut() {
            Some((o, l)) if *o + *l == start => *l = end - *o,
            _ => out.push((start, end - start)),
        }
    }
    out
}

/// Flips every bit of the byte at `offset` (so it surely differs).
fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    write_at(path, offset, &[!b[0]]);
}

fn assert_verify_end(r: &Run, code: i32, identical: bool, expect: &[(u64, u64)], chunk: u64) {
    assert_eq!(r.code, code, "verify exit status; stderr: {}", r.stderr);
    let end = r.event("verify_end");
    assert_eq!(end["identical"], identical, "{end}");
    assert_eq!(end["chunk_size"], chunk, "{end}");
    assert_eq!(ranges(end), expect, "mismatched ranges: {end}");
    let chunks: u64 = expect.iter().map(|&(_, l)| l.div_ceil(chunk)).sum();
    assert_eq!(
        end["mismatched_chunks"].as_u64().unwrap(),
        chunks,
        "mismatched_chunks: {end}"
    );
}

#[test]
fn verify_local_identical_one_byte_short_last_chunk_and_sizes() {
    let tmp = scratch();
    let root = tmp.path();
    // Not a multiple of the chunk size: the last chunk is short.
    let size = (5u64 << 20) + 12_345;
    let a = root.join("a.img");
    let b = root.join("b.img");
    random_file(&a, size, 11);
    std::fs::copy(&a, &b).unwrap();

    let r = verify_local(&a, &b, root, &[]);
    assert_verify_end(&r, 0, true, &[], CHUNK);
    let end = r.event("verify_end");
    assert_eq!(end["source_size"], size);
    assert_eq!(end["target_size"], size);
    assert!(r.all("error").is_empty(), "{:?}", r.events);

    // One byte in the middle of a chunk.
    let off = 3_000_123u64;
    flip_byte(&b, off);
    let r = verify_local(&a, &b, root, &[]);
    let want = vec![(off / CHUNK * CHUNK, CHUNK)];
    assert_verify_end(&r, 1, false, &want, CHUNK);
    let (o, l) = want[0];
    assert!(o <= off && off < o + l);
    // The same byte in 4 KiB chunks.
    let r = verify_local(&a, &b, root, &["--chunk-size", "4K"]);
    assert_verify_end(&r, 1, false, &[(off / 4096 * 4096, 4096)], 4096);
    flip_byte(&b, off);
    assert_eq!(verify_local(&a, &b, root, &[]).code, 0);

    // The very last byte: the range is the short last chunk.
    flip_byte(&b, size - 1);
    let r = verify_local(&a, &b, root, &[]);
    let last = (size - 1) / CHUNK * CHUNK;
    assert_verify_end(&r, 1, false, &[(last, size - last)], CHUNK);
    flip_byte(&b, size - 1);

    // Sizes differ (regular files): bad input, both sizes reported.
    let c = root.join("c.img");
    std::fs::copy(&a, &c).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&c).unwrap();
    f.set_len(size + 4096).unwrap();
    drop(f);
    let r = verify_local(&a, &c, root, &[]);
    assert_eq!(
        r.code, 2,
        "size mismatch is bad input; stderr: {}",
        r.stderr
    );
    let end = r.event("verify_end");
    assert_eq!(end["source_size"], size, "{end}");
    assert_eq!(end["target_size"], size + 4096, "{end}");
    assert_eq!(end["identical"], false, "{end}");
    assert!(
        r.stderr.contains("sizes differ"),
        "stderr should say the sizes differ: {}",
        r.stderr
    );
    assert!(r.event("error")["message"]
        .as_str()
        .unwrap()
        .contains("sizes differ"));
    // The other way round too.
    let r = verify_local(&c, &a, root, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.event("verify_end")["source_size"], size + 4096);
    assert_eq!(r.event("verify_end")["target_size"], size);
}

struct Remote {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    sender: SenderSide,
    rx: Receiver,
    source: std::path::PathBuf,
    target: std::path::PathBuf,
}

fn remote(size: u64, seed: u64) -> Remote {
    let dir = scratch();
    let root = dir.path().to_owned();
    let target = root.join("target.img");
    let (sender, rx) = pair(&root, &[("v", &target)]);
    let source = root.join("source.img");
    random_file(&source, size, seed);
    Remote {
        _dir: dir,
        root,
        sender,
        rx,
        source,
        target,
    }
}

impl Remote {
    fn run(&self, cmd: &str, extra: &[&str]) -> Run {
        self.sender
            .run(cmd, &self.source, &self.rx.dest("v"), &self.rx.fp, extra)
    }
}

#[test]
fn verify_remote_finds_exact_ranges_and_sync_resends_exactly_them() {
    let size = 24u64 << 20;
    let s = remote(size, 42);
    let r = s.run("sync", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file_hash(&s.source), file_hash(&s.target));

    let r = s.run("verify", &[]);
    assert_verify_end(&r, 0, true, &[], CHUNK);
    assert_eq!(r.event("verify_end")["source_size"], size);
    assert_eq!(r.event("verify_end")["target_size"], size);

    // One byte of the target changed behind the receiver's back.
    let first = 7_777_777u64;
    flip_byte(&s.target, first);
    let mut bad = BTreeSet::from([first / CHUNK]);
    let r = s.run("verify", &[]);
    assert_verify_end(&r, 1, false, &expected_ranges(&bad, CHUNK, size), CHUNK);
    let (o, l) = ranges(r.event("verify_end"))[0];
    assert!(
        o <= first && first < o + l,
        "range ({o},{l}) misses {first}"
    );

    // Scattered corruptions: two adjacent chunks (last byte of one, first of
    // the next), two bytes in one chunk, a lone chunk, and the last byte.
    let offsets = [
        10 * CHUNK + CHUNK - 1,
        11 * CHUNK,
        100 * CHUNK + 5,
        100 * CHUNK + 60_000,
        200 * CHUNK + 4096,
        size - 1,
    ];
    for &off in &offsets {
        flip_byte(&s.target, off);
        bad.insert(off / CHUNK);
    }
    let want = expected_ranges(&bad, CHUNK, size);
    assert_eq!(
        want,
        vec![
            (10 * CHUNK, 2 * CHUNK),
            (100 * CHUNK, CHUNK),
            (first / CHUNK * CHUNK, CHUNK),
            (200 * CHUNK, CHUNK),
            (size - CHUNK, CHUNK),
        ],
        "the test's own expectation"
    );
    let r = s.run("verify", &[]);
    assert_verify_end(&r, 1, false, &want, CHUNK);
    let mismatched = r.event("verify_end")["mismatched_chunks"].as_u64().unwrap();
    assert_eq!(mismatched, bad.len() as u64);

    // The next pass resends exactly the chunks verify found.
    let r = s.run("sync", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.event("pass_end")["changed_chunks"].as_u64().unwrap(),
        mismatched,
        "sync after verify must resend exactly the mismatched chunks: {}",
        r.event("pass_end")
    );
    let r = s.run("verify", &[]);
    assert_verify_end(&r, 0, true, &[], CHUNK);
    assert_eq!(file_hash(&s.source), file_hash(&s.target));
    // Nothing left to send.
    let r = s.run("sync", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.event("pass_end")["changed_chunks"], 0);
}

#[test]
fn verify_remote_uses_the_volume_chunk_size_unless_told() {
    let size = 8u64 << 20;
    let big = 128u64 << 10;
    let s = remote(size, 43);
    let r = s.run("sync", &["--chunk-size", "128K"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let off = 3 * big + 777;
    flip_byte(&s.target, off);

    // Default: the volume's chunk size from the sender's state.
    let r = s.run("verify", &[]);
    assert_verify_end(&r, 1, false, &[(3 * big, big)], big);
    // Asking for 4 KiB chunks changes nothing: the receiver hashes in the
    // volume's own (smaller ones would let a sender test guesses offline).
    let r = s.run("verify", &["--chunk-size", "4K"]);
    assert_verify_end(&r, 1, false, &[(3 * big, big)], big);

    let r = s.run("sync", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.event("pass_end")["changed_chunks"],
        1,
        "one 128 KiB chunk"
    );
    assert_eq!(r.event("pass_end")["chunk_size"], big);
    let r = s.run("verify", &[]);
    assert_verify_end(&r, 0, true, &[], big);
    assert_eq!(file_hash(&s.source), file_hash(&s.target));
}

#[test]
fn verify_remote_refusals() {
    let s = remote(4 << 20, 44);
    assert_eq!(s.run("sync", &[]).code, 0);

    let r = s
        .sender
        .run("verify", &s.source, &s.rx.dest("nope"), &s.rx.fp, &[]);
    assert_eq!(r.code, 2, "unknown volume; stderr: {}", r.stderr);
    assert!(r.stderr.contains("not exported"), "{}", r.stderr);
    assert!(r.event("error")["message"]
        .as_str()
        .unwrap()
        .contains("not exported"));
    assert!(r.all("verify_end").is_empty(), "{:?}", r.events);

    // A receiver that allows someone else.
    let rid2 = keygen(&s.root, "r2-id");
    let someone = keygen(&s.root, "someone");
    let rx2 = Receiver::start(
        &rid2,
        &s.root.join("r2-state"),
        &[("v", &s.root.join("t2.img"))],
        &[&someone.fp],
        0,
    );
    let r = s
        .sender
        .run("verify", &s.source, &rx2.dest("v"), &rx2.fp, &[]);
    assert_eq!(r.code, 2, "unauthorized; stderr: {}", r.stderr);
    assert!(r.stderr.contains("not authorized"), "{}", r.stderr);
    assert!(r.event("error")["message"]
        .as_str()
        .unwrap()
        .contains("not authorized"));
    assert!(r.all("verify_end").is_empty(), "{:?}", r.events);
    assert!(!s.root.join("t2.img").exists());
}

#[test]
fn verify_local_loop_devices() {
    if !need_root("verify_local_loop_devices", &["losetup", "blockdev"]) {
        return;
    }
    let tmp = scratch();
    let root = tmp.path();
    let size = 8u64 << 20;
    let a_file = root.join("a.img");
    let b_file = root.join("b.img");
    let c_file = root.join("c.img");
    random_file(&a_file, size, 45);
    std::fs::copy(&a_file, &b_file).unwrap();
    // A larger device holding the same bytes at its start.
    std::fs::copy(&a_file, &c_file).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&c_file)
        .unwrap();
    f.set_len(size + (1 << 20)).unwrap();
    drop(f);
    let a = Loop::attach(&a_file);
    let b = Loop::attach(&b_file);
    let c = Loop::attach(&c_file);

    let r = verify_local(&a.dev, &b.dev, root, &[]);
    assert_verify_end(&r, 0, true, &[], CHUNK);
    assert_eq!(r.event("verify_end")["source_size"], size);

    let off = 5_123_456u64;
    flip_byte(&b.dev, off);
    let r = verify_local(&a.dev, &b.dev, root, &[]);
    assert_verify_end(&r, 1, false, &[(off / CHUNK * CHUNK, CHUNK)], CHUNK);

    // A target device larger than the source is normal.
    let r = verify_local(&a.dev, &c.dev, root, &[]);
    assert_verify_end(&r, 0, true, &[], CHUNK);
    assert_eq!(r.event("verify_end")["target_size"], size + (1 << 20));
    // A source larger than the target device is not.
    let r = verify_local(&c.dev, &a.dev, root, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}
