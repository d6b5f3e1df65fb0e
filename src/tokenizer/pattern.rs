//! The patterns that Split pre-tokenizers and Replace normalizers search for, and the
//! reference's way of cutting a text at their matches.

use super::json_node::Node;
use crate::error::{Error, Result};

/// The most bytes a regex may compile to: a tokenizer.json is user input, and fancy-regex
/// has no bound of its own on a pattern's size.
const MAX_REGEX_BYTES: usize = 1 << 22;

#[derive(Debug)]
pub(crate) enum Pattern {
    /// A regex, or a literal string compiled as an escaped one (as the reference does).
    Regex {
        source: String,
        regex: fancy_regex::Regex,
    },
    /// One char (Metaspace's replacement).
    Char(char),
    /// Any char that Rust's `char::is_numeric` accepts (the Digits pre-tokenizer).
    Numeric,
}

impl Pattern {
    /// `{"String": "..."}` or `{"Regex": "..."}`.
    pub(crate) fn parse(node: &Node) -> Result<Pattern> {
        let object = node.object()?;
        if object.len() == 1 {
            if let Some(literal) = object.get("String").and_then(|v| v.as_str()) {
                return Pattern::parse_regex(&fancy_regex::escape(literal), node);
            }
            if let Some(source) = object.get("Regex").and_then(|v| v.as_str()) {
                return Pattern::parse_regex(source, node);
            }
        }
        Err(node.error("expected {\"String\": TEXT} or {\"Regex\": PATTERN}"))
    }

    /// A regex of the file, compiled with a bound on its size.
    pub(crate) fn parse_regex(source: &str, node: &Node) -> Result<Pattern> {
        let regex = fancy_regex::RegexBuilder::new(source)
            .delegate_size_limit(MAX_REGEX_BYTES)
            .build()
            .map_err(|e| {
                node.error(format!(
                    "the regex {source:?} does not compile ({}); expected a pattern that \
                     Oniguruma and fancy-regex both accept",
                    one_line(&e.to_string())
                ))
            })?;
        Ok(Pattern::Regex {
            source: source.to_string(),
            regex,
        })
    }
}

/// The text cut into pieces, each a match or not, covering it in order (the reference's
/// `Pattern::find_matches`). An empty text is one empty non-match.
pub(crate) fn find_matches(pattern: &Pattern, text: &str) -> Result<Vec<((usize, usize), bool)>> {
    if text.is_empty() {
        return Ok(vec![((0, 0), false)]);
    }
    let mut pieces = Vec::new();
    let mut previous = 0;
    let mut push_match = |start: usize, end: usize, pieces: &mut Vec<_>| {
        if previous != start {
            pieces.push(((previous, start), false));
        }
        pieces.push(((start, end), true));
        previous = end;
    };
    match pattern {
        Pattern::Regex { source, regex } => {
            // Oniguruma's iteration: after an empty match the search moves on one char;
            // an empty match right after a non-empty one is still reported.
            let mut at = 0;
            while at <= text.len() {
                let found = regex.find_from_pos(text, at).map_err(|e| {
                    Error::user(format!(
                        "the tokenizer's regex {source:?} failed on this text ({})",
                        one_line(&e.to_string())
                    ))
                })?;
                let Some(m) = found else { break };
                push_match(m.start(), m.end(), &mut pieces);
                at = if m.end() > m.start() {
                    m.end()
                } else {
                    match text[m.end()..].chars().next() {
                        Some(c) => m.end() + c.len_utf8(),
                        None => break,
                    }
                };
            }
        }
        Pattern::Char(wanted) => {
            for (i, c) in text.char_indices() {
                if c == *wanted {
                    push_match(i, i + c.len_utf8(), &mut pieces);
                }
            }
        }
        Pattern::Numeric => {
            for (i, c) in text.char_indices() {
                if c.is_numeric() {
                    push_match(i, i + c.len_utf8(), &mut pieces);
                }
            }
        }
    }
    if previous != text.len() {
        pieces.push(((previous, text.len()), false));
    }
    Ok(pieces)
}

/// A library's message on one line (regex errors draw the pattern over several).
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}
