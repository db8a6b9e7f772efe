//! The receiver's log of sessions: one line when a session's Hello has
//! been read, and one when the session ends, saying who (the sender's
//! fingerprint and address), what (volume, kind, the sender's pass number),
//! how much (a sync's chunks and payload bytes received, a verify's chunks
//! and bytes hashed fresh), how long, and how it ended
//! (`ok`, `ended` before the end of its pass, `refused` or `error`, with the
//! reason). Strings a peer chose (the volume name, reasons) are quoted and
//! escaped, so no peer can forge a line.
//!
//! Observes and writes log lines only; decides nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use super::*;

tokio::task_local! {
    /// The log of the session whose future is running.
    static CURRENT: Arc<SessionLog>;
}

/// What one session did, as its end line says it.
pub(super) struct SessionLog {
    peer: String,
    from: SocketAddr,
    volume: String,
    kind: &'static str,
    pass: u64,
    started: Instant,
    chunks: AtomicU64,
    bytes: AtomicU64,
    done: AtomicBool,
    refusal: Mutex<Option<String>>,
}

/// The name of a session's kind in the log.
fn kind_name(mode: i32) -> &'static str {
    match Mode::try_from(mode) {
        Ok(Mode::Sync) => "sync",
        Ok(Mode::Verify) => "verify",
        Ok(Mode::Preflight) => "preflight",
        Ok(Mode::Record) => "cutover",
        Ok(Mode::DryRun) => "dry_run",
        _ => "unknown",
    }
}

impl SessionLog {
    /// Logs the start of the session `hello` opens on `conn`.
    pub(super) fn begin(hello: &wire::Hello, conn: &quinn::Connection) -> Arc<SessionLog> {
        let log = SessionLog {
            peer: transport::peer_fingerprint(conn).unwrap_or_else(|| "-".into()),
            from: conn.remote_address(),
            volume: hello.volume.clone(),
            kind: kind_name(hello.mode),
            pass: hello.pass,
            started: Instant::now(),
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            done: AtomicBool::new(false),
            refusal: Mutex::new(None),
        };
        tracing::info!(
            peer = %log.peer,
            from = %log.from,
            volume = ?log.volume,
            kind = %log.kind,
            pass = %log.pass_text(),
            "session start"
        );
        Arc::new(log)
    }

    /// Runs `f` (the session) with this log as the current one, so that a
    /// refusal and the end of a pass are noted on it.
    pub(super) async fn scope<F: std::future::Future>(self: &Arc<Self>, f: F) -> F::Output {
        CURRENT.scope(self.clone(), f).await
    }

    /// The log of the session running now, if any.
    pub(super) fn current() -> Option<Arc<SessionLog>> {
        CURRENT.try_with(Arc::clone).ok()
    }

    /// A chunk of `bytes` payload bytes arrived and passed its checks.
    pub(super) fn chunk(&self, bytes: usize) {
        self.chunks.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// `chunks` chunks of `bytes` bytes were read and hashed fresh (a verify).
    pub(super) fn hashed(&self, chunks: u64, bytes: u64) {
        self.chunks.fetch_add(chunks, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The pass ended: its Done was sent.
    pub(super) fn done(&self) {
        self.done.store(true, Ordering::Relaxed);
    }

    /// The session was refused, for `why`.
    pub(super) fn refused(&self, why: &str) {
        *self.refusal.lock().expect("not poisoned") = Some(why.to_string());
    }

    fn pass_text(&self) -> String {
        match self.pass {
            0 => "-".into(),
            n => n.to_string(),
        }
    }

    /// Logs the end of the session, which returned `result`.
    pub(super) fn end(&self, result: &Result<()>) {
        let refusal = self.refusal.lock().expect("not poisoned").clone();
        let (outcome, reason) = match (result, refusal) {
            (Err(e), _) => ("error", Some(e.to_string())),
            (Ok(()), Some(why)) => ("refused", Some(why)),
            (Ok(()), None) if self.kind == "sync" && !self.done.load(Ordering::Relaxed) => (
                "ended",
                Some("the sender ended the session before the end of its pass".to_string()),
            ),
            (Ok(()), None) => ("ok", None),
        };
        let duration_s = format!("{:.3}", self.started.elapsed().as_secs_f64());
        let (chunks, bytes) = (
            self.chunks.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        );
        macro_rules! line {
            ($level:ident, $($reason:tt)*) => {
                tracing::$level!(
                    peer = %self.peer,
                    from = %self.from,
                    volume = ?self.volume,
                    kind = %self.kind,
                    pass = %self.pass_text(),
                    chunks,
                    bytes,
                    duration_s = %duration_s,
                    result = %outcome,
                    $($reason)*
                    "session end"
                )
            };
        }
        match reason {
            None => line!(info,),
            Some(why) if outcome == "ended" => line!(info, reason = ?why,),
            Some(why) => line!(warn, reason = ?why,),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_session_mode_has_its_name_in_the_log() {
        let names: Vec<&str> = [
            Mode::Sync,
            Mode::Verify,
            Mode::Preflight,
            Mode::Record,
            Mode::DryRun,
        ]
        .iter()
        .map(|m| kind_name(*m as i32))
        .collect();
        assert_eq!(names, ["sync", "verify", "preflight", "cutover", "dry_run"]);
        assert_eq!(kind_name(99), "unknown");
    }
}
