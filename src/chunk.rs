//! Long inputs split into windows of tokens (`--chunk-tokens N`, `--chunk-overlap K`), and
//! the windows' vectors merged back into one per input (`--chunks mean`).
//!
//! An input whose tokens (special tokens and prompt included) fit in N gives one window, the
//! whole input. A longer one is tokenized whole, its text tokens are cut into runs that share
//! K tokens with the run before, and each run becomes a window of at most N tokens: the
//! special tokens, the prompt's tokens (every window carries the prompt), then the run. Each
//! window knows its number and the characters of the input it covers (from the tokenizer's
//! offsets; counted in characters, not bytes, so `text[start:end]` in Python is the window).
//! Merging weighs each window's vector by its token count (all the tokens the model saw:
//! special tokens and prompt included, overlapping tokens in both windows that hold them:
//! the mean a mean pooling over the windows' tokens would give) and, when the model
//! normalises, normalises the mean.

use std::ops::Range;

use anyhow::Result;
use tokenizers::{Encoding, PostProcessor, Token, Tokenizer};

use crate::model::pooling::normalize_l2;
use crate::tokenize::{guarded, Encoded, TextTokenizer, TokenizeError};

/// What becomes of an input's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ChunkMode {
    /// One vector per input: the token-weighted mean of its windows' vectors.
    #[default]
    Mean,
    /// One output row per window.
    Rows,
}

impl ChunkMode {
    pub fn name(self) -> &'static str {
        match self {
            ChunkMode::Mean => "mean",
            ChunkMode::Rows => "rows",
        }
    }
}

/// How long inputs are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpec {
    /// Tokens per window, special tokens and prompt included.
    pub tokens: usize,
    /// Tokens each window shares with the one before.
    pub overlap: usize,
    pub mode: ChunkMode,
}

/// Window sizes that cannot work. The messages name no flags; the CLI adds them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("windows of {tokens} tokens are longer than the max length of {limit} tokens")]
    OverLimit { tokens: usize, limit: usize },
    #[error(
        "windows of {tokens} tokens leave {room} for text after {fixed} special and prompt \
         tokens, which must be more than the {overlap} tokens of overlap"
    )]
    NoRoom {
        tokens: usize,
        fixed: usize,
        room: usize,
        overlap: usize,
    },
}

/// One window of an input.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The tokens the model sees.
    pub encoded: Encoded,
    /// 0-based position among the input's windows.
    pub number: usize,
    /// The characters of the input it covers (prompt excluded).
    pub chars: Range<usize>,
}

/// Splits inputs into windows with a copy of the model's tokenizer that does not truncate.
pub struct Chunker<'a> {
    tokenizer: &'a TextTokenizer,
    untruncated: Tokenizer,
    spec: ChunkSpec,
    prompt: Option<String>,
    /// Special tokens the tokenizer adds to one sequence (`[CLS]`, `[SEP]`: 2).
    specials: usize,
}

impl<'a> Chunker<'a> {
    /// A chunker for `tokenizer`'s model; `prompt` is prepended to every input (and so is in
    /// every window).
    pub fn new(
        tokenizer: &'a TextTokenizer,
        spec: ChunkSpec,
        prompt: Option<String>,
    ) -> Result<Self, ChunkError> {
        let limit = tokenizer.max_len();
        if spec.tokens > limit {
            return Err(ChunkError::OverLimit {
                tokens: spec.tokens,
                limit,
            });
        }
        let mut untruncated = tokenizer.inner().clone();
        untruncated
            .with_truncation(None)
            .expect("turning truncation off cannot fail");
        let specials = untruncated
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        let chunker = Self {
            tokenizer,
            untruncated,
            spec,
            prompt,
            specials,
        };
        // What every window spends before its text is known now, so sizes with no room for
        // the text are refused before any input is read, not at the first long one.
        let fixed = specials + chunker.prompt_tokens();
        chunker.check_room(fixed)?;
        Ok(chunker)
    }

