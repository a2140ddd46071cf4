//! Quantized inference (int8, bf16): batch invariance, the float32 path left bit-identical,
//! and quality against float32 on all-MiniLM-L6-v2 and all-mpnet-base-v2.

mod common;

use candle_core::Device;
use common::{cosine, minilm, mpnet, tiny_model};
use fetch_ml::embed::Embedder;
use fetch_ml::hub::ModelRef;
use fetch_ml::loader::ModelAssets;
use fetch_ml::model::fast::{FastEncoder, PackedEncoder, Workspace};
use fetch_ml::model::quant::{Bf16Kernel, Dtype, Int8Kernel};
use fetch_ml::testutil::{random_sentence, TinyBert};
use rand::SeedableRng;

fn assets(path: &std::path::Path) -> ModelAssets {
    ModelAssets::load(&ModelRef::new(path.to_str().unwrap()), None).expect("load model")
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every (dtype, kernel) pair this CPU can run, int8 and bf16.
fn quantized_encoders(a: &ModelAssets) -> Vec<(String, FastEncoder)> {
    let mut out = Vec::new();
    for k in Int8Kernel::all() {
        if !k.supported() {
            eprintln!("SKIPPED: int8 kernel {} (this CPU lacks it)", k.name());
            continue;
        }
        let enc = a.frozen_encoder(&Device::Cpu).unwrap();
        let fast = FastEncoder::with_kernels(enc, Dtype::Int8, k, Bf16Kernel::portable()).unwrap();
        out.push((format!("int8/{}", k.name()), fast));
    }
    for k in Bf16Kernel::all() {
        if !k.supported() {
            eprintln!("SKIPPED: bf16 kernel {} (this CPU lacks it)", k.name());
            continue;
        }
        let enc = a.frozen_encoder(&Device::Cpu).unwrap();
        let fast = FastEncoder::with_kernels(enc, Dtype::Bf16, Int8Kernel::portable(), k).unwrap();
        out.push((format!("bf16/{}", k.name()), fast));
    }
    out
}

/// A sentence embedded alone, and inside batches with much longer and much shorter sentences
/// (in different positions and batch sizes), gives bit-identical int8 and bf16 vectors.
#[test]
fn quantized_vectors_are_batch_invariant() {
    let (_dir, tiny) = tiny_model(&TinyBert::default());
    let mut paths = vec![tiny.clone()];
    if let Some(p) = minilm() {
        paths.push(p);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for path in paths {
        let a = assets(&path);
        let short = "the cat sat on the mat";
        let long = "the team won the game and we love our phone app very much ".repeat(6);
        let tiny_words = [random_sentence(&mut rng, 1), random_sentence(&mut rng, 2)];
        for (name, fast) in quantized_encoders(&a) {
            let e = Embedder::new(
                &fast,
                &a.tokenizer,
                a.pipeline.pooling,
                a.pipeline.normalize,
                64,
            );
            let alone = e.embed(&[short]).unwrap();
            let batches: Vec<Vec<&str>> = vec![
                vec![long.as_str(), short, long.as_str()],
                vec![tiny_words[0].as_str(), short, tiny_words[1].as_str(), "ok"],
                vec![
                    short,
                    long.as_str(),
                    "a",
                    tiny_words[1].as_str(),
                    long.as_str(),
                ],
                [vec![long.as_str(); 6], vec![short], vec!["hi"; 6]].concat(),
            ];
            for batch in &batches {
                let got = e.embed(batch).unwrap();
                let i = batch.iter().position(|s| *s == short).unwrap();
                assert_eq!(
                    bits(&got[i].vector),
                    bits(&alone[0].vector),
                    "{name} on {}: the sentence's vector changed with its batch (size {})",
                    path.display(),
                    batch.len()
                );
                // The other sentences too: the long one alone equals the long one in a batch.
                if let Some(j) = batch.iter().position(|s| *s == long.as_str()) {
                    let long_alone = e.embed(&[long.as_str()]).unwrap();
                    assert_eq!(
                        bits(&got[j].vector),
                        bits(&long_alone[0].vector),
                        "{name}: long"
                    );
                }
            }
            eprintln!("{name} on {}: bit-identical across batches", path.display());
        }
    }
}

/// On the real models, a sentence's vector in every dtype (f32 included) has the same bits
/// alone and inside packed batches of 2 to 150 real sentences, at different positions (so its
/// rows fall in different places of each product, and of the FFN's row chunks).
#[test]
fn every_dtype_is_batch_invariant_on_real_models() {
    let paths: Vec<_> = [minilm(), mpnet()].into_iter().flatten().collect();
    let texts = real_sentences();
    for path in paths {
        let a = assets(&path);
        let target = "The quick brown fox jumps over the lazy dog near the river bank.";
        let mut all = vec![target.to_string()];
        all.extend(texts.iter().step_by(7).take(150).cloned());
        let enc = a.tokenizer.encode(&all).unwrap();
        let fill = a.tokenizer.encode(&["a", "a b"]).unwrap();
        let model = path.file_name().unwrap().to_string_lossy().into_owned();
        for dtype in [Dtype::F32, Dtype::Int8, Dtype::Bf16] {
            let fast = FastEncoder::new(a.frozen_encoder(&Device::Cpu).unwrap(), dtype).unwrap();
            let mut ws = Workspace::default();
            let pooling = a.pipeline.pooling;
            let alone = fast.pooled_packed(&[&enc[0]], pooling, &mut ws).unwrap();
            let mut checked = 0;
            for size in [2, 3, 5, 8, 17, 33, 64, 100, 151] {
                for pos in [0, size / 2, size - 1] {
                    let mut items: Vec<_> = enc[1..size].iter().collect();
                    items.insert(pos, &enc[0]);
                    let got = fast.pooled_packed(&items, pooling, &mut ws).unwrap();
                    let (d, worst) = max_diff(&got[pos], &alone[0]);
                    assert!(
                        d == 0.0,
                        "{model} {dtype}: the sentence at {pos} of {size} differs from alone by \
                         {d:e} (component {worst})"
                    );
                    checked += 1;
                }
            }
            // The sentence last in a batch of 513 tokens: its last token alone in the float32
            // FFN's second chunk of rows (512 a chunk).
            let (got, pos) = last_of_513(&enc, &fill, |items| {
                fast.pooled_packed(items, pooling, &mut ws).unwrap()
            });
            let (d, worst) = max_diff(&got[pos], &alone[0]);
            assert!(
                d == 0.0,
                "{model} {dtype}: last of 513 tokens: {d:e} at {worst}"
            );
            eprintln!("{model} {dtype}: bit-identical in {} batches", checked + 1);
        }
    }
}

/// Runs `f` on a batch of exactly 513 tokens that ends with `enc[0]`: some of `enc[1..]`, then
/// one- and two-word fillers (`fill`: 3 and 4 tokens). Returns the vectors and `enc[0]`'s place.
fn last_of_513<'e>(
    enc: &'e [fetch_ml::tokenize::Encoded],
    fill: &'e [fetch_ml::tokenize::Encoded],
    f: impl FnOnce(&[&'e fetch_ml::tokenize::Encoded]) -> Vec<Vec<f32>>,
) -> (Vec<Vec<f32>>, usize) {
    assert_eq!((fill[0].ids.len(), fill[1].ids.len()), (3, 4));
    let mut items = Vec::new();
    let mut left = 513 - enc[0].ids.len();
    for e in &enc[1..] {
        if e.ids.len() + 12 <= left.saturating_sub(100) {
            left -= e.ids.len();
            items.push(e);
        }
    }
    // Any count from 6 up is a sum of 3s and 4s.
    while !left.is_multiple_of(3) {
        items.push(&fill[1]);
        left -= 4;
    }
    items.extend(std::iter::repeat_n(&fill[0], left / 3));
    items.push(&enc[0]);
    assert_eq!(items.iter().map(|e| e.ids.len()).sum::<usize>(), 513);
    let pos = items.len() - 1;
    (f(&items), pos)
}

/// The largest absolute difference of two vectors and where it is.
fn max_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.to_bits() == y.to_bits() {
                0.0
            } else {
                (x - y).abs().max(f32::MIN_POSITIVE)
            }
        })
        .enumerate()
        .fold((0f32, 0), |b, (i, d)| if d > b.0 { (d, i) } else { b })
}

