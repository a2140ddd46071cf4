//! Which parts of the multitask model train: parsed from `--freeze` and `--freeze-layers`.
//!
//! The frozen part of the encoder is always a prefix (the embeddings, then the first N
//! layers): the forward pass runs it without gradients and cuts the graph after it.

use serde::{Deserialize, Serialize};

use super::names::Part;
use super::weights::TrainablePredicate;

/// A freeze request that cannot be met. The messages name no flags; the CLI adds them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FreezeError {
    #[error("unknown part '{0}'; expected one of {names}", names = FreezePart::NAMES)]
    UnknownPart(String),
    #[error(
        "unknown scenario '{0}'; expected none, encoder, class-head, sentiment-head, layers or all"
    )]
    UnknownScenario(String),
    #[error(
        "{asked} frozen layers asked for, but the model has only {layers} encoder layers \
         (use 0 to {layers})"
    )]
    TooManyLayers { asked: usize, layers: usize },
    #[error("freezing none cannot be combined with other parts")]
    NoneWithOthers,
}

type Result<T, E = FreezeError> = std::result::Result<T, E>;

/// Checks a count of frozen leading layers against an encoder of `num_layers` layers: the
/// one bound of `--freeze-layers`, for `--task=2` and `--task=3` alike.
pub fn check_frozen_layers(n: usize, num_layers: usize) -> Result<()> {
    if n > num_layers {
        return Err(FreezeError::TooManyLayers {
            asked: n,
            layers: num_layers,
        });
    }
    Ok(())
}

/// A part named by `--freeze`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezePart {
    None,
    All,
    Encoder,
    ClassHead,
    SentimentHead,
}

impl FreezePart {
    /// The accepted names, aliases included.
    pub const NAMES: &'static str =
        "none, all, encoder (alias backbone), class-head (alias head-a), sentiment-head (alias head-b)";

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "none" => FreezePart::None,
            "all" => FreezePart::All,
            "encoder" | "backbone" => FreezePart::Encoder,
            "class-head" | "head-a" => FreezePart::ClassHead,
            "sentiment-head" | "head-b" => FreezePart::SentimentHead,
            other => return Err(FreezeError::UnknownPart(other.to_string())),
        })
    }
}

/// What is frozen. The default freezes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezePlan {
    /// `Some(n)`: the embeddings and encoder layers `0..n` are frozen. `None`: the whole
    /// encoder trains.
    pub encoder_prefix: Option<usize>,
    pub class_head: bool,
    pub sentiment_head: bool,
}

impl FreezePlan {
    /// Combines the `--freeze` parts and `--freeze-layers N` for an encoder of `num_layers`.
    pub fn new(
        parts: &[FreezePart],
        freeze_layers: Option<usize>,
        num_layers: usize,
    ) -> Result<Self> {
        let mut plan = FreezePlan::default();
        if let Some(n) = freeze_layers {
            check_frozen_layers(n, num_layers)?;
            plan.encoder_prefix = Some(n);
        }
        for part in parts {
            match part {
                FreezePart::None => {}
                FreezePart::All => {
                    plan.encoder_prefix = Some(num_layers);
                    plan.class_head = true;
                    plan.sentiment_head = true;
                }
                FreezePart::Encoder => plan.encoder_prefix = Some(num_layers),
                FreezePart::ClassHead => plan.class_head = true,
                FreezePart::SentimentHead => plan.sentiment_head = true,
            }
        }
        if parts.contains(&FreezePart::None) && parts.len() > 1 {
            return Err(FreezeError::NoneWithOthers);
        }
        Ok(plan)
    }

    /// The number of leading encoder layers that are frozen (0 when the encoder trains).
    pub fn frozen_layers(&self) -> usize {
        self.encoder_prefix.unwrap_or(0)
    }

    /// True when no encoder weight trains: embeddings and all `num_layers` layers frozen.
    pub fn encoder_frozen(&self, num_layers: usize) -> bool {
        self.encoder_prefix == Some(num_layers)
    }

    /// True when nothing at all trains.
    pub fn all_frozen(&self, num_layers: usize) -> bool {
        self.encoder_frozen(num_layers) && self.class_head && self.sentiment_head
    }

    /// The plan as the predicate the weight loader asks of each parameter's name.
    pub fn trainable(self) -> TrainablePredicate {
        std::sync::Arc::new(move |name: &str| self.is_trainable(name))
    }

    /// Whether the parameter called `name` trains under this plan.
    pub fn is_trainable(&self, name: &str) -> bool {
        let part = Part::of(name);
        match part {
            Part::Head(0) => return !self.class_head,
            Part::Head(_) => return !self.sentiment_head,
            _ => {}
        }
        let Some(n) = self.encoder_prefix else {
            return true;
        };
        match part {
            Part::Embeddings => false,
            Part::Layer(i) => i >= n,
            _ => true,
        }
    }

