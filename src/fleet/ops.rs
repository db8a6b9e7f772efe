//! The operator's fleet commands over the database: `add` here (what it
//! refuses: `guards`), `schedule` in [`schedule`](schedule()), `remove`
//! in [`remove`](remove()), `status` in [`status`](status()), `pause`
//! and `resume` in [`controls`], `limits` in [`limits`](limits()) (`init` is
//! [`super::schema::init`]).
//!
//! Each checks the schema version first, then reads or writes a few rows
//! in one transaction, every statement bounded by the pool's timeout. What
//! the operator reads goes through [`Progress`] (`fleet_*` events). None
//! of them takes a lease or runs a pass: that is the agent's.

pub mod controls;
mod guards;
mod limits;
mod remove;
mod schedule;
mod status;

pub use controls::{set_paused, Limits};
pub use limits::limits;
pub use remove::remove;
pub use schedule::{parse_at, schedule, At};
pub use status::{filer_state, status};

use std::path::Path;

use serde_json::json;

use super::db::{sqlstate, Conn, Pool};
use super::schema;
use crate::app::plan::Plan;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// What `fleet add` registers.
#[derive(Debug, Clone)]
pub struct AddRequest<'a> {
    /// The plan file.
    pub plan: &'a Path,
    /// The filer's name (default: the plan's file stem).
    pub filer: Option<String>,
    /// The host that reads the sources (default: this machine's name).
    pub host: Option<String>,
    /// Replace a filer of that name none of whose volumes has started.
    pub replace: bool,
}

/// This machine's host name (`/proc/sys/kernel/hostname`).
pub fn this_host() -> Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io("reading this machine's host name", e))
}

/// The plan for a filer whose sources `host` reads: checked whole, its
/// sources absolute paths (an agent reads them, from its own directory);
/// on this host they must also be readable (`true`), on another they are
/// that host's agent's to read at each pass (`false`).
fn checked_plan(path: &Path, text: &str, host: &str) -> Result<(Plan, bool)> {
    let plan = Plan::parse_elsewhere(path, text)?;
    let here = this_host().is_ok_and(|h| h == host);
    if here {
        return Ok((Plan::parse(path, text)?, true));
    }
    Ok((plan, false))
}

/// `fleet add`: checks the plan, then registers its filer and volumes
/// (all `pending`). A filer already there is refused (exit 2) unless
/// `replace` is given and none of its volumes has left `pending`; so is a
/// volume nothing freezes, and a filer that shares a receiver volume or a
/// source with another (`guards`).
pub async fn add(pool: &Pool, req: AddRequest<'_>, progress: &dyn Progress) -> Result<()> {
    let text = std::fs::read_to_string(req.plan)
        .map_err(|e| Error::input(format!("cannot read plan {}: {e}", req.plan.display())))?;
    let filer = match req.filer {
        Some(f) => f,
        None => req
            .plan
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or_else(|| Error::input("the plan's file has no name; give --filer"))?,
    };
    if filer.trim().is_empty() {
        return Err(Error::input("--filer must not be empty"));
    }
    let host = match req.host {
        Some(h) if h.trim().is_empty() => return Err(Error::input("--host must not be empty")),
        Some(h) => h,
        None => this_host()?,
    };
    let (plan, here) = checked_plan(req.plan, &text, &host)?;
    // A plan no night could freeze still takes daytime passes (as `sync
    // --plan` takes it); its night is refused by `fleet schedule`.
    let unfrozen = guards::unfrozen(&plan);
    if let Some(why) = &unfrozen {
        tracing::warn!("{why}");
    }
    let plan_path = std::fs::canonicalize(req.plan)
        .unwrap_or_else(|_| req.plan.to_owned())
        .display()
        .to_string();
    schema::check(pool).await?;
    let mut conn = pool.get().await?;
    let filer_row = FilerRow {
        name: &filer,
        host: &host,
        plan: &plan,
        text: &text,
        plan_path: &plan_path,
    };
    match pool
        .timed(
            "registering the filer",
            register(&mut conn, &filer_row, req.replace),
        )
        .await?
    {
        Ok(()) => {}
        Err(Already::Exists) => {
            return Err(Error::input(format!(
                "filer '{filer}' is already in the fleet; give --replace to register it anew \
                 (only while none of its volumes has started)"
            )))
        }
        Err(Already::Started(n)) => {
            return Err(Error::input(format!(
                "filer '{filer}': {n} of its volumes have started; it cannot be replaced"
            )))
        }
        Err(Already::Conflict(why)) => return Err(Error::input(why)),
    }
    progress.event(
        &json!({
            "event": "fleet_filer_added",
            "filer": filer,
            "host": host,
            "receiver": plan.receiver,
            "volumes": plan.volumes.len(),
            "plan": plan_path,
            "sources_checked": here,
            "warning": unfrozen,
        }),
        &format!(
            "filer '{filer}' added: {} volumes pending on host {host}, receiver {}{}",
            plan.volumes.len(),
            plan.receiver,
            if here {
                ""
            } else {
                " (sources not checked here: that host's agent reads them)"
            }
        ),
    );
    Ok(())
}

