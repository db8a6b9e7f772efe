//! What an agent's pass leaves in the fleet's database, and the policy
//! that decides a volume's next state from it.
//!
//! Owns the volume's state machine after a claim ([`working_state`] when
//! a pass begins, [`after_pass`] when it ends), the retry policy (a failed
//! volume waits `retry_after × 2^(attempts−1)`, at most an hour, and after
//! `max_attempts` waits for an operator), the error threshold that presses
//! the red button by itself, and the transactions that write them:
//! [`begin`] and [`record_pass`]. Every write of a volume's state is
//! fenced by the lease's token, as [`super::lease`] does; the pass's own
//! row is written whatever became of the lease, since its figures are
//! facts (a pass that ended is never lost). It runs no pass and holds no
//! lease: the agent does.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::db::Pool;
use super::lease::Lease;
use crate::error::Result;

/// The longest a failed volume waits before its next attempt.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// How a claimed pass ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Ended {
    /// It completed: its `pass_end` record.
    Done(Value),
    /// It failed: why (the volume fails, and is retried under the policy).
    Failed(String),
    /// The agent gave it up (its lease could not be renewed, or a second
    /// signal): not the volume's failure; its state does not change.
    Dropped(String),
}

/// What decides a volume's state after a successful pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    /// The volume's share of its night, in seconds.
    pub share_s: f64,
    /// The safety factor on the forecast.
    pub margin: f64,
    /// Seconds until a converging volume's next pass.
    pub interval_s: f64,
    /// Seconds until a ready volume's next pass.
    pub ready_interval_s: f64,
}

/// One pass's outcome as the agent records it (and spools while the
/// database is away).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassRecord {
    /// The lease the pass ran under.
    pub lease: Lease,
    /// How it ended.
    pub ended: Ended,
    /// The forecast of a frozen final pass after it, if any.
    pub forecast_s: Option<f64>,
    /// What decides the next state.
    pub readiness: Readiness,
    /// When it ended (Unix seconds, the agent's clock): its row's
    /// `ended_at`, however late the record reaches the database.
    #[serde(default)]
    pub ended_unix: Option<f64>,
}

/// The state a claimed volume works in: a pending volume (or a failed one
/// that never completed a pass) is being copied; a failed volume that had
/// is converging; others stay as they are.
pub fn working_state(from: &str, completed_before: bool) -> &'static str {
    match (from, completed_before) {
        ("pending", _) | ("failed", false) | ("copying", _) => "copying",
        ("ready", _) => "ready",
        _ => "converging",
    }
}

/// Whether a forecast fits a volume's share of its night.
pub fn fits(forecast_s: Option<f64>, r: &Readiness) -> bool {
    forecast_s.is_some_and(|f| f * r.margin <= r.share_s)
}

/// The states a volume in `from` goes through after a successful pass
/// (empty: it stays): a copy becomes converging, and ready when its
/// forecast fits; a ready volume whose forecast no longer fits converges
/// again.
pub fn after_pass(from: &str, fit: bool) -> Vec<&'static str> {
    match (from, fit) {
        ("converging", true) => vec!["ready"],
        ("ready", false) => vec!["converging"],
        ("converging", false) | ("ready", true) => vec![],
        (_, true) => vec!["converging", "ready"],
        (_, false) => vec!["converging"],
    }
}

/// The wait before the next attempt of a volume that failed `attempts`
/// times (1 after its first failure).
pub fn backoff(retry_after: Duration, attempts: i32) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 20) as u32;
    retry_after
        .saturating_mul(1u32 << doublings)
        .min(MAX_BACKOFF)
}

