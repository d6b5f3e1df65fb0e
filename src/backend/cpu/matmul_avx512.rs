//! `matmul_forward` for f32 on AVX-512: out[n, oc] = inp[n, c] · weight[oc, c]^T + bias.
//!
//! matrixmultiply packs both operands of every tile; at serving's shapes (thousands of
//! token rows against a small weight) packing the activations took a fifth of the forward.
//! Here only the weight is packed, once per call, into panels of NR = 32 output columns
//! ([c][32], a tenth of a millisecond for bert-tiny's largest), and each MR x 32 block of
//! out is computed from MR rows of inp read in place: per k, one broadcast of each row's
//! element against the panel's two vectors, MR x 2 accumulators in registers.
//!
//! Every output element is its bias (or 0) plus the products over k in order, each a
//! fused multiply-add, whatever block or thread computes it: the result does not depend on
//! the thread count. `gemm_single` runs the same blocks on one thread for the attention's
//! per-head products (scale · Q Kᵀ, P V), where matrixmultiply's packing of both [t, 64]
//! operands cost about two fifths of its time.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use super::SendPtr;

/// Rows of out per block: 2·MR accumulators, two weight vectors and a broadcast fit the
/// 32 vector registers.
const MR: usize = 8;
/// Columns of out per weight panel: two vectors of 16 f32.
const NR: usize = 32;

/// Whether this CPU runs the kernel (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Panel p of b [k, n] (element (i, j) at `i·b_rs + j·b_cs`): [k][NR] of its columns
/// p·NR.., those past n zero.
///
/// # Safety
/// Every element of b's k x n block lies in one allocation.
unsafe fn pack_panel(
    panel: &mut [f32],
    p: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    n: usize,
) {
    for j in 0..NR.min(n - p * NR) {
        for (kk, column) in panel.chunks_exact_mut(NR).enumerate() {
            // SAFETY: kk < k and p·NR + j < n (the contract).
            column[j] = unsafe { *b.add(kk * b_rs + (p * NR + j) * b_cs) };
        }
    }
}

/// c[rows, n] = alpha · a[rows, k] · (the packed panels' b) + bias, block by block.
///
/// # Safety
/// The CPU has AVX-512F; a's `rows` rows of k elements, `a_rs` apart, are readable; c's
/// `rows` rows of n elements, `c_rs` apart, writable and touched by nobody else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn run_blocks(
    rows: usize,
    (a, a_rs): (*const f32, usize),
    packed: &[f32],
    (k, n): (usize, usize),
    bias: Option<&[f32]>,
    alpha: f32,
    (c, c_rs): (*mut f32, usize),
) {
    for block in (0..rows).step_by(MR) {
        for (p, panel) in packed.chunks_exact(k * NR).enumerate() {
            let cols = NR.min(n - p * NR);
            let at = Block {
                // SAFETY (pointer arithmetic): block < rows and p·NR < n (the contract).
                out: unsafe { c.add(block * c_rs + p * NR) },
                out_stride: c_rs,
                inp: unsafe { a.add(block * a_rs) },
                inp_stride: a_rs,
                panel,
                bias: bias.map(|b| &b[p * NR..p * NR + cols]),
                alpha,
                c: k,
                cols,
            };
            // SAFETY: the contract, for this block's rows and columns.
            unsafe { at.run(MR.min(rows - block)) };
        }
    }
}

