//! `fleet status`: the fleet as the database holds it, read in one
//! snapshot: the red button and the limits, then each filer (its state
//! follows from its volumes') followed by its volumes.
//!
//! Owns how the fleet is shown (`fleet`, `fleet_filer`, `fleet_volume`
//! events and their human lines); it only reads, and must not change a row.

use std::collections::HashMap;

use serde_json::{json, Value};
use tokio_postgres::{IsolationLevel, Row};

use super::controls::{pressed, Limits, LIMITS_COLUMNS};
use crate::error::Result;
use crate::fleet::db::Pool;
use crate::fleet::schema;
use crate::progress::{rfc3339_seconds, Progress};

/// The volumes' query: one row per volume, in filer then registration
/// order (columns as [`volume_line`] reads them).
const VOLUMES_SQL: &str = "SELECT v.filer, v.name, f.host, v.state, \
     (SELECT count(*) FROM nightpass.passes p WHERE p.volume = v.id AND p.ok), \
     v.forecast_final_pass_s, v.consistency_point, v.failure, v.attempts, \
     l.agent, f.receiver, v.source, \
     extract(epoch FROM s.at)::float8, extract(epoch FROM s.window_len)::float8, \
     (SELECT extract(epoch FROM max(p.ended_at))::float8 FROM nightpass.passes p \
      WHERE p.volume = v.id), \
     coalesce(l.in_pass, false), extract(epoch FROM v.next_attempt_at)::float8, \
     extract(epoch FROM l.expires_at)::float8, \
     extract(epoch FROM l.expires_at - now())::float8 \
     FROM nightpass.volumes v JOIN nightpass.filers f ON f.name = v.filer \
     LEFT JOIN nightpass.leases l ON l.volume = v.id AND l.expires_at > now() \
     LEFT JOIN nightpass.schedules s ON s.filer = v.filer \
     ORDER BY v.filer, v.id";

/// The filers' query (columns as [`filer_line`] reads them).
const FILERS_SQL: &str = "SELECT f.name, f.host, f.receiver, \
     extract(epoch FROM s.at)::float8, extract(epoch FROM s.window_len)::float8, \
     coalesce(now() >= s.at AND now() < s.at + s.window_len, false), \
     f.night_note, extract(epoch FROM f.night_note_at)::float8, \
     f.group_point, extract(epoch FROM f.cut_over_at)::float8, \
     f.night_failures, extract(epoch FROM f.night_retry_at)::float8 \
     FROM nightpass.filers f LEFT JOIN nightpass.schedules s ON s.filer = f.name \
     ORDER BY f.name";

/// The volume states a filer's state is drawn from, least advanced first.
const ORDER: &[&str] = &[
    "pending",
    "copying",
    "converging",
    "ready",
    "cutting_over",
    "cut_over",
];

/// A filer's state from its volumes': `cut_over` when all are,
/// `cutting_over` if any is, `failed` if any is, else the least advanced
/// of `pending` < `copying` < `converging` < `ready` (no volumes:
/// `pending`).
pub fn filer_state<'a>(volumes: impl IntoIterator<Item = &'a str>) -> &'static str {
    let (mut any_cutting, mut any_failed, mut least, mut all_cut, mut n) =
        (false, false, ORDER.len() - 1, true, 0);
    for s in volumes {
        n += 1;
        any_cutting |= s == "cutting_over";
        any_failed |= s == "failed";
        all_cut &= s == "cut_over";
        if let Some(i) = ORDER.iter().position(|o| *o == s) {
            least = least.min(i);
        }
    }
    match () {
        _ if n == 0 => "pending",
        _ if all_cut => "cut_over",
        _ if any_cutting => "cutting_over",
        _ if any_failed => "failed",
        _ => ORDER[least.min(3)],
    }
}

