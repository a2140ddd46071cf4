//! `--task=2`: train the multitask model, evaluate it, save a checkpoint, predict; or predict
//! with a saved checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;
use serde_json::json;

use super::report::{epoch_line, head_table};
use crate::config::{Format, MultitaskConfig, TrainConfig};
use crate::data::Dataset;
use crate::export::Provenance;
use crate::hub::ModelRef;
use crate::input::SentenceReader;
use crate::loader::ModelAssets;
use crate::model::freeze::FreezePlan;
use crate::model::multitask::{HeadInit, MultiTaskModel};
use crate::output::Output;
use crate::tokenize::name_sentence;
use crate::train::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::train::evaluate::{evaluate, predict_probs};
use crate::train::metrics::HeadMetrics;
use crate::train::save_target::SaveTarget;
use crate::train::session::{fit, RunResult, Setup};
use crate::train::trainer::Prepared;

/// One head's answer for one sentence.
#[derive(Debug, Clone, Serialize)]
pub struct LabelProb {
    pub label: String,
    pub probability: f32,
}

/// Both heads' answers for one sentence.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub text: String,
    pub class: LabelProb,
    pub sentiment: LabelProb,
}

pub fn run(cfg: &MultitaskConfig) -> Result<()> {
    if let Some(p) = &cfg.output {
        crate::output::check_target("--output", p, None)?;
    }
    if let Some(dir) = &cfg.checkpoint {
        return run_checkpoint(cfg, dir);
    }
    let t = &cfg.train;
    let target = check_targets(cfg)?;
    let setup = Setup::load(t)?;
    check_inputs(cfg, &setup.assets)?;
    let dev = Device::Cpu;
    let layers = setup.assets.config.num_hidden_layers;
    let plan = FreezePlan::new(&t.freeze, t.freeze_layers, layers)?;
    let model = setup
        .assets
        .multitask(
            vec![setup.assets.weights.clone()],
            setup.heads_spec(t),
            plan,
            HeadInit::Seed(t.settings.seed),
            &dev,
        )?
        .with_dtype(t.dtype)?;
    let counts = crate::train::verify::ParamCounts::of(&model);
    crate::note!(
        "model {} ({} layers, hidden {}); training on {} ({} rows); frozen: {}",
        t.model.id,
        layers,
        setup.assets.config.hidden_size,
        setup.train.name,
        setup.train.prepared.encoded.len(),
        plan.describe(layers)
    );
    crate::notes::write(&counts.table());
    if plan.all_frozen(layers) {
        crate::note!("nothing to train (--freeze all): skipping the optimizer; evaluating the untrained heads");
    }
    let epochs = t.settings.epochs;
    let result = fit(&model, &setup, &t.settings, &mut |e| {
        crate::note!("{}", epoch_line(e, epochs))
    })?;
    crate::note!("{}", result.freeze_check.summary());

    let report = training_report(t, &setup, &plan, &result);
    let meta = CheckpointMeta::new(
        checkpoint::base_model(&setup.assets)?,
        &model,
        report["training"].clone(),
        report.clone(),
    );
    checkpoint::save(&target, &model, &meta)
        .with_context(|| format!("--save {}", cfg.save.display()))?;
    crate::note!("checkpoint saved to {}", cfg.save.display());
    if let Some(dir) = &cfg.export {
        let from = Provenance {
            checkpoint: Some(cfg.save.clone()),
            base_model: t.model.id.clone(),
        };
        export_model(dir, cfg.overwrite, &setup.assets, &model, &from)?;
    }

    let text_report = report_text(
        &setup.labels,
        setup.eval.as_ref().map(|e| e.name.as_str()),
        &result.eval,
    );
    finish(cfg, &setup.assets, &model, report, text_report)
}

/// Checks the outputs of training before any long work, so that a bad or busy target fails
/// in seconds: `--export` (apart from `--save`), and `--save` (also locked).
fn check_targets(cfg: &MultitaskConfig) -> Result<SaveTarget> {
    if let Some(dir) = &cfg.export {
        apart(("--save", &cfg.save), ("--export", dir))?;
        crate::export::check_target(dir, cfg.overwrite)?;
    }
    SaveTarget::prepare(&cfg.save).with_context(|| format!("--save {}", cfg.save.display()))
}

