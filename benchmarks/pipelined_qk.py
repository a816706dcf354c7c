"""Can Triton overlap the forward's softmax with its matrix products on Hopper? A probe.

FlashAttention-3 hides the softmax behind the tensor cores: each warpgroup keeps a wgmma (an
asynchronous product) in flight while it computes exponentials. Triton (3.6-3.9) decides
where to wait for a wgmma itself (WGMMAPipeline.cpp): a product stays in flight only when
its result feeds another product's accumulator, or is read under an ``if``. Three rewrites of
the forward's key loop try to meet those rules (``PIPE``):

1. Q·Kᵀ ahead: the next tile's scores are computed at the top of the iteration and carried
   to the next one. The softmax reads them, so the compiler waits for that product right
   after issuing it (``warp_group_dot_wait {pendings = 0}``): no overlap.
2. P·V ahead with a lazy rescale: this tile's P·V is issued before the next tile's softmax,
   and the output is rescaled only when a row max grows by more than 2**8, under an ``if``.
   Triton then keeps the product in flight, but reads its accumulator in the ``if`` without a
   wait, and ptxas answers by serializing every wgmma of the kernel (a wait after each).
3. P·V ahead with the rescale deferred: the output's rescale for tile j's new max is applied
   in the next iteration, after the scores' wait (which also completes the P·V product), so
   nothing reads the product's accumulator while it is in flight. Triton keeps it in flight
   across the softmax, and ptxas interleaves the exponentials with the P·V wgmmas: the
   overlap FlashAttention-3 calls intra-warpgroup pipelining (P carried in fp32 registers to
   the next iteration: 163 registers against 138, no spill).

    python benchmarks/pipelined_qk.py --compile     # no GPU: compile for sm_90, report
    python benchmarks/pipelined_qk.py               # on a GPU: time the loops, ours, cuDNN

``--compile`` prints, for the plain loop and each rewrite (hd128, bf16, 128x64 tile, 8
warps, 3 stages, tensor descriptors; a non-causal, mask-free reduction of our kernel), the
registers, the TTGIR waits with their ``pendings``, and the machine code's wgmma count
(HGMMA) against its waits (WARPGROUP.DEPBAR), compiled with the installed Triton's ptxas. The
GPU mode times each loop through CUDA graphs beside ``sdpa_pass.kernels.attention`` and
SDPA's cuDNN and flash backends, non-causal and causal, N = 4k-16k (batch 16384 / N, 16
heads), and checks each output against SDPA.
"""
import argparse
import os
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D = 128
# the kernel's PIPE values
LOOPS = {0: "plain", 1: "Q.K^T ahead", 2: "P.V ahead, lazy rescale", 3: "P.V ahead, rescale deferred"}


