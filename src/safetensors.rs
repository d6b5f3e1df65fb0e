//! Reading and writing the safetensors format (the checkpoint format of Hugging Face).
//!
//! Layout of a file:
//!   [0..8)        N, the header length, little-endian u64
//!   [8..8+N)      a JSON object: for each tensor name
//!                 {"dtype", "shape", "data_offsets": [begin, end]},
//!                 plus an optional "__metadata__" object of string -> string
//!   [8+N..)       the data buffer; offsets are relative to its start, values little-endian
//!
//! Files are read through a memory map, so opening a large checkpoint costs no copy.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Headers larger than this are refused before parsing (the reference library uses the same
/// bound): a corrupt length must not make us allocate or parse gigabytes.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Element types named by the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    /// The dtype's name in a header ("F32", "BF16", ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    pub fn from_name(name: &str) -> Option<Dtype> {
        let dtype = match name {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E4M3" => Dtype::F8E4M3,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            _ => return None,
        };
        Some(dtype)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in the header, already checked against the data buffer.
#[derive(Debug)]
struct TensorInfo {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the data buffer (not within the file).
    begin: usize,
    end: usize,
}

/// An opened, validated safetensors file.
pub struct SafeTensors {
    path: PathBuf,
    mmap: Mmap,
    /// Where the data buffer starts in the file: 8 + header length.
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafeTensors {
    // The map itself is not worth printing: show what identifies the file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensors")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata)
            .finish()
    }
}

/// A borrowed view of one tensor's raw little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl SafeTensors {
    /// Opens and validates a file: the header length fits the file, the header is a JSON
    /// object of well-formed entries, every tensor's byte range lies in the data buffer and
    /// has the size its dtype and shape imply, and no two ranges overlap.
    pub fn open(path: &Path) -> Result<SafeTensors> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let bad = |msg: String| {
            Error::user(format!(
                "{}: not a valid safetensors file: {msg}",
                path.display()
            ))
        };
        // Checked before mapping: a zero-length file cannot be mapped on every platform.
        if file_len < 8 {
            return Err(bad(format!(
                "{file_len} bytes, shorter than the 8-byte header length"
            )));
        }
        // SAFETY: the map is read-only; as with any memory-mapped reader, the file must not be
        // truncated or rewritten by another process while it is open (rcx replaces files by
        // rename, which leaves an open map intact).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&mmap[..8]);
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > file_len - 8 {
            return Err(bad(format!(
                "header length {header_len} runs past the end of the file ({file_len} bytes)"
            )));
        }
        if header_len > MAX_HEADER_LEN {
            return Err(bad(format!(
                "header length {header_len} exceeds {MAX_HEADER_LEN} bytes"
            )));
        }
        // Both fit in usize: header_len <= file_len - 8 and the whole file is mapped.
        let data_start = 8 + header_len as usize;
        let data_len = mmap.len() - data_start;
        let header: Value = serde_json::from_slice(&mmap[8..data_start])
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let Value::Object(entries) = header else {
            return Err(bad("header is not a JSON object".to_string()));
        };

        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                metadata =
                    parse_metadata(&entry).map_err(|msg| bad(format!("__metadata__: {msg}")))?;
            } else {
                let info = parse_tensor_info(&entry, data_len)
                    .map_err(|msg| bad(format!("tensor '{name}': {msg}")))?;
                tensors.insert(name, info);
            }
        }

        // Overlap check: sorted by start, each range must end before the next begins.
        let mut ranges: Vec<(&str, usize, usize)> = tensors
            .iter()
            .map(|(name, t)| (name.as_str(), t.begin, t.end))
            .collect();
        ranges.sort_by_key(|&(_, begin, end)| (begin, end));
        for pair in ranges.windows(2) {
            let (first, _, first_end) = pair[0];
            let (second, second_begin, _) = pair[1];
            if second_begin < first_end {
                return Err(bad(format!(
                    "tensors '{first}' and '{second}' overlap in the data buffer"
                )));
            }
        }

        Ok(SafeTensors {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The `__metadata__` map (empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let (name, info) = self.tensors.get_key_value(name)?;
        let data = &self.mmap[self.data_start + info.begin..self.data_start + info.end];
        Some(TensorView {
            name,
            dtype: info.dtype,
            shape: &info.shape,
            data,
        })
    }

    /// The tensor `name` after checking, from the header alone, that it has shape
    /// `expected_shape` and a floating-point dtype that [`Self::read_f32`] converts.
    pub fn float_tensor(&self, name: &str, expected_shape: &[usize]) -> Result<TensorView<'_>> {
        let view = self.get(name).ok_or_else(|| {
            Error::user(format!("{}: no tensor named '{name}'", self.path.display()))
        })?;
        if view.shape != expected_shape {
            return Err(Error::user(format!(
                "{}: tensor '{name}': expected shape {expected_shape:?}, found shape {:?} ({})",
                self.path.display(),
                view.shape,
                view.dtype
            )));
        }
        if !matches!(
            view.dtype,
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        ) {
            return Err(Error::user(format!(
                "{}: tensor '{name}': expected a floating-point dtype (F32, F16, BF16 or F64), found {}",
                self.path.display(),
                view.dtype
            )));
        }
        Ok(view)
    }

    /// Reads a tensor as f32, converting from F16, BF16 or F64, after checking that its shape
    /// is `expected_shape`.
    pub fn read_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let view = self.float_tensor(name, expected_shape)?;
        let values = match view.dtype {
            Dtype::F16 => view
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => view
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F64 => view
                .data
                .chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            // float_tensor let only the four float dtypes through.
            _ => view
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        };
        Ok(values)
    }
}

