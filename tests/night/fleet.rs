//! The fleet's foundation against a private PostgreSQL: `fleet init` twice
//! (idempotent), `fleet add` of a plan (its volumes pending; the same
//! filer twice refused), `fleet status --json`, the red button
//! (`pause`/`resume`), `fleet schedule`, and a database that is not running
//! (exit 3 after the bounded wait, naming the database without its
//! password). The operator's controls and `fleet status`'s filers:
//! [`controls`]; what `fleet add` and `fleet schedule` refuse: [`guards`];
//! `fleet remove`: [`remove`].

mod controls;
mod guards;
mod remove;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// `nightpass --json fleet ARGS` with `NIGHTPASS_DB` set to `db`.
fn fleet(db: &str, args: &[&str]) -> Run {
    let mut c = Command::new(bin());
    c.args(["--json", "fleet"])
        .args(args)
        .env("NIGHTPASS_DB", db)
        .stdin(Stdio::null());
    let mut run = run_command(c);
    run.desc = format!("nightpass --json fleet {}", args.join(" "));
    run
}

/// Asserts `run` exited `code`.
fn expect(run: &Run, code: i32) {
    assert_eq!(run.code, code, "{}", run.context());
}

/// The events named `name`.
fn events<'a>(run: &'a Run, name: &str) -> Vec<&'a Value> {
    run.events.iter().filter(|e| e["event"] == name).collect()
}

