"""The Hopper forward in Gluon: FlashAttention-3's warp-specialized schedule.

Triton decides where a kernel waits for its wgmma products, and on Hopper it waits for the
scores right after issuing them, so the softmax never runs under the tensor cores (BENCHMARKS.md,
sessions 10-11: ~480 TFLOP/s at hd128 against cuDNN's ~600). Gluon
(``triton.experimental.gluon``) leaves those choices to the kernel. This one, per CTA of 128
query rows:

- a one-warp producer partition copies Q once and K/V tiles into a two-slot shared-memory
  ring with the copy engine (TMA), each slot with a "ready" mbarrier (bytes arrived) and an
  "empty" one (both consumers done with it);
- two consumer warpgroups (setmaxnreg: 240 registers each, 24 for the producer), each owning
  64 query rows, run the key loop FlashAttention-3 calls intra-warpgroup overlap: issue
  S_j = Q K_jᵀ, apply tile j-1's deferred rescale, issue O += P_{j-1} V_{j-1}, wait for S_j
  only, then tile j's softmax while the P·V product is still on the tensor cores.

Measured (H100, bf16, hd128, non-causal, kernel time through CUDA graphs, session 15's probe
``benchmarks/gluon_fwd_probe.py``): 577 / 611 TFLOP/s at N = 4k / 16k where the Triton kernel
gives 466 / 489 and SDPA's cuDNN backend 591 / 611. The two warpgroups taking turns on the
tensor cores (FA3's ping-pong, mbarrier turns) measured 570 / 598, so they run freely here.
In the benchmark matrix (every peer in one run, BENCHMARKS.md): 1.02-1.06x cuDNN without a
mask and 1.05-1.10x causal at N >= 4k.

Scope (``gluon_forward_refusal`` says why a call is not taken): a Hopper GPU (compute capability
9.x) and a Triton with Gluon's Hopper API (3.6 and later); fp16 / bf16; head dim 128 for Q, K
and V, or 64 with at least HD64_MIN_KEYS keys (the persistent kernel, below: 512, causal 1024),
or 256 (64-key tiles; SDPA_PASS_GLUON_FWD_HD256=0
keeps the Triton forward there); no attn_mask but a padding row (a key_padding_mask and / or a
bool attn_mask that is one row of keys per (batch, head), HF's (B, 1, 1, S): ``KEY_SPAN``,
below) or a bool attn_mask or, at head dims 128 and 256, an fp16 / bf16 float one with rows of
its own that the copy engine can read (``tile_mask_refusal``; ``MASK_TILE``, below), no dropout,
soft-capping at head dim 256, or 128 from SOFTCAP_MIN_KEYS keys (below), a causal sliding window
(below; SDPA_PASS_GLUON_WINDOW=0 keeps the Triton kernels for it) but not beside padding rows; no
causal mask or one whose diagonal leaves no row without keys (diagonal tiles masked, the longest
query tiles first); GQA; a positive scale; Q, K and V in any (B, H, N, D) strides the copy engine
can read (16-byte aligned, no broadcast dim: contiguous, or the (B, N, H, D) storage models
transpose from); any L and S (the copy engine zero-fills past them, the last key tile is masked,
stores are clipped); not a host-bound call (``forward.host_bound``). Everything else runs the
Triton kernel (kernels/forward.py). SDPA_PASS_GLUON=0 turns this path off,
SDPA_PASS_GLUON_PADDING=0 off
for padded calls.

Padding rows (session 21): a Triton prepass (``forward.padding_spans``) writes each row's
first visible key, past its last and whether every key between is visible; the CTA visits
only the key tiles of that span, and applies the row (``mask_padding``: a load of the tile's
keys, only after the scores are waited for) on the tiles a dense span does not cover whole,
so right or left padding reads the row on one or two tiles. Rows may then see no key (causal
rows before the first visible key, nothing visible): the running max stays -inf and is
shifted by 0, and the row stores zeros (NaN with NAN_ON_EMPTY) and an LSE of -inf. H100, hd128,
N = 4096, 62% of the keys kept: forward 570 TFLOP/s of the visible pairs against the Triton
kernel's 394 and flex attention's 403 (BENCHMARKS.md, session 21).

Bool masks with rows of their own (``MASK_TILE``, session 21): the copy warp copies the mask's
two 64-row x 128-key byte tiles of each key tile into a ring beside K (on K's barrier), from
a descriptor of the mask's own dims (broadcast ones of size 1); a consumer reads its tile
from shared memory once its scores are waited for, then releases the slot. Rows may be empty
as with padding. H100, hd128, a random (N, N) mask: 401 / 474 / 470 TFLOP/s at N = 1k / 4k /
16k against the Triton kernel's 319 / 366 / 391 and flex's 279 / 331 / 333. SDPA_PASS_GLUON_MASK=0
keeps such calls on the Triton kernels; the backward's Gluon kernels read these masks too
(gluon_backward.py).

Float biases with rows of their own (``TILE_BIAS``, session 23), fp16 / bf16: copied as the
bool masks' tiles are (a bf16 bias at hd128 takes 64 KB, 229,760 bytes of shared memory in
all); a consumer adds its tile to the scaled scores, which stay in natural-log units until
the row max is subtracted, as the Triton forward's do with a float mask (a finfo.min bias
stays finite: the HF mask's rows with every key at finfo.min average V uniformly, as eager
softmax does). H100, hd128, a (1, H, N, N) ALiBi bias: 399.5 / 475.0 / 478.4 TFLOP/s at N =
1k / 4k / 16k against the Triton kernel's 330.9 / 385.8 / 398.6 and flex's 351.3 / 399.7 (16k:
flex faults); hd256 576.1 at 4k against 319.8 and 334.0. SDPA_PASS_GLUON_BIAS=0 keeps the
Triton forward for them (the backward's Gluon kernels read them too since session 24).

Causal sliding windows (``WINDOW``, session 24; the default since session 25's GPU run, not
beside padding rows): a CTA starts at the key tile of its first
row's first visible key (``t0``), and each consumer masks the tiles holding a key at or before
one of its rows' window starts as it masks the diagonal's, with one unsigned compare per score
(``_band_mask``: 0 <= i + offset - j < window). Compiled for sm_90 with the causal kernel's
wgmmas and exponentials, the exponentials still under P·V, no more stack (a tile bound kept
live across the loop instead of recomputed per tile had put the second consumer's values in
local memory: stack 136 bytes at hd128 against 8). H200, hd128, a window of 1024 keys,
forward alone: 380.1 / 429.9 / 442.1 TFLOP/s at N = 1k / 4k / 16k against the Triton
kernel's 344.6 / 380.3 / 393.8 and flex's 260.1 / 304.2 / 306.0 (BENCHMARKS.md, session 25).

Soft-capping (``SOFTCAP``, session 25; the default since session 26 where it measured faster,
``SOFTCAP_MIN_KEYS``; SDPA_PASS_GLUON_SOFTCAP=0 keeps the Triton kernels, =1 takes this one at
every shape it runs): each raw product becomes tanh(s · scale / cap) before any mask
(``_soft_cap``: one exp2 and one reciprocal, exact to a few fp32 units; tanh.approx's 11 bits would
move a logit by up to 0.02 at a cap of 50), and qk_scale takes it to the softmax's units
(``gluon_score_scales``). Compiled for sm_90: the causal kernel's wgmmas and shared memory, twice
its exponentials, all under the P·V product (hd128: 130 a consumer between the waits against 66).
With the reciprocal that is three MUFU operations a score against one, which at hd128 outweighs the
two products' tensor-core time per tile. H200, bf16, causal, cap 30, forward alone, TFLOP/s against
the Triton kernel: hd128 166.9 / 235.2 / 304.2 / 355.3 / 417.8 at N = 512 / 1k / 2k / 4k / 16k
against 212.4 / 256.1 / 292.8 / 315.2 / 340.4; hd256 351.1 / 458.2 at 1k / 4k against 268.7 /
364.8; hd64 209.9 at 4k against 216.5 (flex 90-190; BENCHMARKS.md, session 26). The backward's
Gluon kernels soft-cap under the same variable (gluon_backward.py). Padding rows beside a cap
are taken too (since session 27, when test_gluon_padding.py's capped cases first ran on a GPU).

Persistent (``_attention_fwd_persistent``, session 34; the default for the calls it takes,
SDPA_PASS_GLUON_PERSISTENT=0 turns it off): at head dims 64 and 128, without a mask read in
tiles or a window, padding rows only without a causal mask (session 36; each work tile visits
its (batch, head)'s span, as above), the same schedule in a grid of at most one CTA per SM,
each walking its work tiles (128 query rows of one (batch, head)) with the K / V ring's count
carried across them. O leaves through shared memory of its own and each consumer has two Q
buffers, so the next tile's Q and first keys arrive under this tile's last P·V and epilogue,
which a one-tile CTA leaves exposed (224 KB of shared memory at hd128). Work tiles of equal
work go round-robin (CTA p: p, p + P, ...); causal ones follow a list the host lays out once
per shape (``persistent_schedule``, kept by ``causal_schedule``; a shape first met while a
CUDA graph is captured takes the one-tile kernel there, its list's copy to the device not
being capturable): round-robin pinned each CTA to one position within the heads wherever P
and the query tiles a head share factors, 0.76x the one-tile kernel at N = 16k. H200, bf16,
forward against the one-tile kernel: hd128 1.04-1.25x without a mask (521 / 634 / 648
TFLOP/s at N = 512 / 4k / 16k, cuDNN 520 / 626 / 629), causal 1.03-1.19x, GQA 1.03-1.16x;
hd64 causal 1.07-1.11x from 4k and 1.05-1.06x over the Triton forward at 1k / 2k
(BENCHMARKS.md, session 34); padded without a causal mask 1.02-1.32x (session 36).

A polynomial exp2 on the FMA units for the soft-capped softmax's P (session 26: 2^f by a degree-4
polynomial, tanh's reciprocal from rcp.approx; MUFU operations a score 2 against 3, FMA-unit
instructions 14.7 against 9.2) measured slower everywhere on the H200 and was removed in session
27 (commit e2d7bd5 holds it): forward hd128 165.7 / 244.3 / 289.3 TFLOP/s at N = 1k / 4k / 16k
against 230.4 / 355.2 / 411.1, hd256 304.0 / 418.6 against 349.3 / 462.1 (BENCHMARKS.md,
session 27).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon's Hopper API: the Triton kernel serves every call
    gluon = None

from .checks import CAUSAL_NONE, AttentionShape, causal_offset
from . import launch
from .launch import PlanCache, launch_fixed

# Head dims the kernels are built for, the same for Q, K and V (64 from session 16)
HEAD_DIMS = (64, 128)
# Keys below which the forward at head dim 64 stays on the Triton kernel: on an H100 (bf16,
# B·H·N = 2**19, BENCHMARKS.md session 16) the Gluon kernel gave 1.02-1.08x at N = 4k and 16k
# but 0.92x / 0.85x (causal) at N = 1k, where the key loop is 8 tiles and the autotuned
# Triton tiles win; 2k was not measured. The persistent kernel (``persistent_forward``) from
# HD64_PERSISTENT_MIN_KEYS[causal] instead.
HD64_MIN_KEYS = 4096
# The head dim whose consumers reduce each row's max and sum in two steps (_row_reduce's
# TREE): measured faster there alone (H200, BENCHMARKS.md session 36)
ROW_TREE_HEAD_DIM = 64
# Keys from which the persistent kernel takes hd64 calls, by causal: on the H200 (bf16,
# B·H·N = 2**19, BENCHMARKS.md session 34) it gave 1.11x / 1.06x / 1.02x the Triton forward at
# N = 512 / 1k / 2k without a mask, causal 0.96x / 1.05x / 1.06x.
HD64_PERSISTENT_MIN_KEYS = {False: 512, True: 1024}
# Keys from which a soft-capped forward takes the Gluon kernel, by head dim (absent: every
# length; None: none), unless SDPA_PASS_GLUON_SOFTCAP=1. On the H200 (bf16, causal, cap 30,
# B·H·N = 2**18, BENCHMARKS.md session 26) its three MUFU operations a score (two exp2, a
# reciprocal) leave the Gluon kernel 0.79x / 0.92x the Triton one at hd128 N = 512 / 1k, 1.04x
# at 2k and 1.13-1.23x from 4k; at hd64 (from HD64_MIN_KEYS) 0.97x at 4k; at hd256
# 1.28-1.31x at 1k / 4k.
SOFTCAP_MIN_KEYS = {64: None, 128: 2048}
BLOCK_M = 128  # query rows a CTA, 64 a consumer warpgroup
BLOCK_N = 128  # keys a tile
# Head dim 256: 64-key tiles (Q, two K / V slots of 64 x 256 and the S / O registers fit; at
# 128 keys ptxas spills). On an H100 (bf16, session 23) 1.24-1.32x the Triton forward and
# 0.92-1.09x cuDNN (no mask, causal, GQA 4:1 causal, N = 1k-16k; bool mask 2.2-2.4x cuDNN).
WIDE_HEAD_DIM = 256
WIDE_BLOCK_N = 64
STAGES = 2  # K/V ring slots
# MASK_TILE: what the attn_mask read in tiles holds (0: none)
TILE_BOOL = 1  # bool bytes, 0 = hidden
TILE_BIAS = 2  # a float bias (fp16 / bf16) added to the scaled scores
# Head dims at which the forward reads a float bias in tiles. H100, bf16, a (1, H, N, N) ALiBi
# bias, kernel times (session 23): hd128 1.22-1.29x the Triton forward (N = 1k-16k), hd256
# 1.88x; hd64 0.90x at N = 4k and 1.03x at 16k, so it keeps the Triton forward.
BIAS_HEAD_DIMS = (128, 256)
CONSUMER_REGS = 240  # registers a consumer thread after setmaxnreg (232 spills, session 15)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
if gluon is not None:
    # triton 3.6's names; later releases renamed them
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # The copy engine's reduce-add of a shared-memory tile into global memory
    # (cp.reduce.async.bulk.tensor ... .add): triton 3.9's Gluon names it tma.async_atomic_add;
    # triton 3.6's has no Python wrapper, though its builder has the operation
    # (create_async_tma_reduce), which compiles for sm_90 to the same instruction
    # (UTMAREDG.ADD; benchmarks/gluon_bwd_probe.py, session 30). Hand-written for 3.6 only.
    _tma_reduce_add = getattr(tma, "async_atomic_add", None)
    if _tma_reduce_add is None:
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD,
                                                      tensor_desc.handle, coord, src.handle)
    _LN2 = gl.constexpr(LN2)
    LOG2E_C = gl.constexpr(LOG2E)
    TILE_BIAS_C = gl.constexpr(TILE_BIAS)
    TILE_BOOL_C = gl.constexpr(TILE_BOOL)
    ROW_TREE_HEAD_DIM_C = gl.constexpr(ROW_TREE_HEAD_DIM)

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, m_desc, q_smem0, q_smem1, q_bar, k_smem, v_smem,
                  m_smem, k_ready, v_ready, k_empty, v_empty, b, h, h_kv, mask_b, mask_h,
                  start_m, t0, n_tiles, BMW: gl.constexpr, BN: gl.constexpr,
                  HEAD: gl.constexpr, STAGES: gl.constexpr, MASK_TILE: gl.constexpr):
        """The copy partition: both consumers' Q tiles once, then the key tiles t0 + i,
        K and V into slot i % STAGES as soon as both consumers have released it. Rows past L
        and keys past S arrive as zeros (the copy engine's bounds are the tensors' own)."""
        mbarrier.expect(q_bar, 2 * BMW * HEAD * q_desc.dtype.primitive_bitwidth // 8)
        _tma_load(q_desc, [b, h, start_m, 0], q_bar, q_smem0)
        _tma_load(q_desc, [b, h, start_m + BMW, 0], q_bar, q_smem1)
        _kv_ring_fill(k_desc, v_desc, m_desc, k_smem, v_smem, m_smem, k_ready, v_ready,
                      k_empty, v_empty, b, h_kv, mask_b, mask_h, start_m, t0, n_tiles, BMW, BN,
                      HEAD, STAGES, MASK_TILE)

    @gluon.jit
    def _kv_ring_fill(k_desc, v_desc, m_desc, k_smem, v_smem, m_smem, k_ready, v_ready, k_empty,
                      v_empty, b, h_kv, mask_b, mask_h, start_m, t0, n_tiles, BMW: gl.constexpr,
                      BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                      MASK_TILE: gl.constexpr, ROW_PARTS: gl.constexpr = 2, base=0):
        """The copy warp's K / V loop (this forward's and the backward's dQ kernel): K and V
        of key tile t0 + i of head h_kv into slot c % STAGES (c = base + i: the ring's count
        of tiles, which a persistent CTA carries from one work tile to the next) as soon as
        both consumers have released it. MASK_TILE (the forward's attn_mask: bool bytes or a
        16-bit float bias): with K, on K's barrier, the mask's ROW_PARTS BMW-row parts of
        rows start_m on for those keys into slots ROW_PARTS (c % STAGES) + w, from the
        mask's own dims (indices mask_b, mask_h)."""
        tile_bytes: gl.constexpr = BN * HEAD * k_desc.dtype.primitive_bitwidth // 8
        for i in range(n_tiles):
            slot = (base + i) % STAGES
            # a fresh mbarrier passes a wait on phase 1
            phase = (((base + i) // STAGES) & 1) ^ 1
            key0 = (t0 + i) * BN
            mbarrier.wait(k_empty.index(slot), phase)
            if MASK_TILE:
                mbarrier.expect(k_ready.index(slot), tile_bytes + ROW_PARTS * BMW * BN
                                * m_desc.dtype.primitive_bitwidth // 8)
                for w in gl.static_range(ROW_PARTS):
                    _tma_load(m_desc, [mask_b, mask_h, start_m + w * BMW, key0],
                              k_ready.index(slot), m_smem.index(ROW_PARTS * slot + w))
            else:
                mbarrier.expect(k_ready.index(slot), tile_bytes)
            _tma_load(k_desc, [b, h_kv, key0, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), phase)
            mbarrier.expect(v_ready.index(slot), tile_bytes)
            _tma_load(v_desc, [b, h_kv, key0, 0], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def row_visible(kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh, stride_mn,
                    b, h, keys, in_range, KEY_SPAN: gl.constexpr):
        """Whether each key of ``keys`` (a vector in any layout) is visible to the rows of
        (batch b, query head h) under the padding pattern(s) of KEY_SPAN (forward.SPAN_*:
        bit 1 the key_padding_mask (B, S), bit 2 a bool attn_mask that is one row of keys,
        through its (B, Hq, L, S) view's strides; nonzero = visible). Keys where ``in_range``
        is false are not read and not visible."""
        visible = in_range
        if KEY_SPAN & 1:
            row = kpm_ptr + b.to(gl.int64) * stride_pb
            visible = visible & (gl.load(row + keys * stride_pn, mask=visible, other=0) != 0)
        if KEY_SPAN & 2:
            row = mask_ptr + b.to(gl.int64) * stride_mb + h.to(gl.int64) * stride_mh
            visible = visible & (gl.load(row + keys * stride_mn, mask=visible, other=0) != 0)
        return visible

    @gluon.jit
    def span_tiles(spans_ptr, span_sb, span_sh, b, h, n_tiles, BN: gl.constexpr):
        """(t0, n, d_lo, d_hi) from (b, h)'s row of ``forward.padding_spans`` (first visible
        key, past the last, dense; row b * span_sb + h * span_sh): the key tiles t0 .. t0 + n of
        the first ``n_tiles`` that hold the visible span, or where none does (0, 1), one tile
        with every key masked (its rows see no key, and the loops keep their peeled first
        tile); and the tiles [d_lo, d_hi) that a dense span covers whole, which need no mask
        (none where the span is not dense)."""
        row = spans_ptr + b * span_sb + h * span_sh
        first = gl.load(row)
        end = gl.load(row + 1)
        dense = gl.load(row + 2)
        t0 = first // BN
        n = gl.minimum(n_tiles, (end + BN - 1) // BN) - t0
        if n <= 0:
            t0 = t0 * 0
            n = n * 0 + 1
        d_lo = (first + BN - 1) // BN
        d_hi = end // BN
        if dense == 0:
            d_lo = d_lo * 0
            d_hi = d_lo
        return t0, n, d_lo, d_hi

    @gluon.jit
    def mask_padding(s, j, d_lo, d_hi, kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb,
                     stride_mh, stride_mn, b, h, S, BN: gl.constexpr, s_layout: gl.constexpr,
                     KEY_SPAN: gl.constexpr):
        """Key tile j's scores (keys along dim 1) with the keys the padding row hides at -inf;
        a tile in [d_lo, d_hi) (``span_tiles``) has none, and its row is not read."""
        if (j < d_lo) | (j >= d_hi):
            keys = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            seen = row_visible(kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh,
                               stride_mn, b, h, keys, keys < S, KEY_SPAN)
            s = gl.where(gl.expand_dims(seen, 0), s, float("-inf"))
        return s

    @gluon.jit
    def _band_mask(s, j, diag0, window, S, BMW: gl.constexpr, BN: gl.constexpr,
                   s_layout: gl.constexpr, RAGGED_KEYS: gl.constexpr):
        """Key tile j's scores (keys along dim 1; this forward's and the backward's dQ
        kernel's) with the keys outside a causal sliding window at -inf: row r (from 0) sees
        key j iff 0 <= diag0 + r - j < window (diag0 = row0 + offset), one unsigned compare
        per score; with RAGGED_KEYS keys past S too."""
        keys = gl.expand_dims(j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)), 0)
        diag = gl.expand_dims(diag0 + gl.arange(0, BMW, layout=gl.SliceLayout(1, s_layout)), 1)
        visible = (diag - keys).to(gl.uint32, bitcast=True) < window.to(gl.uint32)
        if RAGGED_KEYS:
            visible = visible & (keys < S)
        return gl.where(visible, s, float("-inf"))

    @gluon.jit
    def _tile_mask(s, j, row0, offset, S, BMW: gl.constexpr, BN: gl.constexpr,
                   s_layout: gl.constexpr, IS_CAUSAL: gl.constexpr, RAGGED_KEYS: gl.constexpr):
        """Key tile j's scores with the keys a row may not see at -inf: with RAGGED_KEYS keys
        past S, with IS_CAUSAL keys past i + offset."""
        keys = gl.expand_dims(j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)), 0)
        rows = row0 + offset + gl.arange(0, BMW, layout=gl.SliceLayout(1, s_layout))
        if IS_CAUSAL:
            visible = keys <= gl.expand_dims(rows, 1)
            if RAGGED_KEYS:
                visible = visible & (keys < S)
        else:
            # (rows >= 0 always holds: it gives the keys' test the tile's 2-d shape)
            visible = (keys < S) & (gl.expand_dims(rows, 1) >= 0)
        return gl.where(visible, s, float("-inf"))

    @gluon.jit
    def _consumer(o_desc, lse_ptr, q_smem, q_bar, k_smem, v_smem, m_smem, k_ready, v_ready, k_empty,
                  v_empty, b, h, row0, L, S, offset, window, t0, n_tiles, full_tiles, d_lo,
                  d_hi, lse_row0, qk_scale, cap_scale, kpm_ptr, stride_pb, stride_pn, mask_ptr,
                  stride_mb, stride_mh, stride_mn,
                  BMW: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                  STORE_LSE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                  RAGGED_KEYS: gl.constexpr, KEY_SPAN: gl.constexpr,
                  NAN_ON_EMPTY: gl.constexpr, MASK_TILE: gl.constexpr, WINDOW: gl.constexpr,
                  SOFTCAP: gl.constexpr, W: gl.constexpr, base, q_phase, o_smem, q_empty,
                  PERSISTENT: gl.constexpr):
        """One warpgroup's 64 query rows (row0 on, within the head): the key loop over tiles
        t0 .. t0 + n_tiles, then O / l through a TMA store (clipped at L) and the natural-log
        LSE through pointers. Key tiles from ``full_tiles`` on are masked (``_tile_mask``);
        with KEY_SPAN those outside [d_lo, d_hi) also by the padding row (``mask_padding``:
        with right or left padding only the span's edge tiles). Without KEY_SPAN every row
        sees key 0, so no row is
        empty; with it a row may see no key (causal rows before the first unpadded key, or
        nothing unpadded): its running max stays -inf and is shifted by 0 (no -inf - -inf),
        and it stores zeros (NaN with NAN_ON_EMPTY) and an LSE of -inf. MASK_TILE: the
        attn_mask's tile of this warpgroup's rows (W: its half of the CTA's, slot 2 s + W of
        ``m_smem``, copied with K): TILE_BOOL bytes hide the keys where they are 0; TILE_BIAS
        a float bias added to the scores, which then stay in natural-log units (qk_scale is
        the plain scale) until the row max is subtracted, as eager adds them: a finfo.min bias
        stays finite (its log2 form would overflow to -inf and empty a row that eager softmax
        averages uniformly; the same exponent count: (s - m) * log2(e) against s * c - m).
        Rows may be empty likewise (an all -inf bias). WINDOW (causal): key j of row i also
        iff j > i + offset - window; of the tiles from t0 (the CTA's first row's first
        visible key's) those holding a key at or before one of this warpgroup's rows' window
        starts are masked (the bound recomputed per tile: kept live across the loop it cost
        the second warpgroup local memory); the second warpgroup's rows may see nothing in
        the first tiles, and rows past every key's window (top-left, L > S) nothing at all,
        so rows may be empty. SOFTCAP: each raw product s becomes tanh(s * scale / cap)
        (``_soft_cap``; ``cap_scale`` = 2 log2(e) scale / cap) before any mask, and qk_scale is
        cap · log2(e) (cap with a bias): the capped logits in the units the softmax expects.
        ``base``: the K / V ring's count of tiles before this work tile's first (slot c %
        STAGES for c = base + i), ``q_phase`` q_bar's phase. PERSISTENT (one of a persistent
        CTA's work tiles, ``_consumer_persistent``): Q's buffer is released (``q_empty``) once
        the last product that reads it is done, so the copy warp may fill it with a later
        tile's Q under this one's last P·V and its epilogue, and O leaves through ``o_smem``
        (else through Q's shared memory) after the previous tile's store has read it."""
        dtype: gl.constexpr = q_smem.dtype
        BIAS: gl.constexpr = MASK_TILE == TILE_BIAS_C
        EMPTY_ROWS: gl.constexpr = (KEY_SPAN != 0) or (MASK_TILE != 0) or WINDOW
        ROW_TREE: gl.constexpr = HEAD == ROW_TREE_HEAD_DIM_C  # _row_reduce's two steps
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        q_tile = q_smem.reshape([BMW, HEAD])
        s_zero = gl.zeros([BMW, BN], gl.float32, layout=s_layout)
        o = gl.zeros([BMW, HEAD], gl.float32, layout=o_layout)
        mbarrier.wait(q_bar, q_phase)

        # key tile t0: its scores and softmax, nothing in flight to hide them under
        s0 = base % STAGES
        phase0 = (base // STAGES) & 1
        mbarrier.wait(k_ready.index(s0), phase0)
        s_tok = warpgroup_mma(q_tile, k_smem.index(s0).reshape([BN, HEAD]).permute((1, 0)),
                              s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        if SOFTCAP:
            s = _soft_cap(s, cap_scale)
        if MASK_TILE:
            s = _mask_tile(s, m_smem, s0, W, BMW, BN, s_layout, qk_scale, BIAS)
        mbarrier.arrive(k_empty.index(s0))
        if KEY_SPAN != 0:
            s = mask_padding(s, t0, d_lo, d_hi, kpm_ptr, stride_pb, stride_pn, mask_ptr,
                             stride_mb, stride_mh, stride_mn, b, h, S, BN, s_layout, KEY_SPAN)
        if WINDOW:
            if (t0 >= full_tiles) | (t0 * BN <= row0 + BMW - 1 + offset - window):
                s = _band_mask(s, t0, row0 + offset, window, S, BMW, BN, s_layout, RAGGED_KEYS)
        elif IS_CAUSAL or RAGGED_KEYS:  # (compiled only where a tile can need it)
            if t0 >= full_tiles:
                s = _tile_mask(s, t0, row0, offset, S, BMW, BN, s_layout, IS_CAUSAL,
                               RAGGED_KEYS)
        if BIAS:  # running max in natural-log units of the biased scores
            m_i = _row_reduce(s, True, ROW_TREE)
            m_use = _finite_shift(m_i, True)
            p = gl.exp2((s - gl.expand_dims(m_use, 1)) * LOG2E_C)
        else:
            # running max, in log2 units of the scaled scores
            m_i = _row_reduce(s, True, ROW_TREE) * qk_scale
            m_use = _finite_shift(m_i, EMPTY_ROWS)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        l_i = _row_reduce(p, False, ROW_TREE)
        alpha = gl.full([BMW], 1.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
        mbarrier.wait(v_ready.index(s0), phase0)

        for i in range(1, n_tiles):
            j = t0 + i
            sk = (base + i) % STAGES
            sv = (base + i - 1) % STAGES
            phase = ((base + i) // STAGES) & 1
            mbarrier.wait(k_ready.index(sk), phase)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            # S_j = Q K_j^T on the tensor cores ...
            s_tok = warpgroup_mma(q_tile, k_smem.index(sk).reshape([BN, HEAD]).permute((1, 0)),
                                  s_zero, use_acc=False, is_async=True)
            # ... tile j-1's deferred rescale under it (O is not in flight here) ...
            o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            # ... and O += P_{j-1} V_{j-1} queued behind it (V_{j-1} waited for last iteration)
            o_tok = warpgroup_mma(p_op, v_smem.index(sv).reshape([BN, HEAD]), o, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])  # S_j done, P.V in flight
            if SOFTCAP:
                s = _soft_cap(s, cap_scale)
            if MASK_TILE:
                s = _mask_tile(s, m_smem, sk, W, BMW, BN, s_layout, qk_scale, BIAS)
            mbarrier.arrive(k_empty.index(sk))
            if KEY_SPAN != 0:
                s = mask_padding(s, j, d_lo, d_hi, kpm_ptr, stride_pb, stride_pn, mask_ptr,
                                 stride_mb, stride_mh, stride_mn, b, h, S, BN, s_layout,
                                 KEY_SPAN)
            if WINDOW:
                # a diagonal tile, or one holding a key at or before a row's window start
                if (j >= full_tiles) | (j * BN <= row0 + BMW - 1 + offset - window):
                    s = _band_mask(s, j, row0 + offset, window, S, BMW, BN, s_layout,
                                   RAGGED_KEYS)
            elif IS_CAUSAL or RAGGED_KEYS:
                if j >= full_tiles:  # a diagonal tile of a causal call, or the keys' last tile
                    s = _tile_mask(s, j, row0, offset, S, BMW, BN, s_layout, IS_CAUSAL,
                                   RAGGED_KEYS)
            # tile j's softmax: its exponentials run under the P.V product
            if BIAS:
                m_new = gl.maximum(m_i, _row_reduce(s, True, ROW_TREE))
                m_use = _finite_shift(m_new, True)
                alpha = gl.exp2((m_i - m_use) * LOG2E_C)
                p = gl.exp2((s - gl.expand_dims(m_use, 1)) * LOG2E_C)
            else:
                m_new = gl.maximum(m_i, _row_reduce(s, True, ROW_TREE) * qk_scale)
                m_use = _finite_shift(m_new, EMPTY_ROWS)
                alpha = gl.exp2(m_i - m_use)
                p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
            l_i = l_i * alpha + _row_reduce(p, False, ROW_TREE)
            m_i = m_new
            # V_j for the next iteration. This wait (a try-wait loop, so a new basic block)
            # sits between the softmax and the next wgmma wait on purpose: with both waits and
            # the softmax in one block, ptxas moves the second wait up behind the first, ahead
            # of every exponential, and nothing overlaps (the probe's intra_hoisted variant)
            mbarrier.wait(v_ready.index(sk), phase)
            o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
            mbarrier.arrive(v_empty.index(sv))

        if PERSISTENT:  # every product that reads Q is done: the next tile's may come
            mbarrier.arrive(q_empty)
        # the last tile's P.V (its V waited for above)
        sv_last = (base + n_tiles - 1) % STAGES
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(sv_last).reshape([BN, HEAD]), o, is_async=True)
        o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
        mbarrier.arrive(v_empty.index(sv_last))

        l_o = gl.convert_layout(l_i, row_o)
        if EMPTY_ROWS:
            empty = l_o == 0.0
            # SDPA's convention for a row with no visible key: zeros (eager softmax: NaN)
            l_div = gl.where(empty, float("nan") if NAN_ON_EMPTY else 1.0, l_o)
            o = o / gl.expand_dims(l_div, 1)
        else:
            o = o / gl.expand_dims(l_o, 1)
        if STORE_LSE:
            rows = row0 + gl.arange(0, BMW, layout=row_o)
            if BIAS:
                lse = gl.convert_layout(m_i, row_o) + gl.log2(l_o) * _LN2
            else:
                lse = (gl.convert_layout(m_i, row_o) + gl.log2(l_o)) * _LN2
            if EMPTY_ROWS:
                lse = gl.where(empty, float("-inf"), lse)
            gl.store(lse_ptr + lse_row0 + rows, lse, mask=rows < L)
        if PERSISTENT:
            # the previous work tile's O store has read o_smem (one thread issued it, so the
            # others wait at the barrier)
            tma.store_wait(0)
            _cta_barrier()
            o_smem.reshape([BMW, HEAD]).store(o.to(dtype))
            fence_async_shared()
            _cta_barrier()
            _tma_store(o_desc, [b, h, row0, 0], o_smem)  # rows past L are not written
        else:
            q_tile.store(o.to(dtype))  # the Q tile is not read again: O goes out through it
            fence_async_shared()
            _cta_barrier()
            _tma_store(o_desc, [b, h, row0, 0], q_smem)  # rows past L are not written
            tma.store_wait(0)

    @gluon.jit
    def _mask_tile(s, m_smem, slot, W: gl.constexpr, BMW: gl.constexpr, BN: gl.constexpr,
                   s_layout: gl.constexpr, scale, BIAS: gl.constexpr = False):
        """The scores with the attn_mask's tile (slot 2 slot + W of ``m_smem``) applied: bool
        bytes (0 = hidden) put hidden keys at -inf; a float bias (BIAS) gives s * scale + bias
        (natural-log units, fp32). Read from shared memory after the scores are waited for,
        before the slot is released."""
        tile = m_smem.index(2 * slot + W).reshape([BMW, BN]).load(s_layout)
        if BIAS:
            return s * scale + tile.to(gl.float32)
        return gl.where(tile != 0, s, float("-inf"))

    @gluon.jit
    def _soft_cap(s, cap_scale):
        """tanh(s * scale / cap) with ``cap_scale`` = 2 log2(e) scale / cap, as 1 - 2 / (e + 1)
        for e = exp2(s * cap_scale): one exponential and one reciprocal a score, exact to a few
        fp32 units (the forward's Triton ``_tanh``; PTX's tanh.approx has about 11 bits, which
        at a cap of 50 would move a logit by up to 0.02). Saturates to +-1: e overflows to
        inf (2 / inf = 0) or flushes to 0."""
        return 1.0 - 2.0 / (gl.exp2(s * cap_scale) + 1.0)

    @gluon.jit
    def _finite_shift(m, MAY_BE_EMPTY: gl.constexpr):
        """The running max to subtract: 0 for a row that has seen no key yet (m = -inf), when
        rows may be empty."""
        if MAY_BE_EMPTY:
            m = gl.where(m == float("-inf"), 0.0, m)
        return m

    @gluon.jit
    def _row_reduce(x, MAX: gl.constexpr, TREE: gl.constexpr):
        """Each row's max (MAX) or sum of a (rows, keys) score tile at the wgmma accumulator
        layout. A thread there holds a quarter of a row's keys, and ``gl.max(x, 1)`` reduces
        them one after the other: at 128 keys a chain of 31 dependent FMNMX / FADD a row
        ahead of the shuffles, the consumers' largest stall at hd64 (``wait``, session 35's
        ncu profile). With TREE the keys viewed as (4, keys / 4) keep every register where it
        is (no shared memory, same allocation) and reduce the 4 first: 8 independent chains of
        3, then one of 7. The max is exact either way; the sum's rounding order changes.
        Session 36 (H200, persistent kernel, 4k / 16k keys): hd64 +3.5-3.7% without a mask,
        +0.3-1.8% causal; hd128 -3 to -4% at 16k, so ``_consumer`` sets TREE at head dim 64
        alone (ROW_TREE_HEAD_DIM)."""
        if not TREE:
            if MAX:
                return gl.max(x, 1)
            return gl.sum(x, 1)
        ROWS: gl.constexpr = x.shape[0]
        KEYS: gl.constexpr = x.shape[1]
        y = gl.reshape(x, [ROWS, 4, KEYS // 4])
        if MAX:
            r = gl.max(gl.max(y, 1), 1)
        else:
            r = gl.sum(gl.sum(y, 1), 1)
        return gl.convert_layout(r, gl.SliceLayout(1, x.type.layout))

    @gluon.jit
    def _kv_ring_barriers(STAGES: gl.constexpr, V_READERS: gl.constexpr = 2):
        """The mbarriers of a one-time Q load and a K / V ring of STAGES slots shared by two
        consumer warpgroups (this forward's and the backward's dQ kernel): q_bar, then for each
        slot K / V ready (the copy's bytes arrived) and K / V empty (both consumers done with
        it; V_READERS = 1: V's by the one consumer that reads V), initialised and fenced."""
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            # one arrive per consumer warpgroup (Gluon arrives once per partition)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=V_READERS)
        fence_async_shared()
        return q_bar, k_ready, v_ready, k_empty, v_empty

    @gluon.jit
    def _key_tiles(start_m, S, offset, BM: gl.constexpr, BN: gl.constexpr,
                   IS_CAUSAL: gl.constexpr):
        """(n_tiles, full_tiles) of the query tile of rows start_m on: the key tiles it visits
        from key 0 (causal: up to its last row's diagonal) and the first that may need a mask
        (the diagonal's first, or the keys' last tile where S is not a multiple of BN)."""
        full_tiles = S // BN
        if IS_CAUSAL:
            n_tiles = (gl.minimum(S, start_m + BM + offset) + BN - 1) // BN
            full_tiles = gl.minimum(full_tiles, (start_m + offset + 1) // BN)
        else:
            n_tiles = (S + BN - 1) // BN
        return n_tiles, full_tiles

    @gluon.jit
    def _work_tile(tile, n_m, Hq, S, offset, BM: gl.constexpr, BN: gl.constexpr,
                   IS_CAUSAL: gl.constexpr):
        """Work tile ``tile`` of a persistent launch (``_attention_fwd_persistent``): query tile
        m of row pid_bh = b * Hq + h, head after head (consecutive tiles share K / V in L2),
        within a head the longest causal tiles first. Returns (pid_bh, b, h, start_m, n_tiles,
        full_tiles) (``_key_tiles``)."""
        pid_bh = tile // n_m
        pid_m = tile % n_m
        if IS_CAUSAL:
            pid_m = n_m - 1 - pid_m
        start_m = pid_m * BM
        n_tiles, full_tiles = _key_tiles(start_m, S, offset, BM, BN, IS_CAUSAL)
        return pid_bh, pid_bh // Hq, pid_bh % Hq, start_m, n_tiles, full_tiles

    @gluon.jit
    def _work_list(sched_ptr, total, SCHEDULED: gl.constexpr):
        """This CTA's entries [first, last) of its work list: with SCHEDULED, from the
        schedule ``persistent_schedule`` wrote (its CTAs' starts, then their tiles); else
        tiles pid, pid + P, ... of ``total`` (``_work_step``)."""
        pid = gl.program_id(0)
        if SCHEDULED:
            first = gl.load(sched_ptr + pid)
            last = gl.load(sched_ptr + pid + 1)
        else:
            first = pid * 0
            last = (total - pid + gl.num_programs(0) - 1) // gl.num_programs(0)
        return first, last

    @gluon.jit
    def _work_step(sched_ptr, it, first, n_m, Hq, S, offset, spans_ptr, span_sb, span_sh,
                   BM: gl.constexpr, BN: gl.constexpr, IS_CAUSAL: gl.constexpr,
                   SCHEDULED: gl.constexpr, Q_BUFS: gl.constexpr, KEY_SPAN: gl.constexpr):
        """Entry ``it`` of this CTA's work list (``_work_list``, from ``first``), as the copy
        warp and the consumers all walk it: its work tile's (pid_bh, b, h, start_m, n_tiles,
        full_tiles) (``_work_tile``), its key tiles t0 .. t0 + n_tiles and the tiles [d_lo,
        d_hi) that need no padding mask (with KEY_SPAN the padding's span, ``span_tiles``;
        else 0 .. n_tiles and none), then the Q buffer it takes and the parity of that
        buffer's uses before it."""
        if SCHEDULED:
            tile = gl.load(sched_ptr + gl.num_programs(0) + 1 + it)
        else:
            tile = gl.program_id(0) + it * gl.num_programs(0)
        pid_bh, b, h, start_m, n_tiles, full_tiles = _work_tile(tile, n_m, Hq, S, offset, BM,
                                                                BN, IS_CAUSAL)
        t0 = start_m * 0
        d_lo = t0
        d_hi = t0
        if KEY_SPAN != 0:
            t0, n_tiles, d_lo, d_hi = span_tiles(spans_ptr, span_sb, span_sh, b, h, n_tiles, BN)
        return (pid_bh, b, h, start_m, n_tiles, full_tiles, t0, d_lo, d_hi,
                (it - first) % Q_BUFS, ((it - first) // Q_BUFS) & 1)

    @gluon.jit
    def _producer_persistent(q_desc, k_desc, v_desc, q_smem0, q_smem1, q_bar, q_empty, k_smem,
                             v_smem, k_ready, v_ready, k_empty, v_empty, Hq, S, group, offset,
                             n_m, total, sched_ptr, spans_ptr, span_sb, span_sh,
                             BMW: gl.constexpr, BN: gl.constexpr,
                             HEAD: gl.constexpr, STAGES: gl.constexpr,
                             IS_CAUSAL: gl.constexpr, SCHEDULED: gl.constexpr,
                             Q_BUFS: gl.constexpr, KEY_SPAN: gl.constexpr):
        """The copy partition of a persistent CTA: for each of its work tiles, both consumers'
        Q into buffer j % Q_BUFS (the CTA's j-th tile) once they have released what it held
        (``q_empty``), then its key tiles into the K / V ring, whose count of tiles runs on
        across work tiles. With two buffers the next tile's Q arrives while this one's last
        key tiles are worked on."""
        c = 0
        first, last = _work_list(sched_ptr, total, SCHEDULED)
        q_bytes: gl.constexpr = 2 * BMW * HEAD * q_desc.dtype.primitive_bitwidth // 8
        for it in range(first, last):
            pid_bh, b, h, start_m, n_tiles, full_tiles, t0, d_lo, d_hi, buf, uses = _work_step(
                sched_ptr, it, first, n_m, Hq, S, offset, spans_ptr, span_sb, span_sh, 2 * BMW,
                BN, IS_CAUSAL, SCHEDULED, Q_BUFS, KEY_SPAN)
            # (a fresh mbarrier passes a wait on phase 1)
            mbarrier.wait(q_empty.index(buf), uses ^ 1)
            mbarrier.expect(q_bar.index(buf), q_bytes)
            _tma_load(q_desc, [b, h, start_m, 0], q_bar.index(buf), q_smem0.index(buf))
            _tma_load(q_desc, [b, h, start_m + BMW, 0], q_bar.index(buf), q_smem1.index(buf))
            _kv_ring_fill(k_desc, v_desc, k_desc, k_smem, v_smem, k_smem, k_ready, v_ready,
                          k_empty, v_empty, b, h // group, 0, 0, start_m, t0, n_tiles,
                          BMW, BN, HEAD, STAGES, 0, 2, c)
            c += n_tiles

    @gluon.jit
    def _consumer_persistent(o_desc, lse_ptr, q_smem, q_bar, q_empty, o_smem, k_smem, v_smem,
                             k_ready, v_ready, k_empty, v_empty, Hq, L, S, offset, n_m, total,
                             sched_ptr, qk_scale, cap_scale, kpm_ptr, mask_ptr, spans_ptr,
                             stride_pb, stride_pn, stride_mb, stride_mh, stride_mn, span_sb,
                             span_sh, BMW: gl.constexpr,
                             BN: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr,
                             STORE_LSE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                             RAGGED_KEYS: gl.constexpr, KEY_SPAN: gl.constexpr,
                             NAN_ON_EMPTY: gl.constexpr, SOFTCAP: gl.constexpr,
                             SCHEDULED: gl.constexpr, Q_BUFS: gl.constexpr, W: gl.constexpr):
        """One consumer warpgroup of a persistent CTA: ``_consumer``'s rows W of each of its
        work tiles in turn (the copy warp's order), the ring's count carried on."""
        c = 0
        first, last = _work_list(sched_ptr, total, SCHEDULED)
        for it in range(first, last):
            pid_bh, b, h, start_m, n_tiles, full_tiles, t0, d_lo, d_hi, buf, uses = _work_step(
                sched_ptr, it, first, n_m, Hq, S, offset, spans_ptr, span_sb, span_sh, 2 * BMW,
                BN, IS_CAUSAL, SCHEDULED, Q_BUFS, KEY_SPAN)
            zero = start_m * 0
            _consumer(o_desc, lse_ptr, q_smem.index(buf), q_bar.index(buf), k_smem, v_smem,
                      k_smem, k_ready, v_ready, k_empty, v_empty, b, h, start_m + W * BMW, L, S,
                      offset, zero, t0, n_tiles, full_tiles, d_lo, d_hi, pid_bh * L,
                      qk_scale, cap_scale, kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb,
                      stride_mh, stride_mn, BMW, BN, HEAD, STAGES, STORE_LSE, IS_CAUSAL,
                      RAGGED_KEYS, KEY_SPAN, NAN_ON_EMPTY, 0, False, SOFTCAP,
                      W, c, uses, o_smem, q_empty.index(buf), True)
            c += n_tiles
        tma.store_wait(0)

    @gluon.jit
    def _attention_fwd_persistent(q_desc, k_desc, v_desc, o_desc, lse_ptr, kpm_ptr, mask_ptr,
                                  spans_ptr, qk_scale, cap_scale, Hq, L, S, group, offset, n_m,
                                  total, sched_ptr, stride_pb, stride_pn, stride_mb, stride_mh,
                                  stride_mn, span_sb, span_sh,
                                  BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr,
                                  STAGES: gl.constexpr, STORE_LSE: gl.constexpr,
                                  IS_CAUSAL: gl.constexpr, RAGGED_KEYS: gl.constexpr,
                                  KEY_SPAN: gl.constexpr, NAN_ON_EMPTY: gl.constexpr,
                                  SOFTCAP: gl.constexpr, SCHEDULED: gl.constexpr,
                                  Q_BUFS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                  num_warps: gl.constexpr):
        """``_attention_fwd_ws`` without an attn_mask read in tiles or a window (padding rows,
        KEY_SPAN, as there: each work tile visits its (batch, head)'s span), as a persistent
        kernel:
        grid (P,), P at most the SMs, over the ``total`` = n_m * B * Hq work tiles (n_m =
        cdiv(L, BM); ``_work_tile``'s order). Without SCHEDULED, CTA p takes tiles p, p + P,
        ... (tiles of equal work: no causal mask); with it, the list ``persistent_schedule``
        wrote at ``sched_ptr`` for it (causal tiles, whose work differs). One CTA's work tiles
        follow each other without a launch between them: with Q_BUFS = 2 the copy warp loads
        the next tile's Q while the consumers work on this one's last key tiles, and its first
        keys while they finish the last P·V and store O, which leaves through shared memory of
        its own (``o_smem``; hd128: two Q buffers and O, 96 KB, beside K / V's 128)."""
        gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
        BMW: gl.constexpr = BM // 2
        dtype: gl.constexpr = q_desc.dtype
        q_smem0 = gl.allocate_shared_memory(dtype, [Q_BUFS, 1, 1, BMW, HEAD], q_desc.layout)
        q_smem1 = gl.allocate_shared_memory(dtype, [Q_BUFS, 1, 1, BMW, HEAD], q_desc.layout)
        o_smem0 = gl.allocate_shared_memory(dtype, [1, 1, BMW, HEAD], o_desc.layout)
        o_smem1 = gl.allocate_shared_memory(dtype, [1, 1, BMW, HEAD], o_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BN, HEAD], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BN, HEAD], v_desc.layout)
        _, k_ready, v_ready, k_empty, v_empty = _kv_ring_barriers(STAGES)
        q_bar = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(Q_BUFS):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # one arrive per consumer warpgroup
        fence_async_shared()
        gl.warp_specialize([
            (_consumer_persistent, (o_desc, lse_ptr, q_smem0, q_bar, q_empty, o_smem0, k_smem,
                                    v_smem, k_ready, v_ready, k_empty, v_empty, Hq, L, S,
                                    offset, n_m, total, sched_ptr, qk_scale, cap_scale,
                                    kpm_ptr, mask_ptr, spans_ptr, stride_pb, stride_pn,
                                    stride_mb, stride_mh, stride_mn, span_sb, span_sh, BMW,
                                    BN, HEAD, STAGES, STORE_LSE, IS_CAUSAL, RAGGED_KEYS,
                                    KEY_SPAN, NAN_ON_EMPTY, SOFTCAP, SCHEDULED, Q_BUFS, 0)),
            (_consumer_persistent, (o_desc, lse_ptr, q_smem1, q_bar, q_empty, o_smem1, k_smem,
                                    v_smem, k_ready, v_ready, k_empty, v_empty, Hq, L, S,
                                    offset, n_m, total, sched_ptr, qk_scale, cap_scale,
                                    kpm_ptr, mask_ptr, spans_ptr, stride_pb, stride_pn,
                                    stride_mb, stride_mh, stride_mn, span_sb, span_sh, BMW,
                                    BN, HEAD, STAGES, STORE_LSE, IS_CAUSAL, RAGGED_KEYS,
                                    KEY_SPAN, NAN_ON_EMPTY, SOFTCAP, SCHEDULED, Q_BUFS, 1)),
            (_producer_persistent, (q_desc, k_desc, v_desc, q_smem0, q_smem1, q_bar, q_empty,
                                    k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, Hq, S,
                                    group, offset, n_m, total, sched_ptr, spans_ptr, span_sb,
                                    span_sh, BMW, BN, HEAD, STAGES, IS_CAUSAL, SCHEDULED,
                                    Q_BUFS, KEY_SPAN)),
        ], [4, 1], [CONSUMER_REGS, 24])

    @gluon.jit
    def _attention_fwd_ws(q_desc, k_desc, v_desc, o_desc, m_desc, lse_ptr, kpm_ptr, mask_ptr,
                          spans_ptr, qk_scale, cap_scale, Hq, L, S, group, offset, window,
                          stride_pb, stride_pn,
                          stride_mb, stride_mh, stride_mn, span_sb, span_sh, mask_b_on,
                          mask_h_on, BM: gl.constexpr, BN: gl.constexpr, HEAD: gl.constexpr,
                          STAGES: gl.constexpr, STORE_LSE: gl.constexpr,
                          IS_CAUSAL: gl.constexpr, RAGGED_KEYS: gl.constexpr,
                          KEY_SPAN: gl.constexpr, NAN_ON_EMPTY: gl.constexpr,
                          MASK_TILE: gl.constexpr, WINDOW: gl.constexpr, SOFTCAP: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        """Grid (cdiv(L, BM), B * Hq). Q, O (B, Hq, L, D) and K, V (B, Hkv, S, D) through 4-d
        descriptors with their own strides (tiles of one head; rows past L and keys past S
        are the copy engine's zeros, masked or not stored). The LSE (B, Hq, L) contiguous.
        IS_CAUSAL: query i sees key j iff j <= i + offset (offset >= 0). RAGGED_KEYS: S is not
        a multiple of BN (without it the keys' mask is not compiled). KEY_SPAN (forward.SPAN_*
        flags): a padding row of keys per (batch, head), the key_padding_mask (B, S) and / or
        a bool attn_mask's row (its (B, Hq, L, S) view's strides, L's unused), with its spans
        (``forward.padding_spans``; (b, h)'s at b * span_sb + h * span_sh): the key tiles
        outside the visible span are not visited, those inside masked by the row unless the
        span is dense and covers them. MASK_TILE: an attn_mask with rows of its own, TILE_BOOL
        a bool one read as bytes, TILE_BIAS a float bias (fp16 / bf16; qk_scale is then the
        plain scale, see ``_consumer``), through ``m_desc`` (a descriptor of its own dims,
        broadcast ones of size 1, indexed at b * mask_b_on and h * mask_h_on; tiles of BM / 2
        rows and BN keys, past L and S zeros: hidden bytes, or keys the ragged-keys mask
        hides), copied with K. WINDOW (with IS_CAUSAL, not KEY_SPAN): query i sees key j iff
        also j > i + offset - window; the key tiles before the CTA's first row's window are
        not visited. SOFTCAP: the scores soft-capped (``_consumer``; ``cap_scale``)."""
        gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
        BMW: gl.constexpr = BM // 2
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        if IS_CAUSAL:
            # longest query tiles first: the last CTAs to start are the short ones
            pid_m = gl.num_programs(0) - 1 - pid_m
        start_m = pid_m * BM
        # a tensor where a launch specialized a window of 1 (to a constexpr: no .to())
        window = window + pid_m * 0
        n_tiles, full_tiles = _key_tiles(start_m, S, offset, BM, BN, IS_CAUSAL)
        t0 = pid_m * 0
        d_lo = t0
        d_hi = t0
        if WINDOW:
            # the first key the CTA's first row sees; the later rows' windows start later
            t0 = gl.maximum(start_m + offset - window + 1, 0) // BN
            n_tiles = n_tiles - t0
            if n_tiles <= 0:  # no row of the CTA sees a key: one tile, every key masked
                t0 = t0 * 0
                n_tiles = n_tiles * 0 + 1
        if KEY_SPAN != 0:  # the padding's visible span
            t0, n_tiles, d_lo, d_hi = span_tiles(spans_ptr, span_sb, span_sh, b, h, n_tiles, BN)

        dtype: gl.constexpr = q_desc.dtype
        q_smem0 = gl.allocate_shared_memory(dtype, [1, 1, BMW, HEAD], q_desc.layout)
        q_smem1 = gl.allocate_shared_memory(dtype, [1, 1, BMW, HEAD], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BN, HEAD], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BN, HEAD], v_desc.layout)
        if MASK_TILE:
            # (a bf16 bias at hd128: 64 KB beside Q, K and V's 160: 229,728 bytes of 232,448)
            m_smem = gl.allocate_shared_memory(m_desc.dtype, [2 * STAGES, 1, 1, BMW, BN],
                                               m_desc.layout)
        else:
            m_smem = k_smem  # (not read)
        q_bar, k_ready, v_ready, k_empty, v_empty = _kv_ring_barriers(STAGES)
        # (the mbarriers are not invalidated at the end: a partition may still wait on one)

        gl.warp_specialize([
            (_consumer, (o_desc, lse_ptr, q_smem0, q_bar, k_smem, v_smem, m_smem, k_ready,
                         v_ready,
                         k_empty, v_empty, b, h, start_m, L, S, offset, window, t0, n_tiles,
                         full_tiles, d_lo, d_hi, pid_bh * L, qk_scale, cap_scale, kpm_ptr,
                         stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh, stride_mn, BMW,
                         BN, HEAD, STAGES, STORE_LSE, IS_CAUSAL, RAGGED_KEYS, KEY_SPAN,
                         NAN_ON_EMPTY, MASK_TILE, WINDOW, SOFTCAP, 0, 0, 0, q_smem0, q_bar,
                         False)),
            (_consumer, (o_desc, lse_ptr, q_smem1, q_bar, k_smem, v_smem, m_smem, k_ready,
                         v_ready,
                         k_empty, v_empty, b, h, start_m + BMW, L, S, offset, window, t0,
                         n_tiles, full_tiles, d_lo, d_hi, pid_bh * L, qk_scale, cap_scale,
                         kpm_ptr, stride_pb, stride_pn, mask_ptr, stride_mb, stride_mh,
                         stride_mn, BMW, BN, HEAD, STAGES, STORE_LSE, IS_CAUSAL, RAGGED_KEYS,
                         KEY_SPAN, NAN_ON_EMPTY, MASK_TILE, WINDOW, SOFTCAP, 1, 0, 0, q_smem1,
                         q_bar, False)),
            (_producer, (q_desc, k_desc, v_desc, m_desc, q_smem0, q_smem1, q_bar, k_smem, v_smem,
                         m_smem, k_ready, v_ready, k_empty, v_empty, b, h, h // group,
                         b * mask_b_on, h * mask_h_on, start_m, t0, n_tiles, BMW, BN, HEAD,
                         STAGES, MASK_TILE)),
        ], [4, 1], [CONSUMER_REGS, 24])


def gluon_forward_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          shape: AttentionShape, *, scale: float, masked: str | bool | None,
                          padding: int,
                          causal_align: int, diagonal: int, window: int, softcap: float,
                          dropout_p: float, capability: int | None,
                          tiled: bool = False) -> str | None:
    """Why this call does not take the Gluon kernel, or None when it does. ``masked``: why the
    kernel does not read the call's attn_mask (``tile_mask_refusal``; True: no reason given),
    falsy where it does or there is none; ``tiled``: it has an attn_mask with rows of its own
    (read in tiles where not ``masked``); ``padding``:
    the ``forward.key_span`` flags of the padding rows it does read (a key_padding_mask, a
    bool attn_mask that is one row of keys), 0 for none. ``capability``: the device's compute
    capability major (None off a CUDA device)."""
    if gluon is None:
        return "this Triton has no Gluon Hopper API"
    if os.environ.get("SDPA_PASS_GLUON", "") == "0":
        return "SDPA_PASS_GLUON=0"
    if capability != 9:
        return "not a Hopper GPU (compute capability 9.x)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (fp16 / bf16 only)"
    if (shape.head_dim == shape.v_head_dim == WIDE_HEAD_DIM
            and os.environ.get("SDPA_PASS_GLUON_FWD_HD256", "") == "0"):
        return "head dim 256 with SDPA_PASS_GLUON_FWD_HD256=0"
    if shape.head_dim != shape.v_head_dim or shape.head_dim not in (*HEAD_DIMS, WIDE_HEAD_DIM):
        return f"head dims {shape.head_dim} / {shape.v_head_dim} (equal, one of {HEAD_DIMS})"
    causal = causal_align != CAUSAL_NONE
    if shape.head_dim == 64:
        tiles = -(-shape.q_len // BLOCK_M) * shape.batch * shape.q_heads
        least = (HD64_PERSISTENT_MIN_KEYS[causal]
                 if persistent_forward(64, padding, int(tiled), window, causal, tiles)
                 else HD64_MIN_KEYS)
        if shape.kv_len < least:
            return (f"head dim 64 with {shape.kv_len} keys (under {least} the Triton kernel "
                    "measured faster)")
    if not scale > 0.0:  # the running max is taken on the raw products (m = max(s) * scale)
        return f"scale {scale} (positive only)"
    refusal = gluon_scope_refusal("forward", masked, padding, window,
                                  softcap=gluon_softcap_refusal(softcap > 0.0),
                                  dropout=dropout_p > 0.0)
    if refusal is not None:
        return refusal
    if softcap > 0.0 and os.environ.get("SDPA_PASS_GLUON_SOFTCAP", "") != "1":
        least = SOFTCAP_MIN_KEYS.get(shape.head_dim, 0)
        if least is None or shape.kv_len < least:
            return (f"soft-capping at head dim {shape.head_dim} with {shape.kv_len} keys (the "
                    "Triton kernel measured faster"
                    + (")" if least is None else f" under {least})"))
    if causal and causal_offset(causal_align, diagonal, shape.q_len, shape.kv_len) < 0:
        return "a causal diagonal that leaves rows without keys"
    refusal = grid_rows_refusal(shape)
    if refusal is not None:
        return refusal
    return gluon_layout_refusal(Q=q, K=k, V=v)


def grid_rows_refusal(shape: AttentionShape) -> str | None:
    """Why the Gluon kernels, whose grids hold B * H on one dim of at most
    launch.GRID_ROWS_LIMIT programs, leave a call to the Triton kernels (which split the rows
    over two dims, ``launch.split_rows``), or None."""
    rows = shape.batch * shape.q_heads
    if rows > launch.GRID_ROWS_LIMIT:
        return (f"batch x query heads = {rows}, past a grid dim's {launch.GRID_ROWS_LIMIT} "
                "programs (the Triton kernels split them)")
    return None


def gluon_scope_refusal(kernel: str, masked: str | bool | None, padding: int, window: int, *,
                        softcap: str | None, dropout: bool) -> str | None:
    """The masks and score transforms the Gluon kernels (the ``kernel``: forward or backward)
    do not take, the forward's and the backward's alike: an attn_mask they do not read
    (``masked``: the reason, or True), padding rows and sliding windows they do not take
    (``gluon_padding_refusal``, ``gluon_window_refusal``), soft-capping where the kernel
    does not take it (``softcap``: why, or None) and dropout."""
    if masked:
        return (masked if isinstance(masked, str)
                else f"an attn_mask the Gluon {kernel} does not read")
    for refusal in (gluon_padding_refusal(padding), gluon_window_refusal(window, padding),
                    softcap):
        if refusal is not None:
            return refusal
    if dropout:
        return "dropout"
    return None


def gluon_softcap_refusal(softcapped: bool) -> str | None:
    """Why the Gluon kernels do not take this call's soft-capped scores, or None (also when
    it has none): SDPA_PASS_GLUON_SOFTCAP=0 keeps the Triton kernels for them. Padding rows
    beside a cap are taken since session 27 (run together on a GPU:
    test_gluon_padding.py's soft-capped cases). (The forward also keeps the Triton kernel at
    the shapes of ``SOFTCAP_MIN_KEYS`` unless the variable is 1.)"""
    if softcapped and os.environ.get("SDPA_PASS_GLUON_SOFTCAP", "") == "0":
        return "soft-capping with SDPA_PASS_GLUON_SOFTCAP=0"
    return None


def gluon_layout_refusal(**tensors: torch.Tensor) -> str | None:
    """Why the copy engine cannot read one of ``tensors`` (by name), or None."""
    for name, t in tensors.items():
        if not _copy_engine_layout(t):
            return (f"{name}'s layout (strides {tuple(t.stride())}): the copy engine needs a "
                    "16-byte aligned base and strides and a contiguous last dim")
    return None


def gluon_window_refusal(window: int, padding: int) -> str | None:
    """Why the Gluon kernels do not take this call's sliding window (-1: none), or None:
    SDPA_PASS_GLUON_WINDOW=0 keeps windows on the Triton kernels, and the Gluon kernels do
    not take one beside padding rows (``padding``: as for ``gluon_padding_refusal``)."""
    if window == -1:
        return None
    if os.environ.get("SDPA_PASS_GLUON_WINDOW", "") == "0":
        return "a sliding window under SDPA_PASS_GLUON_WINDOW=0"
    if padding:
        return "a sliding window beside a padding mask"
    return None


def gluon_padding_refusal(padding: int) -> str | None:
    """Why the Gluon kernels do not read this call's padding rows (``padding``: the
    ``forward.key_span`` flags, 0 where the call has none; SDPA_PASS_KEY_SPAN=0 gives 0 for
    a call that has some, see ``padding_flags``), or None."""
    if padding < 0:
        return "a padding mask with SDPA_PASS_KEY_SPAN=0 (the Triton kernels visit every key tile)"
    if padding and os.environ.get("SDPA_PASS_GLUON_PADDING", "") == "0":
        return "a padding mask with SDPA_PASS_GLUON_PADDING=0"
    return None


def padding_flags(row_mask: bool, has_kpm: bool, span: int) -> int:
    """The ``padding`` of the refusals: ``span`` (``forward.key_span``'s flags) where the call
    has a padding row (``row_mask``: a bool attn_mask that is one row of keys; ``has_kpm``),
    -1 where it has one but the span is off (SDPA_PASS_KEY_SPAN=0), 0 where it has none."""
    if not (row_mask or has_kpm):
        return 0
    return span if span else -1


def mask_tile_indexing(mask_tile: bool, mask_strides: tuple) -> tuple:
    """(mask_b_on, mask_h_on): whether the bool mask read in tiles has a batch and a head dim
    of its own (else its descriptor's dim of size 1 is indexed at 0)."""
    return int(mask_tile and mask_strides[0] != 0), int(mask_tile and mask_strides[1] != 0)


def padding_args(kpm, kpm_strides: tuple, mask, mask_strides: tuple, q: torch.Tensor) -> tuple:
    """The kernels' padding-row arguments: the key_padding_mask and the bool attn_mask (q as
    a dummy pointer for either that is absent), then the strides: the mask's (B, Hq, L, S)
    view's but L's."""
    return (q if kpm is None else kpm, q if mask is None else mask, *kpm_strides,
            mask_strides[0], mask_strides[1], mask_strides[3])


def span_strides(spans: torch.Tensor | None) -> tuple:
    """(span_sb, span_sh): the elements between the rows of batch elements and of query heads
    in ``forward.padding_spans``' (B, Hm, 3) (0 between heads where Hm is 1)."""
    if spans is None:
        return (0, 0)
    return (spans.stride(0), spans.stride(1) if spans.shape[1] > 1 else 0)


def _copy_engine_layout(t: torch.Tensor) -> bool:
    """A 4-d tensor descriptor's rules: base and every stride but the last 16-byte aligned and
    nonzero (no broadcast dim), the last dim contiguous."""
    elem = t.element_size()
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(stride > 0 and stride * elem % 16 == 0 for stride in t.stride()[:-1]))


@functools.lru_cache(maxsize=None)
def _layout(block: tuple, dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


_GL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_GL_MASK_DTYPES = {torch.uint8: "uint8", **_GL_DTYPES}


def _descriptor_maker(rows: int, head_dim: int):
    """A maker of the descriptor of a (B, H, N, head_dim) tensor with its own strides, tiles of
    ``rows`` rows of one head."""
    block = (1, 1, rows, head_dim)

    def make(t: torch.Tensor):
        return TensorDescriptor.from_tensor(t, list(block),
                                            _layout(block, getattr(gl, _GL_DTYPES[t.dtype])))
    return make


# Compiled launches by call key (kernels/launch.py): Gluon's launch path binds and specializes
# every argument in Python, which measured as long as a short kernel (H100: B32 H16 N512,
# causal, 239.5 TFLOP/s with the host in the time against 266.7 under CUDA graphs; B64 H16
# N256 91.6 against 305.8), so later calls launch the compiled kernel directly.
_GLUON_CALLS = PlanCache()


def attention_forward_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, shape: AttentionShape, scale: float,
                            return_lse: bool, causal_align: int, diagonal: int,
                            plan_key, padding: int = 0, kpm: torch.Tensor | None = None,
                            kpm_strides: tuple = (0, 0), mask: torch.Tensor | None = None,
                            mask_strides: tuple = (0, 0, 0, 0), nan_on_empty: bool = False,
                            spans: torch.Tensor | None = None, mask_tile: int = 0,
                            window: int = -1, softcap: float = 0.0) -> None:
    """Fill ``out`` (B, Hq, L, D) and, when ``return_lse``, ``lse`` (B, Hq, L) for a call that
    ``gluon_forward_refusal`` accepted (``out`` and ``lse`` as attention_forward_triton
    allocates them: contiguous). ``plan_key``: the forward's (``attention_forward_triton``),
    which fixes Q's, K's and V's layouts, the masks' layouts, return_lse and the causal form,
    so the compiled launch is remembered under it (the grid and RAGGED_KEYS follow from the
    shapes); None: no plan. ``padding``: the key_span flags of the padding rows read, the
    key_padding_mask ``kpm`` (B, S) with ``kpm_strides`` and / or the bool ``mask`` whose
    (B, Hq, L, S) view has ``mask_strides``, and their ``forward.padding_spans``;
    ``nan_on_empty``: rows that see no key give NaN (else zeros). ``mask_tile``: ``mask`` is
    instead an attn_mask with rows of its own (``tile_mask_refusal``), TILE_BOOL a bool one,
    TILE_BIAS a float bias, read in tiles through a descriptor (``padding`` then covers a
    key_padding_mask only). ``window``: a causal call's sliding window (-1: none);
    ``softcap``: the scores' soft cap (0: none)."""
    B, Hq, L, S = shape.batch, shape.q_heads, shape.q_len, shape.kv_len
    is_causal = causal_align != CAUSAL_NONE
    # the descriptors' tensors, wrapped by the makers on a plan's first call and by its
    # templates after (the plan key fixes their shapes and strides)
    pad = padding_args(kpm, kpm_strides, None if mask_tile else mask, mask_strides, q)
    tile = _tile_tensor(mask, mask_tile)
    qk_scale, cap_scale = gluon_score_scales(scale, softcap, mask_tile == TILE_BIAS)
    args = (q, k, v, out, tile, lse if return_lse else out, *pad[:2],
            q if spans is None else spans, qk_scale, cap_scale, Hq, L, S, shape.group,
            causal_offset(causal_align, diagonal, L, S), max(window, 0),
            *pad[2:], *span_strides(spans), *mask_tile_indexing(mask_tile, mask_strides))
    D = shape.head_dim
    bn = forward_block_n(D)
    q_rows, kv_rows = _descriptor_maker(BLOCK_M // 2, D), _descriptor_maker(bn, D)
    n_m = -(-L // BLOCK_M)
    if persistent_forward(D, padding, mask_tile, window, is_causal, n_m * B * Hq):
        offset = causal_offset(causal_align, diagonal, L, S)
        ctas = min(n_m * B * Hq, persistent_ctas(q.device))
        schedule = (causal_schedule(n_m, B * Hq, ctas, S, offset, bn, q.device)
                    if is_causal else lse)  # (not read without a schedule)
        if schedule is not None:
            args = (q, k, v, out, lse if return_lse else out, *pad[:2],
                    q if spans is None else spans, qk_scale, cap_scale, Hq, L, S, shape.group,
                    offset, n_m, n_m * B * Hq, schedule, *pad[2:], *span_strides(spans))
            launch_fixed(_GLUON_CALLS, plan_key, _attention_fwd_persistent, (ctas,), args,
                         dict(BM=BLOCK_M, BN=bn, HEAD=D, STAGES=STAGES, STORE_LSE=return_lse,
                              IS_CAUSAL=is_causal, RAGGED_KEYS=S % bn != 0 and not padding,
                              KEY_SPAN=padding, NAN_ON_EMPTY=nan_on_empty and padding != 0,
                              SOFTCAP=softcap > 0.0, SCHEDULED=is_causal,
                              Q_BUFS=PERSISTENT_Q_BUFFERS, CONSUMER_REGS=CONSUMER_REGS,
                              num_warps=4),
                         descriptors={0: q_rows, 1: kv_rows, 2: kv_rows, 3: q_rows})
            return
        # A CUDA graph being captured before this shape ran eagerly: the one-tile kernel, and
        # no plan under the key, which an eager call will give the persistent kernel
        plan_key = None
    launch_fixed(_GLUON_CALLS, plan_key, _attention_fwd_ws, (-(-L // BLOCK_M), B * Hq), args,
                 dict(BM=BLOCK_M, BN=bn, HEAD=D, STAGES=STAGES, STORE_LSE=return_lse,
                      IS_CAUSAL=is_causal, # (with padding rows their read masks keys past S)
                      RAGGED_KEYS=S % bn != 0 and not padding, KEY_SPAN=padding,
                      NAN_ON_EMPTY=nan_on_empty and (padding != 0 or mask_tile or window > 0),
                      MASK_TILE=mask_tile, WINDOW=window > 0, SOFTCAP=softcap > 0.0,
                      CONSUMER_REGS=CONSUMER_REGS,
                      num_warps=4),
                 descriptors={0: q_rows, 1: kv_rows, 2: kv_rows, 3: q_rows,
                              **({4: mask_tile_descriptor(B, Hq, mask_strides, L, S, keys=bn)}
                                 if mask_tile else {})})


def persistent_forward(head_dim: int, padding: int, mask_tile: int, window: int,
                       causal: bool, tiles: int) -> bool:
    """Whether a call the Gluon forward takes runs its persistent kernel
    (``_attention_fwd_persistent``) over its ``tiles`` work tiles: head dims 64 and 128 (at
    256 an O buffer of its own does not fit beside Q, K and V), no attn_mask read in tiles, no
    window, padding rows only without a causal mask (since session 36), and where causal at
    most SCHEDULE_LIMIT tiles (the host lays out their schedule, ``persistent_schedule``);
    not under SDPA_PASS_GLUON_PERSISTENT=0.

    H200, bf16, forward alone, B·H·N = 2**21 / D, N = 512 ... 16k, against the one-tile kernel
    (BENCHMARKS.md, session 34; do_bench, host in the time): hd128 1.04-1.25x without a mask
    (521 / 634 / 648 TFLOP/s at 512 / 4k / 16k), causal 1.03-1.19x, GQA 4:1 causal 1.03-1.16x;
    hd64 causal 1.07-1.11x from 4k, without a mask 0.99-1.02x there. With HF's padding row
    (session 36, N = 512 ... 16k): hd128 1.02-1.32x, hd64 1.04-1.10x from 4k and 1.20-1.23x the
    Triton forward at 512-2k; causal and padded 0.94-1.08x at hd128, 0.98-1.01x at hd64 from
    4k (its schedule weighs the work tiles by the causal mask alone; the spans are on the
    device), so those keep the one-tile kernel."""
    return (os.environ.get("SDPA_PASS_GLUON_PERSISTENT", "") != "0" and head_dim in HEAD_DIMS
            and not mask_tile and window <= 0 and not (padding and causal)
            and not (causal and tiles > SCHEDULE_LIMIT))


# Work tiles past which a causal call keeps the one-tile kernel rather than have its schedule
# laid out on the host (~0.1 s of Python at this count, once per shape)
SCHEDULE_LIMIT = 1 << 16
# What a work tile costs the schedule besides its key tiles (its prologue and epilogue), in
# key tiles
TILE_COST = 1


# Causal schedules kept (``causal_schedule``), the oldest dropped first
SCHEDULE_CACHE = 64
_SCHEDULES: dict[tuple, torch.Tensor] = {}


def causal_schedule(n_m: int, rows: int, ctas: int, S: int, offset: int, block_n: int,
                    device: torch.device) -> torch.Tensor | None:
    """``persistent_schedule``'s list for these arguments, laid out once and kept (the last
    SCHEDULE_CACHE of them). None where the current CUDA stream is capturing a graph and the
    list is not kept yet: its copy from pageable host memory to the device cannot be captured
    (an error in the capture, not a node), so such a call takes the one-tile kernel. Run a
    shape once before capturing it, as CUDA graphs want anyway, and its graph gets the
    persistent kernel. (``functools.lru_cache`` would serve the eager calls but cannot say
    whether it holds a key without computing it.)"""
    key = (n_m, rows, ctas, S, offset, block_n, device)
    schedule = _SCHEDULES.get(key)
    if schedule is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if len(_SCHEDULES) >= SCHEDULE_CACHE:
            del _SCHEDULES[next(iter(_SCHEDULES))]  # (dicts keep insertion order)
        schedule = _SCHEDULES[key] = persistent_schedule(*key)
    return schedule


def persistent_schedule(n_m: int, rows: int, ctas: int, S: int, offset: int, block_n: int,
                        device: torch.device) -> torch.Tensor:
    """The work lists of a causal persistent launch (``_work_list``), int32 on ``device``: the
    ``ctas`` CTAs' starts (ctas + 1 entries), then their work tiles, CTA by CTA. Tile t is
    query tile n_m - 1 - t % n_m of row t // n_m (``_work_tile``: head after head, the
    longest first), costing its key tiles plus TILE_COST; in that order each goes to the CTA
    that would be free first, as the GPU hands a one-tile kernel's programs to free SMs. Tiles
    p, p + P, ... would not do: a CTA's tiles would all sit at one offset within the heads
    wherever P is a multiple of n_m (H200, hd128, N = 512: 132 = 33 * 4 CTAs), or drift slowly
    through them (N = 16k: 132 = 128 + 4), so that one CTA's work tiles are all long ones
    (BENCHMARKS.md, session 34: 0.76x the one-tile kernel at N = 16k)."""
    cost = [-(-min(S, (n_m - i) * BLOCK_M + offset) // block_n) + TILE_COST
            for i in range(n_m)]
    free = [(0, p) for p in range(ctas)]  # (when free, CTA): a heap already
    lists = [[] for _ in range(ctas)]
    for t in range(n_m * rows):
        busy, p = free[0]
        lists[p].append(t)
        heapq.heapreplace(free, (busy + cost[t % n_m], p))
    starts = list(itertools.accumulate((len(tiles) for tiles in lists), initial=0))
    return torch.tensor(starts + [t for tiles in lists for t in tiles], dtype=torch.int32,
                        device=device)


# CTAs of a persistent launch: the device's SMs, or fewer (tests walk a CTA over many tiles)
PERSISTENT_MAX_CTAS = None
# Q buffers a consumer of the persistent kernel: with 2 the next work tile's Q is copied under
# this one's last key tiles (hd128: 224 KB of shared memory in all, of 227)
PERSISTENT_Q_BUFFERS = 2


def persistent_ctas(device: torch.device) -> int:
    """Programs a persistent forward launches on ``device`` at most: one per SM, or
    PERSISTENT_MAX_CTAS where set."""
    if PERSISTENT_MAX_CTAS is not None:
        return PERSISTENT_MAX_CTAS
    from .decode import sm_count  # (here: decode imports forward, which imports this module)
    return sm_count(device)


def gluon_score_scales(scale: float, softcap: float, bias: bool) -> tuple[float, float]:
    """(qk_scale, cap_scale) of the forward kernel: what takes a score (a raw product, or
    with ``softcap`` its tanh(s * scale / softcap)) to the units of the softmax (log2; natural
    with a ``bias``, which keeps them until the row max is subtracted: ``_consumer``), and the
    factor of ``_soft_cap``'s exponent (0.0 without a cap)."""
    if softcap > 0.0:
        return (softcap if bias else softcap * LOG2E), 2.0 * LOG2E * scale / softcap
    return (scale if bias else scale * LOG2E), 0.0


def _tile_tensor(mask, mask_tile: int):
    """What the kernels' mask descriptor reads: a bool mask's bytes, a float bias as it is."""
    if not mask_tile:
        return None
    return mask.view(torch.uint8) if mask_tile == TILE_BOOL else mask


def forward_block_n(head_dim: int) -> int:
    """Keys a tile of the Gluon forward's K / V ring at this head dim."""
    return WIDE_BLOCK_N if head_dim == WIDE_HEAD_DIM else BLOCK_N


def tile_mask_refusal(mask: torch.Tensor, bias_head_dims: tuple = (),
                      head_dim: int = 128) -> str | None:
    """Why a Gluon kernel does not read this attn_mask ((B, Hq, L, S) broadcast view) in
    tiles through the copy engine, or None when it does: a bool mask, or at the kernel's
    ``bias_head_dims`` (the forward's BIAS_HEAD_DIMS, gluon_backward.bias_head_dims()) an
    fp16 / bf16 float one, with rows of its own (a row of keys broadcast over the rows is a
    padding row instead, or for a float mask the Triton kernels'), keys contiguous, base and
    every other stride 16-byte aligned. SDPA_PASS_GLUON_MASK=0 keeps bool masks on the Triton
    kernels, SDPA_PASS_GLUON_BIAS=0 float ones."""
    floating = mask.dtype != torch.bool
    if floating and not bias_head_dims:
        return (f"a {mask.dtype} attn_mask (this Gluon kernel reads bool masks and padding "
                "rows here: float biases turned off by SDPA_PASS_GLUON_BWD_BIAS=0)")
    if floating and head_dim not in bias_head_dims:
        return (f"a float attn_mask at head dim {head_dim} (the Gluon kernel reads float "
                f"biases at head dims {bias_head_dims})")
    if floating and mask.dtype not in (torch.float16, torch.bfloat16):
        # two stages of a 128 x 128 tile fill the shared memory Q, K and V leave at 16 bits
        return (f"a {mask.dtype} attn_mask (the Gluon forward reads 16-bit float biases "
                "in tiles)")
    kind = "float" if floating else "bool"
    _, _, rows, keys = mask.shape
    stride_b, stride_h, stride_m, stride_n = mask.stride()
    size = mask.element_size()
    if not (rows > 1 and keys > 1 and stride_n == 1 and stride_m != 0
            and mask.data_ptr() % 16 == 0
            and all(stride * size % 16 == 0 for stride in (stride_b, stride_h, stride_m))):
        return (f"a {kind} attn_mask with strides {tuple(mask.stride())}: the copy engine needs "
                "contiguous keys and a 16-byte aligned base and strides")
    variable = "SDPA_PASS_GLUON_BIAS" if floating else "SDPA_PASS_GLUON_MASK"
    if os.environ.get(variable, "") == "0":
        return f"a {kind} attn_mask with {variable}=0"
    return None


def mask_tile_descriptor(batch: int, heads: int, mask_strides: tuple, L: int, S: int,
                         rows: int = BLOCK_M // 2, keys: int = BLOCK_N):
    """A maker of the descriptor of an attn_mask read in tiles (a bool mask's bytes: the
    tensor as given, viewed as uint8; a float bias as given; ``mask_strides``: its (batch,
    heads, L, S) broadcast view's, in elements): its own dims, a broadcast batch or head dim of
    size 1 (indexed at 0, ``mask_b_on`` / ``mask_h_on``), tiles of ``rows`` rows and ``keys``
    keys (the forward's: BLOCK_M / 2 and BLOCK_N)."""
    block = [1, 1, rows, keys]
    shape = [batch if mask_strides[0] else 1, heads if mask_strides[1] else 1, L, S]
    # a dim of size 1 may carry any stride; the copy engine wants a 16-byte multiple there
    strides = [stride if stride and size > 1 else 16
               for stride, size in zip(mask_strides, shape)][:2] + list(mask_strides[2:])

    def make(mask: torch.Tensor):
        layout = _layout(tuple(block), getattr(gl, _GL_MASK_DTYPES[mask.dtype]))
        return TensorDescriptor(mask, shape, strides, block, layout)
    return make
