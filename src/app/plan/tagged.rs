//! What one volume of a plan run reports, and the plan's total.
//!
//! [`Tagged`] wraps the command's reporter for one volume: every JSON event
//! carries `"volume"` (the plan's name of the volume), human lines start
//! with that name, and each volume measures its own work (a [`Meter`]: the
//! ETA follows the slower of scanning and sending). On a terminal the
//! volume has its own bar on the reporter's board, under which [`Total`]
//! draws the plan's total; without one, each volume prints its own progress
//! line every interval. Owns no output of its own: lines still go through
//! the wrapped reporter (or the meter's ticker, as a single command's).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::progress::{
    human_bytes, short_duration, Board, Meter, PassEnd, PassStart, Progress, Ticker,
};

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

/// The work a volume is doing now: its meter, the ticker printing its line
/// without a terminal, and its bar on one.
struct Work {
    meter: Arc<Meter>,
    _ticker: Option<Ticker>,
    bar: Option<ProgressBar>,
}

impl Drop for Work {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// One volume's reporter in a plan run.
pub struct Tagged {
    name: String,
    inner: Arc<dyn Progress>,
    board: Option<Board>,
    total: Arc<Total>,
    work: Mutex<Option<Work>>,
}

impl Tagged {
    /// Reports of volume `name` through `inner`, counted in `total`.
    pub fn new(name: &str, inner: Arc<dyn Progress>, total: Arc<Total>) -> Arc<Tagged> {
        Arc::new(Tagged {
            name: name.to_string(),
            board: inner.board(),
            inner,
            total,
            work: Mutex::new(None),
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

    /// Starts measuring new work (`label`, `total` bytes; `sends`: a pass)
    /// on the board, replacing the volume's previous work.
    fn start(&self, board: &Board, label: &str, total: u64, sends: bool) {
        let meter = Arc::new(Meter::new(label, total, sends));
        let ticker = (!board.drawn && !board.every.is_zero())
            .then(|| Ticker::start(meter.clone(), board.every));
        let bar = board.drawn.then(|| {
            let style = ProgressStyle::with_template(
                "{prefix:>16} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> ");
            // New bars go above the total, which stays last.
            let bar = board
                .multi
                .insert_before(&self.total.bar, ProgressBar::new(total).with_style(style));
            bar.set_prefix(self.name.clone());
            bar
        });
        *self.work.lock().expect("not poisoned") = Some(Work {
            meter,
            _ticker: ticker,
            bar,
        });
    }

    /// Ends the work measured now.
    fn stop(&self) {
        let taken = self.work.lock().expect("not poisoned").take();
        drop(taken);
    }

    /// Runs `f` on the work measured now, if any.
    fn with_work(&self, f: impl FnOnce(&Work)) {
        if let Some(w) = &*self.work.lock().expect("not poisoned") {
            f(w);
        }
    }

    fn renamed(&self, s: &PassStart) -> PassStart {
        PassStart {
            volume: self.name.clone(),
            ..s.clone()
        }
    }
}

/// A bar's message: the ETA (the slower of scanning and sending) and the
/// bytes sent.
fn refresh(w: &Work) {
    if let Some(b) = &w.bar {
        let r = w.meter.read();
        let eta = r.eta().map_or("-".into(), short_duration);
        b.set_message(format!("ETA {eta}, sent {}", human_bytes(r.sent)));
    }
}

impl Progress for Tagged {
    fn pass_start(&self, s: &PassStart) {
        let s = self.renamed(s);
        let Some(board) = &self.board else {
            return self.inner.pass_start(&s);
        };
        // The wrapped reporter measures one work at a time for the whole
        // process: this volume measures its own.
        let label = format!("pass {} of {}", s.pass, self.name);
        self.start(board, &label, s.size_bytes, true);
        self.inner.note(&format!(
            "{}: pass {}: {} in chunks of {}",
            self.name,
            s.pass,
            human_bytes(s.size_bytes),
            human_bytes(s.chunk_size)
        ));
    }
    fn scanned(&self, bytes: u64) {
        self.total.bar.inc(bytes);
        if self.board.is_none() {
            return self.inner.scanned(bytes);
        }
        self.with_work(|w| {
            w.meter.scanned(bytes);
            if let Some(b) = &w.bar {
                b.inc(bytes);
            }
            refresh(w);
        });
    }
    fn reads(&self, bytes: u64) {
        if self.board.is_none() {
            return self.inner.reads(bytes);
        }
        self.with_work(|w| {
            w.meter.set_total(bytes);
            if let Some(b) = &w.bar {
                b.set_length(bytes);
            }
        });
    }
    fn queued(&self, bytes: u64) {
        if self.board.is_none() {
            return self.inner.queued(bytes);
        }
        self.with_work(|w| w.meter.queued(bytes));
    }
    fn sent(&self, bytes: u64) {
        self.total.sent.fetch_add(bytes, Ordering::Relaxed);
        self.total.redraw();
        if self.board.is_none() {
            return self.inner.sent(bytes);
        }
        self.with_work(|w| {
            w.meter.sent(bytes);
            refresh(w);
        });
    }
    fn pass_end(&self, e: &PassEnd) {
        self.stop();
        let e = PassEnd {
            start: self.renamed(&e.start),
            ..e.clone()
        };
        self.inner.pass_end(&e);
    }
    fn event(&self, json: &Value, human: &str) {
        let human = if human.is_empty() {
            String::new()
        } else {
            format!("{}: {human}", self.name)
        };
        self.inner.event(&self.tag(json), &human);
    }
    fn note(&self, human: &str) {
        self.inner.note(&format!("{}: {human}", self.name));
    }
    fn begin(&self, label: &str, total: u64) {
        match &self.board {
            Some(board) => self.start(board, &format!("{label} {}", self.name), total, false),
            None => self.inner.begin(label, total),
        }
    }
    fn finish(&self) {
        match &self.board {
            Some(_) => self.stop(),
            None => self.inner.finish(),
        }
    }
    fn answer(&self, line: &str) {
        self.inner.answer(line);
    }
}
