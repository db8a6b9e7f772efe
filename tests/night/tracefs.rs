//! The kernel event source of change tracking (`nightpass::io::track`): a
//! private tracefs instance over real loop devices. These need root,
//! losetup and tracefs ([`need_root`]): without them they print SKIP and
//! return by hand, and fail under `CI=true`.

use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nightpass::io::track::{self, tracefs, BlockEvent, Op, Phase, TraceSession};

use crate::harness::*;

/// The kernel dev_t (`MAJOR<<20 | MINOR`) of a block device node.
fn kdev(path: &Path) -> u32 {
    tracefs::kernel_dev(std::fs::metadata(path).expect("stat device").rdev())
}

/// A loop device over a fresh sparse backing file of `size` bytes.
fn loop_of(dir: &Path, name: &str, size: u64) -> Loop {
    let backing = dir.join(name);
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(size))
        .expect("backing file");
    Loop::attach(&backing)
}

/// `dd if=/dev/urandom of=DEV bs=BS seek=SEEK count=COUNT oflag=direct`.
fn dd_direct(dev: &Path, bs: u64, seek: u64, count: u64) {
    run_tool(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", dev.display()),
            &format!("bs={bs}"),
            &format!("seek={seek}"),
            &format!("count={count}"),
            "oflag=direct",
            "status=none",
        ],
    );
}

/// Whether the events of `dev` seen at `phase` cover every sector of
/// `sector..sector+sectors` with operation `op`.
fn covered(
    events: &[BlockEvent],
    dev: u32,
    phase: Phase,
    op: Op,
    sector: u64,
    sectors: u64,
) -> bool {
    (sector..sector + sectors).all(|s| {
        events.iter().any(|e| {
            e.dev == dev
                && e.phase == phase
                && e.op == op
                && e.sector <= s
                && s < e.sector + u64::from(e.sectors)
        })
    })
}

/// Whether tracefs can be used here (root, losetup, the loop driver).
fn need_tracefs(test: &str) -> bool {
    need_root(test, &["losetup", "dd", "blkdiscard"])
}

/// Writes at sector 0 and at the last sector, a discard of a range and
/// direct writes are each returned queued and completed, with their
/// sectors; another device's writes and this device's reads are not; after
/// drop the instance is gone.
#[test]
fn tracefs_sees_every_write_of_its_device_only() {
    if !need_tracefs("tracefs_sees_every_write_of_its_device_only") {
        return;
    }
    let dir = scratch();
    let size = 64 * MIB;
    let dev = loop_of(dir.path(), "traced.img", size);
    let other = loop_of(dir.path(), "other.img", size);
    let (d, o) = (kdev(&dev.dev), kdev(&other.dev));
    let mut t = TraceSession::start(&[d], 0).expect("start tracing");
    assert!(t.dir().is_dir());

    let last = size / 512 - 1;
    dd_direct(&dev.dev, 512, 0, 1);
    dd_direct(&dev.dev, 512, last, 1);
    let dev_path = dev.dev.to_str().unwrap();
    run_tool("blkdiscard", &["-o", "1048576", "-l", "65536", dev_path]);
    dd_direct(&dev.dev, 4096, 100, 4);
    dd_direct(&other.dev, 4096, 0, 8);
    run_tool(
        "dd",
        &[
            &format!("if={dev_path}"),
            "of=/dev/null",
            "bs=1M",
            "skip=4",
            "count=2",
            "iflag=direct",
            "status=none",
        ],
    );
    let events = t.drain(Duration::from_secs(10)).expect("drain");

    for phase in [Phase::Queued, Phase::Completed] {
        assert!(
            covered(&events, d, phase, Op::Write, 0, 1),
            "sector 0 {phase:?}: {events:?}"
        );
        assert!(
            covered(&events, d, phase, Op::Write, last, 1),
            "last sector {phase:?}: {events:?}"
        );
        assert!(
            covered(&events, d, phase, Op::Discard, 2048, 128),
            "discard {phase:?}: {events:?}"
        );
        assert!(
            covered(&events, d, phase, Op::Write, 800, 32),
            "direct writes {phase:?}: {events:?}"
        );
    }
    let queued = |s: u64, n: u32| {
        events
            .iter()
            .any(|e| e.phase == Phase::Queued && e.sector == s && e.sectors == n)
    };
    assert!(
        queued(0, 1) && queued(last, 1),
        "exact sector 0 and last: {events:?}"
    );
    assert!(
        events.iter().all(|e| e.dev == d),
        "another device's events: {o} in {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e.sector + u64::from(e.sectors) > 8192 && e.sector < 12288),
        "the read of 4..6 MiB came through: {events:?}"
    );
    let h = t.health().expect("health");
    assert!(h.unbroken(), "{h:?}");

    let instance = t.dir().to_owned();
    drop(t);
    assert!(
        !instance.exists(),
        "{} still exists after drop",
        instance.display()
    );
}

