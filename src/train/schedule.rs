//! The order of training examples: each epoch's seeded batches (grouped by length when asked)
//! and the learning-rate schedule.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// Mega-batches hold this many batches; each is sorted by length before it is cut.
const GROUP: usize = 8;

/// One epoch's batches: a seeded shuffle, cut into batches of `batch_size`. With `lengths`,
/// the shuffle is cut into groups of `GROUP` (8) batches, each group is sorted by length and
/// cut, and the batch order is shuffled again: batches stay random but pad little
/// (the `group_by_length` of Hugging Face's Trainer).
pub fn epoch_batches(
    n: usize,
    batch_size: usize,
    lengths: Option<&[usize]>,
    rng: &mut StdRng,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let Some(lengths) = lengths else {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    };
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for group in order.chunks_mut(batch_size * GROUP) {
        group.sort_by_key(|&i| lengths[i]);
        batches.extend(group.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// Linear warm-up over `warmup` steps, then linear decay to 0 at `total`.
pub fn lr_factor(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        (total - step) as f64 / (total - warmup).max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn epoch_batches_cover_every_example_once_and_grouping_pads_less() {
        let lengths: Vec<usize> = (0..1000).map(|i| 5 + (i * 7919) % 60).collect();
        let padded = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap())
                .sum()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let plain = epoch_batches(1000, 32, None, &mut rng);
        let grouped = epoch_batches(1000, 32, Some(&lengths), &mut rng);
        for batches in [&plain, &grouped] {
            let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..1000).collect::<Vec<_>>());
            assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= 32));
        }
        assert!(
            padded(&grouped) * 10 < padded(&plain) * 7,
            "{} vs {}",
            padded(&grouped),
            padded(&plain)
        );
        let again = epoch_batches(1000, 32, Some(&lengths), &mut StdRng::seed_from_u64(1));
        let first = epoch_batches(1000, 32, Some(&lengths), &mut StdRng::seed_from_u64(1));
        assert_eq!(again, first, "the same seed gives the same batches");
    }

    #[test]
    fn learning_rate_warms_up_then_decays_to_zero() {
        let f: Vec<f64> = (0..10).map(|s| lr_factor(s, 2, 10)).collect();
        assert_eq!(f[0], 0.5);
        assert_eq!(f[1], 1.0);
        assert_eq!(f[2], 1.0);
        assert!((f[9] - 0.125).abs() < 1e-12);
        assert!(f.windows(2).skip(2).all(|w| w[1] < w[0]));
    }
}
