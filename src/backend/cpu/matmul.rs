//! A Linear layer with PyTorch's weight layout [oc, c]: out = inp · weight^T + bias.
//! Everything goes through matrixmultiply's gemm (transposes are free via strides),
//! spread over 2-D tiles of the output with rayon.

use rayon::prelude::*;

use super::{COLUMN_CHUNK, ELEMENTWISE_CHUNK, SendPtr};
use crate::backend::Float;

/// Largest tile edge of `gemm_parallel`; tiles halve (down to `MIN_TILE`) until there are
/// at least `TARGET_TILES` of them, so small outputs still use every core.
const MAX_TILE: usize = 256;
const MIN_TILE: usize = 32;
const TARGET_TILES: usize = 64;

/// A gemm operand: a matrix inside `data` with element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a, F> {
    pub(crate) data: &'a [F],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

/// The tile edge for an m x n output: depends on the shape only, never on the thread count.
fn tile_edge(m: usize, n: usize) -> usize {
    let mut edge = MAX_TILE;
    while edge > MIN_TILE && m.div_ceil(edge) * n.div_ceil(edge) < TARGET_TILES {
        edge /= 2;
    }
    edge
}

/// c[m, n] (row-major, row stride `rsc`) = alpha · a[m, k] · b[k, n] + beta · c, run as one
/// single-threaded gemm per 2-D tile of c, tiles in parallel. Each tile spans all of k, and
/// matrixmultiply computes an element of c by the same sequence of operations wherever it
/// lies in a tile, so the result is bit-identical for any tiling and any thread count.
/// With beta == 0, c need not be initialised.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_parallel<F: Float>(
    m: usize,
    k: usize,
    n: usize,
    alpha: F,
    a: Strided<'_, F>,
    b: Strided<'_, F>,
    beta: F,
    c: &mut [F],
    rsc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Every address the gemm touches must lie inside its slice; rows of c must not overlap.
    assert!(
        n <= rsc && (m - 1) * rsc + n <= c.len(),
        "gemm: c too small"
    );
    if k > 0 {
        assert!(
            (m - 1) * a.rs + (k - 1) * a.cs < a.data.len(),
            "gemm: a too small"
        );
        assert!(
            (k - 1) * b.rs + (n - 1) * b.cs < b.data.len(),
            "gemm: b too small"
        );
    }
    let edge = tile_edge(m, n);
    let tiles_n = n.div_ceil(edge);
    let tiles = m.div_ceil(edge) * tiles_n;
    let c_ptr = SendPtr(c.as_mut_ptr());
    (0..tiles).into_par_iter().for_each(|tile| {
        let (i0, j0) = ((tile / tiles_n) * edge, (tile % tiles_n) * edge);
        let (rows, cols) = (edge.min(m - i0), edge.min(n - j0));
        // SAFETY: the asserts above bound every address of a, b and c; tiles are disjoint
        // blocks of c, so no two tasks write the same element, and c (a &mut) aliases
        // neither a nor b.
        unsafe {
            F::gemm(
                rows,
                k,
                cols,
                alpha,
                a.data.as_ptr().add(i0 * a.rs),
                a.rs as isize,
                a.cs as isize,
                b.data.as_ptr().add(j0 * b.cs),
                b.rs as isize,
                b.cs as isize,
                beta,
                c_ptr.get().add(i0 * rsc + j0),
                rsc as isize,
                1,
            );
        }
    });
}

/// out[n, oc] = inp[n, c] · weight[oc, c]^T + bias[oc]
pub fn matmul_forward<F: Float>(
    out: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: Option<&[F]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!(out.len(), n * oc, "matmul_forward: out is not [n, oc]");
    assert_eq!(inp.len(), n * c, "matmul_forward: inp is not [n, c]");
    assert_eq!(
        weight.len(),
        oc * c,
        "matmul_forward: weight is not [oc, c]"
    );
    if out.is_empty() {
        return;
    }
    let beta = match bias {
        Some(bias) => {
            assert_eq!(bias.len(), oc, "matmul_forward: bias is not [oc]");
            let rows_per_task = (ELEMENTWISE_CHUNK / oc).max(1);
            out.par_chunks_mut(rows_per_task * oc).for_each(|rows| {
                for row in rows.chunks_exact_mut(oc) {
                    row.copy_from_slice(bias);
                }
            });
            F::ONE
        }
        None => F::ZERO,
    };
    let inp = Strided {
        data: inp,
        rs: c,
        cs: 1,
    };
    // weight^T [c, oc] is weight read with swapped strides.
    let weight_t = Strided {
        data: weight,
        rs: 1,
        cs: c,
    };
    gemm_parallel(n, c, oc, F::ONE, inp, weight_t, beta, out, oc);
}

/// dinp[n, c] += dout[n, oc] · weight[oc, c]; dweight[oc, c] += dout^T · inp[n, c];
/// dbias[oc] += column sums of dout. All deterministic.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward<F: Float>(
    dinp: &mut [F],
    dweight: &mut [F],
    dbias: Option<&mut [F]>,
    dout: &[F],
    inp: &[F],
    weight: &[F],
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!(dinp.len(), n * c, "matmul_backward: dinp is not [n, c]");
    assert_eq!(
        dweight.len(),
        oc * c,
        "matmul_backward: dweight is not [oc, c]"
    );
    assert_eq!(dout.len(), n * oc, "matmul_backward: dout is not [n, oc]");
    assert_eq!(inp.len(), n * c, "matmul_backward: inp is not [n, c]");
    assert_eq!(
        weight.len(),
        oc * c,
        "matmul_backward: weight is not [oc, c]"
    );
    let dout_rows = Strided {
        data: dout,
        rs: oc,
        cs: 1,
    };
    let weight_rows = Strided {
        data: weight,
        rs: c,
        cs: 1,
    };
    gemm_parallel(n, oc, c, F::ONE, dout_rows, weight_rows, F::ONE, dinp, c);
    // dout^T [oc, n] is dout read with swapped strides.
    let dout_t = Strided {
        data: dout,
        rs: 1,
        cs: oc,
    };
    let inp_rows = Strided {
        data: inp,
        rs: c,
        cs: 1,
    };
    gemm_parallel(oc, n, c, F::ONE, dout_t, inp_rows, F::ONE, dweight, c);
    if let Some(dbias) = dbias {
        assert_eq!(dbias.len(), oc, "matmul_backward: dbias is not [oc]");
        add_column_sums(dbias, dout, oc);
    }
}

/// sums[j] += Σ_i rows[i, j] for rows [_, width], accumulated in f64 per column in row
/// order: exact to f32 and the same whatever the thread count.
pub(crate) fn add_column_sums<F: Float>(sums: &mut [F], rows: &[F], width: usize) {
    if width == 0 {
        return;
    }
    sums.par_chunks_mut(COLUMN_CHUNK)
        .enumerate()
        .for_each(|(chunk_index, sums)| {
            let j0 = chunk_index * COLUMN_CHUNK;
            let mut acc = [0.0f64; COLUMN_CHUNK];
            for row in rows.chunks_exact(width) {
                for (a, &x) in acc.iter_mut().zip(&row[j0..j0 + sums.len()]) {
                    *a += x.to_f64();
                }
            }
            for (s, a) in sums.iter_mut().zip(acc) {
                *s = F::from_f64(s.to_f64() + a);
            }
        });
}
