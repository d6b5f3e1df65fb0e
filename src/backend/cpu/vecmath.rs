//! exp and erf over f32 slices as straight-line f64 arithmetic that the compiler
//! vectorises, for the hot elementwise loops (softmax, GELU). libm's scalar, branchy
//! expf/erff took about a sixth of a training step. Both are within a few 1e-9 of the
//! true function before the final rounding to f32, so they are as accurate as libm's f32
//! functions. Fused multiply-adds throughout: the AVX2 build and the portable one round
//! identically, so results do not depend on which runs.

use std::any::TypeId;
use std::sync::OnceLock;

use crate::float::Float;

/// `values` as f32 when F is f32 (the slice itself, retyped); None for any other F.
pub(crate) fn as_f32_mut<F: Float>(values: &mut [F]) -> Option<&mut [f32]> {
    (TypeId::of::<F>() == TypeId::of::<f32>()).then(|| {
        // SAFETY: F is f32 itself, so the cast changes nothing.
        unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<f32>(), values.len()) }
    })
}

/// `values` as f32 when F is f32; None for any other F.
pub(crate) fn as_f32<F: Float>(values: &[F]) -> Option<&[f32]> {
    (TypeId::of::<F>() == TypeId::of::<f32>()).then(|| {
        // SAFETY: F is f32 itself, so the cast changes nothing.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<f32>(), values.len()) }
    })
}

