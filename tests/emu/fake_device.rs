//! The emulated CUDA device: a fake libcuda.so, libcublas.so and libnccl.so
//! (kernels/emu/fake_cuda.cpp, fake_cublas.cpp, fake_nccl.cpp) over the kernel emulator, and
//! the test that reruns a GPU test binary against them, so that rcx's whole CUDA backend
//! (cudarc's calls, argument marshalling, cuBLAS parameters, the device trainer, the NCCL
//! communicator) runs where there is no GPU.
//!
//! The build lands in target/tmp/fake-cuda-<hash of every input>/: librcx_emu.so, one
//! library per kernels/*.cu with a trampoline per kernel (kernels/emu/trampoline.h; the
//! kernel names are read from the preprocessed source), kernels.list naming them, and the
//! three fake libraries (libnccl.so also as libnccl.so.2, NCCL's soname).

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;

use libloading::Library;

use crate::emu_build::{FLAGS, compiler, finish, fnv, kernel_sources, read, spawn};

/// Set in the rerun: the tests know they run on the emulator (and the rerun does not rerun).
pub const EMULATED: &str = "RCX_EMULATED_DEVICE";

/// Whether this process runs on the emulated device.
pub fn emulated() -> bool {
    std::env::var(EMULATED).is_ok_and(|v| v == "1")
}

/// Reruns this executable with `args` on the emulated device (a test binary: all tests but
/// `itself`, the caller, with `--skip itself`); asserts that it succeeds. Skips (printing
/// why) with a real GPU, which the plain run covers, or without a C++ compiler or kernels;
/// RCX_REQUIRE_EMU=1 turns the latter skip into a failure.
pub fn rerun_on_emulated_device(itself: &str, args: &[&str]) {
    if emulated() {
        return;
    }
    if rcx::backend::cuda::available().is_ok() {
        eprintln!("{itself}: skipped, a real GPU is present (the tests ran on it)");
        return;
    }
    let dir = match build_checked() {
        Ok(dir) => dir,
        Err(why) => {
            assert!(
                std::env::var("RCX_REQUIRE_EMU").map_or(true, |v| v != "1"),
                "{itself}: RCX_REQUIRE_EMU=1 but the emulated device is unavailable: {why}"
            );
            eprintln!("{itself}: skipped, no emulated device: {why}");
            return;
        }
    };
    check_fake_gemm(&dir);
    let library_path = library_path_with(&dir);
    let exe = std::env::current_exe().expect("the executable's path");
    let started = std::time::Instant::now();
    let out = Command::new(&exe)
        .args(args)
        .env("LD_LIBRARY_PATH", library_path)
        .env("RCX_REQUIRE_GPU", "1")
        .env(EMULATED, "1")
        .output()
        .expect("rerun the test binary");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{itself}: the tests failed on the emulated device ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    let summary = (stdout.lines())
        .rfind(|l| l.starts_with("test result"))
        .or_else(|| stdout.lines().last());
    eprintln!(
        "{itself}: on the emulated device in {:.1?}: {}",
        started.elapsed(),
        summary.unwrap_or("")
    );
}

/// The LD_LIBRARY_PATH under which a process runs on the emulated device (the fake
/// libraries' directory first), building them if needed; Err says why there are none (no
/// C++ compiler, rcx built without kernels). With it, also set RCX_EMULATED_DEVICE=1 and,
/// for several local ranks, RCX_EMU_DEVICES. (For the tests that start rank processes; the
/// other files including this one do not call it.)
#[allow(dead_code)]
pub fn library_path() -> Result<String, String> {
    build_checked().map(|dir| library_path_with(&dir))
}

fn library_path_with(dir: &Path) -> String {
    match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
        _ => dir.display().to_string(),
    }
}

type GemmEx = unsafe extern "C" fn(
    *mut c_void,
    i32,
    i32,
    i32,
    i32,
    i32,
    *const f32,
    *const c_void,
    i32,
    i32,
    *const c_void,
    i32,
    i32,
    *const f32,
    *mut c_void,
    i32,
    i32,
    i32,
    i32,
) -> i32;

