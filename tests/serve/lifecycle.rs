//! Start and stop: 503 until the model is loaded (and an exit with the error if it never
//! loads), SIGTERM under load answers every accepted request and exits 0, a second signal
//! exits at once, and the server's flags are refused elsewhere.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{fails_with, fetch_ml, minilm, run};
use crate::harness::{
    agent, assert_same, floats, raw, send, sentences, task1, tiny, Server, ENGLISH,
};

/// SIGTERM while 32 clients keep sending: every request the server accepted is answered
/// (the clients' count of answers equals the server's), all with the right vectors, some of
/// them after the signal; then the server exits 0.
#[test]
fn sigterm_under_load_answers_every_accepted_request_then_exits_0() {
    let Some(model) = minilm() else { return };
    let texts = Arc::new(sentences(40, 9, ENGLISH));
    let want = Arc::new(task1(&model, &[], &texts));
    let mut server = Server::start(&["--model", model.to_str().unwrap()]);
    let answered = Arc::new(AtomicUsize::new(0));
    let signalled: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let clients: Vec<_> = (0..32)
        .map(|c| {
            let (texts, want, answered, signalled) = (
                texts.clone(),
                want.clone(),
                answered.clone(),
                signalled.clone(),
            );
            let url = server.base.clone();
            std::thread::spawn(move || {
                let agent = agent();
                let mut after_signal = 0;
                for r in 0..1000 {
                    let idx: Vec<usize> =
                        (0..8).map(|k| (c * 7 + r * 3 + k) % texts.len()).collect();
                    let batch: Vec<&String> = idx.iter().map(|&i| &texts[i]).collect();
                    let body = json!({ "inputs": batch }).to_string();
                    let Ok(reply) = send(&agent, "POST", &format!("{url}/embed"), Some(&body))
                    else {
                        // Refused or closed: the server no longer accepts.
                        assert!(
                            signalled.get().is_some(),
                            "client {c}: a request failed before the signal"
                        );
                        break;
                    };
                    assert_eq!(reply.status, 200, "client {c}: {}", reply.body);
                    let v = reply.json();
                    for (k, &i) in idx.iter().enumerate() {
                        assert_same("f32", &floats(&v[k]), &want[i], &format!("client {c}"));
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                    if signalled.get().is_some() {
                        after_signal += 1;
                    }
                }
                after_signal
            })
        })
        .collect();
    let start = Instant::now();
    while answered.load(Ordering::SeqCst) < 64 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no load:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    signalled.set(Instant::now()).unwrap();
    let status = server.stop();
    let after: usize = clients
        .into_iter()
        .map(|h| h.join().expect("a client failed"))
        .sum();
    let log = server.log();
    assert!(status.success(), "exit status {status:?}:\n{log}");
    let total = answered.load(Ordering::SeqCst);
    let line = log
        .lines()
        .find(|l| l.contains("stopped: every accepted request was answered"))
        .unwrap_or_else(|| panic!("no closing line:\n{log}"));
    let server_count: usize = line
        .split("answered=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"));
    assert_eq!(
        server_count, total,
        "the server answered {server_count} requests, the clients got {total}"
    );
    assert!(
        after > 0,
        "no request was in flight at the signal (all {total} answered before)"
    );
}

