//! The multitask loss: per-head cross-entropy that skips rows without that head's label.

use candle_core::{Result, Tensor, D};

/// Labels of one head for a batch: a class index per row and whether the row has one.
pub struct HeadTargets {
    /// `[batch]` u32; 0 where the row has no label (masked out).
    pub ids: Tensor,
    /// `[batch]` f32; 1 where the row has a label.
    pub mask: Tensor,
    /// Rows with a label.
    pub count: usize,
}

impl HeadTargets {
    pub fn new(labels: &[Option<u32>], device: &candle_core::Device) -> Result<Self> {
        let ids: Vec<u32> = labels.iter().map(|l| l.unwrap_or(0)).collect();
        let mask: Vec<f32> = labels.iter().map(|l| l.is_some() as u8 as f32).collect();
        Ok(Self {
            ids: Tensor::new(ids, device)?,
            mask: Tensor::new(mask, device)?,
            count: labels.iter().filter(|l| l.is_some()).count(),
        })
    }
}

/// Mean cross-entropy over the rows that have a label; 0 when none has.
/// `logits` `[batch, labels]`.
pub fn masked_cross_entropy(logits: &Tensor, t: &HeadTargets) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&t.ids.unsqueeze(1)?, 1)?.squeeze(1)?; // [batch]
    let total = (picked * &t.mask)?.sum_all()?.neg()?;
    total / t.count.max(1) as f64
}

/// `w_a * CE_a + w_b * CE_b`, and the two terms.
pub fn multitask_loss(
    logits: &[Tensor; 2],
    targets: &[HeadTargets; 2],
    weights: [f64; 2],
) -> Result<(Tensor, [Tensor; 2])> {
    let a = masked_cross_entropy(&logits[0], &targets[0])?;
    let b = masked_cross_entropy(&logits[1], &targets[1])?;
    let total = ((&a * weights[0])? + (&b * weights[1])?)?;
    Ok((total, [a, b]))
}

/// Sum over the labelled rows of `weight[label] * CE`, and that sum's denominator
/// contribution (the rows' summed weights: their count without class weights). Dividing the
/// summed terms of several micro-batches by their summed denominators gives exactly the
/// weighted mean of one large batch (PyTorch's `CrossEntropyLoss(weight=...)`).
pub fn weighted_ce_sum(
    logits: &Tensor,
    t: &HeadTargets,
    class_weights: Option<&Tensor>,
) -> Result<(Tensor, f64)> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&t.ids.unsqueeze(1)?, 1)?.squeeze(1)?; // [batch]
    let row_w = match class_weights {
        Some(w) => (w.index_select(&t.ids, 0)? * &t.mask)?,
        None => t.mask.clone(),
    };
    let denom = row_w.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(((picked * row_w)?.sum_all()?.neg()?, denom))
}

/// Inverse-frequency class weights `n / (k * count_c)` over the labelled rows (scikit-learn's
/// "balanced"); a label without rows gets weight 0.
pub fn balanced_weights(labels: &[Option<u32>], num_labels: usize) -> Vec<f32> {
    let mut counts = vec![0usize; num_labels];
    for &l in labels.iter().flatten() {
        counts[l as usize] += 1;
    }
    let n: usize = counts.iter().sum();
    let k = counts.iter().filter(|&&c| c > 0).count().max(1);
    counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0.0
            } else {
                (n as f64 / (k as f64 * c as f64)) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three rows; row 1 lacks a class label, row 2 lacks a sentiment label. Expected values
    /// computed by hand: CE = -ln(softmax(logits)[label]).
    #[test]
    fn masked_loss_matches_hand_computation() {
        let dev = Device::Cpu;
        let class_logits =
            Tensor::new(&[[2f32, 0., -1.], [5., 5., 5.], [0., 1., 0.]], &dev).unwrap();
        let sent_logits = Tensor::new(&[[1f32, 1.], [0., 3.], [100., -100.]], &dev).unwrap();
        let targets = [
            HeadTargets::new(&[Some(0), None, Some(1)], &dev).unwrap(),
            HeadTargets::new(&[Some(1), Some(1), None], &dev).unwrap(),
        ];
        let ln = |x: f64| x.ln();
        // class: row 0 label 0, row 2 label 1
        let ce0 = -(2.0 - ln(2f64.exp() + 1.0 + (-1f64).exp()));
        let ce2 = -(1.0 - ln(1.0 + 1f64.exp() + 1.0));
        let class = (ce0 + ce2) / 2.0;
        // sentiment: row 0 label 1 (ln 2), row 1 label 1
        let s0 = ln(2.0);
        let s1 = -(3.0 - ln(1.0 + 3f64.exp()));
        let sent = (s0 + s1) / 2.0;
        let (total, parts) =
            multitask_loss(&[class_logits, sent_logits], &targets, [0.5, 2.0]).unwrap();
        let get = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (get(&parts[0]) - class).abs() < 1e-6,
            "{} vs {class}",
            get(&parts[0])
        );
        assert!(
            (get(&parts[1]) - sent).abs() < 1e-6,
            "{} vs {sent}",
            get(&parts[1])
        );
        assert!((get(&total) - (0.5 * class + 2.0 * sent)).abs() < 1e-5);
    }

    #[test]
    fn balanced_weights_are_inverse_frequencies() {
        let w = balanced_weights(&[Some(0), Some(0), Some(0), Some(1), None], 3);
        // n = 4 labelled rows, k = 2 labels present.
        assert_eq!(w, vec![4.0 / 6.0, 4.0 / 2.0, 0.0]);
    }

    #[test]
    fn weighted_sums_over_micro_batches_give_the_large_batch_mean() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, 0.], [0., 1.], [1., 1.], [3., -1.]], &dev).unwrap();
        let labels = [Some(0), Some(1), None, Some(1)];
        let w = Tensor::new(&[0.5f32, 2.0], &dev).unwrap();
        let whole = HeadTargets::new(&labels, &dev).unwrap();
        let (sum, denom) = weighted_ce_sum(&logits, &whole, Some(&w)).unwrap();
        let mean = sum.to_scalar::<f32>().unwrap() as f64 / denom;
        let mut parts = (0.0, 0.0);
        for r in [0..2, 2..4] {
            let t = HeadTargets::new(&labels[r.clone()], &dev).unwrap();
            let (s, d) =
                weighted_ce_sum(&logits.narrow(0, r.start, 2).unwrap(), &t, Some(&w)).unwrap();
            parts.0 += s.to_scalar::<f32>().unwrap() as f64;
            parts.1 += d;
        }
        assert!((parts.0 / parts.1 - mean).abs() < 1e-6);
        // Without weights it is the plain masked mean.
        let (s, d) = weighted_ce_sum(&logits, &whole, None).unwrap();
        let plain = masked_cross_entropy(&logits, &whole).unwrap();
        assert!(
            (s.to_scalar::<f32>().unwrap() as f64 / d - plain.to_scalar::<f32>().unwrap() as f64)
                .abs()
                < 1e-6
        );
        assert_eq!(d, 3.0);
    }

    #[test]
    fn a_head_without_labels_contributes_zero() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let t = HeadTargets::new(&[None, None], &dev).unwrap();
        assert_eq!(
            masked_cross_entropy(&logits, &t)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
