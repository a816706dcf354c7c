"""Does an explicit FlashAttention-3 schedule, written in Gluon, close the forward's gap to cuDNN?

Our Triton forward (hd128, bf16, non-causal) reaches about 480 TFLOP/s on an H100 against
cuDNN's 590-630. ``pipelined_qk.py`` showed that Triton decides the wgmma waits itself, so the
softmax cannot be placed under the tensor cores the way FlashAttention-3 does it. Gluon
(``triton.experimental.gluon``, written here against triton 3.6) hands those decisions to the
kernel: layouts, TMA copies, mbarriers, ``warpgroup_mma(is_async=True)`` and
``warpgroup_mma_wait(num_outstanding, deps)`` are explicit. This probe writes the FA3 schedule
(``hopper/mainloop_fwd_sm90_tma_gmma_ws.hpp``, ``mma``) for hd128 (``--head-dim 64``: hd64) bf16,
non-causal, no mask,
B x H x N x D contiguous inputs, N a multiple of the tiles. Each iteration j of a warpgroup:

    issue S_j = Q K_j^T (async)          # tensor cores start on the next scores
    O *= alpha_{j-1}                     # the previous tile's rescale, deferred
    issue O += P_{j-1} V_{j-1} (async)   # second product queued behind the first
    wait(num_outstanding=1)              # S_j done, P.V still in flight
    softmax of S_j: m, alpha_j, P_j, l   # MUFU.EX2 under the P.V wgmma
    wait for V_j's TMA (mbarrier)        # a branch: see below
    wait(num_outstanding=0)              # O done; K_j and V_{j-1} may be overwritten

The softmax scale 1/sqrt(D) is folded into exp2 (scale * log2 e); the running max m and sum l
are kept per row, O is divided by l at the end and written back in bf16 through TMA.

What ptxas does with the waits (found compiling this file, triton 3.6's ptxas): with the
softmax and both waits in one basic block, ptxas places the second WARPGROUP.DEPBAR right
behind the first, ahead of every exponential, so nothing overlaps (``intra_hoisted``: V_{j-1}
is waited for before its P.V issue instead). The mbarrier wait for V_j between the softmax and
the second wgmma wait is a try-wait loop, i.e. a block boundary, and keeps the DEPBAR where the
source puts it. Leaving P.V in flight across the loop's back edge instead (waited for with
num_outstanding=1 behind the next scores' issue) makes ptxas serialize every wgmma (C7514).

Variants (``VARIANTS``: kernel, query rows a CTA, key tile, ring depth, warps):

* ``intra`` (128, 128, 2, 8), ``intra_bn64`` (128, 64, 3, 8): one partition of 8 warps, two
  warpgroups each owning 64 of the CTA's 128 query rows, each running the loop above on its
  own (FA3's intra-warpgroup overlap). K and V go through shared-memory rings filled by TMA,
  one "ready" mbarrier a slot; a slot is refilled after both warpgroups' waits, behind a CTA
  barrier (one a key tile).
* ``intra_hoisted``: ``intra`` with the V wait before the P.V issue: the same kernel without
  the overlap (the control).
* ``pingpong`` (128, 128, 2, 4+4+1): ``gl.warp_specialize`` with a one-warp TMA producer
  partition (24 registers) and two consumer partitions of one warpgroup each (240 registers,
  setmaxnreg), each owning its own 64-row Q tile and running the loop above. K/V slots have
  "ready" (TMA bytes) and "empty" (one arrive per consumer) mbarriers; the consumers take turns
  issuing their two products (two turn mbarriers: FA3's inter-warpgroup ping-pong, one
  warpgroup's softmax under the other's products).
* ``ws_nopingpong``: ``pingpong`` without the turns (the two consumers issue freely).
* ``ws_tree``, ``ws3_bn64_tree``: the same with each row's max and sum reduced in two steps
  (``_row_reduce``: the in-thread chain of 31 dependent FMNMX / FADD a row cut to 3 + 7;
  session 35, compiled only).
* ``ws3`` (192, 128, 2, 4+4+4+1), ``ws3_bn64`` (192, 64, 3, ...): ``ws_nopingpong`` with three
  consumer warpgroups, FlashAttention-3's shape for head dim 64 (session 35, for
  ``--head-dim 64``; N a multiple of 192: ``--lengths 6144,12288``). Consumers get 160
  registers; at 128-key tiles ptxas spills (1.4 KB of stores, triton 3.6), at 64 it does not.

    python benchmarks/gluon_fwd_probe.py --compile   # no GPU: compile for sm_90, report
    python benchmarks/gluon_fwd_probe.py --compile --product bf16   # the library's kernel
    python benchmarks/gluon_fwd_probe.py             # on an H100: check and time

``--compile`` compiles each variant for sm_90 with the installed Triton's ptxas (triton 3.6:
``PYTHONPATH=<triton 3.6 package> python ...`` works on a machine without a GPU) and prints
registers, spill (stack) bytes, counts of HGMMA, WARPGROUP.DEPBAR / WARPGROUP.ARRIVE,
MUFU.EX2 and BAR.SYNC in the SASS, whether ptxas serialized the wgmmas (C7514), and the
key loop's events from the two issues to the P.V wait: the overlap shows as the MUFU.EX2
between ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` (scores done, P.V in flight) and ``..., 0x0``.
The GPU mode, for N = 4096, 8192, 16384 (batch 16384 / N, 2048 / D heads), checks each
variant against ``scaled_dot_product_attention`` in float32 (relative Frobenius error, > 1e-2
flagged), times each variant, ``sdpa_pass.kernels.attention`` and SDPA's cuDNN and flash
backends through CUDA graphs, prints TFLOP/s (4 B H N^2 D / time) and writes
``gluon_fwd_probe_<device>.json`` to ``--out``.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

try:  # the library's row max / sum, in two steps with TREE (kernels/gluon_forward.py)
    from sdpa_pass.kernels.gluon_forward import _row_reduce
except ImportError:  # a checkout that is not installed
    from kernels.gluon_forward import _row_reduce

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D = 128
LOG2E = 1.4426950408889634
# triton 3.6 names; later releases renamed them (async_load / async_store)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # gl.barrier after 3.6


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, TREE: gl.constexpr):
    """Online softmax of one score tile in raw units: (P in fp32, alpha, new l, new m).
    TREE: the row max and sum in two steps (``_row_reduce``)."""
    m_new = gl.maximum(m_i, _row_reduce(s, True, TREE) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    l_new = l_i * alpha + _row_reduce(p, False, TREE)
    return p, alpha, l_new, m_new




@gluon.jit
def _refill(desc, ready, smem, slot, row, kv_bytes: gl.constexpr, pred):
    """Issue one K or V tile's TMA load into a ring slot (skipped past the last tile)."""
    mbarrier.expect(ready.index(slot), kv_bytes, pred=pred)
    _tma_load(desc, [row, 0], ready.index(slot), smem.index(slot), pred=pred)


