//! One error type for the whole crate, and the exit codes of the command line: 0 done,
//! 1 internal error (a failure of rcx or of the machine, such as a full disk), 2 bad input
//! (config, data, weights, command line; a one-line message naming the file and the line
//! or key), 3 training diverged, 128 + N stopped by signal N (130 SIGINT, 143 SIGTERM).

use std::fmt;
use std::path::Path;

#[derive(Debug)]
pub enum Error {
    /// Bad input from the user: exit code 2.
    User(String),
    /// A failure of rcx or of the machine: exit code 1.
    Internal(String),
    /// Training stopped because its loss, gradient or weights stopped being finite: exit
    /// code 3.
    Diverged(String),
    /// Stopped by a signal (its number) once the work under way was finished or abandoned
    /// cleanly: exit code 128 + signal, as a shell reports a process the signal killed.
    Interrupted(i32, String),
    /// A run on several processes ended because one of its ranks failed: that rank's exit
    /// code (it has printed its own error).
    Exited(i32, String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn user(msg: impl Into<String>) -> Self {
        Error::User(msg.into())
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    /// An I/O failure on a path, named in the message: a user error (a missing or
    /// unreadable file the user named), except when the machine failed (disk full, file
    /// size limit, quota, read-only file system, device error): an internal error.
    pub fn io(path: &Path, err: std::io::Error) -> Self {
        if machine_failure(&err) {
            Error::write(path, err)
        } else {
            Error::User(format!("{}: {}", path.display(), err))
        }
    }

    /// A failure to write or replace one of rcx's own outputs: the machine's, exit code 1.
    pub fn write(path: &Path, err: std::io::Error) -> Self {
        Error::Internal(format!("cannot write {}: {}", path.display(), err))
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::User(_) => 2,
            Error::Internal(_) => 1,
            Error::Diverged(_) => 3,
            Error::Interrupted(signal, _) => 128 + signal,
            Error::Exited(code, _) => *code,
        }
    }
}

/// Whether an I/O error is the machine's rather than the input's.
fn machine_failure(err: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        err.kind(),
        ErrorKind::StorageFull
            | ErrorKind::FileTooLarge
            | ErrorKind::QuotaExceeded
            | ErrorKind::ReadOnlyFilesystem
    ) || err.raw_os_error() == Some(libc::EIO)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::User(m)
            | Error::Internal(m)
            | Error::Diverged(m)
            | Error::Interrupted(_, m)
            | Error::Exited(_, m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}
