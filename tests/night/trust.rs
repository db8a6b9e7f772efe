//! Trust in what the receiver holds and who may touch it (issue 13, items
//! 2, 3, 11, 12, 13 and the small ones of 16): a manifest belongs to one
//! target and is sampled at every session; exports are checked and pinned
//! when `serve` starts; senders may be limited to some volumes; a sender
//! cannot make the receiver create what it cannot hold; a ranged verify
//! stays bounded; state is private to its owner.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nightpass::net::transport::{Identity, RemoteVolume, Tuning};
use nightpass_proto::wire::{self, control::Msg, Mode};

use crate::harness::*;

const CHUNK: u64 = 64 << 10;

/// Runs `nightpass serve` with `args` that must refuse at start; returns
/// (exit status, stderr).
fn serve_refused(id: &Ident, state: &Path, args: &[&str]) -> (i32, String) {
    let mut c = Command::new(bin());
    c.args(["serve", "--listen", "127.0.0.1:0", "--identity"])
        .arg(&id.dir)
        .arg("--state-dir")
        .arg(state)
        .args(args);
    let mut child = c
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let done = wait_for(Duration::from_secs(20), || {
        child.try_wait().map(|s| s.is_some()).unwrap_or(true)
    });
    if !done {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `nightpass serve` exporting `volumes` to the sender `allow` (an
/// `--allow` entry), which must refuse at start; returns (exit status,
/// stderr).
fn export_refused(
    id: &Ident,
    state: &Path,
    volumes: &[(&str, &Path)],
    allow: &str,
) -> (i32, String) {
    let mut args = Vec::new();
    for (name, p) in volumes {
        args.push("--volume".to_string());
        args.push(format!("{name}={}", p.display()));
    }
    args.extend(["--allow".to_string(), allow.to_string()]);
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    serve_refused(id, state, &args)
}

/// A scratch tree with a receiver identity (`r-id`) and a sender's
/// (`s-id`), for `serve` runs that must refuse at start.
fn receiver_and_sender_ids() -> (tempfile::TempDir, Ident, Ident) {
    let root = scratch();
    let id = keygen(root.path(), "r-id");
    let s = keygen(root.path(), "s-id");
    (root, id, s)
}

/// Item 2: a target removed and created again under the same name is
/// another target; its old manifest must not make the sender skip chunks.
#[test]
fn replaced_target_starts_from_nothing() {
    let (_root, src, dst, s, rx) = source_and_volume("src.img", "target.img", 64 * MIB, 21);
    s.sync_ok(&src, &rx, "v", "sync");
    std::fs::remove_file(&dst).unwrap();
    let st = Command::new("truncate")
        .args(["-s", "64M"])
        .arg(&dst)
        .status()
        .unwrap();
    assert!(st.success());
    let r = s.sync_ok(&src, &rx, "v", "sync");
    assert!(
        r.event("pass_end")["changed_chunks"].as_u64().unwrap() > 0,
        "{:?}",
        r.events
    );
    assert_eq!(file_hash(&src), file_hash(&dst), "target bytes differ");
    rx.assert_log_says(
        "starting from nothing known",
        "the receiver did not say it started the replaced target afresh",
    );
}

/// Item 2: bytes changed behind the receiver's back (every other chunk)
/// are found by the random sample at the next session and resent.
#[test]
fn target_changed_behind_the_receiver_is_found_by_the_sample() {
    let (_root, src, dst, s, rx) = source_and_volume("src.img", "target.img", 64 * MIB, 22);
    s.sync_ok(&src, &rx, "v", "sync");
    let junk = vec![0x5au8; CHUNK as usize];
    for i in (0..64 * MIB / CHUNK).step_by(2) {
        write_at(&dst, i * CHUNK, &junk);
    }
    s.sync_ok(&src, &rx, "v", "sync");
    assert_eq!(file_hash(&src), file_hash(&dst), "target bytes differ");
    rx.assert_log_says(
        "behind this receiver's back",
        "the receiver did not say what the sample found",
    );
}

/// Item 3: two names for one file (directly, or through a symbolic link)
/// are refused at start, naming both.
#[test]
fn one_target_exported_twice_is_refused_at_start() {
    let (root, id, s) = receiver_and_sender_ids();
    let dupe = root.path().join("dupe.img");
    std::fs::write(&dupe, vec![0u8; 4096]).unwrap();
    let link = root.path().join("link.img");
    std::os::unix::fs::symlink(&dupe, &link).unwrap();
    for other in [&dupe, &link] {
        let state = root.path().join("state");
        let (code, err) = export_refused(&id, &state, &[("x", &dupe), ("y", other)], &s.fp);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("'x'") && err.contains("'y'"), "{err}");
    }
    // Two missing files at one path are one target too.
    let missing = root.path().join("new.img");
    let (code, err) = export_refused(
        &id,
        &root.path().join("state"),
        &[("x", &missing), ("y", &missing)],
        &s.fp,
    );
    assert_eq!(code, 2, "{err}");
    assert!(!missing.exists());
}

/// Item 3: an export whose directory is missing is refused at start, and
/// nothing is created.
#[test]
fn missing_export_directory_is_refused_at_start() {
    let (root, id, s) = receiver_and_sender_ids();
    let target = root.path().join("nodir").join("t.img");
    let (code, err) = export_refused(&id, &root.path().join("state"), &[("x", &target)], &s.fp);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!root.path().join("nodir").exists());
    assert!(
        !root.path().join("state").exists(),
        "a state directory was created"
    );
}

/// Item 3: a mounted block device, and a state directory that cannot be
/// written, are refused at start; nothing is created.
#[test]
fn mounted_device_and_read_only_state_are_refused_at_start() {
    if !need_root(
        "mounted_device_and_read_only_state_are_refused_at_start",
        &["losetup", "mkfs.ext4", "mount"],
    ) {
        return;
    }
    let (root, id, s) = receiver_and_sender_ids();
    let backing = root.path().join("dev.img");
    // (The mount itself writes the device, so no checksum: the refusal is
    // at start, before any session could open it.)
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let lo = Loop::attach(&backing);
    mkfs_ext4(&lo.dev);
    {
        let _m = Mount::mount(&lo.dev, &root.path().join("mnt"), "rw");
        let (code, err) = export_refused(&id, &root.path().join("state"), &[("x", &lo.dev)], &s.fp);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("in use"), "{err}");
    }
    // A read-only state directory (root ignores modes: a read-only mount).
    let ro = root.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&ro)
        .status()
        .unwrap();
    assert!(st.success());
    let target = root.path().join("t.img");
    let (code, err) = export_refused(&id, &ro.join("state"), &[("x", &target)], &s.fp);
    let _ = Command::new("umount").arg(&ro).status();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not writable"), "{err}");
    assert!(!target.exists());
}

