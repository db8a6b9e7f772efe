//! # nightpass-proto: the protocol core, with no I/O
//!
//! Everything nightpass can decide without touching a socket, a file or a
//! clock lives here, in the manner of `quinn-proto`: chunk geometry
//! ([`chunk`]), sets of chunks and their byte ranges ([`chunkset`]), the
//! manifest format ([`manifest`]), sets of changed blocks ([`changes`]), wire messages and framing ([`wire`]),
//! block probes and patches ([`patch`]), the sessions' state machines
//! ([`session`]: a sync session's sender and receiver, the sender's ledger
//! of chunks in flight), and pass planning and forecasting ([`plan`]). The `nightpass`
//! crate drives these with tokio, quinn and real devices.
//!
//! ## Invariants
//! - A chunk is addressed by its index and identified by the BLAKE3-256 hash
//!   of its uncompressed bytes; the same hash protects it on the wire and
//!   records it in manifests.
//! - A manifest entry is either [`manifest::UNKNOWN`] or the hash of bytes
//!   the target durably holds; see [`manifest`] for how writers keep that true
//!   across crashes.
//! - Decoding peer input never panics and never allocates past the frame
//!   limit in force ([`wire::MAX_CONTROL_FRAME`], [`wire::MAX_DATA_FRAME`]).
//!
//! The wire protocol is described in `PROTOCOL.md` beside this crate.
#![deny(missing_docs)]

pub mod changes;
pub mod chunk;
pub mod chunkset;
pub mod manifest;
pub mod patch;
pub mod plan;
pub mod session;
pub mod wire;
