//! Tiled attention against the full-matrix computation in f64, with ALiBi and windows.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Plain attention in f64 with the full score matrix of each (sequence, head).
fn reference(qkv: &[f32], offsets: &[usize], spec: &AttentionSpec) -> Vec<f32> {
    let (hh, d) = (spec.heads, spec.head_dim);
    let hidden = hh * d;
    let ld = 3 * hidden;
    let t = *offsets.last().unwrap();
    let mut ctx = vec![0f32; t * hidden];
    for w in offsets.windows(2) {
        let (a, m) = (w[0], w[1] - w[0]);
        for h in 0..hh {
            for i in 0..m {
                let q = &qkv[(a + i) * ld + h * d..][..d];
                let mut s = vec![f64::NEG_INFINITY; m];
                for (j, sj) in s.iter_mut().enumerate() {
                    let dist = i.abs_diff(j);
                    if spec.window.is_some_and(|win| dist > win) {
                        continue;
                    }
                    let k = &qkv[(a + j) * ld + hidden + h * d..][..d];
                    let dot: f64 = q.iter().zip(k).map(|(x, y)| *x as f64 * *y as f64).sum();
                    *sj = dot * spec.scale as f64;
                    if let Some(sl) = &spec.alibi {
                        *sj -= sl[h] as f64 * dist as f64;
                    }
                }
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                let z: f64 = p.iter().sum();
                for c in 0..d {
                    let o: f64 = (0..m)
                        .map(|j| p[j] * qkv[(a + j) * ld + 2 * hidden + h * d + c] as f64)
                        .sum();
                    ctx[(a + i) * hidden + h * d + c] = (o / z) as f32;
                }
            }
        }
    }
    ctx
}

fn random_qkv(lengths: &[usize], hidden: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut offsets = vec![0];
    for l in lengths {
        offsets.push(offsets.last().unwrap() + l);
    }
    let t = *offsets.last().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let qkv = (0..t * 3 * hidden)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    (qkv, offsets)
}

