//! Thread pools. Matrix products (gemm, inside candle and in the fast path) and the fast
//! path's kernels use rayon's global pool; candle's element-wise ops use a pool of its own,
//! which follows `RAYON_NUM_THREADS` unless `CANDLE_NUM_THREADS` is set.

/// Sets the thread counts; call before any candle or rayon work. `threads` overrides
/// `RAYON_NUM_THREADS` and the core count, for both pools.
pub fn configure(threads: Option<usize>) {
    if let Some(n) = threads {
        // SAFETY (set_var): called first thing in main, before any other thread exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let n = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}
