//! Leases with fencing tokens: how an agent claims a volume, keeps it, and
//! changes its state only while it still holds it.
//!
//! Owns the claim (`SELECT … FOR UPDATE OF v SKIP LOCKED` over the host's
//! due volumes, then a lease row whose `token` comes from the sequence
//! `nightpass.fencing_tokens`, so a later holder always has a larger
//! token), the renewal, and the fenced transition (a state change is made
//! only when the caller's lease still holds that token and no larger token
//! has changed the volume, and is written to `history` in the same
//! transaction). The claim also honours the red button and the fleet's caps in
//! its transaction. It decides no policy (which state follows a pass,
//! retries): that is [`super::record`]'s.

use std::time::Duration;

use serde_json::Value;

use super::db::Pool;
use crate::error::{Error, Result};

/// A lease an agent holds on one volume.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    /// The volume's id (`nightpass.volumes.id`).
    pub volume: i64,
    /// The volume's filer and name.
    pub filer: String,
    /// The volume's name in its plan.
    pub name: String,
    /// The volume's state when claimed.
    pub state: String,
    /// The agent holding it.
    pub agent: String,
    /// The fencing token: larger than every earlier lease's on any volume.
    pub token: i64,
}

/// Volume states an agent may claim (not in a cutover, not cut over).
pub const CLAIMABLE: &[&str] = &["pending", "copying", "converging", "ready", "failed"];

/// The claim: the host's first due volume that no live lease holds and no
/// other claim has locked, within the fleet's caps, leased for `$3`
/// seconds to agent `$2` for a pass (`in_pass`). An expired lease row is
/// taken over with a new (larger) token. A failed volume that used up
/// `$4` attempts waits for an operator; a filer in its night (cutting
/// over, cut over, or its window open with the volume ready) is left to
/// the night. `$5`..`$8`: the caps fleet-wide, per filer (NULL: the
/// filer's `jobs`), per host and per receiver (NULL: none), counted over
/// the live leases in a pass.
const CLAIM_SQL: &str = "
WITH live AS (
    SELECT w.filer, g.host, g.receiver FROM nightpass.leases l
    JOIN nightpass.volumes w ON w.id = l.volume
    JOIN nightpass.filers g ON g.name = w.filer
    WHERE l.in_pass AND l.expires_at > now()
), candidate AS (
    SELECT v.id FROM nightpass.volumes v
    JOIN nightpass.filers f ON f.name = v.filer
    LEFT JOIN nightpass.schedules s ON s.filer = v.filer
    WHERE f.host = $1
      AND f.cut_over_at IS NULL
      AND v.state IN ('pending', 'copying', 'converging', 'ready', 'failed')
      AND (v.state <> 'failed' OR v.attempts < $4)
      AND v.next_attempt_at <= now()
      AND NOT (v.state = 'ready' AND s.at IS NOT NULL
               AND now() >= s.at AND now() < s.at + s.window_len)
      AND NOT EXISTS (SELECT 1 FROM nightpass.leases l
                      WHERE l.volume = v.id AND l.expires_at > now())
      AND NOT EXISTS (SELECT 1 FROM nightpass.volumes c
                      WHERE c.filer = v.filer AND c.state IN ('cutting_over', 'cut_over'))
      AND ($5::integer IS NULL OR (SELECT count(*) FROM live) < $5)
      AND (SELECT count(*) FROM live WHERE live.filer = v.filer) < coalesce($6::integer, f.jobs)
      AND ($7::integer IS NULL OR (SELECT count(*) FROM live WHERE live.host = f.host) < $7)
      AND ($8::integer IS NULL OR (SELECT count(*) FROM live WHERE live.receiver = f.receiver) < $8)
    ORDER BY v.next_attempt_at, v.id
    LIMIT 1
    FOR UPDATE OF v SKIP LOCKED
)
INSERT INTO nightpass.leases (volume, agent, expires_at, in_pass)
SELECT id, $2, now() + make_interval(secs => $3), true FROM candidate
ON CONFLICT (volume) DO UPDATE SET
    agent = excluded.agent, token = excluded.token, acquired_at = now(),
    renewed_at = now(), expires_at = excluded.expires_at, in_pass = true
    WHERE nightpass.leases.expires_at <= now()
