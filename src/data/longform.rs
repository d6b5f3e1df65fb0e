//! The paper's data construction (notes section 4) from LongForm-style JSON lines
//! `{"input": str, "output": str}`.
//!
//! Words are the whitespace-separated runs of the output, exactly as Python's
//! `str.split()` gives them (`super::split_words`); answers are word prefixes joined by
//! single spaces. An example is kept when its output has at least 100 words. For each kept example, in file order, one draw of a splitmix64 stream
//! seeded with `--seed` decides its type: open-ended when the draw's top bit is 1.

use super::{LineOutcome, PromptType, for_each_line, no_records_error, parse_json_object};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Outputs shorter than this many words are dropped (the paper's filter).
pub const MIN_WORDS: usize = 100;
pub const OPEN_SUFFIX: &str = " Write the answer in an open-ended way.";
pub const CLOSED_SUFFIX: &str = " Write either a short answer or a long answer.";
/// Answer lengths in words, best (longest) first.
pub const OPEN_LENGTHS: [usize; 8] = [80, 70, 60, 50, 40, 30, 20, 10];
/// Two clusters, long then short: the closed prompt's answers.
pub const CLOSED_LENGTHS: [usize; 8] = [74, 68, 62, 56, 34, 28, 22, 16];

#[derive(clap::Args, Debug)]
pub struct LongformArgs {
    /// LongForm-style JSON lines {"input": ..., "output": ...}
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the ranking set (JSON lines, written atomically)
    #[arg(long)]
    pub output: PathBuf,
    /// Seed of the open/closed coin flips
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Skip (and count) bad input lines instead of stopping at the first
    #[arg(long)]
    pub skip_bad: bool,
}

pub fn cmd_longform(args: LongformArgs) -> Result<()> {
    let report = build_longform(&args.input, args.seed, args.skip_bad)?;
    super::write_atomic(&args.output, report.jsonl.as_bytes())?;
    let open = report.open;
    let closed = report.kept - open;
    eprintln!(
        "{}: {} examples, {} kept (>= {MIN_WORDS} words): {open} open, {closed} closed{}",
        args.output.display(),
        report.examples,
        report.kept,
        if report.skipped > 0 {
            format!("; {} bad lines skipped", report.skipped)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// The constructed set as JSON lines, and counts for the summary.
pub struct LongformReport {
    pub jsonl: String,
    /// Good input examples read.
    pub examples: usize,
    /// Examples with at least MIN_WORDS words.
    pub kept: usize,
    pub open: usize,
    pub skipped: usize,
}

/// splitmix64 (Steele, Lea, Flood 2014): a tiny generator whose output is fixed by its
/// seed on every platform, which is all the coin flips need.
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// One output record in the ranking format, fields in the documented order.
#[derive(serde::Serialize)]
struct OutRecord<'a> {
    prompt: String,
    completions: Vec<String>,
    prompt_type: &'a str,
}

/// Reads `input` and builds the ranking set; deterministic in (input bytes, seed).
pub fn build_longform(input: &Path, seed: u64, skip_bad: bool) -> Result<LongformReport> {
    let mut rng = SplitMix64::new(seed);
    let mut jsonl = String::new();
    let (mut examples, mut kept, mut open) = (0usize, 0usize, 0usize);
    let skipped = for_each_line(input, skip_bad, |line_no, bytes| {
        let (prompt, output) = match parse_example(input, line_no, bytes) {
            Ok(example) => example,
            Err(Error::User(_)) if skip_bad => return Ok(LineOutcome::Skipped),
            Err(e) => return Err(e),
        };
        examples += 1;
        let words: Vec<&str> = super::split_words(&output).collect();
        if words.len() < MIN_WORDS {
            return Ok(LineOutcome::Kept);
        }
        kept += 1;
        let prompt_type = if rng.next_u64() >> 63 == 1 {
            PromptType::Open
        } else {
            PromptType::Closed
        };
        let (suffix, lengths) = match prompt_type {
            PromptType::Open => {
                open += 1;
                (OPEN_SUFFIX, &OPEN_LENGTHS)
            }
            PromptType::Closed => (CLOSED_SUFFIX, &CLOSED_LENGTHS),
        };
        let record = OutRecord {
            prompt: format!("{prompt}{suffix}"),
            completions: lengths.iter().map(|&n| words[..n].join(" ")).collect(),
            prompt_type: prompt_type.name(),
        };
        let line = serde_json::to_string(&record)
            .map_err(|e| Error::internal(format!("serializing a record: {e}")))?;
        jsonl.push_str(&line);
        jsonl.push('\n');
        Ok(LineOutcome::Kept)
    })?;
    if examples == 0 {
        return Err(no_records_error(input, skipped));
    }
    if kept == 0 {
        return Err(Error::user(format!(
            "{}: none of the {examples} examples has an output of at least {MIN_WORDS} words",
            input.display()
        )));
    }
    Ok(LongformReport {
        jsonl,
        examples,
        kept,
        open,
        skipped,
    })
}

fn parse_example(path: &Path, line_no: usize, bytes: &[u8]) -> Result<(String, String)> {
    let obj = parse_json_object(path, line_no, bytes)?;
    let input = super::string_field(path, line_no, &obj, "input")?;
    let output = super::string_field(path, line_no, &obj, "output")?;
    Ok((input.to_string(), output.to_string()))
}
