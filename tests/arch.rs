//! Every supported architecture (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, MPNet) against Hugging Face
//! transformers: tiny random models in `tests/fixtures/arch/<name>/` with reference outputs,
//! both written by `scripts/make-arch-fixtures.py`. Each runs through the fast path (f32,
//! int8 and bf16), the training path in inference mode and the binary; each trains with
//! every tensor getting a gradient, freezes exactly what `--freeze-layers 1` names, and
//! round-trips a checkpoint. An unsupported `model_type` is refused by name. A
//! sentence-transformers folder (`st-dense`: Dense module, prompts) matches
//! sentence-transformers' `encode` with prompts and `truncate_dim`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{
    build_model, embed_jsonl, fails_with, fetch_ml, max_diff, ok, param_bits, run, toy_rows,
    write_jsonl,
};
use fetch_ml::config::TrainConfig;
use fetch_ml::data::DataSource;
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::arch::Architecture;
use fetch_ml::model::batch::PackedBatch;
use fetch_ml::model::bert::{AttentionMask, Mode};
use fetch_ml::model::dropout::Dropout;
use fetch_ml::model::fast::{offsets, PackedEncoder, Workspace};
use fetch_ml::model::freeze::FreezePlan;
use fetch_ml::model::mpnet;
use fetch_ml::model::pooling::Pooling;
use fetch_ml::model::quant::Dtype;
use fetch_ml::train::checkpoint::{self, Checkpoint, CheckpointMeta};
use fetch_ml::train::evaluate::predict_probs;
use fetch_ml::train::loss::{multitask_loss, HeadTargets};
use fetch_ml::train::session::{fit, Setup};
use fetch_ml::train::trainer::TrainSettings;

/// The fixture folders, one per architecture, named by `model_type`.
const ARCHS: [&str; 5] = ["bert", "roberta", "xlm-roberta", "distilbert", "mpnet"];

/// Tolerance of f32 outputs against transformers (max abs difference).
const TOL: f32 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/arch")
        .join(name)
}

