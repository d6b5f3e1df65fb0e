#!/usr/bin/env python3
"""Generate tests/fixtures/tokenizer_json/: small BPE tokenizer.json files in the styles of
the decoder LLM families, trained here offline with Hugging Face `tokenizers`, and the ids
that `Tokenizer.from_file(FILE).encode(TEXT).ids` gives for a few hundred varied texts.

Styles (each a tokenizer.json laid out as the family's own):
  gpt2         ByteLevel pre-tokenizer with GPT-2's regex, ByteLevel post-processor,
               merges in the legacy "a b" string form
  llama3       Split with Llama 3's regex + ByteLevel(use_regex=false), ignore_merges,
               Sequence[ByteLevel, TemplateProcessing(<|begin_of_text|> $A)], special tokens
  llama3_left  llama3 with the file's own truncation (8 ids, cut from the left)
  qwen2        NFC normalizer, Split with Qwen2's regex + ByteLevel, ByteLevel
               post-processor, <|im_start|>-style special tokens and a normalized added token
  llama2       SentencePiece-style BPE: Prepend("▁") + Replace(" ", "▁") normalizers,
               byte_fallback with <0x00>..<0xFF>, fuse_unk, TemplateProcessing(<s> $A)
  mistral      llama2's model with the newer layout: no normalizer, Metaspace(prepend_scheme
               first, split false), an lstrip/rstrip added token and a single_word one
  gpt2_prefix  gpt2 with add_prefix_space, padded to a multiple of 8 (the file's padding)
  sp_kitchen   llama2's model under the other supported pieces: Strip, NFD, Lowercase and a
               Replace regex; Split by string and regex with the Removed, MergedWithPrevious
               and Contiguous behaviors and invert, Digits, Metaspace(always, split), a
               <s> $A </s> template and fixed left padding
  bytelevel_norm  gpt2's model with the ByteLevel normalizer, a Split MergedWithNext on the
               byte-level space and Digits (not individual)

cases.json: [{"tokenizer": NAME, "text": TEXT, "max_length": N or null, "ids": [...]}];
max_length N means `enable_truncation(N)` before encoding (what `rcx tokenize
--max-length N` does).

Usage: $PYTHON scripts/gen_tokenizer_json_fixtures.py   (PYTHON must have tokenizers)
"""

import json
import os
import random

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer_json")

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Training text: the shipped prompts and completions, plus a little of several scripts so
# that merges exist beyond ASCII; rare chars stay out (byte fallback and unk are exercised).
def corpus():
    lines = []
    for name in sorted(os.listdir(os.path.join(ROOT, "data", "kjv-jargon"))):
        with open(os.path.join(ROOT, "data", "kjv-jargon", name), encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                lines.append(record["prompt"])
                lines.extend(record["completions"])
    lines += [
        "Le café est très bon, n'est-ce pas? Déjà vu à l'école.",
        "Über den Wolken muß die Freiheit wohl grenzenlos sein.",
        "Москва — столица России. Привет, мир!",
        "東京は日本の首都です。中文也可以。",
        "The year 2024 had 366 days; 3.14159 is pi. I'm sure you'll see we've done it.",
        "def main():\n    return 0\n\n\tif x == 1:\n\t\tprint('hi')\r\n",
    ] * 20
    return lines


def write(tokenizer, name):
    path = os.path.join(OUT, name + ".json")
    tokenizer.save(path)
    return path


def edit(path, change):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    change(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)


def byte_level(name, split, normalizer, specials, vocab_size, ignore_merges, template):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if template is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    else:
        bos = template
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A",
                    pair=f"{bos} $A {bos} $B:1",
                    special_tokens=[(bos, tok.token_to_id(bos))],
                ),
            ]
        )
    return write(tok, name)


