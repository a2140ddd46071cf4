//! What training says about itself (issue 19): too little data, early stopping and the
//! weights it restores, the hint for a diverged loss, a checkpoint without its weights, an
//! embedding cache that cannot be used.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails_with, fetch_ml, ok, run, stderr, tiny_model, toy_rows, write_jsonl};
use fetch_ml::testutil::TinyBert;

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
    write_jsonl(&eval, &toy_rows(16, 2));
    Toy {
        dir,
        model,
        train,
        eval,
    }
}

/// `--task=2` on the toy training set for `epochs` epochs, saving to `save`.
fn train_cmd(t: &Toy, save: &Path, epochs: usize) -> Command {
    let mut cmd = fetch_ml();
    cmd.args(["--task=2", "-s", "i love pizza", "--epochs"])
        .arg(epochs.to_string())
        .arg("--model")
        .arg(&t.model)
        .arg("--train-file")
        .arg(&t.train)
        .arg("--save")
        .arg(save);
    cmd
}

#[test]
fn a_one_row_training_set_is_warned_about() {
    let t = toy();
    write_jsonl(
        &t.train,
        &[serde_json::json!({"text": "i love pizza", "class": "food", "sentiment": "positive"})],
    );
    let o = run(&mut train_cmd(&t, &t.dir.path().join("ck"), 1));
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("warning") && err.contains("only 1 row"),
        "no warning about the size of the training set:\n{err}"
    );
}

/// The evaluations of a `--format json` report: (step, value of `metric`).
fn evaluations(report: &serde_json::Value, head: usize) -> Vec<(u64, f64)> {
    report["training"]["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["step"].as_u64().unwrap(),
                e["metrics"][head]["accuracy"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn early_stopping_says_when_it_stops_and_which_weights_it_keeps() {
    let t = toy();
    // Evaluations every step (4 steps an epoch), and at the end of each epoch only.
    for (patience, every) in [(1usize, true), (2, true), (3, true), (2, false)] {
        let save = t.dir.path().join(format!("ck{patience}-{every}"));
        let mut cmd = train_cmd(&t, &save, 60);
        cmd.args(["--batch-size", "8"]);
        if every {
            cmd.args(["--eval-every", "1"]);
        }
        let o = run(cmd
            .arg("--eval-file")
            .arg(&t.eval)
            .args(["--keep-best", "sentiment.accuracy", "--format", "json"])
            .arg("--early-stop")
            .arg(patience.to_string()));
        let report: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        let evals = evaluations(&report, 1);
        let best = report["training"]["best"]["step"].as_u64().unwrap();
        assert_eq!(report["training"]["stopped_early"], true, "{evals:?}");
        // 16 evaluation rows allow at most 17 values of accuracy, so training stops within
        // the 60 epochs, once `patience` evaluations after the best have not beaten it.
        let after: Vec<_> = evals.iter().filter(|e| e.0 > best).collect();
        assert_eq!(after.len(), patience, "patience {patience}: {evals:?}");
        let err = stderr(&o);
        assert!(
            err.contains("early stop")
                && err.contains(&format!("{patience} evaluation"))
                && err.contains(&format!("weights of step {best}")),
            "patience {patience}: stderr does not say it stopped and restored:\n{err}"
        );
    }
}

#[test]
fn keeping_the_best_weights_says_which_ones() {
    let t = toy();
    let save = t.dir.path().join("ck");
    let o = run(train_cmd(&t, &save, 3)
        .arg("--eval-file")
        .arg(&t.eval)
        .args(["--keep-best", "sentiment.accuracy", "--format", "json"]));
    let report: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    let best = report["training"]["best"]["step"].as_u64().unwrap();
    let err = stderr(&o);
    assert!(
        err.contains(&format!("weights of step {best}")),
        "stderr does not say which weights were kept:\n{err}"
    );
}

#[test]
fn an_overflowing_loss_weight_gets_its_own_hint() {
    let t = toy();
    let err = fails_with(
        &run(train_cmd(&t, &t.dir.path().join("ck"), 1).args(["--loss-weights", "1e308,1e308"])),
        &["--loss-weights"],
    );
    assert!(!err.contains("--lr"), "the hint names --lr:\n{err}");
    // A real divergence still points at the learning rates: in the loss of a later step, in
    // the evaluation right after the first one, or in the outputs after the last step.
    let err = fails_with(
        &run(train_cmd(&t, &t.dir.path().join("ck"), 3).args(["--head-lr", "1e30"])),
        &["diverged"],
    );
    assert!(err.contains("--lr") || err.contains("--head-lr"), "{err}");
    let save = t.dir.path().join("ck-one-step");
    let err = fails_with(
        &run(train_cmd(&t, &save, 1).args(["--head-lr", "1e30"])),
        &["diverged", "training example", "--head-lr"],
    );
    assert!(!err.contains("overflows on this input"), "{err}");
    assert!(!save.exists(), "a diverged model was saved");
    let save = t.dir.path().join("ck-eval");
    let err = fails_with(
        &run(train_cmd(&t, &save, 1)
            .args(["--head-lr", "1e30", "--eval-file"])
            .arg(&t.eval)),
        &["diverged", "evaluation example", "--head-lr"],
    );
    assert!(!err.contains("overflows on this input"), "{err}");
    assert!(!save.exists(), "a diverged model was saved");
}

#[test]
fn a_checkpoint_without_its_weights_says_so() {
    let t = toy();
    let save = t.dir.path().join("ck");
    ok(&run(&mut train_cmd(&t, &save, 1)));
    std::fs::remove_file(save.join("model.safetensors")).unwrap();
    let err = fails_with(
        &run(fetch_ml()
            .args(["--task=2", "-s", "hi", "--checkpoint"])
            .arg(&save)),
        &["model.safetensors", "missing"],
    );
    assert!(
        !err.contains("corrupt") && !err.contains("fetch it again"),
        "{err}"
    );
}

#[test]
fn an_embedding_cache_that_cannot_be_used_is_reported() {
    let t = toy();
    let cache = t.dir.path().join("cache");
    let o = run(train_cmd(&t, &t.dir.path().join("ck"), 1)
        .args(["--freeze-layers", "1", "--embedding-cache"])
        .arg(&cache));
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("embedding cache") && err.contains("not used"),
        "nothing says the cache is unused:\n{err}"
    );
    // With the encoder frozen it is used, and says nothing of the kind.
    let o = run(train_cmd(&t, &t.dir.path().join("ck2"), 1)
        .args(["--freeze", "encoder", "--embedding-cache"])
        .arg(&cache));
    ok(&o);
    assert!(!stderr(&o).contains("not used"), "{}", stderr(&o));
}

#[test]
fn numeric_labels_follow_one_rule() {
    let t = toy();
    // 1, "1" and 1.0 are one label; 2 is another.
    let mut rows = Vec::new();
    for (i, class) in [
        serde_json::json!(1),
        serde_json::json!("1"),
        serde_json::json!(1.0),
        serde_json::json!(2),
    ]
    .into_iter()
    .cycle()
    .take(16)
    .enumerate()
    {
        let s = if i % 3 == 0 { "positive" } else { "negative" };
        rows.push(serde_json::json!({"text": "i love pizza", "class": class, "sentiment": s}));
    }
    write_jsonl(&t.train, &rows);
    let o = run(train_cmd(&t, &t.dir.path().join("ck"), 1).args(["--format", "json"]));
    let report: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    let ckpt: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.dir.path().join("ck/checkpoint.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        ckpt["heads"]["labels"][0],
        serde_json::json!(["1", "2"]),
        "{report}"
    );
}
