//! `--task=serve`: an HTTP server with dynamic batching, the OpenAI and
//! text-embeddings-inference embedding APIs, and the multitask model's predictions.
//!
//! It listens at once (`/health` answers 503), loads the model on another thread, then
//! answers 200 and serves. Requests are tokenized on the blocking pool, queued with their
//! token counts, and batched by one thread ([`queue`]) through the same packed encoder as
//! `--task=1` ([`backend`]). SIGTERM or Ctrl-C stops accepting, answers what was accepted
//! and exits 0 ([`shutdown`]).

pub mod args;
pub mod backend;
pub mod body;
pub mod config;
pub mod errors;
pub mod handlers;
pub mod http;
pub mod inputs;
pub mod linger;
pub mod logging;
pub mod metrics;
pub mod queue;
pub mod routes;
pub mod shutdown;
pub mod types;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};

use self::backend::Backend;
use self::body::BodyLimits;
use self::config::ServeConfig;
use self::queue::{Policy, Queue};
use self::routes::{App, Ready};
use self::shutdown::Signals;

/// Serves until SIGTERM or Ctrl-C, then answers what was accepted and returns.
pub fn run(cfg: &ServeConfig) -> Result<()> {
    // Dropped last, after the runtime: what is still in the captured stderr gets logged.
    let _stderr = logging::init(cfg.log_format);
    // Each request is tokenized on its own blocking thread: the tokenizer's own parallel
    // loops would queue behind the batches on the inference thread pool.
    tokenizers::utils::parallelism::set_parallelism(false);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.clamp(1, 4))
        .max_blocking_threads(cores.clamp(2, 8))
        .thread_name("http")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(cfg));
    if let (Err(e), config::LogFormat::Json) = (&result, cfg.log_format) {
        // For the log collector; the caller prints the error and its advice as text after.
        tracing::error!(error = format!("{e:#}"), "the server stopped with an error");
    }
    result
}

async fn serve(cfg: &ServeConfig) -> Result<()> {
    let signals = Signals::install()?;
    let metrics = metrics::install()?;
    let listener = TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .with_context(|| format!("listening on {}:{} (--host, --port)", cfg.host, cfg.port))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    tracing::info!(%addr, "listening; loading the model (GET /health answers 503 until it is loaded)");
    let app = Arc::new(App {
        ready: OnceLock::new(),
        permits: Arc::new(Semaphore::new(cfg.limits.max_concurrent_requests)),
        limits: cfg.limits,
        body: BodyLimits {
            max_bytes: cfg.limits.max_body_bytes,
            timeout: cfg.body_timeout,
        },
        api_key: cfg.api_key.clone(),
        metrics,
        answered: AtomicU64::new(0),
    });
    let batcher: Arc<Mutex<Option<JoinHandle<()>>>> = Arc::default();
    let failed = load_in_background(cfg, app.clone(), batcher.clone());
    let failure = Arc::new(Mutex::new(None));
    let stop = {
        let failure = failure.clone();
        async move {
            tokio::select! {
                () = signals.first_then_exit_on_second() => {}
                Ok(e) = failed => *failure.lock().expect("failure lock") = Some(e),
            }
        }
    };
    http::serve(
        listener,
        routes::router(app.clone()),
        cfg.header_timeout,
        stop,
    )
    .await;
    if let Some(e) = failure.lock().expect("failure lock").take() {
        return Err(e);
    }
    // The handle first, then the queue: the loader sets `ready` before it stores the handle,
    // so a batcher this joins always has its queue closed here.
    let thread = batcher.lock().expect("batcher lock").take();
    if let Some(ready) = app.ready.get() {
        ready.queue.close();
    }
    if let Some(t) = thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    tracing::info!(
        answered = app.answered.load(Ordering::SeqCst),
        "stopped: every accepted request was answered"
    );
    Ok(())
}

/// Loads the model on its own thread and starts the batcher; the receiver gets the error if
/// loading fails.
fn load_in_background(
    cfg: &ServeConfig,
    app: Arc<App>,
    batcher: Arc<Mutex<Option<JoinHandle<()>>>>,
) -> oneshot::Receiver<anyhow::Error> {
    let (tx, rx) = oneshot::channel();
    let served = cfg.served.clone();
    let max_batch_tokens = cfg.limits.max_batch_tokens;
    std::thread::spawn(move || {
        let start = Instant::now();
        match Backend::load(&served) {
            Ok(backend) => {
                let backend = Arc::new(backend);
                tracing::info!(
                    model = %backend.model_ref.id,
                    dtype = %served.dtype,
                    kernel = backend.kernel(),
                    dimension = backend.dimension,
                    max_input_length = backend.assets.tokenizer.max_len(),
                    seconds = start.elapsed().as_secs_f64(),
                    "model loaded; ready"
                );
                let policy = Policy::new(
                    max_batch_tokens,
                    rayon::current_num_threads(),
                    backend.batch_size,
                );
                let (queue, thread) = Queue::start(backend.clone(), policy);
                let _ = app.ready.set(Ready { backend, queue });
                *batcher.lock().expect("batcher lock") = Some(thread);
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "loading the model failed");
                let _ = tx.send(e);
            }
        }
    });
    rx
}
