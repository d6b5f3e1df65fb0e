//! `rcx train` and `rcx score` end to end, through the built binary: a tiny model learns
//! a length ranking, a stopped and resumed run ends bit for bit where an uninterrupted one
//! does, runs are deterministic per seed, `rcx score` prints what the library computes,
//! and a diverging run stops with exit code 3 at the step where its loss or weights stop
//! being finite, having saved nothing non-finite.
//!
//! The data (tests/fixtures/train/, written by scripts/gen_train_fixtures.py) are the
//! paper's construction in miniature: K = 4 prefixes of one word sequence, longer is
//! better. Every run is bert-tiny with sequences of at most 48 tokens, so each test takes
//! seconds in release.

use rcx::checkpoint::load_for_scoring;
use rcx::models::Batch;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{fixture, rcx, rcx_train, write_config};

fn scratch(name: &str) -> PathBuf {
    common::scratch("train-tests", name)
}

/// Writes `dir/NAME.yml`: a 20-step run on the length ranking into `dir/NAME`, with
/// `overrides` replacing or adding keys. Returns (config, output_dir).
fn config(dir: &Path, name: &str, overrides: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let base = [
        ("learning_rate", "1.0e-3"),
        ("warmup_ratio", "0.1"),
        ("per_device_train_batch_size", "4"),
        ("max_length", "48"),
        ("max_steps", "20"),
        ("eval_steps", "5"),
        ("save_steps", "10"),
        ("seed", "1"),
    ];
    write_config(dir, name, &base, overrides)
}

/// Runs rcx and fails the test with its stderr unless it succeeds.
fn rcx_ok(args: &[&str]) -> Output {
    let out = rcx(args);
    assert!(
        out.status.success(),
        "rcx {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn train(config: &Path, extra: &[&str]) -> Output {
    let out = rcx_train(config, extra);
    assert!(
        out.status.success(),
        "rcx train {extra:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The lines of a run's metrics.jsonl, without the wall-clock field (which differs from
/// run to run by nature).
fn metrics(out_dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("elapsed_s");
            v
        })
        .collect()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn checkpoint_names(out_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("checkpoint-"))
        .collect();
    names.sort();
    names
}

#[test]
fn x_inv_learns_the_length_ranking() {
    let dir = scratch("learns");
    let (cfg, out) = config(&dir, "run", &[]);
    train(&cfg, &[]);
    let lines = metrics(&out);
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [5, 10, 15, 20]);
    let first = lines[0]["eval_loss"].as_f64().unwrap();
    let last = lines.last().unwrap()["eval_loss"].as_f64().unwrap();
    // x_inv's pair loss is 0 for tied rewards and -9.09 for a perfect 1-vs-0 pair; an
    // untrained model ties everything, a trained one spreads the four rewards.
    assert!(
        last < first - 1.0,
        "eval loss did not fall: first {first}, last {last}"
    );
    let accuracy = lines.last().unwrap()["pairwise_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.9, "final pairwise accuracy {accuracy}");
    // The final model folder is what `transformers` and `rcx score` read.
    for file in ["model.safetensors", "config.json", "vocab.txt", "rcx.json"] {
        assert!(
            out.join(file).is_file(),
            "{file} missing from {}",
            out.display()
        );
    }
    // Two newest checkpoints kept; each is complete.
    assert_eq!(checkpoint_names(&out), ["checkpoint-10", "checkpoint-20"]);
    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(out.join("checkpoint-20").join(file).is_file());
    }
}

/// Dropout on and two micro-batches per step, so that the random streams and the
/// accumulation both have to line up after a resume.
const RESUME_KEYS: &[(&str, &str)] = &[
    ("max_steps", "12"),
    ("per_device_train_batch_size", "2"),
    ("gradient_accumulation_steps", "2"),
    ("dropout", "0.1"),
    ("eval_steps", "2"),
    ("save_steps", "4"),
];

