//! The operator's controls and view of the fleet against a private
//! PostgreSQL: `fleet limits` (set, shown, refused with nothing changed),
//! the red button's rows in `nightpass.fleet_log`, `fleet resume` making
//! failed volumes due again (and failed nights), a second pause keeping
//! the first's reason, and `fleet status`'s `fleet_filer` lines, leases and
//! nights whose agent was lost.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{events, expect, fleet, init, plan};
use crate::harness::*;

/// The rows of `sql` (each column cast to text by the query) read through
/// nightpass's own pool, as an operator's `psql` would show them.
fn query(db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    use nightpass::fleet::{DbSettings, Pool};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = DbSettings::resolve(Some(db), Duration::from_secs(5), Duration::from_secs(10));
        let pool = Pool::new(s.unwrap(), 1);
        let conn = pool.get().await.unwrap();
        let rows = conn.query(sql, &[]).await.unwrap();
        rows.iter()
            .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
            .collect()
    })
}

/// `nightpass fleet ARGS` without `--json`: (exit status, stdout).
fn human(db: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .arg("fleet")
        .args(args)
        .env("NIGHTPASS_DB", db)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), stdout)
}

/// The one `fleet_limits` event of `fleet limits ARGS` (exit 0).
fn limits(db: &str, args: &[&str]) -> Value {
    let mut all = vec!["limits"];
    all.extend_from_slice(args);
    let run = fleet(db, &all);
    expect(&run, 0);
    let e = events(&run, "fleet_limits");
    assert_eq!(e.len(), 1, "{}", run.context());
    assert!(e[0]["ts"].is_string());
    e[0].clone()
}

/// The `fleet_log` rows: (event, by, detail).
fn fleet_log(db: &str) -> Vec<(String, String, Value)> {
    query(
        db,
        "SELECT event, by, detail::text FROM nightpass.fleet_log ORDER BY at, id",
    )
    .into_iter()
    .map(|r| {
        let detail = r[2]
            .as_deref()
            .map_or(Value::Null, |d| serde_json::from_str(d).unwrap());
        (r[0].clone().unwrap(), r[1].clone().unwrap(), detail)
    })
    .collect()
}

/// A private PostgreSQL with the schema and `filers` (name, volumes) added
/// on host `h1`, and the directory of their plans and images.
pub(super) fn fleet_of(
    test: &str,
    filers: &[(&str, usize)],
) -> Option<(Postgres, tempfile::TempDir)> {
    let pg = Postgres::start(test)?;
    let db = pg.url();
    let dir = scratch();
    init(&db);
    for (name, n) in filers {
        let p = plan(dir.path(), name, *n);
        expect(
            &fleet(&db, &["add", p.to_str().unwrap(), "--host", "h1"]),
            0,
        );
    }
    Some((pg, dir))
}

