"""The Hopper backward's dK/dV and dQ kernels in Gluon: FlashAttention-3's backward schedule.

Our Triton dK/dV kernel (kernels/backward.py) measured ~430-560 TFLOP/s of its four matrix
products at hd128 (H100, bf16, N = 4k / 16k) and spilled registers at every tile that large;
as in the forward, Triton waits for each wgmma product right after issuing it. This kernel
places its own waits. Per CTA of 128 keys of one K/V head:

- a one-warp producer partition copies K and V once (a 64-key half for each consumer), then,
  for every query head of the GQA group and every query tile i (64 rows) that sees some of
  the keys, Q_i with its rows' statistics (m, r) and dO_i with delta into a two-slot ring
  ("ready": bytes arrived, "empty": both consumers done with the slot);
- two consumer warpgroups (setmaxnreg: 240 registers each, 24 for the producer) each hold
  dK and dV of their 64 keys in registers (fp32) and per query tile run

      issue Sᵀ = K_w Q_iᵀ and dPᵀ = V_w dO_iᵀ           (both 64 x 64, on the tensor cores)
      wait for Sᵀ only; Pᵀ = exp2(Sᵀ·scale·log2e - m - r)   (the exponentials under dPᵀ)
      issue dV += Pᵀ dO_i                                    (Pᵀ from registers)
      wait for dPᵀ; dSᵀ = Pᵀ ∘ (dPᵀ - delta)                  (under dV's product)
      issue dK += dSᵀ Q_i; wait for both; release the slot

  Each wait is pinned by the data the next issue needs, so ptxas cannot hoist one above the
  exponentials (the forward's problem, gluon_forward.py). At the end dK·scale and dV leave
  through the shared memory that held the warpgroup's K and V halves (TMA stores, clipped
  at S).

dQ: the same schedule over query rows (``_attention_bwd_dq_ws``; hd128, and hd256 below): one
CTA per 128 query rows of one query head; the producer copies Q, dO and their statistics once,
then K_j and V_j (64 keys) into a two-slot ring; each consumer warpgroup owns 64 rows and per
key tile issues S = Q Kᵀ and dP = dO Vᵀ, waits for S (and the previous tile's dQ product) only,
runs P = exp2(S·scale·log2e - m - r) under dP, then dS = P ∘ (dP - delta) and issues dQ += dS
K_j, left in flight into the next tile. Keys past S arrive as zeros (their dS meets a zero K
row); causal tiles past the diagonal's first are masked, the longest query tiles start first.
Measured (H100, bf16, profiler, session 17): 1.04-1.08x the Triton dQ kernel without a mask at
N = 1k / 4k, 1.06x GQA causal 4k, equal on the other causal shapes; at hd64 0.84-0.93x, so
there the Triton kernel stays.

Head dim 256 (``WIDE``): one warpgroup's dK and dV of 64 keys would take 256 fp32 registers a
thread, so the two consumers split the work on the same 64 keys instead of splitting the
keys (FlashAttention-3 splits the head dim at hd256, and shares P and dS through shared memory).
The first computes Sᵀ = K Q_iᵀ and Pᵀ, hands Pᵀ (fp32, bit for bit what it exponentiated) to the
second through a small ring in shared memory (``P_STAGES`` slots; ready / empty mbarriers, each
side's warps synchronised before its arrive), and accumulates dV += Pᵀ dO_i; the second computes
dPᵀ = V dO_iᵀ, dSᵀ = Pᵀ ∘ (dPᵀ - delta) and dK += dSᵀ Q_i. Each holds one 64 x 256 fp32
accumulator (128 registers), every product has N = 64 or reads its A operand from registers,
and the two warpgroups' products interleave on the tensor cores. The first alone reads K and
the second alone V, so dV leaves through K's shared memory and dK through V's. Shared memory:
K, V, two Q and two dO slots of 64 x 256 (192 KB) and the Pᵀ ring (32 KB; one slot, 16 KB,
beside a bool mask's tiles). Masks as at hd128, applied by the first consumer (Pᵀ = 0 where
hidden, so dSᵀ is too). The dQ kernel at hd256 splits the same way over 64 query rows a CTA:
the first consumer computes S = Q K_jᵀ and P and hands P over, the second dP = dO V_jᵀ, dS and
dQ += dS K_j (it alone reads dO, so dQ leaves through dO's shared memory; V's ring slots are
released by it alone). The forward at hd256 is Gluon's too (gluon_forward.py, 64-key tiles).

The prep kernel (delta and the row statistics, padded to whole 64-row tiles with rows that
see no key: m = +inf, delta = 0) stays Triton's.

Measured (H100, bf16, hd128, B = 16384 / N, 16 heads, profiler kernel time, BENCHMARKS.md
session 16): the four products at 705 / 674 TFLOP/s (N = 4k / 16k) where the Triton dK/dV
kernel gives 575 / 561, causal 1.043 / 3.388 ms against 1.283 / 4.409 (1.20-1.30x). The
probe it came from (``benchmarks/gluon_bwd_probe.py``) also tried dQ added by fp32 atomics
from the consumers (FA3 gives those adds to a separate warp and the copy engine): slower than
the separate dQ kernel.

Scope (``gluon_backward_refusal``): the forward's Gluon scope (Hopper, a Triton with Gluon's
Hopper API, fp16 / bf16, head dim 64, 128 or 256 (``BWD_HEAD_DIMS``; at 64 every length:
measured no slower at N = 1k, where the forward keeps the Triton kernel), no attn_mask but a
padding row or a bool mask the copy engine reads, no window, soft-capping or dropout,
copy-engine layouts, not host-bound) for Q, K, V and dO, causal with any diagonal (rows without
keys have m = +inf, so P = 0), GQA, any L and S; the split dQ path with padded row statistics
(not SDPA_PASS_BWD_DQ=atomic nor SDPA_PASS_BWD_PADDED_ROWS=0); the dQ kernel the same at hd128
and hd256 (``gluon_dq_refusal``). SDPA_PASS_GLUON=0 turns off every Gluon kernel,
SDPA_PASS_GLUON_BWD=0 both backward ones, SDPA_PASS_GLUON_DQ=0 the dQ one,
SDPA_PASS_GLUON_PADDING=0 all three for padded calls.

Padding rows (``KEY_SPAN``, as in gluon_forward.py): the dQ kernel visits the row's visible span
only (``forward.padding_spans``) and masks the tiles a dense span does not cover whole; the
dK/dV kernel reads its 128 keys' row once, stores zeros for a tile the row hides entirely
without visiting a query tile, and masks Sᵀ's hidden key rows only where the row hides one of
a warpgroup's 64 keys (per query tile where a GQA group's heads have rows of their own). Rows
that see no key have m = +inf from the prep kernel, so P = 0 there.

Bool masks with rows of their own (``MASK_TILE``, as in gluon_forward.py): the dK/dV kernel's
copy warp copies, with each Q tile, the mask's two (64 query rows x 64 keys) byte tiles of the
CTA's key halves, which each consumer reads transposed from shared memory once Sᵀ is done;
the dQ kernel takes its tiles with each K tile, as the forward. H100, hd128, N = 4096, a random
(N, N) mask: forward + backward 395 TFLOP/s against the Triton kernels' 316 (BENCHMARKS.md,
session 21).

Float biases (``TILE_BIAS``, session 23; the default since session 24, SDPA_PASS_GLUON_BWD_BIAS=0
keeps the Triton kernels; sm_90 without spill at hd64 / 128 / 256, hd256 dK/dV 231,424 bytes
of shared memory): the fp16 / bf16 tiles come as the bool masks' do, and both kernels compute
P in natural-log units from the prep kernel's NATURAL statistics, as the Triton backward does
for a float mask (``_pt_tile``, ``_dq_p``; the dQ kernel hides keys past S itself, which a
bool tile's zeros hide). A masked_fill's float mask (dS 0 at its filled keys) and a bias that
needs its own gradient keep the Triton kernels. H200, bf16, a (1, H, N, N) ALiBi bias,
forward + backward at hd128 N = 4096: 378.9 TFLOP/s against flex attention's 315.6 and
cuDNN's 295.9 (BENCHMARKS.md, session 24).

Causal sliding windows (``WINDOW``, session 24; the default since session 25, as the forward's
(SDPA_PASS_GLUON_WINDOW=0 keeps the Triton kernels); not beside padding rows): the dK/dV kernel
visits the query tiles from its keys' diagonal to the last row whose window holds its last key,
the dQ kernel the key tiles from its first row's window as the forward does, and both mask the
tiles holding a pair outside the band with one unsigned compare per score (0 <= i + offset - j <
window). Compiled for sm_90 with the causal kernels' wgmmas, exponentials and waits (dQ: no
local memory; dK/dV: 8 bytes of stack more than the causal kernel's). H200, bf16, a window of
1024 keys, forward + backward: hd128 348.4 / 360.3 TFLOP/s at N = 4k / 16k against the Triton
kernels' 301.5 / 307.6 and flex's 295.7 / 301.4; hd256 262.5 / 333.6 at 1k / 4k against 172.9 /
203.2 (flex 122.0 / 134.5); hd64 290.7 / 305.5 at 4k / 16k against 270.1 / 275.3 (BENCHMARKS.md,
session 25).

Soft-capping (``SOFTCAP``, session 25; the default since session 26, SDPA_PASS_GLUON_SOFTCAP=0
keeps the Triton kernels, as do padding rows beside it unless =1; not beside a float bias, whose
tiles take the prep kernel's natural-log statistics while capped scores have log2 ones): both
kernels recompute t = tanh(s · scale / cap) from the raw products as the forward does
(``_soft_cap``), P from cap · log2(e) · t, and give dS the cap's derivative, P ∘ (1 - t²) ∘ (dP -
delta) (``_cap_derivative``); the dK/dV kernel keeps that factor in place of P once P is on its way
to dV's product, so no tile more is live. Compiled for sm_90 (triton 3.9) each keeps its causal
schedule's wgmmas and waits with twice the exponentials and no more stack. H200, bf16, causal, cap
30, hd128, kernel times against the Triton kernels' (ms): dK/dV 0.386 / 1.161 / 4.266 at N = 1k /
4k / 16k against 0.492 / 1.640 / 5.938, dQ 0.303 / 0.918 / 3.230 against 0.400 / 1.267 / 4.410;
forward + backward 232.5 / 325.3 / 366.2 TFLOP/s against 201.6 / 253.6 / 285.3 (flex 142.0 / 178.4
/ 194.6); hd256 270.8 / 381.8 at 1k / 4k against 136.9 / 173.2; hd64 182.3 / 222.6 against 163.6 /
201.3 (BENCHMARKS.md, session 26).

SOFTCAP follows whether there is a cap, not ``cap_scale``'s sign: a negative scale gives a negative
one, still a cap (until session 26 such a call's Gluon backward dropped the cap)."""

from __future__ import annotations

import os

import torch

from .checks import CAUSAL_NONE, AttentionShape
from .gluon_forward import (_descriptor_maker, _layout, _tile_tensor, gluon,
                            grid_rows_refusal, gluon_layout_refusal, gluon_scope_refusal,
                            gluon_softcap_refusal,
                            mask_tile_descriptor,
                            mask_tile_indexing, padding_args, span_strides)
from . import launch
from .launch import PlanCache, launch_fixed

