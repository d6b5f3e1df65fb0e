//! The training config: the shipped configs load, defaults follow Hugging Face's Trainer,
//! and every kind of bad input gives one line naming the file, the key and the line.

use rcx::config::{Config, DType, Device, Scheduler};
use rcx::error::Error;
use rcx::loss::{LossSpec, Utility};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Writes `text` to a fresh file in the temp directory and returns its path.
fn temp_file(stem: &str, ext: &str, text: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!(
        "rcx-config-test-{}-{n}-{stem}.{ext}",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

const MINIMAL: &str = "\
model_name: bert-mini
loss: x
datasets: [kjv-jargon]
output_dir: runs/test
max_steps: 10
";

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

#[test]
fn every_shipped_config_loads() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yml") {
            let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(config.datasets, ["kjv-jargon"]);
            assert!(config.train_files[0].ends_with("kjv-jargon/train.jsonl"));
            assert!(config.eval_files[0].ends_with("kjv-jargon/eval.jsonl"));
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            assert!(
                config.output_dir.ends_with(format!("runs/{stem}")),
                "{stem}"
            );
            names.push(stem);
        }
    }
    names.sort();
    let expected = [
        "adaptive2",
        "log",
        "logsigmoid",
        "minilm_x",
        "minilm_x_adaptive",
        "x",
        "x2",
        "x_adaptive",
        "x_inv",
        "x_inv2",
        "x_lr1e-3",
    ];
    assert_eq!(names, expected);
}

#[test]
fn the_main_config_is_the_prompt_aware_run() {
    let config = Config::load(&configs_dir().join("x_adaptive.yml")).unwrap();
    assert_eq!(config.loss_name, "adaptive");
    assert_eq!(
        config.loss,
        LossSpec::PromptAware {
            open: Utility::XInv,
            closed: Utility::X
        }
    );
    assert_eq!(config.eps, 0.1);
    assert!(config.is_builtin_model());
    let minilm = Config::load(&configs_dir().join("minilm_x_adaptive.yml")).unwrap();
    assert!(!minilm.is_builtin_model());
}

#[test]
fn defaults_follow_the_hugging_face_trainer() {
    let path = temp_file("minimal", "yml", MINIMAL);
    let config = Config::load(&path).unwrap();
    assert_eq!(config.learning_rate, 5e-5);
    assert_eq!(config.scheduler, Scheduler::Linear);
    assert_eq!(config.warmup_ratio, 0.0);
    assert_eq!(config.gradient_accumulation_steps, 1);
    assert_eq!(config.per_device_train_batch_size, 8);
    assert_eq!(config.weight_decay, 0.0);
    assert_eq!(config.max_grad_norm, 1.0);
    assert_eq!(config.seed, 42);
    assert_eq!(config.eval_steps, 500);
    assert_eq!(config.save_steps, 500);
    assert_eq!(config.logging_steps, 10);
    assert_eq!(config.max_length, 512);
    assert_eq!(config.device, Device::Auto);
    assert_eq!(config.dtype, DType::F32);
    assert_eq!(config.eps, 0.1);
    assert_eq!(config.dropout, None);
    assert_eq!(config.eval_max_prompts, None);
    assert_eq!(config.max_steps, 10);
    assert_eq!(config.eval_datasets, ["kjv-jargon"]);
    // Relative paths are taken from the current directory.
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(config.output_dir, cwd.join("runs/test"));
}

#[test]
fn explicit_values_and_loss_forms_are_read() {
    let data = temp_file("data", "jsonl", "");
    let text = MINIMAL
        .replace("loss: x", "loss: {open: neg_power:0.5, closed: x2}")
        .replace("[kjv-jargon]", &format!("[kjv-jargon, {}]", data.display()))
        + "scheduler: cosine\ndevice: cpu\ndtype: bf16\ndropout: 0.0\neval_max_prompts: 16\n\
           eval_datasets: [Cargo.toml]\nseed: 7\nwarmup_ratio: 1\n";
    let config = Config::load(&temp_file("explicit", "yml", &text)).unwrap();
    assert_eq!(
        config.loss,
        LossSpec::PromptAware {
            open: Utility::NegPower(0.5),
            closed: Utility::X2
        }
    );
    assert_eq!(config.loss_name, "open=neg_power:0.5,closed=x2");
    assert_eq!(config.train_files[1], data);
    assert_eq!(config.scheduler, Scheduler::Cosine);
    assert_eq!(config.device, Device::Cpu);
    assert_eq!(config.dtype, DType::Bf16);
    assert_eq!(config.dropout, Some(0.0));
    assert_eq!(config.eval_max_prompts, Some(16));
    assert_eq!(config.seed, 7);
    assert_eq!(config.warmup_ratio, 1.0);
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(config.eval_files, [cwd.join("Cargo.toml")]);

    let power = MINIMAL.replace("loss: x", "loss: power:0.5");
    let config = Config::load(&temp_file("power", "yml", &power)).unwrap();
    assert_eq!(config.loss, LossSpec::Single(Utility::Power(0.5)));
    assert_eq!(config.loss_name, "power:0.5");
}

