//! `nightpass fleet agent`: a sender host's worker in the fleet.
//!
//! Owns the agent's loop: it waits for the database and its schema, then,
//! until SIGINT or SIGTERM, sends what its spool holds, starts the group
//! cutover of each of its host's filers whose night has come and is
//! ready ([`nights`]), and claims due volumes under leases, up to `--jobs`
//! at once, one pass per claim ([`pass`]). The red button and the caps
//! are checked by the claim itself ([`crate::fleet::lease::claim`]). The
//! first signal stops claiming and lets the passes in flight end and be
//! recorded; a second drops them (a night in progress always ends: it is
//! bounded by its window). The database away, the agent waits and
//! retries; what it must record waits in its spool ([`spool`]). It writes
//! no row itself: every SQL statement is in [`crate::fleet`]'s other
//! modules.

pub mod nights;
pub mod pass;
pub mod report;
pub mod spool;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::db::{Attempt, Pool};
use super::lease::{self, NoClaim};
use super::ops::this_host;
use super::record::{Ended, Readiness, Recorded};
use super::{schema, DbSettings};
use crate::app::cli::AgentArgs;
use crate::error::{Error, Result};
use crate::net::transport::Identity;
use crate::progress::Progress;
use report::Report;
use spool::{Spool, Spooled};

/// What every task of an agent shares.
pub struct Ctx {
    /// The fleet's database.
    pub pool: Pool,
    /// The host whose work this agent does.
    pub host: String,
    /// This agent's name in leases and history.
    pub name: String,
    /// Its flags.
    pub args: AgentArgs,
    /// The sender's identity.
    pub identity: Arc<Identity>,
    /// Where records wait for the database.
    pub spool: Spool,
    /// Where the agent speaks.
    pub progress: Arc<dyn Progress>,
    /// Spooled records being sent right now (not sent again meanwhile).
    sending: Mutex<HashSet<PathBuf>>,
    /// The last condition said while waiting (said once, not every poll).
    said: Mutex<String>,
    /// How often a pass says how far it is (0: never).
    pub every: Duration,
}

impl Ctx {
    /// The readiness settings with a night share of `share_s`.
    pub fn readiness(&self, share_s: f64) -> Readiness {
        Readiness {
            share_s,
            margin: self.args.margin,
            interval_s: self.args.interval.as_secs_f64(),
            ready_interval_s: self.args.ready_interval.as_secs_f64(),
        }
    }

