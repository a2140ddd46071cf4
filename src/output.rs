//! Where results go: standard output; a file written to a temporary name and renamed into
//! place only when complete, so a failed run never leaves a half-written file; or, when the
//! path is a device node or a named pipe, that file itself, written in place (see
//! [`crate::atomic`]).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::atomic::{classify, parent_of, NewFile, Target};

/// A buffered output that is committed by [`Output::finish`].
pub struct Output {
    inner: Sink,
}

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    /// A device node or named pipe: written as it is, like standard output.
    InPlace {
        file: BufWriter<File>,
        path: PathBuf,
    },
    File {
        tmp: BufWriter<NewFile>,
        path: PathBuf,
    },
}

impl Output {
    /// Standard output when `path` is `None` or `-`; `path` itself when it is a device node or
    /// a named pipe (opening a pipe waits for its reader); else a temporary file beside it.
    pub fn create(path: Option<&Path>) -> Result<Self> {
        let inner = match path {
            None => Sink::Stdout(BufWriter::new(io::stdout())),
            Some(p) if p == Path::new("-") => Sink::Stdout(BufWriter::new(io::stdout())),
            Some(p) => match classify(p).with_context(|| format!("--output {}", p.display()))? {
                Target::Folder => {
                    anyhow::bail!("--output {}: is a folder; give a file name", p.display())
                }
                target @ (Target::InPlace | Target::Descriptor(_)) => {
                    let file = open_in_place(p, &target)
                        .with_context(|| format!("--output {}: cannot open it", p.display()))?;
                    Sink::InPlace {
                        file: BufWriter::with_capacity(1 << 16, file),
                        path: p.to_path_buf(),
                    }
                }
                Target::Replace(target) => {
                    let tmp = NewFile::create(&target).with_context(|| {
                        format!(
                            "--output {}: cannot create a file in {}",
                            p.display(),
                            parent_of(&target).display()
                        )
                    })?;
                    Sink::File {
                        tmp: BufWriter::with_capacity(1 << 16, tmp),
                        path: p.to_path_buf(),
                    }
                }
            },
        };
        Ok(Self { inner })
    }

    /// True when what is written goes out at once and cannot be taken back (standard output,
    /// a device node, a named pipe), so a failure leaves an incomplete output.
    pub fn is_streamed(&self) -> bool {
        !matches!(self.inner, Sink::File { .. })
    }

    /// Flushes a file output and gives the [`crate::job::FileSum`] of what it holds, before it
    /// is renamed into place; `None` for a streamed output.
    pub fn sum(&mut self) -> Result<Option<crate::job::FileSum>> {
        match &mut self.inner {
            Sink::File { tmp, path } => {
                tmp.flush()
                    .with_context(|| format!("writing {}", path.display()))?;
                let f = tmp.get_ref();
                Ok(Some(crate::job::file_sum_as(f.temp_path(), f.target())?))
            }
            _ => Ok(None),
        }
    }

    /// The path a file output replaces when it is renamed into place (symlinks resolved);
    /// `None` for a streamed output.
    pub fn replaces(&self) -> Option<&Path> {
        match &self.inner {
            Sink::File { tmp, .. } => Some(tmp.get_ref().target()),
            _ => None,
        }
    }

    /// Overwrites `bytes` at `offset` of a file output, for a header whose content is known
    /// only at the end (the row count of a .npy file). Not possible on a streamed output.
    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        match &mut self.inner {
            Sink::File { tmp, path } => tmp
                .flush()
                .and_then(|_| tmp.get_ref().file().write_all_at(bytes, offset))
                .with_context(|| format!("writing {}", path.display())),
            _ => anyhow::bail!("cannot rewrite a header on a streamed output"),
        }
    }

    /// Flushes and, for a file, renames it into place.
    pub fn finish(self) -> Result<()> {
        match self.inner {
            Sink::Stdout(mut w) => w.flush().context("writing to standard output"),
            Sink::InPlace { mut file, path } => file
                .flush()
                .with_context(|| format!("writing {}", path.display())),
            Sink::File { tmp, path } => {
                let tmp = tmp
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("writing {}", path.display()))?;
                tmp.commit()
                    .with_context(|| format!("moving the output into place at {}", path.display()))
            }
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Sink::Stdout(w) => w.write(buf),
            Sink::InPlace { file, .. } => file.write(buf),
            Sink::File { tmp, .. } => tmp.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Sink::Stdout(w) => w.flush(),
            Sink::InPlace { file, .. } => file.flush(),
            Sink::File { tmp, .. } => tmp.flush(),
        }
    }
}

/// Checks before any long work that `path` can receive an output of `what` (a flag name):
/// it is not a folder, it has extension `ext` if given, and either it is a device node or a
/// named pipe that can be opened for writing, or its folder exists and takes files.
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
    let target = classify(path).with_context(|| format!("{what} {}", path.display()))?;
    let target = match target {
        Target::Folder => anyhow::bail!("{what} {}: is a folder; give a file name", path.display()),
        Target::InPlace => return check_writable(what, path),
        Target::Descriptor(_) => return Ok(()),
        Target::Replace(t) => t,
    };
    let dir = parent_of(&target);
    if !dir.is_dir() {
        anyhow::bail!(
            "{what} {}: the folder {} does not exist; create it first",
            path.display(),
            dir.display()
        );
    }
    NewFile::create(&target).with_context(|| {
        format!(
            "{what} {}: cannot write in {}",
            path.display(),
            dir.display()
        )
    })?;
    Ok(())
}

/// Opens a device node or named pipe for writing (a pipe waits for its reader), or duplicates
/// the descriptor that `path` names.
pub fn open_in_place(path: &Path, target: &Target) -> io::Result<File> {
    match target {
        Target::Descriptor(fd) => crate::atomic::open_descriptor(*fd),
        _ => std::fs::OpenOptions::new().write(true).open(path),
    }
}

/// Whether this process may write to `path` (without opening it: a named pipe would wait).
fn check_writable(what: &str, path: &Path) -> Result<()> {
    crate::sys::may_write(path)
        .with_context(|| format!("{what} {}: cannot write to it", path.display()))
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
