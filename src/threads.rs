//! Thread pools. Matrix products (gemm) and our fused ops and kernels use rayon's global pool,
//! `--threads` (or `RAYON_NUM_THREADS`, or the core count) wide. candle's remaining
//! element-wise ops run on a pool of their own whose idle workers spin on a barrier; with
//! the heavy ops fused into ours, those spinners only take cores from the matrix products
//! (6% of training throughput on 2 cores, measured), so that pool gets one thread unless
//! `CANDLE_NUM_THREADS` says otherwise.
//!
//! A thread count far above the cores only slows the run (1,000 threads made a 0.14 s run take
//! 6.4 s), so it is capped at [`OVERSUBSCRIBE`] times the cores, with a note. Where the process
//! may not start that many threads (a container's process limit), fewer are used, with a note:
//! rayon's global pool can be built only once, and a failed build would make every later use
//! panic, so the count is probed with plain threads first.

use anyhow::{bail, Result};

/// Threads per core beyond which more threads are not used.
pub const OVERSUBSCRIBE: usize = 4;

/// Sets the thread counts; call before any candle or rayon work. Returns the threads used.
pub fn configure(threads: Option<usize>) -> Result<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0);
    let (asked, source) = match (threads, from_env) {
        (Some(n), _) => (n, "--threads"),
        (None, Some(n)) => (n, "RAYON_NUM_THREADS"),
        (None, None) => (cores, ""),
    };
    if asked == 0 {
        bail!("--threads 0: give at least 1 thread");
    }
    let mut n = asked;
    if n > OVERSUBSCRIBE * cores {
        n = OVERSUBSCRIBE * cores;
        crate::note!(
            "note: {source} {asked} is far above this machine's {cores} core(s); using {n} \
             threads (more only slow the run down)"
        );
    }
    let startable = probe(n);
    if startable == 0 {
        bail!(
            "cannot start any worker thread (the process limit is reached: see `ulimit -u`); \
             raise the limit or run fewer processes"
        );
    }
    if startable < n {
        crate::note!(
            "note: only {startable} of the {n} threads asked for could be started (a process \
             or memory limit); using {startable}"
        );
        n = startable;
    }
    // SAFETY (set_var): called first thing in main, before any other thread exists; the
    // probe's threads have all been joined.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
    {
        bail!("cannot start {n} worker threads: {e}; pass a smaller --threads");
    }
    Ok(n)
}

/// How many of `n` threads (with the default stack, as rayon's) this process can start,
/// keeping one spare for the other pools; every probe thread is joined before returning.
fn probe(n: usize) -> usize {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    let mut handles = Vec::new();
    // One more than needed: candle's own pool and the tokenizer need room too.
    for _ in 0..=n {
        let rx = rx.clone();
        match std::thread::Builder::new().spawn(move || {
            let _ = rx.lock().map(|r| r.recv());
        }) {
            Ok(h) => handles.push(h),
            Err(_) => break,
        }
    }
    let started = handles.len();
    drop(tx);
    for h in handles {
        let _ = h.join();
    }
    if started > n {
        n
    } else {
        // Leave one of what could be started for the rest of the process.
        started.saturating_sub(1)
    }
}
