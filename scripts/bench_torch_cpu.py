"""The rcx training-step benchmark (benches/train_step.rs) in PyTorch eager on the CPU.

One step of transformers' BertForSequenceClassification (num_labels=1) loaded from the
MiniLM-L6 folder, in training mode (dropout 0.1): forward, the x_inv ranking loss with
eps 0.1 on rewards sigmoid(logit), backward, clip_grad_norm_ to 1.0, AdamW over every
parameter (weight decay 0.01 except biases and LayerNorm weights, as rcx and the HF
Trainer). Same batch shape as rcx: 8 completions of 128 random token ids;
  all-pairs: the 8 completions once, loss over all 28 ranked pairs;
  paper:     56 sequences (both sides of each of the 28 pairs), the same loss on pairs.

Usage: $PYTHON scripts/bench_torch_cpu.py [--config all-pairs|paper] [--threads N]
       [--steps N] [--warmup N] [--model DIR]
Without --config each configuration runs in a fresh Python process, so that the peak
resident memory (ru_maxrss) of one does not mask the other's. Each process prints one
`RESULT key=value ...` line, as the rcx bench does.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

COMPLETIONS = 8
SEQ_LEN = 128
EPS = 0.1
LR = 2e-5
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


def x_inv(x, eps):
    """rcx's extended x_inv (src/loss.rs): 1/eps - 1/(x+eps) for x > 0, 100 x otherwise.
    torch.where evaluates both branches, so the x > 0 branch is fed a safe argument."""
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, 1.0 / eps - 1.0 / (safe + eps), 100.0 * x)


def ranking_loss(logits, pairs):
    """Mean over pairs (i above j) of -U(r_i - r_j), r = sigmoid(logit)."""
    rewards = torch.sigmoid(logits.double())
    better = torch.tensor([i for i, _ in pairs])
    worse = torch.tensor([j for _, j in pairs])
    return -x_inv(rewards[better] - rewards[worse], EPS).mean()


def make_batch(config, vocab):
    g = torch.Generator().manual_seed(7)
    completions = torch.randint(1000, vocab, (COMPLETIONS, SEQ_LEN), generator=g)
    ranked = [(i, j) for i in range(COMPLETIONS) for j in range(i + 1, COMPLETIONS)]
    if config == "all-pairs":
        return completions, ranked
    if config == "paper":
        order = [k for pair in ranked for k in pair]
        pairs = [(2 * p, 2 * p + 1) for p in range(len(ranked))]
        return completions[order], pairs
    raise SystemExit(f"bench_torch_cpu: unknown config `{config}`: all-pairs or paper")


def run_config(args):
    from transformers import BertForSequenceClassification

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(args.model, num_labels=1)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "LayerNorm" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    input_ids, pairs = make_batch(args.config, model.config.vocab_size)
    attention_mask = torch.ones_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)

    def step():
        opt.zero_grad(set_to_none=False)
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits[:, 0]
        loss = ranking_loss(logits, pairs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        return loss.item()

    times_ms, cpu_ms = [], []
    loss = 0.0
    for i in range(args.warmup + args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = step()
        if i >= args.warmup:
            times_ms.append((time.perf_counter() - started) * 1e3)
            cpu_ms.append((time.process_time() - cpu_started) * 1e3)
    times_ms.sort()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    attn = getattr(model.config, "_attn_implementation", "?")
    print(
        f"RESULT impl=torch config={args.config} seqs={input_ids.shape[0]} tokens={SEQ_LEN} "
        f"threads={torch.get_num_threads()} steps={len(times_ms)} "
        f"median_ms={statistics.median(times_ms):.1f} min_ms={times_ms[0]:.1f} "
        f"max_ms={times_ms[-1]:.1f} cpu_ms={statistics.median(cpu_ms):.0f} peak_mib={peak_mib:.1f} loss={loss:.6f} "
        f"torch={torch.__version__} attn={attn}",
        flush=True,
    )


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=["all-pairs", "paper"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--model", default=os.path.join(root, ".models", "all-MiniLM-L6-v2"))
    args = ap.parse_args()
    if args.config:
        run_config(args)
        return
    for config in ["all-pairs", "paper"]:
        cmd = [sys.executable, __file__, "--config", config, "--threads", str(args.threads),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--model", args.model]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