/// `fleet status`: the fleet's summary (`fleet` event: the red button,
/// the limits, the count of volumes per state), then per filer one
/// `fleet_filer` line followed by its `fleet_volume` lines.
pub async fn status(pool: &Pool, progress: &dyn Progress) -> Result<()> {
    schema::check(pool).await?;
    let mut conn = pool.get().await?;
    let read = async {
        // One snapshot: a filer's state agrees with its volumes'.
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let settings = tx
            .query_one(
                &format!(
                    "SELECT paused, pause_reason, extract(epoch FROM paused_at)::float8, \
                     paused_by, {LIMITS_COLUMNS} FROM nightpass.settings"
                ),
                &[],
            )
            .await?;
        let filers = tx.query(FILERS_SQL, &[]).await?;
        let volumes = tx.query(VOLUMES_SQL, &[]).await?;
        tx.commit().await?;
        Ok((settings, filers, volumes))
    };
    let (settings, filers, volumes) = pool.timed("reading the fleet", read).await?;
    summary(&settings, filers.len(), &volumes, progress);
    let mut by_filer: HashMap<String, Vec<&Row>> = HashMap::new();
    for v in &volumes {
        by_filer.entry(v.get(0)).or_default().push(v);
    }
    let max_attempts = Limits::from_row(&settings, 4).max_attempts;
    for f in &filers {
        let vols = by_filer.remove(&f.get::<_, String>(0)).unwrap_or_default();
        filer_line(f, &vols, max_attempts, progress);
        for v in vols {
            volume_line(v, max_attempts, progress);
        }
    }
    Ok(())
}

/// The `fleet` event: the red button, the limits, the count per state.
fn summary(settings: &Row, filers: usize, volumes: &[Row], progress: &dyn Progress) {
    let paused: bool = settings.get(0);
    let reason: Option<String> = settings.get(1);
    let paused_at: Option<f64> = settings.get(2);
    let paused_by: Option<String> = settings.get(3);
    let limits = Limits::from_row(settings, 4);
    let mut states = serde_json::Map::new();
    for r in volumes {
        let s: String = r.get(3);
        let n = states.get(&s).and_then(Value::as_u64).unwrap_or(0);
        states.insert(s, json!(n + 1));
    }
    let counts: Vec<String> = states.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let mut human = String::new();
    if paused {
        human.push_str(&format!(
            "PAUSED{}: {}; no new pass starts until `nightpass fleet resume`\n",
            pressed(paused_at, paused_by.as_deref()),
            reason.as_deref().unwrap_or("no reason given")
        ));
    }
    human.push_str(&format!(
        "fleet: {}; {filers} filers, {} volumes{}{}\n{}",
        if paused { "paused" } else { "running" },
        volumes.len(),
        if counts.is_empty() { "" } else { ": " },
        counts.join(", "),
        limits.summary()
    ));
    progress.event(
        &json!({
            "event": "fleet",
            "paused": paused,
            "pause_reason": reason,
            "paused_at": paused_at.map(rfc3339_seconds),
            "paused_by": paused_by,
            "filers": filers,
            "volumes": volumes.len(),
            "states": states,
            "limits": limits.to_json(),
            "schema_version": schema::latest(),
        }),
        &human,
    );
}

/// Where an operator reads what to do when a night's agent was lost.
const LOST: &str = "its night's agent was lost: see docs/CLI.md 'An agent lost during a night'";

/// One `fleet_filer` event from a row of [`FILERS_SQL`] and its volumes'
/// rows. A filer with volumes `cutting_over` none of which a live lease
/// holds lost the agent of its night.
fn filer_line(r: &Row, volumes: &[&Row], max_attempts: i32, progress: &dyn Progress) {
    let (filer, host, receiver): (String, String, String) = (r.get(0), r.get(1), r.get(2));
    let (at, window, open): (Option<f64>, Option<f64>, bool) = (r.get(3), r.get(4), r.get(5));
    let note: Option<String> = r.get(6);
    let note_at: Option<f64> = r.get(7);
    let point: Option<String> = r.get(8);
    let cut_at: Option<f64> = r.get(9);
    let failures: i32 = r.get(10);
    let retry_at: Option<f64> = r.get(11);
    let states: Vec<String> = volumes.iter().map(|v| v.get(3)).collect();
    let state = filer_state(states.iter().map(String::as_str));
    let cutting = volumes
        .iter()
        .filter(|v| v.get::<_, String>(3) == "cutting_over");
    let lost = cutting.clone().count() > 0
        && cutting
            .clone()
            .all(|v| v.get::<_, Option<String>>(9).is_none());
    let mut human = format!(
        "{filer} ({host} → {receiver}): {state}, {} volumes",
        volumes.len()
    );
    if let (Some(at), Some(w)) = (at, window) {
        let open = if open { ", open now" } else { "" };
        human.push_str(&format!(
            "; night {} for {w:.0} s{open}",
            rfc3339_seconds(at)
        ));
    }
    if let (Some(p), Some(t)) = (&point, cut_at) {
        human.push_str(&format!("; cut over {} to {p}", rfc3339_seconds(t)));
    } else if let Some(n) = &note {
        let when = note_at.map(|t| format!(" ({})", rfc3339_seconds(t)));
        human.push_str(&format!("; night: {n}{}", when.unwrap_or_default()));
    }
    if failures > 0 {
        let next = if failures >= max_attempts {
            Some(", gave up: `fleet resume` tries again".to_string())
        } else {
            retry_at.map(|t| format!(", next try from {}", rfc3339_seconds(t)))
        };
        human.push_str(&format!(
            "; {failures} failed night{}{}",
            if failures == 1 { "" } else { "s" },
            next.unwrap_or_default()
        ));
    }
    if lost {
        human.push_str(&format!("; {LOST}"));
    }
    progress.event(
        &json!({
            "event": "fleet_filer",
            "filer": filer,
            "host": host,
            "receiver": receiver,
            "state": state,
            "volumes": volumes.len(),
            "window_at": at.map(rfc3339_seconds),
            "window_s": window,
            "window_open": open,
            "night_note": note,
            "night_note_at": note_at.map(rfc3339_seconds),
            "group_point": point,
            "cut_over_at": cut_at.map(rfc3339_seconds),
            "night_failures": failures,
            "night_retry_at": retry_at.map(rfc3339_seconds),
            "night_agent_lost": lost,
        }),
        &human,
    );
}

