//! # nightpass: block-level migration of live storage servers over QUIC
//!
//! A sender reads a block device (or an image file) in fixed-size chunks,
//! hashes each with BLAKE3, and streams the chunks that differ from what the
//! target provably holds to a receiver over QUIC (mutual TLS 1.3, pinned
//! fingerprints), which verifies each chunk against its hash, writes it,
//! makes it durable and only then records and acknowledges it.
//!
//! ## The house
//! ```text
//! app/    commands and their policies: cli, commands, cutover, verify,
//!         demo, benchmark            (may use everything below)
//! pass/   one pass from both ends: sender/, receiver/
//!                                     (uses io, net, store; not app)
//! net/    QUIC endpoints, pinning, tuning, framing (knows no pass)
//! io/     device, hash, freeze, sys: the kernel and the data
//!                                     (knows no protocol, no network)
//! store/  the state directory: the Store trait, state, journal, seal
//!                                     (keeps records, decides nothing)
//! fleet/  many filers through PostgreSQL: schema, migrations, the
//!         operator's fleet commands (beside app; uses app::plan)
//! error.rs, progress.rs, metrics.rs: the vocabulary every folder shares
//! ```
//! - [`app`]: flags into typed settings ([`app::cli`]), one function per
//!   subcommand ([`app::commands`]), convergence and the frozen cutover
//!   ([`app::cutover`]), verify-only mode, the demo and `bench`.
//! - [`pass`]: the sender's pass and the receiver's serve loop, sessions
//!   and durable writer.
//! - [`net`]: endpoints, identities, fingerprint pinning, framing.
//! - [`io`]: every system call on volume data ([`io::device`]), the
//!   read-and-hash pipeline, fsfreeze and snapshots, and every `unsafe` of
//!   the crate and the binary ([`io::sys`]); `unsafe` is denied everywhere
//!   else.
//! - [`store`]: state directories, memory-mapped manifests, the journals'
//!   typed records, sealed volumes, and the [`store::Store`] trait through
//!   which journals, source records and seals are kept (the file store
//!   today).
//! - [`fleet`]: the fleet's PostgreSQL database (pool, timeouts,
//!   versioned migrations) and `fleet init | add | status | pause | resume
//!   | schedule`.
//! - [`error`]: error kinds and exit statuses; [`progress`]: the progress
//!   trait and its terminal/JSON implementations; [`metrics`]: the
//!   Prometheus metrics operators scrape (`--metrics ADDR`).
//!
//! The library never prints: what the operator reads on stdout goes through
//! [`progress`]; diagnostics and the receiver's log go through `tracing`
//! events, which the binary writes to stderr as bare lines.
//!
//! Formats, messages, the sessions' state machines (what each end of a
//! sync or verify session decides: handshakes and refusal codes, the check
//! of every chunk, acks, probes and patches, the resume point, Finish and
//! Done) and the planning math live in the `nightpass-proto` crate, which
//! does no I/O; see its docs and `proto/PROTOCOL.md`. The drivers in
//! [`pass`] and [`app::verify`] only move bytes, touch devices and keep
//! time; a pass runs over a `ChunkSet` (every chunk, the remainder of a
//! resumed pass, or a given set).
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

pub mod app;
pub mod error;
pub mod fleet;
pub mod io;
pub mod metrics;
pub mod net;
pub mod pass;
pub mod progress;
pub mod store;