/// `FastEncoder` in f32 is the existing float32 fast path, bit for bit.
#[test]
fn f32_fast_encoder_is_the_float32_path() {
    let (_dir, path) = tiny_model(&TinyBert::default());
    let a = assets(&path);
    let enc = a.frozen_encoder(&Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let texts: Vec<String> = [1, 30, 7, 0, 12]
        .iter()
        .map(|&n| random_sentence(&mut rng, n))
        .collect();
    let encoded = a.tokenizer.encode(&texts).unwrap();
    let items: Vec<_> = encoded.iter().collect();
    let mut ws = Workspace::default();
    let want = enc.forward_packed(&items, &mut ws).unwrap().to_vec();
    let fast = FastEncoder::new(enc, Dtype::F32).unwrap();
    assert_eq!(fast.kernel_name(), "gemm-f32");
    let mut ws2 = Workspace::default();
    let got = fast.forward_packed(&items, &mut ws2).unwrap();
    assert_eq!(bits(got), bits(&want));
}

/// The quantized encoders stay close to float32 on a tiny random model, token by token.
#[test]
fn quantized_tiny_model_is_close_to_f32() {
    let (_dir, path) = tiny_model(&TinyBert::default());
    let a = assets(&path);
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let texts: Vec<String> = [3, 40, 9, 1, 17]
        .iter()
        .map(|&n| random_sentence(&mut rng, n))
        .collect();
    let encoded = a.tokenizer.encode(&texts).unwrap();
    let items: Vec<_> = encoded.iter().collect();
    let enc = a.frozen_encoder(&Device::Cpu).unwrap();
    let want = enc
        .forward_packed(&items, &mut Workspace::default())
        .unwrap()
        .to_vec();
    let h = a.config.hidden_size;
    for (name, fast) in quantized_encoders(&a) {
        let mut ws = Workspace::default();
        let got = fast.forward_packed(&items, &mut ws).unwrap();
        let worst = got
            .chunks(h)
            .zip(want.chunks(h))
            .map(|(g, w)| cosine(g, w))
            .fold(1f64, f64::min);
        eprintln!("{name}: worst token cosine vs f32 {worst:.6}");
        assert!(worst > 0.99, "{name}: worst token cosine {worst}");
    }
}

#[derive(serde::Deserialize)]
struct Golden {
    items: Vec<GoldenItem>,
}

#[derive(serde::Deserialize)]
struct GoldenItem {
    text: String,
}

/// The real sentences of the repository: the golden set, data/sentences.txt, the multitask
/// texts, and each pair of consecutive multitask texts as a two-sentence passage.
fn real_sentences() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let golden: Golden =
        serde_json::from_str(include_str!("minilm-golden.json")).expect("golden file");
    let mut out: Vec<String> = golden.items.into_iter().map(|i| i.text).collect();
    let plain = std::fs::read_to_string(root.join("data/sentences.txt")).unwrap();
    out.extend(
        plain
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from),
    );
    let mut multitask = Vec::new();
    for f in ["data/multitask/train.jsonl", "data/multitask/eval.jsonl"] {
        for line in std::fs::read_to_string(root.join(f)).unwrap().lines() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            multitask.push(v["text"].as_str().unwrap().to_string());
        }
    }
    let passages: Vec<String> = multitask
        .windows(2)
        .step_by(1)
        .map(|w| format!("{} {}", w[0], w[1]))
        .collect();
    out.extend(multitask);
    out.extend(passages);
    out
}