    /// Keeps `s` in the spool, then sends it; what the database does not
    /// take now waits in the spool for [`Ctx::flush`].
    pub async fn send(&self, s: Spooled) {
        let path = match self.spool.keep(&s) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!("cannot spool a record ({e}); sending it without a copy");
                None
            }
        };
        self.send_kept(path, &s).await;
    }

    /// Sends the spooled `s` (kept at `path`) unless already on its way.
    async fn send_kept(&self, path: Option<PathBuf>, s: &Spooled) {
        if let Some(p) = &path {
            let mut sending = self.sending.lock().expect("not poisoned");
            if !sending.insert(p.clone()) {
                return;
            }
        }
        let sent = s.send(&self.pool).await;
        if let Some(p) = &path {
            self.sending.lock().expect("not poisoned").remove(p);
        }
        match sent {
            Ok(recorded) => {
                if let Some(p) = &path {
                    self.spool.done(p);
                }
                self.recorded(s, recorded);
            }
            Err(e) => self.waiting(
                "database",
                &format!(
                    "{e}; what must be recorded waits in {}",
                    self.spool.dir().display()
                ),
            ),
        }
    }

    /// Sends everything the spool holds; stops at the first failure.
    pub async fn flush(&self) {
        for (path, s) in self.spool.waiting() {
            self.send_kept(Some(path.clone()), &s).await;
            if path.exists() {
                return;
            }
        }
    }

    /// Says what the database now holds of a pass.
    fn recorded(&self, s: &Spooled, r: Option<Recorded>) {
        let (Spooled::Pass(p), Some(r)) = (s, r) else {
            return;
        };
        let report = Report::new(&p.lease.filer, Some(&p.lease.name), self.progress.clone());
        let (ok, failure, result) = match &p.ended {
            Ended::Done(_) => (true, None, "ok"),
            Ended::Failed(w) => (false, Some(w.clone()), "failed"),
            Ended::Dropped(w) => (false, Some(w.clone()), "dropped"),
        };
        crate::metrics::fleet_pass_recorded(result);
        let state = r.state.clone();
        report.event(
            &json!({
                "event": "fleet_pass_recorded",
                "agent": self.name,
                "token": p.lease.token,
                "ok": ok,
                "state": state,
                "forecast_final_pass_s": p.forecast_s.map(|f| (f * 100.0).round() / 100.0),
                "failure": failure,
                "auto_paused": r.auto_paused,
                "removed": r.removed,
            }),
            &match (&state, r.removed) {
                (_, true) => "not recorded: the volume was removed from the fleet".into(),
                (Some(s), _) if !ok => format!(
                    "pass not completed: {}; now {s}",
                    failure.as_deref().unwrap_or("")
                ),
                (Some(s), _) => format!("recorded; now {s}"),
                (None, _) => {
                    "recorded (the lease had been lost: its state left to its holder)".into()
                }
            },
        );
        if let Some(why) = &r.auto_paused {
            self.progress.event(
                &json!({"event": "fleet_paused", "paused": true, "reason": why, "by": self.name}),
                &format!("the fleet is paused by itself: {why}"),
            );
        }
    }

    /// Says once (until the condition changes) why the agent waits.
    fn waiting(&self, reason: &str, detail: &str) {
        let key = format!("{reason}: {detail}");
        let mut said = self.said.lock().expect("not poisoned");
        if *said == key {
            return;
        }
        *said = key;
        self.progress.event(
            &json!({"event": "fleet_agent_waiting", "agent": self.name, "reason": reason, "detail": detail}),
            &format!("agent {}: waiting: {reason}: {detail}", self.name),
        );
    }

    /// The agent works again after a pause or the database's absence: a
    /// later wait is said anew (being idle between passes is said once).
    fn working(&self) {
        let mut said = self.said.lock().expect("not poisoned");
        if !said.starts_with("idle") {
            said.clear();
        }
    }
}

/// SIGINT and SIGTERM, counted.
struct Signals {
    int: Signal,
    term: Signal,
    first: Option<SignalKind>,
    count: u32,
}

impl Signals {
    fn new() -> Result<Signals> {
        let open = |k| signal(k).map_err(|e| Error::io("installing a signal handler", e));
        Ok(Signals {
            int: open(SignalKind::interrupt())?,
            term: open(SignalKind::terminate())?,
            first: None,
            count: 0,
        })
    }

    /// The next signal.
    async fn recv(&mut self) {
        let kind = tokio::select! {
            _ = self.int.recv() => SignalKind::interrupt(),
            _ = self.term.recv() => SignalKind::terminate(),
        };
        self.first.get_or_insert(kind);
        self.count += 1;
    }

    /// The exit status: 130 when stopped by SIGINT, 0 by SIGTERM (its
    /// service manager stopping it).
    fn code(&self) -> i32 {
        match self.first {
            Some(k) if k == SignalKind::interrupt() => 130,
            _ => 0,
        }
    }
}

/// `HOST:PID:XXXX`, unique per process.
fn default_name(host: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h = blake3::Hasher::new();
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let tag = h.finalize().to_hex();
    format!("{host}:{}:{}", std::process::id(), &tag[..4])
}

