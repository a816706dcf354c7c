"""Forward attention benchmark: ``sdpa_pass.kernels.attention`` against its peers on one GPU.

    python benchmarks/attention.py                        # bf16, every shape
    python benchmarks/attention.py --dtype fp16 --tag mybranch
    python benchmarks/attention.py --quick                # smoke run: two small shapes
    python benchmarks/attention.py --matrix full --shard 0/5   # one fifth of the full matrix
    TRITON_INTERPRET=1 python benchmarks/attention.py --device cpu --quick --dtype fp16 --out /tmp/b
    TRITON_INTERPRET=1 python benchmarks/attention.py --device cpu --matrix full --quick --dtype fp16 --out /tmp/b

Shapes follow the FlashAttention benchmark convention: L = S = N, batch = 16384 // N and
heads = 2048 // D, so every shape holds 16384 tokens of model width 2048. Each is run causal
and non-causal.

``--matrix full`` instead runs head dims 64, 128, 256 and N = 512 .. 32768 (doubling; batch at
least 1), each in every variant of VARIANTS: causal, none, a bool mask, a float bias and GQA.
Rows are ordered N, then head dim, then variant, so ``--shard i/5`` (every fifth row from row
i) is exactly one variant: its 21 rows span every N, and ours autotunes only that variant's
kernels. Each shard writes its own JSON (``..._shard{i}of{n}.json``); report.py merges them.
``--resume`` keeps the rows already in the output file and measures only the missing ones.
Expected time per shard of the full matrix on an H100/H200, from the first-call times in
benchmarks/results/*.json (fwd, bf16): flex compiles every shape (1.3-5.7 s, median ~2 s),
ours autotunes once per kernel key (11-19 s; one variant has 3-6 keys), Inductor compiles
every shape (no GPU figure yet; ~3-6 s on CPU), cuDNN and eager start in < 0.1 s, and each
measured peer costs ~0.2-1 s of do_bench. That is ~10-15 s a row, so ~4-5 min for a shard's
21 rows plus ~1.5 min of autotuning and ~0.5 min of start-up: 6-7 min, inside a 10-minute call
(shards of masked variants skip the largest rows of eager and Inductor and go faster).
``--mode fwdbwd`` doubles the compile times (flex 3-9 s a shape): run it as --shard i/15.

Peers: ours, SDPA pinned to one backend (flash, cuDNN, memory-efficient), flex attention under
torch.compile, eager attention (``softmax(q @ k^T * scale + mask) @ v`` in the input dtype,
K/V repeated per query head as HF's ``repeat_kv`` does for GQA) and that same function under
``torch.compile(backend="inductor")`` (compiled per shape). Inductor's fuse_attention pass may
replace the eager spelling with SDPA; the row's ``note`` says when it did. Each peer runs once
before timing, which also compiles / autotunes it (``first_call_s``), and its output is
compared with a reference: the first of REFERENCE_ORDER that ran, where ``eager_fp32`` is the
eager math on float32 copies of the inputs (forward only, while its scores fit
EAGER_MAX_SCORE_BYTES). A peer that fails records its error string and the benchmark goes on;
one that cannot express a variant, that SDPA refuses, or whose memory estimate is too large
records ``skipped: <reason>``.

FLOPs count useful work only: 4 * B * H * L * S * D (two matmuls, H = query heads), halved for
causal; a bool mask or a bias counts the full matrix (the random mask leaves no tile empty).

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
from report import (FIRST_CALLS, MISMATCH_TOL, error_notes, first_calls, format_text_table,
                    format_tflops, load, shape_key, shape_label, table, worst_errors)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Whose output the others are compared with: the first of these that ran for the shape.
# eager_fp32 is not a peer: the eager math on float32 copies, computed only when needed.
REFERENCE_ORDER = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "eager_fp32", "ours")

# Eager attention materialises the (B, H, L, S) scores (and a few temporaries of that size);
# beyond this it is skipped rather than left to run out of memory.
EAGER_MAX_SCORE_BYTES = 8 * 2**30
# A materialised bias (1, H, N, N) is 2 * H GiB at N = 32k in bf16; past this a matrix row is
# skipped for every peer (nobody builds such a tensor, and eager would need several of them).
MASK_MAX_BYTES = 16 * 2**30

DO_BENCH = dict(warmup=25, rep=100, return_mode="median")

# --matrix full. The shard layout in the module docstring relies on N varying slowest and the
# variant fastest (see make_matrix_shapes).
MATRIX_HEAD_DIMS = (64, 128, 256)
MATRIX_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
GQA_GROUP = 4
BOOL_MASK_DENSITY = 0.8
VARIANTS = {
    "causal": "is_causal (top-left causal mask)",
    "none": "no mask",
    "bool": (f"random (N, N) bool attn_mask, ~{BOOL_MASK_DENSITY:.0%} True and the diagonal "
             "always True (no empty row), broadcast over batch and heads"),
    "bias": ("additive float attn_mask of shape (1, H, N, N) in the input dtype, broadcast over "
             "batch: a materialised ALiBi bias -slope_h * |i - j| (the layout T5 / ALiBi / "
             "relative-position models hand to SDPA)"),
    "gqa": f"causal, {GQA_GROUP} query heads per K/V head (enable_gqa=True)",
}
# Variants outside the matrix (benchmarks/wide_backward.py --variants): forms cuDNN has no
# kernel for. SDPA's backends take the window as a materialised bool mask, as a model without
# a window-aware kernel would hand it over; soft-capping they cannot express.
WINDOW = 1024
SOFTCAP = 50.0
EXTRA_VARIANTS = {
    "window": (f"causal sliding window: a query sees the {WINDOW} keys ending at its own "
               "position (Mistral's layout)"),
    "softcap": f"causal, scores soft-capped: {SOFTCAP:g} * tanh(s / {SOFTCAP:g}) (Gemma 2's)",
}
CAUSAL_VARIANTS = ("causal", "gqa", "window", "softcap")


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    variant: str | None = None  # --matrix rows only: a key of VARIANTS
    kv_heads: int | None = None  # --matrix rows only

    @property
    def flops(self) -> float:
        n = self.seqlen
        if self.variant == "window":  # n * w pairs less the first rows' missing ones, as causal
            w = min(WINDOW, n)
            return 4.0 * self.batch * self.heads * (n * w - w * w / 2) * self.head_dim
        full = 4.0 * self.batch * self.heads * n * n * self.head_dim
        return full / 2 if self.causal else full

    def flops_for(self, mode: str) -> float:
        # the backward does 2.5x the forward's matrix work (FlashAttention's convention)
        return self.flops * (3.5 if mode == "fwdbwd" else 1.0)

    def fields(self) -> dict:
        out = dict(batch=self.batch, heads=self.heads, seqlen_q=self.seqlen,
                   seqlen_kv=self.seqlen, head_dim=self.head_dim, causal=self.causal)
        if self.variant is not None:
            out.update(variant=self.variant, kv_heads=self.kv_heads)
        return out


def make_shapes(quick: bool, device: torch.device, head_dims=(64, 128)) -> list[Shape]:
    if quick and device.type != "cuda":
        # Tiny: on CPU our kernel runs in the Triton interpreter.
        sizes = [(1, 2, 64, 64), (1, 2, 128, 128)]
    else:
        seqlens = (1024,) if quick else (1024, 4096, 16384)
        sizes = [(16384 // n, 2048 // d, n, d) for d in head_dims for n in seqlens]
    return [Shape(b, h, n, d, causal) for b, h, n, d in sizes for causal in (False, True)]


def make_matrix_shapes(quick: bool, device: torch.device, head_dims=MATRIX_HEAD_DIMS) -> list[Shape]:
    """Every variant of every (N, head dim); N outermost and the variant innermost, so that
    --shard i/len(VARIANTS) is one variant over all sizes."""
    if quick and device.type != "cuda":
        # Tiny, for the interpreter; 4 heads so that GQA has a group of 4 over 1 K/V head.
        sizes = [(1, 4, n, d) for n in (32, 64) for d in head_dims]
    else:
        seqlens = (1024,) if quick else MATRIX_SEQLENS
        sizes = [(max(1, 16384 // n), 2048 // d, n, d) for n in seqlens for d in head_dims]
    return [Shape(b, h, n, d, causal=variant in CAUSAL_VARIANTS, variant=variant,
                  kv_heads=h // GQA_GROUP if variant == "gqa" else h)
            for b, h, n, d in sizes for variant in VARIANTS]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One shape's tensors, as every peer receives them."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    attn_mask: torch.Tensor | None = None  # bool (N, N), True = attend; or float (1, H, N, N)
    enable_gqa: bool = False
    window: int | None = None  # with causal: the keys a query sees, ending at its own position
    softcap: float | None = None

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


def too_large(nbytes: int, what: str, limit: int) -> None:
    if nbytes > limit:
        gib = nbytes / 2**30
        raise Skipped(f"too large ({gib:.0f} GiB {what})" if gib >= 1 else
                      f"too large ({gib:.2g} GiB {what})")


def alibi_bias(heads: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, H, N, N) ALiBi bias -slope_h * |i - j| (symmetric: the bidirectional form), built
    one head at a time so that no (H, N, N) float32 temporary is needed."""
    pos = torch.arange(n, dtype=torch.float32, device=device)
    distance = (pos[None, :] - pos[:, None]).abs_()
    bias = torch.empty(1, heads, n, n, dtype=dtype, device=device)
    for h in range(heads):
        bias[0, h] = distance * -(2.0 ** (-8.0 * (h + 1) / heads))
    return bias


