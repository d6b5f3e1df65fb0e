//! Fuzzing the readers of a model folder: the safetensors header and config.json, with
//! seeded proptest generators that start from a valid small model folder and mutate it.
//! Every input must be accepted or refused with one line naming the file at fault: never a
//! panic, an abort, a hang, nor an allocation sized by what a file claims rather than by
//! what it holds (a counting allocator measures the largest single request).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner};
use rcx::checkpoint::load_for_scoring;
use rcx::error::Error;
use rcx::hf_config::{read_hf_config, write_hf_config};
use rcx::models::{BertConfig, HostModel};
use rcx::safetensors::{SafeTensors, write_f32};
use serde_json::{Map, Value, json};

/// Passes every request to the system allocator, noting this thread's largest one.
struct LargestRequest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// Set while a reader runs: a request above [`ABORT_ABOVE`] then ends the process at
    /// once, rather than letting a claimed size take the machine's memory.
    static READING: Cell<bool> = const { Cell::new(false) };
}

/// The most one reading of the small folder below may ask for at once: its files are a
/// few kB, so anything near this was sized by a claim, not by the bytes.
const ALLOCATION_LIMIT: usize = 1 << 20;

/// Far past the limit: the test fails here without waiting for the allocation to return.
const ABORT_ABOVE: usize = 1 << 28;

fn note(size: usize) {
    // try_with: the slots are gone while the thread's locals are being destroyed.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
    if size > ABORT_ABOVE && READING.try_with(Cell::get).unwrap_or(false) {
        // No formatting: that could allocate inside the allocator.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"fuzz_model_dir: a reader asked for more than 256 MiB at once, sized by what a \
              file claims; aborting\n",
        );
        std::process::abort();
    }
}

// SAFETY: every call is forwarded unchanged to `System`; only thread-locals are touched.
unsafe impl GlobalAlloc for LargestRequest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestRequest = LargestRequest;

/// Seeded, so that CI runs the same inputs every time; no failure files in the tree.
fn fuzz_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(0x0010_f22e),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A 16-token vocabulary: the special tokens first, [PAD] at 0 as in BERT's.
const VOCAB: [&str; 16] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "is", "of", "and", "to", "in", "it",
    "##s", "long", "short",
];

fn small_arch() -> BertConfig {
    BertConfig {
        vocab_size: VOCAB.len(),
        hidden_size: 4,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 8,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        pad_token_id: 0,
    }
}

/// A whole model folder of a freshly initialised small BERT; returns its folder.
fn valid_model_folder(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-model-dir")
        .join(test);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    let arch = small_arch();
    let model = HostModel::<f32>::init(arch.clone(), 7);
    let tensors: Vec<(&str, &[usize], &[f32])> = model
        .layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), &t.shape[..], &model.params[t.range()]))
        .collect();
    write_f32(
        &dir.join("model.safetensors"),
        &tensors,
        &[("format", "pt")],
    )
    .unwrap();
    let hf = rcx::checkpoint::to_hf(&arch);
    write_hf_config(&dir.join("config.json"), &hf, 1).unwrap();
    std::fs::write(dir.join("vocab.txt"), VOCAB.join("\n") + "\n").unwrap();
    // The control: the folder the mutations start from loads.
    load_for_scoring(&dir).expect("the valid folder loads");
    dir
}