/// Moves a just-claimed volume to its [`working_state`] (a history row
/// when it changes); `None` when the lease was lost meanwhile.
pub async fn begin(pool: &Pool, lease: &Lease) -> Result<Option<&'static str>> {
    let mut conn = pool.get().await?;
    let work = async {
        let tx = conn.transaction().await?;
        let Some(from) = fenced_state(&tx, lease).await? else {
            return Ok(None);
        };
        let completed: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM nightpass.passes WHERE volume = $1 AND ok)",
                &[&lease.volume],
            )
            .await?
            .get(0);
        let to = working_state(&from, completed);
        if to != from {
            step(&tx, lease, &from, to, None).await?;
            tx.execute(
                "UPDATE nightpass.volumes SET state = $2, fence_token = $3, updated_at = now() \
                 WHERE id = $1",
                &[&lease.volume, &to, &lease.token],
            )
            .await?;
        }
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(Some(to))
    };
    pool.timed("starting a pass", work).await
}

/// The volume's state while `lease` holds it (locked for this
/// transaction); `None` when the lease was lost.
async fn fenced_state(
    tx: &tokio_postgres::Transaction<'_>,
    lease: &Lease,
) -> std::result::Result<Option<String>, tokio_postgres::Error> {
    Ok(fenced(tx, lease).await?.map(|(s, _)| s))
}

/// The volume's state and last forecast while `lease` holds it (locked
/// for this transaction); `None` when the lease was lost.
async fn fenced(
    tx: &tokio_postgres::Transaction<'_>,
    lease: &Lease,
) -> std::result::Result<Option<(String, Option<f64>)>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "SELECT v.state, v.forecast_final_pass_s FROM nightpass.volumes v \
             JOIN nightpass.leases l ON l.volume = v.id \
             WHERE v.id = $1 AND l.token = $2 AND l.expires_at > now() \
             AND v.fence_token <= $2 FOR UPDATE OF v, l",
            &[&lease.volume, &lease.token],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// One history row: `lease`'s volume went from `from` to `to`.
pub(super) async fn step(
    tx: &tokio_postgres::Transaction<'_>,
    lease: &Lease,
    from: &str,
    to: &str,
    figures: Option<&Value>,
) -> std::result::Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO nightpass.history (volume, from_state, to_state, agent, token, figures) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &lease.volume,
            &from,
            &to,
            &lease.agent,
            &lease.token,
            &figures,
        ],
    )
    .await?;
    Ok(())
}

/// What [`record_pass`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recorded {
    /// The volume's state after it, when the lease still held.
    pub state: Option<String>,
    /// The red button, pressed by this failure: why.
    pub auto_paused: Option<String>,
    /// The volume is no longer in the fleet (`fleet remove`): nothing
    /// was written.
    pub removed: bool,
}

/// Records `r` in one transaction: the pass's row (idempotent: a record
/// sent twice changes nothing the second time), and while the lease holds
/// the volume's next state, its history, the retry policy and the lease's
/// release; a failure may press the red button (the error threshold).
pub async fn record_pass(pool: &Pool, r: &PassRecord) -> Result<Recorded> {
    let mut conn = pool.get().await?;
    let work = async {
        let tx = conn.transaction().await?;
        if matches!(r.ended, Ended::Failed(_)) {
            // The error threshold may press the red button: the settings
            // row is locked first, as the claims and `fleet resume` lock
            // it, so that the three never wait on each other in a circle.
            tx.execute("SELECT 1 FROM nightpass.settings FOR UPDATE", &[])
                .await?;
        }
        let mut out = Recorded::default();
        let there = tx
            .query_opt(
                "SELECT 1 FROM nightpass.volumes WHERE id = $1",
                &[&r.lease.volume],
            )
            .await?;
        if there.is_none() {
            // `fleet remove` took its filer out of the fleet meanwhile.
            out.removed = true;
            return Ok(out);
        }
        let fresh = write_pass_row(&tx, r).await?;
        if !fresh {
            // Sent before (a spooled record whose commit was not seen).
            return Ok(out);
        }
        if let Some((from, last)) = fenced(&tx, &r.lease).await? {
            out.state = Some(apply(&tx, r, &from, last).await?);
        }
        tx.execute(
            "DELETE FROM nightpass.leases WHERE volume = $1 AND token = $2",
            &[&r.lease.volume, &r.lease.token],
        )
        .await?;
        if let Ended::Failed(why) = &r.ended {
            let label = format!("{}/{}", r.lease.filer, r.lease.name);
            out.auto_paused = threshold(&tx, &r.lease.agent, &label, why).await?;
        }
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(out)
    };
    pool.timed("recording a pass", work).await
}

