//! A whole filer in one run: `sync`, `verify` with `--plan FILE` against a
//! real receiver: volumes in flight within `jobs`, a failed volume and
//! `max_failures`, a bad plan refused whole, one bandwidth limit for all,
//! and the red button (SIGINT once: the passes in flight end, nothing new
//! starts).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// A filer of image files and a receiver exporting some of them.
struct Filer {
    dir: tempfile::TempDir,
    sender: SenderSide,
    rx: Receiver,
    names: Vec<String>,
}

impl Filer {
    /// Volumes `v0..vN` of `size` random bytes; the receiver exports those
    /// not in `unexported`.
    fn new(n: usize, size: u64, unexported: &[&str]) -> Filer {
        let dir = scratch();
        let sender = SenderSide::new(dir.path(), "tx");
        let rx_id = keygen(dir.path(), "rx-id");
        let names: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
        let mut exports = Vec::new();
        for (i, name) in names.iter().enumerate() {
            random_file(
                &dir.path().join(format!("{name}.src")),
                size,
                1600 + i as u64,
            );
            if !unexported.contains(&name.as_str()) {
                exports.push((name.clone(), dir.path().join(format!("{name}.tgt"))));
            }
        }
        let v: Vec<(&str, &Path)> = exports
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_path()))
            .collect();
        let rx = Receiver::start(
            &rx_id,
            &dir.path().join("rx-state"),
            &v,
            &[&sender.id.fp],
            0,
        );
        Filer {
            dir,
            sender,
            rx,
            names,
        }
    }

    fn source(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.src"))
    }

    fn target(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.tgt"))
    }

    /// Writes a plan of every volume with the `top` keys and returns its path.
    fn plan(&self, top: &str) -> PathBuf {
        let volumes: Vec<(String, PathBuf)> = self
            .names
            .iter()
            .map(|n| (n.clone(), self.source(n)))
            .collect();
        self.plan_of(top, &volumes)
    }

    /// Writes a plan of the given volumes (name, source) with the `top`
    /// keys and returns its path.
    fn plan_of(&self, top: &str, volumes: &[(String, PathBuf)]) -> PathBuf {
        let mut text = format!(
            "receiver = \"127.0.0.1:{}\"\nserver_fingerprint = \"{}\"\n{top}\n",
            self.rx.port, self.rx.fp
        );
        for (n, source) in volumes {
            text.push_str(&format!(
                "[[volume]]\nname = \"{n}\"\nsource = \"{}\"\n",
                source.display()
            ));
        }
        let path = self.dir.path().join("filer.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `nightpass CMD --plan PLAN --json` with this sender's identity and state.
    fn command(&self, cmd: &str, plan: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg(cmd)
            .arg("--plan")
            .arg(plan)
            .arg("--json")
            .arg("--identity")
            .arg(&self.sender.id.dir)
            .arg("--state-dir")
            .arg(&self.sender.state)
            .args(extra)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, cmd: &str, plan: &Path, extra: &[&str]) -> Run {
        run_command(self.command(cmd, plan, extra))
    }
}

/// Every line of a plan run carries `ts` and `volume`, the plan's name of
/// a volume (`null` only in the events about the whole plan: `plan_end`,
/// `plan_stopping`, `plan_forecast` and `group_cutover_end`).
#[track_caller]
fn assert_tagged(r: &Run, names: &[String]) {
    for e in &r.events {
        assert!(e["ts"].is_string(), "no ts in {e}\n{}", r.context());
        let v = e
            .get("volume")
            .unwrap_or_else(|| panic!("no volume in {e}\n{}", r.context()));
        let whole = [
            "plan_end",
            "plan_stopping",
            "plan_forecast",
            "group_cutover_end",
        ];
        if whole.iter().any(|w| e["event"] == *w) {
            assert!(v.is_null(), "{e}");
        } else {
            assert!(
                names.iter().any(|n| v == n),
                "volume {v} is not a plan name in {e}"
            );
        }
    }
}

/// The most passes in flight at once, from the order of the events.
fn most_in_flight(r: &Run) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for e in &r.events {
        match e["event"].as_str() {
            Some("pass_start") => now += 1,
            Some("pass_end") => now -= 1,
            _ => {}
        }
        most = most.max(now);
    }
    most
}

