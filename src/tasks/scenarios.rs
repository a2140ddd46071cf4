//! `--task=3`: train the freezing scenarios side by side on the same data, seed and budget,
//! and report what each trained and how well it did.

use std::io::Write;

use anyhow::{bail, Result};
use candle_core::Device;
use serde::Serialize;

use super::report::epoch_line;
use crate::config::{Format, ScenariosConfig};
use crate::model::freeze::{check_frozen_layers, Scenario};
use crate::model::multitask::HeadInit;
use crate::output::Output;
use crate::plot::{grouped_bars, Series};
use crate::train::session::{fit, Setup};

/// Accuracy and macro-F1 of one head.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Score {
    pub accuracy: f64,
    pub macro_f1: f64,
}

/// Both heads' scores.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalScores {
    pub class: Score,
    pub sentiment: Score,
}

/// One scenario's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioRow {
    pub scenario: Scenario,
    pub description: String,
    pub trainable_params: usize,
    pub frozen_params: usize,
    pub frozen_unchanged: bool,
    pub trainable_changed: bool,
    pub train_seconds: f64,
    /// Combined loss of the last epoch; `None` when nothing trained.
    pub final_loss: Option<f64>,
    /// True when the heads trained on sentence vectors computed once.
    pub cached_features: bool,
    pub eval: EvalScores,
}

pub fn run(cfg: &ScenariosConfig) -> Result<()> {
    check_targets(cfg)?;
    let t = &cfg.train;
    let setup = Setup::load(t)?;
    let layers = setup.assets.config.num_hidden_layers;
    let n = cfg.layers_n.unwrap_or(layers / 2);
    check_scenarios(cfg, layers, n)?;
    for sc in &cfg.scenarios {
        crate::train::session::check_memory(&setup, &sc.plan(layers, n)?)?;
    }
    let s = &t.settings;
    crate::note!(
        "comparing {} scenario(s) on {} ({} rows), evaluated on {}: {} epoch(s), batch {}, seed {}, model {}",
        cfg.scenarios.len(),
        setup.train.name,
        setup.train.prepared.encoded.len(),
        setup.eval.as_ref().map_or("-".into(), |e| e.name.clone()),
        s.epochs,
        s.batch_size,
        s.seed,
        t.model.id
    );
    let mut rows = Vec::new();
    for (i, sc) in cfg.scenarios.iter().enumerate() {
        crate::note!("[{}/{}] {}", i + 1, cfg.scenarios.len(), sc.label(n));
        rows.push(run_scenario(cfg, &setup, *sc, layers, n)?);
    }
    write_report(cfg, &rows, &setup.labels)?;
    if let Some(path) = &cfg.plot {
        write_plot(cfg, &rows, path)?;
    }
    Ok(())
}

/// Checks what needs no model: an evaluation set, and the output targets (before hours of
/// training, not after).
fn check_targets(cfg: &ScenariosConfig) -> Result<()> {
    if cfg.train.eval_file.is_none() {
        bail!(
            "--task=3 compares scenarios on an evaluation set: pass --eval-file with --train-file"
        );
    }
    if let Some(p) = &cfg.plot {
        crate::output::check_target("--plot", p, Some("png"))?;
    }
    if let Some(p) = &cfg.output {
        crate::output::check_target("--output", p, None)?;
    }
    Ok(())
}

/// Checks the scenarios against the model: N of `layers` within its depth, and a `--dtype`
/// other than f32 only for scenarios that freeze the whole encoder.
fn check_scenarios(cfg: &ScenariosConfig, layers: usize, n: usize) -> Result<()> {
    check_frozen_layers(n, layers)?;
    let dtype = cfg.train.dtype;
    if dtype == crate::model::quant::Dtype::F32 {
        return Ok(());
    }
    let training: Vec<String> = cfg
        .scenarios
        .iter()
        .filter(|sc| {
            sc.plan(layers, n)
                .map(|p| !p.encoder_frozen(layers))
                .unwrap_or(true)
        })
        .map(|sc| sc.label(n))
        .collect();
    if !training.is_empty() {
        bail!(
            "--dtype {dtype} applies to a frozen encoder, but these scenarios train it: {}; pass \
             --scenarios encoder,all (or drop --dtype)",
            training.join(", ")
        );
    }
    Ok(())
}

