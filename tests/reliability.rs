//! The eight failures of the hostile sweep (issue 8), each run through the real binary: memory
//! on one huge line, a named pipe as input, thread limits, a silent hub, a kill during a
//! checkpoint swap, a foreign folder at `--save`, weights changed in place, hostile inputs.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fails_with, fetch_ml, ok, run, stderr, tiny_model, toy_rows, write_jsonl};
use fetch_ml::testutil::TinyBert;

fn jsonl(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Waits for `child` at most `limit`; kills it and panics when it takes longer (a hang).
fn wait_or_kill(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{what}: still running after {limit:?} (a hang); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cmd` (stdout to a file) and returns its exit status and peak RSS in bytes.
fn peak_rss(cmd: &mut Command, stdout: &Path) -> (i32, u64) {
    let child = cmd
        .stdout(Stdio::from(std::fs::File::create(stdout).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is a plain C struct that wait4 fills; the child is ours and reaped once.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4");
    std::mem::forget(child);
    (status, usage.ru_maxrss as u64 * 1024)
}

// 1. One long line: the work per sentence is bounded.
#[test]
fn a_20_mb_line_costs_no_more_memory_than_a_short_one() {
    let (d, model) = tiny_model(&TinyBert::default());
    let sentence = "the cat sat on the mat and the dog won the game today ";
    let big = d.path().join("big.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let n = (20 << 20) / sentence.len();
        for _ in 0..n {
            f.write_all(sentence.as_bytes()).unwrap();
        }
        f.write_all(b"\nhello world\n").unwrap();
    }
    let small = d.path().join("small.txt");
    std::fs::write(&small, format!("{}\nhello world\n", sentence.repeat(20))).unwrap();
    let measure = |input: &Path, out: &Path| {
        let (status, rss) = peak_rss(
            fetch_ml()
                .args(["--task=1", "--format=jsonl", "--model"])
                .arg(&model)
                .arg("--input")
                .arg(input),
            out,
        );
        assert_eq!(status, 0, "fetch-ml failed on {}", input.display());
        rss
    };
    let (out_big, out_small) = (d.path().join("big.jsonl"), d.path().join("small.jsonl"));
    let rss_big = measure(&big, &out_big);
    let rss_small = measure(&small, &out_small);
    eprintln!(
        "peak RSS: 20 MB line {} MB, short lines {} MB",
        rss_big >> 20,
        rss_small >> 20
    );
    assert!(
        rss_big < rss_small + (50 << 20),
        "a 20 MB line took {} MB of RSS against {} MB for short lines",
        rss_big >> 20,
        rss_small >> 20
    );
    // Only the head of the line matters, and it gives exactly the tokens of the whole line.
    let big_rows = jsonl(&std::fs::read_to_string(&out_big).unwrap());
    let small_rows = jsonl(&std::fs::read_to_string(&out_small).unwrap());
    assert_eq!(big_rows.len(), 2);
    assert_eq!(big_rows[0]["truncated"], true);
    assert_eq!(big_rows[0]["tokens"], 64);
    assert_eq!(big_rows[0]["embedding"], small_rows[0]["embedding"]);
    assert_eq!(big_rows[1]["embedding"], small_rows[1]["embedding"]);
}

// 2. A named pipe (or process substitution) is read exactly once.
#[test]
fn a_named_pipe_as_input_is_read_once() {
    let (d, model) = tiny_model(&TinyBert::default());
    let fifo = d.path().join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let writer_path = fifo.clone();
    let writer = std::thread::spawn(move || {
        // Opening blocks until fetch-ml opens the pipe for reading; a second open would hang.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&writer_path)
            .unwrap();
        f.write_all(b"hello world\nthe cat sat\n").unwrap();
    });
    let child = fetch_ml()
        .args(["--task=1", "--format=jsonl", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&fifo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_or_kill(child, Duration::from_secs(60), "--input FIFO");
    let rows = jsonl(&ok(&o));
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["text"], "the cat sat");
    writer.join().unwrap();
}

// 3. Threads that cannot be created are an error or a fallback, never a panic.
#[test]
fn thread_limits_fall_back_to_fewer_threads() {
    let (d, model) = tiny_model(&TinyBert::default());
    // A process limit binds only a non-root user: as root, run the binary as nobody, from a
    // copy that nobody may read.
    let root = unsafe { libc::geteuid() } == 0;
    let public = tempfile::tempdir().unwrap();
    let bin = public.path().join("fetch-ml");
    std::fs::copy(env!("CARGO_BIN_EXE_fetch-ml"), &bin).unwrap();
    let m2 = public.path().join("model");
    std::fs::create_dir(&m2).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), m2.join(e.file_name())).unwrap();
        }
    }
    for p in [public.path(), m2.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for e in std::fs::read_dir(&m2).unwrap() {
        std::fs::set_permissions(e.unwrap().path(), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--task=1",
        "--format=jsonl",
        "-s",
        "hello world",
        "--threads",
        "1000",
    ])
    .arg("--model")
    .arg(&m2)
    .env("HF_HOME", d.path())
    .current_dir(public.path())
    .stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: 4,
                rlim_max: 4,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if root && (libc::setgid(65534) != 0 || libc::setuid(65534) != 0) {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().expect("run fetch-ml");
    assert_ne!(o.status.code(), Some(101), "panicked:\n{}", stderr(&o));
    let out = ok(&o);
    assert_eq!(jsonl(&out).len(), 1);
    let err = stderr(&o);
    assert!(err.contains("far above"), "{err}");
    assert!(err.contains("could be started"), "{err}");
}

// 4. A hub that accepts the connection and never answers.
#[test]
fn a_silent_hub_times_out_with_advice() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    // Accepts connections and holds them open without a byte, for at most 90 s.
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        let start = Instant::now();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed)
            && start.elapsed() < Duration::from_secs(90)
        {
            if let Ok((s, _)) = listener.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let d = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let child = fetch_ml()
        .args(["--task=1", "-s", "hi", "--model", "someone/some-model"])
        .args(["--hub-timeout", "2"])
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("HF_HOME", d.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_or_kill(child, Duration::from_secs(60), "silent hub");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    holder.join().unwrap();
    let err = fails_with(
        &o,
        &[
            "no answer",
            "--offline",
            "--hub-timeout",
            "someone/some-model",
        ],
    );
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30), "{err}");
}

struct Toy {
    dir: tempfile::TempDir,
    model: PathBuf,
    train: PathBuf,
}

fn toy(spec: &TinyBert) -> Toy {
    let (dir, model) = tiny_model(spec);
    let train = dir.path().join("train.jsonl");
    write_jsonl(&train, &toy_rows(32, 1));
    Toy { dir, model, train }
}

fn train_cmd(t: &Toy, save: &Path) -> Command {
    let mut cmd = fetch_ml();
    cmd.args([
        "--task=2",
        "--epochs",
        "1",
        "--format",
        "jsonl",
        "-s",
        "i love pizza",
    ])
    .arg("--model")
    .arg(&t.model)
    .arg("--train-file")
    .arg(&t.train)
    .arg("--save")
    .arg(save);
    cmd
}

fn dot_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

// 5. A kill between the two renames of a save: the next run restores the checkpoint.
#[test]
fn a_kill_during_the_checkpoint_swap_is_recovered() {
    let t = toy(&TinyBert::default());
    let ck = t.dir.path().join("ck");
    let first = ok(&run(&mut train_cmd(&t, &ck)));
    let o = run(train_cmd(&t, &ck).env("FETCH_ML_FAULT", "checkpoint-swap"));
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGABRT),
        "the fault should stop the second save between its renames: {}",
        stderr(&o)
    );
    assert!(!ck.exists(), "the kill leaves no folder at --save");
    let o = run(fetch_ml()
        .args([
            "--task=2",
            "--format",
            "jsonl",
            "-s",
            "i love pizza",
            "--checkpoint",
        ])
        .arg(&ck));
    let again = ok(&o);
    assert!(stderr(&o).contains("restored"), "{}", stderr(&o));
    assert!(ck.join("checkpoint.json").is_file());
    // Same data, same seed: the restored checkpoint predicts what the first one did.
    assert_eq!(first, again);
    assert!(
        dot_files(t.dir.path()).is_empty(),
        "{:?}",
        dot_files(t.dir.path())
    );
}

// 6. --save never deletes what fetch-ml did not write.
#[test]
fn save_refuses_folders_that_are_not_its_own() {
    let t = toy(&TinyBert::default());
    // Another tool's checkpoint.json beside the user's data.
    let theirs = t.dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("checkpoint.json"), r#"{"step": 1000}"#).unwrap();
    std::fs::write(theirs.join("data.txt"), "precious").unwrap();
    let o = run(&mut train_cmd(&t, &theirs));
    fails_with(&o, &["theirs", "not fetch-ml's"]);
    assert_eq!(
        std::fs::read_to_string(theirs.join("data.txt")).unwrap(),
        "precious"
    );
    // A fetch-ml checkpoint with a file of the user's in it.
    let ours = t.dir.path().join("ours");
    ok(&run(&mut train_cmd(&t, &ours)));
    std::fs::write(ours.join("notes.md"), "mine").unwrap();
    let o = run(&mut train_cmd(&t, &ours));
    fails_with(&o, &["notes.md", "did not write"]);
    assert_eq!(
        std::fs::read_to_string(ours.join("notes.md")).unwrap(),
        "mine"
    );
    // A file, and the current folder.
    let file = t.dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    fails_with(&run(&mut train_cmd(&t, &file)), &["not a folder"]);
    fails_with(
        &run(train_cmd(&t, Path::new(".")).current_dir(t.dir.path())),
        &["--save", "current folder"],
    );
}

// 7. Weights changed in place (same size, past the first 2 MiB) are noticed.
#[test]
fn weights_changed_in_place_invalidate_checkpoints() {
    // Big enough (about 13 MB) for a change far past the first 2 MiB.
    let t = toy(&TinyBert {
        hidden: 256,
        intermediate: 1024,
        heads: 4,
        layers: 3,
        ..TinyBert::default()
    });
    let ck = t.dir.path().join("ck");
    ok(&run(train_cmd(&t, &ck).args(["--freeze", "encoder"])));
    let weights = t.model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    assert!(n > 8 << 20);
    // The last float of the file: a weight of some tensor, changed a little.
    bytes[n - 2] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let o = run(fetch_ml()
        .args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(&ck)
        .arg("--model")
        .arg(&t.model));
    fails_with(
        &o,
        &["other weights", "fingerprint", "to fix: pass --model"],
    );
}

/// A model folder whose pre-tokenizer has a catastrophic regex.
fn hostile_regex_model(dir: &Path) -> PathBuf {
    let model = dir.join("regex-model");
    TinyBert::default().write(&model).unwrap();
    let path = model.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tok["pre_tokenizer"] = serde_json::json!({
        "type": "Split",
        "pattern": {"Regex": "(a+)+$"},
        "behavior": "Isolated",
        "invert": false
    });
    std::fs::write(&path, tok.to_string()).unwrap();
    model
}

// 8. A hostile tokenizer.json is an error naming the sentence, not a panic.
#[test]
fn a_catastrophic_tokenizer_regex_is_an_error_naming_the_line() {
    let d = tempfile::tempdir().unwrap();
    let model = hostile_regex_model(d.path());
    let input = d.path().join("in.txt");
    std::fs::write(&input, format!("hello world\n{}b\n", "a".repeat(200))).unwrap();
    let o = run(fetch_ml()
        .args(["--task=1", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input));
    assert_ne!(o.status.code(), Some(101), "panicked:\n{}", stderr(&o));
    fails_with(&o, &["in.txt, line 2", "tokenizer"]);
}

/// One hostile case: a name, how to spoil a fresh tiny model folder (and its scratch folder),
/// and the arguments after `--model DIR`.
type Spoil = Box<dyn Fn(&Path, &Path)>;

fn edit_json(path: &Path, f: impl Fn(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn config_edit(key: &'static str, value: serde_json::Value) -> Spoil {
    Box::new(move |m: &Path, _: &Path| {
        edit_json(&m.join("config.json"), |v| v[key] = value.clone())
    })
}

fn write_file(name: &'static str, bytes: &'static [u8]) -> Spoil {
    Box::new(move |m: &Path, _: &Path| std::fs::write(m.join(name), bytes).unwrap())
}

/// Every input, file and model folder fault we know of: each must end in exit 1 or 2 with a
/// message, never a panic (101) or a signal.
#[test]
fn hostile_inputs_never_panic() {
    let task1 = || -> Vec<String> { ["--task=1", "-s", "hello world"].map(String::from).to_vec() };
    let cases: Vec<(&str, Spoil, Vec<String>)> = vec![
        (
            "config.json not JSON",
            write_file("config.json", b"{not json"),
            task1(),
        ),
        (
            "config.json empty object",
            write_file("config.json", b"{}"),
            task1(),
        ),
        (
            "hidden_size 0",
            config_edit("hidden_size", 0.into()),
            task1(),
        ),
        (
            "heads 0",
            config_edit("num_attention_heads", 0.into()),
            task1(),
        ),
        (
            "heads not dividing",
            config_edit("num_attention_heads", 5.into()),
            task1(),
        ),
        (
            "huge vocab",
            config_edit("vocab_size", 1_000_000_000_000u64.into()),
            task1(),
        ),
        (
            "negative layers",
            config_edit("num_hidden_layers", (-1).into()),
            task1(),
        ),
        (
            "zero positions",
            config_edit("max_position_embeddings", 0.into()),
            task1(),
        ),
        (
            "one position",
            config_edit("max_position_embeddings", 1.into()),
            task1(),
        ),
        (
            "zero token types",
            config_edit("type_vocab_size", 0.into()),
            task1(),
        ),
        (
            "unknown activation",
            config_edit("hidden_act", "swish2".into()),
            task1(),
        ),
        (
            "pad id out of range",
            config_edit("pad_token_id", 1_000_000.into()),
            task1(),
        ),
        (
            "small vocab in config",
            config_edit("vocab_size", 10.into()),
            task1(),
        ),
        (
            "tokenizer.json garbage",
            write_file("tokenizer.json", b"\x00\x01garbage"),
            task1(),
        ),
        (
            "tokenizer.json empty",
            write_file("tokenizer.json", b""),
            task1(),
        ),
        (
            "no tokenizer, empty vocab",
            Box::new(|m: &Path, _: &Path| {
                std::fs::remove_file(m.join("tokenizer.json")).unwrap();
                std::fs::write(m.join("vocab.txt"), "").unwrap();
            }),
            task1(),
        ),
        (
            "tokenizer with ids beyond the model's vocabulary",
            Box::new(|m: &Path, _: &Path| {
                edit_json(&m.join("tokenizer.json"), |v| {
                    v["model"]["vocab"]["hello"] = 100_000.into();
                })
            }),
            task1(),
        ),
        (
            "weights empty",
            write_file("model.safetensors", b""),
            task1(),
        ),
        (
            "weights garbage",
            write_file("model.safetensors", b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk"),
            task1(),
        ),
        (
            "weights truncated",
            Box::new(|m: &Path, _: &Path| {
                let p = m.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            task1(),
        ),
        (
            "weights offsets not matching shapes",
            Box::new(|m: &Path, _: &Path| {
                let p = m.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                let mut header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
                let key = "embeddings.word_embeddings.weight";
                let offs = header[key]["data_offsets"].clone();
                let (a, e) = (offs[0].as_u64().unwrap(), offs[1].as_u64().unwrap());
                header[key]["data_offsets"] = serde_json::json!([a, e - 8]);
                let mut h = header.to_string().into_bytes();
                while h.len() < n {
                    h.push(b' ');
                }
                assert_eq!(h.len(), n, "the edited header must keep its length");
                let mut out = b[..8].to_vec();
                out.extend_from_slice(&h);
                out.extend_from_slice(&b[8 + n..]);
                std::fs::write(&p, out).unwrap();
            }),
            task1(),
        ),
        (
            "modules.json garbage",
            write_file("modules.json", b"[{]"),
            task1(),
        ),
        (
            "pooling config with no mode",
            Box::new(|m: &Path, _: &Path| {
                std::fs::write(
                    m.join("modules.json"),
                    r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},{"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
                )
                .unwrap();
                std::fs::create_dir_all(m.join("1_Pooling")).unwrap();
                std::fs::write(m.join("1_Pooling/config.json"), "{}").unwrap();
            }),
            task1(),
        ),
        (
            "sentence_bert_config garbage",
            write_file("sentence_bert_config.json", b"[1,2"),
            task1(),
        ),
        (
            "sentence_bert_config max length 0",
            write_file("sentence_bert_config.json", br#"{"max_seq_length": 0}"#),
            task1(),
        ),
        (
            "input is a folder",
            Box::new(|_: &Path, _: &Path| {}),
            vec!["--task=1".into(), "--input".into(), "/".into()],
        ),
        (
            "input with NUL bytes and bad UTF-8",
            Box::new(|_: &Path, s: &Path| {
                std::fs::write(s.join("in.txt"), b"ok\n\x00\x00\nbad \xc3\x28\n").unwrap()
            }),
            vec!["--task=1".into(), "--input".into(), "in.txt".into()],
        ),
        (
            "max-seq-length 1",
            Box::new(|_: &Path, _: &Path| {}),
            ["--task=1", "-s", "hi", "--max-seq-length", "1"]
                .map(String::from)
                .to_vec(),
        ),
        (
            "training file garbage",
            Box::new(|_: &Path, s: &Path| {
                std::fs::write(s.join("t.jsonl"), b"{\"text\": 1}\n[]\n").unwrap()
            }),
            [
                "--task=2",
                "--epochs",
                "1",
                "--train-file",
                "t.jsonl",
                "--save",
                "ck",
            ]
            .map(String::from)
            .to_vec(),
        ),
        (
            "training labels of odd types",
            Box::new(|_: &Path, s: &Path| {
                std::fs::write(
                    s.join("t.jsonl"),
                    b"{\"text\": \"a\", \"class\": {\"x\": 1}, \"sentiment\": [1]}\n",
                )
                .unwrap()
            }),
            [
                "--task=2",
                "--epochs",
                "1",
                "--train-file",
                "t.jsonl",
                "--save",
                "ck",
            ]
            .map(String::from)
            .to_vec(),
        ),
        (
            "csv with a ragged row",
            Box::new(|_: &Path, s: &Path| {
                std::fs::write(s.join("t.csv"), "text,class,sentiment\n\"a,b\nc\n").unwrap()
            }),
            [
                "--task=2",
                "--epochs",
                "1",
                "--train-file",
                "t.csv",
                "--save",
                "ck",
            ]
            .map(String::from)
            .to_vec(),
        ),
        (
            "checkpoint.json garbage",
            Box::new(|_: &Path, s: &Path| {
                std::fs::create_dir_all(s.join("ck")).unwrap();
                std::fs::write(s.join("ck/checkpoint.json"), "{\"format\": 3}").unwrap();
            }),
            ["--task=2", "-s", "hi", "--checkpoint", "ck"]
                .map(String::from)
                .to_vec(),
        ),
        (
            "checkpoint with garbage weights",
            Box::new(|_: &Path, s: &Path| {
                std::fs::create_dir_all(s.join("ck")).unwrap();
                std::fs::write(
                    s.join("ck/checkpoint.json"),
                    r#"{"format":"fetch-ml-multitask","version":1}"#,
                )
                .unwrap();
                std::fs::write(s.join("ck/model.safetensors"), "xx").unwrap();
            }),
            ["--task=2", "-s", "hi", "--checkpoint", "ck"]
                .map(String::from)
                .to_vec(),
        ),
    ];
    // What some messages must name.
    let needles = std::collections::HashMap::from([
        (
            "weights offsets not matching shapes",
            "embeddings.word_embeddings.weight",
        ),
        (
            "tokenizer with ids beyond the model's vocabulary",
            "--sentence number 1",
        ),
        ("input with NUL bytes and bad UTF-8", "in.txt, line 3"),
        (
            "sentence_bert_config max length 0",
            "sentence_bert_config.json",
        ),
        ("pad id out of range", "pad_token_id"),
    ]);
    let mut failures = Vec::new();
    for (name, spoil, args) in &cases {
        let scratch = tempfile::tempdir().unwrap();
        let model = scratch.path().join("model");
        TinyBert::default().write(&model).unwrap();
        spoil(&model, scratch.path());
        let o = run(fetch_ml()
            .current_dir(scratch.path())
            .env("RUST_BACKTRACE", "1")
            .args(args)
            .arg("--model")
            .arg(&model));
        let err = stderr(&o);
        let code = o.status.code();
        let good = matches!(code, Some(1) | Some(2))
            && err.contains("error")
            && !err.contains("stack backtrace")
            && needles.get(name).is_none_or(|n| err.contains(n));
        if !good {
            failures.push(format!(
                "{name}: exit {code:?} (signal {:?})\n{err}",
                o.status.signal()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n---\n")
    );
}

// The weaker spots.

#[test]
fn an_interrupted_output_leaves_no_temporary_file() {
    let (d, model) = tiny_model(&TinyBert::default());
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    // A temporary file of a run that was killed (its process is gone) is cleaned up too.
    let dead_pid = (100_000..4_000_000)
        .find(|&p| unsafe { libc::kill(p, 0) } != 0)
        .unwrap();
    let stale = out_dir.join(format!(".fetch-ml-{dead_pid}-abc123"));
    std::fs::write(&stale, "half").unwrap();
    let mut child = fetch_ml()
        .args(["--task=1", "--format=jsonl", "--input", "-", "--model"])
        .arg(&model)
        .arg("--output")
        .arg(out_dir.join("emb.jsonl"))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep stdin open and silent: the run waits with its temporary file created.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello world\n").unwrap();
    let start = Instant::now();
    let temporaries = || -> Vec<String> { dot_files(&out_dir) };
    while temporaries().len() != 1 || stale.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            temporaries()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    drop(stdin);
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert!(temporaries().is_empty(), "{:?}", temporaries());
    assert!(!out_dir.join("emb.jsonl").exists());
}

#[test]
fn json_on_stdout_says_when_it_is_incomplete() {
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("in.txt");
    let mut text = "hello world\n".repeat(5000).into_bytes();
    text.extend_from_slice(b"bad \xff\n");
    std::fs::write(&input, text).unwrap();
    let o = run(fetch_ml()
        .args(["--task=1", "--format=json", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input));
    fails_with(&o, &["in.txt, line 5001", "incomplete"]);
}

#[test]
fn output_targets_are_checked_before_training() {
    let t = toy(&TinyBert::default());
    let eval = t.dir.path().join("eval.jsonl");
    write_jsonl(&eval, &toy_rows(8, 2));
    let task3 = |extra: &[&str]| {
        run(fetch_ml()
            .args(["--task=3", "--epochs", "1", "--model"])
            .arg(&t.model)
            .arg("--train-file")
            .arg(&t.train)
            .arg("--eval-file")
            .arg(&eval)
            .args(extra))
    };
    let err = fails_with(&task3(&["--plot", "chart.jpg"]), &["chart.jpg", ".png"]);
    assert!(!err.contains("epoch"), "nothing trains first:\n{err}");
    let err = fails_with(
        &task3(&["--plot", "no/such/folder/c.png"]),
        &["does not exist"],
    );
    assert!(!err.contains("epoch"), "nothing trains first:\n{err}");
}

#[test]
fn checkpoint_files_have_the_users_permissions_and_checked_labels() {
    let t = toy(&TinyBert::default());
    let ck = t.dir.path().join("ck");
    ok(&run(&mut train_cmd(&t, &ck)));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    };
    assert_eq!(mode(&ck.join("model.safetensors")), 0o666 & !umask);
    assert_eq!(mode(&ck.join("checkpoint.json")), 0o666 & !umask);
    assert_eq!(mode(&ck), 0o777 & !umask);
    // Swapping two label names in checkpoint.json would relabel every prediction.
    edit_json(&ck.join("checkpoint.json"), |v| {
        let labels = v["heads"]["labels"][0].as_array_mut().unwrap();
        labels.swap(0, 1);
    });
    let o = run(fetch_ml()
        .args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(&ck));
    fails_with(&o, &["label lists", "checkpoint.json"]);
}

#[test]
fn a_second_run_saving_to_the_same_folder_is_refused() {
    let t = toy(&TinyBert::default());
    let ck = t.dir.path().join("ck");
    // Another run holds the save lock.
    let lock = std::fs::File::create(t.dir.path().join(".ck.lock")).unwrap();
    use std::os::unix::io::AsRawFd;
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let err = fails_with(
        &run(&mut train_cmd(&t, &ck)),
        &["another fetch-ml run", "ck"],
    );
    assert!(!err.contains("epoch"), "it fails before training:\n{err}");
    drop(lock);
    ok(&run(&mut train_cmd(&t, &ck)));
}

#[test]
fn a_single_label_head_is_warned_about() {
    let t = toy(&TinyBert::default());
    let rows: Vec<serde_json::Value> = toy_rows(16, 3)
        .into_iter()
        .map(|mut r| {
            r["sentiment"] = "positive".into();
            r
        })
        .collect();
    write_jsonl(&t.train, &rows);
    let o = run(&mut train_cmd(&t, &t.dir.path().join("ck")));
    ok(&o);
    assert!(
        stderr(&o).contains("every sentiment label"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_checkpoint_of_a_relative_model_path_loads_from_another_folder() {
    let t = toy(&TinyBert::default());
    let ck = t.dir.path().join("ck");
    let rel = t.model.file_name().unwrap().to_owned();
    ok(&run(fetch_ml()
        .current_dir(t.model.parent().unwrap())
        .args(["--task=2", "--epochs", "1", "-s", "hi", "--model"])
        .arg(&rel)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--save")
        .arg(&ck)));
    let elsewhere = tempfile::tempdir().unwrap();
    ok(&run(fetch_ml()
        .current_dir(elsewhere.path())
        .args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(&ck)));
    // A checkpoint named by `.` from inside it loads too (nothing to recover there).
    ok(&run(fetch_ml().current_dir(&ck).args([
        "--task=2",
        "-s",
        "hi",
        "--checkpoint",
        ".",
    ])));
}

/// A checkpoint whose base model is gone names the checkpoint as where the model came from,
/// not a `--model` flag the user never passed.
#[test]
fn a_missing_base_model_is_named_as_the_checkpoints() {
    let t = toy(&TinyBert::default());
    let ck = t.dir.path().join("ck");
    ok(&run(train_cmd(&t, &ck).args(["--freeze", "encoder"])));
    std::fs::rename(&t.model, t.dir.path().join("moved")).unwrap();
    let o = run(fetch_ml()
        .args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(&ck));
    fails_with(&o, &["the checkpoint's base model", "no such folder"]);
    assert!(!stderr(&o).starts_with("error: --model"), "{}", stderr(&o));
}
