"""Forward attention kernel in Triton (FlashAttention-2 style online softmax).

One program computes a BLOCK_M tile of query rows of one (batch, query head) and walks the
key/value tiles that can be visible to it. The key range is split in three: tiles before the
window's fully-visible band, fully visible tiles, and tiles on the causal diagonal / sequence
end. Only the first and last get the per-element predicate; tiles that no row can see are
never visited (causal and window tile skipping), nor key tiles a padding pattern hides in
full (``KEY_SPAN``: a key_padding_mask, or a bool attn_mask that is one row of keys).

Masks are predicates (causal offset, window, key padding) or tensors read tile by tile through
their own strides, so a broadcast mask (stride 0) is never materialised.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .checks import CAUSAL_NONE, AttentionShape, causal_offset
from .dropout import dropout_keep, keep_scale, load_seed
from .gluon_forward import (BIAS_HEAD_DIMS, TILE_BIAS, TILE_BOOL, attention_forward_gluon,
                            gluon_forward_refusal, padding_flags, tile_mask_refusal)
from .launch import (KernelCall, PlanCache, call_key, kernel_choice, launch_fixed,
                     log_kernel_choice, split_rows, tensor_key)

try:  # triton >= 3.4 (every supported version has it; guarded so an older one still runs)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)
# the most negative natural-log score whose log2 form is still a finite fp32
FP32_MIN_LN: tl.constexpr = tl.constexpr(-3.4028234663852886e38 * 0.6931471805599453)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

MASK_NONE = 0
MASK_BOOL = 1
MASK_FLOAT = 2
# A bool mask that is one row of keys per (batch, head) (query stride 0, or one query row), as
# HF's (B, 1, 1, S) padding masks are: the kernels read it as a vector of keys per tile, not
# a (BLOCK_M, BLOCK_N) tile of one row repeated (Triton does not specialise a 0 stride, so
# that tile is BLOCK_M times the loads). The kernels' MASK_KIND only; see mask_kind_of.
MASK_BOOL_ROW = 3


def interpreter_active() -> bool:
    # triton.jit decides at decoration time whether to interpret, from this variable.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tanh(x):
    # tl.tanh is not available in every supported triton version (3.6-3.9) nor in the
    # interpreter; this form is exact enough in fp32 and saturates correctly for large |x|.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def masked_scores(
    qk, rows, cols, mask_base, kpm_base, stride_mm, stride_mn, stride_pn,
    L, S, offset, window, qk_scale, softcap_log2,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BOUNDARY: tl.constexpr,
    NATURAL: tl.constexpr = False,
):
    """A tile of raw products Q·Kᵀ as scores in log2 units (NATURAL: natural-log units, see
    ``scores_with_mask_tile``) with every mask applied (-inf where
    a key is not visible), and tanh of the soft-capped logits for the backward's chain rule
    (0 without soft-capping). The one definition of what the masks mean, for the forward and
    backward kernels. ``rows`` / ``cols``: the tile's query and key indices as broadcastable
    2-D tensors, (M, 1) and (1, N) for a Q·Kᵀ tile or (1, M) and (N, 1) for the transposed
    K·Qᵀ tile of the dK/dV kernel. BOUNDARY tiles get the positional predicate (sequence end,
    causal diagonal, window); interior tiles are known fully visible and skip it. The mask
    tile is read here through its strides; ``scores_with_mask_tile`` takes one already read."""
    mask_tile = 0
    if MASK_KIND != 0:
        mask_tile = load_mask_tile(mask_base, rows, cols, stride_mm, stride_mn, L, S,
                                   MASK_KIND == 3)
    return scores_with_mask_tile(
        qk, rows, cols, mask_tile, kpm_base, stride_pn, S, offset, window, qk_scale,
        softcap_log2, MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BOUNDARY, NATURAL)


@triton.jit
def load_mask_tile(mask_base, rows, cols, stride_mm, stride_mn, L, S, ROW: tl.constexpr = False):
    """attn_mask values of a tile through pointers; 0 past the sequence ends. ROW
    (MASK_BOOL_ROW): the mask's one row, shaped as ``cols`` and broadcast by its use; rows past
    L then read it too, which every kernel tolerates (their outputs are not stored, their
    statistics give P = 0)."""
    if ROW:
        tile = tl.load(mask_base + cols * stride_mn, mask=cols < S, other=0)
    else:
        tile = tl.load(mask_base + rows * stride_mm + cols * stride_mn,
                       mask=(rows < L) & (cols < S), other=0)
    return tile


@triton.jit
def scores_with_mask_tile(
    qk, rows, cols, mask_tile, kpm_base, stride_pn, S, offset, window, qk_scale, softcap_log2,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BOUNDARY: tl.constexpr,
    NATURAL: tl.constexpr,
):
    """``masked_scores`` given the tile of attn_mask as loaded (bool/uint8 or float values;
    positions past the sequence ends may hold anything: the predicate or the caller's row
    bounds hide them). NATURAL (a float mask, no soft-capping): the scores stay in natural-log
    units, ``qk * qk_scale + bias`` with qk_scale the plain softmax scale, as eager adds them:
    a finfo.min bias stays finite with no clamp, and the caller moves to log2 units after
    subtracting the row max (``_attend_tiles``)."""
    # Scores in the log2 domain (exp2 is the native instruction), except NATURAL's.
    t = qk * 0.0
    if HAS_SOFTCAP:
        t = _tanh(qk * qk_scale)
        qk = softcap_log2 * t
    else:
        qk = qk * qk_scale
    # Every key visible until a mask says otherwise: a constant. (It was `cols >= 0`, which
    # the compiler folds only where it can bound the key loop's start; with KEY_SPAN's
    # computed start it stayed a compare and an and per score: the forward's interior loop
    # took 1136 sm_90 instructions against 936 without the span, and ran 12-17% slower with
    # nothing padded; H100, hd128, N = 4096, the same tile. session 20.)
    visible = tl.full(cols.shape, True, tl.int1)
    if BOUNDARY:
        visible = visible & (cols < S)
        if IS_CAUSAL:
            visible = visible & (cols <= rows + offset)
        if HAS_WINDOW:
            visible = visible & (cols > rows + offset - window)
    if MASK_KIND == 1 or MASK_KIND == 3:
        visible = visible & (mask_tile != 0)
    elif NATURAL:
        qk = qk + mask_tile.to(tl.float32)
    elif MASK_KIND == 2:
        bias = mask_tile.to(tl.float32)
        # finfo(float32).min * log2(e) would overflow to -inf and turn a row that eager
        # softmax averages uniformly (all keys at finfo.min) into an empty row; clamp
        # finite biases to the fp32 range and keep only a true -inf as -inf.
        bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, FP32_MIN_LN) * LOG2E_C)
        qk = qk + bias
    if HAS_KPM:
        visible = visible & (tl.load(kpm_base + cols * stride_pn, mask=cols < S, other=0) != 0)
    if BOUNDARY or MASK_KIND == 1 or MASK_KIND == 3 or HAS_KPM:
        qk = tl.where(visible, qk, float("-inf"))
    return qk, t


@triton.jit
def grid_row():
    """This program's row, b * H + h, of a grid whose B * H rows ``launch.split_rows`` laid
    over its second and third dims."""
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)


@triton.jit
def program_tile(H, BATCH_INNER: tl.constexpr):
    """(tile, b * H + h) of this program in a grid of (tiles, B * H), B * H split over the
    second and third dims past GRID_ROWS_LIMIT (``launch.split_rows``). The GPU starts programs
    in order of their linear id, the first grid dim fastest: the tiles of one (b, h) run side
    by side and share its K and V (or Q and dO) in L2. A mask broadcast over the batch is read
    again by every batch element, B apart in that order; BATCH_INNER (see batch_inner) decodes
    the linear id batch element first, so the B programs reading one mask tile run side by
    side and all but the first find it in L2."""
    tile = tl.program_id(0)
    bh = grid_row()
    if BATCH_INNER:
        tiles = tl.num_programs(0)
        batch = tl.num_programs(1) * tl.num_programs(2) // H
        lin = bh * tiles + tile
        rest = lin // batch
        bh = (lin % batch) * H + rest // tiles
        tile = rest % tiles
    return tile, bh


def batch_inner(mask_kind: int, mask_strides: tuple, batch: int, measured_faster: bool) -> bool:
    """Whether a kernel takes its programs batch element first (``program_tile``): only for an
    attn_mask broadcast over a batch of more than one (a bias shared by the batch, as T5 and
    ALiBi models build it; a causal or padding pattern without a batch dim), which every batch
    element reads again, and where that ``measured_faster`` (the callers say where);
    SDPA_PASS_BATCH_INNER=1 takes that order for every such mask, =0 for none."""
    if mask_kind == MASK_NONE or batch == 1 or mask_strides[0] != 0:
        return False
    setting = os.environ.get("SDPA_PASS_BATCH_INNER")
    return setting == "1" or (setting != "0" and measured_faster)


@triton.jit
def key_ranges(start_m, S, offset, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query tile at start_m: key tiles [lo, hi) hold every key a row can see, and
    [mid_lo, mid_hi) the tiles every row sees in full (no positional predicate needed)."""
    hi = S
    full_hi = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # row i sees j <= i + offset
        hi = tl.minimum(hi, start_m + BLOCK_M + offset)
        full_hi = tl.minimum(full_hi, ((start_m + offset + 1) // BLOCK_N) * BLOCK_N)
    hi = tl.maximum(hi, 0)
    full_hi = tl.maximum(full_hi, 0)
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        # row i sees j > i + offset - window
        lo = tl.maximum(start_m + offset - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        full_lo = start_m + BLOCK_M + offset - window
        full_lo = tl.maximum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)
    mid_lo = tl.minimum(full_lo, hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


# Key padding (``KEY_SPAN``): which padding pattern a kernel reads its visible key span from.
# A pattern that is one row of keys per (batch, head), the same for every query row (a
# key_padding_mask, or a bool attn_mask broadcast over query rows as HF's (B, 1, 1, S) padding
# masks are), hides every key outside [first visible, last visible]: the key tiles there are
# skipped, as the causal band's are, and the masks still apply inside.
SPAN_NONE = 0
SPAN_KPM = 1      # the key_padding_mask
SPAN_MASK = 2     # the bool attn_mask's row (query stride 0, or one query row)
SPAN_CHUNK: tl.constexpr = tl.constexpr(1024)  # keys read per step of the span's scan


def mask_kind_of(mask_kind: int, mask_strides: tuple, q_len: int) -> int:
    """The kernels' MASK_KIND for a launch: MASK_BOOL_ROW for a bool mask that is one row of
    keys (``mask_strides``: of the (B, Hq, L, S) view), else the kind. Such a mask is never
    read through a descriptor (``use_mask_tma`` wants rows of its own)."""
    if mask_kind == MASK_BOOL and (mask_strides[2] == 0 or q_len == 1):
        return MASK_BOOL_ROW
    return mask_kind


def key_span(row_mask: bool, has_kpm: bool) -> int:
    """The ``KEY_SPAN`` flags of a launch: the key_padding_mask, and a bool attn_mask that is
    one row of keys (``row_mask``). SDPA_PASS_KEY_SPAN=0 visits every key tile instead."""
    if os.environ.get("SDPA_PASS_KEY_SPAN") == "0":
        return SPAN_NONE
    return (SPAN_KPM if has_kpm else SPAN_NONE) | (SPAN_MASK if row_mask else SPAN_NONE)


@triton.jit
def _visible(kpm_base, stride_pn, mask_row, stride_mn, cols, start, stop,
             KEY_SPAN: tl.constexpr):
    """Whether each key of ``cols`` is in [start, stop) and visible under the padding
    pattern(s) of KEY_SPAN (start >= 0 and stop <= S: nothing outside is read)."""
    visible = (cols >= start) & (cols < stop)
    if KEY_SPAN & 1:
        visible = visible & (tl.load(kpm_base + cols * stride_pn, mask=visible, other=0) != 0)
    if KEY_SPAN & 2:
        visible = visible & (tl.load(mask_row + cols * stride_mn, mask=visible, other=0) != 0)
    return visible


@triton.jit
def visible_key_span(kpm_base, stride_pn, mask_row, stride_mn, start, stop,
                     KEY_SPAN: tl.constexpr, CHUNK: tl.constexpr = SPAN_CHUNK):
    """[first, end): from the first to past the last key of [start, stop) the padding
    pattern(s) of KEY_SPAN leave visible to one (batch, head); [stop, start) where none is.

    Read from the front, CHUNK keys a step, until a step finds a visible key, then from the
    back likewise: two steps where nothing is padded, and a step per CHUNK padded keys, each
    of which saves the K/V loads and products of as many keys. (Both ends in one step, CHUNK /
    2 keys each, measured no faster where nothing is padded and slower with right padding:
    H100, hd128, N = 4096, session 19.)"""
    first = stop + 0
    lo = start + 0
    while (first == stop) & (lo < stop):
        cols = lo + tl.arange(0, CHUNK)
        seen = _visible(kpm_base, stride_pn, mask_row, stride_mn, cols, start, stop, KEY_SPAN)
        first = tl.min(tl.where(seen, cols, stop), 0)
        lo += CHUNK
    end = start + 0
    hi = stop + 0
    while (end == start) & (hi > first):  # nothing visible: first == stop, no step
        cols = hi - CHUNK + tl.arange(0, CHUNK)
        seen = _visible(kpm_base, stride_pn, mask_row, stride_mn, cols, start, stop, KEY_SPAN)
        end = tl.max(tl.where(seen, cols + 1, start), 0)
        hi -= CHUNK
    return first, end


@triton.jit
def _padding_spans_kernel(KPM, MASK, SPANS, stride_pb, stride_pn, stride_mb, stride_mh,
                          stride_mn, S, KEY_SPAN: tl.constexpr, CHUNK: tl.constexpr):
    """Grid (B, Hm): row (b, h) of SPANS (B, Hm, 3) int32 holds the first key the padding
    pattern(s) of KEY_SPAN leave visible to batch b (and query head h where the mask has a row
    per head, else h = 0), past the last one, and 1 where every key between is visible (a
    dense span: right or left padding) else 0. Nothing visible: (S, 0, 0)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kpm_base = KPM + b * stride_pb
    mask_row = MASK + b * stride_mb + h.to(tl.int64) * stride_mh
    first = S + 0
    end = S * 0
    count = S * 0
    for lo in range(0, S, CHUNK):
        cols = lo + tl.arange(0, CHUNK)
        seen = _visible(kpm_base, stride_pn, mask_row, stride_mn, cols, 0, S, KEY_SPAN)
        first = tl.minimum(first, tl.min(tl.where(seen, cols, S), 0))
        end = tl.maximum(end, tl.max(tl.where(seen, cols + 1, 0), 0))
        count += tl.sum(seen.to(tl.int32), 0)
    row = SPANS + (b * tl.num_programs(1) + h) * 3
    tl.store(row, first)
    tl.store(row + 1, end)
    tl.store(row + 2, (count == end - first).to(tl.int32))


def padding_spans(kpm: torch.Tensor | None, kpm_strides: tuple, mask: torch.Tensor | None,
                  mask_strides: tuple, batch: int, heads: int, kv_len: int, padding: int,
                  plan_key=None) -> torch.Tensor:
    """The (B, Hm, 3) int32 spans of ``_padding_spans_kernel`` for the padding rows of a call
    (``padding``: its key_span flags; ``mask``'s strides of its (B, Hq, L, S) view): Hm is
    ``heads`` where the bool mask has a row per query head, else 1. The Gluon kernels read
    their key tiles' range from it and leave the padding unread inside a dense span.
    ``plan_key``: the caller's (the launch is remembered under it, kernels/launch.py)."""
    rows = heads if padding & 2 and mask_strides[1] != 0 else 1
    present = kpm if kpm is not None else mask  # (also the dummy pointer of an absent one)
    spans = torch.empty((batch, rows, 3), dtype=torch.int32, device=present.device)
    args = (present, present if mask is None else mask, spans, *kpm_strides, mask_strides[0],
            mask_strides[1], mask_strides[3], kv_len)
    launch_fixed(_SPAN_CALLS, plan_key, _padding_spans_kernel, (batch, rows), args,
                 dict(KEY_SPAN=padding, CHUNK=SPAN_CHUNK, num_warps=4))
    return spans


# Launches of the spans kernel by the plan key of the call it serves (kernels/launch.py).
_SPAN_CALLS = PlanCache()


@triton.jit
def clamp_to_span(lo, mid_lo, mid_hi, hi, first, end, BLOCK_N: tl.constexpr):
    """Key tiles [lo, mid_lo) [mid_lo, mid_hi) [mid_hi, hi) (``key_ranges``' three, on the
    grid of tiles that starts at lo) less the tiles wholly outside [first, end): every bound
    stays on that grid (the span's ends round out to whole tiles), an interior tile stays
    interior, and with nothing visible (end <= lo) all are empty."""
    hi = tl.minimum(hi, lo + ((tl.maximum(end - lo, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    lo = tl.minimum(lo + (tl.maximum(first - lo, 0) // BLOCK_N) * BLOCK_N, hi)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def visible_key_ranges(start_m, S, offset, window, kpm_base, stride_pn, mask_row, stride_mn,
                       IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       KEY_SPAN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``key_ranges`` for the query tile at start_m, less the key tiles outside the span a
    padding pattern leaves visible (KEY_SPAN; the forward's and dQ's key loops)."""
    lo, mid_lo, mid_hi, hi = key_ranges(start_m, S, offset, window, IS_CAUSAL, HAS_WINDOW,
                                        BLOCK_M, BLOCK_N)
    if KEY_SPAN != 0:  # padding: the key tiles outside the visible span hold no visible key
        first, end = visible_key_span(kpm_base, stride_pn, mask_row, stride_mn, lo, hi,
                                      KEY_SPAN)
        lo, mid_lo, mid_hi, hi = clamp_to_span(lo, mid_lo, mid_hi, hi, first, end, BLOCK_N)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def tile_sees_a_key(kpm_base, stride_pn, mask_row, stride_mn, offs_n, S, KEY_SPAN: tl.constexpr):
    """Whether some key of the tile ``offs_n`` is visible under the padding pattern(s) of
    KEY_SPAN (the dK/dV kernel's test: a tile with none gets no gradient)."""
    visible = _visible(kpm_base, stride_pn, mask_row, stride_mn, offs_n, 0, S, KEY_SPAN)
    return tl.max(visible.to(tl.int32), 0) > 0


@triton.jit
def _key_tile(k_base, offs_n, offs_d, start_n, off_b, off_hkv, stride_kn, stride_kd, S,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              BOUNDARY: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Kᵀ of the key tile at start_n, (BLOCK_D, BLOCK_N)."""
    if TMA:
        k = tl.trans(k_base.load([off_b, off_hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
    else:
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        if BOUNDARY:
            k = tl.load(k_ptrs, mask=(offs_n[None, :] < S) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_ptrs)
    if DOT_UPCAST:
        k = k.to(tl.float32)
    return k


@triton.jit
def _value_tile(v_base, offs_n, offs_dv, start_n, off_b, off_hkv, stride_vn, stride_vd, S,
                HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                BOUNDARY: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr):
    """V of the key tile at start_n, (BLOCK_N, BLOCK_DV)."""
    if TMA:
        v = v_base.load([off_b, off_hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        if BOUNDARY:
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < S) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        elif BLOCK_DV != HEAD_DIM_V:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
        else:
            v = tl.load(v_ptrs)
    if DOT_UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, mask_b, mask_h,
               start_m, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK_KIND: tl.constexpr, MASK_TMA: tl.constexpr):
    """The attn_mask tile of a key tile (0 without a mask). Read before the tile's Q·Kᵀ: a
    pointer load issued first overlaps the product, one issued after it waits in full."""
    if MASK_TMA:
        mask_tile = mask_base.load([mask_b, mask_h, start_m, start_n]).reshape(BLOCK_M, BLOCK_N)
    elif MASK_KIND != 0:
        mask_tile = load_mask_tile(mask_base, offs_m[:, None], offs_n[None, :],
                                   stride_mm, stride_mn, L, S, MASK_KIND == 3)
    else:
        mask_tile = 0
    return mask_tile


@triton.jit
def mask_origin(MASK, off_b, off_h, stride_mb, stride_mh, MASK_TMA: tl.constexpr):
    """Where the attn_mask of batch element off_b, head off_h starts, as ``_mask_tile`` takes
    it: MASK_TMA, the descriptor of the mask's own (unbroadcast) dims and the int32 indices
    into them (0 where the mask broadcasts); else a pointer to its (L, S) plane (64-bit
    offsets) and the indices as given."""
    if MASK_TMA:
        base = MASK
        mask_b = tl.where(stride_mb == 0, 0, off_b).to(tl.int32)
        mask_h = tl.where(stride_mh == 0, 0, off_h).to(tl.int32)
    else:
        base = MASK + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh
        mask_b = off_b
        mask_h = off_h
    return base, mask_b, mask_h


@triton.jit
def _tile_probabilities(
    qk, mask_tile, m_i, kpm_base, offs_m, offs_n, qk_scale, softcap_log2, stride_pn, S,
    offset, window, seed0, seed1, bh, dropout_p, dropout_scale,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, BOUNDARY: tl.constexpr,
    FOLD_SCALE: tl.constexpr, NATURAL: tl.constexpr,
):
    """One key tile's step of the online softmax from its raw products Q·Kᵀ: (P, with
    dropout applied, the tile's sum of P before dropout, alpha = the factor of what was
    summed before, the new row max); see ``_attend_tiles`` for the units."""
    qk, _ = scores_with_mask_tile(
        qk, offs_m[:, None], offs_n[None, :], mask_tile, kpm_base, stride_pn, S, offset, window,
        1.0 if FOLD_SCALE else qk_scale, softcap_log2,
        MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BOUNDARY, NATURAL,
    )
    # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
    # exp2(-inf - m) at 0 rather than NaN, so l stays 0 and the row is detected at the end.
    if FOLD_SCALE:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    elif NATURAL:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # finfo.min - finfo.min is 0 here, where its log2 form would have overflowed
        p = tl.math.exp2((qk - m_safe[:, None]) * LOG2E_C)
        alpha = tl.math.exp2((m_i - m_safe) * LOG2E_C)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    p_sum = tl.sum(p, 1)  # the softmax normaliser counts dropped keys too
    if DROPOUT:
        keep = dropout_keep(seed0, seed1, bh, offs_m[:, None], offs_n[None, :], dropout_p)
        p = tl.where(keep, p * dropout_scale, 0.0)
    return p, p_sum, alpha, m_new


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q,
    k_base, v_base, mask_base, kpm_base,
    offs_m, offs_d, offs_dv,
    lo, hi,
    qk_scale, softcap_log2,
    stride_kn, stride_kd, stride_vn, stride_vd,
    stride_mm, stride_mn, stride_pn,
    L, S, offset, window,
    seed0, seed1, bh, dropout_p, dropout_scale, off_b, off_hkv, mask_b, mask_h, start_m,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
    BOUNDARY: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, MASK_TMA: tl.constexpr, FOLD_SCALE: tl.constexpr, NATURAL: tl.constexpr,
    PIPELINE: tl.constexpr,
):
    """Online-softmax update over key tiles [lo, hi).

    BOUNDARY tiles get the positional predicate (sequence end, causal diagonal, window);
    interior tiles are known fully visible and skip it. TMA: k_base / v_base are tensor
    descriptors of the (B, Hkv, S, D) tensors, read by the copy engine, which fills rows past
    S with zeros (the predicate then hides them). FOLD_SCALE: the scale is positive and
    nothing is added to the scores, so the row max is taken on the raw products and
    the scale folds into the exponent's argument (one multiply-add per score instead of a
    multiply and a subtract). MASK_TMA: mask_base is a tensor descriptor of attn_mask (its
    broadcast batch / head dims of size 1, indexed by mask_b / mask_h), so the mask tile is
    copied ahead like K and V. Read through pointers, it is not: Triton's software pipeliner
    (3.6-3.9) only prefetches a pointer load that feeds a Hopper wgmma product if the load is
    the product's operand in shared memory, and the mask reaches the P·V product through the
    softmax; each key tile then waited for its mask tile (compiled for sm_90: the pointer
    path's mask load stays a synchronous tt.load, the descriptor's is pipelined).
    NATURAL (a float mask, no soft-capping): scores, m_i and the exponent's argument are in
    natural-log units until after the max is subtracted, then scaled by log2(e): the bias needs
    one add, where the log2 form needs a clamp (finfo.min · log2(e) overflows to -inf) and a
    select to keep a true -inf (a clamp, a compare, a select and a multiply per score).
    PIPELINE (interior tiles only: no positional predicate): software-pipelined so
    the softmax overlaps a matrix product on Hopper: each iteration computes this tile's
    scores, then issues the previous tile's P·V, then this tile's softmax, whose exponentials
    run while that product is in flight. The output's rescale for this tile's new max waits
    for the next iteration, after the scores' wait has completed the P·V product: Triton
    (3.6-3.9) keeps a product in flight only while nothing but the next product reads its
    accumulator (benchmarks/pipelined_qk.py shows the compiled schedules). P crosses the
    iteration in fp32 registers. Off by default (SDPA_PASS_FWD_PIPELINE=1): timed on an H100
    (triton 3.6) it ran 0.85-0.99x the plain loop, whose 198 registers it raises to 229.
    """
    if PIPELINE:
        tl.static_assert(not BOUNDARY, "the pipelined loop takes interior tiles only")
        if lo < hi:
            offs_n = lo + tl.arange(0, BLOCK_N)
            k = _key_tile(k_base, offs_n, offs_d, lo, off_b, off_hkv, stride_kn, stride_kd, S,
                          HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_UPCAST, TMA)
            mask_tile = _mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, mask_b,
                                   mask_h, start_m, lo, BLOCK_M, BLOCK_N, MASK_KIND, MASK_TMA)
            p, p_sum, alpha, m_i = _tile_probabilities(
                tl.dot(q, k, input_precision=DOT_PRECISION), mask_tile, m_i, kpm_base, offs_m,
                offs_n, qk_scale, softcap_log2, stride_pn, S, offset, window,
                seed0, seed1, bh, dropout_p, dropout_scale, MASK_KIND, HAS_KPM, IS_CAUSAL,
                HAS_WINDOW, HAS_SOFTCAP, DROPOUT, False, FOLD_SCALE, NATURAL)
            l_i = l_i * alpha + p_sum
            for start_n in range(lo + BLOCK_N, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                k = _key_tile(k_base, offs_n, offs_d, start_n, off_b, off_hkv, stride_kn, stride_kd,
                              S, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_UPCAST, TMA)
                mask_tile = _mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, mask_b,
                                       mask_h, start_m, start_n, BLOCK_M, BLOCK_N, MASK_KIND,
                                       MASK_TMA)
                # the scores first: their wait is the one that completes the previous P·V
                qk = tl.dot(q, k, input_precision=DOT_PRECISION)
                v = _value_tile(v_base, offs_n - BLOCK_N, offs_dv, start_n - BLOCK_N, off_b, off_hkv,
                                stride_vn, stride_vd, S, HEAD_DIM_V, BLOCK_DV, BLOCK_N, False,
                                DOT_UPCAST, TMA)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
                p, p_sum, alpha, m_i = _tile_probabilities(
                    qk, mask_tile, m_i, kpm_base, offs_m, offs_n, qk_scale, softcap_log2,
                    stride_pn, S, offset, window, seed0, seed1, bh, dropout_p, dropout_scale,
                    MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DROPOUT, False,
                    FOLD_SCALE, NATURAL)
                l_i = l_i * alpha + p_sum
            last = lo + ((hi - lo - 1) // BLOCK_N) * BLOCK_N
            v = _value_tile(v_base, last + tl.arange(0, BLOCK_N), offs_dv, last, off_b, off_hkv,
                            stride_vn, stride_vd, S, HEAD_DIM_V, BLOCK_DV, BLOCK_N, False,
                            DOT_UPCAST, TMA)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _key_tile(k_base, offs_n, offs_d, start_n, off_b, off_hkv, stride_kn, stride_kd, S,
                          HEAD_DIM, BLOCK_D, BLOCK_N, BOUNDARY, DOT_UPCAST, TMA)
            mask_tile = _mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, mask_b,
                                   mask_h, start_m, start_n, BLOCK_M, BLOCK_N, MASK_KIND, MASK_TMA)
            p, p_sum, alpha, m_i = _tile_probabilities(
                tl.dot(q, k, input_precision=DOT_PRECISION), mask_tile, m_i, kpm_base, offs_m,
                offs_n, qk_scale, softcap_log2, stride_pn, S, offset, window,
                seed0, seed1, bh, dropout_p, dropout_scale, MASK_KIND, HAS_KPM, IS_CAUSAL,
                HAS_WINDOW, HAS_SOFTCAP, DROPOUT, BOUNDARY, FOLD_SCALE, NATURAL)
            l_i = l_i * alpha + p_sum
            acc = acc * alpha[:, None]
            v = _value_tile(v_base, offs_n, offs_dv, start_n, off_b, off_hkv, stride_vn, stride_vd, S,
                            HEAD_DIM_V, BLOCK_DV, BLOCK_N, BOUNDARY, DOT_UPCAST, TMA)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


# Lengths, head counts and mask offsets change between calls; specialising on them (Triton
# specialises integers equal to 1 or divisible by 16) would compile a kernel per value.
# len_class: unused by the kernel; it is in the autotuner's key (see LONG_ROWS).
@triton.jit(do_not_specialize=["H", "L", "S", "GROUP", "offset", "window", "len_class"])
def _attention_fwd_kernel(
    Q, K, V, O, LSE, MASK, KPM, SEED,
    qk_scale, softcap_log2, dropout_p, dropout_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_lb, stride_lh,
    H, L, S, GROUP, offset, window, len_class,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NAN_ON_EMPTY: tl.constexpr, STORE_LSE: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, MASK_TMA: tl.constexpr, FOLD_SCALE: tl.constexpr, NATURAL: tl.constexpr,
    REVERSE: tl.constexpr, PIPELINE: tl.constexpr, BATCH_INNER: tl.constexpr,
    KEY_SPAN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh = program_tile(H, BATCH_INNER)
    if REVERSE:
        # the longest rows first: a causal tile's work grows with its index, and starting the
        # short ones last keeps every multiprocessor busy until the end
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hkv = off_h // GROUP  # GQA/MQA: query heads of a group read one K/V head, no copies
    # 64-bit base offsets: B*H*L*D can pass 2**31 elements for long sequences.
    off_b64 = off_b.to(tl.int64)
    if TMA:
        # Q, K, V, O are tensor descriptors of the 4-D tensors: the copy engine does the
        # address arithmetic and the bounds (rows past L or S read as zeros, stores clip)
        k_base = K
        v_base = V
    else:
        q_base = Q + off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh
        k_base = K + off_b64 * stride_kb + off_hkv.to(tl.int64) * stride_kh
        v_base = V + off_b64 * stride_vb + off_hkv.to(tl.int64) * stride_vh
        o_base = O + off_b64 * stride_ob + off_h.to(tl.int64) * stride_oh
    mask_base, mask_b, mask_h = mask_origin(MASK, off_b, off_h, stride_mb, stride_mh, MASK_TMA)
    kpm_base = KPM + off_b64 * stride_pb
    seed0, seed1 = load_seed(SEED, DROPOUT)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    if TMA:
        q = Q.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)

    lo, mid_lo, mid_hi, hi = visible_key_ranges(
        start_m, S, offset, window, kpm_base, stride_pn, mask_base, stride_mn, IS_CAUSAL,
        HAS_WINDOW, KEY_SPAN, BLOCK_M, BLOCK_N)

    # [lo, mid_lo) is empty without a window (see key_ranges). Only span kernels leave the
    # loop out: the compiler keeps the empty loop there (36 wgmma instructions for sm_90
    # against 24), while leaving it out of the bool and bias kernels made them spill.
    if HAS_WINDOW or KEY_SPAN == 0:
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, k_base, v_base, mask_base, kpm_base, offs_m, offs_d, offs_dv,
            lo, mid_lo, qk_scale, softcap_log2,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_pn,
            L, S, offset, window, seed0, seed1, pid_bh, dropout_p, dropout_scale, off_b, off_hkv,
            mask_b, mask_h, start_m,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, HAS_KPM,
            IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DROPOUT, True, DOT_UPCAST, DOT_PRECISION,
            TMA, MASK_TMA, FOLD_SCALE, NATURAL, False,
        )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, k_base, v_base, mask_base, kpm_base, offs_m, offs_d, offs_dv,
        mid_lo, mid_hi, qk_scale, softcap_log2,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_pn,
        L, S, offset, window, seed0, seed1, pid_bh, dropout_p, dropout_scale, off_b, off_hkv,
        mask_b, mask_h, start_m,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, HAS_KPM,
        IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DROPOUT, False, DOT_UPCAST, DOT_PRECISION,
        TMA, MASK_TMA, FOLD_SCALE, NATURAL, PIPELINE,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, k_base, v_base, mask_base, kpm_base, offs_m, offs_d, offs_dv,
        mid_hi, hi, qk_scale, softcap_log2,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_pn,
        L, S, offset, window, seed0, seed1, pid_bh, dropout_p, dropout_scale, off_b, off_hkv,
        mask_b, mask_h, start_m,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, HAS_KPM,
        IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DROPOUT, True, DOT_UPCAST, DOT_PRECISION,
        TMA, MASK_TMA, FOLD_SCALE, NATURAL, False,
    )

    empty = l_i == 0.0
    if NAN_ON_EMPTY:
        # eager softmax over a row of -inf gives NaN; reproduce it when asked to.
        l_safe = tl.where(empty, float("nan"), l_i)
    else:
        # SDPA's convention: a row with no visible key outputs zeros.
        l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if TMA:
        O.store([off_b, off_h, start_m, 0], out.to(O.dtype).reshape(1, 1, BLOCK_M, BLOCK_DV))
    else:
        o_ptrs = o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V))
    if STORE_LSE:
        # natural-log LSE; -inf for rows with no visible key
        log2_l = tl.math.log2(tl.where(empty, 1.0, l_i))
        if NATURAL:
            lse = tl.where(empty, float("-inf"), m_i + log2_l * LN2)
        else:
            lse = tl.where(empty, float("-inf"), (m_i + log2_l) * LN2)
        l_ptrs = LSE + off_b64 * stride_lb + off_h.to(tl.int64) * stride_lh + offs_m
        tl.store(l_ptrs, lse, mask=offs_m < L)


# Interpreter: small tiles keep it fast and make the tests cross several tiles and mask edges.
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner on GPUs.
# Not (128, 32, 4, 3): with triton 3.6 on an H200 it faults with an illegal memory access on a
# bool-mask call (B32 H32 N512 D64, an (N, N) mask broadcast over batch and heads), which made
# the autotuner, and so the first such call, crash; found by the benchmark matrix, then each
# config run alone in its own process with CUDA_LAUNCH_BLOCKING=1: only this one faults.
_GPU_CONFIGS = [
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2),
    (64, 64, 4, 3), (64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2), (64, 128, 4, 2),
    (128, 128, 8, 2), (128, 64, 8, 4),
]


# Mask tiles read through a descriptor need key tiles at least 64 wide: on the H100 (triton
# 3.6) the (64, 32, 4 warps, 2 stages) tile with a descriptor-read bf16 bias faults at hd256
# ("misaligned address" at N = 8192, illegal memory accesses at 12k and 16k; the same tile on
# the pointer path, and (32, 32) and (64, 64) tiles with the descriptor, ran clean; each run
# alone with CUDA_LAUNCH_BLOCKING=1). Narrow key tiles have faulted before (see _GPU_CONFIGS).
MASK_TMA_MIN_BLOCK_N = 64


# Rows of at least this many keys are tuned apart from shorter ones: a tile chosen at N = 512
# (the first call of the benchmark matrix) and kept for every length ran hd128 N = 4096 at
# 465-470 TFLOP/s where the default (128, 64, 8 warps, 3 stages) tile ran 490 (H100, CUDA
# graphs). Two classes cost one more tuning run per kernel variant, not one per length.
LONG_ROWS = 2048


def _prune_configs(configs, named_args, **kwargs):
    """Drop tile shapes whose K/V stages would not fit in shared memory (about 227 KiB on
    Hopper, 100 KiB on consumer parts; keep a margin) before the autotuner compiles them."""
    args = {**named_args, **kwargs}
    elem = _dtype_of(args["Q"]).itemsize
    d, dv = args["BLOCK_D"], args["BLOCK_DV"]
    # the copy engine's tiles need no staging registers, so deeper or wider stages fit there
    smem_limit = (200 if args.get("TMA") or args.get("MASK_TMA") else 160) * 1024
    # mask tiles copied ahead by the copy engine: one buffer per stage in flight
    mask_elem = _dtype_of(args["MASK"]).itemsize if args.get("MASK_TMA") else 0

    def smem(c):
        m, n, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
        return elem * (m * d + st * n * (d + dv)) + mask_elem * (st - 1) * m * n

    if args.get("MASK_TMA"):
        configs = [c for c in configs if c.kwargs["BLOCK_N"] >= MASK_TMA_MIN_BLOCK_N]
    kept = [
        c for c in configs
        if smem(c) <= smem_limit
        # fp32 accumulator registers per thread; past ~128 the kernel spills
        and c.kwargs["BLOCK_M"] * dv // (c.num_warps * 32) <= 128
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _default_gpu_config(head_dim_pad: int, dtype: torch.dtype) -> dict:
    wide = dtype == torch.float32
    if head_dim_pad <= 64:
        m, n, w, st = (64, 64, 4, 3) if wide else (128, 64, 4, 3)
    elif head_dim_pad <= 128:
        m, n, w, st = (64, 32, 4, 2) if wide else (128, 64, 8, 3)
    else:
        m, n, w, st = (32, 32, 4, 2) if wide else (64, 32, 4, 2)
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)


def _dtype_of(x) -> torch.dtype:
    return x.base.dtype if isinstance(x, TensorDescriptor) else x.dtype


def set_descriptor_blocks(nargs, tiles: dict) -> None:
    """Give the tensor descriptors among a launch's arguments the tile shapes of the config
    about to run (the autotuner calls this before each config; fixed configs call it once).
    ``tiles`` maps an argument name to the meta-parameter names of its (rows, columns); an
    argument passed as a plain tensor is left alone."""
    for name, (rows, cols) in tiles.items():
        arg = nargs.get(name)
        if TensorDescriptor is not None and isinstance(arg, TensorDescriptor):
            arg.block_shape = [1, 1, nargs[rows], nargs[cols]]


_FORWARD_TILES = {"Q": ("BLOCK_M", "BLOCK_D"), "K": ("BLOCK_N", "BLOCK_D"),
                  "V": ("BLOCK_N", "BLOCK_DV"), "O": ("BLOCK_M", "BLOCK_DV"),
                  "MASK": ("BLOCK_M", "BLOCK_N")}


def _set_descriptor_blocks(nargs) -> None:
    """The forward's pre-hook: see ``set_descriptor_blocks``."""
    set_descriptor_blocks(nargs, _FORWARD_TILES)


# Below this much work (B·Hq·L·S·max(D, Dv)) a call's kernels take less GPU time than the host
# spends launching them, so the work the copy engine saves the GPU is not what the call waits
# for, while handing tensor descriptors to Triton's launcher costs host time on every call:
# H100 host, eager forward + backward, tiny to N = 1024 shapes, defaults against every
# descriptor path off (two alternating rounds): host time per call 0.58-0.66 ms against
# 0.48-0.50 ms (BENCHMARKS.md, session 15). Calls this small take pointer loads by default.
# 2**30 stays far below the smallest shapes where the kernels measured longer than the host
# (B32 H16 N512 D128, 2**34: 1.0-1.6 ms of kernels against ~0.6 ms of host time).
HOST_BOUND_WORK = 1 << 30
HOST_BOUND_REFUSAL = ("a host-bound call (B·Hq·L·S·D under "
                      f"2**{HOST_BOUND_WORK.bit_length() - 1})")


def host_bound(shape: AttentionShape) -> bool:
    """Whether a call is small enough that its host time, not its kernels, sets its speed
    (``HOST_BOUND_WORK``); the descriptor paths are then not taken unless forced."""
    work = (shape.batch * shape.q_heads * shape.q_len * shape.kv_len
            * max(shape.head_dim, shape.v_head_dim))
    return work < HOST_BOUND_WORK


def _descriptors_wanted(q: torch.Tensor, variable: str, measured_faster: bool) -> bool:
    """The gate both descriptor paths share: ``variable`` =0 turns the path off, =1 forces it
    (also under the interpreter, where it is otherwise off); on a GPU it needs compute
    capability 9+ and is taken where measured faster. Half-precision inputs only: fp32 keeps
    exact ("ieee") FMA products, which are not the wgmma operands the Hopper pipeliner and the
    copy engine serve."""
    setting = os.environ.get(variable, "")
    if setting == "0" or TensorDescriptor is None or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if interpreter_active():
        return setting == "1"
    return q.is_cuda and _capability(q.device) >= 9 and (measured_faster or setting == "1")


def use_tma(*tensors: torch.Tensor, head_dims: tuple[int, int], block_dims: tuple[int, int],
            skips_tiles: bool, masked: bool = False, small: bool = False) -> bool:
    """Whether the forward reads Q/K/V and writes O through tensor descriptors (the Hopper copy
    engine). Needs compute capability 9+, fp16/bf16, the hardware's layout rules (base and
    every stride but the last 16-byte aligned, the last dimension contiguous, no broadcast
    stride) and head dims that are whole tiles (the pointer path masks a 96-wide head in a
    128-wide tile instead). Chosen by measurement (triton 3.6, kernel time through CUDA
    graphs): 4-15% faster for causal and windowed attention (``skips_tiles``) at every head dim
    and length (H200); with an attn_mask (``masked``) 6-13% faster at hd128 and 1.1-1.3x at
    hd256 (H100, N = 4096, bool and float masks); head dims over 128 1.28-1.36x faster with no
    mask at all (H100, N = 1k-16k); only hd <= 128 without masks or tile skipping is 2-7%
    slower at N >= 4k (H200), so there it is not used; nor for ``small`` (``host_bound``)
    calls. SDPA_PASS_TMA=1 forces it (also under the interpreter, which is how the CPU tests
    run this path), =0 turns it off."""
    return (head_dims == block_dims and _descriptors_wanted(
        tensors[0], "SDPA_PASS_TMA", (skips_tiles or masked or block_dims[0] > 128) and not small)
        and descriptor_layout_ok(*tensors))


def descriptor_layout_ok(*tensors: torch.Tensor) -> bool:
    """The copy engine's layout rules: base and every stride but the last 16-byte aligned,
    the last dimension contiguous, no broadcast (stride 0) dimension."""
    for t in tensors:
        elem = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1:
            return False
        if any(size > 1 and (stride == 0 or stride * elem % 16)
               for size, stride in zip(t.shape[:-1], t.stride()[:-1])):
            return False
    return True


def use_mask_tma(q: torch.Tensor, mask: torch.Tensor, small: bool = False) -> bool:
    """Whether the forward reads attn_mask (the (B, Hq, L, S) broadcast view of launch_params)
    through a tensor descriptor, so its tiles are copied ahead like K and V (see
    ``_attend_tiles``). Needs compute capability 9+, fp16/bf16 inputs, rows and keys of its
    own (a padding mask broadcast over rows stays on the pointer path: one row read per tile
    is cheap), the last dim contiguous, base and strides 16-byte aligned, elements of 1, 2 or
    4 bytes. Broadcast
    batch and head dims become dims of size 1 of the descriptor. Not for ``small``
    (``host_bound``) calls unless forced: SDPA_PASS_MASK_TMA=1 forces it where the layout
    allows (also under the interpreter, which is how the CPU tests run it), =0 turns it off."""
    if not _descriptors_wanted(q, "SDPA_PASS_MASK_TMA", measured_faster=not small):
        return False
    _, _, rows, keys = mask.shape
    stride_b, stride_h, stride_m, stride_n = mask.stride()
    elem = mask.element_size()
    return (elem in (1, 2, 4) and rows > 1 and keys > 1 and stride_n == 1 and stride_m != 0
            and mask.data_ptr() % 16 == 0
            and all(stride * elem % 16 == 0 for stride in (stride_b, stride_h, stride_m)))


def _mask_descriptor(mask: torch.Tensor) -> TensorDescriptor:
    """A descriptor of the mask's own dims: a broadcast (stride 0) batch or head dim becomes a
    dim of size 1, which the kernel indexes at 0. Bool masks are read as bytes."""
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    unit = 16 // mask.element_size()
    shape, strides = [], []
    for size, stride in zip(mask.shape[:2], mask.stride()[:2]):
        shape.append(size if stride else 1)
        strides.append(stride if stride and size > 1 else unit)
    shape += list(mask.shape[2:])
    strides += list(mask.stride()[2:])
    return TensorDescriptor(mask, shape, strides, [1, 1, 1, 1])


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def mask_argument(descriptor: bool, mask: torch.Tensor) -> torch.Tensor:
    """A kernel's mask tensor on a call that reuses a plan: a bool mask read through a
    descriptor is read as bytes (``_mask_descriptor``), the view the plan's descriptor was
    made around; else the mask itself, whose (B, Hq, L, S) broadcast view the kernel reads
    starts at the same address."""
    return mask.view(torch.uint8) if descriptor and mask.dtype == torch.bool else mask


def _descriptor(t: torch.Tensor) -> TensorDescriptor:
    # size-1 dimensions may carry any stride (torch does not normalise them); the copy engine
    # still wants 16-byte multiples there
    unit = 16 // t.element_size()
    strides = [s if n > 1 else unit for n, s in zip(t.shape[:-1], t.stride()[:-1])] + [1]
    return TensorDescriptor(t, list(t.shape), strides, [1] * t.dim())


_attention_fwd_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st,
                           pre_hook=_set_descriptor_blocks)
             for m, n, w, st in _GPU_CONFIGS],
    key=["HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "HAS_KPM", "IS_CAUSAL", "HAS_WINDOW",
         "HAS_SOFTCAP", "STORE_LSE", "DROPOUT", "TMA", "MASK_TMA", "FOLD_SCALE", "NATURAL",
         "REVERSE", "PIPELINE", "KEY_SPAN", "len_class"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attention_fwd_kernel)


# SDPA_PASS_FWD_PIPELINE=1 (the pipelined interior loop, _attend_tiles) compiles for GPUs from
# this Triton on: Triton 3.6's ptxas dies (SIGSEGV) compiling it for sm_90a without a mask at
# head dim 32 (tests/test_fwd_pipeline.py's plain, causal and LSE cases on an H100, session 20;
# its masked, windowed, soft-capped, dropout and descriptor cases compiled). Triton 3.9 (its
# ptxas 12.9) compiles those same launches for sm_90a (`benchmarks/sm90_compile.py --mask none
# --pipeline --head-dim 32 [--causal] --tile 128,64,4,3`: the fp16 default tile, no spill);
# 3.7 and 3.8 are untried.
PIPELINE_MIN_TRITON = (3, 7)


def pipeline_supported(version: str = triton.__version__, interpreting: bool | None = None) -> bool:
    """Whether the pipelined interior loop can be compiled here (the interpreter runs it
    whatever the version)."""
    if interpreter_active() if interpreting is None else interpreting:
        return True
    return tuple(int(part) for part in version.split(".")[:2]) >= PIPELINE_MIN_TRITON


def pipeline_requested() -> bool:
    """SDPA_PASS_FWD_PIPELINE=1 where the loop compiles; where it does not, a warning and the
    plain loop rather than a compiler crash."""
    if os.environ.get("SDPA_PASS_FWD_PIPELINE") != "1":
        return False
    if pipeline_supported():
        return True
    warnings.warn(
        f"SDPA_PASS_FWD_PIPELINE=1 is ignored with triton {triton.__version__}: its ptxas "
        "crashes compiling the pipelined loop; it needs triton >= "
        f"{'.'.join(map(str, PIPELINE_MIN_TRITON))}", stacklevel=3)
    return False


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host code: in triton 3.9 that is a constexpr_function
    whose call wrapper costs ~15 us of host time per call, on every attention call."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(x: int, y: int) -> int:
    """``triton.cdiv`` for host code (the same formula): in triton 3.6 and 3.9 that is a
    constexpr_function too, ~3 us a call on a fast CPU, called 6-7 times by every decode call
    (and by the forward's check for the decode kernel)."""
    return (x + y - 1) // y


class TunedKernel:
    """An autotuned kernel whose choice is remembered per key, so a call after the first
    launches the plain JIT kernel with the chosen config. Triton's ``Autotuner.run`` rebuilds
    its key on every call with a list-membership scan over every argument name (60+ here):
    ~40 us of host time per launch, which dominates short decode and prefill calls. ``key``
    must determine what the autotuner's own key does (its key arguments and the dtypes)."""

    def __init__(self, autotuned, kernel, pre_hook=None):
        self.autotuned, self.kernel, self.pre_hook = autotuned, kernel, pre_hook
        self.chosen: dict = {}

    def launch(self, key, grid, *args, **kwargs) -> tuple:
        """Launches; returns (the compiled kernel that ran, its config's keyword arguments)."""
        config = self.chosen.get(key)
        if config is None:
            compiled = self.autotuned[grid](*args, **kwargs)  # tunes on its first call for this key
            self.chosen[key] = config = self.autotuned.best_config.all_kwargs()
            return compiled, config
        if self.pre_hook is not None:
            self.pre_hook({**kwargs, **config, **dict(zip(self.kernel.arg_names, args))})
        return self.kernel[grid](*args, **kwargs, **config), config


_FORWARD = TunedKernel(_attention_fwd_autotuned, _attention_fwd_kernel, _set_descriptor_blocks)


def score_scales(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, softcap_log2): the scale into log2 units, or into tanh's argument with
    soft-capping, whose cap then carries the log2 factor."""
    if softcap > 0.0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0


class LaunchParams(NamedTuple):
    """Host-side kernel arguments every attention kernel derives the same way from a call."""

    mask_kind: int
    mask: torch.Tensor           # attn_mask as a (B, Hq, L, S) view, or q as a dummy pointer
    mask_strides: tuple
    kpm: torch.Tensor            # key_padding_mask, or q as a dummy pointer
    kpm_strides: tuple
    qk_scale: float              # scale into log2 units (or into tanh's argument with softcap)
    softcap_log2: float
    block_d: int
    block_dv: int


def launch_params(q, attn_mask, key_padding_mask, shape: AttentionShape, scale: float,
                  softcap: float) -> LaunchParams:
    if attn_mask is None:
        mask_kind, mask, mstrides = MASK_NONE, q, (0, 0, 0, 0)
    else:
        mask_kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_FLOAT
        # expand() is a view: broadcast dims get stride 0 and are never materialised.
        mask = attn_mask.expand(shape.batch, shape.q_heads, shape.q_len, shape.kv_len)
        mstrides = mask.stride()
    kpm = key_padding_mask if key_padding_mask is not None else q
    pstrides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    qk_scale, softcap_log2 = score_scales(scale, softcap)
    block_dv = max(16, next_pow2(shape.v_head_dim))
    if q.dtype in (torch.float16, torch.bfloat16) and not interpreter_active():
        # Triton 3.6 on the H100 (tensor-core products) miscompiles value tiles narrower than
        # 64 when the head dim is not a multiple of 16 (24, 40, 56 with value head dims 8 or
        # 24: wrong outputs, NaN, illegal memory accesses; found by the GPU fuzzer, then probed
        # over head dims 8-96 x value head dims 8-40, forward, backward and decode). 64 wide
        # tiles were right on every shape probed; the extra columns are masked loads of zeros.
        # tests/test_backward.py test_narrow_value_heads_with_odd_head_dims keeps the shapes.
        block_dv = max(64, block_dv)
    return LaunchParams(mask_kind, mask, mstrides, kpm, pstrides, qk_scale, softcap_log2,
                        max(16, next_pow2(shape.head_dim)), block_dv)


def attention_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    shape: AttentionShape,
    *,
    scale: float,
    causal_align: int,
    diagonal: int,
    window: int,
    softcap: float,
    nan_on_empty: bool,
    return_lse: bool,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, L, S = shape.batch, shape.q_heads, shape.q_len, shape.kv_len
    D, DV = shape.head_dim, shape.v_head_dim
    out = torch.empty((B, Hq, L, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L) if return_lse else (0,), dtype=torch.float32, device=q.device)
    if L == 0 or B * Hq == 0:
        return out, lse
    if S == 0:
        out.fill_(float("nan") if nan_on_empty else 0.0)
        lse.fill_(float("-inf"))
        return out, lse

    dropout = dropout_p > 0.0
    plan_key = call_key(tensor_key(q), tensor_key(k), tensor_key(v), tensor_key(attn_mask),
                        tensor_key(key_padding_mask), tensor_key(dropout_seed) if dropout else None,
                        out.data_ptr() % 16 == 0, causal_align, diagonal, window, softcap > 0.0,
                        scale > 0.0, nan_on_empty, return_lse, dropout)
    if plan_key is not None:
        plan = _FORWARD_PLANS.get(plan_key)
        if plan is not None:
            plan(q, k, v, out, lse, attn_mask, key_padding_mask, dropout_seed, scale, softcap,
                 dropout_p)
            return out, lse

    small = host_bound(shape)
    mask_kind, mask, mstrides, kpm, pstrides, qk_scale, softcap_log2, block_d, block_dv = (
        launch_params(q, attn_mask, key_padding_mask, shape, scale, softcap))
    kernel_mask = mask_kind_of(mask_kind, mstrides, L)
    span = key_span(kernel_mask == MASK_BOOL_ROW, key_padding_mask is not None)
    padding = padding_flags(kernel_mask == MASK_BOOL_ROW, key_padding_mask is not None, span)
    # an attn_mask with rows of its own: the Gluon forward reads bool ones and 16-bit float
    # biases in tiles
    tiled = mask_kind != MASK_NONE and kernel_mask != MASK_BOOL_ROW
    refusal = HOST_BOUND_REFUSAL if small else gluon_forward_refusal(
        q, k, v, shape, scale=scale,
        masked=tiled and tile_mask_refusal(mask, BIAS_HEAD_DIMS, D), padding=padding,
        causal_align=causal_align, diagonal=diagonal, window=window,
        softcap=softcap, dropout_p=dropout_p,
        capability=_capability(q.device) if q.is_cuda else None, tiled=tiled)
    log_kernel_choice("forward", shape, q.dtype, kernel_choice(refusal))
    if refusal is None:
        gluon = _GluonPlan(shape, return_lse, causal_align, diagonal, plan_key, padding,
                           pstrides if key_padding_mask is not None else (0, 0), mstrides,
                           nan_on_empty, (TILE_BIAS if mask_kind == MASK_FLOAT else TILE_BOOL)
                           if tiled else 0, window)
        gluon(q, k, v, out, lse, attn_mask, key_padding_mask, dropout_seed, scale, softcap,
              dropout_p)
        if plan_key is not None:
            _FORWARD_PLANS.add(plan_key, gluon)
        return out, lse

    lstrides = lse.stride()[:2] if return_lse else (0, 0)
    has_softcap = softcap > 0.0
    # The interpreter's tl.dot gives wrong results on bf16 operands (triton 3.9); upcasting to
    # fp32 there is exact. Compiled kernels keep bf16 operands with fp32 accumulation.
    dot_upcast = interpreter_active() and q.dtype == torch.bfloat16
    # fp32 inputs: full-precision products (SDPA's math on fp32 does not use TF32 either).
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = lambda meta: (cdiv(L, meta["BLOCK_M"]), *split_rows(B * Hq))  # noqa: E731
    tma = use_tma(q, k, v, out, head_dims=(D, DV), block_dims=(block_d, block_dv),
                  skips_tiles=causal_align != CAUSAL_NONE or window != -1,
                  masked=mask_kind != MASK_NONE, small=small)
    operands = (q, k, v, out)
    if tma:
        operands = tuple(_descriptor(t) for t in operands)
    # hd > 128 with K/V through descriptors: a float mask read through pointers measured 1.2x
    # faster than through a descriptor (H100, N = 4096; the descriptor's 64-wide key tiles,
    # MASK_TMA_MIN_BLOCK_N, are slow at hd256), a bool mask 1.5x slower, so only bool there
    mask_tma = (mask_kind != MASK_NONE and use_mask_tma(q, mask, small)
                and not (tma and mask_kind == MASK_FLOAT and block_d > 128))
    natural = mask_kind == MASK_FLOAT and not has_softcap  # see _attend_tiles
    len_class = int(S >= LONG_ROWS)  # tuned apart, see LONG_ROWS
    args = (
        *operands, lse, _mask_descriptor(mask) if mask_tma else mask, kpm,
        dropout_seed if dropout else q,
        scale if natural else qk_scale, softcap_log2, dropout_p, keep_scale(dropout_p),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *mstrides, *pstrides, *lstrides,
        Hq, L, S, shape.group,
        causal_offset(causal_align, diagonal, L, S), window, len_class,
    )
    meta = dict(
        HEAD_DIM=D, HEAD_DIM_V=DV, BLOCK_D=block_d, BLOCK_DV=block_dv,
        MASK_KIND=kernel_mask, HAS_KPM=key_padding_mask is not None,
        IS_CAUSAL=causal_align != CAUSAL_NONE, HAS_WINDOW=window != -1,
        HAS_SOFTCAP=has_softcap, NAN_ON_EMPTY=nan_on_empty, STORE_LSE=return_lse, DROPOUT=dropout,
        DOT_UPCAST=dot_upcast, DOT_PRECISION=dot_precision,
        # positive scale, nothing added to the scores: see _attend_tiles
        TMA=tma, MASK_TMA=mask_tma, FOLD_SCALE=qk_scale > 0.0 and mask_kind != MASK_FLOAT and not has_softcap,
        NATURAL=natural,
        REVERSE=causal_align != CAUSAL_NONE,
        PIPELINE=pipeline_requested(),  # see _attend_tiles
        # H100, hd128, (1, H, N, N) bf16 ALiBi bias, B = 16 / 4 / 2 at N = 1k / 4k / 8k: 1.05x /
        # 1.05x / 1.02x (kernel time); in the matrix (every peer, N = 512-8k) hd64 1.03-1.14x,
        # hd256 (its float mask through pointers) 0.97-0.98x; a random (N, N) bool mask (16 MB
        # at 4k, in L2 either way) 0.97x at 4k (BENCHMARKS.md, session 13). So float masks at
        # head dims up to 128.
        BATCH_INNER=batch_inner(mask_kind, mstrides, B,
                                measured_faster=mask_kind == MASK_FLOAT and block_d <= 128),
        KEY_SPAN=span,
    )
    if interpreter_active() or os.environ.get("SDPA_PASS_AUTOTUNE", "1") == "0":
        # Fixed tiles, no tuning runs: small ones in the interpreter, the defaults on a GPU
        # (SDPA_PASS_AUTOTUNE=0, for test suites that compile many variants).
        tuning = (_INTERPRETER_CONFIG if interpreter_active()
                  else _default_gpu_config(max(block_d, block_dv), q.dtype))
        if mask_tma and not interpreter_active():
            tuning = dict(tuning, BLOCK_N=max(tuning["BLOCK_N"], MASK_TMA_MIN_BLOCK_N))
        if tma or mask_tma:
            _set_descriptor_blocks({**dict(zip(_attention_fwd_kernel.arg_names, args)), **meta, **tuning})
        compiled, config = _attention_fwd_kernel[grid](*args, **meta, **tuning), tuning
    else:
        key = (*meta.values(), q.dtype, mask.dtype, kpm.dtype, len_class)
        compiled, config = _FORWARD.launch(key, grid, *args, **meta)
    if plan_key is not None:
        call = KernelCall(_attention_fwd_kernel, compiled, grid(config), args,
                          {**meta, **config})
        _FORWARD_PLANS.add(plan_key, _ForwardPlan(call, args, natural, dropout, mask_tma))
    return out, lse


# Launch plans of the forward kernel (kernels/launch.py).
_FORWARD_PLANS = PlanCache()


class _GluonPlan:
    """A forward the Gluon kernel serves, for the next calls with the same plan key, which
    fixes everything ``gluon_forward_refusal`` reads (layouts, dtype, device, the masks'
    kinds and layouts, causal form, window, soft-capping, dropout, the sign of the scale, the
    variables of launch.py's _VARIABLES) and the shape ``host_bound`` reads; the Gluon
    kernel's compiled launch is remembered under the same key."""

    def __init__(self, shape: AttentionShape, return_lse: bool, causal_align: int,
                 diagonal: int, plan_key, padding: int, kpm_strides: tuple, mask_strides: tuple,
                 nan_on_empty: bool, mask_tile: int, window: int):
        self.shape, self.return_lse, self.window = shape, return_lse, window
        self.causal_align, self.diagonal, self.plan_key = causal_align, diagonal, plan_key
        self.padding, self.kpm_strides, self.mask_strides = padding, kpm_strides, mask_strides
        self.nan_on_empty, self.mask_tile = nan_on_empty, mask_tile

    def __call__(self, q, k, v, out, lse, attn_mask, kpm, seed, scale, softcap, dropout_p):
        spans = None
        if self.padding:
            spans = padding_spans(kpm, self.kpm_strides,
                                  None if self.mask_tile else attn_mask, self.mask_strides,
                                  self.shape.batch, self.shape.q_heads, self.shape.kv_len,
                                  self.padding, self.plan_key and (self.plan_key, "spans"))
        attention_forward_gluon(q, k, v, out, lse, self.shape, scale, self.return_lse,
                                self.causal_align, self.diagonal, self.plan_key, self.padding,
                                kpm, self.kpm_strides, attn_mask, self.mask_strides,
                                self.nan_on_empty, spans, self.mask_tile, self.window, softcap)


class _ForwardPlan:
    """A forward launch as ``attention_forward_triton`` decided it, for the next calls with
    the same plan key: only the tensors and the float arguments change (``KernelCall`` makes
    the tensor descriptors)."""

    # Argument positions of the forward kernel: Q, K, V, O, LSE, MASK, KPM, SEED, then four
    # floats, then integers only (strides, sizes, offsets), which the plan key fixes.
    LEADING = 8 + 4

    def __init__(self, call: KernelCall, args: tuple, natural: bool, dropout: bool,
                 mask_tma: bool):
        self.call, self.natural, self.dropout, self.mask_tma = call, natural, dropout, mask_tma
        self.ints = args[self.LEADING:]

    def __call__(self, q, k, v, out, lse, attn_mask, kpm, seed, scale, softcap, dropout_p):
        mask = q if attn_mask is None else mask_argument(self.mask_tma, attn_mask)
        qk_scale, softcap_log2 = score_scales(scale, softcap)
        self.call((q, k, v, out, lse, mask, q if kpm is None else kpm, seed if self.dropout else q,
                   scale if self.natural else qk_scale, softcap_log2, dropout_p,
                   keep_scale(dropout_p), *self.ints))
