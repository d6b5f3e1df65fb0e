"""Tiny random DeBERTa-v2/v3 reward models and transformers' logits, for tests/deberta_parity.rs.

Writes tests/fixtures/deberta/{v3,v2}/ (config.json, model.safetensors as transformers saves
DebertaV2ForSequenceClassification with one label) and tests/fixtures/deberta/logits.json:
per model, padded batches (input_ids, attention_mask, token_type_ids) and their logits.
- v3: DeBERTa-v3's structure (relative attention, log buckets, shared position
  projections, layer-normed relative embeddings, no absolute positions, no token types);
- v3_tokenized: v3's structure over the vocabulary of tests/fixtures/unigram/deberta/ (whose
  tokenizer.json and spm.model a test copies beside it), with transformers' logits of a few
  (prompt, completion) texts as the `tokenizers` library encodes them;
- v2: the other branches (separate pos_key_proj/pos_query_proj, absolute positions, token
  types, embedding_size below hidden_size so embed_proj, no buckets, no relative LayerNorm,
  pos_att_type as the "p2c|c2p" string).
Offline, no download. Run: /work/pyenv/bin/python scripts/gen_deberta_fixtures.py
"""

import json
from pathlib import Path

import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/deberta"

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=64, num_labels=1, pad_token_id=0,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0,
              layer_norm_eps=1e-7, pooler_hidden_size=32, pooler_hidden_act="gelu")

MODELS = {
    "v3": dict(relative_attention=True, position_buckets=8, max_relative_positions=-1,
               pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
               position_biased_input=False, type_vocab_size=0),
    "v2": dict(relative_attention=True, position_buckets=-1, max_relative_positions=6,
               pos_att_type="p2c|c2p", share_att_key=False, norm_rel_ebd="none",
               position_biased_input=True, type_vocab_size=2, embedding_size=24),
}


def batches(seed, with_types):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for b, t, lengths in [(3, 9, [9, 5, 1]), (2, 17, [17, 11])]:
        ids = torch.randint(1, 97, (b, t), generator=g)
        mask = torch.zeros(b, t, dtype=torch.long)
        types = torch.zeros(b, t, dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
            ids[row, n:] = 0
            if with_types:
                types[row, n // 2:n] = 1
        cases.append((ids, mask, types))
    return cases


# Texts for the folder with a tokenizer: none of them is in the tokenizer fixtures' cases.
SCORED = [
    {"prompt": "Why is the sky blue?", "completions": [
        "Because of Rayleigh scattering: short wavelengths scatter more.", "It reflects the sea.",
        "No idea."]},
    {"prompt": "Name a prime number larger than 10.", "completions": ["Thirteen (13).", "12", "ten"]},
]


def tokenized_folder():
    """A v3-shaped random model whose vocabulary is the unigram DeBERTa fixture's
    (tests/fixtures/unigram/deberta/), with transformers' logits for SCORED as the tokenizers
    library encodes each (prompt, completion) pair with that tokenizer.json."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(OUT.parent / "unigram/deberta/tokenizer.json"))
    torch.manual_seed(8)
    config = DebertaV2Config(**{**COMMON, "vocab_size": tok.get_vocab_size()}, **MODELS["v3"])
    model = DebertaV2ForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(OUT / "v3_tokenized")
    records = []
    for record in SCORED:
        out = []
        for completion in record["completions"]:
            ids = tok.encode(record["prompt"], completion).ids
            with torch.no_grad():
                out.append(float(model(torch.tensor([ids])).logits[0, 0]))
        records.append({**record, "logits": out})
    return records


def main():
    logits = {"v3_tokenized": tokenized_folder()}
    for name, extra in MODELS.items():
        torch.manual_seed(7)
        config = DebertaV2Config(**COMMON, **extra)
        model = DebertaV2ForSequenceClassification(config).eval()
        with torch.no_grad():
            # Larger than the init's 0.02 so that every term moves the logits.
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
                else:
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(OUT / name)
        cases = []
        for ids, mask, types in batches(11, config.type_vocab_size > 0):
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            cases.append({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                          "token_type_ids": types.tolist(),
                          "logits": [float(x) for x in out[:, 0]]})
        logits[name] = cases
    (OUT / "logits.json").write_text(json.dumps(logits) + "\n")
    for name in MODELS:
        print(name, sorted(p.name for p in (OUT / name).iterdir()))


if __name__ == "__main__":
    main()
