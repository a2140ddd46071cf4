//! The export's model card, `README.md`: what the folder holds, which vector the heads take
//! (the mean-pooled encoder output before any Normalize step, not what `encode()` returns),
//! and a Python recipe that runs them. A first line marks it as fetch-ml's, so that
//! `--export --overwrite` replaces it and no README.md of the user's.

use std::path::Path;

/// The model card's file name.
pub const CARD_FILE: &str = "README.md";

/// The line that marks a README.md as the card fetch-ml wrote (right after its front matter).
const MARKER: &str =
    "<!-- fetch-ml export model card: `fetch-ml --export DIR --overwrite` replaces this file -->";

/// Whether `path` is a model card fetch-ml wrote.
pub fn is_own_card(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|t| t.lines().take(20).any(|l| l == MARKER))
        .unwrap_or(false)
}

/// What the card describes.
pub struct CardInfo<'a> {
    /// The base model's id or folder, as given.
    pub base_model: &'a str,
    pub dimension: usize,
    /// Whether the exported pipeline ends with a Normalize step.
    pub normalize: bool,
    /// The class and sentiment heads' labels, in logit order.
    pub labels: &'a [Vec<String>; 2],
    /// The architecture is not built into transformers (NomicBERT, JinaBERT): Python runs it
    /// only with the model's own code from the Hub.
    pub remote_code: bool,
}

/// A hub id as given; a local folder by its name only (not its path on this machine).
fn base_name(base: &str) -> String {
    let p = Path::new(base);
    if p.exists() {
        if let Some(n) = std::fs::canonicalize(p)
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
        {
            return n;
        }
    }
    base.to_string()
}

/// The model card's Python recipe, and the check it passes (`bench/check_export.py` runs it).
const PYTHON_RECIPE: &str = r#"```python
import json
import numpy as np
from safetensors.numpy import load_file
from sentence_transformers import SentenceTransformer

DIR = "path/to/this/folder"
model = SentenceTransformer(DIR, device="cpu")
# Transformer + Pooling only: the heads' input (mean-pooled, not normalised).
pooled = SentenceTransformer(modules=[model[0], model[1]], device="cpu")
heads = json.load(open(f"{DIR}/heads.json"))
weights = load_file(f"{DIR}/" + heads["weights"])

def predict(texts):
    x = pooled.encode(texts, convert_to_numpy=True)
    out = {}
    for head in heads["heads"]:
        h = x
        for layer in head["layers"]:
            if layer["type"] == "linear":
                h = h @ weights[layer["weight"]].T + weights[layer["bias"]]
            elif layer["type"] == "relu":
                h = np.maximum(h, 0)
            # "dropout" layers apply in training only.
        p = np.exp(h - h.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[head["task"]] = [(head["labels"][i], float(p[k, i]))
                             for k, i in enumerate(p.argmax(axis=1))]
    return out

print(predict(["I love this phone"]))
```

The labels and probabilities match `fetch-ml --task=2 --checkpoint CK` on the checkpoint this
folder was exported from, to float rounding.
"#;

/// What the card says of an architecture that transformers does not have built in.
const REMOTE_NOTE: &str = "
  This architecture's layout is not transformers' own: `trust_remote_code=True` runs the
  model's code, which `config.json`'s `auto_map` names (when the base model's config has
  one, as the published models' do; fetch-ml copies it) and Python fetches from the Hugging
  Face Hub. Without it (transformers 5.24, sentence-transformers 6.2) a NomicBERT folder stops
  with size mismatches (transformers' `nomic_bert` reads other config keys and names) and a
  JinaBERT folder loads as a plain BERT whose feed-forward layers are freshly initialised:
  other vectors. fetch-ml itself needs no remote code.";

/// The text of `README.md`.
pub fn model_card(info: &CardInfo) -> String {
    let base = base_name(info.base_model);
    let modules = if info.normalize {
        "Transformer -> mean Pooling -> Normalize"
    } else {
        "Transformer -> mean Pooling"
    };
    let encode_note = if info.normalize {
        "`model.encode()` returns the vectors after the Normalize step (unit length). The heads \
         were trained on the vectors before it: fed `encode()`'s normalised vectors they give \
         other labels and probabilities, with no error."
    } else {
        "This model has no Normalize step, so `model.encode()` returns exactly the heads' input \
         (unless you pass `normalize_embeddings=True`, which the heads were not trained on)."
    };
    let labels = |i: usize| {
        info.labels[i]
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, text-classification, fetch-ml]
---
{MARKER}

# Fine-tuned {base} with two classification heads

Written by `fetch-ml --task=2 --export` (fetch-ml {version}); the encoder was fine-tuned from
{base}.

- A sentence-transformers model ({modules}): `SentenceTransformer("DIR"{remote})` loads it and
  gives the fine-tuned sentence vectors ({dim} dimensions). `fetch-ml --task=1 --model DIR`
  gives the same vectors.{remote_note}
- Two classification heads in `heads.safetensors`, described by `heads.json` (layers, label
  names in logit order): `class` ({class_labels}) and `sentiment` ({sentiment_labels}). Each
  is `linear -> ReLU -> (dropout, training only) -> linear`, giving logits; softmax gives
  probabilities.

## Which vector the heads take

The heads take the **mean-pooled encoder output, before any Normalize step**: the output of
the Pooling module (module 1), {dim} numbers per sentence. {encode_note}

## Running the heads in Python

{PYTHON_RECIPE}"#,
        version = env!("CARGO_PKG_VERSION"),
        remote = if info.remote_code {
            ", trust_remote_code=True"
        } else {
            ""
        },
        remote_note = if info.remote_code { REMOTE_NOTE } else { "" },
        dim = info.dimension,
        class_labels = labels(0),
        sentiment_labels = labels(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_card_is_recognised_and_a_users_readme_is_not() {
        let d = tempfile::tempdir().unwrap();
        let labels = [vec!["a".to_string()], vec!["neg".into(), "pos".into()]];
        let card = model_card(&CardInfo {
            base_model: d.path().to_str().unwrap(),
            dimension: 384,
            normalize: true,
            labels: &labels,
            remote_code: false,
        });
        assert!(card.starts_with("---\n"), "front matter first");
        assert!(!card.contains(d.path().to_str().unwrap()), "no local path");
        assert!(card.contains("`neg`, `pos`") && card.contains("Normalize"));
        let p = d.path().join(CARD_FILE);
        std::fs::write(&p, &card).unwrap();
        assert!(is_own_card(&p));
        std::fs::write(&p, "# mine\n").unwrap();
        assert!(!is_own_card(&p));
    }

    /// NomicBERT and JinaBERT need the model's own code in Python; the card says how, and
    /// the others' cards do not.
    #[test]
    fn remote_code_is_named_where_needed() {
        let labels = [vec!["a".to_string()], vec!["b".into()]];
        let card = |remote_code| {
            model_card(&CardInfo {
                base_model: "x/y",
                dimension: 8,
                normalize: false,
                labels: &labels,
                remote_code,
            })
        };
        let (remote, plain) = (card(true), card(false));
        assert!(remote.contains(r#"SentenceTransformer("DIR", trust_remote_code=True)"#));
        assert!(remote.contains("auto_map"));
        assert!(plain.contains(r#"SentenceTransformer("DIR")"#));
        assert!(!plain.contains("trust_remote_code"));
    }
}
