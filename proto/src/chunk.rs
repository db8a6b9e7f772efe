//! Chunk geometry: how a volume is cut into fixed-size chunks.
//!
//! Owns [`ChunkSize`] (a power of two between [`ChunkSize::MIN`] and
//! [`ChunkSize::MAX`], so it can never hold an invalid value) and [`Geometry`]
//! (a volume size plus a chunk size), which maps chunk indices to byte ranges.
//! The last chunk of a volume whose size is not a multiple of the chunk size is
//! short; a volume of 0 bytes has no chunks at all.

use std::fmt;
use std::ops::Range;

/// Errors from building geometry out of untrusted numbers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    /// The chunk size is not a power of two in the allowed range.
    #[error("chunk size {0} is not a power of two between 4 KiB and 64 MiB")]
    InvalidChunkSize(u64),
    /// The volume would have more chunks than a manifest may index.
    #[error("volume of {size} bytes has too many chunks of {chunk} bytes")]
    TooManyChunks {
        /// volume size in bytes
        size: u64,
        /// chunk size in bytes
        chunk: u64,
    },
}

/// A chunk size: a power of two from 4 KiB to 64 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkSize(u32);

impl ChunkSize {
    /// Smallest chunk size: 4 KiB, the page and sector size of the devices we target.
    pub const MIN: u64 = 4 << 10;
    /// Largest chunk size: 64 MiB, so a chunk always fits one wire frame.
    pub const MAX: u64 = 64 << 20;
    /// The default chunk size (see the chunk-size table in README.md for the measurement).
    pub const DEFAULT: ChunkSize = ChunkSize(64 << 10);

    /// Checks `bytes` and wraps it.
    pub fn new(bytes: u64) -> Result<Self, ChunkError> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(ChunkSize(bytes as u32))
        } else {
            Err(ChunkError::InvalidChunkSize(bytes))
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// The size in bytes, as a usize (always fits: at most 64 MiB).
    pub fn usize(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bytes();
        if b >= 1 << 20 {
            write!(f, "{} MiB", b >> 20)
        } else {
            write!(f, "{} KiB", b >> 10)
        }
    }
}

/// Largest number of chunks a volume may have (2^32 - 1): 256 TiB at 64 KiB chunks.
pub const MAX_CHUNKS: u64 = u32::MAX as u64;

/// A volume's size cut into chunks of one size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    chunk: ChunkSize,
}

impl Geometry {
    /// Geometry of a volume of `size` bytes in chunks of `chunk`.
    pub fn new(size: u64, chunk: ChunkSize) -> Result<Self, ChunkError> {
        let g = Geometry { size, chunk };
        if g.chunk_count() > MAX_CHUNKS {
            return Err(ChunkError::TooManyChunks {
                size,
                chunk: chunk.bytes(),
            });
        }
        Ok(g)
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk
    }

    /// Number of chunks, the last one possibly short.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk.bytes())
    }

    /// Byte range of chunk `index`, or `None` when it lies past the end.
    pub fn range(&self, index: u64) -> Option<Range<u64>> {
        if index >= self.chunk_count() {
            return None;
        }
        let start = index * self.chunk.bytes();
        let end = (start + self.chunk.bytes()).min(self.size);
        Some(start..end)
    }

    /// Length in bytes of chunk `index`, or `None` when it lies past the end.
    pub fn chunk_len(&self, index: u64) -> Option<usize> {
        self.range(index).map(|r| (r.end - r.start) as usize)
    }

    /// Index of the chunk holding byte `offset`, or `None` past the end.
    pub fn chunk_of(&self, offset: u64) -> Option<u64> {
        (offset < self.size).then(|| offset / self.chunk.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunk_size_bounds() {
        assert!(ChunkSize::new(4096).is_ok());
        assert!(ChunkSize::new(64 << 20).is_ok());
        assert_eq!(
            ChunkSize::new(2048),
            Err(ChunkError::InvalidChunkSize(2048))
        );
        assert!(ChunkSize::new(128 << 20).is_err());
        assert!(ChunkSize::new(65537).is_err());
        assert!(ChunkSize::new(0).is_err());
    }

    #[test]
    fn short_last_chunk_and_empty_volume() {
        let c = ChunkSize::new(4096).unwrap();
        let g = Geometry::new(10_000, c).unwrap();
        assert_eq!(g.chunk_count(), 3);
        assert_eq!(g.range(2), Some(8192..10_000));
        assert_eq!(g.chunk_len(2), Some(1808));
        assert_eq!(g.range(3), None);
        let e = Geometry::new(0, c).unwrap();
        assert_eq!(e.chunk_count(), 0);
        assert_eq!(e.range(0), None);
        let one = Geometry::new(1, c).unwrap();
        assert_eq!(one.chunk_count(), 1);
        assert_eq!(one.range(0), Some(0..1));
    }

    #[test]
    fn too_many_chunks_refused() {
        let c = ChunkSize::new(4096).unwrap();
        assert!(Geometry::new(u64::MAX, c).is_err());
    }

    proptest! {
        #[test]
        fn ranges_tile_the_volume(size in 0u64..(1 << 24), shift in 12u32..=26) {
            let g = Geometry::new(size, ChunkSize::new(1 << shift).unwrap()).unwrap();
            let mut next = 0;
            for i in 0..g.chunk_count() {
                let r = g.range(i).unwrap();
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end > r.start);
                prop_assert!(r.end - r.start <= g.chunk_size().bytes());
                prop_assert_eq!(g.chunk_of(r.start), Some(i));
                prop_assert_eq!(g.chunk_of(r.end - 1), Some(i));
                next = r.end;
            }
            prop_assert_eq!(next, size);
        }
    }
}
