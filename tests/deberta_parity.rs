//! DeBERTa-v2/v3 reward models against transformers: folders written by
//! scripts/gen_deberta_fixtures.py (tiny random `DebertaV2ForSequenceClassification`, one
//! with v3's structure, one with the other branches) load, and their logits on padded
//! batches equal transformers' within 1e-4 on the CPU backend; a folder rcx writes loads
//! back with the same logits; bad configs are one-line errors naming the file and key.

use std::fs;
use std::path::{Path, PathBuf};

use rcx::checkpoint::{Head, load_model, write_model_weights};
use rcx::error::Error;
use rcx::models::{Batch, HostModel};
use serde_json::Value;

const MODELS: [&str; 2] = ["v3", "v2"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/deberta")
        .join(name)
}

fn expected() -> Value {
    serde_json::from_str(&fs::read_to_string(fixture("logits.json")).unwrap()).unwrap()
}

fn batch_of(case: &Value) -> Batch {
    let rows = |key: &str| -> Vec<u32> {
        case[key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
            })
            .collect()
    };
    let b = case["input_ids"].as_array().unwrap().len();
    let ids = rows("input_ids");
    let t = ids.len() / b;
    Batch {
        input_ids: ids,
        token_type_ids: rows("token_type_ids"),
        mask: rows("attention_mask")
            .into_iter()
            .map(|m| m as u8)
            .collect(),
        b,
        t,
        groups: Vec::new(),
    }
}

/// The largest |rcx - transformers| over every batch of `name`.
fn worst_logit_error(name: &str, model: HostModel<f32>) -> f64 {
    let mut model = model.on_cpu();
    let mut worst = 0.0f64;
    let mut compared = 0;
    for case in expected()[name].as_array().unwrap() {
        let logits = model.forward(&batch_of(case), None).unwrap();
        let want = case["logits"].as_array().unwrap();
        assert_eq!(logits.len(), want.len());
        for (got, want) in logits.iter().zip(want) {
            worst = worst.max((*got as f64 - want.as_f64().unwrap()).abs());
            compared += 1;
        }
    }
    assert_eq!(compared, 5, "{name}: every fixture logit compared");
    worst
}

#[test]
fn logits_equal_transformers() {
    for name in MODELS {
        let (model, fresh) = load_model(&fixture(name), Head::Stored).unwrap();
        assert!(fresh.is_empty());
        let worst = worst_logit_error(name, model);
        println!("{name}: largest logit difference {worst:e}");
        assert!(
            worst < 1e-4,
            "{name}: logits differ from transformers' by {worst}"
        );
    }
}

#[test]
fn a_folder_rcx_writes_loads_back_with_the_same_logits() {
    for name in MODELS {
        let (model, _) = load_model(&fixture(name), Head::Stored).unwrap();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deberta_written_{name}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        write_model_weights(&dir, &model.weights()).unwrap();
        let (back, _) = load_model(&dir, Head::Stored).unwrap();
        assert_eq!(back.params, model.params, "{name}: weights round trip");
        assert_eq!(back.config, model.config, "{name}: config round trip");
        let worst = worst_logit_error(name, back);
        assert!(worst < 1e-4, "{name}: {worst}");
    }
}

