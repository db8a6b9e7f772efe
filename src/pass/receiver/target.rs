//! Opening a volume for a sync session: the checks that can refuse before
//! anything is created, and the manifest that describes this very target
//! (its identity, a sample of its claims). Owns the choice of trusting a
//! manifest; never writes chunk data.

use super::*;

/// The checks of a sync session that can refuse, made before the target is
/// opened or created: the geometry, the state directory writable with room
/// for the manifest, and the size of a target file this session would create
/// (`--max-size`, by default the size of the filesystem that would hold it).
pub(super) fn prepare_target(
    cfg: &ServeConfig,
    dir: &Path,
    path: &Path,
    size: u64,
    chunk: ChunkSize,
    explicit: bool,
) -> std::result::Result<(), Refuse> {
    check_target(cfg, dir, path, size, chunk, explicit, true)
}

/// [`prepare_target`]'s checks; without `writable`, those that write
/// nothing only (a dry run's: the state directory is neither created nor
/// probed).
pub(super) fn check_target(
    cfg: &ServeConfig,
    dir: &Path,
    path: &Path,
    size: u64,
    chunk: ChunkSize,
    explicit: bool,
    writable: bool,
) -> std::result::Result<(), Refuse> {
    let mpath = dir.join("manifest");
    let have = state::peek_geometry(&mpath);
    let chunk = match have {
        Some(g) if !explicit => g.chunk_size(),
        _ => chunk,
    };
    let geometry = Geometry::new(size, chunk).map_err(|e| {
        Refuse(
            RefuseCode::BadRequest,
            format!("a source of {size} bytes in chunks of {chunk}: {e}"),
        )
    })?;
    if writable {
        state::check_writable(dir)?;
    }
    if have != Some(geometry) {
        let need = state::manifest_len(&geometry);
        let free = state::free_bytes(dir)?;
        if need.saturating_add(1 << 20) > free {
            return Err(Refuse(
                RefuseCode::BadRequest,
                format!(
                    "the receiver's state directory {} has {free} bytes free; the manifest of a {size}-byte source in chunks of {chunk} needs {need}: free space there, or use a larger chunk size",
                    dir.display()
                ),
            ));
        }
    }
    if std::fs::symlink_metadata(path).is_err() {
        let parent = path.parent().unwrap_or(Path::new("/"));
        let limit = match cfg.max_size {
            Some(m) => m,
            None => crate::io::device::filesystem_size(parent)?,
        };
        if size > limit {
            return Err(Refuse(
                RefuseCode::BadRequest,
                format!(
                    "the source ({size} bytes) is larger than the largest target file this receiver creates at {} ({limit} bytes{})",
                    path.display(),
                    if cfg.max_size.is_some() { ", --max-size" } else { ": its filesystem's size" }
                ),
            ));
        }
    }
    Ok(())
}

/// Chunks of a manifest's claims re-read and hashed at every sync session's
/// start; any mismatch and the whole manifest is distrusted.
pub(super) const SAMPLE_CHUNKS: usize = 16;

/// The manifest of this target that can be kept, and whether the one
/// found must be rebuilt from a fresh read of the target instead (damaged,
/// or the volume unsealed since it was written: the new site wrote to the
/// target meanwhile; only a read made now, holding the volume, counts). A
/// manifest of another target, or one whose sampled claims the target does
/// not hold, is not kept.
fn existing_manifest(
    dir: &Path,
    name: &str,
    volume: &Volume,
    record: &state::TargetRecord,
    created: Created,
) -> std::result::Result<(Option<ManifestFile>, bool), Refuse> {
    if !is_bound(name, dir, record, created) {
        return Ok((None, false));
    }
    let m = match ManifestFile::open(&dir.join("manifest"))? {
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            tracing::warn!("volume '{name}': manifest cannot be trusted ({e}); rebuilding it from a fresh read of the target");
            return Ok((None, true));
        }
        None => return Ok((None, false)),
    };
    if state::marked_for_rebuild(dir) {
        tracing::warn!("volume '{name}': unsealed since its last pass; rebuilding its manifest from a fresh read of the target");
        return Ok((Some(m), true));
    }
    if let Some(why) = sample_mismatch(volume, &m)? {
        tracing::warn!("volume '{name}': {why}: the target was changed behind this receiver's back; distrusting its whole manifest and starting from nothing known");
        return Ok((None, false));
    }
    Ok((Some(m), false))
}

