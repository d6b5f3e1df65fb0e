//! The tokenized cache of a ranking file: the first use tokenizes every (prompt, completion)
//! pair and writes the ids to a binary file; later runs map that file with memmap2, so a
//! data set larger than memory trains without being held in memory.
//!
//! The cache lives in `.rcx-cache/` beside the source (or `$TMPDIR/rcx-cache/` when that
//! folder cannot be written) and is rebuilt when its header no longer matches the source
//! (size, mtime, hash of the first and last 64 KiB), the vocabulary fingerprint or
//! max_length, or when it is unreadable or corrupt.
//!
//! File layout (integers little-endian; ids in the machine's byte order, which is
//! little-endian on every target rcx builds for):
//! ```text
//! header        72 bytes   magic "RCXTOKS\0", version u32, 0 u32, source fingerprint u64,
//!                          vocabulary fingerprint u64, max_length u64, P u64 (prompts),
//!                          C u64 (completions), D u64 (data bytes), skipped lines u64
//! data          D bytes    per completion: input_ids [n] u32, token_type_ids [n] u8,
//!                          zero padding to 4 bytes; D padded to 8
//! prompt_first  (P+1) u64  completions of prompt i are prompt_first[i]..prompt_first[i+1]
//! spans         C x 2 u64  (byte offset into data, n tokens) of each completion
//! prompt_types  P u8       0 none, 1 open, 2 closed
//! ```

use super::{LineOutcome, PromptType, RankingRecord, for_each_line, no_records_error};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use memmap2::Mmap;
use rayon::prelude::*;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RCXTOKS\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 72;
/// How much of each end of the source goes into its fingerprint.
const FINGERPRINT_EDGE: u64 = 64 * 1024;
/// Records tokenized in parallel at a time: enough work per batch for rayon, bounded memory.
const BATCH_RECORDS: usize = 4096;

/// A tokenized ranking set, read through a memory map.
pub struct TokenizedSet {
    mmap: Mmap,
    num_prompts: usize,
    num_completions: usize,
    skipped: usize,
    // Byte offsets of the sections in the file.
    data_start: usize,
    prompt_first_start: usize,
    spans_start: usize,
    types_start: usize,
    rebuilt: bool,
    path: PathBuf,
}

/// The header fields that decide whether a cache still matches its inputs.
#[derive(Clone, Copy, PartialEq, Debug)]
struct CacheKey {
    source: u64,
    vocabulary: u64,
    max_length: u64,
}

impl TokenizedSet {
    /// Maps the cache of `source` if it matches (source, vocabulary, max_length), else
    /// tokenizes the source and writes a new cache first. Bad source lines are an error
    /// naming FILE:LINE, or with `skip_bad` skipped.
    pub fn open_or_build(
        source: &Path,
        tok: &Tokenizer,
        max_length: usize,
        skip_bad: bool,
    ) -> Result<TokenizedSet> {
        let key = CacheKey {
            source: source_fingerprint(source)?,
            vocabulary: tok.fingerprint(),
            max_length: max_length as u64,
        };
        let candidates = cache_candidates(source);
        for path in &candidates {
            if let Some(set) = TokenizedSet::open_valid(path, key, skip_bad) {
                return Ok(set);
            }
        }
        let mut last_err = None;
        for path in &candidates {
            match build_cache(source, path, tok, key, skip_bad) {
                Ok(()) => {
                    return match TokenizedSet::open_valid(path, key, skip_bad) {
                        Some(mut set) => {
                            set.rebuilt = true;
                            Ok(set)
                        }
                        None => Err(Error::internal(format!(
                            "{}: the cache just written does not read back",
                            path.display()
                        ))),
                    };
                }
                // A folder we cannot write: try the next location.
                Err(BuildError::Write(e)) => last_err = Some(e),
                Err(BuildError::Data(e)) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::internal("no cache location")))
    }

    pub fn len(&self) -> usize {
        self.num_prompts
    }

    pub fn is_empty(&self) -> bool {
        self.num_prompts == 0
    }

    /// Bad lines skipped when the cache was built.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Whether this call tokenized the source (true) or reused the cache (false).
    pub fn rebuilt(&self) -> bool {
        self.rebuilt
    }

