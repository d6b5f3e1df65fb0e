//! The CPU emulator of the CUDA execution model (kernels/emu) checked against CUDA's rules
//! (indices, warp collectives, bf16 conversions, and the divergent barriers, missing lanes,
//! out-of-bounds accesses and shared-memory overruns a GPU would hang or fault on), and the
//! kernel properties only an emulated run can show: casts bit for bit with half's
//! rounding, AdamW bit for bit with the CPU (a GPU may contract its f64 arithmetic into
//! FMAs; tests/cuda_kernels.rs checks it within 1e-5 there), and the shared-memory limit
//! the flash backward must raise. Every kernel against its CPU twin is in
//! tests/cuda_kernels.rs, which runs on the emulated device in CI and on a GPU when there
//! is one.
//!
//! Each launch takes its grid, block and shared memory from the same pure function of
//! `rcx::backend::cuda::launch` as its launch wrapper in src/backend/cuda, with the
//! arguments exactly as the wrapper's `.arg(...)` list (int: i32, size_t: usize, uint64_t:
//! u64, float: f32, double: f64, buffers: `buf.ptr()`).
//!
//! Without g++ (or $CXX) the tests print why and pass; RCX_REQUIRE_EMU=1 (set by .ci/run)
//! makes that a failure.

mod emu;

mod common;

use common::InputRng as Rng;
use emu::{Emu, Launch, cfg, emu_or_skip};
use half::bf16;
use rcx::backend::cpu;
use rcx::backend::cuda::launch::{self, LaunchShape};

/// A launch wrapper's shape (rcx::backend::cuda::launch) as the emulator's launch. The
/// shape functions refuse only sizes no case here uses.
fn emu_launch(shape: rcx::error::Result<LaunchShape>) -> Launch {
    Launch::from(shape.expect("a launch shape for the test's sizes"))
}

/// The op name the shape functions put in their errors.
const OP: &str = "kernel_emu";

// ---- Kernel properties only the emulator shows ------------------------------------------

