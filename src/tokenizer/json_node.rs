//! A JSON value of a tokenizer.json with its path in the file ("model.merges[3]"), so that
//! every error names the file and the key, and what was expected.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Clone)]
pub(crate) struct Node<'a> {
    pub(crate) value: &'a Value,
    path: String,
    file: &'a Path,
}

impl<'a> Node<'a> {
    pub(crate) fn root(value: &'a Value, file: &'a Path) -> Node<'a> {
        Node {
            value,
            path: String::new(),
            file,
        }
    }

    pub(crate) fn path(&self) -> &str {
        if self.path.is_empty() {
            "(top level)"
        } else {
            &self.path
        }
    }

    /// A user error about this value: "FILE: PATH: MESSAGE".
    pub(crate) fn error(&self, message: impl std::fmt::Display) -> Error {
        Error::user(format!(
            "{}: {}: {message}",
            self.file.display(),
            self.path()
        ))
    }

    /// The component named by this value is one the reader does not implement.
    pub(crate) fn unsupported(&self, kind: &str, name: &str, supported: &str) -> Error {
        self.error(format!(
            "{kind} {name:?} is not supported by rcx's tokenizer.json reader (supported: {supported})"
        ))
    }

    pub(crate) fn object(&self) -> Result<&'a Map<String, Value>> {
        self.value
            .as_object()
            .ok_or_else(|| self.error(format!("expected an object, found {}", kind(self.value))))
    }

    /// The member `key` of this object (null when absent), with its path.
    pub(crate) fn get(&self, key: &str) -> Result<Node<'a>> {
        static NULL: Value = Value::Null;
        let value = self.object()?.get(key).unwrap_or(&NULL);
        let path = if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        };
        Ok(Node {
            value,
            path,
            file: self.file,
        })
    }

    /// The items of this array, with their paths.
    pub(crate) fn items(&self) -> Result<Vec<Node<'a>>> {
        let items = self
            .value
            .as_array()
            .ok_or_else(|| self.error(format!("expected an array, found {}", kind(self.value))))?;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, value)| self.at(i, value))
            .collect())
    }

    /// The item `i` of this array, or of a list read from it.
    pub(crate) fn at(&self, i: usize, value: &'a Value) -> Node<'a> {
        Node {
            value,
            path: format!("{}[{i}]", self.path),
            file: self.file,
        }
    }

    pub(crate) fn is_null(&self) -> bool {
        self.value.is_null()
    }

    pub(crate) fn str(&self) -> Result<&'a str> {
        self.value
            .as_str()
            .ok_or_else(|| self.error(format!("expected a string, found {}", kind(self.value))))
    }

    pub(crate) fn bool(&self) -> Result<bool> {
        self.value.as_bool().ok_or_else(|| {
            self.error(format!(
                "expected true or false, found {}",
                kind(self.value)
            ))
        })
    }

    pub(crate) fn bool_or(&self, default: bool) -> Result<bool> {
        if self.is_null() {
            Ok(default)
        } else {
            self.bool()
        }
    }

    pub(crate) fn opt_str(&self) -> Result<Option<&'a str>> {
        if self.is_null() {
            Ok(None)
        } else {
            self.str().map(Some)
        }
    }

    pub(crate) fn u32(&self) -> Result<u32> {
        self.value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                self.error(format!(
                    "expected an integer from 0 to {}, found {}",
                    u32::MAX,
                    kind(self.value)
                ))
            })
    }

    pub(crate) fn usize(&self) -> Result<usize> {
        self.value
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                self.error(format!(
                    "expected a non-negative integer, found {}",
                    kind(self.value)
                ))
            })
    }

    /// The `type` member of a component object.
    pub(crate) fn type_name(&self) -> Result<&'a str> {
        match self.object()?.get("type") {
            Some(Value::String(name)) => Ok(name),
            _ => Err(self.error("expected an object with a string \"type\"")),
        }
    }
}

/// What a JSON value is, for error messages (never its whole text: it may be huge).
fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        Value::String(_) => "a long string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}