/// Runs `read` with the allocation count reset; fails the case on a request above the
/// limit, and on an error that is not one line holding `names` (the file at fault).
fn check_reading<T>(
    names: &str,
    read: impl FnOnce() -> rcx::error::Result<T>,
) -> Result<Option<T>, TestCaseError> {
    LARGEST.with(|largest| largest.set(0));
    READING.with(|reading| reading.set(true));
    let result = read();
    READING.with(|reading| reading.set(false));
    let largest = LARGEST.with(Cell::get);
    prop_assert!(
        largest <= ALLOCATION_LIMIT,
        "an allocation of {largest} bytes while reading"
    );
    match result {
        Ok(value) => Ok(Some(value)),
        Err(Error::User(msg)) => {
            prop_assert!(!msg.contains('\n'), "not one line: {msg}");
            prop_assert!(msg.contains(names), "{names} not named: {msg}");
            Ok(None)
        }
        Err(other) => Err(TestCaseError::fail(format!(
            "a bad file must be a user error: {other:?}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// safetensors

/// One change to the parsed header of the valid file.
#[derive(Debug, Clone)]
enum HeaderEdit {
    Dtype(Index, String),
    Shape(Index, Vec<u64>),
    Offsets(Index, Vec<u64>),
    /// Any JSON value in place of a field of an entry ("dtype", "shape", "data_offsets").
    Field(Index, &'static str, Value),
    RemoveField(Index, &'static str),
    /// A tensor entry moved to a new name (or onto another one).
    Rename(Index, String),
    /// The same number of elements in another shape: a header that holds together but
    /// does not fit the model.
    Reshape(Index, Index),
    /// Two entries trade their byte ranges.
    SwapOffsets(Index, Index),
}

/// One change to the bytes of the file after the header is written.
#[derive(Debug, Clone)]
enum ByteEdit {
    LengthPrefix(u64),
    Truncate(Index),
    Byte(Index, u8),
    /// Bytes that are never UTF-8, written inside the header.
    InvalidUtf8(Index),
    AppendData(usize),
}

/// Sizes: small ones, the edges of u32 and u64, and anything.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..80u64,
        1 => Just(u64::from(u32::MAX)),
        1 => Just(1u64 << 32),
        1 => Just(1u64 << 62),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        size().prop_map(Value::from),
        any::<f64>().prop_map(|x| json!(x)),
        "[A-Z0-9_]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

const FIELDS: [&str; 3] = ["dtype", "shape", "data_offsets"];

fn header_edit() -> impl Strategy<Value = HeaderEdit> {
    let dtype = prop_oneof![
        prop::sample::select(vec![
            "F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F7", "f32", "",
        ])
        .prop_map(String::from),
        "[A-Z0-9_]{1,8}",
    ];
    prop_oneof![
        (any::<Index>(), dtype).prop_map(|(i, d)| HeaderEdit::Dtype(i, d)),
        (any::<Index>(), prop::collection::vec(size(), 0..4))
            .prop_map(|(i, s)| HeaderEdit::Shape(i, s)),
        (any::<Index>(), prop::collection::vec(size(), 0..4))
            .prop_map(|(i, o)| HeaderEdit::Offsets(i, o)),
        (
            any::<Index>(),
            prop::sample::select(FIELDS.to_vec()),
            json_value()
        )
            .prop_map(|(i, f, v)| HeaderEdit::Field(i, f, v)),
        (any::<Index>(), prop::sample::select(FIELDS.to_vec()))
            .prop_map(|(i, f)| HeaderEdit::RemoveField(i, f)),
        (
            any::<Index>(),
            prop_oneof![
                Just("__metadata__".to_string()),
                Just("classifier.weight".to_string()),
                Just("bert.embeddings.word_embeddings.weight".to_string()),
                "[a-z.]{0,12}",
            ]
        )
            .prop_map(|(i, n)| HeaderEdit::Rename(i, n)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, j)| HeaderEdit::Reshape(i, j)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, j)| HeaderEdit::SwapOffsets(i, j)),
    ]
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        size().prop_map(ByteEdit::LengthPrefix),
        any::<Index>().prop_map(ByteEdit::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Byte(i, b)),
        any::<Index>().prop_map(ByteEdit::InvalidUtf8),
        (0..64usize).prop_map(ByteEdit::AppendData),
    ]
}

/// The valid file's header (entries by name) and its data buffer.
fn split_safetensors(bytes: &[u8]) -> (Map<String, Value>, Vec<u8>) {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    (header, bytes[8 + len..].to_vec())
}

fn apply_header_edit(header: &mut Map<String, Value>, edit: &HeaderEdit) {
    let names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let pick = |i: &Index| names[i.index(names.len())].clone();
    match edit {
        HeaderEdit::Dtype(i, dtype) => header[&pick(i)]["dtype"] = json!(dtype),
        HeaderEdit::Shape(i, shape) => header[&pick(i)]["shape"] = json!(shape),
        HeaderEdit::Offsets(i, offsets) => header[&pick(i)]["data_offsets"] = json!(offsets),
        HeaderEdit::Field(i, field, value) => header[&pick(i)][*field] = value.clone(),
        HeaderEdit::RemoveField(i, field) => {
            if let Some(entry) = header[&pick(i)].as_object_mut() {
                entry.remove(*field);
            }
        }
        HeaderEdit::Rename(i, name) => {
            let entry = header.remove(&pick(i)).unwrap();
            header.insert(name.clone(), entry);
        }
        HeaderEdit::Reshape(i, j) => {
            let entry = &mut header[&pick(i)]["shape"];
            let count = entry.as_array().and_then(|dims| {
                dims.iter()
                    .try_fold(1u64, |n, d| n.checked_mul(d.as_u64()?))
            });
            // The valid tensors are small; a shape an earlier edit made huge stays as it is.
            if let Some(count) = count.filter(|&n| n <= 1 << 16) {
                // [count], [1, count], or [count / d, d] for a divisor d of count.
                let divisors: Vec<u64> = (1..=count).filter(|d| count % d == 0).collect();
                *entry = match j.index(3) {
                    0 => json!([count]),
                    1 => json!([1, count]),
                    _ if divisors.is_empty() => json!([]),
                    _ => {
                        let d = divisors[j.index(divisors.len())];
                        json!([count / d, d])
                    }
                };
            }
        }
        HeaderEdit::SwapOffsets(i, j) => {
            let (a, b) = (pick(i), pick(j));
            let offsets_a = header[&a]["data_offsets"].take();
            let offsets_b = std::mem::replace(&mut header[&b]["data_offsets"], offsets_a);
            header[&a]["data_offsets"] = offsets_b;
        }
    }
}

fn apply_byte_edit(bytes: &mut Vec<u8>, edit: &ByteEdit) {
    let header_end =
        (8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())).min(bytes.len() as u64) as usize;
    match edit {
        ByteEdit::LengthPrefix(len) => bytes[..8].copy_from_slice(&len.to_le_bytes()),
        ByteEdit::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        ByteEdit::Byte(i, b) => {
            let at = i.index(bytes.len());
            bytes[at] = *b;
        }
        ByteEdit::InvalidUtf8(i) if header_end > 9 => {
            let at = 8 + i.index(header_end - 9);
            bytes[at..at + 2].copy_from_slice(&[0xC3, 0x28]);
        }
        ByteEdit::InvalidUtf8(_) => {}
        ByteEdit::AppendData(n) => bytes.resize(bytes.len() + n, 0x7f),
    }
}

fn safetensors_case() -> impl Strategy<Value = (Vec<HeaderEdit>, Vec<ByteEdit>)> {
    (
        prop::collection::vec(header_edit(), 0..4),
        // Most cases keep the bytes as written, so that header edits reach past the
        // header's own checks.
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(byte_edit(), 1..3)],
    )
        .prop_filter("at least one edit", |(h, b)| !h.is_empty() || !b.is_empty())
}

#[test]
fn safetensors_mutations_are_read_or_refused_in_one_line() {
    let dir = valid_model_folder("safetensors");
    let path = dir.join("model.safetensors");
    let (valid_header, data) = split_safetensors(&std::fs::read(&path).unwrap());
    let path_name = path.display().to_string();
    let dir_name = dir.display().to_string();
    let (opened, loaded) = (Cell::new(0), Cell::new(0));
    let mut runner = TestRunner::new(fuzz_config(3000));
    let outcome = runner.run(&safetensors_case(), |(header_edits, byte_edits)| {
        let mut header = valid_header.clone();
        for edit in &header_edits {
            apply_header_edit(&mut header, edit);
        }
        let text = serde_json::to_vec(&header).unwrap();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&text);
        bytes.extend_from_slice(&data);
        for edit in &byte_edits {
            apply_byte_edit(&mut bytes, edit);
        }
        std::fs::write(&path, &bytes).unwrap();

        if let Some(st) = check_reading(&path_name, || SafeTensors::open(&path))? {
            opened.set(opened.get() + 1);
            for name in st.names() {
                let shape = st.get(name).unwrap().shape.to_vec();
                if let Some(values) = check_reading(&path_name, || st.read_f32(name, &shape))? {
                    prop_assert_eq!(values.len(), shape.iter().product::<usize>());
                }
            }
        }
        // The whole folder: every tensor compared with what config.json implies.
        if check_reading(&dir_name, || load_for_scoring(&dir))?.is_some() {
            loaded.set(loaded.get() + 1);
        }
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    // The mutations reach past the header checks, and most are refused.
    let (opened, loaded) = (opened.get(), loaded.get());
    eprintln!("safetensors fuzz: 3000 cases, {opened} opened, {loaded} loaded as a model");
    assert!(
        (200..=2700).contains(&opened) && loaded >= 50,
        "of 3000 cases {opened} opened and {loaded} loaded as a model"
    );
}

// ---------------------------------------------------------------------------------------
// config.json

const CONFIG_KEYS: [&str; 15] = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "pad_token_id",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "model_type",
    "hidden_act",
    "position_embedding_type",
    "architectures",
];

#[derive(Debug, Clone)]
enum ConfigEdit {
    Set(&'static str, Value),
    Remove(&'static str),
}

#[derive(Debug, Clone)]
enum TextEdit {
    Truncate(Index),
    Byte(Index, u8),
    InvalidUtf8(Index),
    /// The whole text wrapped in `depth` arrays.
    Nest(usize),
}

/// config.json numbers: huge, negative, float, zero, the neighbours of the valid sizes.
fn config_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => size().prop_map(Value::from),
        1 => Just(json!(10_000_000_000u64)),
        1 => (1u64..=64).prop_map(|n| json!(n * 1_000_000)),
        1 => (i64::MIN..0).prop_map(Value::from),
        1 => Just(json!(-1)),
        1 => prop::sample::select(vec![0.5, 1.5, 1e10, 1e308, -0.0, 4.0, 1e-300])
            .prop_map(|x| json!(x)),
        1 => Just(json!(0)),
    ]
}

fn config_edit() -> impl Strategy<Value = ConfigEdit> {
    let key = prop::sample::select(CONFIG_KEYS.to_vec());
    prop_oneof![
        4 => (key.clone(), config_number()).prop_map(|(k, v)| ConfigEdit::Set(k, v)),
        1 => (key.clone(), json_value()).prop_map(|(k, v)| ConfigEdit::Set(k, v)),
        1 => key.prop_map(ConfigEdit::Remove),
    ]
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        any::<Index>().prop_map(TextEdit::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| TextEdit::Byte(i, b)),
        any::<Index>().prop_map(TextEdit::InvalidUtf8),
        (1..400usize).prop_map(TextEdit::Nest),
    ]
}

fn config_case() -> impl Strategy<Value = (Vec<ConfigEdit>, Vec<TextEdit>)> {
    (
        prop::collection::vec(config_edit(), 1..4),
        // Most cases keep the JSON whole, so that the values reach the checks of sizes.
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(text_edit(), 1..3)],
    )
}