/// One `fleet_volume` event from a row of [`VOLUMES_SQL`]; a failed
/// volume that had `max_attempts` waits for `fleet resume`.
fn volume_line(r: &Row, max_attempts: i32, progress: &dyn Progress) {
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
    let last: Option<f64> = r.get(14);
    let in_pass: bool = r.get(15);
    let next_at: f64 = r.get(16);
    let expires: Option<f64> = r.get(17);
    let ends_in: Option<f64> = r.get(18);
    let waits = state == "failed" && attempts >= max_attempts;
    let mut tail = match (&point, forecast, &failure) {
        (Some(p), _, _) => format!("consistency point {p}"),
        (None, _, Some(f)) if waits => {
            format!("failed (attempt {attempts}, the last: waits for `fleet resume`): {f}")
        }
        (None, _, Some(f)) => format!(
            "failed (attempt {attempts}, next try from {}): {f}",
            rfc3339_seconds(next_at)
        ),
        (None, Some(f), None) => format!("forecast {f:.1} s"),
        (None, None, None) => "no forecast yet".into(),
    };
    if let Some(t) = last {
        tail.push_str(&format!(", last pass {}", rfc3339_seconds(t)));
    }
    match (&agent, in_pass) {
        (Some(a), true) => tail.push_str(&format!(", in a pass by {a}")),
        (Some(a), false) => tail.push_str(&format!(", leased by {a}")),
        (None, _) => {}
    }
    if let (Some(_), Some(s)) = (&agent, ends_in) {
        tail.push_str(&format!(" (lease ends in {:.0} s)", s.max(0.0).ceil()));
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
            "in_pass": in_pass,
            "last_pass_at": last.map(rfc3339_seconds),
            "receiver": r.get::<_, String>(10),
            "source": r.get::<_, String>(11),
            "window_at": at.map(rfc3339_seconds),
            "window_s": window,
            "next_attempt_at": rfc3339_seconds(next_at),
            "waits_for_resume": waits,
            "lease_expires_at": expires.map(rfc3339_seconds),
        }),
        &format!("  {volume:<16} {state:<12} passes {passes:<3} {tail}"),
    );
}

#[cfg(test)]
mod tests {
    use super::filer_state;

    #[test]
    fn a_filer_is_as_far_as_its_least_advanced_volume() {
        let s = |v: &[&str]| filer_state(v.iter().copied());
        assert_eq!(s(&[]), "pending");
        assert_eq!(s(&["cut_over", "cut_over"]), "cut_over");
        assert_eq!(s(&["cut_over", "cutting_over", "failed"]), "cutting_over");
        assert_eq!(s(&["ready", "failed", "pending"]), "failed");
        assert_eq!(s(&["ready", "converging", "copying"]), "copying");
        assert_eq!(s(&["ready", "ready", "converging"]), "converging");
        assert_eq!(s(&["ready", "cut_over"]), "ready");
        assert_eq!(s(&["pending", "ready"]), "pending");
    }
}
