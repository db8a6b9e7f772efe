//! `nightpass fleet agent` against a private PostgreSQL, a real receiver
//! and real agent processes: two agents of one host cut two scheduled
//! filers over in their window; an agent killed mid-pass (its volume
//! waits for the lease, then the other agent takes it); the red button
//! pressed while passes run; the error threshold pressing it by itself;
//! a vanished source failing its volume alone; never one volume held by
//! two agents at once; PostgreSQL restarted under running agents (nothing
//! lost). After each, the tables' history is checked whole
//! ([`checks::assert_fleet_history`]).
//!
//! The figures the issue asks for (passes per minute, window opening to
//! group cutover, a killed agent's volume's wait) are printed as
//! `figure:` lines (`cargo test --test night -- fleet_agent:: --nocapture`).

mod checks;
mod world;

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use checks::{assert_fleet_history, assert_group_point, assert_pass_ends_recorded};
use world::{assert_stopped_clean, Fleet, HOST};

/// `n` seconds.
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Two filers of three volumes, one receiver, two agents of one host (two
/// state directories, one identity): each filer is scheduled a few
/// seconds ahead; every volume reaches `cut_over` in its window, its
/// target byte-identical to its source, with a consistency point per
/// volume and a group point per filer; a cut-over filer is never passed
/// again; SIGTERM ends both agents with exit 0 and their leases released.
#[test]
fn two_agents_cut_two_filers_over_in_their_window() {
    let test = "fleet_agent::two_agents_cut_two_filers_over_in_their_window";
    let Some(f) = Fleet::new(test, &[("fa", 3), ("fb", 3)], MIB, &[]) else {
        return;
    };
    let opens = [f.schedule_in("fa", 8, "10m"), f.schedule_in("fb", 8, "10m")];
    let mut a = f.agent("agent-a", &[]);
    let mut b = f.agent("agent-b", &[]);
    let start = a.wait_event("fleet_agent_start", secs(30), |_| true);
    assert_eq!(start["agent"], "agent-a", "{start}");
    assert_eq!(start["host"], HOST, "{start}");
    assert_eq!(start["jobs"], 2, "{start}");
    assert_eq!(start["lease_s"].as_f64(), Some(3.0), "{start}");
    assert!(
        start["database"].is_string() && start["ts"].is_string(),
        "{start}"
    );
    f.wait_all(&mut [&mut a, &mut b], secs(90), &["cut_over"]);
    // Sealed: past --ready-interval, no agent passes them again.
    std::thread::sleep(secs(3));
    let (ra, rb) = (a.stop(libc::SIGTERM), b.stop(libc::SIGTERM));
    assert_stopped_clean(&ra);
    assert_stopped_clean(&rb);
    for v in f.volumes() {
        assert_same_file(&f.source(v), &f.target(v));
    }
    let runs = [&ra, &rb];
    for e in runs.iter().flat_map(|r| r.all("pass_end")) {
        assert!(e["filer"].is_string(), "pass_end without its filer: {e}");
        assert!(f.volumes().iter().any(|v| e["volume"] == *v), "{e}");
    }
    for (filer, opened) in f.filers.iter().zip(opens) {
        assert_group_point(&f.pg, &runs, &filer.name);
        assert_cut_over_in_window(&f, &filer.name, opened);
    }
    assert_fleet_history(&f.pg, &[]);
    let held = f.count("SELECT count(*) FROM nightpass.leases WHERE expires_at > now()");
    assert_eq!(held, 0, "leases still held after SIGTERM\n{}", f.dump());
}

/// `filer`'s group cutover started no earlier than its window opened
/// (epoch seconds `opened`), and no pass of its volumes started after it
/// was cut over; prints the time from the opening to the cutover.
#[track_caller]
fn assert_cut_over_in_window(f: &Fleet, filer: &str, opened: f64) {
    let cut_over = f.epoch(&format!(
        "SELECT cut_over_at FROM nightpass.filers WHERE name = '{filer}'"
    ));
    let started = f.epoch(&format!(
        "SELECT min(h.at) FROM nightpass.history h JOIN nightpass.volumes v \
         ON v.id = h.volume WHERE v.filer = '{filer}' AND h.to_state = 'cutting_over'"
    ));
    assert!(
        started >= opened,
        "{filer}: the group cutover started {:.2} s before its window",
        opened - started
    );
    println!(
        "figure: filer {filer}: window opened → group cutover started {:.2} s, cut over {:.2} s",
        started - opened,
        cut_over - opened
    );
    let late = f.count(&format!(
        "SELECT count(*) FROM nightpass.passes p JOIN nightpass.volumes v ON v.id = p.volume \
         WHERE v.filer = '{filer}' AND p.kind = 'pass' AND p.at > to_timestamp({cut_over})"
    ));
    assert_eq!(late, 0, "{filer}: passes after its cutover\n{}", f.dump());
}

/// One agent killed with SIGKILL mid-pass (a throttled pass): its volume
/// waits until the lease runs out, then the other agent takes it (a
/// larger token) and finishes every volume; the wait is a `figure:` line.
#[test]
fn a_killed_agents_volume_is_taken_over_when_its_lease_expires() {
    let test = "fleet_agent::a_killed_agents_volume_is_taken_over_when_its_lease_expires";
    let Some(f) = Fleet::new(test, &[("fk", 3)], 4 * MIB, &[]) else {
        return;
    };
    // 4 MiB at 1 MiB/s: a pass lasts about 4 s.
    let mut a = f.agent("agent-a", &["--jobs", "1", "--bwlimit", "1M"]);
    let claim = a.wait_event("fleet_claim", secs(30), |_| true);
    let victim = claim["volume"]
        .as_str()
        .expect("fleet_claim.volume")
        .to_string();
    let token_a = claim["token"].as_i64().expect("fleet_claim.token");
    a.wait_event("pass_start", secs(10), |e| e["volume"] == victim.as_str());
    // The other agent may take everything but the victim at once.
    let mut b = f.agent("agent-b", &["--jobs", "3", "--bwlimit", "1M"]);
    b.wait_event("fleet_agent_start", secs(30), |_| true);
    std::thread::sleep(secs(1));
    assert!(a.all("fleet_pass_recorded").is_empty(), "{}", a.output());
    a.kill9();
    let killed = f.now();
    let expires = f.epoch(&format!(
        "SELECT l.expires_at FROM nightpass.leases l JOIN nightpass.volumes v ON v.id = l.volume \
         WHERE v.name = '{victim}' AND l.agent = 'agent-a' AND l.token = {token_a}"
    ));
    assert!(
        expires > killed,
        "agent-a's lease had run out before the kill"
    );
    let taken = b.wait_event("fleet_claim", secs(30), |e| e["volume"] == victim.as_str());
    let token_b = taken["token"].as_i64().expect("fleet_claim.token");
    assert!(token_b > token_a, "{taken} after {claim}");
    f.wait(
        &mut [&mut b],
        secs(60),
        "agent-b's passes of every volume",
        |f| {
            f.count(
                "SELECT count(DISTINCT volume) FROM nightpass.passes \
             WHERE agent = 'agent-b' AND ok AND kind = 'pass'",
            ) == 3
        },
    );
    assert_taken_after_expiry(&f, &victim, killed, expires);
    let rb = b.stop(libc::SIGTERM);
    assert_stopped_clean(&rb);
    for v in f.volumes() {
        assert_same_file(&f.source(v), &f.target(v));
    }
    for (v, s) in f.states() {
        assert!(
            ["converging", "ready"].contains(&s.as_str()),
            "{v} is {s}\n{}",
            f.dump()
        );
    }
    let started = f.count(&format!(
        "SELECT count(*) FROM nightpass.passes p JOIN nightpass.volumes v ON v.id = p.volume \
         WHERE v.name = '{victim}' AND p.agent = 'agent-a' AND p.token = {token_a}"
    ));
    assert_eq!(
        started,
        1,
        "agent-a's pass row, written at its start\n{}",
        f.dump()
    );
    assert_fleet_history(&f.pg, &[("agent-a", killed)]);
}

/// agent-b's first pass of `victim` started after agent-a's lease expired
/// (`expires`, epoch seconds) and soon after (within a few polls); prints
/// how long the volume waited since the kill and since the expiry.
#[track_caller]
fn assert_taken_after_expiry(f: &Fleet, victim: &str, killed: f64, expires: f64) {
    let claimed = f.epoch(&format!(
        "SELECT min(p.at) FROM nightpass.passes p JOIN nightpass.volumes v ON v.id = p.volume \
         WHERE v.name = '{victim}' AND p.agent = 'agent-b'"
    ));
    println!(
        "figure: a killed agent's volume ({victim}, --lease 3s) waited {:.2} s from the kill, \
         {:.2} s after its lease expired",
        claimed - killed,
        claimed - expires
    );
    assert!(
        claimed >= expires,
        "agent-b started {victim} {:.3} s before agent-a's lease expired",
        expires - claimed
    );
    assert!(
        claimed - expires < 5.0,
        "agent-b took {:.2} s past the lease's expiry to start {victim}",
        claimed - expires
    );
}

/// `fleet pause` while passes run: the passes in flight end and are
/// recorded ok, no pass starts between the fleet_log's 'pause' and
/// 'resume' rows (although volumes are due), and after `fleet resume`
/// the work goes on.
#[test]
fn pause_lets_passes_in_flight_end_and_starts_none_until_resume() {
    let test = "fleet_agent::pause_lets_passes_in_flight_end_and_starts_none_until_resume";
    let Some(f) = Fleet::new(test, &[("fp", 6)], 2 * MIB, &[]) else {
        return;
    };
    // 2 MiB at 1 MiB/s: 2 s a pass; two at once (the plan's jobs: the
    // filer's cap), four volumes left pending.
    let flags = ["--jobs", "2", "--bwlimit", "1M"];
    let (mut a, mut b) = (f.agent("agent-a", &flags), f.agent("agent-b", &flags));
    let in_flight = "SELECT count(*) FROM nightpass.passes WHERE ok IS NULL";
    f.wait(
        &mut [&mut a, &mut b],
        secs(30),
        "two passes in flight",
        |f| f.count(in_flight) >= 2,
    );
    f.fleet(&["pause", "--reason", "array alarm"]).ok();
    let paused = f.epoch("SELECT paused_at FROM nightpass.settings");
    f.wait(
        &mut [&mut a, &mut b],
        secs(30),
        "the passes in flight ended",
        |f| f.count(in_flight) == 0,
    );
    // Past --ready-interval: due volumes wait, pending ones too.
    std::thread::sleep(secs(4));
    let resuming = f.now();
    f.fleet(&["resume"]).ok();
    let resumed = f.now();
    let after_resume =
        format!("SELECT count(*) FROM nightpass.passes WHERE at > to_timestamp({resumed})");
    f.wait(
        &mut [&mut a, &mut b],
        secs(30),
        "a pass after the resume",
        |f| f.count(&after_resume) >= 1,
    );
    f.wait_all(&mut [&mut a, &mut b], secs(60), &["converging", "ready"]);
    let (ra, rb) = (a.stop(libc::SIGTERM), b.stop(libc::SIGTERM));
    assert_stopped_clean(&ra);
    assert_stopped_clean(&rb);
    let recorded: Vec<&Value> = [&ra, &rb]
        .iter()
        .flat_map(|r| r.all("fleet_pass_recorded"))
        .collect();
    assert!(
        recorded.iter().filter(|e| e["ok"] == true).count() >= 6,
        "{recorded:?}"
    );
    assert_nothing_started_while_paused(&f, paused, resuming);
    assert_fleet_history(&f.pg, &[]);
    assert_pause_logged(&f);
}

/// No pass started between `paused` (the pause's commit, epoch seconds)
/// and `resuming` (before `fleet resume` ran); some passes were in flight
/// at the pause, and each ended ok.
#[track_caller]
fn assert_nothing_started_while_paused(f: &Fleet, paused: f64, resuming: f64) {
    let (pause, resume) = (
        format!("to_timestamp({paused})"),
        format!("to_timestamp({resuming})"),
    );
    let started = f.pg.query(&format!(
        "SELECT v.name, p.agent, p.at FROM nightpass.passes p JOIN nightpass.volumes v \
         ON v.id = p.volume WHERE p.at > {pause} AND p.at < {resume}"
    ));
    assert!(
        started.is_empty(),
        "passes started while paused ({pause} to {resume}): {started:#?}"
    );
    let spanning = f.pg.query(&format!(
        "SELECT v.name, p.agent, coalesce(p.ok::text, 'NULL') FROM nightpass.passes p \
         JOIN nightpass.volumes v ON v.id = p.volume \
         WHERE p.at < {pause} AND (p.ended_at IS NULL OR p.ended_at > {pause})"
    ));
    assert!(
        !spanning.is_empty(),
        "no pass was in flight at the pause\n{}",
        f.dump()
    );
    for r in &spanning {
        assert_eq!(
            r[2], "true",
            "a pass in flight at the pause did not end ok: {r:?}"
        );
    }
    println!(
        "figure: paused {:.2} s; {} passes in flight at the pause ended ok",
        resuming - paused,
        spanning.len()
    );
}

/// The fleet_log holds a 'pause' row, then a 'resume' row, each saying by
/// whom, and no pass started between them.
#[track_caller]
fn assert_pause_logged(f: &Fleet) {
    let log = f.pg.query(
        "SELECT event, by, extract(epoch FROM at)::float8 FROM nightpass.fleet_log ORDER BY id",
    );
    let row = |event: &str| {
        log.iter()
            .find(|r| r[0] == event)
            .unwrap_or_else(|| panic!("no '{event}' row in nightpass.fleet_log: {log:?}"))
    };
    let (pause, resume) = (row("pause"), row("resume"));
    assert!(!pause[1].is_empty() && !resume[1].is_empty(), "{log:?}");
    let (paused, resumed): (f64, f64) = (pause[2].parse().unwrap(), resume[2].parse().unwrap());
    assert!(resumed > paused, "{log:?}");
    assert_nothing_started_while_paused(f, paused, resumed);
}

/// Sets the error threshold with `fleet limits`, or in SQL while `fleet
/// limits` is not built.
fn set_error_threshold(f: &Fleet, threshold: u32, window: u32) {
    let (t, w) = (threshold.to_string(), window.to_string());
    let run = f.fleet(&["limits", "--error-threshold", &t, "--error-window", &w]);
    if run.code != 0 && run.stderr.contains("not built yet") {
        eprintln!("fleet limits is not built yet: the error threshold set in SQL");
        f.pg.sql(&format!(
            "UPDATE nightpass.settings SET error_threshold = {t}, error_window = {w}"
        ));
        return;
    }
    run.ok();
}

/// Volumes that cannot pass (one the receiver does not export, one whose
/// source vanished after `fleet add`) fail, each with its reason and a
/// retry after the policy's backoff; with `--error-threshold 2
/// --error-window 5` the agent recording the second failure pauses the
/// fleet by itself, saying why (`pause_reason`, `paused_by`, a fleet_log
/// 'auto_pause' row), and no pass starts after it.
#[test]
fn the_error_threshold_pauses_the_fleet_by_itself() {
    let test = "fleet_agent::the_error_threshold_pauses_the_fleet_by_itself";
    let Some(f) = Fleet::new(test, &[("fe", 5)], MIB, &["fe-v0"]) else {
        return;
    };
    std::fs::remove_file(f.source("fe-v1")).unwrap();
    set_error_threshold(&f, 2, 5);
    let mut a = f.agent("agent-a", &[]);
    let paused = "SELECT paused::text FROM nightpass.settings";
    f.wait(&mut [&mut a], secs(30), "the fleet paused by itself", |f| {
        f.pg.scalar(paused) == "true"
    });
    // Past --ready-interval: a volume that passed is due again, and waits.
    std::thread::sleep(secs(4));
    assert!(
        a.running(),
        "a paused fleet must not stop its agents\n{}",
        a.output()
    );
    let s = &f.pg.query(
        "SELECT coalesce(pause_reason, ''), coalesce(paused_by, '') FROM nightpass.settings",
    )[0];
    assert!(
        s[0].contains("2 of the last ") && s[0].contains(" passes failed (last: fe/fe-v"),
        "pause_reason {:?}",
        s[0]
    );
    assert_eq!(s[1], "agent-a", "paused_by");
    let log = f.pg.query(
        "SELECT by, coalesce(detail::text, '') FROM nightpass.fleet_log \
         WHERE event = 'auto_pause' ORDER BY id",
    );
    assert_eq!(log.len(), 1, "one 'auto_pause' row in fleet_log: {log:?}");
    assert_eq!(log[0][0], "agent-a", "{log:?}");
    let after = f.pg.query(
        "SELECT v.name, p.agent, p.at FROM nightpass.passes p JOIN nightpass.volumes v \
         ON v.id = p.volume WHERE p.at > \
         (SELECT at FROM nightpass.fleet_log WHERE event = 'auto_pause' ORDER BY id LIMIT 1)",
    );
    assert!(
        after.is_empty(),
        "passes started after the auto pause: {after:#?}"
    );
    let ra = a.stop(libc::SIGTERM);
    assert_stopped_clean(&ra);
    let st = f.fleet(&["status"]);
    let fl = st.only("fleet");
    assert_eq!(fl["paused"], true, "{}", st.context());
    assert_eq!(fl["pause_reason"], s[0].as_str(), "{}", st.context());
    assert_fleet_history(&f.pg, &[]);
    for v in ["fe-v1", "fe-v0"] {
        assert_failed_with_backoff(&f, &ra, v);
    }
}

/// Volume `v` failed once, its failure naming it (in the table and in the
/// agent's `fleet_pass_recorded`), due again `retry_after` (30 s) after
/// its pass ended.
#[track_caller]
fn assert_failed_with_backoff(f: &Fleet, run: &Run, v: &str) {
    let r = &f.pg.query(&format!(
        "SELECT v.state, coalesce(v.failure, ''), v.attempts, \
         extract(epoch FROM v.next_attempt_at - p.ended_at)::float8 \
         FROM nightpass.volumes v JOIN nightpass.passes p ON p.volume = v.id \
         WHERE v.name = '{v}' ORDER BY p.id DESC LIMIT 1"
    ))[0];
    assert_eq!(
        (r[0].as_str(), r[2].as_str()),
        ("failed", "1"),
        "{v}: {r:?}"
    );
    let backoff: f64 = r[3].parse().unwrap();
    assert!(
        (25.0..=35.0).contains(&backoff),
        "{v}: due again {backoff:.1} s after its failure, not after retry_after (30 s)"
    );
    let rec: Vec<&Value> = run
        .all("fleet_pass_recorded")
        .into_iter()
        .filter(|e| e["volume"] == v)
        .collect();
    assert_eq!(rec.len(), 1, "{v}: {}", run.context());
    assert_eq!(rec[0]["ok"], false, "{}", rec[0]);
    assert_eq!(rec[0]["state"], "failed", "{}", rec[0]);
    assert!(
        r[1].contains(v),
        "{v}: its failure does not name it: {:?}",
        r[1]
    );
    assert!(
        rec[0]["failure"].as_str().is_some_and(|m| m.contains(v)),
        "{}",
        rec[0]
    );
}

/// A volume whose source vanished after `fleet add` fails alone, saying
/// so: the other volumes of its filer pass as before.
#[test]
fn a_vanished_source_fails_its_volume_alone() {
    let test = "fleet_agent::a_vanished_source_fails_its_volume_alone";
    let Some(f) = Fleet::new(test, &[("fv", 3)], MIB, &[]) else {
        return;
    };
    std::fs::remove_file(f.source("fv-v1")).unwrap();
    let mut a = f.agent("agent-a", &[]);
    f.wait(
        &mut [&mut a],
        secs(30),
        "fv-v1 failed, the others ready",
        |f| {
            f.states().iter().all(|(v, s)| match v.as_str() {
                "fv-v1" => s == "failed",
                _ => s == "ready",
            })
        },
    );
    let ra = a.stop(libc::SIGTERM);
    assert_stopped_clean(&ra);
    let failure =
        f.pg.scalar("SELECT failure FROM nightpass.volumes WHERE name = 'fv-v1'");
    let source = f.source("fv-v1").display().to_string();
    assert!(failure.contains(&source), "fv-v1's failure: {failure:?}");
    for v in ["fv-v0", "fv-v2"] {
        assert_same_file(&f.source(v), &f.target(v));
    }
    assert_fleet_history(&f.pg, &[]);
}

/// Two agents of three jobs each pass twelve small volumes of two filers
/// again and again (`--ready-interval 200ms`), so volumes hop from agent
/// to agent: the history never shows one volume held by two agents at
/// once, and fencing tokens only grow. The passes per minute they
/// sustain are a `figure:` line.
#[test]
fn no_volume_is_ever_held_by_two_agents_at_once() {
    let test = "fleet_agent::no_volume_is_ever_held_by_two_agents_at_once";
    let Some(f) = Fleet::new(test, &[("fh", 6), ("fi", 6)], MIB, &[]) else {
        return;
    };
    let flags = ["--jobs", "3", "--ready-interval", "200ms"];
    let (mut a, mut b) = (f.agent("agent-a", &flags), f.agent("agent-b", &flags));
    let ok = "SELECT count(*) FROM nightpass.passes WHERE ok";
    f.wait(&mut [&mut a, &mut b], secs(60), "48 passes", |f| {
        f.count(ok) >= 48
    });
    let (ra, rb) = (a.stop(libc::SIGTERM), b.stop(libc::SIGTERM));
    assert_stopped_clean(&ra);
    assert_stopped_clean(&rb);
    let span = f.pg.query(
        "SELECT count(*), extract(epoch FROM max(ended_at) - min(at))::float8 \
         FROM nightpass.passes WHERE ok",
    );
    let (n, s): (f64, f64) = (span[0][0].parse().unwrap(), span[0][1].parse().unwrap());
    println!(
        "figure: two agents (3 jobs each), 12 volumes of 1 MiB on two filers: \
         {n} passes in {s:.1} s, {:.0} passes per minute",
        n * 60.0 / s
    );
    let hopped = f.count(
        "SELECT count(*) FROM (SELECT volume FROM nightpass.passes \
         GROUP BY volume HAVING count(DISTINCT agent) > 1) t",
    );
    assert!(
        hopped >= 1,
        "no volume was passed by both agents: the test proves nothing\n{}",
        f.dump()
    );
    assert_pass_ends_recorded(&f.pg, &[("agent-a", &ra), ("agent-b", &rb)]);
    assert_fleet_history(&f.pg, &[]);
}

/// PostgreSQL stopped (as a crash) under two agents in the middle of
/// their passes, and started again 5 s later: the agents keep running,
/// the passes that ended meanwhile are recorded when it is back (every
/// pass_end in nightpass.passes, once, with its pass number and bytes
/// sent; the spool emptied), and every volume gets ready.
#[test]
fn postgres_restarted_under_running_agents_loses_nothing() {
    let test = "fleet_agent::postgres_restarted_under_running_agents_loses_nothing";
    let Some(f) = Fleet::new(test, &[("ga", 3), ("gb", 3)], 4 * MIB, &[]) else {
        return;
    };
    // 4 MiB at 2 MiB/s: 2 s a pass, well within the 5 s outage; a 10 s
    // lease outlives it (an agent drops a pass past 90% of it unrenewed).
    let flags = ["--jobs", "2", "--bwlimit", "2M", "--lease", "10s"];
    let (mut a, mut b) = (f.agent("agent-a", &flags), f.agent("agent-b", &flags));
    f.wait(
        &mut [&mut a, &mut b],
        secs(30),
        "four passes in flight",
        |f| f.count("SELECT count(*) FROM nightpass.passes WHERE ok IS NULL") >= 4,
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = a.pass_ends() + b.pass_ends();
    f.pg.stop();
    std::thread::sleep(secs(5));
    let during = a.pass_ends() + b.pass_ends() - before;
    let spooled = spool(&a.state).len() + spool(&b.state).len();
    let running = a.running() && b.running();
    let both = format!("{}\n{}", a.output(), b.output());
    assert!(running, "an agent exited with the database down\n{both}");
    f.pg.pg_ctl_start();
    assert!(
        during >= 1,
        "no pass ended while the database was down: nothing was spooled\n{both}"
    );
    assert!(
        spooled >= during,
        "{during} passes ended with the database down, {spooled} records spooled\n{both}"
    );
    println!("figure: {during} passes ended while PostgreSQL was down for 5 s");
    f.wait_all(&mut [&mut a, &mut b], secs(90), &["ready"]);
    let (ra, rb) = (a.stop(libc::SIGTERM), b.stop(libc::SIGTERM));
    assert_stopped_clean(&ra);
    assert_stopped_clean(&rb);
    assert_pass_ends_recorded(&f.pg, &[("agent-a", &ra), ("agent-b", &rb)]);
    for dir in [&a.state, &b.state] {
        let left = spool(dir);
        assert!(left.is_empty(), "records left in the spool: {left:?}");
    }
    assert_fleet_history(&f.pg, &[]);
}

/// The files in an agent's spool (`STATE_DIR/fleet-spool/`).
fn spool(state: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(state.join("fleet-spool"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}
