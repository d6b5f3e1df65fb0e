//! Ranking data: the reader and its errors, the LongForm construction (exact output from an
//! independent Python implementation, scripts/gen_data_fixtures.py), the shipped set and
//! the tokenized cache.

use rcx::data::cache::TokenizedSet;
use rcx::data::{PromptType, RankingRecord, SHIPPED_SET, read_rankings, resolve_dataset};
use rcx::error::Error;
use rcx::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

/// A fresh, empty folder for one test, removed when the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

fn scratch(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("rcx-data-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn user_error(result: rcx::error::Result<impl std::fmt::Debug>) -> String {
    match result {
        Err(Error::User(msg)) => msg,
        other => panic!("expected a user error, got {other:?}"),
    }
}

fn rcx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(args)
        .output()
        .unwrap()
}

// ---------------------------------------------------------------- the ranking reader

#[test]
fn reads_ranked_and_pairwise_records() {
    let report = read_rankings(&fixture("rankings_small.jsonl"), false).unwrap();
    assert_eq!(report.skipped, 0);
    let r = &report.records;
    assert_eq!(r.len(), 5, "the blank line is ignored");
    assert_eq!(r[0].prompt, "Tell a story.");
    assert_eq!(r[0].completions.len(), 3);
    assert_eq!(r[0].completions[2], "Alpha.");
    assert_eq!(r[0].prompt_type, Some(PromptType::Open));
    assert_eq!(
        r[1],
        RankingRecord {
            prompt: "Hello?".into(),
            completions: vec!["Hello world, a good answer.".into(), "bad".into()],
            prompt_type: None,
            scores: None,
            margin: 0.0,
            subset: None,
        }
    );
    assert_eq!(r[2].prompt_type, Some(PromptType::Closed));
    assert_eq!(r[3].prompt, "");
    assert_eq!(r[3].completions.len(), 4);
    assert_eq!(r[3].prompt_type, None, "null prompt_type reads as absent");
    assert_eq!(r[4].completions[0], "ünïcode answer with 日本語 words");
    assert_eq!(
        r[4].completions[1], "  padded  answer ",
        "text is kept as written"
    );
}

/// (file contents, the line the error must name, words the message must contain)
fn bad_cases() -> Vec<(&'static str, Vec<u8>, usize, &'static str)> {
    let good = "{\"prompt\": \"p\", \"completions\": [\"a\", \"b\"]}\n";
    let with = |bad: &str| format!("{good}\n{bad}\n{good}").into_bytes();
    vec![
        (
            "malformed",
            with("{\"prompt\": \"p\", "),
            3,
            "malformed JSON",
        ),
        ("not_object", with("[1, 2]"), 3, "expected a JSON object"),
        (
            "no_prompt",
            with("{\"completions\": [\"a\", \"b\"]}"),
            3,
            "\"prompt\"",
        ),
        (
            "prompt_type",
            with("{\"prompt\": 3, \"completions\": [\"a\", \"b\"]}"),
            3,
            "number, expected a string",
        ),
        (
            "no_completions",
            with("{\"prompt\": \"p\"}"),
            3,
            "missing field \"completions\"",
        ),
        (
            "completions_type",
            with("{\"prompt\": \"p\", \"completions\": \"a b\"}"),
            3,
            "expected an array",
        ),
        (
            "completion_type",
            with("{\"prompt\": \"p\", \"completions\": [\"a\", 7]}"),
            3,
            "completions[1]",
        ),
        (
            "one_completion",
            with("{\"prompt\": \"p\", \"completions\": [\"a\"]}"),
            3,
            "at least 2",
        ),
        (
            "zero_completions",
            with("{\"prompt\": \"p\", \"completions\": []}"),
            3,
            "at least 2",
        ),
        (
            "empty_completion",
            with("{\"prompt\": \"p\", \"completions\": [\"a\", \"\"]}"),
            3,
            "empty",
        ),
        (
            "blank_completion",
            with("{\"prompt\": \"p\", \"completions\": [\"a\", \" \\t\\u3000\"]}"),
            3,
            "completions[1] is empty or only whitespace",
        ),
        (
            "separator_completion",
            with("{\"prompt\": \"p\", \"completions\": [\"\\u001c\\u0085\", \"b\"]}"),
            3,
            "completions[0] is empty or only whitespace",
        ),
        (
            "blank_chosen",
            with("{\"prompt\": \"p\", \"chosen\": \"\\n \", \"rejected\": \"b\"}"),
            3,
            "field \"chosen\" is empty or only whitespace",
        ),
        (
            "too_many_completions",
            with(&format!(
                "{{\"prompt\": \"p\", \"completions\": [{}]}}",
                vec!["\"c\""; 129].join(", ")
            )),
            3,
            "129 completions, at most 128",
        ),
        (
            "bad_type",
            with(
                "{\"prompt\": \"p\", \"completions\": [\"a\", \"b\"], \"prompt_type\": \"opened\"}",
            ),
            3,
            "\"open\" or \"closed\"",
        ),
        (
            "type_long",
            with(&format!(
                "{{\"prompt\": \"p\", \"completions\": [\"a\", \"b\"], \"prompt_type\": \"{}\"}}",
                "open".repeat(100_000)
            )),
            3,
            "prompt_type is \"openopen",
        ),
        (
            "type_number",
            with("{\"prompt\": \"p\", \"completions\": [\"a\", \"b\"], \"prompt_type\": 1}"),
            3,
            "\"open\" or \"closed\"",
        ),
        (
            "no_rejected",
            with("{\"prompt\": \"p\", \"chosen\": \"a\"}"),
            3,
            "\"rejected\"",
        ),
        (
            "rejected_type",
            with("{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": null}"),
            3,
            "\"rejected\" is null",
        ),
        (
            "empty_rejected",
            with("{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"\"}"),
            3,
            "field \"rejected\" is empty",
        ),
        (
            "both_forms",
            with(
                "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\", \"completions\": [\"a\", \"b\"]}",
            ),
            3,
            "one form",
        ),
        (
            "utf8",
            [
                good.as_bytes(),
                b"{\"prompt\": \"\xff\xfe\", \"completions\": [\"a\", \"b\"]}\n",
            ]
            .concat(),
            2,
            "UTF-8",
        ),
    ]
}

