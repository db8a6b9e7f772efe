//! One function per subcommand: glue between typed settings and the library.
//!
//! Returns the exit status of a negative answer (1) as `Ok(1)`; failures are
//! `Err` and map to their own statuses in `main.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use crate::app::cli::{
    Allowed, Cli, Command, ConvergeArgs, CutoverArgs, ScanArg, ServeArgs, SyncArgs, SyncCmdArgs,
};
use crate::app::plan;
use crate::error::{Error, Result};
use crate::net::transport::{default_identity_dir, Identity};
use crate::pass::receiver::{self, Access, ServeConfig};
use crate::pass::sender::{self, SyncConfig};
use crate::progress::{Human, JsonLines, Progress};
use crate::store::state::default_state_dir;

/// The reporter the flags ask for.
pub fn reporter(cli: &Cli) -> Arc<dyn Progress> {
    if cli.json {
        Arc::new(JsonLines::default())
    } else if cli.command.is_agent() {
        // A daemon: its lines go to the log, with their time (or the
        // journal's priority), not as a terminal's bars.
        Arc::new(crate::fleet::agent::report::LogLines)
    } else {
        Arc::new(Human::new(cli.quiet).progress_every(cli.progress_interval))
    }
}

/// Runs the parsed command line; `Ok(status)` on a completed command.
pub async fn run(cli: Cli) -> Result<i32> {
    let progress = reporter(&cli);
    let json = cli.json;
    let every = cli.progress_interval;
    match cli.command {
        Command::Keygen { identity, force } => {
            let dir = identity.unwrap_or_else(default_identity_dir);
            let id = Identity::generate(&dir, force)?;
            say_identity(progress.as_ref(), json, &id.fingerprint());
            Ok(0)
        }
        Command::Fingerprint { identity } => {
            let dir = identity.unwrap_or_else(default_identity_dir);
            say_identity(
                progress.as_ref(),
                json,
                &Identity::load(&dir)?.fingerprint(),
            );
            Ok(0)
        }
        Command::Serve(args) => serve(args, progress, json).await,
        Command::Sync(args) => sync(args, progress).await,
        Command::Verify(args) => {
            metrics(args.endpoint.metrics)?;
            match args.volumes.single() {
                Some((source, dest)) => {
                    crate::app::verify::run(&args, source, dest, progress).await
                }
                None => plan::commands::verify(&args, progress).await,
            }
        }
        Command::Converge(args) => converge(args, progress).await,
        Command::Track(args) => track(args, progress, json).await,
        Command::Fleet(args) => crate::fleet::run(args, progress, every).await,
        Command::Cutover(args) => cutover(args, progress).await,
        Command::Unseal { name, state_dir } => {
            unseal(name, state_dir.unwrap_or_else(default_state_dir), progress).await
        }
        Command::Status {
            source,
            plan: plan_file,
            state_dir,
            window,
            margin,
            jobs,
        } => {
            let dir = state_dir.unwrap_or_else(default_state_dir);
            let judge = plan::status::Judge { window, margin };
            status(&dir, source, plan_file, jobs, judge, progress.as_ref())
        }
        Command::Bench { volume, size } => {
            crate::app::benchmark::run(volume, size.max(16 << 20), progress).await?;
            Ok(0)
        }
        Command::Demo { size } => {
            crate::app::demo::run(size, progress).await?;
            Ok(0)
        }
        Command::Completions { shell } => {
            crate::app::manual::completions(shell, json, progress.as_ref())
        }
        Command::Man { out } => crate::app::manual::man(out.as_deref(), json, progress.as_ref()),
    }
}

