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
        }
    );
    assert_eq!(r[2].prompt_type, Some(PromptType::Closed));
    assert_eq!(r[3].prompt, "");
    assert_eq!(r[3].completions.len(), 4);
    assert_eq!(r[3].prompt_type, None, "null prompt_type reads as absent");
    assert_eq!(r[4].completions[0], "ünïcode answer with 日本語 words");
    assert_eq!(
        r[4].completions[1], "   ",
        "whitespace-only text is allowed"
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
            "bad_type",
            with(
                "{\"prompt\": \"p\", \"completions\": [\"a\", \"b\"], \"prompt_type\": \"opened\"}",
            ),
            3,
            "\"open\" or \"closed\"",
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
            "empty",
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
    // 7 examples, one of 99 words dropped.
    assert_eq!(report.records.len(), 6);
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

    // Touched: same bytes, new mtime.
    let file = std::fs::File::options().write(true).open(&source).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    file.set_modified(later).unwrap();
    drop(file);
    assert!(
        TokenizedSet::open_or_build(&source, &tok, 32, false)
            .unwrap()
            .rebuilt()
    );
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
    let mut corruptions: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"garbage".to_vec(),
        good[..good.len() - 1].to_vec(),
        [&good[..], b"x"].concat(),
    ];
    // A wrong count of prompts, then an out-of-range span offset in the tables.
    let mut wrong_count = good.clone();
    wrong_count[40] ^= 1;
    corruptions.push(wrong_count);
    let mut wrong_span = good.clone();
    let spans_end = good.len() - 5; // 5 prompts: their types are the last 5 bytes
    wrong_span[spans_end - 9] = 0xff;
    corruptions.push(wrong_span);
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
