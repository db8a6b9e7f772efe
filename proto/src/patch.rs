//! Delta below the chunk: probes of block hints, the blocks a receiver
//! asks for, and patches of those blocks.
//!
//! Owns the arithmetic of both ends of the exchange (`PROTOCOL.md`,
//! "Probes and patches"), on byte slices only: the sender's hints of a
//! chunk ([`hints`]) and the payload of a patch ([`payload`]); the
//! receiver's answer to a probe ([`answer_probe`]), the check of a patch's
//! shape ([`check_shape`]), the overlay of its blocks on the target's copy
//! ([`apply`]) and the runs of blocks to write ([`runs`]). It must not
//! decide whether a patch is written: the caller checks the patched chunk
//! against the chunk's BLAKE3 hash first, and writes nothing otherwise.

use std::fmt;
use std::ops::Range;

use crate::wire::{self, block_hint, block_range, blocks_in, named_blocks, BLOCK, BLOCK_HINT_LEN};

/// A probe or a patch that does not fit its chunk: the peer broke the
/// protocol, and nothing of the chunk is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchError {
    /// A probe's hints are not one per block.
    Hints {
        /// Chunk index.
        index: u64,
        /// Bytes of hints received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A patch's bitmap is not one bit per block.
    Bitmap {
        /// Chunk index.
        index: u64,
        /// Bytes of bitmap received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A patch's payload is shorter than the blocks its bitmap names.
    Short {
        /// Chunk index.
        index: u64,
    },
    /// A patch's payload is longer than the blocks its bitmap names.
    Long {
        /// Chunk index.
        index: u64,
        /// Bytes past the named blocks.
        extra: usize,
    },
}

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatchError::Hints {
                index,
                got,
                expected,
            } => write!(
                f,
                "probe of chunk {index} carries {got} bytes of block hints, expected {expected}; nothing written"
            ),
            PatchError::Bitmap {
                index,
                got,
                expected,
            } => write!(
                f,
                "patch of chunk {index} has a block bitmap of {got} bytes, expected {expected}; nothing written"
            ),
            PatchError::Short { index } => write!(
                f,
                "patch of chunk {index} is shorter than the blocks it names; nothing written"
            ),
            PatchError::Long { index, extra } => write!(
                f,
                "patch of chunk {index} carries {extra} bytes past the blocks it names; nothing written"
            ),
        }
    }
}

impl std::error::Error for PatchError {}

/// The probe of `chunk`: the 16-byte hint of each of its 4 KiB blocks.
pub fn hints(chunk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks_in(chunk.len()) * BLOCK_HINT_LEN);
    for b in chunk.chunks(BLOCK) {
        out.extend_from_slice(&block_hint(b));
    }
    out
}

/// The receiver's answer to a probe of chunk `index`: the blocks of `old`
/// (its copy of the chunk) whose hints differ from the probe's `hints`.
pub fn answer_probe(index: u64, hints: &[u8], old: &[u8]) -> Result<wire::Need, PatchError> {
    let n = blocks_in(old.len());
    if hints.len() != n * BLOCK_HINT_LEN {
        return Err(PatchError::Hints {
            index,
            got: hints.len(),
            expected: n * BLOCK_HINT_LEN,
        });
    }
    let mut blocks = vec![0u8; n.div_ceil(8)];
    for (i, (b, h)) in old
        .chunks(BLOCK)
        .zip(hints.chunks(BLOCK_HINT_LEN))
        .enumerate()
    {
        if block_hint(b) != *h {
            blocks[i / 8] |= 1 << (i % 8);
        }
    }
    Ok(wire::Need { index, blocks })
}

/// A request for every block of chunk `index` of `len` bytes: the whole
/// chunk (the answer to a patch whose result did not match its hash).
pub fn whole_chunk(index: u64, len: usize) -> wire::Need {
    let n = blocks_in(len);
    let mut blocks = vec![0xffu8; n.div_ceil(8)];
    if !n.is_multiple_of(8) {
        if let Some(last) = blocks.last_mut() {
            *last = (1u8 << (n % 8)) - 1;
        }
    }
    wire::Need { index, blocks }
}

/// Whether `bitmap` names every block of a chunk of `len` bytes.
pub fn names_all(bitmap: &[u8], len: usize) -> bool {
    let n = blocks_in(len);
    named_blocks(bitmap, n).count() == n
}

/// The payload of a patch of `chunk`: the blocks `bitmap` names, in order.
/// The bitmap's length is the caller's to check (one bit per block).
pub fn payload(chunk: &[u8], bitmap: &[u8]) -> Vec<u8> {
    let len = chunk.len();
    let mut out = Vec::new();
    for i in named_blocks(bitmap, blocks_in(len)) {
        out.extend_from_slice(&chunk[block_range(i, len)]);
    }
    out
}

