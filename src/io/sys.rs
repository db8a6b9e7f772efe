//! System calls that need `unsafe`, each behind a small safe function.
//!
//! Owns every `unsafe` of the crate and of the binary: the ioctls
//! (`BLKGETSIZE64`, `BLKZEROOUT`, `FIFREEZE`, `FITHAW`), `flock`, `statx`,
//! `preadv2` into uninitialised memory, memory maps and `MADV_DONTNEED`,
//! `setsockopt`, signal dispositions and the `SIGBUS` handler, a duplicated
//! descriptor handed to a child process, and page-aligned buffers. Each
//! `unsafe` block carries a `// SAFETY:` comment stating the invariant that
//! makes it sound; where a caller must help keep it, the function's doc says
//! so. Nothing else may use `unsafe`: `lib.rs` and `main.rs` deny it, and only
//! this module is allowed.
//!
//! Errors come back raw (`std::io::Error`, `nix::Error`) for callers to put
//! in context. Must not know about chunks, manifests, volumes or the network
//! beyond a socket option: what a call means belongs to its caller.

use std::fs::File;
use std::os::unix::io::{AsRawFd, BorrowedFd, FromRawFd};
use std::process::Stdio;

mod ioctl {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
    nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);
}

/// Takes an exclusive, non-blocking `flock` on `file`; false when another
/// open file description holds one. Released when the file is closed.
pub fn flock_exclusive(file: &File) -> bool {
    // SAFETY: flock takes a valid descriptor (owned by `file`, alive for the
    // call) and an integer operation; it touches no memory of ours.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Birth time (seconds, nanoseconds) of an open file (`statx` with
/// `STATX_BTIME`), where the kernel and filesystem report one.
pub fn birth_time(file: &File) -> Option<(i64, u32)> {
    // SAFETY: an all-zero `struct statx` is a valid value (plain integers).
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes one `struct statx` through the pointer, which
    // points at a live local; the path is a static empty C string used with
    // AT_EMPTY_PATH on a descriptor owned by `file`.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BTIME,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_BTIME != 0)
        .then_some((stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec))
}

/// Size in bytes of the block device open as `file` (`BLKGETSIZE64`).
pub fn blkgetsize64(file: &File) -> nix::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live local; the descriptor is owned by `file`.
    unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size) }?;
    Ok(size)
}

/// Makes `len` bytes at `offset` of the block device open as `file` read as
/// zeros (`BLKZEROOUT`).
pub fn blkzeroout(file: &File, offset: u64, len: u64) -> nix::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 (offset, length) through the pointer,
    // which points at a live local array; the descriptor is owned by `file`.
    unsafe { ioctl::blkzeroout(file.as_raw_fd(), &range) }.map(|_| ())
}

/// Freezes the filesystem whose mount point is open as `dir` (`FIFREEZE`).
pub fn fifreeze(dir: &File) -> nix::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE on a descriptor owned by `dir`; the int argument
    // points at a live local.
    unsafe { ioctl::fifreeze(dir.as_raw_fd(), &mut arg) }.map(|_| ())
}

/// Thaws the filesystem whose mount point is open as `dir` (`FITHAW`).
pub fn fithaw(dir: &File) -> nix::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW on a descriptor owned by `dir`; the int argument points
    // at a live local.
    unsafe { ioctl::fithaw(dir.as_raw_fd(), &mut arg) }.map(|_| ())
}

/// Reads with `preadv2(2)` (`flags`: `RWF_*`) at `offset` into the spare
/// capacity of `buf`, at most `max` bytes, and extends `buf` by the bytes
/// read, without zero-filling them first. Returns their count (0 at the end
/// of the file); an error is the raw OS error (`EINTR` and, under
/// `RWF_NOWAIT`, `EAGAIN` included), `buf` unchanged.
pub fn preadv2_append(
    file: &File,
    buf: &mut Vec<u8>,
    max: usize,
    offset: u64,
    flags: libc::c_int,
) -> std::io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: max.min(spare.len()),
    };
    // SAFETY: the iovec covers part of the vector's spare capacity, which
    // preadv2 only writes to; the descriptor is owned by `file`.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: preadv2 initialised the first `n <= iov_len` bytes of the
    // spare capacity, which directly follow the vector's contents.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

/// A read-only shared memory map of `len` bytes of `file` at `offset`
/// (page-aligned), with the [`sigbus`] handler installed first.
///
/// The bytes are a live view: a concurrent writer of the file changes them,
/// so whoever keeps or sends them must copy them first and use the copy.
pub fn map_shared_read(file: &File, offset: u64, len: usize) -> std::io::Result<memmap2::Mmap> {
    sigbus::install();
    // SAFETY: the map is only ever read, through shared references. A
    // concurrent writer may change its bytes (callers copy before keeping,
    // as documented above), and a read past a shrunk file or of a failing
    // device raises SIGBUS, whose handler (installed above) ends the process.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    }
}