    /// The cache file in use.
    pub fn cache_path(&self) -> &Path {
        &self.path
    }

    pub fn prompt_type(&self, i: usize) -> Option<PromptType> {
        assert!(i < self.num_prompts, "prompt {i} of {}", self.num_prompts);
        match self.mmap[self.types_start + i] {
            1 => Some(PromptType::Open),
            2 => Some(PromptType::Closed),
            _ => None,
        }
    }

    pub fn num_completions(&self, i: usize) -> usize {
        let (first, end) = self.completion_range(i);
        end - first
    }

    /// (input_ids, token_type_ids) of completion j of prompt i (best first): the pair
    /// encoding of (prompt, completion) truncated to max_length.
    pub fn completion(&self, i: usize, j: usize) -> (&[u32], &[u8]) {
        let (first, end) = self.completion_range(i);
        assert!(j < end - first, "completion {j} of {}", end - first);
        let (offset, n) = self.span(first + j);
        let ids_start = self.data_start + offset;
        // Alignment and bounds of every span were checked when the cache was opened.
        let ids: &[u32] = bytemuck::cast_slice(&self.mmap[ids_start..ids_start + 4 * n]);
        let types = &self.mmap[ids_start + 4 * n..ids_start + 5 * n];
        (ids, types)
    }

    fn completion_range(&self, i: usize) -> (usize, usize) {
        assert!(i < self.num_prompts, "prompt {i} of {}", self.num_prompts);
        let first = read_u64(&self.mmap, self.prompt_first_start + 8 * i) as usize;
        let end = read_u64(&self.mmap, self.prompt_first_start + 8 * (i + 1)) as usize;
        (first, end)
    }

    fn span(&self, c: usize) -> (usize, usize) {
        let at = self.spans_start + 16 * c;
        (
            read_u64(&self.mmap, at) as usize,
            read_u64(&self.mmap, at + 8) as usize,
        )
    }

    /// Maps `path` when it is a well-formed cache for `key`; None when it is missing,
    /// stale or corrupt (the caller rebuilds).
    fn open_valid(path: &Path, key: CacheKey, skip_bad: bool) -> Option<TokenizedSet> {
        let file = File::open(path).ok()?;
        // SAFETY: caches are only ever replaced by rename, never written in place, so the
        // mapped file does not change under us; its contents are validated below before
        // any use.
        let mmap = unsafe { Mmap::map(&file) }.ok()?;
        let header = mmap.get(..HEADER_BYTES)?;
        if &header[..8] != MAGIC || read_u32(header, 8) != VERSION {
            return None;
        }
        let stored = CacheKey {
            source: read_u64(header, 16),
            vocabulary: read_u64(header, 24),
            max_length: read_u64(header, 32),
        };
        let skipped = read_u64(header, 64);
        // A cache built while skipping bad lines must not hide them from a strict run.
        if stored != key || (skipped > 0 && !skip_bad) {
            return None;
        }
        let num_prompts = usize::try_from(read_u64(header, 40)).ok()?;
        let num_completions = usize::try_from(read_u64(header, 48)).ok()?;
        let data_bytes = usize::try_from(read_u64(header, 56)).ok()?;
        let data_start = HEADER_BYTES;
        let prompt_first_start = data_start.checked_add(data_bytes)?;
        let spans_start =
            prompt_first_start.checked_add(num_prompts.checked_add(1)?.checked_mul(8)?)?;
        let types_start = spans_start.checked_add(num_completions.checked_mul(16)?)?;
        let total = types_start.checked_add(num_prompts)?;
        if total != mmap.len() || data_bytes % 8 != 0 {
            return None;
        }

        // Every prompt owns at least 2 completions, in order, covering all C.
        let mut previous = 0usize;
        for i in 0..=num_prompts {
            let first = usize::try_from(read_u64(&mmap, prompt_first_start + 8 * i)).ok()?;
            let ok = if i == 0 {
                first == 0
            } else {
                first >= previous.checked_add(2)?
            };
            if !ok {
                return None;
            }
            previous = first;
        }
        if previous != num_completions {
            return None;
        }
        for c in 0..num_completions {
            let at = spans_start + 16 * c;
            let offset = usize::try_from(read_u64(&mmap, at)).ok()?;
            let n = usize::try_from(read_u64(&mmap, at + 8)).ok()?;
            let end = offset.checked_add(n.checked_mul(5)?)?;
            if offset % 4 != 0 || end > data_bytes || n as u64 > key.max_length {
                return None;
            }
        }
        if mmap[types_start..total].iter().any(|&t| t > 2) {
            return None;
        }
        Some(TokenizedSet {
            mmap,
            num_prompts,
            num_completions,
            skipped: usize::try_from(skipped).ok()?,
            data_start,
            prompt_first_start,
            spans_start,
            types_start,
            rebuilt: false,
            path: path.to_path_buf(),
        })
    }
}

