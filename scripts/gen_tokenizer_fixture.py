#!/usr/bin/env python3
"""Generate tests/fixtures/tokenizer/cases.json: expected ids of tricky texts from Hugging
Face BertTokenizerFast (the reference) with data/vocab.txt (bert-base-uncased).

Each single case: text, max_length, ids (no special tokens, untruncated), input_ids and
token_type_ids (with [CLS]/[SEP], truncated to max_length). Each pair case: a, b,
max_length, input_ids, token_type_ids ("longest_first" truncation).

Usage: $PYTHON scripts/gen_tokenizer_fixture.py   (PYTHON must have transformers)
"""

import json
import os

from transformers import BertTokenizerFast

ROOT = os.path.join(os.path.dirname(__file__), "..")
VOCAB = os.path.join(ROOT, "data", "vocab.txt")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "cases.json")

tok = BertTokenizerFast(VOCAB, do_lower_case=True)

LONG_WORD = "pneumonoultramicroscopicsilicovolcanoconiosis" * 3  # 135 chars
SINGLES = [
    "",
    " ",
    "   \t\n\r  ",
    "\u3000\u00a0\u2003",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "HELLO World hElLo",
    "Héllo naïve café résumé façade",
    "Crème brûlée à la française",
    "e\u0301 a\u0300 o\u0308 n\u0303",  # combining marks after base letters
    "\u0301\u0301abc",  # combining marks with no base
    "a\u0323\u0307 a\u0307\u0323 q\u0307\u0323",  # mark reordering
    "ḍ̇ ệ ǖ",
    "野口里佳 Noguchi Rika",
    "我爱北京天安门。",
    "中文，英文English混合",
    "\U00020000\U0002a6df\U0002b740 \uf900\ufa0e",  # CJK extensions and compatibility ideographs
    "日本語のテキストです。カタカナとひらがな",
    "東京タワーは高い",
    "ｶﾀｶﾅ ﾊﾝｶｸ",
    "한국어 텍스트입니다",
    "안녕하세요, 세계!",
    "😀 😃 😄 😁",
    "👨‍👩‍👧‍👦 family",
    "👍🏽 thumbs up with skin tone",
    "🏳️‍🌈 flag",
    "I ❤️ NY",
    "!!!???...,,,;;;:::",
    "--- ___ *** ### $$$ %%% ^^^ &&&",
    "(((nested))) [[brackets]] {{braces}} <<angles>>",
    "\"quoted\" 'single' `back` «guillemets» „German“ “curly” ‘curly’",
    "https://www.example.com/path/to/page?query=1&other=two#frag",
    "http://例え.jp/パス",
    "user.name+tag@example.co.uk",
    "1,234,567.89 1.234.567,89 1 234 567",
    "3.14159 2e-10 -42 +7 0x1F 1/2 50%",
    "$100 €200 £300 ¥400 ₹500 ₿0.1",
    "2023-05-28T12:34:56Z",
    "phone: +1 (555) 123-4567",
    LONG_WORD,
    "a" * 100,
    "a" * 101,
    "é" * 100,
    "é" * 101,
    "short " + "x" * 150 + " after",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "tab\tseparated\tvalues\nnew line\r\ncarriage",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "soft\u00adhyphen",
    "nul\x00char",
    "\x00\x00\x00",
    "replacement\ufffdchar \ufffd",
    "bell\x07 escape\x1b[0m delete\x7f",
    "unit\x1fsep\x1crecord",
    "vertical\x0btab form\x0cfeed next\x85line",
    "line\u2028sep para\u2029sep",
    "rtl\u200fmark ltr\u200emark \u202aembed\u202c",
    "Ελληνικά γράμματα: Αθήνα, ΟΔΟΣ",
    "ΣΊΣΥΦΟΣ ὈΔΥΣΣΕΎΣ",
    "Русский текст: Москва, ЁЛКА й",
    "Українська: Київ, ґанок, їжак",
    "العربية: مرحبا بالعالم، كيف حالك؟",
    "مُحَمَّد الْقُرْآن",
    "עברית: שלום עולם",
    "בְּרֵאשִׁית",
    "हिन्दी: नमस्ते दुनिया।",
    "क़िला ज़मीन",
    "ภาษาไทย: สวัสดีครับ",
    "Tiếng Việt: Xin chào thế giới",
    "ＦＵＬＬ－ＷＩＤＴＨ　ｌｅｔｔｅｒｓ　１２３！",
    "İstanbul ıi İI",
    "Straße STRASSE ß ẞ",
    "ﬁnance ﬂow ﬀ ﬃ ﬄ ﬅ ﬆ",
    "Å Ångström Ω Ohm K Kelvin",
    "½ ¼ ² ³ ⁴ ₁ ™ ℃ №",
    "Ⅻ ⅻ ① ⑳ ㊙",
    "math: ∑ ∫ √ ∞ ≠ ≤ ≥ ± × ÷",
    "arrows → ← ↑ ↓ ⇒",
    "bullets • ◦ ▪ ★ ☆ ♠ ♣",
    "[CLS] [SEP] [PAD] [UNK] [MASK] inline specials",
    "abc[MASK]def[SEP]",
    "[cls] [mask] lower-case lookalikes",
    "[[SEP]] [unused1] [UNK",
    "don't won't it's y'all rock'n'roll",
    "U.S.A. e.g. i.e. etc.",
    "C++ C# F# .NET node.js",
    "snake_case camelCase kebab-case SCREAMING_CASE",
    "#hashtag @mention",
    "<html><body>tags</body></html>",
    "   leading and trailing spaces   ",
    "multiple     internal     spaces",
    "a",
    "Z",
    ".",
    "ǅungla ǈ ǋ",
    "Ǆ ǉ Ǌ",
    "\u1e9e\u0130\u03a3",
    "a\u0345\u0334b",
    "\u0f73\u0f75\u0f81 tibetan",
    "각 jamo",
    "\U0001d400\U0001d41a math bold",
    "\U0001d15e\U0001d165 music",
    "unassigned \u0378 \U000e0001 private \ue000 \U000f0000",
    "tag\U000e0041\U000e0042 chars",
    "variation\ufe0f selector\ufe0e",
    "emoji keycap 1️⃣ #️⃣",
]

