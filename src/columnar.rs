//! Columnar embedding files for data frames and vector stores: Apache Parquet, and NumPy's
//! `.npy` with a JSONL sidecar. Both are written through [`Output`] (a temporary file renamed
//! into place when complete) and stream: rows go out as each chunk of sentences finishes, so
//! memory stays flat whatever the input size.
//!
//! Parquet columns: `index` (int64, the sentence's 0-based line number in the input), `text`
//! (utf8), `tokens` (int32), `truncated` (bool), `embedding` (fixed-size list of float32 of
//! the model's dimension). One row group per chunk (a chunk is bounded in sentences and in
//! bytes of text), Snappy-compressed, no dictionaries. The file's key-value metadata
//! `fetch-ml` holds the run's model description as JSON.
//!
//! With `--chunks rows`, each row is one window of an input: Parquet adds the columns
//! `window` (int32, its number), `char_start` and `char_end` (int64, its characters in the
//! input) after `index`, and the `.npy` sidecar the same keys.
//!
//! `.npy`: format version 1.0, `<f4` (float32 little-endian), C order, shape `(rows, dim)`.
//! Row k is the sentence on line k of the sidecar `PATH.meta.jsonl` (`index`, `text`,
//! `tokens`, `truncated`). The header is written first with room for any row count and
//! rewritten with the real one at the end; a matrix written in place (a device node or a named
//! pipe) is spooled to an unnamed temporary file until the count is known. The pair completes
//! with the matrix's rename, and an earlier matrix at the path is removed before the sidecar
//! is replaced, so a matrix that exists always has its own sidecar.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::builder::StringBuilder;
use arrow_array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Int32Array, Int64Array, RecordBatch,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::output::Output;

/// The key of the Parquet file metadata entry that describes the run.
pub const PARQUET_META_KEY: &str = "fetch-ml";

/// One embedded sentence, as the columnar writers take it.
pub struct Row<'a> {
    /// The sentence's 0-based line number in the input.
    pub index: u64,
    pub text: &'a str,
    pub tokens: usize,
    pub truncated: bool,
    pub embedding: &'a [f32],
    /// The window this row is (`--chunks rows`).
    pub window: Option<RowWindow>,
}

/// Which window of its input a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RowWindow {
    /// 0-based number among the input's windows.
    pub window: u32,
    /// Its characters in the input, `char_start..char_end`.
    pub char_start: u64,
    pub char_end: u64,
}

/// Streams rows into a Parquet file, one row group per [`ParquetSink::end_chunk`].
pub struct ParquetSink {
    writer: ArrowWriter<Output>,
    schema: SchemaRef,
    dim: usize,
    index: Vec<i64>,
    text: StringBuilder,
    tokens: Vec<i32>,
    truncated: Vec<bool>,
    values: Vec<f32>,
    /// `Some` when the rows are windows: the window columns.
    windows: Option<Vec<RowWindow>>,
    path: PathBuf,
}

impl ParquetSink {
    /// Starts `path` (written to a temporary file until [`ParquetSink::finish`]) for vectors of
    /// `dim` numbers; `meta` (JSON) goes into the file metadata under [`PARQUET_META_KEY`].
    /// With `windows`, the rows are windows and carry the window columns.
    pub fn create(path: &Path, dim: usize, meta: String, windows: bool) -> Result<Self> {
        let item = Field::new("item", DataType::Float32, false);
        let mut fields = vec![Field::new("index", DataType::Int64, false)];
        if windows {
            fields.extend([
                Field::new("window", DataType::Int32, false),
                Field::new("char_start", DataType::Int64, false),
                Field::new("char_end", DataType::Int64, false),
            ]);
        }
        let schema = Arc::new(Schema::new(
            [
                fields,
                vec![
                    Field::new("text", DataType::Utf8, false),
                    Field::new("tokens", DataType::Int32, false),
                    Field::new("truncated", DataType::Boolean, false),
                    Field::new(
                        "embedding",
                        DataType::FixedSizeList(Arc::new(item), dim as i32),
                        false,
                    ),
                ],
            ]
            .concat(),
        ));
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            // Sentences are mostly distinct and vectors never repeat: dictionaries only cost.
            .set_dictionary_enabled(false)
            .set_key_value_metadata(Some(vec![KeyValue::new(
                PARQUET_META_KEY.to_string(),
                meta,
            )]))
            .build();
        let out = Output::create(Some(path))?;
        let writer = ArrowWriter::try_new(out, schema.clone(), Some(props))
            .with_context(|| format!("--output {}: starting the Parquet file", path.display()))?;
        Ok(Self {
            writer,
            schema,
            dim,
            index: Vec::new(),
            text: StringBuilder::new(),
            tokens: Vec::new(),
            truncated: Vec::new(),
            values: Vec::new(),
            windows: windows.then(Vec::new),
            path: path.to_path_buf(),
        })
    }

