//! The fused attention against candle's composite maths: values and gradients, with and
//! without MPNet's relative position bias, padded and packed, and with dropout.

use super::super::testing::{close, input, weights};
use super::*;
use candle_core::{Device, Var, D};

/// The fused attention against candle's composite maths (padding masked): values and the
/// gradient of the projection.
/// `[b, s, 3h]` -> q, k, v as `[b, heads, s, d]`, for the composite reference.
fn split_qkv(x: &Tensor, heads: usize, d: usize) -> (Tensor, Tensor, Tensor) {
    let (b, s, _) = x.dims3().unwrap();
    let h = heads * d;
    let part = |i: usize| {
        x.narrow(2, i * h, h)
            .unwrap()
            .reshape((b, s, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    (part(0), part(1), part(2))
}

#[test]
fn attention_matches_composite_and_gradients() {
    let dev = Device::Cpu;
    let (b, s, heads, d) = (3, 6, 2, 4);
    let h = heads * d;
    let lengths = [6usize, 2, 4];
    let qkv = input((b, s, 3 * h), 3);
    let lw = weights((b, s, h));
    let real: Vec<f32> = (0..b)
        .flat_map(|i| (0..s).map(move |j| (j < lengths[i]) as u8 as f32))
        .collect();
    let row_mask = Tensor::from_vec(real.clone(), (b, s, 1), &dev).unwrap();
    let loss = |y: &Tensor| {
        (y * &lw)
            .unwrap()
            .broadcast_mul(&row_mask)
            .unwrap()
            .sum_all()
            .unwrap()
    };

    let x = qkv.as_tensor();
    let (q, k, v) = split_qkv(x, heads, d);
    let additive = Tensor::from_vec(real, (b, 1, 1, s), &dev).unwrap();
    let additive = ((additive - 1.0).unwrap() * 1e9).unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let probs =
        candle_nn::ops::softmax(&scores.broadcast_add(&additive).unwrap(), D::Minus1).unwrap();
    let composite = probs
        .matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, s, h))
        .unwrap();
    let fused = attention(x, &lengths, heads, d, None, None).unwrap();
    let masked = |t: &Tensor| t.broadcast_mul(&row_mask).unwrap();
    close(&masked(&fused), &masked(&composite), 1e-5, "attention");
    let g1 = loss(&composite).backward().unwrap();
    let g2 = loss(&fused).backward().unwrap();
    close(
        g2.get(&qkv).unwrap(),
        g1.get(&qkv).unwrap(),
        1e-5,
        "attention grad",
    );
}

/// With MPNet's relative position bias, padded and packed: values and the gradients of
/// the projection and of the bias table against candle's composite maths.
#[test]
fn attention_with_relative_bias_matches_composite_and_gradients() {
    let dev = Device::Cpu;
    // Sequences longer than 8 tokens reach the logarithmic buckets.
    let (b, s, heads, d) = (2, 20, 2, 4);
    let h = heads * d;
    let qkv = input((b, s, 3 * h), 5);
    let table: Vec<f32> = (0..mpnet::BUCKETS * heads)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) / 4.0)
        .collect();
    let table = Var::from_vec(table, (mpnet::BUCKETS, heads), &dev).unwrap();
    let lw = weights((b, s, h));
    let x = qkv.as_tensor();
    let (q, k, v) = split_qkv(x, heads, d);
    let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let bias = mpnet::bias_matrix(table.as_tensor(), s).unwrap();
    let scores = scores.broadcast_add(&bias).unwrap();
    let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
    let composite = probs
        .matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, s, h))
        .unwrap();
    let loss = |y: &Tensor| (y * &lw).unwrap().sum_all().unwrap();
    let g1 = loss(&composite).backward().unwrap();
    let fused = attention(x, &[s, s], heads, d, Some(table.as_tensor()), None).unwrap();
    close(&fused, &composite, 1e-5, "attention with bias");
    let g2 = loss(&fused).backward().unwrap();
    close(
        g2.get(&qkv).unwrap(),
        g1.get(&qkv).unwrap(),
        1e-4,
        "qkv grad",
    );
    let (want, got) = (g1.get(&table).unwrap(), g2.get(&table).unwrap());
    close(got, want, 1e-4, "table grad");
    assert!(
        got.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.1
    );

    // Packed: the same two sequences back to back give the same rows.
    let flat = x.reshape((b * s, 3 * h)).unwrap();
    let packed = attention_packed(
        &flat,
        &[0, s, 2 * s],
        heads,
        d,
        Some(table.as_tensor()),
        None,
    )
    .unwrap();
    close(
        &packed.reshape((b, s, h)).unwrap(),
        &composite,
        1e-5,
        "packed attention with bias",
    );
}

/// With dropout, the analytic gradient agrees with finite differences (the masks are a
/// function of the seed, so every evaluation drops the same units).
#[test]
fn attention_with_dropout_passes_a_gradient_check() {
    let dev = Device::Cpu;
    let (b, s, heads, d) = (2, 5, 2, 3);
    let h = heads * d;
    let lengths = [5usize, 3];
    let base = input((b, s, 3 * h), 11)
        .as_tensor()
        .to_vec3::<f32>()
        .unwrap();
    let lw = weights((b, s, h));
    let f = |v: &Vec<Vec<Vec<f32>>>| -> (f32, Option<Tensor>) {
        let x = Var::from_tensor(&Tensor::new(v.clone(), &dev).unwrap()).unwrap();
        let y = attention(x.as_tensor(), &lengths, heads, d, None, Some((0.3, 42))).unwrap();
        let l = (y * &lw).unwrap().sum_all().unwrap();
        let g = l.backward().unwrap().get(&x).cloned();
        (l.to_scalar::<f32>().unwrap(), g)
    };
    let g = f(&base).1.unwrap().to_vec3::<f32>().unwrap();
    let eps = 1e-2f32;
    for (bi, si, c) in [
        (0, 0, 0),
        (0, 4, 7),
        (1, 2, 13),
        (0, 3, 2 * h + 1),
        (1, 1, h + 2),
    ] {
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus[bi][si][c] += eps;
        minus[bi][si][c] -= eps;
        let numeric = (f(&plus).0 - f(&minus).0) / (2.0 * eps);
        let analytic = g[bi][si][c];
        assert!(
            (numeric - analytic).abs() < 2e-3,
            "({bi},{si},{c}): {numeric} vs {analytic}"
        );
    }
}
