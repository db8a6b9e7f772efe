//! What operators run for weeks (issue 16, item 7): the receiver's log of
//! sessions with timestamps (or journald priorities), SIGHUP re-reading the
//! allow file, shell completions and manual pages, JSON on stdout for every
//! command under `--json` (usage errors and identities included, `ts` on
//! every line), `--listen` by host name, and the progress line a pass
//! prints every interval without a terminal.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// A line of `serve`'s log: `2026-11-30T01:31:02.123Z  INFO message`, or
/// panics naming the line.
fn stamped(line: &str) -> (&str, &str, &str) {
    let mut parts = line.splitn(2, ' ');
    let ts = parts.next().unwrap_or("");
    let rest = parts.next().unwrap_or("").trim_start();
    let (level, message) = rest.split_once(' ').unwrap_or((rest, ""));
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "log line without an RFC 3339 UTC time: {line:?}"
    );
    (ts, level, message)
}

/// The value of `key=` in a log line (quotes removed).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    if let Some(quoted) = rest.strip_prefix('"') {
        return quoted.find('"').map(|end| &quoted[..end]);
    }
    Some(rest.split(' ').next().unwrap_or(""))
}

/// Every stdout line of `run` is a JSON object with an `event` and an
/// RFC 3339 UTC `ts`.
fn assert_ts(what: &str, run: &Run) {
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
fn nightpass(args: &[&str]) -> Run {
    let mut c = Command::new(bin());
    c.args(args).stdin(Stdio::null());
    let mut r = run_command(c);
    r.desc = format!("nightpass {}", args.join(" "));
    r
}

/// Runs `nightpass ARGS` and returns (status, stdout, stderr), stdout as text.
fn text(args: &[&str]) -> (i32, String, String) {
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
fn serve_logs_each_session_with_its_time_peer_volume_bytes_and_result() {
    let (_root, src, dst, sender, rx) = source_and_volume("src.img", "dst.img", 4 * MIB, 161);
    sender.sync_ok(&src, &rx, "v", "first pass");
    let refused = sender.run("sync", &src, &rx.dest("nope"), &rx.fp, &[]);
    assert_eq!(refused.code, 2, "{}", refused.context());
    let verified = sender.run("verify", &src, &rx.dest("v"), &rx.fp, &[]);
    assert_eq!(verified.code, 0, "{}", verified.context());
    assert!(wait_for(Duration::from_secs(5), || rx
        .log()
        .matches("session end")
        .count()
        >= 3));
    let log = rx.log();
    for line in log.lines() {
        stamped(line);
    }
    let ends: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" session end "))
        .collect();
    let ok = ends
        .iter()
        .find(|l| field(l, "volume") == Some("v"))
        .unwrap_or_else(|| panic!("no session end line for v:\n{log}"));
    assert_eq!(field(ok, "peer"), Some(sender.id.fp.as_str()), "{ok}");
    assert_eq!(field(ok, "kind"), Some("sync"), "{ok}");
    assert_eq!(field(ok, "pass"), Some("1"), "{ok}");
    assert_eq!(field(ok, "result"), Some("ok"), "{ok}");
    assert_eq!(field(ok, "chunks"), Some("64"), "{ok}");
    let bytes: u64 = field(ok, "bytes").unwrap().parse().unwrap();
    assert!(
        bytes >= 4 * MIB,
        "{bytes} bytes for 4 MiB of random data: {ok}"
    );
    let took: f64 = field(ok, "duration_s").unwrap().parse().unwrap();
    assert!(took > 0.0 && took < 60.0, "{ok}");
    assert_eq!(stamped(ok).1, "INFO", "{ok}");
    let no = ends
        .iter()
        .find(|l| field(l, "volume") == Some("nope"))
        .unwrap_or_else(|| panic!("no session end line for the refused session:\n{log}"));
    assert_eq!(field(no, "result"), Some("refused"), "{no}");
    assert!(
        field(no, "reason").unwrap().contains("not exported"),
        "{no}"
    );
    assert_eq!(stamped(no).1, "WARN", "{no}");
    let v = ends
        .iter()
        .find(|l| field(l, "kind") == Some("verify"))
        .unwrap_or_else(|| panic!("no session end line for the verify:\n{log}"));
    assert_eq!(field(v, "result"), Some("ok"), "{v}");
    assert_eq!(field(v, "pass"), Some("-"), "{v}");
    assert_eq!(field(v, "chunks"), Some("64"), "chunks hashed fresh: {v}");
    assert_eq!(field(v, "bytes"), Some(&*(4 * MIB).to_string()), "{v}");
    assert_eq!(
        log.matches(" session start ").count(),
        3,
        "one start line per session:\n{log}"
    );
    drop(dst);
}

