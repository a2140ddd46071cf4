//! ModernBERT (modernbert-embed-base, gte-modernbert-base): pre-norm layers without biases,
//! rotary positions with one base for global and one for local layers, local layers that
//! attend within a sliding window, a GeGLU feed-forward layer, and a final LayerNorm.
//!
//! Weight names follow transformers' `ModernBertModel`: `embeddings.tok_embeddings`,
//! `embeddings.norm`, `layers.{i}.attn_norm` (absent in layer 0, an identity there),
//! `layers.{i}.attn.Wqkv`, `layers.{i}.attn.Wo`, `layers.{i}.mlp_norm`, `layers.{i}.mlp.Wi`,
//! `layers.{i}.mlp.Wo`, `final_norm`. Our canonical names ([`super::arch`]) put the layers
//! under `encoder.layer.{i}.`, the token table at `embeddings.word_embeddings`, and the final
//! LayerNorm with the last layer (`encoder.layer.{L-1}.final_norm`): it trains and freezes
//! with it, and [`ModernBertEncoder::forward_layers`] applies it when the range ends there.

use anyhow::{bail, ensure, Context};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::{json, Value};

use super::batch::PackedBatch;
use super::bert::{BertConfig, Mode, SparseTap};
use super::blocks::{self, gate_first_half, Dense, Gate, Norm, Positions};
use super::names::layer_prefix;
use super::rotary::RotaryTable;

/// `config.json` of a ModernBERT model, as transformers' `ModernBertConfig` reads it: both
/// the published form (`global_attn_every_n_layers`, `global_rope_theta`,
/// `local_rope_theta`) and transformers 5's (`layer_types`, `rope_parameters`).
#[derive(Debug, Clone, Deserialize)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "gelu")]
    pub hidden_activation: String,
    #[serde(default = "max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default = "pad_token_id")]
    pub pad_token_id: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub embedding_dropout: f64,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub mlp_dropout: f64,
    /// The whole window of a local layer: it sees `local_attention / 2` tokens each side.
    #[serde(default = "local_attention")]
    pub local_attention: usize,
    /// Published configs: every n-th layer (from layer 0) is global.
    pub global_attn_every_n_layers: Option<usize>,
    pub global_rope_theta: Option<f64>,
    pub local_rope_theta: Option<f64>,
    /// transformers 5: `full_attention` or `sliding_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// transformers 5: `{"full_attention": {"rope_theta": .., "rope_type": "default"}, ..}`.
    pub rope_parameters: Option<Value>,
    /// RoPE scaling of older configs; only its absence is supported.
    pub rope_scaling: Option<Value>,
}

fn gelu() -> String {
    "gelu".into()
}
fn max_positions() -> usize {
    8192
}
fn initializer_range() -> f64 {
    0.02
}
fn norm_eps() -> f64 {
    1e-5
}
fn pad_token_id() -> Option<usize> {
    Some(50283)
}
fn local_attention() -> usize {
    128
}

/// A ModernBERT layer's attention: over the whole sequence, or a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Global,
    Local,
}

