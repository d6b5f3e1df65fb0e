//! A Linear layer with PyTorch's weight layout [oc, c]: out = inp · weight^T + bias.
//! Everything goes through matrixmultiply's gemm (transposes are free via strides),
//! spread over 2-D tiles of the output with rayon, except the f32 forward on CPUs with
//! AVX-512, which has a kernel of its own (`matmul_avx512`).

use rayon::prelude::*;

use super::matmul_avx512;
use super::vecmath::{as_f32, as_f32_mut};
use super::{COLUMN_CHUNK, ELEMENTWISE_CHUNK, SendPtr};
use crate::float::Float;

/// Tiles of `gemm_parallel` are never cut below this edge (unless the matrix is smaller),
/// and are cut at multiples of it, so no tile ends inside a microkernel block.
const MIN_TILE: usize = 32;

/// A gemm operand: a matrix inside `data` with element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a, F> {
    pub(crate) data: &'a [F],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

/// The tile shape for an m x n output on `threads` threads: halve the longer side until
/// there are two tiles per thread (for balance) or tiles reach MIN_TILE. No more tiles than
/// that: each tile re-packs its panels of a and b, which costs time.
fn tile_shape(m: usize, n: usize, threads: usize) -> (usize, usize) {
    let round_up = |x: usize| x.div_ceil(MIN_TILE) * MIN_TILE;
    let (mut tile_m, mut tile_n) = (m, n);
    while m.div_ceil(tile_m) * n.div_ceil(tile_n) < 2 * threads {
        if tile_m >= tile_n && tile_m > MIN_TILE {
            tile_m = round_up(tile_m.div_ceil(2));
        } else if tile_n > MIN_TILE {
            tile_n = round_up(tile_n.div_ceil(2));
        } else {
            break;
        }
    }
    (tile_m, tile_n)
}

/// c[m, n] (row-major, row stride `rsc`) = a[m, k] · b[k, n] + beta · c, run as one
/// single-threaded gemm per 2-D tile of c, tiles in parallel. Each tile spans all of k, and
/// matrixmultiply computes an element of c by the same operations wherever it lies in a
/// tile (its edge path differs from the full-tile path only in how alpha is rounded, and
/// alpha is 1 here), so the result is bit-identical for any tiling and thread count.
/// With beta == 0, c need not be initialised.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_parallel<F: Float>(
    m: usize,
    k: usize,
    n: usize,
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
    let (tile_m, tile_n) = tile_shape(m, n, rayon::current_num_threads());
    let tiles_n = n.div_ceil(tile_n);
    let tiles = m.div_ceil(tile_m) * tiles_n;
    let c_ptr = SendPtr(c.as_mut_ptr());
    (0..tiles).into_par_iter().for_each(|tile| {
        let (i0, j0) = ((tile / tiles_n) * tile_m, (tile % tiles_n) * tile_n);
        let (rows, cols) = (tile_m.min(m - i0), tile_n.min(n - j0));
        // SAFETY: the asserts above bound every address of a, b and c; tiles are disjoint
        // blocks of c, so no two tasks write the same element, and c (a &mut) aliases
        // neither a nor b.
        unsafe {
            F::gemm(
                rows,
                k,
                cols,
                F::ONE,
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
    if let Some(bias) = bias {
        assert_eq!(bias.len(), oc, "matmul_forward: bias is not [oc]");
    }
    if out.is_empty() {
        return;
    }
    if let (true, Some(out), Some(inp), Some(weight)) = (
        matmul_avx512::available(),
        as_f32_mut(out),
        as_f32(inp),
        as_f32(weight),
    ) {
        let bias = bias.map(|b| as_f32(b).expect("bias of the same type as out"));
        matmul_avx512::forward(out, inp, weight, bias, n, c, oc);
        return;
    }
    let beta = match bias {
        Some(bias) => {
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
    gemm_parallel(n, c, oc, inp, weight_t, beta, out, oc);
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
    gemm_parallel(n, oc, c, dout_rows, weight_rows, F::ONE, dinp, c);
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
    gemm_parallel(oc, n, c, dout_t, inp_rows, F::ONE, dweight, c);
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
