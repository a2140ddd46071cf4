//! Labelled data sets for the multitask model: JSONL or CSV, validated before any training.
//!
//! Each row has a `text` and up to two labels, `class` and `sentiment`. A row may lack one
//! label (missing, null or empty): that head's loss skips it, so single-task data sets can be
//! mixed. Every problem is reported with its file and line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Why a data set cannot be used; every variant names the file, and the line where there is
/// one.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: cannot read the file")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{file}: unknown data format '.{ext}'; use a .jsonl file (one {{\"text\", \"class\", \
         \"sentiment\"}} object per line) or a .csv file with a text,class,sentiment header"
    )]
    UnknownFormat { file: String, ext: String },
    #[error("{file}: the file has no rows")]
    NoRows { file: String },
    #[error("{file}, line {line}: {problem}")]
    Row {
        file: String,
        line: usize,
        problem: RowProblem,
    },
    #[error(
        "{file}, line {line}: {task} label '{label}' never occurs in the training data \
         (known: {known})"
    )]
    UnknownLabel {
        file: String,
        line: usize,
        task: &'static str,
        label: String,
        known: String,
    },
}

/// What is wrong with one row of a data file.
#[derive(Debug, thiserror::Error)]
pub enum RowProblem {
    #[error("not valid UTF-8{}", .0.map(|c| format!(" (bad byte at column {c})")).unwrap_or_default())]
    NotUtf8(Option<usize>),
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("expected a JSON object with \"text\", \"class\" and \"sentiment\"")]
    NotObject,
    #[error("\"{field}\" must be {expected}, got {got}")]
    FieldType {
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("the row has no text")]
    NoText,
    #[error("the row has neither a class nor a sentiment label")]
    NoLabel,
    #[error("cannot read the CSV header: {0}")]
    CsvHeader(String),
    #[error("the CSV header has no '{column}' column (found: {found}); the header must name text, class and sentiment")]
    MissingColumn { column: &'static str, found: String },
    #[error("malformed CSV: {0}")]
    MalformedCsv(String),
}

type Result<T, E = DataError> = std::result::Result<T, E>;

fn row(file: &str, line: usize, problem: RowProblem) -> DataError {
    DataError::Row {
        file: file.to_string(),
        line,
        problem,
    }
}

/// The training set shipped with the tool (`data/multitask/train.jsonl`).
pub const DEFAULT_TRAIN: &str = include_str!("../data/multitask/train.jsonl");
/// The evaluation set shipped with the tool (`data/multitask/eval.jsonl`).
pub const DEFAULT_EVAL: &str = include_str!("../data/multitask/eval.jsonl");

/// Where a data set comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    File(PathBuf),
    /// A data set built into the binary: its name and JSONL text.
    BuiltIn(&'static str, &'static str),
}

impl DataSource {
    pub fn default_train() -> Self {
        DataSource::BuiltIn("data/multitask/train.jsonl (built in)", DEFAULT_TRAIN)
    }
    pub fn default_eval() -> Self {
        DataSource::BuiltIn("data/multitask/eval.jsonl (built in)", DEFAULT_EVAL)
    }
    pub fn name(&self) -> String {
        match self {
            DataSource::File(p) => p.display().to_string(),
            DataSource::BuiltIn(name, _) => name.to_string(),
        }
    }
}

/// The two tasks' names, as in the data files and reports.
pub const TASKS: [&str; 2] = ["class", "sentiment"];

/// One labelled sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    /// Labels per task, in [`TASKS`] order; `None` where the row has none.
    pub labels: [Option<String>; 2],
    /// Line in the source file, for messages.
    pub line: usize,
}

/// A data set as read from one source.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub examples: Vec<Example>,
}

