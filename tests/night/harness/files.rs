//! Files and checksums: deterministic random data, writes at an offset,
//! BLAKE3 of files and devices, byte-level comparison, and the receiver's
//! manifest read back from disk.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{have_tool, run_tool, CHUNK, MIB};

/// A small deterministic PRNG (xorshift64*), seeded per test.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// Writes `len` random bytes to `path` (created or truncated), in 1 MiB
/// pieces, and makes them durable.
pub fn write_random_file(path: &Path, len: u64, rng: &mut Rng) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write file");
        left -= n as u64;
    }
    f.sync_all().expect("fsync file");
}

/// Writes a file of `size` pseudo-random bytes from `seed`.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    write_random_file(path, size, &mut Rng::new(seed));
}

/// Writes `data` at `offset` of the file or device at `path`, then makes it durable.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", path.display()));
    f.sync_all().expect("fsync");
}

/// Writes `count` random 4 KiB blocks at random 4 KiB-aligned offsets of the
/// first `size` bytes of `path` and returns the set of `chunk`-sized chunks
/// they touched.
pub fn scatter_writes(
    path: &Path,
    size: u64,
    count: usize,
    chunk: u64,
    rng: &mut Rng,
) -> BTreeSet<u64> {
    scatter_blocks(path, size, count, rng)
        .into_iter()
        .map(|offset| offset / chunk)
        .collect()
}

/// Writes `count` random 4 KiB blocks at random 4 KiB-aligned offsets of the
/// first `size` bytes of `path` and returns the offsets of the distinct
/// blocks written.
pub fn scatter_blocks(path: &Path, size: u64, count: usize, rng: &mut Rng) -> BTreeSet<u64> {
    const BLOCK: u64 = 4096;
    assert!(size >= BLOCK);
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    let mut written = BTreeSet::new();
    let mut block = vec![0u8; BLOCK as usize];
    for _ in 0..count {
        let offset = rng.below(size / BLOCK) * BLOCK;
        rng.fill(&mut block);
        f.write_all_at(&block, offset).expect("scattered write");
        written.insert(offset);
    }
    f.sync_all().expect("fsync");
    written
}

/// Flushes `path` and drops it from the page cache; returns the bytes of it
/// still cached afterwards as `fincore` counts them (`None` without fincore).
pub fn evict_from_cache(path: &Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.sync_all().expect("fsync");
    // SAFETY: fadvise on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise(DONTNEED) of {}", path.display());
    if !have_tool("fincore") {
        return None;
    }
    let path = path.to_string_lossy();
    let out = run_tool(
        "fincore",
        &["--bytes", "--noheadings", "--output", "RES", &path],
    );
    Some(out.trim().parse().expect("fincore prints a number"))
}

/// BLAKE3 of the first `len` bytes of `path` (a file or a device).
pub fn hash_prefix(path: &Path, len: u64) -> blake3::Hash {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        f.read_exact_at(&mut buf[..n], off)
            .unwrap_or_else(|e| panic!("read {} at {off}: {e}", path.display()));
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize()
}

/// BLAKE3 of the whole regular file at `path`.
pub fn file_hash(path: &Path) -> blake3::Hash {
    hash_prefix(path, file_len(path))
}

/// Length of a regular file.
pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

/// Size of a file or block device.
pub fn size_of(path: &Path) -> u64 {
    let out = Command::new("blockdev")
        .arg("--getsize64")
        .arg(path)
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().parse().unwrap(),
        _ => file_len(path),
    }
}

/// Offset of the first byte where the first `len` bytes of `a` and `b` differ.
pub fn first_difference(a: &Path, b: &Path, len: u64) -> Option<u64> {
    let fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(CHUNK) as usize;
        fa.read_exact_at(&mut ba[..n], off).expect("read a");
        fb.read_exact_at(&mut bb[..n], off).expect("read b");
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Some(off + i as u64);
        }
        off += n as u64;
    }
    None
}

/// Asserts that `target` holds exactly the bytes of `source` in its first
/// `len` bytes (`len` = the source's size).
#[track_caller]
pub fn assert_same_prefix(source: &Path, target: &Path, len: u64) {
    if let Some(at) = first_difference(source, target, len) {
        panic!(
            "{} differs from {} at byte {at} (chunk {})",
            target.display(),
            source.display(),
            at / CHUNK
        );
    }
}

/// Asserts that the regular file `target` is byte-identical to `source`,
/// length included.
#[track_caller]
pub fn assert_same_file(source: &Path, target: &Path) {
    let len = file_len(source);
    assert_eq!(
        file_len(target),
        len,
        "{} has another length than {}",
        target.display(),
        source.display()
    );
    assert_same_prefix(source, target, len);
    assert_eq!(file_hash(source), file_hash(target));
}

/// Number of `chunk`-sized chunks of `path` (size `len`) that hold a non-zero byte.
pub fn nonzero_chunks(path: &Path, len: u64, chunk: u64) -> u64 {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; chunk as usize];
    let (mut count, mut off) = (0, 0);
    while off < len {
        let n = (len - off).min(chunk) as usize;
        f.read_exact_at(&mut buf[..n], off).expect("read");
        if buf[..n].iter().any(|&b| b != 0) {
            count += 1;
        }
        off += n as u64;
    }
    count
}

/// Number of chunks of a volume of `size` bytes.
pub fn chunk_count(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk)
}

/// Checks a receiver manifest against a fresh read of its target: every
/// entry that claims a hash must match the bytes. Returns (claimed, checked-bad).
pub fn manifest_claims_hold(manifest: &Path, target: &Path) -> (u64, Vec<u64>) {
    let m = fs::read(manifest).unwrap();
    let size = u64::from_le_bytes(m[16..24].try_into().unwrap());
    let chunk = u64::from(u32::from_le_bytes(m[24..28].try_into().unwrap()));
    let table = &m[4096..];
    let t = File::open(target).unwrap();
    let mut claimed = 0;
    let mut bad = Vec::new();
    let mut buf = vec![0u8; chunk as usize];
    for (i, e) in table.chunks_exact(32).enumerate() {
        if e.iter().all(|&b| b == 0) {
            continue;
        }
        claimed += 1;
        let off = i as u64 * chunk;
        let len = (size - off).min(chunk) as usize;
        t.read_exact_at(&mut buf[..len], off).unwrap();
        if blake3::hash(&buf[..len]).as_bytes() != e {
            bad.push(i as u64);
        }
    }
    (claimed, bad)
}

/// The receiver's manifest of volume `name` under its state dir.
pub fn receiver_manifest(state: &Path, name: &str) -> PathBuf {
    state.join("volumes").join(name).join("manifest")
}
