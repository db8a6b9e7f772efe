//! `sync`, `converge` and `verify` with `--plan`: the plan's settings
//! merged with the command line's, every volume's settings checked before
//! the first starts, then [`super::run::run`] over the volumes.
//!
//! The command line wins over the plan for `bwlimit` and `chunk_size`; the
//! receiver and its fingerprint are the plan's (a different
//! `--server-fingerprint` is refused). Owns no pass.

use std::collections::HashMap;
use std::sync::Arc;

use super::run::{group_end, run};
use super::status::{group_forecast, Judge};
use super::tagged::{Tagged, Total};
use super::{FilerFreeze, Plan};
use crate::app::cli::{
    ConvergeArgs, CutoverArgs, Endpoint, Proof, ScanArg, SyncArgs, SyncCmdArgs, VerifyArgs, Volumes,
};
use crate::app::commands::sync_config;
use crate::app::cutover::group::{group_cutover, GroupConfig, GroupFailure, GroupVolume};
use crate::app::cutover::ConvergeConfig;
use crate::error::{Error, Result};
use crate::io::freeze::Method;
use crate::net::transport::{parse_fingerprint, Identity};
use crate::pass::sender::{self, Pacer, SyncConfig};
use crate::progress::Progress;

/// The plan named by `--plan` (clap requires it when SOURCE and DEST are
/// absent), checked whole.
fn load(volumes: &Volumes) -> Result<Plan> {
    let path = (volumes.plan.as_deref())
        .ok_or_else(|| Error::input("give SOURCE and DEST, or --plan FILE"))?;
    let mut plan = Plan::load(path)?;
    match volumes.jobs {
        Some(0) => {
            return Err(Error::input(
                "--jobs 0: at least one volume must be in flight",
            ))
        }
        Some(j) => plan.jobs = j,
        None => {}
    }
    match volumes.max_failures {
        Some(0) => return Err(Error::input("--max-failures 0: use at least 1")),
        Some(m) => plan.max_failures = Some(m),
        None => {}
    }
    Ok(plan)
}

/// The command line's receiver settings with the plan's fingerprint.
fn endpoint(e: &Endpoint, plan: &Plan) -> Result<Endpoint> {
    if let Some(fp) = &e.server_fingerprint {
        if parse_fingerprint(fp)? != plan.server_fingerprint {
            return Err(Error::input(format!(
                "--server-fingerprint {fp} is not the plan's server_fingerprint ({}); drop the flag, the plan names its receiver",
                plan.server_fingerprint
            )));
        }
    }
    let mut e = e.clone();
    e.server_fingerprint = Some(plan.server_fingerprint.clone());
    Ok(e)
}

/// Every volume's pass settings, checked before the first starts, with
/// one pacer for all of them when a bandwidth limit is in force.
pub fn pass_configs(
    args: &SyncArgs,
    scan: &ScanArg,
    plan: &Plan,
    kind: &'static str,
) -> Result<HashMap<String, SyncConfig>> {
    let mut args = args.clone();
    args.endpoint = endpoint(&args.endpoint, plan)?;
    args.bwlimit = args.bwlimit.or(plan.bwlimit);
    args.chunk_size = args.chunk_size.or(plan.chunk_size);
    let pacer = args.bwlimit.map(|limit| Arc::new(Pacer::new(limit)));
    plan.volumes
        .iter()
        .map(|v| {
            let mut cfg = sync_config(&args, scan, &v.source, &v.dest.to_string(), kind)?;
            cfg.shared_pacer = pacer.clone();
            Ok((v.name.clone(), cfg))
        })
        .collect()
}

/// The settings of volume `name`, which [`pass_configs`] made for every
/// volume of the plan.
pub fn config_of(cfgs: &HashMap<String, SyncConfig>, name: &str) -> Result<SyncConfig> {
    cfgs.get(name)
        .cloned()
        .ok_or_else(|| Error::Io(format!("no settings for volume '{name}'")))
}

