//! What operators watch for weeks: the Prometheus metrics (`--metrics ADDR`
//! on `serve` and on the sender's commands), their names, and the small
//! functions and handles the rest of the crate records them through.
//!
//! Owns every metric name and label (all prefixed `nightpass_`, documented
//! in docs/CLI.md, "Metrics") and the HTTP exporter. Decides nothing and
//! touches no volume: the pass, the receiver's writer and admission, the
//! cutover and converge call in here at the places where their own counters
//! and events already are. Without `--metrics` no recorder is installed and
//! every call here does nothing (the `metrics` crate's no-op recorder).

use std::net::SocketAddr;

use ::metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge, Unit};

use crate::error::{Error, Result};

/// Bytes of the source read and hashed by passes (sender).
pub const SCANNED_BYTES: &str = "nightpass_scanned_bytes_total";
/// Chunk payload bytes put on the wire (sender).
pub const SENT_BYTES: &str = "nightpass_sent_bytes_total";
/// Chunks sent (sender; a probe counts when its patch or chunk leaves).
pub const CHUNKS_SENT: &str = "nightpass_chunks_sent_total";
/// Passes completed (sender).
pub const PASSES: &str = "nightpass_passes_total";
/// Wall time of the last completed pass (sender).
pub const PASS_DURATION: &str = "nightpass_last_pass_duration_seconds";
/// 1 while a pass runs, else 0 (sender).
pub const PASS_IN_PROGRESS: &str = "nightpass_pass_in_progress";
/// Seconds the source stayed frozen in the last cutover (sender).
pub const FREEZE_DURATION: &str = "nightpass_last_freeze_duration_seconds";
/// Forecast of a frozen final pass after the last pass (sender).
pub const FORECAST: &str = "nightpass_forecast_final_pass_seconds";
/// The night window the forecast must fit (`converge --window`).
pub const WINDOW: &str = "nightpass_window_seconds";
/// Bytes written to targets (receiver).
pub const WRITTEN_BYTES: &str = "nightpass_written_bytes_total";
/// Chunks written durably and acknowledged (receiver).
pub const CHUNKS_WRITTEN: &str = "nightpass_chunks_written_total";
/// Sessions ended, by result (receiver).
pub const SESSIONS: &str = "nightpass_sessions_total";
/// Sessions and connections refused, by reason (receiver).
pub const REFUSALS: &str = "nightpass_refusals_total";

/// Passes a fleet agent recorded, by result (ok, failed, dropped).
pub const FLEET_PASSES: &str = "nightpass_fleet_passes_recorded_total";
/// Records a fleet agent keeps in its spool, waiting for the database.
pub const FLEET_SPOOLED: &str = "nightpass_fleet_spooled_records";
/// 1 while a fleet agent finds the fleet paused, else 0.
pub const FLEET_PAUSED: &str = "nightpass_fleet_paused";
/// Passes a fleet agent runs now.
pub const FLEET_IN_FLIGHT: &str = "nightpass_fleet_passes_in_flight";

/// Starts the exporter: `GET /metrics` on `addr` answers the metrics in
/// Prometheus' text format. Call once, inside the runtime, before the
/// command's work. An address that cannot be bound (taken, not local) is
/// bad input: exit 2, before anything else starts.
pub fn install(addr: SocketAddr) -> Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| Error::input(format!("--metrics {addr}: cannot serve metrics there: {e}")))?;
    describe();
    Ok(())
}

/// The help lines and units of every metric.
fn describe() {
    describe_counter!(
        SCANNED_BYTES,
        Unit::Bytes,
        "Source bytes read and hashed by passes."
    );
    describe_counter!(
        SENT_BYTES,
        Unit::Bytes,
        "Chunk payload bytes put on the wire."
    );
    describe_counter!(CHUNKS_SENT, "Chunks sent to the receiver.");
    describe_counter!(PASSES, "Passes completed.");
    describe_gauge!(
        PASS_DURATION,
        Unit::Seconds,
        "Wall time of the last completed pass."
    );
    describe_gauge!(
        PASS_IN_PROGRESS,
        "1 while a pass of the volume runs, else 0."
    );
    describe_gauge!(
        FREEZE_DURATION,
        Unit::Seconds,
        "Seconds the source stayed frozen in the last cutover."
    );
    describe_gauge!(
        FORECAST,
        Unit::Seconds,
        "Forecast of a frozen final pass, after the last pass."
    );
    describe_gauge!(
        WINDOW,
        Unit::Seconds,
        "The night window a frozen final pass must fit (converge --window)."
    );
    describe_counter!(
        WRITTEN_BYTES,
        Unit::Bytes,
        "Bytes written to the target, durably."
    );
    describe_counter!(CHUNKS_WRITTEN, "Chunks written durably and acknowledged.");
    describe_counter!(
        SESSIONS,
        "Receiver sessions ended, by result (ok, refused, error)."
    );
    describe_counter!(
        REFUSALS,
        "Sessions and connections the receiver refused, by reason."
    );
    describe_counter!(
        FLEET_PASSES,
        "Passes a fleet agent recorded in the database, by result (ok, failed, dropped)."
    );
    describe_gauge!(
        FLEET_SPOOLED,
        "Records a fleet agent keeps in its spool until the database takes them."
    );
    describe_gauge!(FLEET_PAUSED, "1 while the agent finds the fleet paused.");
    describe_gauge!(FLEET_IN_FLIGHT, "Passes the agent runs now.");
}

