//! The fleet's controls: the red button (`fleet pause` / `fleet resume`)
//! and the limits (shown here; `fleet limits` changes them in
//! [`super::limits`]), all kept in the one row of `nightpass.settings`,
//! and every change of them written to `nightpass.fleet_log`.
//!
//! Owns what an operator changes in `settings` and how such a change is
//! logged. Each change is one transaction that first locks the settings
//! row, so it orders against the agents' claims, which lock the same row;
//! its `fleet_log` row's time is taken after that lock
//! (`clock_timestamp()`). It must not touch leases, and changes volumes in
//! one way only: `resume` makes the `failed` ones due again.

use serde_json::{json, Map, Value};

use super::this_host;
use crate::error::{Error, Result};
use crate::fleet::db::{sqlstate, Conn, Pool};
use crate::fleet::schema;
use crate::progress::{rfc3339_seconds, Progress};

/// The columns of `nightpass.settings` that [`Limits::from_row`] reads, in
/// its order.
pub const LIMITS_COLUMNS: &str = "max_passes, max_passes_per_filer, max_passes_per_host, \
     max_passes_per_receiver, error_threshold, error_window, max_attempts, \
     extract(epoch FROM retry_after)::float8";

/// The fleet's limits, as `nightpass.settings` holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Passes in flight in the whole fleet (`None`: no limit).
    pub max_passes: Option<i32>,
    /// Passes in flight per filer (`None`: the filer's plan `jobs`).
    pub per_filer: Option<i32>,
    /// Passes in flight per sender host (`None`: no limit).
    pub per_host: Option<i32>,
    /// Passes in flight per receiver (`None`: no limit).
    pub per_receiver: Option<i32>,
    /// Failures among the last `error_window` ended passes that pause the
    /// fleet.
    pub error_threshold: i32,
    /// How many of the fleet's last ended passes the threshold counts in.
    pub error_window: i32,
    /// Attempts a failing volume gets before it waits for `fleet resume`.
    pub max_attempts: i32,
    /// The wait before a failed volume's first retry, in seconds.
    pub retry_after_s: f64,
}

impl Limits {
    /// The limits from `row`, whose columns from `at` on are
    /// [`LIMITS_COLUMNS`].
    pub fn from_row(row: &tokio_postgres::Row, at: usize) -> Limits {
        Limits {
            max_passes: row.get(at),
            per_filer: row.get(at + 1),
            per_host: row.get(at + 2),
            per_receiver: row.get(at + 3),
            error_threshold: row.get(at + 4),
            error_window: row.get(at + 5),
            max_attempts: row.get(at + 6),
            retry_after_s: row.get(at + 7),
        }
    }

