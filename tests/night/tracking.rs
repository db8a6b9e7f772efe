//! Change tracking as a sender sees it without a tracker: `--scan` and the
//! `pass_end` fields that say how a pass chose what to read.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

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

/// A loop device over a backing file of random bytes.
fn random_loop(s: &Setup, name: &str, size: u64, seed: u64) -> (Loop, std::path::PathBuf) {
    let backing = s.path(name);
    random_file(&backing, size, seed);
    (Loop::attach(&backing), backing)
}

/// `nightpass track DEV...` into the setup's sender state, once it says
/// it is recording.
fn start_tracker(s: &Setup, devs: &[&Path], extra: &[&str]) -> Spawned {
    let mut c = std::process::Command::new(bin());
    c.arg("track")
        .args(devs)
        .arg("--state-dir")
        .arg(&s.sender_state);
    c.args(extra);
    let t = Spawned::start(c);
    let all = devs.len();
    assert!(
        wait_for(Duration::from_secs(10), || t
            .stderr()
            .matches("tracking ")
            .count()
            >= all),
        "the tracker did not say it is tracking: {}",
        t.stderr()
    );
    t
}

/// `dd if=/dev/urandom of=DEV bs=4096 seek=BLOCK count=N oflag=direct`.
fn write_blocks(dev: &Path, block: u64, count: u64) {
    run_tool(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", dev.display()),
            "bs=4096",
            &format!("seek={block}"),
            &format!("count={count}"),
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ],
    );
}

/// The target file holds exactly the device's bytes.
#[track_caller]
fn assert_device_copied(dev: &Path, target: &Path) {
    assert_eq!(file_len(target), size_of(dev), "the target's length");
    assert_same_prefix(dev, target, size_of(dev));
}

/// A loop device of random bytes as the source, a receiver exporting a
/// target file, a sender pinned to it, and a tracker recording the device.
/// Fields drop in order: the tracker first, the loop device last.
struct TrackedVolume {
    tracker: Option<Spawned>,
    tx: Sender,
    dest: String,
    target: std::path::PathBuf,
    rx: Receiver,
    backing: std::path::PathBuf,
    lo: Loop,
    s: Setup,
}

impl TrackedVolume {
    fn new(size: u64, seed: u64, tracker_flags: &[&str]) -> TrackedVolume {
        let s = Setup::new();
        let (lo, backing) = random_loop(&s, "src.img", size, seed);
        let target = s.path("target.img");
        let rx = s.start_receiver(&[("vol", &target)]);
        let tx = s.sender(&rx);
        let dest = rx.dest("vol");
        let tracker = Some(start_tracker(&s, &[&lo.dev], tracker_flags));
        TrackedVolume {
            tracker,
            tx,
            dest,
            target,
            rx,
            backing,
            lo,
            s,
        }
    }

    /// A sync of the device; its pass_end (the run must succeed).
    fn pass(&self, extra: &[&str]) -> Value {
        pass_end(&self.tx.sync(&self.lo.dev, &self.dest, extra))
    }

    /// `cutover --assume-frozen --json` of the device, with `extra` flags.
    fn cutover(&self, extra: &[&str]) -> Run {
        let mut c = std::process::Command::new(bin());
        c.arg("cutover").arg(&self.lo.dev).arg(&self.dest);
        c.args(["--server-fingerprint", &self.tx.server_fp, "--identity"]);
        c.arg(&self.tx.identity)
            .arg("--state-dir")
            .arg(&self.tx.state_dir);
        c.args(["--assume-frozen", "--json"]).args(extra);
        run_command(c)
    }

    fn tracker(&self) -> &Spawned {
        self.tracker.as_ref().expect("a tracker runs")
    }
}

impl Drop for TrackedVolume {
    /// Stops the tracker the way an operator does (SIGTERM), so that it
    /// removes its trace instance (a SIGKILL would leave it to the next
    /// tracker to clear).
    fn drop(&mut self) {
        if let Some(t) = self.tracker.take() {
            stop_tracker(t);
        }
    }
}