    /// A short description such as "encoder, class head" or "embeddings + layers 0-2".
    pub fn describe(&self, num_layers: usize) -> String {
        let mut parts = Vec::new();
        match self.encoder_prefix {
            Some(n) if n == num_layers => parts.push("encoder".to_string()),
            Some(0) => parts.push("embeddings".to_string()),
            Some(n) => parts.push(format!("embeddings + layers 0-{}", n - 1)),
            None => {}
        }
        if self.class_head {
            parts.push("class head".into());
        }
        if self.sentiment_head {
            parts.push("sentiment head".into());
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A training scenario of `--task=3`: one way of freezing the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Everything trains.
    None,
    /// The encoder is frozen; both heads train.
    Encoder,
    /// The class head is frozen; the encoder and the sentiment head train.
    ClassHead,
    /// The sentiment head is frozen; the encoder and the class head train.
    SentimentHead,
    /// The embeddings and the first N layers are frozen; the rest trains.
    Layers,
    /// Nothing trains: the untrained heads are evaluated as they are.
    All,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::None,
        Scenario::Encoder,
        Scenario::ClassHead,
        Scenario::SentimentHead,
        Scenario::Layers,
        Scenario::All,
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "none" => Scenario::None,
            "encoder" | "backbone" => Scenario::Encoder,
            "class-head" | "head-a" => Scenario::ClassHead,
            "sentiment-head" | "head-b" => Scenario::SentimentHead,
            "layers" => Scenario::Layers,
            "all" => Scenario::All,
            other => return Err(FreezeError::UnknownScenario(other.to_string())),
        })
    }

    /// The scenario's name as on the command line; `layers` shows its N.
    pub fn label(self, layers_n: usize) -> String {
        match self {
            Scenario::None => "none frozen".into(),
            Scenario::Encoder => "encoder frozen".into(),
            Scenario::ClassHead => "class head frozen".into(),
            Scenario::SentimentHead => "sentiment head frozen".into(),
            Scenario::Layers => format!("first {layers_n} layers frozen"),
            Scenario::All => "all frozen".into(),
        }
    }

    /// The freeze plan of this scenario for an encoder of `num_layers`.
    pub fn plan(self, num_layers: usize, layers_n: usize) -> Result<FreezePlan> {
        let (parts, n): (&[FreezePart], Option<usize>) = match self {
            Scenario::None => (&[], None),
            Scenario::Encoder => (&[FreezePart::Encoder], None),
            Scenario::ClassHead => (&[FreezePart::ClassHead], None),
            Scenario::SentimentHead => (&[FreezePart::SentimentHead], None),
            Scenario::Layers => (&[], Some(layers_n)),
            Scenario::All => (&[FreezePart::All], None),
        };
        FreezePlan::new(parts, n, num_layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        assert_eq!(FreezePart::parse("backbone").unwrap(), FreezePart::Encoder);
        assert_eq!(FreezePart::parse("HEAD-A").unwrap(), FreezePart::ClassHead);
        assert_eq!(
            FreezePart::parse("head-b").unwrap(),
            FreezePart::SentimentHead
        );
        let e = FreezePart::parse("decoder").unwrap_err().to_string();
        assert!(
            e.contains("'decoder'") && e.contains("sentiment-head"),
            "{e}"
        );
    }

    #[test]
    fn plans_select_parameters() {
        let p = FreezePlan::new(&[FreezePart::Encoder, FreezePart::ClassHead], None, 6).unwrap();
        assert!(!p.is_trainable("embeddings.word_embeddings.weight"));
        assert!(!p.is_trainable("encoder.layer.5.output.dense.weight"));
        assert!(!p.is_trainable("class_head.fc1.weight"));
        assert!(p.is_trainable("sentiment_head.fc2.bias"));
        assert!(p.encoder_frozen(6) && !p.all_frozen(6));

        let p = FreezePlan::new(&[], Some(2), 6).unwrap();
        assert!(!p.is_trainable("embeddings.LayerNorm.weight"));
        assert!(!p.is_trainable("encoder.relative_attention_bias.weight"));
        assert!(!p.is_trainable("encoder.layer.1.attention.self.query.weight"));
        assert!(p.is_trainable("encoder.layer.2.attention.self.query.weight"));
        assert!(p.is_trainable("encoder.layer.10.output.LayerNorm.bias"));
        assert_eq!(p.describe(6), "embeddings + layers 0-1");

        let p = FreezePlan::new(&[FreezePart::None], None, 6).unwrap();
        assert!(p.is_trainable("embeddings.word_embeddings.weight") && p.encoder_prefix.is_none());
        assert!(FreezePlan::new(&[FreezePart::All], None, 6)
            .unwrap()
            .all_frozen(6));
    }

    #[test]
    fn out_of_range_layers_give_the_count() {
        let e = FreezePlan::new(&[], Some(7), 6).unwrap_err().to_string();
        assert!(
            e.contains("7 frozen layers") && e.contains("only 6") && !e.contains("--"),
            "{e}"
        );
        let e = FreezePlan::new(&[FreezePart::None, FreezePart::Encoder], None, 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none"), "{e}");
    }
}
