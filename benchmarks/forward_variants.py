"""The forward kernel's two load paths side by side, and where the host time of one call goes.

    python benchmarks/forward_variants.py --out DIR

- Kernel time of the pointer path (SDPA_PASS_TMA=0) and the tensor-descriptor path
  (SDPA_PASS_TMA=1) for the FlashAttention benchmark shapes (L = S = N, batch 16384 / N,
  heads 2048 / D), causal and not, timed through CUDA graphs (``do_bench_cudagraph``) so the
  host's launch cost is not in the number. This is the measurement behind ``use_tma``'s rule.
- ``--masks``: kernel time of the two ways the forward reads attn_mask (SDPA_PASS_MASK_TMA=0:
  pointer loads; =1: a tensor descriptor, copied ahead like K and V) for the benchmark
  matrix's bool and float-bias inputs (``attention.py``'s random (N, N) bool mask and (1, H,
  N, N) ALiBi bias), hd 64/128/256, beside flex attention reading the same tensor, all
  through CUDA graphs. This is the measurement behind ``use_mask_tma``.
- Host cost per call (no GPU wait; ``--host-only``: this alone) of each layer for a small causal call: the Triton launch
  alone (fixed tiles), ``attention_forward_triton``, the ``torch.ops.sdpa_pass`` op, and the
  public ``attention`` function.
Writes ``forward_variants_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

import sdpa_pass.kernels.forward as fwd
from sdpa_pass.kernels import attention
from sdpa_pass.kernels.checks import CAUSAL_TOP_LEFT, check_attention_inputs


def kernel_tflops(B, H, N, D, causal, tma: str) -> dict:
    os.environ["SDPA_PASS_TMA"] = tma
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = attention(q, k, v, is_causal=causal)  # compiles and autotunes outside the graph
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    ms = do_bench_cudagraph(lambda: attention(q, k, v, is_causal=causal), rep=100,
                            return_mode="median")
    flops = 4 * B * H * N * N * D / (2 if causal else 1)
    return dict(B=B, H=H, N=N, D=D, causal=causal, path="tma" if tma == "1" else "pointer",
                tflops=flops / ms / 1e9, rel_err=err)


def mask_tflops(D: int, N: int, variant: str) -> list[dict]:
    """Ours with either mask path, and flex, on one shape of the matrix's bool / bias rows."""
    import attention as matrix  # benchmarks/attention.py: the matrix's inputs and flex peer

    shape = matrix.Shape(batch=max(1, 16384 // N), heads=2048 // D, seqlen=N, head_dim=D,
                         causal=False, variant=variant)
    x = matrix.make_inputs(shape, torch.bfloat16, torch.device("cuda"), requires_grad=False)
    ref = torch.nn.functional.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=x.attn_mask)
    flops = shape.flops
    rows = []
    for path, run in (("pointer", "0"), ("descriptor", "1"), ("flex", None)):
        if run is None:
            torch._dynamo.reset()  # flex compiles per shape: past the recompile limit otherwise
            fn = matrix.build_flex(x)
        else:
            os.environ["SDPA_PASS_MASK_TMA"] = run
            fn = matrix.build_ours(x)
        out = fn()  # compiles and autotunes outside the graph
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
        rows.append(dict(B=shape.batch, H=shape.heads, N=N, D=D, variant=variant, path=path,
                         tflops=flops / ms / 1e9, rel_err=err))
        print(rows[-1], flush=True)
    os.environ.pop("SDPA_PASS_MASK_TMA", None)
    return rows


