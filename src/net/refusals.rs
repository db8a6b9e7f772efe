//! The receiver's log of refused connections, rate-limited per kind of
//! refusal: a flood of connections must not become a flood of log lines.
//!
//! Owns the refusal counters; decides no refusal (the verifiers and the
//! serve loop do).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often, at most, [`log_refusal`] logs a line of one kind.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Per kind of refusal: when a line was last logged and how many were
/// left out since.
type Kinds = Vec<(&'static str, Instant, u64)>;

/// The receiver's counters.
static REFUSALS: Mutex<Kinds> = Mutex::new(Vec::new());

/// Logs a refusal line (an unauthorized handshake, a connection over a
/// limit), at most one per `kind` per second: a flood of connections must
/// not become a flood of log lines (an unauthorized peer made a receiver
/// print 2,903 lines in 30 s). A line logged after others of its kind were
/// left out says how many. Every refusal, logged or not, is counted in
/// `nightpass_refusals_total` by its kind.
pub fn log_refusal(kind: &'static str, line: impl FnOnce() -> String) {
    crate::metrics::refused(kind);
    let left_out = admit(
        &mut REFUSALS.lock().expect("not poisoned"),
        kind,
        Instant::now(),
    );
    match left_out {
        None => {}
        Some(0) => tracing::info!("{}", line()),
        Some(left_out) => tracing::info!(
            "{} (and {left_out} more like it since the last such line, not shown)",
            line()
        ),
    }
}

/// Logs, for each kind of refusal with lines left out and none logged for
/// a second, how many were left out: the end of a flood is not silent. A
/// receiver calls it now and then.
pub fn flush_refusals() {
    let overdue = overdue(&mut REFUSALS.lock().expect("not poisoned"), Instant::now());
    for (kind, n) in overdue {
        tracing::info!("{n} more refusals ({kind}) not shown");
    }
}

/// Whether a refusal of `kind` at `now` gets a line: `Some(n)` with the `n`
/// lines of its kind left out since the last one, or `None` (and it is
/// counted) when one was logged less than [`REFUSAL_LOG_EVERY`] ago.
fn admit(kinds: &mut Kinds, kind: &'static str, now: Instant) -> Option<u64> {
    match kinds.iter_mut().find(|(k, _, _)| *k == kind) {
        Some((_, last, n)) if now.duration_since(*last) < REFUSAL_LOG_EVERY => {
            *n += 1;
            None
        }
        Some((_, last, n)) => {
            *last = now;
            Some(std::mem::take(n))
        }
        None => {
            kinds.push((kind, now, 0));
            Some(0)
        }
    }
}

/// The kinds with lines left out and none logged for [`REFUSAL_LOG_EVERY`]
/// by `now`, with how many were left out; their counts start again.
fn overdue(kinds: &mut Kinds, now: Instant) -> Vec<(&'static str, u64)> {
    let mut out = Vec::new();
    for (kind, last, n) in kinds.iter_mut() {
        if *n > 0 && now.duration_since(*last) >= REFUSAL_LOG_EVERY {
            out.push((*kind, std::mem::take(n)));
            *last = now;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_refusals_gets_a_line_a_second_and_a_count() {
        let mut kinds = Kinds::new();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(admit(&mut kinds, "unauthorized", t0), Some(0));
        assert_eq!(admit(&mut kinds, "unauthorized", ms(10)), None);
        assert_eq!(admit(&mut kinds, "unauthorized", ms(20)), None);
        // Another kind has its own second.
        assert_eq!(admit(&mut kinds, "busy", ms(30)), Some(0));
        assert!(overdue(&mut kinds, ms(500)).is_empty());
        assert_eq!(admit(&mut kinds, "unauthorized", ms(1000)), Some(2));
        assert_eq!(admit(&mut kinds, "unauthorized", ms(1100)), None);
        // The end of the flood is counted once, then the count starts again.
        assert_eq!(overdue(&mut kinds, ms(2000)), [("unauthorized", 1)]);
        assert!(overdue(&mut kinds, ms(4000)).is_empty());
        assert_eq!(admit(&mut kinds, "unauthorized", ms(4000)), Some(0));
    }
}
