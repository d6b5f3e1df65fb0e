//! The RewardBench subset report: records carrying a `subset` (RewardBench's rows: prompt,
//! chosen, rejected, subset) are read beside every existing form; accuracy per subset and
//! the section scores on hand-made logits, each expected number worked out here by hand;
//! and `rcx eval` on a hand-made file reports the accuracies that `rcx score`'s logits give.

use rcx::data::{read_rankings, read_subsets};
use rcx::eval::{REWARDBENCH_SECTIONS, subset_report};
use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;
use common::{rcx, rcx_train, write_config};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn subset_is_read_on_pairwise_and_ranked_records_and_checked() {
    let dir = common::scratch("rewardbench-tests", "reader");
    let file = write(
        &dir,
        "mixed.jsonl",
        concat!(
            r#"{"prompt": "p", "chosen": "good", "rejected": "bad", "subset": "hep-go", "id": 7}"#,
            "\n",
            r#"{"prompt": "p", "chosen": "good", "rejected": "bad"}"#,
            "\n",
            r#"{"prompt": "p", "completions": ["a", "b", "c"], "subset": "mine", "prompt_type": "open"}"#,
            "\n",
            r#"{"prompt": "p", "completions": ["a", "b"], "scores": [1, 2], "subset": null}"#,
            "\n",
        ),
    );
    let records = read_rankings(&file, false).unwrap().records;
    assert_eq!(records[0].subset.as_deref(), Some("hep-go"));
    assert_eq!(records[0].completions, ["good", "bad"]);
    assert_eq!(records[1].subset, None);
    assert_eq!(records[2].subset.as_deref(), Some("mine"));
    assert_eq!(records[3].subset, None, "null reads as absent");
    assert_eq!(records[3].completions, ["b", "a"], "scores still sort");
    assert_eq!(
        read_subsets(&file).unwrap(),
        [Some("hep-go".into()), None, Some("mine".into()), None]
    );

    for (value, found) in [
        ("3", "a number"),
        ("\"\"", "an empty string"),
        ("[]", "an array"),
    ] {
        let line =
            format!(r#"{{"prompt": "p", "chosen": "x", "rejected": "y", "subset": {value}}}"#);
        let bad = write(
            &dir,
            "bad.jsonl",
            &format!(
                "{}\n{line}\n",
                r#"{"prompt": "p", "chosen": "x", "rejected": "y"}"#
            ),
        );
        let message = read_rankings(&bad, false).unwrap_err().to_string();
        assert!(message.contains("bad.jsonl:2"), "{message}");
        assert!(
            message.contains(&format!("\"subset\" is {found}")),
            "{message}"
        );
    }
}

#[test]
fn the_mapping_is_rewardbenchs() {
    // 23 subsets, each in one section; the counts of rewardbench/constants.py.
    let all: Vec<(&str, u32)> = REWARDBENCH_SECTIONS
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .collect();
    assert_eq!(all.len(), 23);
    let mut names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 23);
    let reasoning = REWARDBENCH_SECTIONS[3].1;
    let code: u32 = reasoning
        .iter()
        .filter(|(n, _)| n.starts_with("hep-"))
        .map(|(_, c)| c)
        .sum();
    assert_eq!(reasoning[0], ("math-prm", 984));
    assert_eq!(
        code, 984,
        "math weighs as much as the six code subsets together"
    );
}

/// One pairwise record's logits: [chosen, rejected].
fn pair(chosen: f32, rejected: f32) -> Vec<f32> {
    vec![chosen, rejected]
}

