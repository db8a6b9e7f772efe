//! The receiver's side of a sync session, with no I/O: what a Hello asks
//! and whether it can be answered, the check of every chunk frame before
//! anything is written, the control stream's order (table requests,
//! Finish, a sender's Failure), and the writer's ledger (which manifest
//! entries are cleared before a batch, what is acknowledged after it, when
//! the pass is Done).
//!
//! Owns those decisions only. The driver (`nightpass`'s receiver) reads
//! and writes the target and the manifest, reads a probed chunk's current
//! copy, decompresses, keeps the clock and the busy slots; facts of the
//! host (exports, authorization, seals, free space) are checked there and
//! answered with the codes of [`RefuseCode`].

use std::ops::Range;

use bytes::Bytes;

use super::SessionError;
use crate::chunk::{ChunkSize, Geometry};
use crate::manifest::{self, Hash, Summary, UNKNOWN};
use crate::patch;
use crate::wire::{self, control::Msg, Encoding, RefuseCode};

/// Checks the version a peer speaks; every session's first check.
pub fn check_version(version: u32) -> Result<(), SessionError> {
    if version == wire::PROTOCOL_VERSION {
        return Ok(());
    }
    Err(SessionError::refuse(
        RefuseCode::Version,
        format!(
            "protocol version {version} is not supported by this receiver (it speaks {}); run the same nightpass release on both sides",
            wire::PROTOCOL_VERSION
        ),
    ))
}

/// What a sync Hello asks for, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// Bytes of the source.
    pub size: u64,
    /// The chunk size proposed.
    pub chunk: ChunkSize,
    /// The operator chose it (a different existing one is then refused).
    pub explicit: bool,
}

/// Checks what a sync Hello offers before anything is opened.
pub fn check_offer(hello: &wire::Hello) -> Result<Offer, SessionError> {
    if hello.source_size == 0 {
        return Err(SessionError::refuse(
            RefuseCode::BadRequest,
            "the source is empty (0 bytes): nothing to copy",
        ));
    }
    let chunk = ChunkSize::new(u64::from(hello.chunk_size))
        .map_err(|e| SessionError::refuse(RefuseCode::ChunkSize, e.to_string()))?;
    Ok(Offer {
        size: hello.source_size,
        chunk,
        explicit: hello.chunk_size_explicit,
    })
}

/// The chunk size in force: an existing manifest's, unless the operator
/// chose another explicitly (which the driver refuses for an existing
/// manifest); and the geometry of the offered source in it.
pub fn agreed_geometry(
    offer: &Offer,
    existing: Option<ChunkSize>,
) -> Result<Geometry, SessionError> {
    let chunk = match existing {
        Some(c) if !offer.explicit => c,
        _ => offer.chunk,
    };
    Geometry::new(offer.size, chunk).map_err(|e| {
        SessionError::refuse(
            RefuseCode::BadRequest,
            format!("a source of {} bytes in chunks of {chunk}: {e}", offer.size),
        )
    })
}

/// A manifest summary as carried on the wire.
pub fn summary_to_wire(s: &Summary) -> wire::WireSummary {
    wire::WireSummary {
        volume_id: s.volume_id.to_vec(),
        generation: s.generation,
        root: s.root.to_vec(),
    }
}

/// What to write of a verified chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// The whole chunk.
    Whole(Bytes),
    /// The whole chunk is zeros.
    Zero,
    /// These blocks (named by the bitmap, in order in the payload) over the
    /// target's current copy; the writer checks the result against the
    /// chunk's hash before it writes them ([`check_patch`]).
    Patch {
        /// Which blocks, one bit each.
        blocks: Vec<u8>,
        /// The blocks' bytes.
        payload: Bytes,
    },
}

impl Content {
    /// Bytes of data held.
    pub fn len(&self) -> usize {
        match self {
            Content::Whole(b) => b.len(),
            Content::Zero => 0,
            Content::Patch { payload, .. } => payload.len(),
        }
    }

    /// Whether no data is held (a zero chunk).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a checked chunk frame asks of the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// A verified chunk (or a patch, checked by the writer) to write.
    Write {
        /// Chunk index.
        index: u64,
        /// Its BLAKE3 hash, checked (a patch's: to check after overlaying).
        hash: Hash,
        /// What to write.
        content: Content,
    },
    /// A probe: read the target's copy of `range` and answer with
    /// [`patch::answer_probe`] on `hints`.
    Probe {
        /// Chunk index.
        index: u64,
        /// Byte range of the chunk on the target.
        range: Range<u64>,
        /// The sender's block hints.
        hints: Bytes,
    },
}