RETURNING volume, token";

/// Why [`claim`] took nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoClaim {
    /// The red button is pressed (with its reason, if any).
    Paused(Option<String>),
    /// Nothing due within the caps.
    Idle,
}

/// Claims one due volume of `host` for `agent` for `ttl`, for a pass: in
/// the same transaction, under the fleet's settings row (so a claim and
/// `fleet pause` are ordered), checks the red button and the caps, takes
/// the lease and writes the pass's row in `passes` (`at` = now, `ok`
/// NULL). `Err(NoClaim)` when there is nothing to claim, or the fleet is
/// paused.
pub async fn claim(
    pool: &Pool,
    host: &str,
    agent: &str,
    ttl: Duration,
) -> Result<std::result::Result<Lease, NoClaim>> {
    let mut conn = pool.get().await?;
    let secs = ttl.as_secs_f64();
    let work = async {
        let tx = conn.transaction().await?;
        let set = tx
            .query_one(
                "SELECT paused, pause_reason, max_attempts, max_passes, max_passes_per_filer, \
                 max_passes_per_host, max_passes_per_receiver FROM nightpass.settings FOR UPDATE",
                &[],
            )
            .await?;
        if set.get::<_, bool>(0) {
            return Ok(Err(NoClaim::Paused(set.get(1))));
        }
        let (attempts, caps): (i32, [Option<i32>; 4]) =
            (set.get(2), [set.get(3), set.get(4), set.get(5), set.get(6)]);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &host, &agent, &secs, &attempts, &caps[0], &caps[1], &caps[2], &caps[3],
        ];
        let Some(row) = tx.query_opt(CLAIM_SQL, &params).await? else {
            return Ok(Err(NoClaim::Idle));
        };
        let (volume, token): (i64, i64) = (row.get(0), row.get(1));
        let v = tx
            .query_one(
                "SELECT filer, name, state FROM nightpass.volumes WHERE id = $1",
                &[&volume],
            )
            .await?;
        abandon(&tx, volume, token).await?;
        tx.execute(
            "INSERT INTO nightpass.passes (volume, agent, token, seq, ok, kind) \
             VALUES ($1, $2, $3, 1, NULL, 'pass')",
            &[&volume, &agent, &token],
        )
        .await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(Ok(Lease {
            volume,
            filer: v.get(0),
            name: v.get(1),
            state: v.get(2),
            agent: agent.to_string(),
            token,
        }))
    };
    pool.timed("claiming a volume", work).await
}

/// Closes the pass rows of `volume` that an earlier holder left open (its
/// agent died, or lost its lease and never said): `ok` false, marked
/// `abandoned`, not counted by the error threshold. Their agent's own
/// record, should it come later from its spool, still replaces them.
pub async fn abandon(
    tx: &tokio_postgres::Transaction<'_>,
    volume: i64,
    token: i64,
) -> std::result::Result<u64, tokio_postgres::Error> {
    tx.execute(
        "UPDATE nightpass.passes SET ok = false, ended_at = clock_timestamp(), \
         failure = 'abandoned: its agent stopped renewing the lease before the pass ended', \
         record = jsonb_build_object('dropped', 'abandoned', 'abandoned', true) \
         WHERE volume = $1 AND ok IS NULL AND token < $2",
        &[&volume, &token],
    )
    .await
}

/// Gives `lease` up (its volume claimable at once); nothing when it was
/// lost already.
pub async fn release(pool: &Pool, lease: &Lease) -> Result<()> {
    let conn = pool.get().await?;
    pool.timed(
        "releasing a lease",
        conn.execute(
            "DELETE FROM nightpass.leases WHERE volume = $1 AND token = $2",
            &[&lease.volume, &lease.token],
        ),
    )
    .await?;
    Ok(())
}

