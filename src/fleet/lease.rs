//! Leases with fencing tokens: how an agent claims a volume, keeps it, and
//! changes its state only while it still holds it.
//!
//! Owns the claim (`SELECT … FOR UPDATE OF v SKIP LOCKED` over the host's
//! due volumes, then a lease row whose `token` comes from the sequence
//! `nightpass.fencing_tokens`, so a later holder always has a larger
//! token), the renewal, and the fenced transition (a state change is made
//! only when the caller's lease still holds that token and no larger token
//! has changed the volume, and is written to `history` in the same
//! transaction). It decides no policy (which state follows, caps, the red
//! button, retries): that is the agent's, which is not built yet.

use std::time::Duration;

use serde_json::Value;

use super::db::Pool;
use crate::error::{Error, Result};

/// A lease an agent holds on one volume.
#[derive(Debug, Clone, PartialEq)]
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
/// other claim has locked, leased for `$3` seconds to agent `$2`. An
/// expired lease row is taken over with a new (larger) token.
const CLAIM_SQL: &str = "
WITH candidate AS (
    SELECT v.id FROM nightpass.volumes v
    JOIN nightpass.filers f ON f.name = v.filer
    WHERE f.host = $1
      AND v.state IN ('pending', 'copying', 'converging', 'ready', 'failed')
      AND v.next_attempt_at <= now()
      AND NOT EXISTS (SELECT 1 FROM nightpass.leases l
                      WHERE l.volume = v.id AND l.expires_at > now())
    ORDER BY v.next_attempt_at, v.id
    LIMIT 1
    FOR UPDATE OF v SKIP LOCKED
)
INSERT INTO nightpass.leases (volume, agent, expires_at)
SELECT id, $2, now() + make_interval(secs => $3) FROM candidate
ON CONFLICT (volume) DO UPDATE SET
    agent = excluded.agent, token = excluded.token, acquired_at = now(),
    renewed_at = now(), expires_at = excluded.expires_at, in_pass = false
    WHERE nightpass.leases.expires_at <= now()
RETURNING volume, token";

/// Claims one due volume of `host` for `agent` for `ttl`; `None` when
/// there is none to claim.
pub async fn claim(pool: &Pool, host: &str, agent: &str, ttl: Duration) -> Result<Option<Lease>> {
    let mut conn = pool.get().await?;
    let secs = ttl.as_secs_f64();
    let work = async {
        let tx = conn.transaction().await?;
        let Some(row) = tx.query_opt(CLAIM_SQL, &[&host, &agent, &secs]).await? else {
            return Ok(None);
        };
        let (volume, token): (i64, i64) = (row.get(0), row.get(1));
        let v = tx
            .query_one(
                "SELECT filer, name, state FROM nightpass.volumes WHERE id = $1",
                &[&volume],
            )
            .await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(Some(Lease {
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
