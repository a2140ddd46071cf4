//! Tokenizer loading, truncation (of either end), and padded batches of token ids.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::Device;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::hub::TokenizerFiles;

mod batches;
pub use batches::{length_sorted_batches, Batch};

/// One tokenized sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// True when the sentence was longer than the max length and lost its tail.
    pub truncated: bool,
}

/// Which end of an input longer than the max length is cut (text-embeddings-inference's
/// `truncation_direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TruncateSide {
    /// Keep the first tokens.
    #[default]
    Right,
    /// Keep the last tokens.
    Left,
}

/// A tokenizer set up for batch-longest padding and truncation at `max_len` tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
    max_len: usize,
    side: TruncateSide,
    lowercase_input: bool,
    pad_id: u32,
    /// Token ids must be below this (the model's `vocab_size`).
    vocab_limit: Option<u32>,
    /// Truncation keeps the end of a long text instead of its start.
    keep_end: bool,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, or builds a BERT WordPiece tokenizer from `vocab.txt`.
    /// `max_len` counts the special tokens, as Hugging Face's `max_length` does.
    pub fn load(
        files: &TokenizerFiles,
        max_len: usize,
        lowercase_input: bool,
        pad_id: u32,
    ) -> Result<Self> {
        let mut inner = match files {
            TokenizerFiles::Json(path) => Tokenizer::from_file(path)
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("reading tokenizer {}", path.display()))?,
            TokenizerFiles::Vocab {
                vocab,
                tokenizer_config,
            } => wordpiece_from_vocab(vocab, tokenizer_config.as_deref())?,
        };
        // Files may carry fixed padding and their own truncation: both are ours to set.
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| anyhow!("setting truncation to {max_len} tokens: {e}"))?;
        Ok(Self {
            inner,
            max_len,
            side: TruncateSide::Right,
            lowercase_input,
            pad_id,
            vocab_limit: None,
            keep_end: false,
        })
    }

    /// A copy that truncates a long text from its start, keeping its end (the server's
    /// `truncation_direction: Left`).
    pub fn keeping_end(&self) -> Result<Self> {
        let mut inner = self.inner.clone();
        inner
            .with_truncation(Some(TruncationParams {
                max_length: self.max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Left,
            }))
            .map_err(|e| anyhow!("setting truncation to {} tokens: {e}", self.max_len))?;
        Ok(Self {
            inner,
            keep_end: true,
            ..*self
        })
    }

    /// Cuts long inputs at `side`: the kept tokens are the first or the last ones (special
    /// tokens are added after the cut, so `[CLS]` and `[SEP]` stay).
    pub fn set_truncate_side(&mut self, side: TruncateSide) -> Result<()> {
        let direction = match side {
            TruncateSide::Right => TruncationDirection::Right,
            TruncateSide::Left => TruncationDirection::Left,
        };
        let max_length = self.max_len;
        self.inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction,
            }))
            .map_err(|e| anyhow!("setting truncation to {max_length} tokens: {e}"))?;
        self.side = side;
        Ok(())
    }

    /// Makes a token id at or above `vocab_size` (a tokenizer that does not match the model)
    /// an error naming the sentence, instead of a failure deep inside the model.
    pub fn with_vocab_limit(mut self, vocab_size: usize) -> Self {
        self.vocab_limit = Some(vocab_size.min(u32::MAX as usize) as u32);
        self
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Tokenizes `texts`, adding the special tokens and truncating to the max length.
    ///
    /// The work per sentence is bounded whatever its length: a text longer than a budget of
    /// bytes is tokenized from its head only (cut at whitespace, so the words kept tokenize as
    /// in the whole text), growing the head until it yields more tokens than are kept. The
    /// tokens are then exactly those of the whole text. A tokenizer error (or a panic inside
    /// the tokenizer, such as a pathological regex in a hostile `tokenizer.json`) is an error
    /// that gives the sentence's position in `texts`.
    /// With [`Self::keeping_end`], texts are tokenized whole (the head is not what is kept).
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Encoded>> {
        let budget = if self.keep_end {
            usize::MAX
        } else {
            self.head_budget()
        };
        let short: Vec<usize> = (0..texts.len())
            .filter(|&i| texts[i].as_ref().len() <= budget)
            .collect();
        let inputs: Vec<String> = short
            .iter()
            .map(|&i| self.prepare(texts[i].as_ref()))
            .collect();
        let mut out: Vec<Option<Encoded>> = vec![None; texts.len()];
        match guarded(|| self.inner.encode_batch_fast(inputs, true)) {
            Ok(Ok(encodings)) => {
                for (&i, e) in short.iter().zip(encodings) {
                    out[i] = Some(to_encoded(&e));
                }
            }
            // Find the sentence at fault, one at a time.
            _ => {
                for &i in &short {
                    out[i] = Some(self.encode_one(texts[i].as_ref(), i)?);
                }
            }
        }
        for (i, slot) in out.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = Some(self.encode_long(texts[i].as_ref(), budget, i)?);
            }
        }
        let out: Vec<Encoded> = out
            .into_iter()
            .map(|e| e.expect("every text encoded"))
            .collect();
        self.check_vocab(&out, |i| i)?;
        Ok(out)
    }

    /// A token id outside the model's vocabulary is a [`TokenizeError`] naming the text at
    /// `index(i)` for the `i`-th of `encoded`.
    pub(crate) fn check_vocab(
        &self,
        encoded: &[Encoded],
        index: impl Fn(usize) -> usize,
    ) -> Result<()> {
        if let Some(limit) = self.vocab_limit {
            for (i, e) in encoded.iter().enumerate() {
                let index = index(i);
                if let Some(&id) = e.ids.iter().find(|&&id| id >= limit) {
                    let token = self.inner.id_to_token(id).unwrap_or_default();
                    return Err(TokenizeError {
                        index,
                        message: format!(
                            "token id {id} ({token:?}) is outside the model's vocabulary of \
                             {limit} (vocab_size in config.json); the tokenizer and the weights \
                             belong to different models"
                        ),
                    }
                    .into());
                }
            }
        }
        Ok(())
    }

    /// The tokenizer's whole encoding of one text (tokens, offsets, special-token mask),
    /// lower-cased and truncated as [`Self::encode`] does, with or without special tokens.
    pub fn encode_detailed(&self, text: &str, add_special_tokens: bool) -> Result<Encoding> {
        let input = self.prepare(text);
        match guarded(|| self.inner.encode(input, add_special_tokens)) {
            Ok(Ok(e)) => Ok(e),
            Ok(Err(e)) => Err(anyhow!("tokenizing: {e}")),
            Err(panic) => Err(anyhow!(
                "the tokenizer failed ({panic}); check tokenizer.json"
            )),
        }
    }

    /// Bytes of text tokenized at first for a long sentence: far more than `max_len` tokens
    /// take in any language (a token is rarely more than 16 bytes).
    fn head_budget(&self) -> usize {
        (self.max_len * 16).max(4096)
    }

    /// True when the text is lower-cased before tokenization (sentence-transformers'
    /// `do_lower_case`).
    pub fn lowercases_input(&self) -> bool {
        self.lowercase_input
    }

    /// The text as the tokenizer sees it.
    pub(crate) fn prepare(&self, text: &str) -> String {
        if self.lowercase_input {
            text.to_lowercase()
        } else {
            text.to_string()
        }
    }

    /// Tokenizes one sentence; `index` names it in an error.
    fn encode_one(&self, text: &str, index: usize) -> Result<Encoded> {
        let input = self.prepare(text);
        match guarded(|| self.inner.encode_fast(input, true)) {
            Ok(Ok(e)) => Ok(to_encoded(&e)),
            Ok(Err(e)) => Err(TokenizeError {
                index,
                message: e.to_string(),
            }
            .into()),
            Err(panic) => Err(TokenizeError {
                index,
                message: format!("the tokenizer failed ({panic}); check tokenizer.json"),
            }
            .into()),
        }
    }

    /// Tokenizes a long sentence from growing heads of it (or tails, when the left end is
    /// cut; see [`Self::encode`]).
    fn encode_long(&self, text: &str, mut budget: usize, index: usize) -> Result<Encoded> {
        loop {
            if budget >= text.len() {
                return self.encode_one(text, index);
            }
            let (part, whole_words) = match self.side {
                TruncateSide::Right => {
                    let head = cut_at_whitespace(text, budget);
                    let cut =
                        head.len() < budget.min(text.len()) || head.ends_with(char::is_whitespace);
                    (head, cut)
                }
                TruncateSide::Left => {
                    let tail = tail_at_whitespace(text, budget);
                    (tail, tail.starts_with(char::is_whitespace))
                }
            };
            let mut e = self.encode_one(part, index)?;
            if e.truncated {
                return Ok(e);
            }
            if !whole_words {
                // No whitespace to cut at: one giant "word". Keep this part.
                e.truncated = true;
                return Ok(e);
            }
            budget = budget.saturating_mul(4);
        }
    }
    /// Pads `items` to the longest and returns the model's input tensors.
    pub fn batch(&self, items: &[&Encoded], device: &Device) -> Result<Batch> {
        Batch::new(items, self.pad_id, device)
    }
}

