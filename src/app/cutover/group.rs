//! The group cutover: every volume of a filer frozen together, their final
//! passes run at most `jobs` at a time, each proven, everything thawed in
//! every case, and the volumes certified all or none under one group
//! consistency point.
//!
//! Owns the order of a filer's night: preflight every volume before any
//! freeze, freeze each distinct thing once (a mount once however many
//! volumes name it, the operator's `pre` command once for the filer), the
//! group's `--max-freeze`, thawing in reverse order, and the group record.
//! It takes the single volume's pieces (forecast, preflight, frozen pass,
//! proof, the receiver's record) from its siblings and must not change
//! them; it does not parse plans (the caller builds its [`GroupVolume`]s).
//!
//! All or none: the receiver is told the volumes' consistency points
//! (which seals them there) only once every volume's pass is proven, in one
//! record for the whole group, which it checks whole before it seals any
//! volume (`pass::receiver::record`); a signal during that record waits for
//! it to end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nightpass_proto::plan::Forecast;
use nightpass_proto::wire;
use serde_json::json;

use super::proof::{check_source_unchanged, frozen_pass, Frozen};
use super::{
    announce_forecast, freeze_unchecked, frozen_config, max_freeze, plan_final, record_on_receiver,
    report_cutover, within_max_freeze, CutoverConfig,
};
use crate::error::{Error, Result};
use crate::io::freeze::{FreezeGuard, Method};
use crate::net::transport::Identity;
use crate::pass::sender::{self, SyncConfig};
use crate::progress::{now_unix, Progress};
use crate::store::journal::{CutoverRecord, GroupCutoverRecord, SenderRecord};

/// One volume of a group cutover.
pub struct GroupVolume {
    /// Its name in the plan (the receiver's export).
    pub name: String,
    /// Its pass settings.
    pub cfg: SyncConfig,
    /// What freezes it: its own mount, or the filer's freeze.
    pub method: Method,
    /// Where its events go (each carries the volume's name).
    pub progress: Arc<dyn Progress>,
}

/// Settings of a group cutover.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Final passes in flight at once.
    pub jobs: usize,
    /// Abort and thaw when frozen longer than this (default: the group's
    /// forecast × margin, at least a minute).
    pub max_freeze: Option<Duration>,
    /// Prove each target by fresh reads.
    pub prove: bool,
    /// Cut over volumes without a forecast.
    pub force_no_forecast: bool,
    /// Safety margin on the forecast.
    pub margin: f64,
}

/// Why a group cutover failed, and in which volume (none when the group
/// failed as a whole: `--max-freeze`, a thaw).
#[derive(Debug)]
pub struct GroupFailure {
    /// The volume whose preflight, freeze, pass, proof or record failed.
    pub volume: Option<String>,
    /// What failed (its exit status is the run's).
    pub error: Error,
}

impl From<Error> for GroupFailure {
    fn from(error: Error) -> GroupFailure {
        GroupFailure {
            volume: None,
            error,
        }
    }
}

/// `error` in volume `name`: named in the message as well.
fn failed_in(name: &str, error: Error) -> GroupFailure {
    GroupFailure {
        volume: Some(name.to_string()),
        error: error.context(&format!("volume '{name}'")),
    }
}

/// A volume past its preflight: the receiver accepts its pass now.
struct Ready {
    /// Its pass settings for the night (a full read chosen over the
    /// change record when forecast faster).
    cfg: SyncConfig,
    welcome: wire::Welcome,
    dir: PathBuf,
    forecast: Option<Forecast>,
    check: bool,
}

/// What one volume's frozen pass brought back.
struct Done {
    frozen: Frozen,
    cfg: SyncConfig,
}

