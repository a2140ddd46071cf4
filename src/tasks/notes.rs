//! The closing notes of task 1: where a shard's rows went, and which inputs were cut.

use crate::chunk::{ChunkMode, ChunkSpec};
use crate::config::EmbedConfig;
use crate::input::{SentenceReader, MAX_LINE_BYTES};
use crate::shard::Shard;
use crate::tokenize::TruncateSide;

/// The closing line of a shard: the input lines it covered and where its `count` rows went
/// (sentences, or windows with `--chunks rows`).
pub(super) fn shard_done(
    s: Shard,
    reader: &SentenceReader,
    names: &[String],
    count: usize,
    chunking: Option<ChunkSpec>,
) {
    let (first, last) = reader.lines_read();
    let lines = if first > last {
        "no lines".to_string()
    } else {
        format!("lines {first}-{last}")
    };
    let to = if names.is_empty() {
        "standard output".to_string()
    } else {
        names.join(" + ")
    };
    let rows = match chunking.map(|c| c.mode) {
        Some(ChunkMode::Rows) => "window row(s)",
        _ => "sentence(s)",
    };
    crate::note!(
        "shard {s}: {lines} of {}: {count} {rows} written to {to}",
        reader.name()
    );
}

/// What was cut from the inputs: lines past the reader's limit, and sentences past the max
/// length (`truncated` also counts the clipped lines).
#[derive(Clone, Copy)]
pub(super) struct Cut {
    pub clipped_lines: usize,
    pub truncated: usize,
    /// Rows written.
    pub count: usize,
    pub max_seq_length: usize,
    /// The model's own limit.
    pub model_max: usize,
}

/// Notes on what was cut, each saying what sets the limit.
pub(super) fn cuts(cfg: &EmbedConfig, cut: &Cut, prompt: Option<&str>) {
    let left = cfg.truncate_side == TruncateSide::Left;
    if cut.clipped_lines > 0 {
        let mib = MAX_LINE_BYTES >> 20;
        let kept = match left {
            true => format!("last {mib} MiB was kept (--truncate-side left)"),
            false => format!("first {mib} MiB was read"),
        };
        crate::note!(
            "note: {} line(s) were longer than {mib} MiB; only their {kept}",
            cut.clipped_lines
        );
    }
    // With windows nothing is cut at the max length.
    if cut.truncated == 0 || cfg.chunking.is_some() {
        return;
    }
    let Cut {
        truncated,
        count,
        max_seq_length,
        model_max,
        ..
    } = *cut;
    crate::note!(
        "note: {truncated} of {count} sentence(s) were longer than {max_seq_length} tokens and \
         were truncated; --max-seq-length sets the limit (at most {model_max})"
    );
    if let (true, Some(p)) = (left, prompt) {
        crate::note!(
            "note: --truncate-side left cut the start of those {truncated}, and with it the \
             prompt {p:?} (or its start): only the shorter sentences carry it whole"
        );
    }
}
