#!/usr/bin/env python3
"""Generate tests/fixtures/unigram/: two small SentencePiece unigram models trained offline
on the shipped data, their tokenizer.json conversions, and the ids of a few hundred varied
texts from both references (sentencepiece on spm.model, tokenizers on tokenizer.json).

- deberta/: DeBERTa-v3's special pieces ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3) and its
  normalization (nmt_nfkc: the precompiled character map), converted to tokenizer.json by
  transformers' DebertaV2Converter as it converts a DeBERTa-v3 spm.model.
- ties/: a hand-made model whose segmentations tie exactly, to hold the tie-breaking.
- bytes/: byte fallback, user-defined pieces, no character map (identity), no dummy prefix. transformers'
  converter drops byte fallback, so its tokenizer.json gets "byte_fallback": true written
  back to test that path of the tokenizers model too.

cases.json per model: {"texts": [{"text", "spm": sentencepiece ids of the stretches between
special tokens, with the special tokens' ids (see spm_encode), "json": tokenizers ids (no
template)}], "pairs": [{"a", "b", "max_length", "input_ids", "token_type_ids"}]}
(pairs from tokenizers with the template and "longest_first" truncation; max_length null:
no truncation). A text on which the two references differ is kept: each file is exact
against its own reference, and the test lists where they part.

Usage: $PYTHON scripts/gen_unigram_fixtures.py  (PYTHON with sentencepiece, tokenizers and
transformers; nothing is downloaded)
"""

import io
import json
import os
import random
import warnings
from types import SimpleNamespace

import sentencepiece as spm
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import DebertaV2Converter, import_protobuf

sentencepiece_model_pb2 = import_protobuf()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "unigram")
TRAIN = os.path.join(ROOT, "data", "kjv-jargon", "train.jsonl")

MULTILINGUAL = [
    "Le café est très chaud aujourd'hui, n'est-ce pas ?",
    "Übermäßig große Straßen führen nach München.",
    "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
    "Съешь же ещё этих мягких французских булок да выпей чаю.",
    "我爱北京天安门，天安门上太阳升。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장도 조금 있습니다.",
    "Numbers 0123456789 and 3.14159, 2,718 and 1e-9.",
]


def corpus_lines():
    lines = []
    with open(TRAIN, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 400:
                break
            record = json.loads(line)
            lines.append(record["prompt"])
            lines.extend(record["completions"][:2])
    lines.extend(MULTILINGUAL * 20)
    return lines


def train(prefix, **options):
    spm.set_random_generator_seed(1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="unigram",
        num_threads=1,
        minloglevel=2,
        **options,
    )
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix, "wb") as f:
        f.write(model.getvalue())


def handmade_texts():
    return [
        "",
        " ",
        "   \t\n  ",
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "In the beginning God created the heaven and the earth.",
        "hacker jargon: frob, grok, kludge, foobar",
        "  leading and trailing spaces  ",
        "many     inner      spaces",
        "tabs\tand\nnewlines\r\nmixed",
        "\u3000ideographic\u3000space\u3000",
        "no\u00a0break\u00a0space",
        "zero\u200bwidth\u200bspace",
        "line\u2028separator",
        "ﬁne ﬂower ﬀ",
        "①②③ ⑴ ⒈",
        "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
        "ﾊﾝｶｸｶﾀｶﾅ",
        "㍿ ㌔ ㎏ ㎞ ℃ ℉",
        "x² y³ H₂O ½ ¼ ¾",
        "ℌ ℍ ℕ ℙ 𝐀𝐁𝐂 𝔸",
        "Å Ω K ñ n\u0303 e\u0301",
        "café cafe\u0301",
        "\u0301\u0301 lone combining",
        "ǅ ǆ Ǆ ĳ Ĳ",
        "Crème brûlée à la française",
        "Le café est très chaud",
        "Übermäßig große Straßen",
        "Η γρήγορη αλεπού",
        "Съешь же ещё этих булок",
        "我爱北京天安门",
        "日本語のテキスト",
        "한국어 문장",
        "ᏣᎳᎩ Cherokee ᏗᏁᎶ",
        "ᚠᚢᚦᚨᚱᚲ runes",
        "𐌰𐌱𐌲 gothic",
        "emoji 😀🎉👍🏽 👨‍👩‍👧",
        "🇫🇷 🇯🇵 flags",
        "0123456789",
        "3.14159 2,718 1e-9 -42 +7",
        "1234567890123456789012345678901234567890",
        "mixed123digits456and789letters",
        "[CLS] literal specials [SEP] in text [UNK] [PAD] [MASK]",
        "[CLS]glued[SEP]",
        "▁ literal lower one eighth block ▁▁",
        "▁leading block",
        "<0x41> looks like a byte piece",
        "a",
        "I",
        "line<br>break @@ Selah<br><br>@@@ Selahs <b r>",
        "..",
        "!!!???",
        "\"quoted\" 'single' `back`",
        "(parens) [brackets] {braces} <angles>",
        "email@example.com https://example.org/path?q=1&r=2",
        "C++ and C# and F#",
        "snake_case camelCase kebab-case",
        "\x00\x01\x02 control chars \x7f",
        "\ufeffbyte order mark",
        "soft\u00adhyphen",
        "right\u200fto\u200eleft marks",
        "\ufffd replacement char",
        "tab\u000bvertical\u000cform feed",
        "a" * 300,
        "the " * 50,
        "x" + " " * 40 + "y",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "Ⅻ Ⅳ ⅷ roman numerals",
        "ﹰﹱ Arabic presentation ﻼ",
        "العربية نص",
        "עברית טקסט",
        "हिन्दी पाठ",
        "ภาษาไทย",
        "‘curly’ “quotes” – en — em … ellipsis",
        "¿Qué? ¡Sí!",
        "µ µ Å Å ſ ß",
        "ﬃ ﬄ ﬅ ﬆ",
        "\u2126 \u212b \u2160",
        "ｶﾞ ｷﾞ ﾊﾟ",
        "ｶ\uff9e",
        "g\u0308 q\u0307\u0323 a\u0323\u0307",
        "\u1100\u1161\u11a8 jamo",
    ]


