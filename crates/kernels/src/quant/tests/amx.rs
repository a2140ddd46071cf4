//! The AMX kernels' tests: exact (int8) and batch invariant (bf16) where the CPU and the
//! operating system allow AMX, and a loud, checked fallback where they do not.

use super::bf16::assert_bf16_product;
use super::*;

/// The AMX kernels on shapes around their 32 x 32 tile and 64-byte k block (partial row
/// tiles, a single panel, k remainders of 4..60 bytes), exact for int8 and batch invariant for
/// bf16. Without AMX it says so loudly and checks the fallback instead: the best kernels are
/// the AVX-512 ones or below, and forcing AMX is an error, not a silent substitute.
#[test]
fn amx_kernels_are_exact_or_the_fallback_is_used() {
    let (Some(amx8), Some(amx16)) = (Int8Kernel::named("amx"), Bf16Kernel::named("amxbf16")) else {
        eprintln!("SKIPPED: no AMX kernels off x86-64");
        return;
    };
    let (int8, bf16) = (amx8.supported(), amx16.supported());
    // On a CPU that lists AMX (Linux grants the tile state to any process that asks), the
    // kernels must run: this test may not pass by skipping them.
    assert!(
        int8 || !amx8.listed_in_cpuinfo(),
        "/proc/cpuinfo lists amx_int8 but the AMX int8 kernel is not usable"
    );
    assert!(
        bf16 || !amx16.listed_in_cpuinfo(),
        "/proc/cpuinfo lists amx_bf16 but the AMX bf16 kernel is not usable"
    );
    if !int8 {
        eprintln!(
            "!!! NO AMX INT8 ON THIS MACHINE: the AMX int8 kernel is NOT tested here; checking \
             that the {} kernel is chosen instead",
            Int8Kernel::best().name()
        );
        assert_ne!(Int8Kernel::best(), amx8);
        assert!(Int8Kernel::best().supported());
    }
    if !bf16 {
        eprintln!(
            "!!! NO AMX BF16 ON THIS MACHINE: the AMX bf16 kernel is NOT tested here; checking \
             that the {} kernel is chosen instead",
            Bf16Kernel::best().name()
        );
        assert_ne!(Bf16Kernel::best(), amx16);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let shapes = [
        (1, 1, 4),
        (15, 16, 64),
        (16, 16, 64),
        (17, 31, 68),
        (31, 32, 124),
        (32, 32, 128),
        (33, 33, 132),
        (63, 17, 60),
        (64, 48, 384),
        (65, 129, 200),
        (130, 70, 1540),
    ];
    if int8 {
        assert_eq!(Int8Kernel::best(), amx8);
        for &(m, n, k) in &shapes {
            let a: Vec<u8> = (0..m * k).map(|_| rng.random()).collect();
            let q: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127..=127)).collect();
            let want = reference_i32(&a, &q, m, n, k);
            assert_eq!(
                run_int8(amx8, &a, &q, m, n, k),
                want,
                "amx m={m} n={n} k={k}"
            );
            // All-max values: 255 x -127 summed over k, the largest magnitudes the packing allows.
            let (a, q) = (vec![255u8; m * k], vec![-127i8; n * k]);
            let want = reference_i32(&a, &q, m, n, k);
            assert_eq!(run_int8(amx8, &a, &q, m, n, k), want, "amx all-max");
        }
        eprintln!(
            "amx int8: exact on {} shapes (random and all-max)",
            shapes.len()
        );
    }
    if bf16 {
        assert_eq!(Bf16Kernel::best(), amx16);
        for &(m, n, k) in &shapes {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.2..0.2)).collect();
            let b = PackedBf16::pack(&w, n, k).unwrap();
            let mut a16 = AlignedVec::default();
            bf16_rows(&x, m, k, b.kp, &mut a16);
            let all = Rows {
                a: &a16[..m * b.kp],
                rows: m,
                kp: b.kp,
            };
            let got = product(amx16, &all, &b).unwrap();
            assert_bf16_product("amxbf16", &x, &w, &got, (m, n, k));
            // Each row alone gives the same bits as inside the batch.
            for i in [0, m / 2, m - 1] {
                let one = Rows {
                    a: &a16[i * b.kp..(i + 1) * b.kp],
                    rows: 1,
                    kp: b.kp,
                };
                let alone = product(amx16, &one, &b).unwrap();
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&alone),
                    bits(&got[i * n..(i + 1) * n]),
                    "amxbf16 row {i} of {m} alone differs (n={n} k={k})"
                );
            }
        }
        eprintln!(
            "amxbf16: within bounds and batch invariant on {} shapes",
            shapes.len()
        );
    }
}
