//! NomicBERT (nomic-embed-text-v1 and v1.5): BERT's post-norm layers with a fused Q/K/V
//! projection, rotary positions instead of a position table, a SwiGLU feed-forward layer and
//! no biases in the dense layers.
//!
//! Weight names follow nomic's `NomicBertModel` (as candle-transformers' `nomic_bert` reads
//! them): `embeddings.word_embeddings`, `embeddings.token_type_embeddings`, `emb_ln`,
//! `encoder.layers.{i}.attn.Wqkv`, `encoder.layers.{i}.attn.out_proj`,
//! `encoder.layers.{i}.mlp.fc11` (value), `mlp.fc12` (gate), `mlp.fc2`, `norm1`, `norm2`.
//! Canonical names ([`super::arch`]): `emb_ln` is `embeddings.LayerNorm`, and the layers sit
//! under `encoder.layer.{i}.` with their own sub-names.

use anyhow::{ensure, Context};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::{json, Value};

use super::batch::PackedBatch;
use super::bert::{BertConfig, Mode, SparseTap};
use super::blocks::{self, Dense, Gate, Norm, Positions};
use super::names::layer_prefix;
use super::rotary::RotaryTable;

/// `config.json` of a NomicBERT model (nomic's `NomicBertConfig` keys, GPT-2 style).
#[derive(Debug, Clone, Deserialize)]
pub struct NomicBertConfig {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_layer: usize,
    /// The feed-forward width; nomic-embed-text has it in its config.
    pub n_inner: usize,
    pub n_positions: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "initializer_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    #[serde(default)]
    pub rotary_emb_fraction: f64,
    #[serde(default = "rotary_base")]
    pub rotary_emb_base: f64,
    #[serde(default)]
    pub rotary_emb_interleaved: bool,
    pub rotary_emb_scale_base: Option<f64>,
    pub rotary_scaling_factor: Option<f64>,
    #[serde(default = "yes")]
    pub qkv_proj_bias: bool,
    #[serde(default = "yes")]
    pub mlp_fc1_bias: bool,
    #[serde(default = "yes")]
    pub mlp_fc2_bias: bool,
    #[serde(default = "gelu")]
    pub activation_function: String,
    #[serde(default)]
    pub prenorm: bool,
    #[serde(default)]
    pub use_rms_norm: bool,
    #[serde(default)]
    pub parallel_block: bool,
    #[serde(default)]
    pub causal: bool,
    #[serde(default = "dropout")]
    pub resid_pdrop: f64,
    #[serde(default = "dropout")]
    pub embd_pdrop: f64,
    #[serde(default = "dropout")]
    pub attn_pdrop: f64,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-5
}
fn initializer_range() -> f64 {
    0.02
}
fn rotary_base() -> f64 {
    10_000.0
}
fn yes() -> bool {
    true
}
fn gelu() -> String {
    "gelu".into()
}
fn dropout() -> f64 {
    0.1
}

impl NomicBertConfig {
    /// The gate of the feed-forward layer: SwiGLU (nomic-embed-text), GeGLU or GLU.
    pub fn gate(&self) -> anyhow::Result<Gate> {
        Ok(match self.activation_function.as_str() {
            "swiglu" => Gate::Silu,
            "geglu" => Gate::Gelu,
            "glu" => Gate::Sigmoid,
            other => anyhow::bail!(
                "activation_function {other:?} is not supported (swiglu, geglu or glu: the gated \
                 feed-forward layers fc11, fc12, fc2)"
            ),
        })
    }

    /// Refuses the variants this implementation does not run.
    pub fn check(&self) -> anyhow::Result<()> {
        self.gate()?;
        let refuse = |what: &str, bad: bool| -> anyhow::Result<()> {
            ensure!(!bad, "{what} is not supported");
            Ok(())
        };
        refuse(
            &format!(
                "rotary_emb_fraction {} (rotary positions over the whole head, 1.0, only)",
                self.rotary_emb_fraction
            ),
            self.rotary_emb_fraction != 1.0,
        )?;
        refuse("rotary_emb_interleaved true", self.rotary_emb_interleaved)?;
        refuse(
            "rotary_emb_scale_base (xPos)",
            self.rotary_emb_scale_base.is_some(),
        )?;
        refuse(
            "rotary_scaling_factor (dynamic NTK scaling)",
            self.rotary_scaling_factor.is_some(),
        )?;
        refuse("prenorm true", self.prenorm)?;
        refuse("use_rms_norm true", self.use_rms_norm)?;
        refuse("parallel_block true", self.parallel_block)?;
        refuse("causal true", self.causal)?;
        ensure!(
            self.n_head > 0
                && self.n_embd.is_multiple_of(self.n_head)
                && (self.n_embd / self.n_head).is_multiple_of(2),
            "n_embd {} over n_head {} gives no even head size for rotary positions",
            self.n_embd,
            self.n_head
        );
        Ok(())
    }

