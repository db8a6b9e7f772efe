//! A filer's night in the fleet's database: which nights are open for a
//! host, the claim of a whole filer for its group cutover, and what the
//! cutover leaves behind.
//!
//! Owns the rows of a night: [`open`] reads the host's filers whose
//! window is open; [`claim`] leases every volume of a filer at once (all
//! `ready`, none held, the fleet not paused) and moves them to
//! `cutting_over` in one transaction; [`finish`] writes the outcome
//! (`cut_over` with each consistency point and the group's, or back to
//! `ready`, the culprit `failed`); [`note`] keeps why a night did not
//! start. A volume in `cutting_over` is never claimed for a pass, so the
//! outcome is written whatever became of the leases meanwhile: it is the
//! receiver's truth. It runs no cutover: the agent does.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::db::Pool;
use super::lease::Lease;
use super::record::backoff;
use crate::error::Result;

/// One volume of a filer whose night is open.
#[derive(Debug, Clone, PartialEq)]
pub struct NightVolume {
    /// Its id.
    pub id: i64,
    /// Its name in the plan.
    pub name: String,
    /// Its state.
    pub state: String,
    /// Its last forecast of a frozen final pass.
    pub forecast_s: Option<f64>,
    /// Whether a live lease holds it.
    pub leased: bool,
    /// Why it failed, when it did.
    pub failure: Option<String>,
}

/// A filer whose night is open now.
#[derive(Debug, Clone, PartialEq)]
pub struct Night {
    /// The filer.
    pub filer: String,
    /// Its plan as registered, and where it was read from.
    pub plan: String,
    /// The plan's path when registered.
    pub plan_path: String,
    /// When the window opened (Unix seconds).
    pub at: f64,
    /// The window's length in seconds.
    pub window_s: f64,
    /// Seconds left in the window.
    pub left_s: f64,
    /// The note already recorded, if any.
    pub note: Option<String>,
    /// The plan's `jobs`: final passes at once.
    pub jobs: i32,
    /// Its group cutovers that failed since its night was scheduled (or
    /// the fleet resumed).
    pub failures: i32,
    /// When its night may be tried again after a failure (Unix seconds;
    /// none, or past: now).
    pub retry_at: Option<f64>,
    /// The fleet's `max_attempts`: failed nights before it waits for
    /// `fleet resume`.
    pub max_attempts: i32,
    /// Its volumes, in name order.
    pub volumes: Vec<NightVolume>,
}

/// The filers of `host` whose window is open now and that are not cut
/// over.
pub async fn open(pool: &Pool, host: &str) -> Result<Vec<Night>> {
    let conn = pool.get().await?;
    let rows = pool
        .timed(
            "reading the open nights",
            conn.query(
                "SELECT f.name, f.plan, f.plan_path, extract(epoch FROM s.at)::float8, \
                 extract(epoch FROM s.window_len)::float8, \
                 extract(epoch FROM s.at + s.window_len - now())::float8, f.night_note, \
                 f.jobs, f.night_failures, extract(epoch FROM f.night_retry_at)::float8, \
                 (SELECT max_attempts FROM nightpass.settings), \
                 v.id, v.name, v.state, v.forecast_final_pass_s, \
                 EXISTS (SELECT 1 FROM nightpass.leases l WHERE l.volume = v.id \
                         AND l.expires_at > now()), v.failure \
                 FROM nightpass.filers f JOIN nightpass.schedules s ON s.filer = f.name \
                 JOIN nightpass.volumes v ON v.filer = f.name \
                 WHERE f.host = $1 AND f.cut_over_at IS NULL \
                 AND now() >= s.at AND now() < s.at + s.window_len \
                 ORDER BY f.name, v.name",
                &[&host],
            ),
        )
        .await?;
    let mut nights: BTreeMap<String, Night> = BTreeMap::new();
    for r in rows {
        let filer: String = r.get(0);
        let night = nights.entry(filer.clone()).or_insert_with(|| Night {
            filer,
            plan: r.get(1),
            plan_path: r.get(2),
            at: r.get(3),
            window_s: r.get(4),
            left_s: r.get(5),
            note: r.get(6),
            jobs: r.get(7),
            failures: r.get(8),
            retry_at: r.get(9),
            max_attempts: r.get(10),
            volumes: Vec::new(),
        });
        night.volumes.push(NightVolume {
            id: r.get(11),
            name: r.get(12),
            state: r.get(13),
            forecast_s: r.get(14),
            leased: r.get(15),
            failure: r.get(16),
        });
    }
    Ok(nights.into_values().collect())
}

