//! fetch-ml: sentence embeddings and a multitask model on a BERT encoder written on candle.
//!
//! The binary is thin: [`cli`] turns flags into a [`config::Command`], and [`run`] does it.

pub mod advice;
pub mod alloc;
pub mod atomic;
pub mod chunk;
pub mod cli;
pub mod columnar;
pub mod config;
pub mod data;
pub mod embed;
pub mod export;
pub mod finite;
pub mod hub;
pub mod input;
pub mod interrupt;
pub mod job;
pub mod loader;
pub mod model;
pub mod output;
pub mod panics;
pub mod pipeline;
pub mod plot;
pub mod serve;
pub mod shard;
pub mod st_modules;
pub mod tasks;
#[cfg(any(test, feature = "test-support"))]
pub mod testutil;
pub mod threads;
pub mod tokenize;
pub mod train;

/// Runs one command to completion.
pub fn run(cmd: &config::Command) -> anyhow::Result<()> {
    let dtype = match cmd {
        config::Command::Embed(cfg) => cfg.dtype,
        config::Command::Multitask(cfg) => cfg.train.dtype,
        config::Command::Scenarios(cfg) => cfg.train.dtype,
        config::Command::Serve(cfg) => cfg.served.dtype,
    };
    if let Some(note) = model::quant::kernel_override_note(dtype)? {
        eprintln!("warning: {note}");
    }
    match cmd {
        config::Command::Embed(cfg) => tasks::embed::run(cfg),
        config::Command::Multitask(cfg) => tasks::multitask::run(cfg),
        config::Command::Scenarios(cfg) => tasks::scenarios::run(cfg),
        config::Command::Serve(cfg) => serve::run(cfg),
    }
}
