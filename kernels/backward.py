"""Backward attention kernels in Triton (FlashAttention-2 style), from the forward's LSE.

Two kernels after a prep kernel:
- dK/dV: one program per key tile of one K/V head. It walks the query tiles that can see its
  keys, for every query head of its GQA group, so the group's dK/dV are summed in registers:
  no atomics for them, no repeated K/V, and a deterministic order.
- dQ: one program per query tile of one query head, walking the key tiles it can see (and,
  when a float mask needs its gradient, writing dS so the caller reduces it to the mask's
  broadcast shape).
Or, when asked (``dq_by_atomics``, SDPA_PASS_BWD_DQ=atomic; it measured slower everywhere
since sessions 12 and 13), the dK/dV kernel alone: it also adds each key tile's dS·K into an
fp32 dQ buffer (on Hopper the copy engine's reduce-add), which saves the dQ kernel's
recomputation of S and dP (5 matrix products per tile pair, not 7) at the price of a
summation order that varies between runs; deterministic mode keeps the split.
A prep kernel first forms delta_i = rowsum(dO_i * O_i) and each row's softmax statistics as
two fp32 numbers, an offset m and the rest r (log2 units, P = exp2(S - m - r)): m = LSE and
r = 0, except on rows whose every score is far below zero (a finite fill such as -1e9 or
finfo.min everywhere), where the LSE's fp32 rounding loses log(n) and the prep kernel takes the
row's max and log-sum from one more pass over its keys. All of this stays on the device: the
backward decides nothing from GPU values on the host, so it can be captured in a CUDA graph.
On Hopper without a mask the dK/dV kernel (head dims 64 and 128) and the dQ kernel (128) are
the Gluon ones of gluon_backward.py (``gluon_backward_refusal`` and ``gluon_dq_refusal`` say
where), on the same row statistics.
Both kernels recompute P tile by tile; no L×S matrix is saved. As in the forward, the
tile loops are split so only tiles on the causal diagonal, a window edge or the sequence end
evaluate the positional predicate. On GPUs the tile shapes are autotuned per kernel. Masks, causal offsets,
windows, key padding and soft-capping come from the forward's ``masked_scores``, so they mean
exactly what they mean there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._prims_common import make_contiguous_strides_for as contiguous_strides

from .checks import CAUSAL_NONE, AttentionShape, causal_offset
from .cpu import FILL_THRESHOLD
from .dropout import dropout_keep, keep_scale, load_seed
from .forward import (LOG2E_C, MASK_BOOL_ROW, MASK_FLOAT, MASK_NONE, LaunchParams, TunedKernel, _capability,
                      _descriptor, _descriptors_wanted, _dtype_of, _mask_descriptor, batch_inner,
                      descriptor_layout_ok, host_bound, interpreter_active, key_ranges, launch_params,
                      key_span, mask_kind_of, padding_spans, tile_sees_a_key, visible_key_ranges,
                      load_mask_tile, mask_origin, masked_scores, grid_row, program_tile, scores_with_mask_tile,
                      mask_argument, score_scales, set_descriptor_blocks, use_mask_tma,
                      LONG_ROWS, MASK_TMA_MIN_BLOCK_N, _mask_tile)
from .gluon_backward import (attention_dkdv_gluon, attention_dq_gluon, bias_head_dims,
                             fused_dq, gluon_backward_refusal, gluon_dq_refusal)
from .gluon_forward import (TILE_BIAS, TILE_BOOL, gluon_score_scales, padding_flags,
                            tile_mask_refusal)
from .launch import (PlanCache, call_key, kernel_choice, launch_fixed, launch_remembered,
                     log_kernel_choice, split_rows, tensor_key)

# Natural-log LSE below which a row's statistics are recomputed (see the module docstring).
# At lse >= -100 the fp32 rounding of lse costs under 1e-5 relative in P, as for any row.
LSE_PRECISE_ABOVE: tl.constexpr = tl.constexpr(-100.0)
FILL_THRESHOLD_C: tl.constexpr = tl.constexpr(FILL_THRESHOLD)


@triton.jit
def _unfilled(ds, mask_tile, FILLS: tl.constexpr):
    """dS with 0 where a mask_fills float mask replaced the score (value <= FILL_THRESHOLD):
    eager's masked_fill passes nothing back there. Matters only on rows filled everywhere,
    where P is not 0 at the filled keys. ``mask_tile``: the tile's mask values as loaded."""
    if FILLS:
        ds = tl.where(mask_tile.to(tl.float32) <= FILL_THRESHOLD_C, 0.0, ds)
    return ds


@triton.jit
def _p_from_scores(s, m, r, NATURAL: tl.constexpr):
    """P = exp2(S - m - r) from scores and row statistics in log2 units; NATURAL (a float mask
    without soft-capping, as in the forward's ``_attend_tiles``): S and m in natural-log units,
    S = qk·scale + bias as eager adds them, moved to log2 units after m is subtracted. A bias
    then costs one add per score, where log2 units need a clamp, a compare, a select and a
    multiply (finfo.min · log2(e) overflows to -inf)."""
    if NATURAL:
        return tl.math.exp2((s - m) * LOG2E_C - r)
    return tl.math.exp2((s - m) - r)