/// Records why `filer`'s night did not start (or how it went), when that
/// is new.
pub async fn note(pool: &Pool, filer: &str, note: &str) -> Result<()> {
    let conn = pool.get().await?;
    pool.timed(
        "noting a filer's night",
        conn.execute(
            "UPDATE nightpass.filers SET night_note = $2, night_note_at = now() \
             WHERE name = $1 AND night_note IS DISTINCT FROM $2",
            &[&filer, &note],
        ),
    )
    .await?;
    Ok(())
}

/// Leases every volume of `night` to `agent` for `ttl` and moves them to
/// `cutting_over`, in one transaction: only when the fleet is not paused,
/// every volume is `ready` and none is held. `Err(why)` otherwise
/// (nothing changed).
pub async fn claim(
    pool: &Pool,
    night: &Night,
    agent: &str,
    ttl: Duration,
    figures: &Value,
) -> Result<std::result::Result<Vec<Lease>, String>> {
    let mut conn = pool.get().await?;
    let secs = ttl.as_secs_f64();
    let work = async {
        let tx = conn.transaction().await?;
        let set = tx
            .query_one(
                "SELECT paused, pause_reason FROM nightpass.settings FOR UPDATE",
                &[],
            )
            .await?;
        if set.get::<_, bool>(0) {
            let why: Option<String> = set.get(1);
            return Ok(Err(format!(
                "the fleet is paused{}",
                why.map(|w| format!(" ({w})")).unwrap_or_default()
            )));
        }
        let rows = tx
            .query(
                "SELECT v.id, v.name, v.state, EXISTS (SELECT 1 FROM nightpass.leases l \
                 WHERE l.volume = v.id AND l.expires_at > now()) \
                 FROM nightpass.volumes v WHERE v.filer = $1 ORDER BY v.name FOR UPDATE OF v",
                &[&night.filer],
            )
            .await?;
        if let Some(r) = rows
            .iter()
            .find(|r| r.get::<_, String>(2) != "ready" || r.get::<_, bool>(3))
        {
            return Ok(Err(format!(
                "volume '{}' is {}",
                r.get::<_, String>(1),
                if r.get::<_, bool>(3) {
                    "in a pass".to_string()
                } else {
                    r.get::<_, String>(2)
                }
            )));
        }
        let mut leases = Vec::new();
        for r in &rows {
            let volume: i64 = r.get(0);
            let token = lease_volume(&tx, volume, agent, secs).await?;
            tx.execute(
                "UPDATE nightpass.volumes SET state = 'cutting_over', fence_token = $2, \
                 updated_at = now() WHERE id = $1",
                &[&volume, &token],
            )
            .await?;
            tx.execute(
                "INSERT INTO nightpass.history (volume, from_state, to_state, agent, token, figures) \
                 VALUES ($1, 'ready', 'cutting_over', $2, $3, $4)",
                &[&volume, &agent, &token, figures],
            )
            .await?;
            super::lease::abandon(&tx, volume, token).await?;
            tx.execute(
                "INSERT INTO nightpass.passes (volume, agent, token, seq, ok, kind) \
                 VALUES ($1, $2, $3, 1, NULL, 'cutover')",
                &[&volume, &agent, &token],
            )
            .await?;
            leases.push(night_lease(night, volume, r.get(1), agent, token));
        }
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(Ok(leases))
    };
    pool.timed("claiming a filer for its night", work).await
}

/// Leases every volume of `night` to `agent` when its night's agent was
/// lost: every volume `cutting_over`, and no lease on any of them live, or
/// expired for less than `ttl` (a slow renewal is not a lost agent). The
/// volumes stay `cutting_over`; the lost agent's open pass rows are closed
/// as abandoned. `None` when that is not so (nothing changed).
pub async fn claim_stale(
    pool: &Pool,
    night: &Night,
    agent: &str,
    ttl: Duration,
) -> Result<Option<Vec<Lease>>> {
    let mut conn = pool.get().await?;
    let secs = ttl.as_secs_f64();
    let work = async {
        let tx = conn.transaction().await?;
        let rows = tx
            .query(
                "SELECT v.id, v.name, v.state, EXISTS (SELECT 1 FROM nightpass.leases l \
                 WHERE l.volume = v.id AND l.expires_at > now() - make_interval(secs => $2)) \
                 FROM nightpass.volumes v WHERE v.filer = $1 ORDER BY v.name FOR UPDATE OF v",
                &[&night.filer, &secs],
            )
            .await?;
        let stale = !rows.is_empty()
            && rows
                .iter()
                .all(|r| r.get::<_, String>(2) == "cutting_over" && !r.get::<_, bool>(3));
        if !stale {
            return Ok(None);
        }
        let mut leases = Vec::new();
        for r in &rows {
            let volume: i64 = r.get(0);
            let token = lease_volume(&tx, volume, agent, secs).await?;
            super::lease::abandon(&tx, volume, token).await?;
            // The lost night's own row: made good if the receiver sealed it.
            tx.execute(
                "UPDATE nightpass.passes SET record = record || '{\"night_lost\": true}' \
                 WHERE volume = $1 AND record ? 'abandoned' AND id = (SELECT max(id) \
                 FROM nightpass.passes WHERE volume = $1 AND kind = 'cutover')",
                &[&volume],
            )
            .await?;
            leases.push(night_lease(night, volume, r.get(1), agent, token));
        }
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(Some(leases))
    };
    pool.timed("taking over a lost night", work).await
}

