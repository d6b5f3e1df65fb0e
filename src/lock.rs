//! One trainer per output folder: an advisory lock (flock(2)) on `<output_dir>/.rcx.lock`,
//! held for the whole run. The kernel releases it when the holder exits or is killed
//! (kill -9 included), so a stale lock never blocks; the pid written into the file is only
//! there to name the holder in the refusal.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

pub const LOCK_FILE: &str = ".rcx.lock";

/// The held lock; dropping it (closing the file) releases it.
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of `dir` (which must exist) at once, or refuses naming the holder.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        // Never truncated on open: the holder's pid must survive a refused contender.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // SAFETY: flock on a file descriptor this function owns for the call's duration.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::io(&path, err));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "a process that has not written its pid yet".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(Error::user(format!(
                "output_dir {} is in use by another rcx train ({holder}, lock {}): wait for it \
                 to end or choose another output_dir",
                dir.display(),
                path.display()
            )));
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| Error::write(&path, e))?;
        Ok(RunLock { _file: file })
    }
}