/// SIGTERM, then waits for the tracker to end.
fn stop_tracker(t: Spawned) {
    t.signal(libc::SIGTERM);
    let _ = t.finish(Duration::from_secs(10));
}

fn pass_end(r: &Run) -> Value {
    r.ok();
    r.event("pass_end").clone()
}

/// With a tracker running: the first pass reads everything (first of the
/// record); writes at the first and last 4 KiB of the device, in the
/// middle, and a discard are read back alone by the next pass, which sends
/// only the blocks written; a pass with nothing written reads nothing; the
/// target is identical throughout.
#[test]
fn a_tracked_pass_reads_only_the_chunks_written() {
    if !need_root(
        "a_tracked_pass_reads_only_the_chunks_written",
        &["losetup", "dd", "blkdiscard"],
    ) {
        return;
    }
    let size = 64 * MIB;
    let mut v = TrackedVolume::new(size, 51, &[]);
    let p1 = v.pass(&[]);
    assert_eq!(p1["scan"], "full", "{p1}");
    assert!(
        p1["scan_reason"].as_str().unwrap().contains("first pass"),
        "{p1}"
    );
    assert_device_copied(&v.lo.dev, &v.target);

    let last = size / 4096 - 1;
    write_blocks(&v.lo.dev, 0, 1);
    write_blocks(&v.lo.dev, last, 1);
    write_blocks(&v.lo.dev, 5000, 3);
    let dev = v.lo.dev.to_string_lossy().into_owned();
    run_tool(
        "blkdiscard",
        &[
            "-o",
            &(40 * MIB).to_string(),
            "-l",
            &(128 * 1024).to_string(),
            &dev,
        ],
    );
    let p2 = v.pass(&["--audit", "0"]);
    assert_eq!(p2["scan"], "tracked", "{p2}");
    assert!(
        p2.get("scan_reason").is_none(),
        "a tracked pass gives no scan_reason: {p2}"
    );
    // Chunks 0, 255 (last), 312 (blocks 5000..5003), 640 and 641 (the discard).
    assert_eq!(p2["read_bytes"], 5 * CHUNK, "{p2}");
    assert_eq!(p2["changed_chunks"], 5, "{p2}");
    let sent = p2["sent_bytes"].as_u64().unwrap();
    assert!(
        sent <= 5 * 4096,
        "the written blocks travel as patches, not chunks: {sent} bytes"
    );
    assert_device_copied(&v.lo.dev, &v.target);

    let p3 = v.pass(&["--audit", "0"]);
    assert_eq!(
        (p3["scan"].as_str(), p3["read_bytes"].as_u64()),
        (Some("tracked"), Some(0)),
        "{p3}"
    );
    // The forecast assumes a tracked final pass now, and still has one
    // after a pass that read nothing.
    let mut c = std::process::Command::new(bin());
    c.args(["status", "--json", "--state-dir"])
        .arg(&v.s.sender_state);
    let st = run_command(c);
    assert_eq!(
        st.event("status")["forecast_scan"],
        "tracked",
        "{}",
        st.context()
    );
    assert!(
        st.event("status")["forecast_final_pass_s"]
            .as_f64()
            .is_some(),
        "{}",
        st.context()
    );
    let tracker = v.tracker.take().expect("a tracker runs");
    tracker.signal(libc::SIGTERM);
    let t = tracker.finish(Duration::from_secs(10));
    assert_eq!(
        t.code, 0,
        "a tracker stopped by SIGTERM exits 0: {}",
        t.stderr
    );
}

