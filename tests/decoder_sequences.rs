//! A decoder's (prompt, completion) sequence over a tokenizer.json BPE against Hugging Face
//! `tokenizers`: tests/fixtures/decoder_sequences/cases.json (made by
//! scripts/gen_decoder_sequence_fixtures.py) holds `encode(prompt).ids` +
//! `encode(completion, add_special_tokens=False).ids` + EOS, and the same cut to several
//! max_length values by the rule (prompt from its start, completion from its end, BOS and
//! EOS kept), for the Llama 3 (BOS added), Qwen2 (no BOS) and Llama 2 styles; then
//! `rcx tokenize --pair` on those files, its EOS default, and the errors.

use rcx::error::Error;
use rcx::tokenizer::Tokenizer;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer_json")
        .join(format!("{name}.json"))
}

struct Case {
    tokenizer: String,
    eos_id: u32,
    prompt: String,
    completion: String,
    max_length: Option<usize>,
    ids: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoder_sequences/cases.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    cases
        .iter()
        .map(|case| Case {
            tokenizer: case["tokenizer"].as_str().unwrap().to_string(),
            eos_id: case["eos_id"].as_u64().unwrap() as u32,
            prompt: case["prompt"].as_str().unwrap().to_string(),
            completion: case["completion"].as_str().unwrap().to_string(),
            max_length: case["max_length"].as_u64().map(|n| n as usize),
            ids: case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect(),
        })
        .collect()
}

fn decoder(style: &str, eos_id: u32) -> Tokenizer {
    Tokenizer::from_decoder_file(&fixture(style), eos_id, eos_id).unwrap()
}

#[test]
fn every_sequence_equals_the_reference_cut_by_the_rule() {
    let cases = cases();
    let mut tokenizers = BTreeMap::new();
    let mut per_style: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for case in &cases {
        let tok = tokenizers
            .entry(case.tokenizer.clone())
            .or_insert_with(|| decoder(&case.tokenizer, case.eos_id));
        let max_length = case.max_length.unwrap_or(usize::MAX);
        // The prompt tokenized once, as the data pipeline does for its K completions.
        let prompt = tok.try_tokenize(&case.prompt).unwrap();
        let completion = tok.try_tokenize(&case.completion).unwrap();
        let encoding = tok.encode_tokenized_pair(&prompt, &completion, max_length);
        assert_eq!(
            encoding.input_ids, case.ids,
            "{} max_length {:?}: prompt {:?}, completion {:?}",
            case.tokenizer, case.max_length, case.prompt, case.completion
        );
        assert_eq!(encoding.token_type_ids, vec![0; case.ids.len()]);
        assert_eq!(encoding.input_ids.last(), Some(&case.eos_id));
        assert!(encoding.input_ids.len() <= max_length);
        assert_eq!(
            tok.encode_pair(&case.prompt, &case.completion, max_length),
            encoding
        );
        let counts = per_style.entry(case.tokenizer.as_str()).or_default();
        counts.0 += 1;
        counts.1 += usize::from(
            case.max_length
                .is_some_and(|n| n < prompt.len() + completion.len() + tok.least_pair_length()),
        );
    }
    // Every style, each with whole and truncated sequences.
    assert_eq!(
        per_style.keys().copied().collect::<Vec<_>>(),
        ["llama2", "llama3", "qwen2"]
    );
    for (style, (all, cut)) in &per_style {
        assert!(
            *all >= 40 && *cut >= 20,
            "{style}: {all} cases, {cut} truncated"
        );
    }
}

#[test]
fn bos_where_the_post_processor_adds_one_and_the_eos_always() {
    // Llama 3's template adds <|begin_of_text|> (id 0); Qwen2's files add nothing.
    let llama3 = decoder("llama3", 1);
    assert_eq!(llama3.least_pair_length(), 2);
    let prompt = llama3.try_tokenize("one two three four five").unwrap();
    let completion = llama3.try_tokenize("six seven eight nine ten").unwrap();
    for max_length in 2..prompt.len() + completion.len() + 4 {
        let ids = llama3
            .encode_tokenized_pair(&prompt, &completion, max_length)
            .input_ids;
        assert_eq!(ids[0], 0, "max_length {max_length}: BOS kept");
        assert_eq!(*ids.last().unwrap(), 1, "max_length {max_length}: EOS kept");
        assert_eq!(
            ids.len(),
            max_length.min(prompt.len() + completion.len() + 2)
        );
        // Between them: an end of the prompt, then a start of the completion.
        let body = &ids[1..ids.len() - 1];
        let split = (0..=body.len().min(prompt.len())).any(|k| {
            body.len() - k <= completion.len()
                && body[..k] == prompt[prompt.len() - k..]
                && body[k..] == completion[..body.len() - k]
        });
        assert!(split, "max_length {max_length}: {ids:?}");
    }
    let qwen2 = decoder("qwen2", 0);
    assert_eq!(qwen2.least_pair_length(), 1);
    let ids = qwen2.encode_pair("a b", "c", 1).input_ids;
    assert_eq!(ids, [0], "only the EOS fits");
}

