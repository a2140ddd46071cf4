//! From parsed flags to a task's config: which flags were given (and whether the task takes
//! them, as their help headings say), defaults, and the checks that need several flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{CommandFactory, FromArgMatches};

use super::values::format_name;
use super::{heading, task_name, Cli, DEFAULT_MODEL, SERVE};
use crate::chunk::ChunkSpec;
use crate::config::{
    defaults, Command, EmbedConfig, MultitaskConfig, ScenariosConfig, TrainConfig,
};
use crate::data::DataSource;
use crate::hub::{offline_from_env, ModelRef};
use crate::input::InputSource;
use crate::model::freeze::Scenario;
use crate::serve::config::{ServeConfig, ServedModel};
use crate::shard::ShardSpec;
use crate::train::trainer::TrainSettings;

impl Cli {
    /// Parses the process's arguments as `Cli::parse` does (exiting on a bad one), and
    /// records which flags were given, for [`Cli::into_command`]'s check.
    pub fn parse_args() -> Self {
        Self::parse_args_from(std::env::args_os())
    }

    /// As [`Cli::parse_args`], from `args` (the program name first).
    pub fn parse_args_from<I, T>(args: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let command = Self::command();
        let matches = command.clone().get_matches_from(args);
        let mut cli = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        // Only the command line: a flag's environment variable (FETCH_ML_API_KEY) is a
        // standing setting, which a task that does not take the flag ignores.
        let given = command
            .get_arguments()
            .filter(|a| {
                let source = matches.value_source(a.get_id().as_str());
                source == Some(clap::parser::ValueSource::CommandLine)
            })
            .filter_map(|a| {
                let name = format!("--{}", a.get_long()?);
                Some((name, a.get_help_heading().map(str::to_string)))
            })
            .collect();
        cli.given = Some(given);
        cli
    }

