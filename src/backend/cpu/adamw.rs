//! PyTorch's AdamW (torch.optim.AdamW, decoupled weight decay), step by step in f64.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use crate::backend::Float;

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
    params
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(grads.par_chunks(ELEMENTWISE_CHUNK))
        .zip(m.par_chunks_mut(ELEMENTWISE_CHUNK))
        .zip(v.par_chunks_mut(ELEMENTWISE_CHUNK))
        .for_each(|(((params, grads), m), v)| {
            for (((p, g), m), v) in params.iter_mut().zip(grads).zip(m).zip(v) {
                let g = g.to_f64() * grad_scale;
                let m_new = beta1 * m.to_f64() + (1.0 - beta1) * g;
                let v_new = beta2 * v.to_f64() + (1.0 - beta2) * g * g;
                let denom = v_new.sqrt() / bias_correction2_sqrt + eps;
                *p = F::from_f64(p.to_f64() * decay - step_size * m_new / denom);
                *m = F::from_f64(m_new);
                *v = F::from_f64(v_new);
            }
        });
}
