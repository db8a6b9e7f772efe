//! What one volume of a plan run reports, and the plan's total.
//!
//! [`Tagged`] wraps the command's reporter for one volume: every JSON event
//! carries `"volume"` (the plan's name of the volume), human lines start
//! with that name, and on a terminal the volume has its own bar on the
//! reporter's board, under which [`Total`] draws the plan's total. Owns no
//! output of its own: lines still go through the wrapped reporter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::progress::{human_bytes, PassEnd, PassStart, Progress};

/// The plan's total bar: bytes read by every volume against the sum of
/// their sizes, bytes sent, and the volumes done.
pub struct Total {
    bar: ProgressBar,
    sent: AtomicU64,
    volumes: usize,
    done: AtomicU64,
    failed: AtomicU64,
}

impl Total {
    /// A total of `volumes` volumes of `bytes` bytes together, drawn on
    /// `board` (none: counted, not drawn).
    pub fn new(board: Option<&MultiProgress>, volumes: usize, bytes: u64) -> Arc<Total> {
        let bar = match board {
            Some(b) => {
                let style = ProgressStyle::with_template(
                    "{prefix:>16} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> ");
                let bar = b.add(ProgressBar::new(bytes).with_style(style));
                bar.set_prefix("total");
                bar
            }
            None => ProgressBar::hidden(),
        };
        let t = Arc::new(Total {
            bar,
            sent: AtomicU64::new(0),
            volumes,
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        t.redraw();
        t
    }

    fn redraw(&self) {
        let failed = self.failed.load(Ordering::Relaxed);
        let failed = if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        };
        self.bar.set_message(format!(
            "{}/{} volumes done{failed}, {} sent",
            self.done.load(Ordering::Relaxed),
            self.volumes,
            human_bytes(self.sent.load(Ordering::Relaxed))
        ));
    }

    /// A volume ended, failed or not.
    pub fn volume_done(&self, failed: bool) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.redraw();
    }

    /// The run ended: the bar goes.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// One volume's reporter in a plan run.
pub struct Tagged {
    name: String,
    inner: Arc<dyn Progress>,
    board: Option<MultiProgress>,
    total: Arc<Total>,
    bar: Mutex<Option<ProgressBar>>,
    /// Bytes this volume sent in its current pass.
    sent: AtomicU64,
}

impl Tagged {
    /// Reports of volume `name` through `inner`, counted in `total`.
    pub fn new(name: &str, inner: Arc<dyn Progress>, total: Arc<Total>) -> Arc<Tagged> {
        Arc::new(Tagged {
            name: name.to_string(),
            board: inner.board(),
            inner,
            total,
            bar: Mutex::new(None),
            sent: AtomicU64::new(0),
        })
    }

    /// `v` with `"volume"` set to this volume's plan name.
    fn tag(&self, v: &Value) -> Value {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.insert("volume".into(), Value::from(self.name.clone()));
        }
        v
    }

    /// A bar of `total` bytes labelled `what` on the board, replacing this
    /// volume's previous one.
    fn new_bar(&self, what: &str, total: u64) {
        let Some(board) = &self.board else { return };
        let style = ProgressStyle::with_template(
            "{prefix:>16} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        // New bars go above the total, which stays last.
        let bar = board.insert_before(&self.total.bar, ProgressBar::new(total).with_style(style));
        bar.set_prefix(self.name.clone());
        bar.set_message(what.to_string());
        if let Some(old) = self.bar.lock().expect("not poisoned").replace(bar) {
            old.finish_and_clear();
        }
    }

    fn drop_bar(&self) {
        if let Some(b) = self.bar.lock().expect("not poisoned").take() {
            b.finish_and_clear();
        }
    }

    fn renamed(&self, s: &PassStart) -> PassStart {
        PassStart {
            volume: self.name.clone(),
            ..s.clone()
        }
    }
}

impl Drop for Tagged {
    fn drop(&mut self) {
        self.drop_bar();
    }
}

impl Progress for Tagged {
    fn pass_start(&self, s: &PassStart) {
        let s = self.renamed(s);
        if self.board.is_some() {
            // The wrapped reporter would draw one pair of bars for the
            // whole process: this volume draws its own.
            self.sent.store(0, Ordering::Relaxed);
            self.new_bar(&format!("pass {}", s.pass), s.size_bytes);
            self.inner.note(&format!(
                "{}: pass {}: {} in chunks of {}",
                self.name,
                s.pass,
                human_bytes(s.size_bytes),
                human_bytes(s.chunk_size)
            ));
        } else {
            self.inner.pass_start(&s);
        }
    }
    fn scanned(&self, bytes: u64) {
        if let Some(b) = &*self.bar.lock().expect("not poisoned") {
            b.inc(bytes);
        }
        self.total.bar.inc(bytes);
    }
    fn sent(&self, bytes: u64) {
        self.total.sent.fetch_add(bytes, Ordering::Relaxed);
        let sent = self.sent.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(b) = &*self.bar.lock().expect("not poisoned") {
            b.set_message(format!("sent {}", human_bytes(sent)));
        }
        self.total.redraw();
        self.inner.sent(bytes);
    }
    fn pass_end(&self, e: &PassEnd) {
        self.drop_bar();
        let e = PassEnd {
            start: self.renamed(&e.start),
            ..e.clone()
        };
        self.inner.pass_end(&e);
    }
    fn event(&self, json: &Value, human: &str) {
        self.inner
            .event(&self.tag(json), &format!("{}: {human}", self.name));
    }
    fn note(&self, human: &str) {
        self.inner.note(&format!("{}: {human}", self.name));
    }
    fn begin(&self, label: &str, total: u64) {
        if self.board.is_some() {
            self.new_bar(label, total);
        } else {
            self.inner.begin(label, total);
        }
    }
    fn finish(&self) {
        if self.board.is_some() {
            self.drop_bar();
        } else {
            self.inner.finish();
        }
    }
    fn answer(&self, line: &str) {
        self.inner.answer(line);
    }
}
