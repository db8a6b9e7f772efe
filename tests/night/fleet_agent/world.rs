//! A fleet test's world: a private PostgreSQL with the fleet's schema, a
//! receiver exporting the volumes of one or more filers (image files), the
//! plan files registered with `fleet add` for one sender host, and the
//! agents (`nightpass --json fleet agent`) run as real processes with
//! their own state directories and one shared sender identity.
//!
//! Owns only the test's own processes and files; the checks made on the
//! database's history are [`super::checks`]'.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// The sender host every test's filers are registered for.
pub const HOST: &str = "sender-h1";

/// The flags (and values) every agent of these tests runs with unless the
/// test gives its own: short leases and polls so a test lasts seconds,
/// not minutes.
pub const AGENT_FLAGS: &[(&str, &str)] = &[
    ("--lease", "3s"),
    ("--poll", "200ms"),
    ("--ready-interval", "2s"),
];

/// One filer of a test: its name and its volumes' names (each the name
/// the receiver exports, unique over the fleet: `FILER-vI`).
pub struct FilerSpec {
    pub name: String,
    pub volumes: Vec<String>,
}

/// The fleet of a test: database, receiver, sources and targets.
pub struct Fleet {
    /// Dropped first: the receiver before the database and files.
    pub rx: Receiver,
    pub pg: Postgres,
    pub db: String,
    pub filers: Vec<FilerSpec>,
    /// The sender identity every agent uses (the receiver allows it).
    pub sender: Ident,
    pub dir: tempfile::TempDir,
}

