//! JinaBERT (jina-embeddings-v2): BERT's post-norm layers with no position table, ALiBi
//! biases on the attention scores instead, and a gated feed-forward layer (GeGLU).
//!
//! Its `config.json` says `"model_type": "bert"` with `"position_embedding_type": "alibi"`;
//! [`super::arch`] recognises it by that. Weight names are BERT's for the embeddings and the
//! attention (`embeddings.word_embeddings`, `embeddings.token_type_embeddings`,
//! `embeddings.LayerNorm`, `encoder.layer.{i}.attention.self.query`, ...,
//! `attention.output.LayerNorm`), and Jina's for the feed-forward layer:
//! `encoder.layer.{i}.mlp.gated_layers` (no bias; the first half gated), `mlp.wo`,
//! `mlp.layernorm`. They are their own canonical names.

use anyhow::{ensure, Context};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

use super::attention_tiled::alibi_slopes;
use super::batch::PackedBatch;
use super::bert::{BertConfig, Mode, SparseTap};
use super::blocks::{self, gate_first_half, Dense, Gate, Norm, Positions};
use super::names::layer_prefix;

/// What a JinaBERT `config.json` adds to BERT's keys.
#[derive(Debug, Clone, Deserialize)]
pub struct JinaBertConfig {
    /// `alibi` (the only form implemented).
    pub position_embedding_type: String,
    /// `geglu` (jina-embeddings-v2) or `reglu`; absent means `geglu`.
    #[serde(default = "geglu")]
    pub feed_forward_type: String,
}

fn geglu() -> String {
    "geglu".into()
}

impl JinaBertConfig {
    /// The gate of the feed-forward layer.
    pub fn gate(&self) -> anyhow::Result<Gate> {
        Ok(match self.feed_forward_type.as_str() {
            "geglu" => Gate::Gelu,
            "reglu" => Gate::Relu,
            other => anyhow::bail!(
                "feed_forward_type {other:?} is not supported (geglu or reglu: the gated layer \
                 mlp.gated_layers)"
            ),
        })
    }

    /// Parses the Jina keys of `config.json`'s value and checks them.
    pub fn parse(v: &Value) -> anyhow::Result<Self> {
        let c: Self = serde_json::from_value(v.clone()).context("reading a jina_bert config")?;
        ensure!(
            c.position_embedding_type == "alibi",
            "position_embedding_type {:?} is not supported for JinaBERT (alibi only)",
            c.position_embedding_type
        );
        c.gate()?;
        Ok(c)
    }

    /// `config.json` without the keys BERT's config cannot read.
    pub fn strip(v: &Value) -> Value {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("position_embedding_type");
            o.insert("model_type".into(), "jina_bert".into());
        }
        v
    }
}

/// One post-norm layer.
#[derive(Clone)]
pub struct JinaBertLayer {
    pub query: Dense,
    pub key: Dense,
    pub value: Dense,
    pub output: Dense,
    pub attn_norm: Norm,
    pub gated_layers: Dense,
    pub wo: Dense,
    pub layernorm: Norm,
}

impl JinaBertLayer {
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let (sv, ov, mlp) = (
            vb.pp("attention").pp("self"),
            vb.pp("attention").pp("output"),
            vb.pp("mlp"),
        );
        Ok(Self {
            query: Dense::load(sv.pp("query"), h, h, true)?,
            key: Dense::load(sv.pp("key"), h, h, true)?,
            value: Dense::load(sv.pp("value"), h, h, true)?,
            output: Dense::load(ov.pp("dense"), h, h, true)?,
            attn_norm: Norm::load(ov.pp("LayerNorm"), h, eps, true)?,
            gated_layers: Dense::load(mlp.pp("gated_layers"), h, 2 * i, false)?,
            wo: Dense::load(mlp.pp("wo"), i, h, true)?,
            layernorm: Norm::load(mlp.pp("layernorm"), h, eps, true)?,
        })
    }

    /// The fused `[3h, h]` query/key/value projection (differentiable concatenation).
    fn qkv(&self, x: &Tensor) -> Result<Tensor> {
        let w = Tensor::cat(
            &[&self.query.weight, &self.key.weight, &self.value.weight],
            0,
        )?;
        let b = [&self.query, &self.key, &self.value].map(|d| d.bias.clone().expect("bias"));
        let b = Tensor::cat(&b, 0)?;
        super::ops::linear(x, &w, &b)
    }
}

