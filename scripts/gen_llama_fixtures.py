"""Fixtures for tests/llama_parity.rs: tiny random decoder reward models as transformers
writes them, and transformers' logits for a few padded batches of token ids.

    /work/pyenv/bin/python scripts/gen_llama_fixtures.py

Writes tests/fixtures/llama/{llama,mistral,qwen2}/ (config.json, safetensors weights; the
mistral folder sharded with its index) and tests/fixtures/llama/logits.json:
{model: [{"input_ids": [[...]], "attention_mask": [[...]], "logits": [...]}]}.

- llama: grouped-query attention (4 heads over 2), head_dim 6 given apart from
  hidden/heads, llama3 rope scaling with its three frequency bands in play, mlp_bias on.
- mistral: pad_token_id equal to eos_token_id (the trap: a trailing EOS counts as padding),
  sliding_window above every sequence, sharded safetensors.
- qwen2: q/k/v biases, 3 heads over 1, two EOS ids.
Every parameter, norms and biases included, is drawn at a scale that makes each matter.
"""

import json
import os

import torch
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llama")
VOCAB = 40


def common(**extra):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        num_labels=1,
    )
    base.update(extra)
    return base


def randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def batches(pad, eos, seed):
    """Right-padded batches: sequences of different lengths, one ending in EOS."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for lengths in [[7, 3, 5], [9], [4, 4, 2, 6]]:
        t = max(lengths)
        ids = torch.full((len(lengths), t), pad, dtype=torch.long)
        mask = torch.zeros((len(lengths), t), dtype=torch.long)
        for i, n in enumerate(lengths):
            seq = torch.randint(3, VOCAB, (n,), generator=gen)
            if i == 0:
                seq[-1] = eos
            ids[i, :n] = seq
            mask[i, :n] = 1
        out.append((ids, mask))
    return out


def write(name, model, pad, eos, seed, shard=None):
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        os.remove(os.path.join(folder, f))
    model.eval()
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    rows = []
    for ids, mask in batches(pad, eos, seed):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        rows.append(
            {
                "input_ids": ids.tolist(),
                "attention_mask": mask.tolist(),
                "logits": [float(x) for x in logits],
            }
        )
    return rows


def main():
    torch.manual_seed(0)
    logits = {}

    cfg = LlamaConfig(
        **common(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=6,
            mlp_bias=True,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            # Wavelengths 2π/inv_freq of head_dim 6 at theta 500: ~6, ~49, ~395; with an
            # original context of 64 the bands are < 16 kept, 16..64 interpolated, > 64 divided.
            rope_scaling={
                "rope_type": "llama3",
                "rope_theta": 500.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    )
    model = LlamaForSequenceClassification(cfg)
    randomise(model, 1)
    logits["llama"] = write("llama", model, pad=0, eos=2, seed=11)

    cfg = MistralConfig(
        **common(
            num_attention_heads=4,
            num_key_value_heads=1,
            pad_token_id=2,
            bos_token_id=1,
            eos_token_id=2,
            sliding_window=32,
        )
    )
    model = MistralForSequenceClassification(cfg)
    randomise(model, 2)
    logits["mistral"] = write("mistral", model, pad=2, eos=2, seed=12, shard="8KB")

    cfg = Qwen2Config(
        **common(
            hidden_size=12,
            num_attention_heads=3,
            num_key_value_heads=1,
            pad_token_id=0,
            eos_token_id=[2, 5],
            rope_theta=1000000.0,
        )
    )
    model = Qwen2ForSequenceClassification(cfg)
    randomise(model, 3)
    logits["qwen2"] = write("qwen2", model, pad=0, eos=2, seed=13)

    with open(os.path.join(OUT, "logits.json"), "w") as f:
        json.dump(logits, f)
        f.write("\n")


if __name__ == "__main__":
    main()
