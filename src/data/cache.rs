//! The tokenized cache of a ranking file: the first use tokenizes every (prompt, completion)
//! pair and writes the ids to a binary file; later runs map that file with memmap2, so a
//! data set larger than memory trains without being held in memory.
//!
//! The cache lives in `.rcx-cache/` beside the source (or `$TMPDIR/rcx-cache/` when that
//! folder cannot be written) and is rebuilt when its key no longer matches: the SHA-256 of
//! the whole source, the tokenizer's version, the vocabulary's fingerprint and max_length.
//! A SHA-256 of the file itself catches any changed byte in it: such a cache is rebuilt,
//! saying so on stderr, never trusted.
//!
//! A source that is not a regular file (a pipe, `/dev/stdin`, a FIFO) can be read only
//! once, so it is tokenized while it is read, into a cache that is mapped and then deleted.
//!
//! File layout (integers little-endian; ids in the machine's byte order, which is
//! little-endian on every target rcx builds for):
//! ```text
//! header        128 bytes  magic "RCXTOKS\0", format version u32, tokenizer version u32,
//!                          source SHA-256 [32], vocabulary fingerprint u64, max_length u64,
//!                          P u64 (prompts), C u64 (completions), D u64 (data bytes),
//!                          skipped lines u64, checksum [32]: SHA-256 of the bytes after
//!                          the header, then of the header's first 96 bytes
//! data          D bytes    per completion: input_ids [n] u32, token_type_ids [n] u8,
//!                          zero padding to 4 bytes; D padded to 8
//! prompt_first  (P+1) u64  completions of prompt i are prompt_first[i]..prompt_first[i+1]
//! spans         C x 2 u64  (byte offset into data, n tokens) of each completion
//! margins       P f64      each prompt's margin (0 without)
//! scores        C f64      each completion's score, non-increasing within a prompt (the
//!                          record's `scores`, sorted; K-1-j for completion j without)
//! prompt_types  P u8       0 none, 1 open, 2 closed
//! ```

use super::{LineOutcome, PromptType, RankingRecord, for_each_line_in, no_records_error};
use crate::error::{Error, Result};
use crate::loss::MARGIN_RANGE;
use crate::tokenizer::{TOKENIZER_VERSION, Tokenizer};
use memmap2::Mmap;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RCXTOKS\0";
/// The layout above; 2 added the content key, the tokenizer version and the checksum; 3
/// the margins and scores.
const VERSION: u32 = 3;
const HEADER_BYTES: usize = 128;
/// The header bytes the checksum covers: all but the checksum itself.
const CHECKED_HEADER_BYTES: usize = 96;
/// Records tokenized in parallel at a time: enough work per batch for rayon, bounded memory
/// (at most this many records, of at most this many source bytes together beyond the last).
const BATCH_RECORDS: usize = 4096;
const BATCH_BYTES: usize = 64 << 20;

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
    margins_start: usize,
    scores_start: usize,
    types_start: usize,
    /// Whether any prompt has a margin or a tie (its pairs are not all formed plainly).
    labelled: bool,
    rebuilt: bool,
    path: PathBuf,
}

/// The header fields that decide whether a cache still matches its inputs.
#[derive(Clone, Copy, PartialEq, Debug)]
struct CacheKey {
    tokenizer: u32,
    source: [u8; 32],
    vocabulary: u64,
    max_length: u64,
}

/// Why a cache file cannot serve: a missing one, or one made for other inputs, is rebuilt
/// quietly; a corrupt one is rebuilt saying so.
enum Unusable {
    Stale,
    Corrupt(String),
}

