"""The Gluon forward's persistent kernel against its one-tile-a-CTA kernel, on the GPU.

    python benchmarks/persistent_ab.py --out DIR [--head-dims 64,128] [--lengths 512,4096]
                                       [--rounds 3] [--label NAME] [--backward] [--profile]

Forward alone, FlashAttention's benchmark shapes (batch 16384 / N, heads 2048 / D, L = S = N,
bf16), causal and not, plus GQA 4:1 causal at hd128 (``--forms``; ``padded`` /
``padded_causal``: HF's padding row, ``padding_row``; the rate counts every pair, padded or
not). Variants, in one process, timed in
alternating order over ``--rounds`` rounds (each keeps its fastest):

- ``tile``: ``_attention_fwd_ws``, a CTA per 128 query rows (SDPA_PASS_GLUON_PERSISTENT=0);
- ``persistent``: ``_attention_fwd_persistent``, one CTA per SM walking the work tiles (=1);
  ``:q1`` with one Q buffer a consumer (``PERSISTENT_Q_BUFFERS``) instead of two;
- at head dim 64 under ``gluon_forward.HD64_MIN_KEYS`` keys, the Triton forward (``triton``)
  and both Gluon kernels with their hd64 bounds lifted (``:short``; the library's own bounds,
  ``HD64_MIN_KEYS`` and ``HD64_PERSISTENT_MIN_KEYS``, came from these rows in session 34);
- ``sdpa_cudnn``: SDPA's cuDNN backend, the peer;
- ``--variants``: other names, flags after ``:`` (``s3``: three K / V ring slots,
  ``bn256``: 256-key tiles at head dim 64, ``split``: with ``--backward``, dQ by the Gluon dQ
  kernel instead of the dK/dV kernel's reduce-adds; the library's own choices otherwise).

``--backward`` times forward + backward (dQ, dK, dV from a fixed dO, the matrix's
``with_backward``; the rate counts 2.5 forwards) for ``tile``, ``persistent`` and cuDNN.
``--profile`` adds each variant's kernels (``backward_variants.kernel_times``: torch.profiler,
ms a call) to its row.

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

import sdpa_pass.kernels.gluon_forward as gfwd
from sdpa_pass.kernels import attention, launch

from attention import rel_err, with_backward  # benchmarks/attention.py: the matrix's
from backward_variants import kernel_times  # benchmarks/backward_variants.py
from gluon_fwd_probe import write_result  # benchmarks/gluon_fwd_probe.py

# the library's hd64 bounds, restored after lifted ones
HD64_MIN_KEYS, HD64_PERSISTENT_MIN_KEYS = gfwd.HD64_MIN_KEYS, gfwd.HD64_PERSISTENT_MIN_KEYS
Q_BUFFERS, RING_STAGES, BLOCK_N_AT = gfwd.PERSISTENT_Q_BUFFERS, gfwd.STAGES, gfwd.forward_block_n
# --forms: (causal, GQA 4:1, padded) by name. Padded: HF's (B, 1, 1, N) bool row, batch
# element b keeping the first N / 4 + b (3 N / 4) / (B - 1) keys (right padding, as padding.py's);
# SDPA's peer takes it with the causal mask folded in, (B, 1, N, N)
FORMS = {"none": (False, False, False), "causal": (True, False, False),
         "gqa": (True, True, False), "padded": (False, False, True),
         "padded_causal": (True, False, True)}


def padding_row(B: int, N: int) -> torch.Tensor:
    """(B, 1, 1, N) bool, True = attend: batch element b keeps its first
    N / 4 + b (3 N / 4) / (B - 1) keys, the last all of them (B = 1: all of them)."""
    keep = torch.tensor([N // 4 + b * (3 * N // 4) // max(B - 1, 1) for b in range(B)]
                        if B > 1 else [N], device="cuda")
    return (torch.arange(N, device="cuda") < keep[:, None])[:, None, None, :]


def sdpa_mask(row: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """The mask SDPA's backends take for a padding row (with the causal mask folded in)."""
    if row is None or not causal:
        return row
    N = row.shape[-1]
    return row & torch.ones(N, N, dtype=torch.bool, device=row.device).tril()