    /// Flags given that `task` does not use, by name, with the tasks that do (none: all),
    /// as their headings say.
    fn unused_flags(&self, task: u8) -> Vec<(&str, Vec<&str>)> {
        let given = self
            .given
            .as_deref()
            .expect("a Cli from Cli::parse_args, which records the flags given");
        let task = task_name(task);
        given
            .iter()
            .filter(|(_, h)| !heading::applies(h.as_deref(), &task))
            .map(|(name, h)| {
                (
                    name.as_str(),
                    h.as_deref().map(heading::tasks).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Validates the flags and builds the task's config.
    pub fn into_command(mut self) -> Result<Command> {
        let task = self.task;
        if let Some((flag, tasks)) = self.unused_flags(task).first() {
            let tasks: Vec<String> = tasks.iter().map(|t| format!("--task={t}")).collect();
            bail!(
                "{flag} does not apply to --task={}, only to {}; see --help for the flags of \
                 each task (a heading names the tasks its flags apply to)",
                task_name(task),
                tasks.join(", ")
            );
        }
        let (model, model_given) = self.model_ref();
        if task == SERVE {
            return self.serve_config(model, model_given).map(Command::Serve);
        }
        let input = self.input_source();
        if task == 1 {
            return Ok(Command::Embed(self.embed_config(model, input)?));
        }
        let Some(format) = self.format.text_format() else {
            bail!(
                "--format {} applies to --task=1 only; use text, json or jsonl",
                format_name(self.format)
            );
        };
        let train = self.train_config(model, model_given);
        if task == 2 {
            return Ok(Command::Multitask(MultitaskConfig {
                train,
                save: self
                    .save
                    .unwrap_or_else(|| PathBuf::from(defaults::SAVE_DIR)),
                checkpoint: self.checkpoint,
                export: self.export,
                overwrite: self.overwrite,
                input,
                output: self.output,
                format,
            }));
        }
        let mut scenarios = self.scenarios;
        if scenarios.is_empty() {
            scenarios = Scenario::ALL.to_vec();
        }
        scenarios.dedup();
        Ok(Command::Scenarios(ScenariosConfig {
            layers_n: train.freeze_layers,
            train,
            scenarios,
            plot: self.plot,
            output: self.output,
            format,
        }))
    }

    /// `--task=serve`'s settings.
    fn serve_config(self, model: ModelRef, model_given: bool) -> Result<ServeConfig> {
        let served = ServedModel {
            model,
            model_given,
            checkpoint: self.checkpoint,
            dtype: self.dtype.unwrap_or_default(),
            max_seq_length: self.max_seq_length,
            normalize: normalize_flag(self.normalize, self.no_normalize),
            prompt: self.prompt,
            prompt_name: self.prompt_name,
            truncate_dim: self.truncate_dim,
            batch_size: self.batch_size,
            served_name: None,
        };
        self.serve.into_config(served, self.max_batch_tokens)
    }

    /// The model to load, and whether `--model` was given.
    fn model_ref(&mut self) -> (ModelRef, bool) {
        let given = self.model.is_some();
        let model = ModelRef {
            id: self
                .model
                .take()
                .unwrap_or_else(|| DEFAULT_MODEL.to_string()),
            revision: std::mem::take(&mut self.revision),
            offline: self.offline || offline_from_env(),
            hub_timeout: std::time::Duration::from_secs_f64(self.hub_timeout),
        };
        (model, given)
    }

    /// Where the sentences come from.
    fn input_source(&mut self) -> InputSource {
        if !self.sentences.is_empty() {
            return InputSource::Sentences(std::mem::take(&mut self.sentences));
        }
        match self.input.take() {
            Some(p) if p.as_os_str() == "-" => InputSource::Stdin,
            Some(p) => InputSource::File(p),
            None => InputSource::Default,
        }
    }

    /// `--task=1`'s settings.
    fn embed_config(self, model: ModelRef, input: InputSource) -> Result<EmbedConfig> {
        let to_stdout = self.output.as_deref().is_none_or(|p| p == Path::new("-"));
        if self.format.is_columnar() && to_stdout {
            bail!(
                "--format {0} writes a file: give --output FILE (e.g. -o embeddings.{0})",
                format_name(self.format)
            );
        }
        let normalize = normalize_flag(self.normalize, self.no_normalize);
        let shard = match self.shard {
            Some(shard) => Some(ShardSpec {
                shard,
                source: format!("--shard {shard}"),
                note: None,
            }),
            None => crate::shard::from_env(self.shards, &|k| std::env::var(k).ok())?,
        };
        let output = match (&shard, self.output) {
            (Some(s), Some(p)) if p != Path::new("-") => {
                crate::shard::check_template(&p).map_err(|e| anyhow::anyhow!("--output {e}"))?;
                Some(s.shard.output_path(&p))
            }
            (None, Some(p)) if crate::shard::has_placeholder(&p) => bail!(
                "--output {}: {{shard}}, {{i}} and {{n}} are filled in for a sharded run \
                 only; pass --shard I/N, or remove them from the name",
                p.display()
            ),
            (_, p) => p,
        };
        Ok(EmbedConfig {
            model,
            input,
            output,
            format: self.format,
            shard,
            overwrite: self.overwrite,
            batch_size: self.batch_size,
            max_batch_tokens: self.max_batch_tokens,
            dtype: self.dtype.unwrap_or_default(),
            max_seq_length: self.max_seq_length,
            normalize,
            prompt: self.prompt,
            prompt_name: self.prompt_name,
            truncate_dim: self.truncate_dim,
            truncate_side: self.truncate_side.unwrap_or_default(),
            chunking: self.chunk_tokens.map(|tokens| ChunkSpec {
                tokens,
                overlap: self.chunk_overlap.unwrap_or(0),
                mode: self.chunks.unwrap_or_default(),
            }),
        })
    }

    /// The training settings of `--task=2` and `--task=3`.
    fn train_config(&mut self, model: ModelRef, model_given: bool) -> TrainConfig {
        let defaults = TrainSettings::default();
        let (default_epochs, default_max_examples) = if self.task == 2 {
            (defaults.epochs, None)
        } else {
            (
                defaults::SCENARIO_EPOCHS,
                Some(defaults::SCENARIO_MAX_EXAMPLES),
            )
        };
        let predicting = self.checkpoint.is_some();
        let own_train_file = self.train_file.is_some();
        TrainConfig {
            model,
            model_given,
            max_seq_length: self.max_seq_length,
            train_file: self
                .train_file
                .take()
                .map_or_else(DataSource::default_train, DataSource::File),
            // The shipped evaluation set goes with the shipped training set only.
            eval_file: match (self.eval_file.take(), predicting || own_train_file) {
                (Some(f), _) => Some(DataSource::File(f)),
                (None, false) => Some(DataSource::default_eval()),
                (None, true) => None,
            },
            settings: TrainSettings {
                epochs: self.epochs.unwrap_or(default_epochs),
                batch_size: self.batch_size,
                lr: self.lr.unwrap_or(defaults.lr),
                head_lr: self.head_lr.unwrap_or(defaults.head_lr),
                warmup: self.warmup.unwrap_or(defaults.warmup),
                weight_decay: self.weight_decay.unwrap_or(defaults.weight_decay),
                loss_weights: self.loss_weights.unwrap_or(defaults.loss_weights),
                seed: self.seed.unwrap_or(defaults.seed),
                group_by_length: !self.no_length_grouping,
                grad_accum: self.grad_accum.unwrap_or(defaults.grad_accum),
                eval_every: self.eval_every,
                keep_best: self.keep_best,
                early_stop: self.early_stop,
                class_weights: self.class_weights.as_deref() == Some("auto"),
                ..defaults
            },
            head_hidden: self.head_hidden.unwrap_or(defaults::HEAD_HIDDEN),
            head_dropout: self.head_dropout.unwrap_or(defaults::HEAD_DROPOUT),
            freeze: std::mem::take(&mut self.freeze),
            freeze_layers: self.freeze_layers,
            max_train_examples: self.max_train_examples.or(default_max_examples),
            embedding_cache: self.embedding_cache.take(),
            dtype: self.dtype.unwrap_or_default(),
        }
    }
}

/// `--normalize` / `--no-normalize`: forced on, forced off, or as the model's folder says.
fn normalize_flag(normalize: bool, no_normalize: bool) -> Option<bool> {
    match (normalize, no_normalize) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(args: &[&str]) -> Result<Command> {
        let argv = std::iter::once("fetch-ml").chain(args.iter().copied());
        Cli::parse_args_from(argv).into_command()
    }

    /// A heading's tasks are the ones it names; one naming none applies to all.
    #[test]
    fn headings_say_which_tasks_take_their_flags() {
        assert!(heading::applies(Some(heading::TRAINING), "2"));
        assert!(heading::applies(Some(heading::TRAINING), "3"));
        assert!(!heading::applies(Some(heading::TRAINING), "1"));
        assert!(!heading::applies(Some(heading::TRAINING), "serve"));
        assert!(!heading::applies(Some(heading::SCENARIOS), "2"));
        assert!(heading::applies(Some(heading::MODEL), "3"));
        assert!(heading::applies(Some(heading::MODEL), "serve"));
        assert!(heading::applies(Some(crate::serve::args::HEADING), "serve"));
        assert!(!heading::applies(Some(crate::serve::args::HEADING), "1"));
        assert!(heading::applies(Some(heading::CHECKPOINT), "serve"));
        assert!(!heading::applies(Some(heading::OUTPUT), "serve"));
        assert!(heading::applies(None, "1"));
        assert_eq!(heading::tasks(heading::EMBEDDINGS), ["1", "serve"]);
    }

    /// Every flag sits under one of the headings of `heading` (so a new flag says which tasks
    /// take it), and a flag given to a task its heading does not name is refused by name.
    #[test]
    fn every_flag_has_a_heading_and_others_tasks_refuse_it() {
        let known = [
            heading::MODEL,
            heading::INPUT,
            heading::OUTPUT,
            heading::RUN,
            heading::EXISTING,
            heading::EMBEDDINGS,
            heading::CORPUS,
            heading::LONG_INPUTS,
            heading::TRAINING,
            heading::MULTITASK,
            heading::CHECKPOINT,
            heading::SCENARIOS,
            crate::serve::args::HEADING,
        ];
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "task" | "help" | "version") {
                continue;
            }
            let h = arg.get_help_heading();
            assert!(
                h.is_some_and(|h| known.contains(&h)),
                "--{id}: heading {h:?}"
            );
        }
        for (task, flag, value) in [
            ("3", "--normalize", None),
            ("3", "--sentence", Some("hi")),
            ("1", "--freeze", Some("encoder")),
            ("1", "--epochs", Some("2")),
            ("2", "--plot", Some("p.png")),
            ("3", "--overwrite", None),
            ("2", "--shards", Some("2")),
            ("1", "--port", Some("9000")),
            ("serve", "--input", Some("x.txt")),
            ("serve", "--output", Some("x.txt")),
            ("serve", "--chunk-tokens", Some("64")),
            ("serve", "--save", Some("dir")),
        ] {
            let task = format!("--task={task}");
            let mut args = vec![task.as_str(), flag];
            args.extend(value);
            let Err(e) = command(&args) else {
                panic!("{args:?} accepted");
            };
            let e = e.to_string();
            assert!(
                e.contains(&format!("{flag} does not apply to {task}")),
                "{e}"
            );
        }
        for args in [
            ["--task=2", "--overwrite"],
            ["--task=1", "--overwrite"],
            ["--task=2", "--freeze=encoder"],
            ["--task=3", "--epochs=1"],
            ["--task=1", "--quiet"],
            ["--task=serve", "--normalize"],
            ["--task=serve", "--checkpoint=dir"],
            ["--task=serve", "--max-batch-tokens=64"],
        ] {
            if let Err(e) = command(&args) {
                assert!(!e.to_string().contains("does not apply"), "{args:?}: {e}");
            }
        }
    }
}
