//! Progress and events: a trait the library reports through, and its
//! implementations. The library never prints; the binary picks a reporter:
//! [`Human`] (indicatif bars on a terminal and a summary), [`JsonLines`] (one
//! JSON object per line on stdout, nothing else), or [`Quiet`].
//!
//! This module owns what the operator reads on stdout (and the bars on
//! stderr). Diagnostics and the receiver's log go through `tracing`, which
//! the binary writes to stderr; nothing here logs.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

mod meter;
pub use meter::{short_duration, Meter, Reading, Ticker};

/// How often a pass prints its progress line without a terminal, unless
/// told otherwise (`--progress-interval`).
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(30);

/// What a pass reports at its start.
#[derive(Debug, Clone)]
pub struct PassStart {
    /// Destination as the operator named it.
    pub volume: String,
    /// Pass number for this volume (1 = first).
    pub pass: u64,
    /// Source size.
    pub size_bytes: u64,
    /// Chunk size in force.
    pub chunk_size: u64,
}

/// What a pass reports at its end.
#[derive(Debug, Clone)]
pub struct PassEnd {
    /// As at the start.
    pub start: PassStart,
    /// Bytes read and hashed.
    pub scanned_bytes: u64,
    /// Chunks sent.
    pub changed_chunks: u64,
    /// Uncompressed bytes of the chunks sent.
    pub changed_bytes: u64,
    /// Chunk payload bytes put on the wire.
    pub sent_bytes: u64,
    /// Chunks sent as zero markers.
    pub zero_chunks: u64,
    /// Wall time.
    pub duration_s: f64,
    /// Forecast of a frozen final pass, when the journal allows one.
    pub forecast_final_pass_s: Option<f64>,
    /// Root hash of the target's manifest after the pass (hex).
    pub root: String,
    /// How the pass chose what to read.
    pub scan: ScanKind,
}

/// How a pass chose what to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanKind {
    /// Only the blocks a change record named (and chunks the target lacks).
    Tracked,
    /// The whole volume, and why.
    Full(String),
}

impl ScanKind {
    /// `"tracked"` or `"full"`, as events and the journal say it.
    pub fn name(&self) -> &'static str {
        match self {
            ScanKind::Tracked => "tracked",
            ScanKind::Full(_) => "full",
        }
    }

    /// Why the whole volume was read, for a full scan.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ScanKind::Tracked => None,
            ScanKind::Full(why) => Some(why),
        }
    }
}

impl PassEnd {
    /// The `pass_end` JSON event.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "event": "pass_end",
            "volume": self.start.volume,
            "pass": self.start.pass,
            "size_bytes": self.start.size_bytes,
            "chunk_size": self.start.chunk_size,
            "scanned_bytes": self.scanned_bytes,
            "scan": self.scan.name(),
            "read_bytes": self.scanned_bytes,
            "scan_reason": self.scan.reason(),
            "changed_chunks": self.changed_chunks,
            "changed_bytes": self.changed_bytes,
            "zero_chunks": self.zero_chunks,
            "sent_bytes": self.sent_bytes,
            "duration_s": (self.duration_s * 1000.0).round() / 1000.0,
            "forecast_final_pass_s": self.forecast_final_pass_s.map(|f| (f * 100.0).round() / 100.0),
            "root": self.root,
        });
        if self.scan.reason().is_none() {
            if let Some(o) = v.as_object_mut() {
                o.remove("scan_reason");
            }
        }
        v
    }
}

