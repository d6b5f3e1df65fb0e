//! One error type for the whole crate. User errors (bad config, data, weights or command
//! line) exit with code 2 and a one-line message naming the file and the line or key;
//! internal errors exit with code 1.

use std::fmt;
use std::path::Path;

#[derive(Debug)]
pub enum Error {
    /// Bad input from the user: exit code 2.
    User(String),
    /// A failure of rcx or of the machine: exit code 1.
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn user(msg: impl Into<String>) -> Self {
        Error::User(msg.into())
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    /// An I/O failure on a user-named path: a user error that names the path.
    pub fn io(path: &Path, err: std::io::Error) -> Self {
        Error::User(format!("{}: {}", path.display(), err))
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::User(_) => 2,
            Error::Internal(_) => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::User(m) | Error::Internal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}
