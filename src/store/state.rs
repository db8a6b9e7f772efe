//! State directories: memory-mapped manifests and the journals.
//!
//! Owns every file under a state directory. A sender keeps, per destination,
//! `targets/<key>/manifest` (its view of what the target provably holds),
//! `source` (what its passes read, [`SourceRecord`]) and `journal.jsonl`
//! (typed records, [`super::journal`]); a receiver keeps, per exported volume,
//! `volumes/<name>/manifest`, `target` (the path and identity of the target
//! the manifest describes, [`TargetRecord`]), `journal.jsonl`, once cut
//! over `seal` ([`crate::store::seal`]), and once unsealed `rebuild` until the next
//! pass rebuilds the manifest ([`mark_for_rebuild`]). Manifests are created crash-safely (temp file, fsync,
//! rename, fsync of the directory) and then updated in place under the
//! ordering rules written in `nightpass_proto::manifest`. Each manifest is
//! `flock`ed while open so two processes never share one.
//!
//! Permissions: directories are created 0700 and files 0600 (manifests,
//! journals, the target record): a state directory says what was copied
//! where, and nobody else on the host needs to read it.
//!
//! Sharp edge: the table is memory-mapped. Truncating a manifest file under a
//! running nightpass would make its next access fault (SIGBUS); the lock keeps
//! other nightpass processes away, and operators must not edit these files.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nightpass_proto::chunk::Geometry;
use nightpass_proto::manifest::{self, Hash, Header, ManifestError, Summary, HEADER_LEN};

use crate::error::{Error, IoContext, Result};
use crate::io::sys::SharedFileMap;

/// The default state directory: `$NIGHTPASS_HOME/state`, else `~/.local/state/nightpass`.
pub fn default_state_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("NIGHTPASS_HOME") {
        return PathBuf::from(h).join("state");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/state/nightpass")
}

/// Turns a destination such as `10.0.0.2:7400/filer01` into a directory name.
pub fn key_for(dest: &str) -> String {
    dest.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Creates `dir` and any missing parents, each new one mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx(format!("create {}", dir.display()))
}

/// Creates (truncating) a file readable and writable by its owner only.
fn create_private_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .ctx(format!("create {}", path.display()))
}

