//! BERT's pooling: the hidden state of the first ([CLS]) token of each sequence.

use crate::float::Float;

/// out[b, c] = inp[b, 0, c] for inp [b, t, c].
pub fn cls_pool_forward<F: Float>(out: &mut [F], inp: &[F], b: usize, t: usize, c: usize) {
    assert_eq!(out.len(), b * c, "cls_pool_forward: out is not [b, c]");
    assert_eq!(
        inp.len(),
        b * t * c,
        "cls_pool_forward: inp is not [b, t, c]"
    );
    assert!(t > 0 || b == 0, "cls_pool_forward: sequences are empty");
    // b·c elements: far too little work to be worth threads.
    for (i, out_row) in out.chunks_exact_mut(c).enumerate() {
        out_row.copy_from_slice(&inp[i * t * c..i * t * c + c]);
    }
}

/// dinp[b, 0, c] += dout[b, c]; the other positions get nothing.
pub fn cls_pool_backward<F: Float>(dinp: &mut [F], dout: &[F], b: usize, t: usize, c: usize) {
    assert_eq!(
        dinp.len(),
        b * t * c,
        "cls_pool_backward: dinp is not [b, t, c]"
    );
    assert_eq!(dout.len(), b * c, "cls_pool_backward: dout is not [b, c]");
    assert!(t > 0 || b == 0, "cls_pool_backward: sequences are empty");
    for (i, dout_row) in dout.chunks_exact(c).enumerate() {
        for (di, &d) in dinp[i * t * c..i * t * c + c].iter_mut().zip(dout_row) {
            *di += d;
        }
    }
}
