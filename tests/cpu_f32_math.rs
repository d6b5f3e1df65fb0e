//! The f32 paths of GELU and the attention softmax use rcx's own vectorised erf and exp
//! (src/backend/cpu/vecmath.rs) instead of libm's; these tests hold them to the f64 ops,
//! which use libm, over dense grids.

use rcx::backend::cpu::{attention_forward, gelu_backward, gelu_forward};

/// x from -10 to 10 in steps of 1e-4, exactly representable in both types.
fn grid() -> (Vec<f32>, Vec<f64>) {
    let x32: Vec<f32> = (-100_000..=100_000).map(|k| k as f32 * 1e-4).collect();
    let x64 = x32.iter().map(|&x| x as f64).collect();
    (x32, x64)
}

#[test]
fn gelu_f32_matches_f64_to_f32_precision() {
    let (x32, x64) = grid();
    let mut out32 = vec![0f32; x32.len()];
    let mut out64 = vec![0f64; x64.len()];
    gelu_forward(&mut out32, &x32);
    gelu_forward(&mut out64, &x64);
    for ((&x, &a), &b) in x64.iter().zip(&out32).zip(&out64) {
        // A few f32 ulps of the result (x and erf each carry one rounding).
        let tol = 4.0 * f32::EPSILON as f64 * b.abs().max(x.abs() * 0.5) + 1e-30;
        assert!(
            (a as f64 - b).abs() <= tol,
            "gelu({x}) = {a}, f64 gives {b}"
        );
    }
    let ones32 = vec![1f32; x32.len()];
    let ones64 = vec![1f64; x64.len()];
    let mut d32 = vec![0f32; x32.len()];
    let mut d64 = vec![0f64; x64.len()];
    gelu_backward(&mut d32, &x32, &ones32);
    gelu_backward(&mut d64, &x64, &ones64);
    for ((&x, &a), &b) in x64.iter().zip(&d32).zip(&d64) {
        assert!(
            (a as f64 - b).abs() <= 4e-7 * (1.0 + b.abs()),
            "gelu'({x}) = {a}, f64 gives {b}"
        );
    }
}

#[test]
fn gelu_f32_keeps_nan_and_infinities() {
    let inp = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0];
    let mut out = [0f32; 4];
    gelu_forward(&mut out, &inp);
    assert!(out[0].is_nan());
    assert_eq!(out[1], f32::INFINITY);
    assert!(out[2] == 0.0 || out[2].is_nan(), "gelu(-inf) = {}", out[2]);
    assert_eq!(out[3], 0.0);
}

#[test]
fn softmax_f32_matches_f64_and_masks_exactly() {
    // One sequence, one head of size 4, 64 tokens; the last 5 keys are padding.
    let (t, hs) = (64usize, 4usize);
    let mut state = 0x1234_5678u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f64 / (1u64 << 24) as f64 - 0.5) * 12.0
    };
    let q64: Vec<f64> = (0..t * hs).map(|_| next() as f32 as f64).collect();
    let k64: Vec<f64> = (0..t * hs).map(|_| next() as f32 as f64).collect();
    let v64: Vec<f64> = (0..t * hs).map(|_| next() as f32 as f64).collect();
    let to32 = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let mask: Vec<u8> = (0..t).map(|j| u8::from(j < t - 5)).collect();
    let (mut out32, mut probs32) = (vec![0f32; t * hs], vec![0f32; t * t]);
    let (mut out64, mut probs64) = (vec![0f64; t * hs], vec![0f64; t * t]);
    let (q32, k32, v32) = (to32(&q64), to32(&k64), to32(&v64));
    attention_forward(
        &mut out32,
        &mut probs32,
        &q32,
        &k32,
        &v32,
        &mask,
        1,
        t,
        1,
        hs,
        None,
    );
    attention_forward(
        &mut out64,
        &mut probs64,
        &q64,
        &k64,
        &v64,
        &mask,
        1,
        t,
        1,
        hs,
        None,
    );
    for (i, (&a, &b)) in probs32.iter().zip(&probs64).enumerate() {
        if mask[i % t] == 0 {
            assert_eq!(a, 0.0, "padded key {} has probability {a}", i % t);
        } else {
            // The scores themselves are f32 products (rel. error ~1e-7 of up to ~36), so
            // exp carries ~4e-6 relative error whatever exp is used.
            assert!(
                (a as f64 - b).abs() <= 1e-5 * b + 1e-12,
                "prob {i}: {a} vs {b}"
            );
        }
    }
}
