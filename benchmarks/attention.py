"""Forward attention benchmark: ``sdpa_pass.kernels.attention`` against its peers on one GPU.

    python benchmarks/attention.py                        # bf16, every shape
    python benchmarks/attention.py --dtype fp16 --tag mybranch
    python benchmarks/attention.py --quick                # smoke run: two small shapes
    TRITON_INTERPRET=1 python benchmarks/attention.py --device cpu --quick --dtype fp16 --out /tmp/b

Shapes follow the FlashAttention benchmark convention: L = S = N, batch = 16384 // N and
heads = 2048 // D, so every shape holds 16384 tokens of model width 2048. Each is run causal
and non-causal.

Peers: ours, SDPA pinned to one backend (flash, cuDNN, memory-efficient), flex attention under
torch.compile, and eager attention (``softmax(q @ k^T * scale + mask) @ v`` in the input
dtype). Each peer runs once before timing, which also compiles / autotunes it, and its output
is compared with a reference (the first of REFERENCE_ORDER that ran). A peer that fails or is
unavailable records its error string and the benchmark goes on.

FLOPs count useful work only: 4 * B * H * L * S * D (two matmuls), halved for causal.

Results go to ``{out}/attention_fwd_{tag}_{device}.json`` (rewritten after every shape, so an
interrupted run keeps what it measured) and to ``$OUT`` when that variable is set;
``benchmarks/report.py`` turns them into BENCHMARKS.md. The last lines of stdout are a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdpa_pass.kernels import attention

# report.py sits next to this file (sys.path[0] when run as a script) and needs no torch.
from report import (MISMATCH_TOL, error_notes, format_text_table, format_tflops, shape_label,
                    table)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Whose output the others are compared with: the first of these that ran for the shape.
REFERENCE_ORDER = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "ours")

# Eager attention materialises the (B, H, L, S) scores (and a few temporaries of that size);
# beyond this it is skipped rather than left to run out of memory.
EAGER_MAX_SCORE_BYTES = 8 * 2**30

DO_BENCH = dict(warmup=25, rep=100, return_mode="median")


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool

    @property
    def flops(self) -> float:
        full = 4.0 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim
        return full / 2 if self.causal else full

    def flops_for(self, mode: str) -> float:
        # the backward does 2.5x the forward's matrix work (FlashAttention's convention)
        return self.flops * (3.5 if mode == "fwdbwd" else 1.0)

    def fields(self) -> dict:
        return dict(batch=self.batch, heads=self.heads, seqlen_q=self.seqlen,
                    seqlen_kv=self.seqlen, head_dim=self.head_dim, causal=self.causal)


def make_shapes(quick: bool, device: torch.device, head_dims=(64, 128)) -> list[Shape]:
    if quick and device.type != "cuda":
        # Tiny: on CPU our kernel runs in the Triton interpreter.
        sizes = [(1, 2, 64, 64), (1, 2, 128, 128)]
    else:
        seqlens = (1024,) if quick else (1024, 4096, 16384)
        sizes = [(16384 // n, 2048 // d, n, d) for d in head_dims for n in seqlens]
    return [Shape(b, h, n, d, causal) for b, h, n, d in sizes for causal in (False, True)]


# --------------------------------------------------------------------------------------------
# Peers. build(q, k, v, causal) returns a no-argument callable computing the attention output;
# anything it needs besides the inputs (masks, compiled functions) is made there, outside
# timing. context() wraps both the first call and the timed calls.
# --------------------------------------------------------------------------------------------

class Skipped(Exception):
    """A peer deliberately not run for this shape; recorded as 'skipped: <reason>'."""


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    build: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], Callable[[], torch.Tensor]]
    context: Callable[[], ContextManager] = contextlib.nullcontext


def build_ours(q, k, v, causal):
    return lambda: attention(q, k, v, is_causal=causal)


def build_sdpa(q, k, v, causal):
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def build_flex(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Every shape compiles afresh. Without the reset, dynamo's recompile limit (8 per code
    # object) would be reached within the shape sweep, after which it silently runs
    # flex_attention eagerly, which materialises the scores.
    torch._dynamo.reset()
    block_mask = None
    if causal:
        block_mask = create_block_mask(_causal_mask_mod, None, None, q.shape[-2], k.shape[-2],
                                       device=q.device)
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def build_eager(q, k, v, causal):
    B, H, L, D = q.shape
    S = k.shape[-2]
    score_bytes = B * H * L * S * q.element_size()
    if score_bytes > EAGER_MAX_SCORE_BYTES:
        raise Skipped(f"too large ({score_bytes / 2**30:.0f} GiB score matrix)")
    scale = 1.0 / math.sqrt(D)
    # Additive mask, as hand-written attention usually has: 0 where visible, -inf above the
    # diagonal.
    mask = None
    if causal:
        mask = torch.full((L, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1)

    def run():
        scores = q @ k.transpose(-2, -1) * scale
        if mask is not None:
            scores = scores + mask
        return torch.softmax(scores, dim=-1) @ v

    return run


PEERS = (
    Peer("ours", build_ours),
    Peer("sdpa_flash", build_sdpa, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
    Peer("sdpa_cudnn", build_sdpa, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
    Peer("sdpa_efficient", build_sdpa, lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)),
    Peer("flex", build_flex),
    Peer("eager", build_eager),
)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def describe(exc: BaseException, caught: list, max_len: int = 300) -> str:
    """Exception type and first line, plus the warnings raised meanwhile: SDPA says why a
    backend cannot run only in warnings, its error is just 'No available kernel'."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    reasons = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    if reasons:
        text += " [" + "; ".join(reasons) + "]"
    return text if len(text) <= max_len else text[: max_len - 3] + "..."


