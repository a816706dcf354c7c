"""Every tile config's time as the autotuner measured it, per kernel, forward and backward.

    python benchmarks/autotune_timings.py --out DIR [--lengths 1024,4096] [--head-dim 128]

For each length N (the FlashAttention benchmark shapes: batch 16384 / N, heads 2048 / D,
bf16), each mask (none, the benchmark matrix's (1, H, N, N) ALiBi bias, causal) and each
backward dQ path (split, atomic), it clears the tuning caches, runs one forward + backward
(which tunes the forward, dK/dV and dQ kernels for that shape) and records each config's
time from Triton's ``Autotuner.configs_timings``. This says whether the tuned choice depends
on N (the forward's autotuning key has a length class; the backward's has none) and how
far apart the configs are. Writes ``autotune_timings_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import attention as bench  # benchmarks/attention.py: the matrix's ALiBi bias
import sdpa_pass.kernels.backward as bwd
import sdpa_pass.kernels.forward as fwd
from sdpa_pass.kernels import attention
from sdpa_pass.kernels.launch import clear_plans

TUNERS = {"fwd": (fwd._attention_fwd_autotuned, fwd._FORWARD),
          "dkdv": (bwd._bwd_dkdv_autotuned, bwd._DKDV),
          "dkdv_dq": (bwd._bwd_dkdv_dq_autotuned, bwd._DKDV_DQ),
          "dq": (bwd._bwd_dq_autotuned, bwd._DQ)}


def tune_once(N: int, D: int, mask: str) -> dict[str, dict[str, float]]:
    for tuner, tuned in TUNERS.values():
        tuner.cache.clear()
        tuner.configs_timings = None
        tuned.chosen.clear()
    clear_plans()
    B, H = max(1, 16384 // N), 2048 // D
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    bias = bench.alibi_bias(H, N, torch.bfloat16, torch.device("cuda")) if mask == "bias" else None
    out = attention(q, k, v, attn_mask=bias, is_causal=mask == "causal")
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    timings = {}
    for name, (tuner, _) in TUNERS.items():
        if tuner.configs_timings:
            ms = {f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.num_warps}x{c.num_stages}":
                  (t[0] if isinstance(t, (list, tuple)) else t)
                  for c, t in tuner.configs_timings.items()}
            timings[name] = dict(sorted(ms.items(), key=lambda kv: kv[1]))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"autotune_timings_{device}.json"
    cases = {}
    for N in map(int, args.lengths.split(",")):
        for mask in ("none", "bias", "causal"):
            for dq_path in ("split", "atomic"):
                os.environ["SDPA_PASS_BWD_DQ"] = dq_path
                case = f"N{N} {mask} {dq_path}"
                cases[case] = tune_once(N, args.head_dim, mask)
                for name, ms in cases[case].items():
                    print(case, name, " ".join(f"{c}:{t:.3f}" for c, t in list(ms.items())[:8]),
                          flush=True)
                path.write_text(json.dumps(dict(
                    device=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=__import__("triton").__version__, head_dim=args.head_dim,
                    unit="ms (the autotuner's median)", cases=cases), indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
