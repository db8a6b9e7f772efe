//! Errors and how they map to exit statuses.
//!
//! Rules:
//! - Library modules return [`Error`]; `anyhow` never appears below `main.rs`.
//! - The variant says who is at fault, because that picks the exit status
//!   operators script against (docs/CLI.md): bad input or a refusal is 2, a
//!   runtime failure (network, I/O) is 3, an interruption is 130.
//! - Messages name the thing in the operator's words ("volume 'filer9' is not
//!   exported by 10.0.0.2:7400"), and context is added by building a new
//!   message at the layer that knows the context, not by re-wrapping.
//! - Nothing a peer sends may cause a panic; it becomes [`Error::Peer`].
//! - A receiver's refusal keeps its wire code ([`Error::Refused`]), which
//!   decides the exit status and whether trying again later can help
//!   ([`Error::retryable`]); a refusal's code is chosen from the error's
//!   variant ([`Error::refuse_code`]), never guessed from its words.

use std::io;

use nightpass_proto::session::SessionError;
use nightpass_proto::wire::RefuseCode;

/// A nightpass error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad usage or bad input, or a refusal by the receiver: exit 2.
    #[error("{0}")]
    Input(String),
    /// A local I/O failure: exit 3.
    #[error("{0}")]
    Io(String),
    /// The network or the peer failed: exit 3.
    #[error("{0}")]
    Network(String),
    /// The peer broke the protocol: exit 3.
    #[error("{0}")]
    Peer(String),
    /// Interrupted by a signal: exit 130.
    #[error("interrupted")]
    Interrupted,
    /// The target (or a volume) is in use by someone else right now: exit
    /// 2, but trying again later can succeed.
    #[error("{0}")]
    InUse(String),
    /// The target is smaller than the source: exit 2.
    #[error("{0}")]
    TooSmall(String),
    /// The receiver refused the session with `code`; the message is the
    /// operator's sentence, the receiver's reason included.
    #[error("{message}")]
    Refused {
        /// The refusal's code on the wire.
        code: RefuseCode,
        /// What to tell the operator.
        message: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit status for this error (docs/CLI.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) | Error::InUse(_) | Error::TooSmall(_) => 2,
            Error::Refused { code, .. } if *code == RefuseCode::Io => 3,
            Error::Refused { .. } => 2,
            Error::Io(_) | Error::Network(_) | Error::Peer(_) => 3,
            Error::Interrupted => 130,
        }
    }

    /// Whether the same command may succeed when tried again later,
    /// unchanged: a lost link, a busy volume or receiver, a receiver's
    /// passing I/O trouble; not bad input, a refusal that stays true, or a
    /// peer breaking the protocol.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Network(_) | Error::InUse(_) => true,
            Error::Refused { code, .. } => matches!(code, RefuseCode::InUse | RefuseCode::Io),
            Error::Input(_)
            | Error::TooSmall(_)
            | Error::Io(_)
            | Error::Peer(_)
            | Error::Interrupted => false,
        }
    }

    /// The code a receiver refuses a session with when opening the session
    /// failed with this error.
    pub fn refuse_code(&self) -> RefuseCode {
        match self {
            Error::Input(_) => RefuseCode::BadRequest,
            Error::InUse(_) => RefuseCode::InUse,
            Error::TooSmall(_) => RefuseCode::TooSmall,
            Error::Refused { code, .. } => *code,
            Error::Io(_) | Error::Network(_) | Error::Peer(_) | Error::Interrupted => {
                RefuseCode::Io
            }
        }
    }

    /// An I/O error on `what` (a path or an action).
    pub fn io(what: impl std::fmt::Display, e: io::Error) -> Error {
        Error::Io(format!("{what}: {e}"))
    }

    /// Bad input.
    pub fn input(msg: impl Into<String>) -> Error {
        Error::Input(msg.into())
    }

    /// The same error, its message prefixed with `what` (`"volume 'a'"`):
    /// the kind, and so the exit status, stay.
    pub fn context(self, what: &str) -> Error {
        let p = |m: String| format!("{what}: {m}");
        match self {
            Error::Input(m) => Error::Input(p(m)),
            Error::Io(m) => Error::Io(p(m)),
            Error::Network(m) => Error::Network(p(m)),
            Error::Peer(m) => Error::Peer(p(m)),
            Error::Interrupted => Error::Interrupted,
            Error::InUse(m) => Error::InUse(p(m)),
            Error::TooSmall(m) => Error::TooSmall(p(m)),
            Error::Refused { code, message } => Error::Refused {
                code,
                message: p(message),
            },
        }
    }
}

impl From<SessionError> for Error {
    /// A session's conclusion, one to one: a peer that broke the protocol
    /// or stopped its side is the peer's failure (exit 3); a refusal keeps
    /// its code.
    fn from(e: SessionError) -> Error {
        match e {
            SessionError::Peer(m) | SessionError::Stopped(m) => Error::Peer(m),
            SessionError::Refused { code, message } => Error::Refused { code, message },
        }
    }
}

impl From<nightpass_proto::session::VerifyError> for Error {
    fn from(e: nightpass_proto::session::VerifyError) -> Self {
        use nightpass_proto::session::verify::Blame;
        let message = e.to_string();
        match e.blame() {
            Blame::Peer => Error::Peer(message),
            Blame::Link => Error::Network(message),
            Blame::Input => Error::Input(message),
            Blame::Local => Error::Io(message),
        }
    }
}

/// Adds a description of what was being done to I/O errors.
pub trait IoContext<T> {
    /// Maps an `io::Error` to [`Error::Io`] naming `what`.
    fn ctx(self, what: impl std::fmt::Display) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| Error::io(what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_code_decides_exit_status_and_retry() {
        let refused = |code| Error::Refused {
            code,
            message: String::new(),
        };
        assert_eq!(refused(RefuseCode::InUse).exit_code(), 2);
        assert!(refused(RefuseCode::InUse).retryable());
        assert_eq!(refused(RefuseCode::Io).exit_code(), 3);
        assert!(refused(RefuseCode::Io).retryable());
        assert_eq!(refused(RefuseCode::Sealed).exit_code(), 2);
        assert!(!refused(RefuseCode::Sealed).retryable());
        assert!(!refused(RefuseCode::NotAuthorized).retryable());
    }

    #[test]
    fn a_receiver_refuses_with_the_code_of_its_error() {
        for (e, code) in [
            (Error::InUse("x".into()), RefuseCode::InUse),
            (Error::TooSmall("x".into()), RefuseCode::TooSmall),
            (Error::input("x"), RefuseCode::BadRequest),
            (Error::Io("x".into()), RefuseCode::Io),
        ] {
            let exit = e.exit_code();
            let code_seen = e.refuse_code();
            assert_eq!(code_seen, code);
            // The sender's view of that refusal exits as the receiver's error would.
            let seen = Error::Refused {
                code: code_seen,
                message: String::new(),
            };
            assert_eq!(seen.exit_code(), exit, "{code:?}");
        }
    }
}
