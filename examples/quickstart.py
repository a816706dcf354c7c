"""The main example: a hand-written GPT block, what the pass finds in it, and the optimized
model checked against eager.

Runs anywhere: on a GPU the rewritten attention runs sdpa_pass's Triton kernel; on a CPU it
runs the op's CPU path (PyTorch's fused CPU attention where it is exactly equivalent).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import sdpa_pass


class CausalSelfAttention(nn.Module):
    """As nanoGPT writes it (model.py, the non-flash branch)."""

    def __init__(self, n_embd: int, n_head: int, block_size: int):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd=128, n_head=4, block_size=256):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(2)]).to(device).eval()
    x = torch.randn(4, 200, 128, device=device)

    with torch.no_grad():
        expected = model(x)
        print(sdpa_pass.explain(model, x))
        sdpa_pass.optimize(model, backend="inductor" if device == "cuda" else "eager")
        got = model(x)
    err = (got - expected).abs().max().item()
    print(f"\nmax |optimized - eager| = {err:.2e} on {device}")
    if not err < 1e-4:
        raise SystemExit("FAILED: the optimized model differs from eager")
    print("OK: every attention site rewritten, outputs equal eager")


if __name__ == "__main__":
    main()