/// Builds, trains and evaluates one scenario's model.
fn run_scenario(
    cfg: &ScenariosConfig,
    setup: &Setup,
    sc: Scenario,
    layers: usize,
    n: usize,
) -> Result<ScenarioRow> {
    let t = &cfg.train;
    let s = &t.settings;
    let model = setup
        .assets
        .multitask(
            vec![setup.assets.weights.clone()],
            setup.heads_spec(t),
            sc.plan(layers, n)?,
            HeadInit::Seed(s.seed),
            &Device::Cpu,
        )?
        .with_dtype(t.dtype)?;
    let counts = crate::train::verify::ParamCounts::of(&model);
    for line in counts.table().lines() {
        crate::note!("  {line}");
    }
    let epochs = s.epochs;
    let r = fit(&model, setup, s, &mut |e| {
        crate::note!("  {}", epoch_line(e, epochs))
    })?;
    crate::note!("  {}", r.freeze_check.summary());
    let eval = r
        .eval
        .as_ref()
        .expect("check_targets requires an evaluation set");
    let score = |m: &crate::train::metrics::HeadMetrics| Score {
        accuracy: m.accuracy,
        macro_f1: m.macro_f1,
    };
    Ok(ScenarioRow {
        scenario: sc,
        description: sc.label(n),
        trainable_params: r.parameters.trainable,
        frozen_params: r.parameters.frozen,
        frozen_unchanged: r.freeze_check.frozen_unchanged,
        trainable_changed: r.freeze_check.trainable_changed,
        train_seconds: r.training.train_seconds,
        final_loss: r.training.final_loss(),
        cached_features: r.training.cached_features,
        eval: EvalScores {
            class: score(&eval[0]),
            sentiment: score(&eval[1]),
        },
    })
}

/// Writes the table and its reading (text), or the rows (JSON, JSONL).
fn write_report(
    cfg: &ScenariosConfig,
    rows: &[ScenarioRow],
    labels: &[Vec<String>; 2],
) -> Result<()> {
    let mut out = Output::create(cfg.output.as_deref())?;
    match cfg.format {
        Format::Text => {
            write!(out, "{}", table(rows))?;
            writeln!(out)?;
            for line in interpret(rows, labels) {
                writeln!(out, "- {line}")?;
            }
        }
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(rows)?)?,
        Format::Jsonl => {
            for r in rows {
                writeln!(out, "{}", serde_json::to_string(r)?)?;
            }
        }
    }
    out.finish()
}

/// Draws both heads' accuracy per scenario into `path`.
fn write_plot(cfg: &ScenariosConfig, rows: &[ScenarioRow], path: &std::path::Path) -> Result<()> {
    let t = &cfg.train;
    let groups: Vec<String> = rows.iter().map(|r| r.description.clone()).collect();
    let series = [
        Series {
            name: "class accuracy",
            color: plotters::style::RGBColor(31, 119, 180),
            values: rows.iter().map(|r| r.eval.class.accuracy).collect(),
        },
        Series {
            name: "sentiment accuracy",
            color: plotters::style::RGBColor(255, 127, 14),
            values: rows.iter().map(|r| r.eval.sentiment.accuracy).collect(),
        },
    ];
    let name = std::path::Path::new(&t.model.id)
        .file_name()
        .map_or(t.model.id.clone(), |n| n.to_string_lossy().into_owned());
    let title = format!(
        "eval accuracy per scenario ({name}, {} epoch(s))",
        t.settings.epochs
    );
    grouped_bars(path, &title, "accuracy", &groups, &series)?;
    crate::note!("chart written to {}", path.display());
    Ok(())
}