/// The fake cublasGemmEx, the reference rcx's GEMM calls are checked against, on a product
/// worked by hand: A = [[1, 2, 3], [4, 5, 6]], B = [[7, 8], [9, 10], [11, 12]],
/// A B = [[58, 64], [139, 154]]; column-major, stored plain or transposed (op T), C with a
/// padding row (ldc 3), beta 0 over NaN (C is not read), beta 1.
fn check_fake_gemm(dir: &Path) {
    // cublasOperation_t, cudaDataType_t and cublasComputeType_t values.
    const N: i32 = 0;
    const T: i32 = 1;
    const R32F: i32 = 0;
    const R16BF: i32 = 14;
    const COMPUTE_32F: i32 = 68;
    // SAFETY: the fake libraries built above; the signatures of kernels/emu.
    unsafe {
        let runtime = Library::new(dir.join("librcx_emu.so")).expect("librcx_emu.so");
        let blas = Library::new(dir.join("libcublas.so")).expect("libcublas.so");
        let alloc = *runtime
            .get::<unsafe extern "C" fn(usize) -> *mut c_void>(b"rcx_emu_alloc")
            .unwrap();
        let gemm = *blas.get::<GemmEx>(b"cublasGemmEx").unwrap();
        let upload = |values: &[f32]| {
            let p = alloc(values.len() * 4) as *mut f32;
            std::ptr::copy_nonoverlapping(values.as_ptr(), p, values.len());
            p
        };
        let a = upload(&[1., 4., 2., 5., 3., 6.]); // 2 x 3, lda 2
        let a_t = upload(&[1., 2., 3., 4., 5., 6.]); // A^T, 3 x 2, lda 3
        let b = upload(&[7., 9., 11., 8., 10., 12.]); // 3 x 2, ldb 3
        let b_t = upload(&[7., 8., 9., 10., 11., 12.]); // B^T, 2 x 3, ldb 2
        let expected = [58., 139., -1., 64., 154., -1.]; // ldc 3, padding -1
        for (ta, pa, lda, tb, pb, ldb) in [
            (N, a, 2, N, b, 3),
            (T, a_t, 3, T, b_t, 2),
            (N, a, 2, T, b_t, 2),
        ] {
            for beta in [0f32, 1.] {
                let start = if beta == 0. { f32::NAN } else { 1. };
                let c = upload(&[start, start, -1., start, start, -1.]);
                let alpha = 2f32;
                let status = gemm(
                    std::ptr::null_mut(),
                    ta,
                    tb,
                    2,
                    2,
                    3,
                    &alpha,
                    pa.cast(),
                    R32F,
                    lda,
                    pb.cast(),
                    R32F,
                    ldb,
                    &beta,
                    c.cast(),
                    R32F,
                    3,
                    COMPUTE_32F,
                    0,
                );
                assert_eq!(status, 0, "fake cublasGemmEx op {ta}, {tb} failed");
                let got = std::slice::from_raw_parts(c, 6);
                let want: Vec<f32> = expected
                    .iter()
                    .map(|&x| {
                        if x < 0. {
                            -1.
                        } else {
                            2. * x + if beta == 0. { 0. } else { start }
                        }
                    })
                    .collect();
                assert_eq!(
                    got,
                    &want[..],
                    "fake cublasGemmEx op {ta}, {tb}, beta {beta}"
                );
            }
        }
        // bf16 operands and result: every value here is exact in bf16.
        let bf16 = |values: &[f32]| {
            let v: Vec<u16> = values
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect();
            let p = alloc(v.len() * 2) as *mut u16;
            std::ptr::copy_nonoverlapping(v.as_ptr(), p, v.len());
            p
        };
        let (a16, b16, c16) = (
            bf16(&[1., 4., 2., 5., 3., 6.]),
            bf16(&[7., 9., 11., 8., 10., 12.]),
            bf16(&[0.; 4]),
        );
        let (alpha, beta) = (1f32, 0f32);
        let status = gemm(
            std::ptr::null_mut(),
            N,
            N,
            2,
            2,
            3,
            &alpha,
            a16.cast(),
            R16BF,
            2,
            b16.cast(),
            R16BF,
            3,
            &beta,
            c16.cast(),
            R16BF,
            2,
            COMPUTE_32F,
            0,
        );
        assert_eq!(status, 0, "fake cublasGemmEx bf16 failed");
        let got: Vec<f32> = std::slice::from_raw_parts(c16, 4)
            .iter()
            .map(|&x| half::bf16::from_bits(x).to_f32())
            .collect();
        assert_eq!(got, [58., 139., 64., 154.], "fake cublasGemmEx bf16");
    }
}

fn build_checked() -> Result<PathBuf, String> {
    if !rcx::backend::cuda::KERNELS_BUILT {
        return Err(format!(
            "rcx was built without CUDA kernels, so there is no PTX to load ({})",
            rcx::backend::cuda::KERNELS_NOT_BUILT_REASON
        ));
    }
    build()
}