#[test]
fn every_bad_line_names_file_and_line_and_skip_bad_counts_it() {
    let dir = scratch("bad");
    for (name, bytes, line, words) in bad_cases() {
        let path = write(&dir, &format!("{name}.jsonl"), &bytes);
        let msg = user_error(read_rankings(&path, false));
        let at = format!("{}:{line}: ", path.display());
        assert!(
            msg.starts_with(&at),
            "{name}: {msg:?} should start with {at:?}"
        );
        assert!(
            msg.contains(words),
            "{name}: {msg:?} should mention {words:?}"
        );
        assert!(!msg.contains('\n'), "{name}: one line");
        assert!(msg.len() < 600, "{name}: a short line, {} bytes", msg.len());

        let report = read_rankings(&path, true).unwrap();
        assert_eq!(report.skipped, 1, "{name}");
        assert!(!report.records.is_empty(), "{name}");
        assert!(report.records.iter().all(|r| r.prompt == "p"), "{name}");
    }
}

#[test]
fn empty_files_are_errors_even_when_skipping() {
    let dir = scratch("empty");
    for (name, bytes) in [("empty", &b""[..]), ("blank", &b"\n  \n\r\n"[..])] {
        let path = write(&dir, &format!("{name}.jsonl"), bytes);
        for skip in [false, true] {
            let msg = user_error(read_rankings(&path, skip));
            assert!(msg.starts_with(&path.display().to_string()), "{msg}");
            assert!(msg.contains("no records"), "{msg}");
        }
    }
    let all_bad = write(&dir, "all_bad.jsonl", b"nope\n{\"prompt\": 1}\n");
    let msg = user_error(read_rankings(&all_bad, true));
    assert!(msg.contains("all 2"), "{msg}");
    let missing = dir.join("missing.jsonl");
    let msg = user_error(read_rankings(&missing, false));
    assert!(msg.contains("missing.jsonl"), "{msg}");
}

#[test]
fn crlf_line_ends_read_like_lf() {
    let dir = scratch("crlf");
    let path = write(
        &dir,
        "crlf.jsonl",
        b"{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\r\n\r\n{\"prompt\": \"q\", \"chosen\": \"c\", \"rejected\": \"d\"}\r\n",
    );
    let report = read_rankings(&path, false).unwrap();
    assert_eq!(report.records.len(), 2);
    assert_eq!(report.records[1].completions, vec!["c", "d"]);
}

// ---------------------------------------------------------------- the LongForm construction