    /// The shape the rest of the code reads, as a BERT config.
    pub fn as_bert(&self) -> Value {
        json!({
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "intermediate_size": self.n_inner,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.resid_pdrop,
            "attention_probs_dropout_prob": self.attn_pdrop,
            "max_position_embeddings": self.n_positions,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_epsilon,
            "pad_token_id": self.pad_token_id.unwrap_or(0),
            "model_type": "nomic_bert",
        })
    }

    /// Parses `config.json`'s value.
    pub fn parse(v: &Value) -> anyhow::Result<Self> {
        let c: Self = serde_json::from_value(v.clone()).context("reading a nomic_bert config")?;
        c.check()?;
        Ok(c)
    }
}

/// One post-norm layer.
#[derive(Clone)]
pub struct NomicBertLayer {
    pub wqkv: Dense,
    pub out_proj: Dense,
    pub norm1: Norm,
    pub fc11: Dense,
    pub fc12: Dense,
    pub fc2: Dense,
    pub norm2: Norm,
}

impl NomicBertLayer {
    pub fn load(vb: VarBuilder, c: &NomicBertConfig) -> Result<Self> {
        let (h, i, eps) = (c.n_embd, c.n_inner, c.layer_norm_epsilon);
        let (attn, mlp) = (vb.pp("attn"), vb.pp("mlp"));
        Ok(Self {
            wqkv: Dense::load(attn.pp("Wqkv"), h, 3 * h, c.qkv_proj_bias)?,
            out_proj: Dense::load(attn.pp("out_proj"), h, h, c.qkv_proj_bias)?,
            norm1: Norm::load(vb.pp("norm1"), h, eps, true)?,
            fc11: Dense::load(mlp.pp("fc11"), h, i, c.mlp_fc1_bias)?,
            fc12: Dense::load(mlp.pp("fc12"), h, i, c.mlp_fc1_bias)?,
            fc2: Dense::load(mlp.pp("fc2"), i, h, c.mlp_fc2_bias)?,
            norm2: Norm::load(vb.pp("norm2"), h, eps, true)?,
        })
    }
}

/// The NomicBERT encoder over packed batches.
#[derive(Clone)]
pub struct NomicBertEncoder {
    pub word_embeddings: Tensor,
    pub token_type_embeddings: Option<Tensor>,
    pub emb_ln: Norm,
    pub layers: Vec<NomicBertLayer>,
    rope: RotaryTable,
    gate: Gate,
    pub own: NomicBertConfig,
    pub config: BertConfig,
    pub sparse: std::sync::Arc<SparseTap>,
}

