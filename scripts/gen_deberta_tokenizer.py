"""The shipped SentencePiece Unigram tokenizer of `model_name: deberta-v3-tiny`
(data/deberta-v3-tiny.spm.model), trained on the shipped kjv-jargon training set with
DeBERTa-v3's special pieces and ids: [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3, [MASK] 4.

Deterministic (one thread, a fixed seed, the file's lines in order); rcx reads the file as it
reads a DeBERTa-v3 folder's spm.model. Run: /work/pyenv/bin/python scripts/gen_deberta_tokenizer.py
(needs `pip install sentencepiece`).
"""

import io
import json
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data/deberta-v3-tiny.spm.model"
VOCAB_SIZE = 8000


def lines():
    with open(ROOT / "data/kjv-jargon/train.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                yield record["prompt"]
                yield from record["completions"]


def main():
    spm.set_random_generator_seed(1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_writer=model,
        model_type="unigram",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        pad_id=0, pad_piece="[PAD]",
        bos_id=1, bos_piece="[CLS]",
        eos_id=2, eos_piece="[SEP]",
        unk_id=3, unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"],
    )
    OUT.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {sp.get_piece_size()} pieces)")


if __name__ == "__main__":
    main()