impl std::fmt::Debug for TokenizedSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizedSet")
            .field("path", &self.path)
            .field("prompts", &self.num_prompts)
            .field("completions", &self.num_completions)
            .field("rebuilt", &self.rebuilt)
            .finish()
    }
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// FNV-1a, 64 bit: a fixed, dependency-free hash for fingerprints (not for security).
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Size, mtime and the first and last 64 KiB of the source (all of it when small): cheap
/// even for a file larger than memory, and it changes whenever the file is rewritten.
fn source_fingerprint(source: &Path) -> Result<u64> {
    let io = |e| Error::io(source, e);
    let mut file = File::open(source).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let size = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut hash = Fnv64::new();
    hash.write(&size.to_le_bytes());
    hash.write(&mtime.to_le_bytes());
    let mut edge = Vec::new();
    (&mut file)
        .take(FINGERPRINT_EDGE)
        .read_to_end(&mut edge)
        .map_err(io)?;
    hash.write(&edge);
    if size > FINGERPRINT_EDGE {
        let tail_start = (size - FINGERPRINT_EDGE).max(FINGERPRINT_EDGE);
        file.seek(SeekFrom::Start(tail_start)).map_err(io)?;
        edge.clear();
        file.read_to_end(&mut edge).map_err(io)?;
        hash.write(&edge);
    }
    Ok(hash.0)
}

/// Where the cache of `source` may live, in order of preference.
fn cache_candidates(source: &Path) -> Vec<PathBuf> {
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".to_string());
    let folder = source.parent().unwrap_or(Path::new("."));
    let beside = folder.join(".rcx-cache").join(format!("{name}.rcxcache"));
    // In the shared temp folder, the absolute path tells apart sources with one name.
    let absolute = std::fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
    let mut hash = Fnv64::new();
    hash.write(absolute.to_string_lossy().as_bytes());
    let in_tmp = std::env::temp_dir()
        .join("rcx-cache")
        .join(format!("{name}-{:016x}.rcxcache", hash.0));
    vec![beside, in_tmp]
}

enum BuildError {
    /// The cache could not be written here (another location may work).
    Write(Error),
    /// The source is bad: no location will help.
    Data(Error),
}

/// Tokenizes `source` into a new cache at `path`, written to a temporary file and renamed.
fn build_cache(
    source: &Path,
    path: &Path,
    tok: &Tokenizer,
    key: CacheKey,
    skip_bad: bool,
) -> std::result::Result<(), BuildError> {
    let folder = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(|e| BuildError::Write(Error::io(folder, e)))?;
    let tmp = super::temp_path_beside(path);
    let file = File::create(&tmp).map_err(|e| BuildError::Write(Error::io(&tmp, e)))?;
    let result = write_cache(source, &tmp, file, tok, key, skip_bad).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| BuildError::Write(Error::io(path, e)))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Index tables kept in memory while the data region streams to disk.
struct Tables {
    prompt_first: Vec<u64>, // [P+1]
    spans: Vec<[u64; 2]>,   // [C] (offset, n)
    types: Vec<u8>,         // [P]
    data_bytes: u64,
}

