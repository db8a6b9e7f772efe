//! What an agent says: every event of a pass or a cutover it runs carries
//! the filer (and the volume, by its plan name), and what it must keep
//! (a `pass_end`, the consistency points) is captured for the database.
//!
//! Owns the agent's view of [`Progress`]: no bars (an agent is a daemon
//! and runs several passes at once), one line per event, notes prefixed
//! with the volume they are about. It decides nothing.

use std::sync::{Arc, Mutex};

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
}

impl Report {
    /// Reports about `filer` (and `volume`, when one) through `inner`.
    pub fn new(filer: &str, volume: Option<&str>, inner: Arc<dyn Progress>) -> Arc<Report> {
        Arc::new(Report {
            filer: filer.to_string(),
            volume: volume.map(str::to_string),
            inner,
            kept: Mutex::new(Vec::new()),
        })
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
    fn scanned(&self, _: u64) {}
    fn sent(&self, _: u64) {}
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
    fn event(&self, _: &Value, human: &str) {
        if !human.is_empty() {
            tracing::info!("{human}");
        }
    }
    fn note(&self, human: &str) {
        tracing::info!("{human}");
    }
}
