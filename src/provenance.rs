//! Where a model came from: the rcx that trained it, the commit it was built from, the
//! config file and the data files, each by SHA-256. Written into every model folder's
//! `rcx.json` (the final model and each checkpoint), so that a folder can be matched to the
//! config and data that made it (`rcx reproduce --reuse` refuses one that does not match).

use crate::config::Config;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// What `rcx.json` records of a run's origin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The crate version of the rcx that wrote the folder.
    pub rcx_version: String,
    /// The commit rcx was built from, when it was built in a git checkout (build.rs).
    pub git_commit: Option<String>,
    /// SHA-256 of the config file's bytes.
    pub config_sha256: String,
    /// The training files, then the evaluation files, in the config's order.
    pub data: Vec<DataFingerprint>,
}

/// Which part of the config a data file comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataRole {
    Train,
    Eval,
}

/// One data file by content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub role: DataRole,
    /// As resolved on the machine that trained (for people: matching ignores it, so that
    /// a run moved to another folder or machine still matches its config).
    pub path: String,
    /// SHA-256 of the file's bytes; null for what is not a regular file (a pipe can be read
    /// only once, and training has read it).
    pub sha256: Option<String>,
}

/// The commit of the checkout rcx was built in; build.rs sets it.
pub fn git_commit() -> Option<&'static str> {
    option_env!("RCX_GIT_COMMIT")
}

/// Lower-case hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, read in blocks; None when it is not a regular file.
fn file_sha256(path: &Path) -> Result<Option<String>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Ok(None);
    }
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut block).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    Ok(Some(hex(&hasher.finalize())))
}

impl Provenance {
    /// Hashes the config file and every data file it names, now.
    pub fn of_config(cfg: &Config) -> Result<Provenance> {
        let config_sha256 = file_sha256(&cfg.path)?
            .ok_or_else(|| Error::user(format!("{}: not a regular file", cfg.path.display())))?;
        let mut data = Vec::new();
        for (role, path) in data_files(cfg) {
            data.push(DataFingerprint {
                role,
                path: path.display().to_string(),
                sha256: file_sha256(path)?,
            });
        }
        Ok(Provenance {
            rcx_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: git_commit().map(str::to_string),
            config_sha256,
            data,
        })
    }

    /// `of_config`, computed once per process for a config path while neither the config
    /// nor any data file changed size or modification time: a run saves its model folder
    /// many times and the data does not change between saves.
    pub fn recorded(cfg: &Config) -> Result<Provenance> {
        static MEMO: OnceLock<Memo> = OnceLock::new();
        let stamps = stamps(cfg);
        let memo = MEMO.get_or_init(Default::default);
        if let Some((seen, provenance)) = memo.lock().ok().and_then(|m| m.get(&cfg.path).cloned())
            && seen == stamps
        {
            return Ok(provenance);
        }
        let provenance = Provenance::of_config(cfg)?;
        if let Ok(mut m) = memo.lock() {
            m.insert(cfg.path.clone(), (stamps, provenance.clone()));
        }
        Ok(provenance)
    }

    /// Why a folder recorded as `self` was not made from the config and data that `current`
    /// describes (None when it was): the config's hash, then each data file's, in order.
    pub fn mismatch(&self, current: &Provenance) -> Option<String> {
        if self.config_sha256 != current.config_sha256 {
            return Some(format!(
                "config_sha256 differs (recorded {}, the config now {})",
                short(&self.config_sha256),
                short(&current.config_sha256)
            ));
        }
        if self.data.len() != current.data.len() {
            return Some(format!(
                "it recorded {} data files, the config now names {}",
                self.data.len(),
                current.data.len()
            ));
        }
        for (was, now) in self.data.iter().zip(&current.data) {
            let role = |r: DataRole| match r {
                DataRole::Train => "training",
                DataRole::Eval => "evaluation",
            };
            if was.role != now.role {
                return Some(format!(
                    "{} was a {} file, now a {} file",
                    now.path,
                    role(was.role),
                    role(now.role)
                ));
            }
            match (&was.sha256, &now.sha256) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => {
                    return Some(format!(
                        "{} file {} differs (recorded sha256 {}, now {})",
                        role(now.role),
                        now.path,
                        short(a),
                        short(b)
                    ));
                }
                _ => {
                    return Some(format!(
                        "{} file {} has no fingerprint (not a regular file)",
                        role(now.role),
                        now.path
                    ));
                }
            }
        }
        None
    }
}

/// The first 12 hex digits, enough to tell hashes apart in a message.
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn data_files(cfg: &Config) -> impl Iterator<Item = (DataRole, &PathBuf)> {
    let train = cfg.train_files.iter().map(|p| (DataRole::Train, p));
    train.chain(cfg.eval_files.iter().map(|p| (DataRole::Eval, p)))
}

/// Per config path: the stamps its provenance was computed at, and the provenance.
type Memo = Mutex<HashMap<PathBuf, (Vec<Stamp>, Provenance)>>;

/// Size and modification time of the config and each data file (None where unreadable).
type Stamp = Option<(u64, SystemTime)>;

fn stamps(cfg: &Config) -> Vec<Stamp> {
    let stamp = |p: &Path| {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.len(), meta.modified().ok()?))
    };
    std::iter::once(stamp(&cfg.path))
        .chain(data_files(cfg).map(|(_, p)| stamp(p)))
        .collect()
}
