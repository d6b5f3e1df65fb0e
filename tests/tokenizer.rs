//! The tokenizer against Hugging Face BertTokenizerFast: every case of
//! tests/fixtures/tokenizer/cases.json (scripts/gen_tokenizer_fixture.py) must match id for
//! id; bad vocabulary files must fail with a message naming the file and line.

use rcx::tokenizer::WordPiece;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Deserialize)]
struct Cases {
    singles: Vec<Single>,
    pairs: Vec<Pair>,
}

#[derive(Deserialize)]
struct Single {
    text: String,
    max_length: usize,
    ids: Vec<u32>,
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Pair {
    a: String,
    b: String,
    max_length: usize,
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vocab_path() -> PathBuf {
    root().join("data/vocab.txt")
}

fn cases() -> Cases {
    let path = root().join("tests/fixtures/tokenizer/cases.json");
    let text = std::fs::read_to_string(&path).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture parses")
}

fn bert() -> WordPiece {
    WordPiece::from_vocab_file(&vocab_path()).expect("data/vocab.txt loads")
}

#[test]
fn vocab_is_bert_base_uncased() {
    let tok = bert();
    assert_eq!(tok.vocab_size(), 30522);
    assert_eq!(tok.pad_id(), 0);
    assert_eq!(tok.unk_id(), 100);
    assert_eq!(tok.cls_id(), 101);
    assert_eq!(tok.sep_id(), 102);
}

#[test]
fn singles_match_reference() {
    let tok = bert();
    let cases = cases();
    assert!(cases.singles.len() >= 80);
    let mut failures = Vec::new();
    for case in &cases.singles {
        let ids = tok.tokenize(&case.text);
        let enc = tok.encode(&case.text, case.max_length);
        if ids != case.ids
            || enc.input_ids != case.input_ids
            || enc.token_type_ids != case.token_type_ids
        {
            failures.push(format!(
                "{:?} (max_length {}): ids {:?} want {:?}; input_ids {:?} want {:?}; types {:?} want {:?}",
                case.text,
                case.max_length,
                ids,
                case.ids,
                enc.input_ids,
                case.input_ids,
                enc.token_type_ids,
                case.token_type_ids
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn pairs_match_reference() {
    let tok = bert();
    let cases = cases();
    assert!(cases.pairs.len() >= 30);
    let mut failures = Vec::new();
    for case in &cases.pairs {
        let enc = tok.encode_pair(&case.a, &case.b, case.max_length);
        if enc.input_ids != case.input_ids || enc.token_type_ids != case.token_type_ids {
            failures.push(format!(
                "{:?} + {:?} (max_length {}): input_ids {:?} want {:?}; types {:?} want {:?}",
                case.a,
                case.b,
                case.max_length,
                enc.input_ids,
                case.input_ids,
                enc.token_type_ids,
                case.token_type_ids
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A vocabulary file in the temp dir, removed when dropped.
struct TempVocab(PathBuf);

impl TempVocab {
    fn new(name: &str, content: &[u8]) -> TempVocab {
        let path = std::env::temp_dir().join(format!("rcx-tok-{}-{name}", std::process::id()));
        std::fs::write(&path, content).expect("temp file writable");
        TempVocab(path)
    }
}

impl Drop for TempVocab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn load_error(path: &Path) -> String {
    let err = WordPiece::from_vocab_file(path).expect_err("vocabulary must be rejected");
    assert_eq!(
        err.exit_code(),
        2,
        "a bad vocabulary is a user error: {err}"
    );
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "names the file: {msg}"
    );
    msg
}

const GOOD: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n##s\n";

#[test]
fn small_vocab_works() {
    let file = TempVocab::new("good.txt", GOOD.as_bytes());
    let tok = WordPiece::from_vocab_file(&file.0).expect("loads");
    assert_eq!(tok.vocab_size(), 6);
    assert_eq!(
        (tok.pad_id(), tok.unk_id(), tok.cls_id(), tok.sep_id()),
        (0, 1, 2, 3)
    );
    assert_eq!(tok.tokenize("Hellos HELLO bye"), vec![4, 5, 4, 1]);
    let crlf = TempVocab::new("crlf.txt", GOOD.replace('\n', "\r\n").as_bytes());
    let tok_crlf = WordPiece::from_vocab_file(&crlf.0).expect("CRLF loads");
    assert_eq!(tok_crlf.fingerprint(), tok.fingerprint());
}

#[test]
fn fingerprint_follows_content() {
    let a = TempVocab::new("fp-a.txt", GOOD.as_bytes());
    let b = TempVocab::new("fp-b.txt", GOOD.as_bytes());
    let c = TempVocab::new("fp-c.txt", GOOD.replace("hello", "hallo").as_bytes());
    let d = TempVocab::new(
        "fp-d.txt",
        GOOD.replace("hello\n##s", "##s\nhello").as_bytes(),
    );
    let fp = |p: &Path| WordPiece::from_vocab_file(p).expect("loads").fingerprint();
    assert_eq!(fp(&a.0), fp(&b.0));
    assert_ne!(fp(&a.0), fp(&c.0));
    assert_ne!(fp(&a.0), fp(&d.0));
    assert_ne!(fp(&a.0), bert().fingerprint());
}

#[test]
fn missing_file_is_named() {
    let path = root().join("no/such/vocab.txt");
    load_error(&path);
}

#[test]
fn duplicate_entry_names_both_lines() {
    let file = TempVocab::new("dup.txt", b"[PAD]\n[UNK]\nhello\n[CLS]\n[SEP]\nhello\n");
    let msg = load_error(&file.0);
    assert!(msg.contains(":6:"), "line of the duplicate: {msg}");
    assert!(msg.contains("line 3"), "line of the first: {msg}");
}

#[test]
fn bad_entries_name_their_line() {
    let empty = TempVocab::new("empty-line.txt", b"[PAD]\n[UNK]\n\n[CLS]\n[SEP]\n");
    assert!(load_error(&empty.0).contains(":3:"));
    let space = TempVocab::new("space.txt", b"[PAD]\n[UNK]\n[CLS]\n[SEP]\ntwo words\n");
    assert!(load_error(&space.0).contains(":5:"));
    let binary = TempVocab::new("binary.txt", b"[PAD]\n[UNK]\n[CLS]\n\xff\xfe\n[SEP]\n");
    assert!(load_error(&binary.0).contains(":4:"));
}

#[test]
fn missing_special_token_is_named() {
    for (name, content) in [
        ("no-pad.txt", "[UNK]\n[CLS]\n[SEP]\n"),
        ("no-unk.txt", "[PAD]\n[CLS]\n[SEP]\n"),
        ("no-cls.txt", "[PAD]\n[UNK]\n[SEP]\n"),
        ("no-sep.txt", "[PAD]\n[UNK]\n[CLS]\n"),
    ] {
        let file = TempVocab::new(name, content.as_bytes());
        let msg = load_error(&file.0);
        let missing = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
            .into_iter()
            .find(|t| !content.contains(t))
            .expect("one missing");
        assert!(msg.contains(missing), "{name}: {msg}");
    }
}

#[test]
fn cli_prints_reference_ids() {
    let cases = cases();
    let single = cases
        .singles
        .iter()
        .find(|c| c.text == "Héllo naïve café résumé façade")
        .expect("case present");
    let out = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["tokenize", "--vocab"])
        .arg(vocab_path())
        .arg(&single.text)
        .output()
        .expect("rcx runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(line["input_ids"], serde_json::json!(single.input_ids));
    assert_eq!(
        line["token_type_ids"],
        serde_json::json!(single.token_type_ids)
    );

    let pair = cases
        .pairs
        .iter()
        .find(|c| c.max_length == 6 && c.a.starts_with("one two"))
        .expect("case present");
    let out = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["tokenize", "--max-length", "6", "--vocab"])
        .arg(vocab_path())
        .arg(&pair.a)
        .args(["--pair", &pair.b])
        .output()
        .expect("rcx runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(line["input_ids"], serde_json::json!(pair.input_ids));
    assert_eq!(
        line["token_type_ids"],
        serde_json::json!(pair.token_type_ids)
    );
}

#[test]
fn cli_missing_vocab_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_rcx"))
        .args(["tokenize", "--vocab", "/nonexistent/rcx-vocab.txt", "hello"])
        .output()
        .expect("rcx runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("/nonexistent/rcx-vocab.txt"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn cli_refuses_a_max_length_without_room_for_the_special_tokens() {
    let tokenize = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rcx"))
            .args(["tokenize", "--vocab"])
            .arg(vocab_path())
            .args(extra)
            .output()
            .expect("rcx runs")
    };
    for (args, least) in [
        (&["--max-length", "0", "hello"][..], "at least 2"),
        (&["--max-length", "1", "hello"][..], "at least 2"),
        (
            &["--max-length", "2", "hello", "--pair", "world"][..],
            "at least 3",
        ),
    ] {
        let out = tokenize(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--max-length"), "{args:?}: {stderr}");
        assert!(stderr.contains(least), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // The smallest that hold them: [CLS] [SEP], and [CLS] [SEP] [SEP] for a pair.
    let out = tokenize(&["--max-length", "2", "hello"]);
    assert!(out.status.success());
    let out = tokenize(&["--max-length", "3", "hello", "--pair", "world"]);
    assert!(out.status.success());
}

#[test]
fn an_endless_vocabulary_is_refused_at_its_size_limit() {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two fresh descriptors that the two Files below then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read_end, mut write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let path = PathBuf::from(format!("/dev/fd/{}", fds[0]));
    // 128 MiB of one endless line: twice the limit. The writer stops when the reader
    // gives up (a broken pipe).
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..128 {
            write_end.write_all(&chunk)?;
        }
        Ok::<(), std::io::Error>(())
    });
    let msg = load_error(&path);
    drop(read_end);
    let _ = writer.join().unwrap();
    assert!(msg.contains("larger than 64 MiB"), "{msg}");
}