/// A tracker killed by SIGKILL leaves no record a pass trusts: the next
/// pass reads everything and says why; a new tracker starts a new record
/// (a full pass first), after which passes are tracked again.
#[test]
fn a_killed_tracker_makes_the_next_pass_full_and_a_new_one_resumes() {
    if !need_root(
        "a_killed_tracker_makes_the_next_pass_full_and_a_new_one_resumes",
        &["losetup", "dd"],
    ) {
        return;
    }
    let mut v = TrackedVolume::new(16 * MIB, 52, &[]);
    v.pass(&[]);
    v.tracker.take().expect("a tracker runs").kill9();
    write_blocks(&v.lo.dev, 7, 1);
    let p = v.pass(&[]);
    assert_eq!(p["scan"], "full", "{p}");
    assert!(
        p["scan_reason"]
            .as_str()
            .unwrap()
            .contains("no tracker is recording"),
        "{p}"
    );
    let refused = v.tx.sync(&v.lo.dev, &v.dest, &["--scan", "tracked"]);
    refused.assert_refused("--scan tracked");

    v.tracker = Some(start_tracker(&v.s, &[&v.lo.dev], &[]));
    let p = v.pass(&[]);
    assert_eq!(
        p["scan"], "full",
        "a new record begins with a full pass: {p}"
    );
    write_blocks(&v.lo.dev, 9, 1);
    let p = v.pass(&["--scan", "tracked", "--audit", "0"]);
    assert_eq!(
        (p["scan"].as_str(), p["read_bytes"].as_u64()),
        (Some("tracked"), Some(CHUNK)),
        "{p}"
    );
    assert_device_copied(&v.lo.dev, &v.target);
}

/// One tracker per device and state directory; an image file, or a
/// missing path, is refused with exit 2.
#[test]
fn a_second_tracker_and_a_file_source_are_refused() {
    if !need_root(
        "a_second_tracker_and_a_file_source_are_refused",
        &["losetup"],
    ) {
        return;
    }
    let v = TrackedVolume::new(4 * MIB, 53, &[]);
    v.tracker();
    for (what, path) in [
        ("second tracker", v.lo.dev.clone()),
        ("image file", v.backing.clone()),
    ] {
        let mut c = std::process::Command::new(bin());
        c.arg("track")
            .arg(&path)
            .arg("--state-dir")
            .arg(&v.s.sender_state);
        let r = Spawned::start(c).finish(Duration::from_secs(20));
        assert_eq!(r.code, 2, "{what}: {}", r.stderr);
    }
}

/// A trace buffer too small for a heavy writer loses events: the record
/// ends, and the next pass reads everything, saying events were lost; the
/// target still ends identical.
#[test]
fn lost_events_make_the_next_pass_full() {
    if !need_root("lost_events_make_the_next_pass_full", &["losetup", "dd"]) {
        return;
    }
    let v = TrackedVolume::new(32 * MIB, 54, &["--trace-buffer", "4K"]);
    v.pass(&[]);
    // The tracker stopped (SIGSTOP) while thousands of separate writes
    // fill its 4 KiB buffer: the kernel overwrites what it did not read.
    v.tracker().signal(libc::SIGSTOP);
    let of = format!("of={}", v.lo.dev.display());
    run_tool(
        "dd",
        &[
            "if=/dev/urandom",
            &of,
            "bs=512",
            "count=20000",
            "oflag=direct",
            "status=none",
        ],
    );
    v.tracker().signal(libc::SIGCONT);
    let p = v.pass(&[]);
    assert_eq!(p["scan"], "full", "{p}");
    assert!(p["scan_reason"].as_str().unwrap().contains("lost"), "{p}");
    assert_device_copied(&v.lo.dev, &v.target);
}

/// A chunk changed behind the tracker (the loop's backing file written
/// directly, which the block layer of the loop device never sees) is
/// caught by the audit: an error event names it, and the pass reads the
/// whole volume, so the target ends identical.
#[test]
fn the_audit_catches_a_change_behind_the_record() {
    if !need_root(
        "the_audit_catches_a_change_behind_the_record",
        &["losetup", "dd"],
    ) {
        return;
    }
    let v = TrackedVolume::new(16 * MIB, 55, &[]);
    v.pass(&[]);
    write_at(&v.backing, 3 * CHUNK + 100, b"behind the tracker's back");
    // The loop device caches nothing of it: drop its pages so it reads the file.
    run_tool("blockdev", &["--flushbufs", &v.lo.dev.to_string_lossy()]);
    let r = v.tx.sync(&v.lo.dev, &v.dest, &["--audit", "100"]);
    assert_eq!(r.code, 0, "{}", r.context());
    let err = r
        .events
        .iter()
        .find(|e| e["event"] == "error")
        .unwrap_or_else(|| panic!("no error event for the audit\n{}", r.context()));
    assert_eq!(err["chunks"][0], 3, "{err}");
    let p = r.event("pass_end");
    assert_eq!(p["scan"], "full", "{p}");
    assert!(p["scan_reason"].as_str().unwrap().contains("audit"), "{p}");
    assert_device_copied(&v.lo.dev, &v.target);
}

