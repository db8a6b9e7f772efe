//! A filer's night inside an agent: whether to start its group cutover,
//! and running it.
//!
//! Owns the night's decision (every volume ready, none in a pass, the
//! group's forecast × margin within what is left of the window: otherwise
//! nothing is frozen and the filer's night note says why) and its run:
//! the plan's group cutover ([`group_cutover`], the plan's freeze), its
//! leases renewed meanwhile, its outcome handed to [`super::Ctx::send`].
//! The rows are [`crate::fleet::night`]'s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::pass::{keep_all, plan_of};
use super::report::Report;
use super::spool::Spooled;
use super::Ctx;
use crate::app::cutover::group::{group_cutover, group_point, makespan, GroupConfig, GroupVolume};
use crate::app::plan::commands::{config_of, pass_configs, plan_freeze};
use crate::error::{Error, Result};
use crate::fleet::lease::{FilerPlan, Lease};
use crate::fleet::night::{self, Night, NightRecord};
use crate::progress::{rfc3339_seconds, Progress};
use nightpass_proto::wire::RefuseCode;

/// Looks at the host's open nights: starts the group cutover of each
/// filer that is ready (a task in `tasks`, its name in `running`), and
/// notes why the others wait.
pub async fn consider(
    ctx: &Arc<Ctx>,
    running: &mut std::collections::HashSet<String>,
    tasks: &mut tokio::task::JoinSet<String>,
) -> Result<()> {
    for n in night::open(&ctx.pool, &ctx.host).await? {
        if running.contains(&n.filer) {
            continue;
        }
        let forecast = match judge(ctx, &n) {
            Judged::Go(f) => f,
            Judged::Wait(why) => {
                say(ctx, &n, &why).await?;
                continue;
            }
            // Another agent runs this night: it speaks for it.
            Judged::Elsewhere => continue,
            Judged::Lost => {
                recover(ctx, &n).await?;
                continue;
            }
        };
        let figures = night::start_figures(&n, forecast);
        match night::claim(&ctx.pool, &n, &ctx.name, ctx.args.lease, &figures).await? {
            Err(why) => say(ctx, &n, &why).await?,
            Ok(leases) => {
                let why = format!(
                    "the night is open and every volume is ready: group cutover starts \
                     (forecast {forecast:.1} s with margin, {:.0} s left of the window)",
                    n.left_s
                );
                say(ctx, &n, &why).await?;
                running.insert(n.filer.clone());
                tasks.spawn(run(ctx.clone(), n, leases));
            }
        }
    }
    Ok(())
}

/// What an agent makes of an open night.
enum Judged {
    /// Start the group cutover: the group's forecast with margin.
    Go(f64),
    /// Not now, and why (the filer's night note).
    Wait(String),
    /// Another agent runs it now.
    Elsewhere,
    /// Its volumes are `cutting_over` and no agent holds them: the agent
    /// that ran it was lost.
    Lost,
}

/// Whether the filer of night `n` may be cut over now.
fn judge(ctx: &Ctx, n: &Night) -> Judged {
    if n.volumes.iter().any(|v| v.state == "cutting_over") {
        return if n.volumes.iter().any(|v| v.leased) {
            Judged::Elsewhere
        } else {
            Judged::Lost
        };
    }
    match waits(n) {
        Some(why) => Judged::Wait(why),
        None => fits(ctx, n),
    }
}

/// Why night `n` cannot start whatever its forecast: its failures, a
/// volume failed, not ready, or in a pass.
fn waits(n: &Night) -> Option<String> {
    let last = n
        .volumes
        .iter()
        .find_map(|v| v.failure.as_ref().map(|f| format!(" (last: {f})")))
        .unwrap_or_default();
    if n.failures >= n.max_attempts {
        return Some(format!(
            "gave up: the group cutover failed {} times{last} (max_attempts {}); \
             `fleet resume` tries again; nothing frozen",
            n.failures, n.max_attempts
        ));
    }
    if let Some(at) = n.retry_at.filter(|t| *t > crate::progress::now_unix()) {
        return Some(format!(
            "waiting: the group cutover failed {} time(s){last}; tried again from {}; \
             nothing frozen",
            n.failures,
            rfc3339_seconds(at)
        ));
    }
    if let Some(v) = n.volumes.iter().find(|v| v.state == "failed") {
        return Some(format!(
            "not ready: volume '{}' failed ({}); nothing frozen until it is ready again",
            v.name,
            v.failure.as_deref().unwrap_or("no reason recorded")
        ));
    }
    if let Some(v) = n.volumes.iter().find(|v| v.state != "ready") {
        let forecast = v
            .forecast_s
            .map(|f| format!(", its final pass forecast {f:.1} s"))
            .unwrap_or_default();
        return Some(format!(
            "not ready: volume '{}' is {}{forecast}; nothing frozen",
            v.name, v.state
        ));
    }
    n.volumes
        .iter()
        .find(|v| v.leased)
        .map(|v| format!("waiting: volume '{}' is in a pass; nothing frozen", v.name))
}