/// A lost night the receiver sealed nothing of: every volume back to
/// `ready` (a history row saying why), the filer's night note saying it,
/// the leases released; the night may run again.
pub async fn settle_unsealed(pool: &Pool, leases: &[Lease], why: &str) -> Result<()> {
    let mut conn = pool.get().await?;
    let work = async {
        let tx = conn.transaction().await?;
        let figures = json!({"recovered": why});
        for l in leases {
            // The lost night certified nothing: its row stays a failure.
            tx.execute(
                "UPDATE nightpass.passes SET record = record - 'night_lost' \
                 WHERE volume = $1 AND record ? 'night_lost'",
                &[&l.volume],
            )
            .await?;
            let n = tx
                .execute(
                    "UPDATE nightpass.volumes SET state = 'ready', fence_token = $2, \
                     updated_at = now() WHERE id = $1 AND state = 'cutting_over'",
                    &[&l.volume, &l.token],
                )
                .await?;
            if n == 1 {
                super::record::step(&tx, l, "cutting_over", "ready", Some(&figures)).await?;
            }
        }
        release(&tx, leases).await?;
        note_on(&tx, leases, why).await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(())
    };
    pool.timed("settling a lost night", work).await
}

/// Releases `leases` and notes `why` on their filer, changing no state
/// (a lost night the receiver could not tell about).
pub async fn give_up(pool: &Pool, leases: &[Lease], why: &str) -> Result<()> {
    let mut conn = pool.get().await?;
    let work = async {
        let tx = conn.transaction().await?;
        release(&tx, leases).await?;
        note_on(&tx, leases, why).await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(())
    };
    pool.timed("releasing a lost night", work).await
}

/// How a filer's group cutover ended, as the agent records it (and spools
/// while the database is away).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NightRecord {
    /// The filer.
    pub filer: String,
    /// The leases of its volumes, taken by [`claim`].
    pub leases: Vec<Lease>,
    /// Each volume's consistency point, by name (all, on success).
    pub points: BTreeMap<String, String>,
    /// The group's consistency point, on success.
    pub group_point: Option<String>,
    /// Why it failed, and in which volume (none: the group as a whole).
    pub failure: Option<(Option<String>, String)>,
    /// The cutover's figures (`group_cutover_end`, or the error).
    pub figures: Value,
    /// When it ended (Unix seconds, the agent's clock).
    #[serde(default)]
    pub ended_unix: Option<f64>,
}

/// Writes `r` in one transaction: every volume still `cutting_over` moves
/// to `cut_over` with its consistency point (the filer gets the group's),
/// or back to `ready` (the failing volume to `failed`, retried under the
/// policy; all of them when the group failed as a whole); the leases are
/// released. Sent twice (a spooled record), the second changes nothing.
pub async fn finish(pool: &Pool, r: &NightRecord) -> Result<()> {
    let mut conn = pool.get().await?;
    let work = async {
        let tx = conn.transaction().await?;
        let retry_s: f64 = tx
            .query_one(
                "SELECT extract(epoch FROM retry_after)::float8 FROM nightpass.settings",
                &[],
            )
            .await?
            .get(0);
        let mut applied = 0;
        for lease in &r.leases {
            if finish_volume(&tx, r, lease, retry_s).await? {
                applied += 1;
            }
        }
        if applied > 0 {
            // Not when sent before: the filer's night is written once.
            finish_filer(&tx, r, retry_s).await?;
        }
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(())
    };
    pool.timed("recording a filer's night", work).await
}

