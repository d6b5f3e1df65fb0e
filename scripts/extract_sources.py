"""Turns the Jargon File and the King James Bible into LongForm-style JSON lines
{"input": prompt, "output": text}, the input of `rcx data longform` (see data/README.md).

usage: extract_sources.py JARGON_TXT_GZ KJV_VERSES OUTPUT_JSONL

JARGON_TXT_GZ: jargon.txt.gz from the Debian package jargon-text.
KJV_VERSES: the output of `bible -p <folder of bible.data> -f -l100000 Gen1:1-Rev22:21`
(package bible-kjv), one verse a line: "Ge1:1 In the beginning ...".
Standard library only; the output is a pure function of the two inputs.
"""

import gzip
import hashlib
import json
import re
import sys

# The reader's book abbreviations, in canonical order, with their full names.
BOOKS = [
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"), ("1Ki", "1 Kings"), ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"), ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"),
    ("Prv", "Proverbs"), ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"),
    ("Isa", "Isaiah"), ("Jer", "Jeremiah"), ("Lam", "Lamentations"), ("Eze", "Ezekiel"),
    ("Dan", "Daniel"), ("Hos", "Hosea"), ("Joel", "Joel"), ("Amos", "Amos"),
    ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nahum", "Nahum"),
    ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"),
    ("Mal", "Malachi"), ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"),
    ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"), ("1Cor", "1 Corinthians"),
    ("2Cor", "2 Corinthians"), ("Gal", "Galatians"), ("Eph", "Ephesians"),
    ("Phi", "Philippians"), ("Col", "Colossians"), ("1Th", "1 Thessalonians"),
    ("2Th", "2 Thessalonians"), ("1Tim", "1 Timothy"), ("2Tim", "2 Timothy"),
    ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"), ("Jas", "James"),
    ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"), ("2Jn", "2 John"),
    ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
]

# Prompt wordings, chosen by the entry's index so that the set is fixed by its sources.
JARGON_PROMPTS = [
    "Explain the hacker term '{}'.",
    "What does the hacker term '{}' mean?",
    "Define '{}' the way the Jargon File does.",
]
KJV_PROMPTS = [
    "Retell chapter {1} of the book of {0}.",
    "Recite chapter {1} of {0} in the King James Version.",
    "Give the text of chapter {1} of the book of {0} from the King James Bible.",
]

HEADWORD = re.compile(r"^   :(.+?):(?: .*)?$")
VERSE = re.compile(r"^([0-9]?[A-Za-z]+)([0-9]+):([0-9]+) (.*)$")


def words(text):
    return " ".join(text.split())


def jargon_entries(path):
    """(headword, definition) of every glossary entry: the header line
    "   :headword: /pronunciation/, part of speech." then indented paragraphs, up to the
    appendices. Cross-reference braces {like this} are dropped, their words kept."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    entries = []
    headword, body = None, []
    for line in lines:
        if line.strip() == "Part III. Appendices":
            break
        m = HEADWORD.match(line)
        if m:
            if headword is not None:
                entries.append((headword, body))
            headword, body = m.group(1), []
        elif headword is not None:
            body.append(line)
    if headword is not None:
        entries.append((headword, body))
    return [(h, words(" ".join(b).replace("{", "").replace("}", ""))) for h, b in entries]


def kjv_chapters(path):
    """(book name, chapter number, chapter text) in canonical order."""
    names = dict(BOOKS)
    chapters = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            m = VERSE.match(line)
            if not m or m.group(1) not in names:
                sys.exit(f"{path}:{n}: expected a verse like 'Ge1:1 text', found {line[:40]!r}")
            key = (names[m.group(1)], int(m.group(2)))
            if not chapters or chapters[-1][0] != key:
                chapters.append((key, []))
            chapters[-1][1].append(m.group(4))
    return [(book, ch, words(" ".join(verses))) for (book, ch), verses in chapters]


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    jargon_path, kjv_path, out_path = sys.argv[1:]
    examples = []
    for i, (headword, definition) in enumerate(jargon_entries(jargon_path)):
        if definition:
            examples.append((JARGON_PROMPTS[i % len(JARGON_PROMPTS)].format(headword), definition))
    for i, (book, chapter, text) in enumerate(kjv_chapters(kjv_path)):
        examples.append((KJV_PROMPTS[i % len(KJV_PROMPTS)].format(book, chapter), text))
    # A fixed mix of both sources, so that the last 10% (the eval split) holds both.
    examples.sort(key=lambda e: hashlib.sha256(e[0].encode("utf-8")).hexdigest())
    with open(out_path, "w", encoding="utf-8") as out:
        for prompt, text in examples:
            out.write(json.dumps({"input": prompt, "output": text}, ensure_ascii=False) + "\n")
    print(f"{out_path}: {len(examples)} examples", file=sys.stderr)


if __name__ == "__main__":
    main()
