#!/usr/bin/env python3
"""How far bf16 rounding inside flash attention moves its outputs from exact attention.

An f64 simulation (PyTorch on the CPU) of what rcx's flash kernels round, on one head
(t 70, hs 128, q/k/v/dout uniform in [-1, 1] and rounded to bf16), with only the first
`real` keys unmasked. Columns: the worst |x - exact| / (|exact| + mean |exact|) over the
elements, the measure tests/cuda_kernels.rs uses, over 20 draws:
  out v3   the forward with the probabilities rounded to bf16 (version 3), out stored in bf16;
  dv v3    dv from bf16 probabilities;
  dk v3    dk from bf16 score gradients, D = dout . out with out stored in bf16;
  dk v2    dk in full precision but D from the bf16 out (version 2 in bf16).
Run: python3 scripts/bf16_attention_rounding.py   (needs torch)
"""
import torch


def bf16(x):
    return x.to(torch.bfloat16).to(torch.float64)


def worst(got, exact):
    mean = exact.abs().mean()
    return ((got - exact).abs() / (exact.abs() + mean)).max().item()


def draw(real, t=70, hs=128):
    q, k, v, dout = (bf16(torch.rand(t, hs, dtype=torch.float64) * 2 - 1) for _ in range(4))
    s = q @ k.T / hs**0.5
    s[:, real:] = -float("inf")
    p = torch.softmax(s, -1)
    out = p @ v
    dp = dout @ v.T
    exact_dv = p.T @ dout
    exact_dk = (p * (dp - (dout * out).sum(-1, keepdim=True))).T @ q / hs**0.5
    stored_out = bf16(out)
    d_stored = (dout * stored_out).sum(-1, keepdim=True)
    return (
        worst(bf16(bf16(p) @ v), out),
        worst(bf16(bf16(p).T @ dout), exact_dv),
        worst(bf16(bf16(p * (dp - d_stored)).T @ q / hs**0.5), exact_dk),
        worst(bf16((p * (dp - d_stored)).T @ q / hs**0.5), exact_dk),
    )


def main():
    torch.manual_seed(1)
    print("real keys   out v3    dv v3     dk v3     dk v2")
    for real in (5, 10, 30, 70):
        rows = [draw(real) for _ in range(20)]
        print(f"{real:9d}  " + "  ".join(f"{max(r[c] for r in rows):8.2e}" for c in range(4)))


if __name__ == "__main__":
    main()
