//! Data-parallel training, end to end through the built binary, on the emulated device (the
//! fake libcuda, libcublas and libnccl of tests/emu/, ranks as processes): 2 and 3 ranks
//! train the weights one process trains on the same global batch, a run resumes with
//! another number of ranks, and a rank killed mid-run ends the other with an error instead
//! of a hang. With a real GPU this file is skipped (it needs as many GPUs as ranks); without
//! the emulator it skips, and RCX_REQUIRE_EMU=1 (CI) makes that a failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rcx::safetensors::SafeTensors;

mod common;
#[path = "emu/build.rs"]
mod emu_build;
#[path = "emu/fake_device.rs"]
mod fake_device;

use common::RunConfig;

/// Ranks' weights may differ from one process's by the order of the gradient sums: each
/// rank sums its micro-batches, then NCCL sums the ranks. After two AdamW steps of
/// learning rate 1e-3 (each moves a weight by at most ~1e-3) the differences measured were
/// below 1e-6; 2e-5 leaves room and still fails for a rank that trains the wrong share
/// (a step's update is 1e-3).
const WEIGHT_TOLERANCE: f32 = 2e-5;

/// LD_LIBRARY_PATH for the emulated device, or None after saying why the test is skipped.
fn emulated_device(test: &str) -> Option<String> {
    if rcx::backend::cuda::available().is_ok() {
        eprintln!("{test}: skipped, a real GPU is present (this test runs ranks on the emulator)");
        return None;
    }
    match fake_device::library_path() {
        Ok(path) => Some(path),
        Err(why) => {
            assert!(
                std::env::var("RCX_REQUIRE_EMU").map_or(true, |v| v != "1"),
                "{test}: RCX_REQUIRE_EMU=1 but the emulated device is unavailable: {why}"
            );
            eprintln!("{test}: skipped, no emulated device: {why}");
            None
        }
    }
}

/// A bert-tiny run on the length ranking, on the GPU: 2 steps of a global step of 6
/// micro-batches of one prompt (K = 4), so that 1, 2 and 3 ranks split it evenly; dropout
/// on (bert-tiny's 0.1), so each micro-batch's mask must follow it to its rank.
fn config(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    let config = RunConfig::length_ranking(&out)
        .set(&[
            ("device", "cuda"),
            ("learning_rate", "1.0e-3"),
            ("per_device_train_batch_size", "1"),
            ("gradient_accumulation_steps", "6"),
            ("max_length", "16"),
            ("max_steps", "2"),
            ("eval_steps", "2"),
            ("save_steps", "1"),
            ("logging_steps", "1"),
            ("eval_max_prompts", "2"),
            ("seed", "3"),
        ])
        .write(&dir.join(format!("{name}.yml")));
    (config, out)
}

fn rcx(library_path: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(args)
        .env("LD_LIBRARY_PATH", library_path)
        .env("RCX_EMU_DEVICES", "3")
        .output()
        .expect("the rcx binary runs")
}

fn train_ok(library_path: &str, config: &Path, extra: &[&str]) {
    let mut args = vec!["train", config.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    let out = rcx(library_path, &args);
    assert!(
        out.status.success(),
        "rcx {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every tensor of `dir/model.safetensors`, by name.
fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let file = SafeTensors::open(&dir.join("model.safetensors")).unwrap();
    let mut names: Vec<String> = file.names().iter().map(|n| n.to_string()).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let shape = file.get(&name).unwrap().shape.clone();
            let values = file.read_f32(&name, &shape).unwrap();
            (name, values)
        })
        .collect()
}

/// The largest difference between two runs' weights, with the tensor it is in.
fn max_difference(a: &Path, b: &Path) -> (f32, String) {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(
        wa.len(),
        wb.len(),
        "{} and {} hold other tensors",
        a.display(),
        b.display()
    );
    let mut worst = (0f32, String::new());
    for ((name, x), (other, y)) in wa.iter().zip(&wb) {
        assert_eq!(name, other);
        for (p, q) in x.iter().zip(y) {
            let d = (p - q).abs();
            assert!(d.is_finite(), "{name}: {p} against {q}");
            if d > worst.0 {
                worst = (d, name.clone());
            }
        }
    }
    worst
}

/// The train_loss of each line of `dir/metrics.jsonl`.
fn train_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["train_loss"].as_f64().unwrap()
        })
        .collect()
}

