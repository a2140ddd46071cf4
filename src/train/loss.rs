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