#[test]
fn limits_are_set_shown_logged_and_refused_whole() {
    let Some((pg, _dir)) = fleet_of("fleet::controls::limits_are_set_shown_logged", &[]) else {
        return;
    };
    let db = pg.url();
    // Nothing given: the defaults, nothing changed, nothing logged.
    let l = limits(&db, &[]);
    for k in [
        "max_passes",
        "max_passes_per_filer",
        "max_passes_per_host",
        "max_passes_per_receiver",
    ] {
        assert!(l[k].is_null(), "{k}: {l}");
    }
    assert_eq!(
        (
            &l["error_threshold"],
            &l["error_window"],
            &l["max_attempts"]
        ),
        (&Value::from(3), &Value::from(10), &Value::from(5)),
        "{l}"
    );
    assert_eq!(l["retry_after_s"], 30.0);
    assert_eq!(l["changed"], serde_json::json!({}));
    assert!(fleet_log(&db).is_empty());

    let l = limits(
        &db,
        &[
            "--max-passes",
            "8",
            "--per-host",
            "2",
            "--retry-after",
            "1m",
        ],
    );
    assert_eq!(
        (&l["max_passes"], &l["max_passes_per_host"]),
        (&8.into(), &2.into())
    );
    assert_eq!(l["retry_after_s"], 60.0);
    let changed = l["changed"].as_object().unwrap();
    assert_eq!(changed.len(), 3, "{l}");
    assert_eq!(changed["max_passes_per_host"]["from"], Value::Null);
    assert_eq!(changed["max_passes_per_host"]["to"], 2);
    let log = fleet_log(&db);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].0, "limits");
    assert!(log[0].1.starts_with("fleet limits on "), "{log:?}");
    assert_eq!(log[0].2["max_passes"]["to"], 8);

    // An error window shorter than the threshold: exit 2, nothing changed,
    // even the valid flags given with it.
    let before = query(&db, "SELECT row_to_json(s)::text FROM nightpass.settings s");
    let run = fleet(
        &db,
        &["limits", "--max-passes", "3", "--error-threshold", "12"],
    );
    expect(&run, 2);
    assert!(run.stderr.contains("error window"), "{}", run.context());
    assert!(events(&run, "fleet_limits").is_empty());
    for bad in [
        &["--max-attempts", "0"][..],
        &["--error-window", "0"],
        &["--per-filer", "-1"],
    ] {
        let mut args = vec!["limits"];
        args.extend_from_slice(bad);
        expect(&fleet(&db, &args), 2);
    }
    assert_eq!(
        query(&db, "SELECT row_to_json(s)::text FROM nightpass.settings s"),
        before
    );
    assert_eq!(fleet_log(&db).len(), 1);

    // Both together are fine; 0 lifts a cap; the same values again log nothing.
    let l = limits(
        &db,
        &[
            "--error-threshold",
            "12",
            "--error-window",
            "20",
            "--max-passes",
            "0",
        ],
    );
    assert_eq!(
        (&l["error_threshold"], &l["error_window"]),
        (&12.into(), &20.into())
    );
    assert!(l["max_passes"].is_null());
    let l = limits(&db, &["--error-window", "20"]);
    assert_eq!(l["changed"], serde_json::json!({}));
    assert_eq!(fleet_log(&db).len(), 2);
    // `fleet status` shows them too, and the human table names them.
    let run = fleet(&db, &["status"]);
    let lim = &events(&run, "fleet")[0]["limits"];
    assert_eq!(lim["error_threshold"], 12, "{}", run.context());
    assert_eq!(lim["max_passes_per_host"], 2);
    let (code, text) = human(&db, &["limits"]);
    assert_eq!(code, 0);
    assert!(text.contains("passes in flight per host"), "{text}");
    assert!(
        text.contains("12 failures among the last 20 passes"),
        "{text}"
    );
}

