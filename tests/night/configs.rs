//! Every tuning of a pass gives a byte-identical target: O_DIRECT reads,
//! dropped cache, one or many streams, BBR, small QUIC windows and the two
//! throttles (which must also really hold the pass back). And `--direct`
//! really leaves the page cache alone.

use std::path::Path;
use std::process::Command;

use crate::harness::*;

/// Bytes of `path` resident in the page cache, from util-linux `fincore`.
fn cached_bytes(path: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux)");
    assert!(out.status.success(), "fincore failed");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("fincore prints a number")
}

#[test]
fn every_configuration_gives_an_identical_target() {
    let dir = scratch();
    let root = dir.path();
    let configs: Vec<(&str, Vec<&str>)> = vec![
        ("direct", vec!["--direct"]),
        ("drop-cache", vec!["--drop-cache"]),
        ("one-stream", vec!["--streams", "1"]),
        ("many-streams", vec!["--streams", "16"]),
        ("bbr", vec!["--congestion", "bbr"]),
        ("small-window", vec!["--quic-window", "256K"]),
        ("bwlimit", vec!["--bwlimit", "6M"]),
        ("read-limit", vec!["--read-limit", "6M"]),
    ];
    let targets: Vec<(String, std::path::PathBuf)> = configs
        .iter()
        .map(|(n, _)| (n.to_string(), root.join(format!("target-{n}.img"))))
        .collect();
    let vols: Vec<(&str, &Path)> = targets
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let (sender, rx) = pair(root, &vols);
    // Not a multiple of 4 KiB: the direct reader's last block is unaligned.
    let size = 12 * MIB + 5 * 4096 + 1234;
    let source = root.join("source.img");
    random_file(&source, size, 301);
    let want = file_hash(&source);
    for ((name, extra), (_, target)) in configs.iter().zip(&targets) {
        let r = sender.run("sync", &source, &rx.dest(name), &rx.fp, extra);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        assert_eq!(file_hash(target), want, "{name}: target differs");
        let end = r.event("pass_end");
        if name.ends_with("limit") {
            // 12 MiB at 6 MiB/s: a throttle that holds takes at least ~2 s.
            let d = end["duration_s"].as_f64().unwrap();
            assert!(d >= 1.8, "{name}: a 12 MiB pass at 6M/s took only {d} s");
        }
        let r = sender.run("sync", &source, &rx.dest(name), &rx.fp, extra);
        assert_eq!(r.code, 0, "{name}, second pass: {}", r.stderr);
        assert_eq!(r.event("pass_end")["changed_chunks"], 0, "{name}");
    }
}

#[test]
fn direct_reads_leave_the_page_cache_alone() {
    if Command::new("fincore").arg("--version").output().is_err() {
        skip(
            "direct_reads_leave_the_page_cache_alone",
            "fincore (util-linux) is missing",
        );
        return;
    }
    let dir = scratch();
    let root = dir.path();
    let (ta, tb) = (root.join("a.img"), root.join("b.img"));
    let (sender, rx) = pair(root, &[("a", &ta), ("b", &tb)]);
    let size = 32 * MIB;
    let source = root.join("source.img");
    random_file(&source, size, 302);
    let want = file_hash(&source);

    evict_from_cache(&source);
    let before = cached_bytes(&source);
    let r = sender.run("sync", &source, &rx.dest("a"), &rx.fp, &["--direct"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let direct = cached_bytes(&source);

    evict_from_cache(&source);
    let r = sender.run("sync", &source, &rx.dest("b"), &rx.fp, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let buffered = cached_bytes(&source);
    eprintln!(
        "page cache of a 32 MiB source: {before} B before, {direct} B after a --direct pass, {buffered} B after a buffered pass"
    );
    assert!(
        direct <= before + MIB,
        "a --direct pass left {direct} bytes of the source cached (before: {before})"
    );
    assert!(
        buffered >= size / 2,
        "a buffered pass should have cached the source ({buffered} B): the measurement is broken"
    );
    assert_eq!(file_hash(&ta), want);
    assert_eq!(file_hash(&tb), want);
}

#[test]
fn direct_reads_of_a_loop_device_with_an_unaligned_size() {
    if !need_root(
        "direct_reads_of_a_loop_device_with_an_unaligned_size",
        &["losetup"],
    ) {
        return;
    }
    let dir = scratch();
    let root = dir.path();
    let backing = root.join("backing.img");
    // 512-byte sectors, but not a whole number of 4 KiB blocks.
    random_file(&backing, 8 * MIB + 7 * 512, 303);
    let lo = Loop::attach(&backing);
    let target = root.join("target.img");
    let (sender, rx) = pair(root, &[("v", &target)]);
    let r = sender.run("sync", &lo.dev, &rx.dest("v"), &rx.fp, &["--direct"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(size_of(&lo.dev), 8 * MIB + 7 * 512);
    assert_eq!(file_hash(&target), file_hash(&backing));
    let r = Command::new(bin())
        .args(["verify", "--json", "--direct"])
        .arg(&lo.dev)
        .arg(&target)
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}
