//! Each long-context architecture's candle encoder turned into the fast path's parts: which
//! tensors fuse into one product, which LayerNorm sits where, the rotary tables, ALiBi slopes
//! and windows of each layer. One function per architecture; the layers are consumed one at a
//! time.

use super::*;
use crate::model::blocks::{Dense as CandleDense, Norm as CandleNorm};
use crate::model::jina_bert::JinaBertEncoder;
use crate::model::modernbert::ModernBertEncoder;
use crate::model::nomic_bert::NomicBertEncoder;

/// What [`LongEncoder`] is made of, apart from its kernels.
pub(super) struct Parts {
    pub style: Style,
    pub embeddings: Embeddings,
    pub layers: Vec<Layer>,
    pub final_norm: Option<Norm>,
    pub ropes: Vec<RotaryTable>,
    pub gate: Glu,
    pub config: BertConfig,
}

fn config_err(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

/// A LayerNorm's values (zeros for an absent bias).
fn norm(n: &CandleNorm) -> Result<Norm> {
    let weight = n.weight.to_vec1::<f32>()?;
    let bias = match &n.bias {
        Some(b) => b.to_vec1::<f32>()?,
        None => vec![0.0; weight.len()],
    };
    Ok(Norm {
        weight,
        bias,
        eps: n.eps() as f32,
    })
}

/// The dense layers `parts` stacked into one product (their output rows concatenated in
/// order), in `dtype`; absent biases are zeros. `normed`: the input is a LayerNorm's output
/// (int8 then gives its outlier token rows a second pass).
fn fused(parts: &[&CandleDense], dtype: quant::Dtype, normed: bool) -> Result<Dense> {
    let bias = |d: &CandleDense| match &d.bias {
        Some(b) => Ok(b.clone()),
        None => Tensor::zeros(d.out_dim(), candle_core::DType::F32, d.weight.device()),
    };
    let lin = match parts {
        [one] => Linear {
            weight: one.weight.clone(),
            bias: bias(one)?,
        },
        _ => Linear {
            weight: Tensor::cat(&parts.iter().map(|d| &d.weight).collect::<Vec<_>>(), 0)?,
            bias: Tensor::cat(
                &parts.iter().map(|d| bias(d)).collect::<Result<Vec<_>>>()?,
                0,
            )?,
        },
    };
    Dense::new(&lin, dtype, normed)
}

/// The attention of a layer with `heads` heads of `head_dim`.
fn spec(
    heads: usize,
    head_dim: usize,
    alibi: Option<Vec<f32>>,
    window: Option<usize>,
) -> AttentionSpec {
    AttentionSpec {
        heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        alibi,
        window,
        bf16: None,
    }
}

/// ModernBERT: pre-norm, `Wqkv` and `Wi` as they are (GeGLU, gate first), a rotary table per
/// layer kind, the local layers' window.
pub(super) fn modernbert(e: ModernBertEncoder, dtype: quant::Dtype) -> Result<Parts> {
    let ModernBertEncoder {
        tok_embeddings,
        norm: emb_norm,
        layers,
        final_norm,
        own,
        config,
        ..
    } = e;
    let heads = own.num_attention_heads;
    let head_dim = own.hidden_size / heads;
    let positions = own.max_position_embeddings;
    let kinds = [LayerKind::Global, LayerKind::Local];
    let ropes = kinds
        .iter()
        .map(|&k| {
            let theta = own.rope_theta(k).map_err(config_err)?;
            Ok(RotaryTable::new(head_dim, theta, positions))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(layers.len());
    for l in layers {
        let (rope, window) = match l.kind {
            LayerKind::Global => (0, None),
            LayerKind::Local => (1, Some(own.window())),
        };
        out.push(Layer {
            attn_norm: l.attn_norm.as_ref().map(norm).transpose()?,
            qkv: fused(&[&l.wqkv], dtype, true)?,
            out: fused(&[&l.wo], dtype, false)?,
            mlp_norm: norm(&l.mlp_norm)?,
            ffn_in: fused(&[&l.wi], dtype, true)?,
            ffn_out: fused(&[&l.mlp_wo], dtype, false)?,
            rope: Some(rope),
            spec: spec(heads, head_dim, None, window),
        });
    }
    Ok(Parts {
        style: Style::PreNorm,
        embeddings: Embeddings {
            words: tok_embeddings,
            types: None,
            norm: norm(&emb_norm)?,
        },
        layers: out,
        final_norm: Some(norm(&final_norm)?),
        ropes,
        gate: Glu::Gelu,
        config,
    })
}

/// NomicBERT: post-norm, `Wqkv` as it is, `fc12` (the gate) and `fc11` (the value) fused
/// into one product, one rotary table.
pub(super) fn nomic_bert(e: NomicBertEncoder, dtype: quant::Dtype) -> Result<Parts> {
    let NomicBertEncoder {
        word_embeddings,
        token_type_embeddings,
        emb_ln,
        layers,
        own,
        config,
        ..
    } = e;
    let (heads, head_dim) = (own.n_head, own.n_embd / own.n_head);
    let gate = glu(own.gate().map_err(config_err)?);
    let mut out = Vec::with_capacity(layers.len());
    for l in layers {
        out.push(Layer {
            attn_norm: Some(norm(&l.norm1)?),
            qkv: fused(&[&l.wqkv], dtype, true)?,
            out: fused(&[&l.out_proj], dtype, false)?,
            mlp_norm: norm(&l.norm2)?,
            ffn_in: fused(&[&l.fc12, &l.fc11], dtype, true)?,
            ffn_out: fused(&[&l.fc2], dtype, false)?,
            rope: Some(0),
            spec: spec(heads, head_dim, None, None),
        });
    }
    Ok(Parts {
        style: Style::PostNorm,
        embeddings: Embeddings {
            words: word_embeddings,
            types: token_type_embeddings,
            norm: norm(&emb_ln)?,
        },
        layers: out,
        final_norm: None,
        ropes: vec![RotaryTable::new(
            head_dim,
            own.rotary_emb_base,
            own.n_positions,
        )],
        gate,
        config,
    })
}

/// JinaBERT: post-norm, `query | key | value` fused, `gated_layers` as it is (gate first),
/// ALiBi.
pub(super) fn jina_bert(e: JinaBertEncoder, dtype: quant::Dtype) -> Result<Parts> {
    let JinaBertEncoder {
        word_embeddings,
        token_type_embeddings,
        emb_norm,
        layers,
        own,
        config,
        ..
    } = e;
    let heads = config.num_attention_heads;
    let head_dim = config.hidden_size / heads;
    let slopes = alibi_slopes(heads);
    let gate = glu(own.gate().map_err(config_err)?);
    let mut out = Vec::with_capacity(layers.len());
    for l in layers {
        out.push(Layer {
            attn_norm: Some(norm(&l.attn_norm)?),
            qkv: fused(&[&l.query, &l.key, &l.value], dtype, true)?,
            out: fused(&[&l.output], dtype, false)?,
            mlp_norm: norm(&l.layernorm)?,
            ffn_in: fused(&[&l.gated_layers], dtype, true)?,
            ffn_out: fused(&[&l.wo], dtype, false)?,
            rope: None,
            spec: spec(heads, head_dim, Some(slopes.clone()), None),
        });
    }
    Ok(Parts {
        style: Style::PostNorm,
        embeddings: Embeddings {
            words: word_embeddings,
            types: Some(token_type_embeddings),
            norm: norm(&emb_norm)?,
        },
        layers: out,
        final_norm: None,
        ropes: Vec::new(),
        gate,
        config,
    })
}
