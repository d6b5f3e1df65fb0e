//! Bad input to `rcx train` and `rcx score` through the built binary: each case must end
//! with exit code 2 and exactly one line on stderr that names the file at fault and what
//! is wrong with it, never a panic; and a refused run must not have deleted anything.

use rcx::hf_config::write_hf_config;
use rcx::models::{BertConfig, HostModel};
use rcx::safetensors::write_f32;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    let hf = rcx::checkpoint::to_hf(arch);
    write_hf_config(&dir.join("config.json"), &hf, 1).unwrap();
}

fn shipped_vocab() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/vocab.txt")
}

/// A model's tensors by name, as a test may edit them before they are written.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// A model folder (config.json, model.safetensors, a copy of the shipped vocab.txt) of a
/// freshly initialised small BERT whose tensors `edit` may change, drop or rename first.
fn model_folder_edited(dir: &Path, edit: impl FnOnce(&mut Tensors)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let model = HostModel::<f32>::init(small_arch(), 3);
    let mut tensors: Tensors = model
        .layout
        .tensors
        .iter()
        .map(|t| {
            let values = model.params[t.range()].to_vec();
            (t.name.clone(), t.shape.clone(), values)
        })
        .collect();
    edit(&mut tensors);
    let refs: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(name, shape, values)| (name.as_str(), &shape[..], &values[..]))
        .collect();
    write_f32(&dir.join("model.safetensors"), &refs, &[]).unwrap();
    write_config_json(dir, &small_arch());
    std::fs::copy(shipped_vocab(), dir.join("vocab.txt")).unwrap();
    dir.to_path_buf()
}

/// A whole, valid model folder.
fn model_folder(dir: &Path) -> PathBuf {
    model_folder_edited(dir, |_| {})
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
    let layout = HostModel::<f32>::init(small_arch(), 3).layout;
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
    std::fs::copy(shipped_vocab(), dir.join("vocab.txt")).unwrap();
    dir.to_path_buf()
}

/// `rcx score --model MODEL --data <the length ranking's eval split>`
fn score(model: &Path) -> Output {
    let data = fixture("lengths_eval.jsonl");
    rcx(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ])
}

/// `rcx eval --model MODEL --data <the length ranking's eval split> EXTRA...`
fn eval(model: &Path, extra: &[&str]) -> Output {
    let data = fixture("lengths_eval.jsonl");
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    rcx(&args)
}

/// A model folder refused by `rcx score` and `rcx eval`, before either prints anything.
fn assert_scoring_refused(model: &Path, needles: &[&str]) {
    for out in [score(model), eval(model, &[])] {
        assert_user_error(&out, needles);
        assert!(out.stdout.is_empty(), "printed before failing");
    }
}

