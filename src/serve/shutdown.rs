//! SIGTERM and Ctrl-C: the first stops the server gracefully (it stops accepting and answers
//! every request already accepted); a second one exits at once.
//!
//! The CLI's own handler ([`crate::interrupt`]), which removes temporary files and dies by
//! the signal, is kept from being installed in this process: tokio's handler takes the
//! signals instead.

use anyhow::{bail, Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The process's SIGTERM and SIGINT streams.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Takes over SIGTERM and SIGINT; call inside the runtime, before anything else could
    /// install [`crate::interrupt`]'s handler.
    pub fn install() -> Result<Self> {
        if !crate::interrupt::leave_signals_to_the_caller() {
            bail!("the interrupt handler of the command line was installed before the server's");
        }
        Ok(Self {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    /// Waits for the next signal and returns its name and the exit status of dying by it.
    pub async fn next(&mut self) -> (&'static str, i32) {
        tokio::select! {
            _ = self.term.recv() => ("SIGTERM", 128 + libc::SIGTERM),
            _ = self.int.recv() => ("SIGINT", 128 + libc::SIGINT),
        }
    }

    /// Waits for the first signal; from then on, another one exits the process at once.
    pub async fn first_then_exit_on_second(mut self) {
        let (name, _) = self.next().await;
        tracing::info!(
            signal = name,
            "shutting down: no new connections; answering the requests accepted (a second \
             signal exits at once)"
        );
        tokio::spawn(async move {
            let (name, status) = self.next().await;
            tracing::warn!(signal = name, "second signal: exiting at once");
            std::process::exit(status);
        });
    }
}
