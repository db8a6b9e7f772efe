//! The cutover's proof: a pass while the receiver reads its whole target
//! fresh alongside, the recheck of chunks that differed (mostly read
//! before the pass rewrote them), repairs, and the check that an
//! operator's freeze held.
//!
//! Owns what counts as proven; not the freeze, the passes themselves or
//! the verify sessions (`app::verify` opens them).

use std::sync::Arc;
use std::time::Instant;

use nightpass_proto::chunk::{ChunkSize, Geometry};
use nightpass_proto::chunkset::ChunkSet;
use nightpass_proto::wire;

use super::reconnecting;
use crate::app::verify::{compare, forget_and_close, open_verify, receive_hashes, table_entry};
use crate::error::{Error, Result};
use crate::net::transport::Identity;
use crate::pass::sender::{self, target_dir, SyncConfig};
use crate::progress::{PassEnd, Progress, ScanKind};
use crate::store::journal::{SenderRecord, TargetReadRecord};
use crate::store::state::ManifestFile;

/// Rounds of repair before a cutover gives up.
const REPAIR_ROUNDS: usize = 3;

/// One pass while the receiver reads its whole target fresh in a parallel
/// verify session, as the proof of a cutover does. Returns the pass, the
/// source's chunk table as the pass read it (when `collect`), the target's
/// table as the receiver read it, and the geometry of that table.
///
/// Without `overlap` (the target does not exist yet: the pass creates it)
/// the receiver reads its target after the pass instead of alongside.
pub(super) async fn pass_with_target_read(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
    collect: bool,
    overlap: bool,
) -> Result<(PassEnd, Vec<u8>, Vec<u8>, Geometry)> {
    let size =
        crate::io::device::Volume::open_source(cfg.read_from.as_deref().unwrap_or(&cfg.source))?
            .size();
    if !overlap {
        return pass_then_target_read(cfg, id, progress, collect, size).await;
    }
    let chunk = match ManifestFile::open(
        &target_dir(&cfg.state_dir, &cfg.server_fingerprint, &cfg.dest).join("manifest"),
    )? {
        Some(Ok(m)) => m.geometry().chunk_size(),
        _ => cfg.chunk_size.unwrap_or(ChunkSize::DEFAULT),
    };
    let fp = cfg.server_fingerprint.as_str();
    let (mut vs, geometry) = reconnecting(cfg, || {
        open_verify(id, &cfg.dest, fp, &cfg.tuning, size, chunk, Vec::new())
    })
    .await?;
    if geometry.chunk_size() != chunk || geometry.size() != size {
        // The receiver hashes in the volume's own chunks, and this volume
        // has none yet (no manifest before this first pass), or its target
        // file does not exist yet: no parallel read; every chunk is a
        // suspect for the ranged proof after the pass.
        forget_and_close(vs, &[]).await?;
        let (end, ours) = sender::run_pass_collecting(cfg, id, progress.clone(), collect).await?;
        let g = Geometry::new(size, chunk).map_err(|e| Error::input(e.to_string()))?;
        let unknown = vec![0u8; g.chunk_count() as usize * 32];
        return Ok((end, ours.unwrap_or_default(), unknown, g));
    }
    let mut with_read = cfg.clone();
    with_read.proof_read = true;
    let began = Instant::now();
    let target_read = async {
        let table = receive_hashes(&mut vs, &geometry).await?;
        let read_s = began.elapsed().as_secs_f64();
        // Nothing to forget: end the session now, not when the pass ends.
        forget_and_close(vs, &[]).await?;
        Ok::<_, Error>((table, read_s))
    };
    let ((theirs, read_s), (end, ours)) = tokio::try_join!(
        target_read,
        sender::run_pass_collecting(&with_read, id, progress.clone(), collect)
    )?;
    // The frozen pass lasts as long as the slower of the two reads: journal
    // the target's, so the forecast sees a target slower than the source.
    sender::journal(cfg).append(&SenderRecord::TargetRead(TargetReadRecord {
        size_bytes: geometry.size(),
        duration_s: read_s,
    }))?;
    if end.start.chunk_size != chunk.bytes() || geometry.size() != size {
        return Err(Error::Io(
            "the proof's geometry does not match the pass".into(),
        ));
    }
    Ok((end, ours.unwrap_or_default(), theirs, geometry))
}

/// [`pass_with_target_read`] of a target that does not exist yet: the pass
/// creates it, then the receiver reads it whole.
async fn pass_then_target_read(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
    collect: bool,
    size: u64,
) -> Result<(PassEnd, Vec<u8>, Vec<u8>, Geometry)> {
    let (end, ours) = sender::run_pass_collecting(cfg, id, progress, collect).await?;
    let chunk = ChunkSize::new(end.start.chunk_size).map_err(|e| Error::Io(e.to_string()))?;
    let fp = cfg.server_fingerprint.as_str();
    let (mut vs, geometry) = reconnecting(cfg, || {
        open_verify(id, &cfg.dest, fp, &cfg.tuning, size, chunk, Vec::new())
    })
    .await?;
    if geometry.chunk_size() != chunk || geometry.size() != size {
        return Err(Error::Io(
            "the proof's geometry does not match the pass".into(),
        ));
    }
    let theirs = receive_hashes(&mut vs, &geometry).await?;
    forget_and_close(vs, &[]).await?;
    Ok((end, ours.unwrap_or_default(), theirs, geometry))
}

