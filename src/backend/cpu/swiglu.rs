//! The gated MLP activation of Llama, Mistral and Qwen2 (`hidden_act: silu`):
//! out = silu(gate) · up, silu(x) = x · sigmoid(x). silu is computed in f64 and rounded to F
//! before multiplying up, as PyTorch rounds `act_fn(gate_proj(x))` before the product. In f32
//! the exponentials come from `vecmath` (vectorised), f64 uses libm's.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use super::vecmath::{as_f32_mut, exp_nonpositive_f32};
use crate::float::Float;

/// Elements per block of the stack scratch that holds the exponentials.
const BLOCK: usize = 256;

/// out[i] = e^-|inp[i]|: the one exponential sigmoid needs, never overflowing.
fn exp_neg_abs<F: Float>(out: &mut [F], inp: &[F]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = -x.abs();
    }
    match as_f32_mut(out) {
        Some(out32) => exp_nonpositive_f32(out32),
        None => out.iter_mut().for_each(|o| *o = o.exp()),
    }
}

/// sigmoid(x) from e = e^-|x|, in f64.
#[inline(always)]
fn sigmoid_from(x: f64, e: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// out[i] = F(silu(gate[i])) · up[i]
pub fn swiglu_forward<F: Float>(out: &mut [F], gate: &[F], up: &[F]) {
    assert_eq!(
        gate.len(),
        out.len(),
        "swiglu_forward: gate and out differ in length"
    );
    assert_eq!(
        up.len(),
        out.len(),
        "swiglu_forward: up and out differ in length"
    );
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(gate.par_chunks(ELEMENTWISE_CHUNK))
        .zip(up.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((out, gate), up)| {
            let mut exps = [F::ZERO; BLOCK];
            for ((out, gate), up) in out
                .chunks_mut(BLOCK)
                .zip(gate.chunks(BLOCK))
                .zip(up.chunks(BLOCK))
            {
                let exps = &mut exps[..gate.len()];
                exp_neg_abs(exps, gate);
                for (((o, &g), &u), &e) in out.iter_mut().zip(gate).zip(up).zip(&*exps) {
                    let g = g.to_f64();
                    let silu = g * sigmoid_from(g, e.to_f64());
                    *o = F::from_f64(silu) * u;
                }
            }
        });
}

/// dgate[i] += dout[i] · up[i] · silu'(gate[i]), silu'(x) = s (1 + x (1 - s)) with
/// s = sigmoid(x); dup[i] += dout[i] · F(silu(gate[i])).
pub fn swiglu_backward<F: Float>(dgate: &mut [F], dup: &mut [F], dout: &[F], gate: &[F], up: &[F]) {
    let n = dout.len();
    assert_eq!(
        dgate.len(),
        n,
        "swiglu_backward: dgate and dout differ in length"
    );
    assert_eq!(
        dup.len(),
        n,
        "swiglu_backward: dup and dout differ in length"
    );
    assert_eq!(
        gate.len(),
        n,
        "swiglu_backward: gate and dout differ in length"
    );
    assert_eq!(up.len(), n, "swiglu_backward: up and dout differ in length");
    dgate
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(dup.par_chunks_mut(ELEMENTWISE_CHUNK))
        .zip(dout.par_chunks(ELEMENTWISE_CHUNK))
        .zip(
            gate.par_chunks(ELEMENTWISE_CHUNK)
                .zip(up.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|(((dgate, dup), dout), (gate, up))| {
            let mut exps = [F::ZERO; BLOCK];
            for ((((dgate, dup), dout), gate), up) in dgate
                .chunks_mut(BLOCK)
                .zip(dup.chunks_mut(BLOCK))
                .zip(dout.chunks(BLOCK))
                .zip(gate.chunks(BLOCK))
                .zip(up.chunks(BLOCK))
            {
                let exps = &mut exps[..gate.len()];
                exp_neg_abs(exps, gate);
                for (((((dg, du), &d), &g), &u), &e) in dgate
                    .iter_mut()
                    .zip(dup.iter_mut())
                    .zip(dout)
                    .zip(gate)
                    .zip(up)
                    .zip(&*exps)
                {
                    let (g, d) = (g.to_f64(), d.to_f64());
                    let s = sigmoid_from(g, e.to_f64());
                    let dsilu = s * (1.0 + g * (1.0 - s));
                    *dg = F::from_f64(dg.to_f64() + d * u.to_f64() * dsilu);
                    *du = F::from_f64(du.to_f64() + d * F::from_f64(g * s).to_f64());
                }
            }
        });
}
