//! Data-parallel training, end to end through the built binary, on the emulated device (the
//! fake libcuda, libcublas and libnccl of tests/emu/, ranks as processes): 2 and 3 ranks
//! train the weights one process trains on the same global batch, with and without ZeRO-1,
//! a run resumes with another number of ranks, and a rank killed mid-run ends the other with an error instead
//! of a hang. With a real GPU this file is skipped (it needs as many GPUs as ranks); without
//! the emulator it skips, and RCX_REQUIRE_EMU=1 (CI) makes that a failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rcx::safetensors::SafeTensors;

mod common;
#[path = "emu/build.rs"]
mod emu_build;
// Only its emulated device's library path is used here.
#[allow(dead_code)]
#[path = "emu/fake_device.rs"]
mod fake_device;

use common::RunConfig;

/// Ranks' weights and moments may differ from one process's by the order of the gradient
/// sums: each rank sums its micro-batches, then NCCL sums the ranks. A step of learning
/// rate 1e-3 moves a weight by up to ~1e-3, so a rank that trained the wrong share, or a
/// shard updated twice or never, is far outside. Measured on 2026-12-03: 3.1e-7 for the
/// weights, 2.8e-9 for the moments.
const TOLERANCE: f32 = 2e-6;

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
fn config(dir: &Path, name: &str, extra: &[(&str, &str)]) -> (PathBuf, PathBuf) {
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
        .set(extra)
        .write(&dir.join(format!("{name}.yml")));
    (config, out)
}

fn train_ok(library_path: &str, config: &Path, extra: &[&str]) {
    train_traced(library_path, config, extra, None);
}

/// `rcx train CONFIG --quiet EXTRA` on the emulated device; with `trace`, the device writes
/// its trace (a line per kernel launch and collective, in the order they ran) to
/// `trace.<pid>`.
fn train_traced(library_path: &str, config: &Path, extra: &[&str], trace: Option<&Path>) {
    let mut args = vec!["train", config.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    let mut command = Command::new(env!("CARGO_BIN_EXE_rcx"));
    command
        .args(&args)
        .env("LD_LIBRARY_PATH", library_path)
        .env("RCX_EMU_DEVICES", "3");
    if let Some(trace) = trace {
        command.env("RCX_EMU_TRACE", trace);
    }
    let out = command.output().expect("the rcx binary runs");
    assert!(
        out.status.success(),
        "rcx {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port nobody listens on now, for rank 0.
fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port().to_string()
}

/// Rank `rank` of a run of 2, started as torchrun would start it (so that the launcher's
/// own supervision, which would end the others itself, is out of the way); stderr piped.
fn rank_of_two(lib: &str, cfg: &Path, rank: &str, port: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["train", cfg.to_str().unwrap()])
        .args(extra)
        .env("LD_LIBRARY_PATH", lib)
        .env("RCX_EMU_DEVICES", "2")
        .env("RANK", rank)
        .env("LOCAL_RANK", rank)
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Every tensor of a safetensors file, by name.
fn tensors(file: &Path) -> Vec<(String, Vec<f32>)> {
    let file = SafeTensors::open(file).unwrap();
    let mut names: Vec<String> = file.names().iter().map(|n| n.to_string()).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let shape = file.get(&name).unwrap().shape.to_vec();
            let values = file.read_f32(&name, &shape).unwrap();
            (name, values)
        })
        .collect()
}

/// The largest difference between two files' tensors, with the tensor it is in.
fn max_difference(a: &Path, b: &Path) -> (f32, String) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(
        ta.len(),
        tb.len(),
        "{} and {} hold other tensors",
        a.display(),
        b.display()
    );
    let mut worst = (0f32, String::new());
    for ((name, x), (other, y)) in ta.iter().zip(&tb) {
        assert_eq!(name, other);
        assert_eq!(x.len(), y.len(), "{name}");
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

/// Asserts that `files` of run `out` equal those of the process alone within TOLERANCE.
fn assert_same_files(test: &str, what: &str, alone: &Path, out: &Path, files: &[&str]) {
    for file in files {
        let (d, tensor) = max_difference(&alone.join(file), &out.join(file));
        eprintln!("{test}: {what}: {file}: largest difference {d:e} ({tensor})");
        assert!(d <= TOLERANCE, "{what}: {file}: {tensor} differs by {d}");
    }
}

/// The traces of the ranks of a run traced to `prefix` (`prefix.<pid>`), one per rank.
fn traces(prefix: &Path) -> Vec<Vec<String>> {
    let (dir, name) = (prefix.parent().unwrap(), prefix.file_name().unwrap());
    let start = format!("{}.", name.to_string_lossy());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&start))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(String::from)
                .collect()
        })
        .collect()
}

/// Asserts from a rank's trace that its gradients were summed in buckets (at least
/// `buckets` collectives of `kind` on the side stream in the step) and that the first
/// started while the backward still ran: a backward kernel (the embeddings' gradient, the
/// backward's last op) was launched after it and before the step's AdamW.
fn assert_overlapped(test: &str, trace: &[String], kind: &str, buckets: usize) {
    let is_sum = |line: &String| {
        line.starts_with(&format!("nccl {kind}")) && line.ends_with("stream=created")
    };
    let first = trace
        .iter()
        .position(is_sum)
        .unwrap_or_else(|| panic!("{test}: no {kind} on the side stream in the trace"));
    let update = first
        + trace[first..]
            .iter()
            .position(|l| l.starts_with("launch adamw_update"))
            .expect("the step's AdamW after its sums");
    let step = &trace[first..update];
    let sums = step.iter().filter(|l| is_sum(l)).count();
    let backward_after = step
        .iter()
        .filter(|l| l.starts_with("launch embedding_backward"))
        .count();
    eprintln!(
        "{test}: {sums} bucket sums ({kind}) in the step; {backward_after} embedding-backward \
         launches after the first"
    );
    assert!(
        sums >= buckets,
        "{sums} bucket sums, expected at least {buckets}"
    );
    assert!(
        backward_after > 0,
        "every bucket sum started after the backward had ended: no overlap"
    );
}

