//! Fuzzing the readers of user data files: ranking and pairwise JSON lines (through the
//! reader and the token cache), LongForm-style input, vocab.txt, and token cache files.
//! Each starts from valid inputs and mutates them (flipped bytes, cuts, deletions, repeats,
//! inserted huge numbers, deep nesting, invalid UTF-8, long runs, separators), seeded so
//! that every CI run checks the same cases. Whatever the input: no panic, no hang, and
//! every rejection is a one-line user error that names the file.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use rcx::data::cache::TokenizedSet;
use rcx::data::longform::build_longform;
use rcx::data::{MAX_COMPLETIONS, read_rankings};
use rcx::error::Error;
use rcx::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// A fresh, empty folder for one test, removed when the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("rcx-fuzz-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

/// Runs `cases` seeded cases of `test` on inputs from `inputs`, on a watchdog thread: a
/// reader that hangs fails the test instead of stalling CI.
fn fuzz<S>(name: &'static str, cases: u32, inputs: S, test: fn(&Path, Vec<u8>) -> Check)
where
    S: Strategy<Value = Vec<u8>> + Send + 'static,
{
    let dir = scratch(name);
    let folder = dir.0.clone();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut runner = TestRunner::new(Config {
            cases,
            rng_seed: RngSeed::Fixed(0x5eed_0000 + u64::from(cases)),
            failure_persistence: None,
            ..Config::default()
        });
        let outcome = runner.run(&inputs, |bytes| test(&folder, bytes));
        let _ = done.send(outcome.map_err(|e| e.to_string()));
    });
    match result.recv_timeout(std::time::Duration::from_secs(300)) {
        Ok(Ok(())) => {}
        Ok(Err(failure)) => panic!("{name}: {failure}"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{name}: still running after 300 s (a reader hangs)")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{name}: panicked"),
    }
}

type Check = Result<(), TestCaseError>;

