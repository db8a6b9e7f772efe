//! The replication pass end to end (issue 2): full, delta and no-change
//! passes, zero chunks, odd sizes, loop devices, and every refusal.

use std::collections::BTreeSet;
use std::path::Path;

use crate::harness::*;

const CHUNK: u64 = 64 << 10;

struct Setup {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    sender: SenderSide,
    rx: Receiver,
}

fn setup(target: &Path) -> Setup {
    let dir = scratch();
    let root = dir.path().to_owned();
    let sender = SenderSide::new(&root, "s");
    let rid = keygen(&root, "r-id");
    let rx = Receiver::start(
        &rid,
        &root.join("r-state"),
        &[("v", target)],
        &[&sender.id.fp],
        0,
    );
    Setup {
        _dir: dir,
        root,
        sender,
        rx,
    }
}

fn sync(s: &Setup, source: &Path, extra: &[&str]) -> Run {
    s.sender
        .run("sync", source, &s.rx.dest("v"), &s.rx.fp, extra)
}

#[test]
fn full_delta_and_no_change_passes() {
    let tmp = scratch();
    let target = tmp.path().join("target.img");
    let s = setup(&target);
    let source = s.root.join("source.img");
    let size = 48 << 20;
    random_file(&source, size, 1);

    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let end = r.event("pass_end");
    assert_eq!(
        end["changed_chunks"],
        size / CHUNK,
        "random data: every chunk is new"
    );
    assert!(
        end["sent_bytes"].as_u64().unwrap() >= size,
        "random data does not compress"
    );
    assert_eq!(end["pass"], 1);
    assert_eq!(end["size_bytes"], size);
    assert_eq!(end["chunk_size"], CHUNK);
    assert!(end["forecast_final_pass_s"].is_null());
    assert_eq!(file_hash(&source), file_hash(&target));

    // 1% of the volume in scattered 4 KiB writes.
    let mut rng = Rng::new(7);
    let mut blocks = BTreeSet::new();
    let mut block = vec![0u8; 4096];
    for _ in 0..(size / 100 / 4096) {
        let off = rng.below(size / 4096) * 4096;
        rng.fill(&mut block);
        write_at(&source, off, &block);
        blocks.insert(off);
    }
    let touched: BTreeSet<u64> = blocks.iter().map(|b| b / CHUNK).collect();
    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let end = r.event("pass_end");
    assert_eq!(
        end["changed_chunks"].as_u64().unwrap(),
        touched.len() as u64,
        "exactly the touched chunks"
    );
    // Each changed chunk: a probe of 16-byte hints, one per 4 KiB block,
    // then exactly the blocks written.
    let expect = touched.len() as u64 * (CHUNK / 4096) * 16 + blocks.len() as u64 * 4096;
    assert_eq!(
        end["sent_bytes"].as_u64().unwrap(),
        expect,
        "{} blocks written in {} chunks",
        blocks.len(),
        touched.len()
    );
    assert_eq!(end["pass"], 2);
    assert!(
        end["forecast_final_pass_s"].as_f64().is_some(),
        "a second pass forecasts"
    );
    assert_eq!(file_hash(&source), file_hash(&target));

    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let end = r.event("pass_end");
    assert_eq!(end["changed_chunks"], 0);
    assert_eq!(end["sent_bytes"], 0);
    assert_eq!(end["scanned_bytes"], size);
    assert_eq!(file_hash(&source), file_hash(&target));
}

#[test]
fn sparse_source_sends_only_data_and_zeroes_what_was_cleared() {
    let tmp = scratch();
    let target = tmp.path().join("target.img");
    let s = setup(&target);
    let source = s.root.join("sparse.img");
    let size = 32u64 << 20;
    std::fs::File::create(&source)
        .unwrap()
        .set_len(size)
        .unwrap();
    let mut rng = Rng::new(3);
    let mut data = vec![0u8; 100_000];
    for off in [0u64, 5 << 20, 20 << 20] {
        rng.fill(&mut data);
        write_at(&source, off, &data);
    }
    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let sent = r.event("pass_end")["sent_bytes"].as_u64().unwrap();
    assert!(sent < 1 << 20, "only the data chunks travel, sent {sent}");
    assert_eq!(file_hash(&source), file_hash(&target));
    // Clear a chunk that held data: it travels as a zero marker.
    write_at(&source, 5 << 20, &vec![0u8; CHUNK as usize]);
    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let end = r.event("pass_end");
    assert!(end["zero_chunks"].as_u64().unwrap() >= 1, "{end}");
    assert_eq!(file_hash(&source), file_hash(&target));
}

