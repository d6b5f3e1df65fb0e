//! The bodies `rcx serve` reads and writes: `/score` (one prompt and its completions, or a
//! list of such) and `/get_reward` (OpenRLHF's `{"query": [...], "prompts": [...]}`),
//! checked field by field into token sequences encoded exactly as `rcx score` encodes a
//! data file's, and the answers built from the logits.

use super::batcher::Sequence;
use crate::eval::reward_of;
use crate::reward_norm::RewardStats;
use crate::tokenizer::{Encoding, Tokenizer};
use serde::Serialize;
use serde_json::{Map, Value};

/// A request the server will not score: the message for a 400 answer.
#[derive(Debug)]
pub struct BadRequest(pub String);

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

/// How a request's sequences map back onto its answer.
#[derive(Debug)]
pub enum Shape {
    /// `/score` with one object.
    One,
    /// `/score` with a list: the completions of each object.
    List(Vec<usize>),
    /// `/get_reward`: one sequence per query.
    Queries,
}

/// A parsed request: its sequences in answer order, and the answer's shape.
#[derive(Debug)]
pub struct Parsed {
    pub sequences: Vec<Sequence>,
    pub shape: Shape,
}

/// A body as JSON: valid UTF-8, then valid JSON.
fn json_body(body: &[u8]) -> Result<Value, BadRequest> {
    let text = std::str::from_utf8(body).map_err(|e| {
        bad(format!(
            "the body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "the body is not valid JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        ))
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `object[key]` as a non-empty list of strings; `at` names the object in messages.
fn strings<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Vec<&'v str>, BadRequest> {
    let value = object
        .get(key)
        .ok_or_else(|| bad(format!("{at}: missing \"{key}\" (a list of strings)")))?;
    let Value::Array(items) = value else {
        return Err(bad(format!(
            "{at}: \"{key}\" must be a list of strings, got {}",
            kind(value)
        )));
    };
    if items.is_empty() {
        return Err(bad(format!("{at}: \"{key}\" is empty")));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str().ok_or_else(|| {
                bad(format!(
                    "{at}: \"{key}\"[{i}] must be a string, got {}",
                    kind(item)
                ))
            })
        })
        .collect()
}

fn sequence(enc: Encoding) -> Sequence {
    // Segment ids are 0 or 1 in a BERT encoding, as the token cache stores them.
    let types = enc
        .token_type_ids
        .iter()
        .map(|&t| t.min(255) as u8)
        .collect();
    (enc.input_ids, types)
}

/// The ids of `text`, the field `field` of the object at `at`; a text the tokenizer
/// cannot read (a decoder's tokenizer.json can refuse one) is the request's error, not a
/// sequence scored as if the text were empty.
fn ids(tok: &Tokenizer, text: &str, at: &str, field: &str) -> Result<Vec<u32>, BadRequest> {
    tok.try_tokenize(text)
        .map_err(|e| bad(format!("{at}: {field} cannot be tokenized: {e}")))
}

/// `/score`'s object at `at`: the pair encoding of its prompt with each completion.
fn score_object(
    value: &Value,
    at: &str,
    tok: &Tokenizer,
    max_length: usize,
    out: &mut Vec<Sequence>,
) -> Result<usize, BadRequest> {
    let Value::Object(object) = value else {
        return Err(bad(format!(
            "{at}: expected an object {{\"prompt\": string, \"completions\": [string, ...]}}, got {}",
            kind(value)
        )));
    };
    let prompt = match object.get("prompt") {
        Some(Value::String(p)) => p,
        Some(other) => {
            return Err(bad(format!(
                "{at}: \"prompt\" must be a string, got {}",
                kind(other)
            )));
        }
        None => return Err(bad(format!("{at}: missing \"prompt\" (a string)"))),
    };
    let completions = strings(object, "completions", at)?;
    // As the token cache does: the prompt tokenized once, each pair cut longest first.
    let prompt_ids = ids(tok, prompt, at, "\"prompt\"")?;
    for (i, completion) in completions.iter().enumerate() {
        let completion_ids = ids(tok, completion, at, &format!("\"completions\"[{i}]"))?;
        let enc = tok.encode_tokenized_pair(&prompt_ids, &completion_ids, max_length);
        out.push(sequence(enc));
    }
    Ok(completions.len())
}

/// A `/score` body.
pub fn parse_score(body: &[u8], tok: &Tokenizer, max_length: usize) -> Result<Parsed, BadRequest> {
    let value = json_body(body)?;
    let mut sequences = Vec::new();
    let shape = match &value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(bad("the list of prompts is empty"));
            }
            let counts = items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    score_object(item, &format!("item {i}"), tok, max_length, &mut sequences)
                })
                .collect::<Result<Vec<usize>, BadRequest>>()?;
            Shape::List(counts)
        }
        other => {
            score_object(other, "the body", tok, max_length, &mut sequences)?;
            Shape::One
        }
    };
    Ok(Parsed { sequences, shape })
}

