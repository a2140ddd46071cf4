//! A data set ready for the model: its texts, their tokens and their label indices. Shared by
//! the training loop and evaluation, which otherwise do not depend on each other's modules.

use anyhow::Result;

use crate::data::Dataset;
use crate::tokenize::{name_sentence, Encoded, TextTokenizer};

/// Tokenized sentences with their label indices.
pub struct Prepared {
    pub texts: Vec<String>,
    pub encoded: Vec<Encoded>,
    pub labels: Vec<[Option<u32>; 2]>,
    /// Each example's line in its file (1-based).
    pub lines: Vec<usize>,
}

impl Prepared {
    /// Tokenizes the examples of `data`, whose label indices are `labels` (one per example);
    /// a sentence the tokenizer refuses is named by its file and line.
    pub fn tokenize(
        data: &Dataset,
        labels: Vec<[Option<u32>; 2]>,
        tokenizer: &TextTokenizer,
    ) -> Result<Self> {
        let texts: Vec<&str> = data.examples.iter().map(|e| e.text.as_str()).collect();
        let encoded = tokenizer.encode(&texts).map_err(|e| {
            name_sentence(e, |i| {
                format!("{}, line {}", data.name, data.examples[i].line)
            })
        })?;
        Ok(Self {
            texts: texts.iter().map(|t| t.to_string()).collect(),
            encoded,
            labels,
            lines: data.examples.iter().map(|e| e.line).collect(),
        })
    }
}
