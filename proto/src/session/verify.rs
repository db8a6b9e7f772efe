//! The verify exchange, both sides, with no I/O: [`VerifyClient`] (the
//! sender, which asks and compares) and [`VerifyServer`] (the receiver,
//! which reads its target fresh and streams the hashes).
//!
//! ```text
//! client                                   server
//!   ── Hello{mode=VERIFY, source_size, chunk_size, ranges} ──►
//!                          ◄── Welcome{target_size, chunk_size, target_is_block}
//!                              or Refusal{code, message}
//!                          ◄── VerifyPart{first, hashes, last} ...
//!   ── Heartbeat ──► (any time)
//!   [differences found:]
//!   ── Forget{ranges} ──►
//!                          ◄── Done{}
//! ```
//!
//! Owns the exchange's order, the checks on what either peer sends (a
//! message out of order, hashes outside the volume or the request, parts
//! missing or repeated, a range outside the target: each a typed
//! [`VerifyError`], never a panic), the receiver's refusal codes for a
//! verify `Hello`, the chunk size and extent a receiver hashes
//! ([`verify_chunk`], [`verify_extent`]), the parts the hashes travel in and
//! the comparison ([`compare`]). Must not touch devices, sockets, clocks or
//! the state directory: the drivers read and hash the chunks these machines
//! name, move the messages, apply a `Forget` to the manifest and keep time
//! (the receiver's idle deadline lives in its driver).

use std::fmt;

use crate::chunk::{ChunkError, ChunkSize, Geometry};
use crate::chunkset::ChunkSet;
use crate::manifest::ENTRY_LEN;
use crate::wire::{control::Msg, RefuseCode, MAX_VERIFY_RANGES};

mod client;
#[cfg(test)]
mod hostile;
mod server;
#[cfg(test)]
mod tests;

pub use client::{VerifyClient, VerifyRequest};
pub use server::{TargetInfo, VerifyServer};

/// How a verify ended for the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// Every chunk compared holds the same hash on both sides.
    Identical,
    /// These chunks differ (a chunk the receiver sent no hash for differs).
    Differing(ChunkSet),
    /// The receiver refused the session.
    Refused(Refused),
}

/// A refusal: its wire code and the operator's sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The code on the wire.
    pub code: RefuseCode,
    /// Why, for the operator.
    pub message: String,
}

/// Who is at fault for a [`VerifyError`], which picks how a driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The peer broke the protocol.
    Peer,
    /// The session ended early (a lost link or a peer gone).
    Link,
    /// The numbers asked for make no volume (bad input).
    Input,
    /// The driver itself broke the machine's contract (a bug).
    Local,
}

