//! One claimed volume's pass inside an agent: from the claim to the
//! record.
//!
//! Owns a pass's life under its lease: the volume moved to its working
//! state, its settings from the filer's registered plan and the agent's
//! flags, the pass itself (the sender's own, as `sync` runs it) raced
//! against the lease's renewal (a lease that cannot be renewed for 90% of
//! its length drops the pass: no work runs unleased) and the agent's
//! second signal, and the record handed to [`super::Ctx::send`]. It
//! writes no state of its own: the database's rows are
//! [`crate::fleet::record`]'s.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use tokio::sync::watch;

use super::report::Report;
use super::spool::Spooled;
use super::Ctx;
use crate::app::plan::commands::{config_of, pass_configs};
use crate::app::plan::Plan;
use crate::error::Result;
use crate::fleet::lease::{self, FilerPlan, Lease};
use crate::fleet::record::{self, Ended, PassRecord, Readiness};
use crate::pass::sender::{self, SyncConfig};
use crate::progress::Progress;

/// Runs the pass `lease` was claimed for (the claim asked no later than
/// `asked`), then records it.
pub async fn run(
    ctx: Arc<Ctx>,
    lease: Lease,
    asked: tokio::time::Instant,
    mut cancel: watch::Receiver<bool>,
) {
    let report = Report::with_progress(&lease.filer, &lease.name, ctx.progress.clone(), ctx.every);
    report.event(
        &json!({
            "event": "fleet_claim",
            "agent": ctx.name,
            "token": lease.token,
            "state": lease.state,
        }),
        &format!("claimed ({}, lease token {})", lease.state, lease.token),
    );
    let (ended, forecast_s, readiness) = work(&ctx, &lease, asked, &report, &mut cancel).await;
    let record = PassRecord {
        lease,
        ended,
        forecast_s,
        readiness,
        ended_unix: Some(crate::progress::now_unix()),
    };
    ctx.send(Spooled::Pass(record)).await;
}

/// The pass and what decides the volume's next state.
async fn work(
    ctx: &Ctx,
    lease: &Lease,
    asked: tokio::time::Instant,
    report: &Arc<Report>,
    cancel: &mut watch::Receiver<bool>,
) -> (Ended, Option<f64>, Readiness) {
    let mut readiness = ctx.readiness(ctx.args.window.as_secs_f64());
    let filer = match lease::filer_plan(&ctx.pool, &lease.filer).await {
        Ok(Some(f)) => f,
        Ok(None) => {
            return (
                Ended::Failed("its filer is no longer in the fleet".into()),
                None,
                readiness,
            )
        }
        Err(e) => return (Ended::Dropped(e.to_string()), None, readiness),
    };
    readiness.share_s = share_s(&filer, ctx.args.window.as_secs_f64());
    match record::begin(&ctx.pool, lease).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return (
                Ended::Dropped("the lease was lost before the pass began".into()),
                None,
                readiness,
            )
        }
        Err(e) => return (Ended::Dropped(e.to_string()), None, readiness),
    }
    let cfg = match config(ctx, &filer, &lease.name) {
        Ok(c) => c,
        Err(e) => return (Ended::Failed(e.to_string()), None, readiness),
    };
    let progress: Arc<dyn Progress> = report.clone();
    let pass = sender::run_pass(&cfg, &ctx.identity, progress);
    tokio::select! {
        r = pass => match r {
            Ok(end) => {
                let rec = report.kept("pass_end").unwrap_or_else(|| end.to_json());
                (Ended::Done(rec), end.forecast_final_pass_s, readiness)
            }
            Err(e) => (Ended::Failed(e.to_string()), None, readiness),
        },
        why = keep(ctx, lease, asked) => (Ended::Dropped(why), None, readiness),
        _ = cancel.wait_for(|c| *c) => (
            Ended::Dropped("the agent was stopped by a second signal".into()),
            None,
            readiness,
        ),
    }
}

/// A volume's share of its filer's night (its schedule's, else
/// `default_s`): the group cutover runs `jobs` final passes at once, so
/// each must fit the window divided by the rounds it takes.
pub fn share_s(f: &FilerPlan, default_s: f64) -> f64 {
    let rounds = (f.volumes.max(1) as f64 / f64::from(f.jobs.max(1))).ceil();
    f.window_s.unwrap_or(default_s) / rounds.max(1.0)
}

/// The plan the filer was registered with, read again. Its sources are
/// not checked here, all at once: each pass reads its own, so that one
/// vanished source fails its volume alone, not every volume of its filer.
pub fn plan_of(f: &FilerPlan) -> Result<Plan> {
    Plan::parse_elsewhere(Path::new(&f.plan_path), &f.plan)
}

/// Volume `name`'s pass settings from the filer's plan and the agent's
/// sender flags.
fn config(ctx: &Ctx, f: &FilerPlan, name: &str) -> Result<SyncConfig> {
    let plan = plan_of(f)?;
    let cfgs = pass_configs(&ctx.args.sync, &ctx.args.scan, &plan, "sync")?;
    config_of(&cfgs, name)
}

/// Renews `lease` every third of its length while the pass runs; returns
/// (ending the pass) when it is lost, or when 90% of its length has passed
/// since the last renewal the database confirmed (the database away):
/// past that it may have expired, and another agent may hold the volume.
/// A renewal is never waited for past that deadline, so a pass never runs
/// on past it.
pub async fn keep(ctx: &Ctx, lease: &Lease, asked: tokio::time::Instant) -> String {
    let ttl = ctx.args.lease;
    let every = ttl / 3;
    // The database gave the lease no earlier than the claim was asked.
    let mut renewed = asked;
    let mut next = renewed + every;
    loop {
        let deadline = renewed + ttl.mul_f64(0.9);
        tokio::time::sleep_until(next.min(deadline)).await;
        if tokio::time::Instant::now() >= deadline {
            return format!(
                "the lease could not be renewed for {:.0} s (the database did not answer): \
                 it may have expired",
                renewed.elapsed().as_secs_f64()
            );
        }
        let asked = tokio::time::Instant::now();
        next = asked + every;
        match tokio::time::timeout_at(deadline, lease::renew(&ctx.pool, lease, ttl)).await {
            Ok(Ok(true)) => renewed = asked,
            Ok(Ok(false)) => {
                return "the lease was lost (it expired, or another agent took it)".into()
            }
            Ok(Err(e)) => tracing::warn!("{}/{}: renewing the lease: {e}", lease.filer, lease.name),
            Err(_) => {}
        }
    }
}

/// Renews `leases` while a night runs, never ending it: its volumes are
/// `cutting_over`, which no agent claims, and a cutover is not dropped
/// half-way for want of a database.
pub async fn keep_all(ctx: &Ctx, leases: &[Lease]) {
    let every = ctx.args.lease / 3;
    loop {
        tokio::time::sleep(every).await;
        for l in leases {
            let _ = tokio::time::timeout(every, lease::renew(&ctx.pool, l, ctx.args.lease)).await;
        }
    }
}
