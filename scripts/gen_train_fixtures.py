"""Writes the small ranking sets of tests/train.rs: tests/fixtures/train/{lengths,lengths_eval}.jsonl.

The paper's construction in miniature (notes section 4): every prompt has K = 4
completions that are prefixes of one random word sequence, longer is better, so a
reward model can learn the ranking from length alone. Words are common English words
that BERT's uncased vocabulary holds whole, so each word is one token.
Usage: $PYTHON scripts/gen_train_fixtures.py  (no third-party packages needed)
"""

import json
import os
import random

WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or "
    "have an they which one you were her all she there would their we him been has "
    "when who will more no if out so said what up its about into than them can only "
    "other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three"
).split()

# Words per completion, best (longest) first; a prompt adds a few tokens of its own.
LENGTHS = [14, 10, 6, 2]
TOPICS = ["river", "city", "garden", "music", "school", "market", "winter", "forest"]


def record(rng, i):
    topic = rng.choice(TOPICS)
    prompt = f"tell me about the {topic} number {i}"
    words = [rng.choice(WORDS) for _ in range(LENGTHS[0])]
    return {"prompt": prompt, "completions": [" ".join(words[:n]) for n in LENGTHS]}


def write(path, rng, first, count):
    with open(path, "w") as f:
        for i in range(first, first + count):
            f.write(json.dumps(record(rng, i)) + "\n")


def main():
    root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train")
    os.makedirs(root, exist_ok=True)
    rng = random.Random(20230526)
    write(os.path.join(root, "lengths.jsonl"), rng, 0, 64)
    write(os.path.join(root, "lengths_eval.jsonl"), rng, 64, 16)


if __name__ == "__main__":
    main()