    /// The limits by their column names (`retry_after` in seconds:
    /// `retry_after_s`).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for (k, v) in self.fields() {
            m.insert(k.to_string(), v);
        }
        m
    }

    /// Every limit's column name and value, in the table's order.
    pub(super) fn fields(&self) -> [(&'static str, Value); 8] {
        [
            ("max_passes", json!(self.max_passes)),
            ("max_passes_per_filer", json!(self.per_filer)),
            ("max_passes_per_host", json!(self.per_host)),
            ("max_passes_per_receiver", json!(self.per_receiver)),
            ("error_threshold", json!(self.error_threshold)),
            ("error_window", json!(self.error_window)),
            ("max_attempts", json!(self.max_attempts)),
            ("retry_after_s", json!(self.retry_after_s)),
        ]
    }

    /// One line for `fleet status`.
    pub fn summary(&self) -> String {
        let cap = |c: Option<i32>| c.map_or("no limit".to_string(), |n| n.to_string());
        format!(
            "limits: passes in flight {} in the fleet, {} per filer, {} per host, {} per receiver; \
             pause at {} failures in the last {} passes; {} attempts, first retry after {}",
            cap(self.max_passes),
            self.per_filer
                .map_or("plan jobs".to_string(), |n| n.to_string()),
            cap(self.per_host),
            cap(self.per_receiver),
            self.error_threshold,
            self.error_window,
            self.max_attempts,
            seconds(self.retry_after_s)
        )
    }

    /// The table `fleet limits` prints.
    pub(super) fn table(&self) -> String {
        let cap = |c: Option<i32>, none: &str| c.map_or(none.to_string(), |n| n.to_string());
        let rows = [
            (
                "passes in flight, whole fleet",
                cap(self.max_passes, "no limit"),
            ),
            (
                "passes in flight per filer",
                cap(self.per_filer, "the filer's plan jobs"),
            ),
            ("passes in flight per host", cap(self.per_host, "no limit")),
            (
                "passes in flight per receiver",
                cap(self.per_receiver, "no limit"),
            ),
            (
                "error threshold",
                format!(
                    "{} failures among the last {} passes pause the fleet",
                    self.error_threshold, self.error_window
                ),
            ),
            (
                "attempts",
                format!(
                    "{} before a failing volume waits for `fleet resume`",
                    self.max_attempts
                ),
            ),
            (
                "first retry after",
                format!(
                    "{} (doubled at each failure, at most 1 h)",
                    seconds(self.retry_after_s)
                ),
            ),
        ];
        rows.iter()
            .map(|(k, v)| format!("  {k:<31} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `s` seconds for a human: `30 s`, `2.5 s`.
fn seconds(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

/// `n` and `what`, plural unless `n` is 1: `2 failed volumes`.
fn count(n: i64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The name an operator's command writes in `fleet_log.by` and
/// `settings.paused_by`: `fleet COMMAND on HOST`. Never fails for want of
/// this machine's name.
pub(super) fn by(command: &str) -> String {
    let host = this_host().unwrap_or_else(|_| "an unnamed host".into());
    format!("fleet {command} on {host}")
}

/// Writes a `fleet_log` row in `tx` (its `at`: now, by the clock) and
/// returns that time (seconds since the epoch).
pub async fn log(
    tx: &tokio_postgres::Transaction<'_>,
    by: &str,
    event: &str,
    detail: &Value,
) -> std::result::Result<f64, tokio_postgres::Error> {
    let row = tx
        .query_one(
            "INSERT INTO nightpass.fleet_log (by, event, detail) VALUES ($1, $2, $3) \
             RETURNING extract(epoch FROM at)::float8",
            &[&by, &event, detail],
        )
        .await?;
    Ok(row.get(0))
}

/// `Ok(None)` when `work` was chosen as a deadlock's victim (or failed to
/// serialize): the caller runs it again.
async fn unless_victim<T>(
    work: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> std::result::Result<Option<T>, tokio_postgres::Error> {
    match work.await {
        Ok(v) => Ok(Some(v)),
        Err(e) if matches!(sqlstate(&e), Some("40P01" | "40001")) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What the red button's transaction found and did.
struct Toggled {
    was_paused: bool,
    /// The press in effect after the change (pause only): its reason,
    /// time and author.
    reason: Option<String>,
    paused_at: Option<f64>,
    paused_by: Option<String>,
    /// `failed` volumes made due (resume only).
    retried: i64,
    /// Of those, the ones given fresh attempts.
    fresh: i64,
    /// Filers whose failed nights were forgotten (resume only).
    nights: i64,
}

/// `fleet pause` (with a reason) or `fleet resume`: sets the red button for
/// every agent, logs it in `fleet_log`, and says so (`fleet_paused` or
/// `fleet_resumed`). A pause of a paused fleet keeps its press (reason,
/// time, author), only a new reason replacing the reason. `resume` also
/// makes every `failed` volume due now, with fresh attempts for those that
/// had used up `max_attempts`, and lets every filer's night be tried again.
pub async fn set_paused(
    pool: &Pool,
    paused: bool,
    reason: Option<&str>,
    progress: &dyn Progress,
) -> Result<()> {
    schema::check(pool).await?;
    let mut conn = pool.get().await?;
    let by = by(if paused { "pause" } else { "resume" });
    let mut done = None;
    // A resume locks failed volumes after the settings row; a claim that
    // locked one of them first may deadlock with it: try again.
    for _ in 0..3 {
        let work = unless_victim(toggle(&mut conn, paused, reason, &by));
        done = pool.timed("setting the red button", work).await?;
        if done.is_some() {
            break;
        }
    }
    let Some(t) = done else {
        return Err(Error::Network(format!(
            "database {}: setting the red button: deadlocked three times",
            pool.target()
        )));
    };
    if paused {
        paused_event(&t, reason, progress);
        return Ok(());
    }
    let head = if t.was_paused {
        "fleet resumed: agents start passes again"
    } else {
        "the fleet was not paused"
    };
    let retried = match (t.retried, t.fresh) {
        (0, _) => String::new(),
        (n, 0) => format!("; {} due now", count(n, "failed volume")),
        (n, f) => format!(
            "; {} due now ({f} given fresh attempts)",
            count(n, "failed volume")
        ),
    };
    let nights = match t.nights {
        0 => String::new(),
        n => format!(
            "; the failed nights of {} may be tried again",
            count(n, "filer")
        ),
    };
    progress.event(
        &json!({"event": "fleet_resumed", "paused": false, "was_paused": t.was_paused,
                "reason": null, "retried_volumes": t.retried, "fresh_attempts": t.fresh,
                "retried_nights": t.nights}),
        &format!("{head}{retried}{nights}"),
    );
    Ok(())
}

/// The `fleet_paused` event of a pause that did `t` (`reason`: the one
/// given).
fn paused_event(t: &Toggled, reason: Option<&str>, progress: &dyn Progress) {
    let human = match (t.was_paused, reason) {
        (false, _) => "fleet paused: no new pass starts anywhere".to_string(),
        (true, given) => format!(
            "the fleet was already paused{}; reason {}: {}",
            pressed(t.paused_at, t.paused_by.as_deref()),
            if given.is_some() { "now" } else { "kept" },
            t.reason.as_deref().unwrap_or("none given")
        ),
    };
    progress.event(
        &json!({"event": "fleet_paused", "paused": true, "was_paused": t.was_paused,
                "reason": t.reason, "paused_at": t.paused_at.map(rfc3339_seconds),
                "paused_by": t.paused_by}),
        &human,
    );
}

/// The red button's transaction: lock the settings row, log, set it, and
/// on resume make the failed volumes due and the failed nights tried.
async fn toggle(
    conn: &mut Conn,
    paused: bool,
    reason: Option<&str>,
    by: &str,
) -> std::result::Result<Toggled, tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    let old = tx
        .query_one(
            "SELECT paused, pause_reason, extract(epoch FROM paused_at)::float8, paused_by \
             FROM nightpass.settings FOR UPDATE",
            &[],
        )
        .await?;
    let was_paused: bool = old.get(0);
    let (mut retried, mut fresh, mut nights) = (0, 0, 0);
    if !paused {
        let row = tx
            .query_one(
                "WITH old AS (SELECT v.id, v.attempts >= s.max_attempts AS spent \
                     FROM nightpass.volumes v, nightpass.settings s \
                     WHERE v.state = 'failed' FOR UPDATE OF v), \
                 upd AS (UPDATE nightpass.volumes v SET next_attempt_at = now(), \
                     attempts = CASE WHEN old.spent THEN 0 ELSE v.attempts END \
                     FROM old WHERE v.id = old.id RETURNING old.spent) \
                 SELECT count(*), count(*) FILTER (WHERE spent) FROM upd",
                &[],
            )
            .await?;
        (retried, fresh) = (row.get(0), row.get(1));
        nights = tx
            .execute(
                "UPDATE nightpass.filers SET night_failures = 0, night_retry_at = NULL \
                 WHERE night_failures > 0 OR night_retry_at IS NOT NULL",
                &[],
            )
            .await? as i64;
    }
    // A pause of a paused fleet keeps its press; a new reason replaces
    // the reason alone.
    let (reason, kept_at, kept_by) = match (paused && was_paused, reason) {
        (true, None) => (old.get(1), old.get(2), old.get(3)),
        (true, Some(r)) => (Some(r.to_string()), old.get(2), old.get(3)),
        (false, r) => (r.map(str::to_string), None, None),
    };
    let detail = if paused {
        json!({"reason": reason, "was_paused": was_paused, "paused_by": kept_by})
    } else {
        json!({"was_paused": was_paused, "retried_volumes": retried, "fresh_attempts": fresh,
               "retried_nights": nights})
    };
    let event = if paused { "pause" } else { "resume" };
    let at = log(&tx, by, event, &detail).await?;
    let keep = paused && was_paused;
    let (paused_at, paused_by) = match (paused, keep) {
        (true, true) => (kept_at, kept_by),
        (true, false) => (Some(at), Some(by.to_string())),
        (false, _) => (None, None),
    };
    tx.execute(
        "UPDATE nightpass.settings SET paused = $1, pause_reason = CASE WHEN $1 THEN $2 END, \
         paused_at = CASE WHEN NOT $1 THEN NULL WHEN $5 THEN paused_at ELSE to_timestamp($4) END, \
         paused_by = CASE WHEN NOT $1 THEN NULL WHEN $5 THEN paused_by ELSE $3 END",
        &[&paused, &reason, &by, &at, &keep],
    )
    .await?;
    tx.commit().await?;
    Ok(Toggled {
        was_paused,
        reason,
        paused_at,
        paused_by,
        retried,
        fresh,
        nights,
    })
}

/// When the red button was pressed, for a human: `at T by WHO`.
pub fn pressed(at: Option<f64>, by: Option<&str>) -> String {
    let at = at.map(|t| format!(" at {}", rfc3339_seconds(t)));
    let by = by.map(|b| format!(" by {b}"));
    format!("{}{}", at.unwrap_or_default(), by.unwrap_or_default())
}