/// Item 16: volume names made only of dots are refused.
#[test]
fn dot_only_volume_names_are_refused() {
    let (root, id, s) = receiver_and_sender_ids();
    for name in [".", "..", "..."] {
        let (code, err) = export_refused(
            &id,
            &root.path().join("state"),
            &[(name, &root.path().join("t.img"))],
            &s.fp,
        );
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains("dots"), "{err}");
    }
}

/// Item 16: a symbolic link export changed after the start is not
/// followed: the session writes the target pinned at start.
#[test]
fn export_symlink_swapped_after_start_is_not_followed() {
    let root = scratch();
    let (src, real1, real2) = (
        root.path().join("src.img"),
        root.path().join("real1.img"),
        root.path().join("real2.img"),
    );
    random_file(&src, 8 * MIB, 23);
    std::fs::write(&real1, b"").unwrap();
    std::fs::File::create(&real1)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    random_file(&real2, 8 * MIB, 24);
    let before2 = file_hash(&real2);
    let link = root.path().join("link.img");
    std::os::unix::fs::symlink(&real1, &link).unwrap();
    let (s, rx) = pair(root.path(), &[("v", &link)]);
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&real2, &link).unwrap();
    s.sync_ok(&src, &rx, "v", "sync");
    assert_eq!(
        file_hash(&real2),
        before2,
        "the swapped-in file was written"
    );
    assert_eq!(file_hash(&real1), file_hash(&src));
}

/// Item 16: state directories are 0700 and their files 0600, on both sides.
#[test]
fn state_is_private_to_its_owner() {
    let (_root, src, _dst, s, rx) = source_and_volume("src.img", "t.img", 4 * MIB, 25);
    s.sync_ok(&src, &rx, "v", "sync");
    let mut seen = 0;
    for top in [&rx.state, &s.state] {
        let mut stack = vec![top.to_path_buf()];
        while let Some(d) = stack.pop() {
            let mode = std::fs::metadata(&d).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = std::fs::metadata(&p).unwrap();
                if m.is_dir() {
                    stack.push(p);
                } else {
                    seen += 1;
                    let mode = m.permissions().mode() & 0o777;
                    assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
                }
            }
        }
    }
    assert!(seen >= 4, "only {seen} state files");
}

