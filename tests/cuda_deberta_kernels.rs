//! DeBERTa's disentangled attention kernels (kernels/disentangled_attention.cu) against their
//! CPU twins (rcx::backend::cpu's position_products_* and disentangled_attention_*), on
//! random non-zero inputs: c2p only, p2c only, both and neither; with and without dropout
//! on the probabilities (the CPU's keep mask bit for bit); padded sequences (the last of a
//! batch all padding: uniform attention); t of 1, under, between and over the 16-row and
//! 32-row tiles; relative maps with log buckets and the clamp (many keys of a query on one
//! position row: the gradients' scatter must add them all); head sizes 8 to 128 and 512
//! position rows (DeBERTa-v3-base's span: the backward's accumulator then needs the raised
//! shared memory limit). Every kernel runs in f32 and in bf16. Outputs are poisoned with
//! NaN before a launch, so an element a kernel forgets is caught; gradients start from
//! random values, so `+=` versus `=` is caught.
//!
//! References: the CPU ops in f64 on the same (bf16-rounded) inputs; the log-sum-exp the
//! device saves, from scores recomputed here in f64. Tolerances:
//! |gpu - cpu| <= rtol · (|cpu| + mean |cpu|) with rtol = 1e-5 for fp32 outputs of short
//! sums (the products' forward, the attention's output and lse), 1e-4 for long fp32 sums
//! (the products' backward over position rows or sequences x tokens, the attention's
//! gradients over keys or queries), 1e-2 for everything stored in bf16 (the attention's
//! backward reads its row dots from the fp32 copy of the output, so no bf16 rounding of out
//! enters the gradients, unlike kernels/attention.cu's).
//!
//! Without a GPU these tests rerun on the emulated device (tests/emu/fake_device.rs), as
//! tests/cuda_decoder_kernels.rs does; without either they print why they were skipped
//! (RCX_REQUIRE_EMU=1 makes that a failure).

mod common;
#[path = "emu/build.rs"]
mod emu_build;
#[path = "emu/fake_device.rs"]
mod fake_device;

use common::cuda_check::{Act, F32, F32_SUM, check, poisoned, rounded, upload_as, wide};
use common::{InputRng as Rng, gpu_or_skip as gpu};
use cudarc::driver::CudaSlice;
use half::bf16;
use rcx::backend::cpu::{self, AttentionDropout, PositionGrads, PositionTerms};
use rcx::backend::cuda::CudaRuntime;
use rcx::backend::cuda::deberta_ops::{DevicePositionGrads, DevicePositionTerms, launch};

/// (b, t, nh, hs).
type Dims = (usize, usize, usize, usize);

// ---- position products -----------------------------------------------------------------

fn products_case<T: Act>(rt: &CudaRuntime, rng: &mut Rng, (b, t, nh, hs): Dims, rows: usize) {
    let what = format!("position products {:?} rows {rows}", (b, t, nh, hs));
    let c = nh * hs;
    let x = rounded::<T>(&rng.values(b * t * c, 1.0));
    let pos = rounded::<T>(&rng.values(rows * c, 1.0));
    let mut out = vec![0.0f64; b * nh * t * rows];
    cpu::position_products_forward(&mut out, &wide(&x), &wide(&pos), b, t, nh, hs, rows);
    let (x_d, pos_d) = (upload_as::<T>(rt, &x), upload_as::<T>(rt, &pos));
    let mut out_d = poisoned::<T>(rt, out.len());
    rt.position_products_forward(&mut out_d, &x_d, &pos_d, (b, t, nh, hs), rows)
        .unwrap();
    check(rt, &format!("{what} forward"), &out_d, &out, F32);

    let dout = rounded::<T>(&rng.values(out.len(), 1.0));
    let dx = rounded::<T>(&rng.values(x.len(), 1.0));
    let dpos = rounded::<T>(&rng.values(pos.len(), 1.0));
    let (mut dx_d, mut dpos_d) = (upload_as::<T>(rt, &dx), upload_as::<T>(rt, &dpos));
    rt.position_products_backward(
        &mut dx_d,
        &mut dpos_d,
        &upload_as::<T>(rt, &dout),
        &x_d,
        &pos_d,
        (b, t, nh, hs),
        rows,
    )
    .unwrap();
    let (mut dx, mut dpos) = (wide(&dx), wide(&dpos));
    cpu::position_products_backward(
        &mut dx,
        &mut dpos,
        &wide(&dout),
        &wide(&x),
        &wide(&pos),
        b,
        t,
        nh,
        hs,
        rows,
    );
    check(rt, &format!("{what} backward dx"), &dx_d, &dx, F32_SUM);
    check(
        rt,
        &format!("{what} backward dpos"),
        &dpos_d,
        &dpos,
        F32_SUM,
    );
}

