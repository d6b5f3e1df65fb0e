"""Writes the fixtures of tests/data.rs under tests/fixtures/data/: a small LongForm-style
input and, computed here independently of rcx, the exact output of
`rcx data longform` on it for seeds 42 and 7 (construction and RNG as in data/README.md), and
the table of Python's whitespace (str.isspace, what str.split() splits on).

usage: $PYTHON scripts/gen_data_fixtures.py   (from the repository root; stdlib only)
"""

import json
import os
import sys
import unicodedata

OUT = os.path.join("tests", "fixtures", "data")
MASK = (1 << 64) - 1
OPEN = (" Write the answer in an open-ended way.", [80, 70, 60, 50, 40, 30, 20, 10])
CLOSED = (" Write either a short answer or a long answer.", [74, 68, 62, 56, 34, 28, 22, 16])


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)


def text(prefix, n, seps):
    """n distinct words joined by a cycle of separators (messy whitespace on purpose)."""
    return "".join(f"{prefix}{i}" + seps[i % len(seps)] for i in range(n)).rstrip()


def examples():
    return [
        {"input": "Tell a long story.", "output": text("alpha", 120, [" "])},
        # 99 words: dropped, and takes no coin flip.
        {"input": "Too short.", "output": text("short", 99, [" "])},
        {"input": "Exactly one hundred.", "output": text("w", 100, ["  ", "\t", "\n", " "])},
        {"input": "Café “quoted” ünïcode", "output": text("é", 150, [" ", " \u00a0 "]),
         "extra": 1},
        {"input": "Leading space", "output": "   " + text("lead", 130, [" "])},
        {"input": "Fifth kept.", "output": text("five", 101, [" "])},
        {"input": "Sixth kept.", "output": text("six", 200, [" "])},
        # Every separator of str.split() that Rust's char::is_whitespace lacks (U+001C..U+001F)
        # or has too, and two look-alikes that separate nothing (U+200B, U+FEFF).
        {"input": "Separators.",
         "output": text("sep", 160, ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028",
                                     "\u3000", "\u200b", "\ufeff", "\xa0"])},
    ]


def construct(exs, seed):
    rng = SplitMix64(seed)
    lines = []
    for ex in exs:
        words = ex["output"].split()
        if len(words) < 100:
            continue
        suffix, lengths = OPEN if rng.next() >> 63 == 1 else CLOSED
        record = {
            "prompt": ex["input"] + suffix,
            "completions": [" ".join(words[:n]) for n in lengths],
            "prompt_type": "open" if suffix == OPEN[0] else "closed",
        }
        lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    return "".join(lines)


def write_isspace_table():
    """The code points c with c.isspace(), the separators of str.split(), as inclusive
    hex ranges: the table tests/data.rs checks rcx's word splitting against."""
    ranges = []
    for code in range(0x110000):
        if chr(code).isspace():
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    with open(os.path.join(OUT, "python_isspace.txt"), "w", encoding="ascii") as f:
        f.write(f"# str.isspace() of Python {sys.version.split()[0]}, Unicode "
                f"{unicodedata.unidata_version}: first last (hex, inclusive)\n")
        for first, last in ranges:
            f.write(f"{first:04X} {last:04X}\n")


def main():
    write_isspace_table()
    exs = examples()
    with open(os.path.join(OUT, "longform_small.jsonl"), "w", encoding="utf-8") as f:
        for ex in exs:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
            if ex["input"] == "Too short.":
                f.write("\n")  # a blank line, ignored
    for seed in (42, 7):
        path = os.path.join(OUT, f"longform_small.seed{seed}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.write(construct(exs, seed))


if __name__ == "__main__":
    main()