def random_bool_mask(n: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(2)
    mask = torch.rand(n, n, generator=gen, device=device) < BOOL_MASK_DENSITY
    mask.diagonal().fill_(True)
    return mask


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device,
                requires_grad: bool) -> Inputs:
    """Random normal inputs (zeros, or torch.empty garbage, would make every kernel look
    right) and the variant's mask; Skipped when the mask alone would be too large."""
    n = shape.seqlen
    if shape.variant == "bool":
        too_large(n * n, "bool mask", MASK_MAX_BYTES)
    elif shape.variant == "bias":
        too_large(shape.heads * n * n * dtype.itemsize, f"bias (1, {shape.heads}, {n}, {n})",
                  MASK_MAX_BYTES)
    torch.manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, n, shape.head_dim, dtype=dtype, device=device,
                    requires_grad=requires_grad)
    k, v = (torch.randn(shape.batch, shape.kv_heads or shape.heads, n, shape.head_dim,
                        dtype=dtype, device=device, requires_grad=requires_grad)
            for _ in range(2))
    attn_mask = None
    if shape.variant == "bool":
        attn_mask = random_bool_mask(n, device)
    elif shape.variant == "bias":
        attn_mask = alibi_bias(shape.heads, n, dtype, device)
    return Inputs(q, k, v, shape.causal, attn_mask, enable_gqa=shape.variant == "gqa",
                  window=WINDOW if shape.variant == "window" else None,
                  softcap=SOFTCAP if shape.variant == "softcap" else None)