/// Loads `text` and checks the error: a user error, one line, starting with `FILE:LINE: `
/// (or `FILE: ` when `line` is None), and containing every one of `needles`.
fn assert_error(text: &str, line: Option<usize>, needles: &[&str]) {
    let path = temp_file("bad", "yml", text);
    let err = match Config::load(&path) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::User(_)), "{err:?}");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "not one line: {msg}");
    let prefix = match line {
        Some(n) => format!("{}:{n}: ", path.display()),
        None => format!("{}: ", path.display()),
    };
    assert!(
        msg.starts_with(&prefix),
        "expected prefix `{prefix}`: {msg}"
    );
    for needle in needles {
        assert!(msg.contains(needle), "expected `{needle}` in: {msg}");
    }
}

/// MINIMAL (5 lines) with `extra` as line 6.
fn with_line6(extra: &str) -> String {
    format!("{MINIMAL}{extra}\n")
}

#[test]
fn unknown_key_lists_the_allowed_keys() {
    assert_error(
        &with_line6("learning_rat: 1e-4"),
        Some(6),
        &[
            "learning_rat",
            "learning_rate",
            "eval_max_prompts",
            "model_name",
        ],
    );
}

#[test]
fn wrong_types_name_the_key_and_line() {
    assert_error(
        &with_line6("learning_rate: fast"),
        Some(6),
        &["learning_rate", "positive number"],
    );
    assert_error(
        &with_line6("max_length: 1.5"),
        Some(6),
        &["max_length", "positive integer"],
    );
    assert_error(
        &MINIMAL.replace("[kjv-jargon]", "kjv-jargon"),
        Some(3),
        &["datasets", "list"],
    );
    assert_error(
        &MINIMAL.replace("loss: x", "loss: 3"),
        Some(2),
        &["loss", "loss name or a mapping"],
    );
    assert_error("- a\n- b\n", Some(1), &["mapping of config keys"]);
}

#[test]
fn unknown_names_list_what_is_allowed() {
    assert_error(
        &MINIMAL.replace("loss: x", "loss: x_inverse"),
        Some(2),
        &[
            "loss",
            "x_inverse",
            "x_inv",
            "logsigmoid",
            "adaptive2",
            "power:G",
        ],
    );
    assert_error(
        &MINIMAL.replace("loss: x", "loss:\n  open: x_inv\n  closed: nope"),
        Some(4),
        &["loss.closed", "nope", "x_inv2"],
    );
    assert_error(
        &MINIMAL.replace("loss: x", "loss:\n  open: x_inv\n  shut: x"),
        Some(4),
        &["loss", "shut", "open", "closed"],
    );
    assert_error(
        &MINIMAL.replace("loss: x", "loss: {open: x_inv}"),
        Some(2),
        &["loss", "closed"],
    );
    assert_error(
        &with_line6("scheduler: cos"),
        Some(6),
        &["scheduler", "cos", "linear", "cosine", "constant"],
    );
    assert_error(
        &with_line6("device: gpu"),
        Some(6),
        &["device", "gpu", "auto", "cpu", "cuda"],
    );
    assert_error(
        &with_line6("dtype: fp16"),
        Some(6),
        &["dtype", "fp16", "f32", "bf16"],
    );
}