#[test]
fn casts_match_half_bit_for_bit() {
    let Some(emu) = emu_or_skip("casts_match_half_bit_for_bit") else {
        return;
    };
    let values = rounding_cases(&mut Rng::new(15));
    // A length that leaves the last block part full.
    let len = values.len();
    assert_ne!(len % launch::ELEMENTWISE_THREADS, 0);
    let (inp_d, bf16_d) = (emu.upload(&values), emu.upload(&vec![bf16::NAN; len]));
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

    let back_d = emu.upload(&vec![f32::NAN; len]);
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

/// hs 128: the flash backward's tiles need more than the default 48 KiB of shared memory;
/// the launch fails unless the kernel's limit is raised, as the wrapper does.
#[test]
fn flash_attention_backward_needs_the_raised_shared_limit() {
    let Some(emu) = emu_or_skip("flash_attention_backward_needs_the_raised_shared_limit") else {
        return;
    };
    let (t, hs) = (17, 128);
    // Any inputs do: only the launch is in question. lse well above every score keeps the
    // recomputed probabilities finite.
    let mut rng = Rng::new(14);
    let mut values = |len: usize| emu.upload(&rng.values(len, 1.0));
    let (dq, dout, q, k, v) = (
        values(t * hs),
        values(t * hs),
        values(t * hs),
        values(t * hs),
        values(t * hs),
    );
    let (lse, dot, mask) = (
        emu.upload(&vec![20.0f32; t]),
        values(t),
        emu.upload(&vec![1u8; t]),
    );
    let shape = launch::flash_backward(OP, 1, t, 1, hs).unwrap();
    assert!(shape.shared_opt_in().is_some(), "{shape:?}");
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    let args = (
        dq.ptr(),
        dout.ptr(),
        q.ptr(),
        k.ptr(),
        v.ptr(),
        lse.ptr(),
        dot.ptr(),
        mask.ptr(),
        1i32,
        t as i32,
        1i32,
        hs as i32,
        scale,
        0.0f64,
        1.0f32,
        0u64,
    );
    let kernel = "flash_attention_backward_query_f32";
    let why = emu
        .launch("attention", kernel, shape.into(), args)
        .expect_err("49408 bytes of shared memory without opting in");
    assert!(why.contains("without opting in"), "{why}");
    emu.run("attention", kernel, Launch::allowing_shared(shape), args);
}

#[test]
fn adamw_matches_cpu_bit_for_bit() {
    let Some(emu) = emu_or_skip("adamw_matches_cpu_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(10);
    let file = "optimizer";
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
            let copy_d = emu.upload(&vec![bf16::NAN; len]);
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

    // Dynamic shared memory: past a size that is not a multiple of 128 (caught by the
    // padding's canary), and past one that is (the guard page).
    let why = launch_error(emu, "emu_shared_write_at", cfg(1, 32, 20), (5i32,));
    assert_mentions(
        &why,
        &["wrote byte 20 of dynamic shared memory, past the 20 bytes"],
    );
    let why = launch_error(emu, "emu_shared_write_at", cfg(1, 32, 128), (32i32,));
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

/// wmma (m16n16k16, bf16 in, fp32 accumulate) against the product computed here, with B
/// loaded as it is and as the col_major operand of its transpose; a tile read back without
/// a __syncwarp shows poison; a misaligned pointer and a partial warp are reported.
#[test]
fn emulator_wmma_follows_cuda() {
    let Some(emu) = emu_or_skip("emulator_wmma_follows_cuda") else {
        return;
    };
    let mut rng = Rng::new(21);
    let mut tile = || -> Vec<bf16> {
        rng.values(256, 1.0)
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect()
    };
    let (a, b) = (tile(), tile());
    let c = rng.values(256, 1.0);
    let (a_d, b_d, c_d) = (emu.upload(&a), emu.upload(&b), emu.upload(&c));
    for b_transposed in [0i32, 1] {
        let d = emu.upload(&[f32::NAN; 256]);
        emu.run(
            "selftest",
            "emu_wmma_product",
            cfg(1, 32, 0),
            (d.ptr(), a_d.ptr(), b_d.ptr(), c_d.ptr(), b_transposed),
        );
        let operand = |k: usize, n: usize| {
            let at = if b_transposed == 1 {
                n * 16 + k
            } else {
                k * 16 + n
            };
            b[at].to_f32() as f64
        };
        let expected: Vec<f64> = (0..256)
            .map(|e| {
                let (r, n) = (e / 16, e % 16);
                c[e] as f64
                    + (0..16)
                        .map(|k| a[r * 16 + k].to_f32() as f64 * operand(k, n))
                        .sum::<f64>()
            })
            .collect();
        // Products of bf16 values are exact in fp32; only the fp32 sums round.
        for (e, (&got, &want)) in d.read().iter().zip(&expected).enumerate() {
            assert!(
                (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "wmma product (b transposed {b_transposed})[{e}]: {got} vs {want}"
            );
        }
    }

    let out = emu.upload(&[0f32; 64]);
    emu.run(
        "selftest",
        "emu_wmma_store_then_read",
        cfg(2, 32, 1024),
        (out.ptr(), 1i32),
    );
    assert_eq!(
        out.read(),
        vec![256.0; 64],
        "with the __syncwarp every lane reads the whole tile"
    );
    emu.run(
        "selftest",
        "emu_wmma_store_then_read",
        cfg(2, 32, 1024),
        (out.ptr(), 0i32),
    );
    let sums = out.read();
    assert!(
        sums.iter().any(|s| s.is_nan()) && sums.contains(&256.0),
        "without it, lanes that run first read other lanes' shares unwritten: {sums:?}"
    );

    let buffer = emu.upload(&[0f32; 264]);
    emu.run(
        "selftest",
        "emu_wmma_load_at",
        cfg(1, 32, 0),
        (buffer.ptr(), 8i32),
    );
    let why = launch_error(emu, "emu_wmma_load_at", cfg(1, 32, 0), (buffer.ptr(), 4i32));
    assert_mentions(&why, &["wmma::load_matrix_sync", "not 256-bit aligned"]);
    let d = emu.upload(&[f32::NAN; 256]);
    let why = launch_error(
        emu,
        "emu_wmma_product",
        cfg(1, 16, 0),
        (d.ptr(), a_d.ptr(), b_d.ptr(), c_d.ptr(), 0i32),
    );
    assert_mentions(&why, &["wmma::mma_sync", "warp 0 has only 16 lanes"]);
}
