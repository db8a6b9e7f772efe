//! Sets of chunk indices: what a pass, a proof or a ranged verify walks.
//!
//! Owns [`ChunkSet`], the chunks of one [`Geometry`] kept as sorted, merged,
//! non-overlapping runs of indices, and with it the one conversion between
//! byte ranges (`(offset, length)` pairs, as verify and forget messages carry
//! them) and chunk indices: byte ranges come in clipped to the volume, and go
//! out coalesced, adjacent chunks merged.
//!
//! A set costs memory by its runs, never by its chunks: the whole of a
//! 256 TiB volume is one run, and iterating over its indices or cutting it
//! into parts for the wire is lazy. Must not touch: I/O, wire framing (it
//! hands out the numbers a message carries, it does not encode them).

use std::iter::FusedIterator;
use std::ops::{Bound, Range, RangeBounds};

use crate::chunk::Geometry;

/// Chunk indices of one volume, as sorted runs (see the module docs).
///
/// Invariants: every run is non-empty and lies below the geometry's chunk
/// count; runs are sorted, and neither overlap nor touch (adjacent runs are
/// merged), so the runs of a set are exactly its maximal runs of
/// consecutive indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSet {
    geometry: Geometry,
    runs: Vec<Range<u64>>,
    len: u64,
}

impl ChunkSet {
    /// No chunks of `geometry`.
    pub fn empty(geometry: &Geometry) -> Self {
        ChunkSet {
            geometry: *geometry,
            runs: Vec::new(),
            len: 0,
        }
    }

    /// Every chunk of `geometry`.
    pub fn all(geometry: &Geometry) -> Self {
        Self::span(geometry, ..)
    }

    /// The chunks of `geometry` whose indices lie in `indices`, clipped to
    /// the volume: `span(g, first..)` is what remains of a pass resumed at
    /// chunk `first`.
    pub fn span(geometry: &Geometry, indices: impl RangeBounds<u64>) -> Self {
        let start = match indices.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match indices.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        Self::from_runs(geometry, std::iter::once(start..end).collect())
    }

    /// The chunks of this set at index `first` or later: what remains of a
    /// pass over the set resumed at chunk `first`.
    pub fn at_or_after(&self, first: u64) -> ChunkSet {
        let runs = self
            .runs
            .iter()
            .filter(|r| r.end > first)
            .map(|r| r.start.max(first)..r.end)
            .collect();
        Self::from_normal_runs(&self.geometry, runs)
    }

    /// The first chunk of the set, or the chunk count when it is empty.
    pub fn first(&self) -> u64 {
        self.runs
            .first()
            .map_or(self.geometry.chunk_count(), |r| r.start)
    }

    /// The chunks of `geometry` named by `indices`, in any order, repeats
    /// allowed; indices past the end are ignored. Memory grows with the
    /// runs the indices form in the order given, not with their number.
    pub fn from_indices(geometry: &Geometry, indices: impl IntoIterator<Item = u64>) -> Self {
        let count = geometry.chunk_count();
        let mut runs: Vec<Range<u64>> = Vec::new();
        for i in indices.into_iter().filter(|&i| i < count) {
            match runs.last_mut() {
                Some(r) if r.end == i => r.end += 1,
                Some(r) if r.contains(&i) => {}
                _ => runs.push(i..i + 1),
            }
        }
        Self::from_runs(geometry, runs)
    }

    /// The chunks of `geometry` overlapping byte ranges given as
    /// `(offset, length)` pairs, in any order, overlapping or not. Empty
    /// ranges and bytes past the end of the volume are ignored.
    pub fn from_byte_ranges(
        geometry: &Geometry,
        ranges: impl IntoIterator<Item = (u64, u64)>,
    ) -> Self {
        let runs = ranges
            .into_iter()
            .filter_map(|(offset, len)| chunks_of_bytes(geometry, offset, len))
            .collect();
        Self::from_runs(geometry, runs)
    }

    /// [`ChunkSet::from_byte_ranges`] over flattened pairs
    /// (`offset, length, offset, length, …`), as verify and forget messages
    /// carry them; a trailing unpaired number is ignored.
    pub fn from_flat_byte_ranges(geometry: &Geometry, flat: &[u64]) -> Self {
        Self::from_byte_ranges(geometry, flat.chunks_exact(2).map(|p| (p[0], p[1])))
    }

