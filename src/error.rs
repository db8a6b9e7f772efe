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

use std::io;

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
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit status for this error (docs/CLI.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) => 2,
            Error::Io(_) | Error::Network(_) | Error::Peer(_) => 3,
            Error::Interrupted => 130,
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
