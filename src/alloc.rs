//! Memory reuse. Every tensor op allocates its output; by default glibc serves blocks above
//! 128 KiB with fresh `mmap`s and returns them, and trims the heap top after large frees, so
//! each op pays page faults on new memory (a third of a training step's time, measured).
//! Raising the thresholds keeps freed blocks in the heap for the next op.

/// Tunes glibc malloc to reuse freed memory. Call once, first thing in `main`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        // Blocks up to 32 MiB (glibc's ceiling for this setting) come from the heap.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // Keep freed memory at the heap top instead of returning it after each large free,
        // and grow the heap in large steps.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Returns the heap's free pages to the system. With [`keep_freed_memory`] nothing is given
/// back on its own, so memory freed on one thread (the float32 weights read while loading)
/// would stay resident while other threads' allocations come from their own arenas.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