/// Runs the group cutover of `volumes` (in name order); returns 0 when
/// every target is proven identical to its frozen source and recorded.
pub async fn group_cutover(
    volumes: Vec<GroupVolume>,
    gc: &GroupConfig,
    id: Arc<Identity>,
    progress: Arc<dyn Progress>,
) -> Result<i32, GroupFailure> {
    let mut volumes = volumes;
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    let ready = preflight_all(&volumes, gc, &id).await?;
    let forecasts: Vec<f64> = ready
        .iter()
        .map(|r| r.forecast.map_or(0.0, |f| f.total_s + check_cost(r, f)))
        .collect();
    let group_forecast = ready
        .iter()
        .all(|r| r.forecast.is_some())
        .then(|| makespan(&forecasts, gc.jobs));
    let limit = max_freeze(gc.max_freeze, group_forecast, gc.margin);
    progress.note(&format!(
        "preflight: the receiver accepts every volume of the group now ({}); {}",
        volumes.len(),
        match limit {
            Some(l) => format!(
                "every source will be thawed and the cutover abandoned if frozen longer than {:.0} s (--max-freeze)",
                l.as_secs_f64()
            ),
            None => "no --max-freeze (no forecast)".into(),
        }
    ));
    let freeze_unix = now_unix();
    let started = Instant::now();
    let order = longest_first(&forecasts);
    let (done, frozen_s) = frozen_group(&volumes, &ready, gc, &id, limit, order).await?;
    certify(
        &volumes,
        &ready,
        &done,
        gc,
        &id,
        Certify {
            freeze_unix,
            frozen_s,
            started,
            progress: &progress,
        },
    )
    .await
}

/// Indices of `durations`, longest first (ties in name order).
fn longest_first(durations: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..durations.len()).collect();
    order.sort_by(|&a, &b| durations[b].total_cmp(&durations[a]));
    order
}

/// Seconds the check of an operator's freeze adds (one more read).
fn check_cost(r: &Ready, f: Forecast) -> f64 {
    if r.check {
        f.scan_s
    } else {
        0.0
    }
}

/// The time `durations` take on `jobs` slots, longest first, each to the
/// slot free soonest: how the group cutover starts its final passes.
pub fn makespan(durations: &[f64], jobs: usize) -> f64 {
    let mut d = durations.to_vec();
    d.sort_by(|a, b| b.total_cmp(a));
    let mut slots = vec![0.0f64; jobs.max(1)];
    for x in d {
        let s = slots
            .iter_mut()
            .min_by(|a, b| a.total_cmp(b))
            .expect("one slot at least");
        *s += x;
    }
    slots.into_iter().fold(0.0, f64::max)
}

/// Every volume's checks before anything is frozen: its freeze can work,
/// it has a forecast (or the operator forces it), the receiver accepts its
/// pass now, and `--scan tracked` has its record. The first refusal ends
/// the cutover with nothing frozen.
async fn preflight_all(
    volumes: &[GroupVolume],
    gc: &GroupConfig,
    id: &Identity,
) -> Result<Vec<Ready>, GroupFailure> {
    let mut ready = Vec::with_capacity(volumes.len());
    for v in volumes {
        let r = preflight_one(v, gc, id)
            .await
            .map_err(|e| failed_in(&v.name, e))?;
        ready.push(r);
    }
    Ok(ready)
}

async fn preflight_one(v: &GroupVolume, gc: &GroupConfig, id: &Identity) -> Result<Ready> {
    v.method.check(&v.cfg.source)?;
    let dir = sender::volume_state_dir(&v.cfg)?;
    let records = sender::journal(&v.cfg).read()?;
    let (forecast, cfg) = plan_final(&v.cfg, &records);
    let cfg = &cfg;
    if let Some(why) = &cfg.scan_reason {
        v.progress.note(&format!(
            "the frozen pass will read the whole volume: {why}"
        ));
    }
    announce_forecast(
        cfg,
        &single(gc, &v.method),
        forecast.as_ref(),
        v.progress.as_ref(),
    )?;
    let welcome = sender::preflight(cfg, id).await?;
    if cfg.scan_choice == sender::ScanChoice::Tracked && !sender::would_be_tracked(cfg)? {
        return Err(Error::input(
            "--scan tracked: no unbroken change record reaches back to the previous completed pass (see `nightpass track`); nothing was frozen",
        ));
    }
    Ok(Ready {
        cfg: cfg.clone(),
        welcome,
        dir,
        forecast,
        check: freeze_unchecked(&v.method),
    })
}

/// The single-volume settings a group's volume shares.
fn single(gc: &GroupConfig, method: &Method) -> CutoverConfig {
    CutoverConfig {
        method: method.clone(),
        max_freeze: gc.max_freeze,
        prove: gc.prove,
        force_no_forecast: gc.force_no_forecast,
        margin: gc.margin,
    }
}

