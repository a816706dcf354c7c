"""Host time per attention call alone and inside a chain, ours and SDPA's, on the GPU.

    python benchmarks/host_chain.py --out DIR

``host_time.py`` times one forward + backward under its own ``autograd.grad``; that call pays
the autograd engine's start and its hand-off to the CUDA device thread once (~95 us on the
H200 machine's host for a no-op ``autograd.Function``), where a model pays it once per step.
Here, for a few causal hd128 bf16 shapes: the host ms a call (best of loops issued without
synchronizing) of one call under its own ``autograd.grad`` (``host_one``), and per call of a
chain of 8 calls, each call's output the next one's query, under one ``autograd.grad`` as a
model's layers are (``host_chain_per_call``); then ``do_bench`` of both (host included),
per call. Ours (``sdpa_pass.kernels.attention``) and ``F.scaled_dot_product_attention`` as a
model calls it (``sdpa``: SDPA's own choice of backend), side by side.
Writes ``host_chain_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from host_time import host_ms  # benchmarks/host_time.py
from sdpa_pass.kernels import attention

SHAPES = ((1, 1, 128, 128), (32, 16, 512, 128), (16, 16, 1024, 128))  # (B, H, N, D), causal
CHAIN = 8


def measure(B: int, H: int, N: int, D: int) -> list[dict]:
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    g = torch.randn_like(q)
    impls = (("ours", lambda a, b, c: attention(a, b, c, is_causal=True)),
             ("sdpa", lambda a, b, c: F.scaled_dot_product_attention(a, b, c,
                                                                           is_causal=True)))
    rows = []
    for name, fn in impls:
        def one():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), g)

        def chain():
            x = q
            for _ in range(CHAIN):
                x = fn(x, k, v)
            return torch.autograd.grad(x, (q, k, v), g)

        for f in (one, chain):  # compiled, the launch plans made
            f()
            f()
        torch.cuda.synchronize()
        rows.append(dict(
            shape=[B, H, N, D], impl=name,
            host_one=min(host_ms(one, 3, 100) for _ in range(2)),
            host_chain_per_call=min(host_ms(chain, 3, 30) for _ in range(2)) / CHAIN,
            bench_one=do_bench(one), bench_chain_per_call=do_bench(chain) / CHAIN))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    rows = [row for shape in SHAPES for row in measure(*shape)]
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host_chain_{device}.json"
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, cuda=torch.version.cuda, dtype="bf16",
                chain=CHAIN, unit="ms per attention call (forward + backward)")
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
