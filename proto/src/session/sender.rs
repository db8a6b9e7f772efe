//! The sender's side of a sync session, with no I/O: the answer to its
//! Hello (a refusal keeps its code), reconciling its view of the target
//! with the receiver's, fetching the receiver's table in order, what each
//! scanned chunk becomes (skipped, a zero marker, a probe, the whole
//! chunk), answering the receiver's `Need`, acknowledgements into the
//! [`SendLedger`], Finish and the check of Done.
//!
//! Owns those decisions only. The driver (`nightpass`'s sender) reads and
//! hashes the source, compresses, writes frames to streams, records
//! acknowledged entries in its manifest and keeps time.

use std::collections::HashMap;

use bytes::Bytes;

use super::{SendLedger, SessionError};
use crate::chunk::{ChunkSize, Geometry};
use crate::chunkset::ChunkSet;
use crate::manifest::{self, Hash, RootHasher, Summary};
use crate::wire::{self, control::Msg, Encoding, RefuseCode};

/// A manifest summary read from the wire.
pub fn parse_summary(w: Option<wire::WireSummary>) -> Result<Summary, SessionError> {
    let w = w.ok_or_else(|| SessionError::peer("receiver sent no manifest summary"))?;
    Ok(Summary {
        volume_id: w
            .volume_id
            .as_slice()
            .try_into()
            .map_err(|_| SessionError::peer("receiver sent a volume id of the wrong length"))?,
        generation: w.generation,
        root: w
            .root
            .as_slice()
            .try_into()
            .map_err(|_| SessionError::peer("receiver sent a root hash of the wrong length"))?,
    })
}

/// The receiver's answer to a Hello: its Welcome, or why not. A refusal
/// keeps its code (which decides the sender's exit status); `None` (the
/// stream ended) is for the driver to explain.
pub fn handle_answer(msg: Msg) -> Result<wire::Welcome, SessionError> {
    match msg {
        Msg::Welcome(w) if w.version != wire::PROTOCOL_VERSION => Err(SessionError::refuse(
            RefuseCode::Version,
            format!(
                "it speaks protocol version {}, this sender {}",
                w.version,
                wire::PROTOCOL_VERSION
            ),
        )),
        Msg::Welcome(w) => Ok(w),
        Msg::Refusal(r) => Err(SessionError::Refused {
            code: RefuseCode::try_from(r.code).unwrap_or(RefuseCode::Unspecified),
            message: r.message,
        }),
        other => Err(SessionError::peer(format!(
            "receiver answered the hello with a {}",
            wire::msg_name(&other)
        ))),
    }
}

/// The geometry of a pass over `size` bytes in the chunk size the
/// receiver chose; a chunk size that changed since an earlier attempt of
/// the same pass (`before`) is refused.
pub fn agreed_geometry(
    welcome: &wire::Welcome,
    size: u64,
    before: Option<ChunkSize>,
) -> Result<Geometry, SessionError> {
    let agreed = ChunkSize::new(u64::from(welcome.chunk_size))
        .map_err(|e| SessionError::peer(format!("receiver chose an invalid chunk size: {e}")))?;
    if before.is_some_and(|b| b != agreed) {
        return Err(SessionError::peer(
            "receiver changed the chunk size between attempts",
        ));
    }
    Geometry::new(size, agreed).map_err(|e| SessionError::peer(e.to_string()))
}

/// Whether the sender's own view of the target (`ours`: its geometry and
/// summary) is exactly the receiver's: only then is it trusted; otherwise
/// the receiver's table is fetched ([`TableFetch`]).
pub fn trusts_own_view(
    ours: Option<(Geometry, Summary)>,
    geometry: &Geometry,
    theirs: &Summary,
) -> bool {
    ours.is_some_and(|(g, s)| g == *geometry && s == *theirs)
}

/// Fetching the receiver's table: parts must come in table order,
/// contiguous from entry 0, the last one flagged, and their root must be
/// the one the receiver announced.
#[derive(Debug)]
pub struct TableFetch {
    count: u64,
    next: u64,
    root: RootHasher,
    expected_root: Hash,
}

/// What a part of the table gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Store these entries, starting at `first`; more parts follow.
    Part {
        /// Index of the first entry.
        first: u64,
    },
    /// Store these entries, starting at `first`; the table is whole and
    /// its root checks out: commit it.
    Complete {
        /// Index of the first entry.
        first: u64,
    },
}

impl TableFetch {
    /// A fetch of the table of `geometry`, whose root must be `theirs.root`.
    pub fn new(geometry: &Geometry, theirs: &Summary) -> TableFetch {
        TableFetch {
            count: geometry.chunk_count(),
            next: 0,
            root: RootHasher::new(geometry),
            expected_root: theirs.root,
        }
    }

