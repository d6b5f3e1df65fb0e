//! Compiling C++ for the kernel emulator with g++: the compiler, content hashes for the
//! caches in target/, and compile jobs that never leave a half-written library behind.

use std::path::{Path, PathBuf};
use std::process::Command;

/// -ffp-contract=off: no fused multiply-adds, so results do not depend on the host CPU.
pub const FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    "-fPIC",
    "-shared",
    "-DRCX_EMULATE",
    "-pthread",
    "-ffp-contract=off",
];

/// $CXX, else g++ on PATH, if it answers --version; with its version text.
pub fn compiler() -> Result<(PathBuf, String), String> {
    let cxx = std::env::var_os("CXX").map_or_else(|| PathBuf::from("g++"), PathBuf::from);
    let out = Command::new(&cxx).arg("--version").output().map_err(|e| {
        format!(
            "cannot run the C++ compiler `{}` ($CXX or g++): {e}",
            cxx.display()
        )
    })?;
    if !out.status.success() {
        return Err(format!("`{} --version` failed", cxx.display()));
    }
    Ok((cxx, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The kernel files kernels/*.cu, sorted.
pub fn kernel_sources(kernels: &Path) -> Result<Vec<PathBuf>, String> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(kernels)
        .map_err(|e| format!("{}: {e}", kernels.display()))?
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    Ok(sources)
}

/// FNV-1a, 64 bits: stable across Rust versions, unlike std's hasher.
pub fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3); // part separator
    }
    h
}

pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// One g++ job: compiles into a temporary name, renamed into place when it succeeds, so a
/// concurrent or interrupted build never leaves a half-written library in the cache.
pub struct Job {
    output: PathBuf,
    temporary: PathBuf,
    child: std::process::Child,
}

pub fn spawn(cxx: &Path, args: &[String], output: PathBuf) -> Result<Job, String> {
    let temporary = output.with_extension(format!("tmp{}", std::process::id()));
    let child = Command::new(cxx)
        .args(FLAGS)
        .args(args)
        .arg("-o")
        .arg(&temporary)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", cxx.display()))?;
    Ok(Job {
        output,
        temporary,
        child,
    })
}

pub fn finish(job: Job) -> Result<(), String> {
    let out = job
        .child
        .wait_with_output()
        .map_err(|e| format!("g++: {e}"))?;
    if !out.status.success() {
        // A kernel that does not compile for the emulator is a real failure, not a skip.
        panic!(
            "compiling {} for the kernel emulator failed:\n{}",
            job.output.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&job.temporary, &job.output)
        .map_err(|e| format!("{}: {e}", job.output.display()))
}
