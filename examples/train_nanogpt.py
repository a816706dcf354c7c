"""Train a nanoGPT-style model through the pass, checked step by step against an eager copy.

The attention is karpathy/nanoGPT's model.py non-flash branch: a `tril` buffer, `masked_fill`
with -inf, softmax, attention dropout, `@ v`. `sdpa_pass.optimize` rewrites it onto the fused
op, whose backward kernels then train the model. Dropout is 0 so the eager copy is
deterministic and the two runs must give the same loss at every step.

    python examples/train_nanogpt.py [--device cpu|cuda] [--steps 4] [--n-layer 2]
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import sdpa_pass

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. "
    "All: Speak, speak. First Citizen: You are all resolved rather to die than to famish? "
    "All: Resolved. resolved. First Citizen: First, you know Caius Marcius is chief enemy to the people. "
)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
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
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, dropout=0.0):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([Block(n_embd, n_head, block_size, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT], dtype=torch.long)
    eager = GPT(len(chars), args.block_size, args.n_layer, args.n_head, args.n_embd, dropout=0.0).to(device)
    model = copy.deepcopy(eager)

    def batch():
        start = torch.randint(len(data) - args.block_size - 1, (args.batch_size,))
        x = torch.stack([data[i:i + args.block_size] for i in start])
        y = torch.stack([data[i + 1:i + 1 + args.block_size] for i in start])
        return x.to(device), y.to(device)

    x, y = batch()
    report = sdpa_pass.explain(copy.deepcopy(model), x, y)
    print(report)
    if report.num_rewritten != args.n_layer or len(report.sites) != args.n_layer:
        raise SystemExit(f"FAILED: expected {args.n_layer} rewritten attention sites")

    # Inductor on a GPU; on a CPU, aot_eager (AOTAutograd without Inductor's C++ compile) keeps
    # the example a few seconds long
    sdpa_pass.optimize(model, backend="inductor" if device.type == "cuda" else "aot_eager")
    opt_eager = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    worst = 0.0
    for step in range(args.steps):
        x, y = batch()
        losses = []
        for m, o in ((eager, opt_eager), (model, opt)):
            loss = m(x, y)
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
            losses.append(loss.item())
        diff = abs(losses[0] - losses[1])
        worst = max(worst, diff)
        print(f"step {step}: loss eager {losses[0]:.6f}  optimized {losses[1]:.6f}  |diff| {diff:.1e}")
    # fp32 on both sides; what remains is accumulation order, compounded by a few AdamW steps
    if not worst < 1e-4:
        raise SystemExit(f"FAILED: losses differ from eager by {worst:.2e}")
    print(f"OK: {args.steps} training steps through {report.num_rewritten} rewritten attention sites, "
          f"losses equal eager (max diff {worst:.1e}) on {device}")


if __name__ == "__main__":
    main()