#[test]
fn a_pretrained_folder_without_the_head_trains_but_does_not_score() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deberta_no_head");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let (model, _) = load_model(&fixture("v3"), Head::Stored).unwrap();
    // The encoder alone, as a pretrained DebertaV2Model folder stores it.
    let layout = model.layout.clone();
    let kept: Vec<(String, Vec<usize>, Vec<f32>)> = layout
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("deberta."))
        .map(|t| {
            (
                t.name.clone(),
                t.shape.clone(),
                model.params[t.range()].to_vec(),
            )
        })
        .collect();
    let refs: Vec<(&str, &[usize], &[f32])> = kept
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    rcx::safetensors::write_f32(&dir.join("model.safetensors"), &refs, &[]).unwrap();
    fs::copy(fixture("v3/config.json"), dir.join("config.json")).unwrap();
    let (_, fresh) = load_model(&dir, Head::FreshIfAbsent(3)).unwrap();
    assert_eq!(
        fresh,
        [
            "pooler.dense.weight",
            "pooler.dense.bias",
            "classifier.weight",
            "classifier.bias"
        ]
    );
    match load_model(&dir, Head::Stored) {
        Err(Error::User(message)) => assert!(message.contains("pooler.dense.weight"), "{message}"),
        other => panic!("expected a user error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn unsupported_configs_are_one_line_errors_naming_the_key() {
    let base: Value =
        serde_json::from_str(&fs::read_to_string(fixture("v3/config.json")).unwrap()).unwrap();
    let cases: [(&str, Value, &str); 6] = [
        ("conv_kernel_size", Value::from(3), "convolution"),
        ("num_labels", Value::from(2), "one label"),
        ("hidden_act", Value::from("relu"), "gelu"),
        ("pos_att_type", serde_json::json!(["p2p"]), "p2p"),
        ("norm_rel_ebd", Value::from("batch_norm"), "batch_norm"),
        ("model_type", Value::from("deberta"), "deberta-v2"),
    ];
    for (key, value, says) in cases {
        let mut config = base.clone();
        config[key] = value;
        if key == "num_labels" {
            config.as_object_mut().unwrap().remove("id2label");
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deberta_bad_{key}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(
            fixture("v3/model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
        fs::write(
            dir.join("config.json"),
            serde_json::to_string(&config).unwrap(),
        )
        .unwrap();
        let path = rcx::models::DebertaConfig::from_hf_json(&dir.join("config.json"));
        match path {
            Err(Error::User(message)) => {
                assert!(!message.contains('\n'), "{message}");
                assert!(message.contains("config.json"), "{message}");
                assert!(
                    message.contains(key) && message.contains(says),
                    "{key}: {message}"
                );
            }
            other => panic!("{key}: expected a user error, got {other:?}"),
        }
    }
}

/// The whole model's backward against central differences in f64
/// (`rcx::gradcheck::deberta_model_checks`: v3's structure with dropout, v2's branches in
/// eval and training mode).
#[test]
fn the_whole_models_backward_matches_central_differences() {
    let checks = rcx::gradcheck::deberta_model_checks(42).unwrap();
    assert_eq!(checks.len(), 3);
    for check in checks {
        println!("{check}");
        assert!(check.passed(), "{check}");
    }
}

/// A folder transformers wrote (DebertaV2ForSequenceClassification, random weights) with a
/// DeBERTa-v3 tokenizer beside it, as either file: `rcx score` gives transformers' logits
/// for (prompt, completion) texts that no tokenizer test holds, the pair encoded as the
/// `tokenizers` library encodes it (`[CLS] prompt [SEP] completion [SEP]`).
#[test]
fn a_transformers_folder_with_its_tokenizer_scores_as_transformers() {
    let cases = expected()["v3_tokenized"].clone();
    let unigram = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unigram/deberta");
    for tokenizer in ["tokenizer.json", "spm.model"] {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deberta_scored_{tokenizer}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for file in ["config.json", "model.safetensors"] {
            fs::copy(fixture("v3_tokenized").join(file), dir.join(file)).unwrap();
        }
        fs::copy(unigram.join(tokenizer), dir.join(tokenizer)).unwrap();
        let data = dir.join("data.jsonl");
        let lines: Vec<String> = cases
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                serde_json::json!({"prompt": c["prompt"], "completions": c["completions"]})
                    .to_string()
            })
            .collect();
        fs::write(&data, lines.join("\n") + "\n").unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rcx"))
            .args([
                "score",
                "--model",
                dir.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut compared = 0;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let scored: Value = serde_json::from_str(line).unwrap();
            let (p, j) = (
                scored["prompt_index"].as_u64().unwrap() as usize,
                scored["completion_index"].as_u64().unwrap() as usize,
            );
            let want = cases[p]["logits"][j].as_f64().unwrap();
            let got = scored["logit"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-4,
                "{tokenizer}: prompt {p} completion {j}: {got} vs {want}"
            );
            compared += 1;
        }
        assert_eq!(compared, 6, "{tokenizer}: every completion scored");
    }
}
