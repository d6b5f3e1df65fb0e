"""The decoder training-step benchmark (benches/decoder_step.rs) in PyTorch eager on the CPU.

One step of transformers' LlamaForSequenceClassification (num_labels=1) on one prompt of
384 tokens with K = 8 completions of 64 tokens, run as transformers runs it: the 8 whole
sequences of 448 tokens. Forward, the x_inv ranking loss over all 28 ranked pairs (eps 0.1,
rewards sigmoid(logit), the reward read at the last token), backward, clip_grad_norm_ to
1.0, AdamW (weight decay 0.01 except biases and norm weights, as rcx and the HF Trainer).

  --write-folder DIR  writes the benchmark's model (random init, seed 0, f32) and its batch
                      (bench_batch.json: the token ids) into DIR for both sides, then exits;
  otherwise           runs the step on DIR's model and batch and prints one
                      `RESULT key=value ...` line, as the rcx bench does.

Usage: $PYTHON scripts/bench_torch_decoder_cpu.py --folder DIR [--threads N] [--steps N]
       [--warmup N] | --write-folder DIR
"""

import argparse
import json
import os
import resource
import statistics
import time

import torch

PROMPT = 384
COMPLETIONS = 8
ANSWER = 64
EPS = 0.1
LR = 2e-5
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
# A Llama-3-shaped model small enough for two CPU cores: 4 layers, hidden 512, 8 query
# heads over 4 key/value heads, SwiGLU 1408, vocabulary 8000 (llama-small's width).
CONFIG = dict(
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
    num_labels=1,
    tie_word_embeddings=False,
)


def x_inv(x, eps):
    """rcx's extended x_inv (src/loss.rs): 1/eps - 1/(x+eps) for x > 0, 100 x otherwise."""
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, 1.0 / eps - 1.0 / (safe + eps), 100.0 * x)


def ranking_loss(logits):
    """Mean over the 28 pairs (i above j: completion i ranked better) of -U(r_i - r_j)."""
    rewards = torch.sigmoid(logits.double())
    pairs = [(i, j) for i in range(COMPLETIONS) for j in range(i + 1, COMPLETIONS)]
    better = torch.tensor([i for i, _ in pairs])
    worse = torch.tensor([j for _, j in pairs])
    return -x_inv(rewards[better] - rewards[worse], EPS).mean()


def write_folder(folder):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**CONFIG)).float()
    model.save_pretrained(folder, safe_serialization=True)
    g = torch.Generator().manual_seed(7)
    # Ids from 3 up: never the pad (0), EOS (1) or BOS (2) id.
    prompt = torch.randint(3, CONFIG["vocab_size"], (PROMPT,), generator=g).tolist()
    answers = torch.randint(3, CONFIG["vocab_size"], (COMPLETIONS, ANSWER), generator=g).tolist()
    with open(os.path.join(folder, "bench_batch.json"), "w") as f:
        json.dump({"prompt": prompt, "completions": answers}, f)


def run(args):
    from transformers import LlamaForSequenceClassification

    torch.set_num_threads(args.threads)
    model = LlamaForSequenceClassification.from_pretrained(args.folder, dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    with open(os.path.join(args.folder, "bench_batch.json")) as f:
        batch = json.load(f)
    input_ids = torch.tensor([batch["prompt"] + c for c in batch["completions"]])
    attention_mask = torch.ones_like(input_ids)

    def step():
        opt.zero_grad(set_to_none=False)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        loss = ranking_loss(logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        return loss.item()

    times_ms, cpu_ms, losses = [], [], []
    for i in range(args.warmup + args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        losses.append(step())
        if i >= args.warmup:
            times_ms.append((time.perf_counter() - started) * 1e3)
            cpu_ms.append((time.process_time() - cpu_started) * 1e3)
    times_ms.sort()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    attn = getattr(model.config, "_attn_implementation", "?")
    print(
        f"RESULT impl=torch config=full seqs={input_ids.shape[0]} rows={input_ids.numel()} "
        f"threads={torch.get_num_threads()} steps={len(times_ms)} "
        f"median_ms={statistics.median(times_ms):.1f} min_ms={times_ms[0]:.1f} "
        f"max_ms={times_ms[-1]:.1f} cpu_ms={statistics.median(cpu_ms):.0f} "
        f"peak_mib={peak_mib:.1f} first_loss={losses[0]:.6f} "
        f"torch={torch.__version__} attn={attn}",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder")
    ap.add_argument("--write-folder")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    if args.write_folder:
        write_folder(args.write_folder)
    elif args.folder:
        run(args)
    else:
        ap.error("--folder or --write-folder is needed")


if __name__ == "__main__":
    main()