/// Opens the manifest that describes `target`, or starts a new one.
///
/// A manifest belongs to one target: the record next to it names the
/// target's path and identity ([`state::TargetRecord`]), and a target that
/// is another file or device than the one recorded (removed and created
/// again, a device swapped) starts from nothing known. A manifest that does
/// describe this target is still checked against a random sample of the
/// chunks it claims, read fresh: bytes changed behind the receiver's back
/// distrust it whole.
pub(super) fn open_manifest(
    dir: &Path,
    name: &str,
    target: &Path,
    volume: &Volume,
    created: Created,
    offer: &rx::Offer,
) -> std::result::Result<ManifestFile, Refuse> {
    let mpath = dir.join("manifest");
    let record = state::TargetRecord {
        path: target.to_owned(),
        identity: volume.identity()?,
    };
    let marked = state::marked_for_rebuild(dir);
    let (geometry, rebuild) = match manifest_start(dir, name, volume, &record, created, offer)? {
        Start::Keep(m) => return Ok(m),
        Start::New { geometry, rebuild } => (geometry, rebuild),
    };
    let fill = if created == Created::New {
        Fill::Zeros
    } else {
        Fill::Unknown
    };
    let mut m = ManifestFile::create(&mpath, geometry, rand::random(), fill)?;
    if rebuild && volume.size() >= geometry.size() {
        // What the target holds, read fresh and made durable first, so the
        // rebuilt entries describe bytes that are on the disk.
        volume.sync_data()?;
        let table = rebuild_table(volume, geometry)?;
        m.replace_table(&table);
        let root = m.current_root();
        m.commit(2, root)?;
    }
    record.write(dir)?;
    if marked {
        state::clear_rebuild_mark(dir)?;
    }
    Ok(m)
}

/// How a sync session starts its manifest of a target.
pub(super) enum Start {
    /// The manifest found describes this target, in this geometry: kept.
    Keep(ManifestFile),
    /// A new manifest of `geometry`: every entry unknown (the zero chunk
    /// for a target the session created), or with `rebuild` the table of
    /// a fresh read of the target.
    New {
        /// The source's size in the chunk size in force.
        geometry: Geometry,
        /// Rebuilt from a fresh read of the target (when it holds the source's size).
        rebuild: bool,
    },
}

/// Decides, reading only, how a sync session of `offer` starts its
/// manifest of the target `record` describes ([`open_manifest`] then
/// writes it; a dry run only reports it).
pub(super) fn manifest_start(
    dir: &Path,
    name: &str,
    volume: &Volume,
    record: &state::TargetRecord,
    created: Created,
    offer: &rx::Offer,
) -> std::result::Result<Start, Refuse> {
    let rx::Offer {
        size: source_size,
        chunk,
        explicit,
    } = *offer;
    let (existing, rebuild) = existing_manifest(dir, name, volume, record, created)?;
    let chunk = match &existing {
        Some(m) => {
            let have = m.geometry().chunk_size();
            if explicit && have != chunk {
                return Err(Refuse(
                    RefuseCode::ChunkSize,
                    format!(
                        "volume '{name}' was first copied with chunk size {have}; a pass with chunk size {chunk} would re-chunk it. Drop --chunk-size to keep {have}, or remove the receiver's state of this volume to start over"
                    ),
                ));
            }
            if !rebuild {
                if m.geometry().size() == source_size {
                    return Ok(Start::Keep(existing.expect("matched Some")));
                }
                tracing::warn!(
                    "volume '{name}': source size changed from {} to {source_size} bytes; starting from nothing known",
                    m.geometry().size()
                );
            }
            have
        }
        None => chunk,
    };
    drop(existing);
    let geometry = Geometry::new(source_size, chunk)
        .map_err(|e| Refuse(RefuseCode::BadRequest, e.to_string()))?;
    Ok(Start::New { geometry, rebuild })
}

