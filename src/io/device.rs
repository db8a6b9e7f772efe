//! Volumes: block devices and image files, opened, sized, read and written.
//!
//! Owns every system call on volume data; those that need `unsafe` (ioctls,
//! `preadv2`, memory maps, aligned buffers) go through the safe wrappers of
//! [`crate::io::sys`]. A block device's size comes from the `BLKGETSIZE64`
//! ioctl, never from metadata (which reports 0). Targets that are block devices are opened
//! with `O_EXCL`, which the kernel refuses with `EBUSY` while the device is
//! mounted or held exclusively by another program (device-mapper, md, another
//! nightpass). Image files are locked with `flock` for the same purpose.
//! Must not know about chunks, manifests or the network.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, IoContext, Result};
use crate::io::sys::{self, sigbus, AlignedBuf, ALIGN};

/// Takes an exclusive, non-blocking `flock` on `file`; false when another
/// open file description holds one. Released when the file is closed.
pub fn lock_exclusive(file: &File) -> bool {
    sys::flock_exclusive(file)
}

/// What a volume path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A block device.
    Block,
    /// A regular (image) file.
    File,
}

/// How [`Volume::read_block`] reads a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// `pread` into a buffer of its own (one copy out of the page cache).
    Buffered,
    /// `pread` through a second descriptor opened with `O_DIRECT`: the page
    /// cache is neither read nor filled.
    Direct,
    /// A read-only shared memory map of the block: the page cache's own
    /// pages, no copy. The bytes are a live view: a concurrent writer of the
    /// source changes them (see [`Volume::read_block`]). An I/O error while
    /// faulting the map in is an error return (`MADV_POPULATE_READ`), and the
    /// block is then read with `pread`, which reports it; an error after
    /// that (a page evicted and failing to read back, or an image file
    /// shrunk) raises `SIGBUS`, which [`sigbus::install`] turns into a clear
    /// message and exit status 3.
    Mapped,
}

/// An open volume.
#[derive(Debug)]
pub struct Volume {
    file: File,
    /// A second descriptor opened with `O_DIRECT`, when reads bypass the page cache.
    direct: Option<File>,
    /// Blocks are read through memory maps.
    mapped: AtomicBool,
    /// The kernel refused a `RWF_NOWAIT` read: do not ask again.
    no_nowait: AtomicBool,
    path: PathBuf,
    kind: Kind,
    size: u64,
}

/// Who a volume is, whatever path named it: a file's device, inode and
/// birth time (so a file removed and created again under the same name,
/// which may reuse the inode, is another file), a block device's device
/// number and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VolumeIdentity {
    /// A regular file.
    File {
        /// `st_dev` of its filesystem.
        dev: u64,
        /// `st_ino`.
        ino: u64,
        /// Birth time (seconds, nanoseconds), where the filesystem keeps one.
        btime: Option<(i64, u32)>,
    },
    /// A block device.
    Block {
        /// `st_rdev`.
        rdev: u64,
        /// Size in bytes.
        size: u64,
    },
}

/// Refuses a block device that is mounted or held exclusively by another
/// program (`O_EXCL` open, released at once); other paths pass.
pub fn check_not_held(path: &Path) -> Result<()> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error::InUse(format!(
            "{} is in use (mounted, or held open exclusively by another program)",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Total size of the filesystem holding `dir`: the largest target file a
/// receiver creates there unless told otherwise (`--max-size`).
pub fn filesystem_size(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| Error::io(format!("statvfs {}", dir.display()), e.into()))?;
    Ok((st.blocks() as u64).saturating_mul(st.fragment_size() as u64))
}

/// How a target was found when opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// It existed.
    Existing,
    /// It was missing and has been created sparse (so it reads as zeros).
    New,
}

fn kind_of(path: &Path, file: &File) -> Result<Kind> {
    let ft = file.metadata().ctx(path.display())?.file_type();
    if ft.is_block_device() {
        Ok(Kind::Block)
    } else if ft.is_file() {
        Ok(Kind::File)
    } else {
        Err(Error::input(format!(
            "{} is neither a block device nor a regular file",
            path.display()
        )))
    }
}