/// A `/get_reward` body: each query is a whole text (prompt and response) as OpenRLHF
/// sends it. With `"prompts"` (one per query, each a prefix of its query) the query is
/// split there into the pair rcx models are trained on; without, it is scored as one
/// segment, `[CLS] query [SEP]`, as OpenRLHF's own server tokenizes it.
pub fn parse_get_reward(
    body: &[u8],
    tok: &Tokenizer,
    max_length: usize,
) -> Result<Parsed, BadRequest> {
    let value = json_body(body)?;
    let Value::Object(object) = &value else {
        return Err(bad(format!(
            "the body: expected an object {{\"query\": [string, ...]}}, got {}",
            kind(&value)
        )));
    };
    let queries = strings(object, "query", "the body")?;
    let prompts = match object.get("prompts") {
        None | Some(Value::Null) => None,
        Some(_) => Some(strings(object, "prompts", "the body")?),
    };
    let mut sequences = Vec::with_capacity(queries.len());
    match prompts {
        Some(prompts) => {
            if prompts.len() != queries.len() {
                return Err(bad(format!(
                    "the body: \"prompts\" holds {} strings, \"query\" {}: one prompt per query",
                    prompts.len(),
                    queries.len()
                )));
            }
            for (i, (query, prompt)) in queries.iter().zip(&prompts).enumerate() {
                let response = query.strip_prefix(prompt).ok_or_else(|| {
                    bad(format!(
                        "the body: \"query\"[{i}] does not start with \"prompts\"[{i}]"
                    ))
                })?;
                let prompt_ids = ids(tok, prompt, "the body", &format!("\"prompts\"[{i}]"))?;
                let response_ids = ids(tok, response, "the body", &format!("\"query\"[{i}]"))?;
                let enc = tok.encode_tokenized_pair(&prompt_ids, &response_ids, max_length);
                sequences.push(sequence(enc));
            }
        }
        None => {
            for (i, query) in queries.iter().enumerate() {
                let enc = tok.try_encode(query, max_length).map_err(|e| {
                    bad(format!("the body: \"query\"[{i}] cannot be tokenized: {e}"))
                })?;
                sequences.push(sequence(enc));
            }
        }
    }
    Ok(Parsed {
        sequences,
        shape: Shape::Queries,
    })
}

/// The rewards and logits of one prompt's completions (or of a request's queries); the
/// logits print as `rcx score` prints them, the shortest f32 decimal.
#[derive(Serialize)]
pub struct Scored {
    rewards: Vec<f64>,
    logits: Vec<f32>,
}

/// An answer: one `Scored`, or a list for a list.
#[derive(Serialize)]
#[serde(untagged)]
pub enum Answer {
    One(Scored),
    List(Vec<Scored>),
}

/// The answer to a parsed request, from its logits in sequence order; rewards normalised
/// with `normalization` when given, as `rcx score --normalize` prints them.
pub fn answer(shape: &Shape, logits: &[f32], normalization: Option<&RewardStats>) -> Answer {
    let scored = |logits: &[f32]| Scored {
        rewards: logits
            .iter()
            .map(|&l| reward_of(l, normalization))
            .collect(),
        logits: logits.to_vec(),
    };
    match shape {
        Shape::One | Shape::Queries => Answer::One(scored(logits)),
        Shape::List(counts) => {
            let mut start = 0;
            Answer::List(
                counts
                    .iter()
                    .map(|&k| {
                        start += k;
                        scored(&logits[start - k..start])
                    })
                    .collect(),
            )
        }
    }
}
