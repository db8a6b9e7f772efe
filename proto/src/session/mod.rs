//! Session state machines with no I/O, in the manner of `quinn-proto`: the
//! drivers in the `nightpass` crate feed them what happened through
//! `handle_*` methods (a message, a chunk's check result, an ack, the time)
//! and ask them what follows through `poll_*` methods (messages to send,
//! chunks to read, check, write, manifest entries to make durable).
//!
//! Owns the sessions' decisions: handshakes and refusal codes, in-flight
//! and ack bookkeeping ([`SendLedger`]), the resume point, Finish/Done and
//! the verify exchange. It never reads a device, a socket or a clock.

mod error;
mod ledger;
pub mod receiver;
pub mod sender;
pub mod verify;

pub use error::SessionError;
pub use ledger::{SendLedger, UnexpectedAck};
pub use receiver::{ReceiverSession, WriterLedger};
pub use sender::SendSession;
pub use verify::{VerifyClient, VerifyError, VerifyOutcome, VerifyServer};