/// The report of a training run, as printed and saved with the checkpoint.
fn training_report(
    t: &TrainConfig,
    setup: &Setup,
    plan: &FreezePlan,
    result: &RunResult,
) -> serde_json::Value {
    let layers = setup.assets.config.num_hidden_layers;
    let eval_json = eval_json(
        setup
            .eval
            .as_ref()
            .map(|e| (e.name.as_str(), e.prepared.encoded.len())),
        &result.eval,
    );
    json!({
        "model": t.model.id,
        "revision": t.model.revision,
        "labels": {"class": setup.labels[0], "sentiment": setup.labels[1]},
        "freeze": {"plan": plan, "description": plan.describe(layers)},
        "parameters": result.parameters,
        "training": {
            "settings": t.settings,
            "head_hidden": t.head_hidden,
            "head_dropout": t.head_dropout,
            "train_file": setup.train.name,
            "train_rows": setup.train.prepared.encoded.len(),
            "epochs": result.training.epochs,
            "steps": result.training.steps,
            "train_seconds": result.training.train_seconds,
            "cached_features": result.training.cached_features,
            "cached_prefix": result.training.cached_prefix,
            "final_loss": result.training.final_loss(),
            "evaluations": result.training.evaluations,
            "best": result.training.best,
            "stopped_early": result.training.stopped_early,
        },
        "eval": eval_json,
        "freeze_check": result.freeze_check,
    })
}

/// `--checkpoint DIR`: rebuild the saved model, evaluate if asked, predict.
fn run_checkpoint(cfg: &MultitaskConfig, dir: &std::path::Path) -> Result<()> {
    let ckpt = Checkpoint::load(dir)?;
    let base = &ckpt.meta.base_model;
    let model_ref = if cfg.train.model_given {
        cfg.train.model.clone()
    } else {
        ModelRef {
            id: base.id.clone(),
            revision: base.revision.clone(),
            offline: cfg.train.model.offline,
            hub_timeout: cfg.train.model.hub_timeout,
        }
    };
    let max_len = cfg.train.max_seq_length.or(Some(base.max_seq_length));
    let assets = ModelAssets::load(&model_ref, max_len).with_context(|| {
        if cfg.train.model_given {
            format!("--model {}", model_ref.id)
        } else {
            format!(
                "loading the checkpoint's base model {} (saved in {}; --model picks another)",
                model_ref.id,
                dir.join("checkpoint.json").display()
            )
        }
    })?;
    if let Some(export_dir) = &cfg.export {
        apart(("--checkpoint", dir), ("--export", export_dir))?;
        crate::export::check_target(export_dir, cfg.overwrite)?;
    }
    check_inputs(cfg, &assets)?;
    let model = ckpt
        .model(&assets, &Device::Cpu)?
        .with_dtype(cfg.train.dtype)?;
    let labels = model.spec.labels.clone();
    crate::note!(
        "loaded checkpoint {} (base model {})",
        dir.display(),
        model_ref.id
    );
    if let Some(export_dir) = &cfg.export {
        let from = Provenance {
            checkpoint: Some(dir.to_path_buf()),
            base_model: model_ref.id.clone(),
        };
        export_model(export_dir, cfg.overwrite, &assets, &model, &from)?;
    }
    let mut eval = None;
    let mut eval_name = None;
    if let Some(src) = &cfg.train.eval_file {
        let d = Dataset::load(src)?;
        let prepared = Prepared::tokenize(&d, d.label_ids(&labels)?, &assets.tokenizer)?;
        eval = Some(evaluate(
            &model,
            &prepared,
            cfg.train.settings.batch_size,
            None,
        )?);
        eval_name = Some((d.name.clone(), prepared.encoded.len()));
    }
    let report = json!({
        "model": model_ref.id,
        "checkpoint": dir.display().to_string(),
        "labels": {"class": labels[0], "sentiment": labels[1]},
        "eval": eval_json(eval_name.as_ref().map(|(n, c)| (n.as_str(), *c)), &eval),
    });
    let text = report_text(&labels, eval_name.as_ref().map(|(n, _)| n.as_str()), &eval);
    finish(cfg, &assets, &model, report, text)
}

/// `--export DIR`: the model as a sentence-transformers folder plus its heads; a Normalize
/// step when the base model has one.
fn export_model(
    dir: &std::path::Path,
    overwrite: bool,
    assets: &ModelAssets,
    model: &MultiTaskModel,
    from: &Provenance,
) -> Result<()> {
    crate::export::export(
        dir,
        overwrite,
        assets,
        model,
        assets.pipeline.normalize,
        from,
    )?;
    crate::note!(
        "exported the model to {} (sentence-transformers folder + {} and {})",
        dir.display(),
        crate::export::HEADS_WEIGHTS,
        crate::export::HEADS_FILE
    );
    Ok(())
}

fn eval_json(source: Option<(&str, usize)>, eval: &Option<[HeadMetrics; 2]>) -> serde_json::Value {
    match (source, eval) {
        (Some((name, rows)), Some([a, b])) => {
            json!({"file": name, "rows": rows, "class": a, "sentiment": b})
        }
        _ => serde_json::Value::Null,
    }
}

