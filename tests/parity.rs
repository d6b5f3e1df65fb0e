//! Forward parity with Hugging Face `transformers`: rcx's outputs for committed inputs equal
//! the fixtures that scripts/gen_parity_fixtures.py wrote with transformers (eval mode,
//! float32), padding in the batch included. Tolerance: max abs error 1e-4 (the issue's).

use rcx::checkpoint::load_model_dir;
use rcx::model::{Batch, BertModel, Workspace};
use serde_json::Value;
use std::path::{Path, PathBuf};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
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
}

fn dense(v: &Value) -> (Vec<usize>, Vec<f32>) {
    let shape = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let data = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (shape, data)
}

fn batch_of(f: &Value) -> Batch {
    let ids = ints(&f["input_ids"]);
    let types = ints(&f["token_type_ids"]);
    let mask = ints(&f["attention_mask"]);
    let (b, t) = (ids.len(), ids[0].len());
    Batch {
        input_ids: ids.concat(),
        token_type_ids: types.concat(),
        mask: mask.concat().into_iter().map(|m| m as u8).collect(),
        b,
        t,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn run(model: &BertModel<f32>, batch: &Batch) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut ws = Workspace::new();
    model.forward(&mut ws, batch, None).unwrap();
    let (hidden, pooled, logits) = model.outputs(&ws);
    (hidden.to_vec(), pooled.to_vec(), logits.to_vec())
}

#[test]
fn tiny_checkpoint_logits_hidden_states_and_pooler_match_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/tiny-bert");
    let model = load_model_dir(&dir, 0).unwrap();
    let f = fixture("tiny-bert-logits.json");
    let batch = batch_of(&f);
    assert!(
        batch.mask.contains(&0),
        "the fixture batch must hold padding"
    );
    let (hidden, pooled, logits) = run(&model, &batch);
    for (name, ours) in [
        ("logits", &logits),
        ("pooler_output", &pooled),
        ("last_hidden_state", &hidden),
    ] {
        let (_, expected) = dense(&f[name]);
        let err = max_abs_diff(ours, &expected);
        assert!(err < TOLERANCE, "{name}: max abs error {err:e}");
    }
    // The logits are not trivially equal to each other (the check has teeth).
    assert!((logits[0] - logits[1]).abs() > 1e-3);
}

fn minilm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".models/all-MiniLM-L6-v2")
}

#[test]
fn minilm_hidden_states_match_transformers() {
    let dir = minilm_dir();
    if !dir.join("model.safetensors").exists() {
        // .ci/run fetches it and sets RCX_REQUIRE_MINILM=1, so that CI fails rather than
        // skips; a developer machine may not have it yet.
        assert!(
            std::env::var("RCX_REQUIRE_MINILM").map_or(true, |v| v != "1"),
            "RCX_REQUIRE_MINILM=1 but {} is absent; run scripts/fetch-minilm.sh",
            dir.display()
        );
        eprintln!(
            "SKIPPED: {} is absent; run scripts/fetch-minilm.sh",
            dir.display()
        );
        return;
    }
    let model = load_model_dir(&dir, 0).unwrap();
    let f = fixture("minilm-hidden.json");
    let batch = batch_of(&f);
    assert!(
        batch.mask.contains(&0),
        "the fixture batch must hold padding"
    );
    let (hidden, _, _) = run(&model, &batch);
    let (_, expected) = dense(&f["last_hidden_state"]);
    let err = max_abs_diff(&hidden, &expected);
    assert!(
        err < TOLERANCE,
        "MiniLM last hidden state: max abs error {err:e}"
    );
}