    /// Buffers one row until the end of the chunk.
    pub fn row(&mut self, r: &Row) -> Result<()> {
        anyhow::ensure!(r.embedding.len() == self.dim, "vector of the wrong size");
        if let Some(w) = &mut self.windows {
            w.push(
                r.window
                    .context("a row without its window in a file of windows")?,
            );
        }
        self.index.push(r.index as i64);
        self.text.append_value(r.text);
        self.tokens.push(r.tokens as i32);
        self.truncated.push(r.truncated);
        self.values.extend_from_slice(r.embedding);
        Ok(())
    }

    /// Writes the buffered rows as one row group.
    pub fn end_chunk(&mut self) -> Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values = Float32Array::from(std::mem::take(&mut self.values));
        let embedding = FixedSizeListArray::try_new(item, self.dim as i32, Arc::new(values), None)?;
        let mut columns: Vec<ArrayRef> =
            vec![Arc::new(Int64Array::from(std::mem::take(&mut self.index)))];
        if let Some(w) = &mut self.windows {
            let w = std::mem::take(w);
            columns.push(Arc::new(Int32Array::from_iter_values(
                w.iter().map(|w| w.window as i32),
            )));
            columns.push(Arc::new(Int64Array::from_iter_values(
                w.iter().map(|w| w.char_start as i64),
            )));
            columns.push(Arc::new(Int64Array::from_iter_values(
                w.iter().map(|w| w.char_end as i64),
            )));
        }
        columns.extend::<[ArrayRef; 4]>([
            Arc::new(self.text.finish()),
            Arc::new(Int32Array::from(std::mem::take(&mut self.tokens))),
            Arc::new(BooleanArray::from(std::mem::take(&mut self.truncated))),
            Arc::new(embedding),
        ]);
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        let fail = || format!("writing {}", self.path.display());
        self.writer.write(&batch).with_context(fail)?;
        self.writer.flush().with_context(fail)?;
        Ok(())
    }

    /// Whether the file is written in place (a device node or named pipe).
    pub fn is_streamed(&self) -> bool {
        self.writer.inner().is_streamed()
    }

    /// Writes the last rows and the footer, and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        self.end_chunk()?;
        let path = self.path.clone();
        let out = self
            .writer
            .into_inner()
            .with_context(|| format!("writing {}", path.display()))?;
        out.finish()
    }
}

/// The sidecar of a `.npy` output: `PATH.meta.jsonl`.
pub fn npy_sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".meta.jsonl");
    PathBuf::from(s)
}

/// Bytes of the `.npy` header, magic included: room for any row count, a multiple of 64.
const NPY_HEADER: usize = 128;

/// The `.npy` v1.0 header of a `rows x dim` float32 C-order matrix, `NPY_HEADER` bytes long.
pub fn npy_header(rows: u64, dim: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    let len = (NPY_HEADER - 10) as u16;
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.resize(NPY_HEADER - 1, b' ');
    h.push(b'\n');
    h
}

/// Streams rows into a `.npy` matrix and its JSONL sidecar.
pub struct NpySink {
    matrix: Output,
    /// The rows of a matrix written in place, kept until their count is known.
    spool: Option<std::io::BufWriter<std::fs::File>>,
    sidecar: Output,
    dim: usize,
    rows: u64,
    buf: Vec<u8>,
    path: PathBuf,
}