#[test]
fn stop_and_resume_matches_an_uninterrupted_run_bit_for_bit() {
    let dir = scratch("resume");
    let (cfg_a, out_a) = config(&dir, "a", RESUME_KEYS);
    let (cfg_b, out_b) = config(&dir, "b", RESUME_KEYS);
    train(&cfg_a, &[]);

    // Stopped at 6, between two saves: the stop itself leaves a checkpoint.
    train(&cfg_b, &["--stop-at", "6"]);
    assert_eq!(checkpoint_names(&out_b), ["checkpoint-4", "checkpoint-6"]);
    assert!(!out_b.join("model.safetensors").exists());
    // A save killed half way (its temporary folder left behind) is neither resumed from
    // nor left lying around once that step is saved again.
    let killed = out_b.join(".checkpoint-8.tmp");
    std::fs::create_dir_all(&killed).unwrap();
    std::fs::write(killed.join("model.safetensors"), b"half a file").unwrap();
    train(&cfg_b, &["--resume"]);
    assert!(
        !killed.exists(),
        "the killed save's temporary folder is still there"
    );

    assert!(
        read(&out_a.join("model.safetensors")) == read(&out_b.join("model.safetensors")),
        "the resumed run's final weights differ from the uninterrupted run's"
    );
    assert!(
        read(&out_a.join("checkpoint-12/optimizer.safetensors"))
            == read(&out_b.join("checkpoint-12/optimizer.safetensors")),
        "the resumed run's optimizer moments differ"
    );
    // Same metrics, each step once (steps 2..12, every 2).
    let (ma, mb) = (metrics(&out_a), metrics(&out_b));
    assert_eq!(ma.len(), 6);
    assert_eq!(ma, mb);

    // A run killed after its step-6 evaluation but before any save past checkpoint-4:
    // resuming from 4 computes steps 5 and 6 again; metrics.jsonl must not list them twice.
    let (cfg_c, out_c) = config(&dir, "c", RESUME_KEYS);
    train(&cfg_c, &["--stop-at", "6"]);
    std::fs::remove_dir_all(out_c.join("checkpoint-6")).unwrap();
    assert_eq!(
        metrics(&out_c).len(),
        3,
        "evaluations at 2, 4 and 6 before the kill"
    );
    train(&cfg_c, &["--resume"]);
    assert_eq!(metrics(&out_c), ma);
    assert!(read(&out_c.join("model.safetensors")) == read(&out_a.join("model.safetensors")));
}

#[test]
fn runs_are_deterministic_per_seed() {
    let dir = scratch("determinism");
    let keys = &[
        ("max_steps", "4"),
        ("eval_steps", "4"),
        ("save_steps", "4"),
        ("gradient_accumulation_steps", "2"),
        ("dropout", "0.1"),
    ];
    let (cfg_1, out_1) = config(&dir, "one", keys);
    let (cfg_2, out_2) = config(&dir, "two", keys);
    let mut other = keys.to_vec();
    other.push(("seed", "2"));
    let (cfg_3, out_3) = config(&dir, "other", &other);
    for cfg in [&cfg_1, &cfg_2, &cfg_3] {
        train(cfg, &[]);
    }
    let weights = |out: &Path| read(&out.join("model.safetensors"));
    assert!(
        weights(&out_1) == weights(&out_2),
        "same seed, different weights"
    );
    assert!(
        weights(&out_1) != weights(&out_3),
        "another seed gave the same weights"
    );
    assert_eq!(metrics(&out_1), metrics(&out_2));
}

