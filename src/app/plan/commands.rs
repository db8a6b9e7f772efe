//! `sync`, `converge` and `verify` with `--plan`: the plan's settings
//! merged with the command line's, every volume's settings checked before
//! the first starts, then [`super::run::run`] over the volumes.
//!
//! The command line wins over the plan for `bwlimit` and `chunk_size`; the
//! receiver and its fingerprint are the plan's (a different
//! `--server-fingerprint` is refused). Owns no pass.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::run::run;
use super::Plan;
use crate::app::cli::{ConvergeArgs, Endpoint, ScanArg, SyncArgs, SyncCmdArgs, VerifyArgs};
use crate::app::commands::sync_config;
use crate::app::cutover::ConvergeConfig;
use crate::error::{Error, Result};
use crate::net::transport::{parse_fingerprint, Identity};
use crate::pass::sender::{self, Pacer, SyncConfig};
use crate::progress::Progress;

/// The plan named by `--plan` (clap requires it when SOURCE and DEST are
/// absent), checked whole.
fn load(plan: Option<&Path>) -> Result<Plan> {
    let path = plan.ok_or_else(|| Error::input("give SOURCE and DEST, or --plan FILE"))?;
    Plan::load(path)
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
fn pass_configs(
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
fn config_of(cfgs: &HashMap<String, SyncConfig>, name: &str) -> Result<SyncConfig> {
    cfgs.get(name)
        .cloned()
        .ok_or_else(|| Error::Io(format!("no settings for volume '{name}'")))
}

/// `sync --plan`: one pass of every volume (with `--dry-run`, what each
/// would send).
pub async fn sync(args: &SyncCmdArgs, progress: Arc<dyn Progress>) -> Result<i32> {
    let plan = load(args.volumes.plan.as_deref())?;
    let cfgs = Arc::new(pass_configs(&args.sync, &args.scan, &plan, "sync")?);
    let id = Arc::new(Identity::load(&args.sync.identity_dir())?);
    let dry_run = args.dry_run;
    run(&plan, "sync", progress, move |v, p, _stop| {
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
    let plan = load(args.volumes.plan.as_deref())?;
    let cfgs = Arc::new(pass_configs(&args.sync, &args.scan, &plan, "converge")?);
    let id = Arc::new(Identity::load(&args.sync.identity_dir())?);
    run(&plan, "converge", progress, move |v, p, stop| {
        let (cfgs, id) = (cfgs.clone(), id.clone());
        let cc = ConvergeConfig {
            stop: Some(stop),
            ..cc.clone()
        };
        async move {
            let cfg = config_of(&cfgs, &v.name)?;
            crate::app::cutover::converge(&cfg, &cc, &id, p).await
        }
    })
    .await
}

/// `verify --plan`: every volume compared with its target.
pub async fn verify(args: &VerifyArgs, progress: Arc<dyn Progress>) -> Result<i32> {
    let plan = load(args.volumes.plan.as_deref())?;
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