def random_texts(rng, count):
    pools = [
        "abcdefghijklmnopqrstuvwxyz",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        "          \t\n",
        ".,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
        "éèêëàâäôöûüçñßøå",
        "αβγδεζηθλμπσω",
        "абвгдежзийклмн",
        "我爱北京天安门太阳升日本語",
        "ﬁﬂ①②ｆｕｌ㍿½²ℌ\u3000\u00a0\u200b",
        "\u0301\u0308\u0323",
        "ᏣᎳᎩ😀🎉ᚠ𐌰",
        "▁",
    ]
    words = []
    with open(TRAIN, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 60:
                break
            words.extend(json.loads(line)["completions"][0].split())
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.5:
                parts.append(rng.choice(words))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
            parts.append(rng.choice([" ", " ", " ", "", "  ", "\t", "\n"]))
        texts.append("".join(parts))
    return texts


def code_point_texts(rng, count):
    """Short strings of code points drawn from all of Unicode, weighted toward what
    normalization and grapheme clusters treat specially (marks, joiners, Hangul jamo,
    regional indicators, halfwidth kana, compatibility chars, odd spaces)."""
    special = [0x300, 0x301, 0x308, 0x323, 0x200D, 0xFE0F, 0xFF9E, 0x93F, 0xE31, 0x1F3FB, 0x20E3]
    special += [0x903, 0xBBE, 0xD57, 0x1100, 0x1161, 0x11A8, 0x1F1E6, 0x1F1E8, 0xAC00, 0x94D, 0x915]
    compat = [0xFF76, 0xFF8A, 0x3000, 0xA0, 0x2028, 0x85, 0x1F600, 0x1F468, 0x2764, 0xFB01, 0x2460]
    compat += [0xFF41, 0x3392, 0x200E, 0x600]

    def one():
        r = rng.random()
        if r < 0.3:
            return chr(rng.randint(0x20, 0x7E))
        if r < 0.5:
            return chr(rng.choice(special) + rng.randint(0, 2))
        if r < 0.8:
            while True:
                c = rng.randint(0xA0, 0x2FFFF)
                if not 0xD800 <= c <= 0xDFFF:
                    return chr(c)
        return chr(rng.choice(compat))

    return ["".join(one() for _ in range(rng.randint(1, 12))) for _ in range(count)]


def pair_cases(rng, texts):
    pairs = []
    for max_length in [None, None, None, 8, 16, 33]:
        for _ in range(6):
            pairs.append((rng.choice(texts), rng.choice(texts), max_length))
    pairs.append(("", "", None))
    pairs.append(("[CLS] a", "b [SEP]", None))
    return pairs


def spm_specials(sp):
    """The tokens the spm.model path splits out of the raw text, as transformers' slow
    DeBERTa-v2 tokenizer does: the control and unknown pieces, and [MASK] after the pieces
    when the model lacks it. Longest first."""
    specials = [
        (sp.id_to_piece(i), i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)
    ]
    if sp.piece_to_id("[MASK]") == sp.unk_id() and sp.id_to_piece(sp.unk_id()) != "[MASK]":
        specials.append(("[MASK]", sp.get_piece_size()))
    return sorted(specials, key=lambda s: -len(s[0]))


def spm_encode(sp, specials, text):
    """sentencepiece's ids of each stretch between special tokens (leftmost, longest)."""
    ids, start, i = [], 0, 0
    while i < len(text):
        match = next((s for s in specials if text.startswith(s[0], i)), None)
        if match is None:
            i += 1
            continue
        ids += sp.encode(text[start:i]) + [match[1]]
        i += len(match[0])
        start = i
    return ids + sp.encode(text[start:])


def write_cases(folder, texts, pairs):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "spm.model"))
    specials = spm_specials(sp)
    fast = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    cases = []
    for text in texts:
        cases.append(
            {
                "text": text,
                "spm": spm_encode(sp, specials, text),
                "json": fast.encode(text, add_special_tokens=False).ids,
            }
        )
    pair_out = []
    for a, b, max_length in pairs:
        if max_length is None:
            fast.no_truncation()
        else:
            fast.enable_truncation(max_length, strategy="longest_first")
        enc = fast.encode(a, b)
        pair_out.append(
            {
                "a": a,
                "b": b,
                "max_length": max_length,
                "input_ids": enc.ids,
                "token_type_ids": enc.type_ids,
            }
        )
    fast.no_truncation()
    with open(os.path.join(folder, "cases.json"), "w", encoding="utf-8") as f:
        # One case a line: readable diffs when a reference changes.
        lines = lambda items: ",\n".join(json.dumps(item, ensure_ascii=True) for item in items)
        f.write('{"texts": [\n' + lines(cases) + '\n],\n"pairs": [\n' + lines(pair_out) + "\n]}\n")
    differ = sum(c["spm"] != c["json"] for c in cases)
    print(f"{folder}: {len(cases)} texts ({differ} where the references differ), {len(pair_out)} pairs")