/// The JinaBERT encoder over packed batches.
#[derive(Clone)]
pub struct JinaBertEncoder {
    pub word_embeddings: Tensor,
    pub token_type_embeddings: Tensor,
    pub emb_norm: Norm,
    pub layers: Vec<JinaBertLayer>,
    slopes: Vec<f32>,
    gate: Gate,
    pub own: JinaBertConfig,
    pub config: BertConfig,
    pub sparse: std::sync::Arc<SparseTap>,
}

impl JinaBertEncoder {
    /// Loads the encoder (names as in the module doc).
    pub fn load(vb: VarBuilder, cfg: &BertConfig, own: &JinaBertConfig) -> Result<Self> {
        // jina-embeddings-v2-base-code (jina-bert-v2-qk-post-norm) has the same config keys
        // and another layout: refused by name rather than as a missing tensor.
        let code = format!("{}.mlp.up_gated_layer.weight", layer_prefix(0));
        if vb.contains_tensor(&code) {
            candle_core::bail!(
                "the weights hold {code}: the layout of jina-embeddings-v2-base-code \
                 (jina-bert-v2-qk-post-norm: mlp.up_gated_layer, mlp.down_layer, attention \
                 layer_norm_q/k), which fetch-ml does not run; it runs JinaBERT as \
                 jina-embeddings-v2-base-en and small-en lay it out (mlp.gated_layers)"
            );
        }
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let std = cfg.initializer_range;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| JinaBertLayer::load(vb.pp(layer_prefix(i)), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings: blocks::table(emb.pp("word_embeddings"), cfg.vocab_size, h, std)?,
            token_type_embeddings: blocks::table(
                emb.pp("token_type_embeddings"),
                cfg.type_vocab_size,
                h,
                std,
            )?,
            emb_norm: Norm::load(emb.pp("LayerNorm"), h, cfg.layer_norm_eps, true)?,
            layers,
            slopes: alibi_slopes(cfg.num_attention_heads),
            gate: own
                .gate()
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            own: own.clone(),
            config: cfg.clone(),
            sparse: Default::default(),
        })
    }

    /// `[T, hidden]`: word + token type embeddings, normalised.
    pub fn embed_packed(&self, batch: &PackedBatch, mode: Mode) -> Result<Tensor> {
        let x = blocks::word_embeddings(&self.word_embeddings, &self.sparse, batch, mode)?;
        let types = Tensor::from_slice(&batch.type_ids, batch.tokens(), x.device())?;
        let x = (x + self.token_type_embeddings.index_select(&types, 0)?)?;
        let x = self.emb_norm.forward(&x, mode)?;
        blocks::dropout(&x, self.config.hidden_dropout_prob, mode)
    }

    /// Layers `range` on packed states `x` `[T, hidden]`.
    pub fn forward_layers(
        &self,
        x: &Tensor,
        batch: &PackedBatch,
        range: std::ops::Range<usize>,
        mode: Mode,
    ) -> Result<Tensor> {
        let c = &self.config;
        let pos = Positions {
            alibi: Some(&self.slopes),
            ..Default::default()
        };
        let (heads, p_attn, p) = (
            c.num_attention_heads,
            c.attention_probs_dropout_prob,
            c.hidden_dropout_prob,
        );
        let mut x = x.clone();
        for l in &self.layers[range] {
            let ctx =
                blocks::self_attention(&l.qkv(&x)?, &batch.offsets, heads, &pos, p_attn, mode)?;
            let attn = blocks::dropout(&l.output.forward(&ctx)?, p, mode)?;
            x = l.attn_norm.forward(&(attn + &x)?, mode)?;
            let h = gate_first_half(&l.gated_layers.forward(&x)?, self.gate)?;
            let h = blocks::dropout(&h, p, mode)?;
            x = l.layernorm.forward(&(l.wo.forward(&h)? + &x)?, mode)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jina_keys_are_read_and_checked() {
        let v = serde_json::json!({"model_type": "bert", "position_embedding_type": "alibi",
                                   "feed_forward_type": "geglu"});
        assert_eq!(
            JinaBertConfig::parse(&v).unwrap().gate().unwrap(),
            Gate::Gelu
        );
        let mut bad = v.clone();
        bad["feed_forward_type"] = "original".into();
        let e = JinaBertConfig::parse(&bad).unwrap_err();
        assert!(format!("{e:#}").contains("\"original\""), "{e:#}");
        assert!(JinaBertConfig::strip(&v)
            .get("position_embedding_type")
            .is_none());
    }
}