/// Fewest tokens a prompt must leave for the sentence after it.
pub const MIN_SENTENCE_TOKENS: usize = 8;

/// A prompt so long that too few tokens are left for the sentence: every sentence would be
/// cut to (almost) nothing and get (almost) the same vector.
#[derive(Debug, thiserror::Error)]
#[error(
    "the prompt{} takes {tokens} tokens (with the special tokens) of the {max_len} the model \
     reads, which leaves {} for each sentence, fewer than {MIN_SENTENCE_TOKENS}: every sentence \
     would be cut to (almost) nothing and get (almost) the same vector",
    name.as_ref().map(|n| format!(" {n:?}")).unwrap_or_default(),
    max_len.saturating_sub(*tokens)
)]
pub struct PromptTooLong {
    /// The prompt's name in the model's `config_sentence_transformers.json`, if it has one.
    pub name: Option<String>,
    /// Its tokens with the special ones (at most `max_len`: it is cut there).
    pub tokens: usize,
    pub max_len: usize,
}

impl TextTokenizer {
    /// Fails with [`PromptTooLong`] when `prompt`, prepended to every sentence, leaves fewer
    /// than [`MIN_SENTENCE_TOKENS`] tokens for it. `name` is the prompt's name, if any.
    pub fn check_prompt(&self, prompt: &str, name: Option<&str>) -> Result<()> {
        let e = self.encode(&[prompt])?.remove(0);
        let tokens = if e.truncated {
            self.max_len
        } else {
            e.ids.len()
        };
        if tokens + MIN_SENTENCE_TOKENS > self.max_len {
            return Err(PromptTooLong {
                name: name.map(str::to_string),
                tokens,
                max_len: self.max_len,
            }
            .into());
        }
        Ok(())
    }
}