fn report_text(
    labels: &[Vec<String>; 2],
    eval_name: Option<&str>,
    eval: &Option<[HeadMetrics; 2]>,
) -> String {
    let mut s = String::new();
    if let (Some(name), Some(m)) = (eval_name, eval) {
        s += &format!("evaluation on {name}\n");
        for t in 0..2 {
            s += &head_table(t, &labels[t], &m[t]);
        }
    }
    s
}

/// Checks that the model can take every sentence to predict (tokens inside its vocabulary),
/// before anything trains or is saved. Standard input is read once, so it is checked as it is
/// predicted.
fn check_inputs(cfg: &MultitaskConfig, assets: &ModelAssets) -> Result<()> {
    if cfg.input == crate::input::InputSource::Stdin {
        return Ok(());
    }
    let mut reader = SentenceReader::open(&cfg.input)?;
    loop {
        let chunk = reader.next_chunk(4096)?;
        if chunk.is_empty() {
            return Ok(());
        }
        assets
            .tokenizer
            .encode(&chunk)
            .map_err(|e| name_sentence(e, |i| reader.locate(i)))?;
    }
}

/// Fails unless folders `a` and `b` (flag, path) are apart: neither is the other or inside it.
fn apart(a: (&str, &Path), b: (&str, &Path)) -> Result<()> {
    let (fa, fb) = (full_path(a.1), full_path(b.1));
    if fa.starts_with(&fb) || fb.starts_with(&fa) {
        anyhow::bail!(
            "{} {} and {} {} are the same folder or one holds the other; each replaces its \
             folder whole, so give them folders of their own",
            a.0,
            a.1.display(),
            b.0,
            b.1.display()
        );
    }
    Ok(())
}

/// `p` as an absolute path without `.` or `..`, with symlinks resolved in the part that exists.
fn full_path(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::env::current_dir().unwrap_or_default().join(p);
    let mut lexical = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                lexical.pop();
            }
            c => lexical.push(c),
        }
    }
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(n), Some(parent)) => {
                rest.push(n);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    for n in rest.iter().rev() {
        out.push(n);
    }
    out
}

/// Predicts the input sentences and writes the report and predictions in the chosen format.
fn finish(
    cfg: &MultitaskConfig,
    assets: &ModelAssets,
    model: &MultiTaskModel,
    mut report: serde_json::Value,
    text_report: String,
) -> Result<()> {
    let mut out = Output::create(cfg.output.as_deref())?;
    match cfg.format {
        Format::Text => write!(out, "{text_report}")?,
        Format::Jsonl => crate::notes::write(&text_report),
        Format::Json => {}
    }
    if cfg.format == Format::Text {
        writeln!(out, "predictions ({})", cfg.input.describe())?;
    }
    let mut reader = SentenceReader::open(&cfg.input)?;
    let mut all = Vec::new();
    loop {
        let chunk = reader.next_chunk(4096)?;
        if chunk.is_empty() {
            break;
        }
        let predictions = predict(model, assets, &chunk, cfg.train.settings.batch_size)
            .map_err(|e| name_sentence(e, |i| reader.locate(i)))?;
        for p in predictions {
            match cfg.format {
                Format::Text => writeln!(
                    out,
                    "class={} ({:.3})  sentiment={} ({:.3})  {}",
                    p.class.label,
                    p.class.probability,
                    p.sentiment.label,
                    p.sentiment.probability,
                    p.text
                )?,
                Format::Jsonl => writeln!(out, "{}", serde_json::to_string(&p)?)?,
                Format::Json => all.push(p),
            }
        }
    }
    if cfg.format == Format::Json {
        report["predictions"] = serde_json::to_value(&all)?;
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    }
    out.finish()
}

/// Label and probability of both heads for each sentence.
pub fn predict(
    model: &MultiTaskModel,
    assets: &ModelAssets,
    texts: &[String],
    batch_size: usize,
) -> Result<Vec<Prediction>> {
    let encoded = assets.tokenizer.encode(texts)?;
    let probs = predict_probs(model, &encoded, batch_size, None)?;
    let pick = |t: usize, i: usize| -> LabelProb {
        let p = &probs[t][i];
        let (best, prob) =
            p.iter().enumerate().fold(
                (0, f32::MIN),
                |acc, (j, &x)| if x > acc.1 { (j, x) } else { acc },
            );
        LabelProb {
            label: model.spec.labels[t][best].clone(),
            probability: prob,
        }
    };
    Ok(texts
        .iter()
        .enumerate()
        .map(|(i, text)| Prediction {
            text: text.clone(),
            class: pick(0, i),
            sentiment: pick(1, i),
        })
        .collect())
}