/// What the frozen pass brings back.
pub(super) struct Frozen {
    /// The final pass.
    pub(super) end: PassEnd,
    /// The proof made: `"full"`, `"tracked"` or `"none"`.
    pub(super) proof: &'static str,
    /// Seconds spent in passes (the first, and any repairs).
    pub(super) passes_s: f64,
    /// Seconds spent after the passes re-reading chunks on the receiver
    /// (a tracked proof's read of what the pass read; a full proof's
    /// recheck of the chunks that differed).
    pub(super) proof_s: f64,
    /// The source's chunk table as the final pass read it (when asked for).
    table: Vec<u8>,
}

/// The frozen pass and its proof (when `prove`); `overlap`: the target
/// exists, so the receiver reads it alongside the pass; `collect`: bring
/// back the source's table as the final pass read it.
pub(super) async fn frozen_pass(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
    prove: bool,
    overlap: bool,
    collect: bool,
) -> Result<Frozen> {
    if !prove {
        let (end, table) = sender::run_pass_collecting(cfg, id, progress, collect).await?;
        let passes_s = end.duration_s;
        let table = table.unwrap_or_default();
        return Ok(Frozen {
            end,
            proof: "none",
            passes_s,
            proof_s: 0.0,
            table,
        });
    }
    let (mut end, mut ours, mut suspects, proof) = if overlap && sender::would_be_tracked(cfg)? {
        tracked_pass(cfg, id, progress.clone()).await?
    } else {
        let (end, ours, theirs, geometry) =
            pass_with_target_read(cfg, id, progress.clone(), true, overlap).await?;
        let suspects = compare(&geometry, &ours, &theirs);
        (end, ours, suspects, "full")
    };
    let mut passes_s = end.duration_s;
    let mut proof_s = 0.0;
    let mut round = 0;
    loop {
        // Chunks the parallel read saw before the pass rewrote them (or
        // that a repair resent) are read again; none left differing is
        // the proof, whichever round it comes in.
        let still = if suspects.is_empty() {
            suspects
        } else {
            let began = Instant::now();
            let still = recheck(cfg, id, &suspects, &ours).await?;
            proof_s += began.elapsed().as_secs_f64();
            still
        };
        if still.is_empty() {
            progress.note(match proof {
                "tracked" => "proof: every chunk the final pass read matches on the target, by fresh reads on both sides; the change record vouches for the rest",
                _ => "proof: the target matches the frozen source, chunk for chunk, by fresh reads on both sides",
            });
            let table = complete_table(cfg, ours)?;
            return Ok(Frozen {
                end,
                proof,
                passes_s,
                proof_s,
                table,
            });
        }
        if round == REPAIR_ROUNDS {
            return Err(Error::Io(format!(
                "the target still differs from the frozen source in {} ranges after {REPAIR_ROUNDS} repairs",
                still.range_count()
            )));
        }
        round += 1;
        progress.note(&format!(
            "proof: {} chunks differ after the pass; resending them from the frozen source (round {round})",
            still.len(),
        ));
        let (e, t) =
            sender::run_pass_collecting(&tracked_cfg(cfg, proof), id, progress.clone(), true)
                .await?;
        passes_s += e.duration_s;
        end = e;
        ours = t.unwrap_or_default();
        suspects = still;
    }
}

/// The settings of a pass proven by the chunks it reads.
fn tracked_cfg(cfg: &SyncConfig, proof: &str) -> SyncConfig {
    let mut c = cfg.clone();
    c.tracked_proof = proof == "tracked";
    c
}

/// The frozen pass over what the change record names (the tracker
/// drained every event up to the freeze before the pass took its cut);
/// its proof covers what it read: every chunk it read is a suspect the
/// receiver reads fresh. A record that broke between the check and the
/// cut makes a full pass: the receiver then reads its whole target after
/// it, and the proof is full.
async fn tracked_pass(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
) -> Result<(PassEnd, Vec<u8>, ChunkSet, &'static str)> {
    let (end, table) =
        sender::run_pass_collecting(&tracked_cfg(cfg, "tracked"), id, progress.clone(), true)
            .await?;
    let ours = table.unwrap_or_default();
    let chunk = ChunkSize::new(end.start.chunk_size).map_err(|e| Error::Io(e.to_string()))?;
    let geometry =
        Geometry::new(end.start.size_bytes, chunk).map_err(|e| Error::Io(e.to_string()))?;
    if end.scan == ScanKind::Tracked {
        // The collected table holds the hashes of the chunks read; the
        // others are all zeros, which no chunk hashes to.
        let read = (0..geometry.chunk_count())
            .filter(|&i| table_entry(&ours, i).is_some_and(|e| e != [0u8; 32]));
        let suspects = ChunkSet::from_indices(&geometry, read);
        return Ok((end, ours, suspects, "tracked"));
    }
    let fp = cfg.server_fingerprint.as_str();
    let size = geometry.size();
    let (mut vs, g) = reconnecting(cfg, || {
        open_verify(id, &cfg.dest, fp, &cfg.tuning, size, chunk, Vec::new())
    })
    .await?;
    if g != geometry {
        return Err(Error::Io(
            "the proof's geometry does not match the pass".into(),
        ));
    }
    let theirs = receive_hashes(&mut vs, &g).await?;
    forget_and_close(vs, &[]).await?;
    let suspects = compare(&geometry, &ours, &theirs);
    Ok((end, ours, suspects, "full"))
}