@triton.jit
def _softmax_step(qk, scale_log2, m_i, l_i):
    """One key tile's online-softmax step on raw products: (P, alpha, new l, new m)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _fwd(Qd, Kd, Vd, Od, scale_log2, H, N,
         BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PIPE: tl.constexpr,
         CAUSAL: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    start_m = pid_m * BM
    q = Qd.load([off_b, off_h, start_m, 0]).reshape(BM, D)
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    if CAUSAL:
        hi_full = start_m  # tiles fully visible (BM multiple of BN)
    else:
        hi_full = N
    if PIPE == 2:
        # P·V of tile j-1 issued before the softmax of tile j, rescaling only when a row max
        # grows by more than 2**8 (under an ``if``, which the pipeliner lets wait on its own)
        if hi_full > 0:  # causal: the first query tile has only its diagonal
            k = Kd.load([off_b, off_h, 0, 0]).reshape(BN, D)
            qk = tl.dot(q, tl.trans(k))
            m_i = tl.max(qk, 1) * scale_log2
            p = tl.math.exp2(qk * scale_log2 - m_i[:, None])
            l_i = tl.sum(p, 1)
            for start_n in range(BN, hi_full, BN):
                k = Kd.load([off_b, off_h, start_n, 0]).reshape(BN, D)
                qk = tl.dot(q, tl.trans(k))
                v = Vd.load([off_b, off_h, start_n - BN, 0]).reshape(BN, D)
                # P crosses the iteration in fp32 registers: carried as bf16 it went through
                # shared memory, which made this product wait at once
                acc = tl.dot(p.to(v.dtype), v, acc)
                m_tile = tl.max(qk, 1) * scale_log2
                if tl.max(m_tile - m_i, 0) > 8.0:
                    m_new = tl.maximum(m_i, m_tile)
                    alpha = tl.math.exp2(m_i - m_new)
                    acc = acc * alpha[:, None]
                    l_i = l_i * alpha
                    m_i = m_new
                p = tl.math.exp2(qk * scale_log2 - m_i[:, None])
                l_i += tl.sum(p, 1)
            v = Vd.load([off_b, off_h, hi_full - BN, 0]).reshape(BN, D)
            acc = tl.dot(p.to(v.dtype), v, acc)
    elif PIPE == 3:
        # P·V of tile j-1 issued before the softmax of tile j; the output's rescale for tile
        # j's new max waits for the next iteration, after the scores' wait has completed it
        if hi_full > 0:
            k = Kd.load([off_b, off_h, 0, 0]).reshape(BN, D)
            qk = tl.dot(q, tl.trans(k))
            m_i = tl.max(qk, 1) * scale_log2
            p = tl.math.exp2(qk * scale_log2 - m_i[:, None])
            l_i = tl.sum(p, 1)
            alpha = tl.full((BM,), 1.0, tl.float32)
            for start_n in range(BN, hi_full, BN):
                k = Kd.load([off_b, off_h, start_n, 0]).reshape(BN, D)
                qk = tl.dot(q, tl.trans(k))
                v = Vd.load([off_b, off_h, start_n - BN, 0]).reshape(BN, D)
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(v.dtype), v, acc)
                p, alpha, l_i, m_i = _softmax_step(qk, scale_log2, m_i, l_i)
            v = Vd.load([off_b, off_h, hi_full - BN, 0]).reshape(BN, D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    elif PIPE:
        k = Kd.load([off_b, off_h, 0, 0]).reshape(BN, D)
        qk = tl.dot(q, tl.trans(k))
        for start_n in range(BN, hi_full, BN):
            k = Kd.load([off_b, off_h, start_n, 0]).reshape(BN, D)
            qk_next = tl.dot(q, tl.trans(k))
            p, alpha, l_i, m_i = _softmax_step(qk, scale_log2, m_i, l_i)
            v = Vd.load([off_b, off_h, start_n - BN, 0]).reshape(BN, D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            qk = qk_next
        last = tl.maximum(hi_full - BN, 0)
        if hi_full > 0:
            p, alpha, l_i, m_i = _softmax_step(qk, scale_log2, m_i, l_i)
            v = Vd.load([off_b, off_h, last, 0]).reshape(BN, D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    else:
        for start_n in range(0, hi_full, BN):
            k = Kd.load([off_b, off_h, start_n, 0]).reshape(BN, D)
            qk = tl.dot(q, tl.trans(k))
            p, alpha, l_i, m_i = _softmax_step(qk, scale_log2, m_i, l_i)
            v = Vd.load([off_b, off_h, start_n, 0]).reshape(BN, D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    if CAUSAL:
        offs_m = start_m + tl.arange(0, BM)
        for start_n in range(start_m, start_m + BM, BN):
            offs_n = start_n + tl.arange(0, BN)
            k = Kd.load([off_b, off_h, start_n, 0]).reshape(BN, D)
            qk = tl.dot(q, tl.trans(k))
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
            p, alpha, l_i, m_i = _softmax_step(qk, scale_log2, m_i, l_i)
            v = Vd.load([off_b, off_h, start_n, 0]).reshape(BN, D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    out = acc / l_i[:, None]
    Od.store([off_b, off_h, start_m, 0], out.to(Od.dtype).reshape(1, 1, BM, D))


def run(q, k, v, pipe, causal, bm, bn, warps, stages):
    B, H, N, _ = q.shape
    o = torch.empty_like(q)
    descs = [TensorDescriptor.from_tensor(t, [1, 1, bm if t is q or t is o else bn, D])
             for t in (q, k, v, o)]
    grid = (triton.cdiv(N, bm), B * H)
    _fwd[grid](*descs, D ** -0.5 * 1.4426950408889634, H, N, BM=bm, BN=bn, D=D, PIPE=pipe,
               CAUSAL=causal, num_warps=warps, num_stages=stages)
    return o


def compile_only() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.sm90_compile import _cuobjdump, resources
    bm, bn, warps, stages = 128, 64, 8, 3
    for pipe in LOOPS:
        sig = {"Qd": f"tensordesc<bf16[1, 1, {bm}, {D}]>", "Kd": f"tensordesc<bf16[1, 1, {bn}, {D}]>",
               "Vd": f"tensordesc<bf16[1, 1, {bn}, {D}]>", "Od": f"tensordesc<bf16[1, 1, {bm}, {D}]>",
               "scale_log2": "fp32", "H": "i32", "N": "i32"}
        consts = dict(BM=bm, BN=bn, D=D, PIPE=pipe, CAUSAL=False)
        sig.update({name: "constexpr" for name in consts})
        kernel = triton.compile(ASTSource(_fwd, sig, consts, {}), target=GPUTarget("cuda", 90, 128),
                                options=dict(num_warps=warps, num_stages=stages))
        ttgir = kernel.asm["ttgir"]
        waits = []
        for line in ttgir.splitlines():
            if "warp_group_dot_wait" in line:
                name = re.search(r"warp_group_dot_wait %([\w.]+)", line).group(1)
                pendings = re.search(r"pendings = (\d+)", line).group(1)
                waits.append(f"{name}: pendings {pendings}")
        usage = resources(kernel.asm["cubin"])
        sass = _cuobjdump(kernel.asm["cubin"], "-sass")
        print(f"triton {triton.__version__}, {LOOPS[pipe]} loop: "
              f"{usage['reg']} registers, spill {usage['stack']} B; TTGIR waits: "
              f"{'; '.join(waits)}; SASS: {sass.count('HGMMA')} HGMMA,"
              f" {sass.count('WARPGROUP.DEPBAR')} WARPGROUP.DEPBAR")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="compile for sm_90 only (no GPU)")
    args = parser.parse_args()
    if args.compile:
        compile_only()
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    from sdpa_pass.kernels import attention
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))

    def sdpa(backend, q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    tiles = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 4)]
    for causal in (False, True):
        for n in (4096, 8192, 16384):
            b, h = 16384 // n, 16
            q, k, v = (torch.randn(b, h, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * b * h * n * n * D / (2 if causal else 1)
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            print(f"causal={causal} B{b} H{h} N{n} D{D}, TFLOP/s:", flush=True)
            for name, fn in (("ours", lambda: attention(q, k, v, is_causal=causal)),
                             ("sdpa_cudnn", lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal)),
                             ("sdpa_flash", lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal))):
                fn()
                print(f"  {name}: {flops / do_bench_cudagraph(fn, rep=200) / 1e9:.0f}", flush=True)
            for pipe in LOOPS:
                for tile in tiles:
                    label = f"{LOOPS[pipe]} {tile}"
                    try:
                        err = (run(q, k, v, pipe, causal, *tile).float() - ref.float()).abs().max().item()
                        ms = do_bench_cudagraph(lambda: run(q, k, v, pipe, causal, *tile), rep=200)
                        print(f"  {label}: {flops / ms / 1e9:.0f} (max abs err {err:.1e})", flush=True)
                    except Exception as exc:  # noqa: BLE001 - a tile that fails is a result
                        print(f"  {label}: failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)


if __name__ == "__main__":
    main()