/// A plan file `dir/NAME.toml` of `n` image volumes, 1 MiB each, frozen
/// by `assume_frozen`, for a receiver of its own (its own port and key:
/// two filers never name one receiver volume).
fn plan(dir: &Path, name: &str, n: usize) -> PathBuf {
    static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(7400);
    let port = PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let fp = keygen(dir, &format!("{name}-rx")).fp;
    let mut text = format!(
        "receiver = \"127.0.0.1:{port}\"\nserver_fingerprint = \"{fp}\"\nassume_frozen = true\n"
    );
    for i in 0..n {
        let src = dir.join(format!("{name}-v{i}.img"));
        random_file(&src, MIB, 1700 + i as u64);
        text.push_str(&format!(
            "\n[[volume]]\nname = \"v{i}\"\nsource = \"{}\"\n",
            src.display()
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The schema version `fleet init` reports.
fn init(db: &str) -> Value {
    let run = fleet(db, &["init"]);
    expect(&run, 0);
    let e = events(&run, "fleet_schema");
    assert_eq!(e.len(), 1, "{}", run.context());
    assert!(e[0]["ts"].is_string());
    e[0].clone()
}

#[test]
fn init_twice_changes_nothing() {
    let Some(pg) = Postgres::start("fleet::init_twice_changes_nothing") else {
        return;
    };
    let db = pg.url();
    // Before init, every other command says to run it (exit 2).
    let run = fleet(&db, &["status"]);
    expect(&run, 2);
    assert!(run.stderr.contains("fleet init"), "{}", run.context());
    let first = init(&db);
    assert_eq!(first["from_version"], 0);
    assert_eq!(first["changed"], true);
    let v = first["version"].as_i64().unwrap();
    assert!(v >= 1);
    let second = init(&db);
    assert_eq!(second["from_version"], v);
    assert_eq!(second["version"], v);
    assert_eq!(second["changed"], false);
    let run = fleet(&db, &["status"]);
    expect(&run, 0);
    assert_eq!(events(&run, "fleet")[0]["schema_version"], v);
    // A schema newer than this binary: refused, by init too, saying so.
    pg.sql(&format!(
        "INSERT INTO nightpass.schema_version (version, applied_by) VALUES ({}, 'later')",
        v + 1
    ));
    for args in [&["status"][..], &["init"], &["pause"]] {
        let run = fleet(&db, args);
        expect(&run, 2);
        assert!(run.stderr.contains("newer"), "{}", run.context());
    }
}

#[test]
fn add_registers_pending_volumes_and_refuses_a_second_add() {
    let Some(pg) = Postgres::start("fleet::add_registers_pending_volumes") else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    let filer = plan(dir.path(), "filer7", 3);
    init(&db);
    let run = fleet(&db, &["add", filer.to_str().unwrap(), "--host", "sender-a"]);
    expect(&run, 0);
    let added = events(&run, "fleet_filer_added");
    assert_eq!(added[0]["filer"], "filer7", "{}", run.context());
    assert_eq!(added[0]["volumes"], 3);

    let run = fleet(&db, &["status"]);
    expect(&run, 0);
    let vols = events(&run, "fleet_volume");
    assert_eq!(vols.len(), 3, "{}", run.context());
    for (i, v) in vols.iter().enumerate() {
        assert_eq!(v["filer"], "filer7");
        assert_eq!(v["volume"], format!("v{i}"));
        assert_eq!(v["host"], "sender-a");
        assert_eq!(v["state"], "pending");
        assert_eq!(v["passes"], 0);
        assert!(v["forecast_final_pass_s"].is_null());
        assert!(v["consistency_point"].is_null());
        assert!(v["ts"].is_string(), "{v}");
    }
    let summary = events(&run, "fleet");
    assert_eq!(summary[0]["volumes"], 3);
    assert_eq!(summary[0]["states"]["pending"], 3);

    // The same filer again: refused, nothing changed.
    let run = fleet(&db, &["add", filer.to_str().unwrap()]);
    expect(&run, 2);
    assert!(run.stderr.contains("filer7"), "{}", run.context());
    assert_eq!(events(&run, "error")[0]["exit_code"], 2);
    // --replace while nothing has started registers it anew (host now this machine's).
    let run = fleet(&db, &["add", filer.to_str().unwrap(), "--replace"]);
    expect(&run, 0);
    let run = fleet(&db, &["status"]);
    assert_eq!(events(&run, "fleet_volume").len(), 3, "{}", run.context());
    assert_ne!(events(&run, "fleet_volume")[0]["host"], "sender-a");
    // A bad plan is refused before the database is touched.
    std::fs::write(dir.path().join("bad.toml"), "receiver = 1\n").unwrap();
    let run = fleet(&db, &["add", dir.path().join("bad.toml").to_str().unwrap()]);
    expect(&run, 2);
}

#[test]
fn pause_and_resume_show_in_status() {
    let Some(pg) = Postgres::start("fleet::pause_and_resume_show_in_status") else {
        return;
    };
    let db = pg.url();
    init(&db);
    let run = fleet(&db, &["status"]);
    assert_eq!(events(&run, "fleet")[0]["paused"], false);
    let run = fleet(&db, &["pause", "--reason", "storage array alarm"]);
    expect(&run, 0);
    assert_eq!(events(&run, "fleet_paused")[0]["was_paused"], false);
    let run = fleet(&db, &["status"]);
    let s = events(&run, "fleet")[0];
    assert_eq!(s["paused"], true, "{}", run.context());
    assert_eq!(s["pause_reason"], "storage array alarm");
    assert!(s["paused_at"].is_string());
    let run = fleet(&db, &["resume"]);
    expect(&run, 0);
    assert_eq!(events(&run, "fleet_resumed")[0]["was_paused"], true);
    let run = fleet(&db, &["status"]);
    let s = events(&run, "fleet")[0];
    assert_eq!(s["paused"], false, "{}", run.context());
    assert!(s["pause_reason"].is_null());
}

#[test]
fn schedule_a_known_filer_and_refuse_an_unknown_one() {
    let Some(pg) = Postgres::start("fleet::schedule_a_known_filer") else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    let filer = plan(dir.path(), "filer8", 1);
    init(&db);
    expect(&fleet(&db, &["add", filer.to_str().unwrap()]), 0);
    let run = fleet(
        &db,
        &[
            "schedule",
            "nosuch",
            "--at",
            "2096-12-03T01:00:00Z",
            "--window",
            "2h",
        ],
    );
    expect(&run, 2);
    assert!(run.stderr.contains("nosuch"), "{}", run.context());
    let run = fleet(
        &db,
        &[
            "schedule",
            "filer8",
            "--at",
            "2096-12-03T02:00:00+01:00",
            "--window",
            "2h",
        ],
    );
    expect(&run, 0);
    let e = events(&run, "fleet_scheduled")[0];
    assert_eq!(e["at"], "2096-12-03T01:00:00Z", "{}", run.context());
    assert_eq!(e["window_s"], 7200.0);
    let run = fleet(&db, &["status"]);
    let v = events(&run, "fleet_volume")[0];
    assert_eq!(v["window_at"], "2096-12-03T01:00:00Z", "{}", run.context());
    // Local time and a time that is not one.
    let mut c = Command::new(bin());
    c.args([
        "--json",
        "fleet",
        "schedule",
        "filer8",
        "--at",
        "2096-12-03 01:30",
    ])
    .args(["--window", "1h"])
    .env("NIGHTPASS_DB", &db)
    .env("TZ", "Europe/Paris");
    let run = run_command(c);
    expect(&run, 0);
    assert_eq!(
        events(&run, "fleet_scheduled")[0]["at"],
        "2096-12-03T00:30:00Z"
    );
    let run = fleet(
        &db,
        &[
            "schedule",
            "filer8",
            "--at",
            "2096-13-03 01:00",
            "--window",
            "1h",
        ],
    );
    expect(&run, 2);
}

#[test]
fn a_database_not_running_exits_3_after_the_bounded_wait() {
    let dir = scratch();
    let sock = dir.path().join("sock");
    std::fs::create_dir_all(&sock).unwrap();
    let db = format!(
        "host={} port={} user=fleet password=hunter2 dbname=fleetdb",
        sock.display(),
        free_port()
    );
    let t = Instant::now();
    let run = fleet(&db, &["status", "--db-wait", "2s"]);
    let took = t.elapsed();
    expect(&run, 3);
    assert!(
        took >= Duration::from_millis(1500),
        "gave up at once: {took:?}"
    );
    assert!(took < Duration::from_secs(20), "waited {took:?}");
    assert!(run.stderr.contains("fleetdb"), "{}", run.context());
    assert!(
        run.stderr.contains(&sock.display().to_string()),
        "{}",
        run.context()
    );
    assert!(!run.stderr.contains("hunter2"), "{}", run.context());
    let e = events(&run, "error");
    assert_eq!(e[0]["exit_code"], 3);
    assert!(!e[0]["message"].as_str().unwrap().contains("hunter2"));
    // No database at all: bad usage (exit 2), saying where one is given.
    let mut c = Command::new(bin());
    c.args(["--json", "fleet", "status"])
        .env_remove("NIGHTPASS_DB")
        .stdin(Stdio::null());
    let run = run_command(c);
    expect(&run, 2);
    assert!(run.stderr.contains("NIGHTPASS_DB"), "{}", run.context());
}

/// The lease primitives the agent will use, against the real schema: a
/// claim takes a volume no one holds (concurrent claims never take one
/// twice), an expired lease is taken over with a larger token, and the
/// old holder can neither renew nor change the volume any more.
#[test]
fn leases_fence_an_agent_that_lost_its_volume() {
    use nightpass::fleet::{lease, DbSettings, Pool};
    let Some(pg) = Postgres::start("fleet::leases_fence_an_agent_that_lost_its_volume") else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    init(&db);
    let filer = plan(dir.path(), "filer9", 3);
    expect(
        &fleet(&db, &["add", filer.to_str().unwrap(), "--host", "h1"]),
        0,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pool = || {
        let s = DbSettings::resolve(Some(&db), Duration::from_secs(5), Duration::from_secs(10));
        Pool::new(s.unwrap(), 2)
    };
    let ttl = Duration::from_secs(60);
    // Eight agents claim at once: the three volumes, each once.
    let claims: Vec<Option<lease::Lease>> = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let p = pool();
                tokio::spawn(async move {
                    lease::claim(&p, "h1", &format!("agent-{i}"), ttl)
                        .await
                        .unwrap()
                        .ok()
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let held: Vec<&lease::Lease> = claims.iter().flatten().collect();
    let mut ids: Vec<i64> = held.iter().map(|l| l.volume).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((held.len(), ids.len()), (3, 3), "{claims:?}");
    let p = pool();
    let old = held[0].clone();
    rt.block_on(async {
        assert!(lease::claim(&p, "h1", "late", ttl).await.unwrap().is_err());
        assert!(lease::claim(&p, "h2", "other", ttl).await.unwrap().is_err());
        assert!(lease::transition(&p, &old, "copying", None, None)
            .await
            .unwrap());
        assert!(lease::renew(&p, &old, ttl).await.unwrap());
    });
    // The holder's lease runs out (its agent hung): another agent takes over.
    pg.sql(&format!(
        "UPDATE nightpass.leases SET expires_at = now() - interval '1 second' WHERE volume = {}",
        old.volume
    ));
    rt.block_on(async {
        let new = lease::claim(&p, "h1", "successor", ttl)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(new.agent, "successor");
        assert_eq!(new.volume, old.volume);
        assert_eq!(new.state, "copying");
        assert!(held.iter().all(|l| new.token > l.token), "{new:?} {held:?}");
        assert!(!lease::renew(&p, &old, ttl).await.unwrap());
        let figures = serde_json::json!({"pass": 2, "sent_bytes": 4096});
        assert!(!lease::transition(&p, &old, "ready", None, Some(&figures))
            .await
            .unwrap());
        assert!(
            lease::transition(&p, &new, "converging", None, Some(&figures))
                .await
                .unwrap()
        );
    });
    let run = fleet(&db, &["status"]);
    let v = events(&run, "fleet_volume")
        .into_iter()
        .find(|v| v["volume"] == old.name)
        .unwrap()
        .clone();
    assert_eq!(v["state"], "converging", "{}", run.context());
    assert_eq!(v["agent"], "successor");
}

/// A filer whose sources another host reads is registered without reading
/// them here (`sources_checked: false`), but only with absolute source
/// paths; for this host, a source that cannot be read refuses the plan.
#[test]
fn add_for_another_host_does_not_read_its_sources() {
    let Some(pg) = Postgres::start("fleet::add_for_another_host") else {
        return;
    };
    let db = pg.url();
    let dir = scratch();
    init(&db);
    let fp = keygen(dir.path(), "rx").fp;
    let write = |name: &str, source: &str| {
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "receiver = \"127.0.0.1:7400\"\nserver_fingerprint = \"{fp}\"\n\
                 assume_frozen = true\n[[volume]]\nname = \"v\"\nsource = \"{source}\"\n"
            ),
        )
        .unwrap();
        p
    };
    let far = write("far", "/dev/vg-elsewhere/far-v");
    let run = fleet(
        &db,
        &["add", far.to_str().unwrap(), "--host", "another-host"],
    );
    expect(&run, 0);
    assert_eq!(
        events(&run, "fleet_filer_added")[0]["sources_checked"],
        false
    );
    // For this host the same source is read, and refused.
    let here = write("here", "/dev/vg-elsewhere/far-v");
    let run = fleet(&db, &["add", here.to_str().unwrap()]);
    expect(&run, 2);
    assert!(
        run.stderr.contains("cannot read source"),
        "{}",
        run.context()
    );
    // A relative source means nothing on the host that reads it.
    let rel = write("rel", "vg/rel-v");
    let run = fleet(
        &db,
        &["add", rel.to_str().unwrap(), "--host", "another-host"],
    );
    expect(&run, 2);
    assert!(run.stderr.contains("absolute"), "{}", run.context());
}

/// Over TCP the database is reached with TLS and its certificate checked:
/// with the CA given (`NIGHTPASS_DB_CA`, `--db-ca`, or libpq's
/// `sslrootcert` with `sslmode=verify-full`, in a string or a URL) every
/// command works and the server logs TLS connections; without it the
/// certificate is refused at once (exit 3), saying how to give the CA.
#[test]
fn the_database_is_reached_over_tls_with_its_certificate_checked() {
    let Some(pg) = Postgres::start("fleet::the_database_is_reached_over_tls") else {
        return;
    };
    let ca = pg.enable_tls();
    let ca_s = ca.to_str().unwrap();
    let with_ca = |db: &str, args: &[&str]| {
        let mut c = Command::new(bin());
        c.args(["--json", "fleet"])
            .args(args)
            .env("NIGHTPASS_DB", db);
        c.env("NIGHTPASS_DB_CA", ca_s).stdin(Stdio::null());
        run_command(c)
    };
    let require = pg.tcp_url("localhost", "sslmode=require");
    expect(&with_ca(&require, &["init"]), 0);
    assert!(pg.log().contains("SSL enabled"), "{}", pg.log());
    // No CA: the server's certificate is not trusted, and waiting won't
    // change that.
    let t = Instant::now();
    let run = fleet(&require, &["status", "--db-wait", "30s"]);
    expect(&run, 3);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(run.stderr.contains("--db-ca"), "{}", run.context());
    let run = fleet(&require, &["status", "--db-ca", ca_s]);
    expect(&run, 0);
    // libpq's own options, as operators copy them.
    let verify = pg.tcp_url(
        "localhost",
        &format!("sslmode=verify-full sslrootcert={ca_s}"),
    );
    expect(&fleet(&verify, &["status"]), 0);
    let url = format!(
        "postgres://fleet@127.0.0.1:{}/postgres?sslmode=verify-ca&sslrootcert={ca_s}",
        pg.port()
    );
    expect(&fleet(&url, &["status"]), 0);
    // A CA file that holds no certificate is bad input.
    let run = fleet(&require, &["status", "--db-ca", "/etc/hostname"]);
    expect(&run, 2);
}
