"""Decode-step attention (one new query token against a KV cache): achieved memory bandwidth.

One query row per (batch, query head) reads the whole cache, so the step is bound by reading K
and V once: GB/s = (bytes of K + V + Q + O) / time, against the GPU's HBM bandwidth. Peers in
the same run: ours through ``sdpa_pass.kernels.attention`` (which picks the split-KV decode
kernel for these shapes), ours with the prefill forward kernel forced (what the split buys),
SDPA with ``enable_gqa=True`` (each backend that accepts the call), flex attention (compiled,
``enable_gqa=True``) and eager (``repeat_kv`` + matmul + softmax, as HF writes it).

Outputs are compared with the first of SDPA flash / efficient / cuDNN / ours that ran.

Two timings per implementation: replayed from a CUDA graph (``do_bench_cudagraph``: the GPU
time, from which GB/s is computed) and launched from Python (``do_bench``: what a step costs
without CUDA graphs, host overhead included; a decode step of a small model is bound by it).

Caches of 4k to 128k tokens at batch 16 and 1 (SHAPES); a peer whose temporaries would not fit
the free GPU memory (eager's repeat_kv copies) records ``skipped: too large (...)``.

Run: ``python benchmarks/decode.py [--out DIR]``; prints a markdown table and writes
``decode_bf16_<device>.json``. About 2 minutes on an H100/H200 (flex compiles per shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (DO_BENCH, Skipped, describe, eager_attention,  # noqa: E402
                       error_summary, metadata, rel_err, save, slug, synchronize)

import sdpa_pass.kernels.ops as ops  # noqa: E402
from sdpa_pass.kernels import attention  # noqa: E402

# (batch, query heads, KV heads, head dim, cache length): the decode issue's shapes (batch 16,
# 32/8 heads, hd128, 4k and 32k), extended to 64k and 128k caches (issue 8), at batch 16 and 1.
# Batch 16 at 128k holds 8 GiB of K/V; eager's repeat_kv copies 4x that.
SHAPES = [(16, 32, 8, 128, 4096), (16, 32, 8, 128, 32768), (16, 32, 8, 128, 65536),
          (16, 32, 8, 128, 131072), (1, 32, 8, 128, 4096), (1, 32, 8, 128, 32768),
          (1, 32, 8, 128, 65536), (1, 32, 8, 128, 131072)]
# Of the GPU memory free once the inputs exist, what a peer's own temporaries may take.
FREE_MEMORY_SHARE = 0.8
REFERENCE_ORDER = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "ours")


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    cache: int

    def bytes(self, elem: int) -> int:
        kv = 2 * self.batch * self.kv_heads * self.cache * self.head_dim
        qo = 2 * self.batch * self.q_heads * self.head_dim
        return (kv + qo) * elem

    def label(self) -> str:
        return f"B{self.batch} H{self.q_heads}/{self.kv_heads} D{self.head_dim} cache {self.cache}"


def build_ours(q, k, v):
    return lambda: attention(q, k, v, causal="bottom_right", enable_gqa=True)


def build_ours_forward_kernel(q, k, v):
    def run():
        saved = ops.use_decode_kernel
        ops.use_decode_kernel = lambda *a: False
        try:
            return attention(q, k, v, causal="bottom_right", enable_gqa=True)
        finally:
            ops.use_decode_kernel = saved

    return run


def sdpa_with(backend):
    def build(q, k, v):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        return run

    return build


def build_flex(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return lambda: compiled(q, k, v, enable_gqa=True)


def build_eager(q, k, v):
    group = q.shape[1] // k.shape[1]
    # repeat_kv copies K and V per query head; the scores (B, Hq, 1, S) are small beside them
    copies = 2 * k.numel() * group * k.element_size()
    if q.is_cuda:
        free = torch.cuda.mem_get_info(q.device)[0]
        if copies > FREE_MEMORY_SHARE * free:
            raise Skipped(f"too large ({copies / 2**30:.0f} GiB of repeat_kv copies, "
                          f"{free / 2**30:.0f} GiB free)")
    return lambda: eager_attention(q, k, v, group=group)


PEERS = {
    "ours": build_ours,
    "ours_forward_kernel": build_ours_forward_kernel,
    "sdpa_flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
    "sdpa_efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa_cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
    "flex": build_flex,
    "eager": build_eager,
}


def bench(shape: Shape, dtype, device) -> list[dict]:
    torch.manual_seed(0)
    q = torch.randn(shape.batch, shape.q_heads, 1, shape.head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(shape.batch, shape.kv_heads, shape.cache, shape.head_dim, dtype=dtype,
                        device=device) for _ in range(2))
    outputs, fns, errors = {}, {}, {}
    for name, build in PEERS.items():
        try:
            fn = build(q, k, v)
            outputs[name] = fn()
            synchronize(device)
            fns[name] = fn
        except Skipped as exc:
            errors[name] = f"skipped: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failing peer is a result
            errors[name] = describe(exc, [])
            torch.cuda.empty_cache()  # e.g. after an out-of-memory
    ref = next((n for n in REFERENCE_ORDER if n in outputs), None)
    rows = []
    for name in PEERS:
        row = dict(dataclasses.asdict(shape), impl=name, us=None, gbps=None, us_launched=None,
                   rel_err=None, ref=None, error=errors.get(name))
        if name in outputs and ref and name != ref:
            row["rel_err"], row["ref"] = rel_err(outputs[name], outputs[ref]), ref
        if name in fns:
            try:
                ms = triton.testing.do_bench_cudagraph(fns[name], rep=100)
                row["us"], row["gbps"] = ms * 1e3, shape.bytes(q.element_size()) / (ms * 1e-3) / 1e9
            except Exception as exc:  # noqa: BLE001 - e.g. a peer that cannot be captured
                row["error"] = "CUDA graph: " + describe(exc, [])
            row["us_launched"] = triton.testing.do_bench(fns[name], **DO_BENCH) * 1e3
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    meta_args = argparse.Namespace(mode="decode", dtype="bf16", quick=False)
    meta = metadata(meta_args, device)
    meta.update(benchmark="decode", flops=None, reference_order=list(REFERENCE_ORDER),
                bandwidth="bytes of K + V + Q + O / CUDA-graph time",
                timer="triton.testing.do_bench_cudagraph(rep=100); us_launched: do_bench")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode_bf16_{slug(meta['device'])}.json"
    rows = []
    for dims in SHAPES:
        shape = Shape(*dims)
        rows += bench(shape, torch.bfloat16, device)
        save(path, meta, rows)
        print(shape.label(), " | ".join(
            f"{r['impl']} {r['gbps']:.0f} GB/s" if r["gbps"] else f"{r['impl']} -" for r in rows[-len(PEERS):]),
            flush=True)
    meta["complete"] = True
    save(path, meta, rows)
    print(f"\nDecode step, bf16, {meta['device']}, torch {meta['torch']}, triton {meta['triton']}: "
          "GB/s from CUDA-graph time (µs in a CUDA graph / µs launched from Python)\n")
    print("| shape | " + " | ".join(PEERS) + " |")
    print("|:---|" + "---:|" * len(PEERS))
    for dims in SHAPES:
        shape = Shape(*dims)
        cells = []
        for r in rows:
            if dataclasses.asdict(shape).items() <= r.items():
                if r["gbps"]:
                    cells.append(f"{r['gbps']:.0f} ({r['us']:.0f} / {r['us_launched']:.0f})")
                else:
                    cells.append("n/a")
        print(f"| {shape.label()} | " + " | ".join(cells) + " |")
    print("\n" + error_summary(rows, lambda r: Shape(r["batch"], r["q_heads"], r["kv_heads"],
                                                      r["head_dim"], r["cache"]).label()))


if __name__ == "__main__":
    main()
