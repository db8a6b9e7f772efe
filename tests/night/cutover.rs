//! Convergence and the cutover on a live ext4: a writer thread keeps the
//! filesystem busy while passes run, `--fsfreeze` stops it for the final
//! pass, and the copy must be a crash-consistent filesystem whose every
//! complete file is intact. Also every failure path of the freeze: a failing
//! `--pre`, `--max-freeze` exceeded, the receiver dying mid-pass, a mount
//! point that is not on SOURCE, and a writer that outruns the passes.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

pub(crate) const TOOLS: &[&str] = &["losetup", "mkfs.ext4", "fsck.ext4", "fsfreeze", "mount"];
const FS_SIZE: u64 = 128 << 20;

// ---------------------------------------------------------------- helpers

/// An ext4 on a loop device over a sparse image file, mounted read-write.
/// Fields drop in order: unmount, then detach.
pub(crate) struct Fs {
    mnt: Mount,
    pub(crate) lo: Loop,
    img: PathBuf,
}

impl Fs {
    pub(crate) fn new(root: &Path, name: &str) -> Fs {
        let img = root.join(format!("{name}.img"));
        File::create(&img).unwrap().set_len(FS_SIZE).unwrap();
        let lo = Loop::attach(&img);
        mkfs_ext4(&lo.dev);
        let mnt = Mount::mount(&lo.dev, &root.join(format!("{name}-mnt")), "rw");
        std::fs::create_dir_all(mnt.dir.join("data")).unwrap();
        Fs { mnt, lo, img }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.mnt.dir
    }

    pub(crate) fn data(&self) -> PathBuf {
        self.mnt.dir.join("data")
    }
}