#[derive(serde::Deserialize)]
struct Reference {
    model_type: String,
    sentences: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    mean: Vec<Vec<f32>>,
    /// Per sentence, per token, the last hidden state.
    last_hidden: Vec<Vec<Vec<f32>>>,
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assets(path: &Path) -> ModelAssets {
    ModelAssets::load(&ModelRef::new(path.to_str().unwrap()), None)
        .unwrap_or_else(|e| panic!("load {}: {e:#}", path.display()))
}

/// The config names the architecture and the tokenizer gives transformers' ids.
#[test]
fn fixtures_load_as_their_architecture_and_tokenize_alike() {
    for name in ARCHS {
        let r = reference(name);
        assert_eq!(r.model_type, name);
        let a = assets(&fixture(name));
        assert_eq!(a.config.arch.name(), name);
        let enc = a.tokenizer.encode(&r.sentences).unwrap();
        for (e, want) in enc.iter().zip(&r.input_ids) {
            assert_eq!(&e.ids, want, "{name}: token ids");
        }
        // BERT and DistilBERT have 64 positions; RoBERTa, XLM-R and MPNet 66, which hold 64
        // tokens as their positions start at pad + 1 = 2.
        assert_eq!(a.tokenizer.max_len(), 64, "{name}");
        let offset = a.config.position_offset();
        let bert_like = matches!(name, "bert" | "distilbert");
        assert_eq!(offset, if bert_like { 0 } else { 2 }, "{name}");
    }
}

/// MPNet's relative position buckets agree with transformers' for every distance to 512.
#[test]
fn mpnet_buckets_match_transformers() {
    #[derive(serde::Deserialize)]
    struct Buckets {
        from: i64,
        buckets: Vec<usize>,
    }
    let text = std::fs::read_to_string(fixture("mpnet").join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let b: Buckets = serde_json::from_value(v["relative_buckets"].clone()).unwrap();
    assert_eq!(b.buckets.len(), 1025);
    for (i, &want) in b.buckets.iter().enumerate() {
        let r = b.from + i as i64;
        assert_eq!(mpnet::relative_position_bucket(r), want, "distance {r}");
    }
}

/// The fast path in f32: last hidden states and mean-pooled vectors match transformers.
#[test]
fn fast_path_matches_transformers() {
    for name in ARCHS {
        let r = reference(name);
        let a = assets(&fixture(name));
        let enc = a.tokenizer.encode(&r.sentences).unwrap();
        let items: Vec<_> = enc.iter().collect();
        let fast = a.inference_encoder(Dtype::F32, &Device::Cpu).unwrap();
        let mut ws = Workspace::default();
        let h = a.config.hidden_size;
        let offs = offsets(&items);
        let x = fast.forward_packed(&items, &mut ws).unwrap().to_vec();
        let mut worst = 0f32;
        for (s, want) in r.last_hidden.iter().enumerate() {
            let got = &x[offs[s] * h..offs[s + 1] * h];
            let want: Vec<f32> = want.iter().flatten().copied().collect();
            worst = worst.max(max_diff(got, &want));
        }
        let pooled = fast.pooled_packed(&items, Pooling::Mean, &mut ws).unwrap();
        for (got, want) in pooled.iter().zip(&r.mean) {
            worst = worst.max(max_diff(got, want));
        }
        eprintln!("{name}: fast path f32, max abs diff {worst:.2e}");
        assert!(worst < TOL, "{name}: max abs diff {worst}");
    }
}

/// The training path's blocks in inference mode, padded and packed, match transformers.
#[test]
fn training_path_in_inference_mode_matches_transformers() {
    for name in ARCHS {
        let r = reference(name);
        let a = assets(&fixture(name));
        let enc = a.tokenizer.encode(&r.sentences).unwrap();
        let items: Vec<_> = enc.iter().collect();
        let encoder = a.frozen_encoder(&Device::Cpu).unwrap();
        // Padded batch.
        let batch = a.tokenizer.batch(&items, &Device::Cpu).unwrap();
        let hidden = encoder
            .forward(
                &batch.input_ids,
                &batch.token_type_ids,
                &batch.attention_mask,
                Mode::Infer,
            )
            .unwrap();
        let pooled = Pooling::Mean
            .forward(&hidden, &batch.attention_mask)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let hidden = hidden.to_vec3::<f32>().unwrap();
        let mut worst = 0f32;
        for (s, want) in r.last_hidden.iter().enumerate() {
            for (t, row) in want.iter().enumerate() {
                worst = worst.max(max_diff(&hidden[s][t], row));
            }
            worst = worst.max(max_diff(&pooled[s], &r.mean[s]));
        }
        // Packed batch, as the training loop runs it.
        let packed = PackedBatch::new(&items);
        let x = encoder
            .embeddings
            .forward_packed(&packed, Mode::Infer)
            .unwrap();
        let x = encoder
            .forward_layers(
                &x,
                &AttentionMask::packed(&packed),
                0..encoder.layers.len(),
                Mode::Infer,
            )
            .unwrap();
        let mean = packed
            .mean_matrix(&Device::Cpu)
            .unwrap()
            .matmul(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (got, want) in mean.iter().zip(&r.mean) {
            worst = worst.max(max_diff(got, want));
        }
        eprintln!("{name}: training path (inference mode), max abs diff {worst:.2e}");
        assert!(worst < TOL, "{name}: max abs diff {worst}");
    }
}

/// int8 and bf16 dense layers (FastEncoder) stay close to transformers' float32 vectors.
#[test]
fn quantized_fast_path_is_close_to_transformers() {
    for name in ARCHS {
        let r = reference(name);
        let a = assets(&fixture(name));
        let enc = a.tokenizer.encode(&r.sentences).unwrap();
        let items: Vec<_> = enc.iter().collect();
        for dtype in [Dtype::Int8, Dtype::Bf16] {
            let fast = a.inference_encoder(dtype, &Device::Cpu).unwrap();
            let mut ws = Workspace::default();
            let pooled = fast.pooled_packed(&items, Pooling::Mean, &mut ws).unwrap();
            let mut worst = 1f64;
            for (got, want) in pooled.iter().zip(&r.mean) {
                worst = worst.min(common::compare(got, want).0);
            }
            eprintln!(
                "{name}: {dtype} ({}), worst cosine {worst:.6}",
                fast.kernel_name()
            );
            assert!(worst > 0.99, "{name} {dtype}: cosine {worst}");
        }
    }
}

/// Copies a fixture into `dir`, its tensors renamed by `rename`.
fn renamed_copy(name: &str, dir: &Path, rename: impl Fn(&str) -> String) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture(name).join(f), out.join(f)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let renamed: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (rename(&k), v)).collect();
    candle_core::safetensors::save(&renamed, out.join("model.safetensors")).unwrap();
    out
}

/// Files of task models keep the architecture's prefix (`roberta.embeddings...`): they load
/// and give the same vectors.
#[test]
fn prefixed_tensor_names_load() {
    let dir = tempfile::tempdir().unwrap();
    for name in ARCHS {
        let prefix = match name {
            "bert" => "bert.",
            "roberta" | "xlm-roberta" => "roberta.",
            "mpnet" => "mpnet.",
            _ => "distilbert.",
        };
        let path = renamed_copy(name, dir.path(), |k| format!("{prefix}{k}"));
        let r = reference(name);
        let a = assets(&path);
        let enc = a.tokenizer.encode(&r.sentences).unwrap();
        let items: Vec<_> = enc.iter().collect();
        let fast = a.inference_encoder(Dtype::F32, &Device::Cpu).unwrap();
        let pooled = fast
            .pooled_packed(&items, Pooling::Mean, &mut Workspace::default())
            .unwrap();
        for (got, want) in pooled.iter().zip(&r.mean) {
            assert!(max_diff(got, want) < TOL, "{name} with prefix {prefix}");
        }
        // A file of one architecture under another's prefix is not silently accepted.
        let wrong = renamed_copy(name, &dir.path().join("wrong"), |k| format!("electra.{k}"));
        let e = ModelAssets::load(&ModelRef::new(wrong.to_str().unwrap()), None)
            .and_then(|a| a.inference_encoder(Dtype::F32, &Device::Cpu).map(|_| ()))
            .unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{name}: {e:#}");
    }
}

/// `--task=1` through the binary gives transformers' vectors for every architecture.
#[test]
fn binary_embeds_every_architecture() {
    for name in ARCHS {
        let r = reference(name);
        let mut cmd = fetch_ml();
        cmd.args(["--task=1", "--format=jsonl", "--model"])
            .arg(fixture(name));
        for s in &r.sentences {
            cmd.args(["-s", s]);
        }
        let out = ok(&run(&mut cmd));
        let rows: Vec<serde_json::Value> = out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v.get("embedding").is_some())
            .collect();
        assert_eq!(rows.len(), r.sentences.len(), "{name}: {out}");
        for (row, want) in rows.iter().zip(&r.mean) {
            let got: Vec<f32> = serde_json::from_value(row["embedding"].clone()).unwrap();
            assert!(max_diff(&got, want) < TOL, "{name}: {row}");
        }
    }
}

/// RoBERTa's position offset shortens the usable length: 66 positions with pad id 1 hold 64
/// tokens; asking for more is refused, and a sentence truncated to 64 tokens runs.
#[test]
fn roberta_max_length_respects_the_position_offset() {
    let path = fixture("roberta");
    let e = ModelAssets::load(&ModelRef::new(path.to_str().unwrap()), Some(65))
        .err()
        .expect("65 tokens do not fit")
        .to_string();
    assert!(
        e.contains("length of 65") && e.contains("64") && !e.contains("--"),
        "{e}"
    );
    let a = assets(&path);
    let long = "the quick brown fox jumps over the lazy dog ".repeat(20);
    let enc = a.tokenizer.encode(&[long]).unwrap();
    assert!(enc[0].truncated && enc[0].ids.len() == 64);
    let fast = a.inference_encoder(Dtype::F32, &Device::Cpu).unwrap();
    let items: Vec<_> = enc.iter().collect();
    fast.pooled_packed(&items, Pooling::Mean, &mut Workspace::default())
        .unwrap();
    let out = fails_with(
        &run(fetch_ml()
            .args(["--task=1", "--max-seq-length", "65", "-s", "hi", "--model"])
            .arg(&path)),
        &["65", "64"],
    );
    assert!(!out.contains("panicked"), "{out}");
}

/// An unsupported `model_type` is refused through the binary with its name and the list.
#[test]
fn unsupported_model_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = renamed_copy("bert", dir.path(), |k| k.to_string());
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
    config["model_type"] = "t5".into();
    config["architectures"] = serde_json::json!(["T5EncoderModel"]);
    std::fs::write(path.join("config.json"), config.to_string()).unwrap();
    let err = fails_with(
        &run(fetch_ml()
            .args(["--task=1", "-s", "hi", "--model"])
            .arg(&path)),
        &["\"t5\"", &Architecture::supported()],
    );
    assert!(!err.contains("panicked"), "{err}");
    // Without a model_type, the class in `architectures` decides.
    config.as_object_mut().unwrap().remove("model_type");
    std::fs::write(path.join("config.json"), config.to_string()).unwrap();
    fails_with(
        &run(fetch_ml()
            .args(["--task=1", "-s", "hi", "--model"])
            .arg(&path)),
        &["T5EncoderModel", "distilbert"],
    );
    // With neither, an old config is BERT.
    config.as_object_mut().unwrap().remove("architectures");
    std::fs::write(path.join("config.json"), config.to_string()).unwrap();
    ok(&run(fetch_ml()
        .args(["--task=1", "-s", "hi", "--model"])
        .arg(&path)));
}