#[test]
fn out_of_range_numbers_name_the_key_and_line() {
    for (line6, key) in [
        ("learning_rate: 0", "learning_rate"),
        ("learning_rate: -1e-4", "learning_rate"),
        ("eps: 0", "eps"),
        ("eps: -0.1", "eps"),
        ("max_grad_norm: 0", "max_grad_norm"),
        (
            "per_device_train_batch_size: 0",
            "per_device_train_batch_size",
        ),
        (
            "gradient_accumulation_steps: -2",
            "gradient_accumulation_steps",
        ),
        ("max_length: 0", "max_length"),
        ("eval_steps: 0", "eval_steps"),
        ("save_steps: 0", "save_steps"),
        ("logging_steps: 0", "logging_steps"),
        ("eval_max_prompts: 0", "eval_max_prompts"),
    ] {
        assert_error(&with_line6(line6), Some(6), &[key, "must be a positive"]);
    }
    assert_error(
        &MINIMAL.replace("max_steps: 10", "max_steps: 0"),
        Some(5),
        &["max_steps", "positive integer"],
    );
    assert_error(
        &with_line6("warmup_ratio: 1.5"),
        Some(6),
        &["warmup_ratio", "[0, 1]"],
    );
    assert_error(
        &with_line6("warmup_ratio: -0.1"),
        Some(6),
        &["warmup_ratio", "[0, 1]"],
    );
    assert_error(
        &with_line6("weight_decay: -0.01"),
        Some(6),
        &["weight_decay", ">= 0"],
    );
    assert_error(&with_line6("dropout: 1.0"), Some(6), &["dropout", "[0, 1)"]);
}

#[test]
fn missing_data_files_name_the_entry_and_line() {
    let missing = std::env::temp_dir().join("rcx-config-test-no-such-file.jsonl");
    let text = MINIMAL.replace(
        "datasets: [kjv-jargon]",
        &format!("datasets:\n  - kjv-jargon\n  - {}", missing.display()),
    );
    assert_error(
        &text,
        Some(5),
        &[
            "datasets[1]",
            "no such file",
            "rcx-config-test-no-such-file.jsonl",
            "kjv-jargon",
        ],
    );
    assert_error(
        &with_line6("eval_datasets: [nope.jsonl]"),
        Some(6),
        &["eval_datasets[0]", "no such file", "nope.jsonl"],
    );
    assert_error(
        &MINIMAL.replace("[kjv-jargon]", "[]"),
        Some(3),
        &["datasets", "at least one"],
    );
}

#[test]
fn missing_required_keys_and_empty_files_are_named() {
    for key in ["model_name", "loss", "datasets", "output_dir", "max_steps"] {
        let text: String = MINIMAL
            .lines()
            .filter(|l| !l.starts_with(key))
            .map(|l| format!("{l}\n"))
            .collect();
        let path = temp_file("missing", "yml", &text);
        let msg = Config::load(&path).unwrap_err().to_string();
        assert!(
            msg.starts_with(&path.display().to_string())
                && msg.contains(&format!("missing field `{key}`")),
            "{msg}"
        );
    }
    assert_error(
        "# nothing here\n",
        None,
        &["empty", "model_name", "datasets"],
    );
    assert_error(
        &MINIMAL.replace("model_name: bert-mini", "model_name: ''"),
        Some(1),
        &["model_name", "bert-mini"],
    );
}

#[test]
fn an_unreadable_file_is_named() {
    let path = std::env::temp_dir().join("rcx-config-test-absent.yml");
    let msg = Config::load(&path).unwrap_err().to_string();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
}

#[test]
fn a_missing_model_folder_is_not_an_error_at_check_time() {
    let text = MINIMAL.replace("bert-mini", ".models/not-fetched-yet");
    let config = Config::load(&temp_file("model", "yml", &text)).unwrap();
    assert_eq!(config.model_name, ".models/not-fetched-yet");
}

#[test]
fn check_config_cli_prints_ok_and_fails_with_one_line() {
    let rcx = env!("CARGO_BIN_EXE_rcx");
    let good_a = configs_dir().join("x.yml");
    let good_b = configs_dir().join("x_adaptive.yml");
    let out = Command::new(rcx)
        .arg("check-config")
        .args([&good_a, &good_b])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        format!("{}: ok\n{}: ok\n", good_a.display(), good_b.display())
    );

    let bad = temp_file("cli", "yml", &with_line6("scheduler: step"));
    let out = Command::new(rcx)
        .arg("check-config")
        .args([&good_a, &bad, &good_b])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{}:6: scheduler", bad.display())),
        "{stderr}"
    );
    // Stops at the first bad file.
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, format!("{}: ok\n", good_a.display()));
}