#[test]
fn longform_matches_the_independent_construction_exactly() {
    let dir = scratch("longform");
    let input = fixture("longform_small.jsonl");
    for (seed, expected) in [
        (None, "longform_small.seed42.jsonl"),
        (Some("42"), "longform_small.seed42.jsonl"),
        (Some("7"), "longform_small.seed7.jsonl"),
    ] {
        let out = dir.join(format!("out-{seed:?}.jsonl"));
        let mut args = vec![
            "data",
            "longform",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        if let Some(seed) = seed {
            args.extend(["--seed", seed]);
        }
        let run = rcx(&args);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let got = std::fs::read(&out).unwrap();
        let want = std::fs::read(fixture(expected)).unwrap();
        assert!(got == want, "seed {seed:?}: output differs from {expected}");
    }
    // The seeds really pick different types, so the comparison above tests the RNG.
    let a = std::fs::read(fixture("longform_small.seed42.jsonl")).unwrap();
    let b = std::fs::read(fixture("longform_small.seed7.jsonl")).unwrap();
    assert_ne!(a, b);
}

#[test]
fn longform_records_follow_the_paper() {
    let report = read_rankings(&fixture("longform_small.seed42.jsonl"), false).unwrap();
    // 8 examples, one of 99 words dropped.
    assert_eq!(report.records.len(), 7);
    for r in &report.records {
        let lengths: Vec<usize> = r.completions.iter().map(|c| c.split(' ').count()).collect();
        match r.prompt_type {
            Some(PromptType::Open) => {
                assert!(
                    r.prompt
                        .ends_with(" Write the answer in an open-ended way.")
                );
                assert_eq!(lengths, [80, 70, 60, 50, 40, 30, 20, 10]);
            }
            Some(PromptType::Closed) => {
                assert!(
                    r.prompt
                        .ends_with(" Write either a short answer or a long answer.")
                );
                assert_eq!(lengths, [74, 68, 62, 56, 34, 28, 22, 16]);
            }
            None => panic!("constructed records carry their type"),
        }
        for pair in r.completions.windows(2) {
            assert!(pair[0].starts_with(&pair[1]), "answers are prefixes");
        }
    }
    // Messy whitespace collapses to single spaces; the first word is right.
    let w = &report.records[1];
    assert!(w.prompt.starts_with("Exactly one hundred."));
    assert!(w.completions[7].starts_with("w0 w1 w2 w3 w4"));
    assert!(!w.completions[0].contains("  ") && !w.completions[0].contains('\t'));
}

/// Python's whitespace, as scripts/gen_data_fixtures.py wrote it from str.isspace().
fn python_whitespace() -> Vec<(u32, u32)> {
    let text = std::fs::read_to_string(fixture("python_isspace.txt")).unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (first, last) = line.split_once(' ').unwrap();
            (
                u32::from_str_radix(first, 16).unwrap(),
                u32::from_str_radix(last, 16).unwrap(),
            )
        })
        .collect()
}

#[test]
fn longform_splits_words_on_exactly_what_python_splits_on() {
    let table = python_whitespace();
    assert!(table.len() >= 10, "the table is read");
    let mut separators = 0;
    for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
        let python = table
            .iter()
            .any(|&(first, last)| (first..=last).contains(&(c as u32)));
        separators += usize::from(python);
        assert_eq!(
            rcx::data::is_python_whitespace(c),
            python,
            "U+{:04X}",
            c as u32
        );
        // Between two words it splits them, as str.split() would.
        let text = format!("a{c}b");
        let words: Vec<&str> = rcx::data::split_words(&text).collect();
        let want: Vec<&str> = if python { vec!["a", "b"] } else { vec![&text] };
        assert_eq!(words, want, "U+{:04X}", c as u32);
    }
    assert_eq!(separators, 29, "the 29 separators of str.split()");
}

