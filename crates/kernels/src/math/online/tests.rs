//! Tests of [`super`]: the running softmax row against the portable row and against one
//! softmax, a block's known maximum, bf16 weights, and blocks outside the window.

use super::*;

/// The AVX-512 row kernel against the portable one (when the CPU has AVX-512).
#[test]
fn vector_and_portable_rows_agree() {
    if crate::cpu::level() != crate::cpu::Level::Avx512 {
        eprintln!("SKIPPED: this CPU lacks AVX-512");
        return;
    }
    for (n, slope, lo, hi) in [
        (1, 0.0, 0, 1),
        (37, 0.3, 5, 30),
        (256, 0.0, 0, 256),
        (20, 0.1, 0, 9),
        // Past one step of four vectors, with partial tails.
        (65, 0.0, 0, 65),
        (140, 0.2, 3, 132),
        (511, 0.0, 0, 511),
    ] {
        let scores: Vec<f32> = (0..n).map(|j| ((j * 11 % 17) as f32 - 8.0) / 3.0).collect();
        let at = BlockRow {
            q: 12,
            k0: 3,
            lo: lo + 3,
            hi: hi + 3,
            slope,
            max: None,
        };
        let start = RunningRow { max: 0.5, sum: 1.5 };
        let (mut a, mut b) = (scores.clone(), scores);
        let (mut sa, mut sb) = (start, start);
        let (mut ra, mut rb) = (0.0, 0.0);
        block_row(&mut a, at, &mut sa, &mut ra);
        // SAFETY: checked above that the CPU has avx512f.
        unsafe { block_row_avx512(&mut b, at, &mut sb, &mut rb, None) };
        assert!((ra - rb).abs() <= 1e-6 * ra, "rescale {ra} vs {rb}");
        assert!(
            (sa.max - sb.max).abs() <= 1e-6 * sa.max.abs(),
            "{sa:?} {sb:?}"
        );
        assert!((sa.sum - sb.sum).abs() <= 1e-6 * sa.sum, "{sa:?} {sb:?}");
        // The bias is one fused multiply-add in AVX-512, a product and a difference here:
        // its rounding, up to an ulp of the largest biased score, moves a weight by as
        // much relatively.
        let spread = 1.0 + slope * n as f32;
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-6 * spread * x.abs().max(1e-30),
                "n {n}: {x} vs {y}"
            );
        }
    }
}

/// A block's maximum from the caller gives the bits the row's own pass gives where every
/// key is visible without ALiBi; elsewhere (a window cutting the block, a slope) it is
/// not the visible maximum and is ignored, here a wrong one.
#[test]
fn a_known_maximum_is_used_only_where_it_holds() {
    let scores: Vec<f32> = (0..100)
        .map(|j| ((j * 13 % 29) as f32 - 14.0) / 5.0)
        .collect();
    let top = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for (lo, hi, slope, max) in [
        (0, 200, 0.0, top),
        (10, 200, 0.0, 1e3),
        (0, 60, 0.0, 1e3),
        (0, 200, 0.25, 1e3),
        // One key short of the block at either end.
        (0, 99, 0.0, 1e3),
        (1, 200, 0.0, 1e3),
    ] {
        let at = BlockRow {
            q: 40,
            k0: 0,
            lo,
            hi,
            slope,
            max: None,
        };
        let known = BlockRow {
            max: Some(max),
            ..at
        };
        let start = RunningRow { max: 0.5, sum: 1.5 };
        let (mut a, mut b) = (scores.clone(), scores.clone());
        let (mut sa, mut sb) = (start, start);
        let ra = softmax_block_row(&mut a, at, &mut sa);
        let rb = softmax_block_row(&mut b, known, &mut sb);
        assert_eq!((a, sa, ra), (b, sb, rb), "window {lo}..{hi}, slope {slope}");
        let (mut c, mut sc, mut rc) = (scores.clone(), start, 0.0);
        let (mut d, mut sd, mut rd) = (scores.clone(), start, 0.0);
        block_row(&mut c, at, &mut sc, &mut rc);
        block_row(&mut d, known, &mut sd, &mut rd);
        assert_eq!(
            (c, sc, rc),
            (d, sd, rd),
            "portable: {lo}..{hi}, slope {slope}"
        );
    }
    // Where it holds it is taken as given, not found again: a wrong one shows.
    let at = BlockRow {
        q: 40,
        k0: 0,
        lo: 0,
        hi: 100,
        slope: 0.0,
        max: Some(top + 1.0),
    };
    let mut state = RunningRow::default();
    softmax_block_row(&mut scores.clone(), at, &mut state);
    assert_eq!(state.max, top + 1.0);
    let (mut portable, mut rescale) = (RunningRow::default(), 0.0);
    block_row(&mut scores.clone(), at, &mut portable, &mut rescale);
    assert_eq!(portable.max, top + 1.0);
}