    /// The prompt's tokens as [`Self::split`] counts them: those that end inside it, in front
    /// of a word (alone, a byte-level tokenizer makes a trailing space a token of its own,
    /// which in front of text joins the word). 0 without a prompt; a tokenizer error counts
    /// none, and the input that meets it names it.
    fn prompt_tokens(&self) -> usize {
        let Some(prompt) = self.prompt.as_deref().filter(|p| !p.is_empty()) else {
            return 0;
        };
        let whole = format!("{prompt}a");
        let prepared = self.tokenizer.prepare(&whole);
        let chars = CharMap::new(&whole, self.tokenizer.lowercases_input(), prompt);
        guarded(|| {
            self.untruncated
                .encode_char_offsets(prepared.as_str(), false)
        })
        .ok()
        .and_then(|e| e.ok())
        .map_or(0, |e| {
            let offsets = e.get_offsets();
            offsets.iter().take_while(|o| chars.in_prompt(o.1)).count()
        })
    }

    /// The tokens left for text in a window after `fixed` special and prompt tokens, when
    /// more than the overlap.
    fn check_room(&self, fixed: usize) -> Result<usize, ChunkError> {
        let room = self.spec.tokens.saturating_sub(fixed);
        if room <= self.spec.overlap {
            return Err(ChunkError::NoRoom {
                tokens: self.spec.tokens,
                fixed,
                room,
                overlap: self.spec.overlap,
            });
        }
        Ok(room)
    }

    pub fn spec(&self) -> ChunkSpec {
        self.spec
    }

    /// The windows of `text`; `index` names it in an error.
    pub fn split(&self, text: &str, index: usize) -> Result<Vec<Window>> {
        let prompt = self.prompt.as_deref().unwrap_or("");
        let whole = format!("{prompt}{text}");
        let prepared = self.tokenizer.prepare(&whole);
        let enc = match guarded(|| {
            self.untruncated
                .encode_char_offsets(prepared.as_str(), false)
        }) {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => return Err(tokenize_error(index, e.to_string())),
            Err(panic) => {
                return Err(tokenize_error(
                    index,
                    format!("the tokenizer failed ({panic}); check tokenizer.json"),
                ))
            }
        };
        let chars = CharMap::new(&whole, self.tokenizer.lowercases_input(), prompt);
        // The prompt's tokens: the leading ones that end inside it.
        let offsets = enc.get_offsets();
        let p = match prompt.is_empty() {
            true => 0,
            false => offsets.iter().take_while(|o| chars.in_prompt(o.1)).count(),
        };
        let content = enc.len() - p;
        let fixed = self.specials + p;
        if fixed + content <= self.spec.tokens {
            return Ok(vec![self.window(&enc, p, 0..content, &chars, 0, index)?]);
        }
        let room = self.check_room(fixed)?;
        let step = room - self.spec.overlap;
        let mut windows = Vec::new();
        let mut start = 0;
        loop {
            let end = (start + room).min(content);
            windows.push(self.window(&enc, p, start..end, &chars, windows.len(), index)?);
            if end >= content {
                break;
            }
            start += step;
        }
        Ok(windows)
    }

    /// Window `number`: the prompt's `p` tokens and content tokens `run` of `enc`.
    fn window(
        &self,
        enc: &Encoding,
        p: usize,
        run: Range<usize>,
        chars: &CharMap,
        number: usize,
        index: usize,
    ) -> Result<Window> {
        let (ids, tokens, offsets) = (enc.get_ids(), enc.get_tokens(), enc.get_offsets());
        let picked: Vec<Token> = (0..p)
            .chain(run.start + p..run.end + p)
            .map(|t| Token::new(ids[t], tokens[t].clone(), offsets[t]))
            .collect();
        let processed = self
            .untruncated
            .post_process(Encoding::from_tokens(picked, 0), None, true)
            .map_err(|e| tokenize_error(index, e.to_string()))?;
        let encoded = Encoded {
            ids: processed.get_ids().to_vec(),
            type_ids: processed.get_type_ids().to_vec(),
            truncated: false,
        };
        self.tokenizer
            .check_vocab(std::slice::from_ref(&encoded), |_| index)?;
        let span = if run.is_empty() {
            0..0
        } else {
            chars.text(offsets[run.start + p].0, offsets[run.end + p - 1].1)
        };
        Ok(Window {
            encoded,
            number,
            chars: span,
        })
    }
}

