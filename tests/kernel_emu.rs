//! Every CUDA kernel (kernels/*.cu) run on the CPU emulator of the CUDA execution model
//! (kernels/emu) and checked against its CPU twin (rcx::backend::cpu, rcx::loss). Runs
//! without a GPU, so CI exercises the kernels' index math, bounds, synchronisation and
//! numerics; it cannot catch driver misuse or races only real hardware shows (tests/
//! cuda_kernels.rs does that on a GPU).
//!
//! Each launch takes its grid, block and shared memory from the same pure function of
//! `rcx::backend::cuda::launch` as its launch wrapper in src/backend/cuda, and a kernel
//! whose wrapper raises its shared memory limit gets the same raised limit (the emulator
//! refuses more than 48 KiB otherwise, as a GPU does). Inputs are
//! random and non-zero, outputs poisoned with NaN before every launch, gradients start
//! random (so `+=` versus `=` shows), in f32 and bf16, at odd shapes. The reference is the
//! CPU op in f64 on the same (bf16-rounded) inputs; |emu - cpu| <= rtol (|cpu| + mean |cpu|)
//! with rtol 1e-5 in f32 (1e-4 for long f32 sums), 1e-2 in bf16.
//!
//! To add a kernel case: one `emu.run(file, &sym::<T>("kernel"), <launch>, (args...))`
//! with `emu_launch(launch::<the wrapper's shape function>(...))` (add the function to the
//! `launch` module if the wrapper computes its shape inline) and the arguments exactly as
//! the wrapper's `.arg(...)` list (int: i32, size_t: usize,
//! uint64_t: u64, float: f32, double: f64, buffers: `buf.ptr()`), then compare outputs.
//!
//! Without g++ (or $CXX) the tests print why and pass; RCX_REQUIRE_EMU=1 (set by .ci/run)
//! makes that a failure.

mod emu;

mod common;

use common::InputRng as Rng;
use emu::{Buf, Emu, Launch, cfg, emu_or_skip};
use half::bf16;
use rcx::backend::cpu::{self, AttentionDropout};
use rcx::backend::cuda::launch::{self, LaunchShape};
use rcx::loss::{LossSpec, PromptType, Utility};

const F32: f64 = 1e-5;
const F32_SUM: f64 = 1e-4;
const BF16: f64 = 1e-2;

/// A launch wrapper's shape (rcx::backend::cuda::launch) as the emulator's launch. The
/// shape functions refuse only sizes no case here uses.
fn emu_launch(shape: rcx::error::Result<LaunchShape>) -> Launch {
    Launch::from(shape.expect("a launch shape for the test's sizes"))
}

/// The op name the shape functions put in their errors.
const OP: &str = "kernel_emu";

// ---- Activation types, inputs and comparisons ------------------------------------------