/// The directory of the fake libraries, built on first use and cached by content hash.
pub fn build() -> Result<PathBuf, String> {
    let (cxx, version) = compiler()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let emu = kernels.join("emu");
    let support = [
        "emu.h",
        "emu.cpp",
        "trampoline.h",
        "fake_cuda.cpp",
        "fake_cublas.cpp",
        "fake_nccl.cpp",
    ];
    let sources = kernel_sources(&kernels)?;

    let mut inputs = vec![version.into_bytes(), FLAGS.join(" ").into_bytes()];
    for file in support {
        inputs.push(read(&emu.join(file))?);
    }
    inputs.push(read(&kernels.join("common.cuh"))?);
    for source in &sources {
        inputs.push(source.file_name().unwrap().as_encoded_bytes().to_vec());
        inputs.push(read(source)?);
    }
    let parts: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = cache.join(format!("fake-cuda-{:016x}", fnv(&parts)));
    if dir.join("kernels.list").exists() {
        return Ok(dir);
    }

    // Built in a private directory, renamed into place whole.
    let staging = cache.join(format!(
        "fake-cuda-building-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let path = |p: &Path| p.display().to_string();
    let link_runtime = [
        format!("-L{}", staging.display()),
        "-l:librcx_emu.so".to_string(),
        "-Wl,-rpath,$ORIGIN".to_string(),
    ];

    let runtime_args = [
        "-U_FORTIFY_SOURCE".to_string(), // its longjmp check rejects leaving a fiber
        "-Wl,-soname,librcx_emu.so".to_string(),
        path(&emu.join("emu.cpp")),
    ];
    finish(spawn(&cxx, &runtime_args, staging.join("librcx_emu.so"))?)?;

    let mut jobs = Vec::new();
    let mut list = String::new();
    for source in &sources {
        let stem = source.file_stem().unwrap().to_string_lossy().into_owned();
        let names = kernel_names(&cxx, &kernels, source)?;
        let mut unit = format!(
            "#include \"{}\"\n#include \"{}\"\n",
            path(source),
            path(&emu.join("trampoline.h"))
        );
        for name in &names {
            unit.push_str(&format!("RCX_TRAMPOLINE({name})\n"));
        }
        let unit_path = staging.join(format!("{stem}.tramp.cu"));
        std::fs::write(&unit_path, unit).map_err(|e| format!("{}: {e}", unit_path.display()))?;
        let mut args = vec![
            "-fvisibility=hidden".to_string(),
            "-I".to_string(),
            path(&kernels),
            "-include".to_string(),
            path(&emu.join("emu.h")),
            "-x".to_string(),
            "c++".to_string(),
            path(&unit_path),
            "-x".to_string(),
            "none".to_string(),
        ];
        args.extend(link_runtime.iter().cloned());
        let library = format!("kernels-{stem}.so");
        jobs.push(spawn(&cxx, &args, staging.join(&library))?);
        list.push_str(&library);
        list.push('\n');
    }
    let fake = |source: &str, extra: &[&str]| {
        let mut args = vec!["-fvisibility=hidden".to_string(), path(&emu.join(source))];
        args.extend(link_runtime.iter().cloned());
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let cuda = spawn(
        &cxx,
        &fake("fake_cuda.cpp", &["-ldl"]),
        staging.join("libcuda.so"),
    )?;
    jobs.push(spawn(
        &cxx,
        &fake("fake_cublas.cpp", &["-ldl"]),
        staging.join("libcublas.so"),
    )?);
    // The fake NCCL asks the fake driver for the current device: linked after it.
    finish(cuda)?;
    jobs.push(spawn(
        &cxx,
        &fake(
            "fake_nccl.cpp",
            &["-l:libcuda.so", "-lrt", "-Wl,-soname,libnccl.so.2"],
        ),
        staging.join("libnccl.so"),
    )?);
    for job in jobs {
        finish(job)?;
    }
    // cudarc opens libnccl.so; NCCL's own soname is libnccl.so.2.
    let soname = staging.join("libnccl.so.2");
    std::fs::hard_link(staging.join("libnccl.so"), &soname)
        .map_err(|e| format!("{}: {e}", soname.display()))?;
    let list_path = staging.join("kernels.list");
    std::fs::write(&list_path, list).map_err(|e| format!("{}: {e}", list_path.display()))?;
    if std::fs::rename(&staging, &dir).is_err() {
        // Another process built it first.
        let _ = std::fs::remove_dir_all(&staging);
    }
    if dir.join("kernels.list").exists() {
        Ok(dir)
    } else {
        Err(format!("could not move the build into {}", dir.display()))
    }
}

/// The kernels (`extern "C" __global__ void NAME(...)`) of a kernel file, found in its
/// preprocessed text, where every kernel-defining macro is expanded.
fn kernel_names(cxx: &Path, kernels: &Path, source: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(cxx)
        .args(["-std=c++20", "-E", "-P", "-DRCX_EMULATE", "-I"])
        .arg(kernels)
        .arg("-include")
        .arg(kernels.join("emu/emu.h"))
        .args(["-x", "c++"])
        .arg(source)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cxx.display()))?;
    if !out.status.success() {
        panic!(
            "preprocessing {} failed:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // __global__ expands to the visibility attribute; the emulator's own `extern "C" {`
    // blocks declare no kernels.
    let global = "extern \"C\" __attribute__((visibility(\"default\"))) void ";
    let mut names: Vec<String> = text
        .match_indices(global)
        .map(|(at, _)| {
            text[at + global.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(format!("{} defines no kernel", source.display()));
    }
    Ok(names)
}
