//! The sender's guards against ordinary mistakes (issue 13): one history
//! per volume whatever its address is typed as, one source per volume, no
//! retrying a receiver that never answered, and a cutover that freezes
//! nothing before it knows the night can finish, and certifies nothing
//! while writers still run.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// A receiver exporting `v` (a file target) and a sender, in one scratch dir.
struct Setup {
    rx: Receiver,
    sender: SenderSide,
    target: PathBuf,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = scratch();
        let root = dir.path().to_owned();
        let target = root.join("target.img");
        let (sender, rx) = pair(&root, &[("v", &target)]);
        Setup {
            rx,
            sender,
            target,
            root,
            _dir: dir,
        }
    }

    fn run(&self, cmd: &str, source: &Path, extra: &[&str]) -> Run {
        self.sender
            .run(cmd, source, &self.rx.dest("v"), &self.rx.fp, extra)
    }

    /// An 8 MiB source synced twice and cut over (`--assume-frozen`):
    /// the source and the consistency point.
    fn cut_over(&self, seed: u64) -> (PathBuf, String) {
        let source = self.root.join("source.img");
        random_file(&source, 8 * MIB, seed);
        for _ in 0..2 {
            let r = self.run("sync", &source, &[]);
            assert_eq!(r.code, 0, "{}", r.stderr);
        }
        let r = self.run("cutover", &source, &["--assume-frozen"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let cp = r.event("cutover_end")["consistency_point"]
            .as_str()
            .unwrap()
            .to_string();
        (source, cp)
    }

    fn receiver_journal(&self) -> String {
        std::fs::read_to_string(self.rx.state.join("volumes/v/journal.jsonl")).unwrap_or_default()
    }
}

fn pass_end(r: &Run) -> &Value {
    r.event("pass_end")
}

#[test]
fn one_history_per_volume_however_the_address_is_typed() {
    let s = Setup::new();
    let source = s.root.join("source.img");
    random_file(&source, 8 * MIB, 1);
    let r = s.run("sync", &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(pass_end(&r)["pass"], 1);
    // The same receiver and volume, its address spelled another way.
    let other = format!("127.1:{}/v", s.rx.port);
    let r = s.sender.run("sync", &source, &other, &s.rx.fp, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        pass_end(&r)["pass"],
        2,
        "a second spelling of the address started a second history"
    );
    assert_eq!(pass_end(&r)["changed_chunks"], 0);
    // status finds the volume by the source's resolved path.
    let link = s.root.join("link-to-source.img");
    std::os::unix::fs::symlink(&source, &link).unwrap();
    let out = Command::new(bin())
        .args(["status", "--json", "--state-dir"])
        .arg(&s.sender.state)
        .arg(&link)
        .output()
        .unwrap();
    let st = parse_run(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
    assert_eq!(st.code, 0, "{}", st.stderr);
    assert_eq!(
        st.event("status")["passes"].as_array().unwrap().len(),
        2,
        "{:?}",
        st.events
    );
}

#[test]
fn another_source_is_refused_unless_the_operator_says_so() {
    let s = Setup::new();
    let (a, b) = (s.root.join("a.img"), s.root.join("b.img"));
    random_file(&a, 8 * MIB, 2);
    random_file(&b, 8 * MIB, 3);
    let r = s.run("sync", &a, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let before = file_hash(&s.target);
    let r = s.run("sync", &b, &[]);
    assert_eq!(r.code, 2, "another source must be refused: {}", r.stderr);
    assert!(r.stderr.contains("--new-source"), "{}", r.stderr);
    assert!(
        r.stderr.contains("a.img"),
        "names the earlier source: {}",
        r.stderr
    );
    assert_eq!(
        file_hash(&s.target),
        before,
        "a refused pass wrote the target"
    );
    let r = s.run("sync", &b, &["--new-source"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file_hash(&s.target), file_hash(&b));
    // From now on b is the volume's source.
    let r = s.run("sync", &b, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_receiver_that_never_answers_fails_at_once_not_after_retry_for() {
    let s = Setup::new();
    let source = s.root.join("source.img");
    random_file(&source, MIB, 4);
    // A port nobody listens on.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dest = format!("127.0.0.1:{port}/v");
    let t = Instant::now();
    let r = s
        .sender
        .run("sync", &source, &dest, &s.rx.fp, &["--retry-for", "60s"]);
    let took = t.elapsed();
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        took < Duration::from_secs(30),
        "first contact was retried for --retry-for: {took:?}"
    );
    assert!(
        r.stderr.contains(&format!("UDP port {port}")) && r.stderr.contains("firewall"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("reconnecting"), "{}", r.stderr);
}

#[test]
fn sender_state_dir_problems_are_bad_input() {
    let dir = scratch();
    let root = dir.path();
    let source = root.join("source.img");
    random_file(&source, MIB, 5);
    // A state directory under a regular file can never be created.
    File::create(root.join("plain-file")).unwrap();
    let state = root.join("plain-file/state");
    let out = Command::new(bin())
        .args(["status", "--state-dir"])
        .arg(root.join("does-not-exist"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let target = root.join("t.img");
    let (sender, rx) = pair(root, &[("v", &target)]);
    let r = run_command({
        let mut c = Command::new(bin());
        c.arg("sync")
            .arg(&source)
            .arg(rx.dest("v"))
            .args(["--server-fingerprint", &rx.fp, "--json", "--identity"])
            .arg(&sender.id.dir)
            .arg("--state-dir")
            .arg(&state);
        c
    });
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not writable"), "{}", r.stderr);
    assert!(!target.exists(), "nothing may be written");
}

/// A cutover's freeze by hooks that leave marks: `pre` and `post` files.
fn hooks(root: &Path) -> (Vec<String>, PathBuf, PathBuf) {
    let (pre, post) = (root.join("pre-ran"), root.join("post-ran"));
    let args = vec![
        "--pre".to_string(),
        format!("touch {}", pre.display()),
        "--post".to_string(),
        format!("touch {}", post.display()),
    ];
    (args, pre, post)
}

#[test]
fn cutover_without_a_forecast_is_refused_before_freezing() {
    let s = Setup::new();
    let source = s.root.join("source.img");
    random_file(&source, 8 * MIB, 6);
    let (args, pre, _) = hooks(&s.root);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = s.run("cutover", &source, &a);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--force-no-forecast"), "{}", r.stderr);
    assert!(!pre.exists(), "the source was frozen (--pre ran)");
    assert!(!s.target.exists(), "a refused cutover created the target");
    // Forced, onto a target that does not exist yet: the whole copy runs
    // frozen and is proven after the pass.
    let mut forced = a.clone();
    forced.push("--force-no-forecast");
    let r = s.run("cutover", &source, &forced);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(pre.exists());
    assert_eq!(r.event("cutover_end")["proved"], true);
    assert_eq!(file_hash(&source), file_hash(&s.target));
}

#[test]
fn cutover_preflight_failures_never_freeze() {
    let s = Setup::new();
    let source = s.root.join("source.img");
    random_file(&source, 8 * MIB, 7);
    for _ in 0..2 {
        let r = s.run("sync", &source, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let (args, pre, _) = hooks(&s.root);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    // A wrong port: nobody answers.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut wrong = a.clone();
    wrong.extend(["--connect-timeout", "2s"]);
    let r = s.sender.run(
        "cutover",
        &source,
        &format!("127.0.0.1:{port}/v"),
        &s.rx.fp,
        &wrong,
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!pre.exists(), "froze before knowing the receiver answers");
    // A volume the receiver does not export.
    let r = s.sender.run(
        "cutover",
        &source,
        &s.rx.dest("nope"),
        &s.rx.fp,
        &[a.as_slice(), &["--force-no-forecast"]].concat(),
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not exported"), "{}", r.stderr);
    assert!(!pre.exists(), "froze for a volume the receiver refuses");
    // A volume another sender is writing right now.
    let (big, big2) = (s.root.join("big.img"), s.root.join("big2.img"));
    random_file(&big, 64 * MIB, 8);
    random_file(&big2, 64 * MIB, 18);
    let other = SenderSide::new(&s.root, "other");
    let busy_target = s.root.join("busy.img");
    let rid = keygen(&s.root, "r2-id");
    let rx2 = Receiver::start(
        &rid,
        &s.root.join("r2-state"),
        &[("v", &busy_target)],
        &[&other.id.fp, &s.sender.id.fp],
        0,
    );
    for _ in 0..2 {
        let r = s.sender.run("sync", &big, &rx2.dest("v"), &rx2.fp, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let mut bg = other
        .command("sync", &big2, &rx2.dest("v"), &rx2.fp, &["--bwlimit", "8M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // It sends 64 MiB at 8 MiB/s: busy for about 8 s.
    std::thread::sleep(Duration::from_secs(2));
    let r = s.sender.run("cutover", &big, &rx2.dest("v"), &rx2.fp, &a);
    let _ = bg.kill();
    let _ = bg.wait();
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("in use"), "{}", r.stderr);
    assert!(!pre.exists(), "froze a volume another sender holds");
}

/// Scribbles random 4 KiB blocks over `path` until stopped: a writer the
/// operator forgot.
fn scribbler(
    path: &Path,
    size: u64,
) -> (Arc<AtomicBool>, Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let (s2, w2, p) = (stop.clone(), writes.clone(), path.to_owned());
    let h = std::thread::spawn(move || {
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        let mut rng = Rng::new(99);
        let mut buf = vec![0u8; 4096];
        while !s2.load(Ordering::Relaxed) {
            rng.fill(&mut buf);
            let off = rng.below(size / 4096) * 4096;
            f.write_all_at(&buf, off).unwrap();
            w2.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    (stop, writes, h)
}

#[test]
fn assume_frozen_with_a_writer_running_certifies_nothing() {
    let s = Setup::new();
    let source = s.root.join("source.img");
    let size = 32 * MIB;
    random_file(&source, size, 9);
    for _ in 0..2 {
        let r = s.run("sync", &source, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let (stop, writes, h) = scribbler(&source, size);
    assert!(wait_for(Duration::from_secs(5), || writes
        .load(Ordering::Relaxed)
        > 10));
    let r = s.run("cutover", &source, &["--assume-frozen"]);
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    assert_eq!(
        r.code, 3,
        "a changing source must fail the cutover: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("changed in") && r.stderr.contains("writers are still running"),
        "{}",
        r.stderr
    );
    assert!(r.all("cutover_end").is_empty(), "{:?}", r.events);
    assert!(
        !s.receiver_journal().contains("\"cutover\""),
        "the receiver recorded a consistency point"
    );
    // Nothing sealed: the next pass is accepted and the copy catches up.
    let r = s.run("sync", &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file_hash(&source), file_hash(&s.target));
}

#[test]
fn the_sender_refuses_a_volume_it_cut_over_even_when_the_receiver_forgot() {
    let mut s = Setup::new();
    let (source, cp) = s.cut_over(10);
    // The receiver's state is lost (a new state directory): only the
    // sender's own record stands between a stray sync and the new site.
    let fresh_state = s.root.join("r-state-new");
    let id = Ident {
        dir: s.rx.id.clone(),
        fp: s.rx.fp.clone(),
    };
    let allow = s.sender.id.fp.clone();
    s.rx.kill9();
    let port = s.rx.port;
    s.rx = Receiver::start(&id, &fresh_state, &[("v", &s.target)], &[&allow], port);
    write_at(&s.target, 0, b"the new site wrote this");
    let before = file_hash(&s.target);
    write_at(&source, MIB, &[0x5a; 70_000]);
    let r = s.run("sync", &source, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&cp) && r.stderr.contains("unseal"),
        "{}",
        r.stderr
    );
    assert_eq!(
        file_hash(&s.target),
        before,
        "the new site's data was overwritten"
    );
    assert!(
        !fresh_state.join("volumes/v/manifest").exists(),
        "the refused pass had the receiver prepare a manifest for it"
    );
}

/// Stamps a file on the mounted filesystem every 50 ms and records the
/// longest time one stamp took: a frozen filesystem holds writes back.
struct Stamper {
    stop: Arc<AtomicBool>,
    longest_ms: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Stamper {
    fn start(dir: &Path) -> Stamper {
        let stop = Arc::new(AtomicBool::new(false));
        let longest_ms = Arc::new(AtomicU64::new(0));
        let (s2, l2, p) = (stop.clone(), longest_ms.clone(), dir.join("stamp"));
        let handle = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let t = Instant::now();
                std::fs::write(&p, format!("{:?}", std::time::SystemTime::now())).unwrap();
                l2.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Stamper {
            stop,
            longest_ms,
            handle: Some(handle),
        }
    }

    /// Stops stamping; the longest stamp in milliseconds.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.longest_ms.load(Ordering::Relaxed)
    }
}

#[test]
fn cutover_to_a_wrong_port_never_freezes_the_filesystem() {
    if !need_root(
        "cutover_to_a_wrong_port_never_freezes_the_filesystem",
        &["losetup", "mkfs.ext4", "fsfreeze", "mount"],
    ) {
        return;
    }
    let s = Setup::new();
    let img = s.root.join("fs.img");
    File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    let lo = Loop::attach(&img);
    mkfs_ext4(&lo.dev);
    let mnt = Mount::mount(&lo.dev, &s.root.join("mnt"), "rw");
    for _ in 0..2 {
        let r = s.run("sync", &lo.dev, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stamper = Stamper::start(&mnt.dir);
    std::thread::sleep(Duration::from_millis(300));
    let mp = mnt.dir.display().to_string();
    let r = s.sender.run(
        "cutover",
        &lo.dev,
        &format!("127.0.0.1:{port}/v"),
        &s.rx.fp,
        &["--fsfreeze", &mp],
    );
    std::thread::sleep(Duration::from_millis(300));
    let longest = stamper.stop();
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!r.stderr.contains("source frozen"), "{}", r.stderr);
    assert!(
        longest < 1000,
        "a write on the source filesystem waited {longest} ms: it was frozen"
    );
    drop(mnt);
    drop(lo);
}

#[test]
fn after_a_cutover_passes_wait_for_unseal_and_a_second_cutover_never_freezes() {
    let s = Setup::new();
    let (source, cp) = s.cut_over(11);
    write_at(&source, 0, &[0x11; 100_000]);
    let before = file_hash(&s.target);
    // The same sender, the same state: refused, nothing written.
    let r = s.run("sync", &source, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains(&cp), "{}", r.stderr);
    let (args, pre, _) = hooks(&s.root);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = s.run("cutover", &source, &a);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("unseal"), "{}", r.stderr);
    assert!(
        !pre.exists(),
        "a second cutover of a sealed volume froze the source"
    );
    assert_eq!(file_hash(&s.target), before);
    // The operator unseals on the receiver host: this sender passes again.
    let out = Command::new(bin())
        .args(["unseal", "v", "--state-dir"])
        .arg(&s.rx.state)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = s.run("sync", &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file_hash(&s.target), file_hash(&source));
}

#[test]
fn state_of_an_older_release_keyed_by_address_is_taken_over() {
    let s = Setup::new();
    let source = s.root.join("source.img");
    random_file(&source, 8 * MIB, 12);
    let r = s.run("sync", &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Where an older release kept it: targets/<HOST:PORT/NAME as typed>.
    let now = s.sender.state.join("targets").join(&s.rx.fp).join("v");
    let legacy = s
        .sender
        .state
        .join("targets")
        .join(format!("127.0.0.1_{}_v", s.rx.port));
    std::fs::rename(&now, &legacy).unwrap();
    let r = s.run("sync", &source, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.event("pass_end")["pass"], 2, "the older history was lost");
    assert!(now.join("journal.jsonl").exists() && !legacy.exists());
}

#[test]
fn a_cutover_rides_out_a_receiver_silent_after_its_preflight() {
    let s = Setup::new();
    let source = s.root.join("source.img");
    random_file(&source, 8 * MIB, 13);
    for _ in 0..2 {
        let r = s.run("sync", &source, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    // The receiver answered the preflight, then stops answering for 3 s
    // (its process stopped) just as the frozen pass connects.
    let pid = s.rx.child.id();
    let pre = format!("kill -STOP {pid}; (sleep 3; kill -CONT {pid}) >/dev/null 2>&1 &");
    let r = s.run(
        "cutover",
        &source,
        &["--pre", &pre, "--post", "true", "--connect-timeout", "1s"],
    );
    let _ = Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file_hash(&source), file_hash(&s.target));
}

#[test]
fn a_cutover_from_a_sender_without_state_uses_the_volume_chunk_size() {
    let s = Setup::new();
    let source = s.root.join("source.img");
    random_file(&source, 8 * MIB, 14);
    for _ in 0..2 {
        let r = s.run("sync", &source, &["--chunk-size", "128K"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    // Another sender host (no manifest of its own) cuts the volume over.
    let other = SenderSide {
        id: Ident {
            dir: s.sender.id.dir.clone(),
            fp: s.sender.id.fp.clone(),
        },
        state: s.root.join("other-state"),
    };
    let r = other.run(
        "cutover",
        &source,
        &s.rx.dest("v"),
        &s.rx.fp,
        &["--assume-frozen", "--force-no-forecast"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.event("pass_end")["chunk_size"], 128 << 10);
    assert_eq!(file_hash(&source), file_hash(&s.target));
}

#[test]
fn a_hang_up_during_a_cutover_thaws_the_source() {
    let s = Setup::new();
    let source = s.root.join("source.img");
    random_file(&source, 32 * MIB, 15);
    for _ in 0..2 {
        let r = s.run("sync", &source, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    // Enough changed that the final pass at 2 MiB/s takes seconds.
    let mut buf = vec![0u8; 16 * MIB as usize];
    Rng::new(16).fill(&mut buf);
    write_at(&source, 0, &buf);
    let (args, pre, post) = hooks(&s.root);
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["--bwlimit", "2M"]);
    let mut child = s
        .sender
        .command("cutover", &source, &s.rx.dest("v"), &s.rx.fp, &a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || pre.exists()),
        "never froze"
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(129),
        "a hang-up ends the cutover cleanly"
    );
    assert!(
        post.exists(),
        "the source was left frozen (--post did not run)"
    );
    assert!(!s.receiver_journal().contains("\"cutover\""));
}

#[test]
fn a_receiver_refuses_with_the_code_of_what_went_wrong() {
    let s = Setup::new();
    // A target file smaller than the source: TooSmall, not a bad request.
    File::create(&s.target).unwrap().set_len(MIB).unwrap();
    let id = nightpass::net::transport::Identity::load(&s.sender.id.dir).unwrap();
    let refusal = runtime().block_on(async {
        let mut p = AuthorizedPeer::connect(
            &id,
            s.rx.port,
            &s.rx.fp,
            &nightpass::net::transport::Tuning::default(),
        )
        .await;
        let mut hello = hello_for("v", nightpass_proto::wire::Mode::Sync, 8 * MIB, 64 << 10);
        hello.pass_id = vec![1; 16];
        p.hello(hello).await.unwrap();
        let r = p.expect_refusal().await;
        p.close().await;
        r
    });
    assert_eq!(
        refusal.code,
        nightpass_proto::wire::RefuseCode::TooSmall as i32,
        "{}",
        refusal.message
    );
    assert!(refusal.message.contains("smaller than the source"));
}

#[test]
fn status_of_a_cut_over_volume_shows_the_cutover_not_a_forecast() {
    let s = Setup::new();
    let (source, cp) = s.cut_over(17);
    let status = |json: bool| {
        let mut c = Command::new(bin());
        c.arg("status")
            .arg("--state-dir")
            .arg(&s.sender.state)
            .arg(&source);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let out = status(true);
    let st = parse_run(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
    assert_eq!(st.code, 0, "{}", st.stderr);
    let ev = st.event("status");
    assert_eq!(ev["cut_over"]["consistency_point"], cp.as_str(), "{ev}");
    assert!(ev["forecast_final_pass_s"].is_null(), "{ev}");
    let text = String::from_utf8_lossy(&status(false).stdout).into_owned();
    assert!(text.contains("cut over at") && text.contains(&cp), "{text}");
    assert!(!text.contains("forecast"), "{text}");
}