/// Go when the group's forecast with margin fits what is left of the
/// window; otherwise why not.
fn fits(ctx: &Ctx, n: &Night) -> Judged {
    let forecasts: Vec<f64> = n
        .volumes
        .iter()
        .map(|v| v.forecast_s.unwrap_or(f64::INFINITY))
        .collect();
    let total = makespan(&forecasts, n.jobs.max(1) as usize) * ctx.args.margin;
    if total > n.left_s {
        return Judged::Wait(format!(
            "not ready: the group's final passes are forecast at {total:.1} s with margin \
             {:.2}, more than the {:.0} s left of the window; nothing frozen",
            ctx.args.margin, n.left_s
        ));
    }
    Judged::Go(total)
}

/// Night `n`'s agent was lost while its volumes were `cutting_over`: this
/// agent takes them over and asks the receiver, which records a group all
/// or none. Nothing sealed: every volume goes back to `ready` (the night
/// may run again). All sealed: the cutover happened; it is recorded with
/// the points the receiver holds. Otherwise (the receiver cannot be
/// reached, or answers otherwise) the volumes stay as they are and the
/// night note says so.
async fn recover(ctx: &Arc<Ctx>, n: &Night) -> Result<()> {
    let Some(leases) = night::claim_stale(&ctx.pool, n, &ctx.name, ctx.args.lease).await? else {
        return Ok(());
    };
    let report = Report::new(&n.filer, None, ctx.progress.clone());
    let lost = "the agent running this filer's night was lost; asking the receiver what it sealed";
    report.event(
        &json!({"event": "fleet_night", "ready": false, "lost": true, "reason": lost}),
        lost,
    );
    match sealed_by_receiver(ctx, n).await {
        Ok(Seals::None) => {
            let why = "the agent running the night was lost before the receiver sealed \
                       anything: every volume is ready again";
            night::settle_unsealed(&ctx.pool, &leases, why).await?;
            report.event(
                &json!({"event": "fleet_night", "ready": false, "reason": why}),
                why,
            );
        }
        Ok(Seals::All(points)) => {
            let names: Vec<&str> = points.values().map(String::as_str).collect();
            let group = group_point(&names).ok();
            let record = NightRecord {
                filer: n.filer.clone(),
                leases,
                points,
                group_point: group.clone(),
                failure: None,
                figures: json!({"recovered": "the agent running the night was lost after the receiver sealed every volume"}),
                ended_unix: Some(crate::progress::now_unix()),
            };
            ctx.send(Spooled::Night(record)).await;
            report.event(
                &json!({"event": "fleet_cut_over", "consistency_point": group, "recovered": true,
                        "volumes": n.volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>()}),
                "cut over (recorded after the night's agent was lost)",
            );
        }
        Err(why) => {
            let why = format!(
                "the agent running the night was lost, and the receiver cannot say what it \
                 sealed ({why}); the volumes stay cutting_over: see docs/CLI.md, 'An agent \
                 lost during a night'"
            );
            night::give_up(&ctx.pool, &leases, &why).await?;
            report.event(
                &json!({"event": "fleet_night", "ready": false, "lost": true, "reason": why}),
                &why,
            );
        }
    }
    Ok(())
}

/// What the receiver sealed of a filer.
enum Seals {
    /// Nothing: every volume takes passes.
    None,
    /// Every volume, with its consistency point, by name.
    All(BTreeMap<String, String>),
}

/// Asks the receiver about every volume of night `n` (a preflight each):
/// all open or all sealed; anything else is an error saying what.
async fn sealed_by_receiver(ctx: &Ctx, n: &Night) -> std::result::Result<Seals, String> {
    let filer = filer_of(n);
    let plan = plan_of(&filer).map_err(|e| e.to_string())?;
    let cfgs = pass_configs(&ctx.args.sync, &ctx.args.scan, &plan, "cutover")
        .map_err(|e| e.to_string())?;
    let (mut open, mut points) = (0, BTreeMap::new());
    for v in &plan.volumes {
        let cfg = config_of(&cfgs, &v.name).map_err(|e| e.to_string())?;
        match crate::pass::sender::preflight(&cfg, &ctx.identity).await {
            Ok(_) => open += 1,
            Err(Error::Refused {
                code: RefuseCode::Sealed,
                message,
            }) => {
                let point = point_in(&message)
                    .ok_or_else(|| format!("volume '{}' is sealed: {message}", v.name))?;
                points.insert(v.name.clone(), point);
            }
            Err(e) => return Err(format!("volume '{}': {e}", v.name)),
        }
    }
    match (open, points.len()) {
        (o, 0) if o == plan.volumes.len() => Ok(Seals::None),
        (0, p) if p == plan.volumes.len() => Ok(Seals::All(points)),
        (o, p) => Err(format!("{o} volumes open and {p} sealed")),
    }
}

/// The consistency point a receiver's "sealed" refusal names
/// (`consistency point HEX`).
fn point_in(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("consistency point ")?;
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    (hex.len() == 64).then_some(hex)
}