/// Sender, receiver (target: a regular image file) and a live filesystem on
/// a loop device as the source. Fields drop in order: receiver, filesystem,
/// scratch directory.
struct Job {
    rx: Receiver,
    sender: SenderSide,
    fs: Fs,
    target: PathBuf,
    rstate: PathBuf,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Job {
    fn new() -> Job {
        let dir = scratch();
        let root = dir.path().to_owned();
        let fs = Fs::new(&root, "src");
        let sender = SenderSide::new(&root, "s");
        let rid = keygen(&root, "r-id");
        let target = root.join("target.img");
        let rstate = root.join("r-state");
        let rx = Receiver::start(&rid, &rstate, &[("v", &target)], &[&sender.id.fp], 0);
        Job {
            rx,
            sender,
            fs,
            target,
            rstate,
            root,
            _dir: dir,
        }
    }

    fn command(&self, cmd: &str, extra: &[&str]) -> Command {
        self.sender
            .command(cmd, &self.fs.lo.dev, &self.rx.dest("v"), &self.rx.fp, extra)
    }

    fn run(&self, cmd: &str, extra: &[&str]) -> Run {
        run_command(self.command(cmd, extra))
    }

    fn mnt(&self) -> String {
        self.fs.dir().display().to_string()
    }

    /// The receiver's journal of the volume, one JSON object per line.
    fn receiver_journal(&self) -> Vec<Value> {
        let p = self.rstate.join("volumes").join("v").join("journal.jsonl");
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// How the background writer loads the filesystem.
#[derive(Clone, Copy)]
pub(crate) enum Load {
    /// Files named by the BLAKE3 hex of their content (4 KiB - 256 KiB),
    /// written as `tmp-*` (whole, or appended piecewise) and renamed; old
    /// files deleted; live data kept under `live_limit` bytes.
    Files { live_limit: u64 },
    /// New random data over one preallocated file of `size` bytes, in place,
    /// at about `rate` bytes per second.
    Overwrite { size: u64, rate: u64 },
}

/// A writer thread on a mounted filesystem. Stops (after a best-effort thaw,
/// so it can never hang on a frozen filesystem) on drop.
pub(crate) struct Writer {
    stop: Arc<AtomicBool>,
    created: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    mount: PathBuf,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    pub(crate) fn start(mount: &Path, load: Load, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let created = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let data = mount.join("data");
        let (s, c, w, e) = (
            stop.clone(),
            created.clone(),
            written.clone(),
            errors.clone(),
        );
        let handle = std::thread::spawn(move || match load {
            Load::Files { live_limit } => files_loop(&data, live_limit, seed, &s, &c, &w, &e),
            Load::Overwrite { size, rate } => overwrite_loop(&data, size, rate, seed, &s, &w, &e),
        });
        Writer {
            stop,
            created,
            written,
            errors,
            mount: mount.to_owned(),
            handle: Some(handle),
        }
    }

    pub(crate) fn created(&self) -> u64 {
        self.created.load(Ordering::SeqCst)
    }

    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(&self.mount)
                .stderr(Stdio::null())
                .status();
            h.join().expect("writer thread panicked");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(&self.mount)
                .stderr(Stdio::null())
                .status();
            let _ = h.join();
        }
    }
}

fn note_error(errors: &Mutex<Vec<String>>, what: &str, e: std::io::Error) {
    let mut v = errors.lock().unwrap();
    if v.len() < 50 {
        v.push(format!("{what}: {e}"));
    }
    drop(v);
    std::thread::sleep(Duration::from_millis(10));
}

fn files_loop(
    data: &Path,
    live_limit: u64,
    seed: u64,
    stop: &AtomicBool,
    created: &AtomicU64,
    written: &AtomicU64,
    errors: &Mutex<Vec<String>>,
) {
    let mut rng = Rng::new(seed);
    let mut live: std::collections::VecDeque<(PathBuf, u64)> = Default::default();
    let mut live_bytes = 0u64;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let op = rng.below(10);
        if op < 2 && live.len() > 4 {
            // Delete an old file.
            let i = rng.below(live.len() as u64 / 2) as usize;
            let (p, len) = live.remove(i).unwrap();
            match std::fs::remove_file(&p) {
                Ok(()) => live_bytes -= len,
                Err(e) => {
                    live.push_back((p, len));
                    note_error(errors, "delete", e);
                }
            }
        } else {
            let len = 4096 + rng.below((256 << 10) - 4096 + 1);
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf);
            let name = blake3::hash(&buf).to_hex().to_string();
            n += 1;
            let tmp = data.join(format!("tmp-{n}"));
            let pieces = if op < 5 { 1 + rng.below(4) } else { 1 };
            let res = (|| -> std::io::Result<()> {
                let mut f = OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .open(&tmp)?;
                let step = buf.len().div_ceil(pieces as usize);
                for (k, part) in buf.chunks(step).enumerate() {
                    if k > 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    f.write_all(part)?;
                }
                drop(f);
                std::fs::rename(&tmp, data.join(&name))
            })();
            match res {
                Ok(()) => {
                    live.push_back((data.join(&name), len));
                    live_bytes += len;
                    written.fetch_add(len, Ordering::SeqCst);
                    created.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    note_error(errors, "create", e);
                }
            }
            while live_bytes > live_limit {
                let (p, len) = live.pop_front().unwrap();
                if let Err(e) = std::fs::remove_file(&p) {
                    note_error(errors, "trim", e);
                }
                live_bytes -= len;
            }
        }
        std::thread::sleep(Duration::from_millis(3 + rng.below(10)));
    }
}

fn overwrite_loop(
    data: &Path,
    size: u64,
    rate: u64,
    seed: u64,
    stop: &AtomicBool,
    written: &AtomicU64,
    errors: &Mutex<Vec<String>>,
) {
    const BLOCK: u64 = 256 << 10;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; BLOCK as usize];
    let f = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(data.join("hot.bin"))
    {
        Ok(f) => f,
        Err(e) => return note_error(errors, "open hot.bin", e),
    };
    let started = Instant::now();
    let mut pos = 0u64;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        rng.fill(&mut buf);
        match f.write_all_at(&buf, pos).and_then(|()| f.sync_data()) {
            Ok(()) => {
                written.fetch_add(BLOCK, Ordering::SeqCst);
            }
            Err(e) => note_error(errors, "overwrite", e),
        }
        pos = (pos + BLOCK) % size;
        n += 1;
        let due = Duration::from_secs_f64((n * BLOCK) as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Writes a file in `dir` from a fresh thread; the result arrives when the
/// write (and its fsync) completed, so a frozen filesystem holds it back.
fn probe_write(dir: &Path, name: &str) -> mpsc::Receiver<std::io::Result<()>> {
    let p = dir.join(name);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| {
            let mut f = File::create(&p)?;
            f.write_all(&[7u8; 4096])?;
            f.sync_all()
        })();
        let _ = tx.send(r);
    });
    rx
}

