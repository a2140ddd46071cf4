//! Dynamic batching: requests wait in one queue with their token counts; one batching thread
//! takes the oldest that fit in `--max-batch-tokens` together, runs them as one batch on the
//! inference thread pool through the backend, and answers each request through its own
//! channel with its own rows in its own order.
//!
//! A batch is cut into forward passes that run side by side, one per thread of the pool (up to
//! [`MAX_PASSES`], no more than `--batch-size` sentences each), as `--task=1` runs its batches:
//! one pass alone leaves a small machine's cores waiting on each other at every product. Only
//! one batch runs at a time, so requests that arrive meanwhile gather into the next.
//!
//! When a batch ends, the clients it answered usually send again at once. The next batch waits
//! for them, briefly ([`gather_until`]: as many new requests as the last batch answered, for at
//! most a tenth of its time and [`GATHER_MAX`]), so that they join it instead of starting a
//! batch of their own; a server that was idle, or a queue holding a full batch, does not wait.
//!
//! A batch that fails is run again one request at a time, so that only the request at fault
//! gets the error; the thread goes on with the next batch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::backend::Backend;
use super::metrics;
use crate::tokenize::Encoded;

/// What a request asks of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Pipeline vectors (before the request's truncation and normalisation).
    Embed,
    /// The multitask heads' probabilities.
    Predict,
}

/// The rows of one request, in its inputs' order.
#[derive(Debug)]
pub enum Rows {
    Vectors(Vec<Vec<f32>>),
    /// `[input][head][label]`.
    Probabilities(Vec<[Vec<f32>; 2]>),
}

/// A failed batch, as the request sees it.
pub type BatchResult = Result<Rows, String>;

/// One request waiting for the model.
pub struct Entry {
    pub job: Job,
    pub encoded: Vec<Encoded>,
    pub queued: Instant,
    pub reply: oneshot::Sender<BatchResult>,
}

impl Entry {
    fn tokens(&self) -> usize {
        self.encoded.iter().map(|e| e.ids.len()).sum()
    }
}

/// Forward passes side by side in one batch, at most, whatever the threads (as `--task=1`).
pub const MAX_PASSES: usize = 4;

/// The longest wait for the requests of the last batch to come back.
pub const GATHER_MAX: Duration = Duration::from_millis(5);

/// How batches are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Tokens of one batch, at most (a request over it runs alone).
    pub max_batch_tokens: usize,
    /// Forward passes run side by side in a batch.
    pub passes: usize,
    /// Sentences per forward pass, at most (`--batch-size`).
    pub batch_size: usize,
}

impl Policy {
    /// The policy for a pool of `threads` threads: a pass per thread up to [`MAX_PASSES`].
    pub fn new(max_batch_tokens: usize, threads: usize, batch_size: usize) -> Self {
        Self {
            max_batch_tokens,
            passes: threads.clamp(1, MAX_PASSES),
            batch_size: batch_size.max(1),
        }
    }

    /// Sentences per forward pass for a batch of `sentences`: split evenly over the passes
    /// side by side, at most `batch_size` each.
    pub fn pass_size(&self, sentences: usize) -> usize {
        sentences.div_ceil(self.passes).clamp(1, self.batch_size)
    }

    /// Sentences that keep every pass of a batch full.
    fn full(&self) -> usize {
        self.passes * self.batch_size
    }
}

/// The sending side of the queue; [`Queue::close`] lets the batcher finish what is queued and
/// stop.
pub struct Queue {
    tx: Mutex<Option<mpsc::Sender<Entry>>>,
    depth: Arc<AtomicUsize>,
}

/// The queue is closed (the server is shutting down).
#[derive(Debug)]
pub struct Closed;

/// The model's work: a job over sentences, in forward passes of at most this many.
pub type RunFn<'a> = dyn Fn(Job, &[Encoded], usize) -> anyhow::Result<Rows> + Sync + 'a;

