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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nightpass_proto::chunk::{ChunkSize, Geometry};
use nightpass_proto::wire::{self, control::Msg, Mode};
use serde_json::json;

use crate::error::{Error, Result};
use crate::freeze::{FreezeGuard, Method};
use crate::progress::{human_bytes, PassEnd, Progress};
use crate::sender::{self, journal_figures, open_session, target_dir, SyncConfig};
use crate::state::{self, ManifestFile};
use crate::transport::{self, Identity};
use crate::verify::{compare, forget_and_close, open_verify, receive_hashes};

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

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
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
    let journal = target_dir(&cfg.state_dir, &cfg.dest).join("journal.jsonl");
    // The first pass of a volume copies everything: reading the target
    // alongside would only slow it, and it measures no read rate.
    let mut copied_before = state::read_journal(&journal)
        .iter()
        .any(|r| r["event"] == "pass");
    for n in 1..=cc.max_passes {
        if n > 1 && !cc.interval.is_zero() {
            tokio::time::sleep(cc.interval).await;
        }
        let end = if copied_before {
            rehearsal_pass(cfg, id, progress.clone()).await?
        } else {
            sender::run_pass(cfg, id, progress.clone()).await?
        };
        copied_before = true;
        if end.start.pass > 1 {
            changed.push(end.changed_bytes);
        }
        let fits = end.forecast_final_pass_s.map(|f| f * cc.margin <= window);
        let settled = nightpass_proto::plan::read_rate_settled(
            &journal_figures(&state::read_journal(&journal)).passes,
        );
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
}

/// Rounds of repair before a cutover gives up.
const REPAIR_ROUNDS: usize = 3;

/// One pass while the receiver reads its whole target fresh in a parallel
/// verify session, as the proof of a cutover does. Returns the pass, the
/// source's chunk table as the pass read it (when `collect`), the target's
/// table as the receiver read it, and the geometry of that table.
async fn pass_with_target_read(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
    collect: bool,
) -> Result<(PassEnd, Vec<u8>, Vec<u8>, Geometry)> {
    let size =
        crate::device::Volume::open_source(cfg.read_from.as_deref().unwrap_or(&cfg.source))?.size();
    let chunk = match ManifestFile::open(&target_dir(&cfg.state_dir, &cfg.dest).join("manifest"))? {
        Some(Ok(m)) => m.geometry().chunk_size(),
        _ => cfg.chunk_size.unwrap_or(ChunkSize::DEFAULT),
    };
    let fp = cfg.server_fingerprint.as_str();
    let (mut vs, geometry) =
        open_verify(id, &cfg.dest, fp, &cfg.tuning, size, chunk, Vec::new()).await?;
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
        Ok::<_, Error>((table, began.elapsed().as_secs_f64()))
    };
    let ((theirs, read_s), (end, ours)) = tokio::try_join!(
        target_read,
        sender::run_pass_collecting(&with_read, id, progress.clone(), collect)
    )?;
    forget_and_close(vs, &[]).await?;
    // The frozen pass lasts as long as the slower of the two reads: journal
    // the target's, so the forecast sees a target slower than the source.
    state::append_journal(
        &target_dir(&cfg.state_dir, &cfg.dest).join("journal.jsonl"),
        &json!({"event": "target_read", "size_bytes": geometry.size(), "duration_s": read_s}),
    )?;
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
    Ok(pass_with_target_read(cfg, id, progress, false).await?.0)
}

/// The frozen pass and its proof; returns the final pass and the seconds
/// spent in passes (the first, and any repairs).
async fn frozen_pass(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
    prove: bool,
) -> Result<(PassEnd, f64)> {
    if !prove {
        let end = sender::run_pass(cfg, id, progress).await?;
        let d = end.duration_s;
        return Ok((end, d));
    }
    let (mut end, mut ours, theirs, geometry) =
        pass_with_target_read(cfg, id, progress.clone(), true).await?;
    let mut passes_s = end.duration_s;
    let chunk = geometry.chunk_size();
    let size = geometry.size();
    let fp = cfg.server_fingerprint.as_str();
    let (_, mut suspects) = compare(&geometry, &ours, &theirs);
    for round in 0..=REPAIR_ROUNDS {
        if suspects.is_empty() {
            progress.note("proof: the target matches the frozen source, chunk for chunk, by fresh reads on both sides");
            return Ok((end, passes_s));
        }
        // A verify names at most MAX_VERIFY_RANGES ranges: ask in batches.
        let mut still = Vec::new();
        for batch in suspects.chunks(wire::MAX_VERIFY_RANGES) {
            let flat: Vec<u64> = batch.iter().flat_map(|&(o, l)| [o, l]).collect();
            let (mut s2, g2) =
                open_verify(id, &cfg.dest, fp, &cfg.tuning, size, chunk, flat).await?;
            if g2.chunk_size() != chunk {
                return Err(Error::Io(
                    "the proof's geometry does not match the pass".into(),
                ));
            }
            let fresh = receive_hashes(&mut s2, &g2).await?;
            let mut batch_still = Vec::new();
            for &(o, l) in batch {
                let first = o / chunk.bytes();
                let last = (o + l - 1) / chunk.bytes();
                for i in first..=last {
                    let e = i as usize * 32;
                    if fresh[e..e + 32] != ours[e..e + 32] {
                        batch_still.push(i);
                    }
                }
            }
            let batch_ranges = nightpass_proto::plan::coalesce(&g2, &batch_still);
            forget_and_close(s2, &batch_ranges).await?;
            still.extend(batch_still);
        }
        let geometry = Geometry::new(size, chunk).map_err(|e| Error::input(e.to_string()))?;
        let still_ranges = nightpass_proto::plan::coalesce(&geometry, &still);
        if still.is_empty() {
            suspects.clear();
            continue;
        }
        if round == REPAIR_ROUNDS {
            break;
        }
        progress.note(&format!(
            "proof: {} chunks differ after the pass; resending them from the frozen source (round {})",
            still.len(),
            round + 1
        ));
        let (e, t) = sender::run_pass_collecting(cfg, id, progress.clone(), true).await?;
        passes_s += e.duration_s;
        end = e;
        ours = t.unwrap_or_default();
        suspects = still_ranges;
    }
    Err(Error::Io(format!(
        "the target still differs from the frozen source in {} ranges after {REPAIR_ROUNDS} repairs",
        suspects.len()
    )))
}