#[test]
fn under_the_journal_serve_writes_priorities_and_no_time() {
    use std::os::unix::fs::MetadataExt;
    let root = scratch();
    let rid = keygen(root.path(), "r-id");
    let sid = keygen(root.path(), "s-id");
    let err_path = root.path().join("serve.err");
    let err = std::fs::File::create(&err_path).unwrap();
    let meta = err.metadata().unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--allow", &sid.fp])
        .arg("--volume")
        .arg(format!("v={}", root.path().join("v.img").display()))
        .arg("--identity")
        .arg(&rid.dir)
        .arg("--state-dir")
        .arg(root.path().join("r-state"))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&err_path).unwrap_or_default();
    let said = wait_for(Duration::from_secs(20), || read().contains("listening on"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(said, "no listening line: {}", read());
    let line = read().lines().next().unwrap().to_string();
    assert!(
        line.starts_with("<6>listening on 127.0.0.1:"),
        "not a journal line with priority 6: {line:?}"
    );
}

/// The sender's commands keep bare lines, and take journal priorities
/// when their stderr is the journal (a converge unit).
#[test]
fn a_senders_warning_under_the_journal_has_its_priority() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = scratch();
    let id = keygen(root.path(), "id");
    let key = id.dir.join("key.der");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = |journal: bool| {
        let err_path = root.path().join(format!("err-{journal}"));
        let err = std::fs::File::create(&err_path).unwrap();
        let meta = err.metadata().unwrap();
        let mut c = Command::new(bin());
        c.args(["fingerprint", "--identity"])
            .arg(&id.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        if journal {
            c.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        assert!(c.status().unwrap().success());
        std::fs::read_to_string(&err_path).unwrap()
    };
    let bare = run(false);
    assert!(bare.starts_with("warning: identity key "), "{bare:?}");
    let journal = run(true);
    assert!(
        journal.starts_with("<4>warning: identity key "),
        "{journal:?}"
    );
}

#[test]
fn sighup_rereads_the_allow_file_and_serve_lives_on() {
    let root = scratch();
    let (src, dst) = (root.path().join("src.img"), root.path().join("dst.img"));
    random_file(&src, 2 * MIB, 162);
    let (a, b) = (
        SenderSide::new(root.path(), "a"),
        SenderSide::new(root.path(), "b"),
    );
    let allow = root.path().join("allow");
    std::fs::write(&allow, format!("# the first sender\n{}\n", a.id.fp)).unwrap();
    let rid = keygen(root.path(), "r-id");
    let allow_arg = allow.display().to_string();
    let mut rx = Receiver::start_with(
        &rid,
        &root.path().join("r-state"),
        &[("v", &dst)],
        &[],
        0,
        &["--allow-file", &allow_arg],
    );
    a.sync_ok(&src, &rx, "v", "a, allowed at start");
    let r = b.run("sync", &src, &rx.dest("v"), &rx.fp, &[]);
    assert_eq!(r.code, 2, "b is not allowed yet: {}", r.context());

    std::fs::write(&allow, format!("{}=v\n", b.id.fp)).unwrap();
    let hup = |rx: &Receiver| {
        // SAFETY: kill has no memory preconditions.
        assert_eq!(unsafe { libc::kill(rx.child.id() as i32, libc::SIGHUP) }, 0);
    };
    hup(&rx);
    rx.assert_log_says_within("SIGHUP: re-read", Duration::from_secs(5));
    let log = rx.log();
    let line = log.lines().find(|l| l.contains("SIGHUP: re-read")).unwrap();
    assert!(
        line.contains(&format!("allowed {} (v)", b.id.fp))
            && line.contains(&format!("removed {}", a.id.fp)),
        "the log does not say what changed: {line}"
    );
    assert!(rx.child.try_wait().unwrap().is_none(), "SIGHUP ended serve");
    b.sync_ok(&src, &rx, "v", "b, added by the reload");
    let r = a.run("sync", &src, &rx.dest("v"), &rx.fp, &[]);
    assert_eq!(r.code, 2, "a was removed: {}", r.context());

    // A broken file changes nothing, and says so.
    std::fs::write(&allow, "not-a-fingerprint\n").unwrap();
    hup(&rx);
    rx.assert_log_says_within("stay as they were", Duration::from_secs(5));
    b.sync_ok(&src, &rx, "v", "b, after a bad reload");
    assert!(rx.child.try_wait().unwrap().is_none(), "SIGHUP ended serve");
    assert_eq!(file_hash(&src), file_hash(&dst), "bytes differ");
    rx.kill9();
}

#[test]
fn completions_and_manual_pages_describe_every_command() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, out, err) = text(&["completions", shell]);
        assert_eq!(code, 0, "completions {shell}: {err}");
        for cmd in ["serve", "sync", "converge", "cutover", "completions"] {
            assert!(out.contains(cmd), "completions {shell} do not name {cmd}");
        }
    }
    let (code, out, err) = text(&["man"]);
    assert_eq!(code, 0, "man: {err}");
    assert!(
        out.starts_with('.'),
        "not roff: {:?}",
        &out[..out.len().min(80)]
    );
    assert!(
        out.lines().any(|l| l.starts_with(".TH nightpass 1")),
        "no .TH nightpass 1 line"
    );
    assert!(out.contains("serve") && out.contains("cutover"), "{out}");
    let root = scratch();
    let dir = root.path().join("man1");
    let r = nightpass(&["man", "--out", dir.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{}", r.context());
    assert_ts("man --out --json", &r);
    for page in [
        "nightpass.1",
        "nightpass-serve.1",
        "nightpass-sync.1",
        "nightpass-man.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_default();
        assert!(
            text.lines().any(|l| l.starts_with(".TH")),
            "{page}: {text:?}"
        );
    }
    let listed = r.only("man_pages")["files"].as_array().unwrap().len();
    assert!(listed >= 14, "{}", r.context());
    // Roff or a script is not JSON: refused under --json.
    let r = nightpass(&["completions", "bash", "--json"]);
    assert_eq!(r.code, 2, "{}", r.context());
    assert_eq!(r.only("error")["exit_code"], 2);
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
fn listen_takes_a_host_name() {
    let root = scratch();
    let (src, dst) = (root.path().join("src.img"), root.path().join("dst.img"));
    random_file(&src, MIB, 163);
    let sender = SenderSide::new(root.path(), "s");
    let rid = keygen(root.path(), "r-id");
    let rx = Receiver::start_with(
        &rid,
        &root.path().join("r-state"),
        &[("v", &dst)],
        &[&sender.id.fp],
        0,
        &["--listen", "localhost:0"],
    );
    let dest = format!("localhost:{}/v", rx.port);
    let r = sender.run("sync", &src, &dest, &rx.fp, &[]);
    assert_eq!(r.code, 0, "{}", r.context());
    assert_eq!(file_hash(&src), file_hash(&dst), "bytes differ");
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
/// has no JSON (its log is on stderr), `track` is checked where a block
/// device can be tracked.
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