/// Receives what long-running work has to say.
pub trait Progress: Send + Sync {
    /// A pass begins.
    fn pass_start(&self, s: &PassStart);
    /// More bytes were read and hashed.
    fn scanned(&self, bytes: u64);
    /// More payload bytes went on the wire.
    fn sent(&self, bytes: u64);
    /// The pass just started reads only `bytes` of the volume (a tracked
    /// pass): what its scan progress counts up to.
    fn reads(&self, _bytes: u64) {}
    /// Chunks of `bytes` payload bytes were found to send and queued for
    /// the streams (they go on the wire later, reported by [`Progress::sent`]).
    fn queued(&self, _bytes: u64) {}
    /// A pass ended.
    fn pass_end(&self, e: &PassEnd);
    /// Any other event (verify_end, cutover_end, converge decisions…): a JSON
    /// object with an `"event"` field, and the human sentence for it.
    fn event(&self, json: &Value, human: &str);
    /// A note for humans only (JSON mode drops it).
    fn note(&self, human: &str);
    /// Long work other than a pass begins (verify): a bar of `total` bytes.
    fn begin(&self, _label: &str, _total: u64) {}
    /// That work ended.
    fn finish(&self) {}
    /// A command's answer (keygen's fingerprint): one line on stdout in
    /// every mode, `--quiet` and `--json` included.
    fn answer(&self, line: &str) {
        answer_line(line);
    }
    /// The bars' board, for reporters of many volumes at once that draw a
    /// bar (or print a progress line) per volume (a plan run); `None` when
    /// this reporter shows no progress.
    fn board(&self) -> Option<Board> {
        None
    }
}

/// Where a reporter of many volumes at once shows each volume's progress
/// ([`Progress::board`]).
#[derive(Debug, Clone)]
pub struct Board {
    /// The bars, drawn on a terminal (hidden otherwise).
    pub multi: MultiProgress,
    /// Bars are drawn: stderr is a terminal.
    pub drawn: bool,
    /// Without bars, every how long a progress line is printed (zero:
    /// never).
    pub every: Duration,
}

/// Writes `line` on stdout: a command's answer, whatever the reporter.
fn answer_line(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// Says nothing.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn pass_start(&self, _: &PassStart) {}
    fn scanned(&self, _: u64) {}
    fn sent(&self, _: u64) {}
    fn pass_end(&self, _: &PassEnd) {}
    fn event(&self, _: &Value, _: &str) {}
    fn note(&self, _: &str) {}
    fn answer(&self, _: &str) {}
}

/// One JSON object per line on stdout.
#[derive(Debug, Default)]
pub struct JsonLines {
    out: Mutex<()>,
}

impl JsonLines {
    fn emit(&self, v: &Value) {
        let v = &with_ts(v.clone());
        let _g = self.out.lock();
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{v}");
        let _ = o.flush();
    }
}

impl Progress for JsonLines {
    fn pass_start(&self, s: &PassStart) {
        self.emit(&json!({
            "event": "pass_start",
            "volume": s.volume,
            "pass": s.pass,
            "size_bytes": s.size_bytes,
            "chunk_size": s.chunk_size,
        }));
    }
    fn scanned(&self, _: u64) {}
    fn sent(&self, _: u64) {}
    fn pass_end(&self, e: &PassEnd) {
        self.emit(&e.to_json());
    }
    fn event(&self, json: &Value, _: &str) {
        self.emit(json);
    }
    fn note(&self, _: &str) {}
}

/// `v` with a `"ts"` field (now, RFC 3339 UTC) when it is an object
/// without one: every JSON event carries the time it was emitted.
pub fn with_ts(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.entry("ts")
            .or_insert_with(|| Value::from(rfc3339(now_unix())));
    }
    v
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Latest time a record may carry and formatting shows: 9999-12-31T23:59:59Z.
pub const LATEST_UNIX_S: f64 = 253_402_300_799.0;

/// A Unix time as calendar fields in UTC: year, month, day, hour, minute,
/// second, millisecond. Times before the epoch (or not finite) read as the
/// epoch, times past the year 9999 as its last second.
fn civil(unix_s: f64) -> [i64; 7] {
    let t = if unix_s.is_finite() {
        unix_s.clamp(0.0, LATEST_UNIX_S)
    } else {
        0.0
    };
    let ms = (t * 1000.0).floor() as i64;
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (proleptic Gregorian), after
    // Howard Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    [
        year,
        month,
        day,
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000,
    ]
}