/// A sentence the tokenizer could not handle; `index` is its position in the texts given.
#[derive(Debug)]
pub struct TokenizeError {
    pub index: usize,
    pub message: String,
}

impl std::fmt::Display for TokenizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tokenizing: {}", self.message)
    }
}

impl std::error::Error for TokenizeError {}

fn to_encoded(e: &tokenizers::Encoding) -> Encoded {
    Encoded {
        truncated: !e.get_overflowing().is_empty(),
        ids: e.get_ids().to_vec(),
        type_ids: e.get_type_ids().to_vec(),
    }
}

/// The head of `text` of at most `budget` bytes, ending after the last whitespace in it
/// (or at a character boundary when it has none).
fn cut_at_whitespace(text: &str, budget: usize) -> &str {
    let mut end = budget.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let head = &text[..end];
    match head.rfind(char::is_whitespace) {
        Some(i) if i > 0 => &head[..i + head[i..].chars().next().map_or(1, char::len_utf8)],
        _ => head,
    }
}

/// The tail of `text` of at most `budget` bytes, starting at a whitespace character (kept, so
/// that the first word tokenizes as it does inside the whole text: byte-level BPE reads the
/// space as part of the word), or at a character boundary when it has none.
fn tail_at_whitespace(text: &str, budget: usize) -> &str {
    let mut start = text.len().saturating_sub(budget);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let tail = &text[start..];
    match tail.find(char::is_whitespace) {
        Some(i) => &tail[i..],
        None => tail,
    }
}

/// Names the sentence of a [`TokenizeError`] (or of a vector that is not finite, a
/// [`crate::finite::NonFiniteOutput`]) with `describe(index)`; other errors pass.
pub fn name_sentence(e: anyhow::Error, describe: impl Fn(usize) -> String) -> anyhow::Error {
    let index = e
        .downcast_ref::<TokenizeError>()
        .map(|t| t.index)
        .or_else(|| {
            e.downcast_ref::<crate::finite::NonFiniteOutput>()
                .map(|n| n.index)
        });
    match index {
        Some(i) => {
            let what = describe(i);
            e.context(what)
        }
        None => e,
    }
}

/// Runs `f`, turning a panic into an error message (the panic is not printed).
pub fn guarded<R>(f: impl FnOnce() -> R) -> std::result::Result<R, String> {
    crate::panics::quietly(f)
}

/// Builds the BERT WordPiece pipeline, lower-casing as `tokenizer_config.json` says
/// (`do_lower_case`, true when absent, as in Hugging Face's `BertTokenizer`).
fn wordpiece_from_vocab(vocab: &Path, tokenizer_config: Option<&Path>) -> Result<Tokenizer> {
    let lowercase = match tokenizer_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            v.get("do_lower_case")
                .and_then(|b| b.as_bool())
                .unwrap_or(true)
        }
        None => true,
    };
    let vocab_str = vocab.to_str().context("vocab path is not UTF-8")?;
    let model = WordPiece::from_file(vocab_str)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow!("reading {}: {e}", vocab.display()))?;
    let mut tok = Tokenizer::new(model);
    let special = |t: &str| -> Result<(String, u32)> {
        let id = tok
            .token_to_id(t)
            .with_context(|| format!("{} has no {t} token", vocab.display()))?;
        Ok((t.to_string(), id))
    };
    let (sep, cls) = (special("[SEP]")?, special("[CLS]")?);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
        .map_err(|e| anyhow!("{e}"))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(sep, cls)));
    tok.with_decoder(Some(WordPieceDecoder::default()));
    Ok(tok)
}
