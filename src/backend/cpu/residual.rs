//! Residual connections: out = a + b.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use crate::float::Float;

/// out[i] = a[i] + b[i]
pub fn residual_forward<F: Float>(out: &mut [F], a: &[F], b: &[F]) {
    assert_eq!(
        out.len(),
        a.len(),
        "residual_forward: out and a differ in length"
    );
    assert_eq!(
        out.len(),
        b.len(),
        "residual_forward: out and b differ in length"
    );
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(a.par_chunks(ELEMENTWISE_CHUNK))
        .zip(b.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((out, a), b)| {
            for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                *o = x + y;
            }
        });
}

/// da[i] += dout[i]; db[i] += dout[i] (the gradient flows unchanged into both branches).
pub fn residual_backward<F: Float>(da: &mut [F], db: &mut [F], dout: &[F]) {
    assert_eq!(
        da.len(),
        dout.len(),
        "residual_backward: da and dout differ in length"
    );
    assert_eq!(
        db.len(),
        dout.len(),
        "residual_backward: db and dout differ in length"
    );
    da.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(db.par_chunks_mut(ELEMENTWISE_CHUNK))
        .zip(dout.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((da, db), dout)| {
            for ((x, y), &d) in da.iter_mut().zip(db.iter_mut()).zip(dout) {
                *x += d;
                *y += d;
            }
        });
}