impl ModernBertConfig {
    /// Each layer's kind: `layer_types` when given, else every
    /// `global_attn_every_n_layers`-th layer (default 3) global, the others local.
    pub fn layer_kinds(&self) -> anyhow::Result<Vec<LayerKind>> {
        if let Some(types) = &self.layer_types {
            ensure!(
                types.len() == self.num_hidden_layers,
                "layer_types lists {} layers but num_hidden_layers is {}",
                types.len(),
                self.num_hidden_layers
            );
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(LayerKind::Global),
                    "sliding_attention" => Ok(LayerKind::Local),
                    other => bail!(
                        "layer type {other:?} is not supported (full_attention or \
                         sliding_attention)"
                    ),
                })
                .collect();
        }
        let n = self.global_attn_every_n_layers.unwrap_or(3);
        ensure!(n > 0, "global_attn_every_n_layers is 0");
        Ok((0..self.num_hidden_layers)
            .map(|i| match i % n {
                0 => LayerKind::Global,
                _ => LayerKind::Local,
            })
            .collect())
    }

    /// The rotary base of a layer kind: `rope_parameters`, else `global_rope_theta` /
    /// `local_rope_theta`, else transformers' defaults (160,000 and 10,000).
    pub fn rope_theta(&self, kind: LayerKind) -> anyhow::Result<f64> {
        let (key, old, default) = match kind {
            LayerKind::Global => ("full_attention", self.global_rope_theta, 160_000.0),
            LayerKind::Local => ("sliding_attention", self.local_rope_theta, 10_000.0),
        };
        if let Some(p) = self.rope_parameters.as_ref().and_then(|p| p.get(key)) {
            let rope_type = p
                .get("rope_type")
                .and_then(Value::as_str)
                .unwrap_or("default");
            ensure!(
                rope_type == "default",
                "rope_parameters.{key}.rope_type {rope_type:?} is not supported (default only)"
            );
            if let Some(theta) = p.get("rope_theta").and_then(Value::as_f64) {
                return Ok(theta);
            }
        }
        Ok(old.unwrap_or(default))
    }

    /// Tokens a local layer sees on each side of a query.
    pub fn window(&self) -> usize {
        self.local_attention / 2
    }

    /// Refuses what this implementation does not run.
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.hidden_activation == "gelu",
            "hidden_activation {:?} is not supported (gelu only)",
            self.hidden_activation
        );
        ensure!(
            self.rope_scaling.as_ref().is_none_or(Value::is_null),
            "rope_scaling is not supported"
        );
        ensure!(
            self.num_attention_heads > 0
                && (self.hidden_size / self.num_attention_heads.max(1)).is_multiple_of(2),
            "hidden_size {} over num_attention_heads {} gives no even head size for rotary \
             positions",
            self.hidden_size,
            self.num_attention_heads
        );
        self.layer_kinds()?;
        for kind in [LayerKind::Global, LayerKind::Local] {
            self.rope_theta(kind)?;
        }
        Ok(())
    }

    /// The shape the rest of the code reads, as a BERT config.
    pub fn as_bert(&self) -> Value {
        json!({
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.mlp_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": 0,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.norm_eps,
            "pad_token_id": self.pad_token_id.unwrap_or(0),
            "model_type": "modernbert",
        })
    }

    /// Parses `config.json`'s value.
    pub fn parse(v: &Value) -> anyhow::Result<Self> {
        let c: Self = serde_json::from_value(v.clone()).context("reading a modernbert config")?;
        c.check()?;
        Ok(c)
    }
}

/// One pre-norm layer.
#[derive(Clone)]
pub struct ModernBertLayer {
    /// `None` in layer 0 (transformers' `nn.Identity`).
    pub attn_norm: Option<Norm>,
    pub wqkv: Dense,
    pub wo: Dense,
    pub mlp_norm: Norm,
    pub wi: Dense,
    pub mlp_wo: Dense,
    pub kind: LayerKind,
}

impl ModernBertLayer {
    pub fn load(
        vb: VarBuilder,
        c: &ModernBertConfig,
        index: usize,
        kind: LayerKind,
    ) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let attn_norm = match index {
            0 => None,
            _ => Some(Norm::load(vb.pp("attn_norm"), h, c.norm_eps, c.norm_bias)?),
        };
        Ok(Self {
            attn_norm,
            wqkv: Dense::load(vb.pp("attn").pp("Wqkv"), h, 3 * h, c.attention_bias)?,
            wo: Dense::load(vb.pp("attn").pp("Wo"), h, h, c.attention_bias)?,
            mlp_norm: Norm::load(vb.pp("mlp_norm"), h, c.norm_eps, c.norm_bias)?,
            wi: Dense::load(vb.pp("mlp").pp("Wi"), h, 2 * i, c.mlp_bias)?,
            mlp_wo: Dense::load(vb.pp("mlp").pp("Wo"), i, h, c.mlp_bias)?,
            kind,
        })
    }
}

