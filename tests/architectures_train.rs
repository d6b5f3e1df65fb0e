//! The from-scratch architectures besides BERT, end to end through the `rcx` binary:
//! `deberta-v3-tiny` (shipped SentencePiece tokenizer, `[CLS] prompt [SEP] completion [SEP]`)
//! and `llama-tiny` (shipped byte-level BPE, BOS prompt completion EOS) each train, write a
//! folder holding their tokenizer file whose `rcx score` logits equal the model's own forward
//! on the tokenizer's sequence, resume from a checkpoint bit for bit, and fine-tune in place
//! as a Hugging Face folder (DebertaV2/LlamaForSequenceClassification); a folder without its
//! tokenizer is a one-line error.

mod common;

use std::fs;
use std::process::Output;

use common::{rcx, rcx_train, scratch, write_config};
use rcx::checkpoint::load_for_scoring;
use rcx::data::Batch;

/// A from-scratch architecture: its name, its folder's tokenizer file, and the ids that
/// open and close each of its sequences.
struct Arch {
    name: &'static str,
    tokenizer: &'static str,
    first: u32,
    last: u32,
}

const ARCHES: [Arch; 2] = [
    // [CLS] 1 ... [SEP] 2
    Arch {
        name: "deberta-v3-tiny",
        tokenizer: "spm.model",
        first: 1,
        last: 2,
    },
    // <|begin_of_text|> 0 ... <|end_of_text|> 1
    Arch {
        name: "llama-tiny",
        tokenizer: "tokenizer.json",
        first: 0,
        last: 1,
    },
];

fn tiny(name: &str) -> [(&str, &str); 6] {
    [
        ("model_name", name),
        ("max_steps", "6"),
        ("eval_steps", "3"),
        ("save_steps", "3"),
        ("per_device_train_batch_size", "2"),
        ("max_length", "48"),
    ]
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "rcx failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn score(model: &str) -> Output {
    let data = common::fixture("lengths_eval.jsonl");
    rcx(&["score", "--model", model, "--data", data.to_str().unwrap()])
}

#[test]
fn each_architecture_trains_scores_and_resumes() {
    for arch in &ARCHES {
        let dir = scratch("architectures_train", arch.name);
        let (config, out) = write_config(&dir, "run", &tiny(arch.name), &[]);
        succeeded(&rcx_train(&config, &[]));
        for file in [
            "model.safetensors",
            "config.json",
            arch.tokenizer,
            "rcx.json",
        ] {
            assert!(out.join(file).is_file(), "{}: {file} written", arch.name);
        }
        assert!(
            !out.join("vocab.txt").exists(),
            "{}: no WordPiece vocabulary",
            arch.name
        );

        // `rcx score` reads the folder's own tokenizer; its logits are the model's forward
        // on the tokenizer's sequence.
        let scored = score(out.to_str().unwrap());
        succeeded(&scored);
        let stdout = String::from_utf8_lossy(&scored.stdout);
        let first: serde_json::Value =
            serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
        let (model, tok, _) = load_for_scoring(&out).unwrap();
        let data = fs::read_to_string(common::fixture("lengths_eval.jsonl")).unwrap();
        let record: serde_json::Value = serde_json::from_str(data.lines().next().unwrap()).unwrap();
        let (prompt, completion) = (
            record["prompt"].as_str().unwrap(),
            record["completions"][0].as_str().unwrap(),
        );
        let ids = tok.encode_pair(prompt, completion, 48).input_ids;
        assert_eq!(
            (ids.first(), ids.last()),
            (Some(&arch.first), Some(&arch.last)),
            "{}",
            arch.name
        );
        let mask = vec![1u8; ids.len()];
        let batch = Batch::from_sequences([(&ids[..], &mask[..])], tok.pad_id());
        let logit = model.on_cpu().forward(&batch, None).unwrap()[0];
        let printed = first["logit"].as_f64().unwrap() as f32;
        assert!(
            (printed - logit).abs() <= 1e-5 * (1.0 + logit.abs()),
            "{}: {printed} vs {logit}",
            arch.name
        );

        // Stopped at step 4 (between saves: the stop leaves a checkpoint), then resumed, it
        // ends where the uninterrupted run did.
        let (config_b, out_b) = write_config(&dir, "resumed", &tiny(arch.name), &[]);
        succeeded(&rcx_train(&config_b, &["--stop-at", "4"]));
        succeeded(&rcx_train(&config_b, &["--resume"]));
        assert_eq!(
            fs::read(out.join("model.safetensors")).unwrap(),
            fs::read(out_b.join("model.safetensors")).unwrap(),
            "{}: resumed weights equal the uninterrupted run's",
            arch.name
        );
    }
}

#[test]
fn each_architectures_folder_fine_tunes_in_place() {
    for arch in &ARCHES {
        let dir = scratch("architectures_train", &format!("{}-folder", arch.name));
        // A tiny run's folder is a Hugging Face folder with its tokenizer: fine-tune it as a
        // user would.
        let (config, base) = write_config(&dir, "base", &tiny(arch.name), &[("max_steps", "2")]);
        succeeded(&rcx_train(&config, &[]));
        let base_str = base.display().to_string();
        let (config, out) = write_config(
            &dir,
            "tuned",
            &tiny(arch.name),
            &[("model_name", &base_str), ("max_steps", "2")],
        );
        succeeded(&rcx_train(&config, &[]));
        let read = |dir: &std::path::Path, file: &str| fs::read(dir.join(file)).unwrap();
        assert_ne!(
            read(&base, "model.safetensors"),
            read(&out, "model.safetensors"),
            "{}: two steps moved the weights",
            arch.name
        );
        assert_eq!(
            read(&base, arch.tokenizer),
            read(&out, arch.tokenizer),
            "{}: the tokenizer travels with the model",
            arch.name
        );
        // A folder without its tokenizer is a one-line error naming what is missing.
        fs::remove_file(base.join(arch.tokenizer)).unwrap();
        let scored = score(&base_str);
        assert_eq!(scored.status.code(), Some(2), "{}", arch.name);
        let stderr = String::from_utf8_lossy(&scored.stderr);
        assert!(
            stderr.contains(arch.tokenizer) && stderr.trim().lines().count() == 1,
            "{}: {stderr}",
            arch.name
        );
    }
}
