//! Ranking data sets: the JSON-lines format, the shipped default set, the paper's LongForm
//! construction (`longform`) and the tokenized, memory-mapped cache (`cache`).
//!
//! One record per line:
//! `{"prompt": str, "completions": [best, ..., worst], "prompt_type": "open"|"closed"}`
//! with any K >= 2 completions and `prompt_type` optional. A pairwise record
//! `{"prompt", "chosen", "rejected"}` reads as K = 2 without a type. Blank lines are ignored;
//! unknown fields are ignored.
//!
//! Two optional fields label the pairs (`crate::loss::PairLabels`): `"scores": [...]`, one
//! number per completion (higher is better, completions in any order; the record is kept
//! sorted best first, equal scores a tie that forms no pair; at least two must differ), and
//! `"margin": m`, in reward units in [0, 1), which each pair of the record must lead by. A line holds at most MAX_LINE_BYTES, a record at most
//! MAX_COMPLETIONS completions, and every completion some text besides whitespace.
//!
//! An optional `"subset": str` names the group a record belongs to, as RewardBench's rows
//! (prompt, chosen, rejected, subset) do; `rcx eval` reports accuracy per subset. Training
//! ignores it.

mod batch;
pub mod cache;
pub mod longform;

pub use batch::Batch;
pub use cache::TokenizedSet;

use crate::error::{Error, Result};
use crate::loss::MARGIN_RANGE;
pub use crate::loss::PromptType;
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// The name of the data set shipped under data/ and used when a config names no other.
pub const SHIPPED_SET: &str = "kjv-jargon";

/// The most bytes one line of a data file may hold, its line end included. Text beyond
/// max_length tokens is cut anyway: 128 completions of 512 tokens are well under 1 MiB, so
/// this leaves room while a line without an end (or an 8 GB one) cannot exhaust memory.
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// The most completions one record may rank: 16 times the paper's K = 8. A prompt's
/// completions go through the model as one batch, so K bounds memory (K x max_length tokens
/// at once) and the loss's K(K-1)/2 pairs.
pub const MAX_COMPLETIONS: usize = 128;

/// Whether `c` separates words for Python's `str.split()` (`c.isspace()`): Unicode's
/// White_Space, which is Rust's `char::is_whitespace`, plus the information separators
/// U+001C..U+001F that Python also splits on.
pub fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The words of `text` as Python's `text.split()` gives them.
pub fn split_words(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_python_whitespace)
        .filter(|word| !word.is_empty())
}

/// One prompt and its completions ranked best first.
#[derive(Clone, Debug, PartialEq)]
pub struct RankingRecord {
    pub prompt: String,
    pub completions: Vec<String>,
    pub prompt_type: Option<PromptType>,
    /// The record's `scores`, sorted with its completions (descending); None without.
    pub scores: Option<Vec<f64>>,
    /// The record's `margin` (0 without).
    pub margin: f64,
    /// The record's `subset` (RewardBench's grouping), when it has one.
    pub subset: Option<String>,
}

/// The records of a file and how many bad lines were skipped (always 0 unless skip_bad).
#[derive(Debug)]
pub struct ReadReport {
    pub records: Vec<RankingRecord>,
    pub skipped: usize,
}

/// Reads a ranking file. A bad line is an error naming FILE:LINE, or with `skip_bad` is
/// skipped and counted. A file without any good record is an error either way.
pub fn read_rankings(path: &Path, skip_bad: bool) -> Result<ReadReport> {
    let mut records = Vec::new();
    let skipped = for_each_line(path, skip_bad, |line_no, bytes| {
        match parse_ranking_line(path, line_no, bytes, skip_bad)? {
            Some(record) => {
                records.push(record);
                Ok(LineOutcome::Kept)
            }
            None => Ok(LineOutcome::Skipped),
        }
    })?;
    if records.is_empty() {
        return Err(no_records_error(path, skipped));
    }
    Ok(ReadReport { records, skipped })
}

