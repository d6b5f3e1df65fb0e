#!/usr/bin/env python3
"""Loads a checkpoint folder written by rcx (config.json + model.safetensors) with
transformers' BertForSequenceClassification and prints its logits on given inputs, to check
that rcx checkpoints load in transformers and score as `rcx score` does.

    $PYTHON scripts/check_checkpoint.py --model DIR --inputs FILE.json [--expect FILE.json] [--tol 1e-4]

FILE.json: {"input_ids": [[...]], "token_type_ids": [[...]], "attention_mask": [[...]]}
(one row per sequence, all rows of the same length; token_type_ids and attention_mask may be
omitted: zeros and ones). Prints {"logits": [[...], ...]} (one row of num_labels values per
sequence). With --expect FILE.json holding {"logits": ...} in the same layout (a flat list is
accepted for one label), exits 1 when any logit differs by more than --tol.

Loading is strict: missing or unexpected weights in model.safetensors are an error, since
transformers would otherwise initialise them at random without failing.
"""

import argparse
import json
import sys

import torch


def load_strict(folder):
    """BertForSequenceClassification from `folder`, in eval mode with eager attention; exits
    when a weight is missing, unexpected or of another shape than the config says."""
    from transformers import BertForSequenceClassification

    model, info = BertForSequenceClassification.from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager"
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        sys.exit(f"check_checkpoint: {folder}/model.safetensors does not match the config: {problems}")
    model.eval()
    return model


def logits_of(model, batch):
    """The model's logits on a batch {"input_ids", ["token_type_ids"], ["attention_mask"]}."""
    input_ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    token_type_ids = torch.tensor(batch.get("token_type_ids", torch.zeros_like(input_ids).tolist()), dtype=torch.long)
    attention_mask = torch.tensor(batch.get("attention_mask", torch.ones_like(input_ids).tolist()), dtype=torch.long)
    with torch.no_grad():
        return model(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
        ).logits


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder with config.json and model.safetensors")
    parser.add_argument("--inputs", required=True, help="JSON file of input_ids etc.")
    parser.add_argument("--expect", help="JSON file with the expected {\"logits\": ...}")
    parser.add_argument("--tol", type=float, default=1e-4, help="max absolute difference")
    args = parser.parse_args()

    model = load_strict(args.model)
    with open(args.inputs) as f:
        batch = json.load(f)
    logits = logits_of(model, batch)
    print(json.dumps({"logits": logits.tolist()}))

    if args.expect:
        with open(args.expect) as f:
            expected = torch.tensor(json.load(f)["logits"], dtype=torch.float32).reshape(logits.shape)
        diff = (logits - expected).abs().max().item()
        if diff > args.tol:
            sys.exit(f"check_checkpoint: max |logit difference| {diff:.3g} exceeds {args.tol:g}")
        print(f"check_checkpoint: max |logit difference| {diff:.3g} <= {args.tol:g}", file=sys.stderr)


if __name__ == "__main__":
    main()