def sentencepiece_bpe(name):
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
        limit_alphabet=120,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    path = write(tok, name)

    # As in Llama 2's file: the <0xNN> pieces are model vocabulary, not added tokens.
    def model_bytes_only(data):
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in byte_tokens]

    edit(path, model_bytes_only)
    return path


def main():
    os.makedirs(OUT, exist_ok=True)
    for stale in os.listdir(OUT):
        os.remove(os.path.join(OUT, stale))

    llama3_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>"]
    paths = {
        "gpt2": byte_level("gpt2", None, None, ["<|endoftext|>"], 700, False, None),
        "llama3": byte_level("llama3", LLAMA3_REGEX, None, llama3_specials, 900, True,
                             "<|begin_of_text|>"),
        "qwen2": byte_level("qwen2", QWEN2_REGEX, normalizers.NFC(),
                            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 800, False, None),
        "llama2": sentencepiece_bpe("llama2"),
    }

    # GPT-2's files keep merges as "a b" strings.
    def legacy_merges(data):
        data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]

    edit(paths["gpt2"], legacy_merges)

    # A non-special added token matched in normalized text (Qwen2 style normalizer NFC).
    qwen = Tokenizer.from_file(paths["qwen2"])
    qwen.add_tokens([AddedToken("café", normalized=True, special=False)])
    qwen.save(paths["qwen2"])

    # The file's own truncation, cutting from the left.
    paths["llama3_left"] = os.path.join(OUT, "llama3_left.json")
    left = Tokenizer.from_file(paths["llama3"])
    left.enable_truncation(8, direction="left")
    left.save(paths["llama3_left"])

    # Mistral / newer Llama 2 layout: Metaspace pre-tokenizer instead of the normalizers.
    paths["mistral"] = os.path.join(OUT, "mistral.json")
    mistral = Tokenizer.from_file(paths["llama2"])
    mistral.normalizer = None
    mistral.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    mistral.add_tokens([AddedToken("[INST]", lstrip=True, rstrip=True, normalized=False)])
    mistral.add_tokens([AddedToken("wordy", single_word=True, normalized=False)])
    mistral.save(paths["mistral"])

    paths["gpt2_prefix"] = os.path.join(OUT, "gpt2_prefix.json")
    prefix = Tokenizer.from_file(paths["gpt2"])
    prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    prefix.enable_padding(pad_id=0, pad_token="<|endoftext|>", pad_to_multiple_of=8)
    prefix.save(paths["gpt2_prefix"])

    paths["sp_kitchen"] = os.path.join(OUT, "sp_kitchen.json")
    kitchen = Tokenizer.from_file(paths["llama2"])
    kitchen.normalizer = normalizers.Sequence(
        [normalizers.Strip(left=True, right=True), normalizers.NFD(), normalizers.Lowercase(),
         normalizers.Replace(Regex(r"\s+"), " ")]
    )
    kitchen.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("-", behavior="merged_with_previous"),
            pre_tokenizers.Split(Regex(r"[,;]"), behavior="removed"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r"[a-z]+"), behavior="contiguous", invert=True),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    kitchen.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1",
        special_tokens=[("<s>", kitchen.token_to_id("<s>")), ("</s>", kitchen.token_to_id("</s>"))],
    )
    kitchen.enable_padding(direction="left", pad_id=2, pad_token="</s>", length=24)
    kitchen.save(paths["sp_kitchen"])

    paths["bytelevel_norm"] = os.path.join(OUT, "bytelevel_norm.json")
    norm = Tokenizer.from_file(paths["gpt2"])
    norm.normalizer = normalizers.ByteLevel()
    norm.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("Ġ", behavior="merged_with_next"),
         pre_tokenizers.Digits(individual_digits=False)]
    )
    norm.post_processor = None
    norm.save(paths["bytelevel_norm"])

    texts = make_texts()
    cases = []
    for name in sorted(paths):
        tok = Tokenizer.from_file(paths[name])
        for i, text in enumerate(texts):
            cases.append({"tokenizer": name, "text": text, "max_length": None,
                          "ids": tok.encode(text).ids})
            if i % 7 == 0:
                for max_length in (2, 5):
                    truncated = Tokenizer.from_file(paths[name])
                    truncated.enable_truncation(max_length)
                    cases.append({"tokenizer": name, "text": text, "max_length": max_length,
                                  "ids": truncated.encode(text).ids})
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=0)
    print(f"{len(cases)} cases, {len(texts)} texts, tokenizers: {', '.join(sorted(paths))}")


