//! RMSNorm over the last dimension, as Hugging Face's LlamaRMSNorm (also Mistral's and
//! Qwen2's): out = weight · (x / sqrt(mean(x²) + eps)). The statistic is taken in f64
//! whatever F is (HF takes it in f32 even for bf16 inputs); the normalised value is rounded
//! to F before the weight multiplies it, as HF casts it back to the input's dtype first.

use rayon::prelude::*;

use super::COLUMN_CHUNK;
use crate::float::Float;

/// out[n, c] = weight[c] · F(inp · rstd), row by row; saves rstd[n] = 1 / sqrt(mean(inp²) +
/// eps) for the backward.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward<F: Float>(
    out: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    weight: &[F],
    n: usize,
    c: usize,
    eps: f64,
) {
    assert_eq!(out.len(), n * c, "rmsnorm_forward: out is not [n, c]");
    assert_eq!(inp.len(), n * c, "rmsnorm_forward: inp is not [n, c]");
    assert_eq!(rstd.len(), n, "rmsnorm_forward: rstd is not [n]");
    assert_eq!(weight.len(), c, "rmsnorm_forward: weight is not [c]");
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(c)
        .zip(inp.par_chunks(c))
        .zip(rstd.par_iter_mut())
        .for_each(|((out_row, inp_row), rstd_i)| {
            let mean_square = inp_row.iter().map(|x| x.to_f64().powi(2)).sum::<f64>() / c as f64;
            let rs = 1.0 / (mean_square + eps).sqrt();
            for ((o, x), &w) in out_row.iter_mut().zip(inp_row).zip(weight) {
                *o = w * F::from_f64(x.to_f64() * rs);
            }
            *rstd_i = F::from_f64(rs);
        });
}

/// dinp[n, c] += ∂L/∂inp; dweight[c] += Σ_rows dout · norm, with norm = inp · rstd from the
/// saved statistic. With dnorm = weight · dout:
///   dinp = rstd · (dnorm - norm · mean(dnorm · norm)).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<F: Float>(
    dinp: &mut [F],
    dweight: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    rstd: &[F],
    n: usize,
    c: usize,
) {
    assert_eq!(dinp.len(), n * c, "rmsnorm_backward: dinp is not [n, c]");
    assert_eq!(dout.len(), n * c, "rmsnorm_backward: dout is not [n, c]");
    assert_eq!(inp.len(), n * c, "rmsnorm_backward: inp is not [n, c]");
    assert_eq!(dweight.len(), c, "rmsnorm_backward: dweight is not [c]");
    assert_eq!(weight.len(), c, "rmsnorm_backward: weight is not [c]");
    assert_eq!(rstd.len(), n, "rmsnorm_backward: rstd is not [n]");
    if dinp.is_empty() {
        return;
    }
    dinp.par_chunks_mut(c)
        .zip(dout.par_chunks(c))
        .zip(inp.par_chunks(c))
        .zip(rstd.par_iter())
        .for_each(|(((dinp_row, dout_row), inp_row), rs)| {
            let rs = rs.to_f64();
            let dnorm_norm_sum: f64 = inp_row
                .iter()
                .zip(weight)
                .zip(dout_row)
                .map(|((x, w), d)| w.to_f64() * d.to_f64() * x.to_f64() * rs)
                .sum();
            let dnorm_norm_mean = dnorm_norm_sum / c as f64;
            for (((di, x), w), d) in dinp_row.iter_mut().zip(inp_row).zip(weight).zip(dout_row) {
                let norm = x.to_f64() * rs;
                let dnorm = w.to_f64() * d.to_f64();
                let grad = (dnorm - norm * dnorm_norm_mean) * rs;
                *di = F::from_f64(di.to_f64() + grad);
            }
        });
    // dweight: each task owns a block of columns and sums over all rows in order, so the
    // result does not depend on the thread count.
    dweight
        .par_chunks_mut(COLUMN_CHUNK)
        .enumerate()
        .for_each(|(chunk_index, dweight)| {
            let j0 = chunk_index * COLUMN_CHUNK;
            let j1 = j0 + dweight.len();
            let mut acc = [0.0f64; COLUMN_CHUNK];
            for i in 0..n {
                let rs = rstd[i].to_f64();
                let inp_row = &inp[i * c + j0..i * c + j1];
                let dout_row = &dout[i * c + j0..i * c + j1];
                for ((a, x), d) in acc.iter_mut().zip(inp_row).zip(dout_row) {
                    *a += d.to_f64() * x.to_f64() * rs;
                }
            }
            for (dw, a) in dweight.iter_mut().zip(acc) {
                *dw = F::from_f64(dw.to_f64() + a);
            }
        });
}
