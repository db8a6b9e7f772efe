//! Convergence and the cutover: daytime passes until a frozen final pass
//! fits the night window, then the frozen pass itself with its proof.
//!
//! Owns the decisions around passes, not the passes themselves (`sender`) or
//! the freezing (`freeze`). The cutover's proof overlaps the final pass:
//! while the sender reads the frozen source and sends what changed, the
//! receiver reads its whole target fresh in a parallel verify session. Only
//! chunks whose fresh target hash differs from the source hash as read in
//! the pass (mostly chunks read before this pass rewrote them) are read
//! again once the pass is durable; any that still differ are forgotten,
//! resent from the frozen source and checked again. So the freeze lasts
//! about one read of the volume plus the changed data, not two reads.
//!
//! `converge` runs every pass after a volume's first as a rehearsal of the
//! frozen one, with the receiver reading its target alongside (the tables
//! are not compared: the source is live), so the read rates the forecast
//! takes are those of the cutover's pass, where the proof's read slows the
//! scan (both ends sharing CPUs or disks) included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nightpass_proto::chunk::{ChunkSize, Geometry};
use nightpass_proto::chunkset::ChunkSet;
use nightpass_proto::wire::{self, control::Msg, Mode};
use serde_json::json;

use crate::app::verify::{compare, forget_and_close, open_verify, receive_hashes, table_entry};
use crate::error::{Error, Result};
use crate::io::freeze::{FreezeGuard, Method};
use crate::net::transport::{self, Identity};
use crate::pass::sender::{self, open_session, target_dir, SyncConfig};
use crate::progress::{human_bytes, now_unix, PassEnd, Progress};
use crate::store::journal::{self, CutoverRecord, SenderRecord, TargetReadRecord};
use crate::store::state::ManifestFile;

/// Settings of `converge`.
#[derive(Debug, Clone)]
pub struct ConvergeConfig {
    /// The night window a frozen final pass must fit.
    pub window: Duration,
    /// Most passes to run.
    pub max_passes: u32,
    /// Pause between passes.
    pub interval: Duration,
    /// Safety margin the forecast is multiplied by.
    pub margin: f64,
}

/// True when the last passes stopped shrinking: each of the last two moved
/// more than 90% of the data of the one before.
pub fn stopped_shrinking(changed: &[u64]) -> bool {
    let n = changed.len();
    n >= 3 && {
        let (a, b, c) = (
            changed[n - 3] as f64,
            changed[n - 2] as f64,
            changed[n - 1] as f64,
        );
        b > 0.9 * a && c > 0.9 * b
    }
}

