#!/usr/bin/env python3
"""Checks a model folder written by rcx (any architecture: BERT, DeBERTa-v2/v3, Llama,
Mistral, Qwen2) against transformers: loads it with AutoModelForSequenceClassification, builds
each (prompt, completion) sequence with the reference tokenizer library from the folder's own
tokenizer file, and compares the logits with those `rcx score` printed.

    rcx score --model DIR --data FILE.jsonl > SCORES.jsonl
    $PYTHON scripts/check_folder_in_transformers.py DIR FILE.jsonl SCORES.jsonl [--max-length N] [--tol 1e-4]

Sequences: encoders `[CLS] prompt [SEP] completion [SEP]` with their token types (vocab.txt through transformers'
BertTokenizerFast, spm.model through sentencepiece, tokenizer.json through tokenizers' pair
template); decoders encode(prompt) with the post-processor + encode(completion) without
special tokens + EOS (tokenizers). Sequences longer than --max-length (default: rcx.json's
max_length) are skipped, since rcx cuts them. Exits 1 when a logit differs by more than --tol.
Needs torch, transformers, tokenizers, sentencepiece (fixture tooling; rcx itself never does).
"""

import argparse
import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification


def encoder(folder):
    if os.path.exists(f"{folder}/vocab.txt"):
        from transformers import BertTokenizerFast
        tok = BertTokenizerFast(f"{folder}/vocab.txt")
        return lambda p, c: (tok(p, c)["input_ids"], tok(p, c)["token_type_ids"])
    if os.path.exists(f"{folder}/tokenizer.json"):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
        return lambda p, c: (tok.encode(p, c).ids, tok.encode(p, c).type_ids)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=f"{folder}/spm.model")
    cls, sep = sp.piece_to_id("[CLS]"), sp.piece_to_id("[SEP]")

    def pair(p, c):
        first, second = [cls] + sp.encode(p) + [sep], sp.encode(c) + [sep]
        return first + second, [0] * len(first) + [1] * len(second)

    return pair


def decoder(folder, config):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos

    def sequence(p, c):
        ids = tok.encode(p).ids + tok.encode(c, add_special_tokens=False).ids + [eos]
        return ids, [0] * len(ids)

    return sequence


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("data")
    ap.add_argument("scores")
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    config = AutoConfig.from_pretrained(args.folder)
    model = AutoModelForSequenceClassification.from_pretrained(args.folder).eval()
    is_decoder = config.model_type in ("llama", "mistral", "qwen2")
    sequence = decoder(args.folder, config) if is_decoder else encoder(args.folder)
    max_length = args.max_length
    if max_length is None:
        with open(f"{args.folder}/rcx.json") as f:
            max_length = json.load(f)["max_length"]
    records = [json.loads(line) for line in open(args.data) if line.strip()]
    got = {(s["prompt_index"], s["completion_index"]): s["logit"]
           for s in map(json.loads, open(args.scores))}
    worst, compared = 0.0, 0
    for p, record in enumerate(records):
        completions = record.get("completions") or [record["chosen"], record["rejected"]]
        for j, completion in enumerate(completions):
            ids, types = sequence(record["prompt"], completion)
            if len(ids) > max_length:
                continue
            # Token types only where the model has a table for them (BERT, DeBERTa-v2).
            extra = {}
            if getattr(config, "type_vocab_size", 0):
                extra["token_type_ids"] = torch.tensor([types])
            with torch.no_grad():
                logit = model(torch.tensor([ids]), **extra).logits[0, 0].item()
            worst = max(worst, abs(logit - got[(p, j)]))
            compared += 1
    print(f"{type(model).__name__}: {compared} logits compared, largest |transformers - rcx| = {worst:.3e}")
    sys.exit(0 if compared and worst <= args.tol else 1)


if __name__ == "__main__":
    main()
