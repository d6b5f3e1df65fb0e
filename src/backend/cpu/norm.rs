//! The global gradient norm, for clipping.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use crate::backend::Float;

/// Σ g² over all of `grads`, accumulated in f64. Partial sums of fixed chunks are added in
/// chunk order, so the result does not depend on the thread count.
pub fn global_norm_squared<F: Float>(grads: &[F]) -> f64 {
    let partial: Vec<f64> = grads
        .par_chunks(ELEMENTWISE_CHUNK)
        .map(|chunk| chunk.iter().map(|g| g.to_f64() * g.to_f64()).sum::<f64>())
        .collect();
    partial.iter().sum()
}
