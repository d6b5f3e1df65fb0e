"""Reference values for tests/decoder_ops.rs, from transformers itself: the rotary
frequencies of LlamaRotaryEmbedding (default and llama3 rope types), its cosines and sines
and apply_rotary_pos_emb at long positions, LlamaRMSNorm and silu(gate) * up, all in f32.
Writes tests/fixtures/decoder_ops/reference.json.

Run: ${PYTHON:-python3} scripts/gen_decoder_op_fixtures.py
"""

import json
import pathlib

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/decoder_ops/reference.json"
torch.manual_seed(0)


def llama3(factor, low, high, original):
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def rotary(head_dim, theta, scaling):
    params = dict(scaling) if scaling else {"rope_type": "default"}
    params["rope_theta"] = theta
    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=head_dim,
        rope_parameters=params,
        max_position_embeddings=131072,
    )
    return LlamaRotaryEmbedding(config)


# (head_dim, rope_theta, llama3 scaling or None): Llama 2, Llama 3.1 8B, Llama 3.2 1B,
# Mistral and Qwen2 (theta 1e6), odd head sizes, and a small one whose four frequencies
# fall in every band of the llama3 scaling.
CASES = [
    (128, 10000.0, None),
    (128, 500000.0, llama3(8.0, 1.0, 4.0, 8192)),
    (64, 500000.0, llama3(32.0, 1.0, 4.0, 8192)),
    (128, 1000000.0, None),
    (96, 10000.0, None),
    (80, 1000000.0, llama3(4.0, 1.5, 3.0, 4096)),
    (8, 10000.0, llama3(8.0, 1.0, 4.0, 64)),
]

frequencies = []
for head_dim, theta, scaling in CASES:
    inv_freq = rotary(head_dim, theta, scaling).inv_freq
    frequencies.append(
        {
            "head_dim": head_dim,
            "theta": theta,
            "llama3": scaling,
            "inv_freq": inv_freq.tolist(),
        }
    )

# Cosines, sines and rotated queries of the Llama 3.1 case at positions up to 131071,
# where an f32 angle is far from the exact one: the test must turn by transformers' angle.
head_dim, theta, scaling = CASES[1]
emb = rotary(head_dim, theta, scaling)
positions = [0, 1, 2, 17, 255, 4095, 8191, 65535, 131071]
heads = 2
q = torch.randn(1, heads, len(positions), head_dim, dtype=torch.float32)
cos, sin = emb(q, torch.tensor([positions]))
q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
rope = {
    "head_dim": head_dim,
    "theta": theta,
    "llama3": scaling,
    "positions": positions,
    "heads": heads,
    "cos": cos[0, :, : head_dim // 2].flatten().tolist(),
    "sin": sin[0, :, : head_dim // 2].flatten().tolist(),
    # [n, heads*hs] as rcx lays them out.
    "inp": q[0].transpose(0, 1).flatten().tolist(),
    "out": q_rot[0].transpose(0, 1).flatten().tolist(),
}

n, c, eps = 4, 48, 1e-5
norm = LlamaRMSNorm(c, eps=eps)
with torch.no_grad():
    norm.weight.copy_(torch.randn(c))
x = 3.0 * torch.randn(n, c) + 0.5
rmsnorm = {
    "n": n,
    "c": c,
    "eps": eps,
    "inp": x.flatten().tolist(),
    "weight": norm.weight.detach().tolist(),
    "out": norm(x).detach().flatten().tolist(),
}

gate = 4.0 * torch.randn(64)
up = torch.randn(64)
swiglu = {"gate": gate.tolist(), "up": up.tolist(), "out": (F.silu(gate) * up).tolist()}

OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(
    json.dumps(
        {
            "transformers": __import__("transformers").__version__,
            "torch": torch.__version__,
            "frequencies": frequencies,
            "rope": rope,
            "rmsnorm": rmsnorm,
            "swiglu": swiglu,
        }
    )
    + "\n"
)
print(f"wrote {OUT}")
