//! DeBERTa-v2/v3's disentangled attention (rcx::backend::cpu::disentangled_attention)
//! against transformers (tests/fixtures/deberta_ops/reference.json, written by
//! scripts/gen_deberta_op_fixtures.py from transformers' own functions and a
//! `DisentangledSelfAttention` with random weights). Their backward against central
//! differences in f64 is in `rcx::gradcheck::op_checks`, run by tests/ops_gradcheck.rs.

use std::path::Path;

use rcx::backend::cpu::{
    PositionTerms, disentangled_attention_forward, disentangled_scale, log_bucket_position,
    matmul_forward, position_products_forward, relative_positions,
};
use serde_json::Value;

fn reference() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deberta_ops/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn int(value: &Value) -> usize {
    value.as_u64().unwrap() as usize
}

#[test]
fn log_buckets_match_transformers() {
    let reference = reference();
    for case in reference["buckets"]["log"].as_array().unwrap() {
        let (size, max) = (int(&case["bucket_size"]), int(&case["max_position"]));
        let from = case["from"].as_i64().unwrap();
        for (i, expected) in case["buckets"].as_array().unwrap().iter().enumerate() {
            let d = from + i as i64;
            assert_eq!(
                log_bucket_position(d, size, max),
                expected.as_i64().unwrap(),
                "bucket of {d} at bucket_size {size}, max_position {max}"
            );
        }
    }
    // The table's orientation (query minus key) and the clamp into the 2S rows.
    let table = &reference["buckets"]["table"];
    let (t, size, max) = (
        int(&table["t"]),
        int(&table["bucket_size"]),
        int(&table["max_position"]),
    );
    let span = size as i64;
    let expected: Vec<u32> = table["relative"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r.as_i64().unwrap() + span).clamp(0, 2 * span - 1) as u32)
        .collect();
    assert_eq!(relative_positions(t, size, max), expected);
}

/// x [n, c] · weightᵀ + bias, with the fixture's tensor `name` (a Linear).
fn linear(case: &Value, name: &str, x: &[f64], n: usize, c: usize) -> Vec<f64> {
    let weight = floats(&case["weights"][format!("{name}.weight")]["values"]);
    let bias = floats(&case["weights"][format!("{name}.bias")]["values"]);
    let oc = bias.len();
    let mut out = vec![0.0; n * oc];
    matmul_forward(&mut out, x, &weight, Some(&bias), n, c, oc);
    out
}

#[test]
fn disentangled_attention_matches_transformers() {
    let reference = reference();
    for case in reference["attention"].as_array().unwrap() {
        let (b, t, c, nh) = (
            int(&case["b"]),
            int(&case["t"]),
            int(&case["hidden"]),
            int(&case["heads"]),
        );
        let hs = c / nh;
        let span = int(&case["span"]);
        let types: Vec<&str> = case["pos_att_type"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        let shared = case["share_att_key"].as_bool().unwrap();
        let label = format!("{types:?}, share_att_key {shared}");
        let x = floats(&case["x"]);
        let rel = floats(&case["rel_embeddings"]);
        let mask: Vec<u8> = case["mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_u64().unwrap() as u8)
            .collect();
        let (q, k, v) = (
            linear(case, "query_proj", &x, b * t, c),
            linear(case, "key_proj", &x, b * t, c),
            linear(case, "value_proj", &x, b * t, c),
        );
        let rows = 2 * span;
        let products = |content: &[f64], projection: &str| {
            let pos = linear(case, projection, &rel, rows, c);
            let mut out = vec![0.0; b * nh * t * rows];
            position_products_forward(&mut out, content, &pos, b, t, nh, hs, rows);
            out
        };
        let (key_projection, query_projection) = if shared {
            ("key_proj", "query_proj")
        } else {
            ("pos_key_proj", "pos_query_proj")
        };
        let c2p = types.contains(&"c2p").then(|| products(&q, key_projection));
        let p2c = types
            .contains(&"p2c")
            .then(|| products(&k, query_projection));
        let relative = relative_positions(
            t,
            int(&case["position_buckets"]),
            int(&case["max_relative_positions"]),
        );
        let terms = PositionTerms {
            c2p: c2p.as_deref(),
            p2c: p2c.as_deref(),
            relative: &relative,
            rows,
        };
        let scale = disentangled_scale(hs, types.len());
        let (mut out, mut probs) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        disentangled_attention_forward(
            &mut out, &mut probs, &q, &k, &v, terms, &mask, b, t, nh, hs, scale, None,
        );
        let expected = floats(&case["out"]);
        // Padded queries are compared out: transformers masks them as queries too (a row of
        // finfo.min, a uniform softmax), rcx computes them like any other; no real token
        // reads them.
        let mut compared = 0;
        for row in 0..b * t {
            if mask[row] == 0 {
                continue;
            }
            for ch in 0..c {
                let (got, want) = (out[row * c + ch], expected[row * c + ch]);
                assert!(
                    (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                    "{label}: out[{row}, {ch}] = {got}, transformers {want}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, (mask.iter().filter(|&&m| m != 0).count()) * c);
    }
}
