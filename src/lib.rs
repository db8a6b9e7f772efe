//! # nightpass: block-level migration of live storage servers over QUIC
//!
//! A sender reads a block device (or an image file) in fixed-size chunks,
//! hashes each with BLAKE3, and streams the chunks that differ from what the
//! target provably holds to a receiver over QUIC (mutual TLS 1.3, pinned
//! fingerprints), which verifies each chunk against its hash, writes it,
//! makes it durable and only then records and acknowledges it.
//!
//! ## Modules and their owners
//! - [`cli`]: flags and their validation into typed settings.
//! - [`device`]: every system call on volume data.
//! - [`hash`]: the read-and-hash pipeline on all cores.
//! - [`transport`]: endpoints, identities, fingerprint pinning, framing on streams.
//! - [`sender`]: one pass from the source side, the sender's manifest, the journal.
//! - [`receiver`]: the serve loop, sessions, the durable writer.
//! - [`verify`]: verify-only mode.
//! - [`freeze`]: fsfreeze, LVM snapshots, operator hooks, the guard that always thaws.
//! - [`cutover`]: convergence and the frozen cutover pass with its proof.
//! - [`commands`]: one function per subcommand (glue).
//! - [`state`]: state directories, memory-mapped manifests, the journals'
//!   typed records ([`state::journal`]).
//! - [`seal`]: sealed volumes on the receiver: the seal record, unsealing.
//! - [`progress`]: the progress trait and its terminal/JSON implementations.
//! - [`demo`]: the self-contained demonstration.
//! - [`benchmark`]: `nightpass bench`, each stage's speed on this machine.
//! - [`error`]: error kinds and exit statuses.
//! - [`sys`]: every `unsafe` of the crate and the binary, each system call
//!   that needs it behind a small safe function; `unsafe` is denied
//!   everywhere else.
//!
//! Formats, messages and the planning math live in the `nightpass-proto`
//! crate, which does no I/O; see its docs and `proto/PROTOCOL.md`.
//!
//! ## Durability and trust invariants
//! - A chunk is written only after its BLAKE3 hash matches, and recorded in
//!   the receiver's manifest only after `fdatasync`; entries about to be
//!   overwritten are durably cleared first. The manifest is never ahead of
//!   the data.
//! - The sender records only acknowledged chunks, and trusts its own view of
//!   the target only when its summary equals the receiver's.
//! - A receiver writes only to exported paths, only below the accepted size.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod benchmark;
pub mod cli;
pub mod commands;
pub mod cutover;
pub mod demo;
pub mod device;
pub mod error;
pub mod freeze;
pub mod hash;
pub mod progress;
pub mod receiver;
pub mod seal;
pub mod sender;
pub mod state;
#[allow(unsafe_code)]
pub mod sys;
pub mod transport;
pub mod verify;
