//! Sharded runs, through the binary (issue 19): an output name must tell shards apart, an
//! existing output is skipped only when it is complete and was made by the same shard of the
//! same job, a `.npy` pair completes in one step, and a re-submitted Slurm array index redoes
//! exactly its shard.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails_with, fetch_ml, ok, run, stderr, tiny_model};
use fetch_ml::testutil::TinyBert;

/// `n` numbered lines.
fn write_corpus(path: &Path, n: usize) {
    let text: String = (0..n)
        .map(|i| format!("the cat sat on mat number {i:03}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
}

fn shard_cmd(model: &Path, input: &Path, shard: &str, format: &str, out: &Path) -> Command {
    let mut cmd = fetch_ml();
    cmd.args([
        "--task=1",
        "--threads=1",
        "--shard",
        shard,
        "--format",
        format,
    ])
    .arg("--model")
    .arg(model)
    .arg("--input")
    .arg(input)
    .arg("-o")
    .arg(out);
    cmd
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p).unwrap().lines().count()
}

fn parquet_meta(path: &Path) -> (i64, serde_json::Value) {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let r = SerializedFileReader::new(std::fs::File::open(path).unwrap()).expect("Parquet");
    let m = r.metadata().file_metadata();
    let kv = m
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == "fetch-ml"))
        .and_then(|e| e.value.clone())
        .expect("fetch-ml metadata");
    (m.num_rows(), serde_json::from_str(&kv).unwrap())
}

fn skipped(o: &std::process::Output) -> bool {
    stderr(o).contains("skipped")
}

// Must fix 2: a name with {n} only would give every shard the same file.
#[test]
fn a_template_that_does_not_tell_shards_apart_is_refused() {
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("corpus.txt");
    write_corpus(&input, 10);
    let out = d.path().join("emb-{n}.jsonl");
    let o = run(&mut shard_cmd(&model, &input, "1/3", "jsonl", &out));
    fails_with(&o, &["--output", "{n}", "{i}", "{shard}"]);
    assert!(std::fs::read_dir(d.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("emb")));
    // {i} (with or without {n}) tells them apart.
    let out = d.path().join("emb-{i}-of-{n}.jsonl");
    ok(&run(&mut shard_cmd(&model, &input, "1/3", "jsonl", &out)));
    assert!(d.path().join("emb-1-of-3.jsonl").is_file());
}

// Must fix 2: the shard count, the input, the model or the settings changed: the old file is
// not taken for this run's output; the message says what differs and what --overwrite does.
#[test]
fn a_shard_output_made_by_another_job_is_not_skipped() {
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("corpus.txt");
    write_corpus(&input, 30);
    let out = d.path().join("emb-{i}.jsonl");
    for i in 0..3 {
        ok(&run(&mut shard_cmd(
            &model,
            &input,
            &format!("{i}/3"),
            "jsonl",
            &out,
        )));
    }
    let first = d.path().join("emb-0.jsonl");
    let three = std::fs::read(&first).unwrap();
    // The same shard again: skipped.
    let o = run(&mut shard_cmd(&model, &input, "0/3", "jsonl", &out));
    ok(&o);
    assert!(skipped(&o), "{}", stderr(&o));

    // Two shards now: emb-0.jsonl was shard 0 of 3.
    let o = run(&mut shard_cmd(&model, &input, "0/2", "jsonl", &out));
    fails_with(&o, &["emb-0.jsonl", "0/3", "0/2", "--overwrite"]);
    assert_eq!(std::fs::read(&first).unwrap(), three, "nothing changed");
    let o = run(shard_cmd(&model, &input, "0/2", "jsonl", &out).arg("--overwrite"));
    ok(&o);
    assert_eq!(lines(&first), 15, "shard 0 of 2 holds half of 30 lines");

    // The input changed (a line appended).
    write_corpus(&input, 31);
    let o = run(&mut shard_cmd(&model, &input, "0/2", "jsonl", &out));
    fails_with(&o, &["emb-0.jsonl", "input", "corpus.txt", "--overwrite"]);
    ok(&run(
        shard_cmd(&model, &input, "0/2", "jsonl", &out).arg("--overwrite")
    ));

    // Another model (other weights in a folder of the same name).
    let other = d.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let model2 = other.join("tiny-bert");
    TinyBert {
        seed: 99,
        ..TinyBert::default()
    }
    .write(&model2)
    .unwrap();
    let o = run(&mut shard_cmd(&model2, &input, "0/2", "jsonl", &out));
    fails_with(&o, &["emb-0.jsonl", "model", "fingerprint", "--overwrite"]);

    // Other settings.
    let o = run(shard_cmd(&model, &input, "0/2", "jsonl", &out).arg("--normalize"));
    fails_with(&o, &["emb-0.jsonl", "normalize", "--overwrite"]);
    let o = run(&mut shard_cmd(&model, &input, "0/2", "jsonl", &out));
    ok(&o);
    assert!(skipped(&o), "{}", stderr(&o));
}

