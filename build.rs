//! Compiles the CUDA kernels (kernels/*.cu) ahead of time with nvcc, so the crate needs no
//! CUDA compiler at run time: PTX for compute_90 and compute_80 (JIT-compiled by the driver)
//! and an sm_90 cubin (H100/H200, loads without JIT). The images are embedded in the crate
//! through a generated file, `$OUT_DIR/cuda_kernels.rs`.
//!
//! nvcc is searched in order: $NVCC, $CUDA_HOME/bin/nvcc, `nvcc` on PATH, then the
//! project's `.cuda/nvidia/cu13/bin/nvcc` (scripts/install-cuda.sh). Without nvcc the crate
//! still builds, with `KERNELS_BUILT = false` and a warning. RCX_REQUIRE_CUDA=1 turns a
//! missing nvcc or a failing kernel into a build failure; RCX_NO_CUDA=1 skips the search
//! (to build and test the no-kernel path on a machine that has nvcc).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

/// One nvcc invocation: a kernel file to one output format.
struct Job {
    stem: String,
    source: PathBuf,
    flags: &'static [&'static str],
    output: PathBuf,
}

/// The three images of every kernel file: (file suffix, nvcc flags).
const TARGETS: [(&str, &[&str]); 3] = [
    ("compute_90.ptx", &["-ptx", "-arch=compute_90"]),
    ("compute_80.ptx", &["-ptx", "-arch=compute_80"]),
    ("sm_90.cubin", &["-cubin", "-arch=sm_90"]),
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it"));
    let kernel_dir = manifest_dir.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "RCX_REQUIRE_CUDA", "RCX_NO_CUDA"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    emit_git_commit(&manifest_dir);
    let require = env::var("RCX_REQUIRE_CUDA").is_ok_and(|v| v == "1");

    let outcome = if env::var("RCX_NO_CUDA").is_ok_and(|v| v == "1") {
        Err("built with RCX_NO_CUDA=1".to_string())
    } else {
        match find_nvcc(&manifest_dir) {
            Some(nvcc) => {
                println!("cargo:rerun-if-changed={}", nvcc.display());
                compile_all(&nvcc, &kernel_dir, &out_dir)
            }
            None => Err(
                "no nvcc found ($NVCC, $CUDA_HOME/bin, PATH, .cuda/nvidia/cu13/bin); \
                 run scripts/install-cuda.sh"
                    .to_string(),
            ),
        }
    };

    let generated = match outcome {
        Ok(stems) => generated_source(true, &stems, ""),
        Err(reason) => {
            if require {
                eprintln!("RCX_REQUIRE_CUDA=1 but the CUDA kernels were not built: {reason}");
                std::process::exit(1);
            }
            let first_line = reason.lines().next().unwrap_or_default();
            println!(
                "cargo:warning=CUDA kernels not built ({first_line}); the CUDA backend is unavailable"
            );
            generated_source(false, &[], &reason)
        }
    };
    fs::write(out_dir.join("cuda_kernels.rs"), generated).expect("write cuda_kernels.rs");
}

/// Sets RCX_GIT_COMMIT (the provenance that rcx.json records) to HEAD's commit when the
/// crate is the top of a git checkout, and reruns when HEAD moves: HEAD itself (a branch
/// switch) and the branch's ref, loose or packed (a commit). In a worktree HEAD lives in
/// the worktree's git folder and the refs in the common one.
fn emit_git_commit(manifest_dir: &Path) {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(manifest_dir)
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        out.status.success().then(|| text.trim().to_string())
    };
    let Some(top) = git(&["rev-parse", "--show-toplevel"]) else {
        return;
    };
    // A crate vendored inside another project's checkout is not built from that commit.
    if fs::canonicalize(&top).ok() != fs::canonicalize(manifest_dir).ok() {
        return;
    }
    let (Some(commit), Some(git_dir), Some(common_dir)) = (
        git(&["rev-parse", "HEAD"]),
        git(&["rev-parse", "--absolute-git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ) else {
        return;
    };
    println!("cargo:rustc-env=RCX_GIT_COMMIT={commit}");
    let mut watched = vec![
        format!("{git_dir}/HEAD"),
        format!("{common_dir}/packed-refs"),
    ];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(format!("{common_dir}/{branch}"));
    }
    // Cargo reruns a build script on every build while a watched path is missing (and so
    // recompiles every kernel): watch only what exists.
    for path in watched.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
}

