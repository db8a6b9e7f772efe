//! `fleet remove`: a filer added by mistake leaves the fleet with its
//! volumes (their leases, history, passes and the filer's night go with
//! them: the rows cascade).
//!
//! Owns the rules of a removal: never while a volume of the filer is
//! `cutting_over` or under a live lease (an agent is at work on it), and a
//! filer cut over only with `--force` (its rows are the record of the
//! migration). Each removal is one transaction that locks the filer and
//! its volumes (so no agent claims one meanwhile: claims skip locked
//! rows) and writes a `fleet_log` row. It must not touch another filer.

use serde_json::{json, Map, Value};

use super::controls::{by, log};
use crate::error::{Error, Result};
use crate::fleet::db::Conn;
use crate::fleet::db::Pool;
use crate::fleet::schema;
use crate::progress::{rfc3339_seconds, Progress};

/// What a removal took away.
struct Removed {
    host: String,
    receiver: String,
    /// Each volume's state, in registration order.
    states: Map<String, Value>,
    cut_over: bool,
}

/// `fleet remove FILER [--force]`: removes `filer` and its volumes, and
/// says so (`fleet_filer_removed`). Refused (exit 2), with nothing
/// changed: an unknown filer, a volume `cutting_over` or under a live
/// lease, a filer cut over without `force`.
pub async fn remove(pool: &Pool, filer: &str, force: bool, progress: &dyn Progress) -> Result<()> {
    schema::check(pool).await?;
    let mut conn = pool.get().await?;
    let by = by("remove");
    let work = delete(&mut conn, filer, force, &by);
    let r = match pool.timed("removing the filer", work).await? {
        Ok(r) => r,
        Err(why) => return Err(Error::input(why)),
    };
    let listed: Vec<String> = r
        .states
        .iter()
        .map(|(v, s)| format!("{v} {}", s.as_str().unwrap_or("")))
        .collect();
    progress.event(
        &json!({
            "event": "fleet_filer_removed",
            "filer": filer,
            "host": r.host,
            "receiver": r.receiver,
            "volumes": r.states.len(),
            "states": r.states,
            "cut_over": r.cut_over,
            "forced": force,
        }),
        &format!(
            "filer '{filer}' removed with its {} volumes ({}), their history and passes",
            r.states.len(),
            listed.join(", ")
        ),
    );
    Ok(())
}

/// The removal's transaction: lock the filer and its volumes, refuse
/// (`Err`: why) or log and delete.
async fn delete(
    conn: &mut Conn,
    filer: &str,
    force: bool,
    by: &str,
) -> std::result::Result<std::result::Result<Removed, String>, tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    let Some(f) = tx
        .query_opt(
            "SELECT host, receiver, extract(epoch FROM cut_over_at)::float8, group_point \
             FROM nightpass.filers WHERE name = $1 FOR UPDATE",
            &[&filer],
        )
        .await?
    else {
        return Ok(Err(format!("filer '{filer}' is not in the fleet")));
    };
    let (host, receiver, cut_at, point): (String, String, Option<f64>, Option<String>) =
        (f.get(0), f.get(1), f.get(2), f.get(3));
    let volumes = tx
        .query(
            "SELECT v.name, v.state, l.agent, extract(epoch FROM l.expires_at)::float8 \
             FROM nightpass.volumes v \
             LEFT JOIN nightpass.leases l ON l.volume = v.id AND l.expires_at > now() \
             WHERE v.filer = $1 ORDER BY v.id FOR UPDATE OF v",
            &[&filer],
        )
        .await?;
    let mut states = Map::new();
    for v in &volumes {
        let (name, state): (String, String) = (v.get(0), v.get(1));
        if let (Some(agent), Some(until)) = (v.get::<_, Option<String>>(2), v.get(3)) {
            return Ok(Err(format!(
                "filer '{filer}': volume '{name}' ({state}) is held by agent {agent} (its lease \
                 runs until {}): let its work end (`fleet pause` stops new passes) and try \
                 again; nothing was removed",
                rfc3339_seconds(until)
            )));
        }
        if state == "cutting_over" {
            return Ok(Err(format!(
                "filer '{filer}': volume '{name}' is cutting_over (its night runs, or its \
                 agent was lost: see docs/CLI.md 'An agent lost during a night'); nothing was \
                 removed"
            )));
        }
        states.insert(name, Value::String(state));
    }
    if let (Some(t), false) = (cut_at, force) {
        return Ok(Err(format!(
            "filer '{filer}' was cut over at {} (group point {}): its rows are the record of \
             the migration; give --force to remove them anyway; nothing was removed",
            rfc3339_seconds(t),
            point.as_deref().unwrap_or("unknown")
        )));
    }
    let detail = json!({
        "filer": filer,
        "host": host,
        "receiver": receiver,
        "states": states,
        "cut_over_at": cut_at.map(rfc3339_seconds),
        "forced": force,
    });
    log(&tx, by, "remove", &detail).await?;
    tx.execute("DELETE FROM nightpass.filers WHERE name = $1", &[&filer])
        .await?;
    tx.commit().await?;
    Ok(Ok(Removed {
        host,
        receiver,
        states,
        cut_over: cut_at.is_some(),
    }))
}
