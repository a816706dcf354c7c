"""What reading a padding row costs where it hides nothing: ours with no mask against ours with
an all-True (B, 1, 1, N) bool mask (HF's padding mask of a batch with no padding), forward and
forward + backward, non-causal and causal, in one process (the Gluon kernels on a Hopper GPU).

Run: ``python benchmarks/padding_overhead.py OUT.json`` (one GPU; about a minute on an H100).
TFLOP/s: 4·D per visible (query, key) pair, x3.5 for forward + backward; times from
``triton.testing.do_bench``. The JSON also holds each kernel's time per forward + backward
(``torch.profiler``, mean of 5 steps): where the time goes, the padding spans' prepass
included."""

from __future__ import annotations

import json
import sys

import torch
import triton

from sdpa_pass.kernels import attention

B, H, N, D = 8, 16, 4096, 128


def kernel_times(step, steps: int = 5) -> dict:
    """{kernel name: ms per step} of ``step`` under the profiler, after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times: dict = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:80]
            times[name] = times.get(name, 0.0) + event.device_time / 1e3 / steps
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def main(out: str) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
               for _ in range(3))
    row = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
    grad = torch.randn_like(q)
    results = {}
    for causal in (False, True):
        pairs = B * H * (N * (N + 1) // 2 if causal else N * N)
        for name, mask in (("nomask", None), ("fullrow", row)):
            ms = triton.testing.do_bench(lambda: attention(q, k, v, mask, is_causal=causal),
                                         warmup=50, rep=300)
            ms_bwd = triton.testing.do_bench(
                lambda: torch.autograd.grad(attention(q, k, v, mask, is_causal=causal),
                                            (q, k, v), grad), warmup=20, rep=300)
            rates = dict(fwd=4 * D * pairs / ms / 1e9, fwdbwd=3.5 * 4 * D * pairs / ms_bwd / 1e9)
            rates["kernels_ms"] = kernel_times(
                lambda: torch.autograd.grad(attention(q, k, v, mask, is_causal=causal),
                                            (q, k, v), grad))
            results[f"{name} causal={causal}"] = rates
            print(name, "causal" if causal else "none",
                  {key: round(value, 1) for key, value in rates.items() if key != "kernels_ms"},
                  {key[:40]: round(value, 3) for key, value in rates["kernels_ms"].items()},
                  flush=True)
    with open(out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, shape=dict(B=B, H=H, N=N, D=D),
                       tflops=results), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
