//! Memory reuse. Every tensor op allocates its output; by default glibc serves blocks above
//! 128 KiB with fresh `mmap`s and returns them, and trims the heap top after large frees, so
//! each op pays page faults on new memory (a third of a training step's time, measured).
//! Raising the thresholds keeps freed blocks in the heap for the next op.

/// Tunes glibc malloc to reuse freed memory. Call once, first thing in `main`.
pub fn keep_freed_memory() {
    // Blocks up to 32 MiB (glibc's ceiling for this setting) come from the heap; freed memory
    // stays at the heap top instead of being returned after each large free, and the heap
    // grows in steps of 256 MiB.
    crate::sys::tune_malloc(32 << 20, 256 << 20);
}

/// Returns the heap's free pages to the system. With [`keep_freed_memory`] nothing is given
/// back on its own, so memory freed on one thread (the float32 weights read while loading)
/// would stay resident while other threads' allocations come from their own arenas.
pub fn release_freed() {
    crate::sys::trim_heap();
}