/// One token, one row; t, rows and hs below, at and over the 16-wide tiles; more
/// sequences than one (dpos sums over them); v3-base's 512 rows at head size 64.
#[test]
fn position_products_match_cpu() {
    let Some(rt) = gpu("position_products_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(41);
    for (dims, rows) in [
        ((1, 1, 1, 1), 1),
        ((3, 19, 2, 8), 16),
        ((2, 33, 3, 20), 37),
        ((2, 17, 2, 64), 512),
    ] {
        products_case::<f32>(&rt, &mut rng, dims, rows);
        products_case::<bf16>(&rt, &mut rng, dims, rows);
    }
}

// ---- the attention ---------------------------------------------------------------------

/// Which position terms a case has.
#[derive(Clone, Copy, Debug)]
enum Terms {
    Neither,
    C2pOnly,
    P2cOnly,
    Both,
}

impl Terms {
    fn has(self) -> (bool, bool) {
        match self {
            Terms::Neither => (false, false),
            Terms::C2pOnly => (true, false),
            Terms::P2cOnly => (false, true),
            Terms::Both => (true, true),
        }
    }
}

/// One attention problem, its inputs rounded to T.
struct Problem {
    dims: Dims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    c2p: Option<Vec<f32>>,
    p2c: Option<Vec<f32>>,
    relative: Vec<u32>,
    rows: usize,
    mask: Vec<u8>,
    scale: f64,
}

impl Problem {
    /// Relative positions from (position_buckets, max_relative_positions) as the model
    /// computes them.
    fn new<T: Act>(rng: &mut Rng, dims: Dims, span: (usize, usize), terms: Terms) -> Problem {
        let (b, t, nh, hs) = dims;
        let act = b * t * nh * hs;
        let rows = 2 * cpu::attention_span(span.0, span.1);
        let (with_c2p, with_p2c) = terms.has();
        let mut products =
            |present: bool| present.then(|| rounded::<T>(&rng.values(b * nh * t * rows, 2.0)));
        let (c2p, p2c) = (products(with_c2p), products(with_p2c));
        Problem {
            dims,
            q: rounded::<T>(&rng.values(act, 1.0)),
            k: rounded::<T>(&rng.values(act, 1.0)),
            v: rounded::<T>(&rng.values(act, 1.0)),
            c2p,
            p2c,
            relative: cpu::relative_positions(t, span.0, span.1),
            rows,
            mask: rng.padding_mask(b, t),
            scale: cpu::disentangled_scale(hs, with_c2p as usize + with_p2c as usize),
        }
    }

    fn wide_terms(&self) -> (Option<Vec<f64>>, Option<Vec<f64>>) {
        (self.c2p.as_deref().map(wide), self.p2c.as_deref().map(wide))
    }

    /// The CPU forward in f64: (out, probs).
    fn cpu_forward(&self, dropout: Option<AttentionDropout>) -> (Vec<f64>, Vec<f64>) {
        let (b, t, nh, hs) = self.dims;
        let (c2p, p2c) = self.wide_terms();
        let mut out = vec![0.0; b * t * nh * hs];
        let mut probs = vec![0.0; b * nh * t * t];
        cpu::disentangled_attention_forward(
            &mut out,
            &mut probs,
            &wide(&self.q),
            &wide(&self.k),
            &wide(&self.v),
            PositionTerms {
                c2p: c2p.as_deref(),
                p2c: p2c.as_deref(),
                relative: &self.relative,
                rows: self.rows,
            },
            &self.mask,
            b,
            t,
            nh,
            hs,
            self.scale,
            dropout,
        );
        (out, probs)
    }

    /// log Σ_j exp(s_ij) over each query row's allowed keys, s recomputed here in f64 from
    /// the definition (every key when the sequence has no real token).
    fn lse(&self) -> Vec<f64> {
        let (b, t, nh, hs) = self.dims;
        let c = nh * hs;
        let mut lse = Vec::with_capacity(b * nh * t);
        for bi in 0..b {
            let mask = &self.mask[bi * t..(bi + 1) * t];
            let any_real = mask.iter().any(|&m| m != 0);
            for h in 0..nh {
                let bh = bi * nh + h;
                for i in 0..t {
                    let scores: Vec<f64> = (0..t)
                        .filter(|&j| !any_real || mask[j] != 0)
                        .map(|j| {
                            let (qi, kj) = ((bi * t + i) * c + h * hs, (bi * t + j) * c + h * hs);
                            let mut s: f64 = (0..hs)
                                .map(|d| self.q[qi + d] as f64 * self.k[kj + d] as f64)
                                .sum();
                            let r = self.relative[i * t + j] as usize;
                            if let Some(c2p) = &self.c2p {
                                s += c2p[(bh * t + i) * self.rows + r] as f64;
                            }
                            if let Some(p2c) = &self.p2c {
                                s += p2c[(bh * t + j) * self.rows + r] as f64;
                            }
                            s * self.scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    lse.push(max + scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln());
                }
            }
        }
        lse
    }
}

fn terms_on<'a, T: Act>(
    relative: &'a [u32],
    rows: usize,
    c2p: &'a Option<CudaSlice<T>>,
    p2c: &'a Option<CudaSlice<T>>,
) -> DevicePositionTerms<'a, CudaSlice<T>> {
    DevicePositionTerms {
        c2p: c2p.as_ref(),
        p2c: p2c.as_ref(),
        relative,
        rows,
    }
}

fn attention_case<T: Act>(
    rt: &CudaRuntime,
    rng: &mut Rng,
    dims: Dims,
    span: (usize, usize),
    terms: Terms,
    dropout: Option<AttentionDropout>,
) {
    let what =
        format!("disentangled attention {dims:?} span {span:?} {terms:?} dropout {dropout:?}");
    let (b, t, nh, hs) = dims;
    let act = b * t * nh * hs;
    let problem = Problem::new::<T>(rng, dims, span, terms);
    let (q_d, k_d, v_d) = (
        upload_as::<T>(rt, &problem.q),
        upload_as::<T>(rt, &problem.k),
        upload_as::<T>(rt, &problem.v),
    );
    let c2p_d = problem.c2p.as_ref().map(|c| upload_as::<T>(rt, c));
    let p2c_d = problem.p2c.as_ref().map(|p| upload_as::<T>(rt, p));
    let mask_d = rt.upload(&problem.mask).unwrap();

    let (mut out_d, mut out32_d, mut lse_d) = (
        poisoned::<T>(rt, act),
        poisoned::<f32>(rt, act),
        poisoned::<f32>(rt, b * nh * t),
    );
    rt.disentangled_attention_forward(
        &mut out_d,
        &mut out32_d,
        &mut lse_d,
        &q_d,
        &k_d,
        &v_d,
        terms_on(&problem.relative, problem.rows, &c2p_d, &p2c_d),
        &mask_d,
        dims,
        problem.scale,
        dropout,
    )
    .unwrap();
    let (out, probs) = problem.cpu_forward(dropout);
    check(rt, &format!("{what} forward out"), &out_d, &out, F32);
    // The fp32 copy is the output before its rounding to T.
    check(rt, &format!("{what} forward out32"), &out32_d, &out, F32);
    check(
        rt,
        &format!("{what} forward lse"),
        &lse_d,
        &problem.lse(),
        F32,
    );

    // The backward, every gradient starting from random values.
    let dout = rounded::<T>(&rng.values(act, 1.0));
    let starts: Vec<Vec<f32>> = (0..3)
        .map(|_| rounded::<T>(&rng.values(act, 1.0)))
        .collect();
    // The products' gradients start small: each element gets few score gradients (one per
    // query or key on its position row), which a start of order 1 would swamp in the
    // tolerance.
    let products = b * nh * t * problem.rows;
    let dc2p = problem
        .c2p
        .as_ref()
        .map(|_| rounded::<T>(&rng.values(products, 0.01)));
    let dp2c = problem
        .p2c
        .as_ref()
        .map(|_| rounded::<T>(&rng.values(products, 0.01)));
    let mut grads_d: Vec<CudaSlice<T>> = starts.iter().map(|s| upload_as::<T>(rt, s)).collect();
    let mut dc2p_d = dc2p.as_ref().map(|d| upload_as::<T>(rt, d));
    let mut dp2c_d = dp2c.as_ref().map(|d| upload_as::<T>(rt, d));
    let mut row_dot_d = poisoned::<f32>(rt, b * nh * t);
    let [dq_d, dk_d, dv_d] = &mut grads_d[..] else {
        unreachable!()
    };
    rt.disentangled_attention_backward(
        dq_d,
        dk_d,
        dv_d,
        DevicePositionGrads {
            dc2p: dc2p_d.as_mut().map(|d| d.as_view_mut()),
            dp2c: dp2c_d.as_mut().map(|d| d.as_view_mut()),
        },
        &mut row_dot_d,
        &upload_as::<T>(rt, &dout),
        &out32_d,
        &q_d,
        &k_d,
        &v_d,
        terms_on(&problem.relative, problem.rows, &c2p_d, &p2c_d),
        &lse_d,
        &mask_d,
        dims,
        problem.scale,
        dropout,
    )
    .unwrap();

    let [mut dq, mut dk, mut dv] = [0, 1, 2].map(|g| wide(&starts[g]));
    let (mut dc2p, mut dp2c) = (dc2p.as_deref().map(wide), dp2c.as_deref().map(wide));
    let (c2p, p2c) = problem.wide_terms();
    cpu::disentangled_attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        PositionGrads {
            dc2p: dc2p.as_deref_mut(),
            dp2c: dp2c.as_deref_mut(),
        },
        &wide(&dout),
        &wide(&problem.q),
        &wide(&problem.k),
        &wide(&problem.v),
        PositionTerms {
            c2p: c2p.as_deref(),
            p2c: p2c.as_deref(),
            relative: &problem.relative,
            rows: problem.rows,
        },
        &probs,
        &problem.mask,
        b,
        t,
        nh,
        hs,
        problem.scale,
        dropout,
    );
    let grads = &grads_d;
    check(rt, &format!("{what} backward dq"), &grads[0], &dq, F32_SUM);
    check(rt, &format!("{what} backward dk"), &grads[1], &dk, F32_SUM);
    check(rt, &format!("{what} backward dv"), &grads[2], &dv, F32_SUM);
    if let (Some(d), Some(expected)) = (&dc2p_d, &dc2p) {
        check(rt, &format!("{what} backward dc2p"), d, expected, F32_SUM);
    }
    if let (Some(d), Some(expected)) = (&dp2c_d, &dp2c) {
        check(rt, &format!("{what} backward dp2c"), d, expected, F32_SUM);
    }
}

