//! LayerNorm over the last dimension (BERT uses eps = 1e-12). Row statistics and the
//! normalisation are computed in f64 whatever F is, and rounded once.

use rayon::prelude::*;

use super::vecmath::{as_f32, as_f32_mut, with_avx512_or_avx2};
use super::{COLUMN_CHUNK, ELEMENTWISE_CHUNK};
use crate::float::Float;

/// out[n, c] = (inp - mean) · rstd · weight[c] + bias[c], row by row; saves mean[n] and
/// rstd[n] = 1 / sqrt(biased variance + eps) for the backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<F: Float>(
    out: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: &[F],
    n: usize,
    c: usize,
    eps: f64,
) {
    assert_eq!(out.len(), n * c, "layernorm_forward: out is not [n, c]");
    assert_eq!(inp.len(), n * c, "layernorm_forward: inp is not [n, c]");
    assert_eq!(mean.len(), n, "layernorm_forward: mean is not [n]");
    assert_eq!(rstd.len(), n, "layernorm_forward: rstd is not [n]");
    assert_eq!(weight.len(), c, "layernorm_forward: weight is not [c]");
    assert_eq!(bias.len(), c, "layernorm_forward: bias is not [c]");
    if out.is_empty() {
        return;
    }
    let rows = (ELEMENTWISE_CHUNK / c).max(1);
    out.par_chunks_mut(rows * c)
        .zip(inp.par_chunks(rows * c))
        .zip(mean.par_chunks_mut(rows).zip(rstd.par_chunks_mut(rows)))
        .for_each(|((out, inp), (mean, rstd))| {
            if let (Some(out), Some(mean), Some(rstd), Some(inp), Some(weight), Some(bias)) = (
                as_f32_mut(out),
                as_f32_mut(mean),
                as_f32_mut(rstd),
                as_f32(inp),
                as_f32(weight),
                as_f32(bias),
            ) {
                return layernorm_rows_f32(out, mean, rstd, inp, weight, bias, eps);
            }
            layernorm_rows(out, mean, rstd, inp, weight, bias, eps)
        });
}

/// `layernorm_forward` of whole rows (c = weight.len()). The row sums are 8 strided partial
/// sums combined pairwise (`sum8`), which the vector builds of `layernorm_rows_f32` run as
/// vectors where one serial chain of dependent f64 adds would hold them; the order is
/// fixed, so every build gives the same bits.
#[inline(always)]
fn layernorm_rows<F: Float>(
    out: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: &[F],
    eps: f64,
) {
    let c = weight.len();
    let rows = out.chunks_exact_mut(c).zip(inp.chunks_exact(c));
    for ((out_row, inp_row), (mean_i, rstd_i)) in rows.zip(mean.iter_mut().zip(rstd)) {
        // Two passes: the centred sum of squares does not cancel like E[x²] - E[x]².
        let m = sum8(inp_row, |x| x.to_f64()) / c as f64;
        let var = sum8(inp_row, |x| (x.to_f64() - m) * (x.to_f64() - m)) / c as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for (((o, x), w), b) in out_row.iter_mut().zip(inp_row).zip(weight).zip(bias) {
            let norm = (x.to_f64() - m) * rs;
            *o = F::from_f64(norm * w.to_f64() + b.to_f64());
        }
        *mean_i = F::from_f64(m);
        *rstd_i = F::from_f64(rs);
    }
}

/// `layernorm_rows` of f32, compiled for AVX-512 or AVX2 where the CPU has them.
fn layernorm_rows_f32(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f64,
) {
    with_avx512_or_avx2!(rows_avx512, rows_avx2(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], eps: f64) {
        layernorm_rows(out, mean, rstd, inp, weight, bias, eps)
    })
}

