//! What fetch-ml writes, through the binary (issue 19): outputs that are device nodes or named
//! pipes are written in place, temporary files of live runs are left alone while stale ones are
//! removed, `--export --overwrite` keeps what fetch-ml did not write, every file gets the
//! user's permissions, memory stays bounded on long lines, and bad targets fail before any work.

mod common;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use common::{fails_with, fetch_ml, ok, run, tiny_model, toy_rows, write_jsonl};
use fetch_ml::testutil::TinyBert;

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mkfifo(p: &Path) {
    // SAFETY: a NUL-terminated path; mkfifo only creates the node.
    assert_eq!(
        unsafe { libc::mkfifo(c_path(p).as_ptr(), 0o644) },
        0,
        "mkfifo"
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A character device with the numbers of `/dev/null` (1, 3), made inside a test folder.
/// Only root can make one: false (with a note) otherwise; the FIFO cases cover the rest.
fn null_device(p: &Path) -> bool {
    if !is_root() {
        eprintln!("NOTE: not root, so no device node can be made; only FIFOs are tested");
        return false;
    }
    let dev = libc::makedev(1, 3);
    // SAFETY: a NUL-terminated path; mknod only creates the node.
    let rc = unsafe { libc::mknod(c_path(p).as_ptr(), libc::S_IFCHR | 0o666, dev) };
    assert_eq!(rc, 0, "mknod {}", p.display());
    true
}

fn file_kind(p: &Path) -> &'static str {
    let t = std::fs::symlink_metadata(p).unwrap().file_type();
    if t.is_fifo() {
        "fifo"
    } else if t.is_char_device() {
        "char device"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_file() {
        "file"
    } else {
        "other"
    }
}

/// Reads a named pipe on a thread while a run writes into it. The pipe is opened for reading
/// before the run starts (without blocking), so the writer's open succeeds at once; reading
/// stops when [`Drain::finish`] is called after the run has ended. When the run replaced the
/// pipe instead of writing into it, nothing arrives.
struct Drain {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: JoinHandle<Vec<u8>>,
}

impl Drain {
    fn start(path: &Path) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut v = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let last = done.load(std::sync::atomic::Ordering::SeqCst);
                match f.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        v.extend_from_slice(&buf[..n]);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("reading the pipe: {e}"),
                }
                if last {
                    return v;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        Self { stop, thread }
    }

    /// What the reader received; call once the writer has ended.
    fn finish(self) -> Vec<u8> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

fn embed(model: &Path, format: &str, out: &Path) -> Command {
    let mut cmd = fetch_ml();
    cmd.args([
        "--task=1",
        "--threads=1",
        "-s",
        "hello world",
        "-s",
        "the cat sat on the mat",
        "--format",
        format,
        "--model",
    ])
    .arg(model)
    .arg("-o")
    .arg(out);
    cmd
}

fn parquet_rows(bytes: &[u8], dir: &Path) -> i64 {
    let p = dir.join("copy.parquet");
    std::fs::write(&p, bytes).unwrap();
    let r = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&p).unwrap())
        .expect("a complete Parquet file");
    use parquet::file::reader::FileReader;
    r.metadata().file_metadata().num_rows()
}