fn train_config(model: &Path, dir: &Path, freeze_layers: Option<usize>) -> TrainConfig {
    let train = dir.join("train.jsonl");
    let eval = dir.join("eval.jsonl");
    write_jsonl(&train, &toy_rows(24, 1));
    write_jsonl(&eval, &toy_rows(8, 2));
    TrainConfig {
        model: ModelRef::new(model.to_str().unwrap()),
        model_given: true,
        max_seq_length: None,
        train_file: DataSource::File(train),
        eval_file: Some(DataSource::File(eval)),
        settings: TrainSettings {
            epochs: 2,
            batch_size: 8,
            lr: 1e-3,
            head_lr: 1e-2,
            ..TrainSettings::default()
        },
        head_hidden: 16,
        head_dropout: 0.1,
        freeze: vec![],
        freeze_layers,
        max_train_examples: None,
        embedding_cache: None,
        dtype: Default::default(),
    }
}

/// Whether `--freeze-layers 1` should leave `name` trainable, written out by name: MPNet's
/// relative position bias freezes with the embeddings (layer 0 reads it).
fn trains_with_one_frozen_layer(name: &str) -> bool {
    !(name.starts_with("embeddings.")
        || name.starts_with("encoder.layer.0.")
        || name == "encoder.relative_attention_bias.weight")
}