# --------------------------------------------------------------------------------------------
# Peers. build(inputs) returns a no-argument callable computing the attention output; anything
# it needs besides the inputs (masks, compiled functions) is made there, outside timing.
# context() wraps both the first call and the timed calls. A callable may carry a ``note``
# attribute (a string), copied into its row.
# --------------------------------------------------------------------------------------------

class Skipped(Exception):
    """A peer deliberately not run for this shape; recorded as 'skipped: <reason>'."""


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    build: Callable[[Inputs], Callable[[], torch.Tensor]]
    context: Callable[[], ContextManager] = contextlib.nullcontext


def build_ours(x: Inputs):
    return lambda: attention(x.q, x.k, x.v, attn_mask=x.attn_mask, is_causal=x.causal,
                             enable_gqa=x.enable_gqa, window=x.window, softcap=x.softcap)


def window_mask(x: Inputs) -> torch.Tensor:
    """The causal sliding window as a bool (L, S) mask (True = attend)."""
    i = torch.arange(x.q.shape[-2], device=x.q.device)[:, None]
    j = torch.arange(x.k.shape[-2], device=x.q.device)[None, :]
    return (j <= i) & (j > i - x.window)


def build_sdpa(x: Inputs):
    if x.softcap is not None:
        raise Skipped("SDPA has no soft-capping")
    # only the arguments a variant needs, so a plain call is the plain call
    extra = {}
    if x.attn_mask is not None:
        extra["attn_mask"] = x.attn_mask
    if x.enable_gqa:
        extra["enable_gqa"] = True
    causal = x.causal
    if x.window is not None:  # SDPA's only form of a window: the mask, made before timing
        extra["attn_mask"], causal = window_mask(x), False
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=causal, **extra)


