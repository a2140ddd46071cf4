//! Rotary position embeddings (RoPE) as ModernBERT and NomicBERT use them: the
//! non-interleaved ("rotate half", GPT-NeoX) form over the whole head, one table per base.
//!
//! The angles are computed as transformers computes them in float32: the inverse frequency
//! `1 / base^(2i/d)` (the power taken in double and rounded, which is what torch's float32
//! `pow` gives for the head sizes of these models), the angle `position * inv_freq` as a
//! float32 product, then its cosine and sine. An angle that differs by one rounding at
//! position 8,000 moves a score visibly, so the exact recipe matters.

use candle_core::{Device, Result, Tensor};

/// cos and sin of every (position, frequency) for one base: `[positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RotaryTable {
    head_dim: usize,
    positions: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RotaryTable {
    /// The table of `base` for heads of `head_dim` (even) and positions `0..positions`.
    pub fn new(head_dim: usize, base: f64, positions: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = (2 * i) as f32 / head_dim as f32;
                1.0 / (base.powf(exponent as f64) as f32)
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            head_dim,
            positions,
            cos,
            sin,
        }
    }

    /// Positions the table covers.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Rotates one head vector `x` (`head_dim` values) to `position`:
    /// `x1 cos - x2 sin`, `x2 cos + x1 sin` for the two halves.
    pub fn rotate(&self, x: &mut [f32], position: usize) {
        let half = self.head_dim / 2;
        let c = &self.cos[position * half..(position + 1) * half];
        let s = &self.sin[position * half..(position + 1) * half];
        let (x1, x2) = x.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * c[i] + -b * s[i];
            x2[i] = b * c[i] + a * s[i];
        }
    }

    /// Rotates the queries and keys of packed `qkv` rows (`[T, 3 * heads * head_dim]`, each
    /// row `q | k | v`) in place, each token to its position within its sequence
    /// (`offsets`: sequence `i` is rows `offsets[i]..offsets[i + 1]`).
    pub fn rotate_packed(&self, qkv: &mut [f32], offsets: &[usize], heads: usize) -> Result<()> {
        let hidden = heads * self.head_dim;
        let t = *offsets.last().unwrap_or(&0);
        if qkv.len() != t * 3 * hidden {
            candle_core::bail!(
                "rotary: {} values do not hold {t} rows of q, k and v of {hidden}",
                qkv.len()
            );
        }
        for w in offsets.windows(2) {
            if w[1] - w[0] > self.positions {
                candle_core::bail!(
                    "rotary: a sequence of {} tokens, but the table has {} positions",
                    w[1] - w[0],
                    self.positions
                );
            }
            for (p, row) in qkv[w[0] * 3 * hidden..w[1] * 3 * hidden]
                .chunks_exact_mut(3 * hidden)
                .enumerate()
            {
                for head in row[..2 * hidden].chunks_exact_mut(self.head_dim) {
                    self.rotate(head, p);
                }
            }
        }
        Ok(())
    }

    /// `(cos, sin)` as `[len, head_dim]` tensors (each half repeated, as transformers'
    /// `cat(freqs, freqs)`), for the differentiable path.
    pub fn tensors(&self, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        if len > self.positions {
            candle_core::bail!(
                "rotary: a sequence of {len} tokens, but the table has {} positions",
                self.positions
            );
        }
        let half = self.head_dim / 2;
        let full = |v: &[f32]| -> Vec<f32> {
            v[..len * half]
                .chunks_exact(half)
                .flat_map(|r| r.iter().chain(r.iter()).copied())
                .collect()
        };
        Ok((
            Tensor::from_vec(full(&self.cos), (len, self.head_dim), device)?,
            Tensor::from_vec(full(&self.sin), (len, self.head_dim), device)?,
        ))
    }
}

/// `x * cos + rotate_half(x) * sin` on `[.., len, head_dim]` (differentiable): transformers'
/// `apply_rotary_pos_emb`. `cos` and `sin` are `[len, head_dim]` from
/// [`RotaryTable::tensors`].
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let x1 = x.narrow(candle_core::D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(candle_core::D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], candle_core::D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_matches_the_tensor_form_and_keeps_norms() {
        let (d, len) = (8, 40);
        let table = RotaryTable::new(d, 10_000.0, 64);
        let x: Vec<f32> = (0..len * d)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let mut rotated = x.clone();
        for (p, row) in rotated.chunks_exact_mut(d).enumerate() {
            table.rotate(row, p);
        }
        let (cos, sin) = table.tensors(len, &Device::Cpu).unwrap();
        let t = Tensor::from_vec(x.clone(), (len, d), &Device::Cpu).unwrap();
        let want = apply(&t, &cos, &sin).unwrap().flatten_all().unwrap();
        assert_eq!(want.to_vec1::<f32>().unwrap(), rotated);
        // Position 0 is the identity; every rotation keeps the vector's norm.
        assert_eq!(&rotated[..d], &x[..d]);
        for (a, b) in x.chunks(d).zip(rotated.chunks(d)) {
            let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
            assert!((n(a) - n(b)).abs() < 1e-4);
        }
        // Pair i of position p turns by p / base^(2i/d).
        let angle = 5.0f64 / 10_000f64.powf(2.0 / 8.0);
        let mut e = vec![0.0; d];
        e[1] = 1.0;
        table.rotate(&mut e, 5);
        assert!(
            (e[1] as f64 - angle.cos()).abs() < 1e-6 && (e[5] as f64 - angle.sin()).abs() < 1e-6
        );
    }

    #[test]
    fn packed_rotation_restarts_per_sequence_and_leaves_values() {
        let (heads, d) = (2, 4);
        let h = heads * d;
        let table = RotaryTable::new(d, 1000.0, 8);
        let offsets = [0, 3, 5];
        let mut qkv: Vec<f32> = (0..5 * 3 * h).map(|i| i as f32 * 0.01).collect();
        let orig = qkv.clone();
        table.rotate_packed(&mut qkv, &offsets, heads).unwrap();
        // Row 3 is position 0 of the second sequence: unchanged.
        assert_eq!(&qkv[3 * 3 * h..4 * 3 * h], &orig[3 * 3 * h..4 * 3 * h]);
        // Values are never rotated.
        for r in 0..5 {
            assert_eq!(
                &qkv[r * 3 * h + 2 * h..(r + 1) * 3 * h],
                &orig[r * 3 * h + 2 * h..(r + 1) * 3 * h]
            );
        }
        // Row 4 (position 1) rotated like row 1 (position 1) would be.
        let mut k = orig[4 * 3 * h + h..4 * 3 * h + h + d].to_vec();
        table.rotate(&mut k, 1);
        assert_eq!(&qkv[4 * 3 * h + h..4 * 3 * h + h + d], &k[..]);
        let e = table.rotate_packed(&mut qkv, &[0, 9], heads).unwrap_err();
        assert!(e.to_string().contains("rows"), "{e}");
    }
}