/// `lease`'s volume after night `r`: its state, history row, pass row, and
/// the lease released; false when there was nothing to change.
async fn finish_volume(
    tx: &tokio_postgres::Transaction<'_>,
    r: &NightRecord,
    lease: &Lease,
    retry_s: f64,
) -> std::result::Result<bool, tokio_postgres::Error> {
    if r.failure.is_none() {
        // A night whose agent was lost and the receiver sealed: its row,
        // closed as abandoned by the takeover, was a success after all.
        tx.execute(
            "UPDATE nightpass.passes SET ok = true, failure = NULL, \
             record = ($2::jsonb || '{\"recovered\": true}') \
             WHERE volume = $1 AND record ? 'night_lost'",
            &[&lease.volume, &r.figures],
        )
        .await?;
    }
    // A success is the receiver's truth (the volumes are sealed): written
    // whatever the row says now; a failure only over a night still in
    // progress.
    let still = tx
        .query_opt(
            "SELECT attempts, state FROM nightpass.volumes WHERE id = $1 \
             AND (state = 'cutting_over' OR ($2 AND state <> 'cut_over')) FOR UPDATE",
            &[&lease.volume, &r.failure.is_none()],
        )
        .await?;
    let Some(still) = still else {
        return Ok(false);
    };
    let (attempts, from): (i32, String) = (still.get(0), still.get(1));
    let (to, failure, point) = outcome_of(r, &lease.name);
    let attempts = if to == "failed" { attempts + 1 } else { 0 };
    let wait = backoff(Duration::from_secs_f64(retry_s.max(0.0)), attempts);
    tx.execute(
        "UPDATE nightpass.volumes SET state = $2, failure = $3, consistency_point = \
         coalesce($4, consistency_point), attempts = $5, \
         next_attempt_at = now() + make_interval(secs => $6), updated_at = now() \
         WHERE id = $1",
        &[
            &lease.volume,
            &to,
            &failure,
            &point,
            &attempts,
            &wait.as_secs_f64(),
        ],
    )
    .await?;
    super::record::step(tx, lease, &from, to, Some(&r.figures)).await?;
    tx.execute(
        "UPDATE nightpass.passes SET ok = $4, record = $5, failure = $6, \
         ended_at = coalesce(to_timestamp($7), clock_timestamp()) \
         WHERE volume = $1 AND token = $2 AND seq = 1 AND agent = $3 AND ok IS NULL",
        &[
            &lease.volume,
            &lease.token,
            &lease.agent,
            &r.failure.is_none(),
            &row_record(r, &lease.name),
            &r.failure.as_ref().map(|f| f.1.clone()),
            &r.ended_unix,
        ],
    )
    .await?;
    tx.execute(
        "DELETE FROM nightpass.leases WHERE volume = $1 AND token = $2",
        &[&lease.volume, &lease.token],
    )
    .await?;
    Ok(true)
}

/// The filer after night `r`: its group point and cutover time, or its
/// failed night (retried under the policy); its night note either way.
async fn finish_filer(
    tx: &tokio_postgres::Transaction<'_>,
    r: &NightRecord,
    retry_s: f64,
) -> std::result::Result<(), tokio_postgres::Error> {
    let note = match &r.failure {
        None => format!(
            "cut over: group consistency point {}",
            r.group_point.as_deref().unwrap_or("-")
        ),
        Some((_, why)) => format!("the group cutover failed, every volume thawed: {why}"),
    };
    tx.execute(
        "UPDATE nightpass.filers SET group_point = coalesce($2, group_point), \
         cut_over_at = CASE WHEN $2::text IS NULL THEN cut_over_at ELSE now() END, \
         night_note = $3, night_note_at = now() WHERE name = $1",
        &[&r.filer, &r.group_point, &note],
    )
    .await?;
    if let Some((volume, why)) = &r.failure {
        night_failed(tx, r, volume.as_deref(), why, retry_s).await?;
    }
    Ok(())
}