fn parse_metadata(entry: &Value) -> std::result::Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = entry else {
        return Err("expected an object of string values".to_string());
    };
    map.iter()
        .map(|(key, value)| match value {
            Value::String(s) => Ok((key.clone(), s.clone())),
            _ => Err(format!(
                "key '{key}': expected a string value, found {value}"
            )),
        })
        .collect()
}

/// Checks one header entry against a data buffer of `data_len` bytes.
fn parse_tensor_info(entry: &Value, data_len: usize) -> std::result::Result<TensorInfo, String> {
    let Value::Object(fields) = entry else {
        return Err("expected an object with dtype, shape and data_offsets".to_string());
    };
    let dtype_name = fields
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("missing string field 'dtype'")?;
    let dtype =
        Dtype::from_name(dtype_name).ok_or_else(|| format!("unknown dtype '{dtype_name}'"))?;
    let shape = usize_list(fields, "shape")?;
    let offsets = usize_list(fields, "data_offsets")?;
    let [begin, end] = offsets[..] else {
        return Err(format!(
            "data_offsets must hold 2 numbers, found {}",
            offsets.len()
        ));
    };
    if begin > end || end > data_len {
        return Err(format!(
            "data_offsets [{begin}, {end}] outside the data buffer of {data_len} bytes"
        ));
    }
    let expected_bytes = shape
        .iter()
        .try_fold(dtype.size(), |acc, &dim| acc.checked_mul(dim))
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    if end - begin != expected_bytes {
        return Err(format!(
            "data_offsets [{begin}, {end}] span {} bytes, but {dtype} with shape {shape:?} needs {expected_bytes}",
            end - begin
        ));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        begin,
        end,
    })
}

fn usize_list(fields: &Map<String, Value>, key: &str) -> std::result::Result<Vec<usize>, String> {
    let items = fields
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("missing list field '{key}'"))?;
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("'{key}' holds {v}, expected a non-negative integer"))
        })
        .collect()
}

/// Writes F32 tensors and string metadata as a safetensors file, atomically: the bytes go to a
/// temporary file in the same folder, which is synced and then renamed over `path`.
///
/// The data buffer holds the tensors in the order given, back to back; the header (keys in
/// sorted order, as serde_json writes them) is padded with spaces to a multiple of 8 bytes so
/// that the data buffer starts aligned, as the reference library does.
pub fn write_f32(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    metadata: &[(&str, &str)],
) -> Result<()> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|&(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".to_string(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for &(name, shape, values) in tensors {
        let numel: usize = shape.iter().product();
        if numel != values.len() {
            return Err(Error::internal(format!(
                "writing {}: tensor '{name}' has shape {shape:?} ({numel} values) but {} values were given",
                path.display(),
                values.len()
            )));
        }
        if name == "__metadata__" || header.contains_key(name) {
            return Err(Error::internal(format!(
                "writing {}: tensor name '{name}' is reserved or repeated",
                path.display()
            )));
        }
        let end = offset + 4 * numel;
        let entry =
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] });
        header.insert(name.to_string(), entry);
        offset = end;
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))?;
    header_bytes.resize(header_bytes.len().next_multiple_of(8), b' ');

    let mut bytes = Vec::with_capacity(8 + header_bytes.len() + offset);
    bytes.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header_bytes);
    for &(_, _, values) in tensors {
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    write_atomic(path, &bytes)
}

/// Replaces `path` with `bytes` so that readers see either the old file or the whole new one:
/// write a temporary sibling, sync it, rename it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::user(format!("{}: not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // Best effort: the temporary file may not exist if creating it failed.
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}