/// Extends `lease` by `ttl` from now; false when it was lost (expired and
/// taken, or its token replaced): the holder must stop working the volume.
pub async fn renew(pool: &Pool, lease: &Lease, ttl: Duration) -> Result<bool> {
    let conn = pool.get().await?;
    let secs = ttl.as_secs_f64();
    let n = pool
        .timed(
            "renewing a lease",
            conn.execute(
                "UPDATE nightpass.leases SET renewed_at = now(), \
                 expires_at = now() + make_interval(secs => $3) \
                 WHERE volume = $1 AND token = $2 AND expires_at > now()",
                &[&lease.volume, &lease.token, &secs],
            ),
        )
        .await?;
    Ok(n == 1)
}

/// Moves the leased volume to `to` (with `failure` for `failed`), and
/// records it in `history` with `figures`, only while `lease` holds: true
/// when done, false when the lease was lost (nothing changed).
pub async fn transition(
    pool: &Pool,
    lease: &Lease,
    to: &str,
    failure: Option<&str>,
    figures: Option<&Value>,
) -> Result<bool> {
    if to == "failed" && failure.is_none() {
        return Err(Error::input("a volume fails with a reason"));
    }
    let mut conn = pool.get().await?;
    let work =
        async {
            let tx = conn.transaction().await?;
            let held = tx
                .query_opt(
                    "SELECT v.state FROM nightpass.volumes v \
                 JOIN nightpass.leases l ON l.volume = v.id \
                 WHERE v.id = $1 AND l.token = $2 AND l.expires_at > now() \
                 AND v.fence_token <= $2 FOR UPDATE OF v, l",
                    &[&lease.volume, &lease.token],
                )
                .await?;
            let Some(held) = held else {
                return Ok(false);
            };
            let from: String = held.get(0);
            tx.execute(
                "UPDATE nightpass.volumes SET state = $2, failure = $3, fence_token = $4, \
             updated_at = now() WHERE id = $1",
                &[&lease.volume, &to, &failure, &lease.token],
            )
            .await?;
            tx.execute(
            "INSERT INTO nightpass.history (volume, from_state, to_state, agent, token, figures) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&lease.volume, &from, &to, &lease.agent, &lease.token, &figures],
        )
        .await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(true)
        };
    pool.timed("changing a volume's state", work).await
}

/// What an agent needs of a leased volume's filer for a pass.
#[derive(Debug, Clone, PartialEq)]
pub struct FilerPlan {
    /// The plan's text as registered.
    pub plan: String,
    /// Where it was read from (for messages and relative paths).
    pub plan_path: String,
    /// The filer's night's length, when scheduled (seconds).
    pub window_s: Option<f64>,
    /// Its volumes.
    pub volumes: i64,
    /// Its plan's `jobs`.
    pub jobs: i32,
}

/// The plan and night of `filer`; `None` when it is not in the fleet.
pub async fn filer_plan(pool: &Pool, filer: &str) -> Result<Option<FilerPlan>> {
    let conn = pool.get().await?;
    let row = pool
        .timed(
            "reading a filer's plan",
            conn.query_opt(
                "SELECT f.plan, f.plan_path, extract(epoch FROM s.window_len)::float8, \
                 (SELECT count(*) FROM nightpass.volumes v WHERE v.filer = f.name), f.jobs \
                 FROM nightpass.filers f LEFT JOIN nightpass.schedules s ON s.filer = f.name \
                 WHERE f.name = $1",
                &[&filer],
            ),
        )
        .await?;
    Ok(row.map(|r| FilerPlan {
        plan: r.get(0),
        plan_path: r.get(1),
        window_s: r.get(2),
        volumes: r.get(3),
        jobs: r.get(4),
    }))
}

/// The hosts that have filers in the fleet, in name order.
pub async fn hosts(pool: &Pool) -> Result<Vec<String>> {
    let conn = pool.get().await?;
    let rows = pool
        .timed(
            "reading the fleet's hosts",
            conn.query(
                "SELECT DISTINCT host FROM nightpass.filers ORDER BY host",
                &[],
            ),
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