/// A write-zeroes is returned as such; poll waits for the first event (it
/// returns early when one comes, and empty when none does).
#[test]
fn tracefs_poll_waits_for_the_first_event() {
    if !need_tracefs("tracefs_poll_waits_for_the_first_event") {
        return;
    }
    let dir = scratch();
    let dev = loop_of(dir.path(), "traced.img", 16 * MIB);
    let d = kdev(&dev.dev);
    let mut t = TraceSession::start(&[d], 0).expect("start tracing");

    let t0 = Instant::now();
    assert!(t
        .poll(Duration::from_millis(300), &[])
        .expect("poll")
        .is_empty());
    assert!(
        t0.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t0.elapsed()
    );

    let path = dev.dev.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let p = path.to_str().unwrap();
        run_tool("blkdiscard", &["-z", "-o", "2097152", "-l", "65536", p]);
    });
    let t0 = Instant::now();
    let mut events = t.poll(Duration::from_secs(20), &[]).expect("poll");
    let waited = t0.elapsed();
    writer.join().unwrap();
    assert!(waited < Duration::from_secs(10), "poll took {waited:?}");
    events.extend(t.drain(Duration::from_secs(10)).expect("drain"));
    for phase in [Phase::Queued, Phase::Completed] {
        assert!(
            covered(&events, d, phase, Op::WriteZeroes, 4096, 128),
            "{phase:?}: {events:?}"
        );
    }
}

/// A write held in flight: the traced loop device's backing file lies on
/// an ext4 that is frozen, so the loop worker's write blocks and the
/// request stays between submission and completion. The drain returns its
/// queued event and no completion; after the thaw the completion comes.
/// (A way for the tracker's tests to hold writes in flight on this kernel,
/// which has no device-mapper; blk-throttle would not do, as it holds bios
/// before `block_bio_queue` fires.)
#[test]
fn tracefs_write_held_in_flight() {
    if !need_root(
        "tracefs_write_held_in_flight",
        &["losetup", "dd", "mkfs.ext4", "fsfreeze"],
    ) {
        return;
    }
    let dir = scratch();
    let outer = loop_of(dir.path(), "outer.img", 64 * MIB);
    mkfs_ext4(&outer.dev);
    let mnt = Mount::mount(&outer.dev, &dir.path().join("mnt"), "rw");
    let dev = loop_of(&mnt.dir, "inner.img", 16 * MIB);
    let d = kdev(&dev.dev);
    let mut t = TraceSession::start(&[d], 0).expect("start tracing");

    let m = mnt.dir.to_str().unwrap().to_owned();
    run_tool("fsfreeze", &["-f", &m]);
    let path = dev.dev.clone();
    let writer = std::thread::spawn(move || dd_direct(&path, 4096, 10, 1));
    let mut events = Vec::new();
    let queued = wait_for(Duration::from_secs(10), || {
        events.extend(t.drain(Duration::from_secs(5)).expect("drain"));
        covered(&events, d, Phase::Queued, Op::Write, 80, 8)
    });
    std::thread::sleep(Duration::from_millis(300));
    events.extend(t.drain(Duration::from_secs(5)).expect("drain"));
    let early_completion = covered(&events, d, Phase::Completed, Op::Write, 80, 8);
    run_tool("fsfreeze", &["-u", &m]);
    writer.join().unwrap();
    assert!(
        queued,
        "the held write's submission was not seen: {events:?}"
    );
    assert!(!early_completion, "completed while frozen: {events:?}");
    events.extend(t.drain(Duration::from_secs(5)).expect("drain"));
    assert!(
        covered(&events, d, Phase::Completed, Op::Write, 80, 8),
        "{events:?}"
    );
    drop(t);
    drop(dev);
}

