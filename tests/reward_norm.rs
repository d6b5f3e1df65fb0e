//! Reward normalisation end to end, as OpenRLHF's: a tiny run saves the mean and sample std
//! of its final evaluation's logits (the raw rewards) in config.json; they equal the
//! statistics of `rcx score`'s logits on the eval set computed here; `rcx score
//! --normalize` gives (logit - mean) / std (mean 0, std 1 there); `rcx serve --normalize` answers the same numbers; a folder without the
//! statistics (or with bad ones) is a one-line error, exit 2; `rcx eval
//! --save-normalization` computes them for a folder that lacks them.

use rcx::reward_norm::{Degenerate, RewardStats};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

mod common;
use common::{fixture, rcx, rcx_train, write_config};

/// The trained model folder, trained once for every test of this file.
fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = common::scratch("reward-norm-tests", "model");
        let (cfg, out) = write_config(
            &dir,
            "run",
            &[
                ("learning_rate", "1.0e-3"),
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
            "rcx train failed:\n{}",
            String::from_utf8_lossy(&trained.stderr)
        );
        out
    })
}

fn config_json(dir: &Path) -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    match serde_json::from_str(&text).unwrap() {
        Value::Object(map) => map,
        other => panic!("config.json is {other}"),
    }
}

/// A copy of the trained folder (config.json, weights, vocabulary) under `name`, with
/// config.json's keys changed by `edit`.
fn copy_of_model(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let dir = common::scratch("reward-norm-tests", name);
    for file in ["config.json", "model.safetensors", "vocab.txt", "rcx.json"] {
        std::fs::copy(model().join(file), dir.join(file)).unwrap();
    }
    let mut config = config_json(&dir);
    edit(&mut config);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&Value::Object(config)).unwrap(),
    )
    .unwrap();
    dir
}

fn without_stats(config: &mut serde_json::Map<String, Value>) {
    for key in ["normalize_reward", "mean", "std"] {
        config.remove(key);
    }
}

/// `rcx score` (with `extra` flags) on `data`: (logits, rewards) of every completion.
fn score(model: &Path, data: &Path, extra: &[&str]) -> (Vec<f64>, Vec<f64>) {
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = rcx(&args);
    assert!(
        out.status.success(),
        "rcx score {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            // The logit is printed as the f32 it is: back to that f32, exactly.
            let logit = v["logit"].as_f64().unwrap() as f32 as f64;
            (logit, v["reward"].as_f64().unwrap())
        })
        .unzip()
}

/// (mean, sample std) of `values`, written out here rather than taken from rcx.
fn mean_and_sample_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn saved_stats(dir: &Path) -> (f64, f64) {
    let config = config_json(dir);
    (
        config["mean"].as_f64().expect("a mean in config.json"),
        config["std"].as_f64().expect("a std in config.json"),
    )
}