#[test]
fn longform_is_deterministic_and_atomic() {
    let dir = scratch("determinism");
    let input = fixture("longform_small.jsonl");
    let run = |seed: &str, out: &Path| {
        let r = rcx(&[
            "data",
            "longform",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--seed",
            seed,
        ]);
        assert!(r.status.success());
        std::fs::read(out).unwrap()
    };
    let first = run("123", &dir.join("a.jsonl"));
    let again = run("123", &dir.join("b.jsonl"));
    let other = run("124", &dir.join("c.jsonl"));
    assert_eq!(first, again);
    assert_ne!(first, other);
    // Only the outputs are left in the folder: no temporary files.
    let mut names: Vec<String> = std::fs::read_dir(&*dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.jsonl", "b.jsonl", "c.jsonl"]);
}

#[test]
fn longform_bad_input_exits_2_naming_file_and_line() {
    let dir = scratch("longform-bad");
    let long = "word ".repeat(100);
    let good = format!("{{\"input\": \"q\", \"output\": \"{long}\"}}\n");
    let cases = [
        (
            "malformed",
            format!("{good}{{\"input\": \n{good}"),
            2,
            "malformed JSON",
        ),
        (
            "no_output",
            format!("{good}\n{good}{{\"input\": \"q\"}}\n"),
            4,
            "missing field \"output\"",
        ),
        (
            "output_type",
            format!("{{\"input\": \"q\", \"output\": 5}}\n{good}"),
            1,
            "\"output\" is a number",
        ),
        (
            "input_type",
            format!("{good}{{\"input\": [], \"output\": \"x\"}}\n"),
            2,
            "\"input\" is an array",
        ),
    ];
    for (name, text, line, words) in cases {
        let input = write(&dir, &format!("{name}.jsonl"), text.as_bytes());
        let out = dir.join(format!("{name}.out.jsonl"));
        let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());
        let run = rcx(&["data", "longform", "--input", i, "--output", o]);
        assert_eq!(run.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains(&format!("{i}:{line}: ")),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(words), "{name}: {stderr}");
        assert!(!out.exists(), "{name}: nothing written on error");

        let run = rcx(&[
            "data",
            "longform",
            "--input",
            i,
            "--output",
            o,
            "--skip-bad",
        ]);
        assert!(run.status.success(), "{name}");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains("1 bad lines skipped"), "{name}: {stderr}");
        let kept = read_rankings(&out, false).unwrap().records.len();
        assert_eq!(kept, text.matches(&good).count(), "{name}");
    }

    let short = write(
        &dir,
        "short.jsonl",
        b"{\"input\": \"q\", \"output\": \"too short\"}\n",
    );
    let o = dir.join("short.out.jsonl");
    let run = rcx(&[
        "data",
        "longform",
        "--input",
        short.to_str().unwrap(),
        "--output",
        o.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("at least 100 words"));

    let empty = write(&dir, "empty.jsonl", b"");
    let run = rcx(&[
        "data",
        "longform",
        "--input",
        empty.to_str().unwrap(),
        "--output",
        o.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no records"));
}

// ---------------------------------------------------------------- the shipped set

#[test]
fn shipped_set_has_both_types_and_enough_prompts() {
    let train = resolve_dataset(SHIPPED_SET, false).unwrap();
    let eval = resolve_dataset(SHIPPED_SET, true).unwrap();
    assert!(
        train.ends_with("data/kjv-jargon/train.jsonl"),
        "{}",
        train.display()
    );
    assert!(
        eval.ends_with("data/kjv-jargon/eval.jsonl"),
        "{}",
        eval.display()
    );
    assert_eq!(resolve_dataset("my/own.jsonl", false), None);
    assert_eq!(resolve_dataset("kjv", true), None);

    let train = read_rankings(&train, false).unwrap().records;
    let eval = read_rankings(&eval, false).unwrap().records;
    assert!(train.len() + eval.len() >= 1500);
    assert!(eval.len() >= 150);
    assert_eq!(eval.len(), (train.len() + eval.len()).div_ceil(10).max(150));
    for split in [&train, &eval] {
        let open = split
            .iter()
            .filter(|r| r.prompt_type == Some(PromptType::Open))
            .count();
        let closed = split
            .iter()
            .filter(|r| r.prompt_type == Some(PromptType::Closed))
            .count();
        assert_eq!(open + closed, split.len());
        assert!(open > split.len() / 3 && closed > split.len() / 3);
        assert!(split.iter().any(|r| r.prompt.contains("hacker term")));
        assert!(split.iter().any(|r| r.prompt.contains("chapter")));
        assert!(split.iter().all(|r| r.completions.len() == 8));
    }
}

// ---------------------------------------------------------------- the tokenized cache

fn tokenizer(name: &str) -> Tokenizer {
    Tokenizer::from_vocab_file(&fixture(name)).unwrap()
}

/// The cache holds exactly what the tokenizer gives for every (prompt, completion).
fn assert_matches_source(set: &TokenizedSet, source: &Path, tok: &Tokenizer, max_length: usize) {
    let records = read_rankings(source, true).unwrap().records;
    assert_eq!(set.len(), records.len());
    assert!(!set.is_empty());
    for (i, record) in records.iter().enumerate() {
        assert_eq!(set.prompt_type(i), record.prompt_type, "prompt {i}");
        assert_eq!(
            set.num_completions(i),
            record.completions.len(),
            "prompt {i}"
        );
        for (j, completion) in record.completions.iter().enumerate() {
            let want = tok.encode_pair(&record.prompt, completion, max_length);
            let want_types: Vec<u8> = want.token_type_ids.iter().map(|&t| t as u8).collect();
            let (ids, types) = set.completion(i, j);
            assert_eq!(ids, &want.input_ids[..], "prompt {i} completion {j}");
            assert_eq!(types, &want_types[..], "prompt {i} completion {j}");
            assert!(ids.len() <= max_length);
        }
    }
}

fn copy_fixture(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(fixture(name), &path).unwrap();
    path
}

#[test]
fn cache_round_trips_and_is_reused() {
    let dir = scratch("cache");
    let source = copy_fixture(&dir, "rankings_small.jsonl");
    let tok = tokenizer("vocab.txt");
    let set = TokenizedSet::open_or_build(&source, &tok, 64, false).unwrap();
    assert!(set.rebuilt());
    assert!(set.cache_path().starts_with(dir.join(".rcx-cache")));
    assert_matches_source(&set, &source, &tok, 64);
    drop(set);

    let again = TokenizedSet::open_or_build(&source, &tok, 64, false).unwrap();
    assert!(!again.rebuilt(), "an unchanged source reuses the cache");
    assert_matches_source(&again, &source, &tok, 64);

    // Truncation to a smaller max_length: a rebuild, every encoding within the limit.
    let short = TokenizedSet::open_or_build(&source, &tok, 8, false).unwrap();
    assert!(short.rebuilt());
    assert_matches_source(&short, &source, &tok, 8);
    assert!(
        !TokenizedSet::open_or_build(&source, &tok, 8, false)
            .unwrap()
            .rebuilt()
    );

    // Another vocabulary: a rebuild.
    let other = tokenizer("vocab_more.txt");
    assert_ne!(tok.fingerprint(), other.fingerprint());
    let set = TokenizedSet::open_or_build(&source, &other, 8, false).unwrap();
    assert!(set.rebuilt());
    assert_matches_source(&set, &source, &other, 8);
}

#[test]
fn cache_is_rebuilt_when_the_source_changes() {
    let dir = scratch("cache-source");
    let source = copy_fixture(&dir, "rankings_small.jsonl");
    let tok = tokenizer("vocab.txt");
    assert!(
        TokenizedSet::open_or_build(&source, &tok, 32, false)
            .unwrap()
            .rebuilt()
    );

    // Touched: same bytes, new mtime. The key is the content, so the cache still serves.
    let file = std::fs::File::options().write(true).open(&source).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    file.set_modified(later).unwrap();
    drop(file);
    assert!(
        !TokenizedSet::open_or_build(&source, &tok, 32, false)
            .unwrap()
            .rebuilt()
    );

    // Rewritten with one more record.
    let mut text = std::fs::read_to_string(&source).unwrap();
    text.push_str("{\"prompt\": \"new\", \"completions\": [\"x y\", \"z\"]}\n");
    std::fs::write(&source, &text).unwrap();
    let set = TokenizedSet::open_or_build(&source, &tok, 32, false).unwrap();
    assert!(set.rebuilt());
    assert_eq!(set.len(), 6);
    assert_matches_source(&set, &source, &tok, 32);
}

/// Recomputes a cache file's checksum (header bytes 96..128: SHA-256 of the bytes after the
/// 128-byte header, then of the header's first 96), so that only its other checks judge it.
fn reseal(cache: &mut [u8]) {
    use sha2::{Digest, Sha256};
    let sum = Sha256::new()
        .chain_update(&cache[128..])
        .chain_update(&cache[..96])
        .finalize();
    cache[96..128].copy_from_slice(&sum);
}

#[test]
fn corrupt_caches_are_rebuilt_not_trusted() {
    let dir = scratch("cache-corrupt");
    let source = copy_fixture(&dir, "rankings_small.jsonl");
    let tok = tokenizer("vocab.txt");
    let cache = TokenizedSet::open_or_build(&source, &tok, 32, false)
        .unwrap()
        .cache_path()
        .to_path_buf();
    let good = std::fs::read(&cache).unwrap();
    let mut resealed = good.clone();
    reseal(&mut resealed);
    assert_eq!(resealed, good, "reseal computes the checksum as rcx does");
    let mut corruptions: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"garbage".to_vec(),
        good[..good.len() - 1].to_vec(),
        [&good[..], b"x"].concat(),
    ];
    // A flipped byte anywhere: the checksum catches it.
    for at in [0, 20, 64, 100, 128, good.len() / 2, good.len() - 1] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x10;
        corruptions.push(flipped);
    }
    // Inconsistent tables under a matching checksum (as a faulty writer would leave them):
    // a wrong count of prompts, then an out-of-range span offset.
    let mut wrong_count = good.clone();
    wrong_count[64] ^= 1;
    reseal(&mut wrong_count);
    corruptions.push(wrong_count);
    let mut wrong_span = good.clone();
    let spans_end = good.len() - 5; // 5 prompts: their types are the last 5 bytes
    wrong_span[spans_end - 9] = 0xff;
    reseal(&mut wrong_span);
    corruptions.push(wrong_span);
    // An id outside the vocabulary under a matching checksum: the cache is blamed (and
    // rebuilt), not the vocabulary or the model.
    let mut wrong_id = good.clone();
    let at = first_ids_offset(&good, &source, &tok) + 4;
    wrong_id[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
    reseal(&mut wrong_id);
    corruptions.push(wrong_id);
    for (k, bytes) in corruptions.into_iter().enumerate() {
        std::fs::write(&cache, &bytes).unwrap();
        let set = TokenizedSet::open_or_build(&source, &tok, 32, false).unwrap();
        assert!(set.rebuilt(), "corruption {k}");
        assert_matches_source(&set, &source, &tok, 32);
        assert_eq!(std::fs::read(&cache).unwrap(), good, "corruption {k}");
    }
}

#[test]
fn cache_reports_bad_lines_and_never_hides_them_from_strict_runs() {
    let dir = scratch("cache-bad");
    let mut text = std::fs::read_to_string(fixture("rankings_small.jsonl")).unwrap();
    text.push_str("{\"prompt\": \"p\", \"completions\": [\"only one\"]}\n");
    let source = write(&dir, "bad.jsonl", text.as_bytes());
    let tok = tokenizer("vocab.txt");

    let msg = user_error(TokenizedSet::open_or_build(&source, &tok, 32, false));
    assert!(
        msg.starts_with(&format!("{}:7: ", source.display())),
        "{msg}"
    );
    let cache_dir = dir.join(".rcx-cache");
    let left: Vec<_> = std::fs::read_dir(&cache_dir).map_or(Vec::new(), |d| d.collect());
    assert!(left.is_empty(), "no cache or temporary file after an error");

    let set = TokenizedSet::open_or_build(&source, &tok, 32, true).unwrap();
    assert_eq!((set.len(), set.skipped()), (5, 1));
    assert!(
        !TokenizedSet::open_or_build(&source, &tok, 32, true)
            .unwrap()
            .rebuilt()
    );
    // The cache built by skipping does not let a strict run pass.
    assert!(TokenizedSet::open_or_build(&source, &tok, 32, false).is_err());

    let empty = write(&dir, "empty.jsonl", b"\n\n");
    let msg = user_error(TokenizedSet::open_or_build(&empty, &tok, 32, true));
    assert!(msg.contains("no records"), "{msg}");
}

#[test]
fn cache_falls_back_to_the_temp_folder() {
    let dir = scratch("cache-fallback");
    let source = copy_fixture(&dir, "rankings_small.jsonl");
    // A file where the cache folder should be: that location cannot be written.
    std::fs::write(dir.join(".rcx-cache"), b"in the way").unwrap();
    let tok = tokenizer("vocab.txt");
    let set = TokenizedSet::open_or_build(&source, &tok, 16, false).unwrap();
    assert!(set.rebuilt());
    let cache = set.cache_path().to_path_buf();
    assert!(
        cache.starts_with(std::env::temp_dir().join("rcx-cache")),
        "{}",
        cache.display()
    );
    assert_matches_source(&set, &source, &tok, 16);
    drop(set);
    assert!(
        !TokenizedSet::open_or_build(&source, &tok, 16, false)
            .unwrap()
            .rebuilt()
    );
    std::fs::remove_file(cache).unwrap();
}

// ---------------------------------------------------------------- pipes, bounds, cache keys

/// Runs `f` on its own thread; a test fails instead of hanging CI when `f` regresses into
/// waiting forever (a reader that reopens a drained pipe blocks in open()).
fn within<T: Send + 'static>(
    seconds: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    match result.recv_timeout(std::time::Duration::from_secs(seconds)) {
        Ok(value) => value,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {seconds} s (it hangs)")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// `count` small pairwise records: several times the 64 KiB that the old fingerprint read.
fn many_records(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!("{{\"prompt\": \"prompt {i:05}\", \"chosen\": \"alpha beta {i}\", \"rejected\": \"gamma\"}}\n")
        })
        .collect()
}

