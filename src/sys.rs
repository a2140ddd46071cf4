//! The system calls fetch-ml makes outside the kernel crate, each behind a safe function: the
//! allocator's thresholds and trimming, file locks, the umask, the page size, whether a
//! process is alive, an atomic exchange of two names, write permission, and descriptors
//! (whether one is open, a duplicate of one). With [`crate::interrupt`]'s signal handler, this is the only module of
//! the main crate allowed `unsafe` (see `lib.rs`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Tunes glibc malloc: blocks up to `mmap_threshold` bytes come from the heap, freed memory
/// stays at the heap top (no trimming), and the heap grows `top_pad` bytes at a time. Call
/// before other threads start. Nothing elsewhere.
pub fn tune_malloc(mmap_threshold: i32, top_pad: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_threshold);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, top_pad);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (mmap_threshold, top_pad);
}

/// Returns the heap's free pages to the system (glibc; nothing elsewhere).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Takes an exclusive `flock` on `file`; with `wait` false, `Ok(false)` when another process
/// holds it.
pub fn lock_exclusive(file: &File, wait: bool) -> io::Result<bool> {
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    // SAFETY: flock on a file descriptor `file` owns for the call; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == std::io::ErrorKind::WouldBlock {
        return Ok(false);
    }
    Err(err)
}

/// The process's umask.
pub fn umask() -> u32 {
    // SAFETY: umask only swaps the process's mask; it is set back at once. No other thread
    // creates files meanwhile (callers: checkpoint saves).
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    }
}

/// The size of a memory page in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64
}

/// Whether process `pid` is known to be gone (signal 0 says it does not exist).
pub fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks whether the process exists.
    pid > 0
        && unsafe { libc::kill(pid, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// `path` as a C string, or an error for a NUL byte in it.
fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

/// Swaps the names of `a` and `b` in one step (`renameat2` with `RENAME_EXCHANGE`); an error
/// when the file system cannot (then nothing changed).
pub fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    let (ca, cb) = (c_path(a)?, c_path(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call; renameat2 reads them only.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether this process may write to `path` (`access(W_OK)`: nothing is opened, so a named
/// pipe does not wait).
pub fn may_write(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: a NUL-terminated path; access only checks permissions.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `fd` is one of this process's open descriptors.
pub fn descriptor_open(fd: i32) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; an invalid one gives -1.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// A duplicate of descriptor `fd` as a file (close-on-exec): it shares the open file (its
/// offset, its append mode).
pub fn duplicate(fd: i32) -> io::Result<File> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor (or -1) that nothing else owns.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `d` is a fresh descriptor owned by nothing else; the File takes it over.
    Ok(unsafe { File::from_raw_fd(d) })
}

/// Makes a named pipe at `path` (mode 0600).
pub fn make_fifo(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: a NUL-terminated path; mkfifo only creates the node.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
