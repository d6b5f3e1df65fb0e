//! Scaffolding shared by the tests: fixtures, scratch folders and small run configs over the
//! length-ranking fixture for the tests that drive the built `rcx` binary, and the seeded
//! inputs of the kernel tests.

#![allow(dead_code)] // each test crate uses its own part of this module

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod cuda_check;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train")
        .join(name)
}

/// An empty folder `group/name` of a test's own under cargo's scratch space.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A run config as the YAML a user writes: one `key: value` line per key, in order.
#[derive(Clone, Debug)]
pub struct RunConfig {
    keys: Vec<(String, String)>,
}

impl RunConfig {
    /// The keys of `text`, a config of one `key: value` line per key (such as a test's
    /// minimal config).
    pub fn from_text(text: &str) -> RunConfig {
        let keys = text
            .lines()
            .map(|line| {
                let (key, value) = line.split_once(": ").expect("a `key: value` line");
                (key.to_string(), value.to_string())
            })
            .collect();
        RunConfig { keys }
    }

    /// A bert-tiny `x_inv` run on the length ranking into `output_dir`.
    pub fn length_ranking(output_dir: &Path) -> RunConfig {
        RunConfig { keys: Vec::new() }.set(&[
            ("model_name", "bert-tiny"),
            ("loss", "x_inv"),
            (
                "datasets",
                &format!("[{}]", fixture("lengths.jsonl").display()),
            ),
            (
                "eval_datasets",
                &format!("[{}]", fixture("lengths_eval.jsonl").display()),
            ),
            ("output_dir", &output_dir.display().to_string()),
        ])
    }

    /// Each key's value replaced where the key is, or the key added at the end.
    pub fn set(mut self, keys: &[(&str, &str)]) -> RunConfig {
        for &(key, value) in keys {
            match self.keys.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1 = value.to_string(),
                None => self.keys.push((key.to_string(), value.to_string())),
            }
        }
        self
    }

    pub fn text(&self) -> String {
        self.keys
            .iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect()
    }

    /// Writes the config to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.text()).unwrap();
        path.to_path_buf()
    }
}

/// Writes `dir/NAME.yml`: a bert-tiny `x_inv` run on the length ranking into `dir/NAME`,
/// with `base` then `overrides` replacing or adding keys. Returns (config, output_dir).
pub fn write_config(
    dir: &Path,
    name: &str,
    base: &[(&str, &str)],
    overrides: &[(&str, &str)],
) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    let config = RunConfig::length_ranking(&out)
        .set(base)
        .set(overrides)
        .write(&dir.join(format!("{name}.yml")));
    (config, out)
}

pub fn rcx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(args)
        .output()
        .expect("the rcx binary runs")
}

/// `rcx train CONFIG --quiet EXTRA...`
pub fn rcx_train(config: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", config.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    rcx(&args)
}

/// The device of the GPU tests, or None after printing why `test` is skipped (no GPU, or
/// a build without kernels); RCX_REQUIRE_GPU=1 makes a skip a failure.
pub fn gpu_or_skip(test: &str) -> Option<rcx::backend::cuda::CudaRuntime> {
    use rcx::backend::cuda::{CudaRuntime, available};
    match available() {
        Ok(()) => Some(CudaRuntime::new(0).expect("CUDA is available but the runtime failed")),
        Err(why) => {
            assert!(
                std::env::var("RCX_REQUIRE_GPU").map_or(true, |v| v != "1"),
                "{test}: RCX_REQUIRE_GPU=1 but no GPU: {why}"
            );
            eprintln!("{test}: skipped, no GPU: {why}");
            None
        }
    }
}

/// Kernel test inputs from a seeded splitmix64 stream (rcx::rng::Rng), so failures
/// reproduce.
pub struct InputRng(rcx::rng::Rng);

impl InputRng {
    pub fn new(seed: u64) -> InputRng {
        InputRng(rcx::rng::Rng::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [-scale, scale] with |x| >= scale/20: non-zero.
    pub fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let u = (self.next_u64() >> 11) as f32 / (1u64 << 53) as f32; // [0, 1)
                let magnitude = scale * (0.05 + 0.95 * u);
                if self.next_u64() & 1 == 0 {
                    magnitude
                } else {
                    -magnitude
                }
            })
            .collect()
    }

    /// `len` integers in [0, limit).
    pub fn below(&mut self, len: usize, limit: u32) -> Vec<u32> {
        (0..len)
            .map(|_| (self.next_u64() % limit as u64) as u32)
            .collect()
    }

    /// A key padding mask [b, t] (1 = real token): each sequence starts with 1..=t real
    /// tokens, except that the last of a multi-sequence batch is all padding (the uniform
    /// attention case).
    pub fn padding_mask(&mut self, b: usize, t: usize) -> Vec<u8> {
        let mut mask = vec![0u8; b * t];
        for seq in 0..b {
            let real = if b > 1 && seq == b - 1 {
                0
            } else {
                1 + (self.next_u64() as usize % t)
            };
            mask[seq * t..seq * t + real].fill(1);
        }
        mask
    }
}