/// Index of each vector's nearest neighbour among the others, by cosine.
fn nearest(vs: &[Vec<f32>]) -> Vec<usize> {
    use rayon::prelude::*;
    let unit: Vec<Vec<f32>> = vs
        .iter()
        .map(|v| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter().map(|x| x / n).collect()
        })
        .collect();
    (0..unit.len())
        .into_par_iter()
        .map(|i| {
            let mut best = (f32::MIN, 0);
            for (j, u) in unit.iter().enumerate() {
                if j != i {
                    let c: f32 = unit[i].iter().zip(u).map(|(a, b)| a * b).sum();
                    if c > best.0 {
                        best = (c, j);
                    }
                }
            }
            best.1
        })
        .collect()
}

/// A sentence from the STS benchmark on which all-mpnet-base-v2's int8 vector once had cosine
/// 0.9435 against float32: the weights of the FFN's second product in layers 4 and 5 hold a
/// few very large values per output channel of the model's outlier dimensions, so those
/// channels' other weights were rounded coarsely, and the error pushed the token "kill" over
/// to the outlier tokens' pattern by layer 8.
const MPNET_HARD: &str = "Afghan police kill 5 Taliban fighters";

/// int8: min cosine >= 0.99, mean >= 0.998, nearest-neighbour agreement >= 97%; bf16: min
/// cosine >= `bf16_min`; on the golden sentences and the repository's real sentences (2,277
/// texts) plus [`MPNET_HARD`].
fn quality_vs_f32(path: &std::path::Path, bf16_min: f64) {
    let a = assets(path);
    let mut texts = real_sentences();
    texts.push(MPNET_HARD.to_string());
    let enc = a.frozen_encoder(&Device::Cpu).unwrap();
    let e = Embedder::new(
        &enc,
        &a.tokenizer,
        a.pipeline.pooling,
        a.pipeline.normalize,
        32,
    );
    let want: Vec<Vec<f32>> = e
        .embed(&texts)
        .unwrap()
        .into_iter()
        .map(|e| e.vector)
        .collect();
    let want_nn = nearest(&want);
    let model = path.file_name().unwrap().to_string_lossy();
    for dtype in [Dtype::Int8, Dtype::Bf16] {
        let fast = FastEncoder::new(a.frozen_encoder(&Device::Cpu).unwrap(), dtype).unwrap();
        let q = Embedder::new(
            &fast,
            &a.tokenizer,
            a.pipeline.pooling,
            a.pipeline.normalize,
            32,
        );
        let got: Vec<Vec<f32>> = q
            .embed(&texts)
            .unwrap()
            .into_iter()
            .map(|e| e.vector)
            .collect();
        let cos: Vec<f64> = got.iter().zip(&want).map(|(g, w)| cosine(g, w)).collect();
        let (worst, min) = cos
            .iter()
            .enumerate()
            .fold((0, 1f64), |b, (i, &c)| if c < b.1 { (i, c) } else { b });
        let mean = cos.iter().sum::<f64>() / cos.len() as f64;
        let nn = nearest(&got);
        let agree =
            nn.iter().zip(&want_nn).filter(|(a, b)| a == b).count() as f64 / nn.len() as f64;
        eprintln!(
            "{model} {dtype} ({}) on {} sentences: cosine vs f32 min {min:.6} ({:?}) mean \
             {mean:.6}; nearest neighbour agreement {:.2}%",
            fast.kernel_name(),
            texts.len(),
            texts[worst],
            agree * 100.0
        );
        match dtype {
            Dtype::Int8 => {
                assert!(
                    min >= 0.99,
                    "{model} int8 min cosine {min} on {:?}",
                    texts[worst]
                );
                assert!(mean >= 0.998, "{model} int8 mean cosine {mean}");
                assert!(
                    agree >= 0.97,
                    "{model} int8 nearest-neighbour agreement {agree}"
                );
            }
            _ => assert!(min >= bf16_min, "{model} bf16 min cosine {min}"),
        }
    }
}

