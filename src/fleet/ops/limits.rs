//! `fleet limits`: the limits an operator gives, checked on their own and
//! against the fleet's (an error window at least the threshold), changed
//! in one transaction and logged in `nightpass.fleet_log`.
//!
//! Owns how the flags become a change of `nightpass.settings`; the limits
//! themselves are [`Limits`]. It must not touch the red button, volumes or
//! leases.

use serde_json::{json, Map, Value};

use super::controls::{by, log, Limits, LIMITS_COLUMNS};
use crate::app::cli::LimitsArgs;
use crate::error::{Error, Result};
use crate::fleet::db::{Conn, Pool};
use crate::fleet::schema;
use crate::progress::Progress;

/// A limit's value for a human: `null` is `none`.
fn shown(v: &Value) -> String {
    if v.is_null() {
        "none".into()
    } else {
        v.to_string()
    }
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
