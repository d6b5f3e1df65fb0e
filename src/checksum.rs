//! SHA-256 of files, as lowercase hex: the checksums of checkpoint files and the
//! fingerprints of training data.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::path::Path;

/// The SHA-256 of a file's whole content, streamed (data files may not fit in memory).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