fn dot_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn umask() -> u32 {
    // SAFETY: swaps the mask and sets it back at once; the tests create no files meanwhile
    // in this thread, and the mask only affects modes.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

// Must fix 1: a named pipe or a device node at --output is written in place, never replaced.
#[test]
fn special_files_as_outputs_are_written_in_place() {
    let (d, model) = tiny_model(&TinyBert::default());
    let dir = d.path().join("out");
    std::fs::create_dir(&dir).unwrap();

    // JSONL into a FIFO: its reader receives both lines, and the FIFO stays.
    let fifo = dir.join("emb.fifo");
    mkfifo(&fifo);
    let reader = Drain::start(&fifo);
    let o = run(&mut embed(&model, "jsonl", &fifo));
    let got = reader.finish();
    ok(&o);
    assert_eq!(file_kind(&fifo), "fifo");
    assert_eq!(String::from_utf8(got).unwrap().lines().count(), 2);

    // Parquet into a FIFO: a whole file arrives.
    let reader = Drain::start(&fifo);
    let o = run(&mut embed(&model, "parquet", &fifo));
    let got = reader.finish();
    ok(&o);
    assert_eq!(file_kind(&fifo), "fifo");
    assert_eq!(parquet_rows(&got, d.path()), 2);

    // npy: the matrix into a FIFO (its header holds the row count), the sidecar a new file.
    let reader = Drain::start(&fifo);
    let o = run(&mut embed(&model, "npy", &fifo));
    let got = reader.finish();
    ok(&o);
    assert_eq!(file_kind(&fifo), "fifo");
    assert_eq!(&got[..6], b"\x93NUMPY");
    let header = String::from_utf8_lossy(&got[10..128]).into_owned();
    assert!(header.contains("'shape': (2, 32)"), "{header}");
    assert_eq!(got.len(), 128 + 2 * 32 * 4);
    let sidecar = dir.join("emb.fifo.meta.jsonl");
    assert_eq!(
        std::fs::read_to_string(&sidecar).unwrap().lines().count(),
        2
    );

    // The npy sidecar as a FIFO beside a regular matrix.
    let matrix = dir.join("m.npy");
    let side = dir.join("m.npy.meta.jsonl");
    mkfifo(&side);
    let reader = Drain::start(&side);
    let o = run(&mut embed(&model, "npy", &matrix));
    let got = reader.finish();
    ok(&o);
    assert_eq!(file_kind(&side), "fifo");
    assert_eq!(String::from_utf8(got).unwrap().lines().count(), 2);
    assert_eq!(file_kind(&matrix), "file");

    // Device nodes (root only: the Docker image runs as root, and `-o /dev/null` is common).
    if null_device(&dir.join("null")) {
        for format in ["jsonl", "text", "parquet", "npy"] {
            let o = run(&mut embed(&model, format, &dir.join("null")));
            ok(&o);
            assert_eq!(file_kind(&dir.join("null")), "char device", "{format}");
        }
        // Both files of an npy output, and a symlink to a device (as /dev/stdout is).
        assert!(null_device(&dir.join("n.npy")));
        assert!(null_device(&dir.join("n.npy.meta.jsonl")));
        ok(&run(&mut embed(&model, "npy", &dir.join("n.npy"))));
        assert_eq!(file_kind(&dir.join("n.npy")), "char device");
        assert_eq!(file_kind(&dir.join("n.npy.meta.jsonl")), "char device");
        std::os::unix::fs::symlink(dir.join("null"), dir.join("link")).unwrap();
        ok(&run(&mut embed(&model, "jsonl", &dir.join("link"))));
        assert_eq!(file_kind(&dir.join("link")), "symlink");
        assert_eq!(file_kind(&dir.join("null")), "char device");
    }
    assert!(dot_files(&dir).is_empty(), "{:?}", dot_files(&dir));
}

// Hostile follow-ups of must fix 1: an output named by one of the process's descriptors (as
// `/dev/stdout` or a shell's `>(...)` are) goes through that descriptor, so an append stays an
// append; a special file where a completion record goes is never replaced. (`/proc/self/fd/1`
// rather than `/dev/stdout`: should this ever regress, nothing can be created in /proc.)
#[test]
fn descriptors_and_special_records_are_written_through_never_replaced() {
    let (d, model) = tiny_model(&TinyBert::default());
    let log = d.path().join("log.jsonl");
    std::fs::write(&log, "previous line\n").unwrap();
    let append = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let o = embed(&model, "jsonl", Path::new("/proc/self/fd/1"))
        .stdout(Stdio::from(append))
        .output()
        .unwrap();
    ok(&o);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("previous line\n"), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");

    let input = d.path().join("in.txt");
    std::fs::write(&input, "hello world\nthe cat sat\n").unwrap();
    let record = d.path().join("emb-00000-of-00001.jsonl.fetch-ml.json");
    mkfifo(&record);
    let o = run(fetch_ml()
        .args(["--task=1", "--shard=0/1", "--format=jsonl", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("-o")
        .arg(d.path().join("emb.jsonl")));
    let err = fails_with(
        &o,
        &[
            "emb-00000-of-00001.jsonl.fetch-ml.json",
            "not a regular file",
        ],
    );
    assert!(
        !err.contains("sentence(s) written"),
        "it fails before the work:\n{err}"
    );
    assert_eq!(file_kind(&record), "fifo");
    assert!(!d.path().join("emb-00000-of-00001.jsonl").exists());
}

/// A tiny model, a toy training set and an evaluation set.
struct Toy {
    dir: tempfile::TempDir,
    model: PathBuf,
    train: PathBuf,
    eval: PathBuf,
}

fn toy() -> Toy {
    let (dir, model) = tiny_model(&TinyBert::default());
    let train = dir.path().join("train.jsonl");
    write_jsonl(&train, &toy_rows(32, 1));
    let eval = dir.path().join("eval.jsonl");
    write_jsonl(&eval, &toy_rows(8, 2));
    Toy {
        dir,
        model,
        train,
        eval,
    }
}

fn train_cmd(t: &Toy, save: &Path) -> Command {
    let mut cmd = fetch_ml();
    cmd.args(["--task=2", "--epochs", "1", "--format", "jsonl"])
        .args(["-s", "i love pizza", "--model"])
        .arg(&t.model)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--save")
        .arg(save);
    cmd
}

fn scenarios_cmd(t: &Toy) -> Command {
    let mut cmd = fetch_ml();
    cmd.args(["--task=3", "--epochs", "1", "--scenarios", "none,all"])
        .arg("--model")
        .arg(&t.model)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--eval-file")
        .arg(&t.eval);
    cmd
}

// Must fix 1 and 7 for the other tasks: predictions and charts into special files in place;
// a regular chart gets 0666 less the umask, as checkpoint files do.
#[test]
fn training_outputs_and_charts_go_into_special_files_in_place() {
    let t = toy();
    let fifo = t.dir.path().join("pred.fifo");
    mkfifo(&fifo);
    let reader = Drain::start(&fifo);
    let o = run(train_cmd(&t, &t.dir.path().join("ck")).arg("-o").arg(&fifo));
    let got = reader.finish();
    ok(&o);
    assert_eq!(file_kind(&fifo), "fifo");
    let text = String::from_utf8(got).unwrap();
    assert!(text.contains("\"class\""), "{text}");

    let png_fifo = t.dir.path().join("chart-fifo.png");
    mkfifo(&png_fifo);
    let reader = Drain::start(&png_fifo);
    let o = run(scenarios_cmd(&t).arg("--plot").arg(&png_fifo));
    let got = reader.finish();
    ok(&o);
    assert_eq!(file_kind(&png_fifo), "fifo");
    assert_eq!(&got[1..4], b"PNG");

    let png = t.dir.path().join("chart.png");
    ok(&run(scenarios_cmd(&t).arg("--plot").arg(&png)));
    assert_eq!(mode(&png), 0o666 & !umask(), "the chart's mode");
    assert!(
        dot_files(t.dir.path()).is_empty(),
        "{:?}",
        dot_files(t.dir.path())
    );
}

/// Takes an exclusive advisory lock on `path` (created if missing), as a live writer would.
fn hold_lock(path: &Path) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    f
}

// Must fix 3: temporary files are judged by their lock, not by a process id that another
// container or node cannot see.
#[test]
fn temporary_files_of_live_writers_are_kept_and_stale_ones_removed() {
    let (d, model) = tiny_model(&TinyBert::default());
    let dir = d.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let dead_pid = (100_000..4_000_000)
        // SAFETY: signal 0 only checks whether the process exists.
        .find(|&p| unsafe { libc::kill(p, 0) } != 0)
        .unwrap();
    // A live writer in another PID namespace: its process id means nothing here, but it holds
    // the lock on its temporary file (this test process plays that writer).
    let live = dir.join(format!(".fetch-ml-{dead_pid}-live01"));
    let _lock = hold_lock(&live);
    std::fs::write(&live, "being written").unwrap();
    // Temporary files of killed writers: no lock. One is named for PID 1, which is alive in
    // every container, and one in the current scheme.
    let stale_pid1 = dir.join(".fetch-ml-1-stale1");
    std::fs::write(&stale_pid1, "half").unwrap();
    let stale = dir.join(".fetch-ml-tmp-stale2");
    std::fs::write(&stale, "half").unwrap();
    // Another user's file that merely shares the prefix but is a folder: never touched.
    std::fs::create_dir(dir.join(".fetch-ml-notes")).unwrap();

    ok(&run(&mut embed(&model, "jsonl", &dir.join("emb.jsonl"))));
    assert!(
        live.exists(),
        "the live writer's temporary file was deleted"
    );
    assert_eq!(std::fs::read_to_string(&live).unwrap(), "being written");
    assert!(
        !stale_pid1.exists(),
        "a stale file named for PID 1 is removed"
    );
    assert!(!stale.exists(), "a stale temporary file is removed");
    assert!(dir.join(".fetch-ml-notes").is_dir());
    assert_eq!(
        std::fs::read_to_string(dir.join("emb.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // Once the writer is gone (its lock released), the file is stale and goes too.
    drop(_lock);
    ok(&run(&mut embed(&model, "jsonl", &dir.join("emb.jsonl"))));
    assert!(!live.exists());
}

// Must fix 3: a run's own temporary file is locked while it is written, so a second run in
// the same folder leaves it alone.
#[test]
fn a_running_writer_holds_the_lock_on_its_temporary_file() {
    let (d, model) = tiny_model(&TinyBert::default());
    let dir = d.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let mut child = fetch_ml()
        .args(["--task=1", "--format=jsonl", "--input", "-", "--model"])
        .arg(&model)
        .arg("--output")
        .arg(dir.join("a.jsonl"))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello world\n").unwrap();
    let start = std::time::Instant::now();
    while dot_files(&dir).is_empty() {
        assert!(start.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let tmp = dir.join(&dot_files(&dir)[0]);
    let f = std::fs::OpenOptions::new().write(true).open(&tmp).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_ne!(
        rc,
        0,
        "the writer does not hold a lock on {}",
        tmp.display()
    );
    drop(f);
    // A second run in the same folder keeps the first run's file.
    ok(&run(&mut embed(&model, "jsonl", &dir.join("b.jsonl"))));
    assert!(tmp.exists(), "the second run deleted the first run's file");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("a.jsonl"))
            .unwrap()
            .lines()
            .count(),
        1
    );
}

fn export_cmd(t: &Toy, ck: &Path, export: &Path) -> Command {
    let mut cmd = fetch_ml();
    cmd.args(["--task=2", "-s", "hi", "--checkpoint"])
        .arg(ck)
        .arg("--model")
        .arg(&t.model)
        .arg("--export")
        .arg(export);
    cmd
}

fn all_paths(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if p.is_dir() {
            all_paths(&p, out);
        }
    }
}

// Must fix 7 and the model card: --export --overwrite replaces only fetch-ml's own files, the
// export's files get the user's permissions, and a README.md says which vector the heads take.
#[test]
fn export_overwrite_never_deletes_files_it_did_not_write() {
    let t = toy();
    let ck = t.dir.path().join("ck");
    ok(&run(&mut train_cmd(&t, &ck)));
    let ex = t.dir.path().join("exported");
    ok(&run(&mut export_cmd(&t, &ck, &ex)));

    let mut paths = Vec::new();
    all_paths(&ex, &mut paths);
    let mask = umask();
    assert_eq!(mode(&ex), 0o777 & !mask, "{}", ex.display());
    for p in &paths {
        let want = if p.is_dir() { 0o777 } else { 0o666 } & !mask;
        assert_eq!(mode(p), want, "{}", p.display());
    }
    let card = std::fs::read_to_string(ex.join("README.md")).expect("a model card");
    for needle in [
        "heads.json",
        "mean-pooled",
        "before",
        "Normalize",
        "SentenceTransformer",
    ] {
        assert!(
            card.contains(needle),
            "the model card lacks {needle:?}:\n{card}"
        );
    }

    // The user keeps notes and a git repository in the export folder.
    std::fs::create_dir(ex.join(".git")).unwrap();
    std::fs::write(ex.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(ex.join("notes.txt"), "precious").unwrap();
    let o = run(export_cmd(&t, &ck, &ex).arg("--overwrite"));
    let err = fails_with(&o, &["--export", ".git", "notes.txt"]);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read_to_string(ex.join("notes.txt")).unwrap(),
        "precious"
    );
    assert!(ex.join(".git/HEAD").is_file());
    assert!(
        ex.join("heads.json").is_file(),
        "the export is left as it was"
    );

    // A README.md of the user's own (not fetch-ml's model card) is in the way too.
    std::fs::remove_dir_all(ex.join(".git")).unwrap();
    std::fs::remove_file(ex.join("notes.txt")).unwrap();
    std::fs::write(ex.join("README.md"), "# my model\n").unwrap();
    fails_with(
        &run(export_cmd(&t, &ck, &ex).arg("--overwrite")),
        &["README.md"],
    );
    assert_eq!(
        std::fs::read_to_string(ex.join("README.md")).unwrap(),
        "# my model\n"
    );
    // Without anything foreign, the earlier export is replaced.
    std::fs::remove_file(ex.join("README.md")).unwrap();
    ok(&run(export_cmd(&t, &ck, &ex).arg("--overwrite")));
    assert!(ex.join("README.md").is_file());
    assert!(
        dot_files(t.dir.path()).is_empty(),
        "{:?}",
        dot_files(t.dir.path())
    );
}

// Should fix: bad targets fail at the start, not after the work.
#[test]
fn output_targets_that_cannot_work_fail_before_anything_loads() {
    let t = toy();
    let folder = t.dir.path().join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    // The model does not exist: an error about the output proves it was checked first.
    for format in ["jsonl", "parquet", "npy"] {
        let o = run(fetch_ml()
            .args([
                "--task=1",
                "-s",
                "hi",
                "--model",
                "/no/such/model",
                "--format",
            ])
            .arg(format)
            .arg("-o")
            .arg(&folder));
        let err = fails_with(&o, &["--output", "a-folder", "folder"]);
        assert!(!err.contains("/no/such/model"), "{err}");
    }
    // The same folder for --save and --export, or one inside the other.
    let same = t.dir.path().join("same");
    let o = run(train_cmd(&t, &same).arg("--export").arg(&same));
    let err = fails_with(&o, &["--save", "--export"]);
    assert!(!err.contains("epoch"), "nothing trains first:\n{err}");
    let o = run(train_cmd(&t, &same).arg("--export").arg(same.join("sub")));
    let err = fails_with(&o, &["--save", "--export"]);
    assert!(!err.contains("epoch"), "nothing trains first:\n{err}");
    assert!(!same.exists());
}

// WEAK case: a sentence to predict that the model cannot take fails before training and
// saving, not after.
#[test]
fn task2_checks_the_sentences_to_predict_before_it_saves() {
    let t = toy();
    let tok = t.model.join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    v["model"]["vocab"]["hello"] = 100_000.into();
    std::fs::write(&tok, v.to_string()).unwrap();
    let ck = t.dir.path().join("ck");
    let o = run(fetch_ml()
        .args(["--task=2", "--epochs", "1", "-s", "hello there", "--model"])
        .arg(&t.model)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--save")
        .arg(&ck));
    let err = fails_with(&o, &["--sentence", "vocabulary"]);
    assert!(!err.contains("epoch"), "it fails before training:\n{err}");
    assert!(!ck.exists(), "nothing is saved");
}

// Hostile follow-up: a named pipe where --save keeps its lock file is an error, not a hang.
#[test]
fn a_named_pipe_at_the_save_lock_is_an_error_not_a_hang() {
    let t = toy();
    mkfifo(&t.dir.path().join(".ck.lock"));
    let mut child = train_cmd(&t, &t.dir.path().join("ck"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            panic!("fetch-ml hangs on a named pipe at the save lock");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    fails_with(&o, &[".ck.lock", "not a regular file"]);
    assert_eq!(file_kind(&t.dir.path().join(".ck.lock")), "fifo");
}

/// Peak RSS in bytes and the exit status of `cmd`, stdout and stderr discarded to files.
fn peak_rss(cmd: &mut Command, log: &Path) -> (i32, u64) {
    let child = cmd
        .stdout(Stdio::from(std::fs::File::create(log).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::create(log.with_extension("err")).unwrap(),
        ))
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

// Must fix 8: memory stays flat whatever the line length, in every format.
#[test]
fn long_lines_keep_memory_flat_in_every_format() {
    let (d, model) = tiny_model(&TinyBert::default());
    let words = [
        "the", "cat", "sat", "on", "mat", "and", "dog", "won", "game", "today",
    ];
    // 200 lines of 1 MiB (each line different), and 200 short lines.
    let long = d.path().join("long.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&long).unwrap());
        for i in 0..200usize {
            let mut n = 0;
            let mut k = i;
            while n < (1 << 20) - 16 {
                let w = words[k % words.len()];
                f.write_all(w.as_bytes()).unwrap();
                f.write_all(b" ").unwrap();
                n += w.len() + 1;
                k = k.wrapping_mul(31).wrapping_add(7);
            }
            writeln!(f, "{i}").unwrap();
        }
    }
    let short = d.path().join("short.txt");
    let text: String = (0..200).map(|i| format!("the cat sat {i}\n")).collect();
    std::fs::write(&short, text).unwrap();
    for format in ["parquet", "jsonl"] {
        let measure = |input: &Path| {
            let out = d.path().join(format!("out.{format}"));
            let (status, rss) = peak_rss(
                fetch_ml()
                    .args(["--task=1", "--threads=1", "--format", format, "--model"])
                    .arg(&model)
                    .arg("--input")
                    .arg(input)
                    .arg("-o")
                    .arg(&out),
                &d.path().join("log"),
            );
            assert_eq!(status, 0, "fetch-ml --format {format} failed");
            let _ = std::fs::remove_file(&out);
            rss
        };
        let rss_long = measure(&long);
        let rss_short = measure(&short);
        eprintln!(
            "{format}: peak RSS {} MB on 200 lines of 1 MiB, {} MB on short lines",
            rss_long >> 20,
            rss_short >> 20
        );
        assert!(
            rss_long < rss_short + (100 << 20),
            "--format {format}: {} MB of RSS on 200 lines of 1 MiB against {} MB on short lines",
            rss_long >> 20,
            rss_short >> 20
        );
    }
}
