//! The promises `rcx train` makes about its output folder, through the built binary and real
//! processes: one trainer per folder (a killed one's lock does not block), `--resume` only
//! from a checkpoint that verifies (checksums, step, finite values) and only with the
//! training settings it was written with, `--overwrite` clearing every output of the
//! previous run but nothing else, SIGTERM/SIGINT ending a run cleanly, and a failed write
//! (a file size limit standing in for a full disk) leaving the previous checkpoint whole.
//!
//! Every run is bert-tiny on the length-ranking fixture with sequences of at most 48
//! tokens, so a run of a few steps takes about a second.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fixture, rcx, rcx_train, write_config};

fn scratch(name: &str) -> PathBuf {
    common::scratch("run-folder-tests", name)
}

/// Writes `dir/NAME.yml`: a 20-step run that saves every 2 steps into `dir/NAME`, with
/// `overrides` replacing or adding keys. Returns (config, output_dir).
fn config(dir: &Path, name: &str, overrides: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let base = [
        ("learning_rate", "1.0e-3"),
        ("warmup_ratio", "0.1"),
        ("per_device_train_batch_size", "4"),
        ("max_length", "48"),
        ("max_steps", "20"),
        ("eval_steps", "2"),
        ("save_steps", "2"),
        ("seed", "1"),
    ];
    write_config(dir, name, &base, overrides)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn train_ok(config: &Path, extra: &[&str]) -> Output {
    let out = rcx_train(config, extra);
    assert!(
        out.status.success(),
        "rcx train {extra:?} failed ({}):\n{}",
        out.status,
        stderr(&out)
    );
    out
}

/// `rcx train` that must fail with `code` and a one-line message.
fn train_fails(config: &Path, extra: &[&str], code: i32) -> String {
    let out = rcx_train(config, extra);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "rcx train {extra:?}: {text}");
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(text.trim_end().lines().count(), 1, "not one line: {text}");
    text
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The names in a folder that contain `part`, sorted.
fn names_with(dir: &Path, part: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect();
    names.sort();
    names
}

fn metrics_lines(out_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A trainer started in the background, killed (SIGKILL) when dropped so that a failing
/// test leaves no process behind.
struct Background(Child);

impl Background {
    /// Starts an endless run (far more steps than it will live) that saves every step.
    fn start(config: &Path) -> Background {
        let child = Command::new(env!("CARGO_BIN_EXE_rcx"))
            .args(["train", config.to_str().unwrap(), "--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the rcx binary runs");
        Background(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits until `path` exists (the run is under way), failing the test after a minute
    /// or if the run ends first.
    fn wait_for(&mut self, path: &Path) {
        let started = Instant::now();
        while !path.exists() {
            if let Some(status) = self.0.try_wait().unwrap() {
                panic!(
                    "the background run ended ({status}) before {}",
                    path.display()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} did not appear within a minute",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most a minute) for the run to end; its status and stderr.
    fn wait(mut self) -> (std::process::ExitStatus, String) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                let mut text = String::new();
                if let Some(mut err) = self.0.stderr.take() {
                    std::io::Read::read_to_string(&mut err, &mut text).unwrap();
                }
                return (status, text);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the run did not end within a minute"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const ENDLESS: &[(&str, &str)] = &[
    ("max_steps", "1000000"),
    ("save_steps", "1"),
    ("eval_steps", "1000000"),
];

#[test]
fn a_second_trainer_is_refused_at_once_and_a_killed_ones_lock_does_not_block() {
    let dir = scratch("lock");
    let (cfg, out) = config(&dir, "run", ENDLESS);
    let mut first = Background::start(&cfg);
    first.wait_for(&out.join("checkpoint-1"));

    for extra in [
        &["--overwrite", "--stop-at", "2"][..],
        &["--resume", "--stop-at", "1000"],
    ] {
        let started = Instant::now();
        let text = train_fails(&cfg, extra, 2);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "refused only after {:?}",
            started.elapsed()
        );
        assert!(
            text.contains(out.to_str().unwrap()) && text.contains(&first.pid().to_string()),
            "the refusal names neither the folder nor the holder's pid {}: {text}",
            first.pid()
        );
    }

    // kill -9: no chance to clean up; the kernel releases the lock with the process.
    let (status, _) = {
        first.0.kill().unwrap();
        first.wait()
    };
    assert_eq!(status.signal(), Some(9));
    train_ok(&cfg, &["--overwrite", "--stop-at", "1"]);
    assert_eq!(names_with(&out, "checkpoint-"), ["checkpoint-1"]);
}

#[test]
fn a_truncated_newest_checkpoint_is_skipped_for_the_newest_that_verifies() {
    let dir = scratch("checksums");
    let (cfg, out) = config(&dir, "run", &[]);
    let (cfg_ref, out_ref) = config(&dir, "reference", &[]);
    train_ok(&cfg_ref, &["--stop-at", "6"]);
    train_ok(&cfg, &["--stop-at", "4"]);
    assert_eq!(
        names_with(&out, "checkpoint-"),
        ["checkpoint-2", "checkpoint-4"]
    );

    let optimizer = out.join("checkpoint-4/optimizer.safetensors");
    let bytes = read(&optimizer);
    std::fs::write(&optimizer, &bytes[..bytes.len() / 2]).unwrap();
    let resumed = train_ok(&cfg, &["--resume", "--stop-at", "6"]);
    let text = stderr(&resumed);
    assert!(
        text.contains("checkpoint-4") && text.contains("optimizer.safetensors"),
        "the skipped checkpoint and its bad file are not named: {text}"
    );
    // Resumed from step 2, the run ends where an uninterrupted one does.
    assert!(
        read(&out.join("checkpoint-6/model.safetensors"))
            == read(&out_ref.join("checkpoint-6/model.safetensors")),
        "the run resumed from the fallback checkpoint differs from an uninterrupted one"
    );

    // Nothing verifies: a clear refusal, not a resume from garbage.
    for name in names_with(&out, "checkpoint-") {
        let weights = out.join(&name).join("model.safetensors");
        let mut bytes = read(&weights);
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&weights, bytes).unwrap();
    }
    let text = train_fails(&cfg, &["--resume"], 2);
    assert!(
        text.contains(out.to_str().unwrap())
            && text.contains("checkpoint-4")
            && text.contains("checkpoint-6")
            && text.contains("sha256"),
        "{text}"
    );
}

/// Rewrites a checkpoint's trainer_state.json as an rcx from before checksums and config
/// records wrote it: only step and seed.
fn make_legacy(checkpoint: &Path) {
    let path = checkpoint.join("trainer_state.json");
    let state: serde_json::Value = serde_json::from_slice(&read(&path)).unwrap();
    let legacy = serde_json::json!({ "step": state["step"], "seed": state["seed"] });
    std::fs::write(&path, legacy.to_string()).unwrap();
}

#[test]
fn resume_skips_a_non_finite_checkpoint() {
    let dir = scratch("non-finite");
    let (cfg, out) = config(&dir, "run", &[]);
    train_ok(&cfg, &["--stop-at", "4"]);
    for name in ["checkpoint-2", "checkpoint-4"] {
        make_legacy(&out.join(name));
    }
    // NaN (all bits set) over the first weights of checkpoint-4's data section.
    let weights = out.join("checkpoint-4/model.safetensors");
    let mut bytes = read(&weights);
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..8 + header + 4096].fill(0xff);
    std::fs::write(&weights, bytes).unwrap();

    let resumed = train_ok(&cfg, &["--resume", "--stop-at", "6"]);
    let text = stderr(&resumed);
    assert!(
        text.contains("checkpoint-4") && text.contains("NaN"),
        "the non-finite checkpoint was not named as skipped: {text}"
    );
    // A checkpoint from before checksums resumes, but not silently.
    assert!(
        text.contains("checkpoint-2") && text.contains("unverified"),
        "{text}"
    );
    assert_eq!(
        names_with(&out, "checkpoint-"),
        ["checkpoint-4", "checkpoint-6"]
    );
}

#[test]
fn resume_refuses_changed_training_settings_naming_the_key() {
    let dir = scratch("changed");
    let data = dir.join("train.jsonl");
    std::fs::copy(fixture("lengths.jsonl"), &data).unwrap();
    let data_entry = format!("[{}]", data.display());
    let (cfg, out) = config(&dir, "run", &[("datasets", &data_entry)]);
    train_ok(&cfg, &["--stop-at", "2"]);

    // Each change alone, then the original config again.
    let changes: &[(&str, &str)] = &[
        ("learning_rate", "2.0e-3"),
        ("per_device_train_batch_size", "2"),
        ("loss", "x"),
        ("max_length", "40"),
    ];
    for &(key, value) in changes {
        config(&dir, "run", &[("datasets", &data_entry), (key, value)]);
        let text = train_fails(&cfg, &["--resume", "--stop-at", "4"], 2);
        assert!(
            text.contains(key) && text.contains("--resume-changed"),
            "{key} changed: {text}"
        );
    }
    config(&dir, "run", &[("datasets", &data_entry)]);
    // The data's content, not only its name: drop the last record.
    let text = String::from_utf8(read(&data)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&data, lines[..lines.len() - 1].join("\n") + "\n").unwrap();
    let text = train_fails(&cfg, &["--resume", "--stop-at", "4"], 2);
    assert!(text.contains("datasets"), "{text}");

    // The escape hatch says what it let through, on stderr and in the metrics: on the next
    // evaluation's line, even when the run that let it through stopped before one (step 3
    // has none; the record waits in checkpoint-3).
    let resumed = train_ok(&cfg, &["--resume", "--resume-changed", "--stop-at", "3"]);
    assert!(
        stderr(&resumed).contains("datasets"),
        "{}",
        stderr(&resumed)
    );
    // The next resume compares with the settings the run now trains with.
    train_ok(&cfg, &["--resume", "--stop-at", "6"]);
    let after: Vec<serde_json::Value> = metrics_lines(&out)
        .into_iter()
        .filter(|l| l["step"].as_u64() > Some(2))
        .collect();
    assert_eq!(after[0]["step"].as_u64(), Some(4));
    let recorded = &after[0]["resumed_with_changes"][0];
    assert_eq!(recorded["step"].as_u64(), Some(2), "{}", after[0]);
    assert!(recorded["keys"].get("datasets").is_some(), "{}", after[0]);
    assert!(
        after[1].get("resumed_with_changes").is_none(),
        "{}",
        after[1]
    );
}

#[test]
fn resume_refuses_a_checkpoint_whose_step_is_not_its_folders() {
    let dir = scratch("step");
    let (cfg, out) = config(&dir, "run", &[]);
    train_ok(&cfg, &["--stop-at", "2"]);
    let state_path = out.join("checkpoint-2/trainer_state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&read(&state_path)).unwrap();
    state["step"] = serde_json::json!(1002);
    std::fs::write(&state_path, state.to_string()).unwrap();
    let text = train_fails(&cfg, &["--resume"], 2);
    assert!(
        text.contains(state_path.to_str().unwrap()) && text.contains("1002"),
        "{text}"
    );
    assert!(!text.contains("18446744"), "{text}");
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn stop_at_must_be_a_step_still_to_train() {
    let dir = scratch("stop-at");
    let (cfg, out) = config(&dir, "run", &[]);
    let text = train_fails(&cfg, &["--stop-at", "0"], 2);
    assert!(text.contains("--stop-at"), "{text}");
    assert!(!out.join("metrics.jsonl").exists());
    train_ok(&cfg, &["--stop-at", "4"]);
    for stop in ["2", "4"] {
        let text = train_fails(&cfg, &["--resume", "--stop-at", stop], 2);
        assert!(text.contains("--stop-at") && text.contains("4"), "{text}");
    }
}

#[test]
fn overwrite_clears_the_previous_runs_outputs_and_nothing_else() {
    let dir = scratch("overwrite");
    let (cfg, out) = config(&dir, "run", &[("max_steps", "4")]);
    train_ok(&cfg, &[]);
    let outputs = [
        "model.safetensors",
        "config.json",
        "vocab.txt",
        "rcx.json",
        "metrics.jsonl",
    ];
    for file in outputs {
        assert!(out.join(file).is_file(), "{file}");
    }
    std::fs::write(out.join("notes.txt"), b"the user's own").unwrap();
    std::fs::create_dir_all(out.join("plots")).unwrap();

    // A fresh run without --overwrite is refused while any output of the old one is there.
    std::fs::remove_dir_all(out.join("checkpoint-2")).unwrap();
    std::fs::remove_dir_all(out.join("checkpoint-4")).unwrap();
    let text = train_fails(&cfg, &["--stop-at", "1"], 2);
    assert!(text.contains("--overwrite"), "{text}");

    train_ok(&cfg, &["--overwrite", "--stop-at", "1"]);
    for file in outputs {
        assert!(
            !out.join(file).exists(),
            "{file} of the previous run is still there"
        );
    }
    assert_eq!(names_with(&out, "checkpoint-"), ["checkpoint-1"]);
    assert_eq!(read(&out.join("notes.txt")), b"the user's own");
    assert!(out.join("plots").is_dir());
    // `rcx eval` now finds no model, instead of the old run's.
    let eval = rcx(&["eval", "--model", out.to_str().unwrap()]);
    assert_eq!(eval.status.code(), Some(2), "{}", stderr(&eval));
}

#[test]
fn overwrite_refuses_to_delete_the_model_the_run_starts_from() {
    let dir = scratch("overwrite-own-model");
    let (cfg, out) = config(&dir, "model", &[("max_steps", "2")]);
    train_ok(&cfg, &[]);
    let weights = read(&out.join("model.safetensors"));
    // Fine-tuning a model folder in place: a fresh run there needs --overwrite, which
    // would delete the very weights it starts from.
    let model = out.to_str().unwrap();
    let (in_place, _) = config(
        &dir,
        "in-place",
        &[("model_name", model), ("output_dir", model)],
    );
    let text = train_fails(&in_place, &["--overwrite", "--stop-at", "1"], 2);
    assert!(
        text.contains(model) && text.contains("model_name"),
        "{text}"
    );
    assert!(read(&out.join("model.safetensors")) == weights);
    assert!(out.join("vocab.txt").is_file());
}

#[test]
fn sigterm_and_sigint_end_a_run_cleanly_with_its_checkpoints_whole() {
    for (signal, name, code) in [
        (libc::SIGTERM, "SIGTERM", 143),
        (libc::SIGINT, "SIGINT", 130),
    ] {
        let dir = scratch(name);
        let (cfg, out) = config(&dir, "run", ENDLESS);
        let mut run = Background::start(&cfg);
        run.wait_for(&out.join("checkpoint-3"));
        // SAFETY: kill(2) on the child's pid, still ours to signal (not yet waited for).
        assert_eq!(unsafe { libc::kill(run.pid() as i32, signal) }, 0);
        let (status, text) = run.wait();
        assert_eq!(status.code(), Some(code), "{name}: {status}: {text}");
        assert!(text.contains(name) && text.contains("--resume"), "{text}");
        assert!(
            names_with(&out, ".tmp").is_empty(),
            "{name}: temporaries left: {:?}",
            names_with(&out, ".tmp")
        );
        // The newest checkpoint verifies: resuming does not skip it.
        let newest = names_with(&out, "checkpoint-")
            .iter()
            .filter_map(|n| n.strip_prefix("checkpoint-")?.parse::<usize>().ok())
            .max()
            .unwrap();
        let next = (newest + 1).to_string();
        let resumed = train_ok(&cfg, &["--resume", "--stop-at", &next]);
        assert!(!stderr(&resumed).contains("skip"), "{}", stderr(&resumed));
    }
}

/// `rcx train` with every file it writes limited to `bytes` (RLIMIT_FSIZE): a write past
/// the limit fails with EFBIG, as a full disk fails with ENOSPC, without root.
fn train_with_file_size_limit(config: &Path, extra: &[&str], bytes: u64) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rcx"));
    cmd.args(["train", config.to_str().unwrap(), "--quiet"])
        .args(extra);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("the rcx binary runs")
}

#[test]
fn a_failed_save_exits_1_naming_the_file_and_keeps_the_previous_checkpoint() {
    let dir = scratch("disk-full");
    let (cfg, out) = config(&dir, "run", &[]);
    let (cfg_ref, out_ref) = config(&dir, "reference", &[]);
    train_ok(&cfg_ref, &["--stop-at", "6"]);
    train_ok(&cfg, &["--stop-at", "4"]);
    let before = read(&out.join("checkpoint-4/model.safetensors"));

    // bert-tiny's weights are 17 MB: the step-6 save cannot be written under 1 MB a file.
    let failed = train_with_file_size_limit(&cfg, &["--resume", "--stop-at", "6"], 1 << 20);
    let text = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{}: {text}", failed.status);
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.contains("model.safetensors"), "no file named: {text}");
    assert!(
        names_with(&out, ".tmp").is_empty(),
        "{:?}",
        names_with(&out, ".tmp")
    );
    // Keeping two checkpoints needs room for two: checkpoint-2, dropped by the save of 6,
    // went before it was written; the newest, checkpoint-4, stays whole.
    assert_eq!(names_with(&out, "checkpoint-"), ["checkpoint-4"]);
    assert!(read(&out.join("checkpoint-4/model.safetensors")) == before);

    // Room again: the run resumes from the kept checkpoint and ends as an uninterrupted one.
    let resumed = train_ok(&cfg, &["--resume", "--stop-at", "6"]);
    assert!(!stderr(&resumed).contains("skip"), "{}", stderr(&resumed));
    assert!(
        read(&out.join("checkpoint-6/model.safetensors"))
            == read(&out_ref.join("checkpoint-6/model.safetensors"))
    );
}