/// A filer as `add` registers it.
struct FilerRow<'a> {
    name: &'a str,
    host: &'a str,
    plan: &'a Plan,
    text: &'a str,
    plan_path: &'a str,
}

/// In one transaction, under `guards::ADD_LOCK`: refuses a filer already
/// there (unless `replace` and nothing started) and one that shares a
/// receiver volume or a source with another, then inserts the filer, its
/// volumes `pending` and their first history rows.
async fn register(
    conn: &mut Conn,
    f: &FilerRow<'_>,
    replace: bool,
) -> std::result::Result<std::result::Result<(), Already>, tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&guards::ADD_LOCK])
        .await?;
    let there = tx
        .query_opt(
            "SELECT 1 FROM nightpass.filers WHERE name = $1 FOR UPDATE",
            &[&f.name],
        )
        .await?;
    if there.is_some() {
        let started: i64 = tx
            .query_one(
                "SELECT count(*) FROM nightpass.volumes WHERE filer = $1 AND state <> 'pending'",
                &[&f.name],
            )
            .await?
            .get(0);
        match (replace, started) {
            (false, _) => return Ok(Err(Already::Exists)),
            (true, n) if n > 0 => return Ok(Err(Already::Started(n))),
            (true, _) => {
                tx.execute("DELETE FROM nightpass.filers WHERE name = $1", &[&f.name])
                    .await?;
            }
        }
    }
    if let Some(why) = guards::conflict(&tx, f.name, f.host, f.plan).await? {
        return Ok(Err(Already::Conflict(why)));
    }
    // Two adds at once: the second meets the first's row (23505).
    let inserted = tx
        .execute(
            "INSERT INTO nightpass.filers \
             (name, plan_path, plan, host, receiver, fingerprint, jobs) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &f.name,
                &f.plan_path,
                &f.text,
                &f.host,
                &f.plan.receiver,
                &f.plan.server_fingerprint,
                &(f.plan.jobs.min(i32::MAX as usize) as i32),
            ],
        )
        .await;
    match inserted {
        Err(e) if sqlstate(&e) == Some("23505") => return Ok(Err(Already::Exists)),
        r => r?,
    };
    let by = format!("fleet add on {}", this_host().unwrap_or_default());
    for v in &f.plan.volumes {
        let id: i64 = tx
            .query_one(
                "INSERT INTO nightpass.volumes (filer, name, source, fsfreeze, size_bytes) \
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[
                    &f.name,
                    &v.name,
                    &v.source.display().to_string(),
                    &v.fsfreeze.as_ref().map(|p| p.display().to_string()),
                    &(v.size.min(i64::MAX as u64) as i64),
                ],
            )
            .await?
            .get(0);
        tx.execute(
            "INSERT INTO nightpass.history (volume, from_state, to_state, agent) \
             VALUES ($1, NULL, 'pending', $2)",
            &[&id, &by],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Ok(()))
}

/// Why `add` refused, found inside its transaction.
enum Already {
    Exists,
    Started(i64),
    /// Another filer's receiver volume or source: the message.
    Conflict(String),
}