def convert(folder):
    """tokenizer.json as transformers' DebertaV2Converter writes it for a DeBERTa-v3
    spm.model (the conversion transformers 4 ran on load; the Precompiled normalizer), with
    [UNK] and [MASK] added as DebertaV2TokenizerFast adds its special tokens."""
    proto = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(folder, "spm.model"), "rb") as f:
        proto.ParseFromString(f.read())
    ids = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    original = SimpleNamespace(
        vocab_file=os.path.join(folder, "spm.model"),
        do_lower_case=False,
        split_by_punct=False,
        add_prefix_space=True,
        convert_tokens_to_ids=ids.__getitem__,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter's note that it drops byte fallback
        tokenizer = DebertaV2Converter(original).converted()
    tokenizer.add_special_tokens(["[UNK]", "[MASK]"])
    return json.loads(tokenizer.to_str())


def write_ties_model(folder):
    """A hand-made model whose segmentations tie exactly ("▁ab" = "▁a" + "b" = "▁" + "ab"
    ...): the tie-breaking rule of each reference decides the ids."""
    proto = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(OUT, "deberta", "spm.model"), "rb") as f:
        proto.ParseFromString(f.read())
    del proto.pieces[:]
    pieces = [("[PAD]", 0.0, 3), ("[CLS]", 0.0, 3), ("[SEP]", 0.0, 3), ("[UNK]", 0.0, 2)]
    pieces += [("▁", -1.0, 1), ("a", -1.0, 1), ("b", -1.0, 1), ("▁a", -1.0, 1), ("ab", -1.0, 1)]
    pieces += [("▁ab", -2.0, 1), ("ba", -1.0, 1), ("aba", -2.0, 1), ("bab", -2.0, 1), ("c", -0.5, 1)]
    pieces += [("cc", -1.0, 1), ("ccc", -1.5, 1), ("▁c", -0.5, 1)]
    for text, score, kind in pieces:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kind
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.precompiled_charsmap = b""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spm.model"), "wb") as f:
        f.write(proto.SerializeToString())
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(convert(folder), f, ensure_ascii=False, indent=2)
    texts = ["ab", "abab", "ab ab", "aab", "abb", "ba", "baba", "ababab", "cccc", "ccccc", "c cc ccc", "abc", "x ab"]
    write_cases(folder, texts, [("ab", "abab", None)])


def main():
    rng = random.Random(13)
    texts = handmade_texts() + random_texts(rng, 260)
    pairs = pair_cases(rng, texts)
    code_points = code_point_texts(rng, 1500)

    deberta = os.path.join(OUT, "deberta")
    train(
        os.path.join(deberta, "spm.model"),
        vocab_size=1500,
        pad_id=0,
        pad_piece="[PAD]",
        bos_id=1,
        bos_piece="[CLS]",
        eos_id=2,
        eos_piece="[SEP]",
        unk_id=3,
        unk_piece="[UNK]",
        normalization_rule_name="nmt_nfkc",
        character_coverage=0.9995,
    )
    with open(os.path.join(deberta, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(convert(deberta), f, ensure_ascii=False, indent=2)
    write_cases(deberta, texts + code_points, pairs)

    byte_model = os.path.join(OUT, "bytes")
    train(
        os.path.join(byte_model, "spm.model"),
        vocab_size=800,
        pad_id=0,
        pad_piece="[PAD]",
        bos_id=1,
        bos_piece="[CLS]",
        eos_id=2,
        eos_piece="[SEP]",
        unk_id=3,
        unk_piece="[UNK]",
        byte_fallback=True,
        user_defined_symbols=["<br>", "@@", "Selah"],
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        character_coverage=0.9995,
    )
    converted = convert(byte_model)
    converted["model"]["byte_fallback"] = True
    with open(os.path.join(byte_model, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(converted, f, ensure_ascii=False, indent=2)
    write_cases(byte_model, texts + code_points[:300], pairs)

    write_ties_model(os.path.join(OUT, "ties"))


if __name__ == "__main__":
    main()
