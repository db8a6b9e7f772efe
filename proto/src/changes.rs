//! Sets of changed 4 KiB blocks, as a change tracker records them between
//! two passes: sorted, merged runs of block indices, grown one write at a
//! time and taken whole by a pass.
//!
//! Owns the arithmetic from a kernel block operation (512-byte sectors) to
//! the 4 KiB blocks it touches, and from blocks to the byte ranges a pass
//! reads ([`crate::chunkset::Scope::Bytes`]). No I/O.

use std::collections::BTreeMap;
use std::ops::Range;

/// Bytes of a tracked block.
pub const BLOCK: u64 = 4096;
/// Bytes of a sector as the kernel's block layer counts them.
pub const SECTOR: u64 = 512;

/// The blocks a block operation of `sectors` sectors at `sector` touches
/// (any block it writes a byte of).
pub fn blocks_of_sectors(sector: u64, sectors: u64) -> Range<u64> {
    let start = sector.saturating_mul(SECTOR) / BLOCK;
    if sectors == 0 {
        return start..start;
    }
    let end = sector
        .saturating_add(sectors)
        .saturating_mul(SECTOR)
        .div_ceil(BLOCK);
    start..end.max(start)
}

/// A set of block indices as disjoint, non-adjacent runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockRuns {
    /// start → end of each run.
    runs: BTreeMap<u64, u64>,
    blocks: u64,
}

impl BlockRuns {
    /// No blocks.
    pub fn new() -> BlockRuns {
        BlockRuns::default()
    }