def build_sdpa_flash(x: Inputs):
    if x.attn_mask is not None or x.window is not None:
        raise Skipped("SDPA's flash backend takes no attn_mask")
    return build_sdpa(x)


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window_mask_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


def _softcap_score_mod(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)
    return score_mod


def _tensor_mask_mod(mask: torch.Tensor):
    """A bool (N, N) mask as flex's mask_mod: reads the tensor."""
    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]
    return mask_mod


def _tensor_bias_score_mod(bias: torch.Tensor):
    """A (1, H, N, N) bias as flex's score_mod: reads the tensor."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[0, h, q_idx, kv_idx]
    return score_mod


# flex attention (torch 2.11) reading a bias tensor through score_mod faults with an illegal
# memory access past 2**31 elements (H100: (1, 32, 16384, 16384) faulted run alone with
# CUDA_LAUNCH_BLOCKING=1; (1, 8, 32768, 32768) faulted in the matrix, where every other peer
# then ran clean without flex; (1, 8, 16384, 16384) = 2**31 ran). A fault poisons the
# process's CUDA context, so the run would stop there.
FLEX_MAX_BIAS_ELEMENTS = 2**31


def build_flex(x: Inputs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # The block mask of a random bool mask skips no tile; flex still reads the mask per score.
    mask_mod, extra = None, {}
    if x.window is not None:  # (the block mask skips the tiles outside the window)
        mask_mod = _window_mask_mod(x.window)
    elif x.causal:
        mask_mod = _causal_mask_mod
    elif x.attn_mask is not None and x.attn_mask.dtype == torch.bool:
        mask_mod = _tensor_mask_mod(x.attn_mask)
    elif x.attn_mask is not None:
        if x.attn_mask.numel() > FLEX_MAX_BIAS_ELEMENTS:
            raise Skipped(f"a bias of {x.attn_mask.numel() / 2**30:.0f}G elements faults in flex's "
                          "kernel (illegal memory access; > 2**31 elements)")
        extra["score_mod"] = _tensor_bias_score_mod(x.attn_mask)
    if x.softcap is not None:
        extra["score_mod"] = _softcap_score_mod(x.softcap)
    if x.enable_gqa:
        extra["enable_gqa"] = True
    block_mask = None if mask_mod is None else create_block_mask(
        mask_mod, None, None, x.q.shape[-2], x.k.shape[-2], device=x.q.device)
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return lambda: compiled(x.q, x.k, x.v, block_mask=block_mask, **extra)


def repeat_kv(kv: torch.Tensor, group: int) -> torch.Tensor:
    """HF transformers' ``repeat_kv``: (B, Hkv, S, D) -> (B, Hkv * group, S, D), copied."""
    if group == 1:
        return kv
    b, h, s, d = kv.shape
    return kv[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)


