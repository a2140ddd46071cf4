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
        _guard: crate::interrupt::Registered,
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
                remove_stale_temporaries(dir);
                // Mode 0666 minus the umask, as a plain `File::create` would give.
                let tmp = tempfile::Builder::new()
                    .prefix(&temp_prefix(std::process::id()))
                    .permissions(std::fs::Permissions::from_mode(0o666))
                    .tempfile_in(dir)
                    .with_context(|| {
                        format!(
                            "--output {}: cannot create a file in {}",
                            p.display(),
                            dir.display()
                        )
                    })?;
                let guard = crate::interrupt::remove_on_signal(tmp.path());
                Sink::File {
                    tmp: BufWriter::with_capacity(1 << 16, tmp),
                    path: p.to_path_buf(),
                    _guard: guard,
                }
            }
        };
        Ok(Self { inner })
    }

    /// True when the output goes to standard output.
    pub fn is_stdout(&self) -> bool {
        matches!(self.inner, Sink::Stdout(_))
    }

    /// Overwrites `bytes` at `offset` of a file output, for a header whose content is known
    /// only at the end (the row count of a .npy file). Not possible on standard output.
    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        match &mut self.inner {
            Sink::Stdout(_) => anyhow::bail!("cannot rewrite a header on standard output"),
            Sink::File { tmp, path, .. } => tmp
                .flush()
                .and_then(|_| tmp.get_ref().as_file().write_all_at(bytes, offset))
                .with_context(|| format!("writing {}", path.display())),
        }
    }

    /// Flushes and, for a file, renames it into place.
    pub fn finish(self) -> Result<()> {
        match self.inner {
            Sink::Stdout(mut w) => w.flush().context("writing to standard output"),
            Sink::File { tmp, path, .. } => {
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

/// Names of our temporary output files start with this and the writer's process id.
fn temp_prefix(pid: u32) -> String {
    format!(".fetch-ml-{pid}-")
}

/// Removes temporary output files in `dir` left by fetch-ml runs that were killed (their
/// process no longer exists). Files of running processes and of anyone else are left alone.
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".fetch-ml-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid <= 0 || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        if crate::sys::process_gone(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Checks before any long work that `path` can receive an output of `what` (a flag name):
/// its folder exists and takes files, it is not a folder, and it has extension `ext` if given.
pub fn check_target(what: &str, path: &Path, ext: Option<&str>) -> Result<()> {
    if path == Path::new("-") {
        return Ok(());
    }
    if let Some(ext) = ext {
        let got = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if got.as_deref() != Some(ext) {
            anyhow::bail!(
                "{what} {}: the file is written as {}; give a name ending in .{ext}",
                path.display(),
                ext.to_ascii_uppercase()
            );
        }
    }
    if path.is_dir() {
        anyhow::bail!("{what} {}: is a folder; give a file name", path.display());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "{what} {}: the folder {} does not exist; create it first",
            path.display(),
            dir.display()
        );
    }
    tempfile::Builder::new()
        .prefix(&temp_prefix(std::process::id()))
        .tempfile_in(dir)
        .with_context(|| {
            format!(
                "{what} {}: cannot write in {}",
                path.display(),
                dir.display()
            )
        })?;
    Ok(())
}

/// A progress bar on stderr; invisible when stderr is not a terminal, or with `--quiet`.
pub fn progress_bar(total: Option<u64>, message: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let target = || match crate::notes::quiet() {
        true => ProgressDrawTarget::hidden(),
        false => ProgressDrawTarget::stderr(),
    };
    let bar = ProgressBar::with_draw_target(total, target());
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
