//! AdamW with fused, in-place updates: the moments and the parameters are updated in one pass
//! each over their own memory, with no temporary tensors. candle's `AdamW` builds about ten
//! temporaries per parameter per step, which for a 30522 x 768 word-embedding matrix is a
//! gigabyte of fresh memory a step. Also here: an in-place gradient scale and a sum of squares
//! without temporaries, for clipping.

use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CustomOp1, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor, Var,
};
use rayon::prelude::*;

use crate::model::ops::{slice, slice_mut};

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 15;

/// `m = beta * m + (1 - beta) * g` (or `g * g` for the second moment).
struct Moment {
    beta: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let m = slice_mut(s1, l1, "moment")?;
        let g = slice(s2, l2, "gradient")?;
        let (b, c) = (self.beta, 1.0 - self.beta);
        let square = self.square;
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                if square {
                    m.iter_mut()
                        .zip(g)
                        .for_each(|(m, g)| *m = b * *m + c * g * g);
                } else {
                    m.iter_mut().zip(g).for_each(|(m, g)| *m = b * *m + c * g);
                }
            });
        Ok(())
    }
}

/// `theta = theta * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps)`.
struct Update {
    lr: f32,
    decay: f32,
    scale_m: f32,
    scale_v: f32,
    eps: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let p = slice_mut(s1, l1, "parameter")?;
        let m = slice(s2, l2, "first moment")?;
        let v = slice(s3, l3, "second moment")?;
        let Update {
            lr,
            decay,
            scale_m,
            scale_v,
            eps,
        } = *self;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK))
            .zip(v.par_chunks(CHUNK))
            .for_each(|((p, m), v)| {
                for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
                    let step = (m * scale_m) / ((v * scale_v).sqrt() + eps);
                    *p = *p * decay - lr * step;
                }
            });
        Ok(())
    }
}

/// Multiplies a tensor by a constant, in place.
struct Scale(f32);

impl InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let x = slice_mut(s, l, "scale")?;
        let k = self.0;
        x.par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= k));
        Ok(())
    }
}

/// The sum of squares of a tensor's elements, accumulated in f64.
struct SumSquares;

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "sum-squares"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "sum of squares")?;
        let total: f64 = x
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>())
            .sum();
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the norm
/// before scaling.
pub fn clip_gradients(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    clip_all_gradients(grads, vars, None, max_norm)
}

/// As [`clip_gradients`], with the rows of a sparse gradient counted in the global norm and
/// scaled with the rest.
pub fn clip_all_gradients(
    grads: &mut GradStore,
    vars: &[Var],
    mut sparse: Option<&mut super::sparse::SparseGrad>,
    max_norm: f64,
) -> Result<f64> {
    let mut sq = sparse.as_ref().map_or(0.0, |s| s.sum_squares());
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let g = g.contiguous()?;
            sq += g.apply_op1_no_bwd(&SumSquares)?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if norm.is_finite() && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        if let Some(s) = sparse.as_mut() {
            s.scale(scale);
        }
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = if g.is_contiguous() {
                    g.clone()
                } else {
                    g.contiguous()?
                };
                g.inplace_op1(&Scale(scale))?;
                grads.insert(v.as_tensor(), g);
            }
        }
    }
    Ok(norm)
}

/// AdamW (decoupled weight decay, bias-corrected moments) over a set of variables.
pub struct AdamW {
    params: Vec<(Var, Tensor, Tensor)>,
    step: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|v| {
                let m = v.as_tensor().zeros_like()?;
                let s = v.as_tensor().zeros_like()?;
                Ok((v, m, s))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            step: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update of every variable that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let update = Update {
            lr: self.lr as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            scale_m: (1.0 / (1.0 - self.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - self.beta2.powi(t))) as f32,
            eps: self.eps as f32,
        };
        for (var, m, v) in &self.params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.contiguous()?;
            m.inplace_op2(
                &g,
                &Moment {
                    beta: self.beta1 as f32,
                    square: false,
                },
            )?;
            v.inplace_op2(
                &g,
                &Moment {
                    beta: self.beta2 as f32,
                    square: true,
                },
            )?;
            var.as_tensor().inplace_op3(m, v, &update)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Optimizer;

    /// The fused AdamW follows candle's reference AdamW step for step.
    #[test]
    fn matches_candle_adamw() {
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let a = Var::from_vec(init.clone(), (3, 100), &dev).unwrap();
        let b = Var::from_vec(init, (3, 100), &dev).unwrap();
        let mut ours = AdamW::new(vec![a.clone()], 0.01, 0.05).unwrap();
        let params = candle_nn::ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.05,
            ..Default::default()
        };
        let mut reference = candle_nn::AdamW::new(vec![b.clone()], params).unwrap();
        for step in 0..5 {
            let loss = |x: &Var| {
                x.as_tensor()
                    .sqr()
                    .unwrap()
                    .sin()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            ours.step(&loss(&a).backward().unwrap()).unwrap();
            reference.step(&loss(&b).backward().unwrap()).unwrap();
            let diff = (a.as_tensor() - b.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "step {step}: max abs diff {diff}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![3f32, 4.0], 2, &dev).unwrap();
        let mut grads = (x.as_tensor() * 2.0)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // d/dx (2x)^2 = 8x = [24, 32], norm 40
        let norm = clip_gradients(&mut grads, std::slice::from_ref(&x), 4.0).unwrap();
        assert!((norm - 40.0).abs() < 1e-4);
        let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (g[0] - 2.4).abs() < 1e-4 && (g[1] - 3.2).abs() < 1e-4,
            "{g:?}"
        );
    }
}
