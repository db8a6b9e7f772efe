//! `fleet schedule`: the night of a filer's group cutover, and how `--at`
//! is read (RFC 3339, or local time in this machine's zone).
//!
//! Owns `nightpass.schedules` rows and the clearing of a filer's last
//! night when a new one is set; it must not touch volumes or leases.

use serde_json::json;

use crate::error::{Error, Result};
use crate::fleet::db::{sqlstate, Conn, Pool};
use crate::fleet::schema;
use crate::progress::{rfc3339_seconds, Progress};

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

/// What `schedule`'s transaction found.
enum Found {
    /// The night is set: when it opens (seconds since the epoch).
    Set(f64),
    /// No such filer.
    Unknown,
    /// The filer was cut over at that time.
    CutOver(f64),
    /// The night (its start) was over at its end (seconds).
    Over(f64, f64),
    /// Its plan leaves a volume nothing would freeze: why.
    Unfrozen(String),
}

/// `fleet schedule`: the night of `filer`'s cutover, from `at` for
/// `window`; replaces an earlier one, and clears the filer's last night
/// (its note, failed nights and their retry time). An unknown filer, one
/// already cut over, or a night already over is refused (exit 2).
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
    let mut conn = pool.get().await?;
    let (text, zone) = match at {
        At::Rfc3339(t) => (t.clone(), "UTC".to_string()),
        At::Local(t) => (t.clone(), local_zone()),
    };
    let local = matches!(at, At::Local(_));
    let secs = window.as_secs_f64();
    let work = set_night(&mut conn, filer, (&text, &zone, local), secs);
    let found = match tokio::time::timeout(pool.settings().query_timeout, work).await {
        Ok(Ok(r)) => r,
        // Class 22: PostgreSQL could not read the time or the zone.
        Ok(Err(e)) if sqlstate(&e).is_some_and(|c| c.starts_with("22")) => {
            return Err(Error::input(format!(
                "--at {text:?} (zone {zone}): {}",
                e.as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_string())
            )))
        }
        Ok(Err(e)) => return Err(crate::fleet::db::db_error(pool.target(), "scheduling", &e)),
        Err(_) => {
            return Err(Error::Network(format!(
                "database {}: scheduling: no answer",
                pool.target()
            )))
        }
    };
    let at_s = match found {
        Found::Set(at_s) => at_s,
        Found::Unknown => {
            return Err(Error::input(format!(
                "filer '{filer}' is not in the fleet (add it with `nightpass fleet add`)"
            )))
        }
        Found::CutOver(t) => {
            return Err(Error::input(format!(
                "filer {filer} was cut over at {}; its volumes are sealed: it has no night \
                 to come",
                rfc3339_seconds(t)
            )))
        }
        Found::Unfrozen(why) => {
            return Err(Error::input(format!(
                "filer {filer}: no night can be scheduled: {why}"
            )))
        }
        Found::Over(start, end) => {
            return Err(Error::input(format!(
                "filer {filer}: the night from {} for {secs:.0} s was over at {}: give a \
                 night still to come (or open now); nothing was scheduled",
                rfc3339_seconds(start),
                rfc3339_seconds(end)
            )))
        }
    };
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

/// `schedule`'s transaction: lock the filer, read `at` (text, zone,
/// local or not) as PostgreSQL reads it, refuse a filer cut over or a
/// night over, then set the night and clear the filer's last one.
async fn set_night(
    conn: &mut Conn,
    filer: &str,
    (text, zone, local): (&str, &str, bool),
    secs: f64,
) -> std::result::Result<Found, tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&filer, &text, &zone, &local, &secs];
    let row = tx
        .query_opt(
            "SELECT extract(epoch FROM f.cut_over_at)::float8, extract(epoch FROM t.at)::float8, \
             t.at + make_interval(secs => $5) <= now(), \
             extract(epoch FROM t.at + make_interval(secs => $5))::float8, f.plan, f.plan_path \
             FROM nightpass.filers f, (SELECT CASE WHEN $4 THEN $2::text::timestamp \
             AT TIME ZONE $3::text ELSE $2::text::timestamptz END AS at) t \
             WHERE f.name = $1 FOR UPDATE OF f",
            &params,
        )
        .await?;
    let Some(row) = row else {
        return Ok(Found::Unknown);
    };
    let (cut, at_s, over, end): (Option<f64>, f64, bool, f64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if let Some(t) = cut {
        return Ok(Found::CutOver(t));
    }
    if over {
        return Ok(Found::Over(at_s, end));
    }
    let (plan, path): (String, String) = (row.get(4), row.get(5));
    let unfrozen = crate::app::plan::Plan::parse_elsewhere(std::path::Path::new(&path), &plan)
        .ok()
        .and_then(|p| super::guards::unfrozen(&p));
    if let Some(why) = unfrozen {
        return Ok(Found::Unfrozen(why));
    }
    tx.execute(
        "INSERT INTO nightpass.schedules (filer, at, window_len) \
         VALUES ($1, to_timestamp($2), make_interval(secs => $3)) \
         ON CONFLICT (filer) DO UPDATE SET at = excluded.at, window_len = excluded.window_len, \
         set_at = now()",
        &[&filer, &at_s, &secs],
    )
    .await?;
    tx.execute(
        "UPDATE nightpass.filers SET night_note = NULL, night_note_at = NULL, \
         night_failures = 0, night_retry_at = NULL WHERE name = $1",
        &[&filer],
    )
    .await?;
    tx.commit().await?;
    Ok(Found::Set(at_s))
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
