"""The backward's two ways of forming dQ side by side, timed on the GPU.

    python benchmarks/backward_variants.py --out DIR [--head-dims 64,128] [--lengths 1024,4096]

- ``split`` (SDPA_PASS_BWD_DQ=split, SDPA_PASS_GLUON_FUSED_DQ=0): the dK/dV kernel, then a
  dQ kernel that recomputes the scores and dP for its query tile: 7 matrix products per tile
  pair, no atomics.
- ``atomic`` (SDPA_PASS_BWD_DQ=atomic): the dK/dV kernel also adds dS·K into an fp32 dQ
  accumulator with atomics: 5 products, plus the adds' traffic to L2.
- ``fused`` (SDPA_PASS_GLUON_FUSED_DQ=1; hd64 / hd128 on Hopper, with ``:pad``): the Gluon dK/dV
  kernel forms dQ too, reduce-added by the copy engine (session 30; the hd128 default from
  session 31, at hd64 from session 32).
- either with ``:tma`` / ``:ptr``: the dK/dV kernel's Q, dO, K, V loads (and dQ adds) through
  tensor descriptors or pointers (SDPA_PASS_BWD_TMA=1 / 0).
- either with ``:pad``: the row statistics padded to whole query tiles and loaded unmasked
  (SDPA_PASS_BWD_PADDED_ROWS=1, the library's default); a path without it runs the masked
  loads (=0), so each path names one layout whatever the default.
- either with ``:batch``: programs taken batch element first where the mask broadcasts over
  the batch (SDPA_PASS_BATCH_INNER=1, the library's default; without it =0, the plain order).
- either with ``:tiles``, ``:heads`` or ``:groups``: the Gluon dK/dV kernel's program order
  (SDPA_PASS_GLUON_BWD_ORDER; without one, the library's choice).
- either with ``:s<n>`` / ``:g<n>``: the Gluon backward kernels' Q / dO ring of n slots
  (``gluon_backward.STAGES``) / the dK/dV kernel's groups of n heads (``GROUP_HEADS``).
  Flags combine: ``split:ptr:pad:batch``, ``fused:pad:tiles``, ``fused:pad:s3``.

For the FlashAttention benchmark shapes (batch 16384 / N, heads 2048 / D, L = S = N, bf16),
causal and not, it times forward alone and forward + backward through CUDA graphs
(``do_bench_cudagraph``, so host launch cost is not in the numbers), reports the backward's
TFLOP/s (its time is the difference; 2.5x the forward's matrix work, FlashAttention's
convention) and forward + backward's, and the gradients' largest relative error against SDPA's
(flash) gradients for the same inputs. Writes ``backward_variants_<device>.json``.

- ``--masks none,bias,bool``: besides the unmasked calls (causal and not; ``causal``: the
  causal ones alone), the benchmark
  matrix's masks (``attention.py``: a (1, H, N, N) ALiBi bias, a random (N, N) bool mask),
  non-causal; the reference is SDPA's efficient backend there (flash takes no mask).
- ``--flex``: flex attention on the same inputs (the mask read as ``attention.py`` has it
  read), timed the same way, in the same row.
- ``--profile``: for each row, the CUDA time of each kernel of one forward + backward call
  (``torch.profiler``), ours and flex: where the backward's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench_cudagraph

import attention as bench  # benchmarks/attention.py: the matrix's masks and its flex peer
import sdpa_pass.kernels.backward as bwd
import sdpa_pass.kernels.gluon_backward as gbwd
from sdpa_pass.kernels import attention, launch
from sdpa_pass.kernels.gluon_backward import ORDERS  # the dK/dV kernel's program orders

STAGES, GROUP_HEADS = gbwd.STAGES, gbwd.GROUP_HEADS  # the library's, restored after a knob


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_mask(kind: str, H: int, N: int) -> torch.Tensor | None:
    if kind == "bias":
        return bench.alibi_bias(H, N, torch.bfloat16, torch.device("cuda"))
    if kind == "bool":
        return bench.random_bool_mask(N, torch.device("cuda"))
    return None


def kernel_times(fn, calls: int = 3) -> dict[str, float]:
    """Per-kernel CUDA time (ms per call) of ``fn``, from torch.profiler, largest first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:60]
            times[name] = times.get(name, 0.0) + event.device_time / 1e3 / calls
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def measure(B: int, H: int, N: int, D: int, causal: bool, variant: str, mask: str = "none",
            flex: bool = False, profile: bool = False) -> dict:
    path, *flags = variant.split(":")
    # sN / gN: the Gluon backward's Q / dO ring slots (STAGES) / heads a group (GROUP_HEADS)
    knobs = {f[0]: int(f[1:]) for f in flags if f[:1] in "sg" and f[1:].isdigit()}
    unknown = set(flags) - {"tma", "ptr", "pad", "batch", *ORDERS} - {
        f"{name}{value}" for name, value in knobs.items()}
    if unknown:
        raise SystemExit(f"unknown path flag(s) {sorted(unknown)} in {variant!r}")
    gbwd.STAGES, gbwd.GROUP_HEADS = knobs.get("s", STAGES), knobs.get("g", GROUP_HEADS)
    launch.clear_plans()  # (the plans' keys do not hold these two)
    # fused: the Gluon dK/dV kernel forms dQ too (SDPA_PASS_GLUON_FUSED_DQ=1; hd128, where the
    # Gluon kernels run: with :pad), else the path SDPA_PASS_BWD_DQ names
    os.environ["SDPA_PASS_BWD_DQ"] = "split" if path == "fused" else path
    os.environ["SDPA_PASS_GLUON_FUSED_DQ"] = "1" if path == "fused" else "0"
    os.environ["SDPA_PASS_BWD_TMA"] = "1" if "tma" in flags else "0" if "ptr" in flags else ""
    os.environ["SDPA_PASS_BWD_PADDED_ROWS"] = "1" if "pad" in flags else "0"
    os.environ["SDPA_PASS_BATCH_INNER"] = "1" if "batch" in flags else "0"
    os.environ["SDPA_PASS_GLUON_BWD_ORDER"] = next((o for o in ORDERS if o in flags), "")
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    attn_mask = make_mask(mask, H, N)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION if attn_mask is None
                     else SDPBackend.EFFICIENT_ATTENTION):
        ref = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal), (q, k, v), g)

    def fwd():
        return attention(q, k, v, attn_mask=attn_mask, is_causal=causal)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), (q, k, v), g)

    ours = fwd_bwd()  # compiles and autotunes outside the graphs
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    flops = 4 * B * H * N * N * D / (2 if causal else 1)
    row = dict(B=B, H=H, N=N, D=D, causal=causal, mask=mask, path=variant,
               rel_err_dq=errs[0], rel_err_dk=errs[1], rel_err_dv=errs[2])
    impls = {"ours": (fwd, fwd_bwd)}
    if flex:
        flex_fwd = bench.build_flex(bench.Inputs(q, k, v, causal, attn_mask))
        impls["flex"] = (flex_fwd, lambda: torch.autograd.grad(flex_fwd(), (q, k, v), g))
        impls["flex"][1]()
    for name, (f, fb) in impls.items():
        prefix = "" if name == "ours" else name + "_"
        ms_fwd = do_bench_cudagraph(f, rep=100, return_mode="median")
        ms_all = do_bench_cudagraph(fb, rep=100, return_mode="median")
        row.update({prefix + "ms_fwd": ms_fwd, prefix + "ms_fwdbwd": ms_all,
                    prefix + "fwd_tflops": flops / ms_fwd / 1e9,
                    prefix + "bwd_tflops": 2.5 * flops / (ms_all - ms_fwd) / 1e9,
                    prefix + "fwdbwd_tflops": 3.5 * flops / ms_all / 1e9})
        if profile:
            row[prefix + "kernels_ms"] = kernel_times(fb)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--paths", default="split,atomic",
                        help="comma-separated dQ paths (split, atomic, or fused: "
                             "SDPA_PASS_GLUON_FUSED_DQ=1), each optionally with :tma or :ptr "
                             "(SDPA_PASS_BWD_TMA=1 / 0) for the dK/dV kernel's loads and "
                             ":pad (SDPA_PASS_BWD_PADDED_ROWS=1), :batch (SDPA_PASS_BATCH_INNER=1) "
                             "and :tiles / :heads / :groups (SDPA_PASS_GLUON_BWD_ORDER), "
                             ":s<n> / :g<n> (gluon_backward.STAGES / GROUP_HEADS)")
    parser.add_argument("--masks", default="none",
                        help="comma-separated: none (causal and not), causal (alone), bias, "
                             "bool (not causal)")
    parser.add_argument("--flex", action="store_true", help="flex attention in the same rows")
    parser.add_argument("--profile", action="store_true",
                        help="per-kernel CUDA time of one forward + backward call")
    args = parser.parse_args()
    rows = []
    for D in map(int, args.head_dims.split(",")):
        for N in map(int, args.lengths.split(",")):
            for mask in args.masks.split(","):
                for causal in {"none": (False, True), "causal": (True,)}.get(mask, (False,)):
                    for path in args.paths.split(","):
                        row = measure(max(1, 16384 // N), 2048 // D, N, D, causal, path, mask,
                                      args.flex, args.profile)
                        rows.append(row)
                        peer = (f" | flex fwd {row['flex_fwd_tflops']:6.1f} bwd "
                                f"{row['flex_bwd_tflops']:6.1f} fwd+bwd "
                                f"{row['flex_fwdbwd_tflops']:6.1f}" if args.flex else "")
                        print(f"D{D} N{N} {'causal' if causal else mask:6s} {path:14s} "
                              f"fwd {row['fwd_tflops']:6.1f} bwd {row['bwd_tflops']:6.1f} fwd+bwd {row['fwdbwd_tflops']:6.1f}"
                              f"{peer} TFLOP/s  err dq {row['rel_err_dq']:.1e} dk "
                              f"{row['rel_err_dk']:.1e} dv {row['rel_err_dv']:.1e}", flush=True)
                        for key in ("kernels_ms", "flex_kernels_ms"):
                            for kernel, ms in list(row.get(key, {}).items())[:6]:
                                print(f"    {key[:-11] or 'ours'} {ms:8.3f} ms  {kernel}")
    chosen = {name: {str(key): cfg for key, cfg in kernel.chosen.items()}
              for name, kernel in (("dkdv", bwd._DKDV), ("dkdv_dq", bwd._DKDV_DQ),
                                   ("dq", bwd._DQ))}
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    masks = "" if args.masks == "none" else "_" + args.masks.replace(",", "-")
    out = args.out / f"backward_variants{masks}_{device}.json"
    out.write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=__import__("triton").__version__, rows=rows, chosen=chosen), indent=1,
        default=str))
    print("wrote", out)


if __name__ == "__main__":
    main()
