//! Starting the real binary as a server on 127.0.0.1 with port 0, talking HTTP to it, and the
//! task-1 vectors the server's must equal.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{fetch_ml, ok, run};

/// A running server; killed when dropped.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub addr: String,
    dir: tempfile::TempDir,
    agent: ureq::Agent,
}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub content_type: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        assert!(
            self.content_type.starts_with("application/json"),
            "content type {:?}: {}",
            self.content_type,
            self.body
        );
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts the status and TEI's error shape; returns the message.
    pub fn tei_error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        assert!(v["error_type"].is_string(), "no error_type: {v}");
        v["error"].as_str().expect("error message").to_string()
    }

    /// Asserts the status and OpenAI's error shape; returns the message.
    pub fn openai_error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(
            e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(),
            "{v}"
        );
        e["message"].as_str().expect("error message").to_string()
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(300))
        .build()
}

/// Sends one request; any status is an answer, a transport failure an `Err`.
pub fn send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<&str>,
) -> Result<Reply, String> {
    let req = agent
        .request(method, url)
        .set("Content-Type", "application/json");
    let res = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.status();
    let content_type = resp.header("content-type").unwrap_or("").to_string();
    let body = resp.into_string().map_err(|e| e.to_string())?;
    Ok(Reply {
        status,
        body,
        content_type,
    })
}

impl Server {
    /// Starts `fetch-ml --task=serve --port 0 ARGS` and waits for `/health` to answer 200.
    pub fn start(args: &[&str]) -> Server {
        let s = Self::spawn(args, |_| {});
        s.wait_ready();
        s
    }

    /// Starts the server without waiting for the model; `env` edits the command first.
    pub fn spawn(args: &[&str], env: impl FnOnce(&mut Command)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut cmd = fetch_ml();
        cmd.args(["--task=serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log);
        env(&mut cmd);
        let mut child = cmd.spawn().expect("start fetch-ml --task=serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let mut server = Server {
            child: Some(child),
            base: String::new(),
            addr: String::new(),
            dir,
            agent: agent(),
        };
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            panic!("no address printed ({line:?}); stderr:\n{}", server.log());
        };
        server.base = url.to_string();
        server.addr = url.trim_start_matches("http://").to_string();
        server
    }

    /// Polls `/health` until 200 (the model is loaded).
    pub fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok(r) = send(&self.agent, "GET", &self.url("/health"), None) {
                if r.status == 200 {
                    return;
                }
                assert_eq!(r.status, 503, "/health before ready: {}", r.body);
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "not ready after 120 s; stderr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The server's standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn post(&self, path: &str, body: &str) -> Reply {
        send(&self.agent, "POST", &self.url(path), Some(body))
            .unwrap_or_else(|e| panic!("POST {path}: {e}; stderr:\n{}", self.log()))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(path, &body.to_string())
    }

    pub fn get(&self, path: &str) -> Reply {
        send(&self.agent, "GET", &self.url(path), None)
            .unwrap_or_else(|e| panic!("GET {path}: {e}; stderr:\n{}", self.log()))
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits up to `limit` for the server to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status (within 60 s).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("still running 60 s after SIGTERM:\n{}", self.log()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sentences of many lengths (3 to ~120 words) from `words`, one per line-safe string.
pub fn sentences(n: usize, seed: u64, words: &[&str]) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = match i % 5 {
                0 => rng.random_range(2..6),
                1 | 2 => rng.random_range(6..20),
                3 => rng.random_range(20..60),
                _ => rng.random_range(60..120),
            };
            let mut s: Vec<&str> = (0..len)
                .map(|_| words[rng.random_range(0..words.len())])
                .collect();
            if i % 7 == 0 {
                s.push("!");
            }
            s.join(" ")
        })
        .collect()
}

/// English words for MiniLM.
pub const ENGLISH: &[&str] = &[
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "machine",
    "learning",
    "turns",
    "data",
    "into",
    "predictions",
    "sentence",
    "embeddings",
    "map",
    "text",
    "to",
    "vectors",
    "so",
    "similar",
    "meanings",
    "land",
    "close",
    "together",
    "a",
    "server",
    "answers",
    "requests",
    "in",
    "batches",
    "of",
    "tokens",
    "café",
    "naïve",
    "über",
    "東京",
    "weather",
    "is",
    "lovely",
    "today",
    "and",
    "tomorrow",
    "rain",
    "stock",
    "prices",
    "fell",
];

/// The tiny vocabulary's whole words.
pub fn tiny_words() -> Vec<&'static str> {
    vec![
        "the", "a", "is", "was", "it", "this", "very", "good", "bad", "great", "love", "hate",
        "hello", "world", "team", "game", "phone", "app", "food", "pizza", "tasty", "flight",
        "hotel", "bank", "stock", "price", "money", "today", "cat", "dog", "sat", "mat",
    ]
}

/// Vectors of `--task=1 --format jsonl ARGS` for `sentences`, in order.
pub fn task1(model: &Path, args: &[&str], sentences: &[String]) -> Vec<Vec<f32>> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, sentences.join("\n") + "\n").unwrap();
    let out = ok(&run(fetch_ml()
        .args(["--task=1", "--format", "jsonl", "--model"])
        .arg(model)
        .arg("--input")
        .arg(&input)
        .args(args)));
    let rows: Vec<Vec<f32>> = out
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            floats(&v["embedding"])
        })
        .collect();
    assert_eq!(rows.len(), sentences.len());
    rows
}

/// A JSON list of numbers as f32 (each parsed from its shortest form, exactly).
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.to_string().parse::<f32>().unwrap())
        .collect()
}

/// Little-endian f32 bytes from base64.
pub fn base64_floats(s: &str) -> Vec<f32> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Bit for bit, in every dtype (f32 too: a sentence's vector does not depend on its
/// batch-mates, so the server's batches give task 1's bits).
pub fn assert_same(dtype: &str, got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let differ = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let max = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert_eq!(
        differ,
        0,
        "{what}: {differ} of {} {dtype} values differ (by up to {max})",
        got.len()
    );
}

/// A path inside the repository.
pub fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Writes `parts` to a new connection to `addr`, pausing `pause` between them, then reads
/// until the server closes or `limit` passes; returns what was read.
pub fn raw(addr: &str, parts: &[&[u8]], pause: Duration, limit: Duration) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(pause);
        }
        if s.write_all(p).is_err() {
            break;
        }
    }
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "no answer within {limit:?} ({e}); read so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A tiny random model with a tokenizer (64 tokens at most).
pub fn tiny() -> (tempfile::TempDir, PathBuf) {
    crate::common::tiny_model(&fetch_ml::testutil::TinyBert::default())
}

/// The id of `word` in the tiny vocabulary.
pub fn tiny_id(word: &str) -> usize {
    fetch_ml::testutil::vocab()
        .iter()
        .position(|w| w == word)
        .unwrap()
}