/// Completes the pass's row (written at its claim, or closed as
/// abandoned by the volume's next holder); false when it was completed
/// before.
async fn write_pass_row(
    tx: &tokio_postgres::Transaction<'_>,
    r: &PassRecord,
) -> std::result::Result<bool, tokio_postgres::Error> {
    let (ok, record, failure) = match &r.ended {
        Ended::Done(v) => (true, v.clone(), None),
        Ended::Failed(why) => (false, json!({"failed": why}), Some(why.as_str())),
        Ended::Dropped(why) => (false, json!({"dropped": why}), Some(why.as_str())),
    };
    let n = tx
        .execute(
            "INSERT INTO nightpass.passes (volume, agent, token, seq, ok, record, failure, ended_at) \
             VALUES ($1, $2, $3, 1, $4, $5, $6, coalesce(to_timestamp($7), clock_timestamp())) \
             ON CONFLICT (volume, token, seq) DO UPDATE SET ok = excluded.ok, \
             record = excluded.record, failure = excluded.failure, ended_at = excluded.ended_at \
             WHERE nightpass.passes.ok IS NULL OR nightpass.passes.record ? 'abandoned'",
            &[
                &r.lease.volume,
                &r.lease.agent,
                &r.lease.token,
                &ok,
                &record,
                &failure,
                &r.ended_unix,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// The volume's next state after `r` (from `from`, its last forecast
/// `last`), written with its history rows; returns the state it is left
/// in. A pass that could not forecast (an agent whose journal holds too
/// few passes of the volume: agents do not share state directories)
/// leaves the last forecast standing: unknown is not "does not fit".
async fn apply(
    tx: &tokio_postgres::Transaction<'_>,
    r: &PassRecord,
    from: &str,
    last: Option<f64>,
) -> std::result::Result<String, tokio_postgres::Error> {
    let lease = &r.lease;
    match &r.ended {
        Ended::Dropped(_) => Ok(from.to_string()),
        Ended::Done(record) => {
            let forecast = r.forecast_s.or(last);
            let fit = fits(forecast, &r.readiness);
            let mut at = from.to_string();
            for to in after_pass(from, fit) {
                step(tx, lease, &at, to, Some(record)).await?;
                at = to.to_string();
            }
            let wait = if at == "ready" {
                r.readiness.ready_interval_s
            } else {
                r.readiness.interval_s
            };
            tx.execute(
                "UPDATE nightpass.volumes SET state = $2, failure = NULL, attempts = 0, \
                 forecast_final_pass_s = $3, next_attempt_at = now() + make_interval(secs => $4), \
                 fence_token = $5, size_bytes = coalesce($6, size_bytes), updated_at = now() \
                 WHERE id = $1",
                &[
                    &lease.volume,
                    &at,
                    &forecast,
                    &wait,
                    &lease.token,
                    &record["size_bytes"].as_i64(),
                ],
            )
            .await?;
            Ok(at)
        }
        Ended::Failed(why) => {
            let row = tx
                .query_one(
                    "SELECT v.attempts + 1, extract(epoch FROM s.retry_after)::float8 \
                     FROM nightpass.volumes v, nightpass.settings s WHERE v.id = $1",
                    &[&lease.volume],
                )
                .await?;
            let (attempts, retry_s): (i32, f64) = (row.get(0), row.get(1));
            let wait = backoff(Duration::from_secs_f64(retry_s.max(0.0)), attempts);
            let figures = json!({"failure": why, "attempt": attempts});
            step(tx, lease, from, "failed", Some(&figures)).await?;
            tx.execute(
                "UPDATE nightpass.volumes SET state = 'failed', failure = $2, attempts = $3, \
                 next_attempt_at = now() + make_interval(secs => $4), fence_token = $5, \
                 updated_at = now() WHERE id = $1",
                &[
                    &lease.volume,
                    why,
                    &attempts,
                    &wait.as_secs_f64(),
                    &lease.token,
                ],
            )
            .await?;
            Ok("failed".into())
        }
    }
}

/// The error threshold: when failures among the fleet's last
/// `error_window` ended passes (those an agent gave up not counted) reach
/// `error_threshold` and the fleet is running, pauses it, saying why;
/// returns the reason when it did.
pub async fn threshold(
    tx: &tokio_postgres::Transaction<'_>,
    agent: &str,
    label: &str,
    why: &str,
) -> std::result::Result<Option<String>, tokio_postgres::Error> {
    let set = tx
        .query_one(
            "SELECT paused, error_threshold, error_window FROM nightpass.settings FOR UPDATE",
            &[],
        )
        .await?;
    let (paused, limit, window): (bool, i32, i32) = (set.get(0), set.get(1), set.get(2));
    if paused {
        return Ok(None);
    }
    let failed: i64 = tx
        .query_one(
            "SELECT count(*) FILTER (WHERE NOT ok) FROM (SELECT ok FROM nightpass.passes \
             WHERE ok IS NOT NULL AND NOT (record ? 'dropped') \
             ORDER BY ended_at DESC, id DESC LIMIT $1) last",
            &[&i64::from(window)],
        )
        .await?
        .get(0);
    if failed < i64::from(limit) {
        return Ok(None);
    }
    let reason = format!(
        "error threshold: {failed} of the last {window} passes failed (last: {label}: {why})"
    );
    tx.execute(
        "UPDATE nightpass.settings SET paused = true, pause_reason = $1, \
         paused_at = clock_timestamp(), paused_by = $2",
        &[&reason, &agent],
    )
    .await?;
    tx.execute(
        "INSERT INTO nightpass.fleet_log (by, event, detail) VALUES ($1, 'auto_pause', $2)",
        &[
            &agent,
            &json!({"reason": reason, "failed": failed, "window": window}),
        ],
    )
    .await?;
    Ok(Some(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_walks_the_state_machine() {
        assert_eq!(working_state("pending", false), "copying");
        assert_eq!(working_state("failed", false), "copying");
        assert_eq!(working_state("failed", true), "converging");
        assert_eq!(working_state("converging", true), "converging");
        assert_eq!(working_state("ready", true), "ready");
        assert_eq!(after_pass("copying", false), vec!["converging"]);
        assert_eq!(after_pass("copying", true), vec!["converging", "ready"]);
        assert_eq!(after_pass("converging", true), vec!["ready"]);
        assert!(after_pass("converging", false).is_empty());
        assert_eq!(after_pass("ready", false), vec!["converging"]);
        assert!(after_pass("ready", true).is_empty());
    }

    #[test]
    fn readiness_needs_a_forecast_that_fits_with_margin() {
        let r = Readiness {
            share_s: 60.0,
            margin: 1.5,
            interval_s: 0.0,
            ready_interval_s: 600.0,
        };
        assert!(!fits(None, &r));
        assert!(fits(Some(40.0), &r));
        assert!(!fits(Some(40.1), &r));
    }

    #[test]
    fn retries_back_off_doubling_up_to_an_hour() {
        let b = Duration::from_secs(30);
        assert_eq!(backoff(b, 1), Duration::from_secs(30));
        assert_eq!(backoff(b, 2), Duration::from_secs(60));
        assert_eq!(backoff(b, 4), Duration::from_secs(240));
        assert_eq!(backoff(b, 30), MAX_BACKOFF);
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }
}