impl Fleet {
    /// A fleet of `filers` (name, number of volumes), every volume an image
    /// file of `size` random bytes, exported by one receiver except those
    /// named in `unexported`; each filer's plan (`jobs = 2`,
    /// `assume_frozen = true`) added for [`HOST`]. `None` when PostgreSQL
    /// is missing (a loud skip; a failure under `CI=true`).
    pub fn new(
        test: &str,
        filers: &[(&str, usize)],
        size: u64,
        unexported: &[&str],
    ) -> Option<Fleet> {
        let pg = Postgres::start(test)?;
        let dir = scratch();
        let root = dir.path().to_path_buf();
        let sender = keygen(&root, "tx-id");
        let rx_id = keygen(&root, "rx-id");
        let specs: Vec<FilerSpec> = filers
            .iter()
            .map(|(name, n)| FilerSpec {
                name: name.to_string(),
                volumes: (0..*n).map(|i| format!("{name}-v{i}")).collect(),
            })
            .collect();
        let mut exports = Vec::new();
        for (seed, v) in specs.iter().flat_map(|f| &f.volumes).enumerate() {
            random_file(&root.join(format!("{v}.src")), size, 1700 + seed as u64);
            if !unexported.contains(&v.as_str()) {
                exports.push((v.clone(), root.join(format!("{v}.tgt"))));
            }
        }
        let exports: Vec<(&str, &Path)> = exports
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_path()))
            .collect();
        let rx = Receiver::start(&rx_id, &root.join("rx-state"), &exports, &[&sender.fp], 0);
        let db = pg.url();
        let fleet = Fleet {
            rx,
            pg,
            db,
            filers: specs,
            sender,
            dir,
        };
        fleet.fleet(&["init"]).ok();
        for f in &fleet.filers {
            let plan = fleet.write_plan(f);
            fleet
                .fleet(&["add", plan.to_str().unwrap(), "--host", HOST])
                .ok();
        }
        Some(fleet)
    }

    /// Writes `FILER.toml` for `f` and returns its path.
    fn write_plan(&self, f: &FilerSpec) -> PathBuf {
        let mut text = format!(
            "receiver = \"127.0.0.1:{}\"\nserver_fingerprint = \"{}\"\njobs = 2\nassume_frozen = true\n",
            self.rx.port, self.rx.fp
        );
        for v in &f.volumes {
            text.push_str(&format!(
                "\n[[volume]]\nname = \"{v}\"\nsource = \"{}\"\n",
                self.source(v).display()
            ));
        }
        let path = self.dir.path().join(format!("{}.toml", f.name));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The source image of volume `v`.
    pub fn source(&self, v: &str) -> PathBuf {
        self.dir.path().join(format!("{v}.src"))
    }

    /// The receiver's target image of volume `v`.
    pub fn target(&self, v: &str) -> PathBuf {
        self.dir.path().join(format!("{v}.tgt"))
    }

    /// Every volume's name, filer by filer.
    pub fn volumes(&self) -> Vec<&str> {
        self.filers
            .iter()
            .flat_map(|f| f.volumes.iter().map(String::as_str))
            .collect()
    }

    /// `nightpass --json fleet ARGS --db URL` to completion.
    pub fn fleet(&self, args: &[&str]) -> Run {
        let mut c = Command::new(bin());
        c.args(["--json", "fleet"])
            .args(args)
            .args(["--db", &self.db])
            .stdin(Stdio::null());
        let mut run = run_command(c);
        run.desc = format!("nightpass --json fleet {}", args.join(" "));
        run
    }

    /// `fleet schedule FILER --at (now + in_s) --window WINDOW`; returns
    /// the window's opening as the database's epoch seconds.
    pub fn schedule_in(&self, filer: &str, in_s: u32, window: &str) -> f64 {
        let row = &self.pg.query(&format!(
            "SELECT to_char((now() + interval '{in_s} seconds') AT TIME ZONE 'UTC', \
             'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        ))[0];
        let at = row[0].clone();
        self.fleet(&["schedule", filer, "--at", &at, "--window", window])
            .ok();
        self.epoch(&format!(
            "SELECT at FROM nightpass.schedules WHERE filer = '{filer}'"
        ))
    }

    /// The first column of `query`'s only row (a timestamp) as epoch seconds.
    #[track_caller]
    pub fn epoch(&self, query: &str) -> f64 {
        let s = self
            .pg
            .scalar(&format!("SELECT extract(epoch FROM ({query}))::float8"));
        s.parse()
            .unwrap_or_else(|e| panic!("{query}: not a time ({e}): {s:?}"))
    }

    /// The database's clock now, as epoch seconds.
    pub fn now(&self) -> f64 {
        self.epoch("SELECT now()")
    }

    /// A number `query` counts.
    #[track_caller]
    pub fn count(&self, query: &str) -> i64 {
        let s = self.pg.scalar(query);
        s.parse()
            .unwrap_or_else(|e| panic!("{query}: not a number ({e}): {s:?}"))
    }

    /// (volume name, state) of every volume, by name.
    pub fn states(&self) -> Vec<(String, String)> {
        self.pg
            .query("SELECT name, state FROM nightpass.volumes ORDER BY name")
            .into_iter()
            .map(|r| (r[0].clone(), r[1].clone()))
            .collect()
    }

    /// The volumes' table, for failure messages.
    pub fn dump(&self) -> String {
        let rows = self.pg.query(
            "SELECT v.filer, v.name, v.state, coalesce(v.failure, '-'), v.attempts, \
             coalesce(l.agent || ' token ' || l.token || CASE WHEN l.in_pass THEN ' in pass' ELSE '' END, '-'), \
             (SELECT count(*) FROM nightpass.passes p WHERE p.volume = v.id) \
             FROM nightpass.volumes v LEFT JOIN nightpass.leases l \
             ON l.volume = v.id AND l.expires_at > now() ORDER BY v.filer, v.name",
        );
        let settings = self.pg.query(
            "SELECT paused, coalesce(pause_reason, '-'), coalesce(paused_by, '-') FROM nightpass.settings",
        );
        let mut s = format!("settings (paused, reason, by): {settings:?}\n");
        for r in rows {
            s.push_str(&format!("  {}\n", r.join(" | ")));
        }
        s
    }

    /// Starts agent `name` for [`HOST`] with its own state directory
    /// (`NAME-state`), this fleet's sender identity, `extra`, and those of
    /// [`AGENT_FLAGS`] that `extra` does not give.
    pub fn agent(&self, name: &str, extra: &[&str]) -> Agent {
        let state = self.dir.path().join(format!("{name}-state"));
        let mut c = Command::new(bin());
        c.args([
            "--json", "fleet", "agent", "--db", &self.db, "--host", HOST, "--name", name,
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--identity")
        .arg(&self.sender.dir);
        for (flag, value) in AGENT_FLAGS {
            if !extra.contains(flag) {
                c.args([flag, value]);
            }
        }
        c.args(extra).stdin(Stdio::null());
        Agent {
            name: name.to_string(),
            state,
            proc: Some(Spawned::start(c)),
        }
    }

    /// Waits (at most `limit`) until `cond` holds, failing at once when an
    /// agent exits meanwhile; the failure shows `what`, the volumes and the
    /// agents' output.
    #[track_caller]
    pub fn wait(
        &self,
        agents: &mut [&mut Agent],
        limit: Duration,
        what: &str,
        mut cond: impl FnMut(&Fleet) -> bool,
    ) {
        let t = Instant::now();
        loop {
            if cond(self) {
                return;
            }
            for a in agents.iter_mut() {
                if !a.running() {
                    panic!(
                        "agent {} exited while waiting for {what}\n{}\n{}",
                        a.name,
                        self.dump(),
                        a.output()
                    );
                }
            }
            if t.elapsed() > limit {
                let out: Vec<String> = agents.iter().map(|a| a.output()).collect();
                panic!(
                    "{what}: not within {limit:?}\n{}\n{}",
                    self.dump(),
                    out.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every volume is in one of `states`.
    #[track_caller]
    pub fn wait_all(&self, agents: &mut [&mut Agent], limit: Duration, states: &[&str]) {
        let what = format!("every volume in {states:?}");
        self.wait(agents, limit, &what, |f| {
            f.states().iter().all(|(_, s)| states.contains(&s.as_str()))
        });
    }
}

/// A running `fleet agent`; killed on drop.
pub struct Agent {
    pub name: String,
    pub state: PathBuf,
    /// `None` once stopped or killed.
    proc: Option<Spawned>,
}

impl Agent {
    fn spawned(&self) -> &Spawned {
        self.proc.as_ref().expect("the agent was stopped")
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| !p.exited())
    }

    /// Its complete stdout lines so far, each a JSON event (a line that
    /// is not one fails the test).
    pub fn events(&self) -> Vec<Value> {
        let out = self.spawned().stdout();
        let complete = out.rfind('\n').map_or("", |i| &out[..i]);
        complete
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("agent {}: stdout line is not JSON ({e}): {l:?}", self.name)
                })
            })
            .collect()
    }

    /// Its events named `name` so far.
    pub fn all(&self, name: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    /// How many passes it ended so far (its `pass_end` events).
    pub fn pass_ends(&self) -> usize {
        self.all("pass_end").len()
    }

    /// Waits (at most `limit`) for its first event named `name` that
    /// `pick` accepts.
    #[track_caller]
    pub fn wait_event(
        &mut self,
        name: &str,
        limit: Duration,
        pick: impl Fn(&Value) -> bool,
    ) -> Value {
        let t = Instant::now();
        loop {
            if let Some(e) = self.all(name).into_iter().find(|e| pick(e)) {
                return e;
            }
            if !self.running() || t.elapsed() > limit {
                panic!(
                    "agent {}: no such {name} event within {limit:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its stdout and stderr so far, for failure messages.
    pub fn output(&self) -> String {
        match &self.proc {
            Some(p) => format!(
                "--- agent {} stdout:\n{}\n--- agent {} stderr:\n{}",
                self.name,
                p.stdout(),
                self.name,
                p.stderr()
            ),
            None => format!("--- agent {}: stopped", self.name),
        }
    }

    /// Sends `sig` and waits (at most 60 s) for the exit; its whole run.
    #[track_caller]
    pub fn stop(&mut self, sig: i32) -> Run {
        let p = self.proc.take().expect("the agent was stopped");
        p.signal(sig);
        let mut run = p.finish(Duration::from_secs(60));
        run.desc = format!("fleet agent {}", self.name);
        run
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill9();
        }
    }
}

/// Asserts that agent `run` stopped by SIGTERM: exit 0, a
/// `fleet_agent_end`, every event with `ts`.
#[track_caller]
pub fn assert_stopped_clean(run: &Run) {
    assert_eq!(
        run.code,
        0,
        "SIGTERM must end an agent with exit 0\n{}",
        run.context()
    );
    run.only("fleet_agent_end");
    for e in &run.events {
        assert!(
            e["ts"].is_string(),
            "an event without ts: {e}\n{}",
            run.context()
        );
    }
}