/// Σ f(x) over `row` in f64, as 8 partial sums over the elements i mod 8, then
/// ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)).
#[inline(always)]
fn sum8<F: Float>(row: &[F], f: impl Fn(F) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += f(x);
        }
    }
    for (lane, &x) in lanes.iter_mut().zip(rest) {
        *lane += f(x);
    }
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// dinp[n, c] += ∂L/∂inp; dweight[c] += Σ_rows dout · norm; dbias[c] += Σ_rows dout,
/// with norm = (inp - mean) · rstd recomputed from the saved statistics.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<F: Float>(
    dinp: &mut [F],
    dweight: &mut [F],
    dbias: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    mean: &[F],
    rstd: &[F],
    n: usize,
    c: usize,
) {
    assert_eq!(dinp.len(), n * c, "layernorm_backward: dinp is not [n, c]");
    assert_eq!(dout.len(), n * c, "layernorm_backward: dout is not [n, c]");
    assert_eq!(inp.len(), n * c, "layernorm_backward: inp is not [n, c]");
    assert_eq!(dweight.len(), c, "layernorm_backward: dweight is not [c]");
    assert_eq!(dbias.len(), c, "layernorm_backward: dbias is not [c]");
    assert_eq!(weight.len(), c, "layernorm_backward: weight is not [c]");
    assert_eq!(mean.len(), n, "layernorm_backward: mean is not [n]");
    assert_eq!(rstd.len(), n, "layernorm_backward: rstd is not [n]");
    if dinp.is_empty() {
        return;
    }
    // dinp, row by row: with dnorm = weight · dout,
    // dinp = rstd · (dnorm - mean(dnorm) - norm · mean(dnorm · norm)).
    dinp.par_chunks_mut(c)
        .zip(dout.par_chunks(c))
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|(((dinp_row, dout_row), inp_row), (m, rs))| {
            let (m, rs) = (m.to_f64(), rs.to_f64());
            let (mut dnorm_sum, mut dnorm_norm_sum) = (0.0f64, 0.0f64);
            for ((x, w), d) in inp_row.iter().zip(weight).zip(dout_row) {
                let norm = (x.to_f64() - m) * rs;
                let dnorm = w.to_f64() * d.to_f64();
                dnorm_sum += dnorm;
                dnorm_norm_sum += dnorm * norm;
            }
            let dnorm_mean = dnorm_sum / c as f64;
            let dnorm_norm_mean = dnorm_norm_sum / c as f64;
            for (((di, x), w), d) in dinp_row.iter_mut().zip(inp_row).zip(weight).zip(dout_row) {
                let norm = (x.to_f64() - m) * rs;
                let dnorm = w.to_f64() * d.to_f64();
                let grad = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rs;
                *di = F::from_f64(di.to_f64() + grad);
            }
        });
    // dweight and dbias: each task owns a block of columns and sums over all rows in order,
    // so the result does not depend on the thread count.
    dweight
        .par_chunks_mut(COLUMN_CHUNK)
        .zip(dbias.par_chunks_mut(COLUMN_CHUNK))
        .enumerate()
        .for_each(|(chunk_index, (dweight, dbias))| {
            let j0 = chunk_index * COLUMN_CHUNK;
            let j1 = j0 + dweight.len();
            let mut acc_weight = [0.0f64; COLUMN_CHUNK];
            let mut acc_bias = [0.0f64; COLUMN_CHUNK];
            for i in 0..n {
                let (m, rs) = (mean[i].to_f64(), rstd[i].to_f64());
                let inp_row = &inp[i * c + j0..i * c + j1];
                let dout_row = &dout[i * c + j0..i * c + j1];
                for (((aw, ab), x), d) in acc_weight
                    .iter_mut()
                    .zip(acc_bias.iter_mut())
                    .zip(inp_row)
                    .zip(dout_row)
                {
                    let d = d.to_f64();
                    *aw += d * (x.to_f64() - m) * rs;
                    *ab += d;
                }
            }
            for (dw, aw) in dweight.iter_mut().zip(acc_weight) {
                *dw = F::from_f64(dw.to_f64() + aw);
            }
            for (db, ab) in dbias.iter_mut().zip(acc_bias) {
                *db = F::from_f64(db.to_f64() + ab);
            }
        });
}