BLOCK_M = 64  # query rows a tile
BLOCK_N = 128  # keys a CTA, 64 a consumer warpgroup
WIDE_BLOCK_N = 64  # keys a CTA at head dims over 128 (both consumers on the same keys)
# Slots of the hd256 kernel's fp32 Pᵀ tiles between its consumers: two, one beside a bool
# mask's ring (two would pass Hopper's 227 KB of shared memory)
P_STAGES = 2
# The dK/dV kernel's program orders (attention_dkdv_gluon) and the heads a group takes
ORDERS = ("tiles", "heads", "groups")
GROUP_HEADS = 8
# Head dims the dK/dV kernel takes (256: the split schedule of the module docstring)
BWD_HEAD_DIMS = (64, 128, 256)
STAGES = 2  # Q / dO ring slots
CONSUMER_REGS = 240
DQ_BLOCK_M = 128  # query rows a dQ CTA, 64 a consumer warpgroup
# Keys a tile of the dQ kernel's K / V ring, by head dim (at 128, 128-key tiles serialize the
# wgmmas: ptxas runs out of registers for the S, dP and dQ tiles in flight)
DQ_BLOCK_N = {64: 128, 128: 64, 256: 64}
# Head dims the dQ kernel takes: at 64 the Triton dQ kernel measured faster (H100, bf16; the
# Gluon one 0.84-0.93x with 64-key tiles, 0.80-0.97x with 128-key tiles but for 1.02-1.05x at
# N = 16k without a mask; BENCHMARKS.md, session 17)
DQ_HEAD_DIMS = (128, 256)
# Head dims at which the kernels read a float bias in tiles (TILE_BIAS) unless
# SDPA_PASS_GLUON_BWD_BIAS=0 (session 24: correct and faster than the Triton kernels at each)
BIAS_HEAD_DIMS = (64, 128, 256)
# dQ inside the dK/dV kernel (``fused_dq``): the head dims that take it, and the fp32 columns
# of a reduce-add box
FUSED_DQ_HEAD_DIMS = (64, 128)
FUSED_DQ_COLS = 32
LOG2E = 1.4426950408889634

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_forward import (LOG2E_C, TILE_BIAS_C, TILE_BOOL_C, _band_mask, _cta_barrier,
                                _kv_ring_barriers, _kv_ring_fill, _soft_cap,
                                _tma_load, _tma_reduce_add, _tma_store, mask_padding,
                                row_visible, span_tiles)

    @gluon.jit
    def _bwd_producer(q_desc, k_desc, v_desc, do_desc, stats_desc, mt_desc, k_smem, v_smem,
                      q_smem, do_smem, m_smem, r_smem, delta_smem, mt_smem, kv_bar, q_ready,
                      do_ready, empty, b, h_kv, Hq, start_n, first_m, n_q, group, rows,
                      stats_stride, mask_b_on, mask_h_on, BM: gl.constexpr, BN: gl.constexpr,
                      HEAD: gl.constexpr, STAGES: gl.constexpr, MASK_TILE: gl.constexpr):
        """The copy partition: K and V once, then for it = g * n_q + i (query head g of the
        group, its i-th query tile from first_m) Q_i with m_i and r_i into q slot it % STAGES
        and dO_i with delta_i into the dO slot, once both consumers released the slot. Rows
        past L and keys past S arrive as zeros; the statistics are padded to whole tiles.
        K, V and the mask tiles come in 64-key parts (two at BN = 128: a consumer's half
        each; one at BN = 64, the hd256 kernel). MASK_TILE: with Q_i, the bool attn_mask's
        (BM rows x 64 keys) byte tiles of the CTA's parts into slots parts * (it % STAGES) + w
        (zeros past L and S: hidden)."""
        parts: gl.constexpr = BN // 64  # K, V and the mask tiles in 64-key parts
        elem: gl.constexpr = k_desc.dtype.primitive_bitwidth // 8
        mbarrier.expect(kv_bar, 2 * BN * HEAD * elem)
        for w in gl.static_range(parts):
            _tma_load(k_desc, [b, h_kv, start_n + w * 64, 0], kv_bar, k_smem.index(w))
            _tma_load(v_desc, [b, h_kv, start_n + w * 64, 0], kv_bar, v_smem.index(w))
        tile_bytes: gl.constexpr = BM * HEAD * elem
        for it in range(group * n_q):
            slot = it % STAGES
            phase = ((it // STAGES) & 1) ^ 1  # a fresh mbarrier passes a wait on phase 1
            g = it // n_q
            h = h_kv * group + g
            m0 = (first_m + it - g * n_q) * BM
            row = (b * Hq + h) * rows + m0  # in each of the (delta, m, r) blocks of stats
            mbarrier.wait(empty.index(slot), phase)
            if MASK_TILE:
                mbarrier.expect(q_ready.index(slot), tile_bytes + 2 * BM * 4
                                + BM * BN * mt_desc.dtype.primitive_bitwidth // 8)
                for w in gl.static_range(parts):
                    _tma_load(mt_desc, [b * mask_b_on, h * mask_h_on, m0, start_n + w * 64],
                              q_ready.index(slot), mt_smem.index(parts * slot + w))
            else:
                mbarrier.expect(q_ready.index(slot), tile_bytes + 2 * BM * 4)
            _tma_load(q_desc, [b, h, m0, 0], q_ready.index(slot), q_smem.index(slot))
            _tma_load(stats_desc, [stats_stride + row], q_ready.index(slot), m_smem.index(slot))
            _tma_load(stats_desc, [2 * stats_stride + row], q_ready.index(slot),
                      r_smem.index(slot))
            mbarrier.expect(do_ready.index(slot), tile_bytes + BM * 4)
            _tma_load(do_desc, [b, h, m0, 0], do_ready.index(slot), do_smem.index(slot))
            _tma_load(stats_desc, [row], do_ready.index(slot), delta_smem.index(slot))

    @gluon.jit
    def _keys_seen(kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh, stride_mn, b,
                   h, keys, S, KEY_SPAN: gl.constexpr, ROW_PER_HEAD: gl.constexpr):
        """(seen, hides) of a consumer's keys before its loop: with KEY_SPAN and one row for
        the whole GQA group (not ROW_PER_HEAD) whether the row shows each key and whether it
        hides any; otherwise placeholders (``seen`` is then read per query head)."""
        seen = keys >= 0
        hides = False
        if KEY_SPAN != 0:
            if not ROW_PER_HEAD:  # every query head of the group reads the same row
                seen = row_visible(kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb,
                                   stride_mh, stride_mn, b, h, keys, keys < S, KEY_SPAN)
                hides = gl.min(seen.to(gl.int32), 0) == 0
        return seen, hides

    @gluon.jit
    def _head_seen(seen, kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh,
                   stride_mn, b, h, keys, S, KEY_SPAN: gl.constexpr, ROW_PER_HEAD: gl.constexpr):
        """The keys query head h's padding row shows (with KEY_SPAN and ROW_PER_HEAD: each
        head of the group its own row), else ``seen`` as it is."""
        if KEY_SPAN != 0:
            if ROW_PER_HEAD:
                seen = row_visible(kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb,
                                   stride_mh, stride_mn, b, h, keys, keys < S, KEY_SPAN)
        return seen

    @gluon.jit
    def _pt_tile(st, m, r, mt_tile, seen, hides, m0, key0, offset, window, qk_scale, cap_scale,
                 BM: gl.constexpr,
                 NK: gl.constexpr, st_layout: gl.constexpr, IS_CAUSAL: gl.constexpr,
                 WINDOW: gl.constexpr,
                 KEY_SPAN: gl.constexpr, ROW_PER_HEAD: gl.constexpr, MASK_TILE: gl.constexpr,
                 SOFTCAP: gl.constexpr):
        """Pᵀ of NK keys from key0 against the BM query rows from m0, from their scores Sᵀ
        (keys along dim 0) and the rows' statistics m, r: the keys a row may not see at -inf
        first. MASK_TILE: the bool attn_mask's (BM x NK) byte tile ``mt_tile``, read transposed;
        IS_CAUSAL: key j of row i iff j <= i + offset, evaluated only on tiles holding a pair
        that may not see each other; KEY_SPAN: the padding row's ``seen`` keys, applied where
        it ``hides`` one (always with ROW_PER_HEAD). MASK_TILE == TILE_BIAS: ``mt_tile`` is a float
        bias instead, added to Sᵀ·scale (``qk_scale`` is then the plain scale), and P leaves
        natural-log units after m is subtracted, as the forward's (m is the prep kernel's
        NATURAL statistic: backward._p_from_scores). Returns (Pᵀ, the factor of dSᵀ = it ∘
        (dPᵀ - delta)): Pᵀ itself, or with SOFTCAP (scores t = tanh(s · scale / cap), as the
        forward's ``_soft_cap``; no bias tile) Pᵀ ∘ (1 - t²), the cap's derivative."""
        if SOFTCAP:
            st = _soft_cap(st, cap_scale)
        if MASK_TILE == TILE_BIAS_C:
            tile = mt_tile.reshape([BM, NK]).permute((1, 0))
            st = st * qk_scale + tile.load(st_layout).to(gl.float32)
        elif MASK_TILE:
            tile = mt_tile.reshape([BM, NK]).permute((1, 0))
            st = gl.where(tile.load(st_layout) != 0, st, float("-inf"))
        if WINDOW:
            # a key past a row's last, or one at or before its window's start (the tile's
            # last row's): 0 <= i + offset - j < window, one unsigned compare per score
            if (m0 + offset < key0 + NK - 1) | (m0 + BM - 1 + offset - window >= key0):
                ckeys = key0 + gl.arange(0, NK, layout=gl.SliceLayout(1, st_layout))
                diag = m0 + offset + gl.arange(0, BM, layout=gl.SliceLayout(0, st_layout))
                band = gl.expand_dims(diag, 0) - gl.expand_dims(ckeys, 1)
                st = gl.where(band.to(gl.uint32, bitcast=True) < window.to(gl.uint32), st,
                              float("-inf"))
        elif IS_CAUSAL:
            if m0 + offset < key0 + NK - 1:  # some key of the tile is past a row's last
                ckeys = key0 + gl.arange(0, NK, layout=gl.SliceLayout(1, st_layout))
                last = m0 + offset + gl.arange(0, BM, layout=gl.SliceLayout(0, st_layout))
                st = gl.where(gl.expand_dims(ckeys, 1) <= gl.expand_dims(last, 0), st,
                              float("-inf"))
        if KEY_SPAN != 0:
            if ROW_PER_HEAD:
                st = gl.where(gl.expand_dims(seen, 1), st, float("-inf"))
            elif hides:
                st = gl.where(gl.expand_dims(seen, 1), st, float("-inf"))
        # the backward kernels' P (backward._p_from_scores): m first, then the small r
        if MASK_TILE == TILE_BIAS_C:
            pt = gl.exp2((st - gl.expand_dims(m, 0)) * LOG2E_C - gl.expand_dims(r, 0))
        else:
            pt = gl.exp2((st * qk_scale - gl.expand_dims(m, 0)) - gl.expand_dims(r, 0))
        return pt, _cap_derivative(pt, st, SOFTCAP)

    @gluon.jit
    def _cap_derivative(p, t, SOFTCAP: gl.constexpr):
        """P ∘ (1 - t²) for soft-capped scores t (SOFTCAP; P itself without): the chain rule's
        factor of dS. A hidden score is t = -inf with P = 0: min(t², 1) keeps 1 - t² at 0
        there instead of -inf (0 · -inf = NaN), and |t| <= 1 elsewhere."""
        if SOFTCAP:
            p = p * (1.0 - gl.minimum(t * t, 1.0))
        return p

    @gluon.jit
    def _bwd_consumer(dk_desc, dv_desc, k_smem, v_smem, q_smem, do_smem, m_smem, r_smem,
                      delta_smem, mt_smem, kv_bar, q_ready, do_ready, empty, b, h_kv, start_n, first_m,
                      n_q, group, offset, window, qk_scale, cap_scale, sm_scale, S, kpm_ptr,
                      stride_pb, stride_pn,
                      mask_ptr, stride_mb, stride_mh, stride_mn, dq_out, ds_smem, ds_bar,
                      dq_stage, Hkv, L,
                      W: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr,
                      STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                      KEY_SPAN: gl.constexpr,
                      ROW_PER_HEAD: gl.constexpr, MASK_TILE: gl.constexpr,
                      SOFTCAP: gl.constexpr, FUSED_DQ: gl.constexpr,
                      RAGGED_KEYS: gl.constexpr):
        """Consumer warpgroup W: keys start_n + 64 W .. + 64 of the CTA's tile (module
        docstring). With IS_CAUSAL, query i sees key j iff j <= i + offset; only tiles holding
        a pair that may not see each other evaluate it. With KEY_SPAN (a padding row of keys,
        gluon_forward.row_visible) Sᵀ's rows of hidden keys are masked: the row is read once
        and applied only if it hides one of the 64 keys, or with ROW_PER_HEAD (query heads of
        the group with rows of their own) read and applied for each query tile. MASK_TILE: the
        bool attn_mask's (BM x 64) tile of the query tile and this warpgroup's keys (slot
        2 s + W of ``mt_smem``), read transposed from shared memory once Sᵀ is done, hides
        Sᵀ's entries where it is 0. FUSED_DQ (``fused_dq``): dSᵀ also goes to shared memory
        (slot 2 (it % 2) + W of ``ds_smem``); once both warpgroups' halves are in
        (``ds_bar``), this warpgroup forms dQ_i's columns 64 W .. + 64 over the CTA's 128
        keys (two products, one a key half), stages them in fp32 (``dq_stage`` W) and the
        copy engine reduce-adds them into ``dq_out``, the (B * Hq * L, HEAD) view of a zeroed
        fp32 sum, in 32-column boxes; the stage is written again once they have read it. At
        hd64 (KEY_SPLIT; a 32-column slice of K's 128-byte swizzled rows is no wgmma operand)
        each warpgroup instead forms all of dQ_i's columns over its own 64 keys, from its own
        dSᵀ slot, with no wait on the other: twice the reduce-adds a tile pair. A
        tile's rows past L fall on the next head's first rows (or past the view's end, where
        the copy engine clips them): their dS, so the values added, are zeros (their Q and dO
        rows arrive as zeros and m = +inf). RAGGED_KEYS (with FUSED_DQ; S not a multiple of
        BN): dSᵀ's rows of keys past S are zeroed; their K rows arrive as zeros, but their
        scores are 0, so P = exp2(-m - r) is inf for a row whose LSE is under -88.7 and dQ's
        product would add 0 · inf. (Their dK and dV rows are never stored.)"""
        dtype: gl.constexpr = q_smem.dtype
        half: gl.constexpr = BN // 2
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BM, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        col_st: gl.constexpr = gl.SliceLayout(0, st_layout)  # a query row of Sᵀ
        row_st: gl.constexpr = gl.SliceLayout(1, st_layout)  # a key column of Sᵀ
        k_w = k_smem.index(W).reshape([half, HEAD])
        v_w = v_smem.index(W).reshape([half, HEAD])
        st_zero = gl.zeros([half, BM], gl.float32, layout=st_layout)
        # FUSED_DQ at hd64: each consumer dQ's every column over its own keys (KEY_SPLIT)
        KEY_SPLIT: gl.constexpr = HEAD == 64
        # dQ's columns a consumer forms, from column DQ_COL0
        DQ_COLS: gl.constexpr = HEAD if KEY_SPLIT else HEAD // 2
        DQ_COL0: gl.constexpr = 0 if KEY_SPLIT else W * (HEAD // 2)
        if FUSED_DQ:
            dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DQ_COLS, 16])
            dq_zero = gl.zeros([BM, DQ_COLS], gl.float32, layout=dq_layout)
            if not KEY_SPLIT:
                # K's columns 64 W .. + 64 of each key half: B of dQ's two products
                k_cols0 = k_smem.index(0).reshape([half, HEAD]).slice(DQ_COL0, DQ_COLS, dim=1)
                k_cols1 = k_smem.index(1).reshape([half, HEAD]).slice(DQ_COL0, DQ_COLS, dim=1)
            stage = dq_stage.index(W)
        dv = gl.zeros([half, HEAD], gl.float32, layout=acc_layout)
        dk = gl.zeros([half, HEAD], gl.float32, layout=acc_layout)
        keys = start_n + W * half + gl.arange(0, half, layout=row_st)
        seen, hides = _keys_seen(kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb,
                                 stride_mh, stride_mn, b, h_kv * group, keys, S, KEY_SPAN,
                                 ROW_PER_HEAD)
        mbarrier.wait(kv_bar, 0)
        for it in range(group * n_q):
            slot = it % STAGES
            phase = (it // STAGES) & 1
            seen = _head_seen(seen, kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb,
                              stride_mh, stride_mn, b, h_kv * group + it // n_q, keys, S,
                              KEY_SPAN, ROW_PER_HEAD)
            mbarrier.wait(q_ready.index(slot), phase)
            q_t = q_smem.index(slot).reshape([BM, HEAD])
            st_tok = warpgroup_mma(k_w, q_t.permute((1, 0)), st_zero, use_acc=False,
                                   is_async=True)
            mbarrier.wait(do_ready.index(slot), phase)
            do_t = do_smem.index(slot).reshape([BM, HEAD])
            dpt_tok = warpgroup_mma(v_w, do_t.permute((1, 0)), st_zero, use_acc=False,
                                    is_async=True)
            m = m_smem.index(slot).load(col_st)
            r = r_smem.index(slot).load(col_st)
            st = warpgroup_mma_wait(num_outstanding=1, deps=[st_tok])  # Sᵀ done, dPᵀ in flight
            pt, pt_ds = _pt_tile(st, m, r, mt_smem.index(2 * slot + W), seen, hides,
                                 (first_m + it % n_q) * BM, start_n + W * half, offset, window,
                                 qk_scale, cap_scale, BM, half, st_layout, IS_CAUSAL, WINDOW,
                                 KEY_SPAN, ROW_PER_HEAD, MASK_TILE, SOFTCAP)
            pt_op = gl.convert_layout(pt.to(dtype), a_layout)
            dv_tok = warpgroup_mma(pt_op, do_t, dv, is_async=True)
            delta = delta_smem.index(slot).load(col_st)
            dpt, dv_tok, pt_op = warpgroup_mma_wait(num_outstanding=1,
                                                    deps=[dpt_tok, dv_tok, pt_op])
            dst = pt_ds * (dpt - gl.expand_dims(delta, 0))
            if FUSED_DQ and RAGGED_KEYS:
                dst = gl.where(gl.expand_dims(keys < S, 1), dst, 0.0)
            dst = dst.to(dtype)
            ds_op = gl.convert_layout(dst, a_layout)
            if FUSED_DQ:
                # dSᵀ to shared memory (dQ's products take dS as A from there). KEY_SPLIT: one
                # slot a consumer, read by its own product alone, done before the next tile
                dslot = it % 2
                ds_smem.index(W if KEY_SPLIT else 2 * dslot + W).store(dst)
                fence_async_shared()
                _cta_barrier()  # the warpgroup's stores are all in (then its one arrive)
                if not KEY_SPLIT:
                    mbarrier.arrive(ds_bar.index(dslot))
                dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
                if KEY_SPLIT:
                    dq_tok = warpgroup_mma(ds_smem.index(W).permute((1, 0)), k_w, dq_zero,
                                           use_acc=False, is_async=True)
                else:
                    mbarrier.wait(ds_bar.index(dslot), (it // 2) & 1)  # the other half too
                    dq_tok = warpgroup_mma(ds_smem.index(2 * dslot).permute((1, 0)), k_cols0,
                                           dq_zero, use_acc=False, is_async=True)
                    dq_tok = warpgroup_mma(ds_smem.index(2 * dslot + 1).permute((1, 0)),
                                           k_cols1, dq_tok, is_async=True)
                dv, dk, dq, ds_op = warpgroup_mma_wait(num_outstanding=0,
                                                       deps=[dv_tok, dk_tok, dq_tok, ds_op])
                mbarrier.arrive(empty.index(slot))
                tma.store_wait(0)  # the previous tile's reduce-adds have read the stage
                _cta_barrier()
                stage.store(dq)
                fence_async_shared()
                _cta_barrier()
                # query head h_kv * group + it // n_q, its tile first_m + it % n_q
                row = ((b * Hkv * group + h_kv * group + it // n_q) * L
                       + (first_m + it % n_q) * BM)
                cols: gl.constexpr = dq_out.block_type.shape[1]  # a box's (FUSED_DQ_COLS)
                for c in gl.static_range(DQ_COLS // cols):
                    _tma_reduce_add(dq_out, [row, DQ_COL0 + c * cols],
                                    stage.slice(c * cols, cols, dim=1))
            else:
                dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
                dv, dk, ds_op = warpgroup_mma_wait(num_outstanding=0,
                                                   deps=[dv_tok, dk_tok, ds_op])
                mbarrier.arrive(empty.index(slot))
        if FUSED_DQ:
            if not KEY_SPLIT:
                # the other warpgroup's dQ products read this one's K half: both done first
                mbarrier.arrive(ds_bar.index(2))
                mbarrier.wait(ds_bar.index(2), 0)
            tma.store_wait(0)
        # only this warpgroup read its K and V halves (with FUSED_DQ: no longer reads them):
        # dK and dV leave through them
        k_w.store((dk * sm_scale).to(dtype))
        v_w.store(dv.to(dtype))
        fence_async_shared()
        _cta_barrier()
        _tma_store(dk_desc, [b, h_kv, start_n + W * half, 0], k_smem.index(W))  # clipped at S
        _tma_store(dv_desc, [b, h_kv, start_n + W * half, 0], v_smem.index(W))
        tma.store_wait(0)

    @gluon.jit
    def _p_ring(P_STAGES: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr):
        """The hd256 kernels' ring of fp32 (ROWS x COLS) P tiles from their first consumer to
        their second: the slots, then each slot's ready and empty mbarriers (one arrive each),
        initialised and fenced."""
        p_smem = gl.allocate_shared_memory(
            gl.float32, [P_STAGES, ROWS, COLS],
            gl.NVMMASharedLayout.get_default_for([ROWS, COLS], gl.float32))
        ready = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(P_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        fence_async_shared()
        return p_smem, ready, empty

    @gluon.jit
    def _bwd_wide_scores(dv_desc, k_smem, q_smem, do_smem, m_smem, r_smem, mt_smem, pt_smem,
                         kv_bar, q_ready, do_ready, empty, pt_ready, pt_empty, b, h_kv, start_n,
                         first_m, n_q, group, offset, window, qk_scale, cap_scale, S, kpm_ptr,
                         stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh, stride_mn,
                         BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr,
                         STAGES: gl.constexpr, P_STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr,
                         WINDOW: gl.constexpr,
                         KEY_SPAN: gl.constexpr, ROW_PER_HEAD: gl.constexpr,
                         MASK_TILE: gl.constexpr, SOFTCAP: gl.constexpr):
        """The hd256 kernel's first consumer (module docstring, "Head dim 256"): per query
        tile Sᵀ = K Q_iᵀ, Pᵀ (masked as ``_pt_tile``), Pᵀ in fp32 (with SOFTCAP: dSᵀ's factor,
        ``_cap_derivative``) to the second consumer through slot it % P_STAGES of ``pt_smem``,
        and dV += Pᵀ dO_i; it alone reads K, so dV
        leaves through K's shared memory."""
        dtype: gl.constexpr = q_smem.dtype
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BM, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
        k_t = k_smem.index(0).reshape([BN, HEAD])
        st_zero = gl.zeros([BN, BM], gl.float32, layout=st_layout)
        dv = gl.zeros([BN, HEAD], gl.float32, layout=acc_layout)
        keys = start_n + gl.arange(0, BN, layout=gl.SliceLayout(1, st_layout))
        seen, hides = _keys_seen(kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb,
                                 stride_mh, stride_mn, b, h_kv * group, keys, S, KEY_SPAN,
                                 ROW_PER_HEAD)
        mbarrier.wait(kv_bar, 0)
        for it in range(group * n_q):
            slot = it % STAGES
            phase = (it // STAGES) & 1
            seen = _head_seen(seen, kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb,
                              stride_mh, stride_mn, b, h_kv * group + it // n_q, keys, S,
                              KEY_SPAN, ROW_PER_HEAD)
            mbarrier.wait(q_ready.index(slot), phase)
            q_t = q_smem.index(slot).reshape([BM, HEAD])
            st_tok = warpgroup_mma(k_t, q_t.permute((1, 0)), st_zero, use_acc=False,
                                   is_async=True)
            m = m_smem.index(slot).load(col_st)
            r = r_smem.index(slot).load(col_st)
            st = warpgroup_mma_wait(num_outstanding=0, deps=[st_tok])
            pt, pt_ds = _pt_tile(st, m, r, mt_smem.index(slot), seen, hides,
                                 (first_m + it % n_q) * BM, start_n, offset, window, qk_scale,
                                 cap_scale, BM, BN, st_layout, IS_CAUSAL, WINDOW, KEY_SPAN,
                                 ROW_PER_HEAD, MASK_TILE, SOFTCAP)
            ps = it % P_STAGES
            mbarrier.wait(pt_empty.index(ps), ((it // P_STAGES) & 1) ^ 1)
            pt_smem.index(ps).store(pt_ds)
            _cta_barrier()  # every thread's part of Pᵀ written before the arrive
            mbarrier.arrive(pt_ready.index(ps))
            pt_op = gl.convert_layout(pt.to(dtype), a_layout)
            mbarrier.wait(do_ready.index(slot), phase)
            dv_tok = warpgroup_mma(pt_op, do_smem.index(slot).reshape([BM, HEAD]), dv,
                                   is_async=True)
            dv, pt_op = warpgroup_mma_wait(num_outstanding=0, deps=[dv_tok, pt_op])
            mbarrier.arrive(empty.index(slot))
        k_t.store(dv.to(dtype))
        fence_async_shared()
        _cta_barrier()
        _tma_store(dv_desc, [b, h_kv, start_n, 0], k_smem.index(0))  # clipped at S
        tma.store_wait(0)

    @gluon.jit
    def _bwd_wide_grads(dk_desc, v_smem, q_smem, do_smem, delta_smem, pt_smem, kv_bar, q_ready,
                        do_ready, empty, pt_ready, pt_empty, b, h_kv, start_n, n_q, group,
                        sm_scale, BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr,
                        STAGES: gl.constexpr, P_STAGES: gl.constexpr):
        """The hd256 kernel's second consumer: per query tile dPᵀ = V dO_iᵀ, Pᵀ from the first
        consumer, dSᵀ = Pᵀ ∘ (dPᵀ - delta) and dK += dSᵀ Q_i; it alone reads V, so dK·scale
        leaves through V's shared memory."""
        dtype: gl.constexpr = q_smem.dtype
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BM, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
        v_t = v_smem.index(0).reshape([BN, HEAD])
        st_zero = gl.zeros([BN, BM], gl.float32, layout=st_layout)
        dk = gl.zeros([BN, HEAD], gl.float32, layout=acc_layout)
        mbarrier.wait(kv_bar, 0)
        for it in range(group * n_q):
            slot = it % STAGES
            phase = (it // STAGES) & 1
            mbarrier.wait(do_ready.index(slot), phase)
            dpt_tok = warpgroup_mma(v_t, do_smem.index(slot).reshape([BM, HEAD]).permute((1, 0)),
                                    st_zero, use_acc=False, is_async=True)
            delta = delta_smem.index(slot).load(col_st)
            dpt = warpgroup_mma_wait(num_outstanding=0, deps=[dpt_tok])
            ps = it % P_STAGES
            mbarrier.wait(pt_ready.index(ps), (it // P_STAGES) & 1)
            pt = pt_smem.index(ps).load(st_layout)
            _cta_barrier()  # every thread's read of Pᵀ done before the slot is released
            mbarrier.arrive(pt_empty.index(ps))
            ds_op = gl.convert_layout((pt * (dpt - gl.expand_dims(delta, 0))).to(dtype), a_layout)
            mbarrier.wait(q_ready.index(slot), phase)
            dk_tok = warpgroup_mma(ds_op, q_smem.index(slot).reshape([BM, HEAD]), dk,
                                   is_async=True)
            dk, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=[dk_tok, ds_op])
            mbarrier.arrive(empty.index(slot))
        v_t.store((dk * sm_scale).to(dtype))
        fence_async_shared()
        _cta_barrier()
        _tma_store(dk_desc, [b, h_kv, start_n, 0], v_smem.index(0))  # clipped at S
        tma.store_wait(0)

    @gluon.jit
    def _attention_bwd_dkdv_ws(q_desc, k_desc, v_desc, do_desc, stats_desc, dk_desc, dv_desc,
                               mt_desc, kpm_ptr, mask_ptr, qk_scale, cap_scale, sm_scale, Hkv, L,
                               S, group,
                               offset, window, rows, stats_stride, stride_pb, stride_pn, stride_mb,
                               stride_mh, stride_mn, mask_b_on, mask_h_on, dq_desc,
                               BM: gl.constexpr,
                               BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                               IS_CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                               KEY_SPAN: gl.constexpr,
                               ROW_PER_HEAD: gl.constexpr, MASK_TILE: gl.constexpr,
                               SOFTCAP: gl.constexpr, ORDER: gl.constexpr, GROUP: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr,
                               P_STAGES: gl.constexpr, FUSED_DQ: gl.constexpr,
                               RAGGED_KEYS: gl.constexpr, num_warps: gl.constexpr):
        """Grid by ORDER (``ORDERS``): tiles (cdiv(S, BN), B * Hkv), heads (B * Hkv,
        cdiv(S, BN)), or groups (min(GROUP, B * Hkv), cdiv(S, BN), cdiv(B * Hkv, GROUP)):
        GROUP heads at a time, heads first within them (the last group's slots past B * Hkv
        return at once). Q, dO
        (B, Hq, L, D), K, V, dK, dV (B, Hkv, S, D) through 4-d descriptors of 64-row tiles of
        one head; ``stats``: the prep kernel's (delta, m, r), each (B, Hq, rows) fp32, flat
        through one 1-d descriptor (blocks of BM; ``stats_stride`` = B * Hq * rows apart,
        rows a multiple of BM). KEY_SPAN: the forward's padding rows (the kernel's
        arguments); a CTA whose keys they all hide (from every query head of the group)
        stores zeros and visits no query tile. MASK_TILE: a bool attn_mask with rows of its own
        through ``mt_desc`` (bytes, the mask's own dims, broadcast ones of size 1 indexed at
        b * mask_b_on, h * mask_h_on; BM x 64 tiles). FUSED_DQ (hd64 / 128; ``_bwd_consumer``):
        dQ's sums too, reduce-added through ``dq_desc`` (fp32, 2-d, [BM, 32] boxes); None
        without; RAGGED_KEYS: S is not a multiple of BN (``_bwd_consumer``)."""
        gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
        WIDE: gl.constexpr = HEAD > 128  # the hd256 schedule (module docstring)
        if FUSED_DQ:
            gl.static_assert(HEAD <= 128, "dQ inside the dK/dV kernel at head dims 64, 128")
        if WIDE:
            gl.static_assert(BN == 64, "64 keys a CTA at head dims over 128")
        else:
            gl.static_assert(BN == 2 * 64, "two consumer warpgroups of 64 keys")
        if ORDER == 1:
            pid_bh = gl.program_id(0)
            pid_n = gl.program_id(1)
        elif ORDER == 2:
            # the group's heads innermost, then its key tiles, then the groups: the order the
            # GPU starts a 3-d grid's programs in. Session 33: the same order taken from a 1-d
            # grid's id by quotients of runtime values compiled to twice the spills in the
            # consumers' loop at hd128 (consumer 0: 21 local loads and 11 stores a pass, 10
            # and 0 in the heads order; triton 3.6) and ran 3.4% slower than the heads order
            # where both launch the same sequence (GQA 4:1 causal 8k, B * Hkv = GROUP: 464 /
            # 481 TFLOP/s); with program_id alone the code is the heads order's (492 / 492).
            pid_bh = gl.program_id(2) * GROUP + gl.program_id(0)
            pid_n = gl.program_id(1)
            if pid_bh >= k_desc.shape[0] * Hkv:  # the last group's slots past B * Hkv heads
                return
        else:
            pid_n = gl.program_id(0)
            pid_bh = gl.program_id(1)
        b = pid_bh // Hkv
        h_kv = pid_bh % Hkv
        start_n = pid_n * BN
        # a tensor where a launch specialized a window of 1 (to a constexpr: no .to())
        window = window + pid_n * 0
        if IS_CAUSAL:  # the first query tile with a row that sees one of the keys
            first_m = gl.maximum(start_n - offset, 0) // BM
        else:
            first_m = pid_n * 0
        n_q = gl.maximum((L + BM - 1) // BM - first_m, 0)
        if WINDOW:
            # rows from j - offset + window on (j the CTA's last key) see none of its keys
            # (a count clamped at 0: no quotient of a negative number)
            seen_rows = gl.maximum(start_n + BN - 1 - offset + window, 0)
            end_m = gl.minimum((L + BM - 1) // BM, (seen_rows + BM - 1) // BM)
            n_q = gl.maximum(end_m - first_m, 0)
        if KEY_SPAN != 0:
            if not ROW_PER_HEAD:
                keys = start_n + gl.arange(0, BN, layout=gl.BlockedLayout([1], [32], [4], [0]))
                seen = row_visible(kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb,
                                   stride_mh, stride_mn, b, h_kv * group, keys, keys < S,
                                   KEY_SPAN)
                if gl.max(seen.to(gl.int32), 0) == 0:
                    n_q = n_q * 0

        dtype: gl.constexpr = q_desc.dtype
        parts: gl.constexpr = BN // 64
        k_smem = gl.allocate_shared_memory(dtype, [parts, 1, 1, 64, HEAD], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [parts, 1, 1, 64, HEAD], v_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BM, HEAD], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BM, HEAD], do_desc.layout)
        m_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], stats_desc.layout)
        r_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], stats_desc.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], stats_desc.layout)
        if MASK_TILE:
            mt_smem = gl.allocate_shared_memory(mt_desc.dtype, [parts * STAGES, 1, 1, BM, 64],
                                                mt_desc.layout)
        else:
            mt_smem = m_smem  # (not read)
        if FUSED_DQ:
            # hd128: two slots of the tile's dSᵀ halves (keys x rows), a consumer's each; a
            # consumer's (BM, HEAD / 2) fp32 dQ stage; ds_bar: the slots' "both halves in",
            # then "both consumers done" (count 2: one arrive a consumer). hd64 (KEY_SPLIT in
            # ``_bwd_consumer``): one slot a consumer, a (BM, HEAD) stage each, no barrier
            split: gl.constexpr = HEAD == 64
            dq_cols: gl.constexpr = HEAD if split else HEAD // 2
            ds_smem = gl.allocate_shared_memory(
                dtype, [2 if split else 4, BN // 2, BM],
                gl.NVMMASharedLayout.get_default_for([BN // 2, BM], dtype))
            dq_stage = gl.allocate_shared_memory(
                gl.float32, [2, BM, dq_cols],
                gl.NVMMASharedLayout.get_default_for([BM, dq_cols], gl.float32))
            if split:
                ds_bar = m_smem  # (not read)
            else:
                ds_bar = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
                for i in gl.static_range(3):
                    mbarrier.init(ds_bar.index(i), count=2)
            dq_out = dq_desc
        else:  # (not read)
            ds_smem = m_smem
            dq_stage = m_smem
            ds_bar = m_smem
            dq_out = stats_desc
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
        fence_async_shared()

        if WIDE:
            pt_smem, pt_ready, pt_empty = _p_ring(P_STAGES, BN, BM)
            gl.warp_specialize([
                (_bwd_wide_scores, (dv_desc, k_smem, q_smem, do_smem, m_smem, r_smem, mt_smem,
                                    pt_smem, kv_bar, q_ready, do_ready, empty, pt_ready,
                                    pt_empty, b, h_kv, start_n, first_m, n_q, group, offset, window,
                                    qk_scale, cap_scale, S, kpm_ptr, stride_pb, stride_pn,
                                    mask_ptr, stride_mb, stride_mh, stride_mn, BM, BN, HEAD,
                                    STAGES, P_STAGES, IS_CAUSAL, WINDOW, KEY_SPAN, ROW_PER_HEAD,
                                    MASK_TILE, SOFTCAP)),
                (_bwd_wide_grads, (dk_desc, v_smem, q_smem, do_smem, delta_smem, pt_smem,
                                   kv_bar, q_ready, do_ready, empty, pt_ready, pt_empty, b,
                                   h_kv, start_n, n_q, group, sm_scale, BM, BN, HEAD, STAGES,
                                   P_STAGES)),
                (_bwd_producer, (q_desc, k_desc, v_desc, do_desc, stats_desc, mt_desc, k_smem,
                                 v_smem, q_smem, do_smem, m_smem, r_smem, delta_smem, mt_smem,
                                 kv_bar, q_ready, do_ready, empty, b, h_kv, Hkv * group,
                                 start_n, first_m, n_q, group, rows, stats_stride, mask_b_on,
                                 mask_h_on, BM, BN, HEAD, STAGES, MASK_TILE)),
            ], [4, 1], [CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([
                (_bwd_consumer, (dk_desc, dv_desc, k_smem, v_smem, q_smem, do_smem, m_smem, r_smem,
                                 delta_smem, mt_smem, kv_bar, q_ready, do_ready, empty, b, h_kv,
                                 start_n, first_m, n_q, group, offset, window, qk_scale,
                                 cap_scale, sm_scale, S,
                                 kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh,
                                 stride_mn, dq_out, ds_smem, ds_bar, dq_stage, Hkv, L, 0, BM,
                                 BN, HEAD, STAGES, IS_CAUSAL, WINDOW, KEY_SPAN, ROW_PER_HEAD,
                                 MASK_TILE, SOFTCAP, FUSED_DQ, RAGGED_KEYS)),
                (_bwd_consumer, (dk_desc, dv_desc, k_smem, v_smem, q_smem, do_smem, m_smem, r_smem,
                                 delta_smem, mt_smem, kv_bar, q_ready, do_ready, empty, b, h_kv,
                                 start_n, first_m, n_q, group, offset, window, qk_scale,
                                 cap_scale, sm_scale, S,
                                 kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh,
                                 stride_mn, dq_out, ds_smem, ds_bar, dq_stage, Hkv, L, 1, BM,
                                 BN, HEAD, STAGES, IS_CAUSAL, WINDOW, KEY_SPAN, ROW_PER_HEAD,
                                 MASK_TILE, SOFTCAP, FUSED_DQ, RAGGED_KEYS)),
                (_bwd_producer, (q_desc, k_desc, v_desc, do_desc, stats_desc, mt_desc, k_smem,
                                 v_smem, q_smem, do_smem, m_smem, r_smem, delta_smem, mt_smem,
                                 kv_bar, q_ready, do_ready, empty, b, h_kv, Hkv * group, start_n,
                                 first_m, n_q, group, rows, stats_stride, mask_b_on, mask_h_on, BM,
                                 BN, HEAD, STAGES, MASK_TILE)),
            ], [4, 1], [CONSUMER_REGS, 24])

    # ---- the dQ kernel: the same schedule over query rows (module docstring, "dQ") ----

    @gluon.jit
    def _dq_producer(q_desc, k_desc, v_desc, do_desc, stats_desc, mt_desc, q_smem, do_smem,
                     st_smem, k_smem, v_smem, mt_smem, q_bar, k_ready, v_ready, k_empty,
                     v_empty, b, h, h_kv, mask_b, mask_h, start_m, row, stats_stride, t0,
                     n_tiles, BMW: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr,
                     STAGES: gl.constexpr, MASK_TILE: gl.constexpr, ROW_PARTS: gl.constexpr):
        """Q, dO and the 64-row statistics blocks (delta, m, r) of each of the ROW_PARTS parts
        of the CTA's rows (two at hd128, a consumer's half each; one at hd256) once, then K
        and V of key tile t0 + i into slot i % STAGES once the consumers released it."""
        elem: gl.constexpr = k_desc.dtype.primitive_bitwidth // 8
        mbarrier.expect(q_bar, ROW_PARTS * (2 * BMW * HEAD * elem + 3 * BMW * 4))
        for w in gl.static_range(ROW_PARTS):
            _tma_load(q_desc, [b, h, start_m + w * BMW, 0], q_bar, q_smem.index(w))
            _tma_load(do_desc, [b, h, start_m + w * BMW, 0], q_bar, do_smem.index(w))
            for s in gl.static_range(3):  # delta, m, r
                _tma_load(stats_desc, [s * stats_stride + row + w * BMW], q_bar,
                          st_smem.index(3 * w + s))
        _kv_ring_fill(k_desc, v_desc, mt_desc, k_smem, v_smem, mt_smem, k_ready, v_ready,
                      k_empty, v_empty, b, h_kv, mask_b, mask_h, start_m, t0, n_tiles, BMW, BN,
                      HEAD, STAGES, MASK_TILE, ROW_PARTS)

    @gluon.jit
    def _dq_p(s, j, m, r, row0, offset, window, full_tiles, d_lo, d_hi, kpm_ptr, stride_pb,
              stride_pn,
              mask_ptr, stride_mb, stride_mh, stride_mn, b, h, S, mt_tile, qk_scale, cap_scale,
              s_layout: gl.constexpr, BMW: gl.constexpr, BN: gl.constexpr,
              IS_CAUSAL: gl.constexpr, WINDOW: gl.constexpr, KEY_SPAN: gl.constexpr,
              MASK_TILE: gl.constexpr, SOFTCAP: gl.constexpr,
              RAGGED_KEYS: gl.constexpr):
        """P of rows row0 .. row0 + BMW against key tile j from their scores S and statistics
        m, r (both (BMW, 1)): with MASK_TILE the keys the bool attn_mask's tile ``mt_tile``
        hides, with KEY_SPAN those the padding row hides (``mask_padding``), with IS_CAUSAL
        (tiles from ``full_tiles``) those past a row's diagonal at -inf first. TILE_BIAS:
        a float bias tile, in natural-log units as ``_pt_tile``'s. SOFTCAP: the scores
        soft-capped first, and the factor of dS returned instead of P (``_cap_derivative``:
        dQ needs no P of its own)."""
        if SOFTCAP:
            s = _soft_cap(s, cap_scale)
        if MASK_TILE == TILE_BIAS_C:
            s = s * qk_scale + mt_tile.reshape([BMW, BN]).load(s_layout).to(gl.float32)
        elif MASK_TILE:
            s = gl.where(mt_tile.reshape([BMW, BN]).load(s_layout) != 0, s, float("-inf"))
        if RAGGED_KEYS and MASK_TILE != TILE_BOOL_C:
            # keys past S: K's rows (and a bias tile) read zeros there, so S = 0, which a bool
            # tile hides and the causal mask does only where the diagonal ends before S. P
            # would be exp2(-m - r): inf for a row whose every score is under -88 in natural
            # units (a finfo.min bias, or Q against every K), and 0 · inf = NaN in dQ
            if (j + 1) * BN > S:
                keys = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
                s = gl.where(gl.expand_dims(keys < S, 0), s, float("-inf"))
        if KEY_SPAN != 0:
            s = mask_padding(s, j, d_lo, d_hi, kpm_ptr, stride_pb, stride_pn, mask_ptr,
                             stride_mb, stride_mh, stride_mn, b, h, S, BN, s_layout, KEY_SPAN)
        if WINDOW:
            # a diagonal tile, or one holding a key at or before a row's window start
            if (j >= full_tiles) | (j * BN <= row0 + BMW - 1 + offset - window):
                s = _band_mask(s, j, row0 + offset, window, S, BMW, BN, s_layout, False)
        elif IS_CAUSAL:
            if j >= full_tiles:
                keys = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
                last = row0 + offset + gl.arange(0, BMW, layout=gl.SliceLayout(1, s_layout))
                s = gl.where(gl.expand_dims(keys, 0) <= gl.expand_dims(last, 1), s,
                             float("-inf"))
        if MASK_TILE == TILE_BIAS_C:
            return gl.exp2((s - m) * LOG2E_C - r)
        return _cap_derivative(gl.exp2((s * qk_scale - m) - r), s, SOFTCAP)

    @gluon.jit
    def _ds_tile(s, dp_tok, j, slot, v_empty, q_bar, m, r, delta, row0, offset, window, full_tiles,
                 d_lo, d_hi, kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh,
                 stride_mn, b, h, S, mt_smem, qk_scale, cap_scale, dtype: gl.constexpr,
                 a_layout: gl.constexpr, s_layout: gl.constexpr, BMW: gl.constexpr,
                 BN: gl.constexpr, IS_CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                 KEY_SPAN: gl.constexpr,
                 MASK_TILE: gl.constexpr, SOFTCAP: gl.constexpr,
                 RAGGED_KEYS: gl.constexpr, W: gl.constexpr):
        """Key tile j's dS as the dQ product's register operand, from its scores S (done) and
        its dP (in flight): the exponentials (``_dq_p``; the bool mask's tile in slot
        2 slot + W of ``mt_smem``) run before the wait for dP."""
        p = _dq_p(s, j, m, r, row0, offset, window, full_tiles, d_lo, d_hi, kpm_ptr, stride_pb,
                  stride_pn, mask_ptr, stride_mb, stride_mh, stride_mn, b, h, S,
                  mt_smem.index(2 * slot + W), qk_scale, cap_scale, s_layout, BMW, BN, IS_CAUSAL,
                  WINDOW, KEY_SPAN, MASK_TILE, SOFTCAP, RAGGED_KEYS)
        # A wait on Q's barrier, whose only phase is long complete (so it passes at once): a
        # try-wait loop, so a new basic block between the exponentials and the wait for dP,
        # which ptxas would otherwise move above them (as in gluon_forward's consumer loop)
        mbarrier.wait(q_bar, 0)
        dp = warpgroup_mma_wait(num_outstanding=0, deps=[dp_tok])
        mbarrier.arrive(v_empty.index(slot))
        return gl.convert_layout((p * (dp - delta)).to(dtype), a_layout)

    @gluon.jit
    def _dq_consumer(dq_desc, q_smem, do_smem, st_smem, k_smem, v_smem, mt_smem, q_bar, k_ready,
                     v_ready,
                     k_empty, v_empty, b, h, row0, offset, window, S, t0, n_tiles, full_tiles, d_lo,
                     d_hi, qk_scale, cap_scale, sm_scale, kpm_ptr, stride_pb, stride_pn, mask_ptr,
                     stride_mb, stride_mh, stride_mn, W: gl.constexpr, BMW: gl.constexpr,
                     BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                     IS_CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                     KEY_SPAN: gl.constexpr, MASK_TILE: gl.constexpr, SOFTCAP: gl.constexpr,
                     RAGGED_KEYS: gl.constexpr):
        """Consumer W: rows row0 .. row0 + 64 (module docstring), key tiles t0 .. t0 +
        n_tiles. ``n_tiles`` >= 1: a CTA whose rows see no key runs one key tile fully masked
        (m = +inf there besides), so dQ's product can stay in flight across iterations with the
        first tile peeled off the loop. KEY_SPAN: the padding row masks the tiles outside
        [d_lo, d_hi) (``gluon_forward.span_tiles``). MASK_TILE: a bool attn_mask's tile of these
        rows, copied with each K tile (``_ds_tile``)."""
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout,
                                                     k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        q_w = q_smem.index(W).reshape([BMW, HEAD])
        do_w = do_smem.index(W).reshape([BMW, HEAD])
        s_zero = gl.zeros([BMW, BN], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)
        delta = gl.expand_dims(st_smem.index(3 * W).load(row_s), 1)
        m = gl.expand_dims(st_smem.index(3 * W + 1).load(row_s), 1)
        r = gl.expand_dims(st_smem.index(3 * W + 2).load(row_s), 1)

        # key tile t0
        mbarrier.wait(k_ready.index(0), 0)
        k_j = k_smem.index(0).reshape([BN, HEAD])
        s_tok = warpgroup_mma(q_w, k_j.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(0), 0)
        dp_tok = warpgroup_mma(do_w, v_smem.index(0).reshape([BN, HEAD]).permute((1, 0)),
                               s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
        ds_op = _ds_tile(s, dp_tok, t0, 0, v_empty, q_bar, m, r, delta, row0, offset, window,
                         full_tiles, d_lo, d_hi, kpm_ptr, stride_pb, stride_pn, mask_ptr,
                         stride_mb, stride_mh, stride_mn, b, h, S, mt_smem, qk_scale, cap_scale,
                         dtype, a_layout, s_layout, BMW, BN, IS_CAUSAL, WINDOW, KEY_SPAN,
                         MASK_TILE, SOFTCAP, RAGGED_KEYS, W)
        dq_tok = warpgroup_mma(ds_op, k_j, gl.zeros([BMW, HEAD], gl.float32, layout=acc_layout),
                               use_acc=False, is_async=True)
        for i in range(1, n_tiles):
            j = t0 + i
            slot = i % STAGES
            phase = (i // STAGES) & 1
            mbarrier.wait(k_ready.index(slot), phase)
            k_j = k_smem.index(slot).reshape([BN, HEAD])
            s_tok = warpgroup_mma(q_w, k_j.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(slot), phase)
            dp_tok = warpgroup_mma(do_w, v_smem.index(slot).reshape([BN, HEAD]).permute((1, 0)),
                                   s_zero, use_acc=False, is_async=True)
            # the previous tile's dQ product (issued first) and S done; dP in flight
            s, dq, ds_op = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok, dq_tok, ds_op])
            mbarrier.arrive(k_empty.index((i - 1) % STAGES))
            ds_op = _ds_tile(s, dp_tok, j, slot, v_empty, q_bar, m, r, delta, row0, offset, window,
                             full_tiles, d_lo, d_hi, kpm_ptr, stride_pb, stride_pn, mask_ptr,
                             stride_mb, stride_mh, stride_mn, b, h, S, mt_smem, qk_scale,
                             cap_scale, dtype, a_layout, s_layout, BMW, BN, IS_CAUSAL, WINDOW,
                             KEY_SPAN, MASK_TILE, SOFTCAP, RAGGED_KEYS, W)
            dq_tok = warpgroup_mma(ds_op, k_j, dq, is_async=True)
        dq, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=[dq_tok, ds_op])
        mbarrier.arrive(k_empty.index((n_tiles - 1) % STAGES))
        q_w.store((dq * sm_scale).to(dtype))  # Q's rows are not read again
        fence_async_shared()
        _cta_barrier()
        _tma_store(dq_desc, [b, h, row0, 0], q_smem.index(W))  # rows past L are not written
        tma.store_wait(0)

    @gluon.jit
    def _dq_wide_scores(q_smem, st_smem, k_smem, mt_smem, p_smem, q_bar, k_ready, k_empty,
                        p_ready, p_empty, b, h, row0, offset, window, S, t0, n_tiles, full_tiles,
                        d_lo,
                        d_hi, qk_scale, cap_scale, kpm_ptr, stride_pb, stride_pn, mask_ptr,
                        stride_mb, stride_mh, stride_mn, BM: gl.constexpr, BN: gl.constexpr,
                        HEAD: gl.constexpr, STAGES: gl.constexpr, P_STAGES: gl.constexpr,
                        IS_CAUSAL: gl.constexpr, WINDOW: gl.constexpr, KEY_SPAN: gl.constexpr,
                        MASK_TILE: gl.constexpr, SOFTCAP: gl.constexpr,
                        RAGGED_KEYS: gl.constexpr):
        """The hd256 dQ kernel's first consumer (module docstring, "Head dim 256"): per key
        tile S = Q K_jᵀ and P (masked as ``_dq_p``; with SOFTCAP dS's factor instead), P in
        fp32 to the second consumer through slot i % P_STAGES of ``p_smem``."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        q_t = q_smem.index(0).reshape([BM, HEAD])
        s_zero = gl.zeros([BM, BN], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)
        m = gl.expand_dims(st_smem.index(1).load(row_s), 1)
        r = gl.expand_dims(st_smem.index(2).load(row_s), 1)
        for i in range(n_tiles):
            slot = i % STAGES
            mbarrier.wait(k_ready.index(slot), (i // STAGES) & 1)
            s_tok = warpgroup_mma(q_t, k_smem.index(slot).reshape([BN, HEAD]).permute((1, 0)),
                                  s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
            p = _dq_p(s, t0 + i, m, r, row0, offset, window, full_tiles, d_lo, d_hi, kpm_ptr,
                      stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh, stride_mn, b, h, S,
                      mt_smem.index(slot), qk_scale, cap_scale, s_layout, BM, BN, IS_CAUSAL,
                      WINDOW, KEY_SPAN, MASK_TILE, SOFTCAP, RAGGED_KEYS)
            ps = i % P_STAGES
            mbarrier.wait(p_empty.index(ps), ((i // P_STAGES) & 1) ^ 1)
            p_smem.index(ps).store(p)
            _cta_barrier()  # P written and the mask tile read by every thread: then arrive
            mbarrier.arrive(p_ready.index(ps))
            mbarrier.arrive(k_empty.index(slot))

    @gluon.jit
    def _dq_wide_grads(dq_desc, do_smem, st_smem, k_smem, v_smem, p_smem, q_bar, k_ready,
                       v_ready, k_empty, v_empty, p_ready, p_empty, b, h, row0, n_tiles,
                       sm_scale, BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr,
                       STAGES: gl.constexpr, P_STAGES: gl.constexpr):
        """The hd256 dQ kernel's second consumer: per key tile dP = dO V_jᵀ, P from the first
        consumer, dS = P ∘ (dP - delta) and dQ += dS K_j; it alone reads dO, so dQ·scale
        leaves through dO's shared memory."""
        dtype: gl.constexpr = do_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        do_t = do_smem.index(0).reshape([BM, HEAD])
        s_zero = gl.zeros([BM, BN], gl.float32, layout=s_layout)
        dq = gl.zeros([BM, HEAD], gl.float32, layout=acc_layout)
        mbarrier.wait(q_bar, 0)
        delta = gl.expand_dims(st_smem.index(0).load(gl.SliceLayout(1, s_layout)), 1)
        for i in range(n_tiles):
            slot = i % STAGES
            phase = (i // STAGES) & 1
            mbarrier.wait(v_ready.index(slot), phase)
            dp_tok = warpgroup_mma(do_t, v_smem.index(slot).reshape([BN, HEAD]).permute((1, 0)),
                                   s_zero, use_acc=False, is_async=True)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=[dp_tok])
            mbarrier.arrive(v_empty.index(slot))
            ps = i % P_STAGES
            mbarrier.wait(p_ready.index(ps), (i // P_STAGES) & 1)
            p = p_smem.index(ps).load(s_layout)
            _cta_barrier()  # every thread's read of P done before the slot is released
            mbarrier.arrive(p_empty.index(ps))
            ds_op = gl.convert_layout((p * (dp - delta)).to(dtype), a_layout)
            mbarrier.wait(k_ready.index(slot), phase)
            dq_tok = warpgroup_mma(ds_op, k_smem.index(slot).reshape([BN, HEAD]), dq,
                                   is_async=True)
            dq, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=[dq_tok, ds_op])
            mbarrier.arrive(k_empty.index(slot))
        do_t.store((dq * sm_scale).to(dtype))
        fence_async_shared()
        _cta_barrier()
        _tma_store(dq_desc, [b, h, row0, 0], do_smem.index(0))  # rows past L are not written
        tma.store_wait(0)

    @gluon.jit
    def _attention_bwd_dq_ws(q_desc, k_desc, v_desc, do_desc, stats_desc, dq_desc, mt_desc,
                             kpm_ptr, mask_ptr, spans_ptr, qk_scale, cap_scale, sm_scale, Hq, S,
                             group,
                             offset, window, rows, stats_stride, stride_pb, stride_pn, stride_mb,
                             stride_mh, stride_mn, span_sb, span_sh, mask_b_on, mask_h_on,
                             BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr,
                             STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                             KEY_SPAN: gl.constexpr, MASK_TILE: gl.constexpr,
                             SOFTCAP: gl.constexpr, RAGGED_KEYS: gl.constexpr,
                             CONSUMER_REGS: gl.constexpr, P_STAGES: gl.constexpr,
                             num_warps: gl.constexpr):
        """Grid (cdiv(L, BM), B * Hq). Q, dO, dQ (B, Hq, L, D) through 4-d descriptors of
        64-row tiles, K, V (B, Hkv, S, D) of BN-row tiles; the statistics as for the dK/dV
        kernel, in blocks of 64 rows (a CTA's second half may read the next head's: only on
        rows past L, whose dQ is not stored). At head dims over 128 (``WIDE``) a CTA is 64
        rows, both consumers on them (module docstring, "Head dim 256"). RAGGED_KEYS: S is not
        a multiple of BN; the last key tile's keys past S are hidden (``_dq_p``)."""
        gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
        WIDE: gl.constexpr = HEAD > 128
        if WIDE:
            gl.static_assert(BM == 64, "64 query rows a CTA at head dims over 128")
        else:
            gl.static_assert(BM == 2 * 64, "two consumer warpgroups of 64 rows")
        ROW_PARTS: gl.constexpr = BM // 64
        BMW: gl.constexpr = BM // ROW_PARTS
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        if IS_CAUSAL:
            pid_m = gl.num_programs(0) - 1 - pid_m  # longest first
        b = pid_bh // Hq
        h = pid_bh % Hq
        start_m = pid_m * BM
        # a tensor where a launch specialized a window of 1 (to a constexpr: no .to())
        window = window + pid_m * 0
        full_tiles = S // BN
        if IS_CAUSAL:
            # at least one tile: rows that see no key run tile 0 masked (_dq_consumer)
            n_tiles = gl.maximum(gl.minimum(S, start_m + BM + offset), 1)
            n_tiles = (n_tiles + BN - 1) // BN
            full_tiles = gl.maximum(gl.minimum(full_tiles, (start_m + offset + 1) // BN), 0)
        else:
            n_tiles = (S + BN - 1) // BN
        t0 = pid_m * 0
        d_lo = t0
        d_hi = t0
        if WINDOW:  # from the key tile of the CTA's first row's first visible key
            t0 = gl.maximum(start_m + offset - window + 1, 0) // BN
            n_tiles = n_tiles - t0
            if n_tiles <= 0:  # no row of the CTA sees a key: tile 0, every key masked
                t0 = t0 * 0
                n_tiles = n_tiles * 0 + 1
        if KEY_SPAN != 0:  # the forward's padding span (gluon_forward._attention_fwd_ws)
            t0, n_tiles, d_lo, d_hi = span_tiles(spans_ptr, span_sb, span_sh, b, h, n_tiles, BN)
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [ROW_PARTS, 1, 1, BMW, HEAD], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [ROW_PARTS, 1, 1, BMW, HEAD], do_desc.layout)
        st_smem = gl.allocate_shared_memory(gl.float32, [3 * ROW_PARTS, BMW], stats_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BN, HEAD], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BN, HEAD], v_desc.layout)
        if MASK_TILE:
            mt_smem = gl.allocate_shared_memory(mt_desc.dtype,
                                                [ROW_PARTS * STAGES, 1, 1, BMW, BN],
                                                mt_desc.layout)
        else:
            mt_smem = k_smem  # (not read)
        row = pid_bh * rows + start_m
        if WIDE:
            # V is read by the second consumer only
            q_bar, k_ready, v_ready, k_empty, v_empty = _kv_ring_barriers(STAGES, 1)
            p_smem, p_ready, p_empty = _p_ring(P_STAGES, BM, BN)
            gl.warp_specialize([
                (_dq_wide_scores, (q_smem, st_smem, k_smem, mt_smem, p_smem, q_bar, k_ready,
                                   k_empty, p_ready, p_empty, b, h, start_m, offset, window, S, t0,
                                   n_tiles, full_tiles, d_lo, d_hi, qk_scale, cap_scale, kpm_ptr,
                                   stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh,
                                   stride_mn, BM, BN, HEAD, STAGES, P_STAGES, IS_CAUSAL, WINDOW,
                                   KEY_SPAN, MASK_TILE, SOFTCAP, RAGGED_KEYS)),
                (_dq_wide_grads, (dq_desc, do_smem, st_smem, k_smem, v_smem, p_smem, q_bar,
                                  k_ready, v_ready, k_empty, v_empty, p_ready, p_empty, b, h,
                                  start_m, n_tiles, sm_scale, BM, BN, HEAD, STAGES, P_STAGES)),
                (_dq_producer, (q_desc, k_desc, v_desc, do_desc, stats_desc, mt_desc, q_smem,
                                do_smem, st_smem, k_smem, v_smem, mt_smem, q_bar, k_ready,
                                v_ready, k_empty, v_empty, b, h, h // group, b * mask_b_on,
                                h * mask_h_on, start_m, row, stats_stride, t0, n_tiles, BMW,
                                BN, HEAD, STAGES, MASK_TILE, ROW_PARTS)),
            ], [4, 1], [CONSUMER_REGS, 24])
        else:
            q_bar, k_ready, v_ready, k_empty, v_empty = _kv_ring_barriers(STAGES)
            gl.warp_specialize([
                (_dq_consumer, (dq_desc, q_smem, do_smem, st_smem, k_smem, v_smem, mt_smem, q_bar,
                                k_ready, v_ready, k_empty, v_empty, b, h, start_m, offset, window,
                                S, t0,
                                n_tiles, full_tiles, d_lo, d_hi, qk_scale, cap_scale, sm_scale,
                                kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh,
                                stride_mn, 0, BMW, BN, HEAD, STAGES, IS_CAUSAL, WINDOW, KEY_SPAN,
                                MASK_TILE, SOFTCAP, RAGGED_KEYS)),
                (_dq_consumer, (dq_desc, q_smem, do_smem, st_smem, k_smem, v_smem, mt_smem, q_bar,
                                k_ready, v_ready, k_empty, v_empty, b, h, start_m + BMW, offset,
                                window, S,
                                t0, n_tiles, full_tiles, d_lo, d_hi, qk_scale, cap_scale, sm_scale,
                                kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh,
                                stride_mn, 1, BMW, BN, HEAD, STAGES, IS_CAUSAL, WINDOW, KEY_SPAN,
                                MASK_TILE, SOFTCAP, RAGGED_KEYS)),
                (_dq_producer, (q_desc, k_desc, v_desc, do_desc, stats_desc, mt_desc, q_smem,
                                do_smem, st_smem, k_smem, v_smem, mt_smem, q_bar, k_ready,
                                v_ready, k_empty, v_empty, b, h, h // group, b * mask_b_on,
                                h * mask_h_on, start_m, row, stats_stride, t0, n_tiles, BMW, BN,
                                HEAD, STAGES, MASK_TILE, 2)),
            ], [4, 1], [CONSUMER_REGS, 24])


def gluon_backward_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           grad_out: torch.Tensor, shape: AttentionShape, *,
                           masked: str | bool | None,
                           padding: int, window: int, softcapped: bool, dropout: bool,
                           dq_atomic: bool, padded_rows: bool, rows: int, small: bool,
                           capability: int | None) -> str | None:
    """Why the backward of this call does not take the Gluon dK/dV kernel, or None when it
    does. ``masked`` and ``padding`` as for ``gluon_forward_refusal`` (a mask the kernels do
    not read; the padding rows they do); ``rows``: the row statistics' padded length;
    ``small``: ``forward.host_bound``; ``capability``: the device's compute capability major
    (None off a CUDA device)."""
    if gluon is None:
        return "this Triton has no Gluon Hopper API"
    for name in ("SDPA_PASS_GLUON", "SDPA_PASS_GLUON_BWD"):
        if os.environ.get(name, "") == "0":
            return f"{name}=0"
    if capability != 9:
        return "not a Hopper GPU (compute capability 9.x)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (fp16 / bf16 only)"
    if shape.head_dim != shape.v_head_dim or shape.head_dim not in BWD_HEAD_DIMS:
        return (f"head dims {shape.head_dim} / {shape.v_head_dim} (equal, one of "
                f"{BWD_HEAD_DIMS})")
    refusal = gluon_scope_refusal("backward", masked, padding, window,
                                  softcap=gluon_softcap_refusal(softcapped),
                                  dropout=dropout)
    if refusal is not None:
        return refusal
    if dq_atomic:
        return ("dQ by atomic adds in the Triton dK/dV kernel (SDPA_PASS_BWD_DQ=atomic, a "
                "mask's gradient, or deterministic algorithms)")
    if not padded_rows or rows % BLOCK_M:
        return "row statistics not padded to whole tiles (SDPA_PASS_BWD_PADDED_ROWS=0)"
    if 3 * shape.batch * shape.q_heads * rows >= 2**31:
        return "row statistics past 2**31 elements (one 1-d descriptor holds them)"
    refusal = grid_rows_refusal(shape)
    if refusal is not None:
        return refusal
    if small:
        return "a host-bound call (forward.host_bound)"
    return gluon_layout_refusal(Q=q, K=k, V=v, dO=grad_out)


def _stats_descriptor(t: torch.Tensor):
    """The (delta, m, r) row statistics, flat fp32, in tiles of BLOCK_M."""
    return TensorDescriptor.from_tensor(t, [BLOCK_M], _layout((BLOCK_M,), gl.float32))


# Compiled launches by (the backward's plan key, "gluon_dkdv") (kernels/launch.py; Gluon's own
# launch path costs as much as a short kernel, gluon_forward._GLUON_CALLS).
_GLUON_BWD_CALLS = PlanCache()


def attention_dkdv_gluon(q, k, v, grad_out, stats, dk, dv, shape: AttentionShape, *,
                         scale: float, qk_scale: float, causal_align: int, offset: int,
                         rows: int, plan_key, padding: int = 0, kpm=None,
                         kpm_strides: tuple = (0, 0), mask=None,
                         mask_strides: tuple = (0, 0, 0, 0), mask_tile: int = 0,
                         window: int = -1, cap_scale: float = 0.0, dq_acc=None) -> None:
    """Fill ``dk`` and ``dv`` (B, Hkv, S, D), contiguous, for a call that
    ``gluon_backward_refusal`` accepted; with ``dq_acc`` (a zeroed contiguous (B, Hq, L, D)
    fp32 tensor, a call ``fused_dq`` takes) add dQ's unscaled sums dS K into it too. ``stats``:
    the prep kernel's (3, B, Hq, rows) fp32 delta, m and r (P = exp2(S·qk_scale - m - r));
    ``offset``: the causal diagonal's (checks.causal_offset). ``plan_key``: the backward's,
    which fixes every layout and the causal form (or None: no plan). ``padding``,
    ``mask_tile``: the forward's padding rows and mask tiles
    (``gluon_forward.attention_forward_gluon``; with TILE_BIAS the statistics are the prep
    kernel's NATURAL ones and ``qk_scale`` the plain scale). ``window``: a causal call's
    sliding window (-1: none). ``cap_scale``: soft-capped scores' (SOFTCAP;
    ``gluon_forward.gluon_score_scales``, ``qk_scale`` then cap · log2(e); negative with a
    negative scale), 0.0 for none."""
    B, Hkv, L, S = shape.batch, shape.kv_heads, shape.q_len, shape.kv_len
    is_causal = causal_align != CAUSAL_NONE
    bn = dkdv_block_n(shape.head_dim)
    tiles = -(-S // bn)
    order = dkdv_order(is_causal, tiles)
    grid = {"tiles": (tiles, B * Hkv), "heads": (B * Hkv, tiles),
            "groups": (min(GROUP_HEADS, B * Hkv), tiles, -(-B * Hkv // GROUP_HEADS))}[order]
    rows_maker = _descriptor_maker(BLOCK_M, shape.head_dim)
    pad = padding_args(kpm, kpm_strides, None if mask_tile else mask, mask_strides, q)
    args = (q, k, v, grad_out, stats.view(-1), dk, dv, _tile_tensor(mask, mask_tile), *pad[:2],
            qk_scale, cap_scale, scale, Hkv, L, S,
            shape.group, offset, max(window, 0), rows, B * shape.q_heads * rows, *pad[2:],
            *mask_tile_indexing(mask_tile, mask_strides),
            None if dq_acc is None else dq_acc.view(-1, shape.head_dim))
    # query heads of a GQA group with padding rows of their own (not HF's (B, 1, 1, S))
    row_per_head = bool(padding & 2) and mask_strides[1] != 0 and shape.group > 1
    launch_fixed(_GLUON_BWD_CALLS, plan_key, _attention_bwd_dkdv_ws, grid, args,
                 dict(BM=BLOCK_M, BN=bn, HEAD=shape.head_dim, STAGES=STAGES,
                      IS_CAUSAL=is_causal, WINDOW=window > 0, KEY_SPAN=padding,
                      ROW_PER_HEAD=row_per_head,
                      MASK_TILE=mask_tile, ORDER=ORDERS.index(order),
                      # (a negative scale gives a negative cap_scale: the scores still capped)
                      SOFTCAP=cap_scale != 0.0,
                      GROUP=GROUP_HEADS,
                      CONSUMER_REGS=CONSUMER_REGS, P_STAGES=wide_p_stages(mask_tile),
                      FUSED_DQ=dq_acc is not None,
                      RAGGED_KEYS=dq_acc is not None and S % bn != 0, num_warps=4),
                 descriptors={0: rows_maker, 1: rows_maker, 2: rows_maker, 3: rows_maker,
                              4: _stats_descriptor, 5: rows_maker, 6: rows_maker,
                              **({7: mask_tile_descriptor(B, shape.q_heads, mask_strides, L, S,
                                                          BLOCK_M, 64)}
                                 if mask_tile else {}),
                              **({len(args) - 1: _dq_sum_descriptor}
                                 if dq_acc is not None else {})})


def _dq_sum_descriptor(t: torch.Tensor):
    """The fused dQ's reduce-add target: the (B * Hq * L, D) fp32 view of its sums, in boxes of
    BLOCK_M rows x 32 columns (128 bytes: triton 3.6 splits a wider fp32 box into such boxes
    when it encodes the descriptor but issues one reduce for the whole, so the kernel issues
    one a box itself)."""
    block = (BLOCK_M, FUSED_DQ_COLS)  # a tuple: _layout is cached by its arguments
    return TensorDescriptor.from_tensor(t, list(block), _layout(block, gl.float32))


def fused_dq(dkdv_refusal: str | None, head_dim: int) -> bool:
    """Whether the Gluon dK/dV kernel also forms dQ (FlashAttention-3's backward: dS K summed
    by the copy engine's reduce-adds into an fp32 buffer the prep kernel zeroed, scaled into
    dQ after), instead of the dQ kernel that recomputes S and dP (7 products a tile pair ->
    5): wherever the Gluon dK/dV kernel runs at FUSED_DQ_HEAD_DIMS, except under
    SDPA_PASS_GLUON_FUSED_DQ=0 or torch.use_deterministic_algorithms (the adds' order
    varies, so dQ's last bits may).

    H200, bf16, forward + backward through CUDA graphs (benchmarks/backward_variants.py),
    dQ kernel -> fused, TFLOP/s. hd128 (session 31): no mask N = 1k / 2k / 4k / 8k 398 -> 413,
    446 -> 464, 476 -> 494, 487 -> 519; an ALiBi bias 4k / 8k 386 -> 453 / 390 -> 463, a
    bool mask 394 -> 439 / 394 -> 446. hd64 (session 32): no mask 1k-8k 331 -> 341, 360 ->
    375, 380 -> 396, 389 -> 408; ALiBi 238 -> 282 ... 272 -> 327; bool 266 -> 294 ... 291 ->
    337. Causal with the programs in groups of heads (``dkdv_order``, session 32): hd128
    1k-8k 287 -> 308, 351 -> 387, 404 -> 449, 440 -> 477; hd64 246 -> 261, 293 -> 320,
    327 -> 362, 355 -> 389. (Session 31 kept short causal calls on the dQ kernel: with every
    head's first key tile first, the fused kernel was slower there.)"""
    flag = os.environ.get("SDPA_PASS_GLUON_FUSED_DQ", "")
    return (dkdv_refusal is None and head_dim in FUSED_DQ_HEAD_DIMS and flag != "0"
            and not torch.are_deterministic_algorithms_enabled())


def dkdv_order(causal: bool, tiles: int) -> str:
    """The dK/dV kernel's program order (``ORDERS``; SDPA_PASS_GLUON_BWD_ORDER overrides it)
    for a call of ``tiles`` key tiles a head; ``tiles`` wherever the others' grids, which hold
    the key tiles on a dim of at most launch.GRID_ROWS_LIMIT programs, could not (over 8M keys
    at hd128).

    Without a causal mask: ``tiles``, a head's key tiles side by side, so the programs
    running at once share their heads' Q and dO (and dQ's sums) in L2. Causal: a key tile's
    work falls with its index, and the GPU starts programs in order of their linear id, so
    ``groups`` takes GROUP_HEADS heads at a time and within them every head's first key tile
    first: the long tiles start early and the short ones fill the end, and the programs
    running at once read a few heads' Q and dO (and, with the fused dQ, reduce-add into their
    fp32 dQ sums, twice Q's bytes) while they are still in L2. ``heads`` (every head's first
    key tile first, the rule for hd64 / hd128 until session 33) spreads a wave over every
    head and past L2. Measured: hd256 groups 1.21x heads at causal N = 1k (B16 H8, H100;
    session 22); with the fused dQ, heads -> groups (H200, bf16, causal fwd+bwd, session 32)
    hd128 1k-8k 260 -> 308, 320 -> 387, 413 -> 449, 465 -> 477, hd64 222 -> 261 ... 345 ->
    389 TFLOP/s; session 33, after the groups order's 3-d grid (the kernel's docstring),
    alternating over rounds, groups / heads: fused dQ hd128 1k 318 / 265, 4k 463 / 437, 8k
    495 / 477, GQA 4:1 4k 463 / 457, hd64 4k 369 / 285; without it (the deterministic
    backward) hd128 1k 301 / 289, 4k 418 / 405, GQA 4k 438 / 433."""
    if tiles > launch.GRID_ROWS_LIMIT:
        return "tiles"
    order = os.environ.get("SDPA_PASS_GLUON_BWD_ORDER", "")
    if order in ORDERS:
        return order
    return "groups" if causal else "tiles"


def bias_head_dims() -> tuple:
    """Head dims at which the backward's kernels read a float bias in tiles: BIAS_HEAD_DIMS,
    none under SDPA_PASS_GLUON_BWD_BIAS=0."""
    return () if os.environ.get("SDPA_PASS_GLUON_BWD_BIAS", "") == "0" else BIAS_HEAD_DIMS


def dkdv_block_n(head_dim: int) -> int:
    """Keys a CTA of the dK/dV kernel at this head dim."""
    return WIDE_BLOCK_N if head_dim > 128 else BLOCK_N


def wide_p_stages(mask_tile: int) -> int:
    """Slots of the hd256 dK/dV and dQ kernels' P tiles (``P_STAGES``)."""
    return 1 if mask_tile else P_STAGES


def dq_block_m(head_dim: int) -> int:
    """Query rows a CTA of the dQ kernel at this head dim (64 at hd256: both consumers on
    them)."""
    return 64 if head_dim > 128 else DQ_BLOCK_M


def dq_block_n(head_dim: int) -> int:
    """Keys a tile of the dQ kernel's K / V ring (STAGES slots) at this head dim."""
    return DQ_BLOCK_N[head_dim]


def gluon_dq_refusal(dkdv_refusal: str | None, head_dim: int) -> str | None:
    """Why the backward's dQ stays on the Triton kernel, or None when the Gluon dQ kernel takes
    it: the dK/dV kernel's scope (``dkdv_refusal``, its reason) at the head dims where it
    measured faster (``DQ_HEAD_DIMS``); SDPA_PASS_GLUON_DQ=0 turns it off alone."""
    if dkdv_refusal is not None:
        return dkdv_refusal
    if os.environ.get("SDPA_PASS_GLUON_DQ", "") == "0":
        return "SDPA_PASS_GLUON_DQ=0"
    if head_dim not in DQ_HEAD_DIMS:
        return (f"head dim {head_dim}: the Triton dQ kernel measured faster (the Gluon one's: "
                f"{DQ_HEAD_DIMS})")
    return None


def attention_dq_gluon(q, k, v, grad_out, stats, dq, shape: AttentionShape, *, scale: float,
                       qk_scale: float, causal_align: int, offset: int, rows: int,
                       plan_key, padding: int = 0, kpm=None, kpm_strides: tuple = (0, 0),
                       mask=None, mask_strides: tuple = (0, 0, 0, 0), spans=None,
                       mask_tile: int = 0, window: int = -1, cap_scale: float = 0.0) -> None:
    """Fill ``dq`` (B, Hq, L, D), contiguous, for a call that ``gluon_dq_refusal`` accepted;
    the arguments as for ``attention_dkdv_gluon``. Causal: the longest query tiles first."""
    B, Hq, L, S = shape.batch, shape.q_heads, shape.q_len, shape.kv_len
    D, bm, bn = shape.head_dim, dq_block_m(shape.head_dim), dq_block_n(shape.head_dim)
    rows_maker, kv_maker = _descriptor_maker(BLOCK_M, D), _descriptor_maker(bn, D)
    pad = padding_args(kpm, kpm_strides, None if mask_tile else mask, mask_strides, q)
    args = (q, k, v, grad_out, stats.view(-1), dq, _tile_tensor(mask, mask_tile), *pad[:2],
            q if spans is None else spans, qk_scale, cap_scale, scale, Hq, S, shape.group, offset,
            max(window, 0), rows,
            B * Hq * rows, *pad[2:], *span_strides(spans),
            *mask_tile_indexing(mask_tile, mask_strides))
    launch_fixed(_GLUON_BWD_CALLS, plan_key, _attention_bwd_dq_ws, (-(-L // bm), B * Hq),
                 args, dict(BM=bm, BN=bn, HEAD=D, STAGES=STAGES,
                            IS_CAUSAL=causal_align != CAUSAL_NONE, WINDOW=window > 0,
                            KEY_SPAN=padding, MASK_TILE=mask_tile,
                            # (a negative scale gives a negative cap_scale: still capped)
                            SOFTCAP=cap_scale != 0.0,
                            RAGGED_KEYS=S % bn != 0, CONSUMER_REGS=CONSUMER_REGS,
                            P_STAGES=wide_p_stages(mask_tile), num_warps=4),
                 descriptors={0: rows_maker, 1: kv_maker, 2: kv_maker, 3: rows_maker,
                              4: _stats_descriptor, 5: rows_maker,
                              **({6: mask_tile_descriptor(B, Hq, mask_strides, L, S,
                                                          64, bn)}
                                 if mask_tile else {})})