const DROPOUT: Option<AttentionDropout> = Some(AttentionDropout { p: 0.2, seed: 99 });

/// Runs `cases` (dims, (position_buckets, max_relative_positions), terms) in f32 and bf16,
/// each without and with dropout.
fn attention_cases(test: &str, seed: u64, cases: &[(Dims, (usize, usize), Terms)]) {
    let Some(rt) = gpu(test) else {
        return;
    };
    let mut rng = Rng::new(seed);
    for &(dims, span, terms) in cases {
        for dropout in [None, DROPOUT] {
            attention_case::<f32>(&rt, &mut rng, dims, span, terms, dropout);
            attention_case::<bf16>(&rt, &mut rng, dims, span, terms, dropout);
        }
    }
}

/// Each combination of terms; one token; t under, between and over the tiles (two key
/// tiles at 40); log buckets (8 of them over 32 positions) and, without buckets, the clamp
/// at ±8 (keys far from a query share its first and last rows).
#[test]
fn disentangled_attention_matches_cpu() {
    attention_cases(
        "disentangled_attention_matches_cpu",
        42,
        &[
            ((1, 1, 1, 8), (0, 4), Terms::Both),
            ((3, 19, 2, 16), (8, 32), Terms::Both),
            ((3, 19, 2, 16), (8, 32), Terms::C2pOnly),
            ((2, 40, 2, 8), (0, 8), Terms::P2cOnly),
            ((2, 40, 2, 8), (0, 8), Terms::Both),
            ((2, 17, 3, 8), (4, 16), Terms::Neither),
        ],
    );
}

