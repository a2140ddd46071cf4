//! fetch-ml: sentence embeddings and a multitask model on a BERT encoder written on candle.
//!
//! The binary is thin: [`cli`] turns flags into a [`config::Command`], and [`run`] does it.
//!
//! No `unsafe` here: the CPU kernels, with their `unsafe` blocks, are the kernel crate's
//! (`crates/kernels`), behind a safe interface. The two exceptions are system calls, named
//! below: [`sys`] (allocator, file locks, umask, page size, process liveness) and
//! [`interrupt`] (a signal handler that removes temporary files).

#![deny(unsafe_code)]

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
// Exception: a signal handler, which may only make async-signal-safe libc calls on raw C
// strings.
#[allow(unsafe_code)]
pub mod interrupt;
pub mod job;
pub mod loader;
pub mod model;
pub mod notes;
pub mod output;
pub mod panics;
pub mod pipeline;
pub mod plot;
pub mod serve;
pub mod shard;
pub mod st_modules;
// Exception: libc system calls (mallopt, malloc_trim, flock, umask, sysconf, kill), each
// behind a safe function.
#[allow(unsafe_code)]
pub mod sys;
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
        crate::note!("warning: {note}");
    }
    match cmd {
        config::Command::Embed(cfg) => tasks::embed::run(cfg),
        config::Command::Multitask(cfg) => tasks::multitask::run(cfg),
        config::Command::Scenarios(cfg) => tasks::scenarios::run(cfg),
        config::Command::Serve(cfg) => serve::run(cfg),
    }
}
