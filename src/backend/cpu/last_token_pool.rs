//! A decoder reward model's pooling: the hidden state of one chosen token of each sequence
//! (the last real one, as `*ForSequenceClassification` reads its logit there).

use crate::float::Float;

/// out[b, c] = inp[b, rows[b], c] for inp [b, t, c], rows [b] (each below t).
pub fn last_token_pool_forward<F: Float>(
    out: &mut [F],
    inp: &[F],
    rows: &[u32],
    t: usize,
    c: usize,
) {
    check_shapes("last_token_pool_forward", out.len(), inp.len(), rows, t, c);
    // b·c elements: far too little work to be worth threads.
    for (i, (out_row, &row)) in out.chunks_exact_mut(c).zip(rows).enumerate() {
        let at = (i * t + row as usize) * c;
        out_row.copy_from_slice(&inp[at..at + c]);
    }
}

/// dinp[b, rows[b], c] += dout[b, c]; the other positions get nothing.
pub fn last_token_pool_backward<F: Float>(
    dinp: &mut [F],
    dout: &[F],
    rows: &[u32],
    t: usize,
    c: usize,
) {
    check_shapes(
        "last_token_pool_backward",
        dout.len(),
        dinp.len(),
        rows,
        t,
        c,
    );
    for (i, (dout_row, &row)) in dout.chunks_exact(c).zip(rows).enumerate() {
        let at = (i * t + row as usize) * c;
        for (di, &d) in dinp[at..at + c].iter_mut().zip(dout_row) {
            *di += d;
        }
    }
}

fn check_shapes(op: &str, pooled: usize, full: usize, rows: &[u32], t: usize, c: usize) {
    let b = rows.len();
    assert_eq!(pooled, b * c, "{op}: out/dout is not [b, c]");
    assert_eq!(full, b * t * c, "{op}: inp/dinp is not [b, t, c]");
    if let Some(row) = rows.iter().find(|&&row| row as usize >= t) {
        panic!("{op}: row {row} is outside sequences of {t} tokens");
    }
}