impl Queue {
    /// A queue and its batching thread, which ends once the queue is closed and empty.
    pub fn start(backend: Arc<Backend>, policy: Policy) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher::new(rx, depth.clone(), policy);
        let thread = std::thread::Builder::new()
            .name("batcher".into())
            .spawn(move || {
                // One batch runs at a time: the lock is never contended.
                let embedder = Mutex::new(backend.embedder());
                let run = |job: Job, encoded: &[Encoded], pass: usize| match job {
                    Job::Embed => {
                        // A panic in an earlier batch (answered as that batch's 500) left
                        // nothing half-done here: the embedder is settings and references.
                        let mut embedder = embedder.lock().unwrap_or_else(PoisonError::into_inner);
                        embedder.batch_size = pass;
                        backend.embed(&embedder, encoded).map(Rows::Vectors)
                    }
                    Job::Predict => backend.predict(encoded).map(Rows::Probabilities),
                };
                batcher.run(&run);
            })
            .expect("start the batching thread");
        let queue = Self {
            tx: Mutex::new(Some(tx)),
            depth,
        };
        (queue, thread)
    }

    /// Queues a request; its answer arrives on the receiver.
    pub fn push(
        &self,
        job: Job,
        encoded: Vec<Encoded>,
    ) -> Result<oneshot::Receiver<BatchResult>, Closed> {
        let (reply, rx) = oneshot::channel();
        let entry = Entry {
            job,
            encoded,
            queued: Instant::now(),
            reply,
        };
        let guard = self.tx.lock().expect("queue lock");
        let tx = guard.as_ref().ok_or(Closed)?;
        let depth = self.depth.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::queue_size(depth);
        tx.send(entry).map_err(|_| Closed)?;
        Ok(rx)
    }

    /// No more requests: the batcher answers those queued, then stops.
    pub fn close(&self) {
        self.tx.lock().expect("queue lock").take();
    }
}

/// The last batch: when its rows were ready, how many requests it answered, and how long it
/// ran.
#[derive(Debug, Clone, Copy)]
struct Last {
    end: Instant,
    answered: usize,
    took: Duration,
}

struct Batcher {
    rx: mpsc::Receiver<Entry>,
    /// Requests received and not yet batched, oldest first.
    pending: VecDeque<Entry>,
    depth: Arc<AtomicUsize>,
    policy: Policy,
    last: Option<Last>,
    /// The queue was closed: no more waiting for requests.
    closed: bool,
}

impl Batcher {
    fn new(rx: mpsc::Receiver<Entry>, depth: Arc<AtomicUsize>, policy: Policy) -> Self {
        Self {
            rx,
            pending: VecDeque::new(),
            depth,
            policy,
            last: None,
            closed: false,
        }
    }