/// Writes `bytes` into the write end of a pipe from another thread and closes it; the
/// result says whether every byte went in (a reader that stops early breaks the pipe).
fn feed(mut end: std::fs::File, bytes: Vec<u8>) -> std::thread::JoinHandle<std::io::Result<()>> {
    use std::io::Write;
    std::thread::spawn(move || end.write_all(&bytes))
}

/// An anonymous pipe: (the path a process reads it by, as `<(cat f)` gives it, the read
/// end kept open for that path, the write end).
fn anonymous_pipe() -> (PathBuf, std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two fresh descriptors that the two Files below then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    (PathBuf::from(format!("/dev/fd/{}", fds[0])), read, write)
}

#[test]
fn a_fifo_source_is_read_once_and_does_not_hang() {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch("fifo");
    // Small enough for one read (a second open of the drained FIFO waited forever for a
    // writer), and larger than the 64 KiB the old fingerprint read first (then lost).
    for count in [10, 4000] {
        let text = many_records(count);
        let regular = write(&dir, "regular.jsonl", text.as_bytes());
        let fifo = dir.join("fifo.jsonl");
        let name = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);

        let writer = {
            let fifo = fifo.clone();
            let bytes = text.clone().into_bytes();
            std::thread::spawn(move || {
                let end = std::fs::File::options().write(true).open(&fifo)?;
                feed(end, bytes).join().unwrap()
            })
        };
        let source = fifo.clone();
        let set = within(60, "tokenizing a FIFO", move || {
            TokenizedSet::open_or_build(&source, &tokenizer("vocab.txt"), 32, false)
        })
        .unwrap();
        writer.join().unwrap().expect("the writer wrote everything");
        assert!(set.rebuilt());
        assert_matches_source(&set, &regular, &tokenizer("vocab.txt"), 32);
        assert!(
            !dir.join(".rcx-cache").exists(),
            "a stream cannot be fingerprinted before it is read: no cache kept for it"
        );
        std::fs::remove_file(&fifo).unwrap();
    }
}

