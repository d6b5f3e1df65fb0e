//! PyTorch's AdamW (torch.optim.AdamW, decoupled weight decay), step by step in f64.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use super::vecmath::{as_f32, as_f32_mut, with_avx2};
use crate::float::Float;

/// One AdamW step over a flat parameter buffer, exactly PyTorch's formula with g =
/// grads · grad_scale (grad_scale is the clipping factor; 1 when not clipping):
///   p ← p (1 - lr·wd); m ← β1 m + (1-β1) g; v ← β2 v + (1-β2) g²;
///   p ← p - lr/(1-β1^step) · m / (√v / √(1-β2^step) + eps).
/// `step` counts from 1. Each element is updated in f64 and rounded once.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update<F: Float>(
    params: &mut [F],
    grads: &[F],
    m: &mut [F],
    v: &mut [F],
    step: u64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    grad_scale: f64,
) {
    assert_eq!(
        grads.len(),
        params.len(),
        "adamw_update: grads and params differ in length"
    );
    assert_eq!(
        m.len(),
        params.len(),
        "adamw_update: m and params differ in length"
    );
    assert_eq!(
        v.len(),
        params.len(),
        "adamw_update: v and params differ in length"
    );
    assert!(step >= 1, "adamw_update: step counts from 1");
    let bias_correction1 = 1.0 - beta1.powf(step as f64);
    let bias_correction2_sqrt = (1.0 - beta2.powf(step as f64)).sqrt();
    let step_size = lr / bias_correction1;
    let decay = 1.0 - lr * weight_decay;
    let hyper = Hyper {
        beta1,
        beta2,
        eps,
        grad_scale,
        bias_correction2_sqrt,
        step_size,
        decay,
    };
    params
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(grads.par_chunks(ELEMENTWISE_CHUNK))
        .zip(m.par_chunks_mut(ELEMENTWISE_CHUNK))
        .zip(v.par_chunks_mut(ELEMENTWISE_CHUNK))
        .for_each(|(((params, grads), m), v)| {
            // f32 (training) through a loop the compiler may widen to AVX2; same bits.
            if let (Some(params), Some(grads), Some(m), Some(v)) = (
                as_f32_mut(params),
                as_f32(grads),
                as_f32_mut(m),
                as_f32_mut(v),
            ) {
                adamw_chunk_f32(params, grads, m, v, &hyper);
            } else {
                adamw_chunk(params, grads, m, v, &hyper);
            }
        });
}

/// The step's constants.
struct Hyper {
    beta1: f64,
    beta2: f64,
    eps: f64,
    grad_scale: f64,
    bias_correction2_sqrt: f64,
    step_size: f64,
    decay: f64,
}

#[inline(always)]
fn adamw_chunk<F: Float>(params: &mut [F], grads: &[F], m: &mut [F], v: &mut [F], h: &Hyper) {
    for (((p, g), m), v) in params.iter_mut().zip(grads).zip(m).zip(v) {
        let g = g.to_f64() * h.grad_scale;
        let m_new = h.beta1 * m.to_f64() + (1.0 - h.beta1) * g;
        let v_new = h.beta2 * v.to_f64() + (1.0 - h.beta2) * g * g;
        let denom = v_new.sqrt() / h.bias_correction2_sqrt + h.eps;
        *p = F::from_f64(p.to_f64() * h.decay - h.step_size * m_new / denom);
        *m = F::from_f64(m_new);
        *v = F::from_f64(v_new);
    }
}

fn adamw_chunk_f32(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: &Hyper) {
    with_avx2!(adamw_avx2(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: &Hyper) {
        adamw_chunk(params, grads, m, v, h)
    })
}
