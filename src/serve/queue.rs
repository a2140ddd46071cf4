//! Dynamic batching: requests wait in one queue with their token counts; one batching thread
//! takes as many as fit in `--max-batch-tokens` (oldest first), runs them together through the
//! backend (length-sorted forward passes, side by side, as `--task=1` runs a chunk), and
//! answers each request through its own channel with its own rows in its own order.
//!
//! A batch that fails is run again one request at a time, so that only the request at fault
//! gets the error; the thread goes on with the next batch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

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

/// The sending side of the queue; [`Queue::close`] lets the batcher finish what is queued and
/// stop.
pub struct Queue {
    tx: Mutex<Option<mpsc::Sender<Entry>>>,
    depth: Arc<AtomicUsize>,
}

/// The queue is closed (the server is shutting down).
#[derive(Debug)]
pub struct Closed;

impl Queue {
    /// A queue and its batching thread, which ends once the queue is closed and empty.
    pub fn start(
        backend: Arc<Backend>,
        max_batch_tokens: usize,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher {
            rx,
            pending: VecDeque::new(),
            depth: depth.clone(),
            max_batch_tokens,
        };
        let thread = std::thread::Builder::new()
            .name("batcher".into())
            .spawn(move || batcher.run(&backend))
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

struct Batcher {
    rx: mpsc::Receiver<Entry>,
    /// Requests received and not yet batched, oldest first.
    pending: VecDeque<Entry>,
    depth: Arc<AtomicUsize>,
    max_batch_tokens: usize,
}

impl Batcher {
    fn run(mut self, backend: &Backend) {
        let embedder = backend.embedder();
        loop {
            if self.pending.is_empty() {
                match self.rx.recv() {
                    Ok(e) => self.pending.push_back(e),
                    Err(_) => return,
                }
            }
            while let Ok(e) = self.rx.try_recv() {
                self.pending.push_back(e);
            }
            let batch = self.next_batch();
            if batch.is_empty() {
                continue;
            }
            let run = |job: Job, encoded: &[Encoded]| -> anyhow::Result<Rows> {
                match job {
                    Job::Embed => backend.embed(&embedder, encoded).map(Rows::Vectors),
                    Job::Predict => backend.predict(encoded).map(Rows::Probabilities),
                }
            };
            answer(batch, &run);
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
        let mut batch = Vec::new();
        let mut tokens = 0;
        let mut rest = VecDeque::with_capacity(self.pending.len());
        while let Some(e) = self.pending.pop_front() {
            let t = e.tokens();
            if e.job == job && (batch.is_empty() || tokens + t <= self.max_batch_tokens) {
                tokens += t;
                batch.push(e);
            } else {
                rest.push_back(e);
                if tokens >= self.max_batch_tokens {
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

/// Runs `batch` together and answers each request with its own rows; if the batch fails,
/// runs each request alone so that only a failing one gets an error.
fn answer(batch: Vec<Entry>, run: &dyn Fn(Job, &[Encoded]) -> anyhow::Result<Rows>) {
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
    let together = guarded(|| run(job, &encoded));
    metrics::inference_time(start.elapsed());
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
                let result = guarded(|| run(job, own));
                if let Err(e) = &result {
                    tracing::error!(error = %e, "a request's batch failed");
                }
                let _ = reply.send(result);
            }
        }
    }
}

/// `f`, with its error or panic as a message.
fn guarded(f: impl FnOnce() -> anyhow::Result<Rows>) -> Result<Rows, String> {
    match crate::panics::quietly(f) {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => Err(format!("the model failed ({panic})")),
    }
}

/// `rows` cut into consecutive parts of `sizes`.
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
mod tests {
    use super::*;

    fn enc(tokens: usize, tag: u32) -> Encoded {
        Encoded {
            ids: vec![tag; tokens],
            type_ids: vec![0; tokens],
            truncated: false,
        }
    }

    fn entry(job: Job, lengths: &[usize], tag: u32) -> (Entry, oneshot::Receiver<BatchResult>) {
        let (reply, rx) = oneshot::channel();
        let e = Entry {
            job,
            encoded: lengths.iter().map(|&t| enc(t, tag)).collect(),
            queued: Instant::now(),
            reply,
        };
        (e, rx)
    }

    fn batcher(max_batch_tokens: usize, entries: Vec<Entry>) -> Batcher {
        let (_tx, rx) = mpsc::channel();
        let depth = Arc::new(AtomicUsize::new(entries.len()));
        Batcher {
            rx,
            pending: entries.into(),
            depth,
            max_batch_tokens,
        }
    }

    /// Oldest first, as many as fit in the token cap, only the oldest one's job; a request
    /// whose client left is dropped; the oldest goes even when alone over the cap.
    #[test]
    fn batches_take_the_oldest_requests_of_one_job_within_the_token_cap() {
        let (a, _ra) = entry(Job::Embed, &[10, 20], 1);
        let (b, rb) = entry(Job::Embed, &[5], 2);
        let (c, _rc) = entry(Job::Predict, &[5], 3);
        let (d, _rd) = entry(Job::Embed, &[30], 4);
        let (e, _re) = entry(Job::Embed, &[10], 5);
        drop(rb);
        let mut q = batcher(45, vec![a, b, c, d, e]);
        let first = q.next_batch();
        let tags: Vec<u32> = first.iter().map(|e| e.encoded[0].ids[0]).collect();
        assert_eq!(tags, vec![1, 5], "30 + 30 tokens would pass the cap of 45");
        assert_eq!(q.depth.load(Ordering::SeqCst), 2);
        let second = q.next_batch();
        assert_eq!(second[0].job, Job::Predict);
        assert_eq!(second.len(), 1);
        let (big, _rbig) = entry(Job::Embed, &[100], 6);
        q.pending.push_back(big);
        q.depth.fetch_add(1, Ordering::SeqCst);
        let third = q.next_batch();
        assert_eq!(third.len(), 1, "request 4 (30) then 6 (100) over the cap");
        let fourth = q.next_batch();
        assert_eq!(
            fourth[0].encoded[0].ids.len(),
            100,
            "alone over the cap, it still goes"
        );
        assert!(q.next_batch().is_empty());
    }

    /// Each request gets its own rows in its order; when the batch fails, only the request
    /// whose own run fails gets the error.
    #[test]
    fn answers_go_to_their_own_requests_and_a_failure_only_to_its_own() {
        let run = |_: Job, encoded: &[Encoded]| -> anyhow::Result<Rows> {
            if encoded.iter().any(|e| e.ids.contains(&66)) {
                anyhow::bail!("poisoned");
            }
            Ok(Rows::Vectors(
                encoded.iter().map(|e| vec![e.ids[0] as f32]).collect(),
            ))
        };
        let (a, ra) = entry(Job::Embed, &[1, 1, 1], 7);
        let (b, rb) = entry(Job::Embed, &[2], 8);
        answer(vec![a, b], &run);
        let got = |rx: oneshot::Receiver<BatchResult>| match rx.blocking_recv().unwrap() {
            Ok(Rows::Vectors(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(got(ra), vec![vec![7.0]; 3]);
        assert_eq!(got(rb), vec![vec![8.0]]);
        let (a, ra) = entry(Job::Embed, &[1], 9);
        let (b, rb) = entry(Job::Embed, &[1], 66);
        let (c, rc) = entry(Job::Embed, &[1, 1], 10);
        answer(vec![a, b, c], &run);
        assert_eq!(got(ra), vec![vec![9.0]]);
        assert!(rb
            .blocking_recv()
            .unwrap()
            .unwrap_err()
            .contains("poisoned"));
        assert_eq!(got(rc), vec![vec![10.0]; 2]);
    }
}