/// A second signal exits at once, while the first waits for a request in progress.
#[test]
fn a_second_signal_exits_at_once() {
    let (_d, model) = tiny();
    let mut server = Server::start(&["--model", model.to_str().unwrap(), "--body-timeout", "600"]);
    let addr = server.addr.clone();
    // A client that sends half a body and waits: a request in progress.
    let slow = std::thread::spawn(move || {
        raw(
            &addr,
            &[b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inputs\""],
            Duration::ZERO,
            Duration::from_secs(120),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_exit(Duration::from_secs(2)).is_none(),
        "exited on the first signal with a request in progress:\n{}",
        server.log()
    );
    // New connections are refused meanwhile.
    assert!(send(&agent(), "GET", &server.url("/health"), None).is_err());
    server.signal(libc::SIGINT);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("still running after a second signal:\n{}", server.log()));
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{}", server.log());
    let _ = slow.join();
}

/// Until the model is loaded, /health and the model routes answer 503 (in their shapes); a
/// model that never loads ends the server with the error.
#[test]
fn unavailable_until_loaded_and_a_load_failure_exits_with_the_error() {
    // A hub that accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hub = listener.local_addr().unwrap();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok((s, _)) = listener.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let home = tempfile::tempdir().unwrap();
    let mut server = Server::spawn(
        &["--model", "someone/some-model", "--hub-timeout", "4"],
        |c| {
            c.env("HF_ENDPOINT", format!("http://{hub}"))
                .env("HF_HOME", home.path());
        },
    );
    server.get("/health").tei_error(503);
    let m = server
        .post_json("/embed", &json!({"inputs": "hi"}))
        .tei_error(503);
    assert!(m.contains("loading"), "{m}");
    server
        .post_json("/v1/embeddings", &json!({"input": "hi"}))
        .openai_error(503);
    server.get("/info").tei_error(503);
    let status = server
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("still running after the hub timed out:\n{}", server.log()));
    assert!(!status.success());
    let log = server.log();
    assert!(
        log.contains("someone/some-model") && log.contains("--hub-timeout"),
        "{log}"
    );
    let _ = holder.join();
}

/// Server flags outside serve mode, and other tasks' flags in it, are refused.
#[test]
fn server_flags_belong_to_serve_mode() {
    fails_with(
        &run(fetch_ml().args(["--task=1", "-s", "hi", "--port", "9000"])),
        &["--port", "--task=serve"],
    );
    fails_with(
        &run(fetch_ml().args(["--task=serve", "--input", "x.txt"])),
        &["--input", "--task=serve"],
    );
    fails_with(
        &run(fetch_ml().args(["--task=serve", "--epochs", "2"])),
        &["--epochs", "--task=serve"],
    );
    fails_with(
        &run(fetch_ml().args(["--task=serve", "--api-key", " "])),
        &["--api-key", "empty"],
    );
    fails_with(&run(fetch_ml().args(["--task=4"])), &["1, 2, 3 or serve"]);
    let (_d, model) = tiny();
    let o = run(fetch_ml().args([
        "--task=serve",
        "--port",
        "0",
        "--truncate-dim",
        "64",
        "--model",
        model.to_str().unwrap(),
    ]));
    fails_with(&o, &["64 dimensions"]);
}

/// FETCH_ML_API_KEY is a standing setting of the environment, not a flag given: another task
/// runs with it set rather than refusing --api-key.
#[test]
fn an_api_key_in_the_environment_does_not_stop_other_tasks() {
    let (_d, model) = tiny();
    let o = run(fetch_ml().env("FETCH_ML_API_KEY", "secret").args([
        "--task=1",
        "-s",
        "hi",
        "--format",
        "jsonl",
        "--model",
        model.to_str().unwrap(),
    ]));
    assert!(crate::common::ok(&o).contains("\"embedding\""));
}

