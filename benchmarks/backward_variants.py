"""The backward's two ways of forming dQ side by side, timed on the GPU.

    python benchmarks/backward_variants.py --out DIR [--head-dims 64,128] [--lengths 1024,4096]

- ``split`` (SDPA_PASS_BWD_DQ=split): the dK/dV kernel, then a dQ kernel that recomputes the
  scores and dP for its query tile: 7 matrix products per tile pair, no atomics.
- ``atomic`` (SDPA_PASS_BWD_DQ=atomic): the dK/dV kernel also adds dS·K into an fp32 dQ
  accumulator with atomics: 5 products, plus the adds' traffic to L2.
- either with ``:tma`` / ``:ptr``: the dK/dV kernel's Q, dO, K, V loads (and dQ adds) through
  tensor descriptors or pointers (SDPA_PASS_BWD_TMA=1 / 0).

For the FlashAttention benchmark shapes (batch 16384 / N, heads 2048 / D, L = S = N, bf16),
causal and not, it times forward alone and forward + backward through CUDA graphs
(``do_bench_cudagraph``, so host launch cost is not in the numbers), reports the backward's
TFLOP/s (its time is the difference; 2.5x the forward's matrix work, FlashAttention's
convention) and forward + backward's, and the gradients' largest relative error against SDPA's
(flash) gradients for the same inputs. Writes ``backward_variants_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

import sdpa_pass.kernels.backward as bwd
from sdpa_pass.kernels import attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(B: int, H: int, N: int, D: int, causal: bool, variant: str) -> dict:
    path, _, loads = variant.partition(":")
    os.environ["SDPA_PASS_BWD_DQ"] = path
    os.environ["SDPA_PASS_BWD_TMA"] = {"tma": "1", "ptr": "0", "": ""}[loads]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    ref = torch.autograd.grad(
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), g)

    def fwd():
        return attention(q, k, v, is_causal=causal)

    def fwd_bwd():
        return torch.autograd.grad(attention(q, k, v, is_causal=causal), (q, k, v), g)

    ours = fwd_bwd()  # compiles and autotunes outside the graphs
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    ms_fwd = do_bench_cudagraph(fwd, rep=100, return_mode="median")
    ms_all = do_bench_cudagraph(fwd_bwd, rep=100, return_mode="median")
    flops = 4 * B * H * N * N * D / (2 if causal else 1)
    return dict(B=B, H=H, N=N, D=D, causal=causal, path=variant, ms_fwd=ms_fwd, ms_fwdbwd=ms_all,
                bwd_tflops=2.5 * flops / (ms_all - ms_fwd) / 1e9,
                fwdbwd_tflops=3.5 * flops / ms_all / 1e9,
                rel_err_dq=errs[0], rel_err_dk=errs[1], rel_err_dv=errs[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--paths", default="split,atomic",
                        help="comma-separated dQ paths, each optionally with :tma or :ptr "
                             "(SDPA_PASS_BWD_TMA=1 / 0) for the dK/dV kernel's loads")
    args = parser.parse_args()
    rows = []
    for D in map(int, args.head_dims.split(",")):
        for N in map(int, args.lengths.split(",")):
            for causal in (False, True):
                for path in args.paths.split(","):
                    row = measure(max(1, 16384 // N), 2048 // D, N, D, causal, path)
                    rows.append(row)
                    print(f"D{D} N{N} {'causal' if causal else 'full  '} {path:10s} "
                          f"bwd {row['bwd_tflops']:6.1f} fwd+bwd {row['fwdbwd_tflops']:6.1f} "
                          f"TFLOP/s  err dq {row['rel_err_dq']:.1e} dk {row['rel_err_dk']:.1e} "
                          f"dv {row['rel_err_dv']:.1e}", flush=True)
    chosen = {name: {str(key): cfg for key, cfg in kernel.chosen.items()}
              for name, kernel in (("dkdv", bwd._DKDV), ("dkdv_dq", bwd._DKDV_DQ),
                                   ("dq", bwd._DQ))}
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"backward_variants_{device}.json"
    out.write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=__import__("triton").__version__, rows=rows, chosen=chosen), indent=1,
        default=str))
    print("wrote", out)


if __name__ == "__main__":
    main()
