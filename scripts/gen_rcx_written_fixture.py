#!/usr/bin/env python3
"""Checks that transformers loads a model folder WRITTEN BY rcx, and records what it computes,
for tests/parity.rs::transformers_loads_an_rcx_written_folder_with_rcx_logits. Needs torch
and transformers (not the CI machine: the test compares against the committed result).

    cargo test --release --test parity rcx_written      # writes the folder (and fails
                                                        # while the fixture is missing/stale)
    $PYTHON scripts/gen_rcx_written_fixture.py target/tmp/parity-tests/rcx-written

The folder is loaded as scripts/check_checkpoint.py loads one (BertForSequenceClassification,
strictly: any missing, unexpected or reshaped tensor is an error); a config that does not
give one regression output is an error too. Then, in eval mode and float32, the logits of a
fixed padded batch.

tests/fixtures/parity/rcx-written.json:
    {"sha256": {FILE: hex digest} for config.json, model.safetensors, vocab.txt (the files
               transformers and rcx read; rcx.json records the build and is left out),
     "input_ids", "token_type_ids", "attention_mask": [batch][seq] ints (padding at the end:
               id 0, type 0, mask 0),
     "logits": {"shape": [batch, 1], "data": [... float32, 9 significant digits (exact)]},
     "transformers": version, "torch": version, "description": text}
"""

import hashlib
import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_checkpoint import load_strict, logits_of  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "parity", "rcx-written.json")
HASHED = ["config.json", "model.safetensors", "vocab.txt"]
LENGTHS = [13, 9, 4]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def batch(vocab_size, max_positions):
    """[CLS] a... [SEP] b... [SEP] over ids 5.. (no special token inside), padded with 0."""
    width = max(LENGTHS)
    assert width <= max_positions
    ids, types, mask = [], [], []
    for b, length in enumerate(LENGTHS):
        half = length // 2
        row = [2] + [5 + (7 * j + 11 * b) % (vocab_size - 5) for j in range(length - 3)]
        row = row[:half] + [3] + row[half:] + [3]
        ids.append(row + [0] * (width - length))
        types.append([0] * (half + 1) + [1] * (length - half - 1) + [0] * (width - length))
        mask.append([1] * length + [0] * (width - length))
    return ids, types, mask


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    folder = sys.argv[1]
    model = load_strict(folder)
    cfg = model.config
    if cfg.num_labels != 1 or cfg.problem_type != "regression":
        sys.exit(f"{folder}/config.json: not one regression output: {cfg}")
    if next(model.parameters()).dtype != torch.float32:
        sys.exit(f"{folder}: loaded as {next(model.parameters()).dtype}, not float32")
    ids, types, mask = batch(cfg.vocab_size, cfg.max_position_embeddings)
    logits = logits_of(model, {"input_ids": ids, "token_type_ids": types, "attention_mask": mask})

    fixture = {
        "description": "transformers' BertForSequenceClassification on a folder rcx wrote "
        "(tests/parity.rs::rcx_written_folder), loaded strictly; eval mode, float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sha256": {name: sha256(os.path.join(folder, name)) for name in HASHED},
        "input_ids": ids,
        "token_type_ids": types,
        "attention_mask": mask,
        "logits": {
            "shape": list(logits.shape),
            "data": [float(f"{v:.9g}") for v in logits.flatten().tolist()],
        },
    }
    with open(OUT, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: logits {fixture['logits']['data']}")


if __name__ == "__main__":
    main()