/// Asserts the filesystem at `dir` takes a write within 5 s.
pub(crate) fn assert_writable(dir: &Path, name: &str, why: &str) {
    match probe_write(dir, name).recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{why}: write to {} failed: {e}", dir.display()),
        Err(_) => panic!(
            "{why}: a write to {} did not complete within 5 s: the filesystem is still frozen",
            dir.display()
        ),
    }
}

/// A read-only mount of a copy of the target image, after `fsck.ext4 -n -f`
/// found it clean. Fields drop in order: unmount, then detach.
struct TargetCopy {
    mnt: Mount,
    _lo: Loop,
}

fn check_and_mount_target(job: &Job, name: &str) -> TargetCopy {
    check_and_mount(&job.root, &job.target, name)
}

/// A copy of `target` under `root`, checked by `fsck.ext4 -n -f` and
/// mounted read-only.
fn check_and_mount(root: &Path, target: &Path, name: &str) -> TargetCopy {
    let copy = root.join(format!("{name}.img"));
    std::fs::copy(target, &copy).unwrap();
    let out = Command::new("fsck.ext4")
        .args(["-n", "-f"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "fsck.ext4 -n -f of the cutover target found problems:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lo = Loop::attach(&copy);
    let mnt = Mount::mount(&lo.dev, &root.join(format!("{name}-mnt")), "ro,noload");
    TargetCopy { mnt, _lo: lo }
}

fn changed_bytes(end: &Value) -> u64 {
    end["changed_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no changed_bytes in {end}"))
}

/// Writes `count` files of `len` random bytes into `data`, each named by the
/// BLAKE3 hex of its content, and syncs them to the device.
pub(crate) fn seed_files(data: &Path, count: u64, len: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; len as usize];
    for _ in 0..count {
        rng.fill(&mut buf);
        let mut f = File::create(data.join(blake3::hash(&buf).to_hex().as_str())).unwrap();
        f.write_all(&buf).unwrap();
        f.sync_all().unwrap();
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn converge_with_a_live_writer_gets_ready_and_passes_shrink() {
    if !need_root("converge_with_a_live_writer", TOOLS) {
        return;
    }
    let job = Job::new();
    // Data at rest, so the first pass has something to copy; file data the
    // writer leaves in the page cache reaches the device only later.
    seed_files(&job.fs.data(), 8, 4 << 20, 101);
    let mut writer = Writer::start(
        job.fs.dir(),
        Load::Files {
            live_limit: 24 << 20,
        },
        1,
    );
    assert!(
        wait_for(Duration::from_secs(10), || writer.created() >= 20),
        "writer made no progress: {:?}",
        writer.errors()
    );
    let before = writer.created();
    let r = job.run(
        "converge",
        &["--window", "60s", "--max-passes", "8", "--interval", "1s"],
    );
    let during = writer.created() - before;
    writer.stop();
    assert_eq!(r.code, 0, "converge should be ready; stderr: {}", r.stderr);
    let end = r.event("converge_end");
    assert_eq!(end["ready"], true, "{end}");
    let passes = r.all("pass_end");
    assert!(passes.len() >= 2, "a forecast needs two passes: {passes:?}");
    assert_eq!(end["passes"], passes.len() as u64, "{end}");
    assert!(passes[0]["forecast_final_pass_s"].is_null());
    let f = end["forecast_final_pass_s"].as_f64().unwrap();
    assert!(f * 1.5 <= 60.0, "ready, yet forecast {f} s: {end}");
    let first = changed_bytes(passes[0]);
    eprintln!(
        "converge with a live writer: ready after {} passes, forecast {f} s, changed per pass {:?}",
        passes.len(),
        passes.iter().map(|p| changed_bytes(p)).collect::<Vec<_>>()
    );
    for p in &passes[1..] {
        assert!(
            changed_bytes(p) < first,
            "a later pass changed no less than the first ({first}): {p}"
        );
    }
    assert!(during > 0, "the writer was idle during converge");

    // status reads the same history back.
    let out = run_command({
        let mut c = Command::new(bin());
        c.args(["status", "--json", "--state-dir"])
            .arg(&job.sender.state);
        c
    });
    assert_eq!(out.code, 0, "{}", out.stderr);
    let st = out.event("status");
    assert_eq!(st["passes"].as_array().unwrap().len(), passes.len(), "{st}");
    assert!(st["forecast_final_pass_s"].as_f64().is_some(), "{st}");
}

#[test]
fn cutover_fsfreeze_under_a_live_writer_is_a_consistent_filesystem() {
    if !need_root("cutover_fsfreeze_under_a_live_writer", TOOLS) {
        return;
    }
    let job = Job::new();
    seed_files(&job.fs.data(), 8, 1 << 20, 102);
    let mut writer = Writer::start(
        job.fs.dir(),
        Load::Files {
            live_limit: 24 << 20,
        },
        2,
    );
    assert!(wait_for(Duration::from_secs(10), || writer.created() >= 20));
    // Two passes: a cutover needs a forecast.
    for _ in 0..2 {
        let r = job.run("sync", &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    std::thread::sleep(Duration::from_millis(500));

    let mnt = job.mnt();
    let r = job.run("cutover", &["--fsfreeze", &mnt]);
    let after_cutover = writer.created();
    assert_eq!(r.code, 0, "cutover failed; stderr: {}", r.stderr);
    let end = r.event("cutover_end");
    assert_eq!(end["proved"], true, "{end}");
    let cp = end["consistency_point"].as_str().unwrap().to_string();
    assert!(
        cp.len() == 64 && cp.chars().all(|c| c.is_ascii_hexdigit()),
        "consistency point {cp}"
    );
    assert!(end["frozen_s"].as_f64().unwrap() <= end["duration_s"].as_f64().unwrap());
    // Thawed: the writer carries on.
    assert!(
        wait_for(Duration::from_secs(10), || writer.created()
            > after_cutover + 5),
        "the writer made no progress after the cutover (thaw missing?): {:?}",
        writer.errors()
    );
    writer.stop();

    // The receiver journaled the same consistency point, last.
    let journal = job.receiver_journal();
    let last = journal.last().expect("receiver journal is empty");
    assert_eq!(last["event"], "cutover", "{last}");
    assert_eq!(last["consistency_point"], cp.as_str(), "{last}");

    // The copy is a clean filesystem in which every complete file is intact.
    let checked = assert_copy_intact(&job, "copy");
    eprintln!(
        "cutover under load: frozen {} s, {checked} complete files checked, writer created {} files",
        end["frozen_s"],
        writer.created()
    );
}

/// The cutover's target, copied, is a clean ext4 (fsck) in which every
/// complete file's content matches its name; returns the files checked.
fn assert_copy_intact(job: &Job, name: &str) -> usize {
    assert_image_intact(&job.root, &job.target, name)
}

/// [`assert_copy_intact`] of any target image.
pub(crate) fn assert_image_intact(root: &Path, target: &Path, name: &str) -> usize {
    let t = check_and_mount(root, target, name);
    let mut checked = 0;
    let mut bad = Vec::new();
    for e in std::fs::read_dir(t.mnt.dir.join("data")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("tmp-") {
            continue;
        }
        let content = std::fs::read(e.path()).unwrap();
        if blake3::hash(&content).to_hex().as_str() != name {
            bad.push(format!("{name} ({} bytes)", content.len()));
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} files in the copy");
    assert!(
        bad.is_empty(),
        "{} of {checked} files in the cutover copy have content not matching their name: {:?}",
        bad.len(),
        bad
    );
    checked
}

/// With `nightpass track` recording the source: the passes after the first
/// read only what changed, and the cutover's frozen pass too, proven by
/// fresh reads of what it read on both sides (`"proof":"tracked"`); the
/// copy is a clean filesystem with every file intact.
#[test]
fn tracked_cutover_under_a_live_writer_reads_only_what_changed() {
    if !need_root("tracked_cutover_under_a_live_writer", TOOLS) {
        return;
    }
    let job = Job::new();
    seed_files(&job.fs.data(), 8, 1 << 20, 103);
    let mut c = Command::new(bin());
    c.arg("track")
        .arg(&job.fs.lo.dev)
        .arg("--state-dir")
        .arg(&job.sender.state);
    let tracker = Spawned::start(c);
    assert!(
        wait_for(Duration::from_secs(10), || tracker
            .stderr()
            .contains("tracking ")),
        "the tracker did not start: {}",
        tracker.stderr()
    );
    let mut writer = Writer::start(
        job.fs.dir(),
        Load::Files {
            live_limit: 24 << 20,
        },
        3,
    );
    assert!(wait_for(Duration::from_secs(10), || writer.created() >= 20));
    let scans: Vec<String> = (0..3)
        .map(|_| {
            let r = job.run("sync", &[]);
            assert_eq!(r.code, 0, "{}", r.stderr);
            r.event("pass_end")["scan"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(scans, ["full", "tracked", "tracked"], "the passes' scans");
    let mnt = job.mnt();
    let r = job.run("cutover", &["--fsfreeze", &mnt, "--scan", "tracked"]);
    assert_eq!(r.code, 0, "cutover failed; stderr: {}", r.stderr);
    let end = r.event("cutover_end");
    assert_eq!(end["proof"], "tracked", "{end}");
    let last = r.all("pass_end").pop().expect("a frozen pass").clone();
    assert_eq!(last["scan"], "tracked", "{last}");
    let read = last["read_bytes"].as_u64().unwrap();
    assert!(
        read < FS_SIZE / 4,
        "the frozen pass read {read} of {FS_SIZE} bytes"
    );
    writer.stop();
    let checked = assert_copy_intact(&job, "tracked-copy");
    eprintln!(
        "tracked cutover under load: frozen {} s, read {read} bytes, {checked} files intact",
        end["frozen_s"]
    );
    // Stopped as an operator does, so that it removes its trace instance.
    tracker.signal(libc::SIGTERM);
    let _ = tracker.finish(Duration::from_secs(10));
}

#[test]
fn cutover_of_a_quiet_filesystem_is_identical_file_by_file() {
    if !need_root(
        "cutover_of_a_quiet_filesystem",
        &[TOOLS, &["diff"]].concat(),
    ) {
        return;
    }
    let job = Job::new();
    let mut writer = Writer::start(
        job.fs.dir(),
        Load::Files {
            live_limit: 16 << 20,
        },
        3,
    );
    for _ in 0..2 {
        let r = job.run("sync", &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    assert!(wait_for(Duration::from_secs(10), || writer.created() >= 40));
    writer.stop();

    let mnt = job.mnt();
    let r = job.run("cutover", &["--fsfreeze", &mnt]);
    assert_eq!(r.code, 0, "cutover failed; stderr: {}", r.stderr);
    let cp = r.event("cutover_end")["consistency_point"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        job.receiver_journal().last().unwrap()["consistency_point"],
        cp.as_str()
    );
    let t = check_and_mount_target(&job, "copy");
    let out = Command::new("diff")
        .arg("-r")
        .arg(job.fs.dir())
        .arg(&t.mnt.dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "source and target filesystems differ:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let n = std::fs::read_dir(t.mnt.dir.join("data")).unwrap().count();
    assert!(n >= 10, "only {n} files compared");
}

#[test]
fn cutover_with_hooks_runs_post_even_when_pre_fails() {
    // Needs no root: hooks and an image file.
    let dir = scratch();
    let root = dir.path();
    let sender = SenderSide::new(root, "s");
    let rid = keygen(root, "r-id");
    let target = root.join("target.img");
    let rstate = root.join("r-state");
    let rx = Receiver::start(&rid, &rstate, &[("v", &target)], &[&sender.id.fp], 0);
    let source = root.join("source.img");
    random_file(&source, 8 << 20, 9);
    let dest = rx.dest("v");
    for _ in 0..2 {
        let r = sender.run("sync", &source, &dest, &rx.fp, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }

    let marker = root.join("post-ran");
    let post = format!("touch {}", marker.display());
    let r = sender.run(
        "cutover",
        &source,
        &dest,
        &rx.fp,
        &["--pre", "exit 3", "--post", &post],
    );
    assert_eq!(
        r.code, 3,
        "a failing --pre is a runtime failure; stderr: {}",
        r.stderr
    );
    assert!(marker.exists(), "--post did not run after a failing --pre");
    assert!(r.all("cutover_end").is_empty(), "{:?}", r.events);
    assert!(
        r.event("error")["message"]
            .as_str()
            .unwrap()
            .contains("--pre"),
        "{:?}",
        r.events
    );
    let journal = rstate.join("volumes").join("v").join("journal.jsonl");
    let text = std::fs::read_to_string(&journal).unwrap_or_default();
    assert!(
        !text.contains("\"cutover\""),
        "a failed cutover was journaled: {text}"
    );

    // Working hooks: pre, pass, post in that order, and a proven copy.
    write_at(&source, 1 << 20, &[0xab; 100_000]);
    let log = root.join("hooks.log");
    let pre = format!("echo pre >> {}", log.display());
    let post = format!("echo post >> {}", log.display());
    let r = sender.run(
        "cutover",
        &source,
        &dest,
        &rx.fp,
        &["--pre", &pre, "--post", &post],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost\n");
    assert_eq!(r.event("cutover_end")["proved"], true);
    assert_eq!(file_hash(&source), file_hash(&target));
    let text = std::fs::read_to_string(&journal).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "cutover");
    assert_eq!(
        last["consistency_point"],
        r.event("cutover_end")["consistency_point"]
    );
    drop(rx);
}

/// Prepares a job with one pass done and then more than 10 MiB written, so a
/// final pass at `--bwlimit 1M` takes well over ten seconds.
fn job_with_pending_changes() -> Job {
    let job = Job::new();
    let r = job.run("sync", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    random_file(&job.fs.data().join("pending.bin"), 14 << 20, 77);
    job
}

/// Starts the cutover in the background and checks the freeze is in effect
/// once its final pass began: a write from another thread stays blocked.
/// Returns the blocked write, to be checked after the thaw.
fn start_frozen(job: &Job, extra: &[&str]) -> (Spawned, mpsc::Receiver<std::io::Result<()>>) {
    let mnt = job.mnt();
    // One pass is no forecast: the freeze is what these tests are about.
    let mut args = vec![
        "--fsfreeze",
        mnt.as_str(),
        "--bwlimit",
        "1M",
        "--force-no-forecast",
    ];
    args.extend_from_slice(extra);
    let p = Spawned::start(job.command("cutover", &args));
    assert!(
        p.wait_event("pass_start", Duration::from_secs(20)),
        "the final pass did not start: {}",
        p.stderr()
    );
    let blocked = probe_write(job.fs.dir(), "during-freeze");
    assert!(
        blocked.recv_timeout(Duration::from_millis(300)).is_err(),
        "a write went through while the cutover's final pass ran: not frozen"
    );
    (p, blocked)
}

#[test]
fn cutover_max_freeze_exceeded_aborts_and_thaws() {
    if !need_root("cutover_max_freeze_exceeded", TOOLS) {
        return;
    }
    let job = job_with_pending_changes();
    let (p, blocked) = start_frozen(&job, &["--max-freeze", "2s"]);
    let left = Duration::from_secs(30).saturating_sub(p.elapsed());
    let r = p.finish(left);
    assert_eq!(
        r.code, 3,
        "--max-freeze exceeded must fail; stderr: {}",
        r.stderr
    );
    assert!(r.stderr.contains("max-freeze"), "{}", r.stderr);
    assert!(r.all("cutover_end").is_empty(), "{:?}", r.events);
    let frozen_for = Instant::now();
    match blocked.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {}
        other => {
            panic!("the write blocked by the freeze did not complete after the abort: {other:?}")
        }
    }
    assert!(frozen_for.elapsed() < Duration::from_secs(5));
    assert_writable(job.fs.dir(), "after-abort", "after --max-freeze");
    assert!(
        !job.receiver_journal()
            .iter()
            .any(|e| e["event"] == "cutover"),
        "an aborted cutover was journaled"
    );
}

#[test]
fn cutover_receiver_killed_mid_pass_fails_and_thaws() {
    if !need_root("cutover_receiver_killed_mid_pass", TOOLS) {
        return;
    }
    let mut job = job_with_pending_changes();
    let (p, blocked) = start_frozen(&job, &["--retry-for", "0"]);
    std::thread::sleep(Duration::from_millis(700));
    job.rx.kill9();
    let left = Duration::from_secs(30).saturating_sub(p.elapsed());
    let r = p.finish(left);
    assert_eq!(
        r.code, 3,
        "a lost receiver is a runtime failure; stderr: {}",
        r.stderr
    );
    assert!(r.all("cutover_end").is_empty(), "{:?}", r.events);
    match blocked.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {}
        other => {
            panic!("the write blocked by the freeze did not complete after the failure: {other:?}")
        }
    }
    assert_writable(job.fs.dir(), "after-kill", "after the receiver died");
}

#[test]
fn cutover_fsfreeze_refuses_a_mount_not_on_source() {
    if !need_root("cutover_fsfreeze_refuses_a_mount_not_on_source", TOOLS) {
        return;
    }
    let job = Job::new();
    let mnt = job.mnt();
    // SOURCE the image file the filesystem's loop device reads.
    let r = job.sender.run(
        "cutover",
        &job.fs.img,
        &job.rx.dest("v"),
        &job.rx.fp,
        &["--fsfreeze", &mnt],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not a block device"), "{}", r.stderr);
    // SOURCE another block device.
    let other_img = job.root.join("other.img");
    File::create(&other_img).unwrap().set_len(16 << 20).unwrap();
    let other = Loop::attach(&other_img);
    let r = job.sender.run(
        "cutover",
        &other.dev,
        &job.rx.dest("v"),
        &job.rx.fp,
        &["--fsfreeze", &mnt],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("does not live on"), "{}", r.stderr);
    assert!(r.event("error")["message"]
        .as_str()
        .unwrap()
        .contains("does not live on"));
    assert!(!job.target.exists(), "a refused cutover wrote the target");
    assert_writable(job.fs.dir(), "after-refusal", "after a refused --fsfreeze");
    drop(other);
}

#[test]
fn converge_gives_up_when_the_writer_outpaces_the_passes() {
    if !need_root("converge_gives_up_when_the_writer_outpaces", TOOLS) {
        return;
    }
    let job = Job::new();
    let hot = 3u64 << 20;
    random_file(&job.fs.data().join("hot.bin"), hot, 5);
    let r = job.run("sync", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut writer = Writer::start(
        job.fs.dir(),
        Load::Overwrite {
            size: hot,
            rate: 4 << 20,
        },
        6,
    );
    std::thread::sleep(Duration::from_millis(500));
    let w0 = writer.written();
    let t = Instant::now();
    let r = job.run(
        "converge",
        &["--window", "1s", "--max-passes", "4", "--bwlimit", "1M"],
    );
    let rate = (writer.written() - w0) as f64 / t.elapsed().as_secs_f64();
    writer.stop();
    assert!(writer.errors().is_empty(), "{:?}", writer.errors());
    assert!(
        rate > 2.0 * (1 << 20) as f64,
        "the writer only managed {rate} B/s"
    );
    assert_eq!(
        r.code, 1,
        "converge must not be ready; stderr: {}",
        r.stderr
    );
    let end = r.event("converge_end");
    assert_eq!(end["ready"], false, "{end}");
    let reason = end["reason"].as_str().unwrap();
    eprintln!(
        "converge under a {rate:.0} B/s writer: {reason}, changed per pass {:?}",
        r.all("pass_end")
            .iter()
            .map(|p| changed_bytes(p))
            .collect::<Vec<_>>()
    );
    assert!(
        reason == "not shrinking" || reason == "max passes",
        "reason {reason}"
    );
    assert!(r.stderr.contains("not converged"), "{}", r.stderr);
    let passes = r.all("pass_end");
    assert!(passes.len() >= 3 && passes.len() <= 4, "{passes:?}");
    // Every pass found the writer's churn waiting: at least a MiB.
    for p in &passes {
        assert!(changed_bytes(p) >= 1 << 20, "{p}");
    }
    let numbers: BTreeSet<u64> = passes.iter().map(|p| p["pass"].as_u64().unwrap()).collect();
    assert_eq!(numbers.len(), passes.len(), "pass numbers repeat");
}