// Must fix 2: a truncated or empty Parquet file, or a JSONL file without its completion
// record, is not a finished shard: it is redone.
#[test]
fn an_incomplete_shard_output_is_redone() {
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("corpus.txt");
    write_corpus(&input, 40);
    let out = d.path().join("emb.parquet");
    let file = d.path().join("emb-00001-of-00002.parquet");
    ok(&run(&mut shard_cmd(&model, &input, "1/2", "parquet", &out)));
    let whole = std::fs::read(&file).unwrap();
    for cut in [whole.len() / 2, whole.len() - 1, 0] {
        std::fs::write(&file, &whole[..cut]).unwrap();
        let o = run(&mut shard_cmd(&model, &input, "1/2", "parquet", &out));
        ok(&o);
        assert!(!skipped(&o), "a file cut at {cut} bytes was skipped");
        assert!(stderr(&o).contains("incomplete"), "{}", stderr(&o));
        assert_eq!(parquet_meta(&file).0, 20);
    }

    let out = d.path().join("emb.jsonl");
    let file = d.path().join("emb-00000-of-00002.jsonl");
    ok(&run(&mut shard_cmd(&model, &input, "0/2", "jsonl", &out)));
    let whole = std::fs::read_to_string(&file).unwrap();
    // Cut by something else after the run: the record no longer matches.
    std::fs::write(&file, &whole[..whole.len() / 2]).unwrap();
    let o = run(&mut shard_cmd(&model, &input, "0/2", "jsonl", &out));
    ok(&o);
    assert!(!skipped(&o), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), whole);
    // A file of the right name that no fetch-ml run finished (no completion record).
    let record = d.path().join("emb-00000-of-00002.jsonl.fetch-ml.json");
    assert!(record.is_file(), "the completion record");
    std::fs::remove_file(&record).unwrap();
    let o = run(&mut shard_cmd(&model, &input, "0/2", "jsonl", &out));
    ok(&o);
    assert!(!skipped(&o), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), whole);
}

fn npy_rows(p: &Path) -> usize {
    let bytes = std::fs::read(p).unwrap();
    let header = String::from_utf8_lossy(&bytes[10..128]).into_owned();
    let shape = header.split("'shape': (").nth(1).unwrap();
    shape.split(',').next().unwrap().trim().parse().unwrap()
}