/// Runs passes until the forecast fits; returns 0 ready, 1 not converged.
pub async fn converge(
    cfg: &SyncConfig,
    cc: &ConvergeConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
) -> Result<i32> {
    let window = cc.window.as_secs_f64();
    let mut changed: Vec<u64> = Vec::new();
    let mut last: Option<PassEnd> = None;
    sender::volume_state_dir(cfg)?;
    let journal = sender::journal(cfg);
    // The first pass of a volume copies everything: reading the target
    // alongside would only slow it, and it measures no read rate.
    let mut copied_before = journal::passes(&journal.read()?).next().is_some();
    // After the first pass the receiver is known to answer: a later pass
    // that cannot connect rides out the outage (--retry-for).
    let mut cfg = cfg.clone();
    for n in 1..=cc.max_passes {
        if n > 1 && !cc.interval.is_zero() {
            tokio::time::sleep(cc.interval).await;
        }
        let end = if copied_before {
            rehearsal_pass(&cfg, id, progress.clone()).await?
        } else {
            sender::run_pass(&cfg, id, progress.clone()).await?
        };
        copied_before = true;
        cfg.receiver_answered = true;
        if end.start.pass > 1 {
            changed.push(end.changed_bytes);
        }
        let fits = end.forecast_final_pass_s.map(|f| f * cc.margin <= window);
        let settled =
            nightpass_proto::plan::read_rate_settled(&journal::figures(&journal.read()?).passes);
        if fits == Some(true) && !settled && n < cc.max_passes {
            progress.note(
                "the forecast fits the window, but rests on one pass's read rate (or two that disagree by more than 10%): one more pass to confirm it",
            );
            last = Some(end);
            continue;
        }
        if fits == Some(true) {
            let f = end.forecast_final_pass_s.unwrap_or(0.0);
            progress.event(
                &json!({"event": "converge_end", "ready": true, "passes": n, "forecast_final_pass_s": f,
                        "margin": cc.margin, "window_s": window}),
                &format!(
                    "ready for cutover: a frozen final pass is forecast at {f:.1} s; × {} margin fits the {window:.0} s window",
                    cc.margin
                ),
            );
            return Ok(0);
        }
        if stopped_shrinking(&changed) {
            let why = format!(
                "passes stopped shrinking ({} then {} then {} changed): the source is written about as fast as a pass can catch up; a frozen final pass is forecast at {} s against a {window:.0} s window. Lower the write load, raise --bwlimit, or widen the window",
                human_bytes(changed[changed.len() - 3]),
                human_bytes(changed[changed.len() - 2]),
                human_bytes(changed[changed.len() - 1]),
                end.forecast_final_pass_s.map_or("?".into(), |f| format!("{f:.1}")),
            );
            progress.event(&json!({"event": "converge_end", "ready": false, "passes": n, "reason": "not shrinking",
                                    "forecast_final_pass_s": end.forecast_final_pass_s, "window_s": window}), &why);
            eprintln!("nightpass: not converged: {why}");
            return Ok(1);
        }
        last = Some(end);
    }
    let f = last.and_then(|e| e.forecast_final_pass_s);
    let why = format!(
        "{} passes done and a frozen final pass is still forecast at {} s × {} margin, over the {window:.0} s window",
        cc.max_passes,
        f.map_or("?".into(), |f| format!("{f:.1}")),
        cc.margin
    );
    progress.event(&json!({"event": "converge_end", "ready": false, "passes": cc.max_passes, "reason": "max passes",
                            "forecast_final_pass_s": f, "window_s": window}), &why);
    eprintln!("nightpass: not converged: {why}");
    Ok(1)
}

/// Settings of `cutover`.
#[derive(Debug, Clone)]
pub struct CutoverConfig {
    /// How to freeze.
    pub method: Method,
    /// Abort the pass and thaw when frozen longer than this.
    pub max_freeze: Option<Duration>,
    /// Prove the target identical by fresh reads (`--verify full`).
    pub prove: bool,
    /// Cut over a volume without a forecast (`--force-no-forecast`).
    pub force_no_forecast: bool,
    /// Safety margin the forecast is multiplied by for the default `--max-freeze`.
    pub margin: f64,
}

/// Rounds of repair before a cutover gives up.
const REPAIR_ROUNDS: usize = 3;