fn write_cache(
    source: &Path,
    tmp: &Path,
    file: File,
    tok: &Tokenizer,
    key: CacheKey,
    skip_bad: bool,
) -> std::result::Result<(), BuildError> {
    let write_err = |e: std::io::Error| BuildError::Write(Error::io(tmp, e));
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&[0u8; HEADER_BYTES]).map_err(write_err)?;
    let mut tables = Tables {
        prompt_first: vec![0],
        spans: Vec::new(),
        types: Vec::new(),
        data_bytes: 0,
    };
    let mut batch: Vec<RankingRecord> = Vec::with_capacity(BATCH_RECORDS);
    let mut write_failure = None;
    let read = for_each_line(source, |line_no, bytes| {
        let Some(record) = super::parse_ranking_line(source, line_no, bytes, skip_bad)? else {
            return Ok(LineOutcome::Skipped);
        };
        batch.push(record);
        if batch.len() == BATCH_RECORDS {
            if let Err(e) = write_batch(&mut out, &mut tables, &batch, tok, key) {
                // Stop reading: keep the write error apart from data errors.
                write_failure = Some(e);
                return Err(Error::internal("cache write failed"));
            }
            batch.clear();
        }
        Ok(LineOutcome::Kept)
    });
    if let Some(e) = write_failure {
        return Err(BuildError::Write(Error::io(tmp, e)));
    }
    let skipped = read.map_err(BuildError::Data)?;
    write_batch(&mut out, &mut tables, &batch, tok, key).map_err(write_err)?;
    let num_prompts = tables.types.len();
    if num_prompts == 0 {
        return Err(BuildError::Data(no_records_error(source, skipped)));
    }

    // The data region ends on 8 bytes so that the tables after it stay aligned.
    let pad = (8 - tables.data_bytes % 8) % 8;
    out.write_all(&vec![0u8; pad as usize]).map_err(write_err)?;
    tables.data_bytes += pad;
    for first in &tables.prompt_first {
        out.write_all(&first.to_le_bytes()).map_err(write_err)?;
    }
    for [offset, n] in &tables.spans {
        out.write_all(&offset.to_le_bytes()).map_err(write_err)?;
        out.write_all(&n.to_le_bytes()).map_err(write_err)?;
    }
    out.write_all(&tables.types).map_err(write_err)?;

    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    for field in [
        key.source,
        key.vocabulary,
        key.max_length,
        num_prompts as u64,
        tables.spans.len() as u64,
        tables.data_bytes,
        skipped as u64,
    ] {
        header.extend_from_slice(&field.to_le_bytes());
    }
    let mut file = out.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(write_err)?;
    file.write_all(&header).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(())
}

/// Tokenizes a batch of records in parallel and appends it to the data region.
fn write_batch(
    out: &mut impl Write,
    tables: &mut Tables,
    batch: &[RankingRecord],
    tok: &Tokenizer,
    key: CacheKey,
) -> std::io::Result<()> {
    let max_length = key.max_length as usize;
    // encoded[r][j] = (input_ids [n], token_type_ids [n]) of completion j of record r
    let encoded: Vec<Vec<(Vec<u32>, Vec<u8>)>> = batch
        .par_iter()
        .map(|record| {
            record
                .completions
                .iter()
                .map(|completion| {
                    let enc = tok.encode_pair(&record.prompt, completion, max_length);
                    // Segment ids are 0 or 1 in a pair encoding; u8 keeps the cache small.
                    let types = enc.token_type_ids.iter().map(|&t| t.min(255) as u8);
                    (enc.input_ids, types.collect())
                })
                .collect()
        })
        .collect();
    for (record, completions) in batch.iter().zip(&encoded) {
        for (ids, types) in completions {
            tables.spans.push([tables.data_bytes, ids.len() as u64]);
            out.write_all(bytemuck::cast_slice(ids))?;
            out.write_all(types)?;
            let pad = (4 - types.len() % 4) % 4;
            out.write_all(&[0u8; 3][..pad])?;
            tables.data_bytes += (ids.len() * 4 + types.len() + pad) as u64;
        }
        tables.prompt_first.push(tables.spans.len() as u64);
        tables.types.push(match record.prompt_type {
            None => 0,
            Some(PromptType::Open) => 1,
            Some(PromptType::Closed) => 2,
        });
    }
    Ok(())
}
