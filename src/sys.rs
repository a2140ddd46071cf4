//! The system calls fetch-ml makes outside the kernel crate, each behind a safe function: the
//! allocator's thresholds and trimming, file locks, the umask, the page size, and whether a
//! process is alive. With [`crate::interrupt`]'s signal handler, this is the only module of
//! the main crate allowed `unsafe` (see `lib.rs`).

use std::os::fd::AsRawFd;

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
pub fn lock_exclusive(file: &std::fs::File, wait: bool) -> std::io::Result<bool> {
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