/// A tiny buffer (4 KiB per CPU) under a heavy writer, never read: the
/// loss shows in health().
#[test]
fn tracefs_tiny_buffer_shows_loss() {
    if !need_tracefs("tracefs_tiny_buffer_shows_loss") {
        return;
    }
    let dir = scratch();
    let dev = loop_of(dir.path(), "traced.img", 16 * MIB);
    let t = TraceSession::start(&[kdev(&dev.dev)], 4).expect("start tracing");
    assert_eq!(t.health().expect("health").lost(), 0);
    run_tool(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", dev.dev.display()),
            "bs=512",
            "count=20000",
            "oflag=direct",
            "status=none",
        ],
    );
    let h = t.health().expect("health");
    assert!(h.lost() > 0 && !h.unbroken(), "no loss seen: {h:?}");
}

/// Refusals: no devices, a device that does not exist (exit 2).
#[test]
fn tracefs_refuses_no_devices_and_missing_ones() {
    for devices in [&[][..], &[(4095 << 20) | 4242][..]] {
        match TraceSession::start(devices, 0) {
            Err(e) => assert_eq!(e.exit_code(), 2, "{e}"),
            Ok(_) => panic!("tracing {devices:?} was not refused"),
        }
    }
}

/// Helper for [`tracefs_instance_stays_after_sigkill`], run in a child
/// process: starts a session, prints its directory, sleeps until killed.
#[test]
#[ignore = "helper: run in a child by tracefs_instance_stays_after_sigkill"]
fn tracefs_helper_hold_session() {
    let dev: u32 = std::env::var("NP_TRACEFS_DEV").unwrap().parse().unwrap();
    let t = TraceSession::start(&[dev], 0).expect("start tracing");
    println!("INSTANCE {}", t.dir().display());
    std::thread::sleep(Duration::from_secs(120));
}

/// A process holding a session killed by SIGKILL leaves its instance
/// behind; remove_stale_instances removes it (and only dead ones).
#[test]
fn tracefs_instance_stays_after_sigkill() {
    if !need_tracefs("tracefs_instance_stays_after_sigkill") {
        return;
    }
    let dir = scratch();
    let dev = loop_of(dir.path(), "traced.img", 16 * MIB);
    let mine = TraceSession::start(&[kdev(&dev.dev)], 0).expect("start tracing");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tracefs::tracefs_helper_hold_session",
            "--ignored",
            "--nocapture",
        ])
        .env("NP_TRACEFS_DEV", kdev(&dev.dev).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn helper");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut instance = None;
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut out, &mut line).unwrap_or(0) > 0 {
        if let Some(p) = line.trim().strip_prefix("INSTANCE ") {
            instance = Some(std::path::PathBuf::from(p));
            break;
        }
        line.clear();
    }
    let instance = instance.expect("the helper printed no instance");
    assert!(instance.is_dir());
    child.kill().expect("SIGKILL the helper");
    child.wait().unwrap();
    assert!(instance.is_dir(), "SIGKILL removed the instance?");

    let removed = track::remove_stale_instances().expect("remove stale instances");
    let name = instance.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(removed.contains(&name), "{name} not in {removed:?}");
    assert!(!instance.exists(), "{} still exists", instance.display());
    assert!(mine.dir().is_dir(), "a live session's instance was removed");
    assert!(mine.health().expect("health").unbroken());
}

/// 4 KiB direct writes at random 4 KiB offsets of `dev` (`count` of
/// them); returns the seconds taken.
fn random_writes(dev: &Path, size: u64, count: u64, seed: u64) -> f64 {
    random_writes_cpu(dev, size, count, seed).0
}

