//! Thread pools. Matrix products (gemm, inside candle and in the fast path) and the fast
//! path's kernels share rayon's global pool. candle's element-wise ops have a second pool
//! whose idle workers spin on a barrier; on a small machine they take cores from the matrix
//! products (a third of a training step's time, measured on 2 cores), so that pool gets one
//! thread unless `CANDLE_NUM_THREADS` says otherwise.

/// Sets the thread counts; call before any candle or rayon work. `threads` overrides
/// `RAYON_NUM_THREADS` and the core count.
pub fn configure(threads: Option<usize>) {
    // SAFETY (set_var): called first thing in main, before any other thread exists.
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
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