/// Item 11: a sender allowed on volume a only cannot sync or verify b
/// (exit 2, b unchanged) and can sync a; an allow entry naming a volume
/// that is not exported is refused at start.
#[test]
fn sender_limited_to_one_volume() {
    let root = scratch();
    let (src, a, b) = (
        root.path().join("src.img"),
        root.path().join("a.img"),
        root.path().join("b.img"),
    );
    random_file(&src, 4 * MIB, 26);
    random_file(&b, 4 * MIB, 27);
    let before = file_hash(&b);
    let s = SenderSide::new(root.path(), "s");
    let rid = keygen(root.path(), "r-id");
    let allow = format!("{}=a", s.id.fp);
    let rx = Receiver::start(
        &rid,
        &root.path().join("r-state"),
        &[("a", &a), ("b", &b)],
        &[&allow],
        0,
    );
    for cmd in ["sync", "verify"] {
        let r = s.run(cmd, &src, &rx.dest("b"), &rx.fp, &[]);
        assert_eq!(r.code, 2, "{cmd}: {}", r.stderr);
        assert!(
            r.stderr.contains("'b'") && r.stderr.contains(&s.id.fp),
            "{}",
            r.stderr
        );
    }
    assert_eq!(file_hash(&b), before);
    let r = s.run("sync", &src, &rx.dest("a"), &rx.fp, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file_hash(&a), file_hash(&src));
    let (code, err) = export_refused(
        &rid,
        &root.path().join("r-state2"),
        &[("a", &a)],
        &format!("{}=a,zz", s.id.fp),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'zz'"), "{err}");
}

/// Item 11: a verify asking for 4 KiB chunks of a volume copied in 64 KiB
/// chunks is answered in 64 KiB chunks.
#[test]
fn verify_uses_the_volume_chunk_size() {
    let (_root, src, _dst, s, rx) = source_and_volume("src.img", "t.img", 4 * MIB, 28);
    s.sync_ok(&src, &rx, "v", "sync");
    let r = s.run(
        "verify",
        &src,
        &rx.dest("v"),
        &rx.fp,
        &["--chunk-size", "4K"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.event("verify_end")["chunk_size"], CHUNK, "{:?}", r.events);
}

/// Item 12: a source larger than --max-size is refused and no target
/// file is created.
#[test]
fn source_larger_than_max_size_is_refused() {
    let root = scratch();
    let (src, dst) = (root.path().join("src.img"), root.path().join("t.img"));
    random_file(&src, 48 * MIB, 29);
    let s = SenderSide::new(root.path(), "s");
    let rid = keygen(root.path(), "r-id");
    let mut c = Command::new(bin());
    c.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--max-size",
        "32M",
        "--identity",
    ])
    .arg(&rid.dir)
    .arg("--state-dir")
    .arg(root.path().join("r-state"))
    .arg("--volume")
    .arg(format!("v={}", dst.display()))
    .args(["--allow", &s.id.fp]);
    let mut child = c
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    // After the line's time and level.
    let from = line.find("listening on ").unwrap_or(0);
    let words: Vec<&str> = line[from..].split_whitespace().collect();
    assert_eq!(words.first(), Some(&"listening"), "{line}");
    let port = words[2].rsplit(':').next().unwrap();
    let dest = format!("127.0.0.1:{port}/v");
    let r = s.run("sync", &src, &dest, words[4], &[]);
    // A cutover learns it in its preflight, before it freezes anything.
    let pre = root.path().join("pre-ran");
    let touch = format!("touch {}", pre.display());
    let cut = s.run(
        "cutover",
        &src,
        &dest,
        words[4],
        &["--force-no-forecast", "--pre", &touch, "--post", "true"],
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("max-size"), "{}", r.stderr);
    assert_eq!(cut.code, 2, "{}", cut.stderr);
    assert!(cut.stderr.contains("max-size"), "{}", cut.stderr);
    assert!(
        !pre.exists(),
        "the cutover froze the source before it was refused"
    );
    assert!(!dst.exists(), "a target file was created");
}