/// [`random_writes`], also returning the writing thread's CPU seconds.
fn random_writes_cpu(dev: &Path, size: u64, count: u64, seed: u64) -> (f64, f64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open device O_DIRECT");
    let mut buf = vec![0xA5u8; 8192];
    let at = buf.as_ptr().align_offset(4096);
    let block = &mut buf[at..at + 4096];
    let mut rng = Rng::new(seed);
    rng.fill(block);
    let (t, c) = (Instant::now(), cpu_of("/proc/thread-self/stat"));
    for _ in 0..count {
        let offset = rng.below(size / 4096) * 4096;
        f.write_all_at(block, offset).expect("write");
    }
    (
        t.elapsed().as_secs_f64(),
        cpu_of("/proc/thread-self/stat") - c,
    )
}

/// CPU seconds (user + system) this process has used, from
/// `/proc/self/stat` (clock ticks of 10 ms).
fn cpu_secs() -> f64 {
    cpu_of("/proc/self/stat")
}

/// CPU seconds (user + system) of a `stat` file in /proc.
fn cpu_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).expect(path);
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// One round with a session polled by a thread: (seconds, the writer's CPU
/// seconds, events, lost).
fn traced_writes(dev: &Path, size: u64, count: u64, seed: u64) -> (f64, f64, usize, u64) {
    let mut t = TraceSession::start(&[kdev(dev)], 0).expect("start tracing");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let poller = s.spawn(|| {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += t.poll(Duration::from_millis(100), &[]).expect("poll").len();
            }
            n += t.drain(Duration::from_secs(10)).expect("drain").len();
            (n, t.health().unwrap().lost())
        });
        let (secs, cpu) = random_writes_cpu(dev, size, count, seed);
        stop.store(true, Ordering::Relaxed);
        let (n, lost) = poller.join().unwrap();
        (secs, cpu, n, lost)
    })
}

/// Figures, not a timed test: the cost of a session (polled by a thread)
/// on 4 KiB random direct writes (median of 7 interleaved rounds), and how
/// fast a drain consumes events already in a large buffer. Run: `cargo
/// test --release --test night tracefs_figures -- --ignored --nocapture`.
#[test]
#[ignore = "figures: run by hand"]
fn tracefs_figures() {
    if !need_tracefs("tracefs_figures") {
        return;
    }
    let dir = scratch();
    let size = 256 * MIB;
    let dev = loop_of(dir.path(), "traced.img", size);
    let count = 50_000;
    random_writes(&dev.dev, size, count, 1);
    // Per round: wall seconds, the writer's CPU seconds, the process's CPU
    // seconds (the writer, and with a session the poller too).
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..7 {
        let c0 = cpu_secs();
        let (w0, wc0) = random_writes_cpu(&dev.dev, size, count, 2 + round);
        let c1 = cpu_secs();
        let (w1, wc1, events, lost) = traced_writes(&dev.dev, size, count, 100 + round);
        let c2 = cpu_secs();
        without.push([w0, wc0, c1 - c0]);
        with.push([w1, wc1, c2 - c1]);
        println!(
            "round {round}: without {w0:.3}s (writer CPU {wc0:.2}s, process {:.2}s), \
             with {w1:.3}s (writer CPU {wc1:.2}s, process {:.2}s), {events} events \
             ({:.0} events/s received), lost {lost}",
            c1 - c0,
            c2 - c1,
            events as f64 / w1
        );
    }
    for (k, what) in ["wall", "writer CPU", "process CPU"].iter().enumerate() {
        let median = |v: &[[f64; 3]]| {
            let mut x: Vec<f64> = v.iter().map(|r| r[k]).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let (a, b) = (median(&without), median(&with));
        println!(
            "median {what}: without {a:.3}s, with {b:.3}s: ratio {:.3}",
            b / a
        );
    }

    let mut t = TraceSession::start(&[kdev(&dev.dev)], 64 * 1024).expect("start tracing");
    random_writes(&dev.dev, size, 100_000, 7);
    let t0 = Instant::now();
    let n = t.drain(Duration::from_secs(60)).expect("drain").len();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "drain of a full buffer: {n} events in {secs:.3}s = {:.0} events/s, lost {}",
        n as f64 / secs,
        t.health().unwrap().lost()
    );
}
