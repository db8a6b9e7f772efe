//! What a session state machine can conclude instead of going on.
//!
//! Owns the session errors' kinds, which the drivers map one to one onto
//! the `nightpass` crate's errors (and so onto exit statuses): a peer that
//! broke the protocol, a refusal with its code, and an outcome that did
//! not prove what it had to.

use crate::wire::RefuseCode;

/// Why a session cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer sent something the protocol does not allow here (a message
    /// out of order, a chunk outside the volume, a hash that does not
    /// check). Nothing of it was written.
    #[error("{0}")]
    Peer(String),
    /// The receiver refused the session, with its code.
    #[error("{message}")]
    Refused {
        /// The refusal's code, as on the wire.
        code: RefuseCode,
        /// The receiver's explanation.
        message: String,
    },
    /// The peer stopped the pass on its side and said why.
    #[error("{0}")]
    Stopped(String),
}

impl SessionError {
    /// A protocol violation by the peer.
    pub fn peer(message: impl Into<String>) -> SessionError {
        SessionError::Peer(message.into())
    }

    /// A refusal to answer with.
    pub fn refuse(code: RefuseCode, message: impl Into<String>) -> SessionError {
        SessionError::Refused {
            code,
            message: message.into(),
        }
    }
}
