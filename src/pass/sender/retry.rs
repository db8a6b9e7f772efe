//! When a pass that failed is tried again: the retry policy after a lost
//! link. Owns no I/O but the clock.

use super::*;

/// When a failed attempt is tried again: only after a lost link
/// (`Error::Network`), only once the receiver has answered (a receiver that
/// never answered is a wrong address, port or firewall, said at once), and
/// for at most `--retry-for` per outage, with a backoff from 0.5 s to 15 s.
pub(super) struct Retry {
    retry_for: Duration,
    host_port: String,
    ever_connected: bool,
    gave_up_at: Option<Instant>,
    backoff: Duration,
    pub(super) last_error: String,
}

impl Retry {
    pub(super) fn new(cfg: &SyncConfig) -> Retry {
        Retry {
            retry_for: cfg.retry_for,
            host_port: cfg.dest.host_port.clone(),
            ever_connected: cfg.receiver_answered,
            gave_up_at: None,
            backoff: Duration::from_millis(500),
            last_error: String::new(),
        }
    }

    /// After a failed attempt (`connected`: its session was established):
    /// how long to wait before the next, or the error that ends the pass.
    pub(super) fn after(&mut self, error: Error, connected: bool) -> Result<Duration> {
        self.ever_connected |= connected;
        let msg = match error {
            Error::Network(msg) if self.ever_connected && !self.retry_for.is_zero() => msg,
            e => return Err(e),
        };
        // --retry-for bounds each outage: a session that was established
        // ended the previous one.
        if connected {
            self.gave_up_at = None;
            self.backoff = Duration::from_millis(500);
        }
        let limit = *self
            .gave_up_at
            .get_or_insert_with(|| Instant::now() + self.retry_for);
        if Instant::now() >= limit {
            return Err(Error::Network(format!(
                "gave up after waiting {} s for the receiver at {} (--retry-for): {msg}",
                self.retry_for.as_secs(),
                self.host_port
            )));
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(15));
        self.last_error = msg;
        Ok(wait)
    }
}