/// The agent's flags checked, and what its tasks share.
fn context(args: AgentArgs, db: DbSettings, progress: Arc<dyn Progress>) -> Result<Ctx> {
    if args.jobs == 0 {
        return Err(Error::input(
            "--jobs 0: an agent runs at least one pass at a time",
        ));
    }
    if args.lease < Duration::from_secs(1) {
        return Err(Error::input(
            "--lease must be at least 1s (it is renewed every third of it)",
        ));
    }
    if args.poll.is_zero() {
        return Err(Error::input("--poll must be longer than 0"));
    }
    if args.margin.is_nan() || args.margin < 1.0 {
        return Err(Error::input("--margin must be at least 1.0"));
    }
    let host = match &args.host {
        Some(h) if h.trim().is_empty() => return Err(Error::input("--host must not be empty")),
        Some(h) => h.clone(),
        None => this_host()?,
    };
    let name = args.name.clone().unwrap_or_else(|| default_name(&host));
    let identity = Arc::new(Identity::load(&args.sync.identity_dir())?);
    let spool = Spool::new(&args.sync.state_dir());
    let pool = Pool::new(db, args.jobs + 4);
    Ok(Ctx {
        pool,
        host,
        name,
        args,
        identity,
        spool,
        progress,
        sending: Mutex::new(HashSet::new()),
        said: Mutex::new(String::new()),
        every: Duration::ZERO,
    })
}

