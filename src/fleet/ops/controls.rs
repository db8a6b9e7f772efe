//! The fleet's controls: the red button (`fleet pause` / `fleet resume`)
//! and the limits (`fleet limits`), all kept in the one row of
//! `nightpass.settings`, and every change of them written to
//! `nightpass.fleet_log`.
//!
//! Owns what an operator changes in `settings` and how such a change is
//! logged. Each change is one transaction that first locks the settings
//! row, so it orders against the agents' claims, which lock the same row;
//! its `fleet_log` row's time is taken after that lock
//! (`clock_timestamp()`). It must not touch leases, and changes volumes in
//! one way only: `resume` makes the `failed` ones due again.

use serde_json::{json, Map, Value};

use super::this_host;
use crate::app::cli::LimitsArgs;
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
    fn fields(&self) -> [(&'static str, Value); 8] {
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
    fn table(&self) -> String {
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

/// A limit's value for a human: `null` is `none`.
fn shown(v: &Value) -> String {
    if v.is_null() {
        "none".into()
    } else {
        v.to_string()
    }
}

/// `n` and `what`, plural unless `n` is 1: `2 failed volumes`.
fn count(n: i64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The name an operator's command writes in `fleet_log.by` and
/// `settings.paused_by`: `fleet COMMAND on HOST`. Never fails for want of
/// this machine's name.
fn by(command: &str) -> String {
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
    /// `failed` volumes made due (resume only).
    retried: i64,
    /// Of those, the ones given fresh attempts.
    fresh: i64,
}

/// `fleet pause` (with a reason) or `fleet resume`: sets the red button for
/// every agent, logs it in `fleet_log`, and says so (`fleet_paused` or
/// `fleet_resumed`). `resume` also makes every `failed` volume due now,
/// with fresh attempts for those that had used up `max_attempts`.
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
        let human = if t.was_paused {
            "the fleet was already paused; reason updated"
        } else {
            "fleet paused: no new pass starts anywhere"
        };
        progress.event(
            &json!({"event": "fleet_paused", "paused": true, "was_paused": t.was_paused,
                    "reason": reason}),
            human,
        );
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
    progress.event(
        &json!({"event": "fleet_resumed", "paused": false, "was_paused": t.was_paused,
                "reason": null, "retried_volumes": t.retried, "fresh_attempts": t.fresh}),
        &format!("{head}{retried}"),
    );
    Ok(())
}

/// The red button's transaction: lock the settings row, log, set it, and
/// on resume make the failed volumes due.
async fn toggle(
    conn: &mut Conn,
    paused: bool,
    reason: Option<&str>,
    by: &str,
) -> std::result::Result<Toggled, tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    let was_paused: bool = tx
        .query_one("SELECT paused FROM nightpass.settings FOR UPDATE", &[])
        .await?
        .get(0);
    let (mut retried, mut fresh) = (0, 0);
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
    }
    let detail = if paused {
        json!({"reason": reason, "was_paused": was_paused})
    } else {
        json!({"was_paused": was_paused, "retried_volumes": retried, "fresh_attempts": fresh})
    };
    let event = if paused { "pause" } else { "resume" };
    let at = log(&tx, by, event, &detail).await?;
    tx.execute(
        "UPDATE nightpass.settings SET paused = $1, \
         pause_reason = CASE WHEN $1 THEN $2 END, \
         paused_at = CASE WHEN $1 THEN to_timestamp($4) END, \
         paused_by = CASE WHEN $1 THEN $3 END",
        &[&paused, &reason, &by, &at],
    )
    .await?;
    tx.commit().await?;
    Ok(Toggled {
        was_paused,
        retried,
        fresh,
    })
}

/// The limits `fleet limits` was given, checked: `Some` for each flag.
#[derive(Debug, Clone, Default, PartialEq)]
struct Wanted {
    /// `Some(None)`: no limit (the flag's 0).
    max_passes: Option<Option<i32>>,
    per_filer: Option<Option<i32>>,
    per_host: Option<Option<i32>>,
    per_receiver: Option<Option<i32>>,
    error_threshold: Option<i32>,
    error_window: Option<i32>,
    max_attempts: Option<i32>,
    retry_after_s: Option<f64>,
}

impl Wanted {
    /// Checks `args` on their own (not against the database): exit 2 for
    /// a value the settings cannot hold.
    fn from_args(a: &LimitsArgs) -> Result<Wanted> {
        let int = |flag: &str, v: u32| {
            i32::try_from(v)
                .map_err(|_| Error::input(format!("--{flag} {v}: at most {}", i32::MAX)))
        };
        let cap = |flag: &str, v: Option<u32>| -> Result<Option<Option<i32>>> {
            v.map(|v| Ok(if v == 0 { None } else { Some(int(flag, v)?) }))
                .transpose()
        };
        let positive = |flag: &str, v: Option<u32>, what: &str| -> Result<Option<i32>> {
            match v {
                Some(0) => Err(Error::input(format!(
                    "--{flag} must be at least 1 ({what})"
                ))),
                Some(v) => int(flag, v).map(Some),
                None => Ok(None),
            }
        };
        Ok(Wanted {
            max_passes: cap("max-passes", a.max_passes)?,
            per_filer: cap("per-filer", a.per_filer)?,
            per_host: cap("per-host", a.per_host)?,
            per_receiver: cap("per-receiver", a.per_receiver)?,
            error_threshold: positive(
                "error-threshold",
                a.error_threshold,
                "one failure or more pauses the fleet",
            )?,
            error_window: positive("error-window", a.error_window, "passes counted")?,
            max_attempts: positive("max-attempts", a.max_attempts, "a volume's first attempt")?,
            retry_after_s: a.retry_after.map(|d| d.as_secs_f64()),
        })
    }

    /// `old` with these changes made.
    fn apply(&self, old: &Limits) -> Limits {
        Limits {
            max_passes: self.max_passes.unwrap_or(old.max_passes),
            per_filer: self.per_filer.unwrap_or(old.per_filer),
            per_host: self.per_host.unwrap_or(old.per_host),
            per_receiver: self.per_receiver.unwrap_or(old.per_receiver),
            error_threshold: self.error_threshold.unwrap_or(old.error_threshold),
            error_window: self.error_window.unwrap_or(old.error_window),
            max_attempts: self.max_attempts.unwrap_or(old.max_attempts),
            retry_after_s: self.retry_after_s.unwrap_or(old.retry_after_s),
        }
    }
}

/// The limits that differ from `old` to `new`: `{name: {from, to}}`.
fn changes(old: &Limits, new: &Limits) -> Map<String, Value> {
    old.fields()
        .into_iter()
        .zip(new.fields())
        .filter(|((_, a), (_, b))| a != b)
        .map(|((k, a), (_, b))| (k.to_string(), json!({"from": a, "to": b})))
        .collect()
}

/// Why a limits change was refused inside its transaction.
struct Refused(String);

/// `fleet limits`: changes the limits given (none given: changes nothing)
/// in one transaction, logs what changed in `fleet_log`, then shows them
/// all (`fleet_limits`). A bad value, or an error window shorter than the
/// threshold: exit 2, nothing changed.
pub async fn limits(pool: &Pool, args: &LimitsArgs, progress: &dyn Progress) -> Result<()> {
    let wanted = Wanted::from_args(args)?;
    schema::check(pool).await?;
    let mut conn = pool.get().await?;
    let by = by("limits");
    let work = set_limits(&mut conn, &wanted, &by);
    let (now, changed) = match pool.timed("changing the fleet's limits", work).await? {
        Ok(v) => v,
        Err(Refused(why)) => return Err(Error::input(why)),
    };
    let mut event = Map::new();
    event.insert("event".into(), json!("fleet_limits"));
    event.extend(now.to_json());
    event.insert("changed".into(), Value::Object(changed.clone()));
    let head = if changed.is_empty() {
        "fleet limits:".to_string()
    } else {
        let what: Vec<String> = changed
            .iter()
            .map(|(k, c)| format!("{k} {} → {}", shown(&c["from"]), shown(&c["to"])))
            .collect();
        format!("fleet limits changed ({}):", what.join(", "))
    };
    progress.event(&Value::Object(event), &format!("{head}\n{}", now.table()));
    Ok(())
}

/// The limits' transaction: lock the settings row, apply `w`, refuse an
/// error window shorter than the threshold, write and log the changes.
async fn set_limits(
    conn: &mut Conn,
    w: &Wanted,
    by: &str,
) -> std::result::Result<
    std::result::Result<(Limits, Map<String, Value>), Refused>,
    tokio_postgres::Error,
> {
    let tx = conn.transaction().await?;
    // Only shown: no lock, so no claim waits for it.
    let lock = if *w == Wanted::default() {
        ""
    } else {
        " FOR UPDATE"
    };
    let old = tx
        .query_one(
            &format!("SELECT {LIMITS_COLUMNS} FROM nightpass.settings{lock}"),
            &[],
        )
        .await?;
    let old = Limits::from_row(&old, 0);
    let new = w.apply(&old);
    if new.error_window < new.error_threshold {
        return Ok(Err(Refused(format!(
            "the error window ({} passes) must be at least the error threshold ({} failures): \
             the failures are counted among the last error-window passes; nothing changed",
            new.error_window, new.error_threshold
        ))));
    }
    let changed = changes(&old, &new);
    if !changed.is_empty() {
        tx.execute(
            "UPDATE nightpass.settings SET max_passes = $1, max_passes_per_filer = $2, \
             max_passes_per_host = $3, max_passes_per_receiver = $4, error_threshold = $5, \
             error_window = $6, max_attempts = $7, retry_after = make_interval(secs => $8)",
            &[
                &new.max_passes,
                &new.per_filer,
                &new.per_host,
                &new.per_receiver,
                &new.error_threshold,
                &new.error_window,
                &new.max_attempts,
                &new.retry_after_s,
            ],
        )
        .await?;
        log(&tx, by, "limits", &Value::Object(changed.clone())).await?;
    }
    tx.commit().await?;
    Ok(Ok((new, changed)))
}

/// When the red button was pressed, for a human: `at T by WHO`.
pub fn pressed(at: Option<f64>, by: Option<&str>) -> String {
    let at = at.map(|t| format!(" at {}", rfc3339_seconds(t)));
    let by = by.map(|b| format!(" by {b}"));
    format!("{}{}", at.unwrap_or_default(), by.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> LimitsArgs {
        LimitsArgs {
            max_passes: None,
            per_filer: None,
            per_host: None,
            per_receiver: None,
            error_threshold: None,
            error_window: None,
            max_attempts: None,
            retry_after: None,
        }
    }

    fn defaults() -> Limits {
        Limits {
            max_passes: None,
            per_filer: None,
            per_host: Some(2),
            per_receiver: None,
            error_threshold: 3,
            error_window: 10,
            max_attempts: 5,
            retry_after_s: 30.0,
        }
    }

    #[test]
    fn zero_means_no_limit_and_the_rest_must_be_positive() {
        let w = Wanted::from_args(&LimitsArgs {
            max_passes: Some(8),
            per_host: Some(0),
            ..args()
        })
        .unwrap();
        let new = w.apply(&defaults());
        assert_eq!((new.max_passes, new.per_host), (Some(8), None));
        let c = changes(&defaults(), &new);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c["max_passes_per_host"]["from"], 2);
        for bad in [
            LimitsArgs {
                max_attempts: Some(0),
                ..args()
            },
            LimitsArgs {
                error_threshold: Some(0),
                ..args()
            },
            LimitsArgs {
                max_passes: Some(u32::MAX),
                ..args()
            },
        ] {
            assert_eq!(Wanted::from_args(&bad).unwrap_err().exit_code(), 2);
        }
        assert!(changes(&defaults(), &Wanted::default().apply(&defaults())).is_empty());
    }
}