/// c[m, n] = alpha · a[m, k] · b[k, n] on this thread: a's rows `a_rs` apart (unit column
/// stride), b's element (i, j) at `b + i·b_rs + j·b_cs`, c's rows `c_rs` apart. `packed` is
/// scratch for b's panels, reused between calls. Call only where `available()`.
///
/// # Safety
/// Every element those strides address lies in one allocation, c's m x n block included;
/// c overlaps neither a nor b.
pub unsafe fn gemm_single(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    (a, a_rs): (*const f32, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    (c, c_rs): (*mut f32, usize),
    packed: &mut Vec<f32>,
) {
    assert!(
        available(),
        "matmul_avx512::gemm_single on a CPU without AVX-512F"
    );
    if m == 0 || n == 0 {
        return;
    }
    packed.clear();
    packed.resize(n.div_ceil(NR) * k * NR, 0.0);
    for (p, panel) in packed.chunks_exact_mut(k * NR).enumerate() {
        // SAFETY: the caller's contract covers b.
        unsafe { pack_panel(panel, p, b, b_rs, b_cs, n) };
    }
    // SAFETY: AVX-512F asserted; the caller's contract covers a and c.
    unsafe { run_blocks(m, (a, a_rs), packed, (k, n), None, alpha, (c, c_rs)) };
}

/// out[n, oc] = inp[n, c] · weight[oc, c]^T + bias[oc]. Call only where `available()`.
pub fn forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    assert!(
        available(),
        "matmul_avx512::forward on a CPU without AVX-512F"
    );
    // The kernel's reads and writes rely on these (`matmul_forward` has named each already).
    assert!(
        out.len() == n * oc
            && inp.len() == n * c
            && weight.len() == oc * c
            && bias.is_none_or(|b| b.len() == oc),
        "matmul_avx512::forward: buffers of other shapes than [n, c] x [oc, c]"
    );
    if out.is_empty() {
        return;
    }
    // weightᵀ [c, oc] is b: weight read with swapped strides.
    let mut packed = vec![0.0; oc.div_ceil(NR) * c * NR];
    packed
        .par_chunks_mut(c * NR)
        .enumerate()
        // SAFETY: weight holds oc x c elements (asserted).
        .for_each(|(p, panel)| unsafe { pack_panel(panel, p, weight.as_ptr(), 1, c, oc) });
    // About four tasks per thread, whole blocks each: balance without tiny tasks.
    let tasks = 4 * rayon::current_num_threads();
    let rows_per_task = n.div_ceil(tasks).div_ceil(MR).max(1) * MR;
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(rows_per_task))
        .into_par_iter()
        .for_each(|task| {
            let first = task * rows_per_task;
            let rows = rows_per_task.min(n - first);
            let a = inp[first * c..].as_ptr();
            // SAFETY: AVX-512F asserted; rows first.. of inp and out lie in them (asserted
            // shapes), and tasks write disjoint row ranges of out.
            unsafe {
                let c_block = out_ptr.get().add(first * oc);
                run_blocks(rows, (a, c), &packed, (c, oc), bias, 1.0, (c_block, oc))
            };
        });
}

/// One block of out: alpha · (`rows` (≤ MR) rows of `inp` against one weight panel, plus
/// the bias), written to `cols` (≤ NR) columns from `out`.
struct Block<'a> {
    out: *mut f32,
    out_stride: usize,
    inp: *const f32, // [rows, c], rows `inp_stride` apart
    inp_stride: usize,
    panel: &'a [f32],        // [c, NR]
    bias: Option<&'a [f32]>, // [cols]
    alpha: f32,
    c: usize,
    cols: usize,
}

