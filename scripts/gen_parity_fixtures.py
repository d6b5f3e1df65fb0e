#!/usr/bin/env python3
"""Generates the committed fixtures that rcx's safetensors reader and BERT model are tested
against. Needs torch, transformers, tokenizers and safetensors; run it from anywhere:

    $PYTHON scripts/gen_parity_fixtures.py [--only safetensors|tiny|minilm]

The minilm part needs .models/all-MiniLM-L6-v2/ (scripts/fetch-minilm.sh). Re-running gives
the same files (fixed seeds, CPU, float32).

Layouts (every JSON file also has a "description" string):

tests/fixtures/safetensors/mixed.safetensors   written by the Python `safetensors` library:
    tensors "f32" [2,3] F32, "f16" [4] F16, "bf16" [2,2] BF16, "f64" [3] F64, "i64" [2] I64;
    metadata {"format": "pt", "note": "rcx fixture"}
tests/fixtures/safetensors/mixed.json
    {"tensors": {NAME: {"dtype": "F16", "shape": [...], "values_f32": [flat row-major values
    converted to float32 by torch]}}, "metadata": {...}}

tests/fixtures/parity/tiny-bert/{config.json, model.safetensors}
    a random BertForSequenceClassification (num_labels 1, problem_type regression):
    vocab 128, hidden 32, 2 layers, 4 heads, FFN 64, 64 positions, 2 token types, eps 1e-12.
    Weights drawn by transformers' seeded init with std 0.2 (not 0.02, so GELU, softmax and
    tanh work in their non-linear range), then every LayerNorm weight (uniform 0.5..1.5) and
    every bias (normal, std 0.2) set to random non-trivial values, so parity tests exercise
    every parameter.
tests/fixtures/parity/tiny-bert-logits.json
    {"lengths": [11, 7, 16],                         real tokens per sequence
     "input_ids", "token_type_ids", "attention_mask": [batch][seq] ints (padding: id 0,
                                                       type 0, mask 0 at the end),
     "logits":            {"shape": [3, 1],      "data": [...]},
     "last_hidden_state": {"shape": [3, 16, 32], "data": [...]},
     "pooler_output":     {"shape": [3, 32],     "data": [...]}}
    "data" is flat row-major float32 printed with 9 significant digits (exact). Outputs come
    from model.eval() with eager attention; padded positions are included (they attend to
    the real tokens only; compare them or mask them out).

tests/fixtures/parity/minilm-hidden.json
    {"pairs": [[text_a, text_b], ...], "tokens": [[wordpiece strings]],
     "input_ids", "token_type_ids", "attention_mask": [batch][seq] (pair encoding
     [CLS] a [SEP] b [SEP], lower-cased, padded with [PAD] to the longest),
     "last_hidden_state": {"shape": [batch, seq, 384], "data": [... 7 significant digits]}}
    from BertModel.from_pretrained(".models/all-MiniLM-L6-v2") in eval mode, float32.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFETENSORS_DIR = os.path.join(ROOT, "tests", "fixtures", "safetensors")
PARITY_DIR = os.path.join(ROOT, "tests", "fixtures", "parity")
MINILM_DIR = os.path.join(ROOT, ".models", "all-MiniLM-L6-v2")


def dense(tensor, digits):
    """A float tensor as {"shape", "data"} with `digits` significant digits per value."""
    values = tensor.detach().to(torch.float32).contiguous().reshape(-1).tolist()
    return {
        "shape": list(tensor.shape),
        "data": [float(f"{v:.{digits}g}") for v in values],
    }


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path)} bytes)")


def gen_safetensors():
    from safetensors.torch import save_file

    os.makedirs(SAFETENSORS_DIR, exist_ok=True)
    tensors = {
        "f32": torch.tensor([[1.5, -2.25, 3.0], [0.1, -0.0, 1e-3]], dtype=torch.float32),
        "f16": torch.tensor([0.1, -65504.0, 6.1e-5, 2.5], dtype=torch.float16),
        "bf16": torch.tensor([[0.1, -3.0e38], [1.0e-30, 7.0]], dtype=torch.bfloat16),
        "f64": torch.tensor([0.1, -1.0e300, 2.0], dtype=torch.float64),
        "i64": torch.tensor([7, -9], dtype=torch.int64),
    }
    metadata = {"format": "pt", "note": "rcx fixture"}
    save_file(tensors, os.path.join(SAFETENSORS_DIR, "mixed.safetensors"), metadata=metadata)
    dtypes = {"f32": "F32", "f16": "F16", "bf16": "BF16", "f64": "F64", "i64": "I64"}
    expected = {
        name: {
            "dtype": dtypes[name],
            "shape": list(t.shape),
            # float32 conversion as torch does it (F64 -> F32 overflows to -inf; JSON can't
            # hold inf, so it is written as a string).
            "values_f32": [
                v if np.isfinite(v) else str(v)
                for v in t.to(torch.float32).reshape(-1).tolist()
            ],
        }
        for name, t in tensors.items()
    }
    write_json(
        os.path.join(SAFETENSORS_DIR, "mixed.json"),
        {
            "description": "expected contents of mixed.safetensors (scripts/gen_parity_fixtures.py)",
            "tensors": expected,
            "metadata": metadata,
        },
    )


def gen_tiny():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(20230527)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        # 0.2 rather than BERT's 0.02: pre-activations of order 1 put GELU, softmax and tanh
        # in their curved range, so an approximate GELU or a missing 1/sqrt(d) scale shows.
        initializer_range=0.2,
        num_labels=1,
        problem_type="regression",
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2)
    model.eval()

    out_dir = os.path.join(PARITY_DIR, "tiny-bert")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    print(f"wrote {os.path.relpath(out_dir, ROOT)}: {sorted(os.listdir(out_dir))}")

    lengths = [11, 7, 16]
    seq_len = 16
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    token_type_ids = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(1, config.vocab_size, (n,), generator=gen)
        # segment A is the first ~half (incl. position 0), segment B the rest of the real tokens
        token_type_ids[row, n // 2 + 1 : n] = 1
        attention_mask[row, :n] = 1

    with torch.no_grad():
        logits = model(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
        ).logits
        bert_out = model.bert(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
        )
    write_json(
        os.path.join(PARITY_DIR, "tiny-bert-logits.json"),
        {
            "description": "tiny-bert (BertForSequenceClassification, eval, float32, eager attention) "
            "on a padded batch; see scripts/gen_parity_fixtures.py",
            "lengths": lengths,
            "input_ids": input_ids.tolist(),
            "token_type_ids": token_type_ids.tolist(),
            "attention_mask": attention_mask.tolist(),
            "logits": dense(logits, 9),
            "last_hidden_state": dense(bert_out.last_hidden_state, 9),
            "pooler_output": dense(bert_out.pooler_output, 9),
        },
    )


def gen_minilm():
    from transformers import BertModel, BertTokenizerFast

    if not os.path.isfile(os.path.join(MINILM_DIR, "model.safetensors")):
        sys.exit(f"{MINILM_DIR} is missing: run scripts/fetch-minilm.sh first")
    # from_pretrained reads the folder's tokenizer.json (built from its vocab.txt); the ids
    # are checked against vocab.txt line numbers below.
    tokenizer = BertTokenizerFast.from_pretrained(MINILM_DIR)
    with open(os.path.join(MINILM_DIR, "vocab.txt"), encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    pairs = [
        ["How do I keep bread fresh?", "Wrap it in a cloth and store it at room temperature."],
        ["What is the capital of France?", "Paris."],
        ["Explain reward collapse.", "Unbelievably, the café's rewards converge!"],
    ]
    enc = tokenizer(
        [a for a, _ in pairs],
        [b for _, b in pairs],
        padding=True,
        return_tensors="pt",
    )
    assert enc["input_ids"].shape[1] <= 24, enc["input_ids"].shape
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in enc["input_ids"].tolist()]
    for row_tokens, row_ids in zip(tokens, enc["input_ids"].tolist()):
        assert [vocab[t] for t in row_tokens] == row_ids, row_tokens
        assert "[UNK]" not in row_tokens, row_tokens
    model = BertModel.from_pretrained(MINILM_DIR, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    write_json(
        os.path.join(PARITY_DIR, "minilm-hidden.json"),
        {
            "description": "all-MiniLM-L6-v2 BertModel last hidden state (eval, float32, 7 significant "
            "digits) for padded sentence pairs; see scripts/gen_parity_fixtures.py",
            "pairs": pairs,
            "tokens": tokens,
            "input_ids": enc["input_ids"].tolist(),
            "token_type_ids": enc["token_type_ids"].tolist(),
            "attention_mask": enc["attention_mask"].tolist(),
            "last_hidden_state": dense(hidden, 7),
        },
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["safetensors", "tiny", "minilm"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.only in (None, "safetensors"):
        gen_safetensors()
    if args.only in (None, "tiny"):
        gen_tiny()
    if args.only in (None, "minilm"):
        gen_minilm()


if __name__ == "__main__":
    main()