/// Runs `$body` (a loop over slices) compiled for AVX2 + FMA when the CPU has them, else
/// portably; both compute the same bits.
macro_rules! with_avx2 {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {{
        #[inline(always)]
        fn portable($($arg: $ty),*) $body
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $name($($arg: $ty),*) {
            portable($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { $name($($arg),*) };
        }
        portable($($arg),*)
    }};
}
pub(crate) use with_avx2;

/// As `with_avx2`, with an AVX-512 build tried first: for the f64 polynomial loops of exp
/// and erf, whose 8 f64 lanes per instruction (4 with AVX2) halve their time at serve's
/// shapes. FMAs are written out and nothing is reassociated, so all three builds compute
/// the same bits.
macro_rules! with_avx512_or_avx2 {
    ($name512:ident, $name:ident($($arg:ident: $ty:ty),*) $body:block) => {{
        #[inline(always)]
        fn portable($($arg: $ty),*) $body
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,fma")]
        fn $name512($($arg: $ty),*) {
            portable($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $name($($arg: $ty),*) {
            portable($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { $name512($($arg),*) };
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { $name($($arg),*) };
        }
        portable($($arg),*)
    }};
}

pub(crate) use with_avx512_or_avx2;

/// As `with_avx2`, for integer-heavy loops that need AVX-512's 64-bit multiply and
/// conversions (vpmullq, vcvtuqq2pd) to vectorise; integer results are exact, so both
/// builds compute the same bits.
macro_rules! with_avx512 {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {{
        #[inline(always)]
        fn portable($($arg: $ty),*) $body
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
        fn $name($($arg: $ty),*) {
            portable($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { $name($($arg),*) };
        }
        portable($($arg),*)
    }};
}
pub(crate) use with_avx512;

/// Below this exp is 0 in f32 (e^-104 is under the smallest subnormal); clamping there
/// keeps 2^k a normal f64.
const EXP_LOW: f64 = -120.0;

/// e^y for y <= 0 (larger y are not clamped and must not exceed ~700), in f64: write
/// y = k ln2 + r with |r| <= ln2/2, take e^r by its Taylor series to r^10 (error < 1e-11)
/// and build 2^k in the exponent bits. NaN stays NaN; -inf gives 0.
#[inline(always)]
fn exp_f64(y: f64) -> f64 {
    // Adding 1.5 · 2^52 rounds to an integer held in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let y = if y < EXP_LOW { EXP_LOW } else { y };
    let shifted = y.mul_add(std::f64::consts::LOG2_E, ROUND);
    let k = shifted - ROUND;
    let r = (-k).mul_add(std::f64::consts::LN_2, y);
    // Σ r^j / j!, j = 0..=10, by Horner.
    let mut p = INV_FACTORIALS[10];
    for &c in INV_FACTORIALS[..10].iter().rev() {
        p = p.mul_add(r, c);
    }
    // The low bits of `shifted` hold k (two's complement); k + 1023 is the exponent field.
    let exponent = (shifted.to_bits().wrapping_add(1023)) << 52;
    p * f64::from_bits(exponent)
}

/// 1 / j! for j = 0..=10.
const INV_FACTORIALS: [f64; 11] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362880.0,
    1.0 / 3628800.0,
];

/// values[i] = e^values[i] for values <= 0 (softmax after subtracting the row maximum,
/// -x²/2 in GELU's density); -inf gives exactly 0.
pub(crate) fn exp_nonpositive_f32(values: &mut [f32]) {
    with_avx512_or_avx2!(exp_avx512, exp_avx2(values: &mut [f32]) {
        for v in values.iter_mut() {
            *v = exp_f64(*v as f64) as f32;
        }
    })
}

/// Degree of the erf polynomial on [0, ERF_RANGE]; beyond ERF_RANGE erf is 1 in f32
/// (1 - erf(4) = 1.5e-8 is below half an ulp of 1).
const ERF_DEGREE: usize = 20;
const ERF_RANGE: f64 = 4.0;

/// The monomial coefficients, in t = 2|x|/ERF_RANGE - 1 on [-1, 1], of the Chebyshev
/// interpolant of erf at ERF_DEGREE + 1 Chebyshev nodes (computed once from libm's f64
/// erf; within 5e-9 of erf). They stay below 1 in magnitude, so Horner's rule is accurate.
fn erf_coefficients() -> &'static [f64; ERF_DEGREE + 1] {
    static COEFFICIENTS: OnceLock<[f64; ERF_DEGREE + 1]> = OnceLock::new();
    COEFFICIENTS.get_or_init(|| {
        const N: usize = ERF_DEGREE + 1;
        let node = |k: usize| std::f64::consts::PI * (k as f64 + 0.5) / N as f64;
        // Chebyshev series: erf = Σ_j cheb[j] T_j(t), cheb[0] halved.
        let mut cheb = [0.0f64; N];
        for (j, c) in cheb.iter_mut().enumerate() {
            let sum: f64 = (0..N)
                .map(|k| {
                    let t = node(k).cos();
                    libm::erf((t + 1.0) * ERF_RANGE / 2.0) * (j as f64 * node(k)).cos()
                })
                .sum();
            *c = 2.0 * sum / N as f64;
        }
        cheb[0] /= 2.0;
        // To monomials, with T_0 = 1, T_1 = t, T_{j+1} = 2t T_j - T_{j-1}.
        let mut monomial = [0.0f64; N];
        let mut t_prev = [0.0f64; N]; // T_{j-1}
        let mut t_j = [0.0f64; N]; // T_j
        t_j[0] = 1.0;
        for (j, &c) in cheb.iter().enumerate() {
            for (m, &p) in monomial.iter_mut().zip(&t_j) {
                *m += c * p;
            }
            let mut t_next = [0.0f64; N];
            for i in 0..N {
                let shifted = if i > 0 { t_j[i - 1] } else { 0.0 };
                t_next[i] = if j == 0 {
                    shifted
                } else {
                    2.0 * shifted - t_prev[i]
                };
            }
            t_prev = t_j;
            t_j = t_next;
        }
        monomial
    })
}

/// erf(x) from the polynomial of `erf_coefficients`, odd by construction. NaN gives ±1;
/// GELU multiplies by x, so NaN still propagates there.
#[inline(always)]
fn erf_poly(x: f64, coefficients: &[f64; ERF_DEGREE + 1]) -> f64 {
    let t = x.abs().min(ERF_RANGE).mul_add(2.0 / ERF_RANGE, -1.0);
    let mut acc = 0.0f64;
    for &c in coefficients.iter().rev() {
        acc = acc.mul_add(t, c);
    }
    acc.copysign(x)
}

/// out[i] = erf(inp[i] / √2), the erf of GELU (the scaling in f32, as F's own path does).
pub(crate) fn erf_scaled_f32(out: &mut [f32], inp: &[f32]) {
    let coefficients = erf_coefficients();
    with_avx512_or_avx2!(erf_avx512, erf_avx2(out: &mut [f32], inp: &[f32], coefficients: &[f64; ERF_DEGREE + 1]) {
        for (o, &x) in out.iter_mut().zip(inp) {
            *o = erf_poly((x * std::f32::consts::FRAC_1_SQRT_2) as f64, coefficients) as f32;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x from -12 to 12 in steps of 1e-4 (exact in f32), and the f32 edge values.
    fn grid() -> Vec<f32> {
        let mut xs: Vec<f32> = (-120_000..=120_000).map(|k| k as f32 * 1e-4).collect();
        xs.extend([f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, -0.0]);
        xs
    }

    /// The dispatched builds (AVX-512 or AVX2 where the CPU has them) give the bits of the
    /// scalar functions, element by element: which build runs changes no result.
    #[test]
    fn every_build_of_exp_and_erf_gives_the_scalar_bits() {
        let xs = grid();
        let coefficients = erf_coefficients();
        let mut erfs = vec![0f32; xs.len()];
        erf_scaled_f32(&mut erfs, &xs);
        let nonpositive: Vec<f32> = xs.iter().map(|x| -x.abs()).collect();
        let mut exps = nonpositive.clone();
        exp_nonpositive_f32(&mut exps);
        for (i, &x) in xs.iter().enumerate() {
            let erf = erf_poly((x * std::f32::consts::FRAC_1_SQRT_2) as f64, coefficients) as f32;
            assert_eq!(erfs[i].to_bits(), erf.to_bits(), "erf at {x}");
            let y = nonpositive[i];
            let exp = exp_f64(y as f64) as f32;
            assert_eq!(exps[i].to_bits(), exp.to_bits(), "exp at {y}");
        }
    }
}