/// Creates `dir` (0700) when missing and checks that files can be created
/// in it: a refusal now rather than at the first write of a session.
pub fn check_writable(dir: &Path) -> Result<()> {
    let refuse = |e: &dyn std::fmt::Display| {
        Error::input(format!(
            "state directory {} is not writable ({e}); give a writable --state-dir",
            dir.display()
        ))
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| refuse(&e))?;
    // Unique per call: sessions of one `serve` (a preflight and a sync of
    // one volume) may check the same directory at the same moment.
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let probe = dir.join(format!(
        ".write-check-{}-{}-{:08x}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    ));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .map_err(|e| refuse(&e))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir`
/// (or its nearest existing parent).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let mut at = dir;
    while !at.exists() {
        at = at.parent().unwrap_or(Path::new("/"));
    }
    let st = nix::sys::statvfs::statvfs(at)
        .map_err(|e| Error::io(format!("statvfs {}", at.display()), e.into()))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// The length of a manifest file for `geometry`.
pub fn manifest_len(geometry: &Geometry) -> u64 {
    (HEADER_LEN as u64).saturating_add(
        geometry
            .chunk_count()
            .saturating_mul(manifest::ENTRY_LEN as u64),
    )
}

/// The geometry recorded in a manifest's header, read without locking or
/// mapping it (a sync session may hold it); `None` when missing or unreadable.
pub fn peek_geometry(path: &Path) -> Option<Geometry> {
    let mut f = File::open(path).ok()?;
    let mut head = vec![0u8; HEADER_LEN];
    std::io::Read::read_exact(&mut f, &mut head).ok()?;
    Header::decode(&head).ok().map(|h| h.geometry)
}

/// What a receiver's manifest describes: the target's path as exported and
/// the identity of the file or device found there when the manifest was
/// bound to it. Kept in `volumes/<name>/target` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TargetRecord {
    /// The canonical path of the export.
    pub path: PathBuf,
    /// The file or device at that path.
    pub identity: crate::io::device::VolumeIdentity,
}

impl TargetRecord {
    /// Reads the record of the volume whose state lives in `dir`; `None`
    /// when missing or not a record (an older format, a torn write).
    pub fn read(dir: &Path) -> Option<TargetRecord> {
        let text = fs::read(dir.join("target")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes the record crash-safely.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).expect("a record serializes");
        write_atomic(&dir.join("target"), &bytes)
    }
}

/// The source a sender's passes of one volume read, kept in
/// `targets/<key>/source` (JSON) so that a pass of another source is refused.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceRecord {
    /// The source's canonical path.
    pub path: String,
    /// When it was recorded, seconds since the Unix epoch.
    #[serde(default)]
    pub recorded_unix_s: f64,
}

impl SourceRecord {
    /// Reads the record of the volume whose state lives in `dir`; `None`
    /// when missing or not a record (then the journal's last pass tells).
    /// A file that exists but cannot be read is [`Error::Io`] naming it.
    pub fn read(dir: &Path) -> Result<Option<SourceRecord>> {
        let path = dir.join("source");
        match fs::read(&path) {
            Ok(text) => Ok(serde_json::from_slice(&text).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
        }
    }

    /// Writes the record crash-safely.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).expect("a record serializes");
        write_atomic(&dir.join("source"), &bytes)
    }
}

/// The marker that a receiver volume's manifest must be rebuilt from a fresh
/// read of its target by the next sync session (set by `nightpass unseal`).
fn rebuild_marker(dir: &Path) -> PathBuf {
    dir.join("rebuild")
}

/// Marks the manifest of the receiver volume whose state lives in `dir` to
/// be rebuilt, durably: until the next sync session clears the mark, no
/// entry of it is trusted.
pub fn mark_for_rebuild(dir: &Path) -> Result<()> {
    write_atomic(
        &rebuild_marker(dir),
        b"rebuild the manifest from a fresh read of the target\n",
    )
}

/// True when the volume's manifest is marked to be rebuilt (see
/// [`mark_for_rebuild`]).
pub fn marked_for_rebuild(dir: &Path) -> bool {
    fs::symlink_metadata(rebuild_marker(dir)).is_ok()
}

/// Removes the mark of [`mark_for_rebuild`], durably.
pub fn clear_rebuild_mark(dir: &Path) -> Result<()> {
    let path = rebuild_marker(dir);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// Writes `bytes` to `path` crash-safely: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = create_private_file(&tmp)?;
        f.write_all(bytes).ctx(format!("write {}", tmp.display()))?;
        f.sync_all().ctx(format!("fsync {}", tmp.display()))?;
    }
    fs::rename(&tmp, path).ctx(format!("rename to {}", path.display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(format!("fsync directory {}", dir.display()))
}

/// How a new manifest's entries start.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// Nothing is proven: every entry unknown.
    Unknown,
    /// The target reads as zeros (a freshly created sparse file).
    Zeros,
}

/// Entries `first..first + n` (fewer at the end of the table) of a new
/// table of `geometry` filled with `fill`, into `out`.
pub fn fill_piece(geometry: &Geometry, fill: Fill, first: u64, n: u64, out: &mut Vec<u8>) {
    let n = geometry.chunk_count().saturating_sub(first).min(n);
    out.clear();
    out.resize(n as usize * manifest::ENTRY_LEN, 0);
    if let Fill::Zeros = fill {
        let full_zero = manifest::zero_hash(geometry.chunk_size().usize());
        for i in 0..n {
            let len = geometry.chunk_len(first + i).expect("index below count");
            let h = if len == geometry.chunk_size().usize() {
                full_zero
            } else {
                manifest::zero_hash(len)
            };
            manifest::set_entry(out, i, &h);
        }
    }
}

/// An open, locked, memory-mapped manifest.
#[derive(Debug)]
pub struct ManifestFile {
    path: PathBuf,
    _file: File,
    map: SharedFileMap,
    header: Header,
    /// Entries read or written through the map since its pages were last
    /// released (see [`ManifestFile::release_pages`]).
    touched: AtomicU64,
}

/// Entries per piece when a table is built or hashed in pieces (1 MiB).
const PIECE_ENTRIES: u64 = 32768;

/// Entries touched through the map before its resident pages are released:
/// 32 MiB of table, which bounds the manifest's share of a process's
/// resident memory whatever the volume's size.
const RELEASE_EVERY: u64 = 1 << 20;

impl ManifestFile {
    /// Creates (replacing any old one) a manifest for `geometry`.
    pub fn create(
        path: &Path,
        geometry: Geometry,
        volume_id: [u8; 16],
        fill: Fill,
    ) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir)?;
        let tmp = path.with_extension("new");
        // Built and written in pieces: a 1 TiB volume has a 512 MiB table.
        let piece = |first: u64, out: &mut Vec<u8>| {
            fill_piece(&geometry, fill, first, PIECE_ENTRIES, out);
        };
        let mut buf = Vec::new();
        let mut root = manifest::RootHasher::new(&geometry);
        let mut first = 0;
        while first < geometry.chunk_count() {
            piece(first, &mut buf);
            root.update(&buf);
            first += PIECE_ENTRIES;
        }
        let header = Header {
            geometry,
            generation: 1,
            volume_id,
            root: root.finalize(),
        };
        {
            let mut f = create_private_file(&tmp)?;
            f.write_all(&header.encode())
                .ctx(format!("write {}", tmp.display()))?;
            let mut first = 0;
            while first < geometry.chunk_count() {
                piece(first, &mut buf);
                f.write_all(&buf).ctx(format!("write {}", tmp.display()))?;
                first += PIECE_ENTRIES;
            }
            f.sync_all().ctx(format!("fsync {}", tmp.display()))?;
        }
        fs::rename(&tmp, path).ctx(format!("rename to {}", path.display()))?;
        sync_dir(dir)?;
        match Self::open(path)? {
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => Err(Error::Io(format!(
                "{}: just written but unreadable: {e}",
                path.display()
            ))),
            None => Err(Error::Io(format!(
                "{}: vanished after creation",
                path.display()
            ))),
        }
    }

    /// Opens and locks a manifest. `None` when missing; `Some(Err)` when it
    /// exists but cannot be trusted (corrupt, truncated, another format).
    #[allow(clippy::type_complexity)]
    pub fn open(path: &Path) -> Result<Option<std::result::Result<Self, ManifestError>>> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path.display(), e)),
        };
        if !crate::io::device::lock_exclusive(&file) {
            return Err(Error::InUse(format!(
                "{} is in use by another nightpass process",
                path.display()
            )));
        }
        let len = file.metadata().ctx(path.display())?.len();
        if len < HEADER_LEN as u64 {
            return Ok(Some(Err(ManifestError::Truncated(len as usize))));
        }
        // Locked against other nightpass processes above, and never
        // truncated while mapped (see the module docs).
        let map = SharedFileMap::map(&file).ctx(format!("mmap {}", path.display()))?;
        let header = match Header::decode(&map[..HEADER_LEN]) {
            Ok(h) => h,
            Err(e) => return Ok(Some(Err(e))),
        };
        if let Err(e) = header.check_file_len(len) {
            return Ok(Some(Err(e)));
        }
        Ok(Some(Ok(ManifestFile {
            path: path.to_owned(),
            _file: file,
            map,
            header,
            touched: AtomicU64::new(0),
        })))
    }

    /// The header as last committed.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Volume and chunk size.
    pub fn geometry(&self) -> Geometry {
        self.header.geometry
    }

    /// The table of entries.
    pub fn table(&self) -> &[u8] {
        &self.map[HEADER_LEN..]
    }

    /// Entry `index`.
    pub fn entry(&self, index: u64) -> Hash {
        self.touch(1);
        manifest::entry(self.table(), index)
    }

    /// Sets entry `index` in memory; durable after [`Self::flush_table`].
    pub fn set(&mut self, index: u64, hash: &Hash) {
        self.touch(1);
        manifest::set_entry(&mut self.map[HEADER_LEN..], index, hash);
    }

    /// Replaces the whole table (a receiver's table rebuilt from its target).
    pub fn replace_table(&mut self, table: &[u8]) {
        self.map[HEADER_LEN..].copy_from_slice(table);
        self.release_pages();
    }

    /// Sets the entries from `first` on to the 32-byte hashes in `run`.
    pub fn set_run(&mut self, first: u64, run: &[u8]) {
        let n = (run.len() / manifest::ENTRY_LEN) as u64;
        let at = HEADER_LEN + first as usize * manifest::ENTRY_LEN;
        self.map[at..at + run.len()].copy_from_slice(run);
        self.touch(n);
    }

    /// Calls `f` on the table in pieces of `entries` entries, in order,
    /// until it returns false; the pages read are counted like any other
    /// access, so a whole-table walk keeps the resident set bounded.
    pub fn for_each_piece(&self, entries: usize, mut f: impl FnMut(&[u8]) -> bool) {
        for p in self.table().chunks(entries * manifest::ENTRY_LEN) {
            let go = f(p);
            self.touch((p.len() / manifest::ENTRY_LEN) as u64);
            if !go {
                break;
            }
        }
    }

    fn touch(&self, n: u64) {
        if self.touched.fetch_add(n, Ordering::Relaxed) + n >= RELEASE_EVERY {
            self.release_pages();
        }
    }

    /// Drops the map's pages from this process's resident set. The map is
    /// shared and file-backed, so nothing is lost: dirty pages stay in the
    /// page cache until written back, and the next access maps them again.
    pub fn release_pages(&self) {
        self.touched.store(0, Ordering::Relaxed);
        self.map.release_pages();
    }

    /// Makes table changes durable (msync).
    pub fn flush_table(&self) -> Result<()> {
        self.map
            .flush()
            .ctx(format!("msync {}", self.path.display()))
    }

    /// Root hash of the table as it is now.
    pub fn current_root(&self) -> Hash {
        let mut h = manifest::RootHasher::new(&self.header.geometry);
        self.for_each_piece(PIECE_ENTRIES as usize, |p| {
            h.update(p);
            true
        });
        h.finalize()
    }

    /// The summary as of now: the header's, with the root recomputed and the
    /// generation bumped if the table moved past the last header commit.
    pub fn summary_now(&mut self) -> Result<Summary> {
        let root = self.current_root();
        if root != self.header.root {
            let g = self.header.generation + 1;
            self.commit(g, root)?;
        }
        Ok(self.header.summary())
    }

    /// Durably records `generation` and `root` in the header, after the table.
    pub fn commit(&mut self, generation: u64, root: Hash) -> Result<()> {
        self.flush_table()?;
        self.header.generation = generation;
        self.header.root = root;
        self.map[..HEADER_LEN].copy_from_slice(&self.header.encode());
        self.map
            .flush_range(0, HEADER_LEN)
            .ctx(format!("msync {}", self.path.display()))
    }

    /// Sets the volume id recorded in the header (committed with the next commit).
    pub fn set_volume_id(&mut self, id: [u8; 16]) {
        self.header.volume_id = id;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightpass_proto::chunk::ChunkSize;

    #[test]
    fn create_open_commit_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let g = Geometry::new(100_000, ChunkSize::new(4096).unwrap()).unwrap();
        let mut m = ManifestFile::create(&p, g, [1; 16], Fill::Zeros).unwrap();
        assert_eq!(m.entry(24), manifest::zero_hash(100_000 - 24 * 4096));
        m.set(3, &[7; 32]);
        let root = m.current_root();
        m.commit(5, root).unwrap();
        drop(m);
        let m = ManifestFile::open(&p).unwrap().unwrap().unwrap();
        assert_eq!(m.header().generation, 5);
        assert_eq!(m.entry(3), [7; 32]);
        assert_eq!(m.header().root, m.current_root());
    }

    #[test]
    fn write_check_does_not_collide_with_another_session() {
        let d = tempfile::tempdir().unwrap();
        // Another session of this process mid-check, under the old name.
        fs::write(
            d.path()
                .join(format!(".write-check-{}", std::process::id())),
            b"",
        )
        .unwrap();
        check_writable(d.path()).unwrap();
        check_writable(d.path()).unwrap();
    }

    #[test]
    fn truncated_manifest_is_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let g = Geometry::new(100_000, ChunkSize::new(4096).unwrap()).unwrap();
        drop(ManifestFile::create(&p, g, [1; 16], Fill::Unknown).unwrap());
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(HEADER_LEN as u64 + 64).unwrap();
        assert!(matches!(
            ManifestFile::open(&p).unwrap(),
            Some(Err(ManifestError::TableLength { .. }))
        ));
    }

    #[test]
    fn second_open_is_refused_while_locked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let g = Geometry::new(4096, ChunkSize::new(4096).unwrap()).unwrap();
        let _m = ManifestFile::create(&p, g, [1; 16], Fill::Unknown).unwrap();
        let e = ManifestFile::open(&p).unwrap_err();
        assert!(e.to_string().contains("in use"));
    }
}
