//! What an agent says: every event of a pass or a cutover it runs carries
//! the filer (and the volume, by its plan name), and what it must keep
//! (a `pass_end`, the consistency points) is captured for the database.
//!
//! Owns the agent's view of [`Progress`]: no bars (an agent is a daemon
//! and runs several passes at once), one line per event, notes prefixed
//! with the volume they are about. It decides nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::progress::{human_bytes, PassEnd, PassStart, Progress};

/// Events an agent keeps from the work it reports.
const KEPT: &[&str] = &["pass_end", "cutover_end", "group_cutover_end"];

/// One filer's (and volume's) reporter inside an agent.
pub struct Report {
    filer: String,
    volume: Option<String>,
    inner: Arc<dyn Progress>,
    kept: Mutex<Vec<Value>>,
    /// How far the pass running now is, said every `every` (0: never).
    every: Duration,
    said: Mutex<Instant>,
    pass: AtomicU64,
    size: AtomicU64,
    scanned: AtomicU64,
    sent: AtomicU64,
}

impl Report {
    /// Reports about `filer` (and `volume`, when one) through `inner`.
    pub fn new(filer: &str, volume: Option<&str>, inner: Arc<dyn Progress>) -> Arc<Report> {
        Arc::new(Report {
            filer: filer.to_string(),
            volume: volume.map(str::to_string),
            inner,
            kept: Mutex::new(Vec::new()),
            every: Duration::ZERO,
            said: Mutex::new(Instant::now()),
            pass: AtomicU64::new(0),
            size: AtomicU64::new(0),
            scanned: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        })
    }

    /// Reports about volume `volume` of `filer` that say how far a pass is
    /// every `every` (0: never), as a plan run does without a terminal.
    pub fn with_progress(
        filer: &str,
        volume: &str,
        inner: Arc<dyn Progress>,
        every: Duration,
    ) -> Arc<Report> {
        let mut r = Arc::into_inner(Report::new(filer, Some(volume), inner))
            .expect("a new report has one owner");
        r.every = every;
        Arc::new(r)
    }

    /// Says how far the pass is when `every` has passed since last said.
    fn tick(&self) {
        if self.every.is_zero() {
            return;
        }
        let Ok(mut said) = self.said.lock() else {
            return;
        };
        if said.elapsed() < self.every {
            return;
        }
        *said = Instant::now();
        let (size, scanned) = (
            self.size.load(Ordering::Relaxed),
            self.scanned.load(Ordering::Relaxed),
        );
        let pct = if size == 0 {
            100.0
        } else {
            scanned as f64 * 100.0 / size as f64
        };
        self.inner.note(&format!(
            "{}: pass {}: scanned {} of {} ({pct:.0}%), sent {}",
            self.label(),
            self.pass.load(Ordering::Relaxed),
            human_bytes(scanned),
            human_bytes(size),
            human_bytes(self.sent.load(Ordering::Relaxed)),
        ));
    }

    /// `v` with `"filer"`, and `"volume"` when this reporter has one.
    pub fn tag(&self, v: &Value) -> Value {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.insert("filer".into(), Value::from(self.filer.clone()));
            if let Some(name) = &self.volume {
                o.insert("volume".into(), Value::from(name.clone()));
            }
        }
        v
    }

    /// `filer/volume` (or `filer`) for human lines.
    pub fn label(&self) -> String {
        match &self.volume {
            Some(v) => format!("{}/{v}", self.filer),
            None => self.filer.clone(),
        }
    }

    /// The last kept event named `name`.
    pub fn kept(&self, name: &str) -> Option<Value> {
        let kept = self.kept.lock().ok()?;
        kept.iter().rev().find(|v| v["event"] == name).cloned()
    }

    fn keep(&self, v: &Value) {
        if KEPT.iter().any(|k| v["event"] == *k) {
            if let Ok(mut kept) = self.kept.lock() {
                kept.push(v.clone());
            }
        }
    }
}