/// Each emulated rank costs a process and a step about a minute of a loaded CI core, so one
/// run covers all the claims: 2 ranks of plain data parallelism train step 1 and save
/// (checked against the process alone: weights and AdamW moments), then 3 ranks with ZeRO-1
/// resume from that checkpoint and train step 2 (checked again: ZeRO-1's gathered moments
/// included). Both equal the process alone's, so ZeRO-1 equals plain data parallelism.
/// Both sum their gradients in one bucket per layer (`bucket_mb` below bert-tiny's layers),
/// started while the backward runs, which the emulated device's trace shows.
#[test]
fn ranks_train_the_run_of_one_process_with_and_without_zero1_and_resume_with_another_count() {
    let test = "data_parallel";
    let Some(lib) = emulated_device(test) else {
        return;
    };
    let dir = common::scratch("data-parallel", "same-run");
    let (alone_cfg, alone) = config(&dir, "alone", &[]);
    train_ok(&lib, &alone_cfg, &[]);
    // A step moves the weights far more than the tolerance, so equal weights say something.
    let (moved, _) = max_difference(
        &alone.join("checkpoint-1/model.safetensors"),
        &alone.join("checkpoint-2/model.safetensors"),
    );
    assert!(
        moved > 20.0 * TOLERANCE,
        "a step moved no weight by more than {moved}"
    );

    // 1 kB: each of bert-tiny's 2 layers (198 k parameters) is a bucket of its own.
    let (cfg, out) = config(&dir, "ranks", &[("bucket_mb", "0.001")]);
    let trace = dir.join("trace-2");
    train_traced(
        &lib,
        &cfg,
        &["--nproc", "2", "--stop-at", "1"],
        Some(&trace),
    );
    let ranks = traces(&trace);
    assert_eq!(ranks.len(), 2, "one trace per rank");
    for rank in &ranks {
        // The 2 layers, then the embeddings and the head.
        assert_overlapped(test, rank, "ncclAllReduce", 4);
    }
    let step1 = [
        "checkpoint-1/model.safetensors",
        "checkpoint-1/optimizer.safetensors",
    ];
    assert_same_files(test, "step 1 on 2 ranks", &alone, &out, &step1);

    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}zero_stage: 1\n")).unwrap();
    let trace = dir.join("trace-3");
    train_traced(&lib, &cfg, &["--nproc", "3", "--resume"], Some(&trace));
    let ranks = traces(&trace);
    assert_eq!(ranks.len(), 3, "one trace per rank");
    for rank in &ranks {
        assert_overlapped(test, rank, "ncclReduce", 4);
    }
    let step2 = [
        "model.safetensors",
        "checkpoint-2/model.safetensors",
        "checkpoint-2/optimizer.safetensors",
    ];
    let what = "step 2 resumed on 3 ranks with ZeRO-1";
    assert_same_files(test, what, &alone, &out, &step2);
    let (a, b) = (train_losses(&alone), train_losses(&out));
    assert_eq!(
        a.len(),
        b.len(),
        "rank 0 alone writes one line per evaluation"
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "train_loss {x} against {y}"
        );
    }
}

#[test]
fn a_rank_killed_mid_run_ends_the_other_with_an_error() {
    let test = "a_rank_killed_mid_run_ends_the_other_with_an_error";
    let Some(lib) = emulated_device(test) else {
        return;
    };
    let dir = common::scratch("data-parallel", "killed");
    let (cfg, _) = config(&dir, "run", &[]);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace("max_steps: 2", "max_steps: 200");
    // One micro-batch per rank: shorter steps.
    let text = text.replace(
        "gradient_accumulation_steps: 6",
        "gradient_accumulation_steps: 2",
    );
    std::fs::write(&cfg, text).unwrap();
    let port = free_port();
    let spawn = |rank| rank_of_two(&lib, &cfg, rank, &port, &["--dist-timeout", "30"]);
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
    // The error follows the progress line's carriage return.
    let last = seen
        .split(['\r', '\n'])
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(
        last.starts_with("rcx: error:") && last.contains("rank 1"),
        "rank 0's error does not name the lost rank 1: {last}"
    );
}

#[test]
fn ranks_that_start_from_other_settings_are_refused() {
    let test = "ranks_that_start_from_other_settings_are_refused";
    let Some(lib) = emulated_device(test) else {
        return;
    };
    let dir = common::scratch("data-parallel", "other-settings");
    // Rank 1 reads a config with another seed: other initial weights, other data order.
    let (cfg0, _) = config(&dir, "rank0", &[]);
    let (cfg1, _) = config(&dir, "rank1", &[("seed", "4")]);
    let port = free_port();
    let spawn = |rank, cfg: &Path| {
        rank_of_two(&lib, cfg, rank, &port, &["--quiet", "--dist-timeout", "60"])
    };
    let ranks = [spawn("0", &cfg0), spawn("1", &cfg1)];
    for (rank, child) in ranks.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "rank {rank}: {stderr}");
        assert!(
            stderr.contains("1 of the 2 ranks start from other settings, data or weights"),
            "rank {rank}: {stderr}"
        );
    }
}
