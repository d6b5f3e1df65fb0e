//! GELU in its exact erf form, as BERT: gelu(x) = 0.5 x (1 + erf(x / √2)).

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use crate::backend::Float;

/// 1 / √(2π), the standard normal density at 0.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// out[i] = 0.5 inp[i] (1 + erf(inp[i] / √2))
pub fn gelu_forward<F: Float>(out: &mut [F], inp: &[F]) {
    assert_eq!(
        out.len(),
        inp.len(),
        "gelu_forward: out and inp differ in length"
    );
    let half = F::from_f64(0.5);
    let inv_sqrt2 = F::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(inp.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(out, inp)| {
            for (o, &x) in out.iter_mut().zip(inp) {
                *o = half * x * (F::ONE + (x * inv_sqrt2).erf());
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
    let inv_sqrt2 = F::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    let inv_sqrt_2pi = F::from_f64(INV_SQRT_2PI);
    dinp.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(inp.par_chunks(ELEMENTWISE_CHUNK))
        .zip(dout.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((dinp, inp), dout)| {
            for ((di, &x), &d) in dinp.iter_mut().zip(inp).zip(dout) {
                let cdf = half * (F::ONE + (x * inv_sqrt2).erf());
                let pdf = inv_sqrt_2pi * (-half * x * x).exp();
                *di += d * (cdf + x * pdf);
            }
        });
}