#[test]
fn the_prompt_loses_its_start_and_the_completion_its_end() {
    let tok = decoder("llama3", 1);
    let prompt: Vec<u32> = (100..110).collect();
    let completion: Vec<u32> = (200..204).collect();
    // Budget 8 after BOS and EOS: the shorter completion keeps its 4, the prompt its last 4.
    let ids = tok
        .encode_tokenized_pair(&prompt, &completion, 10)
        .input_ids;
    assert_eq!(ids, [0, 106, 107, 108, 109, 200, 201, 202, 203, 1]);
    // Budget 5: both longer than half; the longer prompt gets the odd id.
    let ids = tok.encode_tokenized_pair(&prompt, &completion, 7).input_ids;
    assert_eq!(ids, [0, 107, 108, 109, 200, 201, 1]);
    // A long completion after a short prompt loses its end.
    let ids = tok.encode_tokenized_pair(&completion, &prompt, 8).input_ids;
    assert_eq!(ids, [0, 201, 202, 203, 100, 101, 102, 1]);
}

#[test]
fn ids_outside_the_vocabulary_are_refused_naming_the_file() {
    let path = fixture("llama3");
    for (eos, pad, what) in [(900, 0, "eos id 900"), (1, 5000, "padding id 5000")] {
        let err = Tokenizer::from_decoder_file(&path, eos, pad).unwrap_err();
        let Error::User(message) = &err else {
            panic!("expected a user error, got {err:?}")
        };
        assert!(
            message.contains("llama3.json") && message.contains(what),
            "{message}"
        );
        assert!(!message.contains('\n'));
    }
}

#[test]
fn the_fingerprint_keys_the_file_and_the_eos() {
    let a = decoder("llama3", 1).fingerprint();
    assert_eq!(a, decoder("llama3", 1).fingerprint());
    assert_ne!(a, decoder("llama3", 4).fingerprint());
    assert_ne!(a, decoder("llama3_left", 1).fingerprint());
}

fn rcx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(args)
        .output()
        .unwrap()
}

fn printed_ids(out: &std::process::Output) -> Vec<u32> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    printed["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn the_command_prints_the_sequence() {
    let cases = cases();
    // One whole and one cut sequence per style, with --eos and with the default EOS (the
    // fixtures' EOS tokens are the file's <|end_of_text|>, <|endoftext|>, </s>).
    for style in ["llama3", "qwen2", "llama2"] {
        let whole = cases
            .iter()
            .find(|c| c.tokenizer == style && c.max_length.is_none() && c.prompt.len() > 20)
            .unwrap();
        // About a quarter of the whole length: both texts are cut.
        let cut = cases
            .iter()
            .filter(|c| c.tokenizer == style && c.prompt == whole.prompt)
            .filter_map(|c| c.max_length.map(|n| (n, c)))
            .filter(|(n, _)| *n <= whole.ids.len() / 4)
            .max_by_key(|(n, _)| *n)
            .unwrap();
        let path = fixture(style);
        let path = path.to_str().unwrap();
        let eos = whole.eos_id.to_string();
        let base = ["tokenize", "--tokenizer", path, "--pair", &whole.completion];
        let out = rcx(&[&base[..], &[whole.prompt.as_str()]].concat());
        assert_eq!(printed_ids(&out), whole.ids, "{style}");
        let out = rcx(&[&base[..], &["--eos", &eos, whole.prompt.as_str()]].concat());
        assert_eq!(printed_ids(&out), whole.ids, "{style}");
        let n = cut.0.to_string();
        let out = rcx(&[&base[..], &["--max-length", &n, whole.prompt.as_str()]].concat());
        assert_eq!(printed_ids(&out), cut.1.ids, "{style} --max-length {n}");
    }
}