/// Checks that a patch of chunk `index` (`len` bytes) fits: a bitmap of one
/// bit per block and a payload of exactly the blocks it names.
pub fn check_shape(
    index: u64,
    len: usize,
    bitmap: &[u8],
    payload_len: usize,
) -> Result<(), PatchError> {
    let n = blocks_in(len);
    if bitmap.len() != n.div_ceil(8) {
        return Err(PatchError::Bitmap {
            index,
            got: bitmap.len(),
            expected: n.div_ceil(8),
        });
    }
    let named: usize = named_blocks(bitmap, n)
        .map(|i| block_range(i, len).len())
        .sum();
    match payload_len.cmp(&named) {
        std::cmp::Ordering::Less => Err(PatchError::Short { index }),
        std::cmp::Ordering::Greater => Err(PatchError::Long {
            index,
            extra: payload_len - named,
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Overlays a patch's blocks (its shape checked by [`check_shape`]) on
/// `chunk`, the target's copy, in place.
pub fn apply(chunk: &mut [u8], bitmap: &[u8], payload: &[u8]) {
    let len = chunk.len();
    let mut at = 0usize;
    for i in named_blocks(bitmap, blocks_in(len)) {
        let dst = &mut chunk[block_range(i, len)];
        dst.copy_from_slice(&payload[at..at + dst.len()]);
        at += dst.len();
    }
}

/// Runs of consecutive blocks a bitmap names, as byte ranges of a chunk of
/// `len` bytes: what a receiver writes of a patched chunk.
pub fn runs(bitmap: &[u8], len: usize) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for i in named_blocks(bitmap, blocks_in(len)) {
        let r = block_range(i, len);
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes (xorshift64*).
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.max(1);
        (0..n)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn a_probe_answer_and_its_patch_rebuild_the_new_chunk() {
        // A short last block too: 10 blocks of which the last is 100 bytes.
        let len = 9 * BLOCK + 100;
        for changed in [vec![], vec![0], vec![3, 4, 9], (0..10).collect::<Vec<_>>()] {
            let old = bytes(1, len);
            let mut new = old.clone();
            for &b in &changed {
                new[block_range(b, len)]
                    .copy_from_slice(&bytes(50 + b as u64, block_range(b, len).len()));
            }
            let need = answer_probe(7, &hints(&new), &old).unwrap();
            let asked: Vec<usize> = named_blocks(&need.blocks, 10).collect();
            assert_eq!(asked, changed);
            assert_eq!(names_all(&need.blocks, len), changed.len() == 10);
            let p = payload(&new, &need.blocks);
            check_shape(7, len, &need.blocks, p.len()).unwrap();
            let mut patched = old.clone();
            apply(&mut patched, &need.blocks, &p);
            assert_eq!(patched, new);
            let written: usize = runs(&need.blocks, len).iter().map(|r| r.len()).sum();
            assert_eq!(written, p.len());
        }
    }

    #[test]
    fn runs_merge_neighbouring_blocks() {
        let len = 8 * BLOCK;
        let bitmap = [0b1011_0110u8];
        assert_eq!(
            runs(&bitmap, len),
            [BLOCK..3 * BLOCK, 4 * BLOCK..6 * BLOCK, 7 * BLOCK..8 * BLOCK]
        );
    }

    #[test]
    fn whole_chunk_names_every_block_and_no_more() {
        for n in [1usize, 7, 8, 9, 16] {
            let len = n * BLOCK;
            let need = whole_chunk(3, len);
            assert_eq!(need.blocks.len(), n.div_ceil(8));
            assert!(names_all(&need.blocks, len));
            assert_eq!(named_blocks(&need.blocks, 64).count(), n);
        }
    }

    #[test]
    fn misshapen_probes_and_patches_are_refused() {
        let len = 4 * BLOCK;
        let e = answer_probe(1, &[0; 3], &vec![0; len]).unwrap_err();
        assert_eq!(
            e,
            PatchError::Hints {
                index: 1,
                got: 3,
                expected: 64
            }
        );
        assert!(matches!(
            check_shape(2, len, &[1, 0], BLOCK),
            Err(PatchError::Bitmap { .. })
        ));
        assert_eq!(
            check_shape(2, len, &[0b11], BLOCK),
            Err(PatchError::Short { index: 2 })
        );
        assert_eq!(
            check_shape(2, len, &[0b1], BLOCK + 5),
            Err(PatchError::Long { index: 2, extra: 5 })
        );
        assert!(e.to_string().contains("nothing written"));
    }
}