fn tokenize_error(index: usize, message: String) -> anyhow::Error {
    TokenizeError { index, message }.into()
}

/// From character positions in the text the tokenizer saw (prompt + input, lower-cased
/// when the model lower-cases, which can turn one character into several) to character
/// positions in the input.
struct CharMap {
    /// The original character of each prepared character, when lower-casing changed the
    /// count; `None` when positions are the same.
    expanded: Option<Vec<usize>>,
    /// Characters of prompt + input.
    total: usize,
    prompt_chars: usize,
}

impl CharMap {
    fn new(whole: &str, lowercase: bool, prompt: &str) -> Self {
        let total = whole.chars().count();
        let expanded = lowercase
            .then(|| {
                whole
                    .chars()
                    .enumerate()
                    .flat_map(|(i, c)| std::iter::repeat_n(i, c.to_lowercase().count()))
                    .collect::<Vec<usize>>()
            })
            .filter(|m| m.len() != total);
        Self {
            expanded,
            total,
            prompt_chars: prompt.chars().count(),
        }
    }

    /// The original position of a token's start `k`.
    fn start(&self, k: usize) -> usize {
        match &self.expanded {
            None => k,
            Some(m) => m.get(k).copied().unwrap_or(self.total),
        }
    }

    /// The original position of a token's end `k` (exclusive).
    fn end(&self, k: usize) -> usize {
        match (&self.expanded, k) {
            (None, _) => k,
            (Some(_), 0) => 0,
            (Some(m), _) => m.get(k - 1).map_or(self.total, |&o| o + 1),
        }
    }

    /// True when a token ending at `k` lies in the prompt.
    fn in_prompt(&self, k: usize) -> bool {
        k > 0 && self.end(k) <= self.prompt_chars
    }

    /// The input's characters of a token run from start `a` to end `b` (prompt removed).
    fn text(&self, a: usize, b: usize) -> Range<usize> {
        let p = self.prompt_chars;
        self.start(a).saturating_sub(p)..self.end(b).saturating_sub(p)
    }
}

/// Slices a text by character positions (the windows' spans).
pub struct CharSlicer<'t> {
    text: &'t str,
    /// Byte offset of each character, then the text's length.
    starts: Vec<usize>,
}

impl<'t> CharSlicer<'t> {
    pub fn new(text: &'t str) -> Self {
        let mut starts: Vec<usize> = text.char_indices().map(|(b, _)| b).collect();
        starts.push(text.len());
        Self { text, starts }
    }

    /// Characters `r` of the text (clamped to it).
    pub fn slice(&self, r: std::ops::Range<usize>) -> &'t str {
        let last = self.starts.len() - 1;
        let (a, b) = (r.start.min(last), r.end.min(last));
        &self.text[self.starts[a]..self.starts[b.max(a)]]
    }
}

/// The token-weighted mean of windows' vectors (`(vector, tokens)`), normalised when
/// `normalize`.
pub fn merge(windows: &[(Vec<f32>, usize)], normalize: bool) -> Vec<f32> {
    let dim = windows.first().map_or(0, |w| w.0.len());
    let total: usize = windows.iter().map(|w| w.1).sum();
    let mut out = vec![0f64; dim];
    for (v, n) in windows {
        for (o, x) in out.iter_mut().zip(v) {
            *o += *x as f64 * *n as f64;
        }
    }
    let mut out: Vec<f32> = out
        .into_iter()
        .map(|v| (v / total.max(1) as f64) as f32)
        .collect();
    if normalize {
        normalize_l2(&mut out);
    }
    out
}
