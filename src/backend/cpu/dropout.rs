//! Inverted dropout whose keep mask is a pure function of (seed, element index): nothing is
//! stored between forward and backward, and a GPU kernel can draw the very same mask.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use super::vecmath::{as_f32, as_f32_mut, with_avx512};
use crate::float::Float;

/// 2^64 / φ, the splitmix64 increment; also spreads consecutive indices apart.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Whether element `index` survives dropout with probability `p` under `seed`.
/// z = splitmix64(seed ^ index·GOLDEN_GAMMA); u = (z >> 11) / 2^53, uniform on [0, 1) in
/// steps of 2^-53; keep iff u >= p. Only 64-bit integer arithmetic and one exact f64
/// comparison (equivalently: z >> 11 >= p · 2^53), so any device reproduces it bit for bit.
#[inline(always)]
pub fn dropout_keep(seed: u64, index: u64, p: f64) -> bool {
    let mut z = (seed ^ index.wrapping_mul(GOLDEN_GAMMA)).wrapping_add(GOLDEN_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let uniform = (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    uniform >= p
}

/// out[i] = inp[i] / (1 - p) where element i is kept, else 0; p == 0 copies.
pub fn dropout_forward<F: Float>(out: &mut [F], inp: &[F], p: f64, seed: u64) {
    assert_eq!(
        out.len(),
        inp.len(),
        "dropout_forward: out and inp differ in length"
    );
    assert!(
        (0.0..=1.0).contains(&p),
        "dropout_forward: p = {p} is not in [0, 1]"
    );
    if p == 0.0 {
        out.copy_from_slice(inp);
        return;
    }
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(inp.par_chunks(ELEMENTWISE_CHUNK))
        .enumerate()
        .for_each(|(chunk_index, (out, inp))| {
            let first = (chunk_index * ELEMENTWISE_CHUNK) as u64;
            dropout_forward_at(out, inp, first, p, seed);
        });
}

/// dropout_forward of a stretch of a larger buffer whose first element has index `first`
/// there, on the calling thread: for ops that are parallel already (attention drops its
/// probabilities one head at a time). Same mask, same values as over the whole buffer.
pub(crate) fn dropout_forward_at<F: Float>(
    out: &mut [F],
    inp: &[F],
    first: u64,
    p: f64,
    seed: u64,
) {
    debug_assert_eq!(out.len(), inp.len());
    let scale = F::from_f64(1.0 / (1.0 - p));
    if let (Some(out), Some(inp)) = (as_f32_mut(out), as_f32(inp)) {
        let scale = scale.to_f64() as f32;
        with_avx512!(forward_avx512(out: &mut [f32], inp: &[f32], first: u64, seed: u64, p: f64, scale: f32) {
            forward_chunk(out, inp, first, seed, p, scale)
        });
        return;
    }
    forward_chunk(out, inp, first, seed, p, scale);
}

/// dinp[i] += dout[i] / (1 - p) where element i was kept (same seed as the forward).
pub fn dropout_backward<F: Float>(dinp: &mut [F], dout: &[F], p: f64, seed: u64) {
    assert_eq!(
        dinp.len(),
        dout.len(),
        "dropout_backward: dinp and dout differ in length"
    );
    assert!(
        (0.0..=1.0).contains(&p),
        "dropout_backward: p = {p} is not in [0, 1]"
    );
    let scale = F::from_f64(1.0 / (1.0 - p));
    dinp.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(dout.par_chunks(ELEMENTWISE_CHUNK))
        .enumerate()
        .for_each(|(chunk_index, (dinp, dout))| {
            let first = (chunk_index * ELEMENTWISE_CHUNK) as u64;
            if let (Some(dinp), Some(dout)) = (as_f32_mut(dinp), as_f32(dout)) {
                let scale = scale.to_f64() as f32;
                with_avx512!(backward_avx512(dinp: &mut [f32], dout: &[f32], first: u64, seed: u64, p: f64, scale: f32) {
                    backward_chunk(dinp, dout, first, seed, p, scale)
                });
                return;
            }
            backward_chunk(dinp, dout, first, seed, p, scale);
        });
}

/// One chunk of the forward; `first` is the index of its first element.
#[inline(always)]
fn forward_chunk<F: Float>(out: &mut [F], inp: &[F], first: u64, seed: u64, p: f64, scale: F) {
    for (i, (o, &x)) in out.iter_mut().zip(inp).enumerate() {
        let keep = dropout_keep(seed, first + i as u64, p);
        *o = if keep { x * scale } else { F::ZERO };
    }
}

/// One chunk of the backward; `first` is the index of its first element.
#[inline(always)]
fn backward_chunk<F: Float>(dinp: &mut [F], dout: &[F], first: u64, seed: u64, p: f64, scale: F) {
    for (i, (di, &d)) in dinp.iter_mut().zip(dout).enumerate() {
        if p == 0.0 || dropout_keep(seed, first + i as u64, p) {
            *di += d * scale;
        }
    }
}
