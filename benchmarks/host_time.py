"""Host time of eager ``attention`` calls: one forward, and one forward + backward, on the GPU.

    python benchmarks/host_time.py --label new --out DIR

For a few shapes (tiny ones, where only the host counts, and N = 512 / 1024 at hd128, where
the host can be as long as the kernels; without a mask, with a float bias or a bool mask, and
GQA), the best of 5 loops of 200 calls issued without
synchronizing (the host's time per call when it is the bottleneck), then ``do_bench`` (host
included) and ``do_bench_cudagraph`` (kernels only) of forward + backward. Where the two
differ, the host is what ``attention.py``'s numbers measure; ``kernels_ms`` (torch.profiler: each
kernel's GPU time per forward + backward, ``kernel_sum_ms`` their sum) says which kernel the
GPU time goes to. Run it with
SDPA_PASS_AUTOTUNE=0 to compare host code (fixed tiles, no tuning runs); compare two
versions by running each copy of the package in turn on the same machine, more than once:
on the H100 machine one loop's time varies by +-30% between runs.
Writes ``host_time_<label>_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

from backward_variants import kernel_times  # benchmarks/backward_variants.py
from sdpa_pass.kernels import attention

# (B, H, H_kv, N, D, causal, mask): mask None, "bias" (a (1, H, N, N) float bias) or "bool"
# (an (N, N) bool mask); H_kv < H is grouped-query attention.
SHAPES = ((1, 1, 1, 128, 128, True, None), (1, 1, 1, 128, 64, False, None),
          (1, 2, 2, 128, 128, False, "bias"), (1, 2, 2, 128, 64, False, "bool"),
          (16, 16, 16, 1024, 128, True, None), (16, 16, 16, 1024, 128, False, None),
          (32, 16, 16, 512, 128, True, None), (32, 16, 16, 512, 128, False, "bias"),
          (16, 32, 8, 1024, 128, True, None),
          # the forward + backward matrix's GQA row at N = 512 (host-bound there)
          (32, 16, 4, 512, 128, True, None),
          # the other matrix rows below flex on the H200 (session 28): GQA at 1k and 2k (the
          # same 1.2 ms a call at both), no mask and a bool mask at 512
          (16, 16, 4, 1024, 128, True, None), (8, 16, 4, 2048, 128, True, None),
          (32, 16, 16, 512, 128, False, None), (32, 16, 16, 512, 128, False, "bool"))


def host_ms(fn, loops: int = 5, calls: int = 200) -> float:
    best = float("inf")
    for _ in range(loops):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
        torch.cuda.synchronize()
    return best * 1e3


def measure(B: int, H: int, Hkv: int, N: int, D: int, causal: bool, mask) -> dict:
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    g = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    attn_mask = None
    if mask == "bias":
        attn_mask = torch.randn(1, H, N, N, device="cuda", dtype=torch.bfloat16)
    elif mask == "bool":
        attn_mask = torch.rand(N, N, device="cuda") > 0.2

    def fwd():
        return attention(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=H != Hkv)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), (q, k, v), g)

    fwd_bwd()
    fwd_bwd()  # compiled, and the launch plans made
    ms, ms_graph = do_bench(fwd_bwd, warmup=25, rep=200), do_bench_cudagraph(fwd_bwd, rep=100)
    flops = 3.5 * 4 * B * H * N * N * D / (2 if causal else 1)
    kernels = kernel_times(fwd_bwd)
    return dict(B=B, H=H, H_kv=Hkv, N=N, D=D, causal=causal, mask=mask, host_fwd_ms=host_ms(fwd),
                host_fwdbwd_ms=host_ms(fwd_bwd), do_bench_ms=ms, cudagraph_ms=ms_graph,
                do_bench_tflops=flops / ms / 1e9, cudagraph_tflops=flops / ms_graph / 1e9,
                kernel_sum_ms=sum(kernels.values()), kernels_ms=kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--label", default="run")
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        rows.append(measure(*shape))
        print(args.label, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in rows[-1].items() if k != "kernels_ms"), flush=True)
        kernels = rows[-1]["kernels_ms"].items()
        print("  kernels (ms):", ", ".join(f"{name} {t:.3f}" for name, t in kernels), flush=True)
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host_time_{args.label}_{device}.json"
    path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                    triton=__import__("triton").__version__, label=args.label,
                                    rows=rows), indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