def synchronize(device: torch.device) -> None:
    # Kernel errors surface asynchronously; synchronising inside a peer's guard blames that peer.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_time_ms(fn: Callable[[], object], rep_ms: float = 100.0, min_runs: int = 3,
                max_runs: int = 100) -> float:
    """Median wall time, for devices without CUDA events (do_bench needs a GPU driver)."""
    fn()  # warm-up
    times: list[float] = []
    while len(times) < min_runs or (sum(times) * 1e3 < rep_ms and len(times) < max_runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, **DO_BENCH)
    return cpu_time_ms(fn)


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖; for (out, dq, dk, dv) tuples the largest of the four."""
    if isinstance(a, tuple):
        return max(rel_err(x, y) for x, y in zip(a, b))
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def with_backward(fn: Callable[[], torch.Tensor], q, k, v) -> Callable[[], tuple]:
    """Forward and backward (dQ, dK, dV from a fixed random dO); returns (out, dq, dk, dv), so
    the gradients are compared with the reference's too."""
    grad_out = None

    def run():
        nonlocal grad_out
        out = fn()
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=out.dtype, device=out.device,
                                   generator=torch.Generator(out.device).manual_seed(1))
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))

    return run


def bench_shape(shape: Shape, peers, dtype: torch.dtype, device: torch.device,
                mode: str = "fwd") -> list[dict]:
    torch.manual_seed(0)
    # Random normal inputs: zeros (or torch.empty garbage) would make every kernel look right.
    q, k, v = (torch.randn(shape.batch, shape.heads, shape.seqlen, shape.head_dim,
                           dtype=dtype, device=device, requires_grad=mode == "fwdbwd")
               for _ in range(3))
    fns, outputs, errors, first_call = {}, {}, {}, {}

    # First call of every peer, outside timing: compiles, autotunes and gives its output.
    for peer in peers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                start = time.perf_counter()
                with peer.context():
                    fn = peer.build(q, k, v, shape.causal)
                    if mode == "fwdbwd":
                        fn = with_backward(fn, q, k, v)
                    outputs[peer.name] = fn()
                    synchronize(device)
                # compile + autotune + first run: what a user waits for on first use
                first_call[peer.name] = time.perf_counter() - start
                fns[peer.name] = fn
            except Skipped as exc:
                errors[peer.name] = f"skipped: {exc}"
            except Exception as exc:  # noqa: BLE001 - any failure of a peer is a result
                errors[peer.name] = describe(exc, caught)
        if device.type == "cuda" and peer.name in errors:
            torch.cuda.empty_cache()  # e.g. after an out-of-memory

    ref = next((name for name in REFERENCE_ORDER if name in outputs), None)
    rows = []
    for peer in peers:
        name = peer.name
        row = dict(shape.fields(), impl=name, ms=None, tflops=None, rel_err=None, ref=None,
                   first_call_s=first_call.get(name), error=errors.get(name))
        if name in outputs and ref is not None and name != ref:
            row["rel_err"], row["ref"] = rel_err(outputs[name], outputs[ref]), ref
        if name in fns:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with peer.context():
                        ms = time_ms(fns[name], device)
                    row["ms"], row["tflops"] = ms, shape.flops_for(mode) / (ms * 1e-3) / 1e12
                except Exception as exc:  # noqa: BLE001
                    row["error"] = describe(exc, caught)
        rows.append(row)

    del q, k, v, fns, outputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------