/// The source's table as the final pass knows it: the hashes it read, and
/// for the chunks a tracked pass did not read, what our manifest records
/// (the target's, equal to the source's where nothing was written).
fn complete_table(cfg: &SyncConfig, mut table: Vec<u8>) -> Result<Vec<u8>> {
    let path = target_dir(&cfg.state_dir, &cfg.server_fingerprint, &cfg.dest).join("manifest");
    let Some(Ok(m)) = ManifestFile::open(&path)? else {
        return Ok(table);
    };
    let len = m.geometry().chunk_count() as usize * nightpass_proto::manifest::ENTRY_LEN;
    if table.len() < len {
        table.resize(len, 0);
    }
    for i in 0..m.geometry().chunk_count() {
        if table_entry(&table, i).is_none_or(|e| e == [0u8; 32]) {
            nightpass_proto::manifest::set_entry(&mut table, i, &m.entry(i));
        }
    }
    Ok(table)
}

/// Has the receiver hash the `suspects` fresh, in batches of at most
/// [`wire::MAX_VERIFY_RANGES`] ranges (what one verify may name), and
/// forget the chunks that still differ from `ours`; returns those chunks.
async fn recheck(
    cfg: &SyncConfig,
    id: &Identity,
    suspects: &ChunkSet,
    ours: &[u8],
) -> Result<ChunkSet> {
    let geometry = suspects.geometry();
    let (chunk, size) = (geometry.chunk_size(), geometry.size());
    let fp = cfg.server_fingerprint.as_str();
    let mut still = Vec::new();
    for part in suspects.parts_by_ranges(wire::MAX_VERIFY_RANGES) {
        let flat = part.flat_byte_ranges();
        let (mut s2, g2) = reconnecting(cfg, || {
            open_verify(id, &cfg.dest, fp, &cfg.tuning, size, chunk, flat.clone())
        })
        .await?;
        if g2.chunk_size() != chunk {
            return Err(Error::Io(
                "the proof's geometry does not match the pass".into(),
            ));
        }
        let fresh = receive_hashes(&mut s2, &g2).await?;
        let differ = ChunkSet::from_indices(
            geometry,
            part.indices()
                .filter(|&i| table_entry(&fresh, i) != table_entry(ours, i)),
        );
        let forget: Vec<(u64, u64)> = differ.clip_to(&g2).byte_ranges().collect();
        forget_and_close(s2, &forget).await?;
        still.push(differ);
    }
    // The parts come in ascending order: their indices, one run at a time.
    Ok(ChunkSet::from_indices(
        geometry,
        still.iter().flat_map(ChunkSet::indices),
    ))
}

/// Re-reads the frozen source after the final pass and compares it with
/// the table that pass read: a chunk that changed means writers still run
/// (the operator's `--assume-frozen` or `--pre` did not stop them), and the
/// target is no consistency point.
pub(super) async fn check_source_unchanged(
    cfg: &SyncConfig,
    frozen: &Frozen,
    progress: &Arc<dyn Progress>,
) -> Result<()> {
    let path = cfg.read_from.clone().unwrap_or_else(|| cfg.source.clone());
    let chunk =
        ChunkSize::new(frozen.end.start.chunk_size).map_err(|e| Error::Io(e.to_string()))?;
    let (scan, table) = (cfg.scan.clone(), frozen.table.clone());
    progress.note("checking that the source did not change after the final pass read it");
    let changed = tokio::task::spawn_blocking(move || {
        let v = Arc::new(crate::io::device::Volume::open_source_reader(
            &path,
            scan.read_mode(),
        )?);
        let geometry = Geometry::new(v.size(), chunk).map_err(|e| Error::Io(e.to_string()))?;
        let fresh = crate::io::hash::hash_all(v, geometry, scan, Arc::new(crate::progress::Quiet))?;
        Ok::<_, Error>(compare(&geometry, &table, &fresh).len())
    })
    .await
    .map_err(|_| Error::Io("source check task failed".into()))??;
    if changed > 0 {
        return Err(Error::Io(format!(
            "the source changed in {changed} chunks after the final pass read them: writers are still running, so the target is no consistency point and nothing was certified. Stop every writer (or freeze the filesystem: --fsfreeze, or a plan volume's fsfreeze) and run the cutover again"
        )));
    }
    Ok(())
}