/// `sync --plan`: one pass of every volume (with `--dry-run`, what each
/// would send).
pub async fn sync(args: &SyncCmdArgs, progress: Arc<dyn Progress>) -> Result<i32> {
    let plan = load(&args.volumes)?;
    let cfgs = Arc::new(pass_configs(&args.sync, &args.scan, &plan, "sync")?);
    let id = Arc::new(Identity::load(&args.sync.identity_dir())?);
    let dry_run = args.dry_run;
    let command = if dry_run { "dry_run" } else { "sync" };
    run(&plan, command, progress, move |v, p, _stop| {
        let (cfgs, id) = (cfgs.clone(), id.clone());
        async move {
            let cfg = config_of(&cfgs, &v.name)?;
            if dry_run {
                sender::dry_run(&cfg, &id, p).await.map(|_| 0)
            } else {
                sender::run_pass(&cfg, &id, p).await.map(|_| 0)
            }
        }
    })
    .await
}

/// `converge --plan`: every volume converges on its own, within `jobs`.
pub async fn converge(
    args: &ConvergeArgs,
    cc: ConvergeConfig,
    progress: Arc<dyn Progress>,
) -> Result<i32> {
    let plan = load(&args.volumes)?;
    let cfgs = Arc::new(pass_configs(&args.sync, &args.scan, &plan, "converge")?);
    let id = Arc::new(Identity::load(&args.sync.identity_dir())?);
    // The group cutover runs the frozen passes `jobs` at a time: each
    // volume must fit its share of the window, ceil(volumes / jobs) in a row.
    let rounds = plan.volumes.len().div_ceil(plan.jobs).max(1) as u32;
    let judge = Judge {
        window: Some(cc.window),
        margin: cc.margin,
    };
    let share = ConvergeConfig {
        window: cc.window / rounds,
        ..cc
    };
    let (group_cfgs, group_plan, group_progress) = (cfgs.clone(), plan.clone(), progress.clone());
    let code = run(&plan, "converge", progress, move |v, p, stop| {
        let (cfgs, id) = (cfgs.clone(), id.clone());
        let cc = ConvergeConfig {
            stop: Some(stop),
            ..share.clone()
        };
        async move {
            let cfg = config_of(&cfgs, &v.name)?;
            crate::app::cutover::converge(&cfg, &cc, &id, p).await
        }
    })
    .await?;
    if code == 130 {
        return Ok(code);
    }
    // Every volume fits its share (or not: the forecast still says where
    // the filer stands); the group's forecast says whether it fits whole.
    let forecasts = group_plan
        .volumes
        .iter()
        .map(|v| {
            let cfg = config_of(&group_cfgs, &v.name)?;
            let records = sender::journal(&cfg).read()?;
            let history = sender::history_now(&cfg, &records);
            Ok(
                nightpass_proto::plan::forecast(&history, crate::progress::now_unix())
                    .map(|f| f.total_s),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let fits = group_forecast(&group_plan, &forecasts, 0, judge, group_progress.as_ref());
    Ok(match (code, fits) {
        (0, Some(true)) => 0,
        (0, _) => 1,
        _ => code,
    })
}

/// `verify --plan`: every volume compared with its target.
pub async fn verify(args: &VerifyArgs, progress: Arc<dyn Progress>) -> Result<i32> {
    let plan = load(&args.volumes)?;
    let mut args = args.clone();
    args.endpoint = endpoint(&args.endpoint, &plan)?;
    args.endpoint.tuning()?;
    Identity::load(&args.endpoint.identity_dir())?;
    let args = Arc::new(args);
    run(&plan, "verify", progress, move |v, p, _stop| {
        let args = args.clone();
        async move { crate::app::verify::run(&args, &v.source, &v.dest.to_string(), p).await }
    })
    .await
}

/// The freeze of each volume of a plan cutover: its own `fsfreeze` mount,
/// else the filer's (the command line's `--pre`/`--post`/`--assume-frozen`,
/// which win, else the plan's); a volume with neither makes the plan bad
/// for a cutover (exit 2).
fn freeze_of(args: &CutoverArgs, plan: &Plan) -> Result<HashMap<String, Method>> {
    if args.fsfreeze.is_some() || args.lvm_snapshot {
        return Err(Error::input(
            "with --plan, a volume's mount to freeze is its plan entry's fsfreeze; --fsfreeze and --lvm-snapshot name one volume's freeze",
        ));
    }
    plan_freeze(args.method(), plan)
}

/// The freeze of each volume of `plan`'s cutover: its own `fsfreeze`
/// mount, else `filer` (the command line's), else the plan's `pre`/`post`
/// or `assume_frozen`; a volume with none makes the plan bad for a
/// cutover (exit 2).
pub fn plan_freeze(filer: Option<Method>, plan: &Plan) -> Result<HashMap<String, Method>> {
    let filer = filer.or_else(|| match &plan.freeze {
        FilerFreeze {
            pre: Some(pre),
            post: Some(post),
            ..
        } => Some(Method::Hooks {
            pre: pre.clone(),
            post: post.clone(),
        }),
        f if f.assume_frozen => Some(Method::AssumeFrozen),
        _ => None,
    });
    plan.volumes
        .iter()
        .map(|v| {
            let m = match (&v.fsfreeze, &filer) {
                (Some(mp), _) => Method::Fsfreeze(mp.clone()),
                (None, Some(f)) => f.clone(),
                (None, None) => {
                    return Err(Error::input(format!(
                        "plan {}: volume '{}' has no fsfreeze and the filer no freeze (pre and post, or assume_frozen, in the plan or on the command line): nothing would stop its writers; nothing was started",
                        plan.path.display(),
                        v.name
                    )))
                }
            };
            m.check(&v.source)
                .map_err(|e| e.context(&format!("volume '{}'", v.name)))?;
            Ok((v.name.clone(), m))
        })
        .collect()
}

/// Reports a failed group cutover as a plan run reports its volumes: the
/// error (on stderr, and as an `error` event naming the volume it failed
/// in), a `volume_end` per volume (that one `failed`, the others
/// `not_certified`), then `plan_end`; returns the exit status.
fn group_failed(
    progress: &dyn Progress,
    plan: &Plan,
    f: GroupFailure,
    started: std::time::Instant,
) -> i32 {
    let code = f.error.exit_code();
    let message = f.error.to_string();
    tracing::error!("nightpass: error: {message}");
    progress.event(
        &serde_json::json!({"event": "error", "volume": f.volume, "message": message, "exit_code": code}),
        "",
    );
    for v in &plan.volumes {
        let culprit = f.volume.as_deref() == Some(v.name.as_str());
        let result = if culprit { "failed" } else { "not_certified" };
        progress.event(
            &serde_json::json!({"event": "volume_end", "volume": v.name, "command": "cutover", "result": result, "exit_code": code}),
            &format!("{}: cutover {}", v.name, if culprit { "failed" } else { "not certified (the group failed)" }),
        );
    }
    group_end(progress, plan, Some(&f.error), started);
    code
}

/// `cutover --plan`: every volume frozen at once, their final passes run
/// within `jobs`, proven, thawed, and certified all or none under one group
/// consistency point ([`crate::app::cutover::group`]).
pub async fn cutover(args: &CutoverArgs, progress: Arc<dyn Progress>) -> Result<i32> {
    let plan = load(&args.volumes)?;
    let methods = freeze_of(args, &plan)?;
    let mut cfgs = pass_configs(&args.sync, &args.scan, &plan, "cutover")?;
    let choice = args.scan_choice()?;
    for cfg in cfgs.values_mut() {
        cfg.scan_choice = choice;
    }
    let id = Arc::new(Identity::load(&args.sync.identity_dir())?);
    let total = Total::new(None, plan.volumes.len(), 0);
    let volumes = plan
        .volumes
        .iter()
        .map(|v| {
            Ok(GroupVolume {
                name: v.name.clone(),
                cfg: config_of(&cfgs, &v.name)?,
                method: methods[&v.name].clone(),
                progress: Tagged::new(&v.name, progress.clone(), total.clone()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let gc = GroupConfig {
        jobs: plan.jobs,
        max_freeze: args.max_freeze,
        prove: args.verify == Proof::Full,
        force_no_forecast: args.force_no_forecast,
        margin: args.margin,
    };
    let started = std::time::Instant::now();
    match group_cutover(volumes, &gc, id, progress.clone()).await {
        Ok(code) => {
            group_end(progress.as_ref(), &plan, None, started);
            Ok(code)
        }
        Err(f) => Ok(group_failed(progress.as_ref(), &plan, f, started)),
    }
}