/// Head sizes 64 and 128 (the largest), DeBERTa-v3-base's 256 buckets over 512 positions
/// (512 position rows: the backward's accumulators take it past the default 48 KiB of
/// shared memory).
#[test]
fn disentangled_attention_large_shapes_match_cpu() {
    attention_cases(
        "disentangled_attention_large_shapes_match_cpu",
        43,
        &[
            ((2, 35, 2, 64), (256, 512), Terms::Both),
            ((1, 18, 1, 128), (16, 64), Terms::Both),
        ],
    );
}

/// Wrong shapes and relative positions past the rows are errors before any launch.
#[test]
fn disentangled_attention_refuses_bad_inputs() {
    let Some(rt) = gpu("disentangled_attention_refuses_bad_inputs") else {
        return;
    };
    let (b, t, nh, hs, rows) = (1, 2, 1, 8, 4);
    let act = rt.zeros::<f32>(b * t * nh * hs).unwrap();
    let products = Some(rt.zeros::<f32>(b * nh * t * rows).unwrap());
    let mask = rt.upload(&[1u8, 1]).unwrap();
    let (mut out, mut out32, mut lse) = (
        rt.zeros::<f32>(b * t * nh * hs).unwrap(),
        rt.zeros::<f32>(b * t * nh * hs).unwrap(),
        rt.zeros::<f32>(b * nh * t).unwrap(),
    );
    let mut run = |relative: &[u32], q: &CudaSlice<f32>| {
        rt.disentangled_attention_forward(
            &mut out,
            &mut out32,
            &mut lse,
            q,
            &act,
            &act,
            terms_on(relative, rows, &products, &None),
            &mask,
            (b, t, nh, hs),
            0.25,
            None,
        )
        .unwrap_err()
        .to_string()
    };
    let err = run(&[0, 1, 4, 3], &act);
    assert!(err.contains("relative position 4 is past the 4"), "{err}");
    let err = run(&[0, 1, 2], &act);
    assert!(err.contains("relative has 3 elements"), "{err}");
    let short = rt.zeros::<f32>(15).unwrap();
    let err = run(&[0, 1, 2, 3], &short);
    assert!(err.contains("q has 15 elements"), "{err}");
}

