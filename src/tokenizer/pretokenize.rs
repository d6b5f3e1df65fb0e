//! The pre-tokenizers of a tokenizer.json: they cut each normalized piece into the words
//! the model tokenizes one by one.

use super::json_node::Node;
use super::normalize::Normalized;
use super::pattern::{Pattern, find_matches};
use crate::error::Result;

/// GPT-2's split, which the ByteLevel pre-tokenizer applies with `use_regex`.
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// What a split does with the matches of its pattern (the reference's
/// `SplitDelimiterBehavior`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behavior {
    Removed,
    Isolated,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrependScheme {
    Always,
    First,
    Never,
}

#[derive(Debug)]
pub(crate) enum PreTokenizer {
    Sequence(Vec<PreTokenizer>),
    Split {
        pattern: Pattern,
        behavior: Behavior,
        invert: bool,
    },
    ByteLevel {
        add_prefix_space: bool,
        /// GPT-2's regex, when the file asks for it.
        split: Option<Pattern>,
    },
    Metaspace {
        replacement: char,
        prepend_scheme: PrependScheme,
        split: bool,
    },
    Digits {
        individual_digits: bool,
    },
}

const SUPPORTED: &str = "Sequence, Split, ByteLevel, Metaspace, Digits";

impl PreTokenizer {
    /// The pre-tokenizer described by `node` (a tokenizer.json's `pre_tokenizer`).
    pub(crate) fn parse(node: &Node) -> Result<PreTokenizer> {
        let name = node.type_name()?;
        Ok(match name {
            "Sequence" => PreTokenizer::Sequence(
                node.get("pretokenizers")?
                    .items()?
                    .iter()
                    .map(PreTokenizer::parse)
                    .collect::<Result<_>>()?,
            ),
            "Split" => PreTokenizer::Split {
                pattern: Pattern::parse(&node.get("pattern")?)?,
                behavior: parse_behavior(&node.get("behavior")?)?,
                invert: node.get("invert")?.bool()?,
            },
            "ByteLevel" => {
                let use_regex = node.get("use_regex")?.bool_or(true)?;
                PreTokenizer::ByteLevel {
                    add_prefix_space: node.get("add_prefix_space")?.bool_or(true)?,
                    split: if use_regex {
                        Some(Pattern::parse_regex(GPT2_REGEX, node)?)
                    } else {
                        None
                    },
                }
            }
            "Metaspace" => {
                let replacement = node.get("replacement")?;
                let mut chars = replacement.str()?.chars();
                let (Some(c), None) = (chars.next(), chars.next()) else {
                    return Err(replacement.error("expected a string of one char"));
                };
                let scheme = node.get("prepend_scheme")?;
                let prepend_scheme = match scheme.opt_str()? {
                    None | Some("always") => PrependScheme::Always,
                    Some("first") => PrependScheme::First,
                    Some("never") => PrependScheme::Never,
                    Some(_) => {
                        return Err(scheme.error("expected \"always\", \"first\" or \"never\""));
                    }
                };
                // The legacy key: false must come with prepend_scheme "never" (the default
                // scheme, "always", contradicts it too, as in the reference).
                let legacy = node.get("add_prefix_space")?;
                if !legacy.bool_or(true)? && prepend_scheme != PrependScheme::Never {
                    return Err(legacy.error(
                        "add_prefix_space false contradicts prepend_scheme; expected \"never\"",
                    ));
                }
                PreTokenizer::Metaspace {
                    replacement: c,
                    prepend_scheme,
                    split: node.get("split")?.bool_or(true)?,
                }
            }
            "Digits" => PreTokenizer::Digits {
                individual_digits: node.get("individual_digits")?.bool()?,
            },
            other => return Err(node.unsupported("pre_tokenizer", other, SUPPORTED)),
        })
    }

