//! The one channel for what fetch-ml tells the person at the terminal besides errors: notes
//! and warnings of the library (a model's quirk, a refused kernel, a recovered checkpoint),
//! progress lines and the human-readable reports of the tasks. All of it goes to stderr, and
//! `-q/--quiet` silences it ([`set_quiet`]); errors (`error:`, `to fix:`) are printed by
//! `main` whatever the setting, and machine-readable output (stdout, `--output` files) never
//! passes through here.
//!
//! ```
//! fetch_ml::note!("note: {} of {} sentences were truncated", 1, 20);
//! ```

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silences (or restores) every note from now on, on every thread.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether notes are silenced (progress bars ask too).
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Writes `text` to stderr as it is (with no newline added), unless quiet.
pub fn write(text: &str) {
    if !quiet() {
        // A closed or full stderr is no reason to stop the work.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// Writes one line to stderr, unless quiet.
pub fn line(args: std::fmt::Arguments<'_>) {
    if !quiet() {
        let _ = writeln!(std::io::stderr().lock(), "{args}");
    }
}

/// A note on stderr, formatted as `eprintln!` does, silenced by `-q/--quiet`.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::notes::line(format_args!($($arg)*))
    };
}