/// The `subset` of every record of a ranking file, in order (None for a record without):
/// the records as `read_rankings` reads them (every line checked), keeping only this field.
pub fn read_subsets(path: &Path) -> Result<Vec<Option<String>>> {
    let mut subsets = Vec::new();
    for_each_line(path, false, |line_no, bytes| {
        if let Some(record) = parse_ranking_line(path, line_no, bytes, false)? {
            subsets.push(record.subset);
        }
        Ok(LineOutcome::Kept)
    })?;
    Ok(subsets)
}

/// The data set file for `entry` if it names a shipped set (train or eval split); None
/// when the caller should treat `entry` as a path.
pub fn resolve_dataset(entry: &str, eval_split: bool) -> Option<PathBuf> {
    if entry != SHIPPED_SET {
        return None;
    }
    let file = if eval_split {
        "eval.jsonl"
    } else {
        "train.jsonl"
    };
    Some(data_dir().join(entry).join(file))
}

/// The folder of the shipped data and vocabulary: `$RCX_DATA_DIR`, else the crate's `data/`.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("RCX_DATA_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data")),
    }
}

/// `rcx data ...`: tools that make ranking data sets.
#[derive(clap::Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Build a ranking set from LongForm-style {"input","output"} lines (paper section 4).
    Longform(longform::LongformArgs),
}

pub fn cmd_data(args: DataArgs) -> Result<()> {
    match args.command {
        DataCommand::Longform(a) => longform::cmd_longform(a),
    }
}

/// What a per-line callback did with its line.
pub(crate) enum LineOutcome {
    Kept,
    Skipped,
}

/// Calls `f(line_no, bytes)` for every non-blank line (1-based numbers, without the line
/// end) without holding the whole file in memory; returns how many lines were skipped
/// (by `f`, or for being longer than MAX_LINE_BYTES when `skip_bad`).
pub(crate) fn for_each_line(
    path: &Path,
    skip_bad: bool,
    f: impl FnMut(usize, &[u8]) -> Result<LineOutcome>,
) -> Result<usize> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    for_each_line_in(
        &mut BufReader::with_capacity(1 << 20, file),
        path,
        skip_bad,
        f,
    )
}

/// `for_each_line` over an open `reader`, read once from its current position to its end;
/// errors name `path`.
pub(crate) fn for_each_line_in(
    reader: &mut impl BufRead,
    path: &Path,
    skip_bad: bool,
    mut f: impl FnMut(usize, &[u8]) -> Result<LineOutcome>,
) -> Result<usize> {
    let io = |e| Error::io(path, e);
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    let mut skipped = 0usize;
    loop {
        buf.clear();
        // Never more than the limit in memory, whatever the input holds.
        let n = reader
            .by_ref()
            .take(MAX_LINE_BYTES as u64)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let cut_short = n == MAX_LINE_BYTES && buf.last() != Some(&b'\n');
        if cut_short && !reader.fill_buf().map_err(io)?.is_empty() {
            if !skip_bad {
                return Err(Error::user(format!(
                    "{}:{line_no}: a line longer than {} MiB, expected one record per line \
                     within the limit (a longer one needs rcx::data::MAX_LINE_BYTES raised)",
                    path.display(),
                    MAX_LINE_BYTES >> 20
                )));
            }
            skip_past_line_end(reader).map_err(io)?;
            skipped += 1;
            continue;
        }
        let line = trim_line_end(&buf);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let LineOutcome::Skipped = f(line_no, line)? {
            skipped += 1;
        }
    }
    Ok(skipped)
}

/// Consumes the rest of the current line, its end included, holding none of it.
fn skip_past_line_end(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(());
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(());
            }
            None => {
                let len = chunk.len();
                reader.consume(len);
            }
        }
    }
}

fn trim_line_end(buf: &[u8]) -> &[u8] {
    let mut end = buf.len();
    while end > 0 && (buf[end - 1] == b'\n' || buf[end - 1] == b'\r') {
        end -= 1;
    }
    &buf[..end]
}

pub(crate) fn no_records_error(path: &Path, skipped: usize) -> Error {
    if skipped == 0 {
        Error::user(format!(
            "{}: no records: the file is empty, expected JSON lines",
            path.display()
        ))
    } else {
        Error::user(format!(
            "{}: no records: all {skipped} non-blank lines were bad and skipped",
            path.display()
        ))
    }
}

