//! docs/results.md as sections, one per group of runs: `rcx reproduce` rewrites the
//! sections whose runs it ran and keeps every other section of the file byte for byte, so
//! that `--only` with some runs never loses what the others measured.
//!
//! A section's text lies between two marker lines (HTML comments, invisible once rendered);
//! everything outside the markers (the title and the head listing the sections) is written
//! anew each time.

use super::{Reproduction, RunResult};
use crate::error::{Error, Result};
use crate::plot::Figure;
use std::fmt::Write as _;
use std::path::Path;

/// A part of results.md and the runs that make it.
pub struct Section {
    /// Its name in the markers.
    pub key: &'static str,
    /// How the head names it.
    pub title: &'static str,
    /// Its heading's anchor (GitHub's), when it starts with one; None when it has no
    /// heading of its own.
    pub anchor: Option<&'static str>,
    pub runs: &'static [&'static str],
    /// Its text from its runs.
    pub markdown: fn(&Reproduction) -> String,
    /// Its figures from its runs, by file name under the figures folder.
    pub figures: fn(&[RunResult]) -> Vec<(String, Figure)>,
}

pub const TITLE: &str = "# Results: reward collapse, reproduced with rcx";

fn begin_marker(key: &str) -> String {
    format!("<!-- rcx reproduce: section {key} (rerun rcx reproduce to change it) -->")
}

fn end_marker(key: &str) -> String {
    format!("<!-- rcx reproduce: end of section {key} -->")
}

/// The sections of an existing results.md, by key, each its text between the markers.
/// A file without any marker written before sections existed (its first line the title)
/// is the first section's text after the title. Anything else is an error naming the
/// file and line.
pub fn parse_sections(
    path: &Path,
    text: &str,
    sections: &[Section],
) -> Result<Vec<(&'static str, String)>> {
    let bad = |line: usize, what: &str| {
        Error::user(format!(
            "{}:{line}: {what}; expected the sections rcx reproduce writes (move the file \
             away to start a new one)",
            path.display()
        ))
    };
    if !text.contains("<!-- rcx reproduce: ") {
        // Written before sections: the whole report was the first section's.
        let body = text
            .strip_prefix(TITLE)
            .and_then(|rest| rest.strip_prefix("\n\n"))
            .ok_or_else(|| bad(1, &format!("not a results file: no `{TITLE}` line")))?;
        return Ok(vec![(sections[0].key, body.to_string())]);
    }
    let mut out: Vec<(&'static str, String)> = Vec::new();
    // The open section: its key, its first line number, its text so far.
    let mut open: Option<(&'static str, usize, String)> = None;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let number = i + 1;
        let bare = line.trim_end_matches('\n');
        if let Some((key, start, body)) = &mut open {
            if bare == end_marker(key) {
                out.push((key, std::mem::take(body)));
                open = None;
            } else if bare.starts_with("<!-- rcx reproduce: ") {
                return Err(bad(
                    number,
                    &format!("a marker inside section {key} (opened at line {start})"),
                ));
            } else {
                body.push_str(line);
            }
            continue;
        }
        if !bare.starts_with("<!-- rcx reproduce: ") {
            continue; // the head, written anew
        }
        let Some(section) = sections.iter().find(|s| bare == begin_marker(s.key)) else {
            return Err(bad(number, &format!("unknown marker `{bare}`")));
        };
        if out.iter().any(|(k, _)| *k == section.key) {
            return Err(bad(
                number,
                &format!("section {} appears twice", section.key),
            ));
        }
        open = Some((section.key, number, String::new()));
    }
    if let Some((key, start, _)) = open {
        return Err(bad(start, &format!("section {key} has no end marker")));
    }
    Ok(out)
}

/// The command a section's text says made it: its line "Made by `COMMAND`.".
fn made_by(body: &str) -> Option<&str> {
    body.lines()
        .find_map(|l| l.strip_prefix("Made by `")?.strip_suffix("`."))
}

/// The whole results.md: the title, a head naming each section and the command that made
/// it, then the sections in `sections`' order, each `fresh` where it was regenerated, else
/// as `kept` holds it; a section in neither is left out.
pub fn compose(
    sections: &[Section],
    fresh: &[(&'static str, String)],
    kept: &[(&'static str, String)],
) -> String {
    let body_of = |key: &str| {
        fresh
            .iter()
            .chain(kept)
            .find(|(k, _)| *k == key)
            .map(|(_, b)| b.as_str())
    };
    let mut s = format!("{TITLE}\n\n");
    s += "Each section below is written by the `rcx reproduce` that ran its runs, named \
          here; a later `rcx reproduce` rewrites only the sections whose runs it runs \
          (`--only` picks runs) and keeps the others as they were, byte for byte.\n\n";
    for section in sections {
        let runs: Vec<String> = section.runs.iter().map(|r| format!("`{r}`")).collect();
        let name = match section.anchor {
            Some(anchor) => format!("[{}](#{anchor})", section.title),
            None => section.title.to_string(),
        };
        let made = match body_of(section.key) {
            Some(body) => made_by(body)
                .map_or("made by a command it does not record".into(), |c| {
                    format!("made by `{c}`")
                }),
            None => format!(
                "not made yet (`rcx reproduce --only {}` makes it)",
                section.runs.join(",")
            ),
        };
        let _ = writeln!(s, "- {name} ({}): {made}.", runs.join(", "));
    }
    for section in sections {
        if let Some(body) = body_of(section.key) {
            // A section's last line ends before the end marker's.
            let newline = if body.is_empty() || body.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            let _ = write!(
                s,
                "\n{}\n{body}{newline}{}\n",
                begin_marker(section.key),
                end_marker(section.key)
            );
        }
    }
    s
}
