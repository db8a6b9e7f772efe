//! The operator's fleet commands over the database: `add`, `status`,
//! `pause`, `resume` and `schedule` (`init` is [`super::schema::init`]).
//!
//! Each checks the schema version first, then reads or writes a few rows
//! in one transaction, every statement bounded by the pool's timeout. What
//! the operator reads goes through [`Progress`] (`fleet_*` events).

use std::path::Path;

use serde_json::{json, Value};

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

/// `fleet add`: checks the plan, then registers its filer and volumes
/// (all `pending`). A filer already there is refused (exit 2) unless
/// `replace` is given and none of its volumes has left `pending`.
pub async fn add(pool: &Pool, req: AddRequest<'_>, progress: &dyn Progress) -> Result<()> {
    let plan = Plan::load(req.plan)?;
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
        }),
        &format!(
            "filer '{filer}' added: {} volumes pending on host {host}, receiver {}",
            plan.volumes.len(),
            plan.receiver
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

/// `fleet status`: the fleet's summary (`fleet` event: paused or not, the
/// count of volumes per state), then one `fleet_volume` line per volume.
pub async fn status(pool: &Pool, progress: &dyn Progress) -> Result<()> {
    schema::check(pool).await?;
    let conn = pool.get().await?;
    let settings = pool
        .timed(
            "reading the fleet's settings",
            conn.query_one(
                "SELECT paused, pause_reason, \
                 extract(epoch FROM paused_at)::float8, paused_by FROM nightpass.settings",
                &[],
            ),
        )
        .await?;
    let rows = pool
        .timed(
            "reading the volumes",
            conn.query(
                "SELECT v.filer, v.name, f.host, v.state, \
                 (SELECT count(*) FROM nightpass.passes p WHERE p.volume = v.id), \
                 v.forecast_final_pass_s, v.consistency_point, v.failure, v.attempts, \
                 l.agent, f.receiver, v.source, \
                 extract(epoch FROM s.at)::float8, extract(epoch FROM s.window_len)::float8 \
                 FROM nightpass.volumes v JOIN nightpass.filers f ON f.name = v.filer \
                 LEFT JOIN nightpass.leases l ON l.volume = v.id AND l.expires_at > now() \
                 LEFT JOIN nightpass.schedules s ON s.filer = v.filer \
                 ORDER BY v.filer, v.id",
                &[],
            ),
        )
        .await?;
    let paused: bool = settings.get(0);
    let reason: Option<String> = settings.get(1);
    let mut states = serde_json::Map::new();
    for r in &rows {
        let s: String = r.get(3);
        let n = states.get(&s).and_then(Value::as_u64).unwrap_or(0);
        states.insert(s, json!(n + 1));
    }
    let filers: std::collections::BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
    let counts: Vec<String> = states.iter().map(|(k, v)| format!("{v} {k}")).collect();
    progress.event(
        &json!({
            "event": "fleet",
            "paused": paused,
            "pause_reason": reason,
            "paused_at": settings.get::<_, Option<f64>>(2).map(rfc3339_seconds),
            "paused_by": settings.get::<_, Option<String>>(3),
            "filers": filers.len(),
            "volumes": rows.len(),
            "states": states,
            "schema_version": schema::latest(),
        }),
        &format!(
            "fleet: {}; {} filers, {} volumes{}{}",
            match (paused, &reason) {
                (true, Some(r)) => format!("PAUSED ({r})"),
                (true, None) => "PAUSED".into(),
                (false, _) => "running".into(),
            },
            filers.len(),
            rows.len(),
            if counts.is_empty() { "" } else { ": " },
            counts.join(", ")
        ),
    );
    for r in &rows {
        volume_line(r, progress);
    }
    Ok(())
}

/// One `fleet_volume` event from a row of [`status`]'s query.
fn volume_line(r: &tokio_postgres::Row, progress: &dyn Progress) {
    let (filer, volume, host, state): (String, String, String, String) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    let passes: i64 = r.get(4);
    let forecast: Option<f64> = r.get(5);
    let point: Option<String> = r.get(6);
    let failure: Option<String> = r.get(7);
    let attempts: i32 = r.get(8);
    let agent: Option<String> = r.get(9);
    let at: Option<f64> = r.get(12);
    let window: Option<f64> = r.get(13);
    let mut tail = match (&point, forecast, &failure) {
        (Some(p), _, _) => format!("consistency point {p}"),
        (None, _, Some(f)) => format!("failed (attempt {attempts}): {f}"),
        (None, Some(f), None) => format!("forecast {f:.1} s"),
        (None, None, None) => "no forecast yet".into(),
    };
    if let Some(a) = &agent {
        tail.push_str(&format!(", leased by {a}"));
    }
    if let (Some(at), Some(w)) = (at, window) {
        tail.push_str(&format!(", night {} for {w:.0} s", rfc3339_seconds(at)));
    }
    progress.event(
        &json!({
            "event": "fleet_volume",
            "filer": filer,
            "volume": volume,
            "host": host,
            "state": state,
            "passes": passes,
            "forecast_final_pass_s": forecast.map(|f| (f * 100.0).round() / 100.0),
            "consistency_point": point,
            "failure": failure,
            "attempts": attempts,
            "agent": agent,
            "receiver": r.get::<_, String>(10),
            "source": r.get::<_, String>(11),
            "window_at": at.map(rfc3339_seconds),
            "window_s": window,
        }),
        &format!("{filer:<12} {volume:<16} {host:<12} {state:<12} passes {passes:<3} {tail}"),
    );
}

/// `fleet pause` (with a reason) or `fleet resume` (`reason` unused): sets
/// the red button for every agent and says so (`fleet_paused` or
/// `fleet_resumed`).
pub async fn set_paused(
    pool: &Pool,
    paused: bool,
    reason: Option<&str>,
    progress: &dyn Progress,
) -> Result<()> {
    schema::check(pool).await?;
    let conn = pool.get().await?;
    // The red button never fails for want of this machine's name.
    let host = this_host().unwrap_or_else(|_| "an unnamed host".into());
    let by = format!(
        "fleet {} on {host}",
        if paused { "pause" } else { "resume" },
    );
    let was: bool = pool
        .timed(
            "setting the red button",
            conn.query_one(
                "UPDATE nightpass.settings AS s SET paused = $1, \
                 pause_reason = CASE WHEN $1 THEN $2 END, \
                 paused_at = CASE WHEN $1 THEN now() END, \
                 paused_by = CASE WHEN $1 THEN $3 END \
                 FROM (SELECT paused FROM nightpass.settings FOR UPDATE) AS old \
                 RETURNING old.paused",
                &[&paused, &reason, &by],
            ),
        )
        .await?
        .get(0);
    let (event, human) = match (paused, was) {
        (true, true) => (
            "fleet_paused",
            "the fleet was already paused; reason updated",
        ),
        (true, false) => ("fleet_paused", "fleet paused: no new pass starts anywhere"),
        (false, true) => ("fleet_resumed", "fleet resumed: agents start passes again"),
        (false, false) => ("fleet_resumed", "the fleet was not paused"),
    };
    progress.event(
        &json!({"event": event, "paused": paused, "was_paused": was, "reason": reason}),
        human,
    );
    Ok(())
}

/// `fleet limits`: changes the limits given, then shows them all
/// (`fleet_limits`).
pub async fn limits(
    pool: &Pool,
    args: &crate::app::cli::LimitsArgs,
    progress: &dyn Progress,
) -> Result<()> {
    let _ = (pool, args, progress);
    Err(Error::input("fleet limits is not built yet"))
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