/// True when the manifest in `dir` was made for the target `record`
/// describes; says why not in the receiver log when one existed.
pub(super) fn is_bound(
    name: &str,
    dir: &Path,
    record: &state::TargetRecord,
    created: Created,
) -> bool {
    let Some(old) = state::TargetRecord::read(dir) else {
        if dir.join("manifest").exists() {
            tracing::warn!("volume '{name}': its manifest has no record of the target it describes; starting from nothing known");
        }
        return false;
    };
    if created == Created::New {
        tracing::warn!(
            "volume '{name}': target {} was missing and has been created; the old manifest described another file, starting from nothing known",
            record.path.display()
        );
        return false;
    }
    if old.path != record.path {
        tracing::warn!(
            "volume '{name}': the manifest describes {}, not {}; starting from nothing known",
            old.path.display(),
            record.path.display()
        );
        return false;
    }
    if old.identity != record.identity {
        tracing::warn!(
            "volume '{name}': target {} is not the file or device the manifest describes (was {:?}, now {:?}); it was replaced: starting from nothing known",
            record.path.display(),
            old.identity,
            record.identity
        );
        return false;
    }
    true
}

/// Re-reads up to [`SAMPLE_CHUNKS`] random chunks the manifest claims and
/// says which one differs, if any. Claims of data come first: a target
/// re-created sparse (all zeros) matches every claim of a zero chunk, so
/// those are sampled only when too few others are found.
pub(super) fn sample_mismatch(volume: &Volume, m: &ManifestFile) -> Result<Option<String>> {
    let g = m.geometry();
    if g.chunk_count() == 0 || volume.size() < g.size() {
        return Ok(None);
    }
    for i in sample_indices(m) {
        let claimed = m.entry(i);
        let r = g.range(i).expect("index below count");
        let bytes = volume.read_vec_at((r.end - r.start) as usize, r.start)?;
        if blake3::hash(&bytes).as_bytes() != &claimed {
            return Ok(Some(format!(
                "chunk {i} (offset {}) does not hold what the manifest claims",
                r.start
            )));
        }
    }
    Ok(None)
}

/// Up to [`SAMPLE_CHUNKS`] random indices of known entries, preferring
/// entries that are not the hash of a zero chunk. A small table is searched
/// whole for them; a large one by random probes.
pub(super) fn sample_indices(m: &ManifestFile) -> Vec<u64> {
    /// Tables of at most this many entries (2 MiB) are searched whole.
    const SEARCH_WHOLE: u64 = 1 << 16;
    let g = m.geometry();
    let count = g.chunk_count();
    let zero = *blake3::hash(&vec![0u8; g.chunk_size().usize()]).as_bytes();
    let (mut data, mut zeros) = (Vec::new(), Vec::new());
    let mut take = |i: u64| match m.entry(i) {
        e if e == UNKNOWN => {}
        e if e == zero => zeros.push(i),
        _ => data.push(i),
    };
    if count <= SEARCH_WHOLE {
        (0..count).for_each(&mut take);
    } else {
        (0..SAMPLE_CHUNKS as u64 * 256).for_each(|_| take(rand::random::<u64>() % count));
        for v in [&mut data, &mut zeros] {
            v.sort_unstable();
            v.dedup();
        }
    }
    let mut picked = pick(data, SAMPLE_CHUNKS);
    let more = SAMPLE_CHUNKS - picked.len();
    picked.extend(pick(zeros, more));
    picked
}

/// Up to `n` of `from`, at random.
pub(super) fn pick(mut from: Vec<u64>, n: usize) -> Vec<u64> {
    for k in 0..n.min(from.len()) {
        let j = k + (rand::random::<u64>() % (from.len() - k) as u64) as usize;
        from.swap(k, j);
    }
    from.truncate(n);
    from
}

/// Hashes the target's first `geometry.size()` bytes fresh.
pub(super) fn rebuild_table(volume: &Volume, geometry: Geometry) -> Result<Vec<u8>> {
    let v = Arc::new(Volume::open_export(volume.path())?);
    hash::hash_all(v, geometry, ScanOptions::default(), Arc::new(Quiet))
}
