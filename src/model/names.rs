//! The parameter names of the multitask model, and which part of it each name belongs to:
//! the one place that freezing, the freeze check, checkpoints and the trainer read them from.
//!
//! Encoder parameters carry canonical (BERT) names whatever the architecture
//! (`embeddings.*`, `encoder.layer.{i}.*`; [`super::arch`] maps each file's names onto
//! them); the heads' are `class_head.*` and `sentiment_head.*`.

use std::fmt;

/// The heads' name prefixes, in task order.
pub const HEAD_NAMES: [&str; 2] = ["class_head", "sentiment_head"];

/// The word embeddings' parameter name.
pub const WORD_EMBEDDINGS: &str = "embeddings.word_embeddings.weight";

/// The prefix of MPNet's relative position bias table, shared by all layers.
pub const RELATIVE_ATTENTION_BIAS: &str = "encoder.relative_attention_bias.";

/// The name prefix of encoder layer `i`: `encoder.layer.{i}`.
pub fn layer_prefix(i: usize) -> String {
    format!("encoder.layer.{i}")
}

/// A part of the multitask model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The encoder's input stage, which any frozen prefix freezes: the embeddings, and
    /// MPNet's relative position bias table (every layer reads it, the frozen ones too, so it
    /// cannot train while they stay fixed).
    Embeddings,
    /// Encoder layer `i`.
    Layer(usize),
    /// A head, by task index into [`HEAD_NAMES`].
    Head(usize),
    /// Anything else (a pooler, say).
    Other,
}

impl Part {
    /// The part the parameter called `name` belongs to.
    pub fn of(name: &str) -> Self {
        if name.starts_with("embeddings.") || name.starts_with(RELATIVE_ATTENTION_BIAS) {
            return Part::Embeddings;
        }
        if let Some(i) = layer_index(name) {
            return Part::Layer(i);
        }
        match HEAD_NAMES.iter().position(|h| {
            name.strip_prefix(h)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        }) {
            Some(t) => Part::Head(t),
            None => Part::Other,
        }
    }

    /// True for the heads' parameters.
    pub fn is_head(self) -> bool {
        matches!(self, Part::Head(_))
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Embeddings => write!(f, "embeddings"),
            Part::Layer(i) => write!(f, "layer {i}"),
            Part::Head(0) => write!(f, "class head"),
            Part::Head(_) => write!(f, "sentiment head"),
            Part::Other => write!(f, "other"),
        }
    }
}

/// True for the heads' parameters.
pub fn is_head(name: &str) -> bool {
    Part::of(name).is_head()
}

/// The layer index of an encoder parameter name (`encoder.layer.{i}.…`).
pub fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("encoder.layer.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_their_parts() {
        assert_eq!(Part::of(WORD_EMBEDDINGS), Part::Embeddings);
        assert_eq!(
            Part::of("encoder.relative_attention_bias.weight"),
            Part::Embeddings
        );
        assert_eq!(
            Part::of("encoder.layer.11.output.dense.weight"),
            Part::Layer(11)
        );
        assert_eq!(Part::of(&format!("{}.x", layer_prefix(3))), Part::Layer(3));
        assert_eq!(Part::of("class_head.fc1.weight"), Part::Head(0));
        assert_eq!(Part::of("sentiment_head.fc2.bias"), Part::Head(1));
        assert_eq!(Part::of("class_headless.w"), Part::Other);
        assert_eq!(Part::of("pooler.dense.weight"), Part::Other);
        assert_eq!(Part::of("encoder.layer.x.y"), Part::Other);
        assert_eq!(Part::Layer(2).to_string(), "layer 2");
        assert!(is_head("class_head.fc1.weight") && !is_head("embeddings.LayerNorm.weight"));
    }
}
