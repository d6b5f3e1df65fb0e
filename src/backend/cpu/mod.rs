//! The CPU backend: one file per op, each with `<op>_forward` and `<op>_backward`.
//! Layouts are row-major; shapes are written beside every argument.
//!
//! Conventions: forward outputs are overwritten; every backward ADDS (+=) into all of its
//! gradient outputs (the caller zeroes them). Work is spread over all cores with rayon;
//! reductions use partitions fixed by the shapes alone, and gemm tiles leave every element
//! to the same operations wherever it lands, so every result is the same bit for bit
//! whatever the number of threads.

mod adamw;
mod attention;
mod attention_causal;
mod backend;
mod disentangled_attention;
mod dropout;
mod embedding;
mod gelu;
mod last_token_pool;
mod layernorm;
mod matmul;
mod matmul_avx512;
mod norm;
mod pool;
mod residual;
mod rmsnorm;
mod rope;
mod swiglu;
mod tanh;
mod token_embedding;
mod vecmath;

pub use adamw::*;
pub use attention::*;
pub use attention_causal::*;
pub use backend::Cpu;
pub use disentangled_attention::*;
pub use dropout::*;
pub use embedding::*;
pub use gelu::*;
pub use last_token_pool::*;
pub use layernorm::*;
pub use matmul::*;
pub use norm::*;
pub use pool::*;
pub use residual::*;
pub use rmsnorm::*;
pub use rope::*;
pub use swiglu::*;
pub use tanh::*;
pub use token_embedding::*;

/// Elements per rayon task in elementwise ops: big enough to amortise scheduling, small
/// enough to balance. Fixed, so partitions never depend on the thread count.
pub(crate) const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// Columns per rayon task in column reductions (bias and LayerNorm weight gradients).
pub(crate) const COLUMN_CHUNK: usize = 64;

/// A raw pointer that may cross threads. Used only where parallel tasks write provably
/// disjoint, strided regions of one buffer (a tile of a matrix, one head's channels),
/// which safe slices cannot express.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<F>(pub(crate) *mut F);

impl<F> SendPtr<F> {
    /// The address. A method, so closures capture the whole (Send) wrapper rather than
    /// its raw-pointer field.
    #[inline]
    pub(crate) fn get(self) -> *mut F {
        self.0
    }
}

// SAFETY: every user of SendPtr partitions the pointee so that no two tasks touch the
// same element; the pointer itself is just an address.
unsafe impl<F> Send for SendPtr<F> {}
unsafe impl<F> Sync for SendPtr<F> {}
