//! `converge`: daytime passes until a frozen final pass fits the night
//! window. Every pass after a volume's first rehearses the frozen one, with
//! the receiver reading its target alongside (the tables are not compared:
//! the source is live), so the read rates the forecast takes are those of
//! the cutover's pass.
//!
//! Owns the decision to stop passing; not the passes (`sender`) and not the
//! cutover.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::proof::pass_with_target_read;
use crate::error::Result;
use crate::net::transport::Identity;
use crate::pass::sender::{self, SyncConfig};
use crate::progress::{human_bytes, PassEnd, Progress};
use crate::store::journal;

/// Settings of `converge`.
#[derive(Debug, Clone)]
pub struct ConvergeConfig {
    /// The night window a frozen final pass must fit.
    pub window: Duration,
    /// Most passes to run.
    pub max_passes: u32,
    /// Pause between passes.
    pub interval: Duration,
    /// Safety margin the forecast is multiplied by.
    pub margin: f64,
    /// A plan run's red button: once pressed, no further pass starts.
    pub stop: Option<crate::app::plan::run::Stop>,
}

/// A forecast as events give it: rounded to hundredths of a second.
fn hundredths<T: Into<Option<f64>>>(f: T) -> Option<f64> {
    f.into().map(|f| (f * 100.0).round() / 100.0)
}

/// True when the last passes stopped shrinking: each of the last two moved
/// more than 90% of the data of the one before.
pub fn stopped_shrinking(changed: &[u64]) -> bool {
    let n = changed.len();
    n >= 3 && {
        let (a, b, c) = (
            changed[n - 3] as f64,
            changed[n - 2] as f64,
            changed[n - 1] as f64,
        );
        b > 0.9 * a && c > 0.9 * b
    }
}

