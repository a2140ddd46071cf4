//! Tests of [`super`]: both products (and the rows' maxima) against f64 sums, and bad operands.

use super::*;

fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 2_654_435_761 + seed) % 1000) as f32 / 250.0) - 2.0)
        .collect()
}

/// Both products against f64 sums, on sizes off every tile edge, with strides and a
/// block inside the keys; on an AVX-512 machine with head sizes it serves (16 to 64) and
/// others (8, 80: `gemm`).
#[test]
fn products_match_f64_sums() {
    for d in [8, 16, 32, 48, 64, 80] {
        for (rows, k0, nk) in [
            (1, 0, 1),
            (7, 16, 17),
            (13, 0, 70),
            (128, 32, 256),
            (6, 64, 64),
            // Past one chunk of rows' maxima.
            (131, 16, 33),
        ] {
            let n = k0 + nk + 9;
            let (ldq, ldk, lds) = (3 * d + 5, 3 * d + 1, nk + 3);
            let (q, k, v) = (data(rows * ldq, 1), data(n * ldk, 2), data(n * ldk, 4));
            let kv = HeadKv::new((&k, ldk), (&v, ldk), n, d);
            let mut s = vec![f32::NAN; rows * lds];
            let mut maxes = vec![f32::NAN; rows + 1];
            let (qs, ss) = ((&q[..], ldq), (&mut s[..], lds));
            let known = scores(qs, &kv, (k0, nk), rows, 0.5, ss, &mut maxes);
            assert_eq!(
                known,
                vector(d),
                "d {d}: maxima from the AVX-512 tiles only"
            );
            for i in 0..rows {
                for j in 0..nk {
                    let want: f64 = 0.5
                        * (0..d)
                            .map(|c| q[i * ldq + c] as f64 * k[(k0 + j) * ldk + c] as f64)
                            .sum::<f64>();
                    let got = s[i * lds + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "scores d {d} ({i}, {j}): {got} vs {want}"
                    );
                }
                assert!(s[i * lds + nk].is_nan(), "scores wrote past the keys");
                let row = &s[i * lds..i * lds + nk];
                let want = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                if known {
                    assert_eq!(maxes[i], want, "d {d}: the maximum of row {i}");
                }
            }
            assert!(maxes[rows].is_nan(), "scores wrote a maximum past the rows");
            let (ldp, ldo) = (nk + 2, d + 4);
            let p = data(rows * ldp, 3);
            let mut o = data(rows * ldo, 5);
            let before = o.clone();
            weighted_values((&p, ldp), &kv, (k0, nk), rows, (&mut o, ldo));
            for i in 0..rows {
                for c in 0..d {
                    let want = before[i * ldo + c] as f64
                        + (0..nk)
                            .map(|j| p[i * ldp + j] as f64 * v[(k0 + j) * ldk + c] as f64)
                            .sum::<f64>();
                    let got = o[i * ldo + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-3,
                        "values d {d} ({i}, {c}): {got} vs {want}"
                    );
                }
                assert_eq!(
                    o[i * ldo + d..(i + 1) * ldo],
                    before[i * ldo + d..(i + 1) * ldo]
                );
            }
        }
    }
}

/// Scores all below 0, in a block whose last panel of keys is padded with zeros: the
/// padding is not a score, and no maximum is 0.
#[test]
fn maxima_skip_the_padded_keys() {
    let (rows, n, d) = (9, 21, 32);
    let q: Vec<f32> = data(rows * d, 1).iter().map(|x| x.abs() + 0.5).collect();
    let k: Vec<f32> = data(n * d, 2).iter().map(|x| -x.abs() - 0.5).collect();
    let kv = HeadKv::new((&k, d), (&k, d), n, d);
    let (mut s, mut maxes) = (vec![0f32; rows * n], vec![0f32; rows]);
    if !scores((&q, d), &kv, (0, n), rows, 0.125, (&mut s, n), &mut maxes) {
        eprintln!("SKIPPED: maxima come from the AVX-512 tiles, which this CPU lacks");
        return;
    }
    for (i, m) in maxes.iter().enumerate() {
        let want = s[i * n..(i + 1) * n]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        assert!(want < 0.0, "row {i}: a score at or above 0");
        assert_eq!(*m, want, "row {i}");
    }
}

#[test]
#[should_panic(expected = "attention block")]
fn short_operands_panic() {
    let kv = HeadKv::new((&[0.0; 16], 16), (&[0.0; 16], 16), 1, 16);
    let (q, s) = ((&[0.0; 16][..], 16), (&mut [0f32; 4][..], 4));
    scores(q, &kv, (0, 2), 1, 1.0, s, &mut [0.0]);
}

#[test]
#[should_panic(expected = "1 maxima for 2 rows")]
fn short_maxima_panic() {
    let kv = HeadKv::new((&[0.0; 32], 16), (&[0.0; 32], 16), 2, 16);
    let (q, s) = ((&[0.0; 32][..], 16), (&mut [0f32; 4][..], 2));
    scores(q, &kv, (0, 2), 2, 1.0, s, &mut [0.0]);
}
