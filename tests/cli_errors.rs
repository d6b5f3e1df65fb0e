//! Bad input to `rcx train` and `rcx score` through the built binary: each case must end
//! with exit code 2 and exactly one line on stderr that names the file at fault and what
//! is wrong with it, never a panic; and a refused run must not have deleted anything.

use rcx::hf_config::{HfBertConfig, write_hf_config};
use rcx::model::{BertConfig, BertModel};
use rcx::safetensors::write_f32;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{fixture, rcx};

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli-errors", name)
}

/// Writes `dir/run.yml`, a one-step run on the length ranking into `dir/run`, with
/// `overrides` replacing or adding keys. Returns (config, output_dir).
fn config(dir: &Path, overrides: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let base = [
        ("per_device_train_batch_size", "2"),
        ("max_length", "32"),
        ("max_steps", "1"),
        ("eval_max_prompts", "2"),
    ];
    common::write_config(dir, "run", &base, overrides)
}

fn train(config: &Path, extra: &[&str]) -> Output {
    common::rcx_train(config, extra)
}

/// Exit code 2, no panic, one stderr line holding every one of `needles`.
fn assert_user_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
    stderr
}

/// A very small BERT over the shipped vocabulary (its 30522 entries need that many rows).
fn small_arch() -> BertConfig {
    BertConfig {
        vocab_size: 30522,
        hidden_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pad_token_id: 0,
    }
}

fn write_config_json(dir: &Path, arch: &BertConfig) {
    let hf = HfBertConfig {
        vocab_size: arch.vocab_size,
        hidden_size: arch.hidden_size,
        num_hidden_layers: arch.num_hidden_layers,
        num_attention_heads: arch.num_attention_heads,
        intermediate_size: arch.intermediate_size,
        hidden_act: "gelu".into(),
        hidden_dropout_prob: arch.hidden_dropout_prob as f32,
        attention_probs_dropout_prob: arch.attention_probs_dropout_prob as f32,
        max_position_embeddings: arch.max_position_embeddings,
        type_vocab_size: arch.type_vocab_size,
        layer_norm_eps: arch.layer_norm_eps as f32,
    };
    write_hf_config(&dir.join("config.json"), &hf, 1).unwrap();
}

/// A whole, valid model folder (config.json + model.safetensors, shipped vocabulary).
fn model_folder(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let model = BertModel::<f32>::init(small_arch(), 3);
    let tensors: Vec<(&str, &[usize], &[f32])> = model
        .layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), &t.shape[..], &model.params[t.range()]))
        .collect();
    write_f32(&dir.join("model.safetensors"), &tensors, &[]).unwrap();
    write_config_json(dir, &small_arch());
    dir.to_path_buf()
}

/// A safetensors file written byte by byte: (name, dtype, shape, element size), filled
/// with zeros, so a test can store what rcx's own writer never would.
fn write_raw_safetensors(path: &Path, tensors: &[(String, &str, Vec<usize>, usize)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, size) in tensors {
        let end = offset + size * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut head = serde_json::to_vec(&header).unwrap();
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&head);
    bytes.resize(bytes.len() + offset, 0);
    std::fs::write(path, bytes).unwrap();
}

/// A model folder whose `bert.embeddings.LayerNorm.weight` is stored as `dtype` with
/// `shape` instead of F32 [hidden].
fn model_folder_with_bad_tensor(dir: &Path, dtype: &str, shape: Vec<usize>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let layout = BertModel::<f32>::init(small_arch(), 3).layout;
    let tensors: Vec<(String, &str, Vec<usize>, usize)> = layout
        .tensors
        .iter()
        .map(|t| {
            if t.name == "bert.embeddings.LayerNorm.weight" {
                let size = if dtype == "I64" { 8 } else { 4 };
                (t.name.clone(), dtype, shape.clone(), size)
            } else {
                (t.name.clone(), "F32", t.shape.clone(), 4)
            }
        })
        .collect();
    write_raw_safetensors(&dir.join("model.safetensors"), &tensors);
    write_config_json(dir, &small_arch());
    dir.to_path_buf()
}