// Must fix 4: the matrix and its sidecar complete together; a sidecar of another run beside
// the matrix is never taken for a finished shard.
#[test]
fn an_npy_pair_completes_in_one_step() {
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("corpus.txt");
    write_corpus(&input, 20);
    let out = d.path().join("emb.npy");
    let matrix = d.path().join("emb-00000-of-00002.npy");
    let sidecar = d.path().join("emb-00000-of-00002.npy.meta.jsonl");
    ok(&run(&mut shard_cmd(&model, &input, "0/2", "npy", &out)));
    assert_eq!((npy_rows(&matrix), lines(&sidecar)), (10, 10));
    let m0 = std::fs::read(&matrix).unwrap();
    let s0 = std::fs::read_to_string(&sidecar).unwrap();

    // A kill between the two renames of another run left its 4-row sidecar beside the matrix.
    let four: String = s0.lines().take(4).map(|l| format!("{l}\n")).collect();
    std::fs::write(&sidecar, four).unwrap();
    let o = run(&mut shard_cmd(&model, &input, "0/2", "npy", &out));
    ok(&o);
    assert!(!skipped(&o), "{}", stderr(&o));
    assert_eq!(std::fs::read(&matrix).unwrap(), m0);
    assert_eq!(std::fs::read_to_string(&sidecar).unwrap(), s0);

    // A real kill at each step of the commit: the rerun never skips a half-committed pair.
    for step in 1..=3 {
        let o = run(shard_cmd(&model, &input, "0/2", "npy", &out)
            .arg("--overwrite")
            .env("FETCH_ML_FAULT", format!("output-commit-{step}")));
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGABRT),
            "step {step}: {}",
            stderr(&o)
        );
        let o = run(&mut shard_cmd(&model, &input, "0/2", "npy", &out));
        ok(&o);
        assert!(!skipped(&o), "step {step}: {}", stderr(&o));
        assert_eq!(std::fs::read(&matrix).unwrap(), m0, "step {step}");
        assert_eq!(std::fs::read_to_string(&sidecar).unwrap(), s0);
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/slurm-array.sh")
}