@triton.jit(do_not_specialize=["H", "L", "S", "GROUP", "offset", "window"])
def _bwd_prep_kernel(
    Q, K, O, DO, LSE, GRAD_LSE, MASK, KPM, DELTA, ROW_M, ROW_R, DQ_SUMS,
    qk_scale, softcap_log2,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_lb, stride_lh, stride_lm,
    stride_gb, stride_gh, stride_gm,
    stride_rb, stride_rh,
    H, L, LP, S, GROUP, offset, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, NATURAL: tl.constexpr,
    ZERO_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per query row: delta = rowsum(dO * O) - grad_lse, and the statistics (m, r) the dK/dV and
    dQ kernels compute P from; rows with no visible key get delta 0 and m = +inf (P = 0).
    Rows L..LP (padding to whole tiles, which the dK/dV kernel then loads unmasked) are
    written as such rows. NATURAL: m in natural-log units, as the scores are
    (``_p_from_scores``). ZERO_DQ: also zero these rows of the fp32 dQ sums, contiguous
    (B, H, L, HEAD_DIM), that the dK/dV kernel adds into (FlashAttention-3's preprocess
    does the same: no memset launch of its own)."""
    pid_m = tl.program_id(0)
    pid_bh = grid_row()
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_in = offs_m < L
    if ZERO_DQ:
        offs_z = tl.arange(0, BLOCK_D)
        tl.store(DQ_SUMS + (off_b * H + off_h) * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM
                 + offs_z[None, :], tl.zeros((BLOCK_M, BLOCK_D), tl.float32),
                 mask=rows_in[:, None] & (offs_z[None, :] < HEAD_DIM))
    tile = rows_in[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_dv[None, :] * stride_od, mask=tile, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=tile, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_GRAD_LSE:
        delta -= tl.load(GRAD_LSE + off_b * stride_gb + off_h * stride_gh + offs_m * stride_gm,
                         mask=rows_in, other=0.0).to(tl.float32)
    lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm,
                  mask=rows_in, other=float("-inf"))
    # rows with no visible key (and the padding past L): the output may be NaN (eager's
    # softmax over nothing), which must not reach dS as 0 * NaN
    empty = lse == float("-inf")
    delta = tl.where(empty, 0.0, delta)
    row_m = tl.where(empty, float("inf"), lse if NATURAL else lse * LOG2E_C)
    row_r = tl.zeros((BLOCK_M,), tl.float32)
    imprecise = (lse < LSE_PRECISE_ABOVE) & (lse != float("-inf"))
    if tl.sum(imprecise.to(tl.int32), 0) > 0:
        # one more pass over the keys of these rows: the max and the log-sum apart
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd,
                    mask=rows_in[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if DOT_UPCAST:
            q = q.to(tl.float32)
        k_base = K + off_b * stride_kb + (off_h // GROUP) * stride_kh
        mask_base = MASK + off_b * stride_mb + off_h * stride_mh
        kpm_base = KPM + off_b * stride_pb
        to_log2 = LOG2E_C if NATURAL else 1.0
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        lo, _mid_lo, _mid_hi, hi = key_ranges(start_m, S, offset, window, IS_CAUSAL, HAS_WINDOW,
                                              BLOCK_M, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=(offs_n[None, :] < S) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            if DOT_UPCAST:
                kT = kT.to(tl.float32)
            s, _t = masked_scores(tl.dot(q, kT, input_precision=DOT_PRECISION), offs_m[:, None],
                                  offs_n[None, :], mask_base, kpm_base, stride_mm, stride_mn,
                                  stride_pn, L, S, offset, window, qk_scale, softcap_log2,
                                  MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, True,
                                  NATURAL)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with nothing visible so far stay at -inf; shift them by 0 (no -inf - -inf)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = (l_i * tl.math.exp2((m_i - shift) * to_log2)
                   + tl.sum(tl.math.exp2((s - shift[:, None]) * to_log2), 1))
            m_i = m_new
        row_m = tl.where(imprecise, m_i, row_m)
        row_r = tl.where(imprecise, tl.math.log2(l_i), row_r)
    r_off = off_b * stride_rb + off_h * stride_rh + offs_m
    rows_out = offs_m < LP
    tl.store(DELTA + r_off, delta, mask=rows_out)
    tl.store(ROW_M + r_off, row_m, mask=rows_out)
    tl.store(ROW_R + r_off, row_r, mask=rows_out)


# Elements a program of _dq_from_sums_kernel converts: 32 a thread at 4 warps (8 vector loads)
_DQ_FROM_SUMS_BLOCK = 4096


@triton.jit  # n specialized: its divisibility by 16 is what lets the masked accesses vectorize
def _dq_from_sums_kernel(SUMS, DQ, scale, n, BLOCK: tl.constexpr):
    """dQ = scale * sums, rounded to dQ's dtype; both contiguous with n elements. Hand-written
    because torch.mul with ``out=`` of another dtype takes ATen's unrolled, unvectorized
    loop: H200, 16 x 16 x 1024 x 128 fp32 -> bf16, 0.078 ms (2.6 TB/s) against this pass's
    0.049 (4.1 TB/s of the 6 bytes an element moves; session 31)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    sums = tl.load(SUMS + offs, mask=keep, other=0.0)
    tl.store(DQ + offs, (sums * scale).to(DQ.dtype.element_ty), mask=keep)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, do_base, m_base, r_base, d_base, mask_base, kpm_base, dq_base,
    offs_n, offs_d, offs_dv, lo, hi, qk_scale, softcap_log2,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_pn, stride_am,
    L, S, offset, window, seed0, seed1, bh, dropout_p, dropout_scale, off_b, off_h,
    start_n, mask_b, mask_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    FILLS: tl.constexpr, BOUNDARY: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    TMA: tl.constexpr, DQ_TMA_ADD: tl.constexpr, MASK_TMA: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, NATURAL: tl.constexpr,
    PADDED_ROWS: tl.constexpr,
):
    """dK/dV contributions of query tiles [lo, hi) of one query head to one key tile.

    Works on transposed tiles, K·Qᵀ (keys × queries), as Triton's fused-attention tutorial
    does: Pᵀ and dSᵀ come out of the dots in the layout the dK/dV products take, so nothing
    computed is transposed; only the loaded Q and dO tiles are read transposed.

    DQ_ATOMIC: also add this key tile's share of dQ, dS·K (unscaled, fp32), into the query
    rows' accumulator at dq_base, so no second kernel recomputes S and dP for dQ.
    TMA: q_base / do_base are tensor descriptors of the (B, Hq, L, D) tensors (rows past L
    read as zeros); DQ_TMA_ADD: dq_base is one too, and the copy engine does the adds
    (a reduce-add of the whole tile; rows past L are clipped). MASK_TMA: mask_base is a
    tensor descriptor of attn_mask (broadcast dims of size 1, indexed by mask_b / mask_h), so
    the mask tile is copied ahead like Q and dO instead of a synchronous pointer load (see
    the forward's ``_attend_tiles``). PADDED_ROWS: the row statistics at m_base / r_base /
    d_base are padded to whole tiles (attention_backward_triton), so they load unmasked."""
    if PADDED_ROWS:
        # The loop counts tiles, so the compiler knows each start is a multiple of BLOCK_M and
        # loads the unmasked statistics as vectors ([lo, hi) is empty or lo is such a multiple)
        first = lo // BLOCK_M
        last = tl.where(lo < hi, (hi + BLOCK_M - 1) // BLOCK_M, first)
        step: tl.constexpr = 1
        rows: tl.constexpr = BLOCK_M
    else:
        first = lo
        last = hi
        step: tl.constexpr = BLOCK_M
        rows: tl.constexpr = 1
    for start in range(first, last, step):
        start_m = start * rows
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if TMA:
            qT = tl.trans(q_base.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, BLOCK_D))
            do = do_base.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
        else:
            qT = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                         mask=(offs_m[None, :] < L) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=(offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if DOT_UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        # rows past L, and rows with no visible key (the prep kernel's m), have m = +inf: P = 0
        if PADDED_ROWS:
            # Masked, these loads are issued per thread per column it holds (the scores'
            # column layout): 48 scalar cp.async and their address and predicate arithmetic
            # per step at 64x128, 8 warps, a third of the loop's instructions (triton 3.6)
            row_m = tl.load(m_base + offs_m)
            row_r = tl.load(r_base + offs_m)
            delta = tl.load(d_base + offs_m)
        else:
            row_m = tl.load(m_base + offs_m, mask=offs_m < L, other=float("inf"))
            row_r = tl.load(r_base + offs_m, mask=offs_m < L, other=0.0)
            delta = tl.load(d_base + offs_m, mask=offs_m < L, other=0.0)
        if MASK_TMA:
            mask_tile = tl.trans(mask_base.load([mask_b, mask_h, start_m, start_n])
                                 .reshape(BLOCK_M, BLOCK_N))                    # (N, M)
        elif MASK_KIND != 0:
            mask_tile = load_mask_tile(mask_base, offs_m[None, :], offs_n[:, None],
                                       stride_mm, stride_mn, L, S, MASK_KIND == 3)
        else:
            mask_tile = 0
        sT, tT = scores_with_mask_tile(
            tl.dot(k, qT, input_precision=DOT_PRECISION), offs_m[None, :], offs_n[:, None],
            mask_tile, kpm_base, stride_pn, S, offset, window, qk_scale, softcap_log2,
            MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BOUNDARY, NATURAL)
        pT = _p_from_scores(sT, row_m[None, :], row_r[None, :], NATURAL)  # (N, M)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)     # (N, M)
        if DROPOUT:
            # O = (P * Z) V with Z = keep / (1 - p): dV sees P * Z, dP is Z * dO Vᵀ
            keep = dropout_keep(seed0, seed1, bh, offs_m[None, :], offs_n[:, None], dropout_p)
            dv += tl.dot(tl.where(keep, pT * dropout_scale, 0.0).to(do.dtype), do,
                         input_precision=DOT_PRECISION)
            dpT = tl.where(keep, dpT * dropout_scale, 0.0)
        else:
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dsT = _unfilled(pT * (dpT - delta[None, :]), mask_tile, FILLS)
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dsT = dsT.to(qT.dtype)
        dk += tl.dot(dsT, tl.trans(qT), input_precision=DOT_PRECISION)
        if DQ_ATOMIC:
            # other key tiles add into the same rows; relaxed: only the sum is read, after
            # the kernel ends (Triton's default acq_rel would fence every add)
            dq_part = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION)  # (M, D)
            if DQ_TMA_ADD:
                dq_base.atomic_add([off_b, off_h, start_m, 0],
                                   dq_part.reshape(1, 1, BLOCK_M, BLOCK_D))
            else:
                tl.atomic_add(dq_base + offs_m[:, None] * stride_am + offs_d[None, :], dq_part,
                              mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM),
                              sem="relaxed")
    return dk, dv


