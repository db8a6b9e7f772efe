//! The manifest format: what a target provably holds, chunk by chunk.
//!
//! A manifest file is a fixed 4096-byte header followed by a flat table of
//! 32-byte entries, one per chunk (so the table starts page-aligned and can be
//! memory-mapped). An entry is the BLAKE3 hash of the chunk's bytes as durably
//! held by the target, or all zeros ([`UNKNOWN`]) when nothing is proven.
//!
//! ```text
//! offset size field
//!      0    8 magic        MAGIC, first 8 bytes of BLAKE3("nightpass manifest: fixed-size chunk table, format 1") -- do not modify
//!      8    4 version      FORMAT_VERSION (u32 LE)
//!     12    4 header_len   4096 (u32 LE)
//!     16    8 volume_size  bytes (u64 LE)
//!     24    4 chunk_size   bytes, power of two (u32 LE)
//!     28    4 flags        reserved, 0
//!     32    8 generation   bumped on every durable commit (u64 LE)
//!     40   16 volume_id    random id of the target volume instance
//!     56   32 root         root hash of the table at this generation
//!     88   32 checksum     BLAKE3 of bytes 0..88; a torn or corrupt header fails it
//!    120 3976 zero
//!   4096  32n table        entry i = hash of chunk i, or UNKNOWN
//! ```
//!
//! Invariant kept by the writers (see `src/pass/receiver/writer.rs`): an entry is set only
//! after the chunk's bytes are durable, and cleared to UNKNOWN (durably)
//! before its bytes are overwritten. The table can therefore be trusted at any
//! instant, even when the header's root lags behind it after a crash; readers
//! recompute the root from the table.
//!
//! This module is pure: it encodes and decodes bytes and never touches files.

/// A BLAKE3-256 hash of a chunk's bytes.
pub type Hash = [u8; 32];

/// The entry of a chunk whose content is not proven.
pub const UNKNOWN: Hash = [0u8; 32];

/// Header length; the table begins at this offset.
pub const HEADER_LEN: usize = 4096;

/// Length of one table entry.
pub const ENTRY_LEN: usize = 32;

/// Format version written in the header.
pub const FORMAT_VERSION: u32 = 1;

/// Magic: the first 8 bytes of BLAKE3 of [`MAGIC_SOURCE`]. Do not modify.
pub const MAGIC: [u8; 8] = [0x79, 0x49, 0xc1, 0xae, 0x06, 0x68, 0x56, 0xa1];

/// The description string the magic is derived from. Do not modify.
pub const MAGIC_SOURCE: &str = "nightpass manifest: fixed-size chunk table, format 1";

const CHECKED_LEN: usize = 88;

use crate::chunk::{ChunkError, ChunkSize, Geometry};

/// Errors decoding a manifest header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Fewer bytes than a header.
    #[error("manifest is truncated: {0} bytes, header needs {HEADER_LEN}")]
    Truncated(usize),
    /// Not a nightpass manifest.
    #[error("not a nightpass manifest (bad magic)")]
    BadMagic,
    /// A format this build cannot read.
    #[error("manifest format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    Version(u32),
    /// The header checksum does not match: torn write or corruption.
    #[error("manifest header checksum mismatch (torn write or corruption)")]
    Checksum,
    /// A field holds an impossible value.
    #[error("manifest header is invalid: {0}")]
    Invalid(#[from] ChunkError),
    /// The file length does not match the table the header describes.
    #[error("manifest table is {actual} bytes, header describes {expected}")]
    TableLength {
        /// bytes the header implies
        expected: u64,
        /// bytes present
        actual: u64,
    },
}

/// The decoded header of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Volume size and chunk size.
    pub geometry: Geometry,
    /// Bumped on every durable commit.
    pub generation: u64,
    /// Random id of the target volume instance this manifest describes.
    pub volume_id: [u8; 16],
    /// Root hash of the table as of `generation`.
    pub root: Hash,
}

/// A manifest's identity as compared at session start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Target volume instance.
    pub volume_id: [u8; 16],
    /// Commit counter.
    pub generation: u64,
    /// Root hash of the table.
    pub root: Hash,
}

impl Header {
    /// The summary the two sides compare.
    pub fn summary(&self) -> Summary {
        Summary {
            volume_id: self.volume_id,
            generation: self.generation,
            root: self.root,
        }
    }

    /// Length in bytes of the table this header describes.
    pub fn table_len(&self) -> u64 {
        self.geometry.chunk_count() * ENTRY_LEN as u64
    }

