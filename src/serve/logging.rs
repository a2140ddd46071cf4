//! The server's log lines (tracing) on standard error: readable text, or one JSON object per
//! line for log collectors (`--log-format json`).

use std::io::IsTerminal;

use tracing::Level;

use super::config::LogFormat;

/// Installs the log subscriber (once per process; later calls do nothing).
pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(Level::INFO)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