impl TokenizedSet {
    /// Maps the cache of `source` if it matches (source, tokenizer, vocabulary,
    /// max_length), else tokenizes the source and writes a new cache first. Bad source
    /// lines (texts the tokenizer refuses included) are an error naming FILE:LINE, or with
    /// `skip_bad` skipped.
    pub fn open_or_build(
        source: &Path,
        tok: &Tokenizer,
        max_length: usize,
        skip_bad: bool,
    ) -> Result<TokenizedSet> {
        let least = tok.least_pair_length();
        if max_length < least {
            return Err(Error::user(format!(
                "max_length {max_length} cannot hold a (prompt, completion) pair: it needs at \
                 least {least} ids, the tokenizer's special tokens around the pair"
            )));
        }
        let io = |e| Error::io(source, e);
        let mut key = CacheKey {
            tokenizer: TOKENIZER_VERSION,
            source: [0; 32],
            vocabulary: tok.fingerprint(),
            max_length: max_length as u64,
        };
        if !std::fs::metadata(source).map_err(io)?.is_file() {
            return TokenizedSet::build_from_stream(source, tok, key, skip_bad);
        }
        key.source = sha256_of_file(source)?;
        let candidates = cache_candidates(source);
        let mut corrupt = None;
        for path in &candidates {
            match TokenizedSet::open_valid(path, key, tok.vocab_size(), skip_bad) {
                Ok(set) => return Ok(set),
                Err(Unusable::Corrupt(why)) => corrupt = corrupt.or(Some((path, why))),
                Err(Unusable::Stale) => {}
            }
        }
        if let Some((path, why)) = corrupt {
            eprintln!(
                "{}: corrupt token cache ({why}); rebuilding it from {}",
                path.display(),
                source.display()
            );
        }
        let mut last_err = None;
        for path in &candidates {
            match build_cache(source, path, tok, key, skip_bad) {
                Ok(built) => {
                    let mut set = built.keep_at(path)?;
                    set.rebuilt = true;
                    return Ok(set);
                }
                // A folder we cannot write: try the next location.
                Err(BuildError::Write(e)) => last_err = Some(e),
                Err(BuildError::Data(e)) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::internal("no cache location")))
    }

    /// Tokenizes a source that can be read only once into a cache in the temp folder,
    /// maps it and deletes the file: the mapping lives on, and nothing is left behind.
    fn build_from_stream(
        source: &Path,
        tok: &Tokenizer,
        key: CacheKey,
        skip_bad: bool,
    ) -> Result<TokenizedSet> {
        let path = temp_cache_path(source);
        let built = build_cache(source, &path, tok, key, skip_bad).map_err(|e| match e {
            BuildError::Write(e) | BuildError::Data(e) => e,
        })?;
        let _ = std::fs::remove_file(&built.path);
        let mut set = built;
        set.rebuilt = true;
        Ok(set)
    }