#[test]
fn an_anonymous_pipe_source_loses_nothing() {
    let dir = scratch("pipe");
    let text = many_records(4000);
    let regular = write(&dir, "regular.jsonl", text.as_bytes());
    let (path, read_end, write_end) = anonymous_pipe();
    let writer = feed(write_end, text.into_bytes());
    let source = path.clone();
    let set = within(60, "tokenizing a pipe", move || {
        TokenizedSet::open_or_build(&source, &tokenizer("vocab.txt"), 32, false)
    })
    .unwrap();
    drop(read_end);
    writer.join().unwrap().expect("the writer wrote everything");
    assert_matches_source(&set, &regular, &tokenizer("vocab.txt"), 32);
}

#[test]
fn an_endless_line_is_refused_at_the_line_limit() {
    let (path, read_end, write_end) = anonymous_pipe();
    // 64 MiB without a line end: four times the limit; the writer stops when the reader
    // gives up (a broken pipe).
    let writer = feed(write_end, vec![b'x'; 64 << 20]);
    let source = path.clone();
    let msg = within(60, "reading an endless line", move || {
        user_error(read_rankings(&source, false))
    });
    drop(read_end);
    let _ = writer.join().unwrap();
    assert!(msg.starts_with(&format!("{}:1: ", path.display())), "{msg}");
    assert!(msg.contains("longer than 16 MiB"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");

    // With --skip-bad the long line is skipped and the next one read.
    let dir = scratch("long-line");
    let good = "{\"prompt\": \"p\", \"completions\": [\"a\", \"b\"]}\n";
    let mut bytes = vec![b' '; (16 << 20) + 1];
    bytes.push(b'\n');
    bytes.extend_from_slice(good.as_bytes());
    let file = write(&dir, "long.jsonl", &bytes);
    let msg = user_error(read_rankings(&file, false));
    assert!(msg.starts_with(&format!("{}:1: ", file.display())), "{msg}");
    let report = read_rankings(&file, true).unwrap();
    assert_eq!((report.records.len(), report.skipped), (1, 1));
}

/// Where the ids of (prompt 0, completion 0) of `source` begin in its cache file: found by
/// content, so the test does not depend on the header's layout.
fn first_ids_offset(cache: &[u8], source: &Path, tok: &Tokenizer) -> usize {
    let record = &read_rankings(source, false).unwrap().records[0];
    let ids = tok
        .encode_pair(&record.prompt, &record.completions[0], 512)
        .input_ids;
    let pattern: Vec<u8> = ids[..3].iter().flat_map(|id| id.to_le_bytes()).collect();
    cache
        .windows(pattern.len())
        .position(|w| w == pattern)
        .expect("the first completion's ids are in the cache")
}

#[test]
fn a_same_size_edit_in_the_middle_rebuilds_the_cache() {
    let dir = scratch("cache-middle");
    let text = many_records(5000);
    let source = write(&dir, "middle.jsonl", text.as_bytes());
    let tok = tokenizer("vocab.txt");
    assert!(
        TokenizedSet::open_or_build(&source, &tok, 32, false)
            .unwrap()
            .rebuilt()
    );
    let mtime = std::fs::metadata(&source).unwrap().modified().unwrap();

    // One byte of the middle record changes; size and modification time stay the same.
    let edited = text.replacen("prompt 02500", "prompt 92500", 1);
    assert_eq!(edited.len(), text.len());
    std::fs::write(&source, &edited).unwrap();
    let file = std::fs::File::options().write(true).open(&source).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);

    let set = TokenizedSet::open_or_build(&source, &tok, 32, false).unwrap();
    assert!(set.rebuilt(), "the edit in the middle was not noticed");
    assert_matches_source(&set, &source, &tok, 32);
}

#[test]
fn a_flipped_byte_in_the_cache_is_detected() {
    let dir = scratch("cache-flip");
    let source = copy_fixture(&dir, "rankings_small.jsonl");
    let tok = tokenizer("vocab.txt");
    let cache = TokenizedSet::open_or_build(&source, &tok, 32, false)
        .unwrap()
        .cache_path()
        .to_path_buf();
    let good = std::fs::read(&cache).unwrap();
    // The second id of the first completion (a word of the prompt) becomes another word.
    let at = first_ids_offset(&good, &source, &tok) + 4;
    let mut flipped = good.clone();
    flipped[at] ^= 1;
    std::fs::write(&cache, &flipped).unwrap();

    let set = TokenizedSet::open_or_build(&source, &tok, 32, false).unwrap();
    assert!(set.rebuilt(), "the flipped byte went unnoticed");
    assert_matches_source(&set, &source, &tok, 32);
    assert_eq!(std::fs::read(&cache).unwrap(), good);
}

#[test]
fn a_cache_of_another_tokenizer_version_is_rebuilt() {
    let dir = scratch("cache-version");
    let source = copy_fixture(&dir, "rankings_small.jsonl");
    let tok = tokenizer("vocab.txt");
    let cache = TokenizedSet::open_or_build(&source, &tok, 32, false)
        .unwrap()
        .cache_path()
        .to_path_buf();
    let good = std::fs::read(&cache).unwrap();
    // Bytes 12..16 of the header hold the tokenizer's version: as a cache written by the
    // next version would have it, checksum and all.
    let mut other = good.clone();
    other[12..16].copy_from_slice(&(rcx::tokenizer::TOKENIZER_VERSION + 1).to_le_bytes());
    reseal(&mut other);
    std::fs::write(&cache, &other).unwrap();
    let set = TokenizedSet::open_or_build(&source, &tok, 32, false).unwrap();
    assert!(
        set.rebuilt(),
        "a cache of another tokenizer version was reused"
    );
    assert_eq!(std::fs::read(&cache).unwrap(), good);
}

/// tiny-bert (vocab_size 128) with the 40-entry fixture vocabulary, filled up to one entry
/// per embedding row with unused tokens (a model folder's vocabulary must match its
/// vocab_size), as a model folder.
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/tiny-bert");
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny.join(name), model.join(name)).unwrap();
    }
    let mut vocab = std::fs::read_to_string(fixture("vocab.txt")).unwrap();
    let entries = vocab.lines().count();
    vocab.extend((entries..128).map(|i| format!("[unused{i}]\n")));
    std::fs::write(model.join("vocab.txt"), vocab).unwrap();
    model
}