/// Waits `--interval` before a pass after the first; false when the red
/// button of a plan run was pressed (before or during the wait: it ends
/// the wait a second at most after).
async fn interval_passed(cc: &ConvergeConfig) -> bool {
    let stopped = || cc.stop.as_ref().is_some_and(|s| s.requested());
    let until = tokio::time::Instant::now() + cc.interval;
    while !stopped() && tokio::time::Instant::now() < until {
        let left = until - tokio::time::Instant::now();
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    !stopped()
}

/// Runs passes until the forecast fits; returns 0 ready, 1 not converged.
pub async fn converge(
    cfg: &SyncConfig,
    cc: &ConvergeConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
) -> Result<i32> {
    let window = cc.window.as_secs_f64();
    crate::metrics::window(&cfg.dest.to_string(), window);
    let mut changed: Vec<u64> = Vec::new();
    let mut last: Option<PassEnd> = None;
    sender::volume_state_dir(cfg)?;
    let journal = sender::journal(cfg);
    // The first pass of a volume copies everything: reading the target
    // alongside would only slow it, and it measures no read rate.
    let mut copied_before = journal::passes(&journal.read()?).next().is_some();
    // After the first pass the receiver is known to answer: a later pass
    // that cannot connect rides out the outage (--retry-for).
    let mut cfg = cfg.clone();
    for n in 1..=cc.max_passes {
        if n > 1 && !interval_passed(cc).await {
            let f = last.as_ref().and_then(|e| e.forecast_final_pass_s);
            let event = json!({"event": "converge_end", "ready": false, "passes": n - 1, "reason": "stopped",
                               "forecast_final_pass_s": hundredths(f), "window_s": window});
            let why = "stopped by the operator before its next pass";
            return Ok(not_converged(progress.as_ref(), &event, why));
        }
        let end = if copied_before {
            rehearsal_pass(&cfg, id, progress.clone()).await?
        } else {
            sender::run_pass(&cfg, id, progress.clone()).await?
        };
        copied_before = true;
        cfg.receiver_answered = true;
        if end.start.pass > 1 {
            changed.push(end.changed_bytes);
        }
        let fits = end.forecast_final_pass_s.map(|f| f * cc.margin <= window);
        let settled =
            nightpass_proto::plan::read_rate_settled(&journal::figures(&journal.read()?).passes);
        if fits == Some(true) && !settled && n < cc.max_passes {
            progress.note(
                "the forecast fits the window, but rests on one pass's read rate (or two that disagree by more than 10%): one more pass to confirm it",
            );
            last = Some(end);
            continue;
        }
        if fits == Some(true) {
            let f = end.forecast_final_pass_s.unwrap_or(0.0);
            progress.event(
                &json!({"event": "converge_end", "ready": true, "passes": n, "forecast_final_pass_s": hundredths(f),
                        "margin": cc.margin, "window_s": window}),
                &format!(
                    "ready for cutover: a frozen final pass is forecast at {f:.1} s; × {} margin fits the {window:.0} s window",
                    cc.margin
                ),
            );
            return Ok(0);
        }
        if stopped_shrinking(&changed) {
            let why = not_shrinking(&changed, end.forecast_final_pass_s, window);
            let event = json!({"event": "converge_end", "ready": false, "passes": n, "reason": "not shrinking",
                               "forecast_final_pass_s": end.forecast_final_pass_s, "window_s": window});
            return Ok(not_converged(progress.as_ref(), &event, &why));
        }
        last = Some(end);
    }
    let f = last.and_then(|e| e.forecast_final_pass_s);
    let why = format!(
        "{} passes done and a frozen final pass is still forecast at {} s × {} margin, over the {window:.0} s window",
        cc.max_passes,
        f.map_or("?".into(), |f| format!("{f:.1}")),
        cc.margin
    );
    let event = json!({"event": "converge_end", "ready": false, "passes": cc.max_passes, "reason": "max passes",
                       "forecast_final_pass_s": hundredths(f), "window_s": window});
    Ok(not_converged(progress.as_ref(), &event, &why))
}

/// Why passes that stopped shrinking (`changed`, at least three) cannot
/// converge.
fn not_shrinking(changed: &[u64], forecast_s: Option<f64>, window: f64) -> String {
    let n = changed.len();
    format!(
        "passes stopped shrinking ({} then {} then {} changed): the source is written about as fast as a pass can catch up; a frozen final pass is forecast at {} s against a {window:.0} s window. Lower the write load, raise --bwlimit, or widen the window",
        human_bytes(changed[n - 3]),
        human_bytes(changed[n - 2]),
        human_bytes(changed[n - 1]),
        forecast_s.map_or("?".into(), |f| format!("{f:.1}")),
    )
}

/// Reports a converge that did not: its `converge_end` event and, in the
/// log, `nightpass: not converged: WHY`; returns exit status 1.
fn not_converged(progress: &dyn Progress, event: &Value, why: &str) -> i32 {
    progress.event(event, why);
    tracing::warn!("nightpass: not converged: {why}");
    1
}

/// A daytime pass run the way the cutover's pass will run, so that the
/// forecast measures the frozen pass's real read rate: with the receiver
/// reading its whole target alongside for a full pass; a tracked pass (an
/// unbroken change record) runs alone, as a tracked cutover's does, and
/// its proof's reads are forecast from its own.
async fn rehearsal_pass(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
) -> Result<PassEnd> {
    if sender::would_be_tracked(cfg)? {
        return sender::run_pass(cfg, id, progress).await;
    }
    Ok(pass_with_target_read(cfg, id, progress, false, true)
        .await?
        .0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_shrinking_names_the_last_three_passes() {
        let why = not_shrinking(&[1, 2 << 20, 3 << 20, 4 << 20], Some(12.34), 600.0);
        assert!(
            why.starts_with(
                "passes stopped shrinking (2.00 MiB then 3.00 MiB then 4.00 MiB changed)"
            ),
            "{why}"
        );
        assert!(
            why.contains("forecast at 12.3 s against a 600 s window"),
            "{why}"
        );
        assert!(not_shrinking(&[1, 2, 3], None, 60.0).contains("forecast at ? s"));
    }

    #[test]
    fn shrinking_detection() {
        assert!(!stopped_shrinking(&[100, 50]));
        assert!(!stopped_shrinking(&[100, 50, 25]));
        assert!(stopped_shrinking(&[100, 95, 99]));
        assert!(!stopped_shrinking(&[100, 95, 50]));
    }
}