/// Decodes and verifies one chunk frame: index inside the volume, length
/// equal to the chunk's, payload decoding (`decompress` for zstd, which
/// must give exactly the length asked) to exactly that length, BLAKE3 equal
/// to the announced hash. Nothing unverified leaves this function.
pub fn check_chunk(
    body: Bytes,
    geometry: &Geometry,
    decompress: impl FnOnce(&[u8], usize) -> Result<Vec<u8>, String>,
) -> Result<Checked, SessionError> {
    let c = wire::decode_chunk(body)
        .map_err(|e| SessionError::peer(format!("bad chunk frame: {e}")))?;
    let (index, len, hash) = check_header(&c, geometry)?;
    let data = match Encoding::try_from(c.encoding) {
        Ok(Encoding::Probe) => {
            let range = geometry.range(index).expect("index checked above");
            let hints = c.payload;
            return Ok(Checked::Probe {
                index,
                range,
                hints,
            });
        }
        Ok(Encoding::Patch) => {
            // Checked against the hash by the writer, in order with the
            // chunk's other writes: see [`check_patch`].
            patch::check_shape(index, len, &c.blocks, c.payload.len())
                .map_err(|e| SessionError::peer(e.to_string()))?;
            let (blocks, payload) = (c.blocks, c.payload);
            let content = Content::Patch { blocks, payload };
            return Ok(Checked::Write {
                index,
                hash,
                content,
            });
        }
        Ok(Encoding::Raw) => Some(c.payload),
        Ok(Encoding::Zstd) => {
            let out = decompress(&c.payload, len).map_err(|e| {
                SessionError::peer(format!("chunk {index} does not decompress: {e}"))
            })?;
            Some(Bytes::from(out))
        }
        Ok(Encoding::Zero) => None,
        Err(_) => {
            return Err(SessionError::peer(format!(
                "chunk {index} has an unknown encoding"
            )));
        }
    };
    check_content(index, len, &hash, data.as_deref())?;
    let content = data.map_or(Content::Zero, Content::Whole);
    Ok(Checked::Write {
        index,
        hash,
        content,
    })
}

/// A chunk frame's index (inside the volume), length (the chunk's) and
/// hash (32 bytes).
fn check_header(c: &wire::Chunk, geometry: &Geometry) -> Result<(u64, usize, Hash), SessionError> {
    let Some(len) = geometry.chunk_len(c.index) else {
        return Err(SessionError::peer(format!(
            "chunk {} lies past the end of the volume ({} chunks); nothing written",
            c.index,
            geometry.chunk_count()
        )));
    };
    if c.len as usize != len {
        return Err(SessionError::peer(format!(
            "chunk {} announces {} bytes, but it is {len} bytes long; nothing written",
            c.index, c.len
        )));
    }
    let hash: Hash = c.hash.as_slice().try_into().map_err(|_| {
        SessionError::peer(format!(
            "chunk {} carries a hash of {} bytes",
            c.index,
            c.hash.len()
        ))
    })?;
    Ok((c.index, len, hash))
}

/// Checks a whole chunk's bytes (`None`: all zeros) against its length and
/// hash.
fn check_content(
    index: u64,
    len: usize,
    hash: &Hash,
    data: Option<&[u8]>,
) -> Result<(), SessionError> {
    let actual = match data {
        Some(d) if d.len() != len => {
            return Err(SessionError::peer(format!(
                "chunk {index} payload is {} bytes, expected {len}; nothing written",
                d.len()
            )))
        }
        Some(d) => *blake3::hash(d).as_bytes(),
        None => manifest::zero_hash(len),
    };
    if actual != *hash {
        return Err(SessionError::peer(format!(
            "chunk {index} failed its hash check (corrupted in transit or a faulty sender); nothing of it was written"
        )));
    }
    Ok(())
}

/// Overlays a patch on the target's current copy of its chunk (`chunk`,
/// read after every earlier write of the session) and checks the result
/// against the chunk's hash: `Ok` with the byte runs to write, or the
/// request for the whole chunk to send back when it does not match (a hint
/// that collided, a target changed behind the session).
pub fn check_patch(
    index: u64,
    hash: &Hash,
    chunk: &mut [u8],
    blocks: &[u8],
    payload: &[u8],
) -> Result<Vec<Range<usize>>, wire::Need> {
    patch::apply(chunk, blocks, payload);
    if blake3::hash(chunk).as_bytes() != hash {
        return Err(patch::whole_chunk(index, chunk.len()));
    }
    Ok(patch::runs(blocks, chunk.len()))
}

/// What the driver does after a control message of a sync session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAction {
    /// Nothing (a heartbeat).
    Nothing,
    /// Send the manifest table in parts ([`TableParts`]).
    SendTable,
    /// Wait until `expected` chunks are committed, then send [`Msg::Done`].
    Finalize {
        /// Chunks the sender sent in this session.
        expected: u64,
    },
    /// The sender ended its control stream: the session is over.
    End,
}

/// The control stream of a sync session, receiver side: which message may
/// come when.
#[derive(Debug, Default)]
pub struct ReceiverSession {
    abandoned: bool,
    finishing: bool,
}

impl ReceiverSession {
    /// A session just welcomed.
    pub fn new() -> ReceiverSession {
        ReceiverSession::default()
    }

    /// The sender reset a data stream: the frames it dropped leave the pass
    /// unfinishable (see [`ControlAction::Finalize`]).
    pub fn handle_abandoned(&mut self) {
        self.abandoned = true;
    }