/// On every architecture: with nothing frozen, every trainable tensor gets a non-zero
/// gradient; with `--freeze-layers 1`, exactly the embeddings and layer 0 are frozen, stay
/// bit-identical through training while the rest changes, and a checkpoint predicts as the
/// model did.
#[test]
fn every_architecture_trains_freezes_and_checkpoints() {
    for name in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        for freeze_layers in [None, Some(1)] {
            let cfg = train_config(&fixture(name), dir.path(), freeze_layers);
            let setup = Setup::load(&cfg).unwrap();
            let layers = setup.assets.config.num_hidden_layers;
            let plan = FreezePlan::new(&[], freeze_layers, layers).unwrap();
            let model = build_model(&setup, &cfg, plan);
            let params = model.registry.params();
            // Embeddings: word, position, LayerNorm (2), token types except DistilBERT and
            // MPNet; MPNet's relative position bias instead.
            let embeddings = if name == "distilbert" { 4 } else { 5 };
            assert_eq!(params.len(), embeddings + 16 * layers + 8, "{name}");
            let bias = params
                .iter()
                .any(|p| p.name == "encoder.relative_attention_bias.weight");
            assert_eq!(bias, name == "mpnet", "{name}");
            for p in &params {
                let want = freeze_layers.is_none() || trains_with_one_frozen_layer(&p.name);
                assert_eq!(p.trainable(), want, "{name} {freeze_layers:?}: {}", p.name);
            }

            let data = &setup.train.prepared;
            let items: Vec<_> = data.encoded[..8].iter().collect();
            let batch = PackedBatch::new(&items);
            let dropout = Dropout::new(3);
            let logits = model.forward_packed(&batch, Some(&dropout)).unwrap();
            let targets = [0, 1].map(|t| {
                let l: Vec<Option<u32>> = data.labels[..8].iter().map(|l| l[t]).collect();
                HeadTargets::new(&l, &Device::Cpu).unwrap()
            });
            let (loss, _) = multitask_loss(&logits, &targets, [1.0, 1.0]).unwrap();
            let grads = loss.backward().unwrap();
            for p in params.iter().filter(|p| p.trainable()) {
                let g = grads
                    .get(p.var.as_ref().unwrap().as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name));
                let norm = g.sqr().unwrap().sum_all().unwrap();
                let norm = norm.to_scalar::<f32>().unwrap();
                assert!(norm > 0.0, "{name}: zero gradient for {}", p.name);
            }

            let before: HashMap<_, _> = param_bits(&model).into_iter().collect();
            let result = fit(&model, &setup, &cfg.settings, &mut |_| {}).unwrap();
            let after: HashMap<_, _> = param_bits(&model).into_iter().collect();
            for (p, b) in &before {
                let changed = &after[p] != b;
                let want = freeze_layers.is_none() || trains_with_one_frozen_layer(p);
                assert_eq!(
                    changed, want,
                    "{name} {freeze_layers:?}: {p} changed={changed}"
                );
            }
            assert!(result.freeze_check.frozen_unchanged && result.freeze_check.trainable_changed);

            if freeze_layers.is_some() {
                let texts = ["i love my phone", "terrible pizza", "zyx"];
                let enc = setup.assets.tokenizer.encode(&texts).unwrap();
                let want = predict_probs(&model, &enc, 2, None).unwrap();
                let ck_dir = dir.path().join("ckpt");
                let meta = CheckpointMeta::new(
                    checkpoint::base_model(&setup.assets).unwrap(),
                    &model,
                    serde_json::json!({}),
                    serde_json::to_value(&result.eval).unwrap(),
                );
                let target = fetch_ml::train::save_target::SaveTarget::prepare(&ck_dir).unwrap();
                checkpoint::save(&target, &model, &meta).unwrap();
                drop(target);
                let ck = Checkpoint::load(&ck_dir).unwrap();
                let trained = &ck.meta.trained_encoder_tensors;
                assert!(
                    trained.iter().all(|n| trains_with_one_frozen_layer(n)
                        && n.starts_with("encoder.layer.")),
                    "{name}: {trained:?}"
                );
                assert_eq!(trained.len(), 16 * (layers - 1), "{name}");
                let loaded = ck.model(&setup.assets, &Device::Cpu).unwrap();
                let got = predict_probs(&loaded, &enc, 2, None).unwrap();
                assert_eq!(want, got, "{name}: checkpoint predictions");
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct StReference {
    sentences: Vec<String>,
    query_input_ids: Vec<Vec<u32>>,
    plain: Vec<Vec<f32>>,
    query: Vec<Vec<f32>>,
    search_prompt: Vec<Vec<f32>>,
    truncate_8: Vec<Vec<f32>>,
}

fn assert_vectors(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| max_diff(g, w))
        .fold(0.0, f32::max);
    eprintln!("st-dense {what}: max abs diff {worst:.2e}");
    assert!(worst < TOL, "{what}: max abs diff {worst}");
}

/// A sentence-transformers folder with a Dense module and prompts: fetch-ml gives
/// sentence-transformers' own vectors plain, with a named prompt, with a prompt text, with
/// truncated dimensions and with the folder's default prompt.
#[test]
fn sentence_transformers_dense_prompts_and_truncate_dim() {
    let path = fixture("st-dense");
    let r: StReference =
        serde_json::from_str(&std::fs::read_to_string(path.join("reference.json")).unwrap())
            .unwrap();
    let a = assets(&path);
    assert_eq!(a.pipeline.dense.len(), 1);
    assert_eq!(a.pipeline.dimension(a.config.hidden_size), 16);
    assert!(a.pipeline.normalize);
    let prompted: Vec<String> = r.sentences.iter().map(|s| format!("query: {s}")).collect();
    let enc = a.tokenizer.encode(&prompted).unwrap();
    for (e, want) in enc.iter().zip(&r.query_input_ids) {
        assert_eq!(&e.ids, want, "token ids with the prompt");
    }

    assert_vectors("plain", &embed_jsonl(&path, &r.sentences, &[]), &r.plain);
    assert_vectors(
        "--prompt-name query",
        &embed_jsonl(&path, &r.sentences, &["--prompt-name", "query"]),
        &r.query,
    );
    assert_vectors(
        "--prompt",
        &embed_jsonl(&path, &r.sentences, &["--prompt", "search: "]),
        &r.search_prompt,
    );
    let truncated = embed_jsonl(&path, &r.sentences, &["--truncate-dim", "8"]);
    assert!(truncated.iter().all(|v| v.len() == 8));
    assert_vectors("--truncate-dim 8", &truncated, &r.truncate_8);

    // The folder's default prompt applies when no flag is given.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("st");
    copy_tree(&path, &copy);
    let st_config = copy.join("config_sentence_transformers.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&st_config).unwrap()).unwrap();
    c["default_prompt_name"] = "query".into();
    std::fs::write(&st_config, c.to_string()).unwrap();
    assert_vectors(
        "default_prompt_name query",
        &embed_jsonl(&copy, &r.sentences, &[]),
        &r.query,
    );

    // Errors name the fix.
    let hi = ["-s", "hi", "--model"];
    fails_with(
        &run(fetch_ml()
            .args(["--task=1", "--truncate-dim", "17"])
            .args(hi)
            .arg(&path)),
        &["--truncate-dim 17", "16 dimensions"],
    );
    fails_with(
        &run(fetch_ml()
            .args(["--task=1", "--prompt-name", "nope"])
            .args(hi)
            .arg(&path)),
        &["nope", "passage", "query"],
    );
    fails_with(
        &run(fetch_ml()
            .args(["--task=2", "--prompt", "x: "])
            .args(hi)
            .arg(&path)),
        &["--prompt", "--task=2"],
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The tensor names of a safetensors file, sorted.
fn tensor_names(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    names.sort();
    names
}

/// `--task=2 --export` on every architecture writes the encoder under the architecture's own
/// tensor names (the base file's, so transformers loads the folder), and the export embeds.
#[test]
fn every_architecture_exports_under_its_own_names() {
    for name in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        let exp = dir.path().join("export");
        let o = run(fetch_ml()
            .args([
                "--task=2",
                "--threads=2",
                "--epochs=1",
                "--max-train-examples=16",
                "--batch-size=8",
                "--model",
            ])
            .arg(fixture(name))
            .arg("--save")
            .arg(dir.path().join("ck"))
            .arg("--export")
            .arg(&exp)
            .args(["--format=jsonl", "-s", "hi"]));
        ok(&o);
        assert_eq!(
            tensor_names(&exp.join("model.safetensors")),
            tensor_names(&fixture(name).join("model.safetensors")),
            "{name}"
        );
        let out = ok(&run(fetch_ml()
            .args(["--task=1", "--format=jsonl", "-s", "hello world", "--model"])
            .arg(&exp)));
        assert!(out.contains("\"embedding\""), "{name}: {out}");
    }
}
