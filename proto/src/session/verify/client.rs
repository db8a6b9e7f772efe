//! The sender's side of a verify: asks, takes the receiver's fresh hashes
//! in order into a table, compares them with the source's and asks the
//! receiver to forget what differs. Never reads a device or a socket.

use std::collections::VecDeque;
use std::ops::Range;

use super::{asked_set, compare_in, msg_name, Refused, VerifyError, VerifyOutcome};
use crate::chunk::{ChunkSize, Geometry};
use crate::chunkset::ChunkSet;
use crate::manifest::ENTRY_LEN;
use crate::wire::{self, control::Msg, HashRun, Mode, RefuseCode};

/// What a sender asks a verify for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyRequest {
    /// The exported volume's name.
    pub volume: String,
    /// The source's size in bytes.
    pub source_size: u64,
    /// The chunk size asked for (the receiver answers the one it hashes in).
    pub chunk: ChunkSize,
    /// Flattened `(offset, length)` byte ranges to compare; empty: all.
    pub ranges: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The hello is out; a welcome or a refusal comes next.
    AwaitWelcome,
    /// Taking the receiver's hashes.
    Receiving,
    /// Every hash is in; the source's come next.
    Received,
    /// Compared; the driver says what to forget.
    Compared,
    /// A `Forget` is out; `Done` comes next.
    AwaitDone,
    /// The exchange is over.
    Closed,
}

/// The sender's verify exchange (see the module docs of `session::verify`).
///
/// Inputs: [`VerifyClient::handle_message`] (each control message, in
/// order), [`VerifyClient::handle_closed`] (the receiver ended the stream),
/// [`VerifyClient::handle_source_hashes`] (the source's table, hashed by the
/// driver over [`VerifyClient::poll_read`]'s chunks) and
/// [`VerifyClient::forget`]. Outputs: [`VerifyClient::poll_transmit`],
/// [`VerifyClient::poll_read`], [`VerifyClient::poll_outcome`].
#[derive(Debug)]
pub struct VerifyClient {
    state: State,
    ranges: Vec<u64>,
    source_size: u64,
    outbox: VecDeque<Msg>,
    welcome: Option<wire::Welcome>,
    asked: Option<ChunkSet>,
    /// The receiver's hashes, one entry per chunk of the geometry (zero
    /// where none came).
    table: Vec<u8>,
    /// The run of `asked` the next part continues, and the chunk it starts at.
    cursor: (usize, u64),
    read_polled: bool,
    outcome: Option<VerifyOutcome>,
}

