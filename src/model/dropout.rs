//! Dropout with a seeded generator, so that training with the same seed repeats exactly.

use std::sync::Mutex;

use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Seeds dropout masks from its own generator (candle's CPU generator cannot be seeded).
/// Each call draws one seed; the mask is a function of that seed and the element index, so
/// the backward pass recomputes it instead of storing it.
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

    /// A dropout that drops nothing: the training path without its randomness (for tests).
    #[cfg(any(test, feature = "test-support"))]
    pub fn disabled() -> Self {
        Self { rng: None }
    }

    /// The seed of the next mask, or `None` when nothing should be dropped.
    pub fn next_seed(&self, p: f64) -> Option<(f32, u64)> {
        let rng = self.rng.as_ref()?;
        (p > 0.0).then(|| (p as f32, rng.lock().expect("dropout rng lock").random()))
    }

    /// Zeroes each element of `x` with probability `p` and scales the rest by `1 / (1 - p)`.
    pub fn apply(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p >= 1.0 && self.rng.is_some() {
            return x.zeros_like();
        }
        match self.next_seed(p) {
            Some((p, seed)) => super::ops::dropout(x, p, seed),
            None => Ok(x.clone()),
        }
    }
}
