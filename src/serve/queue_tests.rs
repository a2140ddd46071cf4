//! Tests of the batching queue: which requests form a batch, when the next batch waits for
//! more, how a batch is cut into passes, that it runs on the pool, and that each request gets
//! its own rows.

use std::sync::atomic::AtomicBool;

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

fn policy(max_batch_tokens: usize) -> Policy {
    Policy {
        max_batch_tokens,
        passes: 2,
        batch_size: 32,
    }
}

fn batcher(max_batch_tokens: usize, entries: Vec<Entry>) -> Batcher {
    let (_tx, rx) = mpsc::channel();
    let depth = Arc::new(AtomicUsize::new(entries.len()));
    let mut b = Batcher::new(rx, depth, policy(max_batch_tokens));
    b.pending = entries.into();
    b
}

fn got(rx: oneshot::Receiver<BatchResult>) -> Vec<Vec<f32>> {
    match rx.blocking_recv().unwrap() {
        Ok(Rows::Vectors(v)) => v,
        other => panic!("{other:?}"),
    }
}

/// Oldest first, as many as fit in the token cap, only the oldest one's job; a request whose
/// client left is dropped; the oldest goes even when alone over the cap.
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

/// A batch's sentences are split evenly over the passes side by side, at most `--batch-size`
/// per pass.
#[test]
fn a_batch_is_cut_into_even_passes_of_at_most_the_batch_size() {
    let p = policy(1000);
    let sizes: Vec<usize> = [1, 2, 3, 16, 32, 64, 100]
        .iter()
        .map(|&n| p.pass_size(n))
        .collect();
    assert_eq!(sizes, vec![1, 1, 2, 8, 16, 32, 32]);
    let one = Policy::new(1000, 1, 32);
    assert_eq!((one.passes, one.pass_size(20)), (1, 20));
    assert_eq!(Policy::new(1000, 64, 8).passes, MAX_PASSES);
}

/// After a batch, the next waits for as many new requests as it answered, for a tenth of its
/// time at most (and never more than GATHER_MAX); it does not wait after an idle spell, nor
/// once a full batch is queued.
#[test]
fn the_next_batch_waits_briefly_for_the_requests_the_last_one_answered() {
    let p = policy(1000);
    let (early, _r0) = entry(Job::Embed, &[10], 1);
    let end = Instant::now();
    let last = Last {
        end,
        answered: 3,
        took: Duration::from_millis(20),
    };
    let mut pending = VecDeque::from([early]);
    assert_eq!(gather_until(&pending, None, &p), None, "nothing ran before");
    let due = end + Duration::from_millis(2);
    assert_eq!(
        gather_until(&pending, Some(last), &p),
        Some(due),
        "a request that was already waiting is not one that came back"
    );
    let long = Last {
        took: Duration::from_secs(10),
        ..last
    };
    assert_eq!(
        gather_until(&pending, Some(long), &p),
        Some(end + GATHER_MAX)
    );
    for tag in [2, 3] {
        let (mut e, _r) = entry(Job::Embed, &[10], tag);
        e.queued = end + Duration::from_micros(10);
        pending.push_back(e);
    }
    assert_eq!(gather_until(&pending, Some(last), &p), Some(due), "2 of 3");
    let (mut e, _r) = entry(Job::Embed, &[10], 4);
    e.queued = end + Duration::from_micros(20);
    pending.push_back(e);
    assert_eq!(gather_until(&pending, Some(last), &p), None, "3 of 3 back");
    let (big, _rb) = entry(Job::Embed, &[10; 64], 5);
    let full = VecDeque::from([big]);
    assert_eq!(
        gather_until(&full, Some(last), &p),
        None,
        "64 sentences fill both passes"
    );
}

/// Each request gets its own rows in its order; when the batch fails, only the request whose
/// own run fails gets the error.
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

/// A queue whose batcher runs `run` on its own thread until the queue is closed.
fn started<'s, 'e: 's>(scope: &'s std::thread::Scope<'s, 'e>, run: &'e RunFn<'e>) -> Queue {
    let (tx, rx) = mpsc::channel();
    let depth = Arc::new(AtomicUsize::new(0));
    let b = Batcher::new(rx, depth.clone(), policy(1000));
    scope.spawn(move || b.run(run));
    Queue {
        tx: Mutex::new(Some(tx)),
        depth,
    }
}

/// A batch runs on a thread of the inference pool, not on the batching thread: the joins of
/// its parallel steps then stay among the pool's threads.
#[test]
fn batches_run_on_the_pool() {
    let on_pool = AtomicBool::new(false);
    let run = |_: Job, encoded: &[Encoded], _: usize| -> anyhow::Result<Rows> {
        on_pool.store(rayon::current_thread_index().is_some(), Ordering::SeqCst);
        Ok(Rows::Vectors(vec![vec![1.0]; encoded.len()]))
    };
    std::thread::scope(|s| {
        let q = started(s, &run);
        let rx = q.push(Job::Embed, vec![enc(3, 1)]).unwrap();
        assert_eq!(got(rx), vec![vec![1.0]]);
        q.close();
    });
    assert!(on_pool.load(Ordering::SeqCst), "the batch ran off the pool");
}

/// Requests that arrive while a batch runs form the next batch together, cut into passes side
/// by side, and each gets its own rows in its order.
#[test]
fn requests_arriving_during_a_batch_form_the_next_in_passes_side_by_side() {
    let (release, hold) = (Mutex::new(false), std::sync::Condvar::new());
    let calls = Mutex::new(Vec::new());
    let run = |_: Job, encoded: &[Encoded], pass: usize| -> anyhow::Result<Rows> {
        let ids: Vec<u32> = encoded.iter().map(|e| e.ids[0]).collect();
        calls.lock().unwrap().push((ids.clone(), pass));
        if ids == [1] {
            let guard = release.lock().unwrap();
            drop(hold.wait_while(guard, |r| !*r).unwrap());
        }
        Ok(Rows::Vectors(ids.iter().map(|&i| vec![i as f32]).collect()))
    };
    std::thread::scope(|s| {
        let q = started(s, &run);
        let first = q.push(Job::Embed, vec![enc(4, 1)]).unwrap();
        while calls.lock().unwrap().is_empty() {
            std::thread::yield_now();
        }
        let others: Vec<_> = [vec![enc(4, 2)], vec![enc(5, 3), enc(6, 4)], vec![enc(2, 5)]]
            .into_iter()
            .map(|e| q.push(Job::Embed, e).unwrap())
            .collect();
        *release.lock().unwrap() = true;
        hold.notify_all();
        assert_eq!(got(first), vec![vec![1.0]]);
        let want = [vec![vec![2.0]], vec![vec![3.0], vec![4.0]], vec![vec![5.0]]];
        for (rx, want) in others.into_iter().zip(want) {
            assert_eq!(got(rx), want);
        }
        q.close();
    });
    assert_eq!(
        *calls.lock().unwrap(),
        vec![(vec![1], 1), (vec![2, 3, 4, 5], 2)],
        "one batch of the three requests that arrived meanwhile, in two passes of 2"
    );
}
