//! A cheap scan of a config's text before serde_yaml_ng parses it. It bounds the size and
//! the nesting depth (libyaml's time grows with the square of the flow nesting: 200 KB of
//! brackets took it 40 s), and refuses YAML tags, which serde_yaml_ng would otherwise drop
//! (`max_steps: !custom 4` was read as 4).
//!
//! It follows YAML's lexical structure only as far as these checks need: quoted scalars
//! (which may span lines), comments, block scalars (`|`, `>`), flow collections and the
//! start of each node, where a tag, an anchor, an alias or a quote may begin. A `!`, `[` or
//! quote inside a plain scalar (`runs/wow!`, `it's`) is text.

/// The largest config accepted; the shipped ones are under 2 KB.
pub const MAX_BYTES: usize = 1 << 20;

/// The deepest nesting accepted (block and flow levels together); a config needs 3.
pub const MAX_DEPTH: usize = 32;

/// Why a text was refused: the 1-based line when there is one, and what was wrong.
#[derive(Debug)]
pub struct Refusal {
    pub line: Option<usize>,
    pub message: String,
}

/// Scanner state carried from line to line.
#[derive(Default)]
struct Scan {
    /// Open `[` and `{`.
    flow_depth: usize,
    /// The quote of a quoted scalar still open at the end of the previous line.
    quote: Option<char>,
    /// Inside a block scalar: the indentation of the line that opened it (its content is
    /// indented further).
    block_scalar_parent: Option<usize>,
    /// Columns of the enclosing block nodes, increasing.
    indents: Vec<usize>,
    /// Whether the next character may start a node (a tag, an anchor, a quote, a flow
    /// collection).
    at_node_start: bool,
}

/// Checks the size, the nesting depth and the absence of tags.
pub fn check(text: &str) -> Result<(), Refusal> {
    if text.len() > MAX_BYTES {
        return Err(Refusal {
            line: None,
            message: format!("larger than the 1 MiB ({MAX_BYTES} bytes) a config may hold"),
        });
    }
    let mut scan = Scan::default();
    for (index, line) in text.lines().enumerate() {
        scan.line(line).map_err(|message| Refusal {
            line: Some(index + 1),
            message: match line_key(line) {
                Some(key) => format!("{key}: {message}"),
                None => message,
            },
        })?;
    }
    Ok(())
}

/// The key a line sets (`key: ...`, `- key: ...`), to name it in a refusal.
fn line_key(line: &str) -> Option<&str> {
    let content = line.trim_start().trim_start_matches("- ").trim_start();
    let (key, _) = content.split_once(':')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.');
    plain.then_some(key)
}

fn is_blank(c: Option<char>) -> bool {
    c.is_none_or(char::is_whitespace)
}

impl Scan {
    fn depth(&self) -> usize {
        self.indents.len() + self.flow_depth
    }

    fn check_depth(&self) -> Result<(), String> {
        if self.depth() > MAX_DEPTH {
            return Err(format!(
                "nested deeper than {MAX_DEPTH} levels (a config needs at most 3)"
            ));
        }
        Ok(())
    }

    /// A block node starts at `column`: it closes the nodes at or right of it.
    fn open_block(&mut self, column: usize) -> Result<(), String> {
        while self.indents.last().is_some_and(|&c| c >= column) {
            self.indents.pop();
        }
        self.indents.push(column);
        self.check_depth()
    }

    fn line(&mut self, line: &str) -> Result<(), String> {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let content = line.trim();
        if let Some(parent) = self.block_scalar_parent {
            if content.is_empty() || indent > parent {
                return Ok(());
            }
            self.block_scalar_parent = None;
        }
        let in_block_context = self.quote.is_none() && self.flow_depth == 0;
        if in_block_context {
            if content.is_empty() || content.starts_with('#') || line.starts_with('%') {
                return Ok(());
            }
            self.open_block(indent)?;
            self.at_node_start = true;
        }
        let chars: Vec<char> = line.chars().collect();
        let mut i = if in_block_context { indent } else { 0 };
        // Document markers open a node on their line.
        if in_block_context && indent == 0 && (line.starts_with("---") || line.starts_with("...")) {
            i = 3;
        }
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            i += 1;
            match self.quote {
                Some('\'') => {
                    if c == '\'' {
                        if next == Some('\'') {
                            i += 1; // an escaped quote
                        } else {
                            self.quote = None;
                        }
                    }
                    continue;
                }
                Some(_) => {
                    if c == '\\' {
                        i += 1;
                    } else if c == '"' {
                        self.quote = None;
                    }
                    continue;
                }
                None => {}
            }
            if c.is_whitespace() {
                continue;
            }
            if c == '#' && (i == 1 || chars[i - 2].is_whitespace()) {
                break; // a comment
            }
            if self.at_node_start {
                match c {
                    '!' => {
                        let tag: String = chars[i - 1..]
                            .iter()
                            .take_while(|c| !c.is_whitespace() && !",[]{}".contains(**c))
                            .take(40)
                            .collect();
                        return Err(format!(
                            "the YAML tag `{tag}` is not supported: write the value without it"
                        ));
                    }
                    '\'' | '"' => {
                        self.quote = Some(c);
                        self.at_node_start = false;
                        continue;
                    }
                    '&' | '*' => {
                        // An anchor is followed by its node; an alias is the node.
                        while i < chars.len() && !chars[i].is_whitespace() {
                            i += 1;
                        }
                        self.at_node_start = c == '&';
                        continue;
                    }
                    '|' | '>' if self.flow_depth == 0 => {
                        self.block_scalar_parent = Some(indent);
                        return Ok(());
                    }
                    '-' | '?' if self.flow_depth == 0 && is_blank(next) => {
                        self.open_block(i - 1)?;
                        continue;
                    }
                    _ => {}
                }
            }
            match c {
                '[' | '{' if self.at_node_start || self.flow_depth > 0 => {
                    self.flow_depth += 1;
                    self.at_node_start = true;
                    self.check_depth()?;
                }
                ']' | '}' if self.flow_depth > 0 => {
                    self.flow_depth -= 1;
                    self.at_node_start = false;
                }
                ',' if self.flow_depth > 0 => self.at_node_start = true,
                ':' if is_blank(next)
                    || (self.flow_depth > 0 && next.is_some_and(|n| ",[]{}".contains(n))) =>
                {
                    self.at_node_start = true;
                }
                _ => self.at_node_start = false,
            }
        }
        Ok(())
    }
}
