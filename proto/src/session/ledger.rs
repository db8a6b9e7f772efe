//! The sender's ledger of one attempt: chunks in flight, read blocks handed
//! to the streams, and the resume point.
//!
//! Owns bookkeeping only: it never reads a device, a socket or a clock.

use std::collections::BTreeMap;
use std::fmt;

use crate::manifest::Hash;

/// What a sender knows of one attempt at a pass: which chunks are on their
/// way (sent, not yet acknowledged as durable), which read blocks have been
/// handed to the streams whole, and so where a new attempt must resume
/// after a lost link.
///
/// The pass scans a set of chunks from `start` on (a
/// [`crate::chunkset::ChunkSet`]) in read blocks, numbered by `seq` from 0
/// in scan order, each ending before a chunk index; blocks may finish out
/// of order (several hashing threads). Invariant:
/// [`SendLedger::resume_point`] is at most every chunk of the set not known
/// durable, so a new attempt over the set's chunks from there skips
/// nothing the target lacks.
#[derive(Debug, Clone)]
pub struct SendLedger {
    in_flight: BTreeMap<u64, Hash>,
    /// Blocks handed whole out of order: seq → the index their chunks end before.
    handed: BTreeMap<u64, u64>,
    /// Every block below this one has been handed to the streams whole.
    contiguous: u64,
    /// The scan has handed every chunk of the set below this index.
    scanned_to: u64,
}

/// The receiver acknowledged a chunk that is not on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnexpectedAck(pub u64);

impl fmt::Display for UnexpectedAck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "receiver acknowledged chunk {}, which was not sent",
            self.0
        )
    }
}

impl std::error::Error for UnexpectedAck {}

impl SendLedger {
    /// A ledger for an attempt whose scan starts at chunk `start` (the
    /// first chunk of its set).
    pub fn new(start: u64) -> SendLedger {
        SendLedger {
            in_flight: BTreeMap::new(),
            handed: BTreeMap::new(),
            contiguous: 0,
            scanned_to: start,
        }
    }

    /// Chunk `index` with hash `hash` goes to a stream (or is probed): it is
    /// on its way until acknowledged.
    pub fn handle_sent(&mut self, index: u64, hash: Hash) {
        self.in_flight.insert(index, hash);
    }

    /// Every chunk of read block `seq` (whose chunks end before index
    /// `end`) that had to be sent has been handed to the streams.
    pub fn handle_block_handed(&mut self, seq: u64, end: u64) {
        self.handed.insert(seq, end);
        while let Some(end) = self.handed.remove(&self.contiguous) {
            self.scanned_to = end;
            self.contiguous += 1;
        }
    }

    /// The receiver acknowledged chunk `index` as durable: the hash to
    /// record for it, or an error when it was not on its way.
    pub fn handle_ack(&mut self, index: u64) -> Result<Hash, UnexpectedAck> {
        self.in_flight.remove(&index).ok_or(UnexpectedAck(index))
    }

    /// The hash chunk `index` was sent with, while it is on its way.
    pub fn hash_of(&self, index: u64) -> Option<Hash> {
        self.in_flight.get(&index).copied()
    }

    /// Whether every chunk sent has been acknowledged.
    pub fn all_acked(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Where a new attempt resumes the scan: the first chunk on its way, or
    /// else the end of the blocks handed whole, whichever comes first.
    pub fn resume_point(&self) -> u64 {
        match self.in_flight.keys().next() {
            Some(&first) => first.min(self.scanned_to),
            None => self.scanned_to,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// xorshift64*: a deterministic stream of numbers.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    #[test]
    fn resumes_at_the_first_chunk_on_its_way() {
        let mut l = SendLedger::new(10);
        assert_eq!(l.resume_point(), 10);
        l.handle_sent(11, [1; 32]);
        l.handle_sent(13, [3; 32]);
        l.handle_block_handed(0, 14); // chunks 10..14
        assert_eq!(l.resume_point(), 11);
        assert_eq!(l.handle_ack(11), Ok([1; 32]));
        assert_eq!(l.resume_point(), 13);
        assert_eq!(l.handle_ack(13), Ok([3; 32]));
        assert_eq!(l.resume_point(), 14);
        assert!(l.all_acked());
        assert_eq!(l.handle_ack(13), Err(UnexpectedAck(13)));
    }

    #[test]
    fn blocks_handed_out_of_order_count_only_once_contiguous() {
        let mut l = SendLedger::new(0);
        l.handle_block_handed(1, 16);
        l.handle_block_handed(2, 24);
        assert_eq!(l.resume_point(), 0, "block 0 is not handed yet");
        l.handle_block_handed(0, 8);
        assert_eq!(l.resume_point(), 24);
        l.handle_block_handed(3, 32);
        l.handle_block_handed(4, 40);
        assert_eq!(l.resume_point(), 40);
    }

    /// Against a naive oracle, over random interleavings of sends, acks and
    /// blocks finishing out of order: the resume point never passes a chunk
    /// that is not durable, and is the largest such point the ledger can
    /// know.
    #[test]
    fn the_resume_point_never_skips_a_chunk_not_durable() {
        for seed in 1..200u64 {
            let mut rng = Rng(seed);
            let (start, per_block) = (rng.below(5), 1 + rng.below(4));
            let blocks = 1 + rng.below(12);
            let count = start + blocks * per_block - rng.below(per_block);
            let mut l = SendLedger::new(start);
            let mut durable: BTreeSet<u64> = (0..start).collect();
            let mut sent: Vec<u64> = Vec::new();
            let mut handed: BTreeSet<u64> = BTreeSet::new();
            let mut order: Vec<u64> = (0..blocks).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for seq in order {
                let first = start + seq * per_block;
                for i in first..(first + per_block).min(count) {
                    if rng.below(2) == 0 {
                        l.handle_sent(i, [i as u8; 32]);
                        sent.push(i);
                    } else {
                        durable.insert(i); // unchanged: the target holds it
                    }
                }
                l.handle_block_handed(seq, (first + per_block).min(count));
                handed.insert(seq);
                while !sent.is_empty() && rng.below(3) == 0 {
                    let k = sent.swap_remove(rng.below(sent.len() as u64) as usize);
                    assert_eq!(l.handle_ack(k), Ok([k as u8; 32]));
                    durable.insert(k);
                }
                let r = l.resume_point();
                assert!(
                    (start..r).all(|i| durable.contains(&i)),
                    "seed {seed}: resume point {r} passes a chunk not durable"
                );
                let contiguous = (0..).take_while(|s| handed.contains(s)).count() as u64;
                let oracle = sent
                    .iter()
                    .copied()
                    .min()
                    .unwrap_or(u64::MAX)
                    .min((start + contiguous * per_block).min(count));
                assert_eq!(r, oracle, "seed {seed}");
            }
        }
    }
}