/// A rejection must be a one-line user error naming the file.
fn check_rejection(err: &Error, path: &Path) -> Check {
    let msg = match err {
        Error::User(msg) => msg,
        other => return Err(TestCaseError::fail(format!("not a user error: {other:?}"))),
    };
    prop_assert!(!msg.contains('\n'), "more than one line: {msg:?}");
    prop_assert!(
        msg.starts_with(&path.display().to_string()),
        "does not name the file: {msg:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------- mutations

/// Byte strings that break parsers: huge and odd numbers, deep nesting, invalid UTF-8,
/// escapes, separators, line ends, long runs.
fn nasty_chunks() -> Vec<Vec<u8>> {
    let mut chunks: Vec<Vec<u8>> = [
        &b"1e999999"[..],
        b"-1e-999999",
        b"18446744073709551616",
        b"-9223372036854775809",
        b"NaN",
        b"null",
        b"true",
        b"{}",
        b"[]",
        b"\"\"",
        b"\" \"",
        b"\"\\u001c\\u0085\"",
        b"\"\\ud800\"",
        b"\"\\u0000\"",
        b"\xff\xfe",
        b"\xc3",
        b"\xed\xa0\x80",
        b"\x00",
        b"\n",
        b"\r\n",
        b"\"completions\": [\"a\"]",
        b"\"chosen\": \"x\"",
        b"\"prompt_type\": \"closed\"",
        b"[CLS][SEP][MASK]",
        b"##",
        "\u{3000}\u{2028}\u{feff}\u{200b}".as_bytes(),
        "ǅǈ𝔘İẞ".as_bytes(),
    ]
    .iter()
    .map(|c| c.to_vec())
    .collect();
    chunks.push([b"[".repeat(10_000), b"]".repeat(10_000)].concat());
    chunks.push(b"{\"a\":".repeat(5_000));
    chunks.push(vec![b'a'; 70_000]);
    chunks.push(format!("[{}]", vec!["\"c\""; MAX_COMPLETIONS + 1].join(",")).into_bytes());
    chunks
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Cut(Index),
    Delete(Index, Index),
    Repeat(Index, Index),
    Insert(Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        any::<Index>().prop_map(Mutation::Cut),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Delete(a, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Repeat(a, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(at, c)| Mutation::Insert(at, c)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation, chunks: &[Vec<u8>]) {
    let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
    let len = bytes.len();
    match m {
        Mutation::Flip(i, mask) if len > 0 => bytes[i.index(len)] ^= mask,
        Mutation::Flip(..) => {}
        Mutation::Cut(i) => bytes.truncate(at(i, len)),
        Mutation::Delete(a, b) | Mutation::Repeat(a, b) => {
            let (x, y) = (at(a, len), at(b, len));
            let (start, end) = (x.min(y), x.max(y));
            if let Mutation::Delete(..) = m {
                bytes.drain(start..end);
            } else {
                let copy = bytes[start..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
        Mutation::Insert(i, c) => {
            let chunk = &chunks[c.index(chunks.len())];
            let pos = at(i, len);
            bytes.splice(pos..pos, chunk.iter().copied());
        }
    }
}

/// `start` then 0 to 8 mutations: a fifth of the cases stay as they were, the rest change.
fn mutated(start: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let chunks = nasty_chunks();
    let mutations = prop_oneof![
        1 => Just(Vec::new()),
        4 => prop::collection::vec(mutation(), 1..=8),
    ];
    (start, mutations).prop_map(move |(mut bytes, mutations)| {
        for m in &mutations {
            apply(&mut bytes, m, &chunks);
        }
        bytes
    })
}

/// Files of 1 to 4 lines picked from `corpus`.
fn files_of_lines(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<Index>(), 1..=4).prop_map(move |picks| {
        picks
            .iter()
            .flat_map(|i| {
                let line = &corpus[i.index(corpus.len())];
                line.iter().copied().chain(std::iter::once(b'\n'))
            })
            .collect()
    })
}

fn lines_of(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

// ---------------------------------------------------------------- the readers

fn ranking_corpus() -> Vec<Vec<u8>> {
    let mut corpus = lines_of(&std::fs::read_to_string(fixture("rankings_small.jsonl")).unwrap());
    corpus.extend(lines_of(concat!(
        "{\"prompt\": \"p\", \"chosen\": \"good answer\", \"rejected\": \"bad\"}\n",
        "{\"prompt\": \"q\", \"completions\": [\"a b\", \"c\"], \"prompt_type\": \"closed\"}\n",
    )));
    let many: Vec<String> = (0..MAX_COMPLETIONS).map(|i| format!("\"c{i}\"")).collect();
    corpus.push(
        format!(
            "{{\"prompt\": \"p\", \"completions\": [{}]}}",
            many.join(",")
        )
        .into_bytes(),
    );
    corpus
}

/// The reader and the token cache agree on every file: the same records, or the same
/// one-line error naming the file; strict and skipping runs alike.
fn check_rankings(dir: &Path, bytes: Vec<u8>) -> Check {
    let path = dir.join("rankings.jsonl");
    std::fs::write(&path, &bytes).unwrap();
    let tok = Tokenizer::from_vocab_file(&fixture("vocab.txt")).unwrap();
    for skip_bad in [false, true] {
        let read = read_rankings(&path, skip_bad);
        let cached = TokenizedSet::open_or_build(&path, &tok, 24, skip_bad);
        match (&read, &cached) {
            (Ok(report), Ok(set)) => {
                prop_assert_eq!(set.len(), report.records.len());
                for (i, record) in report.records.iter().enumerate() {
                    let k = record.completions.len();
                    prop_assert!((2..=MAX_COMPLETIONS).contains(&k));
                    prop_assert_eq!(set.num_completions(i), k);
                    for completion in &record.completions {
                        prop_assert!(!completion.chars().all(rcx::data::is_python_whitespace));
                    }
                    let (ids, _) = set.completion(i, k - 1);
                    prop_assert!(ids.len() <= 24);
                    prop_assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
                }
            }
            (Err(a), Err(b)) => {
                check_rejection(a, &path)?;
                prop_assert_eq!(a.to_string(), b.to_string());
            }
            _ => prop_assert!(false, "reader {read:?} but cache {cached:?}"),
        }
    }
    Ok(())
}

#[test]
fn ranking_and_pairwise_records_never_break_the_reader_or_the_cache() {
    fuzz(
        "rankings",
        2500,
        mutated(files_of_lines(ranking_corpus())),
        check_rankings,
    );
}

fn check_longform(dir: &Path, bytes: Vec<u8>) -> Check {
    let path = dir.join("longform.jsonl");
    std::fs::write(&path, &bytes).unwrap();
    for skip_bad in [false, true] {
        match build_longform(&path, 42, skip_bad) {
            Ok(report) => {
                prop_assert!(report.kept <= report.examples);
                for line in report.jsonl.lines() {
                    let value: serde_json::Value = serde_json::from_str(line).unwrap();
                    prop_assert_eq!(value["completions"].as_array().unwrap().len(), 8);
                }
            }
            Err(e) => check_rejection(&e, &path)?,
        }
    }
    Ok(())
}

#[test]
fn longform_input_never_breaks_the_construction() {
    let corpus = lines_of(&std::fs::read_to_string(fixture("longform_small.jsonl")).unwrap());
    fuzz(
        "longform",
        600,
        mutated(files_of_lines(corpus)),
        check_longform,
    );
}

fn check_vocab(dir: &Path, bytes: Vec<u8>) -> Check {
    let path = dir.join("vocab.txt");
    std::fs::write(&path, &bytes).unwrap();
    match Tokenizer::from_vocab_file(&path) {
        Ok(tok) => {
            for (a, b) in [
                ("Hello, world!", "A story about alpha."),
                ("[CLS] x [SEP]", "ünïcode 日本語 ##s"),
                ("", "a"),
            ] {
                let enc = tok.encode_pair(a, b, 16);
                prop_assert!(enc.input_ids.len() <= 16);
                prop_assert!(
                    enc.input_ids
                        .iter()
                        .all(|&id| (id as usize) < tok.vocab_size())
                );
            }
        }
        Err(e) => check_rejection(&e, &path)?,
    }
    Ok(())
}

#[test]
fn vocabulary_files_never_break_the_tokenizer() {
    let vocab = std::fs::read(fixture("vocab.txt")).unwrap();
    fuzz("vocab", 2500, mutated(Just(vocab)), check_vocab);
}

fn check_cache(dir: &Path, bytes: Vec<u8>) -> Check {
    let source = dir.join("rankings.jsonl");
    let cache = dir.join(".rcx-cache/rankings.jsonl.rcxcache");
    let tok = Tokenizer::from_vocab_file(&fixture("vocab.txt")).unwrap();
    if !source.exists() {
        std::fs::copy(fixture("rankings_small.jsonl"), &source).unwrap();
    }
    std::fs::create_dir_all(cache.parent().unwrap()).unwrap();
    std::fs::write(&cache, &bytes).unwrap();
    let mut sealed = bytes.clone();
    let forged = bytes.len() >= 128 && {
        reseal(&mut sealed);
        sealed == bytes
    };
    let set = TokenizedSet::open_or_build(&source, &tok, 24, false);
    prop_assert!(set.is_ok(), "{set:?}");
    let set = set.unwrap();
    let records = read_rankings(&source, false).unwrap().records;
    if forged {
        // A matching checksum proves nothing against forgery: what is served must still
        // be sound for the model (structure, ids within the vocabulary, token types 0/1).
        for i in 0..set.len() {
            for j in 0..set.num_completions(i) {
                let (ids, types) = set.completion(i, j);
                prop_assert!(ids.len() <= 24 && ids.len() == types.len());
                prop_assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
                prop_assert!(types.iter().all(|&t| t <= 1));
            }
        }
        return Ok(());
    }
    // Otherwise, whatever the cache file holds, the set read is exactly the source's.
    prop_assert_eq!(set.len(), records.len());
    for (i, record) in records.iter().enumerate() {
        for (j, completion) in record.completions.iter().enumerate() {
            let want = tok.encode_pair(&record.prompt, completion, 24);
            prop_assert_eq!(set.completion(i, j).0, &want.input_ids[..]);
        }
    }
    Ok(())
}

#[test]
fn token_cache_files_never_serve_wrong_ids() {
    let dir = scratch("cache-source");
    let source = dir.0.join("rankings.jsonl");
    std::fs::copy(fixture("rankings_small.jsonl"), &source).unwrap();
    let tok = Tokenizer::from_vocab_file(&fixture("vocab.txt")).unwrap();
    let set = TokenizedSet::open_or_build(&source, &tok, 24, false).unwrap();
    let good = std::fs::read(set.cache_path()).unwrap();
    // Half the mutated files get a matching checksum, so that the checks behind it are
    // fuzzed too.
    let files = (mutated(Just(good)), any::<bool>()).prop_map(|(mut bytes, seal)| {
        if seal && bytes.len() >= 128 {
            reseal(&mut bytes);
        }
        bytes
    });
    fuzz("cache", 1500, files, check_cache);
}

/// Recomputes a cache file's checksum (header bytes 96..128: SHA-256 of the bytes after the
/// 128-byte header, then of the header's first 96).
fn reseal(cache: &mut [u8]) {
    use sha2::{Digest, Sha256};
    let sum = Sha256::new()
        .chain_update(&cache[128..])
        .chain_update(&cache[..96])
        .finalize();
    cache[96..128].copy_from_slice(&sum);
}