/// `sync`: one pass (or a dry run) of one volume, or of a plan's.
async fn sync(args: SyncCmdArgs, progress: Arc<dyn Progress>) -> Result<i32> {
    metrics(args.sync.endpoint.metrics)?;
    let Some((source, dest)) = args.volumes.single() else {
        return plan::commands::sync(&args, progress).await;
    };
    let cfg = sync_config(&args.sync, &args.scan, source, dest, "sync")?;
    let id = Identity::load(&args.sync.identity_dir())?;
    if args.dry_run {
        sender::dry_run(&cfg, &id, progress).await?;
        return Ok(0);
    }
    sender::run_pass(&cfg, &id, progress).await?;
    Ok(0)
}

/// `converge` of one volume, or of a plan's.
async fn converge(args: ConvergeArgs, progress: Arc<dyn Progress>) -> Result<i32> {
    let cc = converge_config(&args)?;
    metrics(args.sync.endpoint.metrics)?;
    match args.volumes.single() {
        Some((source, dest)) => {
            let cfg = sync_config(&args.sync, &args.scan, source, dest, "converge")?;
            let id = Identity::load(&args.sync.identity_dir())?;
            crate::app::cutover::converge(&cfg, &cc, &id, progress).await
        }
        None => plan::commands::converge(&args, cc, progress).await,
    }
}

/// `cutover` of one volume (which needs a FREEZE), or the group cutover
/// of a plan's.
async fn cutover(args: CutoverArgs, progress: Arc<dyn Progress>) -> Result<i32> {
    metrics(args.sync.endpoint.metrics)?;
    if args.margin.is_nan() || args.margin < 1.0 {
        return Err(Error::input("--margin must be at least 1.0"));
    }
    let Some((source, dest)) = args.volumes.single() else {
        return plan::commands::cutover(&args, progress).await;
    };
    let method = args.method().ok_or_else(|| {
        Error::input(
            "cutover needs a FREEZE: --fsfreeze MOUNTPOINT, --lvm-snapshot, --pre CMD --post CMD, or --assume-frozen",
        )
    })?;
    let mut cfg = sync_config(&args.sync, &args.scan, source, dest, "cutover")?;
    cfg.scan_choice = args.scan_choice()?;
    let id = Identity::load(&args.sync.identity_dir())?;
    let cc = crate::app::cutover::CutoverConfig {
        method,
        max_freeze: args.max_freeze,
        prove: args.verify == crate::app::cli::Proof::Full,
        force_no_forecast: args.force_no_forecast,
        margin: args.margin,
    };
    crate::app::cutover::cutover(&cfg, &cc, &id, progress).await
}

/// `status`: the volumes of the state directory, or of a plan.
fn status(
    dir: &std::path::Path,
    source: Option<std::path::PathBuf>,
    plan_file: Option<std::path::PathBuf>,
    jobs: Option<usize>,
    judge: plan::status::Judge,
    progress: &dyn Progress,
) -> Result<i32> {
    match plan_file {
        Some(f) => {
            let mut p = plan::Plan::load(&f)?;
            match jobs {
                Some(0) => {
                    return Err(Error::input(
                        "--jobs 0: at least one volume must be in flight",
                    ))
                }
                Some(j) => p.jobs = j,
                None => {}
            }
            plan::status::status(&p, dir, judge, progress)?
        }
        None => crate::pass::sender::status(dir, source.as_deref(), progress)?,
    }
    Ok(0)
}

/// `keygen`'s and `fingerprint`'s answer: the bare fingerprint line (the
/// only line on stdout, `--quiet` included), or under `--json` an
/// `identity` event.
fn say_identity(progress: &dyn Progress, json: bool, fingerprint: &str) {
    if json {
        progress.event(
            &json!({"event": "identity", "fingerprint": fingerprint}),
            fingerprint,
        );
    } else {
        progress.answer(fingerprint);
    }
}

/// Starts the metrics exporter when `--metrics` asks for one (exit 2 when
/// its address cannot be served).
fn metrics(addr: Option<std::net::SocketAddr>) -> Result<()> {
    match addr {
        Some(a) => crate::metrics::install(a),
        None => Ok(()),
    }
}