    /// Builds a set out of runs in any order: clipped to the volume, empty
    /// runs dropped, sorted, overlapping and adjacent runs merged.
    fn from_runs(geometry: &Geometry, mut runs: Vec<Range<u64>>) -> Self {
        let count = geometry.chunk_count();
        for r in runs.iter_mut() {
            r.end = r.end.min(count);
        }
        runs.retain(|r| r.start < r.end);
        runs.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(runs.len());
        for r in runs {
            match merged.last_mut() {
                Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Self::from_normal_runs(geometry, merged)
    }

    /// Wraps runs that already keep the invariants.
    fn from_normal_runs(geometry: &Geometry, runs: Vec<Range<u64>>) -> Self {
        let len = runs.iter().map(|r| r.end - r.start).sum();
        ChunkSet {
            geometry: *geometry,
            runs,
            len,
        }
    }

    /// The same indices in `geometry` (another extent of the volume, in
    /// the same chunk size), those past its end dropped.
    pub fn clip_to(&self, geometry: &Geometry) -> ChunkSet {
        Self::from_runs(geometry, self.runs.clone())
    }

    /// The chunks in either set, in the geometry of `self` (`other`'s
    /// indices past its end dropped).
    pub fn union(&self, other: &ChunkSet) -> ChunkSet {
        let runs = self.runs.iter().chain(&other.runs).cloned().collect();
        Self::from_runs(&self.geometry, runs)
    }

    /// The geometry the indices belong to.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Number of chunks in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the set holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Number of runs of consecutive chunks (each one byte range on the wire).
    pub fn range_count(&self) -> usize {
        self.runs.len()
    }

    /// True when chunk `index` is in the set.
    pub fn contains(&self, index: u64) -> bool {
        let after = self.runs.partition_point(|r| r.start <= index);
        after > 0 && self.runs[after - 1].contains(&index)
    }

    /// The indices, ascending, one at a time (never collected).
    pub fn indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(Range::clone)
    }

    /// The maximal runs of consecutive indices, ascending.
    pub fn ranges(&self) -> impl ExactSizeIterator<Item = Range<u64>> + '_ {
        self.runs.iter().cloned()
    }

    /// The runs cut into pieces of at most `max_chunks` consecutive
    /// indices (a `max_chunks` of 0 counts as 1), ascending: the shape of
    /// a stream of hash parts.
    pub fn ranges_at_most(&self, max_chunks: u64) -> impl Iterator<Item = Range<u64>> + '_ {
        let step = max_chunks.max(1);
        self.runs.iter().flat_map(move |r| {
            let r = r.clone();
            (r.start..r.end)
                .step_by(usize::try_from(step).unwrap_or(usize::MAX))
                .map(move |s| s..s.saturating_add(step).min(r.end))
        })
    }

    /// The chunks as coalesced `(offset, length)` byte ranges, ascending,
    /// one per run (the last chunk of the volume may be short).
    pub fn byte_ranges(&self) -> impl ExactSizeIterator<Item = (u64, u64)> + '_ {
        let (chunk, size) = (self.geometry.chunk_size().bytes(), self.geometry.size());
        self.runs.iter().map(move |r| {
            // Runs lie below the chunk count, so `r.start * chunk < size`.
            let start = r.start * chunk;
            let end = r.end.saturating_mul(chunk).min(size);
            (start, end - start)
        })
    }

    /// [`ChunkSet::byte_ranges`] flattened (`offset, length, …`), as verify
    /// and forget messages carry them.
    pub fn flat_byte_ranges(&self) -> Vec<u64> {
        self.byte_ranges().flat_map(|(o, l)| [o, l]).collect()
    }

    /// The set cut into consecutive parts of at most `max_ranges` runs each
    /// (a `max_ranges` of 0 counts as 1), ascending: what one verify
    /// request may name.
    pub fn parts_by_ranges(&self, max_ranges: usize) -> impl Iterator<Item = ChunkSet> + '_ {
        self.runs
            .chunks(max_ranges.max(1))
            .map(|runs| Self::from_normal_runs(&self.geometry, runs.to_vec()))
    }

    /// The set cut into consecutive parts of at most `max_chunks` chunks
    /// each (every part but the last holds exactly that many; a
    /// `max_chunks` of 0 counts as 1), ascending. Lazy: a part is built
    /// only when the iterator reaches it.
    pub fn parts_by_chunks(&self, max_chunks: u64) -> PartsByChunks<'_> {
        PartsByChunks {
            set: self,
            max: max_chunks.max(1),
            run: 0,
            next: self.runs.first().map_or(0, |r| r.start),
        }
    }
}