/// One line of the `.npy` sidecar.
#[derive(serde::Serialize)]
struct SidecarRow<'a> {
    index: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    window: Option<RowWindow>,
    text: &'a str,
    tokens: usize,
    truncated: bool,
}

impl NpySink {
    /// Starts `path` and its sidecar [`npy_sidecar`] (both temporary until finished).
    pub fn create(path: &Path, dim: usize) -> Result<Self> {
        let mut matrix = Output::create(Some(path))?;
        let sidecar = Output::create(Some(&npy_sidecar(path)))?;
        let spool = if matrix.is_streamed() {
            let f = tempfile::tempfile().context("creating a temporary file for the matrix")?;
            Some(std::io::BufWriter::with_capacity(1 << 16, f))
        } else {
            matrix
                .write_all(&npy_header(0, dim))
                .with_context(|| format!("writing {}", path.display()))?;
            None
        };
        Ok(Self {
            matrix,
            spool,
            sidecar,
            dim,
            rows: 0,
            buf: Vec::new(),
            path: path.to_path_buf(),
        })
    }

    /// Whether the sidecar is written in place (the matrix of a device node or named pipe is
    /// spooled, and only written at the end).
    pub fn is_streamed(&self) -> bool {
        self.sidecar.is_streamed()
    }

    pub fn row(&mut self, r: &Row) -> Result<()> {
        anyhow::ensure!(r.embedding.len() == self.dim, "vector of the wrong size");
        self.buf.clear();
        for v in r.embedding {
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
        match &mut self.spool {
            Some(s) => s.write_all(&self.buf)?,
            None => self.matrix.write_all(&self.buf)?,
        }
        let meta = SidecarRow {
            index: r.index,
            window: r.window,
            text: r.text,
            tokens: r.tokens,
            truncated: r.truncated,
        };
        writeln!(self.sidecar, "{}", serde_json::to_string(&meta)?)?;
        self.rows += 1;
        Ok(())
    }

    /// Writes the real row count into the header and renames both files into place: an
    /// earlier matrix at the path is removed first, then the sidecar is renamed, then the
    /// matrix. A kill at any point leaves either no matrix or a matrix with its own sidecar.
    /// With `sum`, returns the sums of the matrix and the sidecar as written (before the
    /// renames; empty for a streamed output).
    pub fn finish(mut self, sum: bool) -> Result<Vec<crate::job::FileSum>> {
        let header = npy_header(self.rows, self.dim);
        let fail = || format!("writing {}", self.path.display());
        match self.spool.take() {
            Some(spool) => {
                let mut f = spool.into_inner().map_err(|e| e.into_error())?;
                use std::io::Seek;
                f.seek(std::io::SeekFrom::Start(0))?;
                self.matrix.write_all(&header).with_context(fail)?;
                std::io::copy(&mut f, &mut self.matrix).with_context(fail)?;
            }
            None => self.matrix.write_at(0, &header)?,
        }
        let mut sums = Vec::new();
        if sum {
            sums.extend(self.matrix.sum()?);
            sums.extend(self.sidecar.sum()?);
        }
        if let Some(old) = self.matrix.replaces() {
            match std::fs::remove_file(old) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("removing the earlier {}", old.display()))
                }
            }
        }
        self.sidecar.finish()?;
        crate::atomic::fault_point("output-commit-2");
        self.matrix.finish()?;
        crate::atomic::fault_point("output-commit-3");
        Ok(sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_fixed_size_and_parses() {
        for rows in [0, 7, u64::MAX] {
            let h = npy_header(rows, 768);
            assert_eq!(h.len(), NPY_HEADER);
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize, NPY_HEADER - 10);
            let dict = std::str::from_utf8(&h[10..]).unwrap();
            assert!(dict.ends_with('\n'));
            assert!(dict.contains(&format!("'shape': ({rows}, 768)")), "{dict}");
        }
    }

    #[test]
    fn sidecar_name() {
        assert_eq!(
            npy_sidecar(Path::new("out/emb.npy")),
            PathBuf::from("out/emb.npy.meta.jsonl")
        );
    }
}
