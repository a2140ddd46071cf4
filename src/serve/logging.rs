//! The server's log lines (tracing) on standard error: readable text, or one JSON object per
//! line for log collectors (`--log-format json`). With JSON, what the library itself prints on
//! stderr while the server runs (its notes, a panic's message) is read back from a pipe and
//! logged as events ([`StderrEvents`]), so that every line of the log stays JSON.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::thread::JoinHandle;

use tracing::Level;

use super::config::LogFormat;

/// Installs the log subscriber (once per process; later calls do nothing). With JSON, stderr
/// is captured until the returned guard is dropped.
pub fn init(format: LogFormat) -> Option<StderrEvents> {
    // A log that cannot be written must not report that on stderr: in JSON mode stderr is the
    // capture pipe, whose lines are logged again (a loop at full speed), and in text mode the
    // report itself would panic on a closed stderr (`eprintln!`), in whichever thread logged.
    let builder = tracing_subscriber::fmt()
        .with_max_level(Level::INFO)
        .with_target(false)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => {
            let _ = builder
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .try_init();
            None
        }
        LogFormat::Json => {
            let json = builder.json().flatten_event(true).with_current_span(false);
            match StderrEvents::capture() {
                Ok((log, events)) => {
                    let _ = json.with_writer(Mutex::new(log)).try_init();
                    Some(events)
                }
                Err(e) => {
                    let _ = json.with_writer(std::io::stderr).try_init();
                    tracing::warn!(error = %e, "stderr stays as it is: lines the library prints there are not JSON");
                    None
                }
            }
        }
    }
}

/// Standard error redirected into a pipe whose lines become log events; dropping it puts the
/// original stderr back and logs what was still in the pipe.
pub struct StderrEvents {
    /// The process's stderr as it was (the log writes to a copy of it).
    original: OwnedFd,
    reader: Option<JoinHandle<()>>,
}

impl StderrEvents {
    /// The log's own writer (the original stderr) and the capture.
    fn capture() -> std::io::Result<(File, Self)> {
        let original = std::io::stderr().as_fd().try_clone_to_owned()?;
        let log = File::from(original.try_clone()?);
        let (pipe, writer) = std::io::pipe()?;
        let reader = std::thread::Builder::new()
            .name("stderr-log".into())
            .spawn(move || {
                let mut pipe = BufReader::new(pipe);
                let mut line = Vec::new();
                while matches!(pipe.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    event(String::from_utf8_lossy(&line).trim_end());
                    line.clear();
                }
            })?;
        rustix::stdio::dup2_stderr(&writer)?;
        let events = Self {
            original,
            reader: Some(reader),
        };
        Ok((log, events))
    }
}

impl Drop for StderrEvents {
    fn drop(&mut self) {
        // The pipe's last writer goes: the reader sees its end once it has logged the rest.
        if rustix::stdio::dup2_stderr(&self.original).is_ok() {
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
        }
    }
}

/// One line the library printed, as an event at the level its first word suggests.
fn event(line: &str) {
    if line.is_empty() || line.starts_with("[tracing-subscriber]") {
        return;
    }
    let lower = line.to_ascii_lowercase();
    if lower.starts_with("error") || lower.contains("panicked") {
        tracing::error!(stderr = true, "{line}");
    } else if lower.starts_with("warning") {
        tracing::warn!(stderr = true, "{line}");
    } else {
        tracing::info!(stderr = true, "{line}");
    }
}
