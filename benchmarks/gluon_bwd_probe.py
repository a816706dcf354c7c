"""Can a Gluon dK/dV kernel in FlashAttention-3's backward schedule beat our Triton backward?

Our backward (kernels/backward.py: a prep kernel for delta = rowsum(dO * O), a dK/dV kernel, a
separate dQ kernel) runs its dK/dV kernel at ~380-400 TFLOP/s of backward work at hd128 bf16 on
an H100; cuDNN's backward is ~500+. The forward closed the same kind of gap in Gluon
(kernels/gluon_forward.py) by placing its wgmma waits itself. This probe writes FA3's backward
mainloop (``hopper/mainloop_bwd_sm90_tma_gmma_ws.hpp``, hd128: kBlockN = 128 keys a CTA, two
MMA warpgroups, a 64-row query tile, two Q / dO stages) for hd128 bf16, B x H x N x D
contiguous inputs, N a multiple of 128, optionally causal (top-left, L = S).

One CTA per (batch * head, 128-key tile); a one-warp TMA producer partition (24 registers)
loads K and V once, then per query tile i (64 rows) Q_i with its LSE row and dO_i with its
delta row into a two-slot ring ("ready": TMA bytes, "empty": one arrive per consumer). Two
consumer warpgroups (setmaxnreg 240) each own 64 of the 128 keys (K_w, V_w: rows of the tile)
and accumulate their dK_w, dV_w (64 x 128 fp32 each) in registers. Per query tile:

    issue S^T  = K_w Q_i^T        (64 x 64, async)
    issue dP^T = V_w dO_i^T       (64 x 64, async)
    wait(1)                       S^T done, dP^T in flight
    P^T = exp2(S^T * scale*log2e - lse*log2e)            MUFU.EX2 under dP^T
    issue dV += P^T dO_i          (P^T from registers, async)
    wait(1)                       dP^T done, dV in flight
    dS^T = P^T * (dP^T - delta)                           under dV
    issue dK += dS^T Q_i          (dS^T from registers, async)
    [atomic_dq: dS^T to shared memory (2 slots), fence, both warpgroups meet on an mbarrier,
     issue dQ_i[:, 64w:64w+64] = dS_i K[:, 64w:64w+64] (A = dS^T's smem view transposed)]
    wait(0); release the Q / dO slot; [atomic_dq: fp32 atomic adds of the dQ half;
     tma_dq: the dQ half into a shared-memory stage, then the copy engine's reduce-adds of it
     (two 64 x 32 fp32 boxes), the stage reused once they have read it]

dK is scaled by 1/sqrt(D) once at the end; dK, dV are stored in bf16 through pointers. Every
wait is pinned by data: the second wait cannot rise above the dV issue (which needs P^T), the
last cannot rise above the dK issue (which needs dS^T), so the forward's ptxas hoisting problem
(a wait moved above the exponentials) has nothing to act on. dQ (atomic_dq) is the unscaled
dS K summed in fp32 into a zeroed (B, H, N, D) buffer; the probe scales it on the host.

Variants (``VARIANTS``): ``dkdv_only`` (4 products a tile pair: S^T, dP^T, dV, dK),
``atomic_dq`` (5: + dQ, atomics), ``tma_dq`` (5: + dQ, FA3's reduce-adds by the copy engine,
session 30: compiled for sm_90 with triton 3.6 and 3.9, not yet run), and ``*_causal`` of each
(query tiles from the key tile's first on, the two diagonal query tiles masked; key tiles
launched longest first).

FLOPs: FlashAttention's convention, backward = 2.5 x forward = 2.5 * 4 B H N^2 D (= 5 products
of 2 B H N^2 D), halved for causal: used for ``atomic_dq``, ``tma_dq``, our full backward and
cuDNN's. ``dkdv_only`` counts its 4 products: 4 * 2 B H N^2 D (= 2 x forward), halved for
causal; our Triton dK/dV kernel (timed alone from the profiler in the same process) is counted
the same way (it computes the same 4 products).

    PYTHONPATH=/tmp/tri36/src python .diag/gluon_bwd_probe.py --compile    # no GPU: sm_90
    python .diag/gluon_bwd_probe.py [--variants a,b] [--lengths 4096,16384] [--out DIR]

``--compile``: per variant registers, stack / spill bytes, setmaxnreg values, shared memory,
HGMMA / WARPGROUP.ARRIVE / WARPGROUP.DEPBAR / MUFU.EX2 / BAR.SYNC counts, the ptxas C7514
(serialized wgmma) flag, and the loop's events (A = arrive, H = HGMMA, W<n> = DEPBAR.LE n,
E = MUFU.EX2, S = BAR.SYNC, R = RED/ATOM global). GPU mode, per N (batch 16384 // N, 16 heads,
D 128, bf16): out and lse from ``sdpa_pass.kernels.attention(..., return_lse=True)``, delta in
torch, each variant checked against float32 SDPA gradients (relative Frobenius error, > 1e-2
flagged) and timed with ``do_bench_cudagraph``; our full backward (fwd+bwd minus fwd) and our
dK/dV kernel alone (profiler); SDPA cuDNN forward+backward the same way. JSON to ``--out``.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the forward probe's compile and error helpers (this file runs as a script from benchmarks/)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_fwd_probe import (_compress, _dump, _ptxas_log, _rel_err, _sass_events,  # noqa: E402
                             write_result)

D = 128
BLOCK_N = 128  # keys a CTA (64 a consumer warpgroup)
BLOCK_M = 64  # query rows a tile
STAGES = 2  # Q / dO ring slots
CONSUMER_REGS = 240
LOG2E = 1.4426950408889634
# triton 3.6 names; later releases renamed them
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_LOG2E = gl.constexpr(LOG2E)


# The copy engine's reduce-add from shared memory (cp.reduce.async.bulk.tensor ... .add), as the
# library's Gluon kernels spell it for triton 3.6 and 3.9
try:
    from sdpa_pass.kernels.gluon_forward import _tma_reduce_add
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels.gluon_forward import _tma_reduce_add


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _producer(q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem, q_smem,
              do_smem, lse_smem, delta_smem, kv_bar, q_ready, do_ready, empty,
              bh, N, start_n, first_m, n_iter,
              BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr):
    """K and V once (two 64-row halves each, one a consumer), then Q_i + LSE_i into q slot
    it % STAGES and dO_i + delta_i into the dO slot, once both consumers released the slot
    (one "empty" mbarrier for both: the consumers are done with Q_i and dO_i together)."""
    half: gl.constexpr = BN // 2
    kv_bytes: gl.constexpr = 2 * BN * HEAD * k_desc.dtype.primitive_bitwidth // 8
    mbarrier.expect(kv_bar, kv_bytes)
    row_n = bh * N + start_n
    _tma_load(k_desc, [row_n, 0], kv_bar, k_smem.slice(0, half, dim=0))
    _tma_load(k_desc, [row_n + half, 0], kv_bar, k_smem.slice(half, half, dim=0))
    _tma_load(v_desc, [row_n, 0], kv_bar, v_smem.slice(0, half, dim=0))
    _tma_load(v_desc, [row_n + half, 0], kv_bar, v_smem.slice(half, half, dim=0))
    q_bytes: gl.constexpr = BM * HEAD * q_desc.dtype.primitive_bitwidth // 8 + BM * 4
    for it in range(n_iter):
        slot = it % STAGES
        phase = ((it // STAGES) & 1) ^ 1  # a fresh mbarrier passes a wait on phase 1
        m0 = (first_m + it) * BM
        mbarrier.wait(empty.index(slot), phase)  # both consumers done with Q_i, dO_i's slot
        mbarrier.expect(q_ready.index(slot), q_bytes)
        _tma_load(q_desc, [bh * N + m0, 0], q_ready.index(slot), q_smem.index(slot))
        _tma_load(lse_desc, [bh * N + m0], q_ready.index(slot), lse_smem.index(slot))
        mbarrier.expect(do_ready.index(slot), q_bytes)
        _tma_load(do_desc, [bh * N + m0, 0], do_ready.index(slot), do_smem.index(slot))
        _tma_load(delta_desc, [bh * N + m0], do_ready.index(slot), delta_smem.index(slot))


@gluon.jit
def _store_rows(ptr, acc, row0, HEAD: gl.constexpr, layout: gl.constexpr):
    """A (64, HEAD) fp32 accumulator to rows row0.. of a contiguous (.., HEAD) bf16 tensor."""
    rows = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, HEAD, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(rows, 1) * HEAD + gl.expand_dims(cols, 0)
    gl.store(ptr + offs, acc.to(ptr.dtype.element_ty))


@gluon.jit
def _consumer(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_stage, kv_bar,
              q_ready, do_ready, empty, ds_bar, dk_ptr, dv_ptr, dq_ptr, dq_desc, bh, N, start_n,
              first_m, n_iter, sm_scale, qk_scale,
              W: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr,
              STAGES: gl.constexpr, ATOMIC_DQ: gl.constexpr, TMA_DQ: gl.constexpr,
              IS_CAUSAL: gl.constexpr):
    """Consumer warpgroup W: keys start_n + 64 W .. + 64 of the CTA's tile (module docstring)."""
    dtype: gl.constexpr = q_smem.dtype
    half: gl.constexpr = BN // 2
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BM, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD // 2, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)  # a query index of S^T
    k_w = k_smem.slice(W * half, half, dim=0)
    v_w = v_smem.slice(W * half, half, dim=0)
    st_zero = gl.zeros([half, BM], gl.float32, layout=st_layout)
    dv = gl.zeros([half, HEAD], gl.float32, layout=acc_layout)
    dk = gl.zeros([half, HEAD], gl.float32, layout=acc_layout)
    mbarrier.wait(kv_bar, 0)
    for it in range(n_iter):
        slot = it % STAGES
        phase = (it // STAGES) & 1
        m0 = (first_m + it) * BM
        mbarrier.wait(q_ready.index(slot), phase)
        q_t = q_smem.index(slot)
        st_tok = warpgroup_mma(k_w, q_t.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(slot), phase)
        do_t = do_smem.index(slot)
        dpt_tok = warpgroup_mma(v_w, do_t.permute((1, 0)), st_zero, use_acc=False,
                                is_async=True)
        lse = lse_smem.index(slot).load(col_st) * _LOG2E
        st = warpgroup_mma_wait(num_outstanding=1, deps=[st_tok])  # S^T done, dP^T in flight
        if IS_CAUSAL:
            if it < 2:  # the diagonal query tiles (first_m = start_n // BM): key > query -> 0
                keys = start_n + W * half + gl.arange(0, half, layout=gl.SliceLayout(1, st_layout))
                qs = m0 + gl.arange(0, BM, layout=col_st)
                st = gl.where(gl.expand_dims(keys, 1) <= gl.expand_dims(qs, 0), st,
                              float("-inf"))
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        pt_op = gl.convert_layout(pt.to(dtype), a_layout)
        dv_tok = warpgroup_mma(pt_op, do_t, dv, is_async=True)
        delta = delta_smem.index(slot).load(col_st)
        dpt, dv_tok, pt_op = warpgroup_mma_wait(num_outstanding=1, deps=[dpt_tok, dv_tok, pt_op])
        dst = (pt * (dpt - gl.expand_dims(delta, 0))).to(dtype)
        ds_op = gl.convert_layout(dst, a_layout)
        if ATOMIC_DQ:
            dslot = it % 2
            ds_buf = ds_smem.index(dslot)  # (BN, BM): dS^T of the whole key tile
            ds_buf.slice(W * half, half, dim=0).store(dst)
            fence_async_shared()
            _cta_barrier()  # the warpgroup's stores are all in, then one arrive for it
            mbarrier.arrive(ds_bar.index(dslot))
            dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
            mbarrier.wait(ds_bar.index(dslot), (it // 2) & 1)  # the other half is in too
            dq_tok = warpgroup_mma(ds_buf.permute((1, 0)), k_smem.slice(W * (HEAD // 2), HEAD // 2, dim=1),
                                   gl.zeros([BM, HEAD // 2], gl.float32, layout=dq_layout),
                                   use_acc=False, is_async=True)
            dv, dk, dq, ds_op = warpgroup_mma_wait(num_outstanding=0,
                                                   deps=[dv_tok, dk_tok, dq_tok, ds_op])
            mbarrier.arrive(empty.index(slot))
            if TMA_DQ:
                # this warpgroup's dQ half into its shared-memory stage, then the copy engine's
                # reduce-adds of it, one a 128-byte column block (the descriptor's box: triton
                # 3.6 encodes a 256-byte-wide fp32 box as 128-byte ones but issues a single
                # reduce for it, so the kernel issues one per block itself); the stage is
                # written again only once the previous tile's reduce-adds have read it
                stage = dq_stage.index(W)
                tma.store_wait(0)
                _cta_barrier()
                stage.store(dq)
                fence_async_shared()
                _cta_barrier()
                cols: gl.constexpr = dq_desc.block_type.shape[1]  # a box's columns
                for c in gl.static_range(HEAD // 2 // cols):
                    _tma_reduce_add(dq_desc, [bh * N + m0, W * (HEAD // 2) + c * cols],
                                    stage.slice(c * cols, cols, dim=1))
            else:
                rows = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, dq_layout))
                cols = W * (HEAD // 2) + gl.arange(0, HEAD // 2,
                                                   layout=gl.SliceLayout(0, dq_layout))
                offs = ((bh * N + gl.expand_dims(rows, 1)).to(gl.int64) * HEAD
                        + gl.expand_dims(cols, 0))
                gl.atomic_add(dq_ptr + offs, dq, sem="relaxed")
        else:
            dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
            dv, dk, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=[dv_tok, dk_tok, ds_op])
            mbarrier.arrive(empty.index(slot))
    if TMA_DQ:
        tma.store_wait(0)  # the stage's last reduce-add has read it before the CTA exits
    row0 = bh.to(gl.int64) * N + start_n + W * half
    _store_rows(dv_ptr, dv, row0, HEAD, acc_layout)
    _store_rows(dk_ptr, dk * sm_scale, row0, HEAD, acc_layout)


@gluon.jit
def _bwd_dkdv_ws(q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, dk_ptr, dv_ptr, dq_ptr,
                 dq_desc, sm_scale, qk_scale, H, N,
                 BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                 ATOMIC_DQ: gl.constexpr, TMA_DQ: gl.constexpr, IS_CAUSAL: gl.constexpr,
                 CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Grid (N // BN, B * H). Q, K, V, dO (B, H, N, HEAD) contiguous through 2-d descriptors of
    their (B * H * N, HEAD) views (blocks [BM or BN // 2, HEAD]); LSE (natural log) and delta (B * H * N,) fp32 through 1-d
    descriptors (blocks [BM]); dK, dV (B, H, N, HEAD) bf16 and dQ (B, H, N, HEAD) fp32 (zeroed,
    ATOMIC_DQ only) contiguous, through pointers; with TMA_DQ the dQ adds go through dq_desc
    instead, a 2-d descriptor of dQ's (B * H * N, HEAD) view (blocks [BM, 32] fp32)."""
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    gl.static_assert(BN == 2 * 64, "two consumer warpgroups of 64 keys")
    pid_n = gl.program_id(0)
    bh = gl.program_id(1)
    start_n = pid_n * BN
    if IS_CAUSAL:
        first_m = start_n // BM  # queries i >= keys j: from the key tile's first row on
    else:
        first_m = pid_n * 0
    n_iter = N // BM - first_m
    dtype: gl.constexpr = q_desc.dtype
    # (the [BN // 2, HEAD] descriptor layout is the [BN, HEAD] one: 128-byte swizzle, rank 2)
    k_smem = gl.allocate_shared_memory(dtype, [BN, HEAD], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BN, HEAD], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, HEAD], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, HEAD], do_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], delta_desc.layout)
    if ATOMIC_DQ:
        ds_smem = gl.allocate_shared_memory(dtype, [2, BN, BM],
                                            gl.NVMMASharedLayout.get_default_for([BN, BM], dtype))
    else:
        ds_smem = lse_smem  # (unused)
    if TMA_DQ:  # one (BM, HEAD // 2) fp32 stage a consumer warpgroup
        dq_stage = gl.allocate_shared_memory(
            gl.float32, [2, BM, HEAD // 2],
            gl.NVMMASharedLayout.get_default_for([BM, HEAD // 2], gl.float32))
    else:
        dq_stage = lse_smem  # (unused)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
    for i in gl.static_range(2):
        mbarrier.init(ds_bar.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_stage,
                     kv_bar, q_ready, do_ready, empty, ds_bar, dk_ptr, dv_ptr, dq_ptr, dq_desc,
                     bh, N, start_n, first_m, n_iter, sm_scale, qk_scale, 0, BM, BN, HEAD,
                     STAGES, ATOMIC_DQ, TMA_DQ, IS_CAUSAL)),
        (_consumer, (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_stage,
                     kv_bar, q_ready, do_ready, empty, ds_bar, dk_ptr, dv_ptr, dq_ptr, dq_desc,
                     bh, N, start_n, first_m, n_iter, sm_scale, qk_scale, 1, BM, BN, HEAD,
                     STAGES, ATOMIC_DQ, TMA_DQ, IS_CAUSAL)),
        (_producer, (q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem,
                     q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_ready, do_ready, empty,
                     bh, N, start_n, first_m, n_iter, BM, BN, HEAD, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
# name -> constexprs
VARIANTS = {
    "dkdv_only": dict(ATOMIC_DQ=False, TMA_DQ=False, IS_CAUSAL=False),
    "atomic_dq": dict(ATOMIC_DQ=True, TMA_DQ=False, IS_CAUSAL=False),
    "tma_dq": dict(ATOMIC_DQ=True, TMA_DQ=True, IS_CAUSAL=False),
    "dkdv_only_causal": dict(ATOMIC_DQ=False, TMA_DQ=False, IS_CAUSAL=True),
    "atomic_dq_causal": dict(ATOMIC_DQ=True, TMA_DQ=False, IS_CAUSAL=True),
    "tma_dq_causal": dict(ATOMIC_DQ=True, TMA_DQ=True, IS_CAUSAL=True),
}
DQ_BLOCK = [BLOCK_M, 32]  # the dQ reduce-add's box: 128 bytes of fp32 columns (TMA_DQ)


def _layout(block, dtype=None):
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype or gl.bfloat16)


def _consts(name: str) -> dict:
    return dict(BM=BLOCK_M, BN=BLOCK_N, HEAD=D, STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS,
                num_warps=4, **VARIANTS[name])


def run(name, q, k, v, do, lse, delta):
    """(dQ or None, dK, dV) of variant ``name``; lse natural-log (B, H, N), delta (B, H, N)."""
    B, H, N, d = q.shape
    assert d == D and q.dtype == torch.bfloat16, "the probe covers hd128 bf16 only"
    assert all(t.is_contiguous() for t in (q, k, v, do)), "B x H x N x D contiguous"
    assert N % BLOCK_N == 0, f"N={N} must be a multiple of {BLOCK_N}"
    consts = _consts(name)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = (torch.zeros(B, H, N, D, device=q.device, dtype=torch.float32)
          if consts["ATOMIC_DQ"] else dk)

    def desc2(t, rows):
        return TensorDescriptor.from_tensor(t.view(B * H * N, D), [rows, D], _layout([rows, D]))

    def desc1(t):
        return TensorDescriptor.from_tensor(t.reshape(-1), [BLOCK_M], _layout([BLOCK_M], gl.float32))

    lse = lse.float().contiguous()
    delta = delta.float().contiguous()
    scale = D ** -0.5
    dq_desc = (TensorDescriptor.from_tensor(dq.view(B * H * N, D), DQ_BLOCK,
                                            _layout(DQ_BLOCK, gl.float32))
               if consts["TMA_DQ"] else desc2(q, BLOCK_M))
    _bwd_dkdv_ws[(N // BLOCK_N, B * H)](
        desc2(q, BLOCK_M), desc2(k, BLOCK_N // 2), desc2(v, BLOCK_N // 2), desc2(do, BLOCK_M),
        desc1(lse), desc1(delta), dk, dv, dq, dq_desc, scale, scale * LOG2E, H, N, **consts)
    # (FA3 likewise zeroes an fp32 dQ accumulator and converts it in a second kernel)
    return ((dq * scale).to(q.dtype) if consts["ATOMIC_DQ"] else None), dk, dv


# ---------------------------------------------------------------------------------------------
# compile mode
# ---------------------------------------------------------------------------------------------
# S = BAR.SYNC / BAR.ARV, R = RED / ATOM (the atomic dQ variants), after the wgmma events
BWD_EVENTS = (("S", r"BAR\.(SYNC|ARV)"), ("R", r"\b(RED|ATOM|ATOMG|REDG)\."))


def compile_variant(name: str):
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc2(rows):
        return f"tensordesc<bf16[{rows}, {D}],{_layout([rows, D])!r}>"

    desc1 = f"tensordesc<fp32[{BLOCK_M}],{_layout([BLOCK_M], gl.float32)!r}>"
    consts = _consts(name)
    sig = {"q_desc": desc2(BLOCK_M), "k_desc": desc2(BLOCK_N // 2), "v_desc": desc2(BLOCK_N // 2),
           "do_desc": desc2(BLOCK_M), "lse_desc": desc1, "delta_desc": desc1,
           "dk_ptr": "*bf16", "dv_ptr": "*bf16", "dq_ptr": "*fp32" if consts["ATOMIC_DQ"] else "*bf16",
           "dq_desc": (f"tensordesc<fp32[{DQ_BLOCK[0]}, {DQ_BLOCK[1]}],"
                       f"{_layout(DQ_BLOCK, gl.float32)!r}>" if consts["TMA_DQ"]
                       else desc2(BLOCK_M)),
           "sm_scale": "fp32", "qk_scale": "fp32", "H": "i32", "N": "i32"}
    sig.update({key: "constexpr" for key in consts})
    # what a launch specializes: pointers 16-byte aligned, H and N multiples of 16
    attrs = {(list(sig).index(a),): [["tt.divisibility", 16]]
             for a in ("dk_ptr", "dv_ptr", "dq_ptr", "H", "N")}
    return triton.compile(GluonASTSource(_bwd_dkdv_ws, sig, consts, attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def compile_product(dtype: str = "bf16", causal: bool = False, head_dim: int = 128,
                    kernel: str = "dkdv", padding: int = 0, mask_tile: int = 0,
                    window: bool | str = False, softcap: bool = False, ragged: bool = False,
                    fused_dq: bool = False):
    """The library's kernels (kernels/gluon_backward.py) compiled for sm_90 as a launch on
    contiguous tensors makes them: ``dkdv`` (this probe's ``dkdv_only`` schedule with GQA, any
    lengths and causal offsets, 4-d descriptors, fp16 / bf16) or ``dq`` (the same schedule
    over query rows); ``padding``: their KEY_SPAN flags (2: HF's (B, 1, 1, S) bool padding
    mask); ``mask_tile``: with an attn_mask read in tiles (MASK_TILE: 1 a bool one, 2 a float
    bias of ``dtype``); ``window``: a causal sliding window (WINDOW; "one": of one key, which
    a launch specializes); ``softcap``: soft-capped scores (SOFTCAP); ``ragged``: the dQ
    kernel's RAGGED_KEYS (keys not a whole number of tiles), and the dK/dV kernel's beside
    ``fused_dq``; ``fused_dq``: the dK/dV kernel's FUSED_DQ
    (dQ's sums reduce-added through a (rows, D) fp32 descriptor of [64, 32] boxes). The dK/dV
    kernel in the program order the library launches it in (``dkdv_order``, which
    SDPA_PASS_GLUON_BWD_ORDER overrides)."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    try:
        from sdpa_pass.kernels import gluon_backward as product
    except ImportError:  # a checkout that is not installed
        from kernels import gluon_backward as product
    from_forward = sys.modules[product.__name__.rsplit(".", 1)[0] + ".gluon_forward"]
    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16
    block = (1, 1, product.BLOCK_M, head_dim)  # both kernels' tiles are 64 rows
    tile = f"tensordesc<{dtype}[{', '.join(map(str, block))}],{from_forward._layout(block, gdt)!r}>"
    stats = f"tensordesc<fp32[{product.BLOCK_M}],{from_forward._layout((product.BLOCK_M,), gl.float32)!r}>"
    padding_sig = {name: "i32" for name in ("stride_pb", "stride_pn", "stride_mb", "stride_mh",
                                            "stride_mn", "mask_b_on", "mask_h_on")}
    mask_block = (1, 1, 64, 64)  # both kernels' mask tiles at hd128
    mask_dtype, mask_gl = ("u8", gl.uint8) if mask_tile == 1 else (dtype, gdt)
    padding_sig["mt_desc"] = (f"tensordesc<{mask_dtype}[{', '.join(map(str, mask_block))}],"
                              f"{from_forward._layout(mask_block, mask_gl)!r}>"
                              if mask_tile else "constexpr")
    if kernel == "dq":
        fn = product._attention_bwd_dq_ws
        sig = {"q_desc": tile, "k_desc": tile, "v_desc": tile, "do_desc": tile,
               "stats_desc": stats, "dq_desc": tile, "qk_scale": "fp32", "cap_scale": "fp32", "sm_scale": "fp32",
               "kpm_ptr": "*i1", "mask_ptr": "*i1", "spans_ptr": "*i32", "span_sb": "i32",
               "span_sh": "i32", "Hq": "i32", "S": "i32", "group": "i32",
               "offset": "i32", "window": "i32", "rows": "i32", "stats_stride": "i32",
               **padding_sig}
        kv_block = (1, 1, product.dq_block_n(head_dim), head_dim)
        sig["k_desc"] = sig["v_desc"] = (f"tensordesc<{dtype}[{', '.join(map(str, kv_block))}],"
                                         f"{from_forward._layout(kv_block, gdt)!r}>")
        consts = dict(BM=product.dq_block_m(head_dim), BN=product.dq_block_n(head_dim),
                      HEAD=head_dim, STAGES=product.STAGES, IS_CAUSAL=causal, WINDOW=bool(window),
                      KEY_SPAN=padding,
                      MASK_TILE=mask_tile, SOFTCAP=softcap, RAGGED_KEYS=ragged,
                      CONSUMER_REGS=product.CONSUMER_REGS,
                      P_STAGES=product.wide_p_stages(mask_tile), num_warps=4)
    else:
        fn = product._attention_bwd_dkdv_ws
        sig = {"q_desc": tile, "k_desc": tile, "v_desc": tile, "do_desc": tile,
               "stats_desc": stats, "dk_desc": tile, "dv_desc": tile, "kpm_ptr": "*i1",
               "mask_ptr": "*i1", "qk_scale": "fp32", "cap_scale": "fp32", "sm_scale": "fp32", "Hkv": "i32",
               "L": "i32", "S": "i32", "group": "i32", "offset": "i32", "window": "i32",
               "rows": "i32",
               "stats_stride": "i32", **padding_sig}
        consts = dict(BM=product.BLOCK_M, BN=product.dkdv_block_n(head_dim), HEAD=head_dim,
                      STAGES=product.STAGES, IS_CAUSAL=causal, WINDOW=bool(window),
                      KEY_SPAN=padding, ROW_PER_HEAD=False, MASK_TILE=mask_tile, SOFTCAP=softcap,
                      ORDER=product.ORDERS.index(product.dkdv_order(causal, 1)),
                      GROUP=product.GROUP_HEADS, CONSUMER_REGS=product.CONSUMER_REGS,
                      P_STAGES=product.wide_p_stages(mask_tile), FUSED_DQ=fused_dq,
                      RAGGED_KEYS=fused_dq and ragged, num_warps=4)
        if fused_dq:
            dq_block = (product.BLOCK_M, product.FUSED_DQ_COLS)
            sig["dq_desc"] = (f"tensordesc<fp32[{', '.join(map(str, dq_block))}],"
                              f"{from_forward._layout(dq_block, gl.float32)!r}>")
        else:
            consts["dq_desc"] = None
    # the padding rows' key strides are 1 (contiguous rows), which a launch specializes
    consts.update(stride_pn=1, stride_mn=1)
    if window == "one":  # a launch with a window of 1 specializes it as a constexpr
        consts["window"] = 1
    if not mask_tile:
        consts["mt_desc"] = None
    sig.update({key: "constexpr" for key in consts})
    return triton.compile(GluonASTSource(fn, sig, consts, {}),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def compile_report(name: str, sass_dir: Path | None = None) -> dict:
    if name.startswith("product:"):
        _, which, dtype, causal, head_dim, padding, tile, softcap, ragged, fused = (
            name.split(":") + ["0", "0", "0", "0", "0"])[:10]
        window = {"window": True, "window_one": "one"}.get(causal, False)
        kernel = compile_product(dtype, causal in ("causal", "window", "window_one"),
                                 int(head_dim), which, int(padding), int(tile), window,
                                 softcap == "1", ragged == "1", fused == "1")
    else:
        kernel = compile_variant(name)
    cubin = kernel.asm["cubin"]
    res = _dump(cubin, "--dump-resource-usage")
    sass = _dump(cubin, "-sass")
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        (sass_dir / f"gluon_bwd_{name}.sass").write_text(sass)
        (sass_dir / f"gluon_bwd_{name}.ptx").write_text(kernel.asm["ptx"])
    ptx = kernel.asm["ptx"]
    log = _ptxas_log(ptx)
    spill = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    events = _sass_events(sass, BWD_EVENTS)
    return {
        "registers": int(re.search(r"REG:(\d+)", res).group(1)),
        "stack_bytes": int(re.search(r"STACK:(\d+)", res).group(1)),
        "spill_store_bytes": int(spill.group(1)) if spill else None,
        "spill_load_bytes": int(spill_ld.group(1)) if spill_ld else None,
        "setmaxnreg": sorted({int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}),
        "shared_bytes": kernel.metadata.shared,
        "HGMMA": events.count("H"), "WARPGROUP.ARRIVE": events.count("A"),
        "WARPGROUP.DEPBAR": sum(e.startswith("W") for e in events),
        "MUFU.EX2": events.count("E"), "BAR": events.count("S"), "RED/ATOM": events.count("R"),
        "TMA reduce-adds": len(re.findall(r"\bUTMAREDG\.", sass)),
        "wgmma serialized (ptxas C7514)": "C7514" in log,
        "events": _compress(events),
    }


def compile_only(names, sass_dir, in_process: bool) -> None:
    if not in_process:
        print(f"triton {triton.__version__}, sm_90, hd{D} bf16, BM {BLOCK_M} BN {BLOCK_N}")
        print("events: A = WARPGROUP.ARRIVE, H = HGMMA, W<n> = WARPGROUP.DEPBAR.LE gsb0 n, "
              "E = MUFU.EX2, S = BAR.SYNC/ARV, R = RED/ATOM", flush=True)
        # one process a variant: an MLIR assertion aborts the process, not just the variant
        for name in names:
            cmd = [sys.executable, __file__, "--compile", "--in-process", "--variants", name]
            if sass_dir is not None:
                cmd += ["--sass-dir", str(sass_dir)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            text = out.stdout.strip()
            if out.returncode != 0:
                err = [ln for ln in out.stderr.strip().splitlines() if ln.strip()][-6:]
                text += f"\n{name}: process failed (rc {out.returncode}): " + " | ".join(err)
            print(text, flush=True)
        return
    for name in names:
        try:
            rep = compile_report(name, sass_dir)
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a result
            msg = str(exc).strip().splitlines()
            print(f"{name}: compile failed: {type(exc).__name__}: " + " | ".join(msg[-12:]))
            continue
        events = rep.pop("events")
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in rep.items()))
        print(f"  events: {events}")


# ---------------------------------------------------------------------------------------------
# GPU mode
# ---------------------------------------------------------------------------------------------
PEERS = ("ours_bwd", "ours_dkdv_kernel", "sdpa_cudnn")


def _kernel_times(fn, calls: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name[:80]] = times.get(event.name[:80], 0.0) + event.device_time / 1e3 / calls
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def gpu_main(out_dir: Path, names: list[str], lengths: list[int], causal_modes, label: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    sys.path[:0] = [os.getcwd(), str(Path(__file__).resolve().parents[1])]
    from sdpa_pass.kernels import attention

    device = torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "dtype": "bf16", "head_dim": D, "BM": BLOCK_M, "BN": BLOCK_N,
              "flops": "bwd = 2.5 * 4 B H N^2 D (/2 causal); dkdv (4 products) = 2 * 4 B H N^2 D "
                       "(/2 causal)", "rows": []}
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for n in lengths:
        for causal in causal_modes:
            b, h = max(1, 16384 // n), 16
            torch.manual_seed(0)
            q, k, v, do = (torch.randn(b, h, n, D, device="cuda", dtype=torch.bfloat16)
                           for _ in range(4))
            fwd_flops = 4 * b * h * n * n * D / (2 if causal else 1)
            bwd_flops, dkdv_flops = 2.5 * fwd_flops, 2.0 * fwd_flops
            out, lse = attention(q, k, v, return_lse=True, is_causal=causal)
            delta = (do.float() * out.float()).sum(-1)
            qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
            ref = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(
                qf, kf, vf, is_causal=causal), (qf, kf, vf), do.float())
            del qf, kf, vf
            tag = "causal" if causal else "non-causal"
            print(f"B{b} H{h} N{n} D{D} {tag}: TFLOP/s (rel err dQ / dK / dV vs fp32 SDPA)",
                  flush=True)
            cands = []
            for name in VARIANTS:
                if VARIANTS[name]["IS_CAUSAL"] != causal:
                    continue
                base = name.replace("_causal", "")
                if name not in names and base not in names:
                    continue
                fl = bwd_flops if VARIANTS[name]["ATOMIC_DQ"] else dkdv_flops
                cands.append((name, fl, lambda name=name: run(name, q, k, v, do, lse, delta)))
            for name, fl, fn in cands:
                row = {"N": n, "B": b, "H": h, "causal": causal, "name": name}
                try:
                    dq, dk, dv = fn()
                    torch.cuda.synchronize()
                    errs = {"dk": _rel_err(dk, ref[1]), "dv": _rel_err(dv, ref[2])}
                    if dq is not None:
                        errs["dq"] = _rel_err(dq, ref[0])
                    row["rel_err"] = errs
                    ms = do_bench_cudagraph(fn, rep=200)
                    row.update(ms=ms, tflops=fl / ms / 1e9)
                    flag = "  ** > 1e-2 **" if max(errs.values()) > 1e-2 else ""
                    es = " / ".join(f"{errs[key]:.1e}" if key in errs else "-" for key in ("dq", "dk", "dv"))
                    print(f"  {name:>18}: {row['tflops']:6.0f}  {ms:.3f} ms  ({es}){flag}", flush=True)
                except Exception as exc:  # noqa: BLE001 - one failing variant must not end the run
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                    print(f"  {name:>18}: failed: {row['error']}", flush=True)
                    torch.cuda.synchronize()
                result["rows"].append(row)
            # peers: our full backward, our dK/dV kernel alone, cuDNN's
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

            def ours_fwd():
                return attention(qg, kg, vg, is_causal=causal)

            def ours_fb():
                return torch.autograd.grad(ours_fwd(), (qg, kg, vg), do)

            def cudnn_fwd():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)

            def cudnn_fb():
                return torch.autograd.grad(cudnn_fwd(), (qg, kg, vg), do)

            for peer, (f, fb) in (("ours_bwd", (ours_fwd, ours_fb)),
                                  ("sdpa_cudnn", (cudnn_fwd, cudnn_fb))):
                if peer not in names:
                    continue
                row = {"N": n, "B": b, "H": h, "causal": causal, "name": peer}
                try:
                    grads = fb()
                    row["rel_err"] = {key: _rel_err(g, r) for key, g, r in zip(("dq", "dk", "dv"), grads, ref)}
                    ms_f = do_bench_cudagraph(f, rep=100, return_mode="median")
                    ms_fb = do_bench_cudagraph(fb, rep=100, return_mode="median")
                    row.update(ms_fwd=ms_f, ms_fwdbwd=ms_fb, ms=ms_fb - ms_f,
                               tflops=bwd_flops / (ms_fb - ms_f) / 1e9,
                               fwd_tflops=fwd_flops / ms_f / 1e9)
                    print(f"  {peer:>18}: {row['tflops']:6.0f}  {row['ms']:.3f} ms bwd "
                          f"(fwd {row['fwd_tflops']:.0f})", flush=True)
                    if peer == "ours_bwd" and "ours_dkdv_kernel" in names:
                        kt = _kernel_times(fb)
                        row["kernels_ms"] = kt
                        dk_ms = sum(t for key, t in kt.items() if "dkdv" in key)
                        if dk_ms:
                            krow = {"N": n, "B": b, "H": h, "causal": causal,
                                    "name": "ours_dkdv_kernel", "ms": dk_ms,
                                    "tflops": dkdv_flops / dk_ms / 1e9,
                                    "note": "profiler time; 4-product FLOPs (if our dK/dV "
                                            "kernel also adds dQ it does 5)"}
                            result["rows"].append(krow)
                            print(f"  {'ours_dkdv_kernel':>18}: {krow['tflops']:6.0f}  "
                                  f"{dk_ms:.3f} ms (profiler, 4 products)", flush=True)
                        print("    kernels (ms): " + ", ".join(
                            f"{key[:40]} {t:.3f}" for key, t in list(kt.items())[:5]), flush=True)
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                    print(f"  {peer:>18}: failed: {row['error']}", flush=True)
                    torch.cuda.synchronize()
                result["rows"].append(row)
            del ref
            torch.cuda.empty_cache()
    write_result(out_dir, "gluon_bwd_probe", label, device, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="compile for sm_90 only (no GPU)")
    parser.add_argument("--sass-dir", type=Path, default=None,
                        help="with --compile: write each variant's SASS and PTX here")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true",
                        help="with --compile: each variant's report as a JSON line")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory for the JSON result (GPU mode)")
    parser.add_argument("--variants", default=",".join([*VARIANTS, *PEERS]),
                        help="comma-separated names (a base name such as dkdv_only takes its "
                             "causal twin in causal rows); one a process keeps the others' "
                             "results when one hangs or faults")
    parser.add_argument("--lengths", default="4096,16384", help="N values, comma-separated")
    parser.add_argument("--causal", default="0,1", help="0 (non-causal), 1 (causal) or 0,1")
    parser.add_argument("--label", default="", help="added to the JSON file's name")
    parser.add_argument("--product", choices=("bf16", "fp16"), default=None,
                        help="with --compile: the library's kernel (kernels/gluon_backward.py); "
                             "one JSON line")
    parser.add_argument("--causal-product", action="store_true",
                        help="with --product: the causal kernel")
    parser.add_argument("--window-product", action="store_true",
                        help="with --product: the causal kernel with a sliding window")
    parser.add_argument("--window-one-product", action="store_true",
                        help="with --product: ... of one key (a constexpr in the launch)")
    parser.add_argument("--fused-dq-product", action="store_true",
                        help="with --product: the dK/dV kernel forming dQ too (FUSED_DQ)")
    parser.add_argument("--ragged-product", action="store_true",
                        help="with --product dq, or dkdv with --fused-dq-product: keys not a "
                             "whole number of tiles")
    parser.add_argument("--softcap-product", action="store_true",
                        help="with --product: soft-capped scores (SOFTCAP)")
    parser.add_argument("--head-dim", type=int, default=128,
                        help="with --product: 64, 128 or 256")
    parser.add_argument("--product-kernel", choices=("dkdv", "dq"), default="dkdv",
                        help="with --product: which of the library's two kernels")
    parser.add_argument("--padding", type=int, default=0,
                        help="with --product: KEY_SPAN flags (1 key_padding_mask, 2 a bool row)")
    parser.add_argument("--mask-tile", action="store_true",
                        help="with --product: a bool attn_mask read in tiles (MASK_TILE)")
    parser.add_argument("--bias-tile", action="store_true",
                        help="with --product: a float bias of the product's dtype read in tiles")
    args = parser.parse_args()
    if args.compile and args.product:
        form = ("window_one" if args.window_one_product else "window" if args.window_product
                else "causal" if args.causal_product else "")
        rep = compile_report(f"product:{args.product_kernel}:{args.product}:{form}"
                             f":{args.head_dim}:"
                             f"{args.padding}:{2 if args.bias_tile else int(args.mask_tile)}"
                             f":{int(args.softcap_product)}"
                             f":{int(args.ragged_product)}"
                             f":{int(args.fused_dq_product)}")
        print(json.dumps(rep))
        return
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS) - set(PEERS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; known: {[*VARIANTS, *PEERS]}")
    if args.compile and args.json:
        for name in (n for n in VARIANTS if n in names):  # in this process, one line each
            print(json.dumps({"variant": name, **compile_report(name, args.sass_dir)}))
        return
    if args.compile:
        compile_only([n for n in VARIANTS if n in names], args.sass_dir, args.in_process)
        return
    causal_modes = [bool(int(c)) for c in args.causal.split(",")]
    gpu_main(args.out, names, [int(n) for n in args.lengths.split(",")], causal_modes, args.label)


if __name__ == "__main__":
    main()