/// Tells the receiver to journal the consistency point.
async fn record_on_receiver(cfg: &SyncConfig, id: &Identity, mark: wire::Mark) -> Result<()> {
    let hello = wire::Hello {
        version: wire::PROTOCOL_VERSION,
        volume: cfg.dest.name.clone(),
        mode: Mode::Record as i32,
        ..Default::default()
    };
    let mut s = open_session(id, &cfg.dest, &cfg.server_fingerprint, &cfg.tuning, hello).await?;
    transport::send_control(&mut s.send, Msg::Mark(mark)).await?;
    match transport::recv_control(&mut s.recv).await? {
        Some(Msg::Done(_)) => {}
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

/// Freeze, final pass, proof, thaw; returns 0 when the target is identical
/// to the frozen source.
pub async fn cutover(
    cfg: &SyncConfig,
    cc: &CutoverConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
) -> Result<i32> {
    let dir = target_dir(&cfg.state_dir, &cfg.dest);
    let journal = dir.join("journal.jsonl");
    let forecast = nightpass_proto::plan::forecast(
        &journal_figures(&state::read_journal(&journal)),
        now_unix(),
    );
    match forecast {
        Some(f) => progress.note(&format!(
            "forecast of the frozen pass: {:.2} s (scan {:.2} s, send {:.2} s, pass overhead {:.2} s, freeze overhead {:.2} s)",
            f.total_s, f.scan_s, f.send_s, f.pass_overhead_s, f.freeze_overhead_s
        )),
        None => progress
            .note("no forecast: fewer than two passes recorded; the frozen pass may be long"),
    }
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
    if guard.read_from() != cfg.source {
        frozen_cfg.read_from = Some(guard.read_from().to_owned());
    }
    let work = frozen_pass(&frozen_cfg, id, progress.clone(), cc.prove);
    let result = match cc.max_freeze {
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Io(format!(
                "--max-freeze of {} s exceeded: final pass aborted, source thawed; the target is not a consistency point",
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
    let (end, passes_s) = result?;
    thawed?;
    let record = json!({
        "event": "cutover",
        "volume": cfg.dest.to_string(),
        "consistency_point": end.root,
        "freeze_unix_s": freeze_unix,
        "frozen_s": frozen_s,
        "passes_s": passes_s,
        "method": cc.method.name(),
        "proved": cc.prove,
        "forecast_s": forecast.map(|f| f.total_s),
    });
    state::append_journal(&journal, &record)?;
    record_on_receiver(
        cfg,
        id,
        wire::Mark {
            consistency_point: end.root.clone(),
            freeze_unix_s: freeze_unix,
            frozen_s,
        },
    )
    .await?;
    let duration_s = started.elapsed().as_secs_f64();
    progress.event(
        &json!({
            "event": "cutover_end",
            "consistency_point": end.root,
            "duration_s": (duration_s * 1000.0).round() / 1000.0,
            "frozen_s": (frozen_s * 1000.0).round() / 1000.0,
            "forecast_s": forecast.map(|f| (f.total_s * 100.0).round() / 100.0),
            "proved": cc.prove,
        }),
        &format!(
            "cutover complete: the target is {} the source as frozen. Consistency point {}; frozen for {frozen_s:.2} s",
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
    fn shrinking_detection() {
        assert!(!stopped_shrinking(&[100, 50]));
        assert!(!stopped_shrinking(&[100, 50, 25]));
        assert!(stopped_shrinking(&[100, 95, 99]));
        assert!(!stopped_shrinking(&[100, 95, 50]));
    }
}