#[test]
fn accuracy_per_subset_and_weighted_section_scores_by_hand() {
    let rows: Vec<(Option<&str>, Vec<f32>)> = vec![
        // Chat: alpacaeval-easy 1 of 2 right; mt-bench-easy 1 of 1; alpacaeval-hard 0 of 2,
        // one of them an exact tie (a tie is wrong, as RewardBench counts `chosen > rejected`).
        (Some("alpacaeval-easy"), pair(1.0, 0.0)),
        (Some("alpacaeval-easy"), pair(0.0, 1.0)),
        (Some("mt-bench-easy"), pair(2.0, -1.0)),
        (Some("alpacaeval-hard"), pair(0.5, 0.5)),
        (Some("alpacaeval-hard"), pair(-3.0, 3.0)),
        // Chat Hard: llmbar-natural 3 of 4.
        (Some("llmbar-natural"), pair(1.0, 0.0)),
        (Some("llmbar-natural"), pair(1.0, 0.0)),
        (Some("llmbar-natural"), pair(1.0, 0.0)),
        (Some("llmbar-natural"), pair(0.0, 1.0)),
        // Safety: donotanswer 1 of 1, xstest-should-respond 0 of 1.
        (Some("donotanswer"), pair(0.2, 0.1)),
        (Some("xstest-should-respond"), pair(0.1, 0.2)),
        // Reasoning: math-prm 1 of 2, hep-python 1 of 1, hep-rust 0 of 1.
        (Some("math-prm"), pair(1.0, 0.0)),
        (Some("math-prm"), pair(0.0, 1.0)),
        (Some("hep-python"), pair(1.0, 0.0)),
        (Some("hep-rust"), pair(0.0, 1.0)),
        // Outside the mapping: a ranked record of 3 (pairs 0>1 right, 0>2 right, 1>2 wrong).
        (Some("my-own-set"), vec![3.0, 1.0, 2.0]),
        // No subset: left out of the report.
        (None, pair(0.0, 1.0)),
    ];
    let subsets: Vec<Option<String>> = rows.iter().map(|(s, _)| s.map(String::from)).collect();
    let logits: Vec<Vec<f32>> = rows.iter().map(|(_, l)| l.clone()).collect();
    let labels = vec![Vec::new(); rows.len()];
    let r = subset_report(&subsets, &logits, &labels).unwrap();
    assert_eq!(r.records_without_subset, 1);

    let acc = |name: &str| {
        let s = r.subsets.iter().find(|s| s.subset == name).unwrap();
        (s.accuracy, s.pairs, s.section.clone())
    };
    assert_eq!(acc("alpacaeval-easy"), (0.5, 2, Some("Chat".into())));
    assert_eq!(acc("alpacaeval-hard"), (0.0, 2, Some("Chat".into())));
    assert_eq!(acc("mt-bench-easy"), (1.0, 1, Some("Chat".into())));
    assert_eq!(acc("llmbar-natural"), (0.75, 4, Some("Chat Hard".into())));
    assert_eq!(acc("math-prm").0, 0.5);
    assert_eq!(acc("hep-rust").0, 0.0);
    let own = acc("my-own-set");
    assert!(
        close(own.0, 2.0 / 3.0) && own.1 == 3 && own.2.is_none(),
        "{own:?}"
    );
    let names: Vec<&str> = r.subsets.iter().map(|s| s.subset.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);

    // Sections: accuracies weighted by RewardBench's example counts.
    let chat = (0.5 * 100.0 + 0.0 * 95.0 + 1.0 * 28.0) / (100.0 + 95.0 + 28.0);
    let chat_hard = 0.75; // one subset present: its own accuracy
    let safety = (1.0 * 136.0 + 0.0 * 250.0) / (136.0 + 250.0);
    // math-prm counts 984 = 6 x 164: against two code subsets it weighs three times both.
    let reasoning = (0.5 * 984.0 + 1.0 * 164.0 + 0.0 * 164.0) / (984.0 + 164.0 + 164.0);
    let want = [
        ("Chat", chat, 3, 5),
        ("Chat Hard", chat_hard, 1, 6),
        ("Safety", safety, 2, 5),
        ("Reasoning", reasoning, 3, 7),
    ];
    assert_eq!(r.sections.len(), 4);
    for (got, (name, score, present, defined)) in r.sections.iter().zip(want) {
        assert_eq!(got.section, name);
        assert!(close(got.score, score), "{name}: {} vs {score}", got.score);
        assert_eq!(
            (got.subsets_present, got.subsets_defined),
            (present, defined)
        );
    }
    let overall = (chat + chat_hard + safety + reasoning) / 4.0;
    assert!(close(r.score.unwrap(), overall));

    // Without a Reasoning subset: three sections and no overall score.
    let no_reasoning: Vec<Option<String>> = subsets
        .iter()
        .map(|s| {
            s.clone()
                .filter(|s| !(s.starts_with("hep-") || s == "math-prm"))
        })
        .collect();
    let r = subset_report(&no_reasoning, &logits, &labels).unwrap();
    assert_eq!(r.sections.len(), 3);
    assert_eq!(r.score, None);
    // No subsets at all: no report.
    assert!(subset_report(&vec![None; rows.len()], &logits, &labels).is_none());
}