#[test]
fn odd_sizes_copy_exactly_and_empty_is_refused() {
    for (size, name) in [((10u64 << 20) + 1234, "short-last"), (1, "one-byte")] {
        let tmp = scratch();
        let target = tmp.path().join("target.img");
        let s = setup(&target);
        let source = s.root.join(format!("{name}.img"));
        random_file(&source, size, size);
        let r = sync(&s, &source, &[]);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        assert_eq!(std::fs::metadata(&target).unwrap().len(), size, "{name}");
        assert_eq!(file_hash(&source), file_hash(&target), "{name}");
    }
    let tmp = scratch();
    let target = tmp.path().join("target.img");
    let s = setup(&target);
    let empty = s.root.join("empty.img");
    std::fs::File::create(&empty).unwrap();
    let r = sync(&s, &empty, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("empty"), "{}", r.stderr);
    assert!(!target.exists(), "nothing created for an empty source");
}

#[test]
fn compressible_data_travels_compressed() {
    let tmp = scratch();
    let target = tmp.path().join("target.img");
    let s = setup(&target);
    let source = s.root.join("text.img");
    let line = b"GET /index.php?customer=4711 HTTP/1.1 200 OK mail backup invoice\n";
    let text: Vec<u8> = line.iter().copied().cycle().take(16 << 20).collect();
    std::fs::write(&source, &text).unwrap();
    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let sent = r.event("pass_end")["sent_bytes"].as_u64().unwrap();
    assert!(sent < (16 << 20) / 10, "text compresses, sent {sent}");
    assert_eq!(file_hash(&source), file_hash(&target));
}

/// Runs a refused sync and checks exit 2, the message, and the target untouched.
fn assert_refused(r: &Run, needle: &str, target: &Path, before: Option<blake3::Hash>) {
    assert_eq!(
        r.code, 2,
        "expected a refusal ({needle}); stderr: {}",
        r.stderr
    );
    assert!(
        r.stderr.to_lowercase().contains(needle),
        "stderr should mention '{needle}': {}",
        r.stderr
    );
    assert!(r.event("error")["message"]
        .as_str()
        .unwrap()
        .to_lowercase()
        .contains(needle));
    match before {
        Some(h) => assert_eq!(file_hash(target), h, "target changed after a refusal"),
        None => assert!(!target.exists(), "target created after a refusal"),
    }
}

#[test]
fn refusals_write_nothing() {
    let tmp = scratch();
    let target = tmp.path().join("target.img");
    random_file(&target, 8 << 20, 99);
    let before = Some(file_hash(&target));
    let s = setup(&target);
    let source = s.root.join("source.img");
    random_file(&source, 8 << 20, 5);

    // An unauthorized sender.
    let stranger = SenderSide::new(&s.root, "stranger");
    let r = stranger.run("sync", &source, &s.rx.dest("v"), &s.rx.fp, &[]);
    assert_refused(&r, "not authorized", &target, before);

    // A receiver whose fingerprint is not the pinned one.
    let other = keygen(&s.root, "other");
    let r = s
        .sender
        .run("sync", &source, &s.rx.dest("v"), &other.fp, &[]);
    assert_refused(&r, "fingerprint", &target, before);

    // An unknown volume.
    let r = s
        .sender
        .run("sync", &source, &s.rx.dest("nope"), &s.rx.fp, &[]);
    assert_refused(&r, "not exported", &target, before);

    // A target smaller than the source.
    let big = s.root.join("big.img");
    random_file(&big, 9 << 20, 6);
    let r = s.sender.run("sync", &big, &s.rx.dest("v"), &s.rx.fp, &[]);
    assert_refused(&r, "smaller than", &target, before);
}

