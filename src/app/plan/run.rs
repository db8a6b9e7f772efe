//! Runs one command over the volumes of a plan: at most `jobs` in flight,
//! no new one after `max_failures` failed, and the red button.
//!
//! The red button: a first SIGINT or SIGTERM stops starting volumes and
//! lets those in flight end (each sees [`Stop::requested`], so a converge
//! ends after its pass in flight); a second drops them, which runs their
//! guards as the interrupt of a single command does, and the run ends with
//! exit 130. A failed volume never stops the others in flight. Owns the
//! scheduling and the `volume_end` and `plan_end` events; what runs for one
//! volume is the caller's.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use super::tagged::{Tagged, Total};
use super::{Plan, PlanVolume};
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The red button as a volume's work sees it: pressed once, finish what is
/// in flight and start nothing more.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// True once the operator asked the run to stop.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn press(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How each volume ended, counted.
#[derive(Debug, Default)]
struct Tally {
    succeeded: usize,
    negative: usize,
    failed: usize,
    interrupted: usize,
}

/// Why no more volumes were started, if they were not all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    Signal,
    MaxFailures,
}

/// Runs `work` for every volume of `plan`, at most `plan.jobs` at once, and
/// returns the plan's exit status: 0 all succeeded, 1 a negative answer for
/// any and no failure, 3 any failed, 130 stopped by a signal (after its
/// `plan_end`, which says so).
///
/// `work` gets the volume, its reporter (events tagged with the volume's
/// name) and the red button, and returns the volume's status as a single
/// command would (0, 1, or an error).
pub async fn run<F, Fut>(
    plan: &Plan,
    command: &'static str,
    progress: Arc<dyn Progress>,
    work: F,
) -> Result<i32>
where
    F: Fn(PlanVolume, Arc<dyn Progress>, Stop) -> Fut,
    Fut: Future<Output = Result<i32>> + Send + 'static,
{
    let started = Instant::now();
    let board = progress.board().filter(|b| b.drawn);
    let bytes = plan.volumes.iter().map(|v| v.size).sum();
    let total = Total::new(board.as_ref().map(|b| &b.multi), plan.volumes.len(), bytes);
    let stop = Stop::default();
    let mut interrupts = Interrupts::new()?;
    let mut set: JoinSet<(usize, Result<i32>)> = JoinSet::new();
    let (mut next, mut tally, mut halt) = (0usize, Tally::default(), None);
    loop {
        while halt.is_none() && set.len() < plan.jobs && next < plan.volumes.len() {
            let v = plan.volumes[next].clone();
            let tagged: Arc<dyn Progress> = Tagged::new(&v.name, progress.clone(), total.clone());
            let fut = work(v, tagged, stop.clone());
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        if set.is_empty() {
            break;
        }
        tokio::select! {
            Some(joined) = set.join_next() => {
                let (i, r) = joined.unwrap_or_else(|e| {
                    (usize::MAX, Err(Error::Io(format!("a volume's task ended abnormally: {e}"))))
                });
                let name = plan.volumes.get(i).map_or("?", |v| v.name.as_str());
                volume_end(progress.as_ref(), &total, name, command, r, &mut tally);
                let limit = plan.max_failures.is_some_and(|m| tally.failed >= m);
                if halt.is_none() && limit && next < plan.volumes.len() {
                    halt = Some(Halt::MaxFailures);
                    stopping(progress.as_ref(), Halt::MaxFailures, &tally);
                }
            }
            _ = interrupts.next() => {
                if stop.requested() {
                    tally.interrupted = set.len();
                    // Dropping the volumes' work runs its guards, as the
                    // interrupt of a single command does.
                    set.shutdown().await;
                    break;
                }
                stop.press();
                halt = Some(Halt::Signal);
                stopping(progress.as_ref(), Halt::Signal, &tally);
            }
        }
    }
    total.finish();
    let not_started = plan.volumes.len() - next;
    plan_end(
        progress.as_ref(),
        plan,
        command,
        &tally,
        not_started,
        halt,
        started,
    );
    Ok(if halt == Some(Halt::Signal) {
        Error::Interrupted.exit_code()
    } else if tally.failed > 0 || tally.interrupted > 0 {
        3
    } else if tally.negative > 0 {
        1
    } else {
        0
    })
}

/// No new volume starts: the `plan_stopping` event and why.
fn stopping(progress: &dyn Progress, why: Halt, tally: &Tally) {
    let (reason, human) = match why {
        Halt::Signal => ("signal", "stopping: no new volume starts; the passes in flight end durably (interrupt again to stop them now)".to_string()),
        Halt::MaxFailures => ("max_failures", format!("{} volume(s) failed (max_failures): no new volume starts; those in flight go on", tally.failed)),
    };
    progress.event(
        &json!({"event": "plan_stopping", "volume": null, "reason": reason}),
        &human,
    );
}

/// One volume ended: its `volume_end` event (and the error, when it failed).
fn volume_end(
    progress: &dyn Progress,
    total: &Total,
    name: &str,
    command: &str,
    r: Result<i32>,
    tally: &mut Tally,
) {
    let (result, code, message) = match &r {
        Ok(0) => ("succeeded", 0, None),
        Ok(c) => ("negative", *c, None),
        Err(e) => ("failed", e.exit_code(), Some(e.to_string())),
    };
    match result {
        "succeeded" => tally.succeeded += 1,
        "negative" => tally.negative += 1,
        _ => tally.failed += 1,
    }
    total.volume_done(r.is_err());
    if let Some(m) = &message {
        // On stderr in every mode, as a single command's error; the event
        // for --json (its human line is the volume_end below).
        tracing::error!("nightpass: error: {name}: {m}");
        progress.event(
            &json!({"event": "error", "volume": name, "message": m, "exit_code": code}),
            "",
        );
    }
    let human = match result {
        "succeeded" => format!("{name}: {command} succeeded"),
        "negative" => format!("{name}: {command} ended with a negative answer (exit {code})"),
        _ => format!("{name}: {command} failed (exit {code})"),
    };
    progress.event(
        &json!({"event": "volume_end", "volume": name, "command": command, "result": result, "exit_code": code}),
        &human,
    );
}

/// The summary of a group cutover, which certifies every volume or none:
/// `plan_end` with all succeeded, or all failed.
pub fn group_end(progress: &dyn Progress, plan: &Plan, failed: Option<&Error>, started: Instant) {
    let n = plan.volumes.len();
    let tally = match failed {
        None => Tally {
            succeeded: n,
            ..Tally::default()
        },
        Some(Error::Interrupted) => Tally {
            interrupted: n,
            ..Tally::default()
        },
        Some(_) => Tally {
            failed: n,
            ..Tally::default()
        },
    };
    plan_end(progress, plan, "cutover", &tally, 0, None, started);
}

/// The run's summary: the `plan_end` event and its human line.
fn plan_end(
    progress: &dyn Progress,
    plan: &Plan,
    command: &str,
    t: &Tally,
    not_started: usize,
    halt: Option<Halt>,
    started: Instant,
) {
    let duration_s = started.elapsed().as_secs_f64();
    let stopped_by = halt.map(|h| match h {
        Halt::Signal => "signal",
        Halt::MaxFailures => "max_failures",
    });
    let mut human = format!(
        "plan {}: {command} of {} volume(s) in {duration_s:.1} s: {} succeeded",
        plan.path.display(),
        plan.volumes.len(),
        t.succeeded
    );
    for (n, what) in [
        (t.negative, "with a negative answer"),
        (t.failed, "failed"),
        (t.interrupted, "interrupted"),
        (not_started, "not started"),
    ] {
        if n > 0 {
            human.push_str(&format!(", {n} {what}"));
        }
    }
    match stopped_by {
        Some("signal") => human.push_str(" (stopped by a signal)"),
        Some(_) => human.push_str(&format!(
            " (stopped after {} failure(s): max_failures)",
            t.failed
        )),
        None => {}
    }
    progress.event(
        &json!({
            "event": "plan_end",
            // About the whole plan, not one of its volumes.
            "volume": null,
            "plan": plan.path.display().to_string(),
            "command": command,
            "volumes": plan.volumes.len(),
            "succeeded": t.succeeded,
            "negative": t.negative,
            "failed": t.failed,
            "interrupted": t.interrupted,
            "not_started": not_started,
            "stopped_by": stopped_by,
            "duration_s": (duration_s * 1000.0).round() / 1000.0,
        }),
        &human,
    );
}

/// SIGINT and SIGTERM as one stream of interrupts.
struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> Result<Interrupts> {
        let listen =
            |k| signal(k).map_err(|e| Error::Io(format!("cannot listen for signals: {e}")));
        Ok(Interrupts {
            int: listen(SignalKind::interrupt())?,
            term: listen(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}
