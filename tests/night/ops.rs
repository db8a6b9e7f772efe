//! What operators run for weeks (issue 16, item 7), on the receiver's
//! side and around it: the receiver's log of sessions with timestamps (or
//! journald priorities), SIGHUP re-reading the allow file, `--listen` by
//! host name, shell completions and manual pages. What the commands print
//! (JSON, progress lines) is `outputs`'.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;
use crate::outputs::{assert_ts, nightpass, text};

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
    // Every line is stamped, but the start line, whose words scripts
    // match (CLI.md: `listening on ADDR fingerprint FP`).
    for line in log.lines() {
        if line.starts_with("listening on ") {
            continue;
        }
        stamped(line);
    }
    assert!(
        log.lines()
            .next()
            .is_some_and(|l| l.starts_with("listening on 127.0.0.1:")),
        "{log}"
    );
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
