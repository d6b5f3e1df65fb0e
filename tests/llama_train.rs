//! Decoder reward models end to end through the `rcx` binary: `model_name: llama-tiny` trains
//! from scratch with the shipped byte-level BPE tokenizer, writes a folder holding its
//! tokenizer.json whose `rcx score` logits equal the model's own forward on the decoder
//! sequence (prompt with BOS, completion, EOS), resumes from a checkpoint bit for bit, and a
//! LlamaForSequenceClassification folder fine-tunes in place.

mod common;

use std::fs;

use common::{rcx, rcx_train, scratch, write_config};
use rcx::checkpoint::load_for_scoring;
use rcx::data::Batch;

const TINY: [(&str, &str); 6] = [
    ("model_name", "llama-tiny"),
    ("max_steps", "6"),
    ("eval_steps", "3"),
    ("save_steps", "3"),
    ("per_device_train_batch_size", "2"),
    ("max_length", "48"),
];

fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "rcx failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn llama_tiny_trains_scores_and_resumes() {
    let dir = scratch("llama_train", "tiny");
    let (config, out) = write_config(&dir, "run", &TINY, &[]);
    succeeded(&rcx_train(&config, &[]));
    for file in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "rcx.json",
    ] {
        assert!(out.join(file).is_file(), "{file} written");
    }
    assert!(
        !out.join("vocab.txt").exists(),
        "a decoder folder has no WordPiece vocabulary"
    );

    // `rcx score` reads the folder's own tokenizer; its logits are the model's forward on
    // the tokenizer's sequences.
    let data = common::fixture("lengths_eval.jsonl");
    let scored = rcx(&[
        "score",
        "--model",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    succeeded(&scored);
    let first: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&scored.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let (model, tok, _) = load_for_scoring(&out).unwrap();
    let record: serde_json::Value =
        serde_json::from_str(fs::read_to_string(&data).unwrap().lines().next().unwrap()).unwrap();
    let prompt = record["prompt"].as_str().unwrap();
    let completion = record["completions"][0].as_str().unwrap();
    let encoding = tok.encode_pair(prompt, completion, 48);
    // <|begin_of_text|> (0) first, <|end_of_text|> (1) last.
    assert_eq!(encoding.input_ids.first(), Some(&0), "BOS first");
    assert_eq!(encoding.input_ids.last(), Some(&1), "EOS last");
    let mask = vec![1u8; encoding.input_ids.len()];
    let batch = Batch::from_sequences([(&encoding.input_ids[..], &mask[..])], tok.pad_id());
    let logit = model.on_cpu().forward(&batch, None).unwrap()[0];
    let printed = first["logit"].as_f64().unwrap() as f32;
    assert!(
        (printed - logit).abs() <= 1e-5 * (1.0 + logit.abs()),
        "{printed} vs {logit}"
    );

    // Stopped at step 4 (between saves: the stop leaves a checkpoint), then resumed, it
    // ends where the uninterrupted run did.
    let (config_b, out_b) = write_config(&dir, "resumed", &TINY, &[]);
    succeeded(&rcx_train(&config_b, &["--stop-at", "4"]));
    succeeded(&rcx_train(&config_b, &["--resume"]));
    assert_eq!(
        fs::read(out.join("model.safetensors")).unwrap(),
        fs::read(out_b.join("model.safetensors")).unwrap(),
        "resumed weights equal the uninterrupted run's"
    );
}

#[test]
fn a_decoder_folder_fine_tunes_in_place() {
    let dir = scratch("llama_train", "folder");
    // The tiny run's folder is a LlamaForSequenceClassification folder with tokenizer.json:
    // fine-tune it as a user would a Hugging Face folder.
    let (config, base) = write_config(&dir, "base", &TINY, &[("max_steps", "2")]);
    succeeded(&rcx_train(&config, &[]));
    let base_str = base.display().to_string();
    let (config, out) = write_config(
        &dir,
        "tuned",
        &TINY,
        &[("model_name", &base_str), ("max_steps", "2")],
    );
    succeeded(&rcx_train(&config, &[]));
    assert!(out.join("tokenizer.json").is_file());
    let before = fs::read(base.join("model.safetensors")).unwrap();
    let after = fs::read(out.join("model.safetensors")).unwrap();
    assert_ne!(before, after, "two steps moved the weights");
    assert_eq!(
        fs::read(base.join("tokenizer.json")).unwrap(),
        fs::read(out.join("tokenizer.json")).unwrap(),
        "the tokenizer travels with the model"
    );
    // A folder without its tokenizer is a one-line error naming what is missing.
    fs::remove_file(base.join("tokenizer.json")).unwrap();
    let scored = rcx(&[
        "score",
        "--model",
        &base_str,
        "--data",
        common::fixture("lengths_eval.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(scored.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&scored.stderr);
    assert!(
        stderr.contains("tokenizer.json") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
}