#[test]
fn score_prints_the_library_logits_in_file_order() {
    let dir = scratch("score");
    let (cfg, out) = config(&dir, "run", &[("max_steps", "10"), ("eval_steps", "10")]);
    train(&cfg, &[]);
    let data = fixture("lengths_eval.jsonl");
    let printed = rcx_ok(&[
        "score",
        "--model",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let lines: Vec<Value> = String::from_utf8(printed.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // The library's forward, one sequence at a time (no padding), on the pairs that the
    // tokenizer makes of the data file as read here.
    let (model, tok, meta) = load_for_scoring(&out).unwrap();
    let meta = meta.expect("rcx writes rcx.json beside its models");
    assert_eq!(
        meta.max_length, 48,
        "rcx.json carries the training max_length"
    );
    assert_eq!(meta.loss, "x_inv");
    let max_length = meta.max_length;
    let mut model = model.on_cpu();
    let mut expected = Vec::new();
    for (p, line) in std::fs::read_to_string(&data).unwrap().lines().enumerate() {
        let record: Value = serde_json::from_str(line).unwrap();
        let prompt = record["prompt"].as_str().unwrap();
        for (c, completion) in record["completions"].as_array().unwrap().iter().enumerate() {
            let enc = tok.encode_pair(prompt, completion.as_str().unwrap(), max_length);
            let types: Vec<u8> = enc.token_type_ids.iter().map(|&t| t as u8).collect();
            let batch = Batch::from_sequences([(&enc.input_ids[..], &types[..])], tok.pad_id());
            let logit = model.forward(&batch, None).unwrap()[0];
            expected.push((p, c, logit));
        }
    }
    assert_eq!(lines.len(), expected.len(), "one line per completion");
    let mut distinct = Vec::new();
    for (line, &(p, c, logit)) in lines.iter().zip(&expected) {
        assert_eq!(line["prompt_index"].as_u64(), Some(p as u64), "{line}");
        assert_eq!(line["completion_index"].as_u64(), Some(c as u64), "{line}");
        let printed_logit = line["logit"].as_f64().unwrap();
        // Batched with padding there, alone here: equal up to f32 summation order.
        assert!(
            (printed_logit - logit as f64).abs() < 1e-4,
            "prompt {p} completion {c}: printed {printed_logit}, library {logit}"
        );
        let reward = line["reward"].as_f64().unwrap();
        // The f32 logit exactly, not its shortest decimal read as f64.
        let exact = printed_logit as f32 as f64;
        let sigmoid = 1.0 / (1.0 + (-exact).exp());
        assert!((reward - sigmoid).abs() < 1e-12, "{line}");
        distinct.push(printed_logit);
    }
    // A trained model tells the completions apart: the comparison above is not between
    // constants.
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    assert!(
        distinct.len() > expected.len() / 2,
        "too few distinct logits"
    );
}

/// `rcx train` that must stop as diverged: exit code 3, one line, no panic. Its stderr.
fn train_diverges(cfg: &Path) -> String {
    let result = rcx(&["train", cfg.to_str().unwrap(), "--quiet"]);
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(result.status.code(), Some(3), "{}: {stderr}", result.status);
    stderr
}

#[test]
fn a_diverging_run_stops_at_the_first_non_finite_step_and_keeps_its_checkpoint() {
    // An absurd learning rate is well-formed config: AdamW's first update moves every
    // weight by about the learning rate, so the next forward pass overflows f32.
    let dir = scratch("diverge");
    let (cfg, out) = config(
        &dir,
        "run",
        &[
            ("learning_rate", "1.0e30"),
            ("warmup_ratio", "0"),
            ("max_steps", "10"),
            ("save_steps", "1"),
            ("eval_steps", "100"),
        ],
    );
    let stderr = train_diverges(&cfg);
    let kept = out.join("checkpoint-1");
    // Where, what, what is kept, and what could be changed: not the learning rate alone.
    assert!(
        stderr.contains(cfg.to_str().unwrap())
            && stderr.contains("diverged at step 2")
            && stderr.contains("loss is not finite")
            && stderr.contains(kept.to_str().unwrap())
            && stderr.contains("learning_rate")
            && stderr.contains("max_grad_norm")
            && stderr.contains("warmup_ratio"),
        "{stderr}"
    );
    assert!(!stderr.contains(": learning_rate:"), "{stderr}");
    // Step 1 was finite and saved; nothing of step 2 was written.
    assert_eq!(checkpoint_names(&out), ["checkpoint-1"]);
    assert!(!out.join("model.safetensors").exists());
    load_for_scoring(&kept).expect("the kept checkpoint loads");
}

#[test]
fn an_update_that_overflows_is_never_saved() {
    // 1e39 does not fit in f32: the first update itself makes weights infinite while the
    // loss and gradient of that step were finite. Before any save, the run must see it.
    let dir = scratch("overflow");
    let (cfg, out) = config(
        &dir,
        "run",
        &[
            ("learning_rate", "1.0e39"),
            ("warmup_ratio", "0"),
            ("max_steps", "1"),
            ("save_steps", "1"),
            ("eval_steps", "1"),
        ],
    );
    let stderr = train_diverges(&cfg);
    assert!(
        stderr.contains("diverged at step 1")
            && stderr.contains("weights")
            && stderr.contains("not finite")
            && stderr.contains("no checkpoint"),
        "{stderr}"
    );
    assert_eq!(checkpoint_names(&out), Vec::<String>::new());
    for file in ["model.safetensors", "metrics.jsonl"] {
        assert!(!out.join(file).exists(), "{file} was written");
    }
}