def host_us(fn, calls=300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def host_costs(L=64) -> dict:
    os.environ.pop("SDPA_PASS_TMA", None)
    q, k, v = (torch.randn(1, 8, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    shape = check_attention_inputs(q, k, v, None, None, causal_align=CAUSAL_TOP_LEFT)
    out = torch.empty_like(q)
    lse = torch.empty(1, 8, L, device="cuda")
    cfg = fwd._default_gpu_config(128, q.dtype)
    scale = 128 ** -0.5

    def launch():
        grid = (triton_cdiv(L, cfg["BLOCK_M"]), 8)
        fwd._attention_fwd_kernel[grid](
            q, k, v, out, lse, q, q, q, scale * fwd.LOG2E, 0.0, 0.0, 1.0,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), 0, 0, 0, 0, 0, 0,
            *lse.stride()[:2], 8, L, L, 1, 0, -1, 0,
            HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_D=128, BLOCK_DV=128, MASK_KIND=0, HAS_KPM=False,
            IS_CAUSAL=True, HAS_WINDOW=False, HAS_SOFTCAP=False, NAN_ON_EMPTY=True,
            STORE_LSE=True, DROPOUT=False, DOT_UPCAST=False, DOT_PRECISION="tf32", TMA=False,
            MASK_TMA=False, FOLD_SCALE=True, NATURAL=False, REVERSE=True, PIPELINE=False,
            BATCH_INNER=False, **cfg)

    def triton_path():
        return fwd.attention_forward_triton(
            q, k, v, None, None, shape, scale=scale, causal_align=CAUSAL_TOP_LEFT, diagonal=0,
            window=-1, softcap=0.0, nan_on_empty=True, return_lse=True)

    def op():
        return torch.ops.sdpa_pass.attention_forward(q, k, v, None, None, scale, CAUSAL_TOP_LEFT,
                                                     0, -1, 0.0, True, True)

    return dict(L=L, launch_only_fixed_tiles=host_us(launch), attention_forward_triton=host_us(triton_path),
                op=host_us(op), attention=host_us(lambda: attention(q, k, v, is_causal=True)),
                sdpa=host_us(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True)))


def triton_cdiv(a, b):
    return (a + b - 1) // b


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--host-only", action="store_true", help="only the host cost per call")
    parser.add_argument("--masks", action="store_true",
                        help="only the two attn_mask paths (pointer / descriptor) against flex")
    parser.add_argument("--head-dims", default=None,
                        help="head dims (default: 128,64; with --masks 64,128,256)")
    parser.add_argument("--lengths", default=None,
                        help="sequence lengths (default: 1024,4096,16384; with --masks 1024,4096,8192)")
    args = parser.parse_args()
    if args.masks:
        return main_masks(args)
    rows = []
    head_dims = [int(d) for d in (args.head_dims or "128,64").split(",")]
    lengths = [int(n) for n in (args.lengths or "1024,4096,16384").split(",")]
    for D in () if args.host_only else head_dims:
        for N in lengths:
            for causal in (False, True):
                for tma in ("0", "1"):
                    rows.append(kernel_tflops(16384 // N, 2048 // D, N, D, causal, tma))
                    print(rows[-1], flush=True)
    host = host_costs()
    device = torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, triton=__import__("triton").__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "host_cost" if args.host_only else "forward_variants"
    path = args.out / f"{name}_{device.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps(dict(meta=meta, kernel=rows, host_us=host), indent=1))
    print(f"\n{device}, bf16, kernel time through CUDA graphs, TFLOP/s")
    print("| shape | causal | pointer | tma | tma / pointer |\n|:---|:---|---:|---:|---:|")
    for a, b in zip(rows[::2], rows[1::2]):
        print(f"| B{a['B']} H{a['H']} N{a['N']} D{a['D']} | {'yes' if a['causal'] else 'no'} | "
              f"{a['tflops']:.1f} | {b['tflops']:.1f} | {b['tflops'] / a['tflops']:.2f}x |")
    print("\nhost microseconds per call (L=64, causal, no GPU wait):", {k: round(v, 1) if isinstance(v, float) else v for k, v in host.items()})
    print("wrote", path)


def main_masks(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # for mask_tflops' attention.py
    rows = []
    for variant in ("bias", "bool"):
        for D in (int(d) for d in (args.head_dims or "64,128,256").split(",")):
            for N in (int(n) for n in (args.lengths or "1024,4096,8192").split(",")):
                rows += mask_tflops(D, N, variant)
    device = torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, triton=__import__("triton").__version__,
                settings={k: v for k, v in os.environ.items() if k.startswith("SDPA_PASS_")})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mask_paths_{device.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps(dict(meta=meta, kernel=rows), indent=1))
    print(f"\n{device}, bf16, non-causal, kernel time through CUDA graphs, TFLOP/s")
    print("| mask | shape | pointer | descriptor | flex | descriptor / pointer | descriptor / flex |")
    print("|:---|:---|---:|---:|---:|---:|---:|")
    for a, b, c in zip(rows[::3], rows[1::3], rows[2::3]):
        print(f"| {a['variant']} | B{a['B']} H{a['H']} N{a['N']} D{a['D']} | {a['tflops']:.1f} | "
              f"{b['tflops']:.1f} | {c['tflops']:.1f} | {b['tflops'] / a['tflops']:.2f}x | "
              f"{b['tflops'] / c['tflops']:.2f}x |")
    print("wrote", path)


if __name__ == "__main__":
    main()