/// The first nvcc candidate that exists and answers `--version`.
fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(nvcc) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(nvcc));
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("bin").join("nvcc"));
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    candidates.push(manifest_dir.join(".cuda/nvidia/cu13/bin/nvcc"));
    candidates.into_iter().find(|nvcc| {
        nvcc.is_file()
            && Command::new(nvcc)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
    })
}

/// Compiles every kernels/*.cu to all TARGETS, in parallel (nvcc is single-threaded).
/// Returns the file stems, sorted, or the first failure with nvcc's message.
fn compile_all(nvcc: &Path, kernel_dir: &Path, out_dir: &Path) -> Result<Vec<String>, String> {
    let mut sources: Vec<PathBuf> = fs::read_dir(kernel_dir)
        .map_err(|e| format!("{}: {e}", kernel_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let stems: Vec<String> = sources
        .iter()
        .map(|p| {
            p.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let mut jobs = Vec::new();
    for (source, stem) in sources.iter().zip(&stems) {
        for (suffix, flags) in TARGETS {
            jobs.push(Job {
                stem: stem.clone(),
                source: source.clone(),
                flags,
                output: out_dir.join(format!("{stem}.{suffix}")),
            });
        }
    }

    let queue = Mutex::new(jobs.into_iter());
    let failures = Mutex::new(Vec::new());
    let timings = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let Some(job) = queue.lock().expect("queue").next() else {
                        break;
                    };
                    let start = Instant::now();
                    let result = run_nvcc(nvcc, kernel_dir, &job);
                    let seconds = start.elapsed().as_secs_f64();
                    match result {
                        Ok(()) => timings.lock().expect("timings").push(format!(
                            "{} {} {seconds:.2}s {} bytes",
                            job.stem,
                            job.flags.join(" "),
                            fs::metadata(&job.output).map_or(0, |m| m.len())
                        )),
                        Err(message) => failures.lock().expect("failures").push(message),
                    }
                }
            });
        }
    });
    let mut timings = timings.into_inner().expect("timings");
    timings.sort();
    // For the CI budget: `cat target/*/build/rcx-*/out/kernel-build-times.txt`.
    let _ = fs::write(
        out_dir.join("kernel-build-times.txt"),
        timings.join("\n") + "\n",
    );
    let failures = failures.into_inner().expect("failures");
    match failures.into_iter().next() {
        Some(message) => Err(message),
        None => Ok(stems),
    }
}

fn run_nvcc(nvcc: &Path, kernel_dir: &Path, job: &Job) -> Result<(), String> {
    // Plain -O3 (no --use_fast_math): the kernels are checked against the CPU reference,
    // and exact erff/expf/tanhf keep them close. -lineinfo maps profiles to source lines.
    let mut command = Command::new(nvcc);
    command
        .args(job.flags)
        .args(["-O3", "-lineinfo", "-std=c++17"])
        .arg("-I")
        .arg(kernel_dir);
    // The pip layout keeps CCCL (needed by cuda_bf16.h) in include/cccl beside nvcc.
    if let Some(root) = nvcc.parent().and_then(Path::parent) {
        for include in [root.join("include"), root.join("include/cccl")] {
            if include.is_dir() {
                command.arg("-I").arg(include);
            }
        }
    }
    command.arg("-o").arg(&job.output).arg(&job.source);
    let output = command
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nvcc failed on {} ({}):\n{}{}",
            job.source.display(),
            job.flags.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The Rust source include!-d by src/backend/cuda/kernels.rs.
fn generated_source(built: bool, stems: &[String], reason: &str) -> String {
    let mut src = String::from("// Generated by build.rs: the embedded CUDA kernel images.\n");
    writeln!(src, "pub const KERNELS_BUILT: bool = {built};").unwrap();
    writeln!(
        src,
        "pub const KERNELS_NOT_BUILT_REASON: &str = {reason:?};"
    )
    .unwrap();
    src.push_str("pub const KERNEL_IMAGES: &[KernelImage] = &[\n");
    for stem in stems {
        let [ptx90, ptx80, cubin90] = TARGETS.map(|(suffix, _)| format!("/{stem}.{suffix}"));
        writeln!(
            src,
            "    KernelImage {{\n        name: {stem:?},\n        \
             ptx_compute_90: include_str!(concat!(env!(\"OUT_DIR\"), {ptx90:?})),\n        \
             ptx_compute_80: include_str!(concat!(env!(\"OUT_DIR\"), {ptx80:?})),\n        \
             cubin_sm_90: include_bytes!(concat!(env!(\"OUT_DIR\"), {cubin90:?})),\n    }},"
        )
        .unwrap();
    }
    src.push_str("];\n");
    src
}