#[test]
fn pause_and_resume_are_logged_and_resume_retries_failed_volumes() {
    let Some((pg, _dir)) = fleet_of(
        "fleet::controls::pause_and_resume_are_logged",
        &[("filer3", 3)],
    ) else {
        return;
    };
    let db = pg.url();
    // v0 used up its attempts, v1 waits for its next one, v2 is pending.
    pg.sql(
        "UPDATE nightpass.volumes SET state = 'failed', failure = 'receiver refused', \
         attempts = CASE name WHEN 'v0' THEN 5 ELSE 1 END, \
         next_attempt_at = now() + interval '1 day' WHERE name IN ('v0', 'v1')",
    );
    let run = fleet(&db, &["pause", "--reason", "receiver maintenance"]);
    expect(&run, 0);
    let (code, text) = human(&db, &["status"]);
    assert_eq!(code, 0);
    let first = text.lines().next().unwrap_or("");
    assert!(first.starts_with("PAUSED at "), "{text}");
    assert!(first.contains("by fleet pause on "), "{text}");
    assert!(first.contains("receiver maintenance"), "{text}");
    // v0 had its last attempt: the operator is told it waits for them.
    let v0 = text.lines().find(|l| l.trim_start().starts_with("v0"));
    assert!(
        v0.is_some_and(|l| l.contains("waits for `fleet resume`")),
        "{text}"
    );

    let run = fleet(&db, &["resume"]);
    expect(&run, 0);
    let r = events(&run, "fleet_resumed")[0];
    assert_eq!(r["was_paused"], true, "{}", run.context());
    assert_eq!(
        (&r["retried_volumes"], &r["fresh_attempts"]),
        (&2.into(), &1.into())
    );
    let rows = query(
        &db,
        "SELECT name, state, attempts::text, (next_attempt_at <= now())::text \
         FROM nightpass.volumes ORDER BY name",
    );
    let at = |i: usize| {
        rows[i]
            .iter()
            .map(|c| c.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(at(0), ["v0", "failed", "0", "true"], "{rows:?}");
    assert_eq!(at(1), ["v1", "failed", "1", "true"], "{rows:?}");
    assert_eq!(at(2)[1], "pending");

    let log = fleet_log(&db);
    let kinds: Vec<&str> = log.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(kinds, ["pause", "resume"], "{log:?}");
    assert_eq!(log[0].2["reason"], "receiver maintenance");
    assert!(log[0].1.starts_with("fleet pause on "), "{log:?}");
    assert_eq!(log[1].2["retried_volumes"], 2);
    assert!(log[1].1.starts_with("fleet resume on "), "{log:?}");
    // Nothing failed any more to retry; a resume of a running fleet says so.
    pg.sql("UPDATE nightpass.volumes SET state = 'converging', failure = NULL");
    let (code, text) = human(&db, &["resume"]);
    assert_eq!(code, 0);
    assert!(text.contains("was not paused"), "{text}");
    assert_eq!(fleet_log(&db).len(), 3);
    // The pause's time in settings is its log row's time.
    expect(&fleet(&db, &["pause"]), 0);
    let same = query(
        &db,
        "SELECT (s.paused_at = l.at)::text FROM nightpass.settings s, \
         (SELECT at FROM nightpass.fleet_log WHERE event = 'pause' ORDER BY id DESC LIMIT 1) l",
    );
    assert_eq!(same[0][0].as_deref(), Some("true"));
}

#[test]
fn status_shows_each_filer_before_its_volumes() {
    let Some((pg, _dir)) = fleet_of(
        "fleet::controls::status_shows_each_filer",
        &[("fa", 2), ("fb", 1)],
    ) else {
        return;
    };
    let db = pg.url();
    pg.sql(
        "UPDATE nightpass.volumes SET state = CASE name WHEN 'v0' THEN 'ready' ELSE 'converging' END \
         WHERE filer = 'fa'; \
         UPDATE nightpass.volumes SET state = 'failed', failure = 'disk gone' WHERE filer = 'fb'; \
         UPDATE nightpass.filers SET night_note = 'v1 is not ready (forecast 90 s)', \
         night_note_at = now() WHERE name = 'fa'; \
         INSERT INTO nightpass.schedules (filer, at, window_len) \
         VALUES ('fa', now() - interval '10 minutes', interval '2 hours'); \
         INSERT INTO nightpass.passes (volume, agent, token, seq, ok, at, ended_at) \
         SELECT id, 'a1', 1, s, CASE WHEN s < 3 THEN true WHEN s = 3 THEN false END, now() - interval '1 hour', \
         CASE WHEN s < 4 THEN '2026-11-01T00:00:0' || s || 'Z' END::timestamptz \
         FROM nightpass.volumes, generate_series(1, 4) s WHERE filer = 'fa' AND name = 'v0'; \
         INSERT INTO nightpass.leases (volume, agent, expires_at, in_pass) \
         SELECT id, 'a1', now() + interval '1 hour', true FROM nightpass.volumes \
         WHERE filer = 'fa' AND name = 'v0'",
    );
    let run = fleet(&db, &["status"]);
    expect(&run, 0);
    let order: Vec<String> = run
        .events
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["event"].as_str().unwrap(),
                e["filer"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            "fleet:",
            "fleet_filer:fa",
            "fleet_volume:fa",
            "fleet_volume:fa",
            "fleet_filer:fb",
            "fleet_volume:fb"
        ],
        "{}",
        run.context()
    );
    let filers = events(&run, "fleet_filer");
    let fa = filers[0];
    assert_eq!(
        (&fa["state"], &fa["volumes"]),
        (&"converging".into(), &2.into()),
        "{fa}"
    );
    assert_eq!(fa["host"], "h1", "{fa}");
    assert!(
        fa["receiver"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{fa}"
    );
    assert_eq!(fa["window_open"], true, "{fa}");
    assert_eq!(fa["window_s"], 7200.0);
    assert!(fa["window_at"].is_string());
    assert_eq!(fa["night_note"], "v1 is not ready (forecast 90 s)");
    assert!(fa["night_note_at"].is_string());
    assert!(fa["group_point"].is_null() && fa["cut_over_at"].is_null());
    assert_eq!(filers[1]["state"], "failed");
    assert_eq!(filers[1]["window_open"], false);
    assert!(filers[1]["window_at"].is_null());
    let v0 = events(&run, "fleet_volume")[0];
    // Four passes: two succeeded, one failed, one still running.
    assert_eq!(v0["passes"], 2, "{v0}");
    assert_eq!(v0["last_pass_at"], "2026-11-01T00:00:03Z");
    assert_eq!((&v0["in_pass"], &v0["agent"]), (&true.into(), &"a1".into()));
    let v1 = events(&run, "fleet_volume")[1];
    assert_eq!(
        (&v1["in_pass"], &v1["last_pass_at"]),
        (&false.into(), &Value::Null)
    );

    // Cut over: the group's point and time.
    pg.sql(
        "UPDATE nightpass.volumes SET state = 'cut_over', consistency_point = 'ab' WHERE filer = 'fa'; \
         UPDATE nightpass.filers SET group_point = 'c0ffee', cut_over_at = now() WHERE name = 'fa'",
    );
    let run = fleet(&db, &["status"]);
    let fa = events(&run, "fleet_filer")[0];
    assert_eq!(fa["state"], "cut_over", "{}", run.context());
    assert_eq!(fa["group_point"], "c0ffee");
    assert!(fa["cut_over_at"].is_string());
    let (code, text) = human(&db, &["status"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("fa (h1"))
        .expect(&text);
    assert!(
        lines[at].contains("cut over") && lines[at].contains("c0ffee"),
        "{text}"
    );
    assert!(lines[at + 1].trim_start().starts_with("v0"), "{text}");
}

#[test]
fn a_second_pause_keeps_the_first_unless_it_gives_a_reason() {
    let Some((pg, _dir)) = fleet_of("fleet::controls::a_second_pause_keeps_the_first", &[]) else {
        return;
    };
    let db = pg.url();
    let pressed = "SELECT pause_reason, paused_at::text, paused_by FROM nightpass.settings";
    expect(&fleet(&db, &["pause", "--reason", "array alarm"]), 0);
    let first = pg.query(pressed);
    let run = fleet(&db, &["pause"]);
    expect(&run, 0);
    let e = events(&run, "fleet_paused")[0];
    assert_eq!(
        (&e["was_paused"], &e["reason"]),
        (&true.into(), &"array alarm".into()),
        "{e}"
    );
    assert!(
        e["paused_by"]
            .as_str()
            .unwrap()
            .starts_with("fleet pause on "),
        "{e}"
    );
    assert!(e["paused_at"].is_string(), "{e}");
    assert_eq!(
        pg.query(pressed),
        first,
        "a pause without a reason changed the first"
    );
    let (code, text) = human(&db, &["pause"]);
    assert_eq!(code, 0);
    assert!(text.contains("already paused"), "{text}");
    assert!(
        text.contains("by fleet pause on ") && text.contains("array alarm"),
        "{text}"
    );
    // A new reason replaces the reason only.
    expect(&fleet(&db, &["pause", "--reason", "receiver moved"]), 0);
    let now = pg.query(pressed);
    assert_eq!(now[0][0], "receiver moved");
    assert_eq!(now[0][1..], first[0][1..]);
    let log = fleet_log(&db);
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!(log[1].2["was_paused"], true, "{log:?}");
    assert_eq!(log[1].2["reason"], "array alarm", "{log:?}");
}

#[test]
fn resume_lets_failed_nights_be_tried_again() {
    let Some((pg, _dir)) = fleet_of(
        "fleet::controls::resume_lets_failed_nights",
        &[("na", 1), ("nb", 1), ("nc", 1)],
    ) else {
        return;
    };
    let db = pg.url();
    pg.sql(
        "UPDATE nightpass.filers SET night_failures = 5, night_retry_at = now() + interval '1 day' \
         WHERE name = 'na'; \
         UPDATE nightpass.filers SET night_failures = 1, night_retry_at = now() + interval '1 minute' \
         WHERE name = 'nb'",
    );
    let run = fleet(&db, &["resume"]);
    expect(&run, 0);
    let r = events(&run, "fleet_resumed")[0];
    assert_eq!(r["retried_nights"], 2, "{}", run.context());
    assert_eq!(
        pg.scalar(
            "SELECT count(*) FROM nightpass.filers \
             WHERE night_failures = 0 AND night_retry_at IS NULL"
        ),
        "3"
    );
    assert_eq!(fleet_log(&db)[0].2["retried_nights"], 2);
    let (_, text) = human(&db, &["resume"]);
    assert!(!text.contains("night"), "nothing to retry: {text}");
}

#[test]
fn status_shows_leases_running_out_and_a_night_whose_agent_was_lost() {
    let Some((pg, _dir)) = fleet_of(
        "fleet::controls::status_shows_leases_running_out",
        &[("fa", 2), ("fb", 1), ("fc", 1)],
    ) else {
        return;
    };
    let db = pg.url();
    pg.sql(
        "UPDATE nightpass.volumes SET state = 'failed', failure = 'disk gone', attempts = 5, \
         next_attempt_at = now() + interval '1 day' WHERE filer = 'fa' AND name = 'v0'; \
         UPDATE nightpass.volumes SET state = 'converging' WHERE filer = 'fa' AND name = 'v1'; \
         UPDATE nightpass.filers SET night_failures = 2, night_retry_at = now() + interval '10 minutes' \
         WHERE name = 'fa'; \
         UPDATE nightpass.volumes SET state = 'cutting_over' WHERE filer IN ('fb', 'fc'); \
         INSERT INTO nightpass.leases (volume, agent, expires_at, in_pass) \
         SELECT id, CASE filer WHEN 'fa' THEN 'a1' WHEN 'fb' THEN 'a2' ELSE 'a3' END, \
         now() + CASE filer WHEN 'fb' THEN interval '-5 seconds' ELSE interval '30 seconds' END, \
         filer = 'fa' FROM nightpass.volumes WHERE name = 'v1' OR filer <> 'fa'",
    );
    let run = fleet(&db, &["status"]);
    expect(&run, 0);
    let filers = events(&run, "fleet_filer");
    let vols = events(&run, "fleet_volume");
    let (v0, v1) = (vols[0], vols[1]);
    assert_eq!(v0["waits_for_resume"], true, "{v0}");
    assert!(v0["next_attempt_at"].is_string(), "{v0}");
    assert!(v0["lease_expires_at"].is_null(), "{v0}");
    assert_eq!(v1["waits_for_resume"], false, "{v1}");
    assert!(v1["lease_expires_at"].is_string(), "{v1}");
    assert_eq!(
        (&filers[0]["night_failures"], &filers[0]["night_agent_lost"]),
        (&2.into(), &false.into())
    );
    assert!(filers[0]["night_retry_at"].is_string(), "{}", filers[0]);
    // fb's agent died in its night; fc's still holds its volume.
    assert_eq!(filers[1]["night_agent_lost"], true, "{}", filers[1]);
    assert!(vols[2]["agent"].is_null() && vols[2]["lease_expires_at"].is_null());
    assert_eq!(filers[2]["night_agent_lost"], false, "{}", filers[2]);
    assert!(filers[2]["night_retry_at"].is_null());
    let (_, text) = human(&db, &["status"]);
    let line = |start: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("{start}: {text}"))
            .to_string()
    };
    let lost = "its night's agent was lost: see docs/CLI.md 'An agent lost during a night'";
    assert!(line("fb (").contains(lost), "{text}");
    assert!(!line("fc (").contains(lost), "{text}");
    assert!(
        line("v1").contains("in a pass by a1 (lease ends in "),
        "{text}"
    );
}