/// The launch shapes are pure functions of the shapes (runs without a GPU); a relative
/// span too large for the backward's shared accumulator is a user error (exit code 2).
#[test]
fn disentangled_launch_shapes() {
    let shape = launch::attention_forward("t", 33, 6, 64).unwrap();
    assert_eq!((shape.grid, shape.block), ((3, 6, 1), 128));
    assert_eq!(
        shape.shared_bytes as usize,
        4 * (16 * 64 + 32 * 65 + 32 * 64)
    );
    // v3-base: 512 rows at head size 64, over the default 48 KiB.
    let shape = launch::attention_backward("t", 512, 96, 64, 512, true).unwrap();
    assert_eq!(
        shape.shared_bytes as usize,
        4 * (2 * 16 * 64 + 2 * 32 * 65 + 16 * 512)
    );
    assert!(shape.shared_opt_in().is_some());
    // Without the term to scatter, no accumulator.
    let shape = launch::attention_backward("t", 512, 96, 64, 512, false).unwrap();
    assert_eq!(shape.shared_bytes as usize, 4 * (2 * 16 * 64 + 2 * 32 * 65));
    let err = launch::attention_backward("t", 512, 96, 128, 2048, true).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(
        err.to_string().contains("2048 relative position rows"),
        "{err}"
    );
    assert!(launch::attention_forward("t", 8, 1, 129).is_err());
    assert!(launch::attention_forward("t", 8, 70_000, 64).is_err());
    let shape = launch::products_forward("t", 2, 33, 3, 37).unwrap();
    assert_eq!((shape.grid, shape.block), ((3, 3, 6), 256));
    let shape = launch::products_backward_pos("t", 3, 20, 37).unwrap();
    assert_eq!(shape.grid, (2, 3, 3));
}

/// Every test above, rerun on the emulated device (tests/emu/fake_device.rs) when this
/// machine has no GPU: the kernels on the CPU emulator behind a fake driver.
#[test]
fn all_gpu_tests_on_the_emulated_device() {
    let itself = "all_gpu_tests_on_the_emulated_device";
    fake_device::rerun_on_emulated_device(itself, &["--skip", itself]);
}
