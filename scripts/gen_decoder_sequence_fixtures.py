#!/usr/bin/env python3
"""Generate tests/fixtures/decoder_sequences/cases.json: a decoder reward model's
(prompt, completion) sequences over the tokenizer.json files of
tests/fixtures/tokenizer_json/ (made by scripts/gen_tokenizer_json_fixtures.py), from the
ids Hugging Face `tokenizers` gives.

The sequence (rcx's convention for decoders):
    encode(prompt).ids  (the file's post-processor: BOS where it adds one)
    + encode(completion, add_special_tokens=False).ids + [EOS]
Past max_length, the prompt's text ids and the completion's share what the special tokens
leave, longest first (as `tokenizers` cuts a pair); the prompt then loses its start and the
completion its end; the post-processor's tokens and the EOS are kept.

Styles: llama3 (TemplateProcessing adds <|begin_of_text|>), qwen2 (no BOS), llama2
(SentencePiece-style, <s> added).

cases.json: [{"tokenizer": NAME, "eos_id": N, "prompt": TEXT, "completion": TEXT,
"max_length": N or null, "ids": [...]}]

Usage: $PYTHON scripts/gen_decoder_sequence_fixtures.py   (PYTHON must have tokenizers)
"""

import json
import os

from tokenizers import Tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
SOURCE = os.path.join(ROOT, "tests", "fixtures", "tokenizer_json")
OUT = os.path.join(ROOT, "tests", "fixtures", "decoder_sequences")

STYLES = {"llama3": "<|end_of_text|>", "qwen2": "<|endoftext|>", "llama2": "</s>"}


def longest_first(n_prompt, n_completion, budget):
    """How many ids each text keeps: the shorter keeps all it has up to half the budget
    and the longer the rest (an odd budget's extra id goes to the longer, or to the
    completion when they are equal)."""
    if n_prompt + n_completion <= budget:
        return n_prompt, n_completion
    short = min(n_prompt, n_completion)
    keep_short = min(short, budget // 2)
    keep_long = budget - keep_short
    if n_prompt > n_completion:
        return keep_long, keep_short
    return keep_short, keep_long


def sequence(full_prompt, prompt, completion, eos, max_length):
    # The post-processor's ids around the prompt's text ids.
    start = next(i for i in range(len(full_prompt) - len(prompt) + 1)
                 if full_prompt[i:i + len(prompt)] == prompt)
    before, after = full_prompt[:start], full_prompt[start + len(prompt):]
    specials = len(before) + len(after) + 1
    if max_length is None:
        return full_prompt + completion + [eos]
    assert max_length >= specials
    keep_prompt, keep_completion = longest_first(len(prompt), len(completion),
                                                 max_length - specials)
    ids = (before + prompt[len(prompt) - keep_prompt:] + after
           + completion[:keep_completion] + [eos])
    assert len(ids) <= max_length
    return ids


def pairs():
    with open(os.path.join(ROOT, "data", "kjv-jargon", "eval.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:2]
    out = [(r["prompt"], r["completions"][0][:200]) for r in records]
    out += [
        # A short prompt, a long completion.
        ("Hi", "Le café est très bon, n'est-ce pas? Über den Wolken muß die Freiheit wohl "
               "grenzenlos sein. The year 2024 had 366 days."),
        # A chat-like prompt holding special tokens, a short completion.
        ("<|start_header_id|>user<|end_header_id|>\n\nWhat is 3.14159?<|eot_id|>"
         "<|im_start|>assistant\n", "Pi, roughly."),
        ("Москва — столица России.", "東京は日本の首都です。"),
        # Empty texts.
        ("", "Only a completion."),
        ("Only a prompt.", ""),
    ]
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for name, eos_token in STYLES.items():
        tokenizer = Tokenizer.from_file(os.path.join(SOURCE, f"{name}.json"))
        eos = tokenizer.token_to_id(eos_token)
        assert eos is not None, eos_token
        for prompt_text, completion_text in pairs():
            full_prompt = tokenizer.encode(prompt_text).ids
            prompt = tokenizer.encode(prompt_text, add_special_tokens=False).ids
            completion = tokenizer.encode(completion_text, add_special_tokens=False).ids
            total = len(full_prompt) + len(completion) + 1
            specials = total - len(prompt) - len(completion)
            lengths = [None, total, total - 1, total * 3 // 4, total // 2, total // 4,
                       specials + 3, specials + 1, specials]
            for max_length in sorted({n for n in lengths if n is None or n >= specials},
                                     key=lambda n: -1 if n is None else n):
                cases.append({
                    "tokenizer": name,
                    "eos_id": eos,
                    "prompt": prompt_text,
                    "completion": completion_text,
                    "max_length": max_length,
                    "ids": sequence(full_prompt, prompt, completion, eos, max_length),
                })
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False)
        f.write("\n")
    print(f"{len(cases)} cases in {OUT}")


if __name__ == "__main__":
    main()