def make_texts():
    fixed = [
        "", " ", "  ", "\n", "\t", "\r\n", "a", "Hello world", " Hello world", "Hello  world ",
        "hello\n\nworld\n", "  leading and trailing  ", "tabs\tand\ttabs", "x \n y",
        "I'm sure you'll see we've done it; they'd say it's fine.", "I'M YOU'LL WE'VE",
        "don't DON'T Don'T", "'s 's 'S", "ſ'ſ 's",
        "1234567890", "3.14159", "2024-12-03 13:45:00", "١٢٣ ٤٥٦", "①②③", "x²+y³",
        "Le café est très bon", "café", "cafe\u0301", "e\u0301\u0301", "\u0301leading mark",
        "Ångström Å Å", "ﬁ ligature", "Über muß", "Привет, мир!", "東京は日本の首都です。",
        "中文也可以", "한국어 텍스트", "עברית", "العربية", "हिन्दी", "ภาษาไทย",
        "emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷", "🤖🤖🤖", "⚡️", "\u200b zero\u200bwidth", "\u00a0nbsp\u00a0",
        "\u3000ideographic\u3000space", "\u2028line\u2029para", "\x00nul\x01ctrl\x7f",
        "\ufffd replacement", "\ufeffbom", "<0x41> <0xFF>", "<unk>", "<s>", "</s>",
        "<s>Hello</s>", "text<s>text", "<|endoftext|>", "a<|endoftext|>b",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
        "<|unknown|>", "<|eot_id", "[INST] hello [/INST]", "a   [INST]   b", "[INST][INST]",
        "wordy", "a wordy b", "unwordy wordyness", "wordy.", "▁already▁spaced", "▁",
        "def main():\n    return 0\n", "\tif x == 1:\n\t\tprint('hi')\r\n", "{\"key\": [1, 2]}",
        "https://example.com/path?q=1&r=2", "email@example.com", "C++ & C# | F#",
        "!!!???...", "---", "$$$ 100%", "a" * 300, "ab " * 100, " " * 50, "\n" * 20,
        "mixed 123abc abc123 1a2b3c", "CamelCaseWord snake_case_word kebab-case-word",
    ]
    rng = random.Random(12)
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n\r.,;:!?'\"()[]{}<>|-_=+*/\\@#$%^&~`")
        + list("éèêëàâäôöûüçñÅßøæœЖжЯя中文日本語한국ąęłżźćńśΩλ€£¥©®™°±×÷")
        + ["😀", "🎉", "\u0301", "\u0308", "\u00a0", "\u2003", "\u200d", "<s>", "</s>",
           "<|endoftext|>", "<|eot_id|>", "<|im_end|>", "[INST]", "wordy", "▁", "'s", "'LL"]
    )
    words = []
    for line in corpus()[:400]:
        words.extend(line.split())
    generated = []
    for _ in range(200):
        if rng.random() < 0.5:
            n = rng.randint(1, 40)
            generated.append("".join(rng.choice(alphabet) for _ in range(n)))
        else:
            n = rng.randint(1, 25)
            parts = []
            for _ in range(n):
                parts.append(rng.choice(words) if rng.random() < 0.8 else rng.choice(alphabet))
                parts.append(rng.choice([" ", " ", " ", "  ", "\n", "\t", "", " \n "]))
            generated.append("".join(parts))
    return fixed + generated


if __name__ == "__main__":
    main()