/// A verify exchange that cannot go on. The messages are the sentences the
/// drivers have always reported.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The receiver answered the hello with something else.
    #[error("receiver answered the hello with a {0}")]
    NotWelcome(&'static str),
    /// The receiver speaks another protocol version.
    #[error("receiver speaks protocol version {0}, this sender {ours}", ours = crate::wire::PROTOCOL_VERSION)]
    Version(u32),
    /// The receiver answered with a chunk size that is none.
    #[error("receiver answered a verify with chunk size {0}")]
    ChunkSize(u32),
    /// The compared extent makes no geometry.
    #[error("{0}")]
    Geometry(ChunkError),
    /// Something else arrived where hashes were expected.
    #[error("expected verify hashes, got a {0}")]
    NotHashes(&'static str),
    /// A part of hashes outside the compared volume, or not whole hashes.
    #[error("receiver sent verify hashes outside the volume")]
    HashesOutside,
    /// A part that does not continue where the last one ended (repeated,
    /// out of order, or chunks not asked for).
    #[error(
        "receiver sent verify hashes out of order: chunk {got} where chunk {expected} was next"
    )]
    HashesOutOfOrder {
        /// The next chunk asked for.
        expected: u64,
        /// The part's first chunk.
        got: u64,
    },
    /// The last part came before every chunk asked for had its hash.
    #[error("receiver ended its verify hashes before chunk {0}")]
    HashesMissing(u64),
    /// The receiver closed the session before its hashes were all in.
    #[error("receiver closed the session during verify")]
    ClosedDuringVerify,
    /// A `Forget` was not answered by `Done`.
    #[error("receiver did not confirm forgetting the differing chunks")]
    ForgetUnconfirmed,
    /// The sender sent a message a verify session does not take now.
    #[error("unexpected control message: {0}")]
    Unexpected(&'static str),
    /// A `Forget` naming bytes past the target, or an unpaired number.
    #[error("a forget named bytes outside the target ({0} numbers)")]
    ForgetOutside(usize),
    /// The driver handed in hashes the machine did not ask for.
    #[error("hashes of chunk {0} were handed in, which were not asked to be read")]
    NotAsked(u64),
    /// The driver called a method the exchange is not ready for.
    #[error("the verify exchange is not at that step ({0})")]
    NotReady(&'static str),
}

impl VerifyError {
    /// Who is at fault.
    pub fn blame(&self) -> Blame {
        match self {
            VerifyError::ClosedDuringVerify | VerifyError::ForgetUnconfirmed => Blame::Link,
            VerifyError::Version(_) | VerifyError::Geometry(_) => Blame::Input,
            VerifyError::NotAsked(_) | VerifyError::NotReady(_) => Blame::Local,
            _ => Blame::Peer,
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.message, self.code)
    }
}

/// Compares two hash tables over `geometry`: the chunks that differ (a
/// chunk missing from one table differs).
pub fn compare(geometry: &Geometry, a: &[u8], b: &[u8]) -> ChunkSet {
    compare_in(&ChunkSet::all(geometry), a, b)
}

/// Compares two hash tables over the chunks of `set` only.
pub fn compare_in(set: &ChunkSet, a: &[u8], b: &[u8]) -> ChunkSet {
    ChunkSet::from_indices(
        set.geometry(),
        set.indices()
            .filter(|&i| table_entry(a, i) != table_entry(b, i)),
    )
}

/// Chunk `index`'s entry in a table of hashes, if the table reaches it.
pub fn table_entry(table: &[u8], index: u64) -> Option<&[u8]> {
    let o = usize::try_from(index).ok()?.checked_mul(ENTRY_LEN)?;
    table.get(o..o.checked_add(ENTRY_LEN)?)
}

/// The chunk size a verify hashes in: the volume's own (`own`, its
/// manifest's) when it has one, else what the sender asked for but never
/// below the default (64 KiB). Fresh hashes of small blocks would let a
/// sender test guesses of their contents offline.
pub fn verify_chunk(own: Option<ChunkSize>, asked: ChunkSize) -> ChunkSize {
    own.unwrap_or(if asked.bytes() < ChunkSize::DEFAULT.bytes() {
        ChunkSize::DEFAULT
    } else {
        asked
    })
}

/// The extent a verify hashes: the common extent of the source (the size
/// the peer claims) and the target, but a short last chunk ends only where
/// the receiver itself knows an end: the target's own size, or the source
/// size the volume's manifest records (`recorded`). Anywhere else the extent
/// is rounded down to whole chunks, or a peer would choose the end of a
/// chunk and learn the target's bytes one at a time by guessing the hash
/// offline.
pub fn verify_extent(
    target_size: u64,
    recorded: Option<u64>,
    source_size: u64,
    chunk: ChunkSize,
) -> u64 {
    if source_size >= target_size {
        return target_size;
    }
    if recorded == Some(source_size) {
        return source_size;
    }
    source_size - source_size % chunk.bytes()
}

/// Checks the byte ranges of a verify `Hello` (flattened offset/length
/// pairs): a refusal when they are unpaired or too many.
fn check_ranges(ranges: &[u64]) -> Result<(), Refused> {
    if ranges.len().is_multiple_of(2) && ranges.len() <= 2 * MAX_VERIFY_RANGES {
        return Ok(());
    }
    Err(Refused {
        code: RefuseCode::BadRequest,
        message: format!(
            "a verify names at most {MAX_VERIFY_RANGES} byte ranges (offset, length pairs); {} numbers were sent",
            ranges.len()
        ),
    })
}

/// The chunks a verify of `ranges` (flattened pairs; none = all) covers in `geometry`.
fn asked_set(geometry: &Geometry, ranges: &[u64]) -> ChunkSet {
    if ranges.is_empty() {
        ChunkSet::all(geometry)
    } else {
        ChunkSet::from_flat_byte_ranges(geometry, ranges)
    }
}

/// Name of a control message, for errors.
fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello(_) => "hello",
        Msg::Welcome(_) => "welcome",
        Msg::Refusal(_) => "refusal",
        Msg::ManifestRequest(_) => "manifest request",
        Msg::ManifestPart(_) => "manifest part",
        Msg::Ack(_) => "ack",
        Msg::Finish(_) => "finish",
        Msg::Done(_) => "done",
        Msg::VerifyPart(_) => "verify part",
        Msg::Forget(_) => "forget",
        Msg::Failure(_) => "failure",
        Msg::Mark(_) => "mark",
        Msg::Need(_) => "need",
        Msg::Heartbeat(_) => "heartbeat",
    }
}