/// Writes made while a pass runs are read again by the next pass, whether
/// the running pass read their chunks before or after them: the target
/// ends identical after a tracked pass.
#[test]
fn writes_during_a_pass_are_caught_by_the_next() {
    if !need_root(
        "writes_during_a_pass_are_caught_by_the_next",
        &["losetup", "dd"],
    ) {
        return;
    }
    let size = 32 * MIB;
    let v = TrackedVolume::new(size, 56, &[]);
    v.pass(&[]);
    // A pass slow enough to write into while it reads (all of the volume:
    // --scan full), over chunks both ahead of it and behind it.
    let slow = v.tx.spawn_sync(
        &v.lo.dev,
        &v.dest,
        &["--scan", "full", "--read-limit", "16M"],
    );
    slow.expect_event("pass_start", Duration::from_secs(20));
    for i in 0..20u64 {
        write_blocks(&v.lo.dev, (i * 409) % (size / 4096), 1);
        std::thread::sleep(Duration::from_millis(50));
    }
    pass_end(&slow.finish(Duration::from_secs(60)));
    let p = v.pass(&["--audit", "0"]);
    assert_eq!(p["scan"], "tracked", "{p}");
    assert_device_copied(&v.lo.dev, &v.target);
}

/// The tracker names SOURCE as given (a symlink stays a symlink, as
/// `/dev/vg0/filer01` does) on stderr, and with `--json` in a
/// `track_start` event that also names the device.
#[test]
fn the_tracker_says_what_it_tracks_as_given() {
    if !need_root("the_tracker_says_what_it_tracks_as_given", &["losetup"]) {
        return;
    }
    let s = Setup::new();
    let (lo, _) = random_loop(&s, "src.img", 4 * MIB, 57);
    let link = s.path("filer01");
    std::os::unix::fs::symlink(&lo.dev, &link).unwrap();
    let t = start_tracker(&s, &[&link], &["--json"]);
    assert!(
        t.stderr().contains(&format!("tracking {}", link.display())),
        "{}",
        t.stderr()
    );
    assert!(
        wait_for(Duration::from_secs(5), || t.saw("track_start")),
        "no track_start event: {}",
        t.stdout()
    );
    let start = t.wait_for_event("track_start", Duration::from_secs(1));
    assert_eq!(start["source"], link.display().to_string(), "{start}");
    assert_eq!(start["device"], lo.dev.display().to_string(), "{start}");
    stop_tracker(t);
}

/// `converge` with an unbroken record: its passes after the first are
/// tracked and run alone (no whole read of the target alongside, which
/// only a full pass's rehearsal needs), and it gets ready.
#[test]
fn converge_with_a_tracker_runs_tracked_passes_alone() {
    if !need_root(
        "converge_with_a_tracker_runs_tracked_passes_alone",
        &["losetup", "dd"],
    ) {
        return;
    }
    let v = TrackedVolume::new(16 * MIB, 58, &[]);
    v.pass(&[]);
    let target_reads = || -> usize {
        let mut n = 0;
        let mut dirs = vec![v.s.sender_state.join("targets")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.file_name().is_some_and(|f| f == "journal.jsonl") {
                    n += std::fs::read_to_string(&p)
                        .unwrap()
                        .matches("\"target_read\"")
                        .count();
                }
            }
        }
        n
    };
    let before = target_reads();
    write_blocks(&v.lo.dev, 11, 1);
    let mut c = std::process::Command::new(bin());
    c.arg("converge").arg(&v.lo.dev).arg(&v.dest);
    c.args([
        "--server-fingerprint",
        &v.tx.server_fp,
        "--json",
        "--identity",
    ]);
    c.arg(&v.tx.identity)
        .arg("--state-dir")
        .arg(&v.tx.state_dir);
    c.args(["--window", "60s", "--max-passes", "3"]);
    let r = run_command(c);
    assert_eq!(r.code, 0, "{}", r.context());
    for p in r.all("pass_end") {
        assert_eq!(p["scan"], "tracked", "{p}");
    }
    assert_eq!(r.event("converge_end")["ready"], true, "{}", r.context());
    assert_eq!(
        target_reads(),
        before,
        "a tracked converge read the whole target"
    );
    assert_device_copied(&v.lo.dev, &v.target);
}

