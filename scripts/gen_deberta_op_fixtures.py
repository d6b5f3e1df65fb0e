"""Reference values for rcx's DeBERTa-v2/v3 ops (src/backend/cpu/disentangled_attention.rs),
from transformers' own functions and modules with random weights (offline, no download).

Writes tests/fixtures/deberta_ops/reference.json:
- "buckets": transformers' make_log_bucket_position over d in [-600, 600] for a few
  (position_buckets, max_relative_positions), and build_relative_position for a small case;
- "attention": DisentangledSelfAttention layers (shared and separate position projections,
  c2p+p2c, c2p alone, p2c alone) on a padded batch: their weights, inputs and outputs.

Run: /work/pyenv/bin/python scripts/gen_deberta_op_fixtures.py
"""

import json
from pathlib import Path

import torch
from transformers import DebertaV2Config
from transformers.models.deberta_v2 import modeling_deberta_v2 as deberta

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/deberta_ops/reference.json"


def floats(t):
    return [float(x) for x in t.detach().double().flatten()]


def buckets():
    cases = []
    d = torch.arange(-600, 601)
    for size, max_position in [(256, 512), (8, 64), (32, 128), (256, 1024), (6, 7)]:
        pos = deberta.make_log_bucket_position(d, size, max_position)
        cases.append({"bucket_size": size, "max_position": max_position,
                      "from": -600, "buckets": [int(x) for x in pos]})
    t = torch.zeros(1, 9, 1)
    rel = deberta.build_relative_position(t, t, bucket_size=4, max_position=8)
    return {"log": cases, "table": {"t": 9, "bucket_size": 4, "max_position": 8,
                                    "relative": [int(x) for x in rel.flatten()]}}


def attention(seed, pos_att_type, share_att_key, buckets, max_relative):
    torch.manual_seed(seed)
    b, t, hidden, heads = 2, 7, 12, 3
    config = DebertaV2Config(hidden_size=hidden, num_attention_heads=heads, relative_attention=True,
                             position_buckets=buckets, max_relative_positions=max_relative,
                             pos_att_type=pos_att_type, share_att_key=share_att_key,
                             attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    layer = deberta.DisentangledSelfAttention(config).eval().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    span = layer.pos_ebd_size
    x = torch.randn(b, t, hidden, dtype=torch.float64)
    rel_embeddings = torch.randn(2 * span, hidden, dtype=torch.float64)
    mask = torch.tensor([[1] * t, [1] * (t - 2) + [0, 0]])
    ext = mask.unsqueeze(1).unsqueeze(2)
    ext = ext * ext.squeeze(-2).unsqueeze(-1)
    relative = deberta.build_relative_position(x, x, bucket_size=buckets, max_position=max_relative)
    with torch.no_grad():
        out, _ = layer(x, ext, relative_pos=relative, rel_embeddings=rel_embeddings)
    weights = {name: {"shape": list(p.shape), "values": floats(p)} for name, p in layer.named_parameters()}
    return {"pos_att_type": pos_att_type, "share_att_key": share_att_key, "position_buckets": buckets,
            "max_relative_positions": max_relative, "b": b, "t": t, "hidden": hidden, "heads": heads,
            "span": span, "mask": [int(m) for m in mask.flatten()], "x": floats(x),
            "rel_embeddings": floats(rel_embeddings), "weights": weights, "out": floats(out)}


def main():
    cases = [
        attention(1, ["p2c", "c2p"], True, 4, 8),
        attention(2, ["p2c", "c2p"], False, 4, 8),
        attention(3, ["c2p"], True, 0, 3),
        attention(4, ["p2c"], False, 4, 16),
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"buckets": buckets(), "attention": cases}) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
