"""The shipped byte-level BPE tokenizer of `model_name: llama-tiny` (data/llama-tiny.tokenizer.json),
trained on the shipped kjv-jargon training set with the `tokenizers` library: GPT-2's byte-level
pre-tokenizer and decoder, 8,000 ids, Llama 3's special tokens (<|begin_of_text|> 0,
<|end_of_text|> 1, <|pad|> 2) and its post-processor (BOS before every sequence).

Deterministic for a given `tokenizers` version (the training data in file order). rcx reads it
as it reads a Llama 3 folder's tokenizer.json. Run: /work/pyenv/bin/python scripts/gen_llama_tokenizer.py
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data/llama-tiny.tokenizer.json"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]


def lines():
    with open(ROOT / "data/kjv-jargon/train.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                yield record["prompt"]
                yield from record["completions"]


def main():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines(), trainer=trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tokenizer.save(str(OUT))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {tokenizer.get_vocab_size()} ids)")


if __name__ == "__main__":
    main()