#[test]
fn score_reads_data_from_stdin_whole() {
    use std::io::Write;
    let dir = scratch("score-stdin");
    let model = tiny_model(&dir);
    let text = many_records(1500);
    assert!(text.len() > 64 * 1024);
    let file = write(&dir, "records.jsonl", text.as_bytes());
    let m = model.to_str().unwrap();
    let from_file = rcx(&["score", "--model", m, "--data", file.to_str().unwrap()]);
    assert!(from_file.status.success());

    // Only checked when absent before: the old reader made it, as root, from /dev/stdin.
    let dev_cache = Path::new("/dev/.rcx-cache");
    let dev_cache_before = dev_cache.exists();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["score", "--model", m, "--data", "/dev/stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let from_pipe = within(120, "rcx score on a pipe", move || {
        child.wait_with_output().unwrap()
    });
    let _ = writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&from_pipe.stderr);
    assert!(from_pipe.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&from_pipe.stdout).lines().count(),
        3000
    );
    assert!(
        from_pipe.stdout == from_file.stdout,
        "the same scores as from the file"
    );
    assert!(
        dev_cache_before || !dev_cache.exists(),
        "no cache put in /dev"
    );
}

#[test]
fn a_corrupt_cached_id_is_blamed_on_the_cache_not_the_vocabulary() {
    let dir = scratch("cache-score");
    let model = tiny_model(&dir);
    let source = copy_fixture(&dir, "rankings_small.jsonl");
    let score = || {
        rcx(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--data",
            source.to_str().unwrap(),
        ])
    };
    let first = score();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );

    let cache = dir.join(".rcx-cache/rankings_small.jsonl.rcxcache");
    let mut bytes = std::fs::read(&cache).unwrap();
    let at = first_ids_offset(&bytes, &source, &tokenizer("vocab.txt")) + 4;
    bytes[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
    std::fs::write(&cache, &bytes).unwrap();

    let again = score();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert_eq!(
        again.stdout, first.stdout,
        "the same scores from the rebuilt cache"
    );
    assert!(
        stderr.contains(cache.to_str().unwrap()),
        "names the cache: {stderr}"
    );
    assert!(stderr.contains("rebuil"), "{stderr}");
    assert!(!stderr.contains("vocab.txt"), "{stderr}");
}
