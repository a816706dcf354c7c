"""Where a planned forward + backward's host time goes, on the GPU (a diagnostic).

    python benchmarks/host_split.py --out DIR

Host ms a call (best of loops of 100 calls issued without synchronizing, three rounds) for:
``fwdbwd`` the whole call; ``fwd`` the forward alone; ``launches_only`` the call's planned
launches alone (each remembered ``launch.KernelCall`` called again with its last arguments);
``stubbed_fwdbwd`` / ``stubbed_fwd`` with every planned launch stubbed out (our Python and
torch's, no kernels); ``engine_only_fwdbwd`` with the backward's body stubbed as well (the
autograd engine, its hand-off to the CUDA device thread and our autograd.Function). It
replaces ``KernelCall.__call__`` and ``ops._backward_checked`` for the stubbed rows, so it
follows those internals. Writes ``host_split_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from host_time import host_ms  # benchmarks/host_time.py
from sdpa_pass.kernels import attention, launch, ops

# (B, H, H_kv, N, D, causal, mask): mask None or "bias" (a (1, H, N, N) float bias)
ROWS = ((1, 1, 1, 128, 128, True, None), (32, 16, 16, 512, 128, True, None),
        (16, 16, 4, 1024, 128, True, None), (32, 16, 16, 512, 128, False, "bias"))


def measure(B, H, Hkv, N, D, causal, mask) -> dict:
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    g = torch.randn_like(q)
    m = torch.randn(1, H, N, N, device="cuda", dtype=torch.bfloat16) if mask == "bias" else None

    def f():
        return attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=H != Hkv)

    def fb():
        return torch.autograd.grad(f(), (q, k, v), g)

    real_call, real_backward = launch.KernelCall.__call__, ops._backward_checked
    recorded = []

    def recording(self, args):
        recorded.append((self, tuple(args)))
        real_call(self, args)

    fb()
    fb()
    torch.cuda.synchronize()
    launch.KernelCall.__call__ = recording
    try:
        fb()
        torch.cuda.synchronize()
    finally:
        launch.KernelCall.__call__ = real_call
    calls = list(recorded)

    def launches_only():
        for call, args in calls:
            call(args)

    def empty_grads(shape, *args):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty((0,))

    row = dict(shape=[B, H, Hkv, N, D, causal, mask], launches=len(calls))
    for _ in range(3):
        row.setdefault("fwdbwd", []).append(host_ms(fb, 3, 100))
        row.setdefault("fwd", []).append(host_ms(f, 3, 100))
        row.setdefault("launches_only", []).append(host_ms(launches_only, 3, 100))
        launch.KernelCall.__call__ = lambda self, args: None
        try:
            row.setdefault("stubbed_fwdbwd", []).append(host_ms(fb, 3, 100))
            row.setdefault("stubbed_fwd", []).append(host_ms(f, 3, 100))
            ops._backward_checked = empty_grads
            row.setdefault("engine_only_fwdbwd", []).append(host_ms(fb, 3, 100))
        finally:
            ops._backward_checked = real_backward
            launch.KernelCall.__call__ = real_call
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    rows = []
    for shape in ROWS:
        rows.append(measure(*shape))
        print(rows[-1]["shape"], " ".join(f"{k} {min(v):.3f}" for k, v in rows[-1].items()
                                          if isinstance(v, list) and k != "shape"), flush=True)
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host_split_{device}.json"
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, cuda=torch.version.cuda, dtype="bf16",
                unit="host ms a call, one value a round")
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