# Metadata, output
# --------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} {platform.processor() or platform.machine()}".strip()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_describe() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def metadata(args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "benchmark": f"attention_{args.mode}",
        "device": device_name(device),
        "capability": (".".join(map(str, torch.cuda.get_device_capability(device)))
                       if cuda else None),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_describe(),
        "quick": args.quick,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "timer": (f"triton.testing.do_bench({', '.join(f'{k}={v!r}' for k, v in DO_BENCH.items())})"
                  if cuda else "time.perf_counter, median"),
        "flops": "4*B*H*L*S*D, halved for causal" + (", x3.5 for forward+backward" if args.mode == "fwdbwd" else ""),
        "reference_order": list(REFERENCE_ORDER),
        "mismatch_tol": MISMATCH_TOL,
        "complete": False,
    }


def save(path: Path, meta: dict, rows: list[dict]) -> None:
    tmp = path.with_suffix(".json.tmp")
    # One row per line keeps the file short and diffable. A NaN error (NaN in an output) is
    # written as the JSON extension NaN, which json.load reads back.
    body = ",\n".join("  " + json.dumps(row) for row in rows)
    tmp.write_text(f'{{"meta": {json.dumps(meta, indent=2)},\n "rows": [\n{body}\n ]}}\n')
    tmp.replace(path)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        if (out / path.name).resolve() != path.resolve():
            shutil.copy2(path, out / path.name)


def progress(i: int, n: int, shape: Shape, rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["error"]:
            status = "skipped" if r["error"].startswith("skipped") else "error"
            parts.append(f"{r['impl']} {status}")
        else:
            err = "" if r["rel_err"] is None else f" (err {r['rel_err']:.1e})"
            parts.append(f"{r['impl']} {format_tflops(r['tflops'])}{err}")
    label = shape_label(shape.fields()) + (" causal" if shape.causal else "")
    return f"[{i}/{n}] {label}: " + " | ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory for the result JSON (default: benchmarks/results)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="a few small shapes, for a smoke run")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd",
                        help="forward only, or forward + backward (dQ, dK, dV)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tag", default=None,
                        help="put in the file name (default: the dtype, plus '-quick' for --quick)")
    parser.add_argument("--impls", default=",".join(p.name for p in PEERS),
                        help="comma-separated subset of: %(default)s")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("attention.py: CUDA is not available; for a CPU smoke run pass --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # do_bench and triton launch on the current device
    wanted = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = set(wanted) - {p.name for p in PEERS}
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {[p.name for p in PEERS]}")
    peers = [p for p in PEERS if p.name in wanted]

    dtype = DTYPES[args.dtype]
    tag = args.tag or (args.dtype + ("-quick" if args.quick else ""))
    meta = metadata(args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"attention_{args.mode}_{slug(tag)}_{slug(meta['device'])}.json"

    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
          f"{args.dtype}", flush=True)
    shapes = make_shapes(args.quick, device, tuple(int(d) for d in args.head_dims.split(",")))
    rows: list[dict] = []
    for i, shape in enumerate(shapes, 1):
        shape_rows = bench_shape(shape, peers, dtype, device, args.mode)
        rows += shape_rows
        save(path, meta, rows)
        print(progress(i, len(shapes), shape, shape_rows), flush=True)
    meta["complete"] = True
    save(path, meta, rows)

    # The summary goes last: only the end of stdout may be visible.
    copied = f" (copied to {os.environ['OUT']})" if os.environ.get("OUT") else ""
    print(f"\nwrote {path}{copied}")
    refs = sorted({r["ref"] for r in rows if r["ref"]})
    print(f"\n{'Forward' if args.mode == 'fwd' else 'Forward+backward'} TFLOP/s, {args.dtype}, {meta['device']}; MISMATCH: relative error "
          f"> {MISMATCH_TOL:g} against {', '.join(refs) or 'no reference'}")
    print(format_text_table(*table(rows)))
    firsts = {}
    for r in rows:
        if r.get("first_call_s") is not None:
            firsts.setdefault(r["impl"], []).append(r["first_call_s"])
    print("first call (compile, autotune, run), seconds, largest / smallest over the shapes: "
          + ", ".join(f"{k} {max(v):.1f} / {min(v):.2f}" for k, v in firsts.items()))
    for note in error_notes(rows, max_len=160):
        print("  " + note)


if __name__ == "__main__":
    main()
