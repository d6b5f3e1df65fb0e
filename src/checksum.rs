//! SHA-256 of files, as lowercase hex: the checksums of checkpoint files and the
//! fingerprints of training data; FNV-1a, for fingerprints that only need to tell apart.

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

/// FNV-1a of `bytes`: a tokenizer's fingerprint from its file, the start of a training run.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