/// Item 12: a hostile authorized peer claiming a 16 TiB source is refused
/// before anything is created: no target file, no manifest.
#[test]
fn huge_claimed_size_creates_nothing() {
    let root = scratch();
    let dst = root.path().join("t.img");
    let (s, rx) = pair(root.path(), &[("v", &dst)]);
    let id = Identity::load(&s.id.dir).unwrap();
    let refusal = runtime().block_on(async {
        let mut peer = AuthorizedPeer::connect(&id, rx.port, &rx.fp, &Tuning::default()).await;
        let hello = wire::Hello {
            chunk_size_explicit: true,
            pass_id: vec![7; 16],
            ..hello_for("v", Mode::Sync, 16 << 40, CHUNK as u32)
        };
        peer.hello(hello).await.unwrap();
        peer.expect_refusal().await
    });
    assert!(refusal.message.contains("larger"), "{}", refusal.message);
    assert!(!dst.exists(), "a target file was created");
    assert!(
        !receiver_manifest(&rx.state, "v").exists(),
        "a manifest was written"
    );
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Item 13: a verify of one range over a large sparse target (9 GiB in
/// 64 KiB chunks: more hashes than one frame holds) completes with
/// correct hashes and bounded receiver memory.
#[test]
fn ranged_verify_over_a_large_target_is_bounded() {
    let root = scratch();
    let dst = root.path().join("t.img");
    let size = 9u64 << 30;
    std::fs::File::create(&dst).unwrap().set_len(size).unwrap();
    let secret = b"0123456789";
    write_at(&dst, 5 << 30, secret);
    let (s, rx) = pair(root.path(), &[("v", &dst)]);
    let id = Identity::load(&s.id.dir).unwrap();
    let dest = RemoteVolume::parse(&rx.dest("v")).unwrap();
    let table = runtime().block_on(async {
        let chunk = nightpass_proto::chunk::ChunkSize::new(CHUNK).unwrap();
        let (mut session, g) = nightpass::app::verify::open_verify(
            &id,
            &dest,
            &rx.fp,
            &Tuning::default(),
            size,
            chunk,
            vec![0, size],
        )
        .await
        .unwrap();
        let t = nightpass::app::verify::receive_hashes(&mut session, &g).await;
        let _ = nightpass::app::verify::forget_and_close(session, &[]).await;
        t
    });
    let table = table.unwrap();
    assert_eq!(table.len() as u64, size / CHUNK * 32);
    let zero = *blake3::hash(&vec![0u8; CHUNK as usize]).as_bytes();
    let mut chunk = vec![0u8; CHUNK as usize];
    chunk[..secret.len()].copy_from_slice(secret);
    let at = ((5u64 << 30) / CHUNK * 32) as usize;
    assert_eq!(&table[at..at + 32], blake3::hash(&chunk).as_bytes());
    assert!(table
        .chunks(32)
        .enumerate()
        .all(|(i, h)| i == at / 32 || h == zero));
    let rss = peak_rss(rx.child.id());
    assert!(rss < 300 * MIB, "receiver peak RSS {} MiB", rss / MIB);
}

/// Item 13: the honest repro: a cutover in 4 KiB chunks onto an existing
/// sparse target, whose proof re-reads more 4 KiB chunks than one frame
/// of hashes holds.
#[test]
fn cutover_in_small_chunks_proves_a_large_range() {
    let root = scratch();
    let (src, dst) = (root.path().join("src.img"), root.path().join("t.img"));
    let size = 520 * MIB;
    random_file(&src, size, 30);
    std::fs::File::create(&dst).unwrap().set_len(size).unwrap();
    let (s, rx) = pair(root.path(), &[("v", &dst)]);
    let r = s.run(
        "cutover",
        &src,
        &rx.dest("v"),
        &rx.fp,
        &[
            "--assume-frozen",
            "--chunk-size",
            "4K",
            "--force-no-forecast",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file_hash(&src), file_hash(&dst));
}

/// Item 13: a cutover onto a target file that does not exist yet (its
/// proof's verify starts before the pass creates the file) succeeds.
#[test]
fn cutover_onto_a_missing_target_file() {
    let (_root, src, dst, s, rx) = source_and_volume("src.img", "t.img", 8 * MIB, 31);
    let r = s.run(
        "cutover",
        &src,
        &rx.dest("v"),
        &rx.fp,
        &["--assume-frozen", "--force-no-forecast"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file_hash(&src), file_hash(&dst));
}

/// Review item 1: an authorized peer cannot choose where the target's last
/// chunk ends. A verify claiming a source of p+1 (then p+2) bytes over a
/// larger target, asking for byte p, must not get the hash of the target's
/// bytes from p's chunk start up to the byte it asked for: with it, each
/// byte could be guessed offline in 256 tries.
#[test]
fn verify_peer_cannot_end_a_short_chunk_where_it_asks() {
    let root = scratch();
    let dst = root.path().join("t.img");
    random_file(&dst, MIB, 31);
    let bytes = std::fs::read(&dst).unwrap();
    let (s, rx) = pair(root.path(), &[("v", &dst)]);
    let id = Identity::load(&s.id.dir).unwrap();
    let dest = RemoteVolume::parse(&rx.dest("v")).unwrap();
    let p = 200_000u64;
    let start = p / CHUNK * CHUNK;
    let ask = |source_size: u64, ranges: Vec<u64>| {
        runtime().block_on(async {
            let chunk = nightpass_proto::chunk::ChunkSize::new(CHUNK).unwrap();
            let (mut session, g) = nightpass::app::verify::open_verify(
                &id,
                &dest,
                &rx.fp,
                &Tuning::default(),
                source_size,
                chunk,
                ranges,
            )
            .await
            .unwrap();
            let t = nightpass::app::verify::receive_hashes(&mut session, &g).await;
            let _ = nightpass::app::verify::forget_and_close(session, &[]).await;
            t.unwrap()
        })
    };
    // Whole chunks are still answered.
    let t = ask(p + 1, vec![0, 1]);
    assert_eq!(&t[..32], blake3::hash(&bytes[..CHUNK as usize]).as_bytes());
    for end in [p + 1, p + 2] {
        let t = ask(end, vec![p, 1]);
        let at = (p / CHUNK * 32) as usize;
        let leaked = blake3::hash(&bytes[start as usize..end as usize]);
        assert_ne!(
            t.get(at..at + 32),
            Some(leaked.as_bytes().as_slice()),
            "the receiver hashed a chunk ending at byte {end}, where the peer asked"
        );
    }
}

/// Review item 3: the sample at a session's start looks at claims of data
/// first. A volume that is mostly zeros, with one chunk of data changed
/// behind the receiver's back, is found out (16 random claims out of 2048,
/// nearly all zeros, would almost never hit that chunk).
#[test]
fn sample_prefers_claims_of_data_over_zero_chunks() {
    let root = scratch();
    let (src, dst) = (root.path().join("src.img"), root.path().join("target.img"));
    std::fs::File::create(&src)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    let data = {
        let p = root.path().join("data");
        random_file(&p, CHUNK, 33);
        std::fs::read(&p).unwrap()
    };
    write_at(&src, 77 * CHUNK, &data);
    let (s, rx) = pair(root.path(), &[("v", &dst)]);
    s.sync_ok(&src, &rx, "v", "sync");
    write_at(&dst, 77 * CHUNK, &vec![0u8; CHUNK as usize]);
    s.sync_ok(&src, &rx, "v", "sync");
    assert_eq!(
        file_hash(&src),
        file_hash(&dst),
        "the pass trusted a stale claim of the one chunk of data"
    );
    rx.assert_log_says(
        "behind this receiver's back",
        "the receiver did not say what the sample found",
    );
}

/// Review item 4: a preflight reads the volume's manifest without taking its
/// lock, so a sync opening the manifest at that moment is not refused "in
/// use". Here the lock is held (as a sync session holds it) while a
/// preflight of the volume asks: it is answered.
#[test]
fn preflight_does_not_take_the_manifest_lock() {
    let (_root, src, _dst, s, rx) = source_and_volume("src.img", "t.img", 4 * MIB, 34);
    s.sync_ok(&src, &rx, "v", "sync");
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(receiver_manifest(&rx.state, "v"))
        .unwrap();
    assert!(nightpass::io::device::lock_exclusive(&held));
    let id = Identity::load(&s.id.dir).unwrap();
    let answer = runtime().block_on(async {
        let mut peer = AuthorizedPeer::connect(&id, rx.port, &rx.fp, &Tuning::default()).await;
        peer.hello(hello_for("v", Mode::Preflight, 4 * MIB, CHUNK as u32))
            .await
            .unwrap();
        let answer = peer.answer().await.unwrap().unwrap();
        peer.close().await;
        answer
    });
    assert!(
        matches!(answer, Msg::Welcome(ref w) if w.chunk_size as u64 == CHUNK),
        "a preflight while the manifest is held: {answer:?}"
    );
    drop(held);
}