/// A chunk the audit found changed in an attempt that then lost its link
/// stays found when the pass resumes past it: the pass still says so and
/// reads the whole volume.
#[test]
fn an_audit_finding_survives_a_lost_link() {
    if !need_root("an_audit_finding_survives_a_lost_link", &["losetup", "dd"]) {
        return;
    }
    let mut v = TrackedVolume::new(32 * MIB, 59, &[]);
    v.pass(&[]);
    write_at(&v.backing, 3 * CHUNK + 100, b"behind the tracker's back");
    run_tool("blockdev", &["--flushbufs", &v.lo.dev.to_string_lossy()]);
    // Slow enough (8 MiB/s of reads) to lose the link mid-pass, long after
    // chunk 3 was read, found changed, sent and acknowledged.
    let flags = ["--audit", "100", "--read-limit", "8M", "--retry-for", "60s"];
    let run = v.tx.spawn_sync(&v.lo.dev, &v.dest, &flags);
    run.expect_event("pass_start", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    v.rx.restart();
    let r = run.finish(Duration::from_secs(90));
    assert_eq!(r.code, 0, "{}", r.context());
    let err = r.events.iter().find(|e| e["event"] == "error");
    assert!(
        err.is_some_and(|e| e["chunks"][0] == 3),
        "no audit error for chunk 3\n{}",
        r.context()
    );
    let p = r.event("pass_end");
    assert_eq!(p["scan"], "full", "{p}");
    assert_device_copied(&v.lo.dev, &v.target);
}

/// A cutover with a tracker forecasts from the chunks the record names
/// now (four chunks written since the last pass) and proves what its
/// tracked pass read; after an unseal, `--proof full` reads the whole
/// frozen source, forecasts a full pass and says `"proof":"full"`;
/// `--proof full --scan tracked` contradicts itself (exit 2, nothing
/// frozen).
#[test]
fn a_cutover_makes_the_proof_asked_and_forecasts_what_the_record_names() {
    if !need_root(
        "a_cutover_makes_the_proof_asked_and_forecasts_what_the_record_names",
        &["losetup", "dd"],
    ) {
        return;
    }
    let size = 16 * MIB;
    let v = TrackedVolume::new(size, 61, &[]);
    v.pass(&[]);
    assert_eq!(v.pass(&[])["scan"], "tracked");
    let write_four = || {
        for chunk in [1u64, 7, 100, 255] {
            write_blocks(&v.lo.dev, chunk * CHUNK / 4096 + 3, 1);
        }
    };
    write_four();
    let cutover = |extra: &[&str]| v.cutover(&[&["--audit", "0"], extra].concat());
    let bad = cutover(&["--proof", "full", "--scan", "tracked"]);
    assert_eq!(bad.code, 2, "{}", bad.context());
    assert!(bad.stderr.contains("contradicts"), "{}", bad.stderr);

    let r = cutover(&[]);
    assert_eq!(r.code, 0, "{}", r.context());
    let f = r.event("cutover_forecast");
    assert_eq!(
        (f["scan"].as_str(), f["changed_bytes"].as_u64()),
        (Some("tracked"), Some(4 * CHUNK)),
        "the forecast counts the record's 4 chunks: {f}"
    );
    assert_eq!(
        r.event("cutover_end")["proof"],
        "tracked",
        "{}",
        r.context()
    );
    let last = r.all("pass_end").pop().expect("a frozen pass").clone();
    assert_eq!(last["read_bytes"], 4 * CHUNK, "{last}");
    assert_device_copied(&v.lo.dev, &v.target);

    let mut c = std::process::Command::new(bin());
    c.args(["unseal", "vol", "--json", "--state-dir"])
        .arg(&v.rx.state);
    assert_eq!(run_command(c).code, 0);
    v.pass(&[]);
    write_four();
    let r = cutover(&["--proof", "full"]);
    assert_eq!(r.code, 0, "{}", r.context());
    assert_eq!(r.event("cutover_forecast")["scan"], "full");
    assert_eq!(r.event("cutover_end")["proof"], "full", "{}", r.context());
    let last = r.all("pass_end").pop().expect("a frozen pass").clone();
    assert_eq!(last["read_bytes"], size, "{last}");
    assert_device_copied(&v.lo.dev, &v.target);
}

/// Under `--scan auto`, a cutover whose change record names every chunk
/// (a write in each) reads the whole volume instead, with its proof
/// alongside, because that is forecast faster than reading every chunk
/// one by one and then again for a tracked proof; it says why.
#[test]
fn a_cutover_reads_everything_when_that_is_forecast_faster() {
    if !need_root(
        "a_cutover_reads_everything_when_that_is_forecast_faster",
        &["losetup", "dd"],
    ) {
        return;
    }
    let size = 16 * MIB;
    let v = TrackedVolume::new(size, 67, &[]);
    v.pass(&[]);
    v.pass(&["--scan", "full"]);
    for chunk in 0..size / CHUNK {
        write_blocks(&v.lo.dev, chunk * CHUNK / 4096, 1);
    }
    assert_eq!(v.pass(&[])["scan"], "tracked");
    for chunk in 0..size / CHUNK {
        write_blocks(&v.lo.dev, chunk * CHUNK / 4096 + 1, 1);
    }
    let r = v.cutover(&[]);
    assert_eq!(r.code, 0, "{}", r.context());
    assert_eq!(
        r.event("cutover_forecast")["scan"],
        "full",
        "{}",
        r.context()
    );
    let last = r.all("pass_end").pop().expect("a frozen pass").clone();
    assert_eq!(last["read_bytes"], size, "{last}");
    let why = last["scan_reason"].as_str().unwrap_or_default();
    assert!(why.contains("forecast faster"), "{last}");
    assert_eq!(r.event("cutover_end")["proof"], "full");
    assert_device_copied(&v.lo.dev, &v.target);
}

/// A dry run with a tracker running takes no cut from its record (that
/// would consume what the next pass needs): after writes to 3 chunks it
/// reads the whole device and reports those 3 chunks, and the next pass is
/// still tracked and sends exactly them.
#[test]
fn a_dry_run_leaves_the_record_to_the_next_pass() {
    if !need_root(
        "a_dry_run_leaves_the_record_to_the_next_pass",
        &["losetup", "dd"],
    ) {
        return;
    }
    let size = 32 * MIB;
    let v = TrackedVolume::new(size, 57, &[]);
    v.pass(&[]);
    // Chunks 0, 62 (block 1000) and 312 (block 5000).
    for block in [0, 1000, 5000] {
        write_blocks(&v.lo.dev, block, 1);
    }
    let r =
        v.tx.sync(&v.lo.dev, &v.dest, &["--dry-run", "--scan", "tracked"]);
    r.ok();
    let e = r.only("dry_run_end");
    assert_eq!(
        (e["chunks"].as_u64(), e["scanned_bytes"].as_u64()),
        (Some(3), Some(size)),
        "{e}"
    );
    let p2 = v.pass(&["--audit", "0", "--scan", "tracked"]);
    assert_eq!(
        p2["scan"], "tracked",
        "the dry run consumed the record: {p2}"
    );
    assert_eq!(p2["changed_chunks"], 3, "{p2}");
    assert_eq!(p2["read_bytes"], 3 * CHUNK, "{p2}");
    assert_device_copied(&v.lo.dev, &v.target);
}
