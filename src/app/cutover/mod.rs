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

mod converge;
pub mod group;
mod proof;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nightpass_proto::chunk::ChunkSize;
use nightpass_proto::plan::Forecast;
use nightpass_proto::wire::{self, control::Msg, Mode};
use serde_json::json;

pub use converge::{converge, stopped_shrinking, ConvergeConfig};
use proof::{check_source_unchanged, frozen_pass, Frozen};

use crate::error::{Error, Result};
use crate::io::freeze::{FreezeGuard, Method};
use crate::net::transport::{self, Identity};
use crate::pass::sender::{self, open_session, SyncConfig};
use crate::progress::{now_unix, Progress};
use crate::store::journal::{CutoverRecord, SenderRecord};
use crate::store::state::ManifestFile;

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

/// Set while a cutover records its consistency points on the receiver.
static RECORDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a cutover is recording its consistency points on the receiver
/// now: every proof passed, and a few round trips seal the volumes; an
/// interrupt waits for them rather than leave a group sealed in part.
pub fn recording() -> bool {
    RECORDING.load(std::sync::atomic::Ordering::SeqCst)
}

/// [`recording`] for as long as it lives.
struct Recording;

impl Recording {
    fn begin() -> Recording {
        RECORDING.store(true, std::sync::atomic::Ordering::SeqCst);
        Recording
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        RECORDING.store(false, std::sync::atomic::Ordering::SeqCst);
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
    let (forecast, cfg) = plan_final(cfg, &journal.read()?);
    let cfg = &cfg;
    if let Some(why) = &cfg.scan_reason {
        progress.note(&format!(
            "the frozen pass will read the whole volume: {why}"
        ));
    }
    announce_forecast(cfg, cc, forecast.as_ref(), progress.as_ref())?;
    // An operator's freeze is checked by one more read of the source while
    // frozen: the default limit leaves room for it.
    let check = freeze_unchecked(&cc.method);
    let frozen_forecast = forecast.map(|f| f.total_s + if check { f.scan_s } else { 0.0 });
    let limit = max_freeze(cc.max_freeze, frozen_forecast, cc.margin);
    let welcome = sender::preflight(cfg, id).await?;
    if cfg.scan_choice == sender::ScanChoice::Tracked && !sender::would_be_tracked(cfg)? {
        // Refused before anything is frozen.
        return Err(Error::input(
            "--scan tracked: no unbroken change record reaches back to the previous completed pass (see `nightpass track`); nothing was frozen",
        ));
    }
    progress.note(&preflight_note(cfg, limit));
    let night = Night {
        cfg,
        cc,
        id,
        progress: progress.clone(),
    };
    let freeze_unix = now_unix();
    let started = Instant::now();
    let (frozen, frozen_s, frozen_cfg) = night.frozen(&dir, &welcome, limit, check).await?;
    let record = CutoverRecord {
        volume: cfg.dest.to_string(),
        consistency_point: frozen.end.root.clone(),
        freeze_unix_s: freeze_unix,
        frozen_s,
        passes_s: Some(frozen.passes_s),
        method: cc.method.name().to_string(),
        proved: cc.prove,
        forecast_s: forecast.map(|f| f.total_s),
        proof: Some(frozen.proof.to_string()),
        proof_s: Some(frozen.proof_s),
    };
    let mark = wire::Mark {
        consistency_point: record.consistency_point.clone(),
        freeze_unix_s: freeze_unix,
        frozen_s,
        ..Default::default()
    };
    let recording = Recording::begin();
    record_on_receiver(&frozen_cfg, id, mark).await?;
    // Recorded here once the receiver has sealed the volume: from now on
    // this sender refuses passes of it too.
    journal.append(&SenderRecord::Cutover(record.clone()))?;
    drop(recording);
    report_cutover(progress.as_ref(), &record, started.elapsed().as_secs_f64());
    Ok(0)
}

/// A full frozen pass is chosen over a tracked one (under `--scan auto`)
/// only when forecast faster by this factor: scattered writes can touch so
/// many chunks that reading them one by one, then re-reading them for the
/// proof, costs more than one sequential read with the proof alongside
/// (`scripts/tracking-figures.sh`, 1% of a 4 GiB volume in scattered 4 KiB
/// writes: 10.5 s tracked against 9.5 s full, frozen).
const FULL_WHEN_FASTER: f64 = 1.1;

/// The frozen pass's forecast, and its settings: under `--scan auto`, with
/// an unbroken change record, a pass that reads the whole volume when that
/// is forecast faster than the tracked one (saying why).
fn plan_final(cfg: &SyncConfig, records: &[SenderRecord]) -> (Option<Forecast>, SyncConfig) {
    use nightpass_proto::plan::{forecast, FinalScan, History};
    let now = now_unix();
    let history = sender::history_now(cfg, records);
    let tracked = forecast(&history, now);
    let mut cfg = cfg.clone();
    if cfg.scan_choice != sender::ScanChoice::Auto
        || !matches!(history.final_scan, FinalScan::Tracked { .. })
    {
        return (tracked, cfg);
    }
    let full = forecast(
        &History {
            final_scan: FinalScan::Full,
            ..history
        },
        now,
    );
    match (tracked, full) {
        (Some(t), Some(f)) if f.total_s * FULL_WHEN_FASTER < t.total_s => {
            cfg.scan_choice = sender::ScanChoice::Full;
            cfg.scan_reason = Some(format!(
                "the change record names {:.0} MiB of chunks, and reading the whole volume is forecast faster ({:.1} s against {:.1} s tracked)",
                t.pending_bytes / (1u64 << 20) as f64,
                f.total_s,
                t.total_s
            ));
            (Some(f), cfg)
        }
        _ => (tracked, cfg),
    }
}

/// Says what the frozen pass is forecast to take; refuses a volume without
/// a forecast unless forced (`--force-no-forecast`).
fn announce_forecast(
    cfg: &SyncConfig,
    cc: &CutoverConfig,
    forecast: Option<&Forecast>,
    progress: &dyn Progress,
) -> Result<()> {
    match forecast {
        Some(f) => progress.event(&forecast_event(cfg, f), &forecast_note(f)),
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
    Ok(())
}

/// The forecast as a `cutover_forecast` event, before anything is frozen.
fn forecast_event(cfg: &SyncConfig, f: &Forecast) -> serde_json::Value {
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    serde_json::json!({
        "event": "cutover_forecast",
        "volume": cfg.dest.to_string(),
        "forecast_s": round(f.total_s),
        "scan": if f.tracked { "tracked" } else { "full" },
        "changed_bytes": f.pending_bytes.round() as u64,
        "scan_s": round(f.scan_s),
        "send_s": round(f.send_s),
        "proof_s": round(f.proof_s),
        "pass_overhead_s": round(f.pass_overhead_s),
        "freeze_overhead_s": round(f.freeze_overhead_s),
    })
}

/// The forecast's parts, for the operator.
fn forecast_note(f: &Forecast) -> String {
    let what = if f.tracked {
        format!(
            "tracked: {:.2} MiB of changed chunks to read, proof {:.2} s, ",
            f.pending_bytes / (1u64 << 20) as f64,
            f.proof_s
        )
    } else {
        String::new()
    };
    format!(
        "forecast of the frozen pass: {:.2} s ({what}scan {:.2} s, send {:.2} s, pass overhead {:.2} s, freeze overhead {:.2} s)",
        f.total_s, f.scan_s, f.send_s, f.pass_overhead_s, f.freeze_overhead_s
    )
}

/// What the operator reads once the receiver accepted the preflight.
fn preflight_note(cfg: &SyncConfig, limit: Option<Duration>) -> String {
    format!(
        "preflight: the receiver accepts a pass of {} now; {}",
        cfg.dest,
        match limit {
            Some(l) => format!(
                "the source will be thawed and the cutover abandoned if frozen longer than {:.0} s (--max-freeze)",
                l.as_secs_f64()
            ),
            None => "no --max-freeze: the freeze is not bounded".into(),
        }
    )
}

/// One cutover under way: what its frozen steps read.
struct Night<'a> {
    cfg: &'a SyncConfig,
    cc: &'a CutoverConfig,
    id: &'a Identity,
    progress: Arc<dyn Progress>,
}

impl Night<'_> {
    /// Freezes the source, runs the final pass and its checks within
    /// `limit`, and thaws whatever happened; returns the pass, the seconds
    /// frozen and the settings the frozen pass ran with.
    async fn frozen(
        &self,
        dir: &Path,
        welcome: &wire::Welcome,
        limit: Option<Duration>,
        check: bool,
    ) -> Result<(Frozen, f64, SyncConfig)> {
        let (method, source) = (self.cc.method.clone(), self.cfg.source.clone());
        let mut guard = tokio::task::spawn_blocking(move || FreezeGuard::freeze(&method, &source))
            .await
            .map_err(|_| Error::Io("freeze task failed".into()))??;
        self.progress
            .note(&format!("source frozen ({})", self.cc.method.name()));
        let frozen_cfg = frozen_config(self.cfg, dir, welcome, guard.read_from());
        let work = self.final_pass(&frozen_cfg, welcome.target_size > 0, check);
        let result = within_max_freeze(limit, work).await;
        let frozen_s = guard.frozen_for();
        crate::metrics::freeze(&self.cfg.dest.to_string(), frozen_s);
        let thawed = tokio::task::spawn_blocking(move || guard.thaw())
            .await
            .map_err(|_| Error::Io("thaw task failed".into()))?;
        self.progress
            .note(&format!("source thawed after {frozen_s:.2} s frozen"));
        let frozen = result?;
        thawed?;
        Ok((frozen, frozen_s, frozen_cfg))
    }