impl NomicBertEncoder {
    /// Loads the encoder under our canonical names (see the module doc).
    pub fn load(vb: VarBuilder, cfg: &BertConfig, own: &NomicBertConfig) -> Result<Self> {
        let h = own.n_embd;
        let emb = vb.pp("embeddings");
        let std = own.initializer_range;
        let token_type_embeddings = match own.type_vocab_size {
            0 => None,
            n => Some(blocks::table(emb.pp("token_type_embeddings"), n, h, std)?),
        };
        let layers = (0..own.n_layer)
            .map(|i| NomicBertLayer::load(vb.pp(layer_prefix(i)), own))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings: blocks::table(emb.pp("word_embeddings"), own.vocab_size, h, std)?,
            token_type_embeddings,
            emb_ln: Norm::load(emb.pp("LayerNorm"), h, own.layer_norm_epsilon, true)?,
            layers,
            rope: RotaryTable::new(h / own.n_head, own.rotary_emb_base, own.n_positions),
            gate: own
                .gate()
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            own: own.clone(),
            config: cfg.clone(),
            sparse: Default::default(),
        })
    }

    /// `[T, hidden]`: word (+ token type) embeddings, normalised.
    pub fn embed_packed(&self, batch: &PackedBatch, mode: Mode) -> Result<Tensor> {
        let mut x = blocks::word_embeddings(&self.word_embeddings, &self.sparse, batch, mode)?;
        if let Some(types) = &self.token_type_embeddings {
            let ids = Tensor::from_slice(&batch.type_ids, batch.tokens(), x.device())?;
            x = (x + types.index_select(&ids, 0)?)?;
        }
        let x = self.emb_ln.forward(&x, mode)?;
        blocks::dropout(&x, self.own.embd_pdrop, mode)
    }

    /// Layers `range` on packed states `x` `[T, hidden]`.
    pub fn forward_layers(
        &self,
        x: &Tensor,
        batch: &PackedBatch,
        range: std::ops::Range<usize>,
        mode: Mode,
    ) -> Result<Tensor> {
        let c = &self.own;
        let pos = Positions {
            rotary: Some(&self.rope),
            ..Default::default()
        };
        let mut x = x.clone();
        for l in &self.layers[range] {
            let qkv = l.wqkv.forward(&x)?;
            let ctx =
                blocks::self_attention(&qkv, &batch.offsets, c.n_head, &pos, c.attn_pdrop, mode)?;
            let attn = blocks::dropout(&l.out_proj.forward(&ctx)?, c.resid_pdrop, mode)?;
            x = l.norm1.forward(&(attn + &x)?, mode)?;
            let gated = (l.fc11.forward(&x)? * self.gate.apply(&l.fc12.forward(&x)?)?)?;
            let mlp = blocks::dropout(&l.fc2.forward(&gated)?, c.resid_pdrop, mode)?;
            x = l.norm2.forward(&(mlp + &x)?, mode)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nomic-embed-text-v1.5's config.json as published (from memory of the file: the keys
    /// this code reads are the ones candle-transformers' `nomic_bert` also reads).
    pub const PUBLISHED: &str = r#"{
      "activation_function": "swiglu", "architectures": ["NomicBertModel"], "attn_pdrop": 0.0,
      "bos_token_id": null, "causal": false, "dense_seq_output": true, "embd_pdrop": 0.0,
      "eos_token_id": null, "fused_bias_fc": true, "fused_dropout_add_ln": true,
      "initializer_range": 0.02, "layer_norm_epsilon": 1e-12, "max_trained_positions": 2048,
      "mlp_fc1_bias": false, "mlp_fc2_bias": false, "model_type": "nomic_bert", "n_embd": 768,
      "n_head": 12, "n_inner": 3072, "n_layer": 12, "n_positions": 8192,
      "pad_vocab_size_multiple": 64, "parallel_block": false, "parallel_block_tied_norm": false,
      "prenorm": false, "qkv_proj_bias": false, "reorder_and_upcast_attn": false,
      "resid_pdrop": 0.0, "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0,
      "rotary_emb_interleaved": false, "rotary_emb_scale_base": null,
      "rotary_scaling_factor": null, "scale_attn_by_inverse_layer_idx": false,
      "scale_attn_weights": true, "summary_activation": null, "summary_first_dropout": 0.0,
      "summary_proj_to_labels": true, "summary_type": "cls_index", "summary_use_proj": true,
      "torch_dtype": "float32", "transformers_version": "4.34.0", "type_vocab_size": 2,
      "use_cache": true, "use_flash_attn": true, "use_rms_norm": false, "use_xentropy": true,
      "vocab_size": 30528
    }"#;

    #[test]
    fn published_config_parses_and_variants_are_refused() {
        let v: Value = serde_json::from_str(PUBLISHED).unwrap();
        let c = NomicBertConfig::parse(&v).unwrap();
        assert_eq!(
            (c.n_embd, c.n_layer, c.n_inner, c.n_positions),
            (768, 12, 3072, 8192)
        );
        assert_eq!(c.rotary_emb_base, 1000.0);
        assert_eq!(c.gate().unwrap(), Gate::Silu);
        assert!(!c.qkv_proj_bias && !c.mlp_fc1_bias && !c.mlp_fc2_bias);
        for (key, value, named) in [
            ("rotary_scaling_factor", json!(2.0), "rotary_scaling_factor"),
            ("prenorm", json!(true), "prenorm"),
            ("rotary_emb_fraction", json!(0.5), "rotary_emb_fraction 0.5"),
            ("activation_function", json!("gelu"), "\"gelu\""),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let e = NomicBertConfig::parse(&bad).unwrap_err();
            assert!(format!("{e:#}").contains(named), "{key}: {e:#}");
        }
    }
}
