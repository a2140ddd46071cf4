//! Where results go: standard output, or a file written to a temporary name and renamed into
//! place only when complete, so a failed run never leaves a half-written file.

use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tempfile::NamedTempFile;

/// A buffered output that is committed by [`Output::finish`].
pub struct Output {
    inner: Sink,
}

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File {
        tmp: BufWriter<NamedTempFile>,
        path: PathBuf,
    },
}

impl Output {
    /// Standard output when `path` is `None` or `-`, else a temporary file beside `path`.
    pub fn create(path: Option<&Path>) -> Result<Self> {
        let inner = match path {
            None => Sink::Stdout(BufWriter::new(io::stdout())),
            Some(p) if p == Path::new("-") => Sink::Stdout(BufWriter::new(io::stdout())),
            Some(p) => {
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                // Mode 0666 minus the umask, as a plain `File::create` would give.
                let tmp = tempfile::Builder::new()
                    .prefix(".fetch-ml-")
                    .permissions(std::fs::Permissions::from_mode(0o666))
                    .tempfile_in(dir)
                    .with_context(|| {
                        format!(
                            "--output {}: cannot create a file in {}",
                            p.display(),
                            dir.display()
                        )
                    })?;
                Sink::File {
                    tmp: BufWriter::with_capacity(1 << 16, tmp),
                    path: p.to_path_buf(),
                }
            }
        };
        Ok(Self { inner })
    }

    /// Flushes and, for a file, renames it into place.
    pub fn finish(self) -> Result<()> {
        match self.inner {
            Sink::Stdout(mut w) => w.flush().context("writing to standard output"),
            Sink::File { tmp, path } => {
                let tmp = tmp
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("writing {}", path.display()))?;
                tmp.as_file()
                    .sync_all()
                    .with_context(|| format!("writing {}", path.display()))?;
                tmp.persist(&path).map_err(|e| e.error).with_context(|| {
                    format!("moving the output into place at {}", path.display())
                })?;
                Ok(())
            }
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Sink::Stdout(w) => w.write(buf),
            Sink::File { tmp, .. } => tmp.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Sink::Stdout(w) => w.flush(),
            Sink::File { tmp, .. } => tmp.flush(),
        }
    }
}

/// A progress bar on stderr; invisible when stderr is not a terminal.
pub fn progress_bar(total: Option<u64>, message: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = match total {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let template = if total.is_some() {
        "{msg} [{bar:30}] {percent:>3}% {elapsed_precise} eta {eta}"
    } else {
        "{msg} {spinner} {pos} {elapsed_precise}"
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}