    /// The next control message (`None`: the sender ended the stream).
    pub fn handle_control(&mut self, msg: Option<Msg>) -> Result<ControlAction, SessionError> {
        let Some(msg) = msg else {
            return Ok(ControlAction::End);
        };
        if self.finishing && !matches!(msg, Msg::Heartbeat(_)) {
            return Err(SessionError::peer(format!(
                "unexpected control message after Finish: {}",
                wire::msg_name(&msg)
            )));
        }
        match msg {
            Msg::Heartbeat(_) => Ok(ControlAction::Nothing),
            Msg::ManifestRequest(_) => Ok(ControlAction::SendTable),
            Msg::Finish(_) if self.abandoned => Err(SessionError::peer(
                "the sender reset a data stream and then finished the pass: chunks may be missing",
            )),
            Msg::Finish(f) => {
                self.finishing = true;
                Ok(ControlAction::Finalize {
                    expected: f.chunks_sent,
                })
            }
            Msg::Failure(f) => Err(SessionError::Stopped(format!(
                "the sender stopped the pass: {}",
                f.message
            ))),
            other => Err(SessionError::peer(format!(
                "unexpected control message: {}",
                wire::msg_name(&other)
            ))),
        }
    }
}

/// Numbers the parts of a manifest table as they leave, contiguous from
/// entry 0, the last one flagged.
#[derive(Debug)]
pub struct TableParts {
    next: u64,
    count: u64,
}

impl TableParts {
    /// Parts of the table of `geometry`.
    pub fn new(geometry: &Geometry) -> TableParts {
        TableParts {
            next: 0,
            count: geometry.chunk_count(),
        }
    }

    /// The part message for the next `piece` of entries (whole entries, in
    /// table order).
    pub fn part(&mut self, piece: Bytes) -> wire::HashRun {
        let n = (piece.len() / manifest::ENTRY_LEN) as u64;
        let first = self.next;
        self.next += n;
        wire::HashRun {
            first,
            hashes: piece,
            last: self.next >= self.count,
        }
    }
}

/// The writer's ledger: the ordering of a durable batch and the count of
/// chunks committed against the sender's Finish.
///
/// A batch is committed as: [`WriterLedger::to_clear`] entries set to
/// UNKNOWN and made durable; the data written; the target made durable;
/// then [`WriterLedger::handle_committed`] says what to record and
/// acknowledge. So the manifest is never ahead of the data.
#[derive(Debug, Default)]
pub struct WriterLedger {
    committed: u64,
    expected: Option<u64>,
}

/// What a committed batch asks the driver to send.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Committed {
    /// The acknowledgement of the entries written (none when nothing was).
    pub ack: Option<wire::Ack>,
    /// Requests for whole chunks whose patches did not check.
    pub needs: Vec<wire::Need>,
}

impl WriterLedger {
    /// A ledger for one session.
    pub fn new() -> WriterLedger {
        WriterLedger::default()
    }

    /// Entries of `batch` the manifest records now (`entry`), which must be
    /// durably cleared before their chunks are overwritten.
    pub fn to_clear(batch: &[u64], entry: impl Fn(u64) -> Hash) -> Vec<u64> {
        batch
            .iter()
            .copied()
            .filter(|&i| entry(i) != UNKNOWN)
            .collect()
    }

    /// A batch is durable and its entries (`written`) recorded at
    /// `generation`; `refused` patches were not written but count, as the
    /// sender counts them.
    pub fn handle_committed(
        &mut self,
        written: Vec<u64>,
        refused: Vec<wire::Need>,
        generation: u64,
    ) -> Committed {
        self.committed += (written.len() + refused.len()) as u64;
        let ack = (!written.is_empty()).then_some(wire::Ack {
            indices: written,
            generation,
        });
        Committed {
            ack,
            needs: refused,
        }
    }

    /// The sender finished, having sent `expected` chunks.
    pub fn handle_finish(&mut self, expected: u64) {
        self.expected = Some(expected);
    }

    /// Whether [`WriterLedger::poll_end`] has an answer now.
    pub fn end_ready(&self) -> bool {
        self.expected.is_some_and(|e| self.committed >= e)
    }

    /// Once every chunk the sender announced is committed: `Ok` to send
    /// Done, or the error of a count that does not match. `None` while
    /// chunks are still to come (or no Finish arrived).
    pub fn poll_end(&mut self) -> Option<Result<(), SessionError>> {
        let expected = self.expected?;
        if self.committed < expected {
            return None;
        }
        self.expected = None;
        Some(if self.committed == expected {
            Ok(())
        } else {
            Err(SessionError::peer(format!(
                "sender announced {expected} chunks but {} arrived",
                self.committed
            )))
        })
    }
}

/// The Done message for the final summary.
pub fn done(summary: &Summary) -> Msg {
    Msg::Done(wire::Done {
        summary: Some(summary_to_wire(summary)),
    })
}