/// Panics unless sequence `i` of the packed batch, attended alone, gives the bits of its rows
/// of the batch's context `ctx`.
fn assert_alone_is_the_same(
    qkv: &[f32],
    offsets: &[usize],
    i: usize,
    spec: &AttentionSpec,
    ctx: &[f32],
    what: &str,
) {
    let hidden = spec.heads * spec.head_dim;
    let (a, b) = (offsets[i], offsets[i + 1]);
    let mut one = vec![0f32; (b - a) * hidden];
    let alone = &qkv[a * 3 * hidden..b * 3 * hidden];
    attend_packed(alone, &[0, b - a], spec, &mut one).unwrap();
    assert!(
        one.iter()
            .zip(&ctx[a * hidden..b * hidden])
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "{what}: the sequence's context changed with its batch"
    );
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Lengths 1 to 4,096 in one packed batch (tile edges included), plain, with ALiBi,
/// with a window, and with both: equal to the full-matrix attention within 1e-5.
#[test]
fn tiled_matches_plain_attention() {
    let lengths = [1, 2, 5, 63, 64, 65, 129, 130, 700, 1025, 4096];
    let (heads, d) = (2, 16);
    let (qkv, offsets) = random_qkv(&lengths, heads * d, 1);
    let base = AttentionSpec {
        heads,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        ..Default::default()
    };
    let specs = [
        ("plain", base.clone()),
        (
            "alibi",
            AttentionSpec {
                alibi: Some(alibi_slopes(heads)),
                ..base.clone()
            },
        ),
        (
            "window 64",
            AttentionSpec {
                window: Some(64),
                ..base.clone()
            },
        ),
        (
            // Wider than a block of keys: a query's window spans two.
            "window 300",
            AttentionSpec {
                window: Some(300),
                ..base.clone()
            },
        ),
        (
            "window 3 + alibi",
            AttentionSpec {
                window: Some(3),
                alibi: Some(vec![0.5, 0.01]),
                ..base.clone()
            },
        ),
    ];
    for (what, spec) in specs {
        let mut ctx = vec![f32::NAN; qkv.len() / 3];
        attend_packed(&qkv, &offsets, &spec, &mut ctx).unwrap();
        let want = reference(&qkv, &offsets, &spec);
        let diff = max_diff(&ctx, &want);
        eprintln!("tiled attention, {what}: max abs diff {diff:.2e}");
        assert!(diff <= 1e-5, "{what}: max abs diff {diff}");
    }
}

#[test]
fn a_window_sees_only_near_keys_of_its_own_sequence() {
    // Values are one-hot by token: the context says which keys were attended.
    let (heads, d) = (1, 16);
    let lengths = [10, 6];
    let t: usize = lengths.iter().sum();
    let mut qkv = vec![0f32; t * 3 * d];
    for r in 0..t {
        qkv[r * 3 * d + 2 * d + r] = 1.0; // v_r = e_r; q = k = 0: uniform weights
    }
    let spec = AttentionSpec {
        heads,
        head_dim: d,
        scale: 1.0,
        window: Some(2),
        ..Default::default()
    };
    let mut ctx = vec![0f32; t * d];
    attend_packed(&qkv, &[0, 10, 16], &spec, &mut ctx).unwrap();
    let row = |r: usize| &ctx[r * d..(r + 1) * d];
    // Token 0 sees 0, 1, 2; token 5 sees 3..=7; token 10 (first of the second sequence)
    // sees 10, 11, 12 and nothing of the first sequence.
    assert_eq!(row(0)[..4], [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]);
    assert!(row(5)[3..8].iter().all(|&v| (v - 0.2).abs() < 1e-7));
    assert_eq!(row(5)[2] + row(5)[8], 0.0);
    assert!(row(10)[..10].iter().all(|&v| v == 0.0));
    assert!((row(10)[10] - 1.0 / 3.0).abs() < 1e-7);
}

#[test]
fn slopes_follow_the_alibi_recipe() {
    assert_eq!(alibi_slopes(4), vec![0.25, 0.0625, 0.015625, 0.00390625]);
    // 12 heads: the 8 of 2^(-k) then every other of the 16-head sequence.
    let s = alibi_slopes(12);
    assert_eq!(s.len(), 12);
    assert_eq!(s[0], 0.5);
    assert_eq!(s[7], 2f32.powi(-8));
    assert!((s[8] - 2f32.powf(-0.5)).abs() < 1e-7 && (s[11] - 2f32.powf(-3.5)).abs() < 1e-7);
}

#[test]
fn bad_buffers_are_errors() {
    let spec = AttentionSpec {
        heads: 2,
        head_dim: 4,
        scale: 1.0,
        ..Default::default()
    };
    let mut ctx = vec![0f32; 16];
    let e = attend_packed(&[0.0; 10], &[0, 2], &spec, &mut ctx).unwrap_err();
    assert!(matches!(e, AttentionError::Qkv { .. }), "{e}");
    let e = attend_packed(&[0.0; 48], &[1, 2], &spec, &mut ctx).unwrap_err();
    assert!(matches!(e, AttentionError::Offsets(_)), "{e}");
    let spec = AttentionSpec {
        alibi: Some(vec![1.0]),
        ..spec
    };
    let e = attend_packed(&[0.0; 48], &[0, 2], &spec, &mut ctx).unwrap_err();
    assert!(matches!(e, AttentionError::Slopes { .. }), "{e}");
}

/// bf16 products on every bf16 kernel this CPU has: close to the full-matrix attention
/// (bf16 rounds Q, K, V and the weights to 8 bits of mantissa), and a sequence's context
/// bit-identical alone and inside the packed batch.
#[test]
fn bf16_products_are_close_and_batch_invariant() {
    use kernels::quant::Bf16Kernel;
    let lengths = [1, 5, 64, 300, 600];
    let (heads, d) = (2, 32);
    let (qkv, offsets) = random_qkv(&lengths, heads * d, 3);
    for kernel in Bf16Kernel::all() {
        if !kernel.supported() {
            eprintln!("SKIPPED: bf16 kernel {} (this CPU lacks it)", kernel.name());
            continue;
        }
        for (what, alibi, window) in [
            ("plain", None, None),
            ("alibi", Some(alibi_slopes(heads)), None),
            ("window 64", None, Some(64)),
        ] {
            let spec = AttentionSpec {
                heads,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
                alibi,
                window,
                bf16: Some(kernel),
            };
            let mut ctx = vec![f32::NAN; qkv.len() / 3];
            attend_packed(&qkv, &offsets, &spec, &mut ctx).unwrap();
            let want = reference(&qkv, &offsets, &spec);
            let diff = max_diff(&ctx, &want);
            let mean = ctx
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / ctx.len() as f32;
            eprintln!(
                "bf16 attention ({}), {what}: max abs diff {diff:.2e}, mean {mean:.2e}",
                kernel.name()
            );
            assert!(diff <= 0.02 && mean <= 2e-3, "{what}: {diff} (mean {mean})");
            // The 300-token sequence alone.
            assert_alone_is_the_same(&qkv, &offsets, 3, &spec, &ctx, what);
        }
    }
}

/// Head sizes of the real models (64; 32 and 48 too, and 8 on `gemm`): the f32 tiles against
/// the full-matrix attention, with ALiBi and a window; and the 1,030-token sequence (three
/// f32 key blocks) alone gives the bits it gives inside the batch.
#[test]
fn head_sizes_of_real_models_match_plain_attention() {
    for d in [8, 32, 48, 64] {
        let lengths = [1, 7, 130, 300, 1030];
        let heads = 2;
        let (qkv, offsets) = random_qkv(&lengths, heads * d, 5 + d as u64);
        for (alibi, window) in [(None, None), (Some(alibi_slopes(heads)), Some(64))] {
            let spec = AttentionSpec {
                heads,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
                alibi,
                window,
                bf16: None,
            };
            let mut ctx = vec![f32::NAN; qkv.len() / 3];
            attend_packed(&qkv, &offsets, &spec, &mut ctx).unwrap();
            let diff = max_diff(&ctx, &reference(&qkv, &offsets, &spec));
            eprintln!("tiled attention, head size {d}, window {window:?}: max abs diff {diff:.2e}");
            assert!(diff <= 1e-5, "head size {d}: max abs diff {diff}");
            let what = format!("head size {d}, window {window:?}");
            assert_alone_is_the_same(&qkv, &offsets, 4, &spec, &ctx, &what);
        }
    }
}

/// Empty sequences (equal offsets) first, between and last hold no rows and change nothing
/// for the others, in f32 and every bf16 kernel this CPU runs.
#[test]
fn empty_sequences_are_skipped() {
    use kernels::quant::Bf16Kernel;
    let (heads, d) = (2, 16);
    let (qkv, _) = random_qkv(&[7, 20], heads * d, 9);
    let offsets = [0, 0, 7, 7, 27, 27];
    let kernels = Bf16Kernel::all().filter(|k| k.supported());
    for bf16 in std::iter::once(None).chain(kernels.map(Some)) {
        let spec = AttentionSpec {
            heads,
            head_dim: d,
            scale: 0.25,
            bf16,
            ..Default::default()
        };
        let mut ctx = vec![f32::NAN; qkv.len() / 3];
        attend_packed(&qkv, &offsets, &spec, &mut ctx).unwrap();
        let mut plain = vec![f32::NAN; qkv.len() / 3];
        attend_packed(&qkv, &[0, 7, 27], &spec, &mut plain).unwrap();
        assert_eq!(ctx, plain, "{:?}", bf16.map(|k| k.name()));
    }
}