#[test]
fn ranks_train_the_weights_of_one_process_and_resume_with_another_count() {
    let test = "ranks_train_the_weights_of_one_process_and_resume_with_another_count";
    let Some(lib) = emulated_device(test) else {
        return;
    };
    let dir = common::scratch("data-parallel", "same-weights");
    let (alone_cfg, alone) = config(&dir, "alone");
    train_ok(&lib, &alone_cfg, &[]);
    // Weights that moved, so that equal weights say something: against a run whose steps
    // move nothing (the config refuses a learning rate of 0).
    let (init_cfg, initial) = config(&dir, "initial");
    let text = std::fs::read_to_string(&init_cfg).unwrap();
    std::fs::write(
        &init_cfg,
        text.replace("learning_rate: 1.0e-3", "learning_rate: 1.0e-12"),
    )
    .unwrap();
    train_ok(&lib, &init_cfg, &[]);
    let (moved, _) = max_difference(&alone, &initial);
    assert!(
        moved > 1e-4,
        "training moved no weight by more than {moved}"
    );

    for nproc in ["2", "3"] {
        let (cfg, out) = config(&dir, &format!("nproc{nproc}"));
        train_ok(&lib, &cfg, &["--nproc", nproc]);
        let (d, tensor) = max_difference(&alone, &out);
        eprintln!("{test}: {nproc} ranks: largest weight difference {d:e} ({tensor})");
        assert!(
            d <= WEIGHT_TOLERANCE,
            "{nproc} ranks: {tensor} differs by {d}"
        );
        for (a, b) in train_losses(&alone).iter().zip(train_losses(&out)) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "train_loss {a} against {b}"
            );
        }
        // Rank 0 alone writes: one line per evaluation.
        assert_eq!(train_losses(&out).len(), train_losses(&alone).len());
    }

    // Stopped after step 1 on 2 ranks, resumed on 3.
    let (cfg, out) = config(&dir, "resumed");
    train_ok(&lib, &cfg, &["--nproc", "2", "--stop-at", "1"]);
    train_ok(&lib, &cfg, &["--nproc", "3", "--resume"]);
    let (d, tensor) = max_difference(&alone, &out);
    eprintln!("{test}: 2 ranks then 3: largest weight difference {d:e} ({tensor})");
    assert!(
        d <= WEIGHT_TOLERANCE,
        "resumed on 3 ranks: {tensor} differs by {d}"
    );
}

#[test]
fn a_rank_killed_mid_run_ends_the_other_with_an_error() {
    let test = "a_rank_killed_mid_run_ends_the_other_with_an_error";
    let Some(lib) = emulated_device(test) else {
        return;
    };
    let dir = common::scratch("data-parallel", "killed");
    let (cfg, _) = config(&dir, "run");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("max_steps: 2", "max_steps: 200")).unwrap();
    // The ranks as torchrun would start them, so that the launcher's own supervision (which
    // would end rank 0 itself) is out of the way.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let spawn = |rank: &str| {
        Command::new(env!("CARGO_BIN_EXE_rcx"))
            .args(["train", cfg.to_str().unwrap(), "--dist-timeout", "30"])
            .env("LD_LIBRARY_PATH", &lib)
            .env("RCX_EMU_DEVICES", "2")
            .env("RANK", rank)
            .env("LOCAL_RANK", rank)
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut rank0 = spawn("0");
    let mut rank1 = spawn("1");
    // Rank 0's stderr, read on a thread: the progress line says when training is under way.
    let mut stderr = rank0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&chunk[..n]);
            let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut seen = String::new();
    while !seen.contains("step 1/") {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(text) => seen = text,
            Err(_) => {
                let _ = (rank0.kill(), rank1.kill());
                panic!("rank 0 never reported step 1:\n{seen}");
            }
        }
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    // Rank 0 must stop by itself, within its timeout (30 s) and some slack for a step.
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = rank0.try_wait().unwrap() {
            break status;
        }
        if killed_at.elapsed() > Duration::from_secs(120) {
            rank0.kill().unwrap();
            panic!("rank 0 still runs 120 s after rank 1 was killed:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    while let Ok(text) = rx.recv_timeout(Duration::from_secs(5)) {
        seen = text;
    }
    eprintln!(
        "{test}: rank 0 stopped {:.1?} after rank 1 was killed",
        killed_at.elapsed()
    );
    assert!(
        !status.success(),
        "rank 0 succeeded without its peer:\n{seen}"
    );
    let last = seen.lines().last().unwrap_or("");
    assert!(
        last.starts_with("rcx: error:") && last.contains("rank 1"),
        "rank 0's error does not name the lost rank 1: {last}"
    );
}
