//! What `serve` checks of its exports when it starts, and who may use which
//! volume (`--allow FP=NAME`). Owns export identity; touches no session.

use super::*;

/// What makes two exports the same target.
#[derive(PartialEq, Eq, Hash)]
pub(super) enum ExportKey {
    File(u64, u64),
    Block(u64),
    Missing(PathBuf),
}

/// Checks every export when `serve` starts, so that a problem shows now and
/// not at the first session, at night: the state directory is writable
/// (created 0700 when missing), each export is a regular file or a block
/// device that is not mounted or held, or a missing file whose directory
/// exists; no two names share one file or device (compared by identity,
/// after resolving symbolic links); every volume an `--allow FP=NAME`
/// names is exported. Returns each export's canonical path: sessions use
/// these, so a symbolic link changed after the start is not followed.
pub fn check_exports(cfg: &ServeConfig) -> Result<HashMap<String, PathBuf>> {
    let mut fps: Vec<_> = cfg.limits.iter().collect();
    fps.sort_by(|a, b| a.0.cmp(b.0));
    for (fp, names) in fps {
        let mut names: Vec<_> = names.iter().collect();
        names.sort();
        if let Some(n) = names.iter().find(|n| !cfg.volumes.contains_key(n.as_str())) {
            return Err(Error::input(format!(
                "--allow {fp}={}: volume '{n}' is not exported (give --volume {n}=PATH, or drop it from the allow entry)",
                names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
            )));
        }
    }
    let mut names: Vec<&String> = cfg.volumes.keys().collect();
    names.sort();
    let mut seen: HashMap<ExportKey, &str> = HashMap::new();
    let mut pinned = HashMap::new();
    for name in names {
        let (canonical, key) = resolve_export(name, &cfg.volumes[name])?;
        if let Some(other) = seen.insert(key, name) {
            return Err(Error::input(format!(
                "volumes '{other}' and '{name}' are the same target ({}): export each file or device under one name only",
                canonical.display()
            )));
        }
        pinned.insert(name.clone(), canonical);
    }
    // Last, as it creates the state directory when missing: a refusal
    // above leaves nothing behind.
    state::check_writable(&cfg.state_dir)?;
    state::check_writable(&cfg.state_dir.join("volumes"))?;
    Ok(pinned)
}

/// The canonical path of export `name` and what identifies its target.
pub(super) fn resolve_export(name: &str, path: &Path) -> Result<(PathBuf, ExportKey)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let bad = |why: String| Error::input(format!("volume '{name}' ({}): {why}", path.display()));
    match std::fs::metadata(path) {
        Ok(m) => {
            let canonical = path
                .canonicalize()
                .map_err(|e| bad(format!("cannot resolve the path: {e}")))?;
            if m.file_type().is_block_device() {
                crate::io::device::check_not_held(&canonical).map_err(|e| bad(e.to_string()))?;
                Ok((canonical, ExportKey::Block(m.rdev())))
            } else if m.file_type().is_file() {
                Ok((canonical, ExportKey::File(m.dev(), m.ino())))
            } else {
                Err(bad("is neither a block device nor a regular file".into()))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(bad(
                    "is a symbolic link to nothing; export the path it should point to".into(),
                ));
            }
            let file = path
                .file_name()
                .ok_or_else(|| bad("names no file".into()))?;
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let dir = parent.canonicalize().map_err(|e| {
                bad(format!(
                    "its directory {} does not exist ({e}); create it, or fix the path",
                    parent.display()
                ))
            })?;
            if !dir.is_dir() {
                return Err(bad(format!("{} is not a directory", parent.display())));
            }
            let canonical = dir.join(file);
            Ok((canonical.clone(), ExportKey::Missing(canonical)))
        }
        Err(e) => Err(bad(format!("cannot stat it: {e}"))),
    }
}

/// Refuses a session of `volume` from a sender limited to other volumes
/// (`--allow FP=NAME,...`).
pub(super) fn authorized(
    shared: &Shared,
    fp: Option<&str>,
    volume: &str,
) -> std::result::Result<(), Refuse> {
    let access = shared.access.read().expect("not poisoned");
    let ok = match fp {
        Some(fp) => match access.limits.get(fp) {
            None => access.allowed.contains(fp),
            Some(names) => names.contains(volume),
        },
        None => false,
    };
    drop(access);
    if ok {
        return Ok(());
    }
    Err(Refuse(
        RefuseCode::NotAuthorized,
        format!(
            "sender {} is not authorized for volume '{volume}' (the receiver's --allow limits it to other volumes)",
            fp.unwrap_or("without a certificate")
        ),
    ))
}