/// Typed settings of `converge` beyond its passes'.
fn converge_config(args: &ConvergeArgs) -> Result<crate::app::cutover::ConvergeConfig> {
    if args.margin.is_nan() || args.margin < 1.0 {
        return Err(Error::input("--margin must be at least 1.0"));
    }
    Ok(crate::app::cutover::ConvergeConfig {
        window: args.window,
        max_passes: args.max_passes.max(1),
        interval: args.interval,
        margin: args.margin,
        stop: None,
    })
}

/// Typed settings of a pass from `source` to `dest` from the flags.
pub fn sync_config(
    args: &SyncArgs,
    scan: &ScanArg,
    source: &Path,
    dest: &str,
    kind: &'static str,
) -> Result<SyncConfig> {
    let (dest, fp) = args.endpoint.remote(dest)?;
    let tuning = args.endpoint.tuning()?;
    let streams = match args.streams {
        Some(n) if n == 0 || n > 32 => {
            return Err(Error::input("--streams must be between 1 and 32"))
        }
        Some(n) => n,
        None => tuning.default_streams(),
    };
    Ok(SyncConfig {
        source: source.to_owned(),
        dest,
        server_fingerprint: fp,
        state_dir: args.state_dir(),
        chunk_size: args.chunk_size,
        streams,
        bwlimit: args.bwlimit,
        shared_pacer: None,
        scan: args.scan(),
        tuning,
        kind,
        read_from: None,
        retry_for: args.retry_for,
        proof_read: false,
        new_source: args.new_source,
        receiver_answered: false,
        scan_choice: scan.scan,
        audit_percent: scan.audit,
        tracked_proof: false,
        scan_reason: None,
    })
}

async fn track(
    args: crate::app::cli::TrackArgs,
    progress: Arc<dyn Progress>,
    json: bool,
) -> Result<i32> {
    let cfg = crate::app::track::TrackConfig {
        sources: args.sources,
        state_dir: args.state_dir.unwrap_or_else(default_state_dir),
        buffer_kb: u32::try_from(args.trace_buffer.div_ceil(1024)).unwrap_or(u32::MAX),
        json,
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let work =
        tokio::task::spawn_blocking(move || crate::app::track::run(&cfg, progress.as_ref(), &flag));
    tokio::pin!(work);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let stopped = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    tokio::select! {
        r = &mut work => return r.map_err(|_| Error::Io("the tracker failed".into()))?,
        _ = stopped => {}
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    work.await
        .map_err(|_| Error::Io("the tracker failed".into()))?
}

/// `nightpass serve`: its log on stderr; on stdout nothing, or under
/// `--json` one `listening` event (the address bound, a port 0 resolved).
async fn serve(args: ServeArgs, progress: Arc<dyn Progress>, json: bool) -> Result<i32> {
    let allowed = args.allowed()?;
    metrics(args.metrics)?;
    let (updates_tx, updates) = tokio::sync::watch::channel(Access {
        allowed: allowed.fingerprints.clone(),
        limits: allowed.limits.clone(),
    });
    let cfg = ServeConfig {
        listen: args.listen,
        volumes: args.volume_map()?,
        allowed: allowed.fingerprints.clone(),
        limits: allowed.limits.clone(),
        max_size: args.max_size,
        state_dir: args.state_dir.clone().unwrap_or_else(default_state_dir),
        tuning: args.quic.tuning(),
        max_sessions: args.max_sessions,
        max_sessions_per_sender: args.max_sessions_per_sender,
        access_updates: Some(updates),
    };
    let id = Identity::load(&args.identity.clone().unwrap_or_else(default_identity_dir))?;
    let reloads = tokio::spawn(reload_on_sighup(args, allowed, updates_tx));
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down: finishing durable writes");
    };
    let served = receiver::serve(
        cfg,
        id,
        |addr, fp| {
            tracing::info!(target: "nightpass::contract", "listening on {addr} fingerprint {fp}");
            // JSON only: a human reads the log line, and stdout stays empty.
            if json {
                progress.event(
                    &json!({"event": "listening", "address": addr.to_string(), "fingerprint": fp}),
                    "",
                );
            }
            // Under systemd (Type=notify): serving from now on.
            crate::app::track::notify_ready();
        },
        shutdown,
    )
    .await;
    reloads.abort();
    served?;
    Ok(0)
}

/// On each SIGHUP, re-reads the allowed senders (`--allow` and
/// `--allow-file`), logs what changed and hands the new list to the
/// receiver; a file that cannot be read or parsed is logged and changes
/// nothing. A SIGHUP never ends `serve`.
async fn reload_on_sighup(
    args: ServeArgs,
    mut now: Allowed,
    updates: tokio::sync::watch::Sender<Access>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let Some(file) = &args.allow_file else {
            tracing::info!(
                "SIGHUP: no --allow-file to re-read; the allowed senders stay as they are"
            );
            continue;
        };
        let fresh = match args.allowed() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("SIGHUP: {e}; the allowed senders stay as they were");
                continue;
            }
        };
        let changes = allow_changes(&now, &fresh);
        if changes.is_empty() {
            tracing::info!("SIGHUP: re-read {}: no change", file.display());
            continue;
        }
        tracing::info!(
            "SIGHUP: re-read {}: {}; sessions in progress run to their end",
            file.display(),
            changes.join("; ")
        );
        let _ = updates.send(Access {
            allowed: fresh.fingerprints.clone(),
            limits: fresh.limits.clone(),
        });
        now = fresh;
    }
}

