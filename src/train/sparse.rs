//! Sparse gradients for the word embeddings: a training step touches the rows of the tokens
//! it saw (a few thousand of bert-base's 30,522), so their gradient is kept as rows, not as a
//! dense 30522 x 768 matrix (94 MB, plus as much again for candle's zero-filled accumulator,
//! every step), and a lazy AdamW updates only those rows (PyTorch's `sparse=True` with
//! `SparseAdam`). Its moments are allocated zeroed and only the rows ever seen become
//! resident. Rows that were seen get exactly the dense AdamW update; rows never seen are left
//! as they are (dense AdamW would decay them and keep moving them by their old momentum).

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Var};

use crate::model::ops::slice_mut;

/// Summed gradient rows, by row index.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SparseGrad {
    pub width: usize,
    pub rows: BTreeMap<u32, Vec<f32>>,
}

impl SparseGrad {
    pub fn new(width: usize) -> Self {
        Self {
            width,
            rows: BTreeMap::new(),
        }
    }

    /// Adds `grad` (`[ids.len(), width]`, row `i` for token `ids[i]`).
    pub fn add(&mut self, ids: &[u32], grad: &[f32]) -> Result<()> {
        if grad.len() != ids.len() * self.width {
            bail!(
                "sparse gradient: {} values for {} rows of {}",
                grad.len(),
                ids.len(),
                self.width
            );
        }
        for (&id, g) in ids.iter().zip(grad.chunks(self.width)) {
            let row = self.rows.entry(id).or_insert_with(|| vec![0.0; self.width]);
            row.iter_mut().zip(g).for_each(|(r, g)| *r += g);
        }
        Ok(())
    }

    pub fn sum_squares(&self) -> f64 {
        self.rows
            .values()
            .flatten()
            .map(|v| (*v as f64) * (*v as f64))
            .sum()
    }

    pub fn scale(&mut self, k: f32) {
        self.rows.values_mut().flatten().for_each(|v| *v *= k);
    }
}

/// AdamW over the rows of one `[rows, width]` variable that have a gradient.
pub struct LazyAdamW {
    var: Var,
    /// First and second moments, `[rows * width]` each, zeroed (untouched pages cost no
    /// memory until a row is seen).
    moments: Mutex<(Vec<f32>, Vec<f32>)>,
    step: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl LazyAdamW {
    pub fn new(var: Var, lr: f64, weight_decay: f64) -> Result<Self> {
        let n = var.as_tensor().elem_count();
        Ok(Self {
            var,
            moments: Mutex::new((vec![0.0; n], vec![0.0; n])),
            step: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    pub fn var(&self) -> &Var {
        &self.var
    }

    /// One update of the rows in `grad`, with the same formula and bias correction (by the
    /// global step) as the dense [`super::adamw::AdamW`].
    pub fn step(&mut self, grad: &SparseGrad) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let op = RowUpdate {
            grad,
            moments: &self.moments,
            lr: self.lr as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            scale_m: (1.0 / (1.0 - self.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - self.beta2.powi(t))) as f32,
            eps: self.eps as f32,
        };
        self.var.as_tensor().inplace_op1(&op)
    }
}

struct RowUpdate<'a> {
    grad: &'a SparseGrad,
    moments: &'a Mutex<(Vec<f32>, Vec<f32>)>,
    lr: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    scale_m: f32,
    scale_v: f32,
    eps: f32,
}

impl InplaceOp1 for RowUpdate<'_> {
    fn name(&self) -> &'static str {
        "lazy-adamw-rows"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let p = slice_mut(s, l, "embedding rows")?;
        let w = self.grad.width;
        let mut guard = self.moments.lock().expect("moments lock");
        let (m, v) = &mut *guard;
        if m.len() != p.len() || v.len() != p.len() || w == 0 {
            bail!(
                "lazy AdamW: moments of {} for a parameter of {}",
                m.len(),
                p.len()
            );
        }
        let rows = p.len() / w;
        for (&r, g) in &self.grad.rows {
            let r = r as usize;
            if r >= rows || g.len() != w {
                bail!(
                    "lazy AdamW: row {r} of width {} outside {rows} rows of {w}",
                    g.len()
                );
            }
            let span = r * w..(r + 1) * w;
            let (p, m, v) = (&mut p[span.clone()], &mut m[span.clone()], &mut v[span]);
            for j in 0..w {
                m[j] = self.beta1 * m[j] + (1.0 - self.beta1) * g[j];
                v[j] = self.beta2 * v[j] + (1.0 - self.beta2) * g[j] * g[j];
                let step = (m[j] * self.scale_m) / ((v[j] * self.scale_v).sqrt() + self.eps);
                p[j] = p[j] * self.decay - self.lr * step;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::adamw::AdamW;
    use candle_core::{Device, Tensor};

    /// Rows with a gradient follow the dense AdamW exactly, step after step; rows without one
    /// stay as they were.
    #[test]
    fn seen_rows_follow_dense_adamw() {
        let dev = Device::Cpu;
        let (rows, w) = (6usize, 4usize);
        let init: Vec<f32> = (0..rows * w).map(|i| (i as f32 * 0.37).sin()).collect();
        let dense_var = Var::from_vec(init.clone(), (rows, w), &dev).unwrap();
        let lazy_var = Var::from_vec(init.clone(), (rows, w), &dev).unwrap();
        let mut dense = AdamW::new(vec![dense_var.clone()], 0.01, 0.1).unwrap();
        let mut lazy = LazyAdamW::new(lazy_var.clone(), 0.01, 0.1).unwrap();
        // Rows 1 and 4 get gradients every step (row 1 twice: summed); the others never.
        for step in 0..3 {
            let ids = [1u32, 4, 1];
            let g: Vec<f32> = (0..ids.len() * w)
                .map(|i| ((i + step * 7) as f32 * 0.91).cos())
                .collect();
            let mut sparse = SparseGrad::new(w);
            sparse.add(&ids, &g).unwrap();
            let mut full = vec![0f32; rows * w];
            for (k, &id) in ids.iter().enumerate() {
                for j in 0..w {
                    full[id as usize * w + j] += g[k * w + j];
                }
            }
            // sum(var * G) has gradient G.
            let g_dense = Tensor::from_vec(full, (rows, w), &dev).unwrap();
            let grads = (dense_var.as_tensor() * &g_dense)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            dense.step(&grads).unwrap();
            lazy.step(&sparse).unwrap();
        }
        let d = dense_var.as_tensor().to_vec2::<f32>().unwrap();
        let l = lazy_var.as_tensor().to_vec2::<f32>().unwrap();
        assert_eq!(d[1], l[1]);
        assert_eq!(d[4], l[4]);
        for r in [0usize, 2, 3, 5] {
            assert_eq!(
                l[r],
                init[r * w..(r + 1) * w].to_vec(),
                "row {r} was never seen"
            );
            assert_ne!(d[r], l[r], "dense AdamW decays unseen rows");
        }
    }
}
