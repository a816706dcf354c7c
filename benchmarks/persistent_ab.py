"""The Gluon forward's persistent kernel against its one-tile-a-CTA kernel, on the GPU.

    python benchmarks/persistent_ab.py --out DIR [--head-dims 64,128] [--lengths 512,4096]
                                       [--rounds 3] [--label NAME]

Forward alone, FlashAttention's benchmark shapes (batch 16384 / N, heads 2048 / D, L = S = N,
bf16), causal and not, plus GQA 4:1 causal at hd128. Variants, in one process, timed in
alternating order over ``--rounds`` rounds (each keeps its fastest):

- ``tile``: ``_attention_fwd_ws``, a CTA per 128 query rows (SDPA_PASS_GLUON_PERSISTENT=0);
- ``persistent``: ``_attention_fwd_persistent``, one CTA per SM walking the work tiles (=1);
  ``:q1`` with one Q buffer a consumer (``PERSISTENT_Q_BUFFERS``) instead of two;
- at head dim 64 under ``gluon_forward.HD64_MIN_KEYS`` keys, the Triton forward (``triton``)
  and both Gluon kernels with their hd64 bounds lifted (``:short``; the library's own bounds,
  ``HD64_MIN_KEYS`` and ``HD64_PERSISTENT_MIN_KEYS``, came from these rows in session 34);
- ``sdpa_cudnn``: SDPA's cuDNN backend, the peer.

Each time is ``do_bench`` (the benchmark matrix's: host in the time, L2 cleared) and
``do_bench_cudagraph`` (kernel time). Outputs are checked against SDPA's (flash) first: a
relative error above 2e-2 fails the row. Writes ``persistent_ab[_<label>]_<device>.json``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import triton
from triton.testing import do_bench, do_bench_cudagraph

import sdpa_pass.kernels.forward as fwd
import sdpa_pass.kernels.gluon_forward as gfwd
from sdpa_pass.kernels import attention

from attention import rel_err  # benchmarks/attention.py: the matrix's check
from gluon_fwd_probe import write_result  # benchmarks/gluon_fwd_probe.py

# the library's hd64 bounds, restored after lifted ones
HD64_MIN_KEYS, HD64_PERSISTENT_MIN_KEYS = gfwd.HD64_MIN_KEYS, gfwd.HD64_PERSISTENT_MIN_KEYS
Q_BUFFERS = gfwd.PERSISTENT_Q_BUFFERS


def variant_runner(name: str, q, k, v, causal: bool, gqa: bool):
    """A no-argument callable running ``name`` on these inputs, the library's state set for
    it (environment, HD64_MIN_KEYS) and its compiled launches forgotten."""
    if name == "sdpa_cudnn":
        def run():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                      enable_gqa=gqa)
        return run
    kernel, *flags = name.split(":")
    os.environ["SDPA_PASS_GLUON_PERSISTENT"] = "1" if kernel == "persistent" else "0"
    short = "short" in flags
    gfwd.HD64_MIN_KEYS = 0 if short else HD64_MIN_KEYS
    gfwd.HD64_PERSISTENT_MIN_KEYS = ({False: 0, True: 0} if short
                                     else HD64_PERSISTENT_MIN_KEYS)
    gfwd.PERSISTENT_Q_BUFFERS = 1 if "q1" in flags else Q_BUFFERS
    if kernel == "triton":
        os.environ["SDPA_PASS_GLUON"] = "0"
    else:
        os.environ.pop("SDPA_PASS_GLUON", None)
    gfwd._GLUON_CALLS.clear()
    fwd._FORWARD_PLANS.clear()
    return lambda: attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def measure(D: int, N: int, causal: bool, gqa: bool, rounds: int) -> list[dict]:
    B, H = max(1, 16384 // N), 2048 // D
    Hkv = H // 4 if gqa else H
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    names = ["tile", "persistent", "persistent:q1", "sdpa_cudnn"]
    if D == 64 and N < 4096:
        names = ["triton", "tile:short", "persistent:short", "persistent:short:q1",
                 "sdpa_cudnn"]
    flops = 4 * B * H * N * N * D / (2 if causal else 1)
    rows = {name: dict(D=D, N=N, B=B, H=H, Hkv=Hkv, causal=causal, name=name, ms=[],
                       graph_ms=[]) for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            row = rows[name]
            try:
                run = variant_runner(name, q, k, v, causal, gqa)
                if r == 0:
                    row["rel_err"] = rel_err(run(), ref)
                    if row["rel_err"] > 2e-2:
                        raise AssertionError(f"relative error {row['rel_err']:.2e}")
                row["ms"].append(do_bench(run, warmup=25, rep=100))
                row["graph_ms"].append(do_bench_cudagraph(run, rep=100))
            except Exception as exc:  # noqa: BLE001 - a failing variant is a result
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                torch.cuda.synchronize()
    out = []
    for row in rows.values():
        if row["ms"]:
            row["tflops"] = flops / min(row["ms"]) / 1e9
            row["graph_tflops"] = flops / min(row["graph_ms"]) / 1e9
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    result = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                  dtype="bf16", rows=[])
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for D in (int(d) for d in args.head_dims.split(",")):
        forms = [(False, False), (True, False)] + ([(True, True)] if D == 128 else [])
        for causal, gqa in forms:
            for N in (int(n) for n in args.lengths.split(",")):
                rows = measure(D, N, causal, gqa, args.rounds)
                result["rows"].extend(rows)
                text = "  ".join(
                    f"{r['name']} {r.get('tflops', 0):.1f}/{r.get('graph_tflops', 0):.1f}"
                    + (f" ERR {r['error'][:60]}" if "error" in r else "") for r in rows)
                print(f"hd{D} N{N} {'gqa' if gqa else 'causal' if causal else 'none'}: {text}",
                      flush=True)
    write_result(args.out, "persistent_ab", args.label, device, result)


if __name__ == "__main__":
    main()