#[test]
fn quantized_minilm_quality_vs_f32() {
    let Some(path) = minilm() else { return };
    quality_vs_f32(&path, 0.999);
}

#[test]
fn quantized_mpnet_quality_vs_f32() {
    let Some(path) = mpnet() else { return };
    // bf16 is off by 0.0043 on one sentence ("Lost half my savings on that crypto token.
    // ..."): this model has inputs on which a small rounding error moves a token towards the
    // outlier tokens' pattern (README.md, "Precision").
    quality_vs_f32(&path, 0.995);
}

/// `--dtype` as a user meets it: task 1 names the kernel and reports the dtype; a frozen
/// encoder in task 2 uses it (with its own embedding-cache entries); a trainable encoder
/// refuses it with the reason.
#[test]
fn dtype_flag_through_the_binary() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    fetch_ml::testutil::TinyBert::default()
        .write(&model)
        .unwrap();
    let bin = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fetch-ml"));
        c.env("HF_ENDPOINT", "http://127.0.0.1:9")
            .stdin(Stdio::null());
        c
    };
    let o = bin()
        .args([
            "--task=1",
            "--format=json",
            "--dtype",
            "int8",
            "-s",
            "hello world",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("int8") && err.contains("kernel"), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["dtype"], "int8");
    assert_eq!(
        doc["embeddings"][0]["embedding"].as_array().unwrap().len(),
        32
    );

    let rows: String = (0..16)
        .map(|i| {
            format!(
                "{{\"text\": \"the {} was {}\", \"class\": \"{}\", \"sentiment\": \"{}\"}}\n",
                ["pizza", "phone"][i % 2],
                ["good", "bad"][(i / 2) % 2],
                ["food", "tech"][i % 2],
                ["positive", "negative"][(i / 2) % 2]
            )
        })
        .collect();
    let train = dir.path().join("t.jsonl");
    std::fs::write(&train, rows).unwrap();
    let cache = dir.path().join("cache");
    let task2 = |dtype: &str, freeze: bool| {
        let mut c = bin();
        c.args([
            "--task=2", "--epochs", "1", "-s", "hi", "--dtype", dtype, "--model",
        ])
        .arg(&model)
        .arg("--train-file")
        .arg(&train)
        .arg("--save")
        .arg(dir.path().join(format!("ck-{dtype}")))
        .arg("--embedding-cache")
        .arg(&cache);
        if freeze {
            c.args(["--freeze", "encoder"]);
        }
        c.output().unwrap()
    };
    let o = task2("int8", false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--freeze encoder") && err.contains("f32"),
        "{err}"
    );
    for dtype in ["int8", "f32"] {
        let o = task2(dtype, true);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let entries = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(entries, 2, "one cache file per dtype");
}
