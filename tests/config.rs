//! The training config: the shipped configs load, defaults follow Hugging Face's Trainer,
//! and every kind of bad input gives one line naming the file, the key and the line.

use rcx::backend::{DType, Device};
use rcx::config::{Config, Scheduler};
use rcx::error::Error;
use rcx::loss::{
    EPS_RANGE, EXPONENT_RANGE, LossSpec, UTILITY_LIMITS, Utility, ranking_loss_forward_backward,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;
use common::RunConfig;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// This test file's scratch folder, under cargo's target/tmp.
fn scratch_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("config");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to a fresh file in the scratch folder and returns its path.
fn temp_file(stem: &str, ext: &str, text: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let path = scratch_dir().join(format!(
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
        "deberta_x",
        "deberta_x_adaptive",
        "llama_x",
        "llama_x_adaptive",
        "llama_x_inv",
        "log",
        "logsigmoid",
        "minilm_x",
        "minilm_x_adaptive",
        "paper_deberta_v3_base",
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
    assert!(
        config.shared_prefix,
        "decoders share their prompts by default"
    );
    assert_eq!(
        config.zero_stage, 0,
        "AdamW's state is replicated by default"
    );
    assert_eq!(config.bucket_mb, 25.0, "PyTorch DDP's bucket_cap_mb");
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
           eval_datasets: [Cargo.toml]\nseed: 7\nwarmup_ratio: 1\nshared_prefix: false\n\
           zero_stage: 1\nbucket_mb: 0.5\n";
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
    assert!(!config.shared_prefix);
    assert_eq!(config.zero_stage, 1);
    assert_eq!(config.bucket_mb, 0.5);
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
        &["max_length", "an integer"],
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
    assert_error(
        &with_line6("shared_prefix: sometimes"),
        Some(6),
        &["shared_prefix"],
    );
    assert_error(
        &with_line6("zero_stage: 2"),
        Some(6),
        &["zero_stage", "0 (none) or 1"],
    );
    for size in ["0", "-1", "1e9", "big"] {
        assert_error(
            &with_line6(&format!("bucket_mb: {size}")),
            Some(6),
            &["bucket_mb", "bucket size in MiB"],
        );
    }
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
        ("max_grad_norm: 0", "max_grad_norm"),
        (
            "per_device_train_batch_size: 0",
            "per_device_train_batch_size",
        ),
        (
            "gradient_accumulation_steps: -2",
            "gradient_accumulation_steps",
        ),
        ("eval_steps: 0", "eval_steps"),
        ("save_steps: 0", "save_steps"),
        ("logging_steps: 0", "logging_steps"),
        ("eval_max_prompts: 0", "eval_max_prompts"),
    ] {
        assert_error(&with_line6(line6), Some(6), &[key, "must be a positive"]);
    }
    for line6 in ["eps: 0", "eps: -0.1"] {
        assert_error(&with_line6(line6), Some(6), &["eps", "[1e-6, 1000]"]);
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

    let bad_config = RunConfig::from_text(MINIMAL).set(&[("scheduler", "step")]);
    let bad = temp_file("cli", "yml", &bad_config.text());
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

#[test]
fn tagged_values_are_refused_naming_the_key_and_line() {
    // `!custom 4` used to be read as the number 4.
    assert_error(
        &MINIMAL.replace("max_steps: 10", "max_steps: !custom 4"),
        Some(5),
        &["max_steps", "tag", "!custom"],
    );
    assert_error(
        &with_line6("eps: !!float 0.2"),
        Some(6),
        &["eps", "tag", "!!float"],
    );
    assert_error(
        &MINIMAL.replace("[kjv-jargon]", "[!x kjv-jargon]"),
        Some(3),
        &["datasets", "tag", "!x"],
    );
    // A `!` inside a value or a quoted string, or after a comment mark, is no tag.
    let text = MINIMAL.replace("runs/test", "'runs/!test' # !not-a-tag")
        + "model_name_note_is_not_a_key: 1\n";
    let path = temp_file("bang", "yml", &text);
    let msg = Config::load(&path).unwrap_err().to_string();
    assert!(
        msg.contains("unknown field `model_name_note_is_not_a_key`"),
        "{msg}"
    );
    let text = MINIMAL.replace("runs/test", "runs/wow!-\"quoted\" it's");
    let config = Config::load(&temp_file("bang", "yml", &text)).unwrap();
    assert!(config.output_dir.ends_with("runs/wow!-\"quoted\" it's"));
}

#[test]
fn counts_are_bounded_naming_the_key_and_the_allowed_range() {
    for (line6, key, allowed) in [
        (
            "gradient_accumulation_steps: 9223372036854775807",
            "gradient_accumulation_steps",
            "1..=4096",
        ),
        (
            "per_device_train_batch_size: 9223372036854775807",
            "per_device_train_batch_size",
            "1..=4096",
        ),
        ("max_length: 100000", "max_length", "5..=8192"),
        (
            "eval_steps: 18446744073709551615",
            "eval_steps",
            "1..=1000000000",
        ),
        ("save_steps: 4000000000", "save_steps", "1..=1000000000"),
        (
            "logging_steps: 4000000000",
            "logging_steps",
            "1..=1000000000",
        ),
        (
            "eval_max_prompts: 4000000000",
            "eval_max_prompts",
            "1..=1000000000",
        ),
    ] {
        assert_error(&with_line6(line6), Some(6), &[key, allowed]);
    }
    assert_error(
        &MINIMAL.replace("max_steps: 10", "max_steps: 18446744073709551615"),
        Some(5),
        &["max_steps", "1..=1000000000"],
    );
    // Every micro-batch of a step is held at once: their product is bounded too.
    assert_error(
        &with_line6("per_device_train_batch_size: 4096\ngradient_accumulation_steps: 4096"),
        None,
        &[
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "65536",
        ],
    );
    let at_the_bounds = with_line6(
        "per_device_train_batch_size: 256\ngradient_accumulation_steps: 256\n\
         max_steps_note: 0",
    )
    .replace("max_steps_note: 0\n", "")
    .replace("max_steps: 10", "max_steps: 1000000000");
    let config = Config::load(&temp_file("bounds", "yml", &at_the_bounds)).unwrap();
    assert_eq!(config.max_steps, 1_000_000_000);
}

#[test]
fn a_huge_accumulation_is_refused_by_train_before_anything_runs() {
    // It used to panic with a capacity overflow in the training loop (exit 101).
    let dir = scratch_dir().join(format!("run-{}-huge", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = RunConfig::from_text(MINIMAL).set(&[
        ("output_dir", &dir.display().to_string()),
        ("gradient_accumulation_steps", "9223372036854775807"),
        ("device", "cpu"),
    ]);
    let path = temp_file("huge", "yml", &config.text());
    let out = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["train", "--quiet"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:6: gradient_accumulation_steps",
            path.display()
        )),
        "{stderr}"
    );
    assert!(!dir.exists());
}

#[test]
fn max_length_must_hold_the_special_tokens_and_a_token_of_each_text() {
    // [CLS] prompt [SEP] completion [SEP]: 3 special tokens and one token of each text.
    for n in [0, 1, 2, 4] {
        assert_error(
            &with_line6(&format!("max_length: {n}")),
            Some(6),
            &["max_length", "5..=8192", "[CLS]"],
        );
    }
    let config = Config::load(&temp_file("len5", "yml", &with_line6("max_length: 5"))).unwrap();
    assert_eq!(config.max_length, 5);
    // The built-in models have 512 positions.
    assert_error(
        &with_line6("max_length: 513"),
        None,
        &["max_length", "513", "bert-mini", "512"],
    );
}

/// The error of a config whose loss and eps are checked together: one line, naming the
/// file, with no number longer than a compact form.
fn assert_compact_error(text: &str, line: Option<usize>, needles: &[&str]) {
    assert_error(text, line, needles);
    let msg = Config::load(&temp_file("compact", "yml", text))
        .unwrap_err()
        .to_string();
    let longest_digits = msg
        .split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest_digits <= 20, "a long number in: {msg}");
}

#[test]
fn eps_and_exponents_that_break_the_utilities_are_refused() {
    assert_compact_error(
        &with_line6("eps: 1e308"),
        Some(6),
        &["eps", "1e308", "1e-6", "1000"],
    );
    assert_compact_error(&with_line6("eps: 1e-300"), Some(6), &["eps", "1e-300"]);
    assert_compact_error(
        &MINIMAL.replace("loss: x", "loss: power:1e-300"),
        Some(2),
        &["loss", "1e-300", "exponent"],
    );
    assert_compact_error(
        &MINIMAL.replace("loss: x", "loss: neg_power:1e300"),
        Some(2),
        &["loss", "1e300", "exponent"],
    );
    assert_compact_error(
        &MINIMAL.replace("loss: x", "loss:\n  open: neg_power:1e-300\n  closed: x"),
        Some(3),
        &["loss.open", "1e-300", "exponent"],
    );
    // Each in range, but not together: eps^-g overflows.
    assert_compact_error(
        &(MINIMAL.replace("loss: x", "loss: neg_power:500") + "eps: 0.001\n"),
        None,
        &["loss", "neg_power:500", "eps", "0.001"],
    );
    assert_compact_error(
        &(MINIMAL.replace("loss: x", "loss: {open: x, closed: power:900}") + "eps: 500\n"),
        None,
        &["loss.closed", "power:900", "eps", "500"],
    );
}

#[test]
fn deep_flow_nesting_is_refused_before_the_yaml_parser_sees_it() {
    // 200 KB of nested brackets took the YAML parser 40 s; the error must come at once.
    let depth = 100_000;
    let text = MINIMAL.replace(
        "model_name: bert-mini",
        &format!("model_name: {}{}", "[".repeat(depth), "]".repeat(depth)),
    );
    assert_error(&text, Some(1), &["model_name", "nested deeper than 32"]);
    let text = MINIMAL.replace(
        "loss: x",
        &format!("loss: {}1{}", "{a: ".repeat(depth), "}".repeat(depth)),
    );
    assert_error(&text, Some(2), &["loss", "nested deeper than 32"]);
    // Block nesting: line 3 is at level 1, each `-` line one deeper, so line 35 is at 33.
    let nested: String = (1..=40).map(|i| format!("{}-\n", "  ".repeat(i))).collect();
    let text = MINIMAL.replace("datasets: [kjv-jargon]", &format!("datasets:\n{nested}"));
    assert_error(&text, Some(35), &["nested deeper than 32"]);
}

#[test]
fn an_oversized_config_is_refused_before_parsing() {
    let text = format!("{MINIMAL}{}", "# padding\n".repeat(110_000));
    assert_error(&text, None, &["1 MiB", "bytes"]);
}

/// A scratch data file of ranking records.
fn data_file(stem: &str, records: &[&str]) -> PathBuf {
    temp_file(stem, "jsonl", &(records.join("\n") + "\n"))
}

const TYPED: &str = r#"{"prompt": "p", "completions": ["a b", "a"], "prompt_type": "open"}"#;
const UNTYPED: &str = r#"{"prompt": "q", "completions": ["a b", "a"]}"#;

/// Runs `rcx check-config` on `config`; returns (exit code, stdout, stderr).
fn check_config(config: &RunConfig) -> (Option<i32>, String, String, PathBuf) {
    let path = temp_file("check", "yml", &config.text());
    let out = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
    )
}

#[test]
fn check_config_refuses_untyped_records_under_a_prompt_aware_loss() {
    let typed = data_file("typed", &[TYPED, TYPED]);
    let untyped = data_file("untyped", &[TYPED, "", UNTYPED]);
    let aware = |train: &Path, eval: &Path| {
        RunConfig::from_text(MINIMAL).set(&[
            ("loss", "adaptive"),
            ("datasets", &format!("['{}']", train.display())),
            ("eval_datasets", &format!("['{}']", eval.display())),
        ])
    };
    let (code, stdout, stderr, _) = check_config(&aware(&typed, &typed));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.ends_with(": ok\n"));
    for (train, eval) in [(&typed, &untyped), (&untyped, &typed)] {
        let (code, _, stderr, config) = check_config(&aware(train, eval));
        assert_eq!(code, Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        for needle in [
            config.display().to_string(),
            format!("{}:3 ", untyped.display()),
            "prompt_type".into(),
            "adaptive".into(),
        ] {
            assert!(stderr.contains(&needle), "expected `{needle}` in: {stderr}");
        }
    }
    // Without a prompt-aware loss, untyped records are fine.
    let single = aware(&untyped, &untyped).set(&[("loss", "x")]);
    let (code, _, stderr, _) = check_config(&single);
    assert_eq!(code, Some(0), "{stderr}");
}

/// `n + 1` points from `low` to `high`, evenly spaced in log scale.
fn log_grid(low: f64, high: f64, n: usize) -> impl Iterator<Item = f64> {
    (0..=n).map(move |i| low * (high / low).powf(i as f64 / n as f64))
}

/// The bounds on eps and the exponents are sound: every utility the config accepts, on a
/// grid over both ranges, has a finite f32 loss and gradient on any rewards (0 and 1 and
/// ties included, on both branches), and the theory's optimum that every evaluation
/// compares with is found. Every named utility is accepted for eps in [1e-3, 1e3].
#[test]
fn every_accepted_utility_trains_and_has_an_optimum() {
    let (eps_low, eps_high) = EPS_RANGE;
    let (g_low, g_high) = EXPONENT_RANGE;
    let named =
        ["x", "x2", "log", "x_inv", "x_inv2", "logsigmoid"].map(|n| Utility::parse(n).unwrap());
    let mut utilities = named.to_vec();
    for g in log_grid(g_low, g_high, 12).chain([0.5, 1.0, 2.0]) {
        utilities.extend([Utility::Power(g), Utility::NegPower(g)]);
    }
    // Two prompts: best first, then worst first (the x <= 0 branch); rewards 1, 0 and ties.
    let logits: Vec<f32> = [40.0, 3.0, 0.5, 0.5, 0.0, -2.0, -40.0, -40.0]
        .iter()
        .chain([-40.0, -40.0, -2.0, 0.0, 0.5, 0.5, 3.0, 40.0].iter())
        .copied()
        .collect();
    let (mut accepted, mut refused) = (0, 0);
    for utility in &utilities {
        for eps in log_grid(eps_low, eps_high, 9) {
            if let Err(why) = utility.check_with_eps(eps) {
                // The slope-ratio bound narrows eps only below 1e-3 (x_inv2 from 1e-4).
                assert!(!named.contains(utility) || eps < 1e-3, "{why}");
                refused += 1;
                continue;
            }
            accepted += 1;
            // check_with_eps looks at x = -1, 0, 0+, 1 only: the extremes, U being
            // increasing and U' monotone on each side of 0. Every x in between agrees.
            let (smallest_slope, largest) = UTILITY_LIMITS;
            for i in -1000..=1000 {
                let x = i as f64 / 1000.0;
                let (value, slope) = utility.value_and_slope(x, eps);
                assert!(
                    value.abs() <= largest && (smallest_slope..=largest).contains(&slope),
                    "{} eps {eps} at x = {x}: U = {value}, U' = {slope}",
                    utility.name()
                );
            }
            let mut dlogits = vec![f32::NAN; logits.len()];
            let loss = ranking_loss_forward_backward(
                &logits,
                &[8, 8],
                &[None, None],
                &LossSpec::Single(*utility),
                eps,
                &mut dlogits,
            )
            .unwrap();
            assert!(
                loss.is_finite() && dlogits.iter().all(|d| d.is_finite()),
                "{} eps {eps}: loss {loss}, gradient {dlogits:?}",
                utility.name()
            );
            for n in [2, 3, 8, 16] {
                if let Err(e) = rcx::theory::solve(utility, eps, n) {
                    panic!("{} eps {eps} n {n}: {e}", utility.name());
                }
            }
        }
    }
    assert!(
        accepted > 200 && refused > 20,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn train_refuses_untyped_eval_records_before_it_starts() {
    // It used to train, then fail at the first evaluation without naming the file.
    let typed = data_file("typed-train", &[TYPED, TYPED]);
    let untyped = data_file("untyped-eval", &[TYPED, "", UNTYPED]);
    let out_dir = scratch_dir().join(format!("run-{}-untyped", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let run = RunConfig::from_text(MINIMAL).set(&[
        ("model_name", "bert-tiny"),
        ("loss", "adaptive"),
        ("datasets", &format!("['{}']", typed.display())),
        ("output_dir", &out_dir.display().to_string()),
        ("max_steps", "1"),
        ("eval_datasets", &format!("['{}']", untyped.display())),
        ("device", "cpu"),
    ]);
    let config = temp_file("untyped-train", "yml", &run.text());
    let out = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["train", "--quiet"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:3 has no `prompt_type`", untyped.display())),
        "{stderr}"
    );
    assert!(!out_dir.exists(), "{} was written", out_dir.display());
}

#[test]
fn check_config_refuses_a_max_length_beyond_the_model_folders_positions() {
    // The parity fixture's model has 64 positions; training used to clear output_dir and
    // then fail at the first long sequence.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/tiny-bert");
    let run =
        RunConfig::from_text(MINIMAL).set(&[("model_name", &format!("'{}'", model.display()))]);
    let (code, _, stderr, config) = check_config(&run.clone().set(&[("max_length", "65")]));
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for needle in [
        format!("{}: max_length: 65", config.display()),
        "64 positions".into(),
        model.join("config.json").display().to_string(),
    ] {
        assert!(stderr.contains(&needle), "expected `{needle}` in: {stderr}");
    }
    let (code, _, stderr, _) = check_config(&run.set(&[("max_length", "64")]));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn check_config_refuses_evaluation_records_beyond_the_record_bound() {
    // Every evaluation compares each prompt type's rewards with the theory's optimum for
    // its K completions (computed for K <= 2000): training used to fail there. The data
    // reader's bound per record (rcx::data::MAX_COMPLETIONS) is far below it, and
    // check-config applies it to the evaluation files too.
    const _: () = assert!(rcx::data::MAX_COMPLETIONS <= rcx::theory::MAX_N);
    let completions: Vec<String> = (0..2001).map(|i| format!("\"c{i}\"")).collect();
    let wide = format!(
        r#"{{"prompt": "p", "completions": [{}], "prompt_type": "open"}}"#,
        completions.join(", ")
    );
    let eval = data_file("wide-eval", &[TYPED, &wide]);
    let run =
        RunConfig::from_text(MINIMAL).set(&[("eval_datasets", &format!("['{}']", eval.display()))]);
    let (code, _, stderr, _) = check_config(&run);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for needle in [format!("{}:2", eval.display()), "2001 completions".into()] {
        assert!(stderr.contains(&needle), "expected `{needle}` in: {stderr}");
    }
}
