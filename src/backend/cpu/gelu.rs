//! GELU in its exact erf form, as BERT: gelu(x) = 0.5 x (1 + erf(x / √2)).
//! In f32 erf and exp come from `vecmath` (vectorised, as accurate as libm's); f64, the
//! gradient-check type, uses libm's.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use super::vecmath::{as_f32, as_f32_mut, erf_scaled_f32, exp_nonpositive_f32};
use crate::float::Float;

/// 1 / √(2π), the standard normal density at 0.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Elements per block of the f32 path's stack scratch.
const BLOCK: usize = 256;

/// out[i] = erf(inp[i] / √2), by `vecmath` in f32, by F's erf otherwise.
fn erf_scaled<F: Float>(out: &mut [F], inp: &[F]) {
    if let Some(inp32) = as_f32(inp) {
        let out32 = as_f32_mut(out).expect("out has the type of inp");
        erf_scaled_f32(out32, inp32);
        return;
    }
    let inv_sqrt2 = F::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = (x * inv_sqrt2).erf();
    }
}

/// out[i] = exp(-inp[i]² / 2), by `vecmath` in f32, by F's exp otherwise.
fn exp_half_square<F: Float>(out: &mut [F], inp: &[F]) {
    let half = F::from_f64(0.5);
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = -half * x * x;
    }
    match as_f32_mut(out) {
        Some(out32) => exp_nonpositive_f32(out32),
        None => out.iter_mut().for_each(|o| *o = o.exp()),
    }
}

/// out[i] = 0.5 inp[i] (1 + erf(inp[i] / √2))
pub fn gelu_forward<F: Float>(out: &mut [F], inp: &[F]) {
    assert_eq!(
        out.len(),
        inp.len(),
        "gelu_forward: out and inp differ in length"
    );
    let half = F::from_f64(0.5);
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(inp.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(out, inp)| {
            erf_scaled(out, inp);
            for (o, &x) in out.iter_mut().zip(inp) {
                *o = half * x * (F::ONE + *o);
            }
        });
}

/// dinp[i] += dout[i] · (Φ(x) + x φ(x)), x = inp[i], Φ and φ the normal CDF and density.
pub fn gelu_backward<F: Float>(dinp: &mut [F], inp: &[F], dout: &[F]) {
    assert_eq!(
        dinp.len(),
        inp.len(),
        "gelu_backward: dinp and inp differ in length"
    );
    assert_eq!(
        dout.len(),
        inp.len(),
        "gelu_backward: dout and inp differ in length"
    );
    let half = F::from_f64(0.5);
    let inv_sqrt_2pi = F::from_f64(INV_SQRT_2PI);
    dinp.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(inp.par_chunks(ELEMENTWISE_CHUNK))
        .zip(dout.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((dinp, inp), dout)| {
            // erf and exp of a block on the stack: dinp is accumulated into, so it cannot
            // hold them.
            let (mut erfs, mut exps) = ([F::ZERO; BLOCK], [F::ZERO; BLOCK]);
            for ((dinp, inp), dout) in dinp
                .chunks_mut(BLOCK)
                .zip(inp.chunks(BLOCK))
                .zip(dout.chunks(BLOCK))
            {
                let (erfs, exps) = (&mut erfs[..inp.len()], &mut exps[..inp.len()]);
                erf_scaled(erfs, inp);
                exp_half_square(exps, inp);
                for ((((di, &x), &d), &e), &g) in
                    dinp.iter_mut().zip(inp).zip(dout).zip(&*erfs).zip(&*exps)
                {
                    let cdf = half * (F::ONE + e);
                    let pdf = inv_sqrt_2pi * g;
                    *di += d * (cdf + x * pdf);
                }
            }
        });
}