/// The activation types of the kernels, `<kernel>_f32` and `<kernel>_bf16`.
trait Act: Copy + 'static {
    const SUFFIX: &'static str;
    /// Tolerance of outputs stored in this type.
    const RTOL: f64;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Act for f32 {
    const SUFFIX: &'static str = "f32";
    const RTOL: f64 = F32;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Act for bf16 {
    const SUFFIX: &'static str = "bf16";
    const RTOL: f64 = BF16;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

fn sym<T: Act>(kernel: &str) -> String {
    format!("{kernel}_{}", T::SUFFIX)
}

/// The larger of T's tolerance and `rtol` (a bf16 output is never better than bf16).
fn tol<T: Act>(rtol: f64) -> f64 {
    T::RTOL.max(rtol)
}

/// Values as T stores them (what both sides then see), in T.
fn act<T: Act>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// The f64 view of values of T.
fn wide<T: Act>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

fn poison<T: Act>(len: usize) -> Vec<T> {
    vec![T::from_f32(f32::NAN); len]
}

fn assert_close(what: &str, emu: &[f64], cpu: &[f64], rtol: f64) {
    assert_eq!(emu.len(), cpu.len(), "{what}: lengths differ");
    let mean_abs = cpu.iter().map(|x| x.abs()).sum::<f64>() / cpu.len().max(1) as f64;
    for (i, (&e, &c)) in emu.iter().zip(cpu).enumerate() {
        let tol = rtol * (c.abs() + mean_abs);
        assert!(
            (e - c).abs() <= tol,
            "{what}[{i}]: emulated {e} vs cpu {c} (tolerance {tol:e}, {} elements)",
            cpu.len()
        );
    }
}

/// Compares a buffer of T against the f64 reference.
fn check<T: Act>(what: &str, buf: &Buf<T>, cpu: &[f64], rtol: f64) {
    assert_close(
        &format!("{what} ({})", T::SUFFIX),
        &wide(&buf.read()),
        cpu,
        tol::<T>(rtol),
    );
}

#[test]
fn casts_match_half_bit_for_bit() {
    let Some(emu) = emu_or_skip("casts_match_half_bit_for_bit") else {
        return;
    };
    let values = rounding_cases(&mut Rng::new(15));
    // A length that leaves the last block part full.
    let len = values.len();
    assert_ne!(len % launch::ELEMENTWISE_THREADS, 0);
    let (inp_d, bf16_d) = (emu.upload(&values), emu.upload(&poison::<bf16>(len)));
    emu.run(
        "cast",
        "cast_f32_to_bf16",
        emu_launch(launch::elementwise(OP, len)),
        (bf16_d.ptr(), inp_d.ptr(), len),
    );
    // Round to nearest, ties to even: half's conversion, bit for bit.
    let rounded: Vec<u16> = values
        .iter()
        .map(|&x| bf16::from_f32(x).to_bits())
        .collect();
    let got: Vec<u16> = bf16_d.read().iter().map(|x| x.to_bits()).collect();
    assert_eq!(got, rounded, "cast_f32_to_bf16");

    let back_d = emu.upload(&poison::<f32>(len));
    emu.run(
        "cast",
        "cast_bf16_to_f32",
        emu_launch(launch::elementwise(OP, len)),
        (back_d.ptr(), bf16_d.ptr(), len),
    );
    let exact: Vec<u32> = rounded.iter().map(|&b| (b as u32) << 16).collect();
    let got: Vec<u32> = back_d.read().iter().map(|x| x.to_bits()).collect();
    assert_eq!(got, exact, "cast_bf16_to_f32");
}

/// Odd shapes (n, c) of the column reductions (launch::column_tiles: tiles of 32 columns,
/// 32 slices of rows): one row and one column, partial tiles and slices, several tiles,
/// many rows per slice.
const COLUMN_SHAPES: [(usize, usize); 4] = [(1, 1), (7, 45), (130, 33), (4099, 37)];

/// Odd shapes (b, t, nh, hs): padded sequences, the last sequence of a batch all padding,
/// a head size that is not a multiple of 32, a sequence longer than a block of threads.
const ATTENTION_SHAPES: [(usize, usize, usize, usize); 4] = [
    (2, 7, 3, 16),
    (3, 13, 5, 8),
    (1, 33, 2, 48),
    (2, 131, 1, 12),
];

/// Runs `case` for f32 and bf16 activations.
macro_rules! both_types {
    ($case:ident, $($arg:expr),*) => {
        $case::<f32>($($arg),*);
        $case::<bf16>($($arg),*);
    };
}

// ---- Kernel cases -------------------------------------------------------------------

/// Returns the backward kernels the two tables took (ops.rs chooses by the ids).
fn embedding_case<T: Act>(
    emu: &'static Emu,
    rng: &mut Rng,
    (b, t, c): (usize, usize, usize),
) -> [&'static str; 2] {
    let file = "embedding";
    let (vocab, max_pos, ntypes) = (23usize, t + 3, 2usize);
    // Few distinct ids, so rows repeat and the backward really sums.
    let ids = rng.below(b * t, vocab as u32);
    let types = rng.below(b * t, ntypes as u32);
    let (wte, wpe, wtt) = (
        rng.values(vocab * c, 1.0),
        rng.values(max_pos * c, 1.0),
        rng.values(ntypes * c, 1.0),
    );
    let (ids_d, types_d) = (emu.upload(&ids), emu.upload(&types));
    let (wte_d, wpe_d, wtt_d) = (emu.upload(&wte), emu.upload(&wpe), emu.upload(&wtt));
    let out = emu.upload(&poison::<T>(b * t * c));
    let bt = b * t;
    emu.run(
        file,
        &sym::<T>("embedding_forward"),
        emu_launch(launch::elementwise(OP, bt * c)),
        (
            out.ptr(),
            ids_d.ptr(),
            types_d.ptr(),
            wte_d.ptr(),
            wpe_d.ptr(),
            wtt_d.ptr(),
            bt as i32,
            t as i32,
            c as i32,
        ),
    );
    let mut expected = vec![0.0f64; bt * c];
    let w = |v: &[f32]| wide(v);
    cpu::embedding_forward(
        &mut expected,
        &ids,
        &types,
        &w(&wte),
        &w(&wpe),
        &w(&wtt),
        b,
        t,
        c,
    );
    check("embedding_forward", &out, &expected, F32);

    let dout: Vec<T> = act(&rng.values(bt * c, 1.0));
    let (dwte, dwpe, dwtt) = (
        rng.values(vocab * c, 1.0),
        rng.values(max_pos * c, 1.0),
        rng.values(ntypes * c, 1.0),
    );
    let (dwte_d, dwpe_d, dwtt_d) = (emu.upload(&dwte), emu.upload(&dwpe), emu.upload(&dwtt));
    let dout_d = emu.upload(&dout);
    let mut kernels = [""; 2];
    for (used, (table, ids)) in kernels.iter_mut().zip([(&dwte_d, &ids), (&dwtt_d, &types)]) {
        let lists = RowLists::new(ids);
        let (rows, starts, positions) = (
            emu.upload(&lists.rows),
            emu.upload(&lists.starts),
            emu.upload(&lists.positions),
        );
        let (kernel, shape) = launch::embedding_table(OP, bt, c, lists.rows.len()).unwrap();
        *used = kernel;
        emu.run(
            file,
            &sym::<T>(kernel),
            shape.into(),
            (
                table.ptr(),
                dout_d.ptr(),
                rows.ptr(),
                starts.ptr(),
                positions.ptr(),
                c as i32,
            ),
        );
    }
    emu.run(
        file,
        &sym::<T>("embedding_backward_positions"),
        emu_launch(launch::elementwise(OP, t * c)),
        (dwpe_d.ptr(), dout_d.ptr(), b as i32, t as i32, c as i32),
    );
    let (mut dwte64, mut dwpe64, mut dwtt64) = (w(&dwte), w(&dwpe), w(&dwtt));
    cpu::embedding_backward(
        &mut dwte64,
        &mut dwpe64,
        &mut dwtt64,
        &wide(&dout),
        &ids,
        &types,
        b,
        t,
        c,
    );
    for (name, buf, cpu) in [
        ("embedding_backward dwte", &dwte_d, &dwte64),
        ("embedding_backward dwpe", &dwpe_d, &dwpe64),
        ("embedding_backward dwtt", &dwtt_d, &dwtt64),
    ] {
        check(name, buf, cpu, F32_SUM);
    }
    kernels
}

/// ops.rs RowLists: for every distinct id, the positions that use it, ascending (CSR).
struct RowLists {
    rows: Vec<i32>,
    starts: Vec<i32>,
    positions: Vec<i32>,
}

impl RowLists {
    fn new(ids: &[u32]) -> RowLists {
        let mut positions: Vec<i32> = (0..ids.len() as i32).collect();
        positions.sort_by_key(|&p| ids[p as usize]);
        let (mut rows, mut starts) = (Vec::new(), Vec::new());
        for (k, &p) in positions.iter().enumerate() {
            let id = ids[p as usize] as i32;
            if rows.last() != Some(&id) {
                rows.push(id);
                starts.push(k as i32);
            }
        }
        starts.push(positions.len() as i32);
        RowLists {
            rows,
            starts,
            positions,
        }
    }
}

#[test]
fn embedding_matches_cpu() {
    let Some(emu) = emu_or_skip("embedding_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(1);
    let mut used = Vec::new();
    // 23 word ids and 2 types: few positions per row take the per-row kernel, many (b*t
    // >= 32 rows' worth) the tiled one; c below, above and not a multiple of 32.
    for shape in [
        (2, 7, 48),
        (3, 13, 40),
        (1, 33, 96),
        (3, 70, 45),
        (8, 100, 33),
    ] {
        used.extend(embedding_case::<f32>(emu, &mut rng, shape));
        used.extend(embedding_case::<bf16>(emu, &mut rng, shape));
    }
    for kernel in ["embedding_backward_rows", "embedding_backward_rows_tiled"] {
        let tables = used.iter().filter(|&&k| k == kernel).count();
        assert!(tables >= 4, "{kernel} ran for {tables} tables: {used:?}");
    }
}

fn layernorm_case<T: Act>(emu: &'static Emu, rng: &mut Rng, (n, c): (usize, usize)) {
    let file = "layernorm";
    let eps = 1e-12f64;
    let (a, b): (Vec<T>, Vec<T>) = (act(&rng.values(n * c, 2.0)), act(&rng.values(n * c, 2.0)));
    let (weight, bias) = (rng.values(c, 1.0), rng.values(c, 1.0));
    // The residual sum as T stores it: the kernel normalises the stored sum.
    let sum: Vec<T> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| T::from_f32(x.to_f32() + y.to_f32()))
        .collect();
    let (mut out, mut mean, mut rstd) = (vec![0.0f64; n * c], vec![0.0f64; n], vec![0.0f64; n]);
    cpu::layernorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &wide(&sum),
        &wide(&weight),
        &wide(&bias),
        n,
        c,
        eps,
    );
    let (w_d, b_d, sum_in) = (emu.upload(&weight), emu.upload(&bias), emu.upload(&sum));
    let (out_d, mean_d, rstd_d) = (
        emu.upload(&poison::<T>(n * c)),
        emu.upload(&poison::<f32>(n)),
        emu.upload(&poison::<f32>(n)),
    );
    emu.run(
        file,
        &sym::<T>("layernorm_forward"),
        emu_launch(launch::warp_rows(OP, n)),
        (
            out_d.ptr(),
            mean_d.ptr(),
            rstd_d.ptr(),
            sum_in.ptr(),
            w_d.ptr(),
            b_d.ptr(),
            n as i32,
            c as i32,
            eps as f32,
        ),
    );
    check("layernorm_forward out", &out_d, &out, F32);
    check("layernorm_forward mean", &mean_d, &mean, F32);
    check("layernorm_forward rstd", &rstd_d, &rstd, F32);

    let (out_d, sum_d, mean_d, rstd_d) = (
        emu.upload(&poison::<T>(n * c)),
        emu.upload(&poison::<T>(n * c)),
        emu.upload(&poison::<f32>(n)),
        emu.upload(&poison::<f32>(n)),
    );
    let (a_d, b_in) = (emu.upload(&a), emu.upload(&b));
    emu.run(
        file,
        &sym::<T>("residual_layernorm_forward"),
        emu_launch(launch::warp_rows(OP, n)),
        (
            out_d.ptr(),
            sum_d.ptr(),
            mean_d.ptr(),
            rstd_d.ptr(),
            a_d.ptr(),
            b_in.ptr(),
            w_d.ptr(),
            b_d.ptr(),
            n as i32,
            c as i32,
            eps as f32,
        ),
    );
    check("residual_layernorm_forward sum", &sum_d, &wide(&sum), F32);
    check("residual_layernorm_forward out", &out_d, &out, F32);
    check("residual_layernorm_forward rstd", &rstd_d, &rstd, F32);

    // The backward from the saved (fp32) statistics, the same on both sides.
    let mean32: Vec<f32> = mean.iter().map(|&x| x as f32).collect();
    let rstd32: Vec<f32> = rstd.iter().map(|&x| x as f32).collect();
    let dout: Vec<T> = act(&rng.values(n * c, 1.0));
    let dinp: Vec<T> = act(&rng.values(n * c, 1.0));
    let (dweight, dbias) = (rng.values(c, 1.0), rng.values(c, 1.0));
    let (dinp_d, dweight_d, dbias_d, dout_d) = (
        emu.upload(&dinp),
        emu.upload(&dweight),
        emu.upload(&dbias),
        emu.upload(&dout),
    );
    let (mean_d, rstd_d) = (emu.upload(&mean32), emu.upload(&rstd32));
    emu.run(
        file,
        &sym::<T>("layernorm_backward_input"),
        emu_launch(launch::warp_rows(OP, n)),
        (
            dinp_d.ptr(),
            dout_d.ptr(),
            sum_in.ptr(),
            w_d.ptr(),
            mean_d.ptr(),
            rstd_d.ptr(),
            n as i32,
            c as i32,
        ),
    );
    emu.run(
        file,
        &sym::<T>("layernorm_backward_params"),
        emu_launch(launch::column_tiles(OP, c)),
        (
            dweight_d.ptr(),
            dbias_d.ptr(),
            dout_d.ptr(),
            sum_in.ptr(),
            mean_d.ptr(),
            rstd_d.ptr(),
            n as i32,
            c as i32,
        ),
    );
    let (mut dinp64, mut dweight64, mut dbias64) = (wide(&dinp), wide(&dweight), wide(&dbias));
    cpu::layernorm_backward(
        &mut dinp64,
        &mut dweight64,
        &mut dbias64,
        &wide(&dout),
        &wide(&sum),
        &wide(&weight),
        &wide(&mean32),
        &wide(&rstd32),
        n,
        c,
    );
    check("layernorm_backward dinp", &dinp_d, &dinp64, F32_SUM);
    check(
        "layernorm_backward dweight",
        &dweight_d,
        &dweight64,
        F32_SUM,
    );
    check("layernorm_backward dbias", &dbias_d, &dbias64, F32_SUM);
}

#[test]
fn layernorm_matches_cpu() {
    let Some(emu) = emu_or_skip("layernorm_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(2);
    // n not a multiple of the 8 rows of a block; c below, at and above 32, and odd; the
    // column tiles (32 columns, 32 row slices) with a single row and column, partial tiles
    // and slices, and more rows than slices.
    for shape in COLUMN_SHAPES.into_iter().chain([(14, 48), (9, 200)]) {
        both_types!(layernorm_case, emu, &mut rng, shape);
    }
}

fn activation_case<T: Act>(emu: &'static Emu, rng: &mut Rng, (n, c): (usize, usize)) {
    let file = "activation";
    let inp: Vec<T> = act(&rng.values(n * c, 3.0));
    let bias = rng.values(c, 1.0);
    let (inp_d, bias_d) = (emu.upload(&inp), emu.upload(&bias));
    // The kernel adds the bias in fp32; the reference takes that same sum.
    let pre: Vec<f64> = inp
        .iter()
        .enumerate()
        .map(|(i, x)| (x.to_f32() + bias[i % c]) as f64)
        .collect();
    let mut expected = vec![0.0f64; n * c];
    cpu::gelu_forward(&mut expected, &pre);
    let out_d = emu.upload(&poison::<T>(n * c));
    emu.run(
        file,
        &sym::<T>("bias_gelu_forward"),
        emu_launch(launch::elementwise(OP, n * c)),
        (out_d.ptr(), inp_d.ptr(), bias_d.ptr(), n as i32, c as i32),
    );
    check("bias_gelu_forward", &out_d, &expected, F32);

    let dout: Vec<T> = act(&rng.values(n * c, 1.0));
    let dinp: Vec<T> = act(&rng.values(n * c, 1.0));
    let dbias = rng.values(c, 1.0);
    let (dinp_d, dbias_d, dout_d) = (emu.upload(&dinp), emu.upload(&dbias), emu.upload(&dout));
    emu.run(
        file,
        &sym::<T>("bias_gelu_backward"),
        emu_launch(launch::column_tiles(OP, c)),
        (
            dinp_d.ptr(),
            dbias_d.ptr(),
            dout_d.ptr(),
            inp_d.ptr(),
            bias_d.ptr(),
            n as i32,
            c as i32,
        ),
    );
    let mut dpre = vec![0.0f64; n * c];
    cpu::gelu_backward(&mut dpre, &pre, &wide(&dout));
    let (mut dinp64, mut dbias64) = (wide(&dinp), wide(&dbias));
    for (i, g) in dpre.iter().enumerate() {
        dinp64[i] += g;
        dbias64[i % c] += g;
    }
    check("bias_gelu_backward dinp", &dinp_d, &dinp64, F32);
    check("bias_gelu_backward dbias", &dbias_d, &dbias64, F32_SUM);

    let len = n * c;
    let mut expected = vec![0.0f64; len];
    cpu::tanh_forward(&mut expected, &wide(&inp));
    let out_d = emu.upload(&poison::<T>(len));
    emu.run(
        file,
        &sym::<T>("tanh_forward"),
        emu_launch(launch::elementwise(OP, len)),
        (out_d.ptr(), inp_d.ptr(), len),
    );
    check("tanh_forward", &out_d, &expected, F32);
    let out: Vec<T> = out_d.read();
    let dinp_d = emu.upload(&dinp);
    emu.run(
        file,
        &sym::<T>("tanh_backward"),
        emu_launch(launch::elementwise(OP, len)),
        (dinp_d.ptr(), out_d.ptr(), dout_d.ptr(), len),
    );
    let mut dinp64 = wide(&dinp);
    cpu::tanh_backward(&mut dinp64, &wide(&out), &wide(&dout));
    check("tanh_backward", &dinp_d, &dinp64, F32);

    let other: Vec<T> = act(&rng.values(len, 1.0));
    cpu::residual_forward(&mut expected, &wide(&inp), &wide(&other));
    let (out_d, other_d) = (emu.upload(&poison::<T>(len)), emu.upload(&other));
    emu.run(
        file,
        &sym::<T>("residual_forward"),
        emu_launch(launch::elementwise(OP, len)),
        (out_d.ptr(), inp_d.ptr(), other_d.ptr(), len),
    );
    check("residual_forward", &out_d, &expected, F32);
}

#[test]
fn activations_match_cpu() {
    let Some(emu) = emu_or_skip("activations_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(3);
    for shape in COLUMN_SHAPES.into_iter().chain([(13, 96), (70, 300)]) {
        both_types!(activation_case, emu, &mut rng, shape);
    }
}

fn bias_case<T: Act>(emu: &'static Emu, rng: &mut Rng, (n, oc): (usize, usize)) {
    let file = "matmul";
    let bias = rng.values(oc, 1.0);
    let (out_d, bias_d) = (emu.upload(&poison::<T>(n * oc)), emu.upload(&bias));
    emu.run(
        file,
        &sym::<T>("bias_broadcast_forward"),
        emu_launch(launch::elementwise(OP, n * oc)),
        (out_d.ptr(), bias_d.ptr(), n as i32, oc as i32),
    );
    let expected: Vec<f64> = (0..n * oc).map(|i| bias[i % oc] as f64).collect();
    check("bias_broadcast_forward", &out_d, &expected, F32);

    let dout: Vec<T> = act(&rng.values(n * oc, 1.0));
    let dbias = rng.values(oc, 1.0);
    let (dbias_d, dout_d) = (emu.upload(&dbias), emu.upload(&dout));
    emu.run(
        file,
        &sym::<T>("bias_backward"),
        emu_launch(launch::column_tiles(OP, oc)),
        (dbias_d.ptr(), dout_d.ptr(), n as i32, oc as i32),
    );
    let mut expected = wide(&dbias);
    for (i, d) in wide(&dout).iter().enumerate() {
        expected[i % oc] += d;
    }
    assert_close(
        &format!("bias_backward ({})", T::SUFFIX),
        &wide(&dbias_d.read()),
        &expected,
        F32_SUM,
    );
}

#[test]
fn bias_kernels_match_cpu() {
    let Some(emu) = emu_or_skip("bias_kernels_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(4);
    for shape in COLUMN_SHAPES.into_iter().chain([(17, 96), (70, 301)]) {
        both_types!(bias_case, emu, &mut rng, shape);
    }
}

fn dropout_case<T: Act>(emu: &'static Emu, rng: &mut Rng, (len, p, seed): (usize, f64, u64)) {
    let file = "dropout";
    // The wrapper's scale: 1 / (1 - p) rounded to fp32.
    let scale = (1.0 / (1.0 - p)) as f32;
    let inp: Vec<T> = act(&rng.values(len, 1.0));
    let (inp_d, out_d) = (emu.upload(&inp), emu.upload(&poison::<T>(len)));
    emu.run(
        file,
        &sym::<T>("dropout_forward"),
        emu_launch(launch::elementwise(OP, len)),
        (out_d.ptr(), inp_d.ptr(), len, p, scale, seed),
    );
    // Bit for bit: the CPU's f32 dropout on the same values, stored as T.
    let mut expected = vec![0.0f32; len];
    cpu::dropout_forward(&mut expected, &wide32(&inp), p, seed);
    let expected: Vec<f32> = expected.iter().map(|&x| T::from_f32(x).to_f32()).collect();
    assert_eq!(
        wide32(&out_d.read()),
        expected,
        "dropout_forward ({}) len {len} p {p} seed {seed}",
        T::SUFFIX
    );

    let dout: Vec<T> = act(&rng.values(len, 1.0));
    let dinp: Vec<T> = act(&rng.values(len, 1.0));
    let (dinp_d, dout_d) = (emu.upload(&dinp), emu.upload(&dout));
    emu.run(
        file,
        &sym::<T>("dropout_backward"),
        emu_launch(launch::elementwise(OP, len)),
        (dinp_d.ptr(), dout_d.ptr(), len, p, scale, seed),
    );
    let mut expected = wide32(&dinp);
    cpu::dropout_backward(&mut expected, &wide32(&dout), p, seed);
    let expected: Vec<f32> = expected.iter().map(|&x| T::from_f32(x).to_f32()).collect();
    assert_eq!(
        wide32(&dinp_d.read()),
        expected,
        "dropout_backward ({}) len {len} p {p} seed {seed}",
        T::SUFFIX
    );
}

fn wide32<T: Act>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

#[test]
fn dropout_matches_cpu_bit_for_bit() {
    let Some(emu) = emu_or_skip("dropout_matches_cpu_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(5);
    for case in [
        (1usize, 0.5, 0u64),
        (1000, 0.1, 42),
        (4097, 0.3, u64::MAX),
        (777, 0.0, 7),
        (64, 1.0, 9),
    ] {
        let (len, p, seed) = case;
        let keep_d = emu.upload(&vec![2u8; len]);
        emu.run(
            "dropout",
            "dropout_mask",
            emu_launch(launch::elementwise(OP, len)),
            (keep_d.ptr(), len, p, seed),
        );
        let keep: Vec<u8> = (0..len as u64)
            .map(|i| cpu::dropout_keep(seed, i, p) as u8)
            .collect();
        assert_eq!(
            keep_d.read(),
            keep,
            "dropout_mask len {len} p {p} seed {seed}"
        );
        both_types!(dropout_case, emu, &mut rng, case);
    }
}

/// One attention problem (b, t, nh, hs) on the host: q, k, v, dout [b, t, nh*hs], mask
/// [b, t] (padded sequences, the last one of a batch all padding), and the gradients' start
/// values dq, dk, dv (random: `+=` versus `=` shows).
struct AttentionProblem<T> {
    dims: (usize, usize, usize, usize),
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    mask: Vec<u8>,
    dout: Vec<T>,
    grads: [Vec<T>; 3],
}

impl<T: Act> AttentionProblem<T> {
    fn new(rng: &mut Rng, (b, t, nh, hs): (usize, usize, usize, usize)) -> AttentionProblem<T> {
        let len = b * t * nh * hs;
        let mut values = || act::<T>(&rng.values(len, 1.0));
        let (q, k, v, dout) = (values(), values(), values(), values());
        let grads = [values(), values(), values()];
        AttentionProblem {
            dims: (b, t, nh, hs),
            q,
            k,
            v,
            mask: rng.padding_mask(b, t),
            dout,
            grads,
        }
    }

    /// The CPU reference in f64 on the same (T-rounded) inputs: out, probs [b, nh, t, t].
    fn cpu_forward(&self, dropout: Option<AttentionDropout>) -> (Vec<f64>, Vec<f64>) {
        let (b, t, nh, hs) = self.dims;
        let (mut out, mut probs) = (vec![0.0f64; b * t * nh * hs], vec![0.0f64; b * nh * t * t]);
        cpu::attention_forward(
            &mut out,
            &mut probs,
            &wide(&self.q),
            &wide(&self.k),
            &wide(&self.v),
            &self.mask,
            b,
            t,
            nh,
            hs,
            dropout,
        );
        (out, probs)
    }

    /// dq, dk, dv of the CPU from the start values and the given probabilities.
    fn cpu_backward(&self, probs: &[f64], dropout: Option<AttentionDropout>) -> [Vec<f64>; 3] {
        let (b, t, nh, hs) = self.dims;
        let [mut dq, mut dk, mut dv] = self.grads.each_ref().map(|g| wide(g));
        cpu::attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &wide(&self.dout),
            &wide(&self.q),
            &wide(&self.k),
            &wide(&self.v),
            probs,
            &self.mask,
            b,
            t,
            nh,
            hs,
            dropout,
        );
        [dq, dk, dv]
    }

    /// lse [b, nh, t] = log Σ_j exp(s_ij) over the allowed keys, in f64.
    fn cpu_lse(&self) -> Vec<f64> {
        let (b, t, nh, hs) = self.dims;
        let (q, k) = (wide(&self.q), wide(&self.k));
        let scale = 1.0 / (hs as f64).sqrt();
        let mut lse = Vec::with_capacity(b * nh * t);
        for bi in 0..b {
            let mask = &self.mask[bi * t..(bi + 1) * t];
            let any_real = mask.contains(&1);
            for h in 0..nh {
                let head = |x: &[f64], row: usize| {
                    let at = (bi * t + row) * nh * hs + h * hs;
                    x[at..at + hs].to_vec()
                };
                for i in 0..t {
                    let q_i = head(&q, i);
                    let scores: Vec<f64> = (0..t)
                        .filter(|&j| !any_real || mask[j] != 0)
                        .map(|j| {
                            scale * q_i.iter().zip(head(&k, j)).map(|(a, b)| a * b).sum::<f64>()
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

/// An attention problem on the emulator's device, with the scalars the wrappers pass: scale
/// and drop_scale rounded to fp32, p = 0 (no hashing) without dropout.
struct AttentionDevice<T> {
    dims: (usize, usize, usize, usize),
    q: Buf<T>,
    k: Buf<T>,
    v: Buf<T>,
    mask: Buf<u8>,
    dout: Buf<T>,
    args: (i32, i32, i32, i32, f32, f64, f32, u64),
}

impl<T: Act> AttentionDevice<T> {
    fn new(
        emu: &'static Emu,
        problem: &AttentionProblem<T>,
        dropout: Option<AttentionDropout>,
    ) -> AttentionDevice<T> {
        let (b, t, nh, hs) = problem.dims;
        let (drop_p, drop_scale, seed) = match dropout {
            Some(d) => (d.p, (1.0 / (1.0 - d.p)) as f32, d.seed),
            None => (0.0, 1.0f32, 0u64),
        };
        let scale = (1.0 / (hs as f64).sqrt()) as f32;
        AttentionDevice {
            dims: problem.dims,
            q: emu.upload(&problem.q),
            k: emu.upload(&problem.k),
            v: emu.upload(&problem.v),
            mask: emu.upload(&problem.mask),
            dout: emu.upload(&problem.dout),
            args: (
                b as i32, t as i32, nh as i32, hs as i32, scale, drop_p, drop_scale, seed,
            ),
        }
    }

    /// Version 1's attention_forward: out, probs written.
    fn v1_forward(&self, emu: &Emu, out: &Buf<T>, probs: &Buf<f32>) {
        let (b, t, nh, _) = self.dims;
        let (b_i, t_i, nh_i, hs_i, scale, drop_p, drop_scale, seed) = self.args;
        emu.run(
            "attention",
            &sym::<T>("attention_forward"),
            emu_launch(launch::attention_rows(OP, b, t, nh)),
            (
                out.ptr(),
                probs.ptr(),
                self.q.ptr(),
                self.k.ptr(),
                self.v.ptr(),
                self.mask.ptr(),
                b_i,
                t_i,
                nh_i,
                hs_i,
                scale,
                drop_p,
                drop_scale,
                seed,
            ),
        );
    }

    /// Version 1's attention_backward (query kernel, then key kernel): dq, dk, dv added to.
    fn v1_backward(&self, emu: &'static Emu, [dq, dk, dv]: &[Buf<T>; 3], probs: &Buf<f32>) {
        let (b, t, nh, hs) = self.dims;
        let (b_i, t_i, nh_i, hs_i, scale, drop_p, drop_scale, seed) = self.args;
        let dscores = emu.upload(&poison::<f32>(b * nh * t * t));
        emu.run(
            "attention",
            &sym::<T>("attention_backward_query"),
            emu_launch(launch::attention_rows(OP, b, t, nh)),
            (
                dq.ptr(),
                dscores.ptr(),
                self.dout.ptr(),
                self.k.ptr(),
                self.v.ptr(),
                probs.ptr(),
                b_i,
                t_i,
                nh_i,
                hs_i,
                scale,
                drop_p,
                drop_scale,
                seed,
            ),
        );
        emu.run(
            "attention",
            &sym::<T>("attention_backward_key"),
            emu_launch(launch::attention_key_rows(OP, b, t, nh, hs)),
            (
                dk.ptr(),
                dv.ptr(),
                self.dout.ptr(),
                self.q.ptr(),
                probs.ptr(),
                dscores.ptr(),
                b_i,
                t_i,
                nh_i,
                hs_i,
                scale,
                drop_p,
                drop_scale,
                seed,
            ),
        );
    }

    /// Version 2's flash_attention_forward: out, lse written.
    fn flash_forward(&self, emu: &Emu, out: &Buf<T>, lse: &Buf<f32>) {
        let (b, t, nh, hs) = self.dims;
        let (b_i, t_i, nh_i, hs_i, scale, drop_p, drop_scale, seed) = self.args;
        let shape = launch::flash_forward(OP, b, t, nh, hs).unwrap();
        emu.run(
            "attention",
            &sym::<T>("flash_attention_forward"),
            Launch::allowing_shared(shape),
            (
                out.ptr(),
                lse.ptr(),
                self.q.ptr(),
                self.k.ptr(),
                self.v.ptr(),
                self.mask.ptr(),
                b_i,
                t_i,
                nh_i,
                hs_i,
                scale,
                drop_p,
                drop_scale,
                seed,
            ),
        );
    }

    /// Version 2's flash_attention_backward, its three launches in the wrapper's order (row
    /// dots, dK/dV, dQ): dq, dk, dv added to, from the forward's out and lse.
    fn flash_backward(
        &self,
        emu: &'static Emu,
        [dq, dk, dv]: &[Buf<T>; 3],
        out: &Buf<T>,
        lse: &Buf<f32>,
    ) {
        let (b, t, nh, hs) = self.dims;
        let (b_i, t_i, nh_i, hs_i, scale, drop_p, drop_scale, seed) = self.args;
        let row_dot = emu.upload(&poison::<f32>(b * nh * t));
        emu.run(
            "attention",
            &sym::<T>("flash_attention_backward_dot"),
            emu_launch(launch::warp_rows(OP, b * nh * t)),
            (
                row_dot.ptr(),
                self.dout.ptr(),
                out.ptr(),
                b_i,
                t_i,
                nh_i,
                hs_i,
            ),
        );
        let tiles = Launch::allowing_shared(launch::flash_backward(OP, b, t, nh, hs).unwrap());
        emu.run(
            "attention",
            &sym::<T>("flash_attention_backward_key"),
            tiles,
            (
                dk.ptr(),
                dv.ptr(),
                self.dout.ptr(),
                self.q.ptr(),
                self.k.ptr(),
                self.v.ptr(),
                lse.ptr(),
                row_dot.ptr(),
                self.mask.ptr(),
                b_i,
                t_i,
                nh_i,
                hs_i,
                scale,
                drop_p,
                drop_scale,
                seed,
            ),
        );
        emu.run(
            "attention",
            &sym::<T>("flash_attention_backward_query"),
            tiles,
            (
                dq.ptr(),
                self.dout.ptr(),
                self.q.ptr(),
                self.k.ptr(),
                self.v.ptr(),
                lse.ptr(),
                row_dot.ptr(),
                self.mask.ptr(),
                b_i,
                t_i,
                nh_i,
                hs_i,
                scale,
                drop_p,
                drop_scale,
                seed,
            ),
        );
    }
}

fn upload_grads<T: Act>(emu: &'static Emu, grads: &[Vec<T>; 3]) -> [Buf<T>; 3] {
    grads.each_ref().map(|g| emu.upload(g))
}

fn check_grads<T: Act>(what: &str, emu: &[Buf<T>; 3], cpu: &[Vec<f64>; 3], rtol: f64) {
    for (name, (buf, cpu)) in ["dq", "dk", "dv"].iter().zip(emu.iter().zip(cpu)) {
        check(&format!("{what} backward {name}"), buf, cpu, rtol);
    }
}

/// Version 1 against the CPU; its backward from the CPU's (fp32) probabilities.
fn attention_case<T: Act>(
    emu: &'static Emu,
    rng: &mut Rng,
    dims: (usize, usize, usize, usize),
    dropout: Option<AttentionDropout>,
) {
    let (b, t, nh, hs) = dims;
    let problem = AttentionProblem::<T>::new(rng, dims);
    let device = AttentionDevice::new(emu, &problem, dropout);
    let (out, probs) = problem.cpu_forward(dropout);
    let out_d = emu.upload(&poison::<T>(b * t * nh * hs));
    let probs_d = emu.upload(&poison::<f32>(b * nh * t * t));
    device.v1_forward(emu, &out_d, &probs_d);
    let what = format!("attention {dims:?} dropout {dropout:?}");
    check(&format!("{what} forward out"), &out_d, &out, F32_SUM);
    check(&format!("{what} forward probs"), &probs_d, &probs, F32);

    // The backward from the same (fp32) probabilities on both sides.
    let probs32: Vec<f32> = probs.iter().map(|&x| x as f32).collect();
    let grads = upload_grads(emu, &problem.grads);
    device.v1_backward(emu, &grads, &emu.upload(&probs32));
    let expected = problem.cpu_backward(&wide(&probs32), dropout);
    check_grads(&what, &grads, &expected, F32_SUM);
}

#[test]
fn attention_matches_cpu() {
    let Some(emu) = emu_or_skip("attention_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(6);
    for shape in ATTENTION_SHAPES {
        both_types!(attention_case, emu, &mut rng, shape, None);
    }
}

#[test]
fn attention_with_dropout_matches_cpu() {
    let Some(emu) = emu_or_skip("attention_with_dropout_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(7);
    for (i, shape) in ATTENTION_SHAPES.into_iter().enumerate() {
        let dropout = Some(AttentionDropout {
            p: 0.1 + 0.1 * i as f64,
            seed: 1000 + i as u64,
        });
        both_types!(attention_case, emu, &mut rng, shape, dropout);
    }
}

/// Flash attention (version 2) shapes (b, t, nh, hs), covering every t of {1, 17, 33, 70}
/// (one key, partial tiles of 16 own and 32 streamed rows, several tiles) and every hs of
/// {12, 32, 64, 128} (under one dim per lane, one, two and four; 128 takes the backward
/// over 48 KiB of shared memory, so the wrapper raises the kernels' limit). Batches of 2
/// or 3 end with a sequence of padding only.
const FLASH_SHAPES: [(usize, usize, usize, usize); 6] = [
    (2, 1, 3, 32),
    (3, 17, 2, 12),
    (2, 33, 2, 64),
    (1, 70, 2, 32),
    (2, 17, 1, 128),
    (2, 70, 1, 128),
];

/// Version 2 (the model's) against the CPU: forward out and lse, then the backward from the
/// emulated forward's out and lse, as the device model runs it.
fn flash_case<T: Act>(
    emu: &'static Emu,
    rng: &mut Rng,
    dims: (usize, usize, usize, usize),
    dropout: Option<AttentionDropout>,
) {
    let (b, t, nh, hs) = dims;
    let problem = AttentionProblem::<T>::new(rng, dims);
    let device = AttentionDevice::new(emu, &problem, dropout);
    let (out, probs) = problem.cpu_forward(dropout);
    let out_d = emu.upload(&poison::<T>(b * t * nh * hs));
    let lse_d = emu.upload(&poison::<f32>(b * nh * t));
    device.flash_forward(emu, &out_d, &lse_d);
    let what = format!("flash attention {dims:?} dropout {dropout:?}");
    check(&format!("{what} forward out"), &out_d, &out, F32);
    check(
        &format!("{what} forward lse"),
        &lse_d,
        &problem.cpu_lse(),
        F32,
    );

    let grads = upload_grads(emu, &problem.grads);
    device.flash_backward(emu, &grads, &out_d, &lse_d);
    let expected = problem.cpu_backward(&probs, dropout);
    check_grads(&what, &grads, &expected, F32_SUM);
}

/// hs 128: the backward's tiles need more than the default 48 KiB of shared memory; the
/// launch fails unless the kernel's limit is raised, as the wrapper does.
#[test]
fn flash_attention_backward_needs_the_raised_shared_limit() {
    let Some(emu) = emu_or_skip("flash_attention_backward_needs_the_raised_shared_limit") else {
        return;
    };
    let (t, hs) = (17, 128);
    let problem = AttentionProblem::<f32>::new(&mut Rng::new(14), (1, t, 1, hs));
    let device = AttentionDevice::new(emu, &problem, None);
    let (out, lse) = (
        emu.upload(&poison::<f32>(t * hs)),
        emu.upload(&poison::<f32>(t)),
    );
    device.flash_forward(emu, &out, &lse);
    // Any row dots do: only the launch is in question.
    let (dq, dot) = (emu.upload(&problem.grads[0]), emu.upload(&[0f32; 17]));
    let shape = launch::flash_backward(OP, 1, t, 1, hs).unwrap();
    assert!(shape.shared_opt_in().is_some(), "{shape:?}");
    let (b_i, t_i, nh_i, hs_i, scale, drop_p, drop_scale, seed) = device.args;
    let args = (
        dq.ptr(),
        device.dout.ptr(),
        device.q.ptr(),
        device.k.ptr(),
        device.v.ptr(),
        lse.ptr(),
        dot.ptr(),
        device.mask.ptr(),
        b_i,
        t_i,
        nh_i,
        hs_i,
        scale,
        drop_p,
        drop_scale,
        seed,
    );
    let kernel = "flash_attention_backward_query_f32";
    let why = emu
        .launch("attention", kernel, shape.into(), args)
        .expect_err("49408 bytes of shared memory without opting in");
    assert!(why.contains("without opting in"), "{why}");
    emu.run("attention", kernel, Launch::allowing_shared(shape), args);
}

#[test]
fn flash_attention_matches_cpu() {
    let Some(emu) = emu_or_skip("flash_attention_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(12);
    for shape in FLASH_SHAPES {
        both_types!(flash_case, emu, &mut rng, shape, None);
    }
}

/// The dropout mask is the CPU's bit for bit, or out and the gradients miss by whole weights.
#[test]
fn flash_attention_with_dropout_matches_cpu() {
    let Some(emu) = emu_or_skip("flash_attention_with_dropout_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(16);
    for (i, shape) in FLASH_SHAPES.into_iter().enumerate() {
        let dropout = Some(AttentionDropout {
            p: 0.1 + 0.05 * i as f64,
            seed: 2000 + i as u64,
        });
        both_types!(flash_case, emu, &mut rng, shape, dropout);
    }
}

/// Both versions on the same inputs, each backward from its own forward: the same out and
/// gradients (to rounding), with and without dropout.
fn attention_versions_case<T: Act>(
    emu: &'static Emu,
    rng: &mut Rng,
    dims: (usize, usize, usize, usize),
    dropout: Option<AttentionDropout>,
) {
    let (b, t, nh, hs) = dims;
    let problem = AttentionProblem::<T>::new(rng, dims);
    let device = AttentionDevice::new(emu, &problem, dropout);
    let (v1_out, v2_out) = (
        emu.upload(&poison::<T>(b * t * nh * hs)),
        emu.upload(&poison::<T>(b * t * nh * hs)),
    );
    let probs = emu.upload(&poison::<f32>(b * nh * t * t));
    let lse = emu.upload(&poison::<f32>(b * nh * t));
    device.v1_forward(emu, &v1_out, &probs);
    device.flash_forward(emu, &v2_out, &lse);
    let what = format!("attention v1 vs v2 {dims:?} dropout {dropout:?}");
    check(&format!("{what} out"), &v2_out, &wide(&v1_out.read()), F32);
    let (v1_grads, v2_grads) = (
        upload_grads(emu, &problem.grads),
        upload_grads(emu, &problem.grads),
    );
    device.v1_backward(emu, &v1_grads, &probs);
    device.flash_backward(emu, &v2_grads, &v2_out, &lse);
    let v1: [Vec<f64>; 3] = v1_grads.each_ref().map(|g| wide(&g.read()));
    check_grads(&what, &v2_grads, &v1, F32_SUM);
}

#[test]
fn attention_versions_agree() {
    let Some(emu) = emu_or_skip("attention_versions_agree") else {
        return;
    };
    let mut rng = Rng::new(13);
    let dropout = Some(AttentionDropout { p: 0.2, seed: 77 });
    for dropout in [None, dropout] {
        both_types!(
            attention_versions_case,
            emu,
            &mut rng,
            (2, 40, 2, 24),
            dropout
        );
    }
}

fn pool_case<T: Act>(emu: &'static Emu, rng: &mut Rng, (b, t, c): (usize, usize, usize)) {
    let file = "pool";
    let inp: Vec<T> = act(&rng.values(b * t * c, 1.0));
    let (inp_d, out_d) = (emu.upload(&inp), emu.upload(&poison::<T>(b * c)));
    let dims = (b as i32, t as i32, c as i32);
    emu.run(
        file,
        &sym::<T>("cls_pool_forward"),
        emu_launch(launch::elementwise(OP, b * c)),
        (out_d.ptr(), inp_d.ptr(), dims.0, dims.1, dims.2),
    );
    let mut expected = vec![0.0f64; b * c];
    cpu::cls_pool_forward(&mut expected, &wide(&inp), b, t, c);
    check("cls_pool_forward", &out_d, &expected, F32);

    let dout: Vec<T> = act(&rng.values(b * c, 1.0));
    let dinp: Vec<T> = act(&rng.values(b * t * c, 1.0));
    let (dinp_d, dout_d) = (emu.upload(&dinp), emu.upload(&dout));
    emu.run(
        file,
        &sym::<T>("cls_pool_backward"),
        emu_launch(launch::elementwise(OP, b * c)),
        (dinp_d.ptr(), dout_d.ptr(), dims.0, dims.1, dims.2),
    );
    let mut expected = wide(&dinp);
    cpu::cls_pool_backward(&mut expected, &wide(&dout), b, t, c);
    check("cls_pool_backward", &dinp_d, &expected, F32);
}

#[test]
fn pool_matches_cpu() {
    let Some(emu) = emu_or_skip("pool_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(8);
    for shape in [(1, 1, 5), (3, 7, 48), (5, 3, 257)] {
        both_types!(pool_case, emu, &mut rng, shape);
    }
}

/// loss.rs utility_code: the kernel's UTILITY_* id and exponent.
fn utility_code(u: Utility) -> (i32, f64) {
    match u {
        Utility::X => (0, 0.0),
        Utility::X2 => (1, 0.0),
        Utility::Log => (2, 0.0),
        Utility::XInv => (3, 0.0),
        Utility::XInv2 => (4, 0.0),
        Utility::LogSigmoid => (5, 0.0),
        Utility::Power(g) => (6, g),
        Utility::NegPower(g) => (7, g),
    }
}

#[test]
fn ranking_loss_matches_cpu_for_every_utility() {
    let Some(emu) = emu_or_skip("ranking_loss_matches_cpu_for_every_utility") else {
        return;
    };
    let mut rng = Rng::new(9);
    // Prompts of 2..=70 completions: K above the block's 64 threads loops.
    let ks = [2usize, 5, 8, 3, 11, 70, 4];
    let types: Vec<Option<PromptType>> = (0..ks.len())
        .map(|p| {
            Some(if p % 2 == 0 {
                PromptType::Open
            } else {
                PromptType::Closed
            })
        })
        .collect();
    let total: usize = ks.iter().sum();
    let specs = [
        "x",
        "x2",
        "log",
        "x_inv",
        "x_inv2",
        "logsigmoid",
        "power:0.5",
        "power:3",
        "neg_power:1.5",
        "adaptive",
        "adaptive2",
        "open=logsigmoid,closed=power:2",
    ];
    for (s, name) in specs.iter().enumerate() {
        let spec = LossSpec::parse(name).unwrap();
        for eps in [1e-3, 0.1] {
            // Logits spread wide enough that some pairs are inverted (x < 0 branches).
            let logits = rng.values(total, 4.0);
            let logits64 = wide(&logits);
            let mut expected = vec![0.0f64; total];
            let loss = rcx::loss::ranking_loss_forward_backward(
                &logits64,
                &ks,
                &types,
                &spec,
                eps,
                &mut expected,
            )
            .unwrap();
            // loss.rs RankingBatch: offsets, per-prompt utility and exponent, pair count.
            let mut offsets = vec![0i32];
            let (mut utility, mut exponent) = (Vec::new(), Vec::new());
            for (&k, &ty) in ks.iter().zip(&types) {
                let (code, g) = utility_code(spec.utility_for(ty).unwrap());
                utility.push(code);
                exponent.push(g);
                offsets.push(offsets.last().unwrap() + k as i32);
            }
            let pairs = rcx::loss::pair_count(&ks);
            let scale = 1.0 / pairs as f64;
            let prompt_loss = emu.upload(&vec![f64::NAN; ks.len()]);
            let dlogits = emu.upload(&poison::<f32>(total));
            let (logits_d, offsets_d) = (emu.upload(&logits), emu.upload(&offsets));
            let (utility_d, exponent_d) = (emu.upload(&utility), emu.upload(&exponent));
            emu.run(
                "ranking_loss",
                "ranking_loss_forward_backward",
                emu_launch(launch::ranking_loss(OP, ks.len())),
                (
                    prompt_loss.ptr(),
                    dlogits.ptr(),
                    logits_d.ptr(),
                    offsets_d.ptr(),
                    utility_d.ptr(),
                    exponent_d.ptr(),
                    eps,
                    scale,
                ),
            );
            let what = format!("ranking loss `{name}` eps {eps} (spec {s})");
            let emu_loss = prompt_loss.read().iter().sum::<f64>() * scale;
            assert_close(&format!("{what} loss"), &[emu_loss], &[loss], 1e-12);
            assert_close(
                &format!("{what} dlogits"),
                &wide(&dlogits.read()),
                &expected,
                F32,
            );
        }
    }
}

#[test]
fn global_norm_and_adamw_match_cpu() {
    let Some(emu) = emu_or_skip("global_norm_and_adamw_match_cpu") else {
        return;
    };
    let mut rng = Rng::new(10);
    let file = "optimizer";
    // optim.rs global_norm_squared: NORM_BLOCKS partials per buffer, then one block sums
    // them. Buffers shorter and longer than one grid-stride sweep (256 · 512).
    let grads = [
        rng.values(1, 1.0),
        rng.values(1000, 1.0),
        rng.values(launch::NORM_BLOCKS * launch::NORM_THREADS + 77, 1.0),
    ];
    let partials = emu.upload(&vec![f64::NAN; grads.len() * launch::NORM_BLOCKS]);
    let grads_d: Vec<Buf<f32>> = grads.iter().map(|g| emu.upload(g)).collect();
    for (i, g) in grads_d.iter().enumerate() {
        // SAFETY: slot i of partials, NORM_BLOCKS elements inside the buffer.
        let slot = unsafe { partials.ptr().add(i * launch::NORM_BLOCKS) };
        emu.run(
            file,
            "global_norm_squared_partial",
            launch::norm_partial().into(),
            (slot, g.ptr(), grads[i].len()),
        );
    }
    let total = emu.upload(&[f64::NAN]);
    emu.run(
        file,
        "global_norm_squared_finish",
        launch::norm_finish().into(),
        (
            total.ptr(),
            partials.ptr(),
            (grads.len() * launch::NORM_BLOCKS) as i32,
        ),
    );
    let expected: f64 = grads.iter().map(|g| cpu::global_norm_squared(g)).sum();
    assert_close("global_norm_squared", &total.read(), &[expected], 1e-12);

    // AdamW: each element in f64 and rounded once, as the CPU: bit for bit.
    for (len, step, grad_scale) in [(1usize, 1u64, 1.0f64), (1000, 7, 0.37), (4099, 300, 1.0)] {
        let (lr, beta1, beta2, eps, weight_decay) = (1e-3, 0.9, 0.999, 1e-8, 0.01);
        let params = rng.values(len, 1.0);
        let grads = rng.values(len, 1.0);
        let m = rng.values(len, 0.1);
        let v: Vec<f32> = rng.values(len, 0.01).iter().map(|x| x.abs()).collect();
        let (mut p_cpu, mut m_cpu, mut v_cpu) = (params.clone(), m.clone(), v.clone());
        cpu::adamw_update(
            &mut p_cpu,
            &grads,
            &mut m_cpu,
            &mut v_cpu,
            step,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            grad_scale,
        );
        // optim.rs AdamWStep::kernel_args.
        let bias_correction1 = 1.0 - beta1.powf(step as f64);
        let bias_correction2_sqrt = (1.0 - beta2.powf(step as f64)).sqrt();
        let args = (
            beta1,
            beta2,
            eps,
            1.0 - lr * weight_decay,
            lr / bias_correction1,
            bias_correction2_sqrt,
            grad_scale,
        );
        for with_copy in [false, true] {
            let (p_d, g_d, m_d, v_d) = (
                emu.upload(&params),
                emu.upload(&grads),
                emu.upload(&m),
                emu.upload(&v),
            );
            let copy_d = emu.upload(&poison::<bf16>(len));
            if with_copy {
                emu.run(
                    file,
                    "adamw_update_bf16_copy",
                    emu_launch(launch::elementwise(OP, len)),
                    (
                        p_d.ptr(),
                        copy_d.ptr(),
                        g_d.ptr(),
                        m_d.ptr(),
                        v_d.ptr(),
                        len,
                        args.0,
                        args.1,
                        args.2,
                        args.3,
                        args.4,
                        args.5,
                        args.6,
                    ),
                );
                let expected: Vec<u16> =
                    p_cpu.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                let got: Vec<u16> = copy_d.read().iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, expected, "adamw_update_bf16_copy copy, len {len}");
            } else {
                emu.run(
                    file,
                    "adamw_update",
                    emu_launch(launch::elementwise(OP, len)),
                    (
                        p_d.ptr(),
                        g_d.ptr(),
                        m_d.ptr(),
                        v_d.ptr(),
                        len,
                        args.0,
                        args.1,
                        args.2,
                        args.3,
                        args.4,
                        args.5,
                        args.6,
                    ),
                );
            }
            let kernel = if with_copy {
                "adamw_update_bf16_copy"
            } else {
                "adamw_update"
            };
            assert_eq!(p_d.read(), p_cpu, "{kernel} params, len {len} step {step}");
            assert_eq!(m_d.read(), m_cpu, "{kernel} m, len {len}");
            assert_eq!(v_d.read(), v_cpu, "{kernel} v, len {len}");
        }
    }
}

// ---- The emulator itself (kernels/emu/selftest.cu) ------------------------------------

#[test]
fn emulator_indices_and_collectives_follow_cuda() {
    let Some(emu) = emu_or_skip("emulator_indices_and_collectives_follow_cuda") else {
        return;
    };
    let file = "selftest";
    let (grid, block) = ((3u32, 2u32, 2u32), (4u32, 3u32, 2u32));
    let threads = (grid.0 * grid.1 * grid.2 * block.0 * block.1 * block.2) as usize;
    let out = emu.upload(&vec![u32::MAX; threads * 12]);
    let launch = Launch {
        grid,
        block,
        shared_bytes: 0,
        shared_limit: None,
    };
    emu.run(file, "emu_indices", launch, (out.ptr(),));
    let got = out.read();
    let mut at = 0;
    for (bz, by, bx) in itertools(grid) {
        for (tz, ty, tx) in itertools(block) {
            let expected = [
                tx, ty, tz, bx, by, bz, block.0, block.1, block.2, grid.0, grid.1, grid.2,
            ];
            assert_eq!(got[at * 12..at * 12 + 12], expected, "thread {at}");
            at += 1;
        }
    }

    let threads = 96usize;
    let out = emu.upload(&vec![i32::MIN; threads * 9]);
    emu.run(file, "emu_collectives", cfg(1, threads, 0), (out.ptr(),));
    let got = out.read();
    for t in 0..threads {
        let (lane, base) = (t % 32, t - t % 32);
        let value = |l: usize| 100 * (base + l) as i32;
        let ballot = (0..32)
            .filter(|l| (base + l) % 3 == 0)
            .fold(0u32, |m, l| m | 1 << l);
        let expected = [
            value(lane ^ 5),
            value(if lane + 3 < 32 { lane + 3 } else { lane }),
            value(if lane >= 2 { lane - 2 } else { lane }),
            value(7),
            ballot as i32,
            1,
            0,
            32,
            (0..96).sum::<i32>(),
        ];
        assert_eq!(got[t * 9..t * 9 + 9], expected, "thread {t}");
    }

    let (blocks_n, threads) = (3usize, 40usize);
    let out = emu.upload(&vec![f32::NAN; blocks_n * threads]);
    emu.run(
        file,
        "emu_shared_exchange",
        cfg(blocks_n as u32, threads, threads * 4),
        (out.ptr(),),
    );
    let expected: Vec<f32> = (0..blocks_n * threads)
        .map(|i| {
            let (b, next) = (i / threads, (i % threads + 1) % threads);
            (b * 1000 + next) as f32 - next as f32
        })
        .collect();
    assert_eq!(out.read(), expected);
}

#[test]
fn emulator_exposes_a_missing_barrier() {
    let Some(emu) = emu_or_skip("emulator_exposes_a_missing_barrier") else {
        return;
    };
    let threads = 64usize;
    let out = emu.upload(&vec![0f32; 2 * threads]);
    emu.run(
        "selftest",
        "emu_missing_barrier",
        cfg(2, threads, threads * 4),
        (out.ptr(),),
    );
    let got = out.read();
    // Forward (block 0): threads read their successor's slot before it is written; backward
    // (block 1): the last thread reads slot 0 before thread 0 writes it.
    assert!(got[..threads - 1].iter().all(|x| x.is_nan()), "{got:?}");
    assert!(got[2 * threads - 1].is_nan(), "{got:?}");
}

/// (z, y, x) of a 3-D extent, x fastest.
fn itertools((x, y, z): (u32, u32, u32)) -> impl Iterator<Item = (u32, u32, u32)> {
    (0..z).flat_map(move |k| (0..y).flat_map(move |j| (0..x).map(move |i| (k, j, i))))
}

/// fp32 values whose rounding to bf16 is delicate, then random bit patterns (not NaN).
fn rounding_cases(rng: &mut Rng) -> Vec<f32> {
    let mut values = vec![
        0.0f32,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40, // subnormal
        // Ties: exactly half way between two bf16 values, even below and odd below.
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x7f7f_ffff), // rounds to infinity
    ];
    values.extend(
        (0..2000)
            .map(|_| f32::from_bits(rng.next_u64() as u32))
            .filter(|x| !x.is_nan()),
    );
    values
}

#[test]
fn emulator_bf16_conversions_are_cudas() {
    let Some(emu) = emu_or_skip("emulator_bf16_conversions_are_cudas") else {
        return;
    };
    let values = rounding_cases(&mut Rng::new(11));
    let n = values.len();
    let (in_d, bits_d, back_d) = (
        emu.upload(&values),
        emu.upload(&vec![0u16; n]),
        emu.upload(&vec![0f32; n]),
    );
    emu.run(
        "selftest",
        "emu_bf16",
        emu_launch(launch::elementwise(OP, n)),
        (bits_d.ptr(), back_d.ptr(), in_d.ptr(), n as i32),
    );
    // half rounds to nearest even like CUDA; outside NaN their bits agree.
    let expected: Vec<u16> = values
        .iter()
        .map(|&x| bf16::from_f32(x).to_bits())
        .collect();
    assert_eq!(bits_d.read(), expected);
    let back: Vec<u32> = back_d.read().iter().map(|x| x.to_bits()).collect();
    let expected: Vec<u32> = expected.iter().map(|&b| (b as u32) << 16).collect();
    assert_eq!(back, expected);
    // NaN stays NaN: CUDA's canonical 0x7fff.
    let nan_d = emu.upload(&[f32::NAN, f32::from_bits(0xffc0_0001)]);
    emu.run(
        "selftest",
        "emu_bf16",
        emu_launch(launch::elementwise(OP, 2)),
        (bits_d.ptr(), back_d.ptr(), nan_d.ptr(), 2i32),
    );
    assert_eq!(bits_d.read()[..2], [0x7fff, 0x7fff]);
}

/// The launch error of a kernel that misbehaves: the emulator reports it, never hangs.
fn launch_error<A: emu::KernelArgs>(emu: &Emu, kernel: &str, launch: Launch, args: A) -> String {
    match emu.launch("selftest", kernel, launch, args) {
        Ok(()) => panic!("{kernel}: the emulator should have reported an error"),
        Err(why) => why,
    }
}

fn assert_mentions(why: &str, words: &[&str]) {
    for word in words {
        assert!(why.contains(word), "`{why}` should mention `{word}`");
    }
}

#[test]
fn emulator_reports_what_a_gpu_would_hang_or_fault_on() {
    let Some(emu) = emu_or_skip("emulator_reports_what_a_gpu_would_hang_or_fault_on") else {
        return;
    };
    let why = launch_error(emu, "emu_exit_before_barrier", cfg(2, 64, 0), (5i32,));
    assert_mentions(
        &why,
        &[
            "block (0,0,0)",
            "deadlock",
            "63 of 64 threads wait at __syncthreads",
            "exited",
            "thread (5,0,0)",
        ],
    );

    let out = emu.upload(&vec![0i32; 64]);
    let why = launch_error(emu, "emu_divergent_barriers", cfg(1, 64, 0), (out.ptr(),));
    assert_mentions(&why, &["divergent __syncthreads", "emu_divergent_barriers"]);

    let out = emu.upload(&[0f32; 40]);
    let why = launch_error(emu, "emu_partial_warp", cfg(1, 40, 0), (out.ptr(),));
    assert_mentions(
        &why,
        &["__shfl_xor_sync", "0xffffffff", "warp 1 has only 8 lanes"],
    );

    let why = launch_error(emu, "emu_lane_exits", cfg(1, 64, 0), (out.ptr(),));
    assert_mentions(
        &why,
        &[
            "deadlock",
            "__shfl_xor_sync",
            "lanes 0 (exited) never arrive",
        ],
    );

    // One element past a buffer's end, and the element before its start.
    let buffer = emu.upload(&[0f32; 37]);
    let why = launch_error(emu, "emu_write_at", cfg(1, 32, 0), (buffer.ptr(), 37i32));
    assert_mentions(
        &why,
        &["illegal memory access past the end of a device buffer"],
    );
    let full_page = emu.upload(&vec![0f32; 1024]);
    let why = launch_error(emu, "emu_write_at", cfg(1, 32, 0), (full_page.ptr(), -1i32));
    assert_mentions(
        &why,
        &["illegal memory access before the start of a device buffer"],
    );
    // In bounds: the last element.
    emu.run(
        "selftest",
        "emu_write_at",
        cfg(1, 32, 0),
        (buffer.ptr(), 36i32),
    );
    assert_eq!(buffer.read()[36], 1.0);

    // Dynamic shared memory: past a size that is not a multiple of 16 (caught by the
    // padding's canary), and past one that is (the guard page).
    let why = launch_error(emu, "emu_shared_write_at", cfg(1, 32, 20), (5i32,));
    assert_mentions(
        &why,
        &["wrote byte 20 of dynamic shared memory, past the 20 bytes"],
    );
    let why = launch_error(emu, "emu_shared_write_at", cfg(1, 32, 32), (8i32,));
    assert_mentions(
        &why,
        &["past the end of the launch's dynamic shared memory"],
    );
    let why = launch_error(emu, "emu_shared_write_at", cfg(1, 32, 0), (0i32,));
    assert_mentions(&why, &["dynamic shared memory"]);
    emu.run("selftest", "emu_shared_write_at", cfg(1, 32, 20), (4i32,));

    let ints = emu.upload(&[0i32; 32]);
    let why = launch_error(emu, "emu_divide", cfg(1, 32, 0), (ints.ptr(), 0i32));
    assert_mentions(&why, &["integer division by zero"]);

    // Configurations a GPU refuses.
    for bad in [cfg(1, 2048, 0), cfg(0, 32, 0), cfg(1, 32, 64 * 1024)] {
        let why = launch_error(emu, "emu_divide", bad, (ints.ptr(), 1i32));
        assert_mentions(&why, &["invalid launch configuration"]);
    }

    // Over 48 KiB of dynamic shared memory only once the kernel's limit is raised (ops.rs
    // allow_shared), to at most 99 KiB; then up to the raised limit, and no further.
    let raised = |shared_bytes: usize, limit: usize| Launch {
        shared_limit: Some(limit),
        ..cfg(1, 32, shared_bytes)
    };
    let (big, max) = (64 * 1024, 99 * 1024);
    emu.run(
        "selftest",
        "emu_shared_write_at",
        raised(big, big),
        (16383i32,),
    );
    emu.run(
        "selftest",
        "emu_shared_write_at",
        raised(max, max),
        (25343i32,),
    );
    let why = launch_error(emu, "emu_shared_write_at", raised(big, big), (16384i32,));
    assert_mentions(
        &why,
        &["past the end of the launch's dynamic shared memory"],
    );
    let why = launch_error(emu, "emu_shared_write_at", raised(big + 4, big), (0i32,));
    assert_mentions(
        &why,
        &[
            "65540 bytes",
            "over the 65536 bytes the kernel's limit was raised to",
        ],
    );
    let why = launch_error(emu, "emu_shared_write_at", raised(1024, max + 1), (0i32,));
    assert_mentions(&why, &["over the 101376 bytes a kernel may opt in to"]);

    // After all of that, launches work again.
    emu.run("selftest", "emu_divide", cfg(1, 32, 0), (ints.ptr(), 7i32));
    assert_eq!(ints.read(), vec![142; 32]);
}