/// Waits until the database answers with the schema this binary knows;
/// false when a signal came first. What waiting would not cure is an
/// error: a schema missing or not ours (exit 2), a wrong password, no such
/// database, a certificate not trusted (exit 3).
async fn wait_for_schema(ctx: &Ctx, signals: &mut Signals) -> Result<bool> {
    loop {
        match ctx.pool.probe().await {
            Err(Attempt::Lasting(e)) => return Err(e),
            Err(Attempt::Retry(why)) => ctx.waiting(
                "database",
                &format!("database {}: cannot connect yet: {why}", ctx.pool.target()),
            ),
            Ok(()) => match schema::check(&ctx.pool).await {
                Ok(()) => return Ok(true),
                Err(e @ Error::Network(_)) => ctx.waiting("database", &e.to_string()),
                Err(e) => return Err(e),
            },
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.args.poll.max(Duration::from_secs(1))) => {}
            _ = signals.recv() => return Ok(false),
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(
    args: AgentArgs,
    db: DbSettings,
    progress: Arc<dyn Progress>,
    every: Duration,
) -> Result<i32> {
    if let Some(addr) = args.sync.endpoint.metrics {
        crate::metrics::install(addr)?;
    }
    let mut ctx = context(args, db, progress)?;
    ctx.every = every;
    let ctx = Arc::new(ctx);
    let mut signals = Signals::new()?;
    if !wait_for_schema(&ctx, &mut signals).await? {
        return Ok(signals.code());
    }
    ctx.working();
    ctx.progress.event(
        &json!({
            "event": "fleet_agent_start",
            "agent": ctx.name,
            "host": ctx.host,
            "database": ctx.pool.target(),
            "jobs": ctx.args.jobs,
            "lease_s": ctx.args.lease.as_secs_f64(),
        }),
        &format!(
            "agent {} working for host {} (database {}, {} passes at once, leases of {:.0} s)",
            ctx.name,
            ctx.host,
            ctx.pool.target(),
            ctx.args.jobs,
            ctx.args.lease.as_secs_f64()
        ),
    );
    warn_unknown_host(&ctx).await;
    let (cancel, cancelled) = watch::channel(false);
    let mut work = Work::default();
    while signals.count == 0 {
        ctx.flush().await;
        if let Err(e) = nights::consider(&ctx, &mut work.running, &mut work.nights).await {
            ctx.waiting("database", &e.to_string());
        }
        let paused = fill(&ctx, &mut work.passes, &cancelled).await;
        crate::metrics::fleet_agent(ctx.spool.waiting().len(), paused, work.passes.len());
        tokio::select! {
            Some(_) = work.passes.join_next(), if !work.passes.is_empty() => {}
            Some(r) = work.nights.join_next(), if !work.nights.is_empty() => work.ended_night(r),
            _ = tokio::time::sleep(ctx.args.poll) => {}
            _ = signals.recv() => {}
        }
    }
    drain(&ctx, &mut work, &mut signals, &cancel).await;
    ctx.flush().await;
    let code = signals.code();
    ctx.progress.event(
        &json!({"event": "fleet_agent_end", "agent": ctx.name, "exit_code": code,
                "spooled": ctx.spool.waiting().len()}),
        &format!("agent {} stopped", ctx.name),
    );
    if code == 130 {
        // Stopped by SIGINT: said as every interrupted command says it.
        return Err(Error::Interrupted);
    }
    Ok(code)
}

/// Says so when no filer of the fleet is registered for this agent's host
/// (a host name that differs from `fleet add --host`'s), naming those that
/// are; the agent still waits for one.
async fn warn_unknown_host(ctx: &Ctx) {
    let Ok(hosts) = lease::hosts(&ctx.pool).await else {
        return;
    };
    if hosts.contains(&ctx.host) {
        return;
    }
    let known = if hosts.is_empty() {
        "none yet".to_string()
    } else {
        hosts.join(", ")
    };
    ctx.waiting(
        "no_filer",
        &format!(
            "no filer is registered for host '{}' (hosts in the fleet: {known}); \
             --host must name the host as `fleet add --host` did",
            ctx.host
        ),
    );
}

/// The agent's work in flight.
#[derive(Default)]
struct Work {
    passes: JoinSet<()>,
    nights: JoinSet<String>,
    /// Filers whose night runs here.
    running: HashSet<String>,
}

impl Work {
    fn ended_night(&mut self, r: std::result::Result<String, tokio::task::JoinError>) {
        match r {
            Ok(filer) => {
                self.running.remove(&filer);
            }
            Err(e) => tracing::error!("a night's task failed: {e}"),
        }
    }
}

/// Claims volumes until `--jobs` passes are in flight or nothing is due;
/// true when the fleet is paused.
async fn fill(ctx: &Arc<Ctx>, passes: &mut JoinSet<()>, cancelled: &watch::Receiver<bool>) -> bool {
    while passes.len() < ctx.args.jobs {
        let asked = tokio::time::Instant::now();
        match lease::claim(&ctx.pool, &ctx.host, &ctx.name, ctx.args.lease).await {
            Ok(Ok(l)) => {
                ctx.working();
                passes.spawn(pass::run(ctx.clone(), l, asked, cancelled.clone()));
            }
            Ok(Err(NoClaim::Paused(why))) => {
                let why = why.unwrap_or_else(|| "no reason given".into());
                ctx.waiting(
                    "paused",
                    &format!("the fleet is paused ({why}): no new pass"),
                );
                return true;
            }
            Ok(Err(NoClaim::Idle)) => {
                if passes.is_empty() {
                    ctx.waiting("idle", "nothing due on this host");
                }
                return false;
            }
            Err(e) => {
                ctx.waiting("database", &e.to_string());
                return false;
            }
        }
    }
    false
}

/// After the first signal: no new claim; the work in flight ends and is
/// recorded; a second signal drops the passes (a night runs on).
async fn drain(ctx: &Ctx, work: &mut Work, signals: &mut Signals, cancel: &watch::Sender<bool>) {
    let (p, n) = (work.passes.len(), work.nights.len());
    if p + n > 0 {
        ctx.progress.note(&format!(
            "agent {}: stopping: no new pass; waiting for {p} passes and {n} nights in flight \
             to end (a second signal drops the passes)",
            ctx.name
        ));
    }
    while !(work.passes.is_empty() && work.nights.is_empty()) {
        tokio::select! {
            Some(_) = work.passes.join_next(), if !work.passes.is_empty() => {}
            Some(r) = work.nights.join_next(), if !work.nights.is_empty() => work.ended_night(r),
            _ = signals.recv() => {
                let _ = cancel.send(true);
            }
        }
    }
}