/// What differs between two lists of allowed senders, one phrase per
/// sender, in fingerprint order: `allowed FP (every volume)`, `removed FP`,
/// `FP now on a, b`.
pub fn allow_changes(old: &Allowed, new: &Allowed) -> Vec<String> {
    let scope = |a: &Allowed, fp: &str| match a.limits.get(fp) {
        None => "every volume".to_string(),
        Some(names) => {
            let mut n: Vec<&str> = names.iter().map(String::as_str).collect();
            n.sort();
            n.join(",")
        }
    };
    let mut fps: Vec<&String> = old.fingerprints.union(&new.fingerprints).collect();
    fps.sort();
    fps.into_iter()
        .filter_map(
            |fp| match (old.fingerprints.contains(fp), new.fingerprints.contains(fp)) {
                (false, true) => Some(format!("allowed {fp} ({})", scope(new, fp))),
                (true, false) => Some(format!("removed {fp}")),
                _ if scope(old, fp) != scope(new, fp) => Some(format!(
                    "{fp} now on {} (was {})",
                    scope(new, fp),
                    scope(old, fp)
                )),
                _ => None,
            },
        )
        .collect()
}

/// `nightpass unseal NAME`: lifts a volume's seal on the receiver host.
async fn unseal(name: String, state_dir: PathBuf, progress: Arc<dyn Progress>) -> Result<i32> {
    use crate::store::seal::Rebuilt;
    let (n, p) = (name.clone(), progress.clone());
    // Writes and fsyncs state files: off the async workers.
    let u =
        tokio::task::spawn_blocking(move || crate::store::seal::unseal(&state_dir, &n, p.as_ref()))
            .await
            .map_err(|_| Error::Io("unseal task failed".into()))??;
    let changed = match u.manifest {
        Rebuilt::Deferred => "the next pass rebuilds its manifest from a fresh read of the target, then resends every chunk that differs",
        Rebuilt::None => "it has no manifest, so the next pass starts from nothing",
    };
    progress.event(
        &json!({
            "event": "unsealed",
            "volume": name,
            "consistency_point": u.seal.consistency_point,
            "cutover_at": u.seal.cutover_at,
        }),
        &format!(
            "volume '{name}' unsealed: the cutover of {} (consistency point {}) no longer protects it; {changed}. The next pass into it overwrites what the new site wrote",
            u.seal.cutover_at, u.seal.consistency_point
        ),
    );
    Ok(0)
}
