//! The receiver's side of a verify: checks the hello, decides the chunk
//! size and extent it hashes, names the chunks its driver must read and
//! hash fresh, packs their hashes into parts, and takes `Forget`s. Never
//! reads a device, a socket or a clock.

use std::collections::VecDeque;
use std::ops::Range;

use super::{asked_set, check_ranges, msg_name, verify_chunk, verify_extent, Refused, VerifyError};
use crate::chunk::{ChunkSize, Geometry};
use crate::manifest::ENTRY_LEN;
use crate::wire::{self, control::Msg, HashRun, RefuseCode, HASHES_PER_PART};

/// What the receiver's driver knows of the target, for
/// [`VerifyServer::handle_target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetInfo {
    /// The target's size in bytes (0 for a target file not created yet).
    pub size: u64,
    /// True when the target is a block device.
    pub is_block: bool,
    /// The chunk size of the volume's manifest, when it has one.
    pub own_chunk: Option<ChunkSize>,
    /// The source size the volume's manifest records, when it has one.
    pub recorded_size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The hello is accepted; the driver describes the target next.
    AwaitTarget,
    /// The driver reads and hashes what `poll_read` names.
    Reading,
    /// Every hash is out; the sender may heartbeat, forget or end.
    Listening,
    /// The sender ended the stream.
    Closed,
}

/// The receiver's verify exchange (see the module docs of `session::verify`).
///
/// Inputs: [`VerifyServer::new`] (the hello), [`VerifyServer::handle_target`],
/// [`VerifyServer::handle_hashes`] (the fresh hashes of the chunks
/// [`VerifyServer::poll_read`] named, in index order),
/// [`VerifyServer::handle_message`], [`VerifyServer::handle_forgotten`] and
/// [`VerifyServer::handle_closed`]. Outputs: [`VerifyServer::poll_transmit`],
/// [`VerifyServer::poll_read`], [`VerifyServer::poll_forget`].
#[derive(Debug)]
pub struct VerifyServer {
    state: State,
    asked_chunk: ChunkSize,
    source_size: u64,
    /// The hello's ranges (flattened pairs; empty: the whole extent).
    ranges: Vec<u64>,
    target_size: u64,
    geometry: Option<Geometry>,
    /// The runs of chunks still to hand out, and the next one's start.
    to_read: Vec<Range<u64>>,
    read_cursor: (usize, u64),
    /// Handed out by `poll_read`, not yet hashed, in order.
    outstanding: VecDeque<Range<u64>>,
    parts: Parts,
    outbox: VecDeque<Msg>,
    forgets: VecDeque<Vec<u64>>,
}

impl VerifyServer {
    /// Takes a verify hello; a refusal to send when its chunk size or its
    /// ranges are unacceptable.
    pub fn new(hello: &wire::Hello) -> Result<VerifyServer, Refused> {
        let asked_chunk = ChunkSize::new(u64::from(hello.chunk_size)).map_err(|e| Refused {
            code: RefuseCode::ChunkSize,
            message: e.to_string(),
        })?;
        check_ranges(&hello.ranges)?;
        Ok(VerifyServer {
            state: State::AwaitTarget,
            asked_chunk,
            source_size: hello.source_size,
            ranges: hello.ranges.clone(),
            target_size: 0,
            geometry: None,
            to_read: Vec::new(),
            read_cursor: (0, 0),
            outstanding: VecDeque::new(),
            parts: Parts::new(hello.ranges.is_empty()),
            outbox: VecDeque::new(),
            forgets: VecDeque::new(),
        })
    }

    /// The chunk size the sender asked for.
    pub fn asked_chunk(&self) -> ChunkSize {
        self.asked_chunk
    }

    /// The extent hashed, in the chunk size hashed in, once the target is known.
    pub fn geometry(&self) -> Option<&Geometry> {
        self.geometry.as_ref()
    }

    /// The target as the driver found it: decides the chunk size and the
    /// extent hashed, and queues the `Welcome`.
    pub fn handle_target(&mut self, target: TargetInfo) -> Result<(), VerifyError> {
        if self.state != State::AwaitTarget {
            return Err(VerifyError::NotReady("the target is already known"));
        }
        let chunk = verify_chunk(target.own_chunk, self.asked_chunk);
        // Both sides hash the common extent, so their chunks line up; but
        // the peer does not pick where a short last chunk ends.
        let extent = verify_extent(target.size, target.recorded_size, self.source_size, chunk);
        let geometry = Geometry::new(extent, chunk).map_err(VerifyError::Geometry)?;
        self.outbox.push_back(Msg::Welcome(wire::Welcome {
            version: wire::PROTOCOL_VERSION,
            target_size: target.size,
            chunk_size: chunk.bytes() as u32,
            summary: None,
            target_is_block: target.is_block,
            unsealed_cutover: String::new(),
        }));
        let set = asked_set(&geometry, &self.ranges);
        self.to_read = set.ranges().collect();
        self.read_cursor = (0, self.to_read.first().map_or(0, |r| r.start));
        self.target_size = target.size;
        self.geometry = Some(geometry);
        self.state = State::Reading;
        self.finish_if_read();
        Ok(())
    }

    /// The next run of chunks to read and hash fresh, in index order: the
    /// whole extent at once for a full verify (hash it in any pieces), at
    /// most [`HASHES_PER_PART`] chunks for a ranged one.
    pub fn poll_read(&mut self) -> Option<Range<u64>> {
        let (i, next) = self.read_cursor;
        let run = self.to_read.get(i)?.clone();
        let end = if self.parts.whole {
            run.end
        } else {
            run.end.min(next.saturating_add(HASHES_PER_PART as u64))
        };
        self.read_cursor = if end == run.end {
            (i + 1, self.to_read.get(i + 1).map_or(end, |r| r.start))
        } else {
            (i, end)
        };
        self.outstanding.push_back(next..end);
        Some(next..end)
    }