    /// Batches until the queue is closed and empty. Each batch runs inside the thread pool,
    /// so that the joins of its parallel steps stay among the pool's threads instead of waking
    /// this one at every step.
    fn run(mut self, run: &RunFn) {
        loop {
            if self.pending.is_empty() {
                match self.rx.recv() {
                    Ok(e) => self.pending.push_back(e),
                    Err(_) => return,
                }
            }
            self.receive_ready();
            while let Some(until) = gather_until(&self.pending, self.last, &self.policy) {
                let wait = until.saturating_duration_since(Instant::now());
                if wait.is_zero() || self.closed {
                    break;
                }
                match self.rx.recv_timeout(wait) {
                    Ok(e) => {
                        self.pending.push_back(e);
                        self.receive_ready();
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => self.closed = true,
                }
            }
            let batch = self.next_batch();
            if batch.is_empty() {
                continue;
            }
            let answered = batch.len();
            let sentences = batch.iter().map(|e| e.encoded.len()).sum();
            let pass = self.policy.pass_size(sentences);
            let start = Instant::now();
            let end = rayon::scope(|_| answer(batch, &|job, encoded| run(job, encoded, pass)));
            self.last = Some(Last {
                end,
                answered,
                took: end - start,
            });
        }
    }

    /// Moves the requests already sent into `pending`.
    fn receive_ready(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(e) => self.pending.push_back(e),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    /// The oldest requests of the oldest request's job that fit in `max_batch_tokens`
    /// together (the oldest always goes, whatever its size). Requests whose client left are
    /// dropped.
    fn next_batch(&mut self) -> Vec<Entry> {
        let before = self.pending.len();
        self.pending.retain(|e| !e.reply.is_closed());
        let Some(job) = self.pending.front().map(|e| e.job) else {
            self.taken(before);
            return Vec::new();
        };
        let max = self.policy.max_batch_tokens;
        let mut batch = Vec::new();
        let mut tokens = 0;
        let mut rest = VecDeque::with_capacity(self.pending.len());
        while let Some(e) = self.pending.pop_front() {
            let t = e.tokens();
            if e.job == job && (batch.is_empty() || tokens + t <= max) {
                tokens += t;
                batch.push(e);
            } else {
                rest.push_back(e);
                if tokens >= max {
                    rest.extend(self.pending.drain(..));
                }
            }
        }
        self.pending = rest;
        self.taken(before - self.pending.len());
        metrics::batch(batch.len(), tokens);
        batch
    }

    /// `n` requests left the queue.
    fn taken(&self, n: usize) {
        let depth = self.depth.fetch_sub(n, Ordering::SeqCst) - n;
        metrics::queue_size(depth);
    }
}

/// Until when the next batch waits for more requests, or `None` to start now. It waits only
/// right after a batch (`last`), while fewer requests have arrived since it ended than it
/// answered and the queue holds less than a full batch (every pass full, or the token cap):
/// for at most a tenth of the last batch's time, and [`GATHER_MAX`], from the moment its rows
/// were ready.
fn gather_until(pending: &VecDeque<Entry>, last: Option<Last>, policy: &Policy) -> Option<Instant> {
    let last = last?;
    let sentences: usize = pending.iter().map(|e| e.encoded.len()).sum();
    let tokens: usize = pending.iter().map(Entry::tokens).sum();
    if sentences >= policy.full() || tokens >= policy.max_batch_tokens {
        return None;
    }
    let back = pending.iter().filter(|e| e.queued >= last.end).count();
    if back >= last.answered {
        return None;
    }
    Some(last.end + (last.took / 10).min(GATHER_MAX))
}

/// Runs `batch` together and answers each request with its own rows; if the batch fails,
/// runs each request alone so that only a failing one gets an error. Returns when the rows
/// were ready (before the first answer went out).
fn answer(batch: Vec<Entry>, run: &dyn Fn(Job, &[Encoded]) -> anyhow::Result<Rows>) -> Instant {
    let start = Instant::now();
    for e in &batch {
        metrics::queue_time(start - e.queued);
    }
    let job = batch[0].job;
    let mut sizes = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    let mut encoded = Vec::new();
    for e in batch {
        sizes.push(e.encoded.len());
        replies.push(e.reply);
        encoded.extend(e.encoded);
    }
    let together = guarded(|| counted(run(job, &encoded)?, encoded.len()));
    let ready = Instant::now();
    metrics::inference_time(ready - start);
    match together {
        Ok(rows) => {
            for (reply, rows) in replies.into_iter().zip(split(rows, &sizes)) {
                let _ = reply.send(Ok(rows));
            }
        }
        Err(e) if replies.len() == 1 => {
            tracing::error!(error = %e, "a batch failed");
            let _ = replies.pop().expect("one reply").send(Err(e));
        }
        Err(e) => {
            tracing::warn!(error = %e, requests = replies.len(), "a batch failed; running its requests one by one");
            let mut start = 0;
            for (reply, n) in replies.into_iter().zip(sizes) {
                let own = &encoded[start..start + n];
                start += n;
                let result = guarded(|| counted(run(job, own)?, own.len()));
                if let Err(e) = &result {
                    tracing::error!(error = %e, "a request's batch failed");
                }
                let _ = reply.send(result);
            }
        }
    }
    ready
}

/// `f`, with its error or panic as a message.
fn guarded(f: impl FnOnce() -> anyhow::Result<Rows>) -> Result<Rows, String> {
    match crate::panics::quietly(f) {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => Err(format!("the model failed ({panic})")),
    }
}

/// `rows`, if there is one per input (else a request would get another's rows, or none).
fn counted(rows: Rows, inputs: usize) -> anyhow::Result<Rows> {
    let n = match &rows {
        Rows::Vectors(v) => v.len(),
        Rows::Probabilities(p) => p.len(),
    };
    anyhow::ensure!(n == inputs, "the model gave {n} rows for {inputs} inputs");
    Ok(rows)
}

/// `rows` cut into consecutive parts of `sizes` (as many rows as the sizes sum to).
fn split(rows: Rows, sizes: &[usize]) -> Vec<Rows> {
    fn cut<T>(mut all: Vec<T>, sizes: &[usize]) -> Vec<Vec<T>> {
        let mut parts = Vec::with_capacity(sizes.len());
        for &n in sizes.iter().rev() {
            parts.push(all.split_off(all.len() - n));
        }
        parts.reverse();
        parts
    }
    match rows {
        Rows::Vectors(v) => cut(v, sizes).into_iter().map(Rows::Vectors).collect(),
        Rows::Probabilities(p) => cut(p, sizes).into_iter().map(Rows::Probabilities).collect(),
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
