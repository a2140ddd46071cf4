//! What the CLI adds to an error from the library: the flags that fix it. Library errors
//! say what went wrong where and name no flags; [`advice`] reads their typed causes.

use crate::chunk::ChunkError;
use crate::hub::{HubError, Place};
use crate::job::OtherJob;
use crate::loader::LoadError;
use crate::model::freeze::FreezeError;
use crate::model::multitask::TrainableDtype;
use crate::pipeline::UnknownPrompt;
use crate::tokenize::PromptTooLong;
use crate::train::checkpoint::CheckpointError;
use crate::train::memory::RowTooLong;
use crate::train::session::NoEvalSet;
use crate::train::trainer::{Diverged, DivergedWeights};

/// One line of advice per typed cause in `e`'s chain that a flag can fix, outermost first.
pub fn advice(e: &anyhow::Error) -> Vec<String> {
    e.chain()
        .filter_map(|cause| inputs(cause).or_else(|| training(cause)))
        .collect()
}

/// Advice for a cause about the model, its inputs or its outputs.
fn inputs(cause: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(h) = cause.downcast_ref::<HubError>() {
        hub(h)
    } else if let Some(l) = cause.downcast_ref::<LoadError>() {
        Some(match l {
            LoadError::SeqLengthOverLimit { limit, .. } => {
                format!("pass --max-seq-length {limit} or less")
            }
            LoadError::SeqLengthTooShort { .. } => "pass --max-seq-length 2 or more".into(),
            LoadError::ModelSeqLengthTooShort { .. } => {
                "pass --max-seq-length N to override the model's value".into()
            }
        })
    } else if cause.downcast_ref::<OtherJob>().is_some() {
        Some(
            "pass --overwrite to replace it with this run's output (the shard is embedded \
             again), or choose another --output"
                .into(),
        )
    } else if let Some(c) = cause.downcast_ref::<ChunkError>() {
        Some(match c {
            ChunkError::OverLimit { limit, .. } => format!(
                "pass --chunk-tokens {limit} or less (--max-seq-length raises the limit up to \
                 the model's)"
            ),
            ChunkError::NoRoom { .. } => {
                "pass a smaller --chunk-overlap or a larger --chunk-tokens".into()
            }
        })
    } else if let Some(p) = cause.downcast_ref::<UnknownPrompt>() {
        Some(if p.known.is_empty() {
            "pass the prompt's text with --prompt".into()
        } else {
            "pass one of them to --prompt-name, or the text itself with --prompt".into()
        })
    } else if cause.downcast_ref::<PromptTooLong>().is_some() {
        Some(
            "pass a shorter --prompt (or --prompt-name), or a larger --max-seq-length up to \
             the model's limit"
                .into(),
        )
    } else {
        None
    }
}

/// Advice for a cause about training, freezing or checkpoints.
fn training(cause: &(dyn std::error::Error + 'static)) -> Option<String> {
    if cause.downcast_ref::<NoEvalSet>().is_some() {
        Some(
            "--eval-every and --keep-best evaluate during training: pass --eval-file with \
             --train-file"
                .into(),
        )
    } else if let Some(d) = cause.downcast_ref::<Diverged>() {
        Some(if d.weights_overflow() {
            "pass smaller --loss-weights (only their ratio matters; 1,1 is the default)".into()
        } else {
            "try a lower --lr or --head-lr".into()
        })
    } else if cause.downcast_ref::<DivergedWeights>().is_some() {
        Some("try a lower --lr or --head-lr".into())
    } else if let Some(r) = cause.downcast_ref::<RowTooLong>() {
        Some(match r.fits {
            0 => "train with the encoder frozen, or on a machine with more memory".into(),
            n => {
                format!("pass --max-seq-length {n} or less, or train fewer of the encoder's layers")
            }
        })
    } else if cause.downcast_ref::<TrainableDtype>().is_some() {
        Some("drop --dtype, or freeze the encoder (--freeze encoder)".into())
    } else if let Some(f) = cause.downcast_ref::<FreezeError>() {
        match f {
            FreezeError::TooManyLayers { layers, .. } => {
                Some(format!("pass --freeze-layers between 0 and {layers}"))
            }
            FreezeError::NoneWithOthers => Some("drop none from --freeze".into()),
            _ => None,
        }
    } else if let Some(c) = cause.downcast_ref::<CheckpointError>() {
        match c {
            CheckpointError::NotACheckpoint { .. } => {
                Some("--checkpoint takes a folder that --save wrote".into())
            }
            CheckpointError::BaseShape { want, .. } | CheckpointError::BaseWeights { want, .. } => {
                Some(format!(
                    "pass --model {} (the base model the checkpoint was trained on)",
                    want.id
                ))
            }
            _ => None,
        }
    } else {
        None
    }
}

fn hub(h: &HubError) -> Option<String> {
    let missing = |place: &Place| match place {
        Place::Folder => {
            "copy the file into the folder, or pass a complete Hugging Face model folder to --model"
                .to_string()
        }
        Place::Cache(cache) => format!(
            "run once without --offline (and without HF_HUB_OFFLINE=1) to download it, set \
             HF_HOME to the cache that holds it, or pass --model /path/to/folder; the cache \
             searched is {}",
            cache.display()
        ),
        Place::Hub => "check the model id; fetch-ml needs a model with safetensors weights".into(),
    };
    Some(match h {
        HubError::NoSuchFolder { .. } => {
            "pass an existing model folder to --model, or a hub id such as bert-base-uncased".into()
        }
        HubError::MissingFile { place, .. } | HubError::NoTokenizer { place, .. } => missing(place),
        HubError::PytorchOnly { .. } => return None,
        HubError::Unreachable { model, .. } => format!(
            "if the model is already in the cache, pass --offline (or set HF_HUB_OFFLINE=1); \
             otherwise pass --model /path/to/folder (no local folder named {model} exists)"
        ),
        HubError::Timeout { .. } => "--hub-timeout SECS sets the limit; pass --offline if the \
                                     model is in the cache, or --model /path/to/folder"
            .into(),
        HubError::Stopped { .. } | HubError::Download { .. } => {
            "retry, or pass --model /path/to/folder with the model's files".into()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_causes_get_flag_advice_and_others_none() {
        let e = anyhow::Error::new(HubError::NoSuchFolder { id: "./x".into() })
            .context("loading the model");
        assert_eq!(advice(&e).len(), 1);
        assert!(advice(&e)[0].contains("--model"), "{:?}", advice(&e));
        assert!(!format!("{e:#}").contains("--"), "{e:#}");

        let e = anyhow::Error::new(FreezeError::TooManyLayers {
            asked: 7,
            layers: 6,
        });
        assert_eq!(advice(&e), ["pass --freeze-layers between 0 and 6"]);

        let e = anyhow::anyhow!("plain failure");
        assert!(advice(&e).is_empty());
    }
}