impl Block<'_> {
    /// # Safety
    /// The CPU has AVX-512F; `inp` is valid for reads of `rows` rows of `c` elements,
    /// `inp_stride` apart; `out` for writes of `rows` rows of `cols` elements, `out_stride`
    /// apart, that nothing else touches meanwhile.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run(&self, rows: usize) {
        // SAFETY: forwarded.
        unsafe {
            match rows {
                8 => self.rows::<8>(),
                7 => self.rows::<7>(),
                6 => self.rows::<6>(),
                5 => self.rows::<5>(),
                4 => self.rows::<4>(),
                3 => self.rows::<3>(),
                2 => self.rows::<2>(),
                _ => self.rows::<1>(),
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run(&self, _rows: usize) {
        unreachable!("matmul_avx512 runs only where available()");
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const ROWS: usize>(&self) {
        let (c, stride) = (self.c, self.inp_stride);
        assert!(self.panel.len() == c * NR);
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let (low, high) = (lanes(self.cols), lanes(self.cols.saturating_sub(16)));
        // SAFETY: masked loads read only the `cols` elements of the bias.
        let start = match self.bias {
            Some(b) => unsafe {
                [
                    _mm512_maskz_loadu_ps(low, b.as_ptr()),
                    _mm512_maskz_loadu_ps(high, b.as_ptr().wrapping_add(16)),
                ]
            },
            None => [_mm512_setzero_ps(); 2],
        };
        let mut acc = [start; ROWS];
        let (inp, panel) = (self.inp, self.panel.as_ptr());
        for k in 0..c {
            // SAFETY: k < c, so k·NR + 31 < c·NR (asserted length), and row r's element k
            // is the caller's (the contract).
            unsafe {
                let w_low = _mm512_loadu_ps(panel.add(k * NR));
                let w_high = _mm512_loadu_ps(panel.add(k * NR + 16));
                for (r, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*inp.add(r * stride + k));
                    row[0] = _mm512_fmadd_ps(x, w_low, row[0]);
                    row[1] = _mm512_fmadd_ps(x, w_high, row[1]);
                }
            }
        }
        let alpha = _mm512_set1_ps(self.alpha);
        for (r, row) in acc.iter().enumerate() {
            // SAFETY: the caller's contract: row r of the block, `cols` elements (masked).
            unsafe {
                let out = self.out.add(r * self.out_stride);
                _mm512_mask_storeu_ps(out, low, _mm512_mul_ps(alpha, row[0]));
                _mm512_mask_storeu_ps(out.wrapping_add(16), high, _mm512_mul_ps(alpha, row[1]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The f64 reference: bias + Σ_k inp·weight (each product exact), with the sum of the
    /// terms' magnitudes that bounds the f32 error.
    fn reference(
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        c: usize,
    ) -> Vec<(f64, f64)> {
        let oc = weight.len() / c.max(1);
        let mut out = Vec::with_capacity(n * oc);
        for i in 0..n {
            for j in 0..oc {
                let b = bias.map_or(0.0, |b| b[j] as f64);
                let terms = (0..c).map(|k| inp[i * c + k] as f64 * weight[j * c + k] as f64);
                let magnitude = b.abs() + terms.clone().map(f64::abs).sum::<f64>();
                out.push((b + terms.sum::<f64>(), magnitude));
            }
        }
        out
    }

    fn random(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
    }

    #[test]
    fn forward_matches_the_f64_reference_on_every_edge() {
        if !available() {
            eprintln!("matmul_avx512: skipped, this CPU has no AVX-512F");
            return;
        }
        let mut rng = Rng::new(7);
        // Rows and columns below, at and past a block and a panel; c from 1.
        for &(n, c, oc) in &[
            (1, 1, 1),
            (3, 5, 7),
            (8, 16, 32),
            (9, 33, 17),
            (17, 128, 33),
            (70, 64, 100),
            (130, 128, 512),
        ] {
            for with_bias in [false, true] {
                let (inp, weight) = (random(&mut rng, n * c), random(&mut rng, oc * c));
                let bias = with_bias.then(|| random(&mut rng, oc));
                let mut out = vec![f32::NAN; n * oc];
                forward(&mut out, &inp, &weight, bias.as_deref(), n, c, oc);
                let want = reference(&inp, &weight, bias.as_deref(), n, c);
                for (i, (&got, &(want, magnitude))) in out.iter().zip(&want).enumerate() {
                    // c fused multiply-adds, each rounding once: |error| <= c · 2^-24 ·
                    // Σ|terms| (Higham's bound for a sum of c terms).
                    let bound = (c as f64 + 1.0) * f32::EPSILON as f64 / 2.0 * magnitude;
                    assert!(
                        (got as f64 - want).abs() <= bound,
                        "n {n} c {c} oc {oc} bias {with_bias}: element {i} {got} against {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn gemm_single_matches_the_f64_reference_with_strides() {
        if !available() {
            eprintln!("matmul_avx512: skipped, this CPU has no AVX-512F");
            return;
        }
        let mut rng = Rng::new(9);
        // One head of a [t, 3 x 64] tensor: a and b rows 192 apart; b read transposed (Kᵀ,
        // b_cs = the row stride) and not (V, b_rs = the row stride); c rows wider than n.
        for &(m, k, n, transposed) in &[(37, 64, 37, false), (37, 64, 37, true), (5, 3, 70, true)] {
            let stride = 192;
            let a = random(&mut rng, m * stride);
            let b = random(&mut rng, k.max(n) * stride);
            let (b_rs, b_cs) = if transposed { (1, stride) } else { (stride, 1) };
            let c_rs = n + 3;
            let mut c = vec![f32::NAN; m * c_rs];
            let mut packed = Vec::new();
            // SAFETY: every strided element lies inside a, b and c (sizes above).
            unsafe {
                gemm_single(
                    (m, k, n),
                    0.125,
                    (a.as_ptr(), stride),
                    (b.as_ptr(), b_rs, b_cs),
                    (c.as_mut_ptr(), c_rs),
                    &mut packed,
                )
            };
            for i in 0..m {
                for j in 0..n {
                    let terms =
                        (0..k).map(|kk| a[i * stride + kk] as f64 * b[kk * b_rs + j * b_cs] as f64);
                    let magnitude = terms.clone().map(f64::abs).sum::<f64>() * 0.125;
                    let want = terms.sum::<f64>() * 0.125;
                    let bound = (k as f64 + 2.0) * f32::EPSILON as f64 / 2.0 * magnitude;
                    let got = c[i * c_rs + j] as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "{m}x{k}x{n} ({i}, {j}): {got} against {want}"
                    );
                }
                assert!(
                    c[i * c_rs + n..(i + 1) * c_rs].iter().all(|x| x.is_nan()),
                    "wrote past n"
                );
            }
        }
    }

    #[test]
    fn forward_does_not_depend_on_the_thread_count() {
        if !available() {
            eprintln!("matmul_avx512: skipped, this CPU has no AVX-512F");
            return;
        }
        let mut rng = Rng::new(8);
        let (n, c, oc) = (203, 96, 80);
        let (inp, weight, bias) = (
            random(&mut rng, n * c),
            random(&mut rng, oc * c),
            random(&mut rng, oc),
        );
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0.0f32; n * oc];
            pool.install(|| forward(&mut out, &inp, &weight, Some(&bias), n, c, oc));
            out
        };
        let one = run(1);
        for threads in [2, 3, 5] {
            assert!(
                run(threads)
                    .iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{threads} threads computed other bits than 1"
            );
        }
    }
}