/// The comparison table.
pub fn table(rows: &[ScenarioRow]) -> String {
    let w = rows
        .iter()
        .map(|r| r.description.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut s = format!(
        "{:<w$} {:>11} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9}  {}\n",
        "scenario",
        "trainable",
        "time",
        "final loss",
        "class acc",
        "class F1",
        "sent acc",
        "sent F1",
        "freeze check"
    );
    for r in rows {
        let loss = r.final_loss.map_or("-".to_string(), |l| format!("{l:.4}"));
        let check = match (r.frozen_unchanged, r.trainable_changed) {
            (true, true) => "ok",
            (false, _) => "FROZEN CHANGED",
            (_, false) => "TRAINABLE UNCHANGED",
        };
        s += &format!(
            "{:<w$} {:>11} {:>7.1}s {:>10} {:>9.4} {:>9.4} {:>9.4} {:>9.4}  {}{}\n",
            r.description,
            r.trainable_params,
            r.train_seconds,
            loss,
            r.eval.class.accuracy,
            r.eval.class.macro_f1,
            r.eval.sentiment.accuracy,
            r.eval.sentiment.macro_f1,
            check,
            if r.cached_features {
                " (cached vectors)"
            } else {
                ""
            }
        );
    }
    s
}

fn find(rows: &[ScenarioRow], s: Scenario) -> Option<&ScenarioRow> {
    rows.iter().find(|r| r.scenario == s)
}

/// A few sentences drawn from the numbers: which scenario did best per head, what freezing
/// the encoder bought in time and cost in accuracy, what a frozen head scores.
pub fn interpret(rows: &[ScenarioRow], labels: &[Vec<String>; 2]) -> Vec<String> {
    let chance = [1.0 / labels[0].len() as f64, 1.0 / labels[1].len() as f64];
    let mut out = vec![best_line(rows, chance)];
    out.extend(frozen_encoder_line(rows));
    out.extend(frozen_head_lines(rows, chance));
    out.extend(frozen_layers_line(rows));
    if let Some(u) = find(rows, Scenario::All) {
        out.push(format!(
            "With everything frozen nothing trained; the random heads scored {:.3} (class) and {:.3} (sentiment), \
             the floor every other scenario is measured against.",
            u.eval.class.accuracy, u.eval.sentiment.accuracy
        ));
    }
    if rows
        .iter()
        .all(|r| r.frozen_unchanged && r.trainable_changed)
    {
        out.push("In every scenario the frozen tensors stayed bit-identical and every trainable tensor changed.".into());
    }
    out
}

/// The best scenario per head, and chance.
fn best_line(rows: &[ScenarioRow], chance: [f64; 2]) -> String {
    // The first scenario with the highest score: ties go to the earlier one.
    let best = |f: fn(&ScenarioRow) -> f64| {
        rows.iter()
            .fold(&rows[0], |best, r| if f(r) > f(best) { r } else { best })
    };
    let bc = best(|r| r.eval.class.accuracy);
    let bs = best(|r| r.eval.sentiment.accuracy);
    format!(
        "Best class accuracy: {} ({:.3}); best sentiment accuracy: {} ({:.3}). Chance is {:.3} and {:.3}.",
        bc.description, bc.eval.class.accuracy, bs.description, bs.eval.sentiment.accuracy, chance[0], chance[1]
    )
}

/// What freezing the encoder bought in time and cost in accuracy.
fn frozen_encoder_line(rows: &[ScenarioRow]) -> Option<String> {
    let (full, enc) = (find(rows, Scenario::None)?, find(rows, Scenario::Encoder)?);
    let speed = full.train_seconds / enc.train_seconds.max(1e-9);
    let share = 100.0 * enc.trainable_params as f64 / full.trainable_params.max(1) as f64;
    Some(format!(
        "Freezing the encoder trained {:.3}% of the parameters in {:.1}s instead of {:.1}s ({speed:.1}x faster){}; \
         class accuracy {:+.3} and sentiment accuracy {:+.3} against training everything.",
        share,
        enc.train_seconds,
        full.train_seconds,
        if enc.cached_features { ", the encoder running once per sentence" } else { "" },
        enc.eval.class.accuracy - full.eval.class.accuracy,
        enc.eval.sentiment.accuracy - full.eval.sentiment.accuracy,
    ))
}

/// What each frozen head scored against the untrained heads (or chance), and why.
fn frozen_head_lines(rows: &[ScenarioRow], chance: [f64; 2]) -> Vec<String> {
    let untrained = find(rows, Scenario::All);
    let acc = |r: &ScenarioRow, t: usize| {
        if t == 0 {
            r.eval.class.accuracy
        } else {
            r.eval.sentiment.accuracy
        }
    };
    let mut out = Vec::new();
    for (sc, head, t) in [
        (Scenario::ClassHead, "class", 0),
        (Scenario::SentimentHead, "sentiment", 1),
    ] {
        let Some(r) = find(rows, sc) else { continue };
        let acc_r = acc(r, t);
        let (ref_name, ref_acc) = match untrained {
            Some(u) => ("the untrained heads", acc(u, t)),
            None => ("chance", chance[t]),
        };
        // The frozen head's own loss still reaches the trainable encoder through it.
        let verdict = if (acc_r - ref_acc).abs() < 0.05 {
            "about the same: the head's fixed random weights decide, and the encoder under it did not adapt to them"
        } else if acc_r > ref_acc {
            "higher, although the head never changed: its loss still flows through it into the trainable encoder, \
             which bends its features toward what the fixed random head reads"
        } else {
            "lower: training the encoder moved the features this fixed head reads"
        };
        out.push(format!(
            "With the {head} head frozen, {head} accuracy was {acc_r:.3} against {ref_acc:.3} for {ref_name}: {verdict}."
        ));
    }
    out
}

/// What freezing the first N layers kept of the parameters and time, and cost in accuracy.
fn frozen_layers_line(rows: &[ScenarioRow]) -> Option<String> {
    let (full, part) = (find(rows, Scenario::None)?, find(rows, Scenario::Layers)?);
    Some(format!(
        "{} kept {:.0}% of the trainable parameters and {:.0}% of the training time; class accuracy {:+.3}, \
         sentiment accuracy {:+.3} against training everything.",
        capitalise(&part.description),
        100.0 * part.trainable_params as f64 / full.trainable_params.max(1) as f64,
        100.0 * part.train_seconds / full.train_seconds.max(1e-9),
        part.eval.class.accuracy - full.eval.class.accuracy,
        part.eval.sentiment.accuracy - full.eval.sentiment.accuracy,
    ))
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(sc: Scenario, class: f64, sentiment: f64, params: usize, secs: f64) -> ScenarioRow {
        let score = |a| Score {
            accuracy: a,
            macro_f1: a,
        };
        ScenarioRow {
            scenario: sc,
            description: sc.label(3),
            trainable_params: params,
            frozen_params: 1000 - params,
            frozen_unchanged: true,
            trainable_changed: true,
            train_seconds: secs,
            final_loss: Some(0.5),
            cached_features: sc == Scenario::Encoder,
            eval: EvalScores {
                class: score(class),
                sentiment: score(sentiment),
            },
        }
    }

    #[test]
    fn interpret_reads_the_numbers() {
        let rows = [
            row(Scenario::None, 0.9, 0.6, 1000, 10.0),
            row(Scenario::Encoder, 0.7, 0.8, 10, 2.0),
            row(Scenario::ClassHead, 0.9, 0.6, 990, 9.0),
            row(Scenario::Layers, 0.8, 0.7, 500, 6.0),
            row(Scenario::All, 0.3, 0.4, 0, 0.0),
        ];
        let labels = [vec!["a".into(), "b".into()], vec!["x".into(); 4]];
        let lines = interpret(&rows, &labels);
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert!(lines[0].starts_with("Best class accuracy: none frozen (0.900)"));
        assert!(lines[0].contains("best sentiment accuracy: encoder frozen (0.800)"));
        assert!(lines[0].contains("Chance is 0.500 and 0.250"));
        assert!(
            lines[1].contains("1.000% of the parameters in 2.0s instead of 10.0s (5.0x faster)")
        );
        assert!(lines[1].contains("class accuracy -0.200 and sentiment accuracy +0.200"));
        assert!(lines[2]
            .contains("class accuracy was 0.900 against 0.300 for the untrained heads: higher"));
        assert!(lines[3].starts_with("First 3 layers frozen kept 50%"));
        assert!(lines[4].contains("scored 0.300 (class) and 0.400 (sentiment)"));
        assert!(lines[5].contains("bit-identical"));
    }
}
