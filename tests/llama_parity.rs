//! Decoder reward models (Llama, Mistral, Qwen2) against transformers: folders written by
//! scripts/gen_llama_fixtures.py (tiny random `*ForSequenceClassification` models, one of
//! them sharded) load, and their logits on padded batches equal transformers' within 1e-4
//! on the CPU backend; a folder rcx writes loads back with the same logits; bad folders
//! are clear errors naming the file and the key or tensor; the whole decoder's backward
//! matches central differences.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use rcx::checkpoint::{Head, load_model, write_model_weights};
use rcx::models::{Batch, HostModel};
use serde_json::Value;

const FAMILIES: [&str; 3] = ["llama", "mistral", "qwen2"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

/// transformers' batches and logits of each fixture model.
fn expected() -> Value {
    let text = fs::read_to_string(fixture("logits.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A fixture batch as rcx's `Batch` (right-padded ids, the mask).
fn batch_of(case: &Value) -> Batch {
    let rows = |key: &str| -> Vec<Vec<u32>> {
        case[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    let (ids, mask) = (rows("input_ids"), rows("attention_mask"));
    let (b, t) = (ids.len(), ids[0].len());
    Batch {
        input_ids: ids.concat(),
        token_type_ids: vec![0; b * t],
        mask: mask.concat().into_iter().map(|m| m as u8).collect(),
        b,
        t,
        groups: Vec::new(),
    }
}

/// The largest |rcx - transformers| over every batch of `family`, with the model at `dir`.
fn worst_logit_error(family: &str, model: HostModel<f32>) -> f64 {
    let mut model = model.on_cpu();
    let mut worst = 0.0f64;
    for case in expected()[family].as_array().unwrap() {
        let logits = model.forward(&batch_of(case), None).unwrap();
        let want: Vec<f64> = case["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(logits.len(), want.len());
        for (got, want) in logits.iter().zip(&want) {
            worst = worst.max((*got as f64 - want).abs());
        }
    }
    worst
}

#[test]
fn logits_equal_transformers() {
    for family in FAMILIES {
        let (model, fresh) = load_model(&fixture(family), Head::Stored).unwrap();
        assert!(fresh.is_empty());
        let worst = worst_logit_error(family, model);
        println!("{family}: largest |rcx - transformers| = {worst:.2e}");
        assert!(worst <= 1e-4, "{family}: {worst:e}");
    }
}

/// A copy of a fixture folder to break.
fn copy_fixture(family: &str, test: &str) -> PathBuf {
    let dir = common::scratch("llama_parity", test);
    for entry in fs::read_dir(fixture(family)).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

fn load_error(dir: &Path, head: Head) -> String {
    match load_model(dir, head) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => {
            assert_eq!(e.exit_code(), 2, "{e}");
            e.to_string()
        }
    }
}

#[test]
fn a_folder_rcx_writes_loads_back_with_the_same_logits() {
    for family in FAMILIES {
        let (model, _) = load_model(&fixture(family), Head::Stored).unwrap();
        let dir = common::scratch("llama_parity", &format!("saved_{family}"));
        write_model_weights(&dir, &model.weights()).unwrap();
        let (back, _) = load_model(&dir, Head::Stored).unwrap();
        assert_eq!(back.config, model.config, "{family}");
        assert_eq!(back.params, model.params, "{family}");
        let worst = worst_logit_error(family, back);
        assert!(worst <= 1e-4, "{family}: {worst:e}");
    }
}

#[test]
fn unsupported_rope_type_names_file_and_key() {
    let dir = copy_fixture("llama", "rope_type");
    edit_json(&dir.join("config.json"), |c| {
        c["rope_parameters"]["rope_type"] = "yarn".into();
    });
    let e = load_error(&dir, Head::Stored);
    assert!(
        e.contains("config.json") && e.contains("rope_parameters.rope_type"),
        "{e}"
    );
    assert!(e.contains("yarn") && !e.contains('\n'), "{e}");
}

#[test]
fn two_labels_are_refused() {
    let dir = copy_fixture("qwen2", "two_labels");
    edit_json(&dir.join("config.json"), |c| {
        c["id2label"] = serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"});
    });
    let e = load_error(&dir, Head::Stored);
    assert!(e.contains("config.json") && e.contains("num_labels"), "{e}");
}

#[test]
fn a_wrong_shape_names_the_tensor() {
    let dir = copy_fixture("llama", "wrong_shape");
    edit_json(&dir.join("config.json"), |c| {
        c["intermediate_size"] = 22.into()
    });
    let e = load_error(&dir, Head::Stored);
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(e.contains("mlp.gate_proj") && e.contains("[22, 16]"), "{e}");
}

#[test]
fn a_missing_tensor_names_the_file_and_the_tensor() {
    let dir = copy_fixture("mistral", "missing_tensor");
    let name = "model.layers.1.mlp.up_proj.weight";
    edit_json(&dir.join("model.safetensors.index.json"), |index| {
        index["weight_map"].as_object_mut().unwrap().remove(name);
    });
    let e = load_error(&dir, Head::FreshIfAbsent(3));
    assert!(
        e.contains("model.safetensors.index.json") && e.contains(name),
        "{e}"
    );
}

/// A folder without `score.weight` (a base model) trains from a fresh head; scoring
/// refuses it.
#[test]
fn a_missing_head_starts_fresh_only_for_training() {
    let dir = copy_fixture("mistral", "no_head");
    edit_json(&dir.join("model.safetensors.index.json"), |index| {
        index["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("score.weight");
    });
    let e = load_error(&dir, Head::Stored);
    assert!(
        e.contains("score.weight") && e.contains("trained reward model"),
        "{e}"
    );

    let (model, fresh) = load_model(&dir, Head::FreshIfAbsent(5)).unwrap();
    assert_eq!(fresh, ["score.weight"]);
    let head = &model.params[model.layout.get("score.weight").unwrap().range()];
    let std = (head.iter().map(|x| x * x).sum::<f32>() / head.len() as f32).sqrt();
    // transformers' init: normal(0, initializer_range = 0.02).
    assert!(std > 0.005 && std < 0.05, "{std}");
}

/// The whole decoder's backward against central differences in f64, per tensor
/// (`rcx::gradcheck::decoder_model_checks`: Llama with attention dropout, Qwen2 with its
/// biases, grouped-query attention, a padded batch; each on whole sequences and with the
/// shared prefix).
#[test]
fn whole_decoder_gradient_matches_finite_differences() {
    let checks = rcx::gradcheck::decoder_model_checks(42).unwrap();
    assert_eq!(checks.len(), 4);
    for check in &checks {
        println!("{check}");
        assert!(check.passed(), "{check}");
    }
}

/// Three training steps of the Llama fixture (f32, AdamW, the x_inv ranking loss on a
/// prompt's three completions) move every weight tensor, lower the loss, and the folder
/// rcx then writes loads back with the trained model's logits. The folder keeps rcx's
/// logits (`rcx_logits.json`) for the transformers check in the report.
#[test]
fn a_trained_decoder_saves_and_loads_back() {
    use rcx::backend::OptimStep;
    use rcx::loss::LossSpec;
    use rcx::models::MicroBatch;

    let (host, _) = load_model(&fixture("llama"), Head::Stored).unwrap();
    let before = host.params.clone();
    let mut model = host.on_cpu();
    model.start_training().unwrap();
    let case = &expected()["llama"][0];
    let batch = batch_of(case);
    let (ks, types) = ([batch.b], [None]);
    let micro = MicroBatch {
        batch: &batch,
        ks: &ks,
        types: &types,
        dropout: None,
    };
    let spec = LossSpec::parse("x_inv").unwrap();
    let mut losses = Vec::new();
    for step in 1..=3 {
        let opt = OptimStep {
            step,
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
        };
        let stats = model
            .train_step(std::slice::from_ref(&micro), &spec, 0.1, &opt)
            .unwrap();
        assert!(stats.loss.is_finite() && stats.grad_norm > 0.0, "{stats:?}");
        losses.push(stats.loss);
    }
    assert!(losses[2] < losses[0], "{losses:?}");

    let dir = common::scratch("llama_parity", "trained_llama");
    let unchanged: Vec<String> = model
        .with_weights(|weights, _, _| {
            write_model_weights(&dir, weights).unwrap();
            weights
                .layout
                .tensors
                .iter()
                .filter(|t| weights.params[t.range()] == before[t.range()])
                .map(|t| t.name.clone())
                .collect()
        })
        .unwrap();
    assert!(unchanged.is_empty(), "not trained: {unchanged:?}");

    let mut trained = Vec::new();
    for case in expected()["llama"].as_array().unwrap() {
        trained.push(model.forward(&batch_of(case), None).unwrap());
    }
    let (back, _) = load_model(&dir, Head::Stored).unwrap();
    let mut back = back.on_cpu();
    for (case, want) in expected()["llama"].as_array().unwrap().iter().zip(&trained) {
        assert_eq!(&back.forward(&batch_of(case), None).unwrap(), want);
    }
    fs::write(
        dir.join("rcx_logits.json"),
        serde_json::to_string(&trained).unwrap(),
    )
    .unwrap();
}

/// transformers 4's form of the same rotary settings (`rope_theta` beside `rope_scaling`
/// with `type`) gives the same model as transformers 5's `rope_parameters`.
#[test]
fn the_older_rope_scaling_keys_mean_the_same() {
    let dir = copy_fixture("llama", "rope_scaling_v4");
    edit_json(&dir.join("config.json"), |c| {
        let mut params = c["rope_parameters"].take();
        let obj = c.as_object_mut().unwrap();
        obj.remove("rope_parameters");
        obj.insert("rope_theta".into(), params["rope_theta"].take());
        let scaling = params.as_object_mut().unwrap();
        scaling.remove("rope_theta");
        let rope_type = scaling.remove("rope_type").unwrap();
        scaling.insert("type".into(), rope_type);
        obj.insert("rope_scaling".into(), params);
    });
    let (older, _) = load_model(&dir, Head::Stored).unwrap();
    let (newer, _) = load_model(&fixture("llama"), Head::Stored).unwrap();
    assert_eq!(older.config, newer.config);
}

/// Mistral's sliding window: rcx attends to every earlier token, so a batch longer than
/// the window is refused at the forward (shorter ones are exact).
#[test]
fn a_sequence_past_the_sliding_window_is_refused() {
    let dir = copy_fixture("mistral", "sliding_window");
    edit_json(&dir.join("config.json"), |c| c["sliding_window"] = 6.into());
    let (model, _) = load_model(&dir, Head::Stored).unwrap();
    let mut model = model.on_cpu();
    let cases = expected();
    let long = &cases["mistral"][0]; // 7 tokens
    let e = model.forward(&batch_of(long), None).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    let e = e.to_string();
    assert!(
        e.contains("sliding_window") && e.contains("max_length"),
        "{e}"
    );
    // One readable line: no run of spaces left by a broken line continuation.
    assert!(!e.contains("  ") && !e.contains('\n'), "{e}");
    let short = &cases["mistral"][2]; // 6 tokens
    let want = short["logits"][0].as_f64().unwrap();
    let got = model.forward(&batch_of(short), None).unwrap()[0] as f64;
    assert!((got - want).abs() <= 1e-4, "{got} {want}");
}

/// Sizes that cannot be held, and heads that do not group, are refused from config.json
/// before anything is allocated; an empty batch is an error, not a panic.
#[test]
fn impossible_sizes_are_refused_naming_the_key() {
    for (test, key, value, expect) in [
        ("huge_vocab", "vocab_size", 1u64 << 40, "too large"),
        ("huge_mlp", "intermediate_size", 1u64 << 33, "too large"),
        ("kv_heads", "num_key_value_heads", 3, "does not divide"),
        ("odd_head", "head_dim", 5, "odd"),
        ("zero_layers", "num_hidden_layers", 0, "positive"),
    ] {
        let dir = copy_fixture("llama", test);
        edit_json(&dir.join("config.json"), |c| c[key] = value.into());
        let e = load_error(&dir, Head::Stored);
        assert!(e.contains("config.json") && e.contains(key), "{e}");
        assert!(e.contains(expect), "{e}");
    }

    let (model, _) = load_model(&fixture("qwen2"), Head::Stored).unwrap();
    let empty = Batch {
        input_ids: vec![],
        token_type_ids: vec![],
        mask: vec![],
        b: 2,
        t: 0,
        groups: Vec::new(),
    };
    let e = model.on_cpu().forward(&empty, None).unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
}