    /// Cuts every piece; empty pieces are dropped, as the reference drops them.
    pub(crate) fn apply(&self, pieces: Vec<Normalized>) -> Result<Vec<Normalized>> {
        let mut out = Vec::with_capacity(pieces.len());
        match self {
            PreTokenizer::Sequence(steps) => {
                let mut pieces = pieces;
                for step in steps {
                    pieces = step.apply(pieces)?;
                }
                return Ok(pieces);
            }
            PreTokenizer::Split {
                pattern,
                behavior,
                invert,
            } => {
                for piece in &pieces {
                    split_into(piece, pattern, *behavior, *invert, &mut out)?;
                }
            }
            PreTokenizer::ByteLevel {
                add_prefix_space,
                split,
            } => {
                for mut piece in pieces {
                    if *add_prefix_space && !piece.text.starts_with(' ') {
                        piece.prepend(" ");
                    }
                    let first = out.len();
                    match split {
                        Some(pattern) => {
                            split_into(&piece, pattern, Behavior::Isolated, false, &mut out)?
                        }
                        None => out.push(piece),
                    }
                    for word in &mut out[first..] {
                        word.byte_level();
                    }
                }
            }
            PreTokenizer::Metaspace {
                replacement,
                prepend_scheme,
                split,
            } => {
                let replacement_text = replacement.to_string();
                for mut piece in pieces {
                    piece.replace(&Pattern::Char(' '), &replacement_text)?;
                    let prepend = match prepend_scheme {
                        PrependScheme::Always => true,
                        PrependScheme::First => piece.shift == 0,
                        PrependScheme::Never => false,
                    };
                    if prepend && !piece.text.starts_with(*replacement) {
                        piece.prepend(&replacement_text);
                    }
                    if *split {
                        let pattern = Pattern::Char(*replacement);
                        split_into(&piece, &pattern, Behavior::MergedWithNext, false, &mut out)?;
                    } else {
                        out.push(piece);
                    }
                }
            }
            PreTokenizer::Digits { individual_digits } => {
                let behavior = if *individual_digits {
                    Behavior::Isolated
                } else {
                    Behavior::Contiguous
                };
                for piece in &pieces {
                    split_into(piece, &Pattern::Numeric, behavior, false, &mut out)?;
                }
            }
        }
        out.retain(|piece| !piece.is_empty());
        Ok(out)
    }
}

fn parse_behavior(node: &Node) -> Result<Behavior> {
    Ok(match node.str()? {
        "Removed" => Behavior::Removed,
        "Isolated" => Behavior::Isolated,
        "MergedWithPrevious" => Behavior::MergedWithPrevious,
        "MergedWithNext" => Behavior::MergedWithNext,
        "Contiguous" => Behavior::Contiguous,
        _ => {
            return Err(node.error(
                "expected Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous",
            ));
        }
    })
}

/// Appends the pieces of `piece` cut at the matches of `pattern` (the reference's
/// `NormalizedString::split`).
fn split_into(
    piece: &Normalized,
    pattern: &Pattern,
    behavior: Behavior,
    invert: bool,
    out: &mut Vec<Normalized>,
) -> Result<()> {
    let mut matches = find_matches(pattern, &piece.text)?;
    if invert {
        for (_, is_match) in &mut matches {
            *is_match = !*is_match;
        }
    }
    // (range, whether it is dropped)
    let mut kept: Vec<((usize, usize), bool)> = Vec::with_capacity(matches.len());
    match behavior {
        Behavior::Isolated => kept.extend(matches.iter().map(|&(range, _)| (range, false))),
        Behavior::Removed => kept = matches,
        Behavior::Contiguous => {
            let mut previous_match = false;
            for (range, is_match) in matches {
                match kept.last_mut() {
                    Some(((_, end), _)) if is_match == previous_match => *end = range.1,
                    _ => kept.push((range, false)),
                }
                previous_match = is_match;
            }
        }
        Behavior::MergedWithPrevious => {
            let mut previous_match = false;
            for (range, is_match) in matches {
                match kept.last_mut() {
                    Some(((_, end), _)) if is_match && !previous_match => *end = range.1,
                    _ => kept.push((range, false)),
                }
                previous_match = is_match;
            }
        }
        Behavior::MergedWithNext => {
            let mut previous_match = false;
            for (range, is_match) in matches.into_iter().rev() {
                match kept.last_mut() {
                    Some(((start, _), _)) if is_match && !previous_match => *start = range.0,
                    _ => kept.push((range, false)),
                }
                previous_match = is_match;
            }
            kept.reverse();
        }
    }
    for ((start, end), dropped) in kept {
        if !dropped && start < end {
            out.push(piece.slice(start, end));
        }
    }
    Ok(())
}