/// A read-write shared memory map of a whole file: its bytes through
/// `Deref`/`DerefMut`, made durable with [`SharedFileMap::flush`], its pages
/// released with [`SharedFileMap::release_pages`].
#[derive(Debug)]
pub struct SharedFileMap(memmap2::MmapMut);

impl SharedFileMap {
    /// Maps all of `file` read-write and shared.
    ///
    /// Callers keep the file from changing size while it is mapped: they
    /// hold it `flock`ed (see [`flock_exclusive`]) and never truncate it;
    /// a file truncated anyway by another program makes the next access
    /// fault (`SIGBUS`).
    pub fn map(file: &File) -> std::io::Result<SharedFileMap> {
        // SAFETY: the caller holds the file locked against other nightpass
        // processes and never truncates it while mapped (documented above);
        // the map is accessed only through `&self`/`&mut self` borrows.
        unsafe { memmap2::MmapMut::map_mut(file) }.map(SharedFileMap)
    }

    /// Makes every change durable (`msync`).
    pub fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }

    /// Makes changes to `len` bytes at `offset` durable (`msync`).
    pub fn flush_range(&self, offset: usize, len: usize) -> std::io::Result<()> {
        self.0.flush_range(offset, len)
    }

    /// Drops the map's pages from this process's resident set
    /// (`MADV_DONTNEED`); the next access maps them again from the page
    /// cache, dirty ones included, so nothing is lost.
    pub fn release_pages(&self) {
        // SAFETY: MADV_DONTNEED on a MAP_SHARED file mapping (the only kind
        // this type holds) only unmaps pages; their contents, dirty ones
        // included, remain in the page cache and reappear on the next
        // access, so no live reference into the map can observe a change.
        let _ = unsafe { self.0.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }
}

impl std::ops::Deref for SharedFileMap {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for SharedFileMap {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// Sets the socket option `opt` at `level` to the integer `value`
/// (`setsockopt`).
pub fn setsockopt_int(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads one c_int through the pointer, which points
    // at a live local of that size; the descriptor is borrowed, so open.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A duplicate of `fd` (`dup`), owned by the returned [`Stdio`], to hand to
/// a child process.
pub fn dup_stdio(fd: BorrowedFd<'_>) -> nix::Result<Stdio> {
    let out = nix::unistd::dup(fd.as_raw_fd())?;
    // SAFETY: `out` is a fresh descriptor that nothing else owns; Stdio
    // takes it over and closes it.
    Ok(unsafe { Stdio::from_raw_fd(out) })
}

/// Restores the default disposition of `SIGPIPE` (ending the process), so
/// a closed stdout (e.g. `| head`) ends it quietly rather than with a panic.
pub fn default_sigpipe() {
    // SAFETY: restoring the default disposition of SIGPIPE has no
    // preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Ignores `SIGHUP`, so a process outlives the terminal or ssh session that
/// started it.
pub fn ignore_sighup() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// Turns `SIGBUS` (a memory-mapped read that failed: an I/O error of the
/// device, or an image file shrunk under the map) into a clear message and
/// exit status 3 (a runtime I/O failure), instead of a crash. Nothing is lost
/// by ending there: the receiver writes only chunks verified against their
/// hashes, and the manifests claim only acknowledged, durable chunks, exactly
/// as when the process is killed.
pub mod sigbus {
    use std::sync::Once;

    static INSTALL: Once = Once::new();

    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"nightpass: error: a memory-mapped read failed (SIGBUS): a volume returned an I/O error or shrank while it was read; nothing unverified was written and the state is consistent; rerun the pass, with --drop-cache to read without memory maps\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is static.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(3);
        }
    }

    /// Installs the handler (once per process).
    pub fn install() {
        INSTALL.call_once(|| {
            let action = nix::sys::signal::SigAction::new(
                nix::sys::signal::SigHandler::Handler(on_sigbus),
                nix::sys::signal::SaFlags::empty(),
                nix::sys::signal::SigSet::empty(),
            );
            // SAFETY: the handler calls only async-signal-safe functions.
            let _ =
                unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGBUS, &action) };
        });
    }
}

pub use aligned::{AlignedBuf, ALIGN};

/// Page-aligned buffers for `O_DIRECT` reads, handed to `bytes::Bytes`
/// without a copy.
mod aligned {
    use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
    use std::ptr::NonNull;

    /// Alignment of buffers, offsets and lengths: the largest logical block
    /// size of common devices, so it suits any of them.
    pub const ALIGN: usize = 4096;

    /// A heap buffer aligned to [`ALIGN`], its capacity rounded up to it.
    pub struct AlignedBuf {
        ptr: NonNull<u8>,
        len: usize,
        cap: usize,
    }

    // SAFETY: the buffer is uniquely owned heap memory, like a Vec<u8>.
    unsafe impl Send for AlignedBuf {}
    // SAFETY: shared access only reads initialised bytes (`as_ref`).
    unsafe impl Sync for AlignedBuf {}