/// Each bad model folder, refused both by `rcx train` (as model_name) and `rcx score`.
fn assert_model_refused(dir: &Path, model: &Path, needles: &[&str]) {
    let (cfg, _) = config(dir, &[("model_name", model.to_str().unwrap())]);
    assert_user_error(&train(&cfg, &[]), needles);
    let data = fixture("lengths_eval.jsonl");
    let scored = rcx(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_user_error(&scored, needles);
    assert!(scored.stdout.is_empty(), "score printed before failing");
}

#[test]
fn a_sound_small_model_folder_trains_and_scores() {
    // The control for the bad folders below: built the same way, whole, it works.
    let dir = scratch("sound-model");
    let model = model_folder(&dir.join("model"));
    let (cfg, out) = config(&dir, &[("model_name", model.to_str().unwrap())]);
    let trained = train(&cfg, &[]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let data = fixture("lengths_eval.jsonl");
    let scored = rcx(&[
        "score",
        "--model",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(scored.status.success());
    assert_eq!(String::from_utf8_lossy(&scored.stdout).lines().count(), 64);
}

#[test]
fn missing_model_folder() {
    let dir = scratch("missing-model");
    let (cfg, _) = config(&dir, &[("model_name", "/nonexistent")]);
    assert_user_error(
        &train(&cfg, &[]),
        &[cfg.to_str().unwrap(), "model_name", "/nonexistent"],
    );
    let data = fixture("lengths_eval.jsonl");
    let scored = rcx(&[
        "score",
        "--model",
        "/nonexistent",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_user_error(&scored, &["/nonexistent", "no such model folder"]);
    // A path that exists but is a file, not a folder.
    let file = fixture("lengths.jsonl");
    let (cfg, _) = config(&dir, &[("model_name", file.to_str().unwrap())]);
    assert_user_error(&train(&cfg, &[]), &[cfg.to_str().unwrap(), "model_name"]);
}

#[test]
fn model_folder_without_weights() {
    let dir = scratch("no-weights");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    write_config_json(&model, &small_arch());
    let weights = model.join("model.safetensors");
    assert_model_refused(&dir, &model, &[weights.to_str().unwrap()]);
}

#[test]
fn truncated_safetensors() {
    let dir = scratch("truncated");
    let model = model_folder(&dir.join("model"));
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_model_refused(
        &dir,
        &model,
        &[weights.to_str().unwrap(), "not a valid safetensors file"],
    );
}

#[test]
fn wrong_shape_tensor() {
    let dir = scratch("wrong-shape");
    let model = model_folder_with_bad_tensor(&dir.join("model"), "F32", vec![9]);
    let weights = model.join("model.safetensors");
    assert_model_refused(
        &dir,
        &model,
        &[
            weights.to_str().unwrap(),
            "bert.embeddings.LayerNorm.weight",
            "expected shape [8]",
        ],
    );
}

#[test]
fn wrong_dtype_tensor() {
    let dir = scratch("wrong-dtype");
    let model = model_folder_with_bad_tensor(&dir.join("model"), "I64", vec![8]);
    let weights = model.join("model.safetensors");
    assert_model_refused(
        &dir,
        &model,
        &[
            weights.to_str().unwrap(),
            "bert.embeddings.LayerNorm.weight",
            "I64",
        ],
    );
}

#[test]
fn output_dir_that_cannot_be_written() {
    // Under a regular file: no folder can be made there, whoever runs the test (root
    // ignores permission bits, so a read-only folder would not do).
    let dir = scratch("unwritable");
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let out = blocker.join("run");
    let (cfg, _) = config(&dir, &[("output_dir", out.to_str().unwrap())]);
    assert_user_error(&train(&cfg, &[]), &["output_dir", out.to_str().unwrap()]);
}

#[test]
fn score_with_a_missing_data_file() {
    let dir = scratch("score-no-data");
    let model = model_folder(&dir.join("model"));
    let data = dir.join("absent.jsonl");
    let scored = rcx(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_user_error(&scored, &[data.to_str().unwrap()]);
}

#[test]
fn resume_without_a_checkpoint() {
    let dir = scratch("resume-none");
    let (cfg, out) = config(&dir, &[]);
    assert_user_error(
        &train(&cfg, &["--resume"]),
        &["--resume", "no checkpoint", out.to_str().unwrap()],
    );
}

#[test]
fn a_fresh_run_does_not_overwrite_an_earlier_one() {
    let dir = scratch("no-overwrite");
    let (cfg, out) = config(&dir, &[]);
    let first = train(&cfg, &[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let listing = |d: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let files_before = listing(&out);
    let weights_before = std::fs::read(out.join("checkpoint-1/model.safetensors")).unwrap();
    let metrics_before = std::fs::read(out.join("metrics.jsonl")).unwrap();

    assert_user_error(
        &train(&cfg, &[]),
        &[out.to_str().unwrap(), "--resume", "--overwrite"],
    );
    assert_eq!(listing(&out), files_before);
    assert_eq!(
        std::fs::read(out.join("checkpoint-1/model.safetensors")).unwrap(),
        weights_before
    );
    assert_eq!(
        std::fs::read(out.join("metrics.jsonl")).unwrap(),
        metrics_before
    );
    // --overwrite starts again.
    assert!(train(&cfg, &["--overwrite"]).status.success());
}

#[test]
fn prompt_aware_loss_on_untyped_data() {
    let dir = scratch("untyped");
    let (cfg, _) = config(&dir, &[("loss", "adaptive")]);
    assert_user_error(
        &train(&cfg, &[]),
        &[cfg.to_str().unwrap(), "adaptive", "prompt_type"],
    );
}

#[test]
fn device_cuda_without_a_gpu_is_refused_with_the_reason() {
    // `device: cuda` where CUDA cannot run must say why rather than train on the CPU
    // behind the user's back.
    if let Ok(()) = rcx::backend::cuda::available() {
        eprintln!("SKIPPED: this machine can run CUDA; the refusal is for machines that cannot");
        return;
    }
    let reason = rcx::backend::cuda::available().unwrap_err();
    let dir = scratch("device-cuda");
    let (cfg, out) = config(&dir, &[("device", "cuda")]);
    assert_user_error(
        &train(&cfg, &[]),
        &[cfg.to_str().unwrap(), "device: cuda", &reason],
    );
    assert!(!out.join("metrics.jsonl").exists());
}

#[test]
fn bf16_without_the_cuda_device_is_refused() {
    // The CPU backend is f32: `dtype: bf16` there is an error naming the key, not a
    // silent f32 run. `device: auto` falls back to the CPU only on a machine without a GPU.
    let dir = scratch("bf16");
    let mut devices = vec!["cpu"];
    if rcx::backend::cuda::available().is_err() {
        devices.push("auto");
    }
    for device in devices {
        let (cfg, out) = config(&dir, &[("device", device), ("dtype", "bf16")]);
        assert_user_error(
            &train(&cfg, &[]),
            &[cfg.to_str().unwrap(), "dtype: bf16", "device", "f32"],
        );
        assert!(!out.join("metrics.jsonl").exists());
    }
}

/// `--device` and `--dtype` override the config's keys; their errors name the flag.
#[test]
fn device_and_dtype_flags_override_the_config() {
    let dir = scratch("device-flags");
    // The config asks for bf16 on the CPU, which alone is refused; the flag fixes it.
    let (cfg, out) = config(&dir, &[("device", "cpu"), ("dtype", "bf16")]);
    let run = train(&cfg, &["--dtype", "f32"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.join("model.safetensors").is_file());

    let (cfg, out) = config(&dir, &[("device", "cpu"), ("dtype", "f32")]);
    let refused = train(&cfg, &["--device", "cpu", "--dtype", "bf16", "--overwrite"]);
    let stderr = assert_user_error(&refused, &["--dtype bf16", "--device cpu", "--dtype f32"]);
    assert!(!stderr.contains(cfg.to_str().unwrap()), "{stderr}");
    if rcx::backend::cuda::available().is_err() {
        let refused = train(&cfg, &["--device", "cuda", "--overwrite"]);
        assert_user_error(
            &refused,
            &["--device cuda", "--device cpu", "--device auto"],
        );
    }
    // Refusals come before anything is written: the earlier run's model is intact.
    assert!(out.join("model.safetensors").is_file());

    let bad = train(&cfg, &["--device", "tpu"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tpu"));
}

#[test]
fn device_auto_trains_on_the_cpu() {
    let dir = scratch("device-auto");
    let (cfg, out) = config(&dir, &[("device", "auto"), ("dtype", "f32")]);
    let run = train(&cfg, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.join("model.safetensors").is_file());
}
