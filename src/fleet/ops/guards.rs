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
         that stop and restart the filer's writers) or `assume_frozen = true`, then `fleet \
         remove` the filer and add it again: until then its volumes take daytime passes, and \
         `fleet schedule` refuses its night",
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
    let others = tx
        .query(
            "SELECT f.name, v.name, v.source FROM nightpass.volumes v \
             JOIN nightpass.filers f ON f.name = v.filer \
             WHERE f.name <> $1 AND f.host = $2 ORDER BY f.name, v.id",
            &[&filer, &host],
        )
        .await?;
    for r in &others {
        let (other, volume, source): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let Some(mine) = plan
            .volumes
            .iter()
            .find(|v| same_source(&v.source, std::path::Path::new(&source)))
        else {
            continue;
        };
        return Ok(Some(format!(
            "filer '{filer}': volume '{}' reads {} on host {host}, which filer '{other}' \
             already reads as {source} (its volume '{volume}'): two filers would read one \
             device; nothing was added",
            mine.name,
            mine.source.display()
        )));
    }
    Ok(None)
}

/// Whether `a` and `b` name one source: the same path once `.`, `..` and
/// repeated slashes are read as the kernel reads them, or (on the sender
/// host itself, where both resolve) the same file after symlinks.
fn same_source(a: &std::path::Path, b: &std::path::Path) -> bool {
    if lexical(a) == lexical(b) {
        return true;
    }
    matches!(
        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
        (Ok(x), Ok(y)) if x == y
    )
}

/// `p` with `.` dropped, `..` taking off the part before it, and repeated
/// slashes as one, without reading the filesystem.
fn lexical(p: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn one_source_spelled_two_ways_is_one_source() {
        assert!(same_source(
            Path::new("/srv/img/a1.img"),
            Path::new("/srv/img/../img/./a1.img")
        ));
        assert!(same_source(
            Path::new("/dev//vg0/a"),
            Path::new("/dev/vg0/a")
        ));
        assert!(!same_source(
            Path::new("/dev/vg0/a"),
            Path::new("/dev/vg0/b")
        ));
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.img");
        std::fs::write(&real, b"x").unwrap();
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(same_source(&real, &link));
    }
}
