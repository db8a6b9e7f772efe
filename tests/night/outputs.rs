//! What the commands print for operators and their scripts (issue 16,
//! item 7): JSON on stdout for every command under `--json` (usage errors
//! and identities included, `ts` on every line), and the progress line a
//! pass prints every interval without a terminal.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// Every stdout line of `run` is a JSON object with an `event` and an
/// RFC 3339 UTC `ts`.
pub fn assert_ts(what: &str, run: &Run) {
    assert!(
        !run.events.is_empty(),
        "{what}: no JSON line\n{}",
        run.context()
    );
    for e in &run.events {
        let ts = e["ts"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no ts in {e}"));
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{what}: ts {ts:?} is not RFC 3339 UTC in {e}"
        );
    }
}

/// Runs `nightpass ARGS` to completion with stdout parsed as JSON lines.
pub fn nightpass(args: &[&str]) -> Run {
    let mut c = Command::new(bin());
    c.args(args).stdin(Stdio::null());
    let mut r = run_command(c);
    r.desc = format!("nightpass {}", args.join(" "));
    r
}

/// Runs `nightpass ARGS` and returns (status, stdout, stderr), stdout as text.
pub fn text(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn nightpass");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn identities_and_usage_errors_are_json_under_json() {
    let root = scratch();
    let dir = root.path().join("id");
    let d = dir.to_str().unwrap();
    let made = nightpass(&["keygen", "--identity", d, "--json"]);
    assert_eq!(made.code, 0, "{}", made.context());
    assert_ts("keygen --json", &made);
    let fp = made.only("identity")["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(fp.starts_with("np1-"), "{fp}");
    let shown = nightpass(&["fingerprint", "--identity", d, "--json"]);
    assert_eq!(shown.code, 0, "{}", shown.context());
    assert_ts("fingerprint --json", &shown);
    assert_eq!(shown.only("identity")["fingerprint"], fp.as_str());
    // Without --json the bare line stays.
    let (code, out, _) = text(&["fingerprint", "--identity", d]);
    assert_eq!((code, out.trim()), (0, fp.as_str()));

    for args in [
        &["sync", "--json", "--no-such-flag", "a", "b"][..],
        &["--json", "frobnicate"][..],
        &["converge", "src", "h:1/v", "--json"][..],
        &[
            "serve",
            "--json",
            "--listen",
            "no-such-host.invalid:7400",
            "--volume",
            "v=/x",
            "--allow",
            &fp,
        ][..],
    ] {
        let r = nightpass(args);
        assert_eq!(r.code, 2, "{}", r.context());
        assert_ts("a usage error", &r);
        let e = r.only("error");
        assert_eq!(e["exit_code"], 2, "{}", r.context());
        assert!(
            !e["message"].as_str().unwrap().is_empty(),
            "{}",
            r.context()
        );
        assert!(
            r.stderr.contains("error"),
            "no text on stderr: {}",
            r.context()
        );
    }
    let r = nightpass(&[
        "serve",
        "--json",
        "--listen",
        "no-such-host.invalid:7400",
        "--volume",
        "v=/x",
        "--allow",
        &fp,
    ]);
    assert!(
        r.only("error")["message"]
            .as_str()
            .unwrap()
            .contains("cannot resolve host 'no-such-host.invalid'"),
        "{}",
        r.context()
    );
    // --help is not an error.
    let (code, out, _) = text(&["sync", "--help", "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("Usage"), "{out}");
}

#[test]
fn without_a_terminal_a_throttled_pass_prints_progress_lines() {
    let (_root, src, dst, sender, rx) = source_and_volume("src.img", "dst.img", 12 * MIB, 164);
    let mut c = Command::new(bin());
    c.arg("sync")
        .arg(&src)
        .arg(rx.dest("v"))
        .args(["--server-fingerprint", &rx.fp, "--identity"])
        .arg(&sender.id.dir)
        .arg("--state-dir")
        .arg(&sender.state)
        .args(["--bwlimit", "3M", "--progress-interval", "1s"])
        .stdin(Stdio::null());
    let out = c.output().expect("spawn sync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("pass 1 of ") && l.contains(": scanned "))
        .collect();
    assert!(
        lines.len() >= 2,
        "a 4 s pass printed {} progress lines at 1 s:\n{stderr}",
        lines.len()
    );
    let sent = |l: &str| {
        let at = l.find(", sent ").unwrap() + 7;
        l[at..].split(" of ~").next().unwrap().to_string()
    };
    for l in &lines {
        assert!(l.contains(" of 12.00 MiB (") && l.contains("ETA "), "{l}");
        assert!(l.contains(" of ~"), "the sent figure has no total: {l}");
    }
    assert_ne!(sent(lines[0]), sent(lines[lines.len() - 1]), "{stderr}");
    // The summary stays on stdout, as it was.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("pass 1 of") && stdout.contains("done in"),
        "{stdout}"
    );
    assert_eq!(file_hash(&src), file_hash(&dst), "bytes differ");

    // --progress-interval 0 prints none; neither does --json.
    for extra in [&["--progress-interval", "0"][..], &["--json"][..]] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&src)
            .and_then(|f| f.set_len(12 * MIB))
            .unwrap();
        write_at(&src, 0, &vec![7u8; 4 * MIB as usize]);
        let mut c = Command::new(bin());
        c.arg("sync")
            .arg(&src)
            .arg(rx.dest("v"))
            .args(["--server-fingerprint", &rx.fp, "--identity"])
            .arg(&sender.id.dir)
            .arg("--state-dir")
            .arg(&sender.state)
            .args(["--bwlimit", "2M"])
            .args(extra)
            .stdin(Stdio::null());
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains(": scanned "), "{extra:?}: {stderr}");
    }
}

