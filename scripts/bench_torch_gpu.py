"""The PyTorch baseline of benches/gpu_step.rs: the same BERT-base reward-model training
step on the same GPU, timed the same way.

BertForSequenceClassification (num_labels=1) from a config (12 layers, hidden 768, 12
heads, random init, dropout 0.1, transformers' default attention), one prompt with 8
completions of 512 random tokens, rewards r = sigmoid(logit), the all-pairs loss
-mean_{i<j} U(r_i - r_j) with rcx's extended x_inv utility (eps 0.01: 1/eps - 1/(x+eps) for
x > 0, 100x below), global-norm clipping to 1, AdamW (lr 1e-5, weight decay 0.01 off biases
and LayerNorm weights, as the HF Trainer).

Modes, in order: fp32-eager, bf16-eager (autocast, fp32 master weights), llama-bf16-eager,
deberta-bf16-eager, deberta-fp32-eager, bf16-compile, fp32-compile (torch.compile of the
model), bf16-eager-dup: the paper's pair-duplicated way (28 pairs as 56 sequences),
llama-fp32-eager and deberta-bf16-compile (the DeBERTa modes before the compiled ones: a
first compile takes most of a minute).

The llama modes are the decoder of benches/gpu_step.rs: LlamaForSequenceClassification
(num_labels=1, pad id 0) from a LlamaConfig of Llama 3.2 1B's shape (16 layers, hidden 2048,
32 heads over 8 key/value heads, SwiGLU 8192, vocabulary 128256, rope theta 500000, no
dropout), random init made on the GPU, one prompt of 384 random tokens with 8 completions
of 128, run as the 8 whole sequences of 512 (transformers has no shared prefix); the same
loss, clipping and AdamW (no decay on biases and RMSNorm weights, as the HF Trainer).

The deberta modes are the DeBERTa of benches/gpu_step.rs: DebertaV2ForSequenceClassification
(num_labels=1) from a DebertaV2Config of microsoft/deberta-v3-base's config.json (12 layers,
hidden 768, 12 heads, intermediate 3072, vocabulary 128100, relative attention over 256 log
buckets of 512 positions, pos_att_type p2c|c2p, share_att_key, norm_rel_ebd layer_norm, no
absolute positions, no token types, dropout 0.1, pooler dropout 0), random init made on the
GPU, one prompt with 8 completions of 512 random tokens (ids from 1: none is the pad id 0),
the BERT modes' loss, clipping and AdamW (no decay on biases and LayerNorm weights).

"fp32" leaves TF32 off, as rcx's SGEMMs. Each step is timed
with CUDA events after warm-up; the median is printed as one JSON line per mode as soon as
it is known, so a timeout keeps the finished ones. Modes that would start after --budget-s
are skipped (and say so).

Needs only torch and transformers (present on the lent GPU machine; nothing is installed).
Usage: $PYTHON scripts/bench_torch_gpu.py [--steps 10] [--warmup 3] [--budget-s 240]
NOT RUN YET: written on a machine without a GPU.
"""

import argparse
import json
import statistics
import sys
import time

K = 8
T = 512
EPS = 0.01
MODES = [
    "fp32-eager",
    "bf16-eager",
    "llama-bf16-eager",
    "deberta-bf16-eager",
    "deberta-fp32-eager",
    "bf16-compile",
    "fp32-compile",
    "bf16-eager-dup",
    "llama-fp32-eager",
    "deberta-bf16-compile",
]
LLAMA_VOCAB = 128256
LLAMA_PROMPT = 384
LLAMA_COMPLETION = 128
DEBERTA_VOCAB = 128100


def emit(record):
    print(json.dumps(record), flush=True)


def x_inv_loss(logits, pairs_i, pairs_j):
    """-mean over pairs of U(r_i - r_j), U = rcx's extended x_inv, in fp32."""
    import torch

    r = torch.sigmoid(logits.float())
    x = r[pairs_i] - r[pairs_j]
    positive = 1.0 / EPS - 1.0 / (x.clamp(min=0.0) + EPS)
    u = torch.where(x > 0, positive, 100.0 * x)
    return -u.mean()


def build(torch, transformers, device):
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).to(device)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-5,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    return model, optimizer


def build_llama(torch, transformers, device):
    config = transformers.LlamaConfig(
        vocab_size=LLAMA_VOCAB,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=LLAMA_PROMPT + LLAMA_COMPLETION,
        rope_theta=500000.0,
        attention_dropout=0.0,
        pad_token_id=0,
        num_labels=1,
    )
    torch.manual_seed(0)
    # Made on the GPU: 1.24 B parameters initialized on the CPU would take most of a minute.
    with torch.device(device):
        model = transformers.LlamaForSequenceClassification(config)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-5,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    return model, optimizer


def build_deberta(torch, transformers, device):
    config = transformers.DebertaV2Config(
        vocab_size=DEBERTA_VOCAB,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=0,
        initializer_range=0.02,
        layer_norm_eps=1e-7,
        relative_attention=True,
        max_relative_positions=-1,
        position_buckets=256,
        pad_token_id=0,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pooler_dropout=0,
        pooler_hidden_act="gelu",
        pooler_hidden_size=768,
        num_labels=1,
    )
    torch.manual_seed(0)
    # Made on the GPU, as the decoder (the 128100-row word table is most of the init).
    with torch.device(device):
        model = transformers.DebertaV2ForSequenceClassification(config)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-5,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    return model, optimizer