def eager_attention(q, k, v, mask: torch.Tensor | None = None, group: int = 1,
                    softcap: float | None = None) -> torch.Tensor:
    """Attention as models hand-write it: repeat_kv, scaled scores (soft-capped as Gemma 2
    does) plus an additive mask, softmax, values. Also what Inductor compiles and, on float32
    copies, a reference."""
    k, v = repeat_kv(k, group), repeat_kv(v, group)
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1) @ v


def additive_mask(x: Inputs, dtype: torch.dtype) -> torch.Tensor | None:
    """The shape's mask as hand-written attention adds it: 0 where visible, -inf elsewhere
    (a causal mask above the diagonal, a window's also below it), or the bias itself."""
    L, S = x.q.shape[-2], x.k.shape[-2]
    if x.window is not None:
        return torch.zeros((L, S), dtype=dtype, device=x.q.device).masked_fill_(
            ~window_mask(x), float("-inf"))
    if x.causal:
        return torch.full((L, S), float("-inf"), dtype=dtype, device=x.q.device).triu(1)
    if x.attn_mask is None:
        return None
    if x.attn_mask.dtype == torch.bool:
        return torch.zeros(x.attn_mask.shape, dtype=dtype,
                           device=x.q.device).masked_fill_(~x.attn_mask, float("-inf"))
    return x.attn_mask.to(dtype)


def score_bytes(x: Inputs, element_size: int) -> int:
    B, H, L, _ = x.q.shape
    return B * H * L * x.k.shape[-2] * element_size


def build_eager(x: Inputs):
    too_large(score_bytes(x, x.q.element_size()), "score matrix", EAGER_MAX_SCORE_BYTES)
    mask = additive_mask(x, x.q.dtype)
    return lambda: eager_attention(x.q, x.k, x.v, mask, x.group, x.softcap)


def runs_sdpa(fn: Callable[[], object]) -> bool:
    """Whether a call of fn dispatches an SDPA kernel, from the profiler's op names (what ran,
    unlike Inductor's fuse_attention counter, which a compile-cache hit does not bump)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any("scaled_dot_product" in event.name for event in prof.events())


def _inductor_compile(x: Inputs):
    """eager_attention under Inductor for these inputs, compiled by a first call; returns the
    callable and whether Inductor's fuse_attention pass replaced the pattern with SDPA."""
    mask = additive_mask(x, x.q.dtype)
    compiled = torch.compile(eager_attention, backend="inductor", dynamic=False, fullgraph=True)

    def run():
        return compiled(x.q, x.k, x.v, mask, x.group, x.softcap)

    run()
    return run, runs_sdpa(run)


_INDUCTOR_FUSES: dict[tuple, bool] = {}


def inductor_fuses(x: Inputs, n: int = 128) -> bool:
    """Whether Inductor replaces this kind of row with SDPA, learned by compiling a small slice
    of it (same dtype, heads, head dim, mask kind, GQA); remembered per kind."""
    key = (x.q.dtype, x.q.device, x.q.shape[1], x.k.shape[1], x.q.shape[-1], x.causal,
           None if x.attn_mask is None else (x.attn_mask.dtype, x.attn_mask.dim()), x.window,
           x.softcap)
    if key not in _INDUCTOR_FUSES:
        def small(t):
            return t[..., :n, :].detach().contiguous().requires_grad_(t.requires_grad)
        mask = x.attn_mask
        if mask is not None:
            mask = mask[..., :n, :n].contiguous()
        probe = Inputs(small(x.q[:1]), small(x.k[:1]), small(x.v[:1]), x.causal, mask,
                       x.enable_gqa, x.window, x.softcap)
        _INDUCTOR_FUSES[key] = _inductor_compile(probe)[1]
    return _INDUCTOR_FUSES[key]