def variant_runner(name: str, q, k, v, causal: bool, gqa: bool, row=None):
    """A no-argument callable running ``name`` on these inputs, the library's state set for
    it (environment, HD64_MIN_KEYS) and its compiled launches forgotten."""
    if name == "sdpa_cudnn":
        mask = sdpa_mask(row, causal)

        def run():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(
                    q, k, v, mask, is_causal=causal and mask is None, enable_gqa=gqa)
        return run
    kernel, *flags = name.split(":")
    os.environ["SDPA_PASS_GLUON_PERSISTENT"] = "1" if kernel == "persistent" else "0"
    short = "short" in flags
    gfwd.HD64_MIN_KEYS = 0 if short else HD64_MIN_KEYS
    gfwd.HD64_PERSISTENT_MIN_KEYS = ({False: 0, True: 0} if short
                                     else HD64_PERSISTENT_MIN_KEYS)
    gfwd.PERSISTENT_Q_BUFFERS = 1 if "q1" in flags else Q_BUFFERS
    # sN: N slots in the K / V ring (STAGES); bnN: N keys a tile at head dim 64
    gfwd.STAGES = next((int(f[1:]) for f in flags if f[:1] == "s" and f[1:].isdigit()),
                       RING_STAGES)
    bn64 = next((int(f[2:]) for f in flags if f.startswith("bn")), None)
    gfwd.forward_block_n = (BLOCK_N_AT if bn64 is None
                            else lambda d: bn64 if d == 64 else BLOCK_N_AT(d))
    if kernel == "triton":
        os.environ["SDPA_PASS_GLUON"] = "0"
    else:
        os.environ.pop("SDPA_PASS_GLUON", None)
    # split: the backward's dQ by its own kernel rather than the dK/dV kernel's reduce-adds
    if "split" in flags:
        os.environ["SDPA_PASS_GLUON_FUSED_DQ"] = "0"
    else:
        os.environ.pop("SDPA_PASS_GLUON_FUSED_DQ", None)
    launch.clear_plans()
    return lambda: attention(q, k, v, row, is_causal=causal, enable_gqa=gqa)


def measure(D: int, N: int, causal: bool, gqa: bool, rounds: int, backward: bool = False,
            profile: bool = False, variants: list[str] | None = None,
            padded: bool = False) -> list[dict]:
    B, H = max(1, 16384 // N), 2048 // D
    Hkv = H // 4 if gqa else H
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16,
                        requires_grad=backward) for _ in range(2))
    padding = padding_row(B, N) if padded else None
    names = ["tile", "persistent", "persistent:q1", "sdpa_cudnn"]
    if D == 64 and N < 4096:
        names = ["triton", "tile:short", "persistent:short", "persistent:short:q1",
                 "sdpa_cudnn"]
    if backward:
        names = [name for name in names if "q1" not in name]
    if variants:
        names = variants

    def runner(name):
        run = variant_runner(name, q, k, v, causal, gqa, padding)
        return with_backward(run, q, k, v) if backward else run

    # (flash takes no mask: the padded forms' reference is the memory-efficient backend)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if padded else SDPBackend.FLASH_ATTENTION):
        ref_mask = sdpa_mask(padding, causal)
        run_ref = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, ref_mask, is_causal=causal and ref_mask is None, enable_gqa=gqa)
        ref = (with_backward(run_ref, q, k, v) if backward else run_ref)()
    flops = 4 * B * H * N * N * D / (2 if causal else 1) * (2.5 if backward else 1)
    rows = {name: dict(D=D, N=N, B=B, H=H, Hkv=Hkv, causal=causal, padded=padded, name=name,
                       ms=[], graph_ms=[]) for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            row = rows[name]
            try:
                run = runner(name)
                if r == 0:
                    row["rel_err"] = rel_err(run(), ref)
                    if row["rel_err"] > 2e-2:
                        raise AssertionError(f"relative error {row['rel_err']:.2e}")
                row["ms"].append(do_bench(run, warmup=25, rep=100))
                row["graph_ms"].append(do_bench_cudagraph(run, rep=100))
                if profile and r == rounds - 1:
                    run()
                    row["kernels_ms"] = kernel_times(run, calls=10)
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
    parser.add_argument("--forms", default="none,causal,gqa")
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--variants", default="", help="comma-separated names instead")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    result = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                  dtype="bf16", mode="fwdbwd" if args.backward else "fwd", rows=[])
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for D in (int(d) for d in args.head_dims.split(",")):
        for form in args.forms.split(","):
            causal, gqa, padded = FORMS[form]
            if gqa and D != 128:
                continue
            for N in (int(n) for n in args.lengths.split(",")):
                rows = measure(D, N, causal, gqa, args.rounds, args.backward, args.profile,
                               [v for v in args.variants.split(",") if v], padded)
                result["rows"].extend(rows)
                text = "  ".join(
                    f"{r['name']} {r.get('tflops', 0):.1f}/{r.get('graph_tflops', 0):.1f}"
                    + (f" ERR {r['error'][:60]}" if "error" in r else "") for r in rows)
                print(f"hd{D} N{N} {form}: {text}", flush=True)
                for r in rows:
                    for kernel, ms in list(r.get("kernels_ms", {}).items())[:6]:
                        print(f"    {r['name']:>12} {ms * 1e3:8.1f} us  {kernel}", flush=True)
    write_result(args.out, "persistent_ab", args.label, device, result)


if __name__ == "__main__":
    main()