/// `deploy/slurm-array.sh` as Slurm would start it for array task `id`, with the tiny model
/// and a binary in place of the container.
fn slurm_task(d: &Path, model: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .current_dir(d)
        .env("FETCH_ML_BIN", env!("CARGO_BIN_EXE_fetch-ml"))
        .env("MODEL_DIR", model.parent().unwrap())
        .env("MODEL", model.file_name().unwrap())
        .env("FORMAT", "jsonl")
        .env("SLURM_CPUS_PER_TASK", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("SHARDS")
        .env_remove("FETCH_ML_SHARDS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

// Must fix 10: `sbatch --array=1 deploy/slurm-array.sh` redoes shard 1 of the script's 8.
#[test]
fn a_resubmitted_slurm_array_index_redoes_exactly_that_shard() {
    let (d, model) = tiny_model(&TinyBert::default());
    let in_dir = d.path().join("corpus");
    std::fs::create_dir(&in_dir).unwrap();
    write_corpus(&in_dir.join("sentences.txt"), 40);
    let out_dir = d.path().join("embeddings");
    let one = [
        ("SLURM_ARRAY_TASK_ID", "1"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_MAX", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "1"),
    ];
    let o = slurm_task(d.path(), &model, &one);
    ok(&o);
    let names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl"))
        .collect();
    assert_eq!(names, ["emb-00001-of-00008.jsonl"], "{}", stderr(&o));
    assert_eq!(lines(&out_dir.join("emb-00001-of-00008.jsonl")), 5);
    // An index past the pinned count is refused, naming both.
    let o = slurm_task(
        d.path(),
        &model,
        &[
            ("SLURM_ARRAY_TASK_ID", "8"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "8"),
            ("SLURM_ARRAY_TASK_COUNT", "9"),
        ],
    );
    fails_with(&o, &["8", "SHARDS"]);
    // Docker mode passes the shard explicitly too (a stub docker records its arguments).
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = d.path().join("docker-args");
    std::fs::write(
        bin.join("docker"),
        format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\n", log.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("docker"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let mut env = one.to_vec();
    env.extend([("RUNTIME", "docker"), ("PATH", path.as_str())]);
    let o = Command::new("bash")
        .arg(script())
        .current_dir(d.path())
        .envs(env.iter().copied())
        .env_remove("FETCH_ML_BIN")
        .output()
        .unwrap();
    ok(&o);
    let args = std::fs::read_to_string(&log).unwrap();
    assert!(args.lines().any(|l| l == "--shard=1/8"), "{args}");
}

// Must fix 10 and should fix: the environment rules never turn a partial array, or one with
// a step or gaps, into another split.
#[test]
fn slurm_environment_rules_never_change_the_split_silently() {
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("corpus.txt");
    write_corpus(&input, 30);
    let out = d.path().join("emb.jsonl");
    let task = |env: &[(&str, &str)]| {
        let mut cmd = fetch_ml();
        cmd.args(["--task=1", "--threads=1", "--format=jsonl", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&input)
            .arg("-o")
            .arg(&out)
            .env_remove("FETCH_ML_SHARDS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd)
    };
    // `sbatch --array=1`, the count not pinned: it cannot say how the corpus was split.
    let one = [
        ("SLURM_ARRAY_TASK_ID", "1"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_MAX", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "1"),
    ];
    fails_with(
        &task(&one),
        &["SLURM_ARRAY_TASK_ID=1", "FETCH_ML_SHARDS", "--shard"],
    );
    // Pinned: the array task id is the shard index.
    let mut pinned = one.to_vec();
    pinned.push(("FETCH_ML_SHARDS", "3"));
    ok(&task(&pinned));
    assert_eq!(lines(&d.path().join("emb-00001-of-00003.jsonl")), 10);
    assert!(!d.path().join("emb-00000-of-00003.jsonl").exists());
    // A step (--array=0-8:2), not pinned: refused rather than leaving shards 1, 3, ... undone.
    let step = [
        ("SLURM_ARRAY_TASK_ID", "4"),
        ("SLURM_ARRAY_TASK_MIN", "0"),
        ("SLURM_ARRAY_TASK_MAX", "8"),
        ("SLURM_ARRAY_TASK_STEP", "2"),
        ("SLURM_ARRAY_TASK_COUNT", "5"),
    ];
    fails_with(&task(&step), &["FETCH_ML_SHARDS"]);
    // Pinned with a step: shard 4 of 9, and a note that the array covers only some shards.
    let mut pinned = step.to_vec();
    pinned.push(("FETCH_ML_SHARDS", "9"));
    let o = task(&pinned);
    ok(&o);
    assert!(d.path().join("emb-00004-of-00009.jsonl").is_file());
    assert!(stderr(&o).contains("step 2"), "{}", stderr(&o));
}

// Should fix: the Parquet metadata names the model, not the folder it sits in on this machine.
#[test]
fn parquet_metadata_holds_no_local_paths() {
    let (d, model) = tiny_model(&TinyBert::default());
    let input = d.path().join("corpus.txt");
    write_corpus(&input, 6);
    let out = d.path().join("emb.parquet");
    ok(&run(&mut shard_cmd(&model, &input, "0/1", "parquet", &out)));
    let (rows, meta) = parquet_meta(&d.path().join("emb-00000-of-00001.parquet"));
    assert_eq!(rows, 6);
    assert_eq!(meta["model"], "tiny-bert");
    assert!(meta["model_fingerprint"]
        .as_str()
        .is_some_and(|f| f.starts_with("xxh3")));
    let text = meta.to_string();
    let root = d.path().display().to_string();
    assert!(!text.contains(&root), "a local path in {text}");
}

// Should fix: the Kubernetes Job says what its volumes need and cleans itself up.
#[test]
fn the_kubernetes_manifest_documents_its_storage_and_cleanup() {
    let manifest = include_str!("../deploy/k8s-indexed-job.yaml");
    assert!(
        manifest.contains("ReadWriteMany"),
        "the output volume's access mode"
    );
    let ttl = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("ttlSecondsAfterFinished:"))
        .expect("ttlSecondsAfterFinished");
    let secs: u64 = ttl
        .split(':')
        .nth(1)
        .unwrap()
        .split('#')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(secs > 0);
    let slurm = std::fs::read_to_string(script()).unwrap();
    assert!(slurm.contains("cgroup"), "the Docker mode's cgroup caveat");
}