/// Each bad model folder, refused both by `rcx train` (as model_name) and by scoring.
fn assert_model_refused(dir: &Path, model: &Path, needles: &[&str]) {
    let (cfg, _) = config(dir, &[("model_name", model.to_str().unwrap())]);
    assert_user_error(&train(&cfg, &[]), needles);
    assert_scoring_refused(model, needles);
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

/// The tensors of a head that only a pretrained encoder may lack.
const POOLER: [&str; 2] = ["bert.pooler.dense.weight", "bert.pooler.dense.bias"];
const CLASSIFIER: [&str; 2] = ["classifier.weight", "classifier.bias"];

fn drop_tensors(tensors: &mut Tensors, names: &[&str]) {
    let before = tensors.len();
    tensors.retain(|(name, _, _)| !names.contains(&name.as_str()));
    assert_eq!(
        tensors.len(),
        before - names.len(),
        "not all of {names:?} were there"
    );
}

#[test]
fn scoring_refuses_a_model_without_its_classifier_or_pooler() {
    // A random head would score with the look of a trained model.
    let dir = scratch("no-head");
    for (name, missing) in [("no-classifier", CLASSIFIER), ("no-pooler", POOLER)] {
        let model = model_folder_edited(&dir.join(name), |t| drop_tensors(t, &missing));
        let weights = model.join("model.safetensors");
        assert_scoring_refused(&model, &[weights.to_str().unwrap(), missing[0], "missing"]);
    }
    // Half a head is no pretrained encoder either: refused for training too.
    let model = model_folder_edited(&dir.join("half-classifier"), |t| {
        drop_tensors(t, &["classifier.bias"])
    });
    let weights = model.join("model.safetensors");
    assert_model_refused(
        &dir,
        &model,
        &[weights.to_str().unwrap(), "classifier.bias"],
    );
}

#[test]
fn training_from_a_pretrained_encoder_starts_a_fresh_head_and_says_so() {
    // HostModel's names (no `bert.` prefix, no classifier, no pooler): what a pretrained
    // encoder on the Hub looks like.
    let dir = scratch("fresh-head");
    let model = model_folder_edited(&dir.join("encoder"), |t| {
        drop_tensors(t, &POOLER);
        drop_tensors(t, &CLASSIFIER);
        for (name, _, _) in t.iter_mut() {
            *name = name.strip_prefix("bert.").unwrap().to_string();
        }
    });
    let (cfg, out) = config(&dir, &[("model_name", model.to_str().unwrap())]);
    let trained = train(&cfg, &[]);
    let stderr = String::from_utf8_lossy(&trained.stderr);
    assert!(trained.status.success(), "{stderr}");
    for needle in [
        model.join("model.safetensors").to_str().unwrap(),
        "fresh",
        POOLER[0],
        CLASSIFIER[0],
    ] {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
    // The trained model carries its head: it scores.
    let scored = score(&out);
    assert!(
        scored.status.success(),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let dir = scratch("non-finite");
    for (case, tensor, value) in [
        ("nan", "classifier.weight", f32::NAN),
        (
            "inf",
            "bert.encoder.layer.0.attention.self.key.bias",
            f32::INFINITY,
        ),
        (
            "neg-inf",
            "bert.embeddings.word_embeddings.weight",
            f32::NEG_INFINITY,
        ),
    ] {
        let model = model_folder_edited(&dir.join(case), |t| {
            let entry = t.iter_mut().find(|(name, _, _)| name == tensor).unwrap();
            entry.2[1] = value;
        });
        let weights = model.join("model.safetensors");
        assert_model_refused(&dir, &model, &[weights.to_str().unwrap(), tensor, "finite"]);
    }
}

#[test]
fn a_model_folder_without_vocab_txt_is_refused() {
    // Not silently the shipped vocabulary: the model's ids mean what its own one says.
    let dir = scratch("no-vocab");
    let model = model_folder(&dir.join("model"));
    std::fs::remove_file(model.join("vocab.txt")).unwrap();
    let vocab = model.join("vocab.txt");
    assert_model_refused(&dir, &model, &[vocab.to_str().unwrap()]);
}

#[test]
fn a_vocabulary_that_does_not_match_vocab_size_is_refused() {
    let dir = scratch("short-vocab");
    let model = model_folder(&dir.join("model"));
    let vocab = model.join("vocab.txt");
    let text = std::fs::read_to_string(&vocab).unwrap();
    let first_thousand: String = text.lines().take(1000).map(|l| format!("{l}\n")).collect();
    std::fs::write(&vocab, first_thousand).unwrap();
    assert_model_refused(
        &dir,
        &model,
        &[vocab.to_str().unwrap(), "1000", "vocab_size", "30522"],
    );
}

/// Rewrites one key of a model folder's config.json (`None` removes it).
fn set_config_key(model: &Path, key: &str, value: Option<serde_json::Value>) {
    let path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    match value {
        Some(v) => config[key] = v,
        None => {
            config.as_object_mut().unwrap().remove(key);
        }
    }
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

#[test]
fn pad_token_id_is_checked_against_the_vocabulary() {
    let dir = scratch("pad-token");
    let config_json = dir.join("model/config.json");
    for (value, needles) in [
        // The shipped vocabulary's [PAD] is id 0.
        (
            serde_json::json!(5),
            vec!["pad_token_id", "5", "[PAD]", "vocab.txt"],
        ),
        (serde_json::json!(30522), vec!["pad_token_id", "30522"]),
        (serde_json::json!(-1), vec!["pad_token_id", "-1"]),
        (serde_json::json!("0"), vec!["pad_token_id"]),
    ] {
        let model = model_folder(&dir.join("model"));
        set_config_key(&model, "pad_token_id", Some(value));
        let mut needles = needles;
        needles.push(config_json.to_str().unwrap());
        assert_model_refused(&dir, &model, &needles);
    }
}

#[test]
fn pad_token_id_is_kept_from_a_pretrained_folder() {
    // A vocabulary whose [PAD] is id 1: config.json's pad_token_id 1 is honoured (the
    // padding row gets no gradient) and written back, not replaced by 0.
    let dir = scratch("pad-token-kept");
    let model = model_folder(&dir.join("model"));
    let vocab = model.join("vocab.txt");
    let mut lines: Vec<String> = std::fs::read_to_string(&vocab)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines[0], "[PAD]");
    lines.swap(0, 1);
    std::fs::write(&vocab, lines.join("\n") + "\n").unwrap();
    set_config_key(&model, "pad_token_id", Some(serde_json::json!(1)));
    let (cfg, out) = config(&dir, &[("model_name", model.to_str().unwrap())]);
    let trained = train(&cfg, &[]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["pad_token_id"], 1);
    let scored = score(&out);
    assert!(
        scored.status.success(),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
}

/// Runs `rcx ARGS...` with its address space limited to `limit_mib` MiB, so that an
/// allocation sized by a bad config.json fails (an abort) instead of being lazily granted.
fn rcx_in_little_memory(args: &[&str], limit_mib: u64) -> Output {
    let mut script = format!("ulimit -v {} && exec \"$0\"", limit_mib * 1024);
    for i in 1..=args.len() {
        script += &format!(" \"${i}\"");
    }
    std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_rcx"))
        .args(args)
        .output()
        .expect("sh runs")
}

#[test]
fn huge_sizes_in_config_json_are_refused_before_allocating() {
    let dir = scratch("huge-sizes");
    let model = dir.join("model");
    let config_json = model.join("config.json");
    let data = fixture("lengths_eval.jsonl");
    let keys = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
    ];
    for key in keys {
        for value in [10_000_000_000u64, 1 << 62, u64::MAX] {
            model_folder(&model);
            set_config_key(&model, key, Some(serde_json::json!(value)));
            // One head divides any hidden size: the size itself must be what is refused.
            if key == "hidden_size" {
                set_config_key(&model, "num_attention_heads", Some(serde_json::json!(1)));
            }
            let out = rcx_in_little_memory(
                &[
                    "score",
                    "--model",
                    model.to_str().unwrap(),
                    "--data",
                    data.to_str().unwrap(),
                ],
                2048,
            );
            let stderr = assert_user_error(
                &out,
                &[config_json.to_str().unwrap(), key, &value.to_string()],
            );
            assert!(
                stderr.contains("need"),
                "does not say what is needed: {stderr}"
            );
        }
    }
}

#[test]
fn config_sizes_are_compared_with_the_weights_before_allocating() {
    // 100 million rows of 8 values: within what rcx can hold (3.2 GB) but not what
    // model.safetensors stores; refused from the header alone, in 2 GiB of address space.
    let dir = scratch("size-mismatch");
    let model = model_folder(&dir.join("model"));
    set_config_key(&model, "vocab_size", Some(serde_json::json!(100_000_000)));
    let data = fixture("lengths_eval.jsonl");
    let out = rcx_in_little_memory(
        &[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
        2048,
    );
    assert_user_error(
        &out,
        &[
            model.join("model.safetensors").to_str().unwrap(),
            "bert.embeddings.word_embeddings.weight",
            "[100000000, 8]",
        ],
    );
}

#[test]
fn a_bad_rcx_json_is_refused_naming_the_file_and_key() {
    let dir = scratch("bad-rcx-json");
    let model = model_folder(&dir.join("model"));
    let meta = model.join("rcx.json");
    let good = serde_json::json!({"max_length": 32, "loss": "x_inv", "eps": 0.1});
    // The control: a sound rcx.json scores.
    std::fs::write(&meta, good.to_string()).unwrap();
    let scored = score(&model);
    assert!(
        scored.status.success(),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
    for (key, value) in [
        ("max_length", serde_json::json!("long")),
        ("max_length", serde_json::json!(0)),
        ("max_length", serde_json::json!(-3)),
        ("eps", serde_json::json!("small")),
        ("eps", serde_json::json!(-0.5)),
        ("loss", serde_json::json!(7)),
        ("loss", serde_json::json!("no_such_loss")),
    ] {
        let mut bad = good.clone();
        bad[key] = value.clone();
        std::fs::write(&meta, bad.to_string()).unwrap();
        let stderr = assert_user_error(&score(&model), &[meta.to_str().unwrap(), key]);
        assert!(
            stderr.contains(&value.to_string().trim_matches('"').to_string()),
            "{stderr}"
        );
    }
    // A key left out, and text that is not JSON.
    std::fs::write(&meta, r#"{"max_length": 32, "eps": 0.1}"#).unwrap();
    assert_user_error(&score(&model), &[meta.to_str().unwrap(), "loss"]);
    std::fs::write(&meta, "{\"max_length\": 32,\n oops").unwrap();
    assert_user_error(&score(&model), &[&format!("{}:2", meta.display())]);
    // Keys rcx does not know (a newer rcx's notes) are not an error.
    let mut extra = good.clone();
    extra["written_by_a_later_version"] = serde_json::json!({"any": [1, 2]});
    std::fs::write(&meta, extra.to_string()).unwrap();
    assert!(score(&model).status.success());
}

#[test]
fn numeric_flags_of_score_and_eval_take_negative_numbers_to_their_range_checks() {
    // `--eps -1` must reach the range check, not be taken for an unknown flag.
    let dir = scratch("negative-flags");
    let model = model_folder(&dir.join("model"));
    for eps in ["-1", "0", "-inf", "NaN"] {
        assert_user_error(&eval(&model, &["--eps", eps]), &["--eps", "> 0", eps]);
    }
    let data = fixture("lengths_eval.jsonl");
    let score_cut_to = |max_length: &str| {
        rcx(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--max-length",
            max_length,
        ])
    };
    for max_length in ["0", "2"] {
        for out in [
            eval(&model, &["--max-length", max_length]),
            score_cut_to(max_length),
        ] {
            assert_user_error(&out, &["--max-length", "at least 3", max_length]);
        }
    }
    // A negative count is clap's to refuse (as any value that is not a count), for what
    // it is: an invalid value of the flag, not an unknown argument.
    for out in [eval(&model, &["--max-length", "-1"]), score_cut_to("-1")] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("invalid value '-1' for '--max-length"),
            "{stderr}"
        );
    }
    // The smallest limit scores.
    let out = score_cut_to("3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn command_line_errors_are_one_line_naming_the_argument() {
    // clap's own report spans several lines (error, tip, usage, --help pointer).
    for (args, needle) in [
        (&["eval", "--bogus"][..], "--bogus"),
        (
            &[
                "score",
                "--max-length",
                "ten",
                "--model",
                "m",
                "--data",
                "d",
            ][..],
            "ten",
        ),
        (&["train"][..], "CONFIG"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rcx"))
            .args(args)
            .output()
            .unwrap();
        let stderr = assert_user_error(&out, &[needle]);
        assert!(stderr.starts_with("rcx: error: "), "{stderr}");
    }
    // Help is not an error.
    let help = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: rcx"));
}

/// Splits `single`'s model.safetensors into two shards in a new folder `sharded` beside
/// it (its other files copied), with the model.safetensors.index.json transformers writes.
fn sharded_copy(single: &Path, sharded: &Path) {
    std::fs::create_dir_all(sharded).unwrap();
    for file in ["config.json", "vocab.txt"] {
        std::fs::copy(single.join(file), sharded.join(file)).unwrap();
    }
    let weights = rcx::safetensors::SafeTensors::open(&single.join("model.safetensors")).unwrap();
    let mut names = weights.names();
    names.sort();
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (file, part) in files.iter().zip([&names[..half], &names[half..]]) {
        let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = part
            .iter()
            .map(|&name| {
                let shape = weights.get(name).unwrap().shape.to_vec();
                let values = weights.read_f32(name, &shape).unwrap();
                weight_map.insert(name.to_string(), (*file).into());
                (name, shape, values)
            })
            .collect();
        let refs: Vec<(&str, &[usize], &[f32])> = tensors
            .iter()
            .map(|(name, shape, values)| (*name, &shape[..], &values[..]))
            .collect();
        write_f32(&sharded.join(file), &refs, &[]).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

/// Removes tensors from a sharded folder's index (they stay in their shard).
fn unindex(sharded: &Path, names: &[&str]) {
    let path = sharded.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for name in names {
        let map = index["weight_map"].as_object_mut().unwrap();
        assert!(map.remove(*name).is_some(), "{name} not in the index");
    }
    std::fs::write(&path, index.to_string()).unwrap();
}

/// A BERT folder sharded as transformers shards large models (shards named by
/// model.safetensors.index.json) loads as its single file does: the same weights, the same
/// scores; a tensor the index lacks is named with the index, and half a head is refused
/// there too. BERT folders once had to be one model.safetensors.
#[test]
fn a_sharded_bert_folder_loads_as_its_single_file() {
    use rcx::checkpoint::{Head, load_model};
    let dir = scratch("sharded");
    let single = model_folder(&dir.join("single"));
    let sharded = dir.join("sharded");
    sharded_copy(&single, &sharded);
    let (want, _) = load_model(&single, Head::Stored).unwrap();
    let (got, fresh) = load_model(&sharded, Head::Stored).unwrap();
    assert!(fresh.is_empty());
    assert_eq!(got.layout.tensors.len(), want.layout.tensors.len());
    assert!(
        got.params
            .iter()
            .zip(&want.params)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the shards hold the single file's weights"
    );
    let (scored, want_scored) = (score(&sharded), score(&single));
    assert!(
        scored.status.success(),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
    assert_eq!(scored.stdout, want_scored.stdout);

    let no_ffn = dir.join("no-ffn");
    sharded_copy(&single, &no_ffn);
    let name = "bert.encoder.layer.0.output.dense.weight";
    unindex(&no_ffn, &[name]);
    let no_ffn_index = no_ffn.join("model.safetensors.index.json");
    assert_model_refused(&dir, &no_ffn, &[no_ffn_index.to_str().unwrap(), name]);

    let half_head = dir.join("half-head");
    sharded_copy(&single, &half_head);
    unindex(&half_head, &["classifier.bias"]);
    let half_index = half_head.join("model.safetensors.index.json");
    assert_model_refused(
        &dir,
        &half_head,
        &[half_index.to_str().unwrap(), "classifier.bias"],
    );
    match load_model(&half_head, Head::FreshIfAbsent(3)) {
        Err(rcx::error::Error::User(message)) => assert!(
            message.contains("while `classifier.weight` is stored"),
            "{message}"
        ),
        other => panic!("half a head started fresh: {:?}", other.map(|r| r.1)),
    }

    // A pretrained encoder's shards without the head: training starts it fresh.
    let encoder = dir.join("encoder");
    sharded_copy(&single, &encoder);
    unindex(&encoder, &POOLER);
    unindex(&encoder, &CLASSIFIER);
    let (_, fresh) = load_model(&encoder, Head::FreshIfAbsent(3)).unwrap();
    assert_eq!(fresh.len(), POOLER.len() + CLASSIFIER.len());
}