/// A fleet agent recorded a pass that ended with `result`.
pub fn fleet_pass_recorded(result: &'static str) {
    counter!(FLEET_PASSES, "result" => result).increment(1);
}

/// A fleet agent's state: records spooled, the red button as last seen,
/// passes in flight.
pub fn fleet_agent(spooled: usize, paused: bool, in_flight: usize) {
    gauge!(FLEET_SPOOLED).set(spooled as f64);
    gauge!(FLEET_PAUSED).set(if paused { 1.0 } else { 0.0 });
    gauge!(FLEET_IN_FLIGHT).set(in_flight as f64);
}

/// The sender's per-volume handles, taken once per pass so that the
/// hashing threads and data streams record without a registry look-up.
#[derive(Clone)]
pub struct SenderMeters {
    /// [`SCANNED_BYTES`].
    pub scanned: Counter,
    /// [`SENT_BYTES`].
    pub sent: Counter,
    /// [`CHUNKS_SENT`].
    pub chunks: Counter,
}

impl SenderMeters {
    /// The handles of `volume` (as events name it: `HOST:PORT/NAME`).
    pub fn new(volume: &str) -> SenderMeters {
        let v = volume.to_string();
        SenderMeters {
            scanned: counter!(SCANNED_BYTES, "volume" => v.clone()),
            sent: counter!(SENT_BYTES, "volume" => v.clone()),
            chunks: counter!(CHUNKS_SENT, "volume" => v),
        }
    }
}

impl Default for SenderMeters {
    /// Handles that record nothing (a pass's counters before it knows its volume).
    fn default() -> SenderMeters {
        SenderMeters {
            scanned: Counter::noop(),
            sent: Counter::noop(),
            chunks: Counter::noop(),
        }
    }
}

/// [`PASS_IN_PROGRESS`] of a volume: 1 from creation, 0 again on drop,
/// however the pass ends.
pub struct PassInProgress(Gauge);

impl PassInProgress {
    /// A pass of `volume` begins.
    pub fn start(volume: &str) -> PassInProgress {
        let g = gauge!(PASS_IN_PROGRESS, "volume" => volume.to_string());
        g.set(1.0);
        PassInProgress(g)
    }
}

impl Drop for PassInProgress {
    fn drop(&mut self) {
        self.0.set(0.0);
    }
}

/// A pass of `volume` completed in `duration_s`, with a forecast of the
/// frozen final pass when the journal allows one.
pub fn pass_completed(volume: &str, duration_s: f64, forecast_s: Option<f64>) {
    let v = volume.to_string();
    counter!(PASSES, "volume" => v.clone()).increment(1);
    gauge!(PASS_DURATION, "volume" => v.clone()).set(duration_s);
    if let Some(f) = forecast_s {
        gauge!(FORECAST, "volume" => v).set(f);
    }
}

/// The window a frozen final pass of `volume` must fit.
pub fn window(volume: &str, window_s: f64) {
    gauge!(WINDOW, "volume" => volume.to_string()).set(window_s);
}

/// A cutover of `volume` kept its source frozen `frozen_s` seconds.
pub fn freeze(volume: &str, frozen_s: f64) {
    gauge!(FREEZE_DURATION, "volume" => volume.to_string()).set(frozen_s);
}

/// The receiver's per-volume handles for a session's writer.
#[derive(Clone)]
pub struct ReceiverMeters {
    /// [`WRITTEN_BYTES`].
    pub written: Counter,
    /// [`CHUNKS_WRITTEN`].
    pub chunks: Counter,
}

impl ReceiverMeters {
    /// The handles of exported volume `name`.
    pub fn new(name: &str) -> ReceiverMeters {
        ReceiverMeters {
            written: counter!(WRITTEN_BYTES, "volume" => name.to_string()),
            chunks: counter!(CHUNKS_WRITTEN, "volume" => name.to_string()),
        }
    }
}

/// A receiver session ended: `result` is `ok`, `refused` or `error`.
pub fn session_ended(result: &'static str) {
    counter!(SESSIONS, "result" => result).increment(1);
}

/// The receiver refused a session or a connection for `reason`: a refusal
/// code's name (`InUse` is recorded as `in_use`) or a connection limit's
/// (`handshakes per address` as `handshakes_per_address`).
pub fn refused(reason: &str) {
    counter!(REFUSALS, "reason" => snake(reason)).increment(1);
}

/// `InUse` → `in_use`, `handshake timed out` → `handshake_timed_out`.
fn snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 && !out.ends_with('_') {
            out.push('_');
        }
        match c {
            ' ' | '-' => out.push('_'),
            c => out.push(c.to_ascii_lowercase()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn reasons_read_as_label_values() {
        assert_eq!(super::snake("InUse"), "in_use");
        assert_eq!(super::snake("Sealed"), "sealed");
        assert_eq!(
            super::snake("handshakes per address"),
            "handshakes_per_address"
        );
    }
}