/// The ModernBERT encoder over packed batches.
#[derive(Clone)]
pub struct ModernBertEncoder {
    pub tok_embeddings: Tensor,
    pub norm: Norm,
    pub layers: Vec<ModernBertLayer>,
    pub final_norm: Norm,
    global_rope: RotaryTable,
    local_rope: RotaryTable,
    pub own: ModernBertConfig,
    pub config: BertConfig,
    pub sparse: std::sync::Arc<SparseTap>,
}

impl ModernBertEncoder {
    /// Loads the encoder under our canonical names (see the module doc).
    pub fn load(vb: VarBuilder, cfg: &BertConfig, own: &ModernBertConfig) -> Result<Self> {
        let h = own.hidden_size;
        let kinds = own.layer_kinds().map_err(msg)?;
        let layers = kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| ModernBertLayer::load(vb.pp(layer_prefix(i)), own, i, kind))
            .collect::<Result<Vec<_>>>()?;
        let last = layer_prefix(own.num_hidden_layers.saturating_sub(1));
        let head_dim = h / own.num_attention_heads;
        let theta = |k| own.rope_theta(k).map_err(msg);
        let positions = own.max_position_embeddings;
        Ok(Self {
            tok_embeddings: blocks::table(
                vb.pp("embeddings").pp("word_embeddings"),
                own.vocab_size,
                h,
                own.initializer_range,
            )?,
            norm: Norm::load(
                vb.pp("embeddings").pp("norm"),
                h,
                own.norm_eps,
                own.norm_bias,
            )?,
            layers,
            final_norm: Norm::load(vb.pp(last).pp("final_norm"), h, own.norm_eps, own.norm_bias)?,
            global_rope: RotaryTable::new(head_dim, theta(LayerKind::Global)?, positions),
            local_rope: RotaryTable::new(head_dim, theta(LayerKind::Local)?, positions),
            own: own.clone(),
            config: cfg.clone(),
            sparse: Default::default(),
        })
    }

    /// `[T, hidden]`: token embeddings, normalised.
    pub fn embed_packed(&self, batch: &PackedBatch, mode: Mode) -> Result<Tensor> {
        let x = blocks::word_embeddings(&self.tok_embeddings, &self.sparse, batch, mode)?;
        let x = self.norm.forward(&x, mode)?;
        blocks::dropout(&x, self.own.embedding_dropout, mode)
    }

    /// Layers `range` on packed states `x` `[T, hidden]`; the final LayerNorm when `range`
    /// ends at the last layer.
    pub fn forward_layers(
        &self,
        x: &Tensor,
        batch: &PackedBatch,
        range: std::ops::Range<usize>,
        mode: Mode,
    ) -> Result<Tensor> {
        let end = range.end;
        let mut x = x.clone();
        for layer in &self.layers[range] {
            x = self.layer(layer, &x, batch, mode)?;
        }
        if end == self.layers.len() {
            x = self.final_norm.forward(&x, mode)?;
        }
        Ok(x)
    }

    fn layer(
        &self,
        l: &ModernBertLayer,
        x: &Tensor,
        batch: &PackedBatch,
        mode: Mode,
    ) -> Result<Tensor> {
        let c = &self.own;
        let normed = match &l.attn_norm {
            Some(n) => n.forward(x, mode)?,
            None => x.clone(),
        };
        let pos = match l.kind {
            LayerKind::Global => Positions {
                rotary: Some(&self.global_rope),
                ..Default::default()
            },
            LayerKind::Local => Positions {
                rotary: Some(&self.local_rope),
                window: Some(c.window()),
                ..Default::default()
            },
        };
        let qkv = l.wqkv.forward(&normed)?;
        let heads = c.num_attention_heads;
        let ctx =
            blocks::self_attention(&qkv, &batch.offsets, heads, &pos, c.attention_dropout, mode)?;
        let attn = blocks::dropout(&l.wo.forward(&ctx)?, c.attention_dropout, mode)?;
        let x = (x + attn)?;
        let h = gate_first_half(&l.wi.forward(&l.mlp_norm.forward(&x, mode)?)?, Gate::Gelu)?;
        let h = blocks::dropout(&h, c.mlp_dropout, mode)?;
        x + l.mlp_wo.forward(&h)?
    }
}