#[test]
fn chunk_size_is_fixed_at_the_first_pass() {
    let tmp = scratch();
    let target = tmp.path().join("target.img");
    let s = setup(&target);
    let source = s.root.join("source.img");
    random_file(&source, 4 << 20, 8);
    let r = sync(&s, &source, &["--chunk-size", "64K"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let before = Some(file_hash(&target));
    write_at(&source, 0, &[1u8; 4096]);
    let r = sync(&s, &source, &["--chunk-size", "128K"]);
    assert_refused(&r, "chunk size", &target, before);
    // The receiver refuses too, for a sender that lost its state.
    let fresh = SenderSide {
        id: Ident {
            dir: s.sender.id.dir.clone(),
            fp: s.sender.id.fp.clone(),
        },
        state: s.root.join("fresh-state"),
    };
    let r = fresh.run(
        "sync",
        &source,
        &s.rx.dest("v"),
        &s.rx.fp,
        &["--chunk-size", "128K"],
    );
    assert_refused(&r, "chunk size", &target, before);
    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.event("pass_end")["chunk_size"], CHUNK);
}

#[test]
fn second_sender_on_a_busy_volume_is_refused() {
    let tmp = scratch();
    let target = tmp.path().join("target.img");
    let s = setup(&target);
    let source = s.root.join("source.img");
    random_file(&source, 24 << 20, 11);
    let mut slow = s
        .sender
        .command(
            "sync",
            &source,
            &s.rx.dest("v"),
            &s.rx.fp,
            &["--bwlimit", "4M"],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for(std::time::Duration::from_secs(10), || target.exists()),
        "first sync did not start"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let other = SenderSide {
        id: Ident {
            dir: s.sender.id.dir.clone(),
            fp: s.sender.id.fp.clone(),
        },
        state: s.root.join("second-state"),
    };
    let r = other.run("sync", &source, &s.rx.dest("v"), &s.rx.fp, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("in use"), "{}", r.stderr);
    let _ = slow.kill();
    let _ = slow.wait();
}

#[test]
fn loop_devices_as_source_and_target_and_a_mounted_target_refused() {
    if !need_root(
        "loop_devices",
        &["losetup", "mkfs.ext4", "mount", "blockdev", "fsfreeze"],
    ) {
        return;
    }
    let tmp = scratch();
    let src_file = tmp.path().join("src.img");
    let dst_file = tmp.path().join("dst.img");
    let size = 32u64 << 20;
    random_file(&src_file, size, 21);
    std::fs::File::create(&dst_file)
        .unwrap()
        .set_len(size + (1 << 20))
        .unwrap();
    let src = Loop::attach(&src_file);
    let dst = Loop::attach(&dst_file);
    let s = setup(&dst.dev);
    let r = sync(&s, &src.dev, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.event("pass_end")["size_bytes"],
        size,
        "size from BLKGETSIZE64"
    );
    assert_eq!(hash_prefix(&src.dev, size), hash_prefix(&dst.dev, size));
    let mut rng = Rng::new(4);
    let mut touched = BTreeSet::new();
    let mut block = vec![0u8; 4096];
    for _ in 0..50 {
        let off = rng.below(size / 4096) * 4096;
        rng.fill(&mut block);
        write_at(&src.dev, off, &block);
        touched.insert(off / CHUNK);
    }
    let r = sync(&s, &src.dev, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.event("pass_end")["changed_chunks"].as_u64().unwrap(),
        touched.len() as u64
    );
    assert_eq!(hash_prefix(&src.dev, size), hash_prefix(&dst.dev, size));
    drop(s);

    // A mounted target device is refused and left alone.
    let m_file = tmp.path().join("mounted.img");
    std::fs::File::create(&m_file)
        .unwrap()
        .set_len(size * 2)
        .unwrap();
    let m = Loop::attach(&m_file);
    mkfs_ext4(&m.dev);
    let mnt = tmp.path().join("mnt");
    let _mnt = Mount::mount(&m.dev, &mnt, "rw");
    // Frozen, so that ext4's own background work (lazy inode-table init,
    // journal commits) cannot change the device: any change is then ours.
    let freeze = |op: &str| {
        let st = std::process::Command::new("fsfreeze")
            .arg(op)
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "fsfreeze {op}");
    };
    freeze("-f");
    let before = hash_prefix(&m.dev, size * 2);
    // Refused when serve starts, not at the first session.
    let rid = keygen(tmp.path(), "r-id2");
    let fp = keygen(tmp.path(), "s-id2").fp;
    let out = std::process::Command::new(bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--allow",
            &fp,
            "--identity",
        ])
        .arg(&rid.dir)
        .arg("--state-dir")
        .arg(tmp.path().join("r-state2"))
        .arg("--volume")
        .arg(format!("v={}", m.dev.display()))
        .output()
        .unwrap();
    let after = hash_prefix(&m.dev, size * 2);
    freeze("-u");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("in use"), "{err}");
    assert_eq!(after, before, "a refused export changed the mounted device");
}

#[test]
fn untrusted_manifests_are_rebuilt_not_believed() {
    let tmp = scratch();
    let target = tmp.path().join("target.img");
    let s = setup(&target);
    let source = s.root.join("source.img");
    random_file(&source, 8 << 20, 31);
    assert_eq!(sync(&s, &source, &[]).code, 0);

    // The sender's view is corrupt: it adopts the receiver's and sends nothing new.
    // targets/<receiver fingerprint>/<volume>
    let ours = s.sender.state.join("targets");
    let by_receiver = std::fs::read_dir(&ours)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let dir = by_receiver.join("v");
    write_at(&dir.join("manifest"), 40, &[0xff; 8]);
    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.event("pass_end")["changed_chunks"], 0);

    // The receiver's manifest is corrupt: it rebuilds from a fresh read of the
    // target, which holds the data, so nothing is resent...
    let theirs = receiver_manifest(&s.root.join("r-state"), "v");
    write_at(&theirs, 40, &[0xff; 8]);
    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.event("pass_end")["changed_chunks"], 0);
    assert!(
        s.rx.log().contains("rebuilding it from a fresh read"),
        "{}",
        s.rx.log()
    );

    // ...and a chunk damaged behind its back while the manifest was lost is resent.
    write_at(&theirs, 40, &[0xee; 8]);
    write_at(&target, 3 * CHUNK + 17, b"damage");
    let r = sync(&s, &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.event("pass_end")["changed_chunks"], 1);
    assert_eq!(file_hash(&source), file_hash(&target));
}
