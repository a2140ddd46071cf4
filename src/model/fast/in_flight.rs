//! Batches side by side: [`map_batches`] runs a few batches at once on the thread pool, each
//! with its own [`Workspace`] from a [`WorkspacePool`]; each batch's products stay parallel.
//!
//! One batch at a time left the two cores of a small machine waiting on each other at every
//! product, softmax and LayerNorm (a join per step). With several batches in flight, a thread
//! left without a batch helps with the parallel parts of those still running. A sentence's
//! vector does not depend on which thread computed it.

use rayon::prelude::*;

use super::Workspace;

/// Workspaces for batches in flight: each batch borrows one (a new one when all are in use)
/// and gives it back, so there are as many as batches ever ran at once.
#[derive(Default)]
pub struct WorkspacePool(std::sync::Mutex<Vec<Workspace>>);

impl WorkspacePool {
    /// Runs `f` with a workspace no other batch is using.
    pub fn with<R>(&self, f: impl FnOnce(&mut Workspace) -> R) -> R {
        let mut ws = self
            .0
            .lock()
            .expect("workspace lock")
            .pop()
            .unwrap_or_default();
        let r = f(&mut ws);
        self.0.lock().expect("workspace lock").push(ws);
        r
    }

    /// Frees the workspaces not in use (their buffers hold whole batches' activations).
    pub fn clear(&self) {
        self.0.lock().expect("workspace lock").clear();
    }
}

/// Batches in flight at once, at most (and no more than the pool has threads). Each holds a
/// workspace with a whole batch's activations; beyond this many threads, threads share batches.
pub const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// Tokens the batches in flight hold together, at most, unless one batch alone has more (it
/// then runs alone). Activations grow with tokens, so the workspaces of the batches in flight
/// never hold more than one batch of 32 sentences of 512 tokens would.
pub const MAX_TOKENS_IN_FLIGHT: usize = 16_384;

/// `f` over `batches`, results in order. Consecutive batches run as a group, side by side: up
/// to [`MAX_BATCHES_IN_FLIGHT`] of them, no more than the pool has threads, and together at
/// most [`MAX_TOKENS_IN_FLIGHT`] tokens (`tokens` counts a batch's). After a group in which a
/// batch failed, no more batches start, and the first error in batch order is returned.
pub fn map_batches<B: Sync, T: Send, E: Send>(
    batches: &[B],
    tokens: impl Fn(&B) -> usize,
    f: impl Fn(&B) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E> {
    let most = rayon::current_num_threads().clamp(1, MAX_BATCHES_IN_FLIGHT);
    let mut out = Vec::with_capacity(batches.len());
    let mut start = 0;
    while start < batches.len() {
        let (mut end, mut held) = (start + 1, tokens(&batches[start]));
        while end < batches.len() && end - start < most {
            let t = tokens(&batches[end]);
            if held + t > MAX_TOKENS_IN_FLIGHT {
                break;
            }
            held += t;
            end += 1;
        }
        let group: Vec<Result<T, E>> = batches[start..end]
            .par_iter()
            .with_max_len(1)
            .map(&f)
            .collect();
        for r in group {
            out.push(r?);
        }
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Runs `map_batches` on a pool of `threads` over `n` batches of `tokens` tokens each,
    /// failing batch `fail`; returns the result, the most batches that ran at once and how
    /// many ran at all.
    fn run(
        threads: usize,
        n: usize,
        tokens: usize,
        fail: Option<usize>,
    ) -> (Result<Vec<usize>, String>, usize, usize) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (now, most, ran) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let batches: Vec<usize> = (0..n).collect();
        let out = pool.install(|| {
            map_batches(
                &batches,
                |_| tokens,
                |&b| {
                    ran.fetch_add(1, Ordering::SeqCst);
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    // Long enough for the other threads to start theirs.
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    now.fetch_sub(1, Ordering::SeqCst);
                    if fail == Some(b) {
                        return Err(format!("batch {b} failed"));
                    }
                    Ok(b * 10)
                },
            )
        });
        (out, most.into_inner(), ran.into_inner())
    }

    /// Results come back in batch order, and no more than `MAX_BATCHES_IN_FLIGHT` batches run
    /// at once even on a pool with more threads.
    #[test]
    fn keeps_order_and_bounds_batches_in_flight() {
        let (out, most, _) = run(2 * MAX_BATCHES_IN_FLIGHT, 40, 1, None);
        assert_eq!(out.unwrap(), (0..40).map(|b| b * 10).collect::<Vec<_>>());
        assert!(most <= MAX_BATCHES_IN_FLIGHT, "{most} batches ran at once");
        assert!(most > 1, "batches never ran side by side");
    }

    /// Batches that together exceed `MAX_TOKENS_IN_FLIGHT` run one at a time.
    #[test]
    fn bounds_tokens_in_flight() {
        let (out, most, _) = run(4, 12, MAX_TOKENS_IN_FLIGHT / 2 + 1, None);
        assert_eq!(out.unwrap().len(), 12);
        assert_eq!(most, 1, "batches over the token budget ran side by side");
        let (_, most, _) = run(4, 12, MAX_TOKENS_IN_FLIGHT / 2, None);
        assert!(
            most > 1,
            "two batches within the token budget never ran side by side"
        );
    }

    /// A failing batch gives its error, and the batches after its group never start.
    #[test]
    fn stops_after_a_failing_group() {
        let (out, _, ran) = run(2, 40, 1, Some(5));
        assert_eq!(out.unwrap_err(), "batch 5 failed");
        // Groups of 2: batch 5 is in the group {4, 5}; batches 0-5 ran, nothing after.
        assert_eq!(ran, 6);
    }
}
