//! What `fleet add` refuses before it writes a filer: a volume nothing
//! would freeze at its night ([`unfrozen`], from the plan alone), and a
//! filer that would share a receiver volume or a source with one already
//! in the fleet ([`conflict`], inside `add`'s transaction).
//!
//! Owns those rules and their messages; it only reads, and must not write
//! a row.

use tokio_postgres::Transaction;

use crate::app::plan::Plan;

/// The advisory lock `fleet add` holds while it checks and writes, so two
/// adds at once cannot both pass the checks ("npfleeta" in ASCII).
pub const ADD_LOCK: i64 = 0x6e70_666c_6565_7461;

/// Why `plan` could never be cut over by the fleet: the volumes that have
/// no `fsfreeze` while the filer has no `pre`/`post` and no
/// `assume_frozen` (a group cutover refuses them every night). Reads
/// nothing but the plan.
pub fn unfrozen(plan: &Plan) -> Option<String> {
    let f = &plan.freeze;
    if f.assume_frozen || (f.pre.is_some() && f.post.is_some()) {
        return None;
    }
    let loose: Vec<String> = plan
        .volumes
        .iter()
        .filter(|v| v.fsfreeze.is_none())
        .map(|v| format!("'{}'", v.name))
        .collect();
    if loose.is_empty() {
        return None;
    }
    let (which, has) = if loose.len() == 1 {
        ("volume", "has")
    } else {
        ("volumes", "have")
    };
    Some(format!(
        "plan {}: {which} {} {has} no freeze, so the fleet could never cut {} over: add \
         `fsfreeze = \"MOUNTPOINT\"` to {}, or to the plan `pre` and `post` (the commands \
         that stop and restart the filer's writers) or `assume_frozen = true`; nothing was added",
        plan.path.display(),
        loose.join(", "),
        if loose.len() == 1 { "it" } else { "them" },
        if loose.len() == 1 {
            "its [[volume]]"
        } else {
            "each [[volume]]"
        }
    ))
}

/// The first rule `plan` (for filer `filer` on `host`) breaks against the
/// other filers in the fleet, as a message naming the other filer and
/// volume: one receiver volume for two filers (the same receiver by its
/// fingerprint or its address, the same volume name), or one source read
/// by two filers on one host. `filer`'s own rows never count (`--replace`).
pub async fn conflict(
    tx: &Transaction<'_>,
    filer: &str,
    host: &str,
    plan: &Plan,
) -> Result<Option<String>, tokio_postgres::Error> {
    let names: Vec<&str> = plan.names();
    let target = tx
        .query_opt(
            "SELECT f.name, v.name, f.host, f.receiver, f.fingerprint = $2 \
             FROM nightpass.volumes v JOIN nightpass.filers f ON f.name = v.filer \
             WHERE f.name <> $1 AND v.name = ANY($4) \
             AND (f.fingerprint = $2 OR lower(f.receiver) = lower($3)) \
             ORDER BY f.name, v.id LIMIT 1",
            &[&filer, &plan.server_fingerprint, &plan.receiver, &names],
        )
        .await?;
    if let Some(r) = target {
        let (other, volume, other_host, receiver): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let same = if r.get::<_, bool>(4) {
            "the same fingerprint"
        } else {
            "the same address"
        };
        return Ok(Some(format!(
            "filer '{filer}': volume '{volume}' of receiver {} is already filer '{other}''s \
             target (its volume '{volume}' on host {other_host}, receiver {receiver}: {same}): \
             two filers would overwrite and seal one target; nothing was added",
            plan.receiver
        )));
    }
    let sources: Vec<String> = plan
        .volumes
        .iter()
        .map(|v| v.source.display().to_string())
        .collect();
    let source = tx
        .query_opt(
            "SELECT f.name, v.name, v.source FROM nightpass.volumes v \
             JOIN nightpass.filers f ON f.name = v.filer \
             WHERE f.name <> $1 AND f.host = $2 AND v.source = ANY($3) \
             ORDER BY f.name, v.id LIMIT 1",
            &[&filer, &host, &sources],
        )
        .await?;
    Ok(source.map(|r| {
        let (other, volume, source): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let mine = plan
            .volumes
            .iter()
            .find(|v| v.source.display().to_string() == source)
            .map_or(String::new(), |v| format!("volume '{}' ", v.name));
        format!(
            "filer '{filer}': {mine}reads {source} on host {host}, which filer '{other}' \
             already reads (its volume '{volume}'): two filers would read one device; \
             nothing was added"
        )
    }))
}