    /// Moves this set's file (a temporary one just written) to `path`; the mapping stays.
    fn keep_at(mut self, path: &Path) -> Result<TokenizedSet> {
        if let Err(e) = std::fs::rename(&self.path, path) {
            let _ = std::fs::remove_file(&self.path);
            return Err(Error::io(path, e));
        }
        self.path = path.to_path_buf();
        Ok(self)
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

    /// The SHA-256 (hex) of the source bytes this set was tokenized from: the data's
    /// fingerprint, read from the cache so that a pipe is never read a second time.
    pub fn source_sha256(&self) -> String {
        self.mmap[16..48]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The cache file in use (for a stream source, a file already deleted).
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

    /// The margin of prompt i (0 without).
    pub fn margin(&self, i: usize) -> f64 {
        assert!(i < self.num_prompts, "prompt {i} of {}", self.num_prompts);
        f64::from_bits(read_u64(&self.mmap, self.margins_start + 8 * i))
    }

    /// The scores of prompt i's completions, best first (K-1-j for a record without).
    pub fn scores(&self, i: usize) -> Vec<f64> {
        let (first, end) = self.completion_range(i);
        (first..end).map(|c| self.score(c)).collect()
    }

    /// Whether any prompt carries a margin or a tie: without, `margin` is 0 and `scores`
    /// strictly decreasing everywhere, and the loss forms every pair as the paper's.
    pub fn labelled(&self) -> bool {
        self.labelled
    }

    fn score(&self, c: usize) -> f64 {
        f64::from_bits(read_u64(&self.mmap, self.scores_start + 8 * c))
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

    /// Maps `path` when it is a well-formed cache for `key`; otherwise says why not (the
    /// caller rebuilds).
    fn open_valid(
        path: &Path,
        key: CacheKey,
        vocab_size: usize,
        skip_bad: bool,
    ) -> std::result::Result<TokenizedSet, Unusable> {
        let corrupt = |why: &str| Unusable::Corrupt(why.to_string());
        let file = File::open(path).map_err(|_| Unusable::Stale)?;
        // SAFETY: caches are only ever replaced by rename, never written in place, so the
        // mapped file does not change under us; its contents are validated below before
        // any use.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|_| corrupt("unreadable"))?;
        let header = mmap
            .get(..HEADER_BYTES)
            .ok_or_else(|| corrupt("shorter than its header"))?;
        if &header[..8] != MAGIC {
            return Err(corrupt("not a token cache"));
        }
        let mut source = [0u8; 32];
        source.copy_from_slice(&header[16..48]);
        let stored = CacheKey {
            tokenizer: read_u32(header, 12),
            source,
            vocabulary: read_u64(header, 48),
            max_length: read_u64(header, 56),
        };
        let skipped = read_u64(header, 88);
        // A cache built while skipping bad lines must not hide them from a strict run.
        if read_u32(header, 8) != VERSION || stored != key || (skipped > 0 && !skip_bad) {
            return Err(Unusable::Stale);
        }
        let checksum = Sha256::new()
            .chain_update(&mmap[HEADER_BYTES..])
            .chain_update(&header[..CHECKED_HEADER_BYTES])
            .finalize();
        if checksum[..] != header[CHECKED_HEADER_BYTES..HEADER_BYTES] {
            return Err(corrupt("checksum mismatch"));
        }
        let set = TokenizedSet::from_checked(mmap, key, path)
            .ok_or_else(|| corrupt("inconsistent tables"))?;
        // Ids outside the vocabulary would reach the model as its error, not the cache's.
        match set.first_id_outside(vocab_size) {
            Some(id) => Err(Unusable::Corrupt(format!(
                "token id {id} outside the vocabulary of {vocab_size}"
            ))),
            None => Ok(set),
        }
    }

    /// The first input id >= `vocab_size` (or token type id > 1, as u32), if any.
    fn first_id_outside(&self, vocab_size: usize) -> Option<u32> {
        for i in 0..self.num_prompts {
            for j in 0..self.num_completions(i) {
                let (ids, types) = self.completion(i, j);
                let bad_id = ids.iter().find(|&&id| id as usize >= vocab_size);
                let bad_type = types.iter().find(|&&t| t > 1).map(|&t| u32::from(t));
                if let Some(id) = bad_id.copied().or(bad_type) {
                    return Some(id);
                }
            }
        }
        None
    }

    /// The set of a cache whose header and checksum were verified, when its tables are
    /// consistent (the checksum proves what was written; this proves it was sound).
    fn from_checked(mmap: Mmap, key: CacheKey, path: &Path) -> Option<TokenizedSet> {
        let header = &mmap[..HEADER_BYTES];
        let skipped = read_u64(header, 88);
        let num_prompts = usize::try_from(read_u64(header, 64)).ok()?;
        let num_completions = usize::try_from(read_u64(header, 72)).ok()?;
        let data_bytes = usize::try_from(read_u64(header, 80)).ok()?;
        let data_start = HEADER_BYTES;
        let prompt_first_start = data_start.checked_add(data_bytes)?;
        let spans_start =
            prompt_first_start.checked_add(num_prompts.checked_add(1)?.checked_mul(8)?)?;
        let margins_start = spans_start.checked_add(num_completions.checked_mul(16)?)?;
        let scores_start = margins_start.checked_add(num_prompts.checked_mul(8)?)?;
        let types_start = scores_start.checked_add(num_completions.checked_mul(8)?)?;
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
        let mut set = TokenizedSet {
            mmap,
            num_prompts,
            num_completions,
            skipped: usize::try_from(skipped).ok()?,
            data_start,
            prompt_first_start,
            spans_start,
            margins_start,
            scores_start,
            types_start,
            labelled: false,
            rebuilt: false,
            path: path.to_path_buf(),
        };
        set.labelled = set.check_labels()?;
        Some(set)
    }

    /// Checks what the loss relies on: margins in `MARGIN_RANGE`, scores finite and
    /// non-increasing within a prompt with at least one pair. Returns whether any prompt
    /// has a margin or a tie; None when the labels are unsound.
    fn check_labels(&self) -> Option<bool> {
        let (low, high) = MARGIN_RANGE;
        let mut labelled = false;
        for i in 0..self.num_prompts {
            let margin = self.margin(i);
            if !(low..high).contains(&margin) {
                return None;
            }
            let (first, end) = self.completion_range(i);
            let scores: Vec<f64> = (first..end).map(|c| self.score(c)).collect();
            let sorted = scores.windows(2).all(|w| w[0] >= w[1]);
            if !sorted
                || scores.iter().any(|s| !s.is_finite())
                || scores[0] == scores[end - first - 1]
            {
                return None;
            }
            labelled |= margin != 0.0 || scores.windows(2).any(|w| w[0] == w[1]);
        }
        Some(labelled)
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

/// SHA-256 of the whole file: any changed byte, wherever it is, changes the key.
fn sha256_of_file(source: &Path) -> Result<[u8; 32]> {
    let io = |e| Error::io(source, e);
    let mut reader = Hashing::new(File::open(source).map_err(io)?);
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(io)?;
    Ok(reader.into_parts().1.finalize().into())
}

/// Passes bytes through to `inner` (read from it or written to it) and hashes them.
struct Hashing<T> {
    inner: T,
    hash: Sha256,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
        }
    }

    /// The wrapped value and the hash of every byte that passed so far.
    fn into_parts(self) -> (T, Sha256) {
        (self.inner, self.hash)
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Where the cache of the regular file `source` may live, in order of preference: beside
/// the file it names (so a link such as /dev/stdin to a file never puts one in /dev), then
/// in the shared temp folder.
fn cache_candidates(source: &Path) -> Vec<PathBuf> {
    let real = std::fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
    let folder = real.parent().unwrap_or(Path::new("."));
    let beside = folder
        .join(".rcx-cache")
        .join(format!("{}.rcxcache", file_name(&real)));
    vec![beside, temp_cache_path(&real)]
}

/// The cache of `source` in the shared temp folder; the hash of the path tells apart
/// sources with one name.
fn temp_cache_path(source: &Path) -> PathBuf {
    let hash = Sha256::digest(source.to_string_lossy().as_bytes());
    let tag: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    std::env::temp_dir()
        .join("rcx-cache")
        .join(format!("{}-{tag}.rcxcache", file_name(source)))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".to_string())
}

enum BuildError {
    /// The cache could not be written here (another location may work).
    Write(Error),
    /// The source is bad: no location will help.
    Data(Error),
}

/// Tokenizes `source`, read once, into a new cache in a temporary file beside `path`, and
/// maps it; `keep_at` then moves it into place. Nothing is left behind on an error.
fn build_cache(
    source: &Path,
    path: &Path,
    tok: &Tokenizer,
    key: CacheKey,
    skip_bad: bool,
) -> std::result::Result<TokenizedSet, BuildError> {
    let folder = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(|e| BuildError::Write(Error::io(folder, e)))?;
    let tmp = super::temp_path_beside(path);
    let file = File::create(&tmp).map_err(|e| BuildError::Write(Error::io(&tmp, e)))?;
    let result = write_cache(source, &tmp, file, tok, key, skip_bad).and_then(|key| {
        TokenizedSet::open_valid(&tmp, key, tok.vocab_size(), skip_bad).map_err(|_| {
            BuildError::Data(Error::internal(format!(
                "{}: the cache just written does not read back",
                tmp.display()
            )))
        })
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
    margins: Vec<f64>,      // [P]
    scores: Vec<f64>,       // [C]
    types: Vec<u8>,         // [P]
    data_bytes: u64,
}

/// Writes the cache of `source` to `file`; returns its key, whose source hash is that of
/// the bytes actually tokenized.
fn write_cache(
    source: &Path,
    tmp: &Path,
    mut file: File,
    tok: &Tokenizer,
    mut key: CacheKey,
    skip_bad: bool,
) -> std::result::Result<CacheKey, BuildError> {
    let write_err = |e: std::io::Error| BuildError::Write(Error::io(tmp, e));
    file.write_all(&[0u8; HEADER_BYTES]).map_err(write_err)?;
    let mut out = BufWriter::with_capacity(1 << 20, Hashing::new(file));
    let input = File::open(source).map_err(|e| BuildError::Data(Error::io(source, e)))?;
    let mut reader = BufReader::with_capacity(1 << 20, Hashing::new(input));
    let mut tables = Tables {
        prompt_first: vec![0],
        spans: Vec::new(),
        margins: Vec::new(),
        scores: Vec::new(),
        types: Vec::new(),
        data_bytes: 0,
    };
    let max_length = key.max_length as usize;
    // (line number, record) of the lines read since the last batch was written
    let mut batch: Vec<(usize, RankingRecord)> = Vec::with_capacity(BATCH_RECORDS);
    let mut batch_bytes = 0usize;
    // Records whose texts the tokenizer refused, skipped with skip_bad.
    let mut untokenizable = 0usize;
    let mut write_failure = None;
    let read = for_each_line_in(&mut reader, source, skip_bad, |line_no, bytes| {
        let Some(record) = super::parse_ranking_line(source, line_no, bytes, skip_bad)? else {
            return Ok(LineOutcome::Skipped);
        };
        batch.push((line_no, record));
        batch_bytes += bytes.len();
        if batch.len() == BATCH_RECORDS || batch_bytes >= BATCH_BYTES {
            let encoded = tokenize_batch(source, &batch, tok, max_length, skip_bad)?;
            untokenizable += encoded.iter().filter(|e| e.is_none()).count();
            if let Err(e) = write_batch(&mut out, &mut tables, &batch, &encoded) {
                // Stop reading: keep the write error apart from data errors.
                write_failure = Some(e);
                return Err(Error::internal("cache write failed"));
            }
            batch.clear();
            batch_bytes = 0;
        }
        Ok(LineOutcome::Kept)
    });
    if let Some(e) = write_failure {
        return Err(BuildError::Write(Error::io(tmp, e)));
    }
    let read_skipped = read.map_err(BuildError::Data)?;
    key.source = reader.into_inner().into_parts().1.finalize().into();
    let encoded =
        tokenize_batch(source, &batch, tok, max_length, skip_bad).map_err(BuildError::Data)?;
    untokenizable += encoded.iter().filter(|e| e.is_none()).count();
    write_batch(&mut out, &mut tables, &batch, &encoded).map_err(write_err)?;
    let skipped = read_skipped + untokenizable;
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
    for value in tables.margins.iter().chain(&tables.scores) {
        out.write_all(&value.to_bits().to_le_bytes())
            .map_err(write_err)?;
    }
    out.write_all(&tables.types).map_err(write_err)?;
    let (mut file, mut checksum) = out
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?
        .into_parts();

    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&key.tokenizer.to_le_bytes());
    header.extend_from_slice(&key.source);
    for field in [
        key.vocabulary,
        key.max_length,
        num_prompts as u64,
        tables.spans.len() as u64,
        tables.data_bytes,
        skipped as u64,
    ] {
        header.extend_from_slice(&field.to_le_bytes());
    }
    debug_assert_eq!(header.len(), CHECKED_HEADER_BYTES);
    // The body's hash ran while it was written; the checked header comes after it.
    checksum.update(&header);
    header.extend_from_slice(&checksum.finalize());
    file.seek(SeekFrom::Start(0)).map_err(write_err)?;
    file.write_all(&header).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(key)
}

/// (input_ids [n], token_type_ids [n]) of each completion of one record.
type EncodedRecord = Vec<(Vec<u32>, Vec<u8>)>;

/// Tokenizes a batch of (line number, record) in parallel. A text the tokenizer cannot
/// read (a decoder's tokenizer.json can refuse one) is an error naming FILE:LINE, or with
/// `skip_bad` leaves its record out (None).
fn tokenize_batch(
    source: &Path,
    batch: &[(usize, RankingRecord)],
    tok: &Tokenizer,
    max_length: usize,
    skip_bad: bool,
) -> Result<Vec<Option<EncodedRecord>>> {
    batch
        .par_iter()
        .map(|(line_no, record)| {
            let at = |what: &str, e: Error| {
                Error::user(format!(
                    "{}:{line_no}: {what} cannot be tokenized: {e}",
                    source.display()
                ))
            };
            let encode = || -> Result<EncodedRecord> {
                let prompt = tok
                    .try_tokenize(&record.prompt)
                    .map_err(|e| at("the prompt", e))?;
                record
                    .completions
                    .iter()
                    .map(|completion| {
                        let ids = tok
                            .try_tokenize(completion)
                            .map_err(|e| at("a completion", e))?;
                        let enc = tok.encode_tokenized_pair(&prompt, &ids, max_length);
                        // Segment ids are 0 or 1 in a pair encoding; u8 keeps the cache small.
                        let types = enc.token_type_ids.iter().map(|&t| t.min(255) as u8);
                        Ok((enc.input_ids, types.collect()))
                    })
                    .collect()
            };
            match encode() {
                Ok(encoded) => Ok(Some(encoded)),
                Err(Error::User(_)) if skip_bad => Ok(None),
                Err(e) => Err(e),
            }
        })
        .collect::<Vec<_>>()
        .into_iter()
        // In line order, so that the error is that of the batch's first bad line.
        .collect()
}

/// Appends a tokenized batch (`encoded[r]`: record r's completions, None for a record left
/// out) to the data region.
fn write_batch(
    out: &mut impl Write,
    tables: &mut Tables,
    batch: &[(usize, RankingRecord)],
    encoded: &[Option<EncodedRecord>],
) -> std::io::Result<()> {
    for ((_, record), completions) in batch.iter().zip(encoded) {
        let Some(completions) = completions else {
            continue;
        };
        for (ids, types) in completions {
            tables.spans.push([tables.data_bytes, ids.len() as u64]);
            out.write_all(bytemuck::cast_slice(ids))?;
            out.write_all(types)?;
            let pad = (4 - types.len() % 4) % 4;
            out.write_all(&[0u8; 3][..pad])?;
            tables.data_bytes += (ids.len() * 4 + types.len() + pad) as u64;
        }
        tables.prompt_first.push(tables.spans.len() as u64);
        tables.margins.push(record.margin);
        let k = record.completions.len();
        match &record.scores {
            Some(scores) => tables.scores.extend(scores),
            None => tables.scores.extend((0..k).map(|j| (k - 1 - j) as f64)),
        }
        tables.types.push(match record.prompt_type {
            None => 0,
            Some(PromptType::Open) => 1,
            Some(PromptType::Closed) => 2,
        });
    }
    Ok(())
}
