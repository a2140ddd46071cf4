//! Thread pools. Matrix products (gemm) and our fused ops and kernels use rayon's global pool,
//! `--threads` (or `RAYON_NUM_THREADS`, or the core count) wide. candle's remaining
//! element-wise ops run on a pool of their own whose idle workers spin on a barrier; with
//! the heavy ops fused into ours, those spinners only take cores from the matrix products
//! (6% of training throughput on 2 cores, measured), so that pool gets one thread unless
//! `CANDLE_NUM_THREADS` says otherwise.

/// Sets the thread counts; call before any candle or rayon work.
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