    /// Fresh hashes (whole 32-byte entries) of chunks `first..`, which must
    /// continue the runs [`VerifyServer::poll_read`] handed out, in order.
    pub fn handle_hashes(&mut self, first: u64, hashes: &[u8]) -> Result<(), VerifyError> {
        let n = (hashes.len() / ENTRY_LEN) as u64;
        let front = match self.outstanding.front_mut() {
            Some(r) if r.start == first && n <= r.end - r.start => r,
            _ => return Err(VerifyError::NotAsked(first)),
        };
        if !hashes.len().is_multiple_of(ENTRY_LEN) {
            return Err(VerifyError::NotAsked(first));
        }
        front.start += n;
        let run_done = front.is_empty();
        for (k, h) in hashes.chunks_exact(ENTRY_LEN).enumerate() {
            if let Some(part) = self.parts.push(first + k as u64, h) {
                self.outbox.push_back(Msg::VerifyPart(part));
            }
        }
        if run_done {
            self.outstanding.pop_front();
            if let Some(part) = self.parts.end_run() {
                self.outbox.push_back(Msg::VerifyPart(part));
            }
        }
        self.finish_if_read();
        Ok(())
    }

    /// A control message from the sender: heartbeats anywhere; `Forget`
    /// once every hash is out; nothing else.
    pub fn handle_message(&mut self, msg: Msg) -> Result<(), VerifyError> {
        match (self.state, msg) {
            (_, Msg::Heartbeat(_)) => Ok(()),
            (State::Listening, Msg::Forget(f)) => {
                let inside = f.ranges.len().is_multiple_of(2)
                    && f.ranges.chunks_exact(2).all(|p| {
                        p[0].checked_add(p[1])
                            .is_some_and(|end| end <= self.target_size)
                    });
                if !inside {
                    return Err(VerifyError::ForgetOutside(f.ranges.len()));
                }
                self.forgets.push_back(f.ranges);
                Ok(())
            }
            (_, other) => Err(VerifyError::Unexpected(msg_name(&other))),
        }
    }

    /// The byte ranges (flattened pairs) of the next `Forget` to apply to
    /// the volume's manifest; answer with [`VerifyServer::handle_forgotten`].
    pub fn poll_forget(&mut self) -> Option<Vec<u64>> {
        self.forgets.front().cloned()
    }

    /// The ranges of the last [`VerifyServer::poll_forget`] are forgotten: queues `Done`.
    pub fn handle_forgotten(&mut self) -> Result<(), VerifyError> {
        if self.forgets.pop_front().is_none() {
            return Err(VerifyError::NotReady("no forget is pending"));
        }
        self.outbox
            .push_back(Msg::Done(wire::Done { summary: None }));
        Ok(())
    }

    /// The sender ended the control stream: the session is over.
    pub fn handle_closed(&mut self) {
        self.state = State::Closed;
    }

    /// True once every hash is out (the idle deadline runs from here).
    pub fn hashes_sent(&self) -> bool {
        matches!(self.state, State::Listening | State::Closed)
    }

    /// True once the sender ended the session.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Msg> {
        self.outbox.pop_front()
    }

    /// Every chunk read and hashed: the last part goes out.
    fn finish_if_read(&mut self) {
        let nothing_left = self.read_cursor.0 >= self.to_read.len() && self.outstanding.is_empty();
        if self.state == State::Reading && nothing_left {
            self.outbox.push_back(Msg::VerifyPart(self.parts.finish()));
            self.state = State::Listening;
        }
    }
}

/// Packs hashes into parts, as this receiver has always sent them. A full
/// verify sends a part whenever [`HASHES_PER_PART`] hashes are in, and the
/// rest (possibly none) flagged last. A ranged verify sends one part per
/// run read, holding each back until the next is read so that the last
/// run's part carries the flag (an empty part when nothing was read).
#[derive(Debug)]
struct Parts {
    whole: bool,
    first: u64,
    run: Vec<u8>,
    held: Option<HashRun>,
}

impl Parts {
    fn new(whole: bool) -> Parts {
        Parts {
            whole,
            first: 0,
            run: Vec::new(),
            held: None,
        }
    }

    /// Chunk `index`'s hash; a full part to send, if it completes one.
    fn push(&mut self, index: u64, hash: &[u8]) -> Option<HashRun> {
        if self.run.is_empty() {
            self.first = index;
        }
        self.run.extend_from_slice(hash);
        if self.whole && self.run.len() >= HASHES_PER_PART * ENTRY_LEN {
            return Some(self.take(false));
        }
        None
    }

    /// A run handed out by `poll_read` is all hashed; a part to send, if
    /// one was held back (ranged verify only).
    fn end_run(&mut self) -> Option<HashRun> {
        if self.whole {
            return None;
        }
        let part = self.take(false);
        self.held.replace(part)
    }

    /// The last part.
    fn finish(&mut self) -> HashRun {
        let mut last = if self.whole {
            self.take(true)
        } else {
            self.held.take().unwrap_or_default()
        };
        last.last = true;
        last
    }

    fn take(&mut self, last: bool) -> HashRun {
        HashRun {
            first: self.first,
            hashes: std::mem::take(&mut self.run).into(),
            last,
        }
    }
}