/// Every command that has JSON output today prints only JSON lines with
/// `ts` under `--json`: keygen and fingerprint (above), sync, verify,
/// converge, cutover, status, unseal, demo, man --out and errors; `serve`
/// (its `listening` event) and `track` (where a block device can be
/// tracked) below.
#[test]
fn every_json_line_of_every_command_has_ts() {
    let (root, src, dst, sender, rx) = source_and_volume("src.img", "dst.img", 4 * MIB, 165);
    let dest = rx.dest("v");
    let run = |cmd: &str, extra: &[&str]| {
        let r = sender.run(cmd, &src, &dest, &rx.fp, extra);
        assert_ts(cmd, &r);
        r
    };
    assert_eq!(run("sync", &[]).code, 0);
    write_at(&src, 0, &[1u8; 65536]);
    let c = run("converge", &["--window", "1h"]);
    assert_eq!(c.code, 0, "{}", c.context());
    assert_eq!(run("verify", &[]).code, 0);
    let cut = run("cutover", &["--assume-frozen"]);
    assert_eq!(cut.code, 0, "{}", cut.context());
    let state = sender.state.to_str().unwrap();
    let status = nightpass(&["status", "--state-dir", state, "--json"]);
    assert_eq!(status.code, 0, "{}", status.context());
    assert_ts("status", &status);
    let rstate = root.path().join("r-state");
    let unseal = nightpass(&[
        "unseal",
        "v",
        "--state-dir",
        rstate.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(unseal.code, 0, "{}", unseal.context());
    assert_ts("unseal", &unseal);
    // A failure is an error event with ts.
    let refused = sender.run("sync", &src, &rx.dest("nope"), &rx.fp, &[]);
    assert_eq!(refused.code, 2);
    assert_ts("a refused sync", &refused);
    let demo = nightpass(&["demo", "--size", "16M", "--json"]);
    assert_eq!(demo.code, 0, "{}", demo.context());
    assert_ts("demo", &demo);
    assert_eq!(file_hash(&src), file_hash(&dst), "bytes differ");
}

/// `track --json`'s events carry `ts` too (a loop device to track).
#[test]
fn track_json_lines_have_ts() {
    if !need_root("track_json_lines_have_ts", &["losetup"]) {
        return;
    }
    let root = scratch();
    let img = root.path().join("dev.img");
    random_file(&img, 8 * MIB, 166);
    let lo = Loop::attach(&img);
    let mut c = Command::new(bin());
    c.arg("track")
        .arg(&lo.dev)
        .arg("--state-dir")
        .arg(root.path().join("state"))
        .arg("--json");
    let t = Spawned::start(c);
    t.expect_event("track_start", Duration::from_secs(20));
    t.signal(libc::SIGTERM);
    let r = t.finish(Duration::from_secs(30));
    assert_eq!(r.code, 0, "{}", r.context());
    assert_ts("track", &r);
    assert!(r.events.iter().any(|e: &Value| e["event"] == "track_start"));
}

/// A tracked pass's progress counts up to what it reads (the blocks
/// written since the last pass and its audit sample), not the whole device.
#[test]
fn a_tracked_pass_shows_progress_out_of_what_it_reads() {
    if !need_root(
        "a_tracked_pass_shows_progress_out_of_what_it_reads",
        &["losetup", "dd"],
    ) {
        return;
    }
    let s = Setup::new();
    let backing = s.path("src.img");
    random_file(&backing, 64 * MIB, 167);
    let lo = Loop::attach(&backing);
    let target = s.path("target.img");
    let rx = s.start_receiver(&[("vol", &target)]);
    let tx = s.sender(&rx);
    let mut c = Command::new(bin());
    c.arg("track")
        .arg(&lo.dev)
        .arg("--state-dir")
        .arg(&s.sender_state);
    let tracker = Spawned::start(c);
    assert!(
        wait_for(Duration::from_secs(10), || tracker
            .stderr()
            .contains("tracking ")),
        "the tracker did not start: {}",
        tracker.stderr()
    );
    let first = tx.sync(&lo.dev, &rx.dest("vol"), &[]);
    assert_eq!(first.code, 0, "{}", first.context());
    // 6 MiB written since: the next pass reads about that much.
    let dd = |seek: u64| {
        run_tool(
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={}", lo.dev.display()),
                "bs=1M",
                &format!("seek={seek}"),
                "count=6",
                "oflag=direct",
                "conv=notrunc",
                "status=none",
            ],
        )
    };
    dd(10);
    let out = Command::new(bin())
        .arg("sync")
        .arg(&lo.dev)
        .arg(rx.dest("vol"))
        .args(["--server-fingerprint", &rx.fp, "--identity"])
        .arg(&tx.identity)
        .arg("--state-dir")
        .arg(&tx.state_dir)
        .args([
            "--scan",
            "tracked",
            "--bwlimit",
            "2M",
            "--progress-interval",
            "1s",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(": scanned "))
        .collect();
    assert!(
        !lines.is_empty(),
        "no progress line in a 3 s pass:\n{stderr}"
    );
    for l in &lines {
        assert!(
            !l.contains("of 64.00 MiB"),
            "a tracked pass counts up to the whole device: {l}"
        );
    }
    tracker.signal(libc::SIGTERM);
    let _ = tracker.finish(Duration::from_secs(30));
    drop(lo);
}

/// `serve --json` says where it listens on stdout, as a `listening` event
/// with `ts` (the port a `:0` got), and nothing else there.
#[test]
fn serve_under_json_says_where_it_listens() {
    let root = scratch();
    let (rid, sid) = (keygen(root.path(), "r-id"), keygen(root.path(), "s-id"));
    let mut c = Command::new(bin());
    c.args([
        "serve",
        "--json",
        "--listen",
        "127.0.0.1:0",
        "--allow",
        &sid.fp,
    ])
    .arg("--volume")
    .arg(format!("v={}", root.path().join("v.img").display()))
    .arg("--identity")
    .arg(&rid.dir)
    .arg("--state-dir")
    .arg(root.path().join("r-state"));
    let serve = Spawned::start(c);
    serve.expect_event("listening", Duration::from_secs(20));
    serve.signal(libc::SIGTERM);
    let r = serve.finish(Duration::from_secs(20));
    assert_eq!(r.code, 0, "{}", r.context());
    assert_ts("serve --json", &r);
    let e = r.only("listening");
    assert_eq!(e["fingerprint"], rid.fp.as_str(), "{e}");
    let addr: std::net::SocketAddr = e["address"].as_str().unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0, "{e}");
    assert!(
        r.stderr.contains(&format!("listening on {addr}")),
        "{}",
        r.stderr
    );
}