#[test]
fn the_statistics_of_hand_made_rewards() {
    // Mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 over n - 1 = 3.
    let stats = RewardStats::of_rewards(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(stats.mean, 2.5);
    assert!((stats.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-15);
    assert!((stats.normalize(4.0) - 1.5 / (5.0f64 / 3.0).sqrt()).abs() < 1e-15);
    assert_eq!(RewardStats::of_rewards(&[0.5]), Err(Degenerate::TooFew(1)));
    assert!(matches!(
        RewardStats::of_rewards(&[0.5, 0.5, 0.5]),
        Err(Degenerate::NoSpread { count: 3, .. })
    ));
    assert!(RewardStats::of_rewards(&[0.5, f64::NAN]).is_err());
}

#[test]
fn training_saves_the_eval_sets_reward_statistics_and_score_normalizes_with_them() {
    let eval = fixture("lengths_eval.jsonl");
    let config = config_json(model());
    // OpenRLHF's flag is its loader's caller's choice, not the folder's: not written.
    assert!(
        !config.contains_key("normalize_reward"),
        "normalize_reward written: {:?}",
        config.get("normalize_reward")
    );
    // The rest of config.json is as before: the folder still reads as a BERT classifier.
    assert_eq!(config["model_type"], json!("bert"));
    assert_eq!(
        config["architectures"],
        json!(["BertForSequenceClassification"])
    );
    let (mean, std) = saved_stats(model());

    let (logits, rewards) = score(model(), &eval, &[]);
    assert_eq!(rewards.len(), 16 * 4, "every completion of the eval set");
    // Of the logits, OpenRLHF's raw rewards, not of the sigmoid rewards.
    let (want_mean, want_std) = mean_and_sample_std(&logits);
    let (sigmoid_mean, _) = mean_and_sample_std(&rewards);
    assert!(
        (mean - sigmoid_mean).abs() > 1e-6,
        "statistics of the sigmoid rewards"
    );
    // The training engine's eval forward and `rcx score` run the same CPU code on the
    // same batches; the tolerance only allows for summation order.
    assert!((mean - want_mean).abs() < 1e-9, "{mean} vs {want_mean}");
    assert!((std - want_std).abs() < 1e-9, "{std} vs {want_std}");
    assert!(std > 0.0);

    let (norm_logits, normalized) = score(model(), &eval, &["--normalize"]);
    assert_eq!(
        norm_logits, logits,
        "the logits stay as the model gives them"
    );
    for (n, l) in normalized.iter().zip(&logits) {
        assert!((n - (l - mean) / std).abs() < 1e-12, "{n} vs {l}");
    }
    let (n_mean, n_std) = mean_and_sample_std(&normalized);
    assert!(n_mean.abs() < 1e-6, "normalised mean {n_mean}");
    assert!((n_std - 1.0).abs() < 1e-6, "normalised std {n_std}");
}

#[test]
fn normalize_without_statistics_is_a_one_line_error_naming_the_folder() {
    let eval = fixture("lengths_eval.jsonl");
    let bare = copy_of_model("bare", without_stats);
    let bare_str = bare.to_str().unwrap();
    // The folder without the statistics still scores, raw.
    score(&bare, &eval, &[]);
    let data = eval.to_str().unwrap();
    for args in [
        ["score", "--model", bare_str, "--data", data, "--normalize"],
        ["serve", "--model", bare_str, "--port", "0", "--normalize"],
    ] {
        let out = rcx(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(bare_str), "{args:?}: {stderr}");
        assert!(stderr.contains("'mean'"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("--save-normalization"),
            "{args:?}: {stderr}"
        );
    }

    for (name, key, value, message) in [
        ("zero-std", "std", json!(0.0), "key 'std' is 0"),
        ("text-mean", "mean", json!("high"), "key 'mean' is \"high\""),
    ] {
        let dir = copy_of_model(name, |c| {
            c.insert(key.into(), value);
        });
        let out = rcx(&[
            "score",
            "--model",
            dir.to_str().unwrap(),
            "--data",
            eval.to_str().unwrap(),
            "--normalize",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains(message), "{name}: {stderr}");
        assert!(stderr.contains("config.json"), "{name}: {stderr}");
    }
}

#[test]
fn eval_save_normalization_computes_them_for_an_existing_folder() {
    let eval = fixture("lengths_eval.jsonl");
    let data = fixture("lengths.jsonl");
    let bare = copy_of_model("to-fill", without_stats);
    let before = config_json(&bare);
    let out = rcx(&[
        "eval",
        "--model",
        bare.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--save-normalization",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("saved reward normalisation"), "{stderr}");

    // The statistics of every logit of the file given, the other keys untouched.
    let (logits, _) = score(&bare, &data, &[]);
    let (want_mean, want_std) = mean_and_sample_std(&logits);
    let (mean, std) = saved_stats(&bare);
    assert!((mean - want_mean).abs() < 1e-12, "{mean} vs {want_mean}");
    assert!((std - want_std).abs() < 1e-12, "{std} vs {want_std}");
    let after = config_json(&bare);
    for (key, value) in &before {
        assert_eq!(&after[key], value, "{key}");
    }
    // mean and std only: no "normalize_reward" (see the training test).
    assert_eq!(after.len(), before.len() + 2, "{after:?}");
    let (_, normalized) = score(&bare, &eval, &["--normalize"]);
    let (raw, _) = score(&bare, &eval, &[]);
    for (n, l) in normalized.iter().zip(&raw) {
        assert!((n - (l - mean) / std).abs() < 1e-12);
    }
}

/// A running `rcx serve --normalize`; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(model: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rcx"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .arg("--normalize")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rcx serve starts");
        // The first stderr line says where it listens (the server prints it once bound).
        let mut first = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        Server { child, addr }
    }

    /// POSTs `body` as JSON; the answer's status and JSON body.
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let body = body.to_string();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(body).unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_normalize_answers_score_normalizes_numbers() {
    let eval = fixture("lengths_eval.jsonl");
    let (logits, normalized) = score(model(), &eval, &["--normalize"]);
    let (_, std) = saved_stats(model());
    let records: Vec<(String, Vec<String>)> = std::fs::read_to_string(&eval)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let completions = v["completions"].as_array().unwrap();
            let texts = completions.iter().map(|c| c.as_str().unwrap().into());
            (v["prompt"].as_str().unwrap().into(), texts.collect())
        })
        .collect();
    let body: Vec<Value> = records
        .iter()
        .map(|(prompt, completions)| json!({"prompt": prompt, "completions": completions}))
        .collect();

    let server = Server::start(model());
    let (status, answer) = server.post("/score", &Value::Array(body));
    assert_eq!(status, 200, "{answer}");
    let answers = answer.as_array().unwrap();
    assert_eq!(answers.len(), records.len());
    let mut i = 0;
    for item in answers {
        let got_logits = item["logits"].as_array().unwrap();
        let got_rewards = item["rewards"].as_array().unwrap();
        for (logit, reward) in got_logits.iter().zip(got_rewards) {
            let (logit, reward) = (logit.as_f64().unwrap(), reward.as_f64().unwrap());
            // Batched with other sequences than `rcx score`'s, a logit may differ in f32
            // summation order (1e-5, as tests/serve.rs allows); a normalised reward then
            // by that over std.
            assert!((logit - logits[i]).abs() < 1e-5, "{logit} vs {}", logits[i]);
            let tolerance = 1e-5 / std + 1e-12;
            assert!(
                (reward - normalized[i]).abs() < tolerance,
                "completion {i}: serve {reward}, rcx score --normalize {}",
                normalized[i]
            );
            i += 1;
        }
    }
    assert_eq!(i, normalized.len());

    // /get_reward's rewards are normalised too: the first record, split at its prompt.
    let (prompt, completions) = &records[0];
    let queries: Vec<String> = completions.iter().map(|c| format!("{prompt}{c}")).collect();
    let prompts = vec![prompt.clone(); queries.len()];
    let (status, answer) = server.post(
        "/get_reward",
        &json!({"query": queries, "prompts": prompts}),
    );
    assert_eq!(status, 200, "{answer}");
    let (mean, std) = saved_stats(model());
    for (reward, logit) in answer["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .zip(answer["logits"].as_array().unwrap())
    {
        let logit = logit.as_f64().unwrap() as f32 as f64;
        assert!((reward.as_f64().unwrap() - (logit - mean) / std).abs() < 1e-9);
    }
}

/// As OpenRLHF, where the loader's caller decides (`--normalize_reward`) whatever the
/// folder's `normalize_reward` says: rcx never reads the key, `--normalize` alone decides.
#[test]
fn a_folders_normalize_reward_flag_changes_nothing() {
    let eval = fixture("lengths_eval.jsonl");
    let (mean, std) = saved_stats(model());
    let (logits, raw) = score(model(), &eval, &[]);
    for flag in [true, false] {
        let dir = copy_of_model(&format!("flag-{flag}"), |c| {
            c.insert("normalize_reward".into(), json!(flag));
        });
        let (_, plain) = score(&dir, &eval, &[]);
        assert_eq!(plain, raw, "normalize_reward {flag} without --normalize");
        let (_, normalized) = score(&dir, &eval, &["--normalize"]);
        for (n, l) in normalized.iter().zip(&logits) {
            assert!(
                (n - (l - mean) / std).abs() < 1e-12,
                "normalize_reward {flag}"
            );
        }
    }
}