/// Two blocks through the running softmax give the weights of one softmax over both.
#[test]
fn blocks_combine_into_one_softmax() {
    for (slope, lo, hi) in [(0.0, 0, 40), (0.25, 0, 40), (0.0, 9, 30), (0.5, 3, 21)] {
        let scores: Vec<f32> = (0..40).map(|j| ((j * 7 % 13) as f32 - 6.0) / 2.0).collect();
        let q = 17;
        // Reference in f64.
        let mut want: Vec<f64> = (0..40)
            .map(|j| {
                let b = slope as f64 * (q as f64 - j as f64).abs();
                if (lo..hi).contains(&j) {
                    scores[j] as f64 - b
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let m = want.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        want.iter_mut().for_each(|v| *v = (*v - m).exp());
        let z: f64 = want.iter().sum();

        let mut state = RunningRow::default();
        let (mut a, mut b) = (scores[..19].to_vec(), scores[19..].to_vec());
        let at = |k0| BlockRow {
            q,
            k0,
            lo,
            hi,
            slope,
            max: None,
        };
        softmax_block_row(&mut a, at(0), &mut state);
        let r = softmax_block_row(&mut b, at(19), &mut state);
        let got: Vec<f64> = a
            .iter()
            .map(|v| (v * r) as f64)
            .chain(b.iter().map(|&v| v as f64))
            .map(|v| v / state.sum as f64)
            .collect();
        for j in 0..40 {
            assert!(
                (got[j] - want[j] / z).abs() < 1e-6,
                "slope {slope} window {lo}..{hi}: key {j}: {} vs {}",
                got[j],
                want[j] / z
            );
        }
    }
}

/// The bf16 weights are the f32 weights rounded, on the vector and portable paths alike,
/// with zeros outside the window and in the padding.
#[test]
fn bf16_weights_are_the_rounded_weights() {
    let scores: Vec<f32> = (0..45).map(|j| ((j * 5 % 19) as f32 - 9.0) / 4.0).collect();
    let at = BlockRow {
        q: 20,
        k0: 0,
        lo: 4,
        hi: 40,
        slope: 0.125,
        max: None,
    };
    let mut s = scores.clone();
    let mut out = vec![7u16; 48];
    let mut state = RunningRow::default();
    softmax_block_row_bf16(&mut s, at, &mut state, &mut out);
    for j in 0..48 {
        let want = if j < 45 {
            crate::quant::to_bf16(s[j])
        } else {
            0
        };
        assert_eq!(out[j], want, "weight {j}");
    }
    assert!(out[..4].iter().chain(&out[40..]).all(|&v| v == 0));
    let (mut s2, mut state2) = (scores, RunningRow::default());
    softmax_block_row(&mut s2, at, &mut state2);
    assert_eq!(s, s2);
}

/// A block wholly outside the window changes nothing.
#[test]
fn a_block_outside_the_window_weighs_nothing() {
    let mut s = vec![3.0; 20];
    let mut state = RunningRow { max: 1.0, sum: 2.0 };
    let at = BlockRow {
        q: 0,
        k0: 100,
        lo: 0,
        hi: 50,
        slope: 0.0,
        max: None,
    };
    assert_eq!(softmax_block_row(&mut s, at, &mut state), 1.0);
    assert!(s.iter().all(|&v| v == 0.0));
    assert_eq!(state, RunningRow { max: 1.0, sum: 2.0 });
}
