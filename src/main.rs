//! The `fetch-ml` binary: parse the flags, build the config, run, report errors.

#![deny(unsafe_code)]

use std::process::ExitCode;

use fetch_ml::cli::Cli;

fn main() -> ExitCode {
    fetch_ml::alloc::keep_freed_memory();
    // Backtraces are for developers: with RUST_BACKTRACE set, candle appends one to its error
    // messages. They stay off unless FETCH_ML_DEBUG=1 asks for them.
    if std::env::var_os("FETCH_ML_DEBUG").is_none() {
        // SAFETY (remove_var): first thing in main, before any other thread exists.
        std::env::remove_var("RUST_BACKTRACE");
        std::env::remove_var("RUST_LIB_BACKTRACE");
    }
    let cli = Cli::parse_args();
    fetch_ml::notes::set_quiet(cli.quiet);
    let result = fetch_ml::threads::configure(cli.threads)
        .and_then(|_| cli.into_command())
        .and_then(|cmd| fetch_ml::run(&cmd));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            for line in fetch_ml::advice::advice(&e) {
                eprintln!("to fix: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A closed pipe (`fetch-ml ... | head`) is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