    /// The request that starts the fetch.
    pub fn request() -> Msg {
        Msg::ManifestRequest(wire::ManifestRequest {})
    }

    /// The next message during the fetch.
    pub fn handle(&mut self, msg: Msg) -> Result<Fetched, SessionError> {
        let run = match msg {
            Msg::ManifestPart(run) => run,
            Msg::Heartbeat(_) => {
                return Err(SessionError::peer(
                    "expected a manifest part, got a heartbeat",
                ))
            }
            other => {
                return Err(SessionError::peer(format!(
                    "expected a manifest part, got a {}",
                    wire::msg_name(&other)
                )))
            }
        };
        let n = (run.hashes.len() / manifest::ENTRY_LEN) as u64;
        let whole = run.hashes.len() % manifest::ENTRY_LEN == 0;
        if !whole || run.first != self.next || self.next + n > self.count {
            return Err(SessionError::peer(
                "receiver sent a manifest part out of order or outside the volume",
            ));
        }
        self.root.update(&run.hashes);
        let first = self.next;
        self.next += n;
        if !run.last {
            return Ok(Fetched::Part { first });
        }
        if self.next != self.count {
            return Err(SessionError::peer(format!(
                "receiver's manifest ended after {} of {} entries",
                self.next, self.count
            )));
        }
        if self.root.finalize() != self.expected_root {
            return Err(SessionError::peer(
                "the receiver's manifest does not match its own root hash",
            ));
        }
        Ok(Fetched::Complete { first })
    }
}

/// What a scanned chunk becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// The target holds it: nothing to send.
    Skip,
    /// All zeros: a zero marker, no payload.
    Zero,
    /// Block hints first (see [`ProbePolicy`]); the chunk's bytes are held
    /// until it is acknowledged.
    Probe,
    /// Only the blocks a change record says were written, as a patch over
    /// the version the target holds (no probe round trip); the chunk's
    /// bytes are held until it is acknowledged, in case the receiver's
    /// check of the whole chunk asks for all of it.
    Patch,
    /// The whole chunk (compressed when that pays: the driver's choice).
    Whole,
}

/// A chunk as the scan found it, against what the target holds.
#[derive(Debug, Clone, Copy)]
pub struct Scanned<'a> {
    /// Its BLAKE3 hash.
    pub hash: &'a Hash,
    /// What the target's manifest records for it.
    pub known: &'a Hash,
    /// Its bytes are all zeros.
    pub zero: bool,
    /// Its length in bytes.
    pub len: usize,
    /// The bitmap of its blocks a change record says were written since
    /// the target's version was read (`None` when no record covers it).
    pub written: Option<&'a [u8]>,
}

/// How a chunk goes to the streams ([`SendSession::handle_sent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sending {
    /// Whole (raw, compressed or a zero marker).
    Whole,
    /// As a probe; its bytes are held for the patch to come.
    Probe(Bytes),
    /// As a patch of the blocks written; its bytes are held in case the
    /// receiver asks for the whole chunk.
    Patch(Bytes),
}

/// When to probe a changed chunk rather than send it whole.
///
/// Delta transfer below the chunk: after scattered small writes most of a
/// changed chunk is still what the target holds. For a chunk the target
/// is known to hold a version of, the sender sends a hint per 4 KiB block,
/// the receiver asks for the blocks that differ, and the sender patches
/// them. Worth it for whole chunks (not a short last one) of 4 blocks up to
/// 4 MiB, whose known version is not the zero chunk; and while the
/// receiver keeps asking for more than 3/4 of the blocks probed (whole
/// chunks rewritten), only one chunk in 16, to notice when that changes.
#[derive(Debug, Clone)]
pub struct ProbePolicy {
    chunk: usize,
    zero: Hash,
    probed_blocks: u64,
    needed_blocks: u64,
    probes: u64,
}

impl ProbePolicy {
    /// The policy for a volume of `chunk`-sized chunks.
    pub fn new(chunk: ChunkSize) -> ProbePolicy {
        ProbePolicy {
            chunk: chunk.usize(),
            zero: manifest::zero_hash(chunk.usize()),
            probed_blocks: 0,
            needed_blocks: 0,
            probes: 0,
        }
    }

    /// What a scanned chunk becomes.
    pub fn plan(&mut self, c: &Scanned<'_>) -> Plan {
        let (hash, known, zero, len, written) = (c.hash, c.known, c.zero, c.len, c.written);
        if known == hash {
            Plan::Skip
        } else if zero {
            Plan::Zero
        } else if written.is_some_and(|w| self.patchable(known, len, w)) {
            Plan::Patch
        } else if self.worth(known, len) {
            Plan::Probe
        } else {
            Plan::Whole
        }
    }

