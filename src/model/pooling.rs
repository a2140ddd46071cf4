//! Pooling token states into one sentence vector, and L2 normalisation: the one
//! implementation of each, for padded tensors (differentiable), packed tensors
//! (differentiable) and plain rows (the inference fast path).

use candle_core::{DType, Result, Tensor};

use super::batch::PackedBatch;

/// How token states `[batch, seq, hidden]` become a sentence vector `[batch, hidden]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The average of the real (non-padding) tokens' states.
    Mean,
    /// The state of the first token, `[CLS]`.
    Cls,
    /// The element-wise maximum over real tokens.
    Max,
    /// The sum over real tokens divided by the square root of their count.
    MeanSqrtLen,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
            Pooling::MeanSqrtLen => "mean_sqrt_len",
        }
    }

    /// The token states of one sequence, `n` rows of width `h` back to back, pooled into one
    /// vector. The inference fast path's pooling; equal to [`Self::forward`] to rounding.
    pub fn pool_rows(self, rows: &[f32], h: usize) -> Vec<f32> {
        let n = rows.len() / h.max(1);
        match self {
            Pooling::Cls => rows[..h].to_vec(),
            Pooling::Max => {
                let mut out = vec![f32::NEG_INFINITY; h];
                for r in rows.chunks(h) {
                    for (o, v) in out.iter_mut().zip(r) {
                        *o = o.max(*v);
                    }
                }
                out
            }
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let mut out = vec![0f32; h];
                for r in rows.chunks(h) {
                    for (o, v) in out.iter_mut().zip(r) {
                        *o += *v;
                    }
                }
                let denom = if self == Pooling::Mean {
                    n as f32
                } else {
                    (n as f32).sqrt()
                };
                out.iter_mut().for_each(|v| *v /= denom.max(1e-9));
                out
            }
        }
    }

    /// Packed token states `x` `[tokens, hidden]` of `batch` -> `[batch, hidden]`.
    /// Differentiable; mean pooling is one matrix product.
    pub fn forward_packed(self, x: &Tensor, batch: &PackedBatch) -> Result<Tensor> {
        match self {
            Pooling::Mean => batch.mean_matrix(x.device())?.matmul(x),
            _ => {
                let rows = (0..batch.len())
                    .map(|i| {
                        let seq = x.narrow(0, batch.offsets[i], batch.length(i))?;
                        match self {
                            Pooling::Cls => seq.narrow(0, 0, 1),
                            Pooling::Max => seq.max_keepdim(0),
                            _ => seq.sum_keepdim(0)? / (batch.length(i) as f64).sqrt(),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
        }
    }

    /// `hidden` `[batch, seq, hidden]`, `mask` `[batch, seq]` of 0/1 -> `[batch, hidden]`.
    /// Padding positions never contribute. Differentiable.
    pub fn forward(self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [batch, seq, 1]
        match self {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let sum = hidden.broadcast_mul(&mask)?.sum(1)?; // [batch, hidden]
                let count = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?; // [batch, 1]
                let denom = if self == Pooling::Mean {
                    count
                } else {
                    count.sqrt()?
                };
                sum.broadcast_div(&denom)
            }
            Pooling::Max => {
                // Padding gets a large negative so it never wins the max.
                let penalty = ((mask.ones_like()? - &mask)? * -1e9)?;
                hidden.broadcast_add(&penalty)?.max(1)
            }
        }
    }
}

/// Scales `v` to unit L2 norm (a zero vector stays zero): sentence-transformers' `Normalize`.
/// Values so large that their squares overflow are scaled down first, so a finite vector
/// never becomes zeros.
pub fn normalize_l2(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm.is_infinite() {
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        if max.is_finite() {
            v.iter_mut().for_each(|x| *x /= max);
            return normalize_l2(v);
        }
    }
    let norm = norm.max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The three implementations agree: padded tensors, packed tensors and plain rows.
    #[test]
    fn padded_packed_and_rows_pool_alike() {
        let h = 3;
        let lens = [2usize, 4, 1];
        let max = 4;
        let vals: Vec<f32> = (0..lens.len() * max * h)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let padded = Tensor::from_vec(vals.clone(), (lens.len(), max, h), &Device::Cpu).unwrap();
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|&l| (0..max).map(move |j| (j < l) as u8 as f32))
            .collect();
        let mask = Tensor::from_vec(mask, (lens.len(), max), &Device::Cpu).unwrap();
        let mut rows = Vec::new();
        let mut offsets = vec![0];
        for (b, &l) in lens.iter().enumerate() {
            rows.extend_from_slice(&vals[b * max * h..(b * max + l) * h]);
            offsets.push(offsets[b] + l);
        }
        let packed =
            Tensor::from_vec(rows.clone(), (offsets[lens.len()], h), &Device::Cpu).unwrap();
        let batch = PackedBatch {
            input_ids: vec![0; offsets[lens.len()]],
            type_ids: vec![0; offsets[lens.len()]],
            positions: vec![0; offsets[lens.len()]],
            offsets: offsets.clone(),
        };
        for p in [
            Pooling::Mean,
            Pooling::Cls,
            Pooling::Max,
            Pooling::MeanSqrtLen,
        ] {
            let a = p.forward(&padded, &mask).unwrap().to_vec2::<f32>().unwrap();
            let b = p
                .forward_packed(&packed, &batch)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for s in 0..lens.len() {
                let c = p.pool_rows(&rows[offsets[s] * h..offsets[s + 1] * h], h);
                for j in 0..h {
                    assert!((a[s][j] - b[s][j]).abs() < 1e-5, "{p:?} {s} {j}");
                    assert!((a[s][j] - c[j]).abs() < 1e-5, "{p:?} {s} {j}");
                }
            }
        }
        let mut v = [3.0, 4.0];
        normalize_l2(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut z = [0.0f32; 2];
        normalize_l2(&mut z);
        assert_eq!(z, [0.0, 0.0]);
        // Squares that overflow f32 still give a unit vector, not zeros.
        let mut big = [3e38f32, -3e38f32];
        normalize_l2(&mut big);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (big[0] - h).abs() < 1e-6 && (big[1] + h).abs() < 1e-6,
            "{big:?}"
        );
    }
}