fn volume_results(r: &Run) -> HashMap<String, String> {
    r.all("volume_end")
        .iter()
        .map(|e| {
            (
                e["volume"].as_str().unwrap().to_string(),
                e["result"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn four_volumes_two_at_a_time_and_one_limit_for_all() {
    let f = Filer::new(4, 8 * MIB, &[]);
    // 32 MiB of random data under one 16 MiB/s limit: at least 2 s, where
    // four limits of their own would take 0.5 s.
    let plan = f.plan("jobs = 2\nbwlimit = \"16M\"");
    let t = Instant::now();
    let r = f.run("sync", &plan, &[]);
    let took = t.elapsed().as_secs_f64();
    r.ok();
    assert_tagged(&r, &f.names);
    assert_eq!(r.all("pass_end").len(), 4, "{}", r.context());
    assert_eq!(most_in_flight(&r), 2, "jobs = 2\n{}", r.context());
    let end = r.only("plan_end");
    assert_eq!(
        (
            end["volumes"].as_u64(),
            end["succeeded"].as_u64(),
            end["failed"].as_u64()
        ),
        (Some(4), Some(4), Some(0))
    );
    for n in &f.names {
        assert_same_file(&f.source(n), &f.target(n));
    }
    let sent: u64 = r
        .all("pass_end")
        .iter()
        .map(|e| e["sent_bytes"].as_u64().unwrap())
        .sum();
    assert!(sent >= 32 * MIB, "random data is sent whole: {sent}");
    let rate = sent as f64 / took;
    assert!(
        rate < 16.0 * MIB as f64 * 1.25,
        "{rate:.0} B/s over the shared 16M limit ({took:.2} s)"
    );
    // A second run finds nothing to send; status --plan shows every volume.
    f.run("sync", &plan, &[]).ok();
    let mut c = Command::new(bin());
    c.args(["status", "--json", "--plan"])
        .arg(&plan)
        .arg("--state-dir")
        .arg(&f.sender.state);
    let s = run_command(c);
    s.ok();
    let lines = s.all("plan_volume");
    assert_eq!(lines.len(), 4, "{}", s.context());
    for l in lines {
        assert_eq!(l["state"], "copying", "{l}");
        assert_eq!(l["passes"], 2, "{l}");
    }
}

#[test]
fn a_failed_volume_and_max_failures() {
    let f = Filer::new(3, 2 * MIB, &["v1"]);
    // No limit: v1 fails, the others are copied all the same.
    let r = f.run("sync", &f.plan("jobs = 2"), &[]);
    assert_eq!(r.code, 3, "{}", r.context());
    let res = volume_results(&r);
    assert_eq!(res["v0"], "succeeded");
    assert_eq!(res["v1"], "failed");
    assert_eq!(res["v2"], "succeeded");
    let err = r.all("error");
    assert!(
        err.iter()
            .any(|e| e["volume"] == "v1" && e["message"].as_str().unwrap().contains("v1")),
        "{}",
        r.context()
    );
    assert_tagged(&r, &f.names);

    // One at a time, stop after the first failure: v2 never starts.
    let g = Filer::new(3, 2 * MIB, &["v1"]);
    let r = g.run("sync", &g.plan("jobs = 1\nmax_failures = 1"), &[]);
    assert_eq!(r.code, 3, "{}", r.context());
    let end = r.only("plan_end");
    assert_eq!(
        (
            end["succeeded"].as_u64(),
            end["failed"].as_u64(),
            end["not_started"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{end}"
    );
    assert_eq!(end["stopped_by"], "max_failures");
    assert!(
        !r.events.iter().any(|e| e["volume"] == "v2"),
        "v2 started\n{}",
        r.context()
    );
    assert!(!g.target("v2").exists(), "v2's target was created");

    // The same from the command line, which wins over the plan's values.
    let h = Filer::new(3, 2 * MIB, &["v1"]);
    let plan = h.plan("jobs = 3");
    let r = h.run("sync", &plan, &["--jobs", "1", "--max-failures", "1"]);
    assert_eq!(r.code, 3, "{}", r.context());
    assert_eq!(most_in_flight(&r), 1, "{}", r.context());
    assert_eq!(r.only("plan_end")["not_started"], 1, "{}", r.context());
    assert!(!h.target("v2").exists(), "v2's target was created");
    let bad = h.run("sync", &plan, &["--jobs", "0"]);
    assert_eq!(bad.code, 2, "{}", bad.context());
}

#[test]
fn a_bad_plan_is_refused_whole() {
    let f = Filer::new(2, MIB, &[]);
    let plan = f.plan("");
    let text = std::fs::read_to_string(&plan)
        .unwrap()
        .replace("name = \"v1\"", "name = \"v0\"");
    std::fs::write(&plan, text).unwrap();
    let r = f.run("sync", &plan, &[]);
    assert_eq!(r.code, 2, "{}", r.context());
    assert!(r.stderr.contains("'v0' is given twice"), "{}", r.stderr);
    assert!(r.only("error")["message"]
        .as_str()
        .unwrap()
        .contains("twice"));
    assert!(
        !f.target("v0").exists() && !f.target("v1").exists(),
        "a target was created"
    );
    assert!(!f.sender.state.exists(), "the sender wrote state");

    // One source under two names: a symlink is the file it points to.
    std::os::unix::fs::symlink(f.source("v0"), f.dir.path().join("alias")).unwrap();
    let plan = f.plan("");
    let text = std::fs::read_to_string(&plan).unwrap();
    let text = text.replace(
        &f.source("v1").display().to_string(),
        &f.dir.path().join("alias").display().to_string(),
    );
    std::fs::write(&plan, text).unwrap();
    let r = f.run("sync", &plan, &[]);
    assert_eq!(r.code, 2, "{}", r.context());
    assert!(r.stderr.contains("have one source"), "{}", r.stderr);

    let plan = f.plan("speed = \"fast\"");
    let r = f.run("verify", &plan, &[]);
    assert_eq!(r.code, 2, "{}", r.context());
    assert!(
        r.stderr.contains("speed"),
        "the unknown key is not named: {}",
        r.stderr
    );
    let r = f.run("sync", &f.plan("jobs = 0"), &[]);
    assert_eq!(r.code, 2, "{}", r.context());
    assert!(!f.sender.state.exists(), "the sender wrote state");
}

#[test]
fn verify_plan_names_the_volume_that_differs() {
    let f = Filer::new(3, 2 * MIB, &[]);
    let plan = f.plan("jobs = 3");
    f.run("sync", &plan, &[]).ok();
    let r = f.run("verify", &plan, &[]);
    r.ok();
    assert_eq!(r.all("verify_end").len(), 3);
    write_at(&f.target("v2"), MIB, &[0x5a; 100]);
    let r = f.run("verify", &plan, &[]);
    assert_eq!(r.code, 1, "{}", r.context());
    assert_tagged(&r, &f.names);
    let differs: Vec<&Value> = r
        .all("verify_end")
        .into_iter()
        .filter(|e| e["identical"] == false)
        .collect();
    assert_eq!(differs.len(), 1, "{}", r.context());
    assert_eq!(differs[0]["volume"], "v2");
    assert_eq!(volume_results(&r)["v2"], "negative");
    assert_eq!(r.only("plan_end")["negative"], 1);
}

#[test]
fn sigint_once_lets_the_passes_in_flight_end_and_starts_nothing() {
    let f = Filer::new(3, 8 * MIB, &[]);
    // One at a time, 4 s a volume.
    let plan = f.plan("jobs = 1\nbwlimit = \"2M\"");
    let run = Spawned::start(f.command("sync", &plan, &[]));
    run.wait_for_event("pass_start", Duration::from_secs(60));
    run.signal(libc::SIGINT);
    let r = run.finish(COMMAND_TIMEOUT);
    assert_eq!(r.code, 130, "{}", r.context());
    let ends = r.all("pass_end");
    assert_eq!(ends.len(), 1, "the pass in flight ends\n{}", r.context());
    assert_eq!(ends[0]["volume"], "v0");
    assert_same_file(&f.source("v0"), &f.target("v0"));
    assert_eq!(
        r.all("pass_start").len(),
        1,
        "a new volume started\n{}",
        r.context()
    );
    let end = r.only("plan_end");
    assert_eq!(
        (end["succeeded"].as_u64(), end["not_started"].as_u64()),
        (Some(1), Some(2)),
        "{end}"
    );
    assert_eq!(end["stopped_by"], "signal");

    // Twice: the passes in flight stop at once.
    let plan = f.plan("jobs = 2\nbwlimit = \"1M\"");
    let run = Spawned::start(f.command("sync", &plan, &["--scan", "full"]));
    run.wait_for_event("pass_start", Duration::from_secs(60));
    run.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    run.signal(libc::SIGINT);
    let r = run.finish(COMMAND_TIMEOUT);
    assert_eq!(r.code, 130, "{}", r.context());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the second interrupt took {:?}",
        t.elapsed()
    );
    assert!(
        r.only("plan_end")["interrupted"].as_u64().unwrap() >= 1,
        "{}",
        r.context()
    );
}

#[test]
fn converge_plan_and_status_plan() {
    let f = Filer::new(2, 2 * MIB, &[]);
    let plan = f.plan("");
    let r = f.run("converge", &plan, &["--window", "1h", "--max-passes", "4"]);
    r.ok();
    assert_tagged(&r, &f.names);
    let ends = r.all("converge_end");
    assert_eq!(ends.len(), 2, "{}", r.context());
    assert!(ends.iter().all(|e| e["ready"] == true), "{}", r.context());
    let mut c = Command::new(bin());
    c.args(["status", "--json", "--window", "1h", "--plan"])
        .arg(&plan)
        .arg("--state-dir")
        .arg(&f.sender.state);
    let s = run_command(c);
    s.ok();
    for l in s.all("plan_volume") {
        assert_eq!(l["state"], "converged", "{l}");
        assert!(l["forecast_final_pass_s"].as_f64().is_some(), "{l}");
        assert_eq!(l["fits_window"], true, "{l}");
    }
    // The group's forecast: both frozen passes within jobs = 2, against
    // the window, in converge's answer and in status.
    for run in [&r, &s] {
        let g = run.event("plan_forecast");
        assert_eq!(
            (g["jobs"].as_u64(), &g["fits_window"]),
            (Some(2), &Value::Bool(true)),
            "{g}"
        );
    }
    // The group's forecast with one volume in flight at a time: the sum.
    let mut c = Command::new(bin());
    c.args(["status", "--json", "--jobs", "1", "--plan"])
        .arg(&plan)
        .arg("--state-dir")
        .arg(&f.sender.state);
    let one = run_command(c);
    one.ok();
    let sum: f64 = s
        .all("plan_volume")
        .iter()
        .map(|l| l["forecast_final_pass_s"].as_f64().unwrap())
        .sum();
    let g1 = one.event("plan_forecast");
    assert_eq!(g1["jobs"], 1, "{g1}");
    assert!(
        (g1["forecast_s"].as_f64().unwrap() - sum).abs() < 0.05,
        "{g1} vs {sum}"
    );
    // A window no frozen pass can fit: converge's answer is no (exit 1).
    let no = f.run("converge", &plan, &["--window", "1ms", "--max-passes", "2"]);
    assert_eq!(no.code, 1, "{}", no.context());
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|n| n.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_volumes_of_a_plan_share_one_hashing_pool() {
    let f = Filer::new(4, 8 * MIB, &[]);
    // Four volumes in flight together, slowly.
    let plan = f.plan("bwlimit = \"4M\"");
    let run = Spawned::start(f.command("sync", &plan, &[]));
    let all_started = wait_for(Duration::from_secs(60), || {
        run.stdout().matches("\"event\":\"pass_start\"").count() == 4
    });
    assert!(all_started, "four passes did not start: {}", run.stdout());
    let cores = std::thread::available_parallelism().unwrap().get();
    let hashers = threads_named(run.child.id(), "nightpass-hash");
    assert_eq!(
        hashers, cores,
        "one hashing thread per core for all four volumes"
    );
    run.signal(libc::SIGINT);
    run.signal(libc::SIGINT);
    let r = run.finish(COMMAND_TIMEOUT);
    assert_eq!(r.code, 130, "{}", r.context());
}

#[test]
fn block_device_sources_and_one_device_under_two_names() {
    if !need_root(
        "plan::block_device_sources_and_one_device_under_two_names",
        &["losetup"],
    ) {
        return;
    }
    let f = Filer::new(2, 4 * MIB, &[]);
    let loops: Vec<Loop> = f.names.iter().map(|n| Loop::attach(&f.source(n))).collect();
    let volumes: Vec<(String, PathBuf)> = f
        .names
        .iter()
        .cloned()
        .zip(loops.iter().map(|l| l.dev.clone()))
        .collect();
    let r = f.run("sync", &f.plan_of("", &volumes), &[]);
    r.ok();
    assert_tagged(&r, &f.names);
    for n in &f.names {
        assert_same_file(&f.source(n), &f.target(n));
    }
    // The device and a symlink to it are one source: refused whole.
    let alias = f.dir.path().join("disk-by-name");
    std::os::unix::fs::symlink(&loops[0].dev, &alias).unwrap();
    let twice = vec![
        ("v0".to_string(), loops[0].dev.clone()),
        ("v1".to_string(), alias),
    ];
    let r = f.run("sync", &f.plan_of("", &twice), &[]);
    assert_eq!(r.code, 2, "{}", r.context());
    assert!(r.stderr.contains("have one source"), "{}", r.stderr);
    assert!(
        r.events.iter().all(|e| e["event"] == "error"),
        "something ran\n{}",
        r.context()
    );
}

#[test]
fn without_a_terminal_each_volume_prints_its_progress_line() {
    let f = Filer::new(2, 8 * MIB, &[]);
    // Two volumes at once, about 4 s each under the shared limit.
    let plan = f.plan("bwlimit = \"4M\"");
    let mut c = Command::new(bin());
    c.args(["sync", "--progress-interval", "1s", "--plan"])
        .arg(&plan)
        .arg("--identity")
        .arg(&f.sender.id.dir)
        .arg("--state-dir")
        .arg(&f.sender.state)
        .stdin(Stdio::null());
    // Human output (not JSON): read as text.
    let out = c.output().expect("run nightpass sync --plan");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for n in &f.names {
        let line = format!("pass 1 of {n}: scanned");
        assert!(stderr.contains(&line), "no progress line of {n}:\n{stderr}");
    }
    assert!(stdout.contains("2 succeeded"), "no summary:\n{stdout}");
}

#[test]
fn a_dry_run_of_a_plan_reports_each_volume_and_writes_nothing() {
    let f = Filer::new(2, 2 * MIB, &[]);
    let plan = f.plan("");
    f.run("sync", &plan, &[]).ok();
    write_at(&f.source("v1"), MIB, &[0x77; 10]);
    let before: Vec<_> = f.names.iter().map(|n| file_hash(&f.target(n))).collect();
    let r = f.run("sync", &plan, &["--dry-run"]);
    r.ok();
    assert_tagged(&r, &f.names);
    let ends = r.all("dry_run_end");
    assert_eq!(ends.len(), 2, "{}", r.context());
    for e in ends {
        let want = if e["volume"] == "v1" { 1 } else { 0 };
        assert_eq!(e["chunks"], want, "{e}");
    }
    let after: Vec<_> = f.names.iter().map(|n| file_hash(&f.target(n))).collect();
    assert_eq!(before, after, "a dry run wrote a target");
    assert_eq!(r.only("plan_end")["succeeded"], 2);
}