    /// Adds the blocks of `range`, merging with the runs it meets or touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // A run starting at or before `start` that reaches it.
        if let Some((&s, &e)) = self.runs.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.remove_run(s);
            }
        }
        // Runs starting inside (or touching) the new one.
        while let Some((&s, &e)) = self.runs.range(start..=end).next() {
            end = end.max(e);
            self.remove_run(s);
        }
        self.blocks += end - start;
        self.runs.insert(start, end);
    }

    fn remove_run(&mut self, start: u64) {
        if let Some(end) = self.runs.remove(&start) {
            self.blocks -= end - start;
        }
    }

    /// Adds every block of `other`.
    pub fn extend(&mut self, other: &BlockRuns) {
        for r in other.runs() {
            self.insert(r);
        }
    }

    /// The runs, ascending.
    pub fn runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.runs.iter().map(|(&s, &e)| s..e)
    }

    /// Number of runs.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// How many chunks of `chunk_blocks` blocks hold at least one block of
    /// the set: what a pass reading the set whole-chunk reads.
    pub fn chunks_touched(&self, chunk_blocks: u64) -> u64 {
        let cb = chunk_blocks.max(1);
        let mut count = 0;
        let mut last: Option<u64> = None;
        for r in self.runs() {
            let (first, end) = (r.start / cb, (r.end - 1) / cb);
            let from = match last {
                Some(l) if l >= first => l + 1,
                _ => first,
            };
            if end >= from {
                count += end - from + 1;
            }
            last = Some(end);
        }
        count
    }

    /// Whether no block is in the set.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Whether block `b` is in the set.
    pub fn contains(&self, b: u64) -> bool {
        self.runs
            .range(..=b)
            .next_back()
            .is_some_and(|(_, &e)| b < e)
    }

    /// Bit `i` (of byte `i / 8`, least significant first) set for each of
    /// blocks `first..first + n` in the set: a patch's block bitmap.
    pub fn bitmap(&self, first: u64, n: usize) -> Vec<u8> {
        let mut bits = vec![0u8; n.div_ceil(8)];
        let end = first + n as u64;
        let from = self
            .runs
            .range(..=first)
            .next_back()
            .map_or(first, |(&s, _)| s);
        for (&s, &e) in self.runs.range(from..end) {
            for b in s.max(first)..e.min(end) {
                let i = (b - first) as usize;
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        bits
    }

    /// The set as `(offset, length)` byte ranges, for a pass's scope.
    pub fn byte_ranges(&self) -> Vec<(u64, u64)> {
        self.runs()
            .map(|r| (r.start * BLOCK, (r.end - r.start) * BLOCK))
            .collect()
    }

    /// Takes the set, leaving it empty.
    pub fn take(&mut self) -> BlockRuns {
        std::mem::take(self)
    }

    /// The set of blocks overlapping `(offset, length)` byte ranges.
    pub fn from_byte_ranges(ranges: &[(u64, u64)]) -> BlockRuns {
        let mut set = BlockRuns::new();
        for &(o, l) in ranges {
            set.insert(o / BLOCK..o.saturating_add(l).div_ceil(BLOCK));
        }
        set
    }

    /// The set as flat little-endian `start, end` pairs (a cut or pending
    /// file's body).
    pub fn encode(&self) -> Vec<u8> {
        self.runs()
            .flat_map(|r| [r.start.to_le_bytes(), r.end.to_le_bytes()])
            .flatten()
            .collect()
    }

    /// Reads [`BlockRuns::encode`]'s form; `None` when it is not whole
    /// pairs of ordered runs.
    pub fn decode(bytes: &[u8]) -> Option<BlockRuns> {
        if !bytes.len().is_multiple_of(16) {
            return None;
        }
        let mut set = BlockRuns::new();
        for pair in bytes.chunks_exact(16) {
            let start = u64::from_le_bytes(pair[..8].try_into().ok()?);
            let end = u64::from_le_bytes(pair[8..].try_into().ok()?);
            if start >= end {
                return None;
            }
            set.insert(start..end);
        }
        Some(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn sectors_map_to_the_blocks_they_touch() {
        assert_eq!(blocks_of_sectors(0, 8), 0..1);
        assert_eq!(blocks_of_sectors(0, 1), 0..1);
        assert_eq!(blocks_of_sectors(7, 2), 0..2);
        assert_eq!(blocks_of_sectors(8, 8), 1..2);
        assert_eq!(blocks_of_sectors(9, 0), 1..1);
    }

    proptest! {
        #[test]
        fn chunks_touched_counts_each_chunk_once(ranges in proptest::collection::vec((0u64..300, 0u64..20), 0..40), cb in 1u64..20) {
            let mut set = BlockRuns::new();
            let mut naive = BTreeSet::new();
            for (s, n) in &ranges {
                set.insert(*s..s + n);
                naive.extend((*s..s + n).map(|b| b / cb));
            }
            prop_assert_eq!(set.chunks_touched(cb), naive.len() as u64);
        }

        #[test]
        fn runs_hold_exactly_the_blocks_inserted(ranges in proptest::collection::vec((0u64..300, 0u64..20), 0..40)) {
            let mut set = BlockRuns::new();
            let mut naive = BTreeSet::new();
            for (s, n) in &ranges {
                set.insert(*s..s + n);
                naive.extend(*s..s + n);
            }
            prop_assert_eq!(set.blocks(), naive.len() as u64);
            let all: BTreeSet<u64> = set.runs().flatten().collect();
            prop_assert_eq!(&all, &naive);
            // Runs are disjoint and never touch.
            let runs: Vec<_> = set.runs().collect();
            for w in runs.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            for b in 0..330 {
                prop_assert_eq!(set.contains(b), naive.contains(&b));
            }
            prop_assert_eq!(BlockRuns::decode(&set.encode()), Some(set.clone()));
            for first in [0u64, 5, 17, 100] {
                let bits = set.bitmap(first, 20);
                for i in 0..20usize {
                    let on = bits[i / 8] & (1 << (i % 8)) != 0;
                    prop_assert_eq!(on, naive.contains(&(first + i as u64)), "block {}", first + i as u64);
                }
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = BlockRuns::decode(&bytes);
        }
    }
}