PAIRS = [
    ("", ""),
    ("", "second only"),
    ("first only", ""),
    ("How are you?", "I am fine, thank you."),
    ("Héllo", "wörld"),
    ("野口里佳", "Noguchi Rika"),
    ("[SEP] inside", "and [CLS] here"),
]
LONG_A = "the first text is quite a bit longer than the second one, with many words in it"
LONG_B = "short second"
BOTH_LONG_A = "one two three four five six seven eight nine ten eleven twelve"
BOTH_LONG_B = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"
EQUAL_A = "a b c d e f g h"
EQUAL_B = "i j k l m n o p"

# (a, b, max_length): truncation at many lengths, very small ones included.
PAIR_CASES = [(a, b, 512) for a, b in PAIRS]
for ml in (1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 20):
    PAIR_CASES.append((LONG_A, LONG_B, ml))
for ml in (3, 4, 5, 9, 16):
    PAIR_CASES.append((LONG_B, LONG_A, ml))
for ml in (3, 4, 5, 6, 11, 12, 25):
    PAIR_CASES.append((BOTH_LONG_A, BOTH_LONG_B, ml))
for ml in (4, 5, 9, 10):
    PAIR_CASES.append((EQUAL_A, EQUAL_B, ml))
PAIR_CASES += [
    ("", LONG_A, 5),
    (LONG_A, "", 5),
    (LONG_WORD + " " + LONG_WORD, "Straße İstanbul 🤗", 6),
    ("日本語のテキストです", "한국어 텍스트입니다", 7),
]

# Singles at several max_lengths (tiny ones included).
SINGLE_CASES = [(s, 512) for s in SINGLES]
SINGLE_CASES += [(LONG_A, ml) for ml in (1, 2, 3, 4, 10)]
SINGLE_CASES += [("我爱北京天安门。", 5), ("", 2), ("", 3)]


def main():
    singles = []
    for text, ml in SINGLE_CASES:
        enc = tok(text, truncation=True, max_length=ml)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        singles.append(
            {
                "text": text,
                "max_length": ml,
                "ids": ids,
                "input_ids": enc["input_ids"],
                "token_type_ids": enc["token_type_ids"],
            }
        )
    pairs = []
    for a, b, ml in PAIR_CASES:
        # A batch of one: the single-text call would treat an empty b as no pair at all
        # (a Python truthiness test in transformers); the `tokenizers` backend, the
        # reference, keeps it as an empty second text.
        batch = tok([a], [b], truncation="longest_first", max_length=ml)
        enc = {k: v[0] for k, v in batch.items()}
        pairs.append(
            {
                "a": a,
                "b": b,
                "max_length": ml,
                "input_ids": enc["input_ids"],
                "token_type_ids": enc["token_type_ids"],
            }
        )
    with open(OUT + ".tmp", "w", encoding="ascii") as f:
        json.dump({"singles": singles, "pairs": pairs}, f, ensure_ascii=True, indent=0)
        f.write("\n")
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {OUT}: {len(singles)} singles, {len(pairs)} pairs")


if __name__ == "__main__":
    main()
