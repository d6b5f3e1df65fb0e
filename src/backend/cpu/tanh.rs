//! tanh, the activation of a first-token pooling head.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use crate::float::Float;

/// out[i] = tanh(inp[i])
pub fn tanh_forward<F: Float>(out: &mut [F], inp: &[F]) {
    assert_eq!(
        out.len(),
        inp.len(),
        "tanh_forward: out and inp differ in length"
    );
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(inp.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(out, inp)| {
            for (o, &x) in out.iter_mut().zip(inp) {
                *o = x.tanh();
            }
        });
}

/// dinp[i] += dout[i] · (1 - out[i]²), from the saved output.
pub fn tanh_backward<F: Float>(dinp: &mut [F], out: &[F], dout: &[F]) {
    assert_eq!(
        dinp.len(),
        out.len(),
        "tanh_backward: dinp and out differ in length"
    );
    assert_eq!(
        dout.len(),
        out.len(),
        "tanh_backward: dout and out differ in length"
    );
    dinp.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(out.par_chunks(ELEMENTWISE_CHUNK))
        .zip(dout.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((dinp, out), dout)| {
            for ((di, &y), &d) in dinp.iter_mut().zip(out).zip(dout) {
                *di += d * (F::ONE - y * y);
            }
        });
}