    /// The frozen pass with its proof, and the check that an operator's
    /// freeze held (`check`).
    async fn final_pass(&self, cfg: &SyncConfig, overlap: bool, check: bool) -> Result<Frozen> {
        let progress = self.progress.clone();
        let frozen = frozen_pass(cfg, self.id, progress, self.cc.prove, overlap, check).await?;
        if check {
            check_source_unchanged(cfg, &frozen, &self.progress).await?;
        }
        Ok(frozen)
    }
}

/// The settings of the frozen pass: a cutover's, after a receiver that
/// answered, reading from where the freeze says (a snapshot, or the
/// source), in the chunk size the receiver named when we have no manifest.
fn frozen_config(
    cfg: &SyncConfig,
    dir: &Path,
    welcome: &wire::Welcome,
    read_from: &Path,
) -> SyncConfig {
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
    if read_from != cfg.source {
        frozen_cfg.read_from = Some(read_from.to_owned());
    }
    frozen_cfg
}

/// Awaits `work`, abandoning it after `limit` (`--max-freeze`).
async fn within_max_freeze<T>(
    limit: Option<Duration>,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let Some(limit) = limit else {
        return work.await;
    };
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(Error::Io(format!(
            "--max-freeze of {} s exceeded: the final pass and its checks were aborted and the source thawed; the target is not a consistency point",
            limit.as_secs_f64()
        )))
    })
}

/// The `cutover_end` event of a cutover the receiver sealed.
fn report_cutover(progress: &dyn Progress, r: &CutoverRecord, duration_s: f64) {
    let frozen_s = r.frozen_s;
    progress.event(
        &json!({
            "event": "cutover_end",
            "volume": r.volume,
            "consistency_point": r.consistency_point,
            "duration_s": (duration_s * 1000.0).round() / 1000.0,
            "frozen_s": (frozen_s * 1000.0).round() / 1000.0,
            "forecast_s": r.forecast_s.map(|f| (f * 100.0).round() / 100.0),
            "proved": r.proved,
            "proof": r.proof.as_deref().unwrap_or(if r.proved { "full" } else { "none" }),
        }),
        &format!(
            "cutover complete: the target is {} the source as frozen. Consistency point {}; frozen for {frozen_s:.2} s. The receiver has sealed the volume: the new site owns it",
            if r.proved { "proven identical to" } else { "(unproven, --verify none) a copy of" },
            r.consistency_point
        ),
    );
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
}
