"""The main example: sdpa_pass's fused attention kernel against PyTorch SDPA.

Runs on a GPU, or on CPU through Triton's interpreter (TRITON_INTERPRET=1). Prints the largest
difference from ``F.scaled_dot_product_attention`` for a few of the kernel's features.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # triton.jit reads this when the kernels are defined, so before sdpa_pass is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

import sdpa_pass  # noqa: E402


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16
    torch.manual_seed(0)
    B, Hq, Hkv, L, S, D = 2, 8, 2, 48, 80, 64
    q = torch.randn(B, Hq, L, D, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
    padding = torch.rand(B, 1, 1, S, device=device) > 0.2
    padding[..., 0] = True

    # SDPA's CPU kernels want fp32 for these comparisons to be tight; compare in fp32.
    f32 = lambda *ts: [t.float() for t in ts]  # noqa: E731
    cases = {
        "plain": (dict(), dict()),
        "causal (top-left)": (dict(is_causal=True), dict(is_causal=True)),
        "causal (bottom-right, KV cache)": (dict(causal="bottom_right"),
                                            dict(attn_mask=causal_lower_right(L, S))),
        "padding mask, bool": (dict(attn_mask=padding), dict(attn_mask=padding)),
    }
    print(f"device={device} dtype={dtype} B={B} Hq={Hq} Hkv={Hkv} (GQA) L={L} S={S} D={D}")
    worst = 0.0
    for name, (ours_kw, sdpa_kw) in cases.items():
        ours = sdpa_pass.kernels.attention(q, k, v, enable_gqa=True, **ours_kw)
        ref = F.scaled_dot_product_attention(*f32(q, k, v), enable_gqa=True, **sdpa_kw)
        err = (ours.float() - ref).abs().max().item()
        worst = max(worst, err)
        print(f"  {name:34s} max |ours - SDPA| = {err:.2e}")
    if worst > 1e-2:
        raise SystemExit(f"FAILED: difference {worst:.2e} is over fp16 tolerance")
    print("OK: sdpa_pass.kernels.attention matches F.scaled_dot_product_attention")


if __name__ == "__main__":
    main()