/// The distinct freezes of a group, in the order they are applied: the
/// operator's commands first (they stop the applications), then each
/// mount once; with the source each is applied for.
fn freezes(volumes: &[GroupVolume]) -> Vec<(Method, PathBuf)> {
    let mut out: Vec<(Method, PathBuf)> = Vec::new();
    let mut seen_mounts: Vec<PathBuf> = Vec::new();
    let hooks = volumes
        .iter()
        .find(|v| matches!(v.method, Method::Hooks { .. }));
    if let Some(v) = hooks {
        out.push((v.method.clone(), v.cfg.source.clone()));
    }
    for v in volumes {
        match &v.method {
            Method::Fsfreeze(mp) => {
                let key = std::fs::canonicalize(mp).unwrap_or_else(|_| mp.clone());
                if !seen_mounts.contains(&key) {
                    seen_mounts.push(key);
                    out.push((v.method.clone(), v.cfg.source.clone()));
                }
            }
            Method::LvmSnapshot { .. } => out.push((v.method.clone(), v.cfg.source.clone())),
            Method::Hooks { .. } | Method::AssumeFrozen => {}
        }
    }
    out
}

/// Freezes everything, runs every final pass within `limit`, and thaws
/// everything (in reverse order) whatever happened; returns each volume's
/// pass and the seconds the group was frozen.
async fn frozen_group(
    volumes: &[GroupVolume],
    ready: &[Ready],
    gc: &GroupConfig,
    id: &Arc<Identity>,
    limit: Option<Duration>,
    order: Vec<usize>,
) -> Result<(Vec<Done>, f64), GroupFailure> {
    let mut guards: Vec<(PathBuf, FreezeGuard)> = Vec::new();
    let since = Instant::now();
    let mut froze = Ok(());
    for (method, source) in freezes(volumes) {
        let s = source.clone();
        let frozen = tokio::task::spawn_blocking(move || FreezeGuard::freeze(&method, &s))
            .await
            .unwrap_or_else(|_| Err(Error::Io("freeze task failed".into())));
        match frozen {
            Ok(g) => guards.push((source, g)),
            Err(e) => {
                let v = volumes.iter().find(|v| v.cfg.source == source);
                froze = Err(match v {
                    Some(v) => failed_in(&v.name, e),
                    None => e.into(),
                });
                break;
            }
        }
    }
    let result = match froze {
        Ok(()) => {
            let sources = read_from(volumes, &guards);
            let work = async { Ok(final_passes(volumes, ready, gc, id, sources, order).await) };
            within_max_freeze(limit, work)
                .await
                .map_err(GroupFailure::from)
                .and_then(|r| r)
        }
        Err(e) => Err(e),
    };
    let frozen_s = since.elapsed().as_secs_f64();
    let thawed = thaw_all(guards).await;
    let done = result?;
    thawed?;
    Ok((done, frozen_s))
}

/// Where each volume's frozen pass reads: a snapshot its freeze made, or
/// its source.
fn read_from(volumes: &[GroupVolume], guards: &[(PathBuf, FreezeGuard)]) -> Vec<PathBuf> {
    volumes
        .iter()
        .map(|v| {
            let snapshot = matches!(v.method, Method::LvmSnapshot { .. });
            guards
                .iter()
                .find(|(source, _)| snapshot && *source == v.cfg.source)
                .map_or_else(|| v.cfg.source.clone(), |(_, g)| g.read_from().to_owned())
        })
        .collect()
}

/// Thaws in reverse order of freezing; every guard is thawed even when
/// one fails, and the first failure is returned.
async fn thaw_all(guards: Vec<(PathBuf, FreezeGuard)>) -> Result<()> {
    let mut first = Ok(());
    for (_, mut g) in guards.into_iter().rev() {
        let r = tokio::task::spawn_blocking(move || g.thaw())
            .await
            .unwrap_or_else(|_| Err(Error::Io("thaw task failed".into())));
        if let (Err(e), true) = (r, first.is_ok()) {
            first = Err(e);
        }
    }
    first
}

/// One volume's frozen pass as a task takes it.
struct Work {
    name: String,
    cfg: SyncConfig,
    progress: Arc<dyn Progress>,
    overlap: bool,
    check: bool,
}