def deberta_batch(torch, device):
    """Input ids [K, T]: one prompt's 8 completions of 512 random tokens (ids from 1: none
    is the pad id 0); all pairs (i < j) over the rows."""
    g = torch.Generator().manual_seed(2025)
    ids = torch.randint(1, DEBERTA_VOCAB, (K, T), generator=g)
    pairs = torch.triu_indices(K, K, 1)
    return ids.to(device), pairs[0].to(device), pairs[1].to(device)


def llama_batch(torch, device):
    """Input ids [K, prompt + completion]: one prompt, K completions (ids from 3: none is
    the pad id 0); all pairs (i < j) over the rows."""
    g = torch.Generator().manual_seed(2024)
    prompt = torch.randint(3, LLAMA_VOCAB, (1, LLAMA_PROMPT), generator=g).expand(K, -1)
    completions = torch.randint(3, LLAMA_VOCAB, (K, LLAMA_COMPLETION), generator=g)
    ids = torch.cat([prompt, completions], dim=1)
    pairs = torch.triu_indices(K, K, 1)
    return ids.to(device), pairs[0].to(device), pairs[1].to(device)


def batch_for(torch, device, duplicated):
    """Input ids [S, T]: the 8 completions, or every pair (i < j) as two rows; and the
    ranked pairs over the rows (best first)."""
    g = torch.Generator().manual_seed(2023)
    completions = torch.randint(1, 30522, (K, T), generator=g)
    pairs = torch.triu_indices(K, K, 1)
    if duplicated:
        rows = torch.stack([pairs[0], pairs[1]], dim=1).reshape(-1)
        ids = completions[rows]
        n = pairs.shape[1]
        pairs_i = torch.arange(0, 2 * n, 2)
        pairs_j = pairs_i + 1
    else:
        ids, pairs_i, pairs_j = completions, pairs[0], pairs[1]
    return ids.to(device), pairs_i.to(device), pairs_j.to(device)


def run_mode(torch, transformers, mode, steps, warmup):
    device = torch.device("cuda")
    # "llama-bf16-eager": the model, then the dtype; BERT's modes name no model.
    family = mode.split("-")[0] if mode.startswith(("llama-", "deberta-")) else "bert"
    dtype = "bf16" if "bf16" in mode else "fp32"
    compiled = "compile" in mode
    duplicated = mode.endswith("-dup")
    if family == "llama":
        model, optimizer = build_llama(torch, transformers, device)
        ids, pairs_i, pairs_j = llama_batch(torch, device)
    elif family == "deberta":
        model, optimizer = build_deberta(torch, transformers, device)
        ids, pairs_i, pairs_j = deberta_batch(torch, device)
    else:
        model, optimizer = build(torch, transformers, device)
        ids, pairs_i, pairs_j = batch_for(torch, device, duplicated)
    forward = torch.compile(model) if compiled else model
    mask = torch.ones_like(ids)
    # Llama and DeBERTa-v3 have no token types.
    extra = {"token_type_ids": torch.zeros_like(ids)} if family == "bert" else {}

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = forward(input_ids=ids, attention_mask=mask, **extra).logits
        loss = x_inv_loss(logits.squeeze(-1), pairs_i, pairs_j)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss, norm

    started = time.time()
    step()  # the first step compiles (compile modes) and allocates
    torch.cuda.synchronize()
    first_s = time.time() - started
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss, norm = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {
        "bench": "torch_gpu_step",
        "mode": mode,
        "model": family,
        "way": "whole_sequences" if family == "llama" else "pair_duplicated" if duplicated else "all_pairs",
        "sequences": int(ids.shape[0]),
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "first_step_s": round(first_s, 2),
        "steps": steps,
        "loss": float(loss),
        "grad_norm": float(norm),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    import torch
    import transformers

    if not torch.cuda.is_available():
        emit({"bench": "torch_gpu_step", "skipped": "torch sees no CUDA device"})
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    emit(
        {
            "bench": "torch_gpu_step_env",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0),
        }
    )
    started = time.time()
    results = {}
    for mode in args.modes.split(","):
        elapsed = time.time() - started
        if elapsed > args.budget_s:
            emit({"bench": "torch_gpu_step", "mode": mode, "skipped": f"budget spent ({elapsed:.0f} s)"})
            continue
        steps = max(3, args.steps // 2) if mode.endswith("-dup") else args.steps
        try:
            record = run_mode(torch, transformers, mode, steps, args.warmup)
            results[mode] = record["median_ms"]
            emit(record)
        except Exception as e:  # one failing mode (e.g. compile) must not hide the others
            emit({"bench": "torch_gpu_step", "mode": mode, "error": f"{type(e).__name__}: {e}"[:500]})
        torch.cuda.empty_cache()
    emit({"bench": "torch_gpu_step_summary", "median_ms": results, "total_s": round(time.time() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
