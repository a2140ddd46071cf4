//! Inference with the multitask model: sentence vectors (computed, or read from the embedding
//! cache), each head's probabilities, and the evaluation metrics.

use anyhow::Result;
use candle_core::Tensor;

use super::embedding_cache::EmbeddingCache;
use super::metrics::HeadMetrics;
use super::prepared::Prepared;
use crate::model::fast::map_batches;
use crate::model::multitask::MultiTaskModel;
use crate::tokenize::{length_sorted_batches, Encoded};

/// Sentence vectors `[n, hidden]` of all `encoded`, in their order, without gradients. Batches
/// run side by side on the thread pool ([`map_batches`]).
pub fn compute_features(
    model: &MultiTaskModel,
    encoded: &[Encoded],
    batch_size: usize,
) -> Result<Tensor> {
    let dev = model.encoder.device().clone();
    let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
    let batches = length_sorted_batches(&lengths, batch_size, None);
    let tokens = |idx: &Vec<usize>| idx.iter().map(|&i| lengths[i]).sum();
    let parts = map_batches(&batches, tokens, |idx| {
        let items: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
        model.features_infer(&items)
    });
    // The workspaces hold whole batches' activations: free them for what follows (training).
    model.release_workspaces();
    let parts = parts?;
    let order: Vec<usize> = batches.concat();
    let sorted = Tensor::cat(&parts, 0)?;
    // A NaN vector would pass through the heads' ReLU as 0: finite, and wrong.
    let rows = sorted.to_vec2::<f32>()?;
    crate::finite::check_rows(rows.iter().map(Vec::as_slice), "vector").map_err(|n| {
        crate::finite::NonFiniteOutput {
            index: order[n.index],
            ..n
        }
    })?;
    // Row r of `sorted` is example order[r]; invert the permutation.
    let mut inverse = vec![0u32; order.len()];
    for (r, &i) in order.iter().enumerate() {
        inverse[i] = r as u32;
    }
    Ok(sorted.index_select(&Tensor::new(inverse, &dev)?, 0)?)
}

/// Like [`compute_features`], but reads vectors from `cache` where it has them and adds the
/// ones it computes. Only valid for a frozen encoder.
pub fn cached_features(
    model: &MultiTaskModel,
    data: &Prepared,
    batch_size: usize,
    cache: Option<&mut EmbeddingCache>,
) -> Result<Tensor> {
    let Some(cache) = cache else {
        return compute_features(model, &data.encoded, batch_size);
    };
    // A cached vector that is not finite (a damaged cache) is computed again.
    let missing: Vec<usize> = (0..data.texts.len())
        .filter(|&i| {
            cache
                .get(&data.texts[i])
                .is_none_or(|v| crate::finite::non_finite(v).is_some())
        })
        .collect();
    if !missing.is_empty() {
        let encoded: Vec<Encoded> = missing.iter().map(|&i| data.encoded[i].clone()).collect();
        let rows = compute_features(model, &encoded, batch_size)?.to_vec2::<f32>()?;
        for (&i, row) in missing.iter().zip(rows) {
            cache.insert(&data.texts[i], row);
        }
        cache.save()?;
    }
    let dim = model.encoder.config().hidden_size;
    let mut flat = Vec::with_capacity(data.texts.len() * dim);
    for t in &data.texts {
        flat.extend_from_slice(cache.get(t).expect("filled above"));
    }
    Ok(Tensor::from_vec(
        flat,
        (data.texts.len(), dim),
        model.encoder.device(),
    )?)
}

/// Class probabilities of both heads for every example: `[head][example][label]`.
pub fn predict_probs(
    model: &MultiTaskModel,
    encoded: &[Encoded],
    batch_size: usize,
    features: Option<&Tensor>,
) -> Result<[Vec<Vec<f32>>; 2]> {
    let computed;
    let features = match features {
        Some(f) => f,
        None => {
            computed = compute_features(model, encoded, batch_size)?;
            &computed
        }
    };
    let logits = model.head_logits(features, None)?;
    let probs = |t: usize| -> Result<Vec<Vec<f32>>> {
        let p = candle_nn::ops::softmax_last_dim(&logits[t])?.to_vec2::<f32>()?;
        let what = ["class probabilities", "sentiment probabilities"][t];
        crate::finite::check_rows(p.iter().map(Vec::as_slice), what)?;
        Ok(p)
    };
    Ok([probs(0)?, probs(1)?])
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Metrics of both heads on `data`.
pub fn evaluate(
    model: &MultiTaskModel,
    data: &Prepared,
    batch_size: usize,
    features: Option<&Tensor>,
) -> Result<[HeadMetrics; 2]> {
    let probs = predict_probs(model, &data.encoded, batch_size, features)?;
    let head = |t: usize| {
        let pairs: Vec<(u32, u32)> = data
            .labels
            .iter()
            .zip(&probs[t])
            .filter_map(|(l, p)| l[t].map(|truth| (truth, argmax(p))))
            .collect();
        HeadMetrics::compute(&model.spec.labels[t], &pairs)
    };
    Ok([head(0), head(1)])
}