/// What the passes' tasks share: the next volume to take, the first
/// failure, and each volume's result.
struct Board {
    work: Vec<Work>,
    /// The order the volumes start in (longest forecast first).
    order: Vec<usize>,
    next: Mutex<usize>,
    failed: Mutex<Option<GroupFailure>>,
    results: Mutex<Vec<Option<Done>>>,
}

impl Board {
    /// The next volume to run, unless the work is done or a volume failed.
    fn take(&self) -> Option<usize> {
        let mut n = self.next.lock().expect("lock");
        if self.failed.lock().expect("lock").is_some() || *n >= self.work.len() {
            return None;
        }
        *n += 1;
        Some(self.order[*n - 1])
    }

    fn finish(&self, i: usize, r: Result<Frozen>) {
        match r {
            Ok(frozen) => {
                self.results.lock().expect("lock")[i] = Some(Done {
                    frozen,
                    cfg: self.work[i].cfg.clone(),
                })
            }
            Err(e) => {
                let mut f = self.failed.lock().expect("lock");
                if f.is_none() {
                    *f = Some(failed_in(&self.work[i].name, e));
                }
            }
        }
    }
}

/// The frozen passes with their proofs, at most `jobs` at a time; the
/// first failure stops starting new ones and is returned once the passes
/// in flight have ended.
async fn final_passes(
    volumes: &[GroupVolume],
    ready: &[Ready],
    gc: &GroupConfig,
    id: &Arc<Identity>,
    sources: Vec<PathBuf>,
    order: Vec<usize>,
) -> Result<Vec<Done>, GroupFailure> {
    let work: Vec<Work> = volumes
        .iter()
        .zip(ready)
        .zip(&sources)
        .map(|((v, r), src)| Work {
            name: v.name.clone(),
            cfg: frozen_config(&r.cfg, &r.dir, &r.welcome, src),
            progress: v.progress.clone(),
            overlap: r.welcome.target_size > 0,
            check: r.check,
        })
        .collect();
    let board = Arc::new(Board {
        results: Mutex::new((0..work.len()).map(|_| None).collect()),
        work,
        order,
        next: Mutex::new(0),
        failed: Mutex::new(None),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..gc.jobs.clamp(1, volumes.len().max(1)) {
        let (board, id, prove) = (board.clone(), id.clone(), gc.prove);
        tasks.spawn(async move {
            while let Some(i) = board.take() {
                let w = &board.work[i];
                let r = one_final_pass(&w.cfg, &id, w.progress.clone(), prove, w.overlap, w.check)
                    .await;
                board.finish(i, r);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if joined.is_err() {
            return Err(Error::Io("a final pass's task failed".into()).into());
        }
    }
    if let Some(e) = board.failed.lock().expect("lock").take() {
        return Err(e);
    }
    let done: Option<Vec<Done>> = std::mem::take(&mut *board.results.lock().expect("lock"))
        .into_iter()
        .collect();
    done.ok_or_else(|| Error::Io("a volume's final pass did not report".into()).into())
}

/// One volume's frozen pass, its proof, and the check of an operator's
/// freeze.
async fn one_final_pass(
    cfg: &SyncConfig,
    id: &Identity,
    progress: Arc<dyn Progress>,
    prove: bool,
    overlap: bool,
    check: bool,
) -> Result<Frozen> {
    let frozen = frozen_pass(cfg, id, progress.clone(), prove, overlap, check).await?;
    if check {
        check_source_unchanged(cfg, &frozen, &progress).await?;
    }
    Ok(frozen)
}

/// When and how long the group was frozen, for its records.
struct Certify<'a> {
    freeze_unix: f64,
    frozen_s: f64,
    started: Instant,
    progress: &'a Arc<dyn Progress>,
}

/// Every volume proven: records each consistency point on the receiver
/// (which seals the volume) and in this sender's journal, then the group's
/// point over them in name order.
async fn certify(
    volumes: &[GroupVolume],
    ready: &[Ready],
    done: &[Done],
    gc: &GroupConfig,
    id: &Identity,
    c: Certify<'_>,
) -> Result<i32, GroupFailure> {
    let points: Vec<&str> = done.iter().map(|d| d.frozen.end.root.as_str()).collect();
    let group_point = group_point(&points)?;
    let names: Vec<String> = volumes.iter().map(|v| v.name.clone()).collect();
    // Until the group is recorded, an interrupt waits (see `recording`).
    let _recording = super::Recording::begin();
    // One record for the whole group: the receiver checks every volume's
    // point, then seals them all, or none.
    let mark = wire::Mark {
        consistency_point: done[0].frozen.end.root.clone(),
        freeze_unix_s: c.freeze_unix,
        frozen_s: c.frozen_s,
        group_point: group_point.clone(),
        group_volumes: names.clone(),
        members: volumes
            .iter()
            .zip(done)
            .map(|(v, d)| wire::MarkMember {
                volume: v.cfg.dest.name.clone(),
                consistency_point: d.frozen.end.root.clone(),
            })
            .collect(),
    };
    record_on_receiver(&done[0].cfg, id, mark).await.map_err(|e| {
        GroupFailure::from(e.context(
            "every volume was proven, but the receiver did not confirm recording the group: if it recorded it, every volume of the group is sealed there (its log says so, and a new pass is refused naming the cutover); if not, none is",
        ))
    })?;
    for ((v, r), d) in volumes.iter().zip(ready).zip(done) {
        let record = CutoverRecord {
            volume: v.cfg.dest.to_string(),
            consistency_point: d.frozen.end.root.clone(),
            freeze_unix_s: c.freeze_unix,
            frozen_s: c.frozen_s,
            passes_s: Some(d.frozen.passes_s),
            method: v.method.name().to_string(),
            proved: gc.prove,
            forecast_s: r.forecast.map(|f| f.total_s),
            proof: Some(d.frozen.proof.to_string()),
            proof_s: Some(d.frozen.proof_s),
        };
        sender::journal(&v.cfg).append(&SenderRecord::Cutover(record.clone()))?;
        report_cutover(
            v.progress.as_ref(),
            &record,
            c.started.elapsed().as_secs_f64(),
        );
    }
    let group = GroupCutoverRecord {
        consistency_point: group_point.clone(),
        volumes: names.clone(),
        freeze_unix_s: c.freeze_unix,
        frozen_s: c.frozen_s,
    };
    for v in volumes {
        sender::journal(&v.cfg).append(&SenderRecord::GroupCutover(group.clone()))?;
    }
    c.progress.event(
        &json!({
            "event": "group_cutover_end",
            "volume": null,
            "consistency_point": group_point,
            "volumes": names,
            "frozen_s": (c.frozen_s * 1000.0).round() / 1000.0,
            "duration_s": (c.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        }),
        &format!(
            "group cutover complete: {} volumes proven and sealed, frozen together for {:.2} s. Group consistency point {group_point}",
            volumes.len(),
            c.frozen_s
        ),
    );
    Ok(0)
}

/// The group's consistency point: BLAKE3 over the volumes' consistency
/// points (32 bytes each, decoded from hex) in the volumes' name order,
/// so anyone holding the points can recompute it
/// (`printf %s P1 P2 | xxd -r -p | b3sum`).
pub fn group_point(points: &[&str]) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for p in points {
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(p.as_bytes())
            .map_err(|_| Error::Io(format!("consistency point '{p}' is not hex")))?;
        h.update(&bytes);
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makespan_places_longest_first() {
        // Greedy, as the passes are started: 3|3, 5|3, 5|5, 7|5.
        assert_eq!(makespan(&[2.0, 3.0, 2.0, 3.0, 2.0], 2), 7.0);
        assert_eq!(makespan(&[4.0, 1.0, 3.0], 2), 4.0);
        assert_eq!(makespan(&[5.0, 1.0, 1.0], 4), 5.0);
        assert_eq!(makespan(&[1.0, 1.0, 1.0], 1), 3.0);
        assert_eq!(makespan(&[], 2), 0.0);
    }

    #[test]
    fn the_group_point_is_blake3_over_the_points_in_order() {
        let a = "00".repeat(32);
        let b = "ff".repeat(32);
        let mut bytes = vec![0u8; 32];
        bytes.extend([0xffu8; 32]);
        let want = blake3::hash(&bytes).to_hex().to_string();
        assert_eq!(group_point(&[&a, &b]).unwrap(), want);
        assert_ne!(group_point(&[&b, &a]).unwrap(), want);
        assert!(group_point(&["xyz"]).is_err());
    }
}