impl VerifyClient {
    /// A verify of `request`: its `Hello` is the first message to send.
    pub fn new(request: VerifyRequest) -> VerifyClient {
        let hello = wire::Hello {
            version: wire::PROTOCOL_VERSION,
            volume: request.volume,
            mode: Mode::Verify as i32,
            source_size: request.source_size,
            chunk_size: request.chunk.bytes() as u32,
            chunk_size_explicit: true,
            known: None,
            ranges: request.ranges.clone(),
            ..Default::default()
        };
        VerifyClient {
            state: State::AwaitWelcome,
            ranges: request.ranges,
            source_size: request.source_size,
            outbox: VecDeque::from([Msg::Hello(hello)]),
            welcome: None,
            asked: None,
            table: Vec::new(),
            cursor: (0, 0),
            read_polled: false,
            outcome: None,
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Msg> {
        self.outbox.pop_front()
    }

    /// The chunks the driver must hash on the source side, once the
    /// receiver has answered: every chunk of the compared extent, or those
    /// the ranges overlap. Given once.
    pub fn poll_read(&mut self) -> Option<ChunkSet> {
        let asked = self.asked.as_ref()?;
        if self.read_polled {
            return None;
        }
        self.read_polled = true;
        Some(asked.clone())
    }

    /// The receiver's welcome, once it came.
    pub fn welcome(&self) -> Option<&wire::Welcome> {
        self.welcome.as_ref()
    }

    /// The compared extent, in the chunk size the receiver hashes in.
    pub fn geometry(&self) -> Option<&Geometry> {
        self.asked.as_ref().map(ChunkSet::geometry)
    }

    /// True once every hash of the receiver is in.
    pub fn hashes_received(&self) -> bool {
        self.asked.is_some() && !matches!(self.state, State::AwaitWelcome | State::Receiving)
    }

    /// True once the exchange is over (the driver ends the session).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The outcome, once the comparison or a refusal decided it.
    pub fn poll_outcome(&mut self) -> Option<VerifyOutcome> {
        self.outcome.take()
    }

    /// Takes the receiver's table of hashes (one entry per chunk, zero
    /// where none came), for a driver that compares on its own.
    pub fn take_table(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.table)
    }

    /// A control message from the receiver.
    pub fn handle_message(&mut self, msg: Msg) -> Result<(), VerifyError> {
        if matches!(msg, Msg::Heartbeat(_)) {
            return Ok(());
        }
        match (self.state, msg) {
            (State::AwaitWelcome, Msg::Welcome(w)) => self.handle_welcome(w),
            (State::AwaitWelcome, Msg::Refusal(r)) => {
                let code = RefuseCode::try_from(r.code).unwrap_or(RefuseCode::Unspecified);
                let message = r.message;
                self.outcome = Some(VerifyOutcome::Refused(Refused { code, message }));
                self.state = State::Closed;
                Ok(())
            }
            (State::AwaitWelcome, other) => Err(VerifyError::NotWelcome(msg_name(&other))),
            (State::Receiving, Msg::VerifyPart(run)) => self.handle_part(run),
            (State::AwaitDone, Msg::Done(_)) => {
                self.state = State::Closed;
                Ok(())
            }
            (State::AwaitDone, _) => Err(VerifyError::ForgetUnconfirmed),
            (_, other) => Err(VerifyError::NotHashes(msg_name(&other))),
        }
    }

    /// The receiver ended the control stream.
    pub fn handle_closed(&mut self) -> Result<(), VerifyError> {
        match self.state {
            State::AwaitWelcome | State::Receiving => Err(VerifyError::ClosedDuringVerify),
            State::AwaitDone => Err(VerifyError::ForgetUnconfirmed),
            State::Received | State::Compared | State::Closed => Ok(()),
        }
    }

    /// The source's table of hashes over [`VerifyClient::poll_read`]'s
    /// chunks: compares it with the receiver's over those chunks; the
    /// outcome follows from [`VerifyClient::poll_outcome`].
    pub fn handle_source_hashes(&mut self, ours: &[u8]) -> Result<(), VerifyError> {
        let asked = match (&self.asked, self.state) {
            (Some(a), State::Received) => a,
            _ => return Err(VerifyError::NotReady("source hashes before the target's")),
        };
        let differing = compare_in(asked, ours, &self.table);
        self.outcome = Some(if differing.is_empty() {
            VerifyOutcome::Identical
        } else {
            VerifyOutcome::Differing(differing)
        });
        self.state = State::Compared;
        Ok(())
    }

    /// Ends the exchange: asks the receiver to forget the manifest entries
    /// overlapping `ranges` (`(offset, length)` pairs; only once its hashes
    /// are in) and waits for its `Done`, or, with none, closes at once, at
    /// any step (a driver abandoning a verify).
    pub fn forget(&mut self, ranges: &[(u64, u64)]) -> Result<(), VerifyError> {
        if ranges.is_empty() {
            self.state = State::Closed;
            return Ok(());
        }
        if !matches!(self.state, State::Received | State::Compared) {
            return Err(VerifyError::NotReady("forget before the hashes are in"));
        }
        let flat = ranges.iter().flat_map(|&(o, l)| [o, l]).collect();
        self.outbox
            .push_back(Msg::Forget(wire::Forget { ranges: flat }));
        self.state = State::AwaitDone;
        Ok(())
    }

    fn handle_welcome(&mut self, w: wire::Welcome) -> Result<(), VerifyError> {
        if w.version != wire::PROTOCOL_VERSION {
            return Err(VerifyError::Version(w.version));
        }
        // The receiver hashes in the volume's own chunk size, whatever we asked.
        let chunk = ChunkSize::new(u64::from(w.chunk_size))
            .map_err(|_| VerifyError::ChunkSize(w.chunk_size))?;
        let extent = self.source_size.min(w.target_size);
        let geometry = Geometry::new(extent, chunk).map_err(VerifyError::Geometry)?;
        let asked = asked_set(&geometry, &self.ranges);
        self.table = vec![0u8; geometry.chunk_count() as usize * ENTRY_LEN];
        self.cursor = (0, asked.ranges().next().map_or(0, |r| r.start));
        self.asked = Some(asked);
        self.welcome = Some(w);
        self.state = State::Receiving;
        Ok(())
    }

    /// A part of hashes: it must continue exactly where the last one
    /// ended, inside one run of the chunks asked for.
    fn handle_part(&mut self, run: HashRun) -> Result<(), VerifyError> {
        if !run.hashes.len().is_multiple_of(ENTRY_LEN) {
            return Err(VerifyError::HashesOutside);
        }
        let n = (run.hashes.len() / ENTRY_LEN) as u64;
        if n > 0 {
            let span = self.place(run.first, n)?;
            let at = |i: u64| i as usize * ENTRY_LEN;
            self.table[at(span.start)..at(span.end)].copy_from_slice(&run.hashes);
        }
        if run.last {
            self.check_complete()?;
            self.state = State::Received;
        }
        Ok(())
    }

    /// Where `n` hashes starting at chunk `first` go: checked against the
    /// volume and the cursor through the chunks asked for, which advances.
    fn place(&mut self, first: u64, n: u64) -> Result<Range<u64>, VerifyError> {
        let Some(asked) = &self.asked else {
            return Err(VerifyError::HashesOutside);
        };
        let end = first
            .checked_add(n)
            .filter(|&e| e <= asked.geometry().chunk_count())
            .ok_or(VerifyError::HashesOutside)?;
        let (run_index, next) = self.cursor;
        let run = asked.ranges().nth(run_index);
        match run {
            Some(r) if first == next && end <= r.end => {
                self.cursor = if end == r.end {
                    let following = asked.ranges().nth(run_index + 1);
                    (run_index + 1, following.map_or(end, |r| r.start))
                } else {
                    (run_index, end)
                };
                Ok(first..end)
            }
            _ => Err(VerifyError::HashesOutOfOrder {
                expected: next,
                got: first,
            }),
        }
    }

    /// At the last part: every chunk asked for has its hash, but for the
    /// volume's last chunk when it is short (a receiver ends a short chunk
    /// only where it knows an end; see `verify_extent`).
    fn check_complete(&self) -> Result<(), VerifyError> {
        let Some(asked) = &self.asked else {
            return Err(VerifyError::HashesOutside);
        };
        let (run_index, next) = self.cursor;
        if run_index >= asked.range_count() {
            return Ok(());
        }
        let g = asked.geometry();
        let count = g.chunk_count();
        let short_last = g.size() % g.chunk_size().bytes() != 0;
        if short_last && next == count - 1 && run_index + 1 == asked.range_count() {
            return Ok(());
        }
        Err(VerifyError::HashesMissing(next))
    }
}