@gluon.jit
def _consumer_loop(q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn_mine, turn_other,
                   k_desc, v_desc, kv_row0, n_tiles, qk_scale,
                   BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                   s_layout: gl.constexpr, o_layout: gl.constexpr,
                   REFILL: gl.constexpr, WS: gl.constexpr, PINGPONG: gl.constexpr,
                   SPLIT_WAIT: gl.constexpr, TREE: gl.constexpr):
    """One consumer warpgroup's key loop over n_tiles K/V tiles in FA3's intra-warpgroup schedule.

    Iteration j: issue S_j = Q K_j^T; rescale O for tile j-1's max (deferred); issue
    O += P_{j-1} V_{j-1}; wait(num_outstanding=1): S_j done, P.V in flight; tile j's softmax
    (its MUFU.EX2 under the P.V wgmma); wait for V_j's TMA (an mbarrier try-wait loop, i.e. a
    branch); wait(num_outstanding=0). The V wait sits between the softmax and the last wgmma
    wait on purpose: ptxas schedules a WARPGROUP.DEPBAR as early as its basic block allows,
    and with the softmax and both waits in one block it put the second wait right after the
    first, ahead of every exponential (no overlap). The other obvious fix, leaving P.V in
    flight across the loop's back edge and waiting for it with num_outstanding=1 behind the
    next scores' issue, makes ptxas serialize every wgmma of the kernel (C7514: "non wgmma
    instructions reading accumulator registers ... between start and end of the pipeline
    stage"). SPLIT_WAIT=False is the control: V_{j-1} is waited for right before its P.V
    issue instead, and ptxas hoists the P.V wait above the softmax.

    Returns the unnormalized O and the row sums l (in o_layout's rows). REFILL (single
    partition): this code refills the K/V slots, behind a CTA barrier that makes sure every
    warpgroup is done with them. WS: a producer partition refills them; this consumer arrives on
    the slots' empty barriers. PINGPONG: two consumers take turns issuing their two products
    (wait on turn_mine before the scores' issue, arrive on turn_other after the P.V issue)."""
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    kv_bytes: gl.constexpr = BN * HEAD * 2
    s_zero = gl.zeros([BM, BN], gl.float32, layout=s_layout)
    o = gl.zeros([BM, HEAD], gl.float32, layout=o_layout)

    # key tile 0: scores and the first softmax (nothing to overlap with yet)
    mbarrier.wait(k_ready.index(0), 0)
    if PINGPONG:
        mbarrier.wait(turn_mine, 0)
    s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_other)
    s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
    if WS:
        mbarrier.arrive(k_empty.index(0))
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, 1)
    alpha = gl.full([BM], 1.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    if REFILL:
        _cta_barrier()  # every warpgroup is past its wait for K_0: slot 0 takes K_STAGES
        _refill(k_desc, k_ready, k_smem, 0, kv_row0 + STAGES * BN, kv_bytes, STAGES < n_tiles)
    if SPLIT_WAIT:
        mbarrier.wait(v_ready.index(0), 0)

    for j in range(1, n_tiles):
        sk = j % STAGES
        sv = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(sk), (j // STAGES) & 1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        if PINGPONG:
            mbarrier.wait(turn_mine, j & 1)
        # S_j = Q K_j^T starts on the tensor cores ...
        s_tok = warpgroup_mma(q_smem, k_smem.index(sk).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
        # ... tile j-1's deferred rescale runs under it (O is not in flight here) ...
        o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        # ... and O += P_{j-1} V_{j-1} is queued behind it (V_{j-1} waited for last iteration)
        if not SPLIT_WAIT:
            mbarrier.wait(v_ready.index(sv), ((j - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(sv), o, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_other)
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])  # S_j done, P.V in flight
        if WS:
            mbarrier.arrive(k_empty.index(sk))
        # tile j's softmax, its exponentials under the P.V wgmma
        p, alpha, l_i, m_i = _softmax_step(s, m_i, l_i, qk_scale, TREE)
        # V_j for the next iteration: also the basic-block boundary that keeps ptxas from
        # hoisting the next wait above the softmax
        if SPLIT_WAIT:
            mbarrier.wait(v_ready.index(sk), (j // STAGES) & 1)
        o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
        if WS:
            mbarrier.arrive(v_empty.index(sv))
        if REFILL:
            _cta_barrier()  # every warpgroup is done with K_j and V_{j-1}
            _refill(k_desc, k_ready, k_smem, sk, kv_row0 + (j + STAGES) * BN, kv_bytes,
                    j + STAGES < n_tiles)
            _refill(v_desc, v_ready, v_smem, sv, kv_row0 + (j - 1 + STAGES) * BN, kv_bytes,
                    j - 1 + STAGES < n_tiles)

    # the last tile's P.V (V_{n-1} waited for above)
    sv_last = (n_tiles - 1) % STAGES
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    if not SPLIT_WAIT:
        mbarrier.wait(v_ready.index(sv_last), ((n_tiles - 1) // STAGES) & 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(sv_last), o, is_async=True)
    o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
    if WS:
        mbarrier.arrive(v_empty.index(sv_last))
    return o, gl.convert_layout(l_i, row_o)


@gluon.jit
def _store_out(o, l_i, o_smem, o_desc, o_row0):
    """O / l in bf16 through shared memory (the Q tile's, no longer read) and a TMA store."""
    o = o / gl.expand_dims(l_i, 1)
    o_smem.store(o.to(gl.bfloat16))
    fence_async_shared()
    _cta_barrier()
    _tma_store(o_desc, [o_row0, 0], o_smem)
    tma.store_wait(0)


# ---------------------------------------------------------------------------------------------
# variant "intra": one partition, two warpgroups, FA3's intra-warpgroup overlap
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _fwd_intra(q_desc, k_desc, v_desc, o_desc, qk_scale, N,
               BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
               SPLIT_WAIT: gl.constexpr, num_warps: gl.constexpr):
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    kv_row0 = pid_bh * N
    q_row0 = kv_row0 + pid_m * BM
    n_tiles = N // BN
    # one warpgroup per 64 query rows, wgmma instruction N as wide as the tile
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD, 16])

    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, HEAD], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, HEAD], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, HEAD], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
    fence_async_shared()

    kv_bytes: gl.constexpr = BN * HEAD * 2
    mbarrier.expect(q_bar, BM * HEAD * 2)
    _tma_load(q_desc, [q_row0, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):  # the host checks n_tiles >= STAGES
        mbarrier.expect(k_ready.index(i), kv_bytes)
        _tma_load(k_desc, [kv_row0 + i * BN, 0], k_ready.index(i), k_smem.index(i))
        mbarrier.expect(v_ready.index(i), kv_bytes)
        _tma_load(v_desc, [kv_row0 + i * BN, 0], v_ready.index(i), v_smem.index(i))
    mbarrier.wait(q_bar, 0)

    o, l_i = _consumer_loop(q_smem, k_smem, v_smem, k_ready, v_ready, k_ready, v_ready, q_bar, q_bar,
                            k_desc, v_desc, kv_row0, n_tiles, qk_scale,
                            BM, BN, HEAD, STAGES, s_layout, o_layout,
                            REFILL=True, WS=False, PINGPONG=False, SPLIT_WAIT=SPLIT_WAIT,
                            TREE=False)
    # (the barriers are not invalidated: a warpgroup could still be waiting on one)
    _store_out(o, l_i, q_smem, o_desc, q_row0)


# ---------------------------------------------------------------------------------------------
# variant "pingpong": TMA producer warp + two consumer warpgroups, each with its own Q tile
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _pp_producer(q_desc, k_desc, v_desc, q_smem, q_bar, k_smem, v_smem,
                 k_ready, v_ready, k_empty, v_empty, q_row0, kv_row0, n_tiles,
                 BMW: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                 CONSUMERS: gl.constexpr):
    """Each consumer's 64-row Q tile (``q_smem``: CONSUMERS of them), then K and V through the
    ring, a slot refilled once every consumer released it."""
    kv_bytes: gl.constexpr = BN * HEAD * 2
    mbarrier.expect(q_bar, CONSUMERS * BMW * HEAD * 2)
    for c in gl.static_range(CONSUMERS):
        _tma_load(q_desc, [q_row0 + c * BMW, 0], q_bar, q_smem.index(c))
    for j in range(n_tiles):
        slot = j % STAGES
        phase = ((j // STAGES) & 1) ^ 1  # a fresh barrier passes a wait on phase 1
        mbarrier.wait(k_empty.index(slot), phase)
        mbarrier.expect(k_ready.index(slot), kv_bytes)
        _tma_load(k_desc, [kv_row0 + j * BN, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase)
        mbarrier.expect(v_ready.index(slot), kv_bytes)
        _tma_load(v_desc, [kv_row0 + j * BN, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _pp_consumer(o_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                 turn_mine, turn_other, o_row0, n_tiles, qk_scale,
                 BMW: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                 PINGPONG: gl.constexpr, TREE: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD, 16])
    mbarrier.wait(q_bar, 0)
    o, l_i = _consumer_loop(q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                            turn_mine, turn_other, o_desc, o_desc, 0, n_tiles, qk_scale,
                            BMW, BN, HEAD, STAGES, s_layout, o_layout,
                            REFILL=False, WS=True, PINGPONG=PINGPONG, SPLIT_WAIT=True,
                            TREE=TREE)
    _store_out(o, l_i, q_smem, o_desc, o_row0)


@gluon.jit
def _fwd_pingpong(q_desc, k_desc, v_desc, o_desc, qk_scale, N,
                  BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                  PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, TREE: gl.constexpr,
                  CONSUMERS: gl.constexpr, num_warps: gl.constexpr):
    """CONSUMERS (2 or 3) consumer warpgroups of 64 query rows each and a copy warp. Three:
    variant ``ws3``, as FlashAttention-3 runs head dim 64 (``hopper/tile_size.h``: 192 query
    rows a CTA): with the softmax as long as the products there, a third warpgroup's products
    can fill the tensor cores while two exponentiate. 13 warps then share the register file,
    so a consumer gets ~160 registers (``CONSUMER_REGS``) where two take 240; no turns."""
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    gl.static_assert(CONSUMERS == 2 or not PINGPONG, "turns are for two consumers")
    BMW: gl.constexpr = BM // CONSUMERS
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    kv_row0 = pid_bh * N
    q_row0 = kv_row0 + pid_m * BM
    n_tiles = N // BN

    q_smem = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, BMW, HEAD], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, HEAD], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, HEAD], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)  # one arrive per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    mbarrier.init(turns.index(0), count=1)
    mbarrier.init(turns.index(1), count=1)
    fence_async_shared()
    mbarrier.arrive(turns.index(0))  # consumer 0 issues first

    if CONSUMERS == 2:
        gl.warp_specialize([
            (_pp_consumer, (o_desc, q_smem.index(0), q_bar, k_smem, v_smem, k_ready, v_ready,
                            k_empty, v_empty, turns.index(0), turns.index(1), q_row0, n_tiles,
                            qk_scale, BMW, BN, HEAD, STAGES, PINGPONG, TREE)),
            (_pp_consumer, (o_desc, q_smem.index(1), q_bar, k_smem, v_smem, k_ready, v_ready,
                            k_empty, v_empty, turns.index(1), turns.index(0), q_row0 + BMW,
                            n_tiles, qk_scale, BMW, BN, HEAD, STAGES, PINGPONG, TREE)),
            (_pp_producer, (q_desc, k_desc, v_desc, q_smem, q_bar, k_smem, v_smem,
                            k_ready, v_ready, k_empty, v_empty, q_row0, kv_row0, n_tiles,
                            BMW, BN, HEAD, STAGES, CONSUMERS)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:
        # (the turn barriers ride along unread: no turns with three)
        gl.warp_specialize([
            (_pp_consumer, (o_desc, q_smem.index(0), q_bar, k_smem, v_smem, k_ready, v_ready,
                            k_empty, v_empty, turns.index(0), turns.index(1), q_row0, n_tiles,
                            qk_scale, BMW, BN, HEAD, STAGES, False, TREE)),
            (_pp_consumer, (o_desc, q_smem.index(1), q_bar, k_smem, v_smem, k_ready, v_ready,
                            k_empty, v_empty, turns.index(0), turns.index(1), q_row0 + BMW,
                            n_tiles, qk_scale, BMW, BN, HEAD, STAGES, False, TREE)),
            (_pp_consumer, (o_desc, q_smem.index(2), q_bar, k_smem, v_smem, k_ready, v_ready,
                            k_empty, v_empty, turns.index(0), turns.index(1), q_row0 + 2 * BMW,
                            n_tiles, qk_scale, BMW, BN, HEAD, STAGES, False, TREE)),
            (_pp_producer, (q_desc, k_desc, v_desc, q_smem, q_bar, k_smem, v_smem,
                            k_ready, v_ready, k_empty, v_empty, q_row0, kv_row0, n_tiles,
                            BMW, BN, HEAD, STAGES, CONSUMERS)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
# name -> (kernel, BM (query rows a CTA), BN, STAGES, num_warps, extra constexprs)
_WS3 = {"PINGPONG": False, "CONSUMER_REGS": 160, "TREE": False, "CONSUMERS": 3}
VARIANTS = {
    "intra": (_fwd_intra, 128, 128, 2, 8, {"SPLIT_WAIT": True}),
    "intra_bn64": (_fwd_intra, 128, 64, 3, 8, {"SPLIT_WAIT": True}),
    "intra_hoisted": (_fwd_intra, 128, 128, 2, 8, {"SPLIT_WAIT": False}),
    "pingpong": (_fwd_pingpong, 128, 128, 2, 4,
                 {"PINGPONG": True, "CONSUMER_REGS": 240, "TREE": False, "CONSUMERS": 2}),
    "ws_nopingpong": (_fwd_pingpong, 128, 128, 2, 4,
                      {"PINGPONG": False, "CONSUMER_REGS": 240, "TREE": False, "CONSUMERS": 2}),
    "ws_tree": (_fwd_pingpong, 128, 128, 2, 4,
                {"PINGPONG": False, "CONSUMER_REGS": 240, "TREE": True, "CONSUMERS": 2}),
    "ws3": (_fwd_pingpong, 192, 128, 2, 4, _WS3),
    "ws3_bn64": (_fwd_pingpong, 192, 64, 3, 4, _WS3),
    "ws3_bn64_tree": (_fwd_pingpong, 192, 64, 3, 4, {**_WS3, "TREE": True}),
}


def _q_block(name: str) -> int:
    """Rows of a Q / O descriptor block: the warp-specialized kernels load one 64-row tile a
    consumer warpgroup."""
    kernel, bm, *_, extra = VARIANTS[name]
    return bm // extra.get("CONSUMERS", 1)


def _layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


def run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    kernel, bm, bn, stages, warps, extra = VARIANTS[name]
    B, H, N, d = q.shape
    assert d == D and q.dtype == torch.bfloat16, f"the probe is set to hd{D} bf16 (--head-dim)"
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous(), "B x H x N x D contiguous"
    assert N % bm == 0 and N % bn == 0 and N // bn >= stages, \
        f"{name}: N={N} must be a multiple of {bm} and {bn} and hold at least {stages} key tiles"
    o = torch.empty_like(q)
    qb = _q_block(name)
    q2, k2, v2, o2 = (t.view(B * H * N, D) for t in (q, k, v, o))
    q_desc = TensorDescriptor.from_tensor(q2, [qb, D], _layout([qb, D]))
    o_desc = TensorDescriptor.from_tensor(o2, [qb, D], _layout([qb, D]))
    k_desc = TensorDescriptor.from_tensor(k2, [bn, D], _layout([bn, D]))
    v_desc = TensorDescriptor.from_tensor(v2, [bn, D], _layout([bn, D]))
    grid = (N // bm, B * H)
    kernel[grid](q_desc, k_desc, v_desc, o_desc, D ** -0.5 * LOG2E, N,
                 BM=bm, BN=bn, HEAD=D, STAGES=stages, num_warps=warps, **extra)
    return o


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _dump(cubin: bytes, *flags: str, tool: str = "cuobjdump") -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


# the events besides the wgmma ones and MUFU.EX2, tried in order: (letter, SASS pattern)
FWD_EVENTS = (("F", r"SHFL"), ("S", r"BAR\.SYNC"))


def _sass_events(sass: str, others=FWD_EVENTS) -> list[str]:
    """The machine code's wgmma-related events in order: A = WARPGROUP.ARRIVE, H = HGMMA,
    W<n> = WARPGROUP.DEPBAR.LE gsb0 n (wait until at most n wgmma groups are in flight),
    E = MUFU.EX2, then ``others`` (here F = SHFL, S = BAR.SYNC, a CTA or named barrier)."""
    events = []
    for ln in sass.splitlines():
        if "HGMMA" in ln:
            events.append("H")
        elif "WARPGROUP.DEPBAR" in ln:
            n = re.search(r"DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", ln)
            events.append(f"W{int(n.group(1), 16) if n else '?'}")
        elif "WARPGROUP.ARRIVE" in ln:
            events.append("A")
        elif "MUFU.EX2" in ln:
            events.append("E")
        else:
            for letter, pattern in others:
                if re.search(pattern, ln):
                    events.append(letter)
                    break
    return events


def _overlap(events: list[str]) -> tuple[list[int], str]:
    """For each wait that leaves one wgmma group in flight (W1: the scores are done, P.V is
    not), the MUFU.EX2 count before the next wait (W0, P.V done): the exponentials issued
    under the P.V product. Also the first such stretch, from the two issues before it."""
    counts, window = [], ""
    for i, e in enumerate(events):
        if e != "W1":
            continue
        j = i + 1
        while j < len(events) and not events[j].startswith("W"):
            j += 1
        counts.append(events[i:j].count("E"))
        if not window:
            k, arrives = i, 0
            while k > 0 and arrives < 2:
                k -= 1
                arrives += events[k] == "A"
            window = _compress(events[k:j + 1])
    return counts, window


def _compress(events: list[str]) -> str:
    out = []
    for e in events:
        if out and out[-1][0] == e:
            out[-1][1] += 1
        else:
            out.append([e, 1])
    return " ".join(f"{e}x{n}" if n > 1 else e for e, n in out)


def compile_variant(name: str):
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    kernel, bm, bn, stages, warps, extra = VARIANTS[name]
    qb = _q_block(name)

    def desc(rows):
        return f"tensordesc<bf16[{rows}, {D}],{_layout([rows, D])!r}>"

    sig = {"q_desc": desc(qb), "k_desc": desc(bn), "v_desc": desc(bn), "o_desc": desc(qb),
           "qk_scale": "fp32", "N": "i32"}
    consts = dict(BM=bm, BN=bn, HEAD=D, STAGES=stages, num_warps=warps, **extra)
    sig.update({key: "constexpr" for key in consts})
    return triton.compile(GluonASTSource(kernel, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps))


def _ptxas(arch: str) -> str:
    """The ptxas Triton compiles ``arch`` with: from triton 3.7 or so the bundled
    ``ptxas-blackwell`` (CUDA 13) for sm_90 too, whose PTX the older ``ptxas`` beside it
    refuses ("Unsupported .version")."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(int(re.sub(r"\D", "", arch))).path
    except (ImportError, AttributeError):  # an older Triton: the one bundled ptxas
        return _tool("ptxas")


def _ptxas_log(ptx: str) -> str:
    """ptxas -v on the kernel's PTX (the same ptxas Triton used): its C7514 line says when it
    serialized the wgmmas, and its spill lines what went to local memory. A ptxas that fails
    raises, so no report reads its silence as "not serialized"."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        out = subprocess.run([_ptxas(arch), f"-arch={arch}", "-v", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
        log = out.stdout + out.stderr
        if out.returncode != 0 or "Used" not in log:
            raise RuntimeError(f"ptxas -v failed on the kernel's PTX:\n{log[-2000:]}")
        return log


def compile_product(dtype: str = "bf16", causal: bool = False, head_dim: int = 128,
                    padding: int = 0, mask_tile: int = 0, window: bool | str = False,
                    softcap: bool = False, persistent: bool = False):
    """The library's kernel (kernels/gluon_forward.py, the ``ws_nopingpong`` schedule with
    GQA, an LSE and fp16 / bf16) compiled for sm_90 as a launch on contiguous tensors makes it;
    ``padding``: its KEY_SPAN flags (2: HF's (B, 1, 1, S) bool padding mask); ``mask_tile``:
    with an attn_mask read in tiles (MASK_TILE: 1 a bool one, 2 a float bias of ``dtype``);
    ``window``: a causal sliding window (WINDOW; "one": of one key, which a launch
    specializes); ``softcap``: the scores soft-capped (SOFTCAP); ``persistent``: the
    persistent kernel (``_attention_fwd_persistent``: no masks, padding rows or windows)."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    try:
        from sdpa_pass.kernels import gluon_forward as product
    except ImportError:  # a checkout that is not installed
        from kernels import gluon_forward as product
    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16
    rows = product.BLOCK_M // 2

    def desc(block_rows):
        block = (1, 1, block_rows, head_dim)
        layout = product._layout(block, gdt)
        return f"tensordesc<{dtype}[1, 1, {block_rows}, {head_dim}],{layout!r}>"

    bn = product.forward_block_n(head_dim)
    mask_block = (1, 1, rows, bn)
    mask_dtype, mask_gl = ("u8", gl.uint8) if mask_tile == product.TILE_BOOL else (dtype, gdt)
    mask_desc = (f"tensordesc<{mask_dtype}[{', '.join(map(str, mask_block))}],"
                 f"{product._layout(mask_block, mask_gl)!r}>")
    sig = {"q_desc": desc(rows), "k_desc": desc(bn), "v_desc": desc(bn),
           "o_desc": desc(rows), "m_desc": mask_desc if mask_tile else "constexpr",
           "lse_ptr": "*fp32", "kpm_ptr": "*i1", "mask_ptr": "*i1",
           "spans_ptr": "*i32", "span_sb": "i32", "span_sh": "i32", "mask_b_on": "i32", "mask_h_on": "i32",
           "qk_scale": "fp32", "cap_scale": "fp32", "Hq": "i32", "L": "i32", "S": "i32", "group": "i32",
           "offset": "i32", "window": "i32", "stride_pb": "i32", "stride_pn": "i32",
           "stride_mb": "i32",
           "stride_mh": "i32", "stride_mn": "i32"}
    consts = dict(BM=product.BLOCK_M, BN=bn, HEAD=head_dim,
                  STAGES=product.STAGES, STORE_LSE=True, IS_CAUSAL=causal, RAGGED_KEYS=False,
                  KEY_SPAN=padding, NAN_ON_EMPTY=False, MASK_TILE=mask_tile, WINDOW=bool(window),
                  SOFTCAP=softcap, CONSUMER_REGS=product.CONSUMER_REGS, num_warps=4)
    if not mask_tile:
        consts["m_desc"] = None
    # the padding rows' key strides are 1 (contiguous rows), which a launch specializes
    consts.update(stride_pn=1, stride_mn=1)
    if window == "one":  # a launch with a window of 1 specializes it as a constexpr
        consts["window"] = 1
    kernel = product._attention_fwd_ws
    if persistent:
        kernel = product._attention_fwd_persistent
        sig = {name: sig[name] for name in kernel.arg_names if name in sig}
        sig.update(n_m="i32", total="i32", sched_ptr="*i32")
        consts = {name: consts[name] for name in kernel.arg_names if name in consts}
        consts["SCHEDULED"] = causal  # (causal launches follow a schedule)
        consts["Q_BUFS"] = product.PERSISTENT_Q_BUFFERS
        consts["num_warps"] = 4
    sig.update({key: "constexpr" for key in consts})
    return triton.compile(GluonASTSource(kernel, sig, consts, {}),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def compile_report(name: str) -> dict:
    if name.startswith("product:"):
        _, dtype, causal, head_dim, padding, tile, softcap, persistent = (
            name.split(":") + ["0", "0", "0", "0"])[:8]
        window = {"window": True, "window_one": "one"}.get(causal, False)
        kernel = compile_product(dtype, causal in ("causal", "window", "window_one"),
                                 int(head_dim), int(padding), int(tile), window,
                                 softcap == "1", persistent == "1")
    else:
        kernel = compile_variant(name)
    cubin = kernel.asm["cubin"]
    res = _dump(cubin, "--dump-resource-usage")
    sass = _dump(cubin, "-sass")
    ptx = kernel.asm["ptx"]
    log = _ptxas_log(ptx)
    spill = re.search(r"(\d+) bytes spill stores", log)
    events = _sass_events(sass)
    counts, window = _overlap(events)
    return {
        "registers": int(re.search(r"REG:(\d+)", res).group(1)),
        "stack_bytes": int(re.search(r"STACK:(\d+)", res).group(1)),
        "spill_store_bytes": int(spill.group(1)) if spill else None,
        "setmaxnreg": sorted({int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}),
        "shared_bytes": kernel.metadata.shared,
        "HGMMA": events.count("H"), "WARPGROUP.ARRIVE": events.count("A"),
        "WARPGROUP.DEPBAR": sum(e.startswith("W") for e in events),
        "MUFU.EX2": events.count("E"), "BAR.SYNC": events.count("S"),
        "wgmma serialized (ptxas C7514)": "C7514" in log,
        "EX2 between W1 and W0": counts,
        "loop window": window,
    }


def compile_only() -> None:
    print(f"triton {triton.__version__}, sm_90, hd{D} bf16 non-causal")
    print("events: A = WARPGROUP.ARRIVE, H = HGMMA, W<n> = WARPGROUP.DEPBAR.LE gsb0 n, E = MUFU.EX2,"
          " F = SHFL, S = BAR.SYNC")
    for name in VARIANTS:
        try:
            rep = compile_report(name)
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a result
            print(f"{name}: compile failed: {type(exc).__name__}: {exc}")
            continue
        window = rep.pop("loop window")
        print(f"{name} {VARIANTS[name][1:5]}: " + ", ".join(f"{k} {v}" for k, v in rep.items()))
        print(f"  key loop, P.V issue to its wait: {window}")


PEERS = ("ours", "sdpa_cudnn", "sdpa_flash")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def gpu_main(out_dir: Path, names: list[str], lengths: list[int], label: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    from sdpa_pass.kernels import attention

    def sdpa(backend, q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    device = torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "dtype": "bf16", "head_dim": D, "causal": False, "variants": {
                  name: dict(zip(("BM", "BN", "STAGES", "num_warps"), VARIANTS[name][1:5]), **VARIANTS[name][5])
                  for name in VARIANTS}, "rows": []}
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for n in lengths:
        b, h = 16384 // n, 2048 // D  # (FlashAttention's benchmark shapes: 16 heads at hd128)
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * n * n * D
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        print(f"B{b} H{h} N{n} D{D} non-causal, TFLOP/s (relative error against fp32 SDPA):", flush=True)
        candidates = [(name, (lambda name=name: run(name, q, k, v))) for name in VARIANTS]
        candidates += [("ours", lambda: attention(q, k, v)),
                       ("sdpa_cudnn", lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v)),
                       ("sdpa_flash", lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v))]
        for name, fn in candidates:
            if name not in names:
                continue
            row = {"N": n, "B": b, "H": h, "name": name}
            try:
                err = _rel_err(fn(), ref)
                torch.cuda.synchronize()
                row["rel_err"] = err
                ms = do_bench_cudagraph(fn, rep=200)
                row["ms"] = ms
                row["tflops"] = flops / ms / 1e9
                flag = "  ** > 1e-2 **" if err > 1e-2 else ""
                print(f"  {name:>14}: {row['tflops']:6.0f}  (rel err {err:.1e}){flag}", flush=True)
            except Exception as exc:  # noqa: BLE001 - one failing variant must not end the run
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"  {name:>14}: failed: {row['error']}", flush=True)
                torch.cuda.synchronize()
            result["rows"].append(row)
    write_result(out_dir, "gluon_fwd_probe", label, device, result)


def write_result(out_dir: Path, stem: str, label: str, device: str, result: dict) -> None:
    """``result`` as ``<stem>[_<label>]_<device slug>.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = out_dir / f"{stem}{'_' + label if label else ''}_{slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="compile for sm_90 only (no GPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory for the JSON result (GPU mode)")
    parser.add_argument("--variants", default=",".join([*VARIANTS, *PEERS]),
                        help="comma-separated names to run in GPU mode (default: all); a "
                             "variant that hangs or faults takes its process with it, so runs "
                             "of one name a process keep the others' results")
    parser.add_argument("--lengths", default="4096,8192,16384", help="N values, comma-separated")
    parser.add_argument("--label", default="", help="added to the JSON file's name")
    parser.add_argument("--product", choices=("bf16", "fp16"), default=None,
                        help="with --compile: the library's kernel instead of the variants, "
                             "its report as one JSON line (tests/test_gluon_forward.py)")
    parser.add_argument("--causal", action="store_true", help="with --product: the causal kernel")
    parser.add_argument("--window", action="store_true",
                        help="with --product: the causal kernel with a sliding window")
    parser.add_argument("--window-one", action="store_true",
                        help="with --product: ... of one key (a constexpr in the launch)")
    parser.add_argument("--softcap", action="store_true",
                        help="with --product: the scores soft-capped (SOFTCAP)")
    parser.add_argument("--head-dim", type=int, default=128,
                        help="with --product: 64, 128 or 256; else the variants' (64 or 128)")
    parser.add_argument("--padding", type=int, default=0,
                        help="with --product: KEY_SPAN flags (1 key_padding_mask, 2 a bool row)")
    parser.add_argument("--mask-tile", action="store_true",
                        help="with --product: a bool attn_mask read in tiles (MASK_TILE)")
    parser.add_argument("--bias-tile", action="store_true",
                        help="with --product: a float bias of the product's dtype read in tiles")
    parser.add_argument("--persistent", action="store_true",
                        help="with --product: the persistent kernel (no masks or windows)")
    args = parser.parse_args()
    if args.compile and args.product:
        form = ("window_one" if args.window_one else "window" if args.window
                else "causal" if args.causal else "")
        print(json.dumps(compile_report(
            f"product:{args.product}:{form}:{args.head_dim}:"
            f"{args.padding}:{2 if args.bias_tile else int(args.mask_tile)}:"
            f"{int(args.softcap)}:{int(args.persistent)}")))
        return
    if args.head_dim not in (64, 128) and not args.product:
        parser.error("the variants take --head-dim 64 or 128")
    global D
    D = args.head_dim
    if args.compile:
        compile_only()
        return
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS) - set(PEERS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; known: {[*VARIANTS, *PEERS]}")
    gpu_main(args.out, names, [int(n) for n in args.lengths.split(",")], args.label)


if __name__ == "__main__":
    main()