    /// A patch of the written blocks pays when the target holds a version
    /// of this whole chunk and not every block was written.
    fn patchable(&self, known: &Hash, len: usize, written: &[u8]) -> bool {
        let n = wire::blocks_in(len);
        *known != manifest::UNKNOWN
            && *known != self.zero
            && len == self.chunk
            && written.len() == n.div_ceil(8)
            && wire::named_blocks(written, n).count() < n
    }

    fn worth(&mut self, known: &Hash, len: usize) -> bool {
        if *known == manifest::UNKNOWN
            || *known == self.zero
            || len != self.chunk
            || !(4 * wire::BLOCK..=4 << 20).contains(&len)
        {
            return false;
        }
        let probe = self.probed_blocks < 1024
            || self.needed_blocks * 4 <= self.probed_blocks * 3
            || self.probes.is_multiple_of(16);
        self.probes += 1;
        probe
    }

    /// The receiver answered a probe of `blocks` blocks asking for `wanted`.
    pub fn handle_answer(&mut self, blocks: usize, wanted: usize) {
        self.probed_blocks += blocks as u64;
        self.needed_blocks += wanted as u64;
    }
}

/// One chunk frame to put on a data stream (the payload goes last,
/// uncopied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutChunk {
    /// Chunk index.
    pub index: u64,
    /// BLAKE3 hash of the whole chunk.
    pub hash: Hash,
    /// How the payload encodes it.
    pub encoding: Encoding,
    /// The chunk's length.
    pub len: u32,
    /// Bitmap of the blocks in a patch's payload.
    pub blocks: Vec<u8>,
    /// The payload.
    pub payload: Bytes,
}

/// What a control message during the pass asks of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendEvent {
    /// Nothing (a heartbeat).
    Nothing,
    /// These chunks are durable: record them in the manifest;
    /// `released_probes` probes' bytes are no longer held.
    Acked {
        /// (index, hash) of each chunk acknowledged.
        entries: Vec<(u64, Hash)>,
        /// How many of them were probes.
        released_probes: usize,
    },
    /// The answer to a probe: put it on the patch stream.
    Send(OutChunk),
    /// The receiver is done: check it with [`SendSession::check_done`].
    Done(Summary),
}

/// One attempt at a pass, sender side: the ledger of chunks in flight, the
/// probes held, the chunks counted for Finish.
#[derive(Debug)]
pub struct SendSession {
    ledger: SendLedger,
    policy: ProbePolicy,
    /// Bytes of probed or patched chunks until acknowledged (true: a probe).
    held: HashMap<u64, (Bytes, bool)>,
    chunks_sent: u64,
    finished: bool,
}

impl SendSession {
    /// An attempt over `geometry` that scans `set` (all chunks of a full
    /// pass, the remainder of a resumed one, or the chunks a change record
    /// names), in read blocks.
    pub fn new(geometry: &Geometry, set: &ChunkSet) -> SendSession {
        SendSession {
            ledger: SendLedger::new(set.first()),
            policy: ProbePolicy::new(geometry.chunk_size()),
            held: HashMap::new(),
            chunks_sent: 0,
            finished: false,
        }
    }

    /// What a scanned chunk becomes ([`ProbePolicy::plan`]).
    pub fn plan(&mut self, c: &Scanned<'_>) -> Plan {
        self.policy.plan(c)
    }

    /// Chunk `index` goes to a stream: whole, as a probe (not counted until
    /// its answer leaves) or as a patch (counted now); a probe's or a
    /// patch's bytes are held until it is acknowledged.
    pub fn handle_sent(&mut self, index: u64, hash: Hash, how: Sending) {
        self.ledger.handle_sent(index, hash);
        match how {
            Sending::Whole => self.chunks_sent += 1,
            Sending::Probe(bytes) => {
                self.held.insert(index, (bytes, true));
            }
            Sending::Patch(bytes) => {
                self.held.insert(index, (bytes, false));
                self.chunks_sent += 1;
            }
        }
    }

    /// Every chunk of read block `seq` (ending before chunk `end`) to send
    /// has gone to the streams.
    pub fn handle_block_handed(&mut self, seq: u64, end: u64) {
        self.ledger.handle_block_handed(seq, end);
    }

    /// Probes and patches whose bytes are held (sent, not yet acknowledged).
    pub fn probes_held(&self) -> usize {
        self.held.len()
    }