#[test]
fn the_command_takes_the_eos_of_the_config_beside_the_file() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("decoder_sequences-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::copy(fixture("llama3"), &path).unwrap();
    // Llama 3 Instruct lists several EOS ids: rcx train ends sequences with the first.
    std::fs::write(dir.join("config.json"), r#"{"eos_token_id": [4, 1]}"#).unwrap();
    let out = rcx(&[
        "tokenize",
        "--tokenizer",
        path.to_str().unwrap(),
        "--pair",
        "b",
        "a",
    ]);
    let ids = printed_ids(&out);
    assert_eq!((ids[0], *ids.last().unwrap()), (0, 4));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `rcx tokenize --tokenizer` on a named pipe (a FIFO, or `<(...)`), fed once: the
/// command reads the file once. It read a BPE file up to four times for --pair (its kind
/// twice, the EOS default, the tokenizer), and the second open of the drained FIFO waited
/// forever for a writer.
#[test]
fn the_command_reads_its_tokenizer_once_so_a_pipe_serves() {
    use std::os::unix::ffi::OsStrExt;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("decoder_sequences-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let regular = fixture("llama2");
    let fifo = dir.join("tokenizer.json");
    let name = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let cases: [&[&str]; 3] = [
        &["--pair", "the end", "the cat"],
        &["--pair", "the end", "--eos", "2", "the cat"],
        &["the cat"],
    ];
    for extra in cases {
        let args = |path: &Path| {
            let mut args = vec!["tokenize", "--tokenizer"];
            args.push(path.to_str().unwrap());
            args.extend_from_slice(extra);
            args.into_iter().map(String::from).collect::<Vec<_>>()
        };
        let want = Command::new(env!("CARGO_BIN_EXE_rcx"))
            .args(args(&regular))
            .output()
            .unwrap();
        assert!(want.status.success(), "{extra:?}");

        let mut child = Command::new(env!("CARGO_BIN_EXE_rcx"))
            .args(args(&fifo))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let bytes = std::fs::read(&regular).unwrap();
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                std::fs::File::options()
                    .write(true)
                    .open(&fifo)?
                    .write_all(&bytes)
            })
        };
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > std::time::Duration::from_secs(60) {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("{extra:?}: still running after 60 s (it reopened the pipe)");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().expect("the writer wrote every byte");
        assert_eq!(
            (out.status.code(), &out.stdout),
            (Some(0), &want.stdout),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_command_refuses_what_it_cannot_honour() {
    let path = fixture("llama3");
    let path = path.to_str().unwrap();
    let refused = |args: &[&str], wanted: &str| {
        let out = rcx(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    };
    // Below BOS + EOS: a user error, not a panic nor a longer sequence.
    refused(
        &[
            "tokenize",
            "--tokenizer",
            path,
            "--pair",
            "b",
            "--max-length",
            "1",
            "a",
        ],
        "--max-length 1: expected at least 2",
    );
    refused(
        &[
            "tokenize",
            "--tokenizer",
            path,
            "--pair",
            "b",
            "--eos",
            "900",
            "a",
        ],
        "eos id 900",
    );
    refused(
        &["tokenize", "--tokenizer", path, "--eos", "1", "a"],
        "--eos",
    );
    // An encoder's Unigram pair has no EOS to set.
    let unigram =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unigram/deberta/tokenizer.json");
    let unigram = unigram.to_str().unwrap();
    refused(
        &[
            "tokenize",
            "--tokenizer",
            unigram,
            "--pair",
            "b",
            "--eos",
            "1",
            "a",
        ],
        "--eos",
    );
    // A file without any known EOS token and no config.json beside it: --eos is asked for.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("decoder_sequences-bare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bare = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(fixture("llama3")).unwrap();
    std::fs::write(&bare, text.replace("<|end_of_text|>", "<|end|>")).unwrap();
    refused(
        &[
            "tokenize",
            "--tokenizer",
            bare.to_str().unwrap(),
            "--pair",
            "b",
            "a",
        ],
        "expected --eos ID",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_text_the_file_cannot_encode_is_an_error_naming_it() {
    // As `tokenizers` fails ("Unk token `<nope>` not found in the vocabulary") on a char
    // that needs an unknown token the vocabulary lacks.
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama2")).unwrap()).unwrap();
    data["model"]["byte_fallback"] = Value::Bool(false);
    data["model"]["unk_token"] = Value::from("<nope>");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("decoder_sequences-unk-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec(&data).unwrap()).unwrap();
    let tok = Tokenizer::from_decoder_file(&path, 2, 2).unwrap();
    assert!(tok.try_tokenize("a b").is_ok_and(|ids| !ids.is_empty()));
    let err = tok.try_tokenize("a \u{2603} b").unwrap_err();
    let Error::User(message) = &err else {
        panic!("expected a user error, got {err:?}")
    };
    assert!(
        message.contains(path.file_name().unwrap().to_str().unwrap()) && message.contains("<nope>")
    );
    // The infallible form warns and gives no ids rather than wrong ones.
    assert_eq!(tok.tokenize("a \u{2603} b"), Vec::<u32>::new());
    let out = rcx(&[
        "tokenize",
        "--tokenizer",
        path.to_str().unwrap(),
        "--pair",
        "a \u{2603} b",
        "--eos",
        "2",
        "prompt",
    ]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_file(&path).unwrap();
}