#[test]
fn tied_scores_form_no_pair_in_a_subset() {
    // Scores [2, 1, 1] best first: pairs (0,1), (0,2) only.
    let subsets = vec![Some("hep-go".to_string())];
    let logits = vec![vec![0.0f32, 1.0, -1.0]];
    let r = subset_report(&subsets, &logits, &[vec![2.0, 1.0, 1.0]]).unwrap();
    assert_eq!(r.subsets[0].pairs, 2);
    assert_eq!(r.subsets[0].accuracy, 0.5);
}

#[test]
fn rcx_eval_reports_the_subsets_of_a_hand_made_file() {
    let dir = common::scratch("rewardbench-tests", "eval");
    let (cfg, model) = write_config(
        &dir,
        "run",
        &[
            ("per_device_train_batch_size", "4"),
            ("max_length", "48"),
            ("max_steps", "4"),
            ("eval_steps", "4"),
            ("save_steps", "4"),
            ("seed", "1"),
        ],
        &[],
    );
    let trained = rcx_train(&cfg, &[]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );

    let rows = [
        (
            "hep-go",
            "write the code",
            "like day the also his were like long",
            "like day",
        ),
        (
            "hep-go",
            "write more code",
            "when",
            "when years great against his my was day",
        ),
        (
            "math-prm",
            "add two numbers",
            "against under old what could another",
            "against",
        ),
        (
            "alpacaeval-easy",
            "tell me about the forest",
            "his were like",
            "his",
        ),
        (
            "alpacaeval-easy",
            "tell me about the city",
            "long",
            "long might between were they",
        ),
        (
            "my-own-set",
            "tell me about the river",
            "day from made then from did",
            "day from",
        ),
    ];
    let mut text = String::new();
    for (subset, prompt, chosen, rejected) in rows {
        let row = serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": subset});
        text += &format!("{row}\n");
    }
    text += "{\"prompt\": \"no subset\", \"chosen\": \"one two three\", \"rejected\": \"one\"}\n";
    let data = write(&dir, "bench.jsonl", &text);
    let (model_s, data_s) = (model.to_str().unwrap(), data.to_str().unwrap());

    // The logits rcx score gives: chosen first, then rejected, per record.
    let scored = rcx(&["score", "--model", model_s, "--data", data_s]);
    assert!(
        scored.status.success(),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
    let logits: Vec<f64> = String::from_utf8(scored.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["logit"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let right = |record: usize| (logits[2 * record] > logits[2 * record + 1]) as u8 as f64;
    let want = [
        ("alpacaeval-easy", (right(3) + right(4)) / 2.0),
        ("hep-go", (right(0) + right(1)) / 2.0),
        ("math-prm", right(2)),
        ("my-own-set", right(5)),
    ];

    let out = rcx(&["eval", "--model", model_s, "--data", data_s, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let subsets = &report["subsets"];
    assert_eq!(subsets["records_without_subset"], 1);
    let listed = subsets["subsets"].as_array().unwrap();
    assert_eq!(listed.len(), want.len());
    for (got, (name, accuracy)) in listed.iter().zip(want) {
        assert_eq!(got["subset"], name);
        assert_eq!(got["accuracy"].as_f64().unwrap(), accuracy, "{name}");
    }
    assert_eq!(
        listed[3]["section"],
        Value::Null,
        "outside the mapping, reported alone"
    );
    // Chat from alpacaeval-easy alone; Reasoning weighs math 984 against hep-go's 164.
    let sections = subsets["sections"].as_array().unwrap();
    assert_eq!(sections.len(), 2);
    assert_eq!(sections[0]["section"], "Chat");
    assert!(close(sections[0]["score"].as_f64().unwrap(), want[0].1));
    assert_eq!(sections[1]["section"], "Reasoning");
    let reasoning = (want[2].1 * 984.0 + want[1].1 * 164.0) / (984.0 + 164.0);
    assert!(close(sections[1]["score"].as_f64().unwrap(), reasoning));
    assert_eq!(subsets["score"], Value::Null, "two sections of four");

    // The table says the same.
    let table = rcx(&["eval", "--model", model_s, "--data", data_s]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("RewardBench section"), "{table}");
    assert!(
        table.contains(&format!("Reasoning            {reasoning:.4}  2/7")),
        "{table}"
    );

    // A file without subsets keeps the report as it was: no "subsets" key.
    let plain = common::fixture("lengths_eval.jsonl");
    let out = rcx(&[
        "eval",
        "--model",
        model_s,
        "--data",
        plain.to_str().unwrap(),
        "--json",
    ]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.get("subsets").is_none(), "{report}");
}