/// One pass while the receiver reads its whole target fresh in a parallel
/// verify session, as the proof of a cutover does. Returns the pass, the
/// source's chunk table as the pass read it (when `collect`), the target's
/// table as the receiver read it, and the geometry of that table.
///
/// Without `overlap` (the target does not exist yet: the pass creates it)
/// the receiver reads its target after the pass instead of alongside.
async fn pass_with_target_read(
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
        return Ok((end, ours.unwrap_or_default(), theirs, geometry));
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

/// A daytime pass run the way the cutover's pass will run (the receiver
/// reading its target alongside), so that the forecast measures the
/// frozen pass's real read rate.
async fn rehearsal_pass(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
) -> Result<PassEnd> {
    Ok(pass_with_target_read(cfg, id, progress, false, true)
        .await?
        .0)
}

/// What the frozen pass brings back.
struct Frozen {
    /// The final pass.
    end: PassEnd,
    /// Seconds spent in passes (the first, and any repairs).
    passes_s: f64,
    /// The source's chunk table as the final pass read it (when asked for).
    table: Vec<u8>,
}

/// The frozen pass and its proof (when `prove`); `overlap`: the target
/// exists, so the receiver reads it alongside the pass; `collect`: bring
/// back the source's table as the final pass read it.
async fn frozen_pass(
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
            passes_s,
            table,
        });
    }
    let (mut end, mut ours, theirs, geometry) =
        pass_with_target_read(cfg, id, progress.clone(), true, overlap).await?;
    let mut passes_s = end.duration_s;
    let mut suspects = compare(&geometry, &ours, &theirs);
    let mut round = 0;
    loop {
        // Chunks the parallel read saw before the pass rewrote them (or
        // that a repair resent) are read again; none left differing is
        // the proof, whichever round it comes in.
        let still = if suspects.is_empty() {
            suspects
        } else {
            recheck(cfg, id, &suspects, &ours).await?
        };
        if still.is_empty() {
            progress.note("proof: the target matches the frozen source, chunk for chunk, by fresh reads on both sides");
            return Ok(Frozen {
                end,
                passes_s,
                table: ours,
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
        let (e, t) = sender::run_pass_collecting(cfg, id, progress.clone(), true).await?;
        passes_s += e.duration_s;
        end = e;
        ours = t.unwrap_or_default();
        suspects = still;
    }
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

/// Runs `connect` (a session opened by a cutover or a converge, after the
/// receiver has answered this command) again after a lost link, with
/// backoff, for up to `--retry-for`; a receiver that never answered is not
/// retried (see `sender::run_pass`).
async fn reconnecting<T, F, Fut>(cfg: &SyncConfig, mut connect: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let until = Instant::now() + cfg.retry_for;
    let mut backoff = Duration::from_millis(500);
    loop {
        match connect().await {
            Err(Error::Network(_)) if cfg.receiver_answered && Instant::now() + backoff < until => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
            r => return r,
        }
    }
}

/// Tells the receiver to journal the consistency point.
async fn record_on_receiver(cfg: &SyncConfig, id: &Identity, mark: wire::Mark) -> Result<()> {
    let hello = wire::Hello {
        version: wire::PROTOCOL_VERSION,
        volume: cfg.dest.name.clone(),
        mode: Mode::Record as i32,
        ..Default::default()
    };
    let mut s = reconnecting(cfg, || {
        open_session(
            id,
            &cfg.dest,
            &cfg.server_fingerprint,
            &cfg.tuning,
            hello.clone(),
        )
    })
    .await?;
    transport::send_control(&mut s.send, Msg::Mark(mark)).await?;
    match transport::recv_control(&mut s.recv).await? {
        Some(Msg::Done(_)) => {}
        Some(Msg::Failure(f)) => return Err(Error::Io(f.message)),
        _ => {
            return Err(Error::Network(
                "receiver did not confirm recording the consistency point".into(),
            ))
        }
    }
    let _ = s.send.finish();
    transport::close_session(&s.endpoint, &s.conn, b"recorded").await;
    Ok(())
}

/// Least `--max-freeze` derived from a forecast: a forecast of seconds
/// must not make a slow night abort (cutover passes were measured up to
/// twice their forecast, README "The forecast and the night window").
pub const MAX_FREEZE_FLOOR: Duration = Duration::from_secs(60);

/// The freeze limit in force: the operator's `--max-freeze`, else the
/// forecast times the margin, at least [`MAX_FREEZE_FLOOR`]; none without
/// either (a forced cutover without a forecast).
pub fn max_freeze(
    given: Option<Duration>,
    forecast_s: Option<f64>,
    margin: f64,
) -> Option<Duration> {
    given.or_else(|| {
        forecast_s
            .map(|f| Duration::from_secs_f64((f * margin).max(MAX_FREEZE_FLOOR.as_secs_f64())))
    })
}

/// Whether the freeze method is the operator's word rather than ours:
/// then the source is read once more after the final pass, and any chunk
/// found changed means writers still run.
fn freeze_unchecked(method: &Method) -> bool {
    matches!(method, Method::AssumeFrozen | Method::Hooks { .. })
}

/// Re-reads the frozen source after the final pass and compares it with
/// the table that pass read: a chunk that changed means writers still run
/// (the operator's `--assume-frozen` or `--pre` did not stop them), and the
/// target is no consistency point.
async fn check_source_unchanged(
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
            "the source changed in {changed} chunks after the final pass read them: writers are still running, so the target is no consistency point and nothing was certified. Stop every writer (or use --fsfreeze / --lvm-snapshot) and run the cutover again"
        )));
    }
    Ok(())
}