/// A failed night: the filer's night waits `retry_after × 2^(failures −
/// 1)` (at most an hour) before it is tried again, and after
/// `max_attempts` failures for `fleet resume`; the failure counts for the
/// error threshold (once per night, not per volume).
async fn night_failed(
    tx: &tokio_postgres::Transaction<'_>,
    r: &NightRecord,
    volume: Option<&str>,
    why: &str,
    retry_s: f64,
) -> std::result::Result<(), tokio_postgres::Error> {
    let failures: i32 = tx
        .query_one(
            "UPDATE nightpass.filers SET night_failures = night_failures + 1 \
             WHERE name = $1 RETURNING night_failures",
            &[&r.filer],
        )
        .await?
        .get(0);
    let wait = backoff(Duration::from_secs_f64(retry_s.max(0.0)), failures);
    tx.execute(
        "UPDATE nightpass.filers SET night_retry_at = now() + make_interval(secs => $2) \
         WHERE name = $1",
        &[&r.filer, &wait.as_secs_f64()],
    )
    .await?;
    let agent = r.leases.first().map_or("", |l| l.agent.as_str());
    let label = match volume {
        Some(v) => format!("{}/{v}", r.filer),
        None => format!("{} (group cutover)", r.filer),
    };
    super::record::threshold(tx, agent, &label, why).await?;
    Ok(())
}

/// The record of volume `name`'s pass row: the night's figures; when the
/// night failed in another volume (or as a whole, for all but the first),
/// marked `dropped` so that one failed night counts once.
fn row_record(r: &NightRecord, name: &str) -> Value {
    let Some((culprit, _)) = &r.failure else {
        return r.figures.clone();
    };
    let counted = match culprit {
        Some(c) => c == name,
        None => r.leases.first().is_some_and(|l| l.name == name),
    };
    let mut v = r.figures.clone();
    if !counted {
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "dropped".into(),
                Value::from("the group cutover failed in another volume"),
            );
        }
    }
    v
}

/// Volume `name`'s state after `r`, its failure and its consistency point.
fn outcome_of(r: &NightRecord, name: &str) -> (&'static str, Option<String>, Option<String>) {
    match &r.failure {
        None => ("cut_over", None, r.points.get(name).cloned()),
        Some((Some(culprit), why)) if culprit == name => ("failed", Some(why.clone()), None),
        Some((Some(_), _)) => ("ready", None, None),
        // The group failed as a whole (its freeze, --max-freeze): every
        // volume waits for a retry, so that the night is not tried again
        // at once.
        Some((None, why)) => ("failed", Some(why.clone()), None),
    }
}

/// A lease on `volume` for `agent` for `secs` seconds, in a pass, taken
/// over from any earlier holder (the caller has checked it may): its new
/// token.
async fn lease_volume(
    tx: &tokio_postgres::Transaction<'_>,
    volume: i64,
    agent: &str,
    secs: f64,
) -> std::result::Result<i64, tokio_postgres::Error> {
    Ok(tx
        .query_one(
            "INSERT INTO nightpass.leases (volume, agent, expires_at, in_pass) \
             VALUES ($1, $2, now() + make_interval(secs => $3), true) \
             ON CONFLICT (volume) DO UPDATE SET agent = excluded.agent, \
             token = excluded.token, acquired_at = now(), renewed_at = now(), \
             expires_at = excluded.expires_at, in_pass = true RETURNING token",
            &[&volume, &agent, &secs],
        )
        .await?
        .get(0))
}

/// The lease of volume `volume` (`name`) of `night`, held by `agent`
/// under `token` for its cutover.
fn night_lease(night: &Night, volume: i64, name: String, agent: &str, token: i64) -> Lease {
    Lease {
        volume,
        filer: night.filer.clone(),
        name,
        state: "cutting_over".into(),
        agent: agent.to_string(),
        token,
    }
}

/// Gives `leases` up (their volumes' states untouched).
async fn release(
    tx: &tokio_postgres::Transaction<'_>,
    leases: &[Lease],
) -> std::result::Result<(), tokio_postgres::Error> {
    for l in leases {
        tx.execute(
            "DELETE FROM nightpass.leases WHERE volume = $1 AND token = $2",
            &[&l.volume, &l.token],
        )
        .await?;
    }
    Ok(())
}

/// `why` as the night note of the filer of `leases`.
async fn note_on(
    tx: &tokio_postgres::Transaction<'_>,
    leases: &[Lease],
    why: &str,
) -> std::result::Result<(), tokio_postgres::Error> {
    if let Some(l) = leases.first() {
        tx.execute(
            "UPDATE nightpass.filers SET night_note = $2, night_note_at = now() WHERE name = $1",
            &[&l.filer, &why],
        )
        .await?;
    }
    Ok(())
}

/// The figures of a night's start, for the history rows.
pub fn start_figures(n: &Night, group_forecast_s: f64) -> Value {
    json!({
        "night_at": crate::progress::rfc3339_seconds(n.at),
        "window_s": n.window_s,
        "left_s": n.left_s,
        "group_forecast_s": group_forecast_s,
    })
}
