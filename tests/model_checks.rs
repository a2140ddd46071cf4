//! What a model folder declares is checked before anything runs, and what the model computes
//! is checked before it is written (issue 19): module shapes against the tensors and the
//! encoder, module paths inside the folder, weights that are not finite numbers, output
//! vectors that are not, `FETCH_ML_KERNEL` against `--dtype`, and a prompt that leaves no room.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::{
    cat_poisoned_model, fails_with, fetch_ml, ok, run, stderr, tiny_model, toy_rows, write_jsonl,
};
use fetch_ml::testutil::TinyBert;

/// A tiny sentence-transformers model (mean pooling, no normalisation), hidden size 32.
fn st_model() -> (tempfile::TempDir, PathBuf) {
    tiny_model(&TinyBert {
        sentence_transformers: Some(("mean", false, 32)),
        ..TinyBert::default()
    })
}

fn edit_json(path: &Path, f: impl Fn(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites the safetensors file at `path` after `f` edits its tensors.
fn edit_weights(path: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut w = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    f(&mut w);
    candle_core::safetensors::save(&w, path).unwrap();
}

/// `t` with element `at` (flat index) replaced by `value`.
fn with_value(t: &Tensor, at: usize, value: f32) -> Tensor {
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[at] = value;
    Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
}

/// Adds a Dense module in `model/dir` to the end of `modules.json`: `config.json` declaring
/// `in_f` -> `out_f`, and a weight of `[out_f, in_f]` with a bias.
fn add_dense(model: &Path, dir: &str, in_f: usize, out_f: usize) {
    let folder = model.join(dir);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("config.json"),
        serde_json::json!({"in_features": in_f, "out_features": out_f, "bias": true,
            "activation_function": "torch.nn.modules.activation.Tanh"})
        .to_string(),
    )
    .unwrap();
    let n = out_f * in_f;
    let w: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) / 10.0).collect();
    let tensors = HashMap::from([
        (
            "linear.weight".to_string(),
            Tensor::from_vec(w, (out_f, in_f), &Device::Cpu).unwrap(),
        ),
        (
            "linear.bias".to_string(),
            Tensor::zeros(out_f, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&tensors, folder.join("model.safetensors")).unwrap();
    edit_json(&model.join("modules.json"), |v| {
        let idx = v.as_array().unwrap().len();
        v.as_array_mut().unwrap().push(serde_json::json!({
            "idx": idx, "name": idx.to_string(), "path": dir,
            "type": "sentence_transformers.models.Dense"
        }));
    });
}

fn embed(model: &Path) -> Command {
    let mut cmd = embed_as(model);
    cmd.arg("--format=jsonl");
    cmd
}

/// `--task=1` of "hello world" without a format.
fn embed_as(model: &Path) -> Command {
    let mut cmd = fetch_ml();
    cmd.args(["--task=1", "-s", "hello world", "--model"])
        .arg(model);
    cmd
}

// Item 5: every module's declared shapes against the tensors and the module before it.
#[test]
fn a_dense_module_that_does_not_fit_the_encoder_is_refused() {
    let (_d, model) = st_model();
    // Consistent with its own tensors, but the encoder gives 32 values, not 100.
    add_dense(&model, "2_Dense", 100, 8);
    let err = fails_with(
        &run(&mut embed(&model)),
        &["2_Dense/config.json", "in_features", "100", "32"],
    );
    assert!(!err.contains("panicked"), "{err}");

    // A second Dense that does not take the first one's output.
    let (_d, model) = st_model();
    add_dense(&model, "2_Dense", 32, 8);
    add_dense(&model, "3_Dense", 16, 4);
    fails_with(
        &run(&mut embed(&model)),
        &["3_Dense/config.json", "in_features", "16", "8"],
    );

    // A Pooling module declaring another width than the encoder's.
    let (_d, model) = st_model();
    edit_json(&model.join("1_Pooling/config.json"), |v| {
        v["word_embedding_dimension"] = 100.into()
    });
    fails_with(
        &run(&mut embed(&model)),
        &[
            "1_Pooling/config.json",
            "word_embedding_dimension",
            "100",
            "32",
        ],
    );

    // Shapes that fit give vectors of the last module's width.
    let (_d, model) = st_model();
    add_dense(&model, "2_Dense", 32, 8);
    add_dense(&model, "3_Dense", 8, 4);
    let out = ok(&run(&mut embed(&model)));
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["embedding"].as_array().unwrap().len(), 4, "{v}");
}

#[test]
fn a_dense_module_with_no_outputs_is_refused() {
    let (_d, model) = st_model();
    add_dense(&model, "2_Dense", 32, 0);
    for format in ["jsonl", "parquet"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let err = fails_with(
            &run(embed_as(&model)
                .arg("--format")
                .arg(format)
                .arg("-o")
                .arg(&out)),
            &["2_Dense/config.json", "out_features", "0"],
        );
        assert!(!err.contains("Arrow") && !err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{format}: an output was written");
    }
}

#[test]
fn a_pooling_module_missing_or_outside_the_folder_is_refused() {
    // Listed in modules.json but not there: sentence-transformers refuses it; so do we,
    // rather than pooling by the mean.
    let (_d, model) = tiny_model(&TinyBert {
        sentence_transformers: Some(("cls", false, 32)),
        ..TinyBert::default()
    });
    std::fs::rename(model.join("1_Pooling"), model.join("elsewhere")).unwrap();
    fails_with(&run(&mut embed(&model)), &["1_Pooling/config.json"]);

    // A path leaving the model folder, relative or absolute.
    for path in ["../outside", "ABSOLUTE", "1_Pooling/../../outside"] {
        let (d, model) = tiny_model(&TinyBert {
            sentence_transformers: Some(("cls", false, 32)),
            ..TinyBert::default()
        });
        let outside = d.path().join("outside");
        let absolute = outside.display().to_string();
        let path = if path == "ABSOLUTE" {
            absolute.as_str()
        } else {
            path
        };
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::copy(
            model.join("1_Pooling/config.json"),
            outside.join("config.json"),
        )
        .unwrap();
        edit_json(&model.join("modules.json"), |v| v[1]["path"] = path.into());
        let err = fails_with(&run(&mut embed(&model)), &["modules.json", path]);
        assert!(err.contains("outside the model folder"), "{path}: {err}");
    }
    // The same for a Dense module.
    let (d, model) = st_model();
    add_dense(&model, "2_Dense", 32, 8);
    std::fs::rename(model.join("2_Dense"), d.path().join("2_Dense")).unwrap();
    edit_json(&model.join("modules.json"), |v| {
        v[2]["path"] = "../2_Dense".into()
    });
    fails_with(
        &run(&mut embed(&model)),
        &["modules.json", "../2_Dense", "outside the model folder"],
    );
}

// Item 6: weights that are not finite numbers are refused at load, naming the tensor.
#[test]
fn non_finite_weights_are_refused_at_load_naming_the_tensor() {
    let name = "encoder.layer.1.attention.self.query.weight";
    for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let (_d, model) = tiny_model(&TinyBert::default());
        edit_weights(&model.join("model.safetensors"), |w| {
            let t = with_value(&w[name], 37, bad);
            w.insert(name.into(), t);
        });
        for dtype in ["f32", "int8", "bf16"] {
            let err = fails_with(
                &run(embed(&model).args(["--dtype", dtype])),
                &[name, "model.safetensors", shown],
            );
            assert!(!err.contains("null"), "{err}");
        }
        // Training refuses it before anything trains or is saved.
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("train.jsonl");
        write_jsonl(&train, &toy_rows(16, 1));
        let save = dir.path().join("ck");
        fails_with(
            &run(fetch_ml()
                .args(["--task=2", "--epochs", "1", "-s", "hi", "--model"])
                .arg(&model)
                .arg("--train-file")
                .arg(&train)
                .arg("--save")
                .arg(&save)),
            &[name, shown],
        );
        assert!(!save.exists());
    }
    // A Dense module's weights too.
    let (_d, model) = st_model();
    add_dense(&model, "2_Dense", 32, 8);
    edit_weights(&model.join("2_Dense/model.safetensors"), |w| {
        let t = with_value(&w["linear.weight"], 3, f32::NEG_INFINITY);
        w.insert("linear.weight".into(), t);
    });
    fails_with(
        &run(&mut embed(&model)),
        &["linear.weight", "2_Dense/model.safetensors", "-inf"],
    );
}

/// A model whose vectors overflow for inputs of 4 tokens or more in every dtype: the last
/// LayerNorm gives 0.9e38 in every channel of every token, so the mean pooling's sum
/// overflows from the fourth token ([CLS] hello [SEP] is three).
fn overflowing_model() -> (tempfile::TempDir, PathBuf) {
    let (d, model) = tiny_model(&TinyBert::default());
    edit_weights(&model.join("model.safetensors"), |w| {
        let p = "encoder.layer.2.output.LayerNorm";
        let h = w[&format!("{p}.bias")].dims()[0];
        let dev = Device::Cpu;
        w.insert(
            format!("{p}.weight"),
            Tensor::zeros(h, candle_core::DType::F32, &dev).unwrap(),
        );
        w.insert(
            format!("{p}.bias"),
            Tensor::from_vec(vec![0.9e38f32; h], h, &dev).unwrap(),
        );
    });
    (d, model)
}

#[test]
fn a_non_finite_vector_is_an_error_naming_its_line() {
    let (d, model) = overflowing_model();
    let input = d.path().join("in.txt");
    std::fs::write(&input, "hello\nthe cat sat on the mat\nhello\n").unwrap();
    for dtype in ["f32", "int8", "bf16"] {
        for format in ["jsonl", "text", "parquet"] {
            let out = d.path().join(format!("out-{dtype}.{format}"));
            let o = run(fetch_ml()
                .args(["--task=1", "--dtype", dtype, "--format", format, "--model"])
                .arg(&model)
                .arg("--input")
                .arg(&input)
                .arg("-o")
                .arg(&out));
            let err = fails_with(&o, &["in.txt, line 2", "not finite"]);
            assert!(!err.contains("panicked"), "{err}");
            assert!(!out.exists(), "{dtype} {format}: an output was written");
        }
        // On standard output, nothing after the bad line is printed as a vector.
        let o = run(fetch_ml()
            .args(["--task=1", "--dtype", dtype, "--format", "jsonl", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&input));
        fails_with(&o, &["line 2"]);
        assert!(!common::stdout(&o).contains("null"), "{dtype}");
    }
    // A sentence that does not overflow is fine.
    ok(&run(&mut embed_short(&model)));
}

fn embed_short(model: &Path) -> Command {
    let mut cmd = fetch_ml();
    cmd.args(["--task=1", "--format=jsonl", "-s", "hello", "--model"])
        .arg(model);
    cmd
}

#[test]
fn a_prediction_from_a_non_finite_vector_is_an_error_naming_its_line() {
    let d = tempfile::tempdir().unwrap();
    let model = cat_poisoned_model(d.path());
    let train = d.path().join("train.jsonl");
    write_jsonl(&train, &toy_rows(32, 1));
    let save = d.path().join("ck");
    ok(&run(fetch_ml()
        .args([
            "--task=2",
            "--epochs",
            "1",
            "--freeze",
            "encoder",
            "-s",
            "i love pizza",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--train-file")
        .arg(&train)
        .arg("--save")
        .arg(&save)));
    let input = d.path().join("predict.txt");
    std::fs::write(&input, "i love pizza\nthe cat sat\n").unwrap();
    for format in ["text", "jsonl", "json"] {
        let o = run(fetch_ml()
            .args(["--task=2", "--format", format, "--checkpoint"])
            .arg(&save)
            .arg("--input")
            .arg(&input));
        let err = fails_with(&o, &["predict.txt, line 2", "not finite"]);
        assert!(!err.contains("panicked"), "{err}");
        assert!(!common::stdout(&o).contains("-340282"), "{format}");
    }
    // Task 1 says the same of the same sentence.
    fails_with(
        &run(fetch_ml()
            .args(["--task=1", "--format=jsonl", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&input)),
        &["predict.txt, line 2", "not finite"],
    );
}

// Should-fix: FETCH_ML_KERNEL naming a kernel that does not apply to --dtype.
#[test]
fn a_kernel_override_that_does_not_apply_is_reported() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let with = |kernel: &str, dtype: &str| {
        run(embed(&model)
            .args(["--dtype", dtype])
            .env("FETCH_ML_KERNEL", kernel))
    };
    // An int8 kernel under bf16, a bf16 kernel under int8, anything under f32.
    for (kernel, dtype) in [
        ("avx2", "bf16"),
        ("amxbf16", "int8"),
        ("avx2", "f32"),
        ("portable", "f32"),
    ] {
        let o = with(kernel, dtype);
        ok(&o);
        let err = stderr(&o);
        assert!(
            err.contains(&format!("FETCH_ML_KERNEL={kernel}")) && err.contains("ignored"),
            "{kernel} under {dtype}: {err}"
        );
    }
    // A name that is no kernel at all is an error whatever the dtype.
    for dtype in ["f32", "int8", "bf16"] {
        fails_with(&with("avx9000", dtype), &["FETCH_ML_KERNEL=avx9000"]);
    }
    // One that applies says nothing more than the kernel line.
    let o = with("portable", "int8");
    ok(&o);
    assert!(!stderr(&o).contains("ignored"), "{}", stderr(&o));
}

// Should-fix: a prompt that leaves no room for the sentence.
#[test]
fn a_prompt_that_leaves_no_room_for_the_sentence_is_refused() {
    let (_d, model) = tiny_model(&TinyBert::default());
    let long = "hello world ".repeat(10_000);
    let err = fails_with(
        &run(embed(&model).arg("--prompt").arg(&long)),
        &["prompt", "tokens", "64"],
    );
    assert!(
        err.contains("--prompt") || err.contains("--max-seq-length"),
        "{err}"
    );
    // A prompt leaving only 2 tokens of 16 is refused too; one leaving plenty is fine.
    fails_with(
        &run(embed(&model)
            .args(["--max-seq-length", "16", "--prompt"])
            .arg("hello ".repeat(12))),
        &["prompt", "16"],
    );
    ok(&run(embed(&model).args(["--prompt", "query: "])));
    // A named prompt of the model's own config is checked as well.
    let (_d, model) = tiny_model(&TinyBert::default());
    std::fs::write(
        model.join("config_sentence_transformers.json"),
        serde_json::json!({"prompts": {"query": long}}).to_string(),
    )
    .unwrap();
    fails_with(
        &run(embed(&model).args(["--prompt-name", "query"])),
        &["prompt", "query", "tokens"],
    );
}