    impl AlignedBuf {
        /// A zeroed buffer of at least `len` bytes (zeroed so that
        /// [`AlignedBuf::spare`] is safe; the cost is small beside a disk read).
        pub fn new(len: usize) -> AlignedBuf {
            let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
            let layout = Layout::from_size_align(cap, ALIGN).expect("valid layout");
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { alloc_zeroed(layout) };
            let Some(ptr) = NonNull::new(raw) else {
                handle_alloc_error(layout)
            };
            AlignedBuf { ptr, len: 0, cap }
        }

        /// The whole capacity, for reading into.
        pub fn spare(&mut self) -> &mut [u8] {
            // SAFETY: `cap` zeroed bytes are owned by this buffer; `&mut self`
            // makes the borrow unique.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
        }

        /// Sets the length of the valid contents.
        pub fn set_len(&mut self, len: usize) {
            assert!(len <= self.cap);
            self.len = len;
        }
    }

    impl AsRef<[u8]> for AlignedBuf {
        fn as_ref(&self) -> &[u8] {
            // SAFETY: the first `len <= cap` bytes are initialised (zeroed at
            // allocation, then read into).
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }
    }

    impl Drop for AlignedBuf {
        fn drop(&mut self) {
            let layout = Layout::from_size_align(self.cap, ALIGN).expect("valid layout");
            // SAFETY: allocated in `new` with this very layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn aligned_and_rounded() {
            let mut b = AlignedBuf::new(5000);
            assert_eq!(b.spare().len(), 8192);
            assert_eq!(b.spare().as_ptr() as usize % ALIGN, 0);
            b.spare()[..3].copy_from_slice(b"abc");
            b.set_len(3);
            assert_eq!(b.as_ref(), b"abc");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::io::AsFd;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(bytes).unwrap();
        t.flush().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.path())
            .unwrap();
        (t, f)
    }

    #[test]
    fn preadv2_appends_at_most_max_and_stops_at_the_end() {
        let (_t, f) = file_with(b"0123456789");
        let mut buf = Vec::with_capacity(16);
        buf.extend_from_slice(b"ab");
        assert_eq!(preadv2_append(&f, &mut buf, 3, 4, 0).unwrap(), 3);
        assert_eq!(buf, b"ab456");
        assert_eq!(preadv2_append(&f, &mut buf, 100, 8, 0).unwrap(), 2);
        assert_eq!(buf, b"ab45689");
        assert_eq!(preadv2_append(&f, &mut buf, 4, 10, 0).unwrap(), 0);
        assert_eq!(buf.len(), 7);
    }

    #[test]
    fn preadv2_error_leaves_the_buffer_alone() {
        let (_t, f) = file_with(b"data");
        let mut buf = Vec::with_capacity(4);
        let e = preadv2_append(&f, &mut buf, 4, 0, -1).unwrap_err();
        assert!(e.raw_os_error().is_some());
        assert!(buf.is_empty());
    }

    #[test]
    fn shared_map_survives_released_pages_and_reaches_the_file() {
        let (t, f) = file_with(&[0u8; 8192]);
        let mut m = SharedFileMap::map(&f).unwrap();
        m[4096..4099].copy_from_slice(b"xyz");
        m.release_pages();
        assert_eq!(&m[4096..4099], b"xyz");
        m.flush_range(4096, 4096).unwrap();
        m.flush().unwrap();
        assert_eq!(&std::fs::read(t.path()).unwrap()[4096..4099], b"xyz");
    }

    #[test]
    fn read_map_sees_the_range() {
        let mut data = vec![1u8; 4096];
        data.extend_from_slice(&[2u8; 4096]);
        let (_t, f) = file_with(&data);
        let m = map_shared_read(&f, 4096, 4096).unwrap();
        assert!(m.iter().all(|&b| b == 2));
    }

    #[test]
    fn flock_is_exclusive_between_descriptions() {
        let (t, f) = file_with(b"x");
        assert!(flock_exclusive(&f));
        let other = File::open(t.path()).unwrap();
        assert!(!flock_exclusive(&other));
        drop(f);
        assert!(flock_exclusive(&other));
    }

    #[test]
    fn socket_options_and_descriptors() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        setsockopt_int(s.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 1 << 16).unwrap();
        let e = setsockopt_int(s.as_fd(), libc::SOL_SOCKET, -1, 1).unwrap_err();
        assert!(e.raw_os_error().is_some());
        assert!(dup_stdio(s.as_fd()).is_ok());
    }

    #[test]
    fn plain_files_are_no_block_devices() {
        let (_t, f) = file_with(b"x");
        assert!(blkgetsize64(&f).is_err());
        assert!(blkzeroout(&f, 0, 4096).is_err());
        // Where the filesystem keeps birth times, a fresh file has one.
        if let Some((secs, nanos)) = birth_time(&f) {
            assert!(secs > 0 && nanos < 1_000_000_000);
        }
    }
}