/// Parses one line as a JSON object; the error names FILE:LINE.
pub(crate) fn parse_json_object(
    path: &Path,
    line_no: usize,
    bytes: &[u8],
) -> Result<Map<String, Value>> {
    let at = || format!("{}:{}", path.display(), line_no);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Error::user(format!(
            "{}: invalid UTF-8 at byte {}, expected UTF-8 text",
            at(),
            e.valid_up_to()
        ))
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Error::user(format!(
            "{}: found {}, expected a JSON object",
            at(),
            json_kind(&other)
        ))),
        Err(e) => Err(Error::user(format!(
            "{}: malformed JSON ({e}), expected one JSON object per line",
            at()
        ))),
    }
}

/// The string field `key` of a line's object; the error names FILE:LINE and the key.
pub(crate) fn string_field<'a>(
    path: &Path,
    line_no: usize,
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::user(format!(
            "{}:{}: field \"{key}\" is {}, expected a string",
            path.display(),
            line_no,
            json_kind(other)
        ))),
        None => Err(Error::user(format!(
            "{}:{}: missing field \"{key}\", expected a string",
            path.display(),
            line_no
        ))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One ranking line: Ok(Some) for a good record, Ok(None) for a bad one when skipping.
pub(crate) fn parse_ranking_line(
    path: &Path,
    line_no: usize,
    bytes: &[u8],
    skip_bad: bool,
) -> Result<Option<RankingRecord>> {
    match parse_ranking_record(path, line_no, bytes) {
        Ok(record) => Ok(Some(record)),
        Err(Error::User(_)) if skip_bad => Ok(None),
        Err(e) => Err(e),
    }
}

fn parse_ranking_record(path: &Path, line_no: usize, bytes: &[u8]) -> Result<RankingRecord> {
    let at = || format!("{}:{}", path.display(), line_no);
    let obj = parse_json_object(path, line_no, bytes)?;
    let prompt = string_field(path, line_no, &obj, "prompt")?.to_string();

    let has_pair = obj.contains_key("chosen") || obj.contains_key("rejected");
    // Each completion with the name of the field it came from, for the messages.
    let named: Vec<(String, &str)> = match obj.get("completions") {
        Some(_) if has_pair => {
            return Err(Error::user(format!(
                "{}: both \"completions\" and \"chosen\"/\"rejected\", expected one form",
                at()
            )));
        }
        Some(Value::Array(items)) => {
            if items.len() > MAX_COMPLETIONS {
                return Err(Error::user(format!(
                    "{}: {} completions, at most {MAX_COMPLETIONS} per record (a prompt's \
                     completions are one batch; more needs rcx::data::MAX_COMPLETIONS raised \
                     and memory for K x max_length tokens)",
                    at(),
                    items.len()
                )));
            }
            let mut named = Vec::with_capacity(items.len());
            for (j, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => named.push((format!("completions[{j}]"), s.as_str())),
                    other => {
                        return Err(Error::user(format!(
                            "{}: completions[{j}] is {}, expected a string",
                            at(),
                            json_kind(other)
                        )));
                    }
                }
            }
            if named.len() < 2 {
                return Err(Error::user(format!(
                    "{}: {} completion(s), expected at least 2 ranked best first",
                    at(),
                    named.len()
                )));
            }
            named
        }
        Some(other) => {
            return Err(Error::user(format!(
                "{}: field \"completions\" is {}, expected an array of strings",
                at(),
                json_kind(other)
            )));
        }
        None if has_pair => vec![
            (
                "field \"chosen\"".to_string(),
                string_field(path, line_no, &obj, "chosen")?,
            ),
            (
                "field \"rejected\"".to_string(),
                string_field(path, line_no, &obj, "rejected")?,
            ),
        ],
        None => {
            return Err(Error::user(format!(
                "{}: missing field \"completions\", expected an array of at least 2 strings \
                 (or \"chosen\" and \"rejected\")",
                at()
            )));
        }
    };
    // Blank text tokenizes to nothing: all blank completions of a prompt would be one input
    // ranked against itself.
    if let Some((field, _)) = named
        .iter()
        .find(|(_, text)| text.chars().all(is_python_whitespace))
    {
        return Err(Error::user(format!(
            "{}: {field} is empty or only whitespace, expected text",
            at()
        )));
    }
    let completions: Vec<String> = named
        .into_iter()
        .map(|(_, text)| text.to_string())
        .collect();

    let prompt_type = match obj.get("prompt_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "open" => Some(PromptType::Open),
        Some(Value::String(s)) if s == "closed" => Some(PromptType::Closed),
        Some(other) => {
            // A string is quoted (cut short: a line may hold megabytes), anything else named.
            let found = match other {
                Value::String(s) if s.chars().count() > 40 => {
                    format!("{:?}...", s.chars().take(40).collect::<String>())
                }
                Value::String(s) => format!("{s:?}"),
                other => json_kind(other).to_string(),
            };
            return Err(Error::user(format!(
                "{}: prompt_type is {found}, expected \"open\" or \"closed\"",
                at()
            )));
        }
    };
    let margin = parse_margin(&obj).map_err(|why| Error::user(format!("{}: {why}", at())))?;
    let (completions, scores) = match obj.get("scores") {
        None | Some(Value::Null) => (completions, None),
        Some(_) if has_pair => {
            return Err(Error::user(format!(
                "{}: \"scores\" with \"chosen\"/\"rejected\", expected scores only with \
                 \"completions\" (a pair's order is its scores)",
                at()
            )));
        }
        Some(scores) => {
            let scores = parse_scores(scores, completions.len())
                .map_err(|why| Error::user(format!("{}: {why}", at())))?;
            let (completions, scores) = sorted_by_score(completions, scores);
            (completions, Some(scores))
        }
    };
    let subset = match obj.get("subset") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            let found = match other {
                Value::String(_) => "an empty string",
                other => json_kind(other),
            };
            return Err(Error::user(format!(
                "{}: field \"subset\" is {found}, expected the name of the record's subset \
                 (a non-empty string)",
                at()
            )));
        }
    };
    Ok(RankingRecord {
        prompt,
        completions,
        prompt_type,
        scores,
        margin,
        subset,
    })
}