    /// Where a new attempt resumes the scan ([`SendLedger::resume_point`]):
    /// it reads the chunks of its set from there
    /// ([`ChunkSet::at_or_after`]).
    pub fn resume_point(&self) -> u64 {
        self.ledger.resume_point()
    }

    /// A control message during the pass.
    pub fn handle_control(&mut self, msg: Msg) -> Result<SendEvent, SessionError> {
        match msg {
            Msg::Ack(a) => self.handle_ack(a.indices),
            Msg::Need(n) => self.handle_need(n).map(SendEvent::Send),
            Msg::Done(d) => parse_summary(d.summary).map(SendEvent::Done),
            Msg::Heartbeat(_) => Ok(SendEvent::Nothing),
            Msg::Failure(f) => Err(SessionError::Stopped(f.message)),
            other => Err(SessionError::peer(format!(
                "unexpected {} during the pass",
                wire::msg_name(&other)
            ))),
        }
    }

    fn handle_ack(&mut self, indices: Vec<u64>) -> Result<SendEvent, SessionError> {
        let mut entries = Vec::with_capacity(indices.len());
        let mut released_probes = 0;
        for i in indices {
            let h = self
                .ledger
                .handle_ack(i)
                .map_err(|e| SessionError::peer(e.to_string()))?;
            released_probes += usize::from(self.held.remove(&i).is_some());
            entries.push((i, h));
        }
        Ok(SendEvent::Acked {
            entries,
            released_probes,
        })
    }

    /// Answers the receiver's `Need` for a probed chunk (the patch of the
    /// blocks it names, or the whole chunk when it names them all), or for
    /// a patch it refused (the whole chunk).
    fn handle_need(&mut self, need: wire::Need) -> Result<OutChunk, SessionError> {
        let (Some((data, probe)), Some(hash)) =
            (self.held.get(&need.index), self.ledger.hash_of(need.index))
        else {
            return Err(SessionError::peer(format!(
                "receiver asked for blocks of chunk {}, which was not probed or patched",
                need.index
            )));
        };
        if self.finished {
            return Err(SessionError::peer(format!(
                "receiver asked for blocks of chunk {} after every probe was answered",
                need.index
            )));
        }
        let n = wire::blocks_in(data.len());
        if need.blocks.len() != n.div_ceil(8) {
            return Err(SessionError::peer(format!(
                "receiver asked for blocks of chunk {} with a bitmap of {} bytes (expected {})",
                need.index,
                need.blocks.len(),
                n.div_ceil(8)
            )));
        }
        let wanted = wire::named_blocks(&need.blocks, n).count();
        if *probe {
            self.policy.handle_answer(n, wanted);
        }
        self.chunks_sent += 1;
        let len = data.len() as u32;
        if wanted == n {
            let payload = data.clone();
            return Ok(OutChunk {
                index: need.index,
                hash,
                encoding: Encoding::Raw,
                len,
                blocks: Vec::new(),
                payload,
            });
        }
        let payload = Bytes::from(crate::patch::payload(data, &need.blocks));
        Ok(OutChunk {
            index: need.index,
            hash,
            encoding: Encoding::Patch,
            len,
            blocks: need.blocks,
            payload,
        })
    }

    /// Every chunk has gone and every probe is answered and acknowledged:
    /// the Finish message, counting each chunk frame sent (a probe counts
    /// once, when its patch or whole chunk leaves).
    pub fn finish(&mut self) -> Result<Msg, SessionError> {
        if !self.held.is_empty() {
            return Err(SessionError::peer(format!(
                "{} probes are still unanswered at the end of the pass",
                self.held.len()
            )));
        }
        self.finished = true;
        Ok(Msg::Finish(wire::Finish {
            chunks_sent: self.chunks_sent,
        }))
    }

    /// Chunk frames counted so far for Finish.
    pub fn chunks_sent(&self) -> u64 {
        self.chunks_sent
    }

    /// Checks the receiver's Done: every chunk acknowledged, and its root
    /// equal to the root of the sender's own table (`our_root`).
    pub fn check_done(&self, theirs: &Summary, our_root: &Hash) -> Result<(), SessionError> {
        if !self.ledger.all_acked() {
            return Err(SessionError::peer(
                "the receiver ended the pass with chunks unacknowledged",
            ));
        }
        if theirs.root != *our_root {
            return Err(SessionError::peer(format!(
                "after the pass the receiver's manifest root {} differs from ours {}; the next pass will rebuild our view from the receiver",
                manifest::to_hex(&theirs.root),
                manifest::to_hex(our_root)
            )));
        }
        Ok(())
    }
}
