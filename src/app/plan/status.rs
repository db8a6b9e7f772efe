//! `status --plan`: one line per volume of a plan, from the sender's state
//! directory: its state (not started, copying, converged, cut over), its
//! passes, its last pass and the forecast of a frozen final pass. Reads
//! the journals only; writes nothing.

use std::path::Path;
use std::time::Duration;

use nightpass_proto::plan as forecast;
use serde_json::json;

use super::Plan;
use crate::error::Result;
use crate::pass::sender::target_dir;
use crate::progress::{human_bytes, now_unix, rfc3339_seconds, Progress};
use crate::store::journal::{self, Journal, SenderRecord};

/// What `status --plan` judges the volumes against: with a window, a
/// volume whose forecast × margin fits it is "converged".
#[derive(Debug, Clone, Copy)]
pub struct Judge {
    /// The night window.
    pub window: Option<Duration>,
    /// The safety margin the forecast is multiplied by.
    pub margin: f64,
}

/// Prints one `plan_volume` line per volume of `plan`, then the group's
/// forecast (`plan_forecast`).
pub fn status(plan: &Plan, state_dir: &Path, judge: Judge, progress: &dyn Progress) -> Result<()> {
    let mut forecasts = Vec::new();
    let mut cut_over = 0;
    for v in &plan.volumes {
        let dir = target_dir(state_dir, &plan.server_fingerprint, &v.dest);
        let records = if dir.join(journal::FILE_NAME).exists() {
            Journal::<SenderRecord>::in_dir(&dir).read()?
        } else {
            Vec::new()
        };
        let passes = journal::passes(&records).count();
        let last = journal::passes(&records).last();
        let cut = journal::sealed_cutover(&records);
        let f = match cut {
            Some(_) => None,
            None => forecast::forecast(&journal::figures(&records), now_unix()).map(|f| f.total_s),
        };
        forecasts.push(f);
        cut_over += usize::from(cut.is_some());
        let fits = match (judge.window, f) {
            (Some(w), Some(f)) => Some(f * judge.margin <= w.as_secs_f64()),
            _ => None,
        };
        let state = match (cut, last, fits) {
            (Some(_), _, _) => "cut over",
            (None, None, _) => "not started",
            (None, Some(_), Some(true)) => "converged",
            (None, Some(_), _) => "copying",
        };
        let last_text = last.map_or("no pass yet".to_string(), |p| {
            format!(
                "last pass {} at {} ({}, {:.1} s, {} sent)",
                p.pass,
                rfc3339_seconds(p.start_unix_s),
                p.kind,
                p.duration_s,
                human_bytes(p.sent_bytes)
            )
        });
        let tail = match (cut, f) {
            (Some(c), _) => format!(
                "cut over at {}, consistency point {}{}, sealed",
                rfc3339_seconds(c.freeze_unix_s),
                c.consistency_point,
                group_point(&records, c)
                    .map(|g| format!(" (group {g})"))
                    .unwrap_or_default()
            ),
            (None, Some(f)) => format!("forecast {f:.1} s"),
            (None, None) => "no forecast yet".into(),
        };
        progress.event(
            &json!({
                "event": "plan_volume",
                "volume": v.name,
                "source": v.source.display().to_string(),
                "state": state.replace(' ', "_"),
                "passes": passes,
                "last_pass_at": last.map(|p| rfc3339_seconds(p.start_unix_s)),
                "last_pass_kind": last.map(|p| p.kind.clone()),
                "last_pass_duration_s": last.map(|p| (p.duration_s * 1000.0).round() / 1000.0),
                "last_pass_sent_bytes": last.map(|p| p.sent_bytes),
                "forecast_final_pass_s": f.map(|f| (f * 100.0).round() / 100.0),
                "fits_window": fits,
                "cut_over": cut.map(|c| json!({
                    "at": rfc3339_seconds(c.freeze_unix_s),
                    "consistency_point": c.consistency_point,
                    "frozen_s": c.frozen_s,
                    "proved": c.proved,
                    "sealed": true,
                    "group_consistency_point": group_point(&records, c),
                })),
            }),
            &format!(
                "{:<16} {:<11} passes {passes:<3} {last_text}  {tail}",
                v.name, state
            ),
        );
    }
    group_forecast(plan, &forecasts, cut_over, judge, progress);
    Ok(())
}

/// The group consistency point of the group cutover `cut` was part of.
fn group_point(records: &[SenderRecord], cut: &journal::CutoverRecord) -> Option<String> {
    records.iter().rev().find_map(|r| match r {
        SenderRecord::GroupCutover(g) if g.freeze_unix_s == cut.freeze_unix_s => {
            Some(g.consistency_point.clone())
        }
        _ => None,
    })
}

/// The group cutover's forecast: every volume's frozen pass, run at most
/// `jobs` at a time (as the group cutover runs them, longest first), against
/// the window when one is given. Nothing when the filer is cut over, or a
/// volume has no forecast yet.
/// Returns whether it fits the window (`None`: no forecast, or no window).
pub(super) fn group_forecast(
    plan: &Plan,
    forecasts: &[Option<f64>],
    cut_over: usize,
    judge: Judge,
    progress: &dyn Progress,
) -> Option<bool> {
    let all: Option<Vec<f64>> = forecasts.iter().copied().collect();
    let group = match (cut_over, all) {
        (0, Some(all)) => crate::app::cutover::group::makespan(&all, plan.jobs),
        _ => return None,
    };
    let fits = judge
        .window
        .map(|w| group * judge.margin <= w.as_secs_f64());
    let against = match (judge.window, fits) {
        (Some(w), Some(true)) => format!(
            "; × {} margin fits the {:.0} s window",
            judge.margin,
            w.as_secs_f64()
        ),
        (Some(w), _) => format!(
            "; × {} margin does NOT fit the {:.0} s window",
            judge.margin,
            w.as_secs_f64()
        ),
        _ => String::new(),
    };
    progress.event(
        &json!({
            "event": "plan_forecast",
            "volume": null,
            "forecast_s": (group * 100.0).round() / 100.0,
            "jobs": plan.jobs,
            "window_s": judge.window.map(|w| w.as_secs_f64()),
            "fits_window": fits,
            "computed_at": rfc3339_seconds(now_unix()),
        }),
        &format!(
            "group cutover forecast at {}: {group:.1} s frozen ({} volumes, jobs = {}){against}",
            rfc3339_seconds(now_unix()),
            plan.volumes.len(),
            plan.jobs
        ),
    );
    fits
}