/// deploy/k8s-serve.yaml's arguments start a server here (with the model folder of this
/// machine and a free port on 127.0.0.1), its probes ask /health, and its port is the one
/// the Dockerfile exposes.
#[test]
fn the_deployment_manifest_starts_a_server() {
    let Some(model) = minilm() else { return };
    let manifest = std::fs::read_to_string(crate::harness::repo("deploy/k8s-serve.yaml")).unwrap();
    let args: Vec<String> = manifest
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("- --"))
        .map(|a| format!("--{a}"))
        .collect();
    assert!(args.contains(&"--task=serve".to_string()), "{args:?}");
    assert!(args.contains(&"--host=0.0.0.0".to_string()), "{args:?}");
    assert!(args.contains(&"--port=8080".to_string()), "{args:?}");
    let dockerfile = std::fs::read_to_string(crate::harness::repo("Dockerfile")).unwrap();
    assert!(
        dockerfile.lines().any(|l| l.trim() == "EXPOSE 8080"),
        "the Dockerfile does not expose 8080"
    );
    assert_eq!(
        manifest.matches("path: /health").count(),
        3,
        "startup, readiness and liveness probes"
    );
    let local: Vec<String> = args
        .into_iter()
        .filter(|a| a != "--task=serve" && !a.starts_with("--host") && !a.starts_with("--port"))
        .map(|a| match a.strip_prefix("--model=") {
            Some(_) => format!("--model={}", model.display()),
            None => a,
        })
        .collect();
    let local: Vec<&str> = local.iter().map(String::as_str).collect();
    let mut server = Server::start(&local);
    let r = server.post_json("/embed", &json!({"inputs": "Hello world!"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(server.get("/info").json()["dtype"], "int8");
    assert!(server.stop().success());
    // --log-format=json: every line of the log is a JSON object.
    for line in server.log().lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "{line}"
        );
    }
}

/// With `--log-format json`, what the library prints on stderr while the server runs (here
/// the note naming the kernel of a checkpoint's encoder converted to int8) arrives as a JSON
/// event like every other line, and the last lines are not lost at exit.
#[test]
fn library_notes_become_json_events_with_log_format_json() {
    let (_m, model) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = crate::predict::tiny_checkpoint(dir.path(), &model);
    let mut server = Server::start(&[
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--dtype",
        "int8",
        "--log-format",
        "json",
    ]);
    let r = server.post_json("/predict", &json!({"inputs": "i love pizza"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(server.stop().success());
    let log = server.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let note = events
        .iter()
        .find(|e| e.to_string().contains("dense layers on the"))
        .unwrap_or_else(|| panic!("no event with the kernel note:\n{log}"));
    assert!(note["level"].is_string(), "{note}");
    assert!(
        events.last().unwrap().to_string().contains("stopped"),
        "the last event is the shutdown's:\n{log}"
    );
}

/// User plus system CPU time of process `pid` so far, in clock ticks (/proc/PID/stat).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the file (utime, stime) are 11 and 12 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// With `--log-format json` and a log reader that went away (a collector that exited), a
/// failed log write is not reported through the captured stderr, which would log it again:
/// that loop once kept a core busy for good. The idle server must stay idle.
#[test]
fn a_log_reader_that_goes_away_leaves_the_server_idle() {
    let (_d, model) = tiny();
    let (reader, writer) = std::io::pipe().unwrap();
    let fault = crate::harness::tiny_id("battery").to_string();
    let server = Server::spawn(
        &["--model", model.to_str().unwrap(), "--log-format", "json"],
        |c| {
            c.env("FETCH_ML_SERVE_FAULT_TOKEN", &fault).stderr(writer);
        },
    );
    server.wait_ready();
    drop(reader);
    // A failing request logs an error and a warning, whose writes fail.
    server
        .post_json("/embed", &json!({"inputs": ["my battery"]}))
        .tei_error(500);
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(server.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(server.pid()) - before;
    // A busy core is 100 ticks a second; an idle server uses next to none.
    assert!(used < 30, "the idle server used {used} ticks of CPU in 3 s");
    assert_eq!(server.get("/health").status, 200);
}

/// With `--log-format json`, an error that stops the server (its port is taken) is a JSON
/// event for the log collector, then the plain `error:` and `to fix:` lines.
#[test]
fn a_fatal_error_is_a_json_event_too() {
    let (_d, model) = tiny();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let status = fetch_ml()
        .args(["--task=serve", "--model", model.to_str().unwrap()])
        .args(["--port", &port, "--log-format", "json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let (json, plain): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| l.starts_with('{'));
    assert!(
        plain
            .first()
            .is_some_and(|l| l.starts_with("error: ") && l.contains("--port")),
        "{text}"
    );
    let event = json
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no JSON error event:\n{text}"));
    assert!(event.to_string().contains(&port), "{event}");
}
