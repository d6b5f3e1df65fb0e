"""Reference values for tests/ops_gradcheck.rs (adamw_matches_pytorch): three steps of
torch.optim.AdamW in float64 on a 4-element parameter. Prints the parameter, exp_avg and
exp_avg_sq after each step; the test embeds these numbers.

Run: ${PYTHON:-python3} scripts/adamw_reference.py
"""

import torch

torch.set_default_dtype(torch.float64)
param = torch.tensor([0.5, -1.25, 2.0, 0.0], requires_grad=True)
opt = torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
grads = [[0.1, -0.2, 0.3, -0.4], [-0.05, 0.5, 0.25, 1e-3], [0.2, 0.2, -0.7, 0.0]]
for step, grad in enumerate(grads, start=1):
    param.grad = torch.tensor(grad)
    opt.step()
    state = opt.state[param]
    print(f"step {step}")
    print("  param     ", repr(param.detach().tolist()))
    print("  exp_avg   ", repr(state["exp_avg"].tolist()))
    print("  exp_avg_sq", repr(state["exp_avg_sq"].tolist()))
