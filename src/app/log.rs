//! The log's line format: how the binary writes `tracing` events on stderr.
//!
//! Three styles. The sender's commands write each event as its bare
//! message, as they always have (their stderr is read by a person at a
//! terminal, next to the bars), with a journal priority under systemd. The daemons (`serve`, `track`), which run
//! for weeks, stamp each line with the time (RFC 3339, UTC, to the
//! millisecond) and the level. Under systemd, when stderr is the journal
//! (`JOURNAL_STREAM` names stderr's device and inode), a line carries no
//! time of ours (the journal stamps each line) and starts with its
//! sd-daemon priority instead (`<3>` error, `<4>` warning, `<6>` info,
//! `<7>` debug), which journald reads as the entry's priority.
//!
//! Owns the format only; the binary installs it, and what is logged is
//! decided where the events are raised. Touches no file but stderr.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::progress::{now_unix, rfc3339};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// The message alone (the sender's commands).
    Bare,
    /// `2026-11-30T01:31:02.123Z  INFO message` (a daemon on a terminal or
    /// in a file).
    Stamped,
    /// `<6>message` (a daemon whose stderr is the systemd journal).
    Journal,
}

impl Style {
    /// The style for a daemon: [`Style::Journal`] when stderr is the
    /// journal, else [`Style::Stamped`].
    pub fn daemon() -> Style {
        if journal() {
            Style::Journal
        } else {
            Style::Stamped
        }
    }

    /// The style for the sender's commands: [`Style::Journal`] when stderr
    /// is the journal (a converge unit), else [`Style::Bare`].
    pub fn sender() -> Style {
        if journal() {
            Style::Journal
        } else {
            Style::Bare
        }
    }
}

/// Whether stderr is the journal, by this process's `JOURNAL_STREAM`.
fn journal() -> bool {
    stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref())
}

/// Whether stderr is the stream systemd connected to the journal:
/// `journal_stream` (the value of `JOURNAL_STREAM`, `DEVICE:INODE` in
/// decimal) names stderr's device and inode. A stderr redirected elsewhere
/// by the service (a pipe to another logger, a file) keeps the variable
/// but not the match.
pub fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    use std::os::fd::AsRawFd;
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_raw_fd()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// The sd-daemon priority of a level (syslog's numbers).
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// The target of log lines whose exact words are part of the command-line
/// contract (docs/CLI.md): written without a time stamp in every style
/// but the journal's, whose priority prefix systemd strips.
pub const CONTRACT: &str = "nightpass::contract";

/// A [`FormatEvent`] writing one line per event in a [`Style`]: the
/// prefix, then the message and the event's fields (`key=value`).
#[derive(Debug, Clone, Copy)]
pub struct LineFormat(pub Style);

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = *event.metadata().level();
        // A line whose words scripts rely on (the receiver's `listening on
        // ADDR fingerprint FP`) starts with them, without a stamp.
        let contract = event.metadata().target() == CONTRACT;
        match self.0 {
            Style::Bare => {}
            Style::Stamped if contract => {}
            Style::Stamped => write!(w, "{} {:>5} ", rfc3339(now_unix()), level)?,
            Style::Journal => write!(w, "<{}>", priority(level))?,
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Installs the one logging path: this crate's events at INFO and above
/// go to stderr in `style`. They are written in every mode: `--quiet` and
/// `--json` govern stdout and the bars, not the log. Other crates' events
/// (quinn's) stay silent. Keeps a subscriber already installed.
pub fn install(style: Style) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let ours = tracing_subscriber::filter::Targets::new()
        .with_target(env!("CARGO_CRATE_NAME"), Level::INFO);
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(LineFormat(style));
    let _ = tracing_subscriber::registry()
        .with(lines)
        .with(ours)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_syslogs() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
    }

    #[test]
    fn only_stderrs_own_device_and_inode_mean_the_journal() {
        use std::os::fd::AsRawFd;
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("garbage")));
        assert!(!stderr_is_journal(Some("1:x")));
        let st = nix::sys::stat::fstat(std::io::stderr().as_raw_fd()).unwrap();
        let ours = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(stderr_is_journal(Some(&ours)));
        let other = format!("{}:{}", st.st_dev, st.st_ino.wrapping_add(1));
        assert!(!stderr_is_journal(Some(&other)));
    }
}
