//! MPNet's relative position bias: the one thing MPNet adds to the BERT blocks.
//!
//! Hugging Face's `MPNetEncoder` holds `relative_attention_bias`, an embedding of
//! `relative_attention_num_buckets` rows by `num_attention_heads` columns. Once per forward
//! pass it buckets every (query `i`, key `j`) pair by the distance `j - i`
//! ([`relative_position_bucket`]), looks the buckets up, and adds the result, per head, to the
//! scaled attention scores of every layer before the softmax. The bias depends on `j - i` only,
//! so one head's bias for a sequence of `m` tokens is a vector of `2m - 1` values
//! ([`head_bias`]); the attention kernels read row `i` of the `m x m` bias from it as a slice.
//! In packed batches the distances are within each sequence.

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::BertConfig;

pub use super::config::MPNET_BUCKETS as BUCKETS;

/// Distances from this one on share the last bucket of their direction.
pub const MAX_DISTANCE: usize = 128;

/// `relative_position_bucket(j - i)` of Hugging Face's `MPNetEncoder` (bidirectional, 32
/// buckets, max distance 128): keys before the query in buckets 0-15, keys after in 16-31;
/// distances below 8 exactly, longer ones logarithmically up to 128. The logarithm is computed
/// in float32 as torch does, so the bucket edges agree.
pub fn relative_position_bucket(relative: i64) -> usize {
    let half = BUCKETS / 2;
    let n = -relative;
    let mut ret = if n < 0 { half } else { 0 };
    let n = n.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return ret + n;
    }
    let ratio = (MAX_DISTANCE as f64 / max_exact as f64).ln() as f32;
    let large = ((n as f32 / max_exact as f32).ln() / ratio * (half - max_exact) as f32) as usize;
    ret += (max_exact + large).min(half - 1);
    ret
}

/// The buckets of the distances `-(len - 1)..=(len - 1)`: entry `r + len - 1` is distance `r`.
pub fn distance_buckets(len: usize) -> Vec<u32> {
    let len = len.max(1) as i64;
    (-(len - 1)..len)
        .map(|r| relative_position_bucket(r) as u32)
        .collect()
}

/// The tokens `buckets` (from [`distance_buckets`]) covers.
fn covered(buckets: &[u32]) -> usize {
    buckets.len().div_ceil(2)
}

/// One head's bias for a sequence of `m` tokens by distance: `out[j - i + m - 1]` is the bias of
/// query `i` and key `j`. `table` is `[rows, heads]` row-major; `buckets` covers at least `m`
/// tokens.
pub fn head_bias(
    table: &[f32],
    heads: usize,
    head: usize,
    buckets: &[u32],
    m: usize,
    out: &mut Vec<f32>,
) {
    let l = covered(buckets);
    assert!(m <= l, "relative bias: {m} tokens, buckets for {l}");
    out.clear();
    if m == 0 {
        return;
    }
    out.extend(
        buckets[l - m..l + m - 1]
            .iter()
            .map(|&b| table[b as usize * heads + head]),
    );
}

/// The backward of [`head_bias`]: adds the gradient by distance `drel` (`2m - 1` values) into
/// column `head` of the table's gradient `dtable` (`[rows, heads]`).
pub fn head_bias_grad(
    drel: &[f32],
    heads: usize,
    head: usize,
    buckets: &[u32],
    dtable: &mut [f32],
) {
    let m = drel.len().div_ceil(2);
    let l = covered(buckets);
    if m == 0 {
        return;
    }
    for (g, &b) in drel.iter().zip(&buckets[l - m..l + m - 1]) {
        dtable[b as usize * heads + head] += g;
    }
}

/// The bias as a differentiable `[heads, seq, seq]` tensor (for the composite attention).
pub fn bias_matrix(table: &Tensor, seq: usize) -> Result<Tensor> {
    let heads = table.dim(1)?;
    let ids: Vec<u32> = (0..seq as i64)
        .flat_map(|i| (0..seq as i64).map(move |j| relative_position_bucket(j - i) as u32))
        .collect();
    let ids = Tensor::from_vec(ids, seq * seq, table.device())?;
    table
        .index_select(&ids, 0)?
        .reshape((seq, seq, heads))?
        .permute((2, 0, 1))?
        .contiguous()
}

/// `encoder.relative_attention_bias`: the table shared by every layer.
#[derive(Clone)]
pub struct RelativeBias {
    /// `[relative_attention_num_buckets, heads]`.
    pub table: Tensor,
}

impl RelativeBias {
    /// Reads `weight` under `vb` (`encoder.relative_attention_bias`).
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let rows = cfg.relative_attention_num_buckets;
        if rows < BUCKETS {
            bail!("relative_attention_num_buckets is {rows}; MPNet looks up {BUCKETS} buckets");
        }
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let table = vb.get_with_hints((rows, cfg.num_attention_heads), "weight", init)?;
        Ok(Self { table })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of Hugging Face's `relative_position_bucket` (transformers 5.24), by hand at the
    /// edges; the fixture test checks every distance up to 512.
    #[test]
    fn buckets_match_hugging_face_at_the_edges() {
        let cases = [
            (0, 0),
            (-1, 1),
            (-7, 7),
            (-8, 8),
            (-15, 9),
            (-16, 10),
            (-31, 11),
            (-32, 12),
            (-64, 14),
            (-127, 15),
            (-128, 15),
            (-1000, 15),
            (1, 17),
            (7, 23),
            (8, 24),
            (16, 26),
            (128, 31),
            (500, 31),
        ];
        for (r, want) in cases {
            assert_eq!(relative_position_bucket(r), want, "distance {r}");
        }
    }

    #[test]
    fn head_bias_reads_rows_as_slices() {
        // 32 buckets x 2 heads: the value is bucket * 10 + head.
        let table: Vec<f32> = (0..BUCKETS * 2)
            .map(|i| (i / 2 * 10 + i % 2) as f32)
            .collect();
        let buckets = distance_buckets(5);
        let mut rel = vec![1.0];
        head_bias(&table, 2, 1, &buckets, 0, &mut rel);
        assert!(rel.is_empty(), "no tokens, no bias");
        head_bias(&table, 2, 1, &buckets, 3, &mut rel);
        // Distances -2, -1, 0, 1, 2 -> buckets 2, 1, 0, 17, 18.
        assert_eq!(rel, vec![21.0, 11.0, 1.0, 171.0, 181.0]);
        let mut d = vec![0f32; BUCKETS * 2];
        head_bias_grad(&[1.0, 2.0, 3.0, 4.0, 5.0], 2, 1, &buckets, &mut d);
        assert_eq!((d[2 * 2 + 1], d[17 * 2 + 1], d[0]), (1.0, 4.0, 0.0));
        let m = bias_matrix(
            &Tensor::from_vec(table, (BUCKETS, 2), &candle_core::Device::Cpu).unwrap(),
            3,
        )
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
        // Head 1, query 2, key 0: distance -2.
        assert_eq!(m[1][2][0], 21.0);
        assert_eq!(m[1][0][2], 181.0);
    }
}