/// A Unix time as RFC 3339 in UTC to the millisecond, as JSON events carry
/// it: `2026-11-29T20:11:11.250Z`.
pub fn rfc3339(unix_s: f64) -> String {
    let [y, mo, d, h, mi, s, ms] = civil(unix_s);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

/// A Unix time as RFC 3339 in UTC to the second, for messages:
/// `2026-11-29T20:11:11Z`.
pub fn rfc3339_seconds(unix_s: f64) -> String {
    let [y, mo, d, h, mi, s, _] = civil(unix_s);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Progress bars on a terminal (stderr), summaries on stdout; without a
/// terminal, a progress line on stderr every interval instead of the bars.
pub struct Human {
    multi: MultiProgress,
    bars: Mutex<Option<(ProgressBar, ProgressBar)>>,
    quiet: bool,
    /// Bars are drawn (stderr is a terminal, not `quiet`).
    drawn: bool,
    /// Every how long to print the progress line without a terminal;
    /// zero: never.
    every: Duration,
    /// The work in progress, and its ticker when lines are printed.
    meter: Mutex<Option<(Arc<Meter>, Option<Ticker>)>>,
}

impl std::fmt::Debug for Human {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Human")
    }
}

impl Human {
    /// Bars only when stderr is a terminal and not `quiet`; without a
    /// terminal (and not `quiet`), a progress line every
    /// [`DEFAULT_PROGRESS_INTERVAL`].
    pub fn new(quiet: bool) -> Self {
        let drawn = !quiet && std::io::stderr().is_terminal();
        let target = if drawn {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Human {
            multi: MultiProgress::with_draw_target(target),
            bars: Mutex::new(None),
            quiet,
            drawn,
            every: DEFAULT_PROGRESS_INTERVAL,
            meter: Mutex::new(None),
        }
    }

    /// Prints the progress line without a terminal every `every` instead
    /// (zero: never).
    pub fn progress_every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Starts measuring new work; its line is printed every interval when
    /// there are no bars.
    fn measure(&self, meter: Meter) -> Arc<Meter> {
        let meter = Arc::new(meter);
        let ticker = (!self.quiet && !self.drawn && !self.every.is_zero())
            .then(|| Ticker::start(meter.clone(), self.every));
        *self.meter.lock().expect("not poisoned") = Some((meter.clone(), ticker));
        meter
    }

    /// The work measured now.
    fn meter(&self) -> Option<Arc<Meter>> {
        self.meter
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|(m, _)| m.clone())
    }

    /// Sets the drawn bars' ETA (the meter's) and the sent bar's total.
    fn refresh(&self, meter: Option<&Meter>, scan: &ProgressBar, sent: &ProgressBar) {
        let Some(m) = meter.filter(|_| self.drawn) else {
            return;
        };
        let r = m.read();
        scan.set_message(r.eta().map_or("-".into(), short_duration));
        sent.set_length(r.expected_sent());
    }

    /// Stops measuring (and printing lines).
    fn unmeasure(&self) {
        let taken = self.meter.lock().expect("not poisoned").take();
        drop(taken);
    }

    fn say(&self, text: &str) {
        if self.quiet {
            return;
        }
        let _ = self.multi.suspend(|| {
            let mut o = std::io::stdout().lock();
            writeln!(o, "{text}")
        });
    }
}

/// Formats bytes for humans (binary units).
pub fn human_bytes(b: u64) -> String {
    indicatif::BinaryBytes(b).to_string()
}

impl Progress for Human {
    fn pass_start(&self, s: &PassStart) {
        self.measure(Meter::new(
            &format!("pass {} of {}", s.pass, s.volume),
            s.size_bytes,
            true,
        ));
        // The ETA is the meter's (the slower of scanning and sending), not
        // the scan bar's own.
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let scan = self
            .multi
            .add(ProgressBar::new(s.size_bytes).with_style(style));
        scan.set_prefix("scanned");
        scan.set_message("-");
        // Sent out of what the pass is expected to send (the scan total
        // until the scan tells more).
        let sent_style = ProgressStyle::with_template(
            "{prefix:>8} {bytes}/~{total_bytes} {binary_bytes_per_sec}",
        )
        .expect("valid template");
        let sent = self
            .multi
            .add(ProgressBar::new(s.size_bytes).with_style(sent_style));
        sent.set_prefix("sent");
        *self.bars.lock().expect("not poisoned") = Some((scan, sent));
        self.say(&format!(
            "pass {} of {}: {} in chunks of {}",
            s.pass,
            s.volume,
            human_bytes(s.size_bytes),
            human_bytes(s.chunk_size)
        ));
    }
    fn scanned(&self, bytes: u64) {
        let meter = self.meter();
        if let Some(m) = &meter {
            m.scanned(bytes);
        }
        if let Some((scan, sent)) = &*self.bars.lock().expect("not poisoned") {
            scan.inc(bytes);
            self.refresh(meter.as_deref(), scan, sent);
        }
    }
    fn queued(&self, bytes: u64) {
        if let Some(m) = self.meter() {
            m.queued(bytes);
        }
    }
    fn reads(&self, bytes: u64) {
        if let Some(m) = self.meter() {
            m.set_total(bytes);
        }
        if let Some((scan, _)) = &*self.bars.lock().expect("not poisoned") {
            scan.set_length(bytes);
        }
    }
    fn sent(&self, bytes: u64) {
        if let Some(m) = self.meter() {
            m.sent(bytes);
        }
        if let Some((scan, sent)) = &*self.bars.lock().expect("not poisoned") {
            sent.inc(bytes);
            self.refresh(self.meter().as_deref(), scan, sent);
        }
    }
    fn pass_end(&self, e: &PassEnd) {
        self.unmeasure();
        if let Some((a, b)) = self.bars.lock().expect("not poisoned").take() {
            a.finish_and_clear();
            b.finish_and_clear();
        }
        let rate = e.scanned_bytes as f64 / e.duration_s.max(1e-6);
        let forecast = match e.forecast_final_pass_s {
            Some(f) => format!(" A frozen final pass now would take about {f:.1} s."),
            None => " No forecast yet: it needs a second pass to measure the change rate.".into(),
        };
        self.say(&format!(
            "pass {} of {} done in {:.2} s: scanned {} at {}/s, {} chunks changed ({}, {} of them zero), {} sent.{}",
            e.start.pass,
            e.start.volume,
            e.duration_s,
            human_bytes(e.scanned_bytes),
            human_bytes(rate as u64),
            e.changed_chunks,
            human_bytes(e.changed_bytes),
            e.zero_chunks,
            human_bytes(e.sent_bytes),
            forecast
        ));
    }
    fn event(&self, _: &Value, human: &str) {
        // An event with no sentence (its words went to stderr) prints none.
        if !human.is_empty() {
            self.say(human);
        }
    }
    fn begin(&self, label: &str, total: u64) {
        self.measure(Meter::new(label, total, false));
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let bar = self.multi.add(ProgressBar::new(total).with_style(style));
        bar.set_prefix(label.to_string());
        *self.bars.lock().expect("not poisoned") = Some((bar, ProgressBar::hidden()));
    }
    fn finish(&self) {
        self.unmeasure();
        if let Some((a, b)) = self.bars.lock().expect("not poisoned").take() {
            a.finish_and_clear();
            b.finish_and_clear();
        }
    }
    fn note(&self, human: &str) {
        self.say(human);
    }
    fn board(&self) -> Option<Board> {
        (!self.quiet).then(|| Board {
            multi: self.multi.clone(),
            drawn: self.drawn,
            every: self.every,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        // `date -u -d 2026-11-29T20:11:11Z +%s` = 1795983071
        assert_eq!(rfc3339(1_795_983_071.25), "2026-11-29T20:11:11.250Z");
        // Leap day: `date -u -d 2024-02-29T12:00:00Z +%s` = 1709208000
        assert_eq!(rfc3339(1_709_208_000.0), "2024-02-29T12:00:00.000Z");
        assert_eq!(rfc3339_seconds(951_782_400.5), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_seconds(LATEST_UNIX_S + 1e6), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339_seconds(f64::NAN), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_seconds(-5.0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn every_event_gets_a_timestamp() {
        let v = with_ts(json!({"event": "x"}));
        assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
        let kept = with_ts(json!({"event": "x", "ts": "given"}));
        assert_eq!(kept["ts"], "given");
    }
}
