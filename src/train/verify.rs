//! Proof that freezing was honoured: parameter counts per part before training, and after
//! training a check that every frozen tensor is bit-identical and every trainable one changed.

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Serialize;

use crate::model::multitask::MultiTaskModel;
use crate::model::names::Part;

/// The part of the model a parameter belongs to, for reports (MPNet's relative position bias
/// counts with the embeddings: it freezes with them).
pub fn part_of(name: &str) -> String {
    Part::of(name).to_string()
}

/// Trainable and frozen parameter counts of one part.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartCount {
    pub part: String,
    pub trainable: usize,
    pub frozen: usize,
}

/// Parameter counts per part, in model order, and in total.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ParamCounts {
    pub parts: Vec<PartCount>,
    pub trainable: usize,
    pub frozen: usize,
}

impl ParamCounts {
    pub fn of(model: &MultiTaskModel) -> Self {
        let mut parts: Vec<PartCount> = Vec::new();
        for p in model.registry.params() {
            let part = part_of(&p.name);
            if parts.last().map(|l| l.part != part).unwrap_or(true) {
                parts.push(PartCount {
                    part,
                    trainable: 0,
                    frozen: 0,
                });
            }
            let last = parts.last_mut().expect("pushed above");
            if p.trainable() {
                last.trainable += p.numel();
            } else {
                last.frozen += p.numel();
            }
        }
        Self {
            trainable: parts.iter().map(|p| p.trainable).sum(),
            frozen: parts.iter().map(|p| p.frozen).sum(),
            parts,
        }
    }

    /// A readable table: one row per part.
    pub fn table(&self) -> String {
        let mut s = format!("{:<16} {:>12} {:>12}\n", "part", "trainable", "frozen");
        for p in &self.parts {
            s += &format!("{:<16} {:>12} {:>12}\n", p.part, p.trainable, p.frozen);
        }
        s += &format!(
            "{:<16} {:>12} {:>12}\n",
            "total", self.trainable, self.frozen
        );
        s
    }
}

/// A deep copy of every parameter, taken before training.
///
/// It keeps a 128-bit hash of each tensor's bits rather than a copy: a copy of every
/// parameter was the size of the model again (415 MB for bert-base) for the whole run. Two
/// different bit patterns share an XXH3-128 hash with probability about 2^-128.
pub struct Snapshot {
    params: Vec<(String, bool, u128)>,
}

/// The result of comparing parameters before and after training.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FreezeCheck {
    /// Every frozen tensor is bit-identical to its value before training.
    pub frozen_unchanged: bool,
    /// Every trainable tensor differs from its value before training.
    pub trainable_changed: bool,
    pub frozen_tensors: usize,
    pub trainable_tensors: usize,
    /// Names of frozen tensors that changed (should be empty).
    pub frozen_but_changed: Vec<String>,
    /// Names of trainable tensors that did not change (should be empty).
    pub trainable_but_unchanged: Vec<String>,
}

impl FreezeCheck {
    /// An error when either check failed.
    pub fn ensure(&self) -> Result<()> {
        if !self.frozen_unchanged {
            bail!(
                "freezing was not honoured: {} frozen tensor(s) changed during training: {}",
                self.frozen_but_changed.len(),
                self.frozen_but_changed.join(", ")
            );
        }
        if !self.trainable_changed {
            bail!(
                "{} trainable tensor(s) did not change during training (no gradient reached \
                 them, or the learning rate is 0): {}",
                self.trainable_but_unchanged.len(),
                self.trainable_but_unchanged.join(", ")
            );
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        format!(
            "freeze check: {} frozen tensor(s) {}, {} trainable tensor(s) {}",
            self.frozen_tensors,
            if self.frozen_unchanged {
                "bit-identical"
            } else {
                "CHANGED"
            },
            self.trainable_tensors,
            if self.trainable_changed {
                "all changed"
            } else {
                "NOT ALL CHANGED"
            },
        )
    }
}

/// The XXH3-128 hash of a tensor's f32 bits (little-endian), read in chunks.
fn bits_hash(t: &Tensor) -> Result<u128> {
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    const CHUNK: usize = 1 << 20;
    let mut buf = Vec::with_capacity(CHUNK * 4);
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let part: Vec<f32> = flat.narrow(0, start, len)?.to_vec1()?;
        buf.clear();
        buf.extend(part.iter().flat_map(|v| v.to_bits().to_le_bytes()));
        hasher.update(&buf);
    }
    Ok(hasher.digest128())
}

impl Snapshot {
    pub fn take(model: &MultiTaskModel) -> Result<Self> {
        let params = model
            .registry
            .params()
            .into_iter()
            .map(|p| Ok((p.name.clone(), p.trainable(), bits_hash(&p.tensor)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params })
    }

    /// Compares the model's parameters now with the snapshot.
    pub fn compare(&self, model: &MultiTaskModel) -> Result<FreezeCheck> {
        let now = model.registry.params();
        let mut check = FreezeCheck {
            frozen_unchanged: true,
            trainable_changed: true,
            frozen_tensors: 0,
            trainable_tensors: 0,
            frozen_but_changed: vec![],
            trainable_but_unchanged: vec![],
        };
        for ((name, trainable, before), p) in self.params.iter().zip(&now) {
            debug_assert_eq!(name, &p.name);
            let same = *before == bits_hash(&p.tensor)?;
            if *trainable {
                check.trainable_tensors += 1;
                if same {
                    check.trainable_but_unchanged.push(name.clone());
                }
            } else {
                check.frozen_tensors += 1;
                if !same {
                    check.frozen_but_changed.push(name.clone());
                }
            }
        }
        check.frozen_unchanged = check.frozen_but_changed.is_empty();
        check.trainable_changed = check.trainable_but_unchanged.is_empty();
        Ok(check)
    }
}