impl Dataset {
    /// Reads and validates a data set; the format follows the extension (.jsonl/.json or .csv).
    pub fn load(source: &DataSource) -> Result<Self> {
        let name = source.name();
        let examples = match source {
            DataSource::BuiltIn(_, text) => parse_jsonl(text.as_bytes(), &name)?,
            DataSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| DataError::Read {
                    file: name.clone(),
                    source,
                })?;
                match extension(path).as_str() {
                    "jsonl" | "json" | "ndjson" => parse_jsonl(&bytes, &name)?,
                    "csv" => parse_csv(&bytes, &name)?,
                    other => {
                        return Err(DataError::UnknownFormat {
                            file: name,
                            ext: other.to_string(),
                        })
                    }
                }
            }
        };
        if examples.is_empty() {
            return Err(DataError::NoRows { file: name });
        }
        Ok(Self { name, examples })
    }

    /// The sorted label set of each task.
    pub fn label_sets(&self) -> [Vec<String>; 2] {
        let set = |t: usize| -> Vec<String> {
            let s: BTreeSet<&String> = self
                .examples
                .iter()
                .filter_map(|e| e.labels[t].as_ref())
                .collect();
            s.into_iter().cloned().collect()
        };
        [set(0), set(1)]
    }

    /// Label indices per example and task, checked against `labels`: an unknown label is an
    /// error naming the label and the line.
    pub fn label_ids(&self, labels: &[Vec<String>; 2]) -> Result<Vec<[Option<u32>; 2]>> {
        self.examples
            .iter()
            .map(|e| {
                let mut ids = [None, None];
                for t in 0..2 {
                    if let Some(l) = &e.labels[t] {
                        let id = labels[t].iter().position(|k| k == l).ok_or_else(|| {
                            DataError::UnknownLabel {
                                file: self.name.clone(),
                                line: e.line,
                                task: TASKS[t],
                                label: l.clone(),
                                known: labels[t].join(", "),
                            }
                        })?;
                        ids[t] = Some(id as u32);
                    }
                }
                Ok(ids)
            })
            .collect()
    }

    /// Keeps the first `n` examples.
    pub fn truncate(&mut self, n: usize) {
        self.examples.truncate(n);
    }
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// A label value: a string (trimmed) or a number; null or empty means no label. Labels are
/// text: a number is the shortest text of its value (`1`, `1.0` and `1e0` are all `"1"`,
/// `2.50` is `"2.5"`), so it is the same label as that string in JSONL or CSV.
fn label_of(
    v: Option<&serde_json::Value>,
    name: &str,
    line: usize,
    field: &'static str,
) -> Result<Option<String>> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(non_empty(s)),
        Some(serde_json::Value::Number(n)) => Ok(Some(number_label(n))),
        Some(other) => Err(row(
            name,
            line,
            RowProblem::FieldType {
                field,
                expected: "a string or null",
                got: other.to_string(),
            },
        )),
    }
}

/// The text of a numeric label: integers exactly, other numbers as the shortest decimal that
/// reads back as the same f64 (Rust's `Display`, which writes 1.0 as `1`).
fn number_label(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        n.as_f64().map_or_else(|| n.to_string(), |f| f.to_string())
    }
}

fn non_empty(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Checks that a row has text and at least one label.
fn example(
    text: Option<String>,
    labels: [Option<String>; 2],
    name: &str,
    line: usize,
) -> Result<Example> {
    let Some(text) = text else {
        return Err(row(name, line, RowProblem::NoText));
    };
    if labels.iter().all(Option::is_none) {
        return Err(row(name, line, RowProblem::NoLabel));
    }
    Ok(Example { text, labels, line })
}

fn parse_jsonl(bytes: &[u8], name: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw)
            .map_err(|e| row(name, line, RowProblem::NotUtf8(Some(e.valid_up_to() + 1))))?;
        if text.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| row(name, line, RowProblem::NotJson(e.to_string())))?;
        let Some(obj) = v.as_object() else {
            return Err(row(name, line, RowProblem::NotObject));
        };
        let text = match obj.get("text") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => non_empty(s).map(|_| s.clone()),
            Some(other) => {
                let got = other.to_string();
                let problem = RowProblem::FieldType {
                    field: "text",
                    expected: "a string",
                    got,
                };
                return Err(row(name, line, problem));
            }
        };
        let labels = [
            label_of(obj.get(TASKS[0]), name, line, TASKS[0])?,
            label_of(obj.get(TASKS[1]), name, line, TASKS[1])?,
        ];
        out.push(example(text, labels, name, line)?);
    }
    Ok(out)
}

fn parse_csv(bytes: &[u8], name: &str) -> Result<Vec<Example>> {
    if let Err(e) = std::str::from_utf8(bytes) {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        return Err(row(name, line, RowProblem::NotUtf8(None)));
    }
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| row(name, 1, RowProblem::CsvHeader(e.to_string())))?
        .clone();
    let col = |c: &str| headers.iter().position(|h| h.trim() == c);
    let text_col = col("text");
    let label_cols = [col(TASKS[0]), col(TASKS[1])];
    for (c, present) in [
        ("text", text_col),
        (TASKS[0], label_cols[0]),
        (TASKS[1], label_cols[1]),
    ] {
        if present.is_none() {
            let found = headers.iter().collect::<Vec<_>>().join(", ");
            return Err(row(name, 1, RowProblem::MissingColumn { column: c, found }));
        }
    }
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            row(name, line, RowProblem::MalformedCsv(e.to_string()))
        })?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let get = |c: Option<usize>| c.and_then(|i| record.get(i)).and_then(non_empty);
        let text = text_col
            .and_then(|i| record.get(i))
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string);
        let labels = [get(label_cols[0]), get(label_cols[1])];
        out.push(example(text, labels, name, line)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