fn size_of(path: &Path, file: &File, kind: Kind) -> Result<u64> {
    match kind {
        Kind::File => Ok(file.metadata().ctx(path.display())?.len()),
        Kind::Block => sys::blkgetsize64(file)
            .map_err(|e| Error::io(format!("{}: BLKGETSIZE64", path.display()), e.into())),
    }
}

impl Volume {
    /// Opens a source read-only. A missing or unreadable source is bad input.
    pub fn open_source(path: &Path) -> Result<Volume> {
        let file = File::open(path)
            .map_err(|e| Error::input(format!("cannot open source {}: {e}", path.display())))?;
        let kind = kind_of(path, &file)?;
        let size = size_of(path, &file, kind)?;
        if kind == Kind::Block {
            // A filesystem mounted from this device writes file data around
            // the device's own page cache, which can therefore hold stale
            // copies of blocks from an earlier read. Drop them so every read
            // of a pass comes from the device.
            let _ = nix::fcntl::posix_fadvise(
                file.as_raw_fd(),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
        Ok(Volume::plain(file, path, kind, size))
    }

    /// Opens a source to be read in `mode`. `Direct` is refused, clearly,
    /// where the filesystem holding an image file does not support
    /// `O_DIRECT` (tmpfs, for one).
    pub fn open_source_reader(path: &Path, mode: ReadMode) -> Result<Volume> {
        let mut v = Self::open_source(path)?;
        match mode {
            ReadMode::Buffered => {}
            ReadMode::Direct => {
                let f = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .map_err(|e| {
                        Error::input(format!(
                            "--direct: cannot open {} with O_DIRECT ({e}); its filesystem may not support direct I/O, use --drop-cache instead",
                            path.display()
                        ))
                    })?;
                v.direct = Some(f);
            }
            ReadMode::Mapped => v = v.map_reads(),
        }
        Ok(v)
    }

    /// Makes [`Volume::read_block`] read through memory maps
    /// ([`ReadMode::Mapped`]).
    pub fn map_reads(mut self) -> Volume {
        sigbus::install();
        self.mapped = AtomicBool::new(true);
        self
    }

    /// True when [`Volume::read_block`] hands out live views of the source
    /// (memory maps) rather than copies.
    pub fn reads_mapped(&self) -> bool {
        self.mapped.load(Ordering::Relaxed)
    }

    /// Reads `len` bytes at `offset` (a multiple of 4 KiB). Buffered and
    /// direct reads return a buffer of the block's own; `copy` forces one
    /// even on a mapped volume. Otherwise a mapped volume returns a
    /// read-only shared map of the block, which stays valid (the range is
    /// inside the volume, whose size cannot change under a block device, and
    /// an image file that shrinks raises `SIGBUS`, handled) but whose bytes
    /// change when the source is written: whoever keeps or sends them must
    /// copy them first and hash the copy.
    pub fn read_block(&self, len: usize, offset: u64, copy: bool) -> Result<bytes::Bytes> {
        if self.reads_mapped() && !copy && len > 0 {
            // A range inside the volume; its bytes may change under a
            // concurrent writer (documented above: callers copy before
            // keeping).
            let map = sys::map_shared_read(&self.file, offset, len).map_err(|e| {
                Error::io(
                    format!("memory map of {} at offset {offset}", self.path.display()),
                    e,
                )
            })?;
            // Fault every page in now (MADV_POPULATE_READ, Linux 5.14): a
            // read error is then an error return, not a SIGBUS, and the
            // block is read again below with pread, which reports it with
            // its offset. Only a page evicted and failing to read back
            // between here and the hash can still raise SIGBUS.
            match map.advise(memmap2::Advice::PopulateRead) {
                Ok(()) => return Ok(bytes::Bytes::from_owner(map)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // A kernel without MADV_POPULATE_READ: read instead.
                    self.mapped.store(false, Ordering::Relaxed);
                }
                Err(_) => {}
            }
        }
        match &self.direct {
            None => Ok(bytes::Bytes::from(self.read_vec_at(len, offset)?)),
            Some(f) => {
                let mut buf = AlignedBuf::new(len);
                let done = self.pread_into(f, buf.spare(), offset, true)?;
                if done < len {
                    // An unaligned short read inside the volume: finish buffered.
                    let rest = &mut buf.spare()[done..len];
                    let more = self.pread_into(&self.file, rest, offset + done as u64, false)?;
                    if done + more < len {
                        return Err(self.short_read(offset + (done + more) as u64));
                    }
                }
                buf.set_len(len);
                Ok(bytes::Bytes::from_owner(buf))
            }
        }
    }

    /// Fills `buf` from `offset` until it is full, the end of the volume,
    /// or (`direct`) a short read that leaves the position unaligned;
    /// returns the bytes read.
    fn pread_into(&self, f: &File, buf: &mut [u8], offset: u64, direct: bool) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    if direct && done % ALIGN != 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "read of {} at offset {}",
                            self.path.display(),
                            offset + done as u64
                        ),
                        e,
                    ))
                }
            }
        }
        Ok(done)
    }

    /// True when `offset..offset + len` of an image file is a hole (reads
    /// as zeros without being stored), found with `SEEK_DATA`. Always false
    /// for block devices, and wherever the filesystem cannot tell.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        if self.kind != Kind::File {
            return false;
        }
        match nix::unistd::lseek(
            self.file.as_raw_fd(),
            offset as libc::off_t,
            nix::unistd::Whence::SeekData,
        ) {
            Ok(data) => data as u64 >= offset + len,
            // No data at or after `offset`.
            Err(nix::errno::Errno::ENXIO) => offset < self.size,
            Err(_) => false,
        }
    }

    fn short_read(&self, at: u64) -> Error {
        Error::Io(format!(
            "read of {} at offset {at}: unexpected end of volume",
            self.path.display()
        ))
    }

    /// Opens a target read-write and exclusively, creating a missing image
    /// file sparse at `size`. Refuses a target smaller than `size`, and one
    /// that is mounted or in use. `path` is the export's canonical path,
    /// resolved when the receiver started: a symbolic link found there now
    /// was put there since, and is not followed. A file created here is
    /// removed again when anything after its creation fails.
    pub fn open_target(path: &Path, size: u64) -> Result<(Volume, Created)> {
        let opened = Self::open_target_inner(path, size);
        if let Err((Created::New, _)) = &opened {
            let _ = std::fs::remove_file(path);
        }
        opened.map_err(|(_, e)| e)
    }

    fn open_target_inner(
        path: &Path,
        size: u64,
    ) -> std::result::Result<(Volume, Created), (Created, Error)> {
        let mut created = Created::Existing;
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL | libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .ctx(format!("cannot create target {}", path.display()))
                    .map_err(|e| (Created::Existing, e))?;
                created = Created::New;
                f
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err((
                    created,
                    Error::input(format!(
                        "target {} has become a symbolic link since the receiver started; it is not followed (restart serve to export what it points to now)",
                        path.display()
                    )),
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err((
                    created,
                    Error::InUse(format!(
                        "target {} is in use (mounted, or held open exclusively by another program)",
                        path.display()
                    )),
                ))
            }
            Err(e) => {
                return Err((
                    created,
                    Error::io(format!("cannot open target {}", path.display()), e),
                ))
            }
        };
        let fail = |e| (created, e);
        let kind = kind_of(path, &file).map_err(fail)?;
        if kind == Kind::File {
            if !lock_exclusive(&file) {
                return Err(fail(Error::InUse(format!(
                    "target {} is in use by another nightpass process",
                    path.display()
                ))));
            }
            if created == Created::New {
                file.set_len(size)
                    .ctx(format!("cannot size target {}", path.display()))
                    .map_err(fail)?;
            }
        }
        let actual = size_of(path, &file, kind).map_err(fail)?;
        if actual < size {
            return Err(fail(Error::TooSmall(format!(
                "target {} ({actual} bytes) is smaller than the source ({size} bytes)",
                path.display()
            ))));
        }
        Ok((Volume::plain(file, path, kind, actual), created))
    }

    /// A volume over an open descriptor, read with `pread` (not mapped, no
    /// `O_DIRECT` descriptor).
    fn plain(file: File, path: &Path, kind: Kind, size: u64) -> Volume {
        Volume {
            file,
            direct: None,
            mapped: AtomicBool::new(false),
            no_nowait: AtomicBool::new(false),
            path: path.to_owned(),
            kind,
            size,
        }
    }

    /// Opens an existing volume read-only for verification (no exclusivity:
    /// verify reads while others may hold it).
    pub fn open_for_verify(path: &Path) -> Result<Volume> {
        Self::open_source(path)
    }

    /// Opens a receiver's export read-only, like [`Volume::open_for_verify`],
    /// without following a symbolic link at `path` (the export's canonical
    /// path, pinned when the receiver started).
    pub fn open_export(path: &Path) -> Result<Volume> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => Error::input(format!(
                    "target {} has become a symbolic link since the receiver started; it is not followed",
                    path.display()
                )),
                _ => Error::input(format!("cannot open target {}: {e}", path.display())),
            })?;
        let kind = kind_of(path, &file)?;
        let size = size_of(path, &file, kind)?;
        Ok(Volume::plain(file, path, kind, size))
    }

    /// Who this volume is ([`VolumeIdentity`]), from its open descriptor.
    pub fn identity(&self) -> Result<VolumeIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata().ctx(self.path.display())?;
        Ok(match self.kind {
            Kind::File => VolumeIdentity::File {
                dev: m.dev(),
                ino: m.ino(),
                btime: sys::birth_time(&self.file),
            },
            Kind::Block => VolumeIdentity::Block {
                rdev: m.rdev(),
                size: self.size,
            },
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Block device or file.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                format!("read of {} at offset {offset}", self.path.display()),
                e,
            )
        })
    }

    /// Reads exactly `len` bytes at `offset` into a fresh buffer, without
    /// first zero-filling it (the kernel writes every byte handed out).
    pub fn read_vec_at(&self, len: usize, offset: u64) -> Result<Vec<u8>> {
        Ok(self
            .read_vec_flags(len, offset, 0)?
            .expect("a read without RWF_NOWAIT does not give up"))
    }

    /// Like [`Volume::read_vec_at`], but only from the page cache
    /// (`RWF_NOWAIT`): `None` when any of the bytes would need the disk (or
    /// the kernel cannot tell), so the caller can take the read off an
    /// async worker.
    pub fn read_vec_cached(&self, len: usize, offset: u64) -> Result<Option<Vec<u8>>> {
        if self.no_nowait.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.read_vec_flags(len, offset, libc::RWF_NOWAIT)
    }

    fn read_vec_flags(
        &self,
        len: usize,
        offset: u64,
        flags: libc::c_int,
    ) -> Result<Option<Vec<u8>>> {
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        while buf.len() < len {
            let done = buf.len();
            let at = offset + done as u64;
            let e = match sys::preadv2_append(&self.file, &mut buf, len - done, at, flags) {
                Ok(0) => return Err(self.short_read(at)),
                Ok(_) if buf.len() < len && flags & libc::RWF_NOWAIT != 0 => {
                    // Part of it is cached, the rest is not.
                    return Ok(None);
                }
                Ok(_) => continue,
                Err(e) => e,
            };
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if flags & libc::RWF_NOWAIT != 0 => return Ok(None),
                Some(libc::EOPNOTSUPP) if flags & libc::RWF_NOWAIT != 0 => {
                    self.no_nowait.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
                _ => {}
            }
            return Err(Error::io(
                format!("read of {} at offset {at}", self.path.display()),
                e,
            ));
        }
        Ok(Some(buf))
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io(
                format!("write to {} at offset {offset}", self.path.display()),
                e,
            )
        })
    }

    /// Makes `len` bytes at `offset` read as zeros: `BLKZEROOUT` on devices,
    /// hole punching on files, plain zero writes where neither works.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let fd = self.file.as_raw_fd();
        let done = match self.kind {
            Kind::Block => sys::blkzeroout(&self.file, offset, len).is_ok(),
            Kind::File => nix::fcntl::fallocate(
                fd,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .is_ok(),
        };
        if !done {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                self.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
        }
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn sync_data(&self) -> Result<()> {
        self.file
            .sync_data()
            .ctx(format!("fdatasync of {}", self.path.display()))
    }

    /// Tells the kernel the range will not be needed again soon, so a pass
    /// over a production disk does not evict its page cache.
    pub fn drop_cache(&self, offset: u64, len: u64) {
        let _ = nix::fcntl::posix_fadvise(
            self.file.as_raw_fd(),
            offset as i64,
            len as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}