    /// Length in bytes of the whole manifest file.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + self.table_len()
    }

    /// Encodes the header into its 4096-byte form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.geometry.size().to_le_bytes());
        b[24..28].copy_from_slice(&(self.geometry.chunk_size().bytes() as u32).to_le_bytes());
        b[32..40].copy_from_slice(&self.generation.to_le_bytes());
        b[40..56].copy_from_slice(&self.volume_id);
        b[56..88].copy_from_slice(&self.root);
        let sum = blake3::hash(&b[..CHECKED_LEN]);
        b[88..120].copy_from_slice(sum.as_bytes());
        b
    }

    /// Decodes and checks a header from the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Header, ManifestError> {
        if bytes.len() < HEADER_LEN {
            return Err(ManifestError::Truncated(bytes.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        if bytes[0..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(ManifestError::Version(version));
        }
        if blake3::hash(&bytes[..CHECKED_LEN]).as_bytes() != &bytes[88..120] {
            return Err(ManifestError::Checksum);
        }
        if u32_at(12) as usize != HEADER_LEN {
            return Err(ManifestError::Checksum);
        }
        let chunk = ChunkSize::new(u64::from(u32_at(24)))?;
        let geometry = Geometry::new(u64_at(16), chunk)?;
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&bytes[40..56]);
        let mut root = [0u8; 32];
        root.copy_from_slice(&bytes[56..88]);
        Ok(Header {
            geometry,
            generation: u64_at(32),
            volume_id,
            root,
        })
    }

    /// Checks that a whole manifest file of `len` bytes matches this header.
    pub fn check_file_len(&self, len: u64) -> Result<(), ManifestError> {
        if len != self.file_len() {
            return Err(ManifestError::TableLength {
                expected: self.table_len(),
                actual: len.saturating_sub(HEADER_LEN as u64),
            });
        }
        Ok(())
    }
}

/// Root hash of a table: BLAKE3 in derive-key mode over the geometry and every entry.
///
/// The root names the content a target holds, independent of generation or
/// volume id, so a sender and a receiver holding the same table agree on it.
/// A 1 TiB volume at 64 KiB chunks has a 512 MiB table: about 0.2 s of hashing.
pub fn root(geometry: &Geometry, table: &[u8]) -> Hash {
    let mut h = RootHasher::new(geometry);
    h.update(table);
    h.finalize()
}

/// Computes [`root`] over a table fed in pieces, in order, so a large
/// table need never be held in memory at once.
#[derive(Debug, Clone)]
pub struct RootHasher(blake3::Hasher);

impl RootHasher {
    /// Starts the root of a table of `geometry`.
    pub fn new(geometry: &Geometry) -> RootHasher {
        let mut h = blake3::Hasher::new_derive_key("nightpass manifest root v1");
        h.update(&geometry.size().to_le_bytes());
        h.update(&geometry.chunk_size().bytes().to_le_bytes());
        RootHasher(h)
    }

    /// Feeds the next bytes of the table.
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    /// The root.
    pub fn finalize(&self) -> Hash {
        *self.0.finalize().as_bytes()
    }
}

/// Entry `index` of a table.
///
/// # Panics
/// When `index` is outside the table; callers index with chunk numbers
/// checked against the geometry.
pub fn entry(table: &[u8], index: u64) -> Hash {
    let o = index as usize * ENTRY_LEN;
    table[o..o + ENTRY_LEN].try_into().expect("32 bytes")
}

/// Sets entry `index` of a table. Panics as [`entry`] does.
pub fn set_entry(table: &mut [u8], index: u64, hash: &Hash) {
    let o = index as usize * ENTRY_LEN;
    table[o..o + ENTRY_LEN].copy_from_slice(hash);
}

/// The hash of `len` zero bytes, the entry of an all-zero chunk.
pub fn zero_hash(len: usize) -> Hash {
    static ZEROS: [u8; 65536] = [0u8; 65536];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len());
        h.update(&ZEROS[..n]);
        left -= n;
    }
    *h.finalize().as_bytes()
}

/// Hex form of a hash, for humans and JSON.
pub fn to_hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            geometry: Geometry::new(10_000_000, ChunkSize::new(65536).unwrap()).unwrap(),
            generation: 7,
            volume_id: [3; 16],
            root: [9; 32],
        }
    }

    #[test]
    fn magic_is_derived_from_its_description() {
        assert_eq!(
            &blake3::hash(MAGIC_SOURCE.as_bytes()).as_bytes()[..8],
            &MAGIC
        );
    }

    #[test]
    fn header_round_trip() {
        let h = header();
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        assert_eq!(h.table_len(), 153 * 32);
    }

    #[test]
    fn corrupt_or_truncated_header_refused() {
        let b = header().encode();
        assert_eq!(
            Header::decode(&b[..100]),
            Err(ManifestError::Truncated(100))
        );
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Header::decode(&bad), Err(ManifestError::BadMagic));
        let mut bad = b;
        bad[33] ^= 1;
        assert_eq!(Header::decode(&bad), Err(ManifestError::Checksum));
        let mut bad = b;
        bad[8] = 9;
        assert_eq!(Header::decode(&bad), Err(ManifestError::Version(9)));
    }

    #[test]
    fn file_length_checked() {
        let h = header();
        assert!(h.check_file_len(h.file_len()).is_ok());
        assert!(h.check_file_len(h.file_len() - 32).is_err());
    }

    #[test]
    fn root_depends_on_every_entry() {
        let g = header().geometry;
        let mut t = vec![0u8; g.chunk_count() as usize * 32];
        let r0 = root(&g, &t);
        let mut pieces = RootHasher::new(&g);
        for p in t.chunks(7) {
            pieces.update(p);
        }
        assert_eq!(pieces.finalize(), r0, "fed in pieces, the same root");
        set_entry(&mut t, 152, &[1; 32]);
        assert_ne!(root(&g, &t), r0);
        assert_eq!(entry(&t, 152), [1; 32]);
    }

    #[test]
    fn zero_hash_matches_plain_hash() {
        for len in [1usize, 4096, 65536, 65537, 200_000] {
            assert_eq!(&zero_hash(len), blake3::hash(&vec![0u8; len]).as_bytes());
        }
    }

    proptest! {
        #[test]
        fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Header::decode(&bytes);
        }
    }
}