# len_class (both kernels): unused by the kernel; in the autotuner's key (see _autotuned).
@triton.jit(do_not_specialize=["HKV", "L", "S", "GROUP", "offset", "window", "len_class"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, ROW_M, ROW_R, DELTA, DK, DV, MASK, KPM, SEED, DQ_ACC,
    qk_scale, softcap_log2, sm_scale, dropout_p, dropout_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_lb, stride_lh,
    stride_ab, stride_ah, stride_am,
    HKV, L, S, GROUP, offset, window, len_class,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    FILLS: tl.constexpr, DQ_ATOMIC: tl.constexpr, TMA: tl.constexpr, DQ_TMA_ADD: tl.constexpr,
    MASK_TMA: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NATURAL: tl.constexpr, PADDED_ROWS: tl.constexpr, BATCH_INNER: tl.constexpr,
    KEY_SPAN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_bh = program_tile(HKV, BATCH_INNER)
    b32 = pid_bh // HKV  # descriptor indices; pointer offsets are 64-bit
    hkv32 = pid_bh % HKV
    off_b = b32.to(tl.int64)
    off_hkv = hkv32.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    if TMA:  # descriptors of the 4-D tensors (see _dkdv_tiles)
        k = K.load([b32, hkv32, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = V.load([b32, hkv32, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if DOT_UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)

    # Query rows that see some key of this tile: i >= j - offset (causal), i < j - offset + window;
    # [mid_lo, mid_hi): query tiles whose every row sees every key of the tile, which skip the
    # positional predicate. A tile reaching past S keeps it everywhere.
    lo = 0
    hi = L
    full_lo = 0
    full_hi = L
    if IS_CAUSAL:
        lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
        full_lo = ((tl.maximum(start_n + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 - offset + window)
        full_hi = (tl.maximum(start_n - offset + window, 0) // BLOCK_M) * BLOCK_M
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), hi)
    if start_n + BLOCK_N > S:
        mid_lo = hi
        mid_hi = hi

    kpm_base = KPM + off_b * stride_pb
    seed0, seed1 = load_seed(SEED, DROPOUT)
    for g in range(0, GROUP):
        # every query head of the GQA group adds into this K/V head's dK/dV, in registers
        off_h = off_hkv * GROUP + g
        h32 = hkv32 * GROUP + g
        bh = off_b * (HKV * GROUP) + off_h  # the forward's batch·query-head index
        if TMA:
            q_base = Q
            do_base = DO
        else:
            q_base = Q + off_b * stride_qb + off_h * stride_qh
            do_base = DO + off_b * stride_dob + off_h * stride_doh
        if DQ_TMA_ADD:
            dq_base = DQ_ACC
        else:
            dq_base = DQ_ACC + off_b * stride_ab + off_h * stride_ah
        mask_base, mask_b, mask_h = mask_origin(MASK, b32, h32, stride_mb, stride_mh, MASK_TMA)
        m_base = ROW_M + off_b * stride_lb + off_h * stride_lh
        r_base = ROW_R + off_b * stride_lb + off_h * stride_lh
        d_base = DELTA + off_b * stride_lb + off_h * stride_lh
        g_mid_lo = mid_lo
        g_mid_hi = mid_hi
        g_hi = hi
        if KEY_SPAN != 0:
            # padding: a key tile the pattern hides in full gets no gradient from this head
            sees = tile_sees_a_key(kpm_base, stride_pn, mask_base, stride_mn, offs_n, S, KEY_SPAN)
            g_mid_lo = tl.where(sees, mid_lo, lo)
            g_mid_hi = tl.where(sees, mid_hi, lo)
            g_hi = tl.where(sees, hi, lo)
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, m_base, r_base, d_base, mask_base, kpm_base, dq_base,
            offs_n, offs_d, offs_dv, lo, g_mid_lo, qk_scale, softcap_log2,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_pn, stride_am,
            L, S, offset, window, seed0, seed1, bh, dropout_p, dropout_scale, b32, h32,
            start_n, mask_b, mask_h,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, DROPOUT, FILLS, True, DQ_ATOMIC, TMA, DQ_TMA_ADD, MASK_TMA, DOT_UPCAST, DOT_PRECISION,
            NATURAL, PADDED_ROWS,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, m_base, r_base, d_base, mask_base, kpm_base, dq_base,
            offs_n, offs_d, offs_dv, g_mid_lo, g_mid_hi, qk_scale, softcap_log2,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_pn, stride_am,
            L, S, offset, window, seed0, seed1, bh, dropout_p, dropout_scale, b32, h32,
            start_n, mask_b, mask_h,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, DROPOUT, FILLS, False, DQ_ATOMIC, TMA, DQ_TMA_ADD, MASK_TMA, DOT_UPCAST, DOT_PRECISION,
            NATURAL, PADDED_ROWS,
        )
        if HAS_WINDOW:  # [mid_hi, hi) is empty without a window
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, q_base, do_base, m_base, r_base, d_base, mask_base, kpm_base, dq_base,
                offs_n, offs_d, offs_dv, g_mid_hi, g_hi, qk_scale, softcap_log2,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_pn, stride_am,
                L, S, offset, window, seed0, seed1, bh, dropout_p, dropout_scale, b32, h32,
                start_n, mask_b, mask_h,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, HAS_KPM,
                IS_CAUSAL, HAS_WINDOW,
                HAS_SOFTCAP, DROPOUT, FILLS, True, DQ_ATOMIC, TMA, DQ_TMA_ADD, MASK_TMA, DOT_UPCAST, DOT_PRECISION,
                NATURAL, PADDED_ROWS,
            )
    dk = dk * sm_scale
    dk_ptrs = DK + off_b * stride_dkb + off_hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + off_b * stride_dvb + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_tiles(
    dq, q, do, row_m, row_scale, delta, k_base, v_base, mask_base, kpm_base, ds_base,
    offs_m, offs_d, offs_dv, lo, hi, qk_scale, softcap_log2,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_sm, stride_sn,
    stride_mm, stride_mn, stride_pn,
    L, S, offset, window, seed0, seed1, bh, dropout_p, dropout_scale, mask_b, mask_h, start_m,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    STORE_DS: tl.constexpr, FILLS: tl.constexpr, BOUNDARY: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, NATURAL: tl.constexpr,
    MASK_TMA: tl.constexpr,
):
    """dQ contributions of key tiles [lo, hi) to one query tile (and dS when asked for),
    from P' = exp2(S - m): the rows' factor exp2(-r) is applied to dQ (and dS) by the caller.
    MASK_TMA: mask_base is a tensor descriptor, as in the forward (``_mask_tile``)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < S) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=(offs_n[None, :] < S) & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        if DOT_UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        mask_tile = _mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, L, S, mask_b,
                               mask_h, start_m, start_n, BLOCK_M, BLOCK_N, MASK_KIND, MASK_TMA)
        s, t = scores_with_mask_tile(
            tl.dot(q, kT, input_precision=DOT_PRECISION), offs_m[:, None], offs_n[None, :],
            mask_tile, kpm_base, stride_pn, S, offset, window, qk_scale, softcap_log2,
            MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BOUNDARY, NATURAL)
        p = _p_from_scores(s, row_m[:, None], 0.0, NATURAL)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed0, seed1, bh, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        # gradient of the (scaled, biased) scores, up to the row factor exp2(-r)
        ds = _unfilled(p * (dp - delta[:, None]), mask_tile, FILLS)
        if STORE_DS:
            tl.store(ds_base + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                     ds * row_scale[:, None], mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["H", "L", "S", "GROUP", "offset", "window", "len_class"])
def _bwd_dq_kernel(
    Q, K, V, DO, ROW_M, ROW_R, DELTA, DQ, DS, MASK, KPM, SEED,
    qk_scale, softcap_log2, sm_scale, dropout_p, dropout_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_sb, stride_sh, stride_sm, stride_sn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_lb, stride_lh,
    H, L, S, GROUP, offset, window, len_class,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    FILLS: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NATURAL: tl.constexpr, BATCH_INNER: tl.constexpr, MASK_TMA: tl.constexpr,
    LONGEST_FIRST: tl.constexpr, KEY_SPAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh = program_tile(H, BATCH_INNER)
    if LONGEST_FIRST:  # causal: a query tile's work grows with its index (as in the forward)
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=(offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # P = exp2(S - m - r) = exp2(S - m) * exp2(-r): the row factor (1 but on rows of huge
    # negative scores, see the prep kernel) is applied once to dQ, not to every score
    row_m = tl.load(ROW_M + off_b * stride_lb + off_h * stride_lh + offs_m, mask=offs_m < L, other=float("inf"))
    row_scale = tl.math.exp2(-tl.load(ROW_R + off_b * stride_lb + off_h * stride_lh + offs_m,
                                      mask=offs_m < L, other=0.0))
    delta = tl.load(DELTA + off_b * stride_lb + off_h * stride_lh + offs_m, mask=offs_m < L, other=0.0)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    mask_base, mask_b, mask_h = mask_origin(MASK, off_b, off_h, stride_mb, stride_mh, MASK_TMA)
    kpm_base = KPM + off_b * stride_pb
    ds_base = DS + off_b * stride_sb + off_h * stride_sh
    seed0, seed1 = load_seed(SEED, DROPOUT)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # the forward's key ranges (less padded tiles): only the first and last get the
    # positional predicate
    lo, mid_lo, mid_hi, hi = visible_key_ranges(
        start_m, S, offset, window, kpm_base, stride_pn, mask_base, stride_mn, IS_CAUSAL,
        HAS_WINDOW, KEY_SPAN, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:  # [lo, mid_lo) is empty without a window (see key_ranges)
        dq = _dq_tiles(
            dq, q, do, row_m, row_scale, delta, k_base, v_base, mask_base, kpm_base, ds_base,
            offs_m, offs_d, offs_dv, lo, mid_lo, qk_scale, softcap_log2,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_sm, stride_sn, stride_mm, stride_mn, stride_pn,
            L, S, offset, window, seed0, seed1, pid_bh, dropout_p, dropout_scale, mask_b, mask_h,
            start_m, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, HAS_KPM, IS_CAUSAL,
            HAS_WINDOW, HAS_SOFTCAP, DROPOUT, STORE_DS, FILLS, True, DOT_UPCAST, DOT_PRECISION,
            NATURAL, MASK_TMA,
        )
    dq = _dq_tiles(
        dq, q, do, row_m, row_scale, delta, k_base, v_base, mask_base, kpm_base, ds_base,
        offs_m, offs_d, offs_dv, mid_lo, mid_hi, qk_scale, softcap_log2,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_sm, stride_sn, stride_mm, stride_mn, stride_pn,
        L, S, offset, window, seed0, seed1, pid_bh, dropout_p, dropout_scale, mask_b, mask_h,
        start_m, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, HAS_KPM, IS_CAUSAL,
        HAS_WINDOW, HAS_SOFTCAP, DROPOUT, STORE_DS, FILLS, False, DOT_UPCAST, DOT_PRECISION,
        NATURAL, MASK_TMA,
    )
    dq = _dq_tiles(
        dq, q, do, row_m, row_scale, delta, k_base, v_base, mask_base, kpm_base, ds_base,
        offs_m, offs_d, offs_dv, mid_hi, hi, qk_scale, softcap_log2,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_sm, stride_sn, stride_mm, stride_mn, stride_pn,
        L, S, offset, window, seed0, seed1, pid_bh, dropout_p, dropout_scale, mask_b, mask_h,
        start_m, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, HAS_KPM, IS_CAUSAL,
        HAS_WINDOW, HAS_SOFTCAP, DROPOUT, STORE_DS, FILLS, True, DOT_UPCAST, DOT_PRECISION,
        NATURAL, MASK_TMA,
    )
    dq = dq * (sm_scale * row_scale[:, None])
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM))


_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner tries. dK/dV programs own a key tile
# and stream query tiles (wide BLOCK_N, narrow BLOCK_M); dQ programs the other way round.
_DKDV_CONFIGS = [
    (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 4, 4), (64, 128, 8, 2),
    (64, 64, 4, 3), (32, 64, 4, 3), (16, 128, 4, 3), (16, 64, 4, 2),
    (16, 128, 8, 3), (16, 64, 8, 3), (32, 64, 8, 2), (32, 128, 8, 2),
    (64, 64, 8, 1),
]
# Not (128, 32, 8, 3): with triton 3.6 on an H200 that dQ config faults with an illegal memory
# access (hd128, no causal mask; every load and store of the kernel is masked, so it is a
# miscompile), found when the autotuner tried it; each other config ran clean in isolation.
_DQ_CONFIGS = [
    (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3),
    (64, 32, 4, 3), (128, 128, 8, 2), (64, 16, 4, 2),
    (128, 32, 8, 1),
]
# Tried only where Q/K and V rows together are wider than 256 (head dims over 128): there
# the other tiles leave the tensor cores short (a dK/dV tile of 16-32 query rows, a dQ tile of
# 16 keys) or do not fit. H100, bf16, hd256, B4 H8 N4096, backward alone (session 18, each
# pair fixed in turn): dK/dV (64, 64, 8, 1) with dQ (128, 32, 8, 1) 158.9 TFLOP/s with a
# float bias, 191.3 without a mask, where the tuned (32, 64, 8, 2) / (64, 16, 4, 2) gave
# 145.5 / 190.7; with dQ (64, 32, 4, 3) 141.4 / 205.8. Not timed at smaller head dims, where
# the autotuner would otherwise compile and time them too.
_WIDE_ONLY = {(64, 64, 8, 1), (128, 32, 8, 1)}


def _fits(resident: int, streamed: int, accumulators: int, mask_stages: bool = False):
    """A pruning rule for one kernel. resident/streamed: elements per row of the tile that
    stays in shared memory / is loaded each stage; accumulators: fp32 accumulator columns;
    mask_stages: a mask read through a descriptor (MASK_TMA) takes a tile per stage and key
    tiles at least MASK_TMA_MIN_BLOCK_N wide (the forward's rule)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elem = _dtype_of(args["Q"]).itemsize
        d, dv = args["BLOCK_D"], args["BLOCK_DV"]
        width = {"d": d, "dv": dv, "d+dv": d + dv}
        mask_elem = 0
        if mask_stages and args.get("MASK_TMA"):
            mask_elem = _dtype_of(args["MASK"]).itemsize
            configs = [c for c in configs if c.kwargs["BLOCK_N"] >= MASK_TMA_MIN_BLOCK_N]
        kept = []
        for c in configs:
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if d + dv <= 256 and (m, n, c.num_warps, c.num_stages) in _WIDE_ONLY:
                continue
            own, other = (n, m) if resident == "n" else (m, n)
            smem = elem * (own * width["d+dv"] + c.num_stages * other * width["d+dv"])
            smem += mask_elem * c.num_stages * m * n
            regs = own * width[accumulators] // (c.num_warps * 32)
            if smem <= 160 * 1024 and regs <= 128:
                kept.append(c)
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


_DKDV_TILES = {"Q": ("BLOCK_M", "BLOCK_D"), "DO": ("BLOCK_M", "BLOCK_DV"),
               "K": ("BLOCK_N", "BLOCK_D"), "V": ("BLOCK_N", "BLOCK_DV"),
               "DQ_ACC": ("BLOCK_M", "BLOCK_D"), "MASK": ("BLOCK_M", "BLOCK_N")}
# The row statistics' padding (attention_backward_triton): a multiple of every dK/dV BLOCK_M.
ROW_PAD = 64


def _set_dkdv_blocks(nargs) -> None:
    """The dK/dV kernel's pre-hook: tile shapes for its tensor descriptors."""
    set_descriptor_blocks(nargs, _DKDV_TILES)


def _set_dq_blocks(nargs) -> None:
    """The dQ kernel's pre-hook: the mask descriptor's tile shape."""
    set_descriptor_blocks(nargs, {"MASK": ("BLOCK_M", "BLOCK_N")})


def _autotuned(kernel, configs, prune, extra_key=(), pre_hook=None):
    # len_class: short and long loops tuned apart, as the forward's (forward.LONG_ROWS). Without
    # it the first call's length chose the tiles of every later one: a benchmark sweep that
    # starts at N = 512 kept N = 512's dQ tiles at N = 4k and 16k.
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st,
                               pre_hook=pre_hook)
                 for m, n, w, st in configs],
        key=["HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "HAS_KPM", "IS_CAUSAL", "HAS_WINDOW",
             "HAS_SOFTCAP", "DROPOUT", "len_class", *extra_key],
        prune_configs_by={"early_config_prune": prune},
    )(kernel)


_DKDV_KEY = ("DQ_ATOMIC", "TMA", "DQ_TMA_ADD", "MASK_TMA", "PADDED_ROWS", "KEY_SPAN")
_bwd_dkdv_autotuned = _autotuned(_bwd_dkdv_kernel, _DKDV_CONFIGS, _fits("n", "m", "d+dv"),
                                 _DKDV_KEY, pre_hook=_set_dkdv_blocks)


def _tuning_dq_hook(nargs) -> None:
    """The pre-hook of the dK/dV kernel that also adds dQ, while tuning: each timing run adds
    into the accumulator, so it is zeroed before every run, the call's own launch included.
    (Triton's reset_to_zero cannot take a tensor descriptor.)"""
    _set_dkdv_blocks(nargs)
    acc = nargs["DQ_ACC"]
    (acc.base if nargs.get("DQ_TMA_ADD") else acc).zero_()


_bwd_dkdv_dq_autotuned = _autotuned(_bwd_dkdv_kernel, _DKDV_CONFIGS, _fits("n", "m", "d+dv"),
                                    _DKDV_KEY, pre_hook=_tuning_dq_hook)
_bwd_dq_autotuned = _autotuned(_bwd_dq_kernel, _DQ_CONFIGS, _fits("m", "n", "d", mask_stages=True),
                               ("STORE_DS", "MASK_TMA", "LONGEST_FIRST", "KEY_SPAN"),
                               pre_hook=_set_dq_blocks)


def _fixed_config(head_dim_pad: int, dtype: torch.dtype) -> dict:
    """Tiles without tuning runs (SDPA_PASS_AUTOTUNE=0): for suites that compile many variants."""
    if dtype == torch.float32 or head_dim_pad > 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim_pad > 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


_DKDV = TunedKernel(_bwd_dkdv_autotuned, _bwd_dkdv_kernel, _set_dkdv_blocks)
_DKDV_DQ = TunedKernel(_bwd_dkdv_dq_autotuned, _bwd_dkdv_kernel, _set_dkdv_blocks)
_DQ = TunedKernel(_bwd_dq_autotuned, _bwd_dq_kernel, _set_dq_blocks)


def _kernels(head_dim_pad: int, dtype: torch.dtype, dq_atomic: bool):
    """(dK/dV kernel, its fixed tiles, dQ kernel, its fixed tiles); tiles None when tuned."""
    if interpreter_active():
        return _bwd_dkdv_kernel, _INTERPRETER_CONFIG, _bwd_dq_kernel, _INTERPRETER_CONFIG
    if os.environ.get("SDPA_PASS_AUTOTUNE", "1") == "0":
        cfg = _fixed_config(head_dim_pad, dtype)
        return _bwd_dkdv_kernel, cfg, _bwd_dq_kernel, cfg
    return _DKDV_DQ if dq_atomic else _DKDV, None, _DQ, None


# Head dims (tile width) where the dK/dV kernel's descriptor loads measured faster (H100,
# bf16, N = 4k and 16k, kernel time through CUDA graphs; see BENCHMARKS.md, session 8); at
# hd64 the split path's descriptor loads measured 0.92-0.98x its pointer loads.
BWD_DESCRIPTOR_HEAD_DIMS = (128,)


def dq_by_atomics(need_mask_grad: bool) -> bool:
    """Whether the dK/dV kernel also forms dQ, adding each key tile's share into an fp32
    accumulator, instead of a second kernel that recomputes S and dP per query tile (7 matrix
    products -> 5). Only when asked (SDPA_PASS_BWD_DQ=atomic): it no longer measures faster
    anywhere. History (H100, bf16, backward TFLOP/s, BENCHMARKS.md): it was the default at
    hd128 with descriptor loads (the copy engine doing the adds) until the padded row
    statistics (session 12) made the split path win without a mask (N = 1k 331 vs 266, 4k
    380 vs 334, 16k 397 vs 349; causal 4k 339 vs 303), and until the dQ kernel read the mask
    through a descriptor (session 13) made it win with one (bias N = 1k 216.5 vs 194.0, 4k
    248.8 vs 234.7; bool 1k 252.6 vs 231.7, 4k 288.9 vs 283.8). With pointer loads and atomic
    instructions it measured 0.89-1.02x, at hd64 0.77-0.86x. Never when the mask's gradient
    is wanted (the dQ kernel writes dS), nor under torch.use_deterministic_algorithms (the
    adds' order varies between runs, so dQ may differ in its last bits). Under the
    interpreter the atomic path runs pointer atomics, which is how the CPU tests run it."""
    forced = os.environ.get("SDPA_PASS_BWD_DQ", "")
    if forced not in ("", "atomic", "split"):
        raise ValueError(f"SDPA_PASS_BWD_DQ must be 'atomic' or 'split', got {forced!r}")
    if need_mask_grad or torch.are_deterministic_algorithms_enabled():
        return False
    return forced == "atomic"


def _launch(kernel, tiles, grid, args, meta, pre_hook=None, descriptors=None,
            plan_key=None) -> None:
    """One backward launch; with a ``plan_key`` (the call's and the site's) a later call with
    the same key launches the compiled kernel directly (kernels/launch.py). ``descriptors``:
    {argument position: maker} for the tensors the kernel takes as tensor descriptors."""
    if tiles is not None:
        launch_fixed(_BACKWARD_CALLS, plan_key, kernel, grid, args, {**meta, **tiles}, pre_hook,
                     descriptors)
        return

    def first(launched):  # a TunedKernel: its key is the autotuner's (meta values and dtypes)
        key = (*meta.values(), *(a.dtype for a in launched if isinstance(a, torch.Tensor)))
        compiled, config = kernel.launch(key, grid, *launched, **meta)
        return kernel.kernel, compiled, grid(config), {**meta, **config}

    launch_remembered(_BACKWARD_CALLS, plan_key, args, first, descriptors)


# Compiled backward launches by (call key, launch site) (kernels/launch.py).
_BACKWARD_CALLS = PlanCache()


def use_bwd_tma(q, k, v, grad_out, shape: AttentionShape, block_d: int, block_dv: int,
                small: bool) -> bool:
    """Whether the dK/dV kernel reads Q, dO, K and V through tensor descriptors (and, on a
    GPU, adds dQ with the copy engine's reduce-add). The forward's conditions (compute
    capability 9+, fp16/bf16, whole-tile head dims, the copy engine's layout rules), at the
    head dims where it measured faster (1.01-1.07x with the split dQ path at hd128), except
    for calls too small to repay the descriptors' host time (``small``: ``host_bound``);
    SDPA_PASS_BWD_TMA=1 forces it (also under the interpreter), =0 turns it off."""
    return ((shape.head_dim, shape.v_head_dim) == (block_d, block_dv)
            and _descriptors_wanted(q, "SDPA_PASS_BWD_TMA",
                                    measured_faster=block_d in BWD_DESCRIPTOR_HEAD_DIMS
                                    and not small)
            and descriptor_layout_ok(q, k, v, grad_out))


def backward_choices(dkdv_refusal: str | None, dq_refusal: str | None, dq_atomic: bool,
                     fused: bool = False) -> str:
    """The backward's kernels for ``launch.log_kernel_choice``, from the two Gluon refusals
    (``fused``: the Gluon dK/dV kernel forms dQ too, ``gluon_backward.fused_dq``)."""
    if dq_atomic:
        return f"dK/dV {kernel_choice(dkdv_refusal)} with dQ by atomics"
    if fused:
        return "dK/dV Gluon with dQ by the copy engine's reduce-adds"
    if dq_refusal is not None and dq_refusal == dkdv_refusal:
        return f"dK/dV and dQ {kernel_choice(dkdv_refusal)}"
    return f"dK/dV {kernel_choice(dkdv_refusal)}, dQ {kernel_choice(dq_refusal)}"


class _BackwardDecisions:
    """What ``attention_backward_triton`` decides from a call's plan key alone (layouts,
    dtypes, flags, the SDPA_PASS_* variables): load paths, dQ path, kernels and tiles, the
    meta-parameters, grids and integer arguments. Remembered per key
    (``_BACKWARD_DECISIONS``), so a later call with the same key only allocates, builds its
    argument tuples from its tensors and floats and launches: these
    decisions read ~15 environment variables and cost ~50 us of host time a call (CPU,
    torch 2.13), on the H100 machine's slower host more, which at N <= 1024 is as long as
    the kernels."""

    def __init__(self, grad_out, q, k, v, out, lse, grad_lse, lp: LaunchParams,
                 shape: AttentionShape, causal_align: int, diagonal: int, window: int,
                 has_softcap: bool, need_mask_grad: bool, dropout: bool, mask_fills: bool):
        B, Hq, Hkv, L, S = shape.batch, shape.q_heads, shape.kv_heads, shape.q_len, shape.kv_len
        mask_kind, mask, block_d, block_dv = lp.mask_kind, lp.mask, lp.block_d, lp.block_dv
        has_kpm = lp.kpm is not q  # launch_params passes q as the dummy pointer
        has_grad_lse = grad_lse is not None
        # per query row, from the prep kernel: delta, and the statistics m and r of P; padded
        # to whole tiles of the dK/dV kernel (BLOCK_M divides ROW_PAD) with rows that see no
        # key, so that kernel loads them unmasked: the backward 1.15-1.19x faster (H100, bf16,
        # hd64 and hd128, N = 4k; BENCHMARKS.md, session 12). SDPA_PASS_BWD_PADDED_ROWS=0
        # loads them masked from L rows.
        padded_rows = os.environ.get("SDPA_PASS_BWD_PADDED_ROWS", "1") != "0"
        self.rows = -(-L // ROW_PAD) * ROW_PAD if padded_rows else L
        self.offset = causal_offset(causal_align, diagonal, L, S)
        small = host_bound(shape)
        self.tma = use_bwd_tma(q, k, v, grad_out, shape, block_d, block_dv, small)
        self.dq_atomic = dq_by_atomics(need_mask_grad)
        self.dkdv_kernel, self.dkdv_cfg, self.dq_kernel, self.dq_cfg = _kernels(
            max(block_d, block_dv), q.dtype, self.dq_atomic)
        # a bool mask of one row of keys: read as such, and its padding skipped by whole key
        # tiles (the dK/dV kernel gives a tile it hides no work, dQ's loop skips it)
        kernel_mask = mask_kind_of(mask_kind, lp.mask_strides, L)
        span = key_span(kernel_mask == MASK_BOOL_ROW, has_kpm)
        # The dK/dV kernel in Gluon on Hopper where it applies (gluon_backward.py); None or
        # the reason it does not. It reads the padding rows (``padding``) as the forward's
        # Gluon kernel does.
        self.padding = padding_flags(kernel_mask == MASK_BOOL_ROW, has_kpm, span)
        self.kpm_strides, self.mask_strides = lp.kpm_strides, lp.mask_strides
        # an attn_mask with rows of its own: bool ones are read in tiles as the forward does
        tiled = mask_kind != MASK_NONE and kernel_mask != MASK_BOOL_ROW
        tile_refusal = (tile_mask_refusal(mask, bias_head_dims(), shape.head_dim) if tiled
                        else None)
        if tiled and mask_kind == MASK_FLOAT and mask_fills:  # (_unfilled)
            tile_refusal = "a masked_fill's float mask (dS is 0 at its filled keys)"
        if tiled and mask_kind == MASK_FLOAT and has_softcap:
            # the Gluon kernels' bias tiles take the prep kernel's natural-log statistics,
            # which it gives only without a cap (``natural`` below)
            tile_refusal = "a float bias beside soft-capping"
        self.mask_tile = ((TILE_BIAS if mask_kind == MASK_FLOAT else TILE_BOOL)
                          if tiled and tile_refusal is None else 0)
        self.gluon_refusal = gluon_backward_refusal(
            q, k, v, grad_out, shape, masked=tile_refusal,
            padding=self.padding, window=window,
            softcapped=has_softcap, dropout=dropout, dq_atomic=self.dq_atomic,
            padded_rows=padded_rows, rows=self.rows, small=small,
            capability=_capability(q.device) if q.is_cuda else None)
        # and dQ formed by the Gluon dK/dV kernel itself (``fused_dq``), else the dQ
        # kernel in Gluon where it measured faster (hd128, hd256)
        self.gluon_dq_refusal = gluon_dq_refusal(self.gluon_refusal, shape.head_dim)
        self.fused_dq = fused_dq(self.gluon_refusal, shape.head_dim)
        log_kernel_choice("backward", shape, q.dtype, backward_choices(
            self.gluon_refusal, self.gluon_dq_refusal, self.dq_atomic, self.fused_dq))
        # a float mask without soft-capping: scores in natural-log units (_p_from_scores)
        self.natural = natural = mask_kind == MASK_FLOAT and not has_softcap
        masks = dict(
            HEAD_DIM=shape.head_dim, HEAD_DIM_V=shape.v_head_dim, BLOCK_D=block_d,
            BLOCK_DV=block_dv, MASK_KIND=kernel_mask, HAS_KPM=has_kpm,
            IS_CAUSAL=causal_align != CAUSAL_NONE, HAS_WINDOW=window != -1,
            HAS_SOFTCAP=has_softcap, DOT_UPCAST=interpreter_active() and q.dtype == torch.bfloat16,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", NATURAL=natural,
        )
        # Batch-first programs (the forward's order for a float mask shared by the batch):
        # H100, hd128, ALiBi bias (1, H, N, N), B = 16 / 4 / 2 at N = 1k / 4k / 8k: split dQ
        # path 1.03x / 1.02x / 1.00x, atomic path 0.93x / 0.96x / 0.95x (the Q, dO and dQ-sum
        # tiles of B batch elements at once in L2 instead of one); a bool (N, N) mask at 4k
        # 0.98x (BENCHMARKS.md, session 13). Off unless SDPA_PASS_BATCH_INNER=1.
        common = dict(masks, DROPOUT=dropout, FILLS=mask_fills and mask_kind == MASK_FLOAT,
                      BATCH_INNER=batch_inner(mask_kind, mask.stride(), B, measured_faster=False))
        prep_tiles = (_INTERPRETER_CONFIG if interpreter_active()
                      else _fixed_config(max(block_d, block_dv), q.dtype))
        self.prep_params = dict(HAS_GRAD_LSE=has_grad_lse, **masks, **prep_tiles,
                                ZERO_DQ=self.dq_atomic or self.fused_dq)
        self.prep_grid = (-(-self.rows // prep_tiles["BLOCK_M"]), *split_rows(B * Hq))
        # the interpreter has no descriptor reduce-add (triton 3.9): pointer atomics there
        self.tma_add = self.tma and self.dq_atomic and not interpreter_active()
        # The mask through a descriptor too where the forward would read it so (H100, bf16,
        # hd128): a bool mask forward + backward 1.34-1.36x at N = 4k-32k (session 7); a float
        # mask 0.93-0.98x then, but with the padded row statistics and the split dQ path the
        # backward 1.13x at N = 4k (251.2 -> 284.4 TFLOP/s, session 13). With pointer loads of
        # Q/dO/K/V (hd64 by default) as well: the backward 1.20x / 1.21x with a float bias and
        # 1.31x / 1.29x with a bool mask at N = 1k / 4k (split path, session 14). Head dims
        # over 128 (pointer loads, not timed) only when SDPA_PASS_MASK_TMA=1 asks.
        self.mask_tma = (mask_kind != MASK_NONE and use_mask_tma(q, mask, small)
                         and (self.tma or max(block_d, block_dv) <= 128
                              or os.environ.get("SDPA_PASS_MASK_TMA") == "1"))
        self.dkdv_meta = {**common, "DQ_ATOMIC": self.dq_atomic, "TMA": self.tma,
                          "DQ_TMA_ADD": self.tma_add, "MASK_TMA": self.mask_tma,
                          "PADDED_ROWS": padded_rows, "len_class": int(L >= LONG_ROWS),
                          "KEY_SPAN": span}
        # the descriptors' tile shapes, set before each launch that passes any
        self.dkdv_hook = _set_dkdv_blocks if self.tma or self.mask_tma else None
        # The dQ kernel reads the mask tile as the forward does (same orientation), through a
        # descriptor where the forward would at these head dims: the copy engine fetches it
        # ahead instead of a pointer load the loop waits for. SDPA_PASS_MASK_TMA=0 / =1 as
        # for the forward.
        self.dq_mask_tma = (mask_kind != MASK_NONE and max(block_d, block_dv) <= 128
                            and use_mask_tma(q, mask, small))
        if self.dq_mask_tma and self.dq_cfg is not None and not interpreter_active():
            self.dq_cfg = dict(self.dq_cfg,
                               BLOCK_N=max(self.dq_cfg["BLOCK_N"], MASK_TMA_MIN_BLOCK_N))
        # Causal without a window: the longest query tiles first, so the short ones fill the
        # end; SDPA_PASS_DQ_ORDER=tiles keeps the tiles' order.
        longest_first = (causal_align != CAUSAL_NONE and window == -1
                         and os.environ.get("SDPA_PASS_DQ_ORDER", "") != "tiles")
        self.dq_meta = {**common, "STORE_DS": need_mask_grad, "MASK_TMA": self.dq_mask_tma,
                        "LONGEST_FIRST": longest_first, "len_class": int(S >= LONG_ROWS),
                        "KEY_SPAN": span}
        self.dq_hook = _set_dq_blocks if self.dq_mask_tma else None
        # {argument position: descriptor maker} of each kernel (see the launches)
        def mask_descriptor(t):
            return _mask_descriptor(t.expand(B, Hq, L, S))

        mask_slot = {9: mask_descriptor}
        self.dkdv_descriptors = {
            **({i: _descriptor for i in range(4)} if self.tma else {}),
            **(mask_slot if self.mask_tma else {}),
            **({12: _descriptor} if self.tma_add else {})}
        self.dq_descriptors = mask_slot if self.dq_mask_tma else {}
        self.dkdv_grid = lambda meta: (-(-S // meta["BLOCK_N"]), *split_rows(B * Hkv))  # noqa: E731
        self.dq_grid = lambda meta: (-(-L // meta["BLOCK_M"]), *split_rows(B * Hq))  # noqa: E731
        # The launches' integer arguments (strides, sizes, offsets), all fixed by the plan
        # key; the gradients, the row statistics and the dQ/dS sums are allocated contiguous.
        D = shape.head_dim
        rstrides = (Hq * self.rows, self.rows)
        gstrides = grad_lse.stride() if has_grad_lse else (0, 0, 0)
        inputs = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
        masks = (*lp.mask_strides, *lp.kpm_strides)
        self.prep_ints = (
            *q.stride(), *k.stride(), *out.stride(), *grad_out.stride(), *masks, *lse.stride(),
            *gstrides, *rstrides, Hq, L, self.rows, S, shape.group, self.offset, window)
        astrides = contiguous_strides((B, Hq, L, D))[:3] if self.dq_atomic else (0, 0, 0)
        self.dkdv_ints = (
            *inputs, *contiguous_strides(k.shape), *contiguous_strides(v.shape), *masks,
            *rstrides, *astrides,
            Hkv, L, S, shape.group, self.offset, window)
        sstrides = contiguous_strides((B, Hq, L, S)) if need_mask_grad else (0, 0, 0, 0)
        self.dq_ints = (
            *inputs, *contiguous_strides(q.shape), *sstrides, *masks, *rstrides,
            Hq, L, S, shape.group, self.offset, window)


# Decisions of earlier backward calls by plan key (kernels/launch.py).
_BACKWARD_DECISIONS = PlanCache()


def attention_backward_triton(
    grad_out, q, k, v, attn_mask, key_padding_mask, out, lse, shape: AttentionShape, *,
    scale: float, causal_align: int, diagonal: int, window: int, softcap: float,
    need_mask_grad: bool, grad_lse=None, dropout_p: float = 0.0, dropout_seed=None,
    mask_fills: bool = False,
):
    """(dq, dk, dv, dmask) from the forward's output and natural-log LSE (B, Hq, L).

    ``grad_lse`` (or None): gradient of the LSE output. d lse_i / d s_ij = P_ij, so it only
    shifts delta: dS = P * (dP - (rowsum(dO * O) - grad_lse)). ``mask_fills``: float-mask
    values <= FILL_THRESHOLD replaced their scores (masked_fill): dS is 0 there."""
    B, Hq, L, S = shape.batch, shape.q_heads, shape.q_len, shape.kv_len
    D = shape.head_dim
    dmask = q.new_empty((0,))
    if L == 0 or S == 0 or B * Hq == 0:
        if need_mask_grad:
            dmask = torch.zeros_like(attn_mask)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dmask
    # every element is written by the kernels (dK/dV of keys no query sees as zeros);
    # contiguous whatever the inputs' layout, as the op's fake says
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))

    has_softcap = softcap > 0.0
    grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
    # Everything the launches below decide from and Triton specializes on (kernels/launch.py):
    # with it, a later call with the same key reuses this call's decisions, integer arguments
    # and compiled kernels, and passes only its tensors and floats.
    plan = call_key(tensor_key(grad_out), tensor_key(q), tensor_key(k), tensor_key(v),
                    tensor_key(out), tensor_key(lse), tensor_key(grad_lse), tensor_key(attn_mask),
                    tensor_key(key_padding_mask),
                    tensor_key(dropout_seed) if dropout_p > 0.0 else None, scale > 0.0,
                    causal_align, diagonal, window, has_softcap, need_mask_grad, dropout_p > 0.0,
                    mask_fills, torch.are_deterministic_algorithms_enabled())
    d = _BACKWARD_DECISIONS.get(plan) if plan is not None else None
    if d is None:
        lp = launch_params(q, attn_mask, key_padding_mask, shape, scale, softcap)
        d = _BackwardDecisions(grad_out, q, k, v, out, lse, grad_lse, lp, shape, causal_align,
                               diagonal, window, has_softcap, need_mask_grad, dropout_p > 0.0,
                               mask_fills)
        if plan is not None:
            _BACKWARD_DECISIONS.add(plan, d)
    qk_scale, softcap_log2 = score_scales(scale, softcap)
    if d.natural:
        qk_scale = scale  # natural-log scores: the kernels take the plain softmax scale
    # Pointer arguments: the kernels read attn_mask through its (B, Hq, L, S) broadcast view,
    # which starts at the same address; dummies where there is none.
    mask = attn_mask if attn_mask is not None else q
    kpm = key_padding_mask if key_padding_mask is not None else q
    stats = torch.empty((3, B, Hq, d.rows), dtype=torch.float32, device=q.device)
    delta, row_m, row_r = stats
    seed = dropout_seed if dropout_p > 0.0 else q
    glse = grad_lse if grad_lse is not None else lse
    # fp32 dQ sums, (B, Hq, L, D), when the dK/dV kernel adds them (by atomics in Triton's,
    # by the copy engine in Gluon's: ``fused_dq``), zeroed by the prep kernel; else a dummy
    dq_sums = d.dq_atomic or d.fused_dq
    dq_acc = torch.empty((B, Hq, L, D), dtype=torch.float32, device=q.device) if dq_sums else dq
    launch_fixed(_BACKWARD_CALLS, plan and (plan, "prep"), _bwd_prep_kernel, d.prep_grid,
                 (q, k, out, grad_out, lse, glse, mask, kpm, delta, row_m, row_r, dq_acc,
                  qk_scale, softcap_log2, *d.prep_ints), d.prep_params)
    floats = (qk_scale, softcap_log2, scale, dropout_p, keep_scale(dropout_p))
    # the Gluon kernels' padding rows (see _BackwardDecisions.padding)
    padding = dict(padding=max(d.padding, 0), kpm=key_padding_mask, kpm_strides=d.kpm_strides,
                   mask=attn_mask, mask_strides=d.mask_strides,
                   mask_tile=d.mask_tile) if d.padding > 0 or d.mask_tile else {}
    # the Gluon kernels' (soft-capped: cap · log2(e) and tanh's factor, gluon_forward's)
    gluon_qk_scale, cap_scale = gluon_score_scales(scale, softcap, d.natural)
    if d.gluon_refusal is None:
        attention_dkdv_gluon(q, k, v, grad_out, stats, dk, dv, shape, scale=scale,
                             causal_align=causal_align, offset=d.offset, rows=d.rows,
                             plan_key=plan and (plan, "gluon_dkdv"), window=window,
                             qk_scale=gluon_qk_scale, cap_scale=cap_scale,
                             dq_acc=dq_acc if d.fused_dq else None, **padding)
    else:
        _launch(d.dkdv_kernel, d.dkdv_cfg, d.dkdv_grid, (
            q, k, v, grad_out, row_m, row_r, delta, dk, dv, mask_argument(d.mask_tma, mask),
            kpm, seed, dq_acc, *floats, *d.dkdv_ints), d.dkdv_meta, d.dkdv_hook,
            d.dkdv_descriptors, plan and (plan, "dkdv"))
    if dq_sums:
        # the sums' scale and rounding in one pass over both contiguous buffers
        n = dq.numel()
        launch_fixed(_BACKWARD_CALLS, plan and (plan, "dq_sums"), _dq_from_sums_kernel,
                     (triton.cdiv(n, _DQ_FROM_SUMS_BLOCK),), (dq_acc, dq, scale, n),
                     dict(BLOCK=_DQ_FROM_SUMS_BLOCK, num_warps=4))
        return dq, dk, dv, dmask
    if d.gluon_dq_refusal is None:  # (never with a mask's gradient: bool masks have none)
        if d.padding > 0:
            padding["spans"] = padding_spans(key_padding_mask, d.kpm_strides,
                                             None if d.mask_tile else attn_mask,
                                             d.mask_strides, B, Hq, S, d.padding,
                                             plan and (plan, "spans"))
        attention_dq_gluon(q, k, v, grad_out, stats, dq, shape, scale=scale,
                           causal_align=causal_align, offset=d.offset, rows=d.rows,
                           plan_key=plan and (plan, "gluon_dq"), window=window,
                           qk_scale=gluon_qk_scale, cap_scale=cap_scale, **padding)
        return dq, dk, dv, dmask
    ds = torch.zeros((B, Hq, L, S), dtype=torch.float32, device=q.device) if need_mask_grad else q
    _launch(d.dq_kernel, d.dq_cfg, d.dq_grid, (
        q, k, v, grad_out, row_m, row_r, delta, dq, ds, mask_argument(d.dq_mask_tma, mask), kpm,
        seed, *floats, *d.dq_ints), d.dq_meta, d.dq_hook, d.dq_descriptors, plan and (plan, "dq"))
    if need_mask_grad:
        # dS is zero where the kernels skipped tiles; sum it over the mask's broadcast dims
        dmask = _reduce_to(ds, attn_mask.shape).to(attn_mask.dtype)
    return dq, dk, dv, dmask


def _reduce_to(x: torch.Tensor, shape) -> torch.Tensor:
    lead = x.dim() - len(shape)
    x = x.sum(dim=tuple(range(lead))) if lead > 0 else x
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x