/// What a pass reads, before the chunk size is agreed: every chunk, or
/// the chunks overlapping byte ranges (a record of changed blocks gives
/// them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every chunk of the volume.
    Full,
    /// The chunks overlapping these `(offset, length)` byte ranges.
    Bytes(Vec<(u64, u64)>),
}

impl Scope {
    /// The chunks of `geometry` the pass reads.
    pub fn chunks(&self, geometry: &Geometry) -> ChunkSet {
        match self {
            Scope::Full => ChunkSet::all(geometry),
            Scope::Bytes(ranges) => ChunkSet::from_byte_ranges(geometry, ranges.iter().copied()),
        }
    }
}

/// The chunk indices, as a half-open run, overlapping `len` bytes at
/// `offset`, clipped to the volume; `None` when no byte of the volume is
/// named.
fn chunks_of_bytes(geometry: &Geometry, offset: u64, len: u64) -> Option<Range<u64>> {
    if len == 0 {
        return None;
    }
    let first = geometry.chunk_of(offset)?;
    // `offset` lies in the volume, so the volume has a last byte.
    let last_byte = offset.saturating_add(len - 1).min(geometry.size() - 1);
    let last = geometry.chunk_of(last_byte)?;
    Some(first..last + 1)
}

/// Iterator over the parts of a [`ChunkSet`] of bounded size, from
/// [`ChunkSet::parts_by_chunks`].
#[derive(Debug, Clone)]
pub struct PartsByChunks<'a> {
    set: &'a ChunkSet,
    max: u64,
    /// The run the next part starts in.
    run: usize,
    /// The index the next part starts at, inside that run.
    next: u64,
}

impl Iterator for PartsByChunks<'_> {
    type Item = ChunkSet;

    fn next(&mut self) -> Option<ChunkSet> {
        let runs = &self.set.runs;
        let mut left = self.max;
        let mut part = Vec::new();
        while left > 0 && self.run < runs.len() {
            let r = &runs[self.run];
            let end = r.end.min(self.next.saturating_add(left));
            part.push(self.next..end);
            left -= end - self.next;
            if end == r.end {
                self.run += 1;
                self.next = runs.get(self.run).map_or(0, |r| r.start);
            } else {
                self.next = end;
            }
        }
        (!part.is_empty()).then(|| ChunkSet::from_normal_runs(&self.set.geometry, part))
    }
}