def build_inductor(x: Inputs):
    # Without fuse_attention Inductor materialises the scores as eager does (plus the mask
    # added in); with it, SDPA runs and any size fits.
    scores = score_bytes(x, x.q.element_size())
    if scores > EAGER_MAX_SCORE_BYTES and not inductor_fuses(x):
        too_large(scores, "score matrix; Inductor does not fuse this spelling into SDPA",
                  EAGER_MAX_SCORE_BYTES)
    run, fused = _inductor_compile(x)
    if fused:
        run.note = "Inductor's fuse_attention pass replaced the eager spelling with SDPA"
    return run


PEERS = (
    Peer("ours", build_ours),
    Peer("sdpa_flash", build_sdpa_flash, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
    Peer("sdpa_cudnn", build_sdpa, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
    Peer("sdpa_efficient", build_sdpa, lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)),
    Peer("flex", build_flex),
    Peer("eager", build_eager),
    Peer("inductor", build_inductor),
)
# The default (non-matrix) run keeps the peers it always had; --impls can add inductor.
DEFAULT_IMPLS = ("ours", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "eager")


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


def is_refusal(exc: BaseException) -> bool:
    """SDPA pinned to a backend that cannot take these inputs (CUDA's and CPU's wording)."""
    return isinstance(exc, RuntimeError) and any(
        text in str(exc) for text in ("No available kernel", "No viable backend"))


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


def rates_line(label: str, rows: list[dict]) -> str:
    """One shape's rows as ``label: impl TFLOP/s | ...`` (a row's error where it has no rate)."""
    return f"{label}: " + " | ".join(
        f"{r['impl']} {r['tflops']:.1f}" if r["tflops"] else f"{r['impl']} {r['error']}"
        for r in rows)


def error_summary(rows: list[dict], label: Callable[[dict], str]) -> str:
    """The largest relative error of each implementation (report.worst_errors), then each row's
    error or skip reason, the row named by ``label(row)``."""
    lines = ["largest relative error: " + ", ".join(
        f"{impl} {err:.1e}" for impl, err in worst_errors(rows).items())]
    lines += [f"  {r['impl']} {label(r)}: {r['error'][:160]}" for r in rows if r["error"]]
    return "\n".join(lines)


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


def eager_fp32_reference(x: Inputs, mode: str) -> torch.Tensor | None:
    """The eager math on float32 copies, while its scores fit; forward only (the backward's
    random dO is drawn in the peers' dtype)."""
    if mode != "fwd" or score_bytes(x, 4) > EAGER_MAX_SCORE_BYTES:
        return None
    with torch.no_grad():
        return eager_attention(x.q.float(), x.k.float(), x.v.float(),
                               additive_mask(x, torch.float32), x.group, x.softcap)


def bench_shape(shape: Shape, peers, dtype: torch.dtype, device: torch.device,
                mode: str = "fwd", rounds: int = 1) -> list[dict]:
    """Every peer's row for one shape: first calls (compile, tune, output), errors against the
    reference, then the timings. ``rounds`` > 1 times the peers that many times, each round in
    the other direction (A B C, C B A, ...), and keeps each peer's fastest: a peer timed first
    after the compile phase (the GPU idle meanwhile) otherwise carries that place's cost alone
    (one configuration timed twice in one process read up to 10% apart at N = 4k and 25% at
    1k, BENCHMARKS.md session 22)."""
    def row(name: str, **values) -> dict:
        return dict(shape.fields(), impl=name, ms=None, tflops=None, rel_err=None, ref=None,
                    first_call_s=None, error=None) | values

    try:
        x = make_inputs(shape, dtype, device, requires_grad=mode == "fwdbwd")
    except Skipped as exc:  # the row is there, for every peer, with the reason
        return [row(peer.name, error=f"skipped: {exc}") for peer in peers]
    # Every shape compiles afresh. Without the reset, dynamo's recompile limit (8 per code
    # object) would be reached within the shape sweep, after which it silently runs
    # flex_attention (and the Inductor peer) eagerly, which materialises the scores.
    torch._dynamo.reset()
    fns, outputs, errors, first_call, notes = {}, {}, {}, {}, {}

    # First call of every peer, outside timing: compiles, autotunes and gives its output.
    for peer in peers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                start = time.perf_counter()
                with peer.context():
                    fn = peer.build(x)
                    if getattr(fn, "note", None):
                        notes[peer.name] = fn.note
                    if mode == "fwdbwd":
                        fn = with_backward(fn, x.q, x.k, x.v)
                    outputs[peer.name] = fn()
                    synchronize(device)
                # compile + autotune + first run: what a user waits for on first use
                first_call[peer.name] = time.perf_counter() - start
                fns[peer.name] = fn
            except Skipped as exc:
                errors[peer.name] = f"skipped: {exc}"
            except Exception as exc:  # noqa: BLE001 - any failure of a peer is a result
                errors[peer.name] = (("skipped: SDPA refused: " if is_refusal(exc) else "")
                                     + describe(exc, caught))
        if device.type == "cuda" and peer.name in errors:
            torch.cuda.empty_cache()  # e.g. after an out-of-memory

    ref = None
    for name in REFERENCE_ORDER:
        if name == "eager_fp32" and name not in outputs:
            reference = eager_fp32_reference(x, mode)
            if reference is not None:
                outputs[name] = reference
        if name in outputs:
            ref = name
            break
    timed, timing_errors = {}, {}
    order = [peer for peer in peers if peer.name in fns]
    for round_ in range(rounds):
        for peer in order if round_ % 2 == 0 else order[::-1]:
            if peer.name in timing_errors:
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with peer.context():
                        ms = time_ms(fns[peer.name], device)
                    timed[peer.name] = min(ms, timed.get(peer.name, ms))
                except Exception as exc:  # noqa: BLE001
                    timing_errors[peer.name] = describe(exc, caught)
    rows = []
    for peer in peers:
        name = peer.name
        r = row(name, first_call_s=first_call.get(name), error=errors.get(name))
        if name in notes:
            r["note"] = notes[name]
        if name in outputs and ref is not None and name != ref:
            r["rel_err"], r["ref"] = rel_err(outputs[name], outputs[ref]), ref
        if name in timing_errors:
            r["error"] = timing_errors[name]
        elif name in timed:
            ms = timed[name]
            r["ms"], r["tflops"] = ms, shape.flops_for(mode) / (ms * 1e-3) / 1e12
        rows.append(r)

    del x, fns, outputs
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
    label = shape_label(shape.fields()) + (f" {shape.variant}" if shape.variant
                                           else " causal" if shape.causal else "")
    return f"[{i}/{n}] {label}: " + " | ".join(parts)


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: want i/n with 0 <= i < n, e.g. 0/5")
    return int(match[1]), int(match[2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory for the result JSON (default: benchmarks/results)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="a few small shapes, for a smoke run")
    parser.add_argument("--matrix", choices=("full",), default=None,
                        help="head dims 64/128/256 x N 512..32k x every variant "
                             f"({', '.join(VARIANTS)}), every peer including inductor")
    parser.add_argument("--head-dims", default=None,
                        help="comma-separated head dims (default: 64,128; with --matrix "
                             "64,128,256, or 32,64 for --quick on CPU)")
    parser.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                        help="run every N-th shape starting at shape I; the file name gets "
                             "_shardIofN (with --matrix full, 5 shards are the 5 variants)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the shapes already in the output file; measure the others")
    parser.add_argument("--remeasure", default=None, metavar="N,N,...",
                        help="measure the rows of these sequence lengths again (every peer) "
                             "and keep the output file's other rows; its meta records when")
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd",
                        help="forward only, or forward + backward (dQ, dK, dV)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the peers this many times, alternating their order, and keep "
                             "each one's fastest (bench_shape)")
    parser.add_argument("--tag", default=None,
                        help="put in the file name (default: the dtype, plus '-matrix' for "
                             "--matrix and '-quick' for --quick)")
    parser.add_argument("--impls", default=None,
                        help="comma-separated subset of: " + ",".join(p.name for p in PEERS)
                             + " (default: all with --matrix, else all but inductor)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("attention.py: CUDA is not available; for a CPU smoke run pass --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # do_bench and triton launch on the current device
    default_impls = [p.name for p in PEERS] if args.matrix else DEFAULT_IMPLS
    wanted = [name.strip() for name in (args.impls or ",".join(default_impls)).split(",")
              if name.strip()]
    unknown = set(wanted) - {p.name for p in PEERS}
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {[p.name for p in PEERS]}")
    peers = [p for p in PEERS if p.name in wanted]

    dtype = DTYPES[args.dtype]
    tag = args.tag or (args.dtype + ("-matrix" if args.matrix else "")
                       + ("-quick" if args.quick else ""))
    meta = metadata(args, device)
    if args.matrix:
        tiny = args.quick and device.type != "cuda"
        meta.update(matrix=args.matrix, variants=VARIANTS,
                    shapes=("L = S = N, batch 1, 4 heads (CPU smoke sizes)" if tiny else
                            "L = S = N, batch = max(1, 16384 // N), heads = 2048 // D"),
                    eager_max_score_bytes=EAGER_MAX_SCORE_BYTES, mask_max_bytes=MASK_MAX_BYTES)
    if args.shard:
        meta["shard"] = list(args.shard)
    if args.rounds > 1:
        meta["rounds"] = args.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    shard = f"_shard{args.shard[0]}of{args.shard[1]}" if args.shard else ""
    path = args.out / f"attention_{args.mode}_{slug(tag)}_{slug(meta['device'])}{shard}.json"

    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
          f"{args.dtype}", flush=True)
    if args.head_dims:
        head_dims = tuple(int(d) for d in args.head_dims.split(","))
    elif args.matrix:
        head_dims = (32, 64) if args.quick and device.type != "cuda" else MATRIX_HEAD_DIMS
    else:
        head_dims = (64, 128)
    shapes = (make_matrix_shapes if args.matrix else make_shapes)(args.quick, device, head_dims)
    if args.shard:
        shapes = shapes[args.shard[0]::args.shard[1]]
    rows: list[dict] = []
    # rows are kept in the sweep's order, so re-measured shapes replace theirs in place
    sweep_order = {shape_key(shape.fields()): i for i, shape in enumerate(shapes)}
    if args.remeasure:
        if args.resume or not path.exists():
            parser.error(f"--remeasure replaces rows of an existing {path}; not with --resume")
        lengths = {int(n) for n in args.remeasure.split(",")}
        old = load(path)
        shapes = [shape for shape in shapes if shape.seqlen in lengths]
        # only the rows of the shapes measured again (--head-dims may select fewer)
        again = {shape_key(shape.fields()) for shape in shapes}
        rows = [r for r in old["rows"] if shape_key(r) not in again]
        # The file keeps its first run's meta; this run is recorded beside it.
        run = {key: meta[key] for key in ("date", "git", "torch", "triton") if key in meta}
        meta = dict(old["meta"], remeasured=old["meta"].get("remeasured", [])
                    + [dict(run, seqlens=sorted(lengths))])
        print(f"re-measuring {len(shapes)} shapes of {path} (N in {sorted(lengths)})", flush=True)
    elif args.resume and path.exists():
        rows = load(path)["rows"]
        done = {shape_key(r) for r in rows}
        kept = len(shapes)
        shapes = [shape for shape in shapes if shape_key(shape.fields()) not in done]
        meta["resumed"] = True
        print(f"resuming {path}: {kept - len(shapes)} shapes already measured", flush=True)
    for i, shape in enumerate(shapes, 1):
        shape_rows = bench_shape(shape, peers, dtype, device, args.mode, args.rounds)
        rows += shape_rows
        rows.sort(key=lambda r: sweep_order.get(shape_key(r), len(sweep_order)))  # stable
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
    print(f"{FIRST_CALLS} over the shapes: {first_calls(rows)}")
    for note in error_notes(rows, max_len=160):
        print("  " + note)


if __name__ == "__main__":
    main()
