//! The operator's fleet commands over the database: `add` and `schedule`
//! here, `status` in [`status`](status()), `pause`, `resume` and `limits` in
//! [`controls`] (`init` is [`super::schema::init`]).
//!
//! Each checks the schema version first, then reads or writes a few rows
//! in one transaction, every statement bounded by the pool's timeout. What
//! the operator reads goes through [`Progress`] (`fleet_*` events). None
//! of them takes a lease or runs a pass: that is the agent's.

pub mod controls;
mod status;

pub use controls::{limits, set_paused, Limits};
pub use status::{filer_state, status};

use std::path::Path;

use serde_json::json;

use super::db::{sqlstate, Conn, Pool};
use super::schema;
use crate::app::plan::Plan;
use crate::error::{Error, Result};
use crate::progress::{rfc3339_seconds, Progress};

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
/// `replace` is given and none of its volumes has left `pending`.
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

/// In one transaction: refuses a filer already there (unless `replace`
/// and nothing started), then inserts the filer, its volumes `pending`
/// and their first history rows.
async fn register(
    conn: &mut Conn,
    f: &FilerRow<'_>,
    replace: bool,
) -> std::result::Result<std::result::Result<(), Already>, tokio_postgres::Error> {
    let tx = conn.transaction().await?;
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
}

/// When `fleet schedule --at` says, as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// RFC 3339, with its offset.
    Rfc3339(String),
    /// `YYYY-MM-DD HH:MM` in this machine's time zone.
    Local(String),
}

/// Reads `--at`: RFC 3339 (`2026-12-03T01:00:00Z`) or local
/// `YYYY-MM-DD HH:MM`; anything else is bad input (exit 2).
pub fn parse_at(s: &str) -> Result<At> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let date_ok = b.len() >= 16
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16);
    if date_ok && b.len() == 16 && b[10] == b' ' {
        return Ok(At::Local(s.to_string()));
    }
    let tail = if date_ok { &s[16..] } else { "" };
    let zoned = tail.ends_with('Z')
        || tail.ends_with('z')
        || (tail.len() >= 6 && matches!(tail.as_bytes()[tail.len() - 6], b'+' | b'-'));
    if date_ok && matches!(b[10], b'T' | b't') && zoned {
        return Ok(At::Rfc3339(s.to_string()));
    }
    Err(Error::input(format!(
        "--at {s:?}: give RFC 3339 (2026-12-03T01:00:00Z) or local YYYY-MM-DD HH:MM"
    )))
}

/// This machine's time zone for PostgreSQL: `TZ`, else the zone
/// `/etc/localtime` links to, else `/etc/timezone`, else UTC.
fn local_zone() -> String {
    if let Some(tz) = std::env::var("TZ").ok().filter(|t| !t.is_empty()) {
        return tz.trim_start_matches(':').to_string();
    }
    if let Ok(p) = std::fs::read_link("/etc/localtime") {
        let p = p.display().to_string();
        if let Some((_, zone)) = p.split_once("zoneinfo/") {
            return zone.to_string();
        }
    }
    std::fs::read_to_string("/etc/timezone")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "UTC".into())
}

/// `fleet schedule`: the night of `filer`'s cutover, from `at` for
/// `window`; replaces an earlier one. An unknown filer is refused (exit 2).
pub async fn schedule(
    pool: &Pool,
    filer: &str,
    at: &At,
    window: std::time::Duration,
    progress: &dyn Progress,
) -> Result<()> {
    if window.is_zero() {
        return Err(Error::input("--window must be longer than 0"));
    }
    schema::check(pool).await?;
    let conn = pool.get().await?;
    let (text, zone) = match at {
        At::Rfc3339(t) => (t.clone(), "UTC".to_string()),
        At::Local(t) => (t.clone(), local_zone()),
    };
    let local = matches!(at, At::Local(_));
    let secs = window.as_secs_f64();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&filer, &text, &zone, &local, &secs];
    let q = conn.query_opt(
        "INSERT INTO nightpass.schedules (filer, at, window_len) \
         SELECT f.name, CASE WHEN $4 THEN $2::text::timestamp AT TIME ZONE $3::text ELSE $2::text::timestamptz END, \
         make_interval(secs => $5) FROM nightpass.filers f WHERE f.name = $1 \
         ON CONFLICT (filer) DO UPDATE SET at = excluded.at, window_len = excluded.window_len, \
         set_at = now() RETURNING extract(epoch FROM at)::float8",
        &params,
    );
    let row = match tokio::time::timeout(pool.settings().query_timeout, q).await {
        Ok(Ok(r)) => r,
        // Class 22: PostgreSQL could not read the time or the zone.
        Ok(Err(e)) if sqlstate(&e).is_some_and(|c| c.starts_with("22")) => {
            return Err(Error::input(format!(
                "--at {text:?} (zone {zone}): {}",
                e.as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_string())
            )))
        }
        Ok(Err(e)) => return Err(super::db::db_error(pool.target(), "scheduling", &e)),
        Err(_) => {
            return Err(Error::Network(format!(
                "database {}: scheduling: no answer",
                pool.target()
            )))
        }
    };
    let Some(row) = row else {
        return Err(Error::input(format!(
            "filer '{filer}' is not in the fleet (add it with `nightpass fleet add`)"
        )));
    };
    let at_s: f64 = row.get(0);
    progress.event(
        &json!({
            "event": "fleet_scheduled",
            "filer": filer,
            "at": rfc3339_seconds(at_s),
            "window_s": window.as_secs_f64(),
        }),
        &format!(
            "filer '{filer}': cutover night from {} for {:.0} s",
            rfc3339_seconds(at_s),
            window.as_secs_f64()
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_is_rfc3339_or_local_minutes() {
        assert_eq!(
            parse_at("2026-12-03T01:00:00Z").unwrap(),
            At::Rfc3339("2026-12-03T01:00:00Z".into())
        );
        assert!(matches!(
            parse_at("2026-12-03T01:00:00+01:00").unwrap(),
            At::Rfc3339(_)
        ));
        assert_eq!(
            parse_at("2026-12-03 01:00").unwrap(),
            At::Local("2026-12-03 01:00".into())
        );
        for bad in [
            "tomorrow",
            "2026-12-03",
            "2026-12-03T01:00:00",
            "2026-12-03 1:00",
            "",
        ] {
            assert_eq!(parse_at(bad).unwrap_err().exit_code(), 2, "{bad}");
        }
    }
}