/// Freeze, final pass, proof, thaw; returns 0 when the target is identical
/// to the frozen source.
///
/// Nothing is frozen before the night is known to be able to finish: the
/// volume must have a forecast (or the operator forces it), and the
/// receiver must accept a session of it now ([`sender::preflight`]); every
/// refusal there leaves the source never frozen.
pub async fn cutover(
    cfg: &SyncConfig,
    cc: &CutoverConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
) -> Result<i32> {
    cc.method.check(&cfg.source)?;
    let dir = sender::volume_state_dir(cfg)?;
    let journal = sender::journal(cfg);
    let forecast = nightpass_proto::plan::forecast(&journal::figures(&journal.read()?), now_unix());
    match forecast {
        Some(f) => progress.note(&format!(
            "forecast of the frozen pass: {:.2} s (scan {:.2} s, send {:.2} s, pass overhead {:.2} s, freeze overhead {:.2} s)",
            f.total_s, f.scan_s, f.send_s, f.pass_overhead_s, f.freeze_overhead_s
        )),
        None if cc.force_no_forecast => progress.note(
            "no forecast (fewer than two passes recorded); --force-no-forecast: the frozen pass may copy the whole volume",
        ),
        None => {
            return Err(Error::input(format!(
                "{} has no forecast (it was never synced, or fewer than two passes are recorded in {}), so a cutover would run the whole copy with the source frozen. Run 'nightpass converge' (or two syncs) first, or pass --force-no-forecast",
                cfg.dest,
                cfg.state_dir.display()
            )))
        }
    }
    // An operator's freeze is checked by one more read of the source while
    // frozen: the default limit leaves room for it.
    let check = freeze_unchecked(&cc.method);
    let frozen_forecast = forecast.map(|f| f.total_s + if check { f.scan_s } else { 0.0 });
    let limit = max_freeze(cc.max_freeze, frozen_forecast, cc.margin);
    let welcome = sender::preflight(cfg, id).await?;
    progress.note(&format!(
        "preflight: the receiver accepts a pass of {} now; {}",
        cfg.dest,
        match limit {
            Some(l) => format!(
                "the source will be thawed and the cutover abandoned if frozen longer than {:.0} s (--max-freeze)",
                l.as_secs_f64()
            ),
            None => "no --max-freeze: the freeze is not bounded".into(),
        }
    ));
    let freeze_unix = now_unix();
    let started = Instant::now();
    let method = cc.method.clone();
    let source = cfg.source.clone();
    let mut guard = tokio::task::spawn_blocking(move || FreezeGuard::freeze(&method, &source))
        .await
        .map_err(|_| Error::Io("freeze task failed".into()))??;
    progress.note(&format!("source frozen ({})", cc.method.name()));
    let mut frozen_cfg = cfg.clone();
    frozen_cfg.kind = "cutover";
    // The preflight reached the receiver: from now on a failed connection
    // is a lost link, ridden out within --retry-for (and --max-freeze).
    frozen_cfg.receiver_answered = true;
    // Without a manifest of ours, the pass and its proof use the chunk
    // size the receiver named in the preflight (its volume's own).
    let ours_known = matches!(ManifestFile::open(&dir.join("manifest")), Ok(Some(Ok(_))));
    if !ours_known && frozen_cfg.chunk_size.is_none() {
        frozen_cfg.chunk_size = ChunkSize::new(u64::from(welcome.chunk_size)).ok();
    }
    if guard.read_from() != cfg.source {
        frozen_cfg.read_from = Some(guard.read_from().to_owned());
    }
    let work = async {
        let overlap = welcome.target_size > 0;
        let frozen =
            frozen_pass(&frozen_cfg, id, progress.clone(), cc.prove, overlap, check).await?;
        if check {
            check_source_unchanged(&frozen_cfg, &frozen, &progress).await?;
        }
        Ok::<_, Error>(frozen)
    };
    let result = match limit {
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Io(format!(
                "--max-freeze of {} s exceeded: the final pass and its checks were aborted and the source thawed; the target is not a consistency point",
                limit.as_secs_f64()
            ))),
        },
        None => work.await,
    };
    let frozen_s = guard.frozen_for();
    let thawed = tokio::task::spawn_blocking(move || guard.thaw())
        .await
        .map_err(|_| Error::Io("thaw task failed".into()))?;
    progress.note(&format!("source thawed after {frozen_s:.2} s frozen"));
    let Frozen { end, passes_s, .. } = result?;
    thawed?;
    record_on_receiver(
        &frozen_cfg,
        id,
        wire::Mark {
            consistency_point: end.root.clone(),
            freeze_unix_s: freeze_unix,
            frozen_s,
        },
    )
    .await?;
    // Recorded here once the receiver has sealed the volume: from now on
    // this sender refuses passes of it too.
    journal.append(&SenderRecord::Cutover(CutoverRecord {
        volume: cfg.dest.to_string(),
        consistency_point: end.root.clone(),
        freeze_unix_s: freeze_unix,
        frozen_s,
        passes_s: Some(passes_s),
        method: cc.method.name().to_string(),
        proved: cc.prove,
        forecast_s: forecast.map(|f| f.total_s),
    }))?;
    let duration_s = started.elapsed().as_secs_f64();
    progress.event(
        &json!({
            "event": "cutover_end",
            "volume": cfg.dest.to_string(),
            "consistency_point": end.root,
            "duration_s": (duration_s * 1000.0).round() / 1000.0,
            "frozen_s": (frozen_s * 1000.0).round() / 1000.0,
            "forecast_s": forecast.map(|f| (f.total_s * 100.0).round() / 100.0),
            "proved": cc.prove,
            "proof": if cc.prove { "full" } else { "none" },
        }),
        &format!(
            "cutover complete: the target is {} the source as frozen. Consistency point {}; frozen for {frozen_s:.2} s. The receiver has sealed the volume: the new site owns it",
            if cc.prove { "proven identical to" } else { "(unproven, --verify none) a copy of" },
            end.root
        ),
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_freeze_defaults_to_the_forecast_times_the_margin_with_a_floor() {
        let s = Duration::from_secs;
        assert_eq!(max_freeze(None, Some(100.0), 1.5), Some(s(150)));
        assert_eq!(max_freeze(None, Some(2.0), 1.5), Some(MAX_FREEZE_FLOOR));
        assert_eq!(max_freeze(Some(s(5)), Some(100.0), 1.5), Some(s(5)));
        assert_eq!(max_freeze(None, None, 1.5), None);
    }

    #[test]
    fn shrinking_detection() {
        assert!(!stopped_shrinking(&[100, 50]));
        assert!(!stopped_shrinking(&[100, 50, 25]));
        assert!(stopped_shrinking(&[100, 95, 99]));
        assert!(!stopped_shrinking(&[100, 95, 50]));
    }
}