/// A record's `margin`: 0 when absent or null, else a number in `MARGIN_RANGE`.
fn parse_margin(obj: &Map<String, Value>) -> std::result::Result<f64, String> {
    let (low, high) = MARGIN_RANGE;
    let expected =
        format!("expected a number in [{low}, {high}) (reward units: rewards lie in (0, 1))");
    match obj.get("margin") {
        None | Some(Value::Null) => Ok(0.0),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(m) if (low..high).contains(&m) => Ok(m),
            _ => Err(format!("margin is {n}, {expected}")),
        },
        Some(other) => Err(format!("margin is {}, {expected}", json_kind(other))),
    }
}

/// A record's `scores`: one number per completion, at least two of them different (equal
/// scores form no pair, so all equal would leave nothing to train on).
fn parse_scores(value: &Value, completions: usize) -> std::result::Result<Vec<f64>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "field \"scores\" is {}, expected an array of numbers, one per completion",
            json_kind(value)
        ));
    };
    if items.len() != completions {
        return Err(format!(
            "{} scores for {completions} completions, expected one score per completion",
            items.len()
        ));
    }
    let mut scores = Vec::with_capacity(items.len());
    for (j, item) in items.iter().enumerate() {
        match item.as_f64() {
            Some(s) => scores.push(s),
            None => {
                return Err(format!(
                    "scores[{j}] is {}, expected a number",
                    json_kind(item)
                ));
            }
        }
    }
    if scores.iter().all(|&s| s == scores[0]) {
        return Err(format!(
            "all {} scores are equal, expected at least two different (ties form no pair)",
            scores.len()
        ));
    }
    Ok(scores)
}

/// The completions and scores sorted by score, highest first; ties keep the file's order,
/// so that everything downstream reads the record best first.
fn sorted_by_score(completions: Vec<String>, scores: Vec<f64>) -> (Vec<String>, Vec<f64>) {
    let mut pairs: Vec<(String, f64)> = completions.into_iter().zip(scores).collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    pairs.into_iter().unzip()
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so
/// that readers never see a half-written file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path_beside(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// A temporary name beside `path`, unique to this process.
pub(crate) fn temp_path_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