/// The filer of night `n` as [`plan_of`] reads it.
fn filer_of(n: &Night) -> FilerPlan {
    FilerPlan {
        plan: n.plan.clone(),
        plan_path: n.plan_path.clone(),
        window_s: Some(n.window_s),
        volumes: n.volumes.len() as i64,
        jobs: n.jobs,
    }
}

/// Says why `n`'s night waits (or starts), once per change: the filer's
/// night note, and a `fleet_night` event.
async fn say(ctx: &Ctx, n: &Night, why: &str) -> Result<()> {
    if n.note.as_deref() == Some(why) {
        return Ok(());
    }
    night::note(&ctx.pool, &n.filer, why).await?;
    let report = Report::new(&n.filer, None, ctx.progress.clone());
    report.event(
        &json!({
            "event": "fleet_night",
            "ready": why.contains("group cutover starts"),
            "reason": why,
            "window_at": rfc3339_seconds(n.at),
            "window_s": n.window_s,
            "left_s": (n.left_s * 10.0).round() / 10.0,
        }),
        why,
    );
    Ok(())
}

/// Runs `n`'s group cutover under `leases` and records it; returns the
/// filer's name.
async fn run(ctx: Arc<Ctx>, n: Night, leases: Vec<Lease>) -> String {
    let report = Report::new(&n.filer, None, ctx.progress.clone());
    let outcome = tokio::select! {
        r = cutover(&ctx, &n, &report) => r,
        _ = keep_all(&ctx, &leases) => unreachable!("renewals never end"),
    };
    let (points, group_point, failure, figures) = match outcome {
        Ok((points, group, figures)) => (points, Some(group), None, figures),
        Err((volume, why)) => {
            let figures = json!({"failed": why, "volume": volume});
            (BTreeMap::new(), None, Some((volume, why)), figures)
        }
    };
    let done = failure.is_none();
    let record = NightRecord {
        filer: n.filer.clone(),
        leases,
        points,
        group_point: group_point.clone(),
        failure: failure.clone(),
        figures,
        ended_unix: Some(crate::progress::now_unix()),
    };
    ctx.send(Spooled::Night(record)).await;
    if done {
        report.event(
            &json!({
                "event": "fleet_cut_over",
                "consistency_point": group_point,
                "volumes": n.volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
            }),
            &format!(
                "cut over: group consistency point {}",
                group_point.as_deref().unwrap_or("-")
            ),
        );
    } else if let Some((volume, why)) = failure {
        let said = format!("the group cutover failed, every volume thawed: {why}");
        report.event(
            &json!({"event": "fleet_night", "ready": false, "failed": true,
                    "failed_volume": volume, "reason": said}),
            &said,
        );
    }
    n.filer
}

/// Consistency points by volume, the group's, and the group's figures.
type Points = (BTreeMap<String, String>, String, Value);

/// The plan's group cutover for `n`: the plan's freeze, final passes
/// within its `jobs`, full proofs, never frozen past the window's end.
async fn cutover(
    ctx: &Ctx,
    n: &Night,
    report: &Arc<Report>,
) -> std::result::Result<Points, (Option<String>, String)> {
    let fail = |e: crate::error::Error| (None, e.to_string());
    let plan = plan_of(&filer_of(n)).map_err(fail)?;
    let methods = plan_freeze(None, &plan).map_err(fail)?;
    let cfgs = pass_configs(&ctx.args.sync, &ctx.args.scan, &plan, "cutover").map_err(fail)?;
    let mut reports = Vec::new();
    let mut volumes = Vec::new();
    for v in &plan.volumes {
        let r = Report::new(&n.filer, Some(&v.name), ctx.progress.clone());
        volumes.push(GroupVolume {
            name: v.name.clone(),
            cfg: config_of(&cfgs, &v.name).map_err(fail)?,
            method: methods[&v.name].clone(),
            progress: r.clone(),
        });
        reports.push((v.name.clone(), r));
    }
    let gc = GroupConfig {
        jobs: plan.jobs,
        max_freeze: Some(Duration::from_secs_f64(n.left_s.max(1.0))),
        prove: true,
        force_no_forecast: true,
        margin: ctx.args.margin,
    };
    let progress: Arc<dyn Progress> = report.clone();
    match group_cutover(volumes, &gc, ctx.identity.clone(), progress).await {
        Ok(0) => {}
        Ok(code) => return Err((None, format!("the group cutover ended with status {code}"))),
        Err(f) => return Err((f.volume, f.error.to_string())),
    }
    let mut points = BTreeMap::new();
    for (name, r) in &reports {
        let point = r
            .kept("cutover_end")
            .and_then(|e| e["consistency_point"].as_str().map(str::to_string))
            .ok_or_else(|| {
                (
                    Some(name.clone()),
                    "no consistency point reported".to_string(),
                )
            })?;
        points.insert(name.clone(), point);
    }
    let end = report
        .kept("group_cutover_end")
        .ok_or_else(|| (None, "no group consistency point reported".to_string()))?;
    let group = end["consistency_point"]
        .as_str()
        .ok_or_else(|| (None, "no group consistency point reported".to_string()))?
        .to_string();
    Ok((points, group, end))
}
