//! The global gradient norm, for clipping.

use rayon::prelude::*;

use super::ELEMENTWISE_CHUNK;
use crate::float::Float;

/// Independent running sums per chunk: element i goes to sum i mod LANES, so the adds
/// need not wait on each other and the loop vectorises.
const LANES: usize = 8;

/// Σ g² over all of `grads`, accumulated in f64. Within a fixed chunk, LANES strided
/// partial sums, added in lane order; chunk sums added in chunk order: the result does not
/// depend on the thread count.
pub fn global_norm_squared<F: Float>(grads: &[F]) -> f64 {
    let partial: Vec<f64> = grads
        .par_chunks(ELEMENTWISE_CHUNK)
        .map(|chunk| {
            let mut lanes = [0.0f64; LANES];
            let mut groups = chunk.chunks_exact(LANES);
            for group in &mut groups {
                for (lane, g) in lanes.iter_mut().zip(group) {
                    *lane += g.to_f64() * g.to_f64();
                }
            }
            for (lane, g) in lanes.iter_mut().zip(groups.remainder()) {
                *lane += g.to_f64() * g.to_f64();
            }
            lanes.iter().sum::<f64>()
        })
        .collect();
    partial.iter().sum()
}