/// An `anyhow` error as a candle one (config checks inside `load`).
fn msg(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// modernbert-embed-base's config.json as published (transformers 4.48 keys).
    const PUBLISHED: &str = r#"{
      "architectures": ["ModernBertModel"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 50281, "classifier_activation": "gelu", "classifier_bias": false,
      "classifier_dropout": 0.0, "classifier_pooling": "mean", "cls_token_id": 50281,
      "decoder_bias": true, "deterministic_flash_attn": false, "embedding_dropout": 0.0,
      "eos_token_id": 50282, "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0,
      "gradient_checkpointing": false, "hidden_activation": "gelu", "hidden_size": 768,
      "initializer_cutoff_factor": 2.0, "initializer_range": 0.02, "intermediate_size": 1152,
      "layer_norm_eps": 1e-05, "local_attention": 128, "local_rope_theta": 10000.0,
      "max_position_embeddings": 8192, "mlp_bias": false, "mlp_dropout": 0.0,
      "model_type": "modernbert", "norm_bias": false, "norm_eps": 1e-05,
      "num_attention_heads": 12, "num_hidden_layers": 22, "pad_token_id": 50283,
      "position_embedding_type": "absolute", "repad_logits_with_grad": false,
      "sep_token_id": 50282, "sparse_pred_ignore_index": -100, "sparse_prediction": false,
      "torch_dtype": "float32", "transformers_version": "4.48.0", "vocab_size": 50368
    }"#;

    #[test]
    fn published_and_transformers_5_configs_agree() {
        let old = ModernBertConfig::parse(&serde_json::from_str(PUBLISHED).unwrap()).unwrap();
        let kinds = old.layer_kinds().unwrap();
        assert_eq!(kinds.len(), 22);
        let globals: Vec<usize> = (0..22).filter(|&i| kinds[i] == LayerKind::Global).collect();
        assert_eq!(globals, vec![0, 3, 6, 9, 12, 15, 18, 21]);
        assert_eq!(old.rope_theta(LayerKind::Global).unwrap(), 160_000.0);
        assert_eq!(old.rope_theta(LayerKind::Local).unwrap(), 10_000.0);
        assert_eq!(old.window(), 64);

        let mut v: Value = serde_json::from_str(PUBLISHED).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in [
            "global_attn_every_n_layers",
            "global_rope_theta",
            "local_rope_theta",
        ] {
            o.remove(k);
        }
        let types: Vec<&str> = kinds
            .iter()
            .map(|k| match k {
                LayerKind::Global => "full_attention",
                LayerKind::Local => "sliding_attention",
            })
            .collect();
        o.insert("layer_types".into(), json!(types));
        o.insert(
            "rope_parameters".into(),
            json!({"full_attention": {"rope_theta": 160000.0, "rope_type": "default"},
                   "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}),
        );
        let new = ModernBertConfig::parse(&v).unwrap();
        assert_eq!(new.layer_kinds().unwrap(), kinds);
        assert_eq!(new.rope_theta(LayerKind::Global).unwrap(), 160_000.0);

        v["rope_parameters"]["full_attention"]["rope_type"] = json!("yarn");
        let e = ModernBertConfig::parse(&v).unwrap_err();
        assert!(format!("{e:#}").contains("yarn"), "{e:#}");
        v["hidden_activation"] = json!("silu");
        let e = ModernBertConfig::parse(&v).unwrap_err();
        assert!(format!("{e:#}").contains("silu"), "{e:#}");
    }
}