fn apply_text_edit(text: &mut Vec<u8>, edit: &TextEdit) {
    match edit {
        TextEdit::Truncate(i) => text.truncate(i.index(text.len())),
        TextEdit::Byte(i, b) if !text.is_empty() => {
            let at = i.index(text.len());
            text[at] = *b;
        }
        TextEdit::InvalidUtf8(i) => {
            let at = i.index(text.len() + 1);
            text.splice(at..at, [0xFF, 0xFE]);
        }
        TextEdit::Nest(depth) => {
            let mut nested = b"[".repeat(*depth);
            nested.append(text);
            nested.extend(b"]".repeat(*depth));
            *text = nested;
        }
        TextEdit::Byte(..) => {}
    }
}

#[test]
fn config_json_mutations_are_read_or_refused_in_one_line() {
    let dir = valid_model_folder("config");
    let path = dir.join("config.json");
    let valid: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let path_name = path.display().to_string();
    let dir_name = dir.display().to_string();
    let (read, loaded) = (Cell::new(0), Cell::new(0));
    let mut runner = TestRunner::new(fuzz_config(3000));
    let outcome = runner.run(&config_case(), |(config_edits, text_edits)| {
        let mut config = valid.clone();
        let object = config.as_object_mut().unwrap();
        for edit in &config_edits {
            match edit {
                ConfigEdit::Set(key, value) => object.insert(key.to_string(), value.clone()),
                ConfigEdit::Remove(key) => object.remove(*key),
            };
        }
        let mut text = serde_json::to_vec_pretty(&config).unwrap();
        for edit in &text_edits {
            apply_text_edit(&mut text, edit);
        }
        std::fs::write(&path, &text).unwrap();

        if check_reading(&path_name, || read_hf_config(&path))?.is_some() {
            read.set(read.get() + 1);
        }
        if check_reading(&dir_name, || load_for_scoring(&dir))?.is_some() {
            loaded.set(loaded.get() + 1);
        }
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    // Many mutated configs parse and go on to the size checks; some still load.
    let (read, loaded) = (read.get(), loaded.get());
    eprintln!("config.json fuzz: 3000 cases, {read} parsed, {loaded} loaded as a model");
    assert!(
        read >= 200 && loaded >= 50,
        "of 3000 cases {read} parsed and {loaded} loaded as a model"
    );
}