impl FusedIterator for PartsByChunks<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkSize;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const C: u64 = 4096;

    fn geometry(size: u64) -> Geometry {
        Geometry::new(size, ChunkSize::new(C).unwrap()).unwrap()
    }

    /// The oracle: every chunk whose bytes meet one of the ranges, found by
    /// testing each chunk against each range.
    fn naive_bytes(g: &Geometry, ranges: &[(u64, u64)]) -> BTreeSet<u64> {
        (0..g.chunk_count())
            .filter(|&i| {
                let c = g.range(i).unwrap();
                ranges.iter().any(|&(o, l)| {
                    let end = o.saturating_add(l);
                    l > 0 && o < c.end && c.start < end
                })
            })
            .collect()
    }

    /// The oracle's maximal runs of consecutive indices.
    fn naive_runs(s: &BTreeSet<u64>) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for &i in s {
            match runs.last_mut() {
                Some(r) if r.end == i => r.end += 1,
                _ => runs.push(i..i + 1),
            }
        }
        runs
    }

    /// What `plan::coalesce` did before sets: a byte range per chunk,
    /// merged with the previous one when they touch.
    fn naive_coalesce(g: &Geometry, s: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &i in s {
            let r = g.range(i).unwrap();
            match out.last_mut() {
                Some((o, l)) if *o + *l == r.start => *l += r.end - r.start,
                _ => out.push((r.start, r.end - r.start)),
            }
        }
        out
    }

    /// Checks every query of `set` against the oracle `want`.
    fn agrees(set: &ChunkSet, want: &BTreeSet<u64>) -> Result<(), TestCaseError> {
        let g = *set.geometry();
        prop_assert_eq!(set.indices().collect::<BTreeSet<_>>(), want.clone());
        prop_assert!(set.indices().zip(set.indices().skip(1)).all(|(a, b)| a < b));
        prop_assert_eq!(set.len(), want.len() as u64);
        prop_assert_eq!(set.is_empty(), want.is_empty());
        prop_assert_eq!(set.ranges().collect::<Vec<_>>(), naive_runs(want));
        prop_assert_eq!(set.range_count(), naive_runs(want).len());
        for i in 0..g.chunk_count() + 3 {
            prop_assert_eq!(set.contains(i), want.contains(&i), "index {}", i);
        }
        prop_assert_eq!(
            set.byte_ranges().collect::<Vec<_>>(),
            naive_coalesce(&g, want)
        );
        Ok(())
    }

    /// Volume sizes from empty to 40 chunks, often with a short last chunk.
    fn sizes() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0u64), 1u64..40 * C, (1u64..40).prop_map(|n| n * C)]
    }

    /// Offsets and lengths near chunk boundaries, past the end, and huge.
    fn byte_ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
        let number = prop_oneof![
            4 => 0u64..45 * C,
            2 => (0u64..45, -2i64..=2).prop_map(|(n, d)| (n * C).saturating_add_signed(d)),
            1 => Just(0u64),
            1 => Just(u64::MAX),
            1 => any::<u64>(),
        ];
        proptest::collection::vec((number.clone(), number), 0..12)
    }

    fn indices() -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::vec(prop_oneof![8 => 0u64..45, 1 => any::<u64>()], 0..60)
    }

    proptest! {
        #[test]
        fn the_remainder_after_a_resume_point_is_the_set_from_there(
            size in sizes(),
            ranges in byte_ranges(),
            first in 0u64..2000,
        ) {
            let g = geometry(size);
            let set = ChunkSet::from_byte_ranges(&g, ranges.iter().copied());
            let rest = set.at_or_after(first);
            let want: BTreeSet<u64> = naive_bytes(&g, &ranges).into_iter().filter(|&i| i >= first).collect();
            agrees(&rest, &want)?;
            prop_assert_eq!(rest.first(), want.iter().next().copied().unwrap_or(g.chunk_count()));
            prop_assert_eq!(Scope::Bytes(ranges.clone()).chunks(&g), set);
            prop_assert_eq!(Scope::Full.chunks(&g), ChunkSet::all(&g));
        }

        #[test]
        fn byte_ranges_become_the_chunks_they_touch(size in sizes(), ranges in byte_ranges()) {
            let g = geometry(size);
            let set = ChunkSet::from_byte_ranges(&g, ranges.iter().copied());
            agrees(&set, &naive_bytes(&g, &ranges))?;
            let flat: Vec<u64> = ranges.iter().flat_map(|&(o, l)| [o, l]).collect();
            prop_assert_eq!(&ChunkSet::from_flat_byte_ranges(&g, &flat), &set);
            // Back to bytes and in again: the same chunks.
            let back = ChunkSet::from_flat_byte_ranges(&g, &set.flat_byte_ranges());
            prop_assert_eq!(back, set);
        }

        #[test]
        fn indices_in_any_order(size in sizes(), idx in indices()) {
            let g = geometry(size);
            let want: BTreeSet<u64> = idx.iter().copied().filter(|&i| i < g.chunk_count()).collect();
            agrees(&ChunkSet::from_indices(&g, idx.iter().copied()), &want)?;
            agrees(&ChunkSet::from_indices(&g, want.iter().copied()), &want)?;
        }

        #[test]
        fn spans_are_clipped(size in sizes(), a in 0u64..50, b in 0u64..50) {
            let g = geometry(size);
            let n = g.chunk_count();
            let want = |r: Range<u64>| r.filter(|&i| i < n).collect::<BTreeSet<u64>>();
            agrees(&ChunkSet::span(&g, a..b), &want(a..b))?;
            agrees(&ChunkSet::span(&g, a..=b), &want(a..b + 1))?;
            agrees(&ChunkSet::span(&g, a..), &want(a..n))?;
            agrees(&ChunkSet::span(&g, ..b), &want(0..b))?;
            agrees(&ChunkSet::all(&g), &want(0..n))?;
            agrees(&ChunkSet::empty(&g), &BTreeSet::new())?;
        }

        #[test]
        fn union_and_clip(size in sizes(), other in sizes(), a in indices(), b in indices()) {
            let (g, h) = (geometry(size), geometry(other));
            let (x, y) = (ChunkSet::from_indices(&g, a), ChunkSet::from_indices(&h, b));
            let set = |s: &ChunkSet| s.indices().collect::<BTreeSet<u64>>();
            let mut want = set(&x);
            want.extend(set(&y).into_iter().filter(|&i| i < g.chunk_count()));
            agrees(&x.union(&y), &want)?;
            let clipped = set(&x).into_iter().filter(|&i| i < h.chunk_count()).collect();
            let c = x.clip_to(&h);
            prop_assert_eq!(c.geometry(), &h);
            agrees(&c, &clipped)?;
        }

        #[test]
        fn parts_by_ranges_cover_the_set_in_order(
            size in sizes(), idx in indices(), max in 0usize..5,
        ) {
            let g = geometry(size);
            let set = ChunkSet::from_indices(&g, idx);
            let parts: Vec<ChunkSet> = set.parts_by_ranges(max).collect();
            prop_assert_eq!(parts.len(), set.range_count().div_ceil(max.max(1)));
            for p in &parts {
                prop_assert!(!p.is_empty() && p.range_count() <= max.max(1));
            }
            let joined: Vec<u64> = parts.iter().flat_map(|p| p.indices().collect::<Vec<_>>()).collect();
            prop_assert_eq!(joined, set.indices().collect::<Vec<_>>());
        }

        #[test]
        fn parts_by_chunks_are_full_but_the_last(
            size in sizes(), idx in indices(), max in 0u64..7,
        ) {
            let g = geometry(size);
            let set = ChunkSet::from_indices(&g, idx);
            let parts: Vec<ChunkSet> = set.parts_by_chunks(max).collect();
            prop_assert_eq!(parts.len() as u64, set.len().div_ceil(max.max(1)));
            for (k, p) in parts.iter().enumerate() {
                prop_assert!(!p.is_empty() && p.len() <= max.max(1));
                if k + 1 < parts.len() {
                    prop_assert_eq!(p.len(), max.max(1));
                }
                let own: BTreeSet<u64> = p.indices().collect();
                agrees(p, &own)?;
            }
            let joined: Vec<u64> = parts.iter().flat_map(|p| p.indices().collect::<Vec<_>>()).collect();
            prop_assert_eq!(joined, set.indices().collect::<Vec<_>>());
        }

        #[test]
        fn bounded_ranges_stay_inside_runs(size in sizes(), idx in indices(), max in 0u64..7) {
            let g = geometry(size);
            let set = ChunkSet::from_indices(&g, idx);
            let pieces: Vec<Range<u64>> = set.ranges_at_most(max).collect();
            for p in &pieces {
                prop_assert!(p.start < p.end && p.end - p.start <= max.max(1));
                prop_assert!(set.ranges().any(|r| r.start <= p.start && p.end <= r.end));
            }
            let joined: Vec<u64> = pieces.into_iter().flatten().collect();
            prop_assert_eq!(joined, set.indices().collect::<Vec<_>>());
        }
    }

    #[test]
    fn verify_ranges_merge_into_runs() {
        let g = geometry(10 * C + 100);
        // Overlapping, adjacent, out of order, past the end, empty.
        let r = [
            8192,
            4096,
            0,
            5000,
            4096,
            1,
            40960,
            1 << 40,
            1 << 50,
            7,
            0,
            0,
        ];
        let set = ChunkSet::from_flat_byte_ranges(&g, &r);
        assert_eq!(set.ranges().collect::<Vec<_>>(), vec![0..3, 10..11]);
        assert_eq!(
            set.byte_ranges().collect::<Vec<_>>(),
            vec![(0, 3 * C), (10 * C, 100)]
        );
        assert!(ChunkSet::from_flat_byte_ranges(&g, &[]).is_empty());
        assert!(
            ChunkSet::from_flat_byte_ranges(&g, &[0]).is_empty(),
            "an unpaired number"
        );
        assert!(ChunkSet::all(&geometry(0)).is_empty());
    }

    #[test]
    fn a_huge_volume_costs_one_run() {
        let g = Geometry::new(crate::chunk::MAX_CHUNKS * C, ChunkSize::new(C).unwrap()).unwrap();
        let all = ChunkSet::from_byte_ranges(&g, [(0, u64::MAX)]);
        assert_eq!(all, ChunkSet::all(&g));
        assert_eq!(
            (all.len(), all.range_count()),
            (crate::chunk::MAX_CHUNKS, 1)
        );
        assert!(all.contains(crate::chunk::MAX_CHUNKS - 1));
        assert!(!all.contains(crate::chunk::MAX_CHUNKS));
        assert_eq!(all.byte_ranges().collect::<Vec<_>>(), vec![(0, g.size())]);
        let mut parts = all.parts_by_chunks(16384);
        assert_eq!(parts.next().unwrap(), ChunkSet::span(&g, 0..16384));
        assert_eq!(parts.next().unwrap(), ChunkSet::span(&g, 16384..32768));
        let mut pieces = all.ranges_at_most(16384);
        assert_eq!(pieces.nth(2), Some(32768..49152));
        assert_eq!(all.indices().nth(1 << 20), Some(1 << 20));
    }
}
