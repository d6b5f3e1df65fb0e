//! safetensors reading/writing and Hugging Face BERT config.json reading/writing.
//! Fixtures come from scripts/gen_parity_fixtures.py (the Python `safetensors` library and
//! `transformers`).

use std::path::{Path, PathBuf};

use rcx::error::Error;
use rcx::hf_config::{HfBertConfig, read_hf_config, write_hf_config};
use rcx::models::BertConfig;
use rcx::safetensors::{Dtype, SafeTensors, write_f32};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// A fresh, empty scratch folder per test (tests run in parallel threads).
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rcx-safetensors-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts a user error whose message contains every one of `needles`.
fn assert_user_error<T: std::fmt::Debug>(result: rcx::error::Result<T>, needles: &[&str]) {
    match result {
        Err(Error::User(msg)) => {
            for needle in needles {
                assert!(
                    msg.contains(needle),
                    "message {msg:?} should mention {needle:?}"
                );
            }
            assert!(!msg.contains('\n'), "message should be one line: {msg:?}");
        }
        other => panic!("expected a user error mentioning {needles:?}, got {other:?}"),
    }
}

/// Builds raw file bytes: length prefix, the header text as given, then `data`.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn round_trip_keeps_names_shapes_values_and_metadata() {
    let dir = scratch_dir("round_trip");
    let path = dir.join("model.safetensors");
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.25).collect();
    let b = vec![f32::MIN_POSITIVE, -0.0, 3.0e38];
    let scalar = vec![42.0f32];
    let tensors: [(&str, &[usize], &[f32]); 3] = [
        ("zeta.weight", &[2, 3], &a),
        ("alpha", &[3], &b),
        ("scalar", &[], &scalar),
    ];
    write_f32(&path, &tensors, &[("format", "pt"), ("step", "17")]).unwrap();

    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(
        header_len % 8,
        0,
        "header padded to 8 bytes so the data is aligned"
    );
    assert_eq!(bytes.len() as u64, 8 + header_len + 4 * 10);
    // Only the final file is left in the folder: the temporary one was renamed.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    let st = SafeTensors::open(&path).unwrap();
    assert_eq!(st.names(), vec!["alpha", "scalar", "zeta.weight"]);
    assert_eq!(st.metadata().get("step").map(String::as_str), Some("17"));
    assert_eq!(st.metadata().get("format").map(String::as_str), Some("pt"));
    let view = st.get("zeta.weight").unwrap();
    assert_eq!(
        (view.name, view.dtype, view.shape),
        ("zeta.weight", Dtype::F32, &[2usize, 3][..])
    );
    assert_eq!(view.data.len(), 24);
    assert_eq!(st.read_f32("zeta.weight", &[2, 3]).unwrap(), a);
    let read_b = st.read_f32("alpha", &[3]).unwrap();
    assert_eq!(
        read_b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(st.read_f32("scalar", &[]).unwrap(), scalar);
    assert!(st.get("missing").is_none());
    drop(st);

    // Overwriting an existing file replaces it whole.
    write_f32(&path, &[("only", &[1], &[5.0])], &[]).unwrap();
    let st = SafeTensors::open(&path).unwrap();
    assert_eq!(st.names(), vec!["only"]);
    assert!(st.metadata().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn write_refuses_mismatched_lengths_and_bad_folders_without_leaving_files() {
    let dir = scratch_dir("write_errors");
    let path = dir.join("bad.safetensors");
    let err = write_f32(&path, &[("w", &[2, 2], &[1.0, 2.0, 3.0])], &[]).unwrap_err();
    assert!(err.to_string().contains("'w'"), "{err}");
    let err = write_f32(&path, &[("w", &[1], &[1.0]), ("w", &[1], &[2.0])], &[]).unwrap_err();
    assert!(err.to_string().contains("'w'"), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    let missing_folder = dir.join("no/such/folder/model.safetensors");
    assert_user_error(
        write_f32(&missing_folder, &[("w", &[1], &[1.0])], &[]),
        &["no/such/folder"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Reads one expected value of mixed.json: a number, or "inf"/"-inf" as a string.
fn json_f32(v: &serde_json::Value) -> f32 {
    match v {
        serde_json::Value::String(s) => s.parse::<f32>().unwrap(),
        other => other.as_f64().unwrap() as f32,
    }
}

#[test]
fn reads_files_written_by_python_safetensors_with_conversions() {
    let path = fixture("safetensors/mixed.safetensors");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("safetensors/mixed.json")).unwrap())
            .unwrap();
    let st = SafeTensors::open(&path).unwrap();
    assert_eq!(st.names(), vec!["bf16", "f16", "f32", "f64", "i64"]);
    assert_eq!(
        st.metadata().get("note").map(String::as_str),
        Some("rcx fixture")
    );
    assert_eq!(st.metadata().get("format").map(String::as_str), Some("pt"));

    for name in ["f32", "f16", "bf16", "f64"] {
        let entry = &expected["tensors"][name];
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let dtype = Dtype::from_name(entry["dtype"].as_str().unwrap()).unwrap();
        assert_eq!(st.get(name).unwrap().dtype, dtype);
        let want: Vec<u32> = entry["values_f32"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| json_f32(v).to_bits())
            .collect();
        let got: Vec<u32> = st
            .read_f32(name, &shape)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(
            got, want,
            "tensor {name}: bit-exact conversion to f32 as torch does it"
        );
    }

    let ints = st.get("i64").unwrap();
    assert_eq!((ints.dtype, ints.shape), (Dtype::I64, &[2usize][..]));
    let decoded: Vec<i64> = ints
        .data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, vec![7, -9]);
    assert_user_error(
        st.read_f32("i64", &[2]),
        &["mixed.safetensors", "'i64'", "I64"],
    );
}

#[test]
fn wrong_shape_or_missing_tensor_is_a_user_error_naming_file_and_tensor() {
    let st = SafeTensors::open(&fixture("safetensors/mixed.safetensors")).unwrap();
    assert_user_error(
        st.read_f32("f32", &[3, 2]),
        &["mixed.safetensors", "'f32'", "[3, 2]", "[2, 3]", "F32"],
    );
    assert_user_error(
        st.read_f32("f16", &[]),
        &["mixed.safetensors", "'f16'", "[4]", "F16"],
    );
    assert_user_error(st.read_f32("nope", &[1]), &["mixed.safetensors", "'nope'"]);
}

#[test]
fn malformed_files_are_user_errors_naming_the_file_and_tensor() {
    let dir = scratch_dir("malformed");
    let data = [0u8; 16];
    let ok_entry = r#""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;

    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("empty.safetensors", vec![], vec!["0 bytes"]),
        ("short.safetensors", vec![1, 2, 3], vec!["3 bytes"]),
        (
            "long_header.safetensors",
            {
                let mut b = raw_file("{}", &[]);
                b[..8].copy_from_slice(&1000u64.to_le_bytes());
                b
            },
            vec!["header length 1000"],
        ),
        (
            "huge_header.safetensors",
            {
                let mut b = raw_file("{}", &[]);
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            },
            vec!["header length"],
        ),
        (
            "bad_json.safetensors",
            raw_file(r#"{"a": {"dtype": "F32",,}"#, &data),
            vec!["JSON"],
        ),
        (
            "not_object.safetensors",
            raw_file("[1, 2]", &data),
            vec!["not a JSON object"],
        ),
        (
            "entry_not_object.safetensors",
            raw_file(r#"{"a": 3}"#, &data),
            vec!["'a'"],
        ),
        (
            "unknown_dtype.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}"#,
                &data,
            ),
            vec!["'a'", "F7"],
        ),
        (
            "no_shape.safetensors",
            raw_file(r#"{"a":{"dtype":"F32","data_offsets":[0,8]}}"#, &data),
            vec!["'a'", "shape"],
        ),
        (
            "negative_dim.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
                &data,
            ),
            vec!["'a'", "shape"],
        ),
        (
            "three_offsets.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}}"#,
                &data,
            ),
            vec!["'a'", "data_offsets"],
        ),
        (
            "out_of_range.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}}"#,
                &data,
            ),
            vec!["'a'", "[0, 32]", "16 bytes"],
        ),
        (
            "reversed.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#,
                &data,
            ),
            vec!["'a'", "[8, 4]"],
        ),
        (
            "size_mismatch.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}}"#,
                &data,
            ),
            vec!["'a'", "F16", "needs 4"],
        ),
        (
            "overflow.safetensors",
            raw_file(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
                &data,
            ),
            vec!["'a'", "too large"],
        ),
        (
            "overlap.safetensors",
            raw_file(
                &format!(
                    r#"{{{ok_entry},"b":{{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}}}"#
                ),
                &data,
            ),
            vec!["'a'", "'b'", "overlap"],
        ),
        (
            "bad_metadata.safetensors",
            raw_file(r#"{"__metadata__":{"step":17}}"#, &data),
            vec!["__metadata__", "step"],
        ),
    ];
    for (name, bytes, needles) in cases {
        let path = write_bytes(&dir, name, &bytes);
        let mut all = vec![name];
        all.extend(needles);
        assert_user_error(SafeTensors::open(&path), &all);
    }
    assert_user_error(
        SafeTensors::open(&dir.join("absent.safetensors")),
        &["absent.safetensors"],
    );

    // The well-formed neighbour of those cases opens, with trailing spaces in the header.
    let path = write_bytes(
        &dir,
        "fine.safetensors",
        &raw_file(&format!("{{{ok_entry}}}   "), &data),
    );
    assert_eq!(
        SafeTensors::open(&path)
            .unwrap()
            .read_f32("a", &[2])
            .unwrap(),
        vec![0.0, 0.0]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// xorshift64: a tiny deterministic generator so the corruption test needs no crate.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_corruptions_never_panic() {
    let dir = scratch_dir("fuzz");
    let valid = dir.join("valid.safetensors");
    let w: Vec<f32> = (0..12).map(|i| i as f32).collect();
    write_f32(
        &valid,
        &[
            ("w", &[3, 4], &w),
            ("b", &[4], &w[..4]),
            ("s", &[], &w[..1]),
        ],
        &[("k", "v")],
    )
    .unwrap();
    let original = std::fs::read(&valid).unwrap();
    let header_end = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let corrupt = dir.join("corrupt.safetensors");
    let printable = br#"{}[]",:0123456789-. aeFIU_"#;

    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..1500 {
        let mut bytes = original.clone();
        match rng.below(4) {
            // Truncate anywhere.
            0 => bytes.truncate(rng.below(bytes.len())),
            // Overwrite bytes of the length prefix or header with JSON-ish characters.
            1 => {
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(header_end);
                    bytes[at] = printable[rng.below(printable.len())];
                }
            }
            // Arbitrary byte anywhere.
            2 => {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            // Change one digit of the header, which moves offsets and shapes.
            _ => {
                let digits: Vec<usize> = (8..header_end)
                    .filter(|&i| bytes[i].is_ascii_digit())
                    .collect();
                let at = digits[rng.below(digits.len())];
                bytes[at] = b'0' + rng.below(10) as u8;
            }
        }
        std::fs::write(&corrupt, &bytes).unwrap();
        match SafeTensors::open(&corrupt) {
            Ok(st) => {
                opened += 1;
                for name in st.names() {
                    let view = st.get(name).unwrap();
                    let shape = view.shape.to_vec();
                    // Ok for float tensors, a user error for others: never a panic.
                    if let Ok(values) = st.read_f32(name, &shape) {
                        assert_eq!(values.len(), shape.iter().product::<usize>());
                    }
                }
            }
            Err(Error::User(msg)) => {
                refused += 1;
                assert!(msg.contains("corrupt.safetensors"), "{msg}");
            }
            Err(other) => panic!("corruption should be a user error: {other:?}"),
        }
    }
    assert!(
        opened > 0 && refused > 0,
        "both outcomes exercised: {opened} opened, {refused} refused"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The parameter names and shapes of transformers' BertForSequenceClassification.
fn bert_classifier_params(c: &HfBertConfig) -> Vec<(String, Vec<usize>)> {
    let (h, ffn) = (c.hidden_size, c.intermediate_size);
    let mut params = vec![
        (
            "bert.embeddings.word_embeddings.weight".to_string(),
            vec![c.vocab_size, h],
        ),
        (
            "bert.embeddings.position_embeddings.weight".to_string(),
            vec![c.max_position_embeddings, h],
        ),
        (
            "bert.embeddings.token_type_embeddings.weight".to_string(),
            vec![c.type_vocab_size, h],
        ),
        ("bert.embeddings.LayerNorm.weight".to_string(), vec![h]),
        ("bert.embeddings.LayerNorm.bias".to_string(), vec![h]),
    ];
    for layer in 0..c.num_hidden_layers {
        let p = format!("bert.encoder.layer.{layer}");
        for (suffix, shape) in [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![ffn, h]),
            ("intermediate.dense.bias", vec![ffn]),
            ("output.dense.weight", vec![h, ffn]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ] {
            params.push((format!("{p}.{suffix}"), shape));
        }
    }
    params.push(("bert.pooler.dense.weight".to_string(), vec![h, h]));
    params.push(("bert.pooler.dense.bias".to_string(), vec![h]));
    params.push(("classifier.weight".to_string(), vec![1, h]));
    params.push(("classifier.bias".to_string(), vec![1]));
    params
}

#[test]
fn tiny_bert_checkpoint_has_every_expected_tensor() {
    let config = read_hf_config(&fixture("parity/tiny-bert/config.json")).unwrap();
    assert_eq!(
        config,
        HfBertConfig {
            vocab_size: 128,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            hidden_act: "gelu".to_string(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    );
    let st = SafeTensors::open(&fixture("parity/tiny-bert/model.safetensors")).unwrap();
    let params = bert_classifier_params(&config);
    let mut expected_names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    expected_names.sort();
    assert_eq!(st.names(), expected_names);
    for (name, shape) in &params {
        let values = st.read_f32(name, shape).unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{name}");
        // The generator perturbed every LayerNorm weight and bias away from 1 and 0.
        if name.contains("LayerNorm.weight") {
            assert!(values.iter().all(|&v| v != 1.0), "{name}");
        }
        if name.ends_with(".bias") {
            assert!(values.iter().all(|&v| v != 0.0), "{name}");
        }
    }
}

const MINILM_CONFIG: &str = r#"{
  "_name_or_path": "nreimers/MiniLM-L6-H384-uncased",
  "architectures": ["HostModel"],
  "attention_probs_dropout_prob": 0.1,
  "gradient_checkpointing": false,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "hidden_size": 384,
  "initializer_range": 0.02,
  "intermediate_size": 1536,
  "layer_norm_eps": 1e-12,
  "max_position_embeddings": 512,
  "model_type": "bert",
  "num_attention_heads": 12,
  "num_hidden_layers": 6,
  "pad_token_id": 0,
  "position_embedding_type": "absolute",
  "transformers_version": "4.8.2",
  "type_vocab_size": 2,
  "use_cache": true,
  "vocab_size": 30522
}"#;

#[test]
fn reads_the_minilm_config_and_round_trips_a_written_one() {
    let dir = scratch_dir("hf_config");
    let path = write_bytes(&dir, "config.json", MINILM_CONFIG.as_bytes());
    let config = read_hf_config(&path).unwrap();
    assert_eq!(
        (
            config.vocab_size,
            config.hidden_size,
            config.num_hidden_layers,
            config.num_attention_heads
        ),
        (30522, 384, 6, 12)
    );
    assert_eq!(
        (
            config.intermediate_size,
            config.max_position_embeddings,
            config.type_vocab_size
        ),
        (1536, 512, 2)
    );
    assert_eq!(
        (
            config.hidden_dropout_prob,
            config.attention_probs_dropout_prob,
            config.layer_norm_eps
        ),
        (0.1, 0.1, 1e-12)
    );

    let out = dir.join("written.json");
    write_hf_config(&out, &config, 1).unwrap();
    assert_eq!(read_hf_config(&out).unwrap(), config);
    // pad_token_id is read and written back, not replaced by 0.
    let padded = MINILM_CONFIG.replacen(r#""pad_token_id": 0"#, r#""pad_token_id": 3"#, 1);
    let config_pad3 = read_hf_config(&write_bytes(&dir, "pad3.json", padded.as_bytes())).unwrap();
    assert_eq!(config_pad3.pad_token_id, 3);
    write_hf_config(&out, &config_pad3, 1).unwrap();
    assert_eq!(read_hf_config(&out).unwrap().pad_token_id, 3);
    write_hf_config(&out, &config, 1).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(
        written["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    assert_eq!(written["model_type"], "bert");
    assert_eq!(written["problem_type"], "regression");
    assert_eq!(written["id2label"], serde_json::json!({"0": "LABEL_0"}));
    assert_eq!(written["label2id"], serde_json::json!({"LABEL_0": 0}));
    assert_eq!(written["layer_norm_eps"].as_f64(), Some(1e-12));

    // Keys transformers gives defaults for may be absent.
    let minimal = r#"{"model_type":"bert","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
        "num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":12}"#;
    let config = read_hf_config(&write_bytes(&dir, "minimal.json", minimal.as_bytes())).unwrap();
    assert_eq!(
        (
            config.type_vocab_size,
            config.layer_norm_eps,
            config.hidden_dropout_prob
        ),
        (2, 1e-12, 0.1)
    );
    assert_eq!(config.hidden_act, "gelu");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_are_user_errors_naming_file_and_key() {
    let dir = scratch_dir("hf_config_errors");
    let cases = [
        (
            r#""model_type": "bert""#,
            r#""model_type": "roberta""#,
            "model_type",
        ),
        (
            r#""hidden_act": "gelu""#,
            r#""hidden_act": "relu""#,
            "hidden_act",
        ),
        (r#""hidden_size": 384,"#, "", "hidden_size"),
        (
            r#""hidden_size": 384"#,
            r#""hidden_size": "384""#,
            "hidden_size",
        ),
        (
            r#""num_hidden_layers": 6"#,
            r#""num_hidden_layers": 0"#,
            "num_hidden_layers",
        ),
        (
            r#""num_attention_heads": 12"#,
            r#""num_attention_heads": 7"#,
            "num_attention_heads",
        ),
        (
            r#""hidden_dropout_prob": 0.1"#,
            r#""hidden_dropout_prob": 1.5"#,
            "hidden_dropout_prob",
        ),
        (
            r#""layer_norm_eps": 1e-12"#,
            r#""layer_norm_eps": -1"#,
            "layer_norm_eps",
        ),
        (
            r#""layer_norm_eps": 1e-12"#,
            r#""layer_norm_eps": null"#,
            "layer_norm_eps",
        ),
        (
            r#""position_embedding_type": "absolute""#,
            r#""position_embedding_type": "relative_key""#,
            "position_embedding_type",
        ),
        (r#""model_type": "bert","#, "", "model_type"),
        (
            r#""pad_token_id": 0"#,
            r#""pad_token_id": -1"#,
            "pad_token_id",
        ),
        (
            r#""pad_token_id": 0"#,
            r#""pad_token_id": 4294967296"#,
            "pad_token_id",
        ),
        (
            r#""pad_token_id": 0"#,
            r#""pad_token_id": 1.5"#,
            "pad_token_id",
        ),
    ];
    for (i, (from, to, key)) in cases.into_iter().enumerate() {
        let text = MINILM_CONFIG.replacen(from, to, 1);
        assert_ne!(text, MINILM_CONFIG, "case {i} must change the config");
        let name = format!("bad{i}.json");
        let path = write_bytes(&dir, &name, text.as_bytes());
        assert_user_error(read_hf_config(&path), &[&name, &format!("'{key}'")]);
    }
    let path = write_bytes(
        &dir,
        "broken.json",
        b"{\n  \"model_type\": \"bert\",\n  oops\n}",
    );
    assert_user_error(read_hf_config(&path), &["broken.json:3"]);
    assert_user_error(read_hf_config(&dir.join("absent.json")), &["absent.json"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn bert(vocab: usize, hidden: usize, layers: usize, intermediate: usize) -> BertConfig {
    BertConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: 1,
        intermediate_size: intermediate,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pad_token_id: 0,
    }
}

#[test]
fn config_sizes_are_bounded_naming_the_key_and_what_it_would_need() {
    // Real BERTs pass: base, large, and a large vocabulary.
    for config in [
        bert(30522, 768, 12, 3072),
        bert(30522, 1024, 24, 4096),
        bert(250_000, 1024, 24, 4096),
    ] {
        config.validate("config.json").unwrap();
    }
    let max = BertConfig::MAX_PARAMETERS;
    let cases = [
        // Each alone, including products past u64.
        (
            bert(10_000_000_000, 768, 12, 3072),
            "vocab_size",
            "7680000000000 values",
        ),
        (bert(30522, 1 << 33, 1, 8), "hidden_size", "more than"),
        (
            bert(30522, 8, 1, usize::MAX),
            "intermediate_size",
            "more than",
        ),
        (
            bert(30522, 8, 1 << 40, 16),
            "num_hidden_layers",
            "at most 1024 layers",
        ),
        (
            bert(30522, 8192, 1024, 8192),
            "num_hidden_layers",
            "1024 encoder layers",
        ),
        // Every part fits, the whole does not: the largest part is blamed.
        (bert(max / 8 - 1, 8, 1, 8), "vocab_size", "the whole model"),
    ];
    for (config, key, needle) in cases {
        let message = match config.validate("config.json") {
            Err(Error::User(message)) => message,
            other => panic!("{key}: expected a user error, got {other:?}"),
        };
        for expected in ["config.json", key, needle, "need", &max.to_string()] {
            // "at most 1024 layers" is the limit of that case, not the parameter bound.
            if expected == max.to_string() && needle.contains("layers") {
                continue;
            }
            assert!(
                message.contains(expected),
                "{expected:?} not in {message:?}"
            );
        }
    }
    let mut pad = bert(30522, 8, 1, 8);
    pad.pad_token_id = 30522;
    assert!(
        matches!(pad.validate("config.json"), Err(Error::User(m)) if m.contains("pad_token_id"))
    );
}
