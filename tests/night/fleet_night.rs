//! The fleet's nights and the agent's own behaviour, against a private
//! PostgreSQL, a real receiver and real agents: two live ext4 volumes cut
//! over by their agent when their window opens (frozen by their mounts,
//! every file intact, sealed, the points in the database equal to the
//! receiver's); a night that is not ready freezes nothing and says why; a
//! night whose freeze fails certifies nothing and is not tried again at
//! once; the per-host cap holds across two agents; SIGTERM lets a pass
//! end and exits 0, two SIGINTs drop it and exit 130.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::cutover::{assert_image_intact, assert_writable, seed_files, Fs, Load, Writer, TOOLS};
use crate::harness::*;

/// `nightpass --json fleet ARGS` against `db`.
fn fleet(db: &str, args: &[&str]) -> Run {
    let mut c = Command::new(bin());
    c.args(["--json", "fleet"])
        .args(args)
        .env("NIGHTPASS_DB", db);
    run_command(c)
}

/// Rows of `sql` as text columns (psql's unaligned output).
fn query(pg: &Postgres, sql: &str) -> Vec<Vec<String>> {
    let out = Command::new("psql")
        .args(["-XAtq", "-F", "\t", "-v", "ON_ERROR_STOP=1"])
        .arg(pg.url())
        .args(["-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// The one value `sql` returns.
fn one(pg: &Postgres, sql: &str) -> String {
    let rows = query(pg, sql);
    assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
    rows[0][0].clone()
}

/// `now + secs` in RFC 3339 (UTC), for `fleet schedule --at`.
fn at_in(secs: i64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("{secs:+} sec"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `nightpass --json fleet agent` for host `h` as `sender`, in its own
/// state directory `state`, with short leases and polls.
fn agent(db: &str, sender: &SenderSide, state: &Path, name: &str, extra: &[&str]) -> Spawned {
    let mut c = Command::new(bin());
    c.args(["--json", "fleet", "agent", "--host", "h", "--name", name]);
    c.arg("--identity").arg(&sender.id.dir);
    c.arg("--state-dir").arg(state);
    c.args(["--lease", "4s", "--poll", "300ms", "--interval", "0s"]);
    c.args(extra).env("NIGHTPASS_DB", db);
    Spawned::start(c)
}

/// A plan of image volumes `names` (each `size` random bytes in `root`)
/// for receiver `rx`, with the filer lines `filer`.
fn image_plan(root: &Path, rx: &Receiver, names: &[&str], size: u64, filer: &str) -> PathBuf {
    let mut text = format!(
        "receiver = \"127.0.0.1:{}\"\nserver_fingerprint = \"{}\"\n{filer}\n",
        rx.port, rx.fp
    );
    for (i, n) in names.iter().enumerate() {
        let src = root.join(format!("{n}.img"));
        random_file(&src, size, 4100 + i as u64);
        text.push_str(&format!(
            "\n[[volume]]\nname = \"{n}\"\nsource = \"{}\"\n",
            src.display()
        ));
    }
    let path = root.join("filer.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A receiver exporting `names` into `root/target-NAME.img` for `sender`.
fn receiver(root: &Path, sender: &SenderSide, names: &[&str]) -> Receiver {
    let rid = keygen(root, "r-id");
    let targets: Vec<(String, PathBuf)> = names
        .iter()
        .map(|n| (n.to_string(), root.join(format!("target-{n}.img"))))
        .collect();
    let vols: Vec<(&str, &Path)> = targets
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    Receiver::start(&rid, &root.join("r-state"), &vols, &[&sender.id.fp], 0)
}

/// `fleet init` and `fleet add PLAN --host h`.
fn register(db: &str, plan: &Path) {
    let r = fleet(db, &["init"]);
    assert_eq!(r.code, 0, "{}", r.context());
    let r = fleet(db, &["add", plan.to_str().unwrap(), "--host", "h"]);
    assert_eq!(r.code, 0, "{}", r.context());
}

/// Waits until `sql` returns `want`, or fails saying what it returned.
fn wait_value(pg: &Postgres, sql: &str, want: &str, limit: Duration, agents: &[&Spawned]) {
    let mut last = String::new();
    if !wait_for(limit, || {
        last = query(pg, sql)
            .first()
            .map(|r| r[0].clone())
            .unwrap_or_default();
        last == want
    }) {
        let logs: Vec<String> = agents
            .iter()
            .map(|a| format!("{}\n{}", a.stdout(), a.stderr()))
            .collect();
        panic!(
            "{sql}: {last:?}, not {want:?} within {limit:?}\n{}",
            logs.join("\n---\n")
        );
    }
}

/// A whole filer of two live ext4 volumes, each frozen by its own mount:
/// the agent converges them, and when their window opens cuts them over
/// (every file intact, both thawed and sealed), recording in the database
/// the receiver's consistency points and the group's.
#[test]
fn a_fleet_night_cuts_over_live_ext4_volumes_frozen_by_their_mounts() {
    let test = "fleet_night::a_fleet_night_cuts_over_live_ext4_volumes";
    if !need_root(test, TOOLS) {
        return;
    }
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    let root = dir.path();
    let (a, b) = (Fs::new(root, "a"), Fs::new(root, "b"));
    let sender = SenderSide::new(root, "s");
    let rx = receiver(root, &sender, &["a", "b"]);
    let plan = root.join("filer01.toml");
    let mut text = format!(
        "receiver = \"127.0.0.1:{}\"\nserver_fingerprint = \"{}\"\njobs = 2\n",
        rx.port, rx.fp
    );
    for (n, fs) in [("a", &a), ("b", &b)] {
        seed_files(&fs.data(), 8, 256 << 10, 500 + n.len() as u64);
        text.push_str(&format!(
            "\n[[volume]]\nname = \"{n}\"\nsource = \"{}\"\nfsfreeze = \"{}\"\n",
            fs.lo.dev.display(),
            fs.dir().display()
        ));
    }
    std::fs::write(&plan, text).unwrap();
    register(&db, &plan);
    let mut writers: Vec<Writer> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, fs)| {
            Writer::start(
                fs.dir(),
                Load::Files {
                    live_limit: 8 << 20,
                },
                520 + i as u64,
            )
        })
        .collect();
    let r = fleet(
        &db,
        &["schedule", "filer01", "--at", &at_in(12), "--window", "10m"],
    );
    assert_eq!(r.code, 0, "{}", r.context());
    let state = root.join("agent-state");
    let ag = agent(&db, &sender, &state, "a1", &["--ready-interval", "1s"]);
    let done = ag.wait_for_event("fleet_cut_over", Duration::from_secs(120));
    for w in &mut writers {
        w.stop();
    }
    // The database holds what the receiver journaled.
    let rows = query(
        &pg,
        "SELECT name, state, consistency_point FROM nightpass.volumes ORDER BY name",
    );
    let mut bytes = Vec::new();
    for (row, name) in rows.iter().zip(["a", "b"]) {
        assert_eq!(
            (row[0].as_str(), row[1].as_str()),
            (name, "cut_over"),
            "{rows:?}"
        );
        let journal =
            std::fs::read_to_string(rx.state.join("volumes").join(name).join("journal.jsonl"))
                .unwrap();
        let last: Value = serde_json::from_str(journal.lines().last().unwrap()).unwrap();
        assert_eq!(last["consistency_point"], row[2].as_str(), "{last}");
        bytes.extend(data_encoding::HEXLOWER.decode(row[2].as_bytes()).unwrap());
    }
    let group = blake3::hash(&bytes).to_hex().to_string();
    assert_eq!(done["consistency_point"], group.as_str(), "{done}");
    assert_eq!(one(&pg, "SELECT group_point FROM nightpass.filers"), group);
    // Each volume walked the state machine to its end.
    for name in ["a", "b"] {
        let path: Vec<String> = query(
            &pg,
            &format!(
                "SELECT to_state FROM nightpass.history h JOIN nightpass.volumes v ON v.id = h.volume \
                 WHERE v.name = '{name}' ORDER BY h.id"
            ),
        )
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
        assert_eq!(path[..3], ["pending", "copying", "converging"], "{path:?}");
        assert_eq!(
            path[path.len() - 2..],
            ["cutting_over", "cut_over"],
            "{path:?}"
        );
    }
    for (i, name) in ["a", "b"].iter().enumerate() {
        assert_image_intact(
            root,
            &root.join(format!("target-{name}.img")),
            &format!("copy{i}"),
        );
    }
    for fs in [&a, &b] {
        assert_writable(
            fs.dir(),
            "after-fleet-night",
            "the night must thaw every volume",
        );
    }
    // Sealed: a pass by hand is refused; the agent claims nothing more.
    let again = sender.run("sync", &a.lo.dev, &rx.dest("a"), &rx.fp, &[]);
    assert_eq!(
        again.code,
        2,
        "a cut-over volume took a pass: {}",
        again.context()
    );
    ag.signal(libc::SIGTERM);
    let end = ag.finish(Duration::from_secs(30));
    assert_eq!(end.code, 0, "{}", end.context());
}

/// A night whose forecast cannot fit (an absurd margin) freezes nothing:
/// no volume leaves `converging`, the filer's night note and a
/// `fleet_night` event say why, and the targets stay open to passes.
#[test]
fn a_night_that_is_not_ready_freezes_nothing_and_says_why() {
    let test = "fleet_night::a_night_that_is_not_ready_freezes_nothing";
    let Some(f) = Setup::start(test, &["x", "y"], 2 << 20, "assume_frozen = true") else {
        return;
    };
    let (pg, db, root, sender, rx) = (&f.pg, f.db.as_str(), f.root(), &f.sender, &f.rx);
    let r = fleet(
        db,
        &["schedule", "filer", "--at", &at_in(-1), "--window", "30s"],
    );
    assert_eq!(r.code, 0, "{}", r.context());
    let state = root.join("agent-state");
    let ag = agent(
        db,
        sender,
        &state,
        "a1",
        &["--margin", "1000000", "--ready-interval", "1s"],
    );
    wait_value(
        pg,
        "SELECT count(*) >= 2 FROM nightpass.passes WHERE ok AND record->>'forecast_final_pass_s' IS NOT NULL",
        "t",
        Duration::from_secs(30),
        &[&ag],
    );
    let night = ag.wait_for_event("fleet_night", Duration::from_secs(10));
    assert_eq!(night["ready"], false, "{night}");
    assert!(
        night["reason"].as_str().unwrap().contains("not ready"),
        "{night}"
    );
    let note = one(pg, "SELECT night_note FROM nightpass.filers");
    assert!(note.contains("nothing frozen"), "{note}");
    ag.signal(libc::SIGTERM);
    assert_eq!(ag.finish(Duration::from_secs(30)).code, 0);
    assert_eq!(
        one(
            pg,
            "SELECT count(*) FROM nightpass.history WHERE to_state = 'cutting_over'"
        ),
        "0"
    );
    let pass = sender.run("sync", &root.join("x.img"), &rx.dest("x"), &rx.fp, &[]);
    assert_eq!(pass.code, 0, "the target was sealed: {}", pass.context());
}

/// A night whose freeze fails (the filer's `pre` exits 3): `post` runs,
/// no volume is certified or sealed, the volume it failed in is `failed`
/// with the reason and waits for its retry (the night is not tried again
/// at once), and the filer's night note says why.
#[test]
fn a_failing_night_certifies_nothing_and_waits_for_its_retry() {
    let test = "fleet_night::a_failing_night_certifies_nothing";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    let root = dir.path();
    let sender = SenderSide::new(root, "s");
    let rx = receiver(root, &sender, &["x", "y"]);
    let marker = root.join("post-ran");
    let filer = format!("pre = \"exit 3\"\npost = \"touch {}\"", marker.display());
    let plan = image_plan(root, &rx, &["x", "y"], 2 << 20, &filer);
    register(&db, &plan);
    let r = fleet(
        &db,
        &["schedule", "filer", "--at", &at_in(3), "--window", "10m"],
    );
    assert_eq!(r.code, 0, "{}", r.context());
    let state = root.join("agent-state");
    let ag = agent(&db, &sender, &state, "a1", &["--ready-interval", "1s"]);
    // The night ran once and failed: back to `ready`, the volume the
    // freeze failed in (the filer's pre, applied with the first) `failed`.
    wait_value(
        &pg,
        "SELECT count(*) FROM nightpass.history WHERE from_state = 'cutting_over'",
        "2",
        Duration::from_secs(60),
        &[&ag],
    );
    // Three seconds on: not frozen again (the failed volume's retry waits
    // 30 s, and a night waits for every volume to be ready).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        one(
            &pg,
            "SELECT count(*) FROM nightpass.history WHERE to_state = 'cutting_over'"
        ),
        "2"
    );
    let rows = query(
        &pg,
        "SELECT name, state, failure, consistency_point FROM nightpass.volumes ORDER BY name",
    );
    assert_eq!(rows[0][1], "failed", "{rows:?}");
    assert!(rows[0][2].contains("pre"), "{rows:?}");
    assert!(
        rows.iter().all(|r| r[1] != "cut_over" && r[3].is_empty()),
        "{rows:?}"
    );
    assert!(marker.exists(), "post did not run after a failing pre");
    // The night note says why the filer waits: the failure, with its reason.
    let note = one(&pg, "SELECT night_note FROM nightpass.filers");
    assert!(note.contains("failed") && note.contains("pre"), "{note}");
    assert_eq!(
        one(
            &pg,
            "SELECT count(*) FROM nightpass.filers WHERE cut_over_at IS NULL"
        ),
        "1"
    );
    ag.signal(libc::SIGTERM);
    assert_eq!(ag.finish(Duration::from_secs(30)).code, 0);
    let pass = sender.run("sync", &root.join("x.img"), &rx.dest("x"), &rx.fp, &[]);
    assert_eq!(
        pass.code,
        0,
        "a failed night sealed a target: {}",
        pass.context()
    );
}

/// `max_passes_per_host = 1`: two agents of the host, two passes each
/// allowed, never run two passes at once (their rows' spans never
/// overlap), and every volume is still copied; an agent's `--metrics`
/// endpoint counts the passes it recorded.
#[test]
fn the_per_host_cap_holds_across_agents() {
    let test = "fleet_night::the_per_host_cap_holds_across_agents";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    let root = dir.path();
    let sender = SenderSide::new(root, "s");
    let names = ["p", "q", "r"];
    let rx = receiver(root, &sender, &names);
    let plan = image_plan(root, &rx, &names, 3 << 20, "assume_frozen = true");
    register(&db, &plan);
    pg.sql("UPDATE nightpass.settings SET max_passes_per_host = 1");
    let slow = ["--bwlimit", "3M", "--jobs", "2", "--ready-interval", "1h"];
    let (s1, s2) = (root.join("st1"), root.join("st2"));
    let ports = [crate::metrics::free_port(), crate::metrics::free_port()];
    let flags = |port: u16| {
        let mut f: Vec<String> = slow.iter().map(|s| s.to_string()).collect();
        f.extend(["--metrics".to_string(), format!("127.0.0.1:{port}")]);
        f
    };
    let (f1, f2) = (flags(ports[0]), flags(ports[1]));
    let a1 = agent(
        &db,
        &sender,
        &s1,
        "a1",
        &f1.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let a2 = agent(
        &db,
        &sender,
        &s2,
        "a2",
        &f2.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    wait_value(
        &pg,
        "SELECT count(*) FROM nightpass.volumes WHERE state IN ('converging', 'ready')",
        "3",
        Duration::from_secs(60),
        &[&a1, &a2],
    );
    let overlaps = one(
        &pg,
        "SELECT count(*) FROM nightpass.passes p, nightpass.passes o \
         WHERE p.id < o.id AND o.at < coalesce(p.ended_at, now()) \
         AND p.at < coalesce(o.ended_at, now())",
    );
    assert_eq!(
        overlaps,
        "0",
        "{:?}",
        query(
            &pg,
            "SELECT agent, at, ended_at FROM nightpass.passes ORDER BY at"
        )
    );
    // Each agent's endpoint counts what it recorded, as the database has
    // it (the agents go on passing: between a count before and one after).
    let mut total = 0.0;
    for (port, name) in ports.into_iter().zip(["a1", "a2"]) {
        let count = || -> f64 {
            one(
                &pg,
                &format!("SELECT count(*) FROM nightpass.passes WHERE agent = '{name}' AND ok"),
            )
            .parse()
            .unwrap()
        };
        let before = count();
        let body = crate::metrics::scrape_when_up(port);
        let after = count();
        let ok = crate::metrics::value(
            &body,
            "nightpass_fleet_passes_recorded_total",
            "result=\"ok\"",
        )
        .unwrap_or(0.0);
        assert!(
            before <= ok && ok <= after,
            "{name}: {before} {ok} {after}: {body}"
        );
        assert!(body.contains("nightpass_fleet_spooled_records 0"), "{body}");
        total += ok;
    }
    assert!(total >= 3.0, "{total} passes recorded for three volumes");
    for name in names {
        assert_eq!(
            std::fs::read(root.join(format!("{name}.img"))).unwrap(),
            std::fs::read(root.join(format!("target-{name}.img"))).unwrap()
        );
    }
    for a in [a1, a2] {
        a.signal(libc::SIGTERM);
        assert_eq!(a.finish(Duration::from_secs(30)).code, 0);
    }
}

/// SIGTERM during a pass lets it end and be recorded, releases the lease
/// and exits 0; two SIGINTs drop the pass (recorded as dropped, not a
/// failure of the volume) and exit 130.
#[test]
fn an_agent_ends_its_pass_on_sigterm_and_drops_it_on_a_second_sigint() {
    let test = "fleet_night::an_agent_ends_its_pass_on_sigterm";
    let Some(f) = Setup::start(test, &["x"], 6 << 20, "assume_frozen = true") else {
        return;
    };
    let (pg, db, root, sender) = (&f.pg, f.db.as_str(), f.root(), &f.sender);
    let slow = ["--bwlimit", "2M", "--jobs", "1"];
    let a1 = agent(db, sender, &root.join("st1"), "a1", &slow);
    a1.wait_for_event("pass_start", Duration::from_secs(20));
    a1.signal(libc::SIGTERM);
    let end = a1.finish(Duration::from_secs(30));
    assert_eq!(end.code, 0, "{}", end.context());
    assert_eq!(end.all("pass_end").len(), 1, "{}", end.context());
    assert_eq!(
        query(pg, "SELECT agent, ok::text FROM nightpass.passes"),
        vec![vec!["a1".to_string(), "true".to_string()]]
    );
    assert_eq!(one(pg, "SELECT count(*) FROM nightpass.leases"), "0");
    assert_eq!(one(pg, "SELECT state FROM nightpass.volumes"), "converging");
    // The source changes all over: the next pass is long again.
    random_file(&root.join("x.img"), 6 << 20, 77);
    let a2 = agent(db, sender, &root.join("st1"), "a2", &slow);
    a2.wait_for_event("pass_start", Duration::from_secs(20));
    a2.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    a2.signal(libc::SIGINT);
    let end = a2.finish(Duration::from_secs(30));
    assert_eq!(end.code, 130, "{}", end.context());
    // Said as every interrupted command says it.
    let err = end.event("error");
    assert_eq!(err["exit_code"], 130, "{err}");
    let row = query(
        pg,
        "SELECT ok::text, failure FROM nightpass.passes WHERE agent = 'a2'",
    );
    assert_eq!(row[0][0], "false", "{row:?}");
    assert!(row[0][1].contains("second signal"), "{row:?}");
    assert_eq!(one(pg, "SELECT count(*) FROM nightpass.leases"), "0");
    assert_eq!(one(pg, "SELECT state FROM nightpass.volumes"), "converging");
}

/// A night whose freeze keeps failing is retried under the retry policy
/// (`retry_after` doubled per failure), never in a loop, and after
/// `max_attempts` failed nights it waits for the operator, saying so.
#[test]
fn a_failing_night_is_retried_with_backoff_then_waits() {
    let test = "fleet_night::a_failing_night_is_retried_with_backoff_then_waits";
    let Some(f) = Setup::start(
        test,
        &["x", "y"],
        1 << 20,
        "pre = \"exit 3\"\npost = \"true\"",
    ) else {
        return;
    };
    let (pg, db, root, sender) = (&f.pg, f.db.as_str(), f.root(), &f.sender);
    pg.sql("UPDATE nightpass.settings SET retry_after = interval '1 second', max_attempts = 2");
    let r = fleet(
        db,
        &["schedule", "filer", "--at", &at_in(2), "--window", "10m"],
    );
    assert_eq!(r.code, 0, "{}", r.context());
    let ag = agent(
        db,
        sender,
        &root.join("st"),
        "a1",
        &["--ready-interval", "1s"],
    );
    wait_value(
        pg,
        "SELECT night_failures FROM nightpass.filers",
        "2",
        Duration::from_secs(60),
        &[&ag],
    );
    // Six seconds on: still two nights (two volumes each), and the note
    // says the filer waits for the operator.
    std::thread::sleep(Duration::from_secs(6));
    let nights = "SELECT count(*) FROM nightpass.history WHERE to_state = 'cutting_over'";
    assert_eq!(one(pg, nights), "4");
    let note = one(pg, "SELECT night_note FROM nightpass.filers");
    assert!(
        note.contains("gave up") && note.contains("fleet resume"),
        "{note}"
    );
    // One failed night counts once for the error threshold.
    let counted = one(
        pg,
        "SELECT count(*) FROM nightpass.passes WHERE kind = 'cutover' AND NOT ok AND NOT (record ? 'dropped')",
    );
    assert_eq!(counted, "2");
    ag.signal(libc::SIGTERM);
    assert_eq!(ag.finish(Duration::from_secs(30)).code, 0);
}

/// The agent running a night is killed while its filer is frozen (its
/// `pre` still running): the other agent of the host says nothing about
/// the night while it runs, and once the lease has run out takes it over,
/// finds the receiver sealed nothing, sets the volumes back to `ready`,
/// and cuts the filer over itself.
#[test]
fn a_night_whose_agent_died_is_taken_over_and_finished() {
    let test = "fleet_night::a_night_whose_agent_died_is_taken_over";
    let filer = "pre = \"sleep 4\"\npost = \"true\"";
    let Some(mut n) = Night::start(test, filer, 4) else {
        return;
    };
    std::thread::sleep(Duration::from_secs(1));
    let note = one(
        &n.pg,
        "SELECT coalesce(night_note, '') FROM nightpass.filers",
    );
    assert!(
        !note.contains("nothing frozen"),
        "said during the freeze: {note}"
    );
    let survivor = n.kill_runner();
    wait_value(
        &n.pg,
        "SELECT count(*) FROM nightpass.volumes WHERE state = 'cut_over'",
        "2",
        Duration::from_secs(90),
        &[&survivor],
    );
    let recovered = one(
        &n.pg,
        "SELECT count(*) FROM nightpass.history WHERE from_state = 'cutting_over' \
         AND to_state = 'ready' AND figures ? 'recovered'",
    );
    assert_eq!(recovered, "2");
    n.assert_points_are_the_receivers();
    for name in ["x", "y"] {
        assert_eq!(
            std::fs::read(n.root.join(format!("{name}.img"))).unwrap(),
            std::fs::read(n.root.join(format!("target-{name}.img"))).unwrap()
        );
    }
    survivor.signal(libc::SIGTERM);
    assert_eq!(survivor.finish(Duration::from_secs(30)).code, 0);
}

/// An agent whose database refuses for good (no such database) ends at
/// once (exit 3) saying why, instead of waiting as for an outage.
#[test]
fn an_agent_whose_database_refuses_for_good_ends_at_once() {
    let test = "fleet_night::an_agent_whose_database_refuses_for_good";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let dir = scratch();
    let sender = SenderSide::new(dir.path(), "s");
    let db = pg.url().replace("dbname=postgres", "dbname=nosuchdb");
    let ag = agent(&db, &sender, &dir.path().join("st"), "a1", &[]);
    let end = ag.finish(Duration::from_secs(15));
    assert_eq!(end.code, 3, "{}", end.context());
    assert!(end.stderr.contains("nosuchdb"), "{}", end.context());
}

/// Without `--json`, an agent's pass says how far it is every
/// `--progress-interval`, each line with its time, as `serve` logs.
#[test]
fn an_agents_pass_says_how_far_it_is() {
    let test = "fleet_night::an_agents_pass_says_how_far_it_is";
    let Some(f) = Setup::start(test, &["x"], 6 << 20, "assume_frozen = true") else {
        return;
    };
    let (db, root, sender) = (f.db.as_str(), f.root(), &f.sender);
    let mut c = Command::new(bin());
    c.args([
        "fleet",
        "agent",
        "--host",
        "h",
        "--name",
        "a1",
        "--progress-interval",
        "1s",
    ]);
    c.arg("--identity").arg(&sender.id.dir);
    c.arg("--state-dir").arg(root.join("st"));
    c.args(["--bwlimit", "2M", "--jobs", "1", "--poll", "300ms"]);
    c.env("NIGHTPASS_DB", db).env_remove("JOURNAL_STREAM");
    let ag = Spawned::start(c);
    assert!(
        wait_for(Duration::from_secs(20), || ag
            .stderr()
            .contains("pass 1: scanned")),
        "{}",
        ag.stderr()
    );
    let line = ag
        .stderr()
        .lines()
        .find(|l| l.contains("pass 1: scanned"))
        .unwrap()
        .to_string();
    assert!(line.starts_with("20") && line.contains("filer/x"), "{line}");
    ag.signal(libc::SIGTERM);
    assert_eq!(ag.finish(Duration::from_secs(30)).code, 0);
}

/// An agent that hung past its lease (SIGSTOP) while its filer was removed
/// (`fleet remove`) wakes to find the volume gone: its pass's record is
/// dropped, said, and not kept in its spool to be sent forever.
#[test]
fn a_record_for_a_removed_filer_is_dropped_not_spooled() {
    let test = "fleet_night::a_record_for_a_removed_filer_is_dropped";
    let Some(f) = Setup::start(test, &["x"], 6 << 20, "assume_frozen = true") else {
        return;
    };
    let (db, root, sender) = (f.db.as_str(), f.root(), &f.sender);
    let state = root.join("st");
    let ag = agent(
        db,
        sender,
        &state,
        "a1",
        &["--bwlimit", "1M", "--jobs", "1"],
    );
    ag.wait_for_event("pass_start", Duration::from_secs(20));
    ag.signal(libc::SIGSTOP);
    // The lease (4 s) runs out; the filer can then be removed.
    let removed = wait_for(Duration::from_secs(20), || {
        fleet(db, &["remove", "filer"]).code == 0
    });
    ag.signal(libc::SIGCONT);
    assert!(removed, "fleet remove never succeeded");
    let rec = ag.wait_for_event("fleet_pass_recorded", Duration::from_secs(30));
    assert_eq!(rec["removed"], true, "{rec}");
    let spool = state.join("fleet-spool");
    let left = std::fs::read_dir(&spool).map_or(0, |d| d.count());
    assert_eq!(left, 0, "records left in {}", spool.display());
    ag.signal(libc::SIGTERM);
    assert_eq!(ag.finish(Duration::from_secs(30)).code, 0);
}

/// A night's record sent twice (a spooled record whose commit the agent
/// did not see) changes nothing the second time: one failed night counts
/// once, its volumes' history has one row each.
#[test]
fn a_nights_record_sent_twice_counts_once() {
    use nightpass::fleet::night::{self, NightRecord};
    use nightpass::fleet::{DbSettings, Pool};
    let Some(pg) = Postgres::start("fleet_night::a_nights_record_sent_twice_counts_once") else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    let root = dir.path();
    let sender = SenderSide::new(root, "s");
    let rx = receiver(root, &sender, &["x", "y"]);
    let plan = image_plan(root, &rx, &["x", "y"], 1 << 20, "assume_frozen = true");
    register(&db, &plan);
    let r = fleet(
        &db,
        &["schedule", "filer", "--at", &at_in(-1), "--window", "10m"],
    );
    assert_eq!(r.code, 0, "{}", r.context());
    pg.sql("UPDATE nightpass.volumes SET state = 'ready'");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let settings = DbSettings::resolve(Some(&db), Duration::from_secs(5), Duration::from_secs(10));
    let pool = Pool::new(settings.unwrap(), 2);
    rt.block_on(async {
        let nights = night::open(&pool, "h").await.unwrap();
        assert_eq!(nights.len(), 1, "{nights:?}");
        let leases = night::claim(
            &pool,
            &nights[0],
            "a1",
            Duration::from_secs(30),
            &Value::Null,
        )
        .await
        .unwrap()
        .unwrap();
        let record = NightRecord {
            filer: "filer".into(),
            leases,
            points: Default::default(),
            group_point: None,
            failure: Some((Some("x".into()), "the freeze failed".into())),
            figures: serde_json::json!({"failed": "the freeze failed"}),
            ended_unix: None,
        };
        night::finish(&pool, &record).await.unwrap();
        night::finish(&pool, &record).await.unwrap();
    });
    assert_eq!(one(&pg, "SELECT night_failures FROM nightpass.filers"), "1");
    assert_eq!(
        one(
            &pg,
            "SELECT count(*) FROM nightpass.history WHERE from_state = 'cutting_over'"
        ),
        "2"
    );
    let states = query(
        &pg,
        "SELECT name, state FROM nightpass.volumes ORDER BY name",
    );
    assert_eq!(states[0][1], "failed", "{states:?}");
    assert_eq!(states[1][1], "ready", "{states:?}");
}

/// The agent running a night is killed after the receiver sealed the
/// volumes but before the database heard of it (PostgreSQL down through
/// the night's end): the other agent takes the night over, finds every
/// volume sealed, and records the cutover with the receiver's points; the
/// night's pass rows read as the success they were.
#[test]
fn a_sealed_night_whose_agent_died_is_recorded_by_another() {
    let test = "fleet_night::a_sealed_night_whose_agent_died_is_recorded";
    let filer = "pre = \"sleep 2\"\npost = \"true\"";
    let Some(mut n) = Night::start(test, filer, 3) else {
        return;
    };
    n.pg.stop();
    let sealed = wait_for(Duration::from_secs(30), || {
        ["x", "y"]
            .iter()
            .all(|v| n.journal(v).contains("group_point"))
    });
    assert!(sealed, "the receiver never sealed the night");
    let survivor = n.kill_runner();
    n.pg.pg_ctl_start();
    wait_value(
        &n.pg,
        "SELECT count(*) FROM nightpass.volumes WHERE state = 'cut_over'",
        "2",
        Duration::from_secs(90),
        &[&survivor],
    );
    n.assert_points_are_the_receivers();
    let group = one(&n.pg, "SELECT group_point FROM nightpass.filers");
    for name in ["x", "y"] {
        let last: Value = serde_json::from_str(n.journal(name).lines().last().unwrap()).unwrap();
        assert_eq!(last["group_point"], group.as_str(), "{last}");
    }
    let failed = query(
        &n.pg,
        "SELECT volume, failure FROM nightpass.passes WHERE kind = 'cutover' AND NOT ok",
    );
    assert!(
        failed.is_empty(),
        "a sealed night recorded as failed: {failed:?}"
    );
    survivor.signal(libc::SIGTERM);
    assert_eq!(survivor.finish(Duration::from_secs(30)).code, 0);
}

/// A filer of two 1 MiB image volumes with the filer lines `filer`,
/// registered, its night opening in `opens_in` s, and two agents for its
/// host, once both its volumes are `cutting_over`: the database, the
/// receiver, the sender, the agent running the night (by index into the
/// agents) and the agents.
struct Night {
    pg: Postgres,
    rx: Receiver,
    root: PathBuf,
    runner: usize,
    agents: [Option<Spawned>; 2],
    _dir: tempfile::TempDir,
}

impl Night {
    fn start(test: &str, filer: &str, opens_in: i64) -> Option<Night> {
        let pg = Postgres::start(test)?;
        let db = pg.url();
        let dir = scratch();
        let root = dir.path().to_owned();
        let sender = SenderSide::new(&root, "s");
        let rx = receiver(&root, &sender, &["x", "y"]);
        let plan = image_plan(&root, &rx, &["x", "y"], 1 << 20, filer);
        register(&db, &plan);
        let at = at_in(opens_in);
        let r = fleet(&db, &["schedule", "filer", "--at", &at, "--window", "10m"]);
        assert_eq!(r.code, 0, "{}", r.context());
        let flags = ["--ready-interval", "1s"];
        let agents = [
            Some(agent(&db, &sender, &root.join("s1"), "a1", &flags)),
            Some(agent(&db, &sender, &root.join("s2"), "a2", &flags)),
        ];
        let all: Vec<&Spawned> = agents.iter().flatten().collect();
        wait_value(
            &pg,
            "SELECT count(*) FROM nightpass.volumes WHERE state = 'cutting_over'",
            "2",
            Duration::from_secs(60),
            &all,
        );
        let runner = one(&pg, "SELECT DISTINCT agent FROM nightpass.leases");
        Some(Night {
            pg,
            rx,
            root,
            runner: if runner == "a1" { 0 } else { 1 },
            agents,
            _dir: dir,
        })
    }

    /// SIGKILLs the agent running the night; returns the other.
    fn kill_runner(&mut self) -> Spawned {
        self.agents[self.runner].take().unwrap().kill9();
        self.agents[1 - self.runner].take().unwrap()
    }

    /// The receiver's journal of volume `name`.
    fn journal(&self, name: &str) -> String {
        let p = self
            .rx
            .state
            .join("volumes")
            .join(name)
            .join("journal.jsonl");
        std::fs::read_to_string(p).unwrap_or_default()
    }

    /// Asserts each volume's consistency point in the database is the one
    /// the receiver journaled.
    fn assert_points_are_the_receivers(&self) {
        for name in ["x", "y"] {
            let journal = self.journal(name);
            let last: Value = serde_json::from_str(journal.lines().last().unwrap()).unwrap();
            let point = one(
                &self.pg,
                &format!("SELECT consistency_point FROM nightpass.volumes WHERE name = '{name}'"),
            );
            assert_eq!(last["consistency_point"], point.as_str(), "{last}");
        }
    }
}

/// A private PostgreSQL with the fleet's schema, a receiver exporting
/// image volumes, and one filer of those volumes registered for host `h`:
/// what most of these tests start from.
struct Setup {
    pg: Postgres,
    db: String,
    sender: SenderSide,
    rx: Receiver,
    dir: tempfile::TempDir,
}

impl Setup {
    /// The fleet of filer `filer` (plan lines `lines`) with volumes
    /// `names` of `size` random bytes; `None` after a loud skip without
    /// PostgreSQL.
    fn start(test: &str, names: &[&str], size: u64, lines: &str) -> Option<Setup> {
        let pg = Postgres::start(test)?;
        let db = pg.url();
        let dir = scratch();
        let sender = SenderSide::new(dir.path(), "s");
        let rx = receiver(dir.path(), &sender, names);
        let plan = image_plan(dir.path(), &rx, names, size, lines);
        register(&db, &plan);
        Some(Setup {
            pg,
            db,
            sender,
            rx,
            dir,
        })
    }

    /// The test's scratch directory.
    fn root(&self) -> &Path {
        self.dir.path()
    }
}