impl Progress for Report {
    fn pass_start(&self, s: &PassStart) {
        self.pass.store(s.pass, Ordering::Relaxed);
        self.size.store(s.size_bytes, Ordering::Relaxed);
        self.scanned.store(0, Ordering::Relaxed);
        self.sent.store(0, Ordering::Relaxed);
        if let Ok(mut said) = self.said.lock() {
            *said = Instant::now();
        }
        let v = json!({
            "event": "pass_start",
            "pass": s.pass,
            "size_bytes": s.size_bytes,
            "chunk_size": s.chunk_size,
            "dest": s.volume,
        });
        let human = format!(
            "{}: pass {} started ({})",
            self.label(),
            s.pass,
            human_bytes(s.size_bytes)
        );
        self.inner.event(&self.tag(&v), &human);
    }
    fn scanned(&self, bytes: u64) {
        self.scanned.fetch_add(bytes, Ordering::Relaxed);
        self.tick();
    }
    fn sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
        self.tick();
    }
    fn reads(&self, bytes: u64) {
        self.size.store(bytes, Ordering::Relaxed);
    }
    fn pass_end(&self, e: &PassEnd) {
        let mut v = e.to_json();
        if let Some(o) = v.as_object_mut() {
            o.insert("dest".into(), Value::from(e.start.volume.clone()));
        }
        let v = self.tag(&v);
        self.keep(&v);
        let human = format!(
            "{}: pass {} ended in {:.1} s: {} chunks changed, {} sent, {} read{}",
            self.label(),
            e.start.pass,
            e.duration_s,
            e.changed_chunks,
            human_bytes(e.sent_bytes),
            human_bytes(e.scanned_bytes),
            e.forecast_final_pass_s
                .map(|f| format!(", final pass forecast {f:.1} s"))
                .unwrap_or_default()
        );
        self.inner.event(&v, &human);
    }
    fn event(&self, json: &Value, human: &str) {
        let v = self.tag(json);
        self.keep(&v);
        let human = if human.is_empty() {
            String::new()
        } else {
            format!("{}: {human}", self.label())
        };
        self.inner.event(&v, &human);
    }
    fn note(&self, human: &str) {
        self.inner.note(&format!("{}: {human}", self.label()));
    }
}

/// An agent's human output when not `--json`: every line through the log
/// (stderr, each with its time, or the journal's priority under
/// systemd), none drawn as a bar.
pub struct LogLines;

impl Progress for LogLines {
    fn pass_start(&self, s: &PassStart) {
        tracing::info!("{}: pass {} started", s.volume, s.pass);
    }
    fn scanned(&self, _: u64) {}
    fn sent(&self, _: u64) {}
    fn pass_end(&self, e: &PassEnd) {
        tracing::info!("{}: pass {} ended", e.start.volume, e.start.pass);
    }
    fn event(&self, json: &Value, human: &str) {
        if human.is_empty() {
            return;
        }
        match severity(json) {
            tracing::Level::ERROR => tracing::error!("{human}"),
            tracing::Level::WARN => tracing::warn!("{human}"),
            _ => tracing::info!("{human}"),
        }
    }
    fn note(&self, human: &str) {
        tracing::info!("{human}");
    }
}

/// How grave an agent's event is for its log (the journal's priority
/// under systemd): a failure, a lost lease or night, the fleet paused, the
/// database away are warnings; an `error` event is an error.
pub fn severity(v: &Value) -> tracing::Level {
    let warn = match v["event"].as_str().unwrap_or("") {
        "error" => return tracing::Level::ERROR,
        "fleet_pass_recorded" => v["ok"] == false || v["removed"] == true,
        "fleet_paused" => true,
        "fleet_agent_waiting" => matches!(v["reason"].as_str(), Some("database" | "no_filer")),
        "fleet_night" => v["failed"] == true || v["lost"] == true,
        _ => false,
    };
    if warn {
        tracing::Level::WARN
    } else {
        tracing::Level::INFO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_warnings_in_the_log() {
        let level = |v: Value| severity(&v);
        assert_eq!(
            level(json!({"event": "fleet_pass_recorded", "ok": false})),
            tracing::Level::WARN
        );
        assert_eq!(
            level(json!({"event": "fleet_pass_recorded", "ok": true})),
            tracing::Level::INFO
        );
        assert_eq!(
            level(json!({"event": "fleet_night", "failed": true})),
            tracing::Level::WARN
        );
        assert_eq!(
            level(json!({"event": "fleet_night", "ready": false})),
            tracing::Level::INFO
        );
        assert_eq!(
            level(json!({"event": "fleet_agent_waiting", "reason": "database"})),
            tracing::Level::WARN
        );
        assert_eq!(
            level(json!({"event": "fleet_agent_waiting", "reason": "idle"})),
            tracing::Level::INFO
        );
        assert_eq!(level(json!({"event": "error"})), tracing::Level::ERROR);
    }
}
