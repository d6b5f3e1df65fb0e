//! Forward parity with Hugging Face `transformers`: rcx's outputs for committed inputs equal
//! the fixtures that scripts/gen_parity_fixtures.py wrote with transformers (eval mode,
//! float32), padding in the batch included. Tolerance: max abs error 1e-4 (the issue's).

mod common;

use rcx::checkpoint::load_model_dir;
use rcx::models::{Batch, HostModel};
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
        groups: Vec::new(),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn run(model: HostModel<f32>, batch: &Batch) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut model = model.on_cpu();
    model.forward(batch, None).unwrap();
    model.outputs().unwrap()
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
    let (hidden, pooled, logits) = run(model, &batch);
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
    let (hidden, _, _) = run(model, &batch);
    let (_, expected) = dense(&f["last_hidden_state"]);
    let err = max_abs_diff(&hidden, &expected);
    assert!(
        err < TOLERANCE,
        "MiniLM last hidden state: max abs error {err:e}"
    );
}

/// The other direction: a model folder that rcx WRITES loads in transformers'
/// BertForSequenceClassification (strictly: no missing, unexpected or reshaped tensor) and
/// gives rcx's logits. scripts/gen_rcx_written_fixture.py loaded the folder this test
/// writes and recorded the sha256 of its files and transformers' logits; the folder must
/// still be byte-identical to that one (else what rcx writes changed and the fixture is to
/// be made again from the new folder, as the failure says).
#[test]
fn transformers_loads_an_rcx_written_folder_with_rcx_logits() {
    let dir = rcx_written_folder();
    let regenerate = format!(
        "python3 scripts/gen_rcx_written_fixture.py {}",
        dir.display()
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/rcx-written.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; make it with `{regenerate}`", path.display()));
    let f: Value = serde_json::from_str(&text).unwrap();
    let hashed = f["sha256"].as_object().unwrap();
    assert!(hashed.contains_key("model.safetensors") && hashed.contains_key("config.json"));
    for (file, expected) in hashed {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        assert_eq!(
            &Value::String(sha256_hex(&bytes)),
            expected,
            "rcx now writes another {file} than the one transformers was checked on: \
             check it loads and regenerate with `{regenerate}`"
        );
    }
    let model = load_model_dir(&dir, 0).unwrap();
    let batch = batch_of(&f);
    assert!(batch.mask.contains(&0), "the batch must hold padding");
    let (_, _, logits) = run(model, &batch);
    let (shape, expected) = dense(&f["logits"]);
    assert_eq!(shape, [batch.b, 1]);
    let err = max_abs_diff(&logits, &expected);
    assert!(err < TOLERANCE, "logits: max abs error {err:e}");
    // Spread logits: equal ones would match whatever the head did.
    let spread = expected.iter().fold(f32::MIN, |m, &x| m.max(x))
        - expected.iter().fold(f32::MAX, |m, &x| m.min(x));
    assert!(spread > 0.1, "logits {expected:?}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes, through rcx's own model-folder writer (`save_final`), a small BERT with seeded
/// weights spread wide enough for every non-linearity to matter, and its vocabulary.
fn rcx_written_folder() -> PathBuf {
    use rcx::models::BertConfig;
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("parity-tests");
    let dir = root.join("rcx-written");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    let arch = BertConfig {
        vocab_size: 50,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 37,
        max_position_embeddings: 24,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pad_token_id: 0,
    };
    let mut model = HostModel::<f32>::init(arch.clone(), 3);
    let mut rng = rcx::rng::Rng::new(17);
    // BERT's init (std 0.02) leaves logits near 0; noise of std 0.3 spreads them. The
    // padding row (the first hidden_size entries) stays zero, as transformers keeps it.
    for p in model.params.iter_mut().skip(arch.hidden_size) {
        *p += (0.3 * rng.normal()) as f32;
    }
    let vocab = root.join("vocab.txt");
    let tokens: String = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .into_iter()
        .map(String::from)
        .chain((5..arch.vocab_size).map(|i| format!("tok{i}")))
        .map(|t| t + "\n")
        .collect();
    std::fs::write(&vocab, tokens).unwrap();
    let config = common::RunConfig::length_ranking(&dir)
        .set(&[("max_steps", "1")])
        .write(&root.join("rcx-written.yml"));
    let cfg = rcx::config::Config::load(&config).unwrap();
    rcx::checkpoint::save_final(&cfg, &model.weights(), &vocab).unwrap();
    dir
}
