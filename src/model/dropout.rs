//! Dropout with a seeded generator, so that training with the same seed repeats exactly.

use std::sync::Mutex;

use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Draws dropout masks from its own generator; candle's CPU generator cannot be seeded.
pub struct Dropout {
    /// `None` turns dropout off while keeping the training ops.
    rng: Option<Mutex<StdRng>>,
}

impl Dropout {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Some(Mutex::new(StdRng::seed_from_u64(seed))),
        }
    }

    /// A dropout that drops nothing: the training path without its randomness.
    pub fn disabled() -> Self {
        Self { rng: None }
    }

    /// Zeroes each element of `x` with probability `p` and scales the rest by `1 / (1 - p)`.
    pub fn apply(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let Some(rng) = &self.rng else {
            return Ok(x.clone());
        };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        if p >= 1.0 {
            return x.zeros_like();
        }
        let keep = (1.0 / (1.0 - p)) as f32;
        let threshold = (p * u32::MAX as f64) as u32;
        let mut rng = rng.lock().expect("dropout rng lock");
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<u32>() < threshold {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
        x.mul(&mask)
    }
}
