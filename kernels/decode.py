"""Split-KV ("flash-decoding") forward kernel for short query lengths.

With a handful of query rows (decode steps, speculative decoding) the forward kernel launches
one program per (batch, query head), most of its M tile is padding, and B·Hq programs cannot
fill the GPU: each one streams all S keys alone. Here the work is cut the other way:

1. ``_decode_split_kernel``, grid (B·Hkv, num_splits). One program takes every query row of
   every query head of one GQA group (GROUP·L rows stacked as the M dimension of one tile) and
   one contiguous chunk of the keys, so each K/V tile is read once per group and the key axis
   is spread over many programs. It writes its unnormalised accumulator, running max and
   running sum in fp32 to a workspace.
2. ``_decode_merge_kernel`` combines the splits of each row, rescaled by their maxima, into the
   output and the natural-log LSE.

Masks mean exactly what they mean in the forward kernel: every score tile goes through the
forward's ``masked_scores``. Keys that no query row can see (causal, window) are cut off on the
host before the key range is divided, so splits share the visible keys, not the sequence.
Semantics, arguments and outputs are those of ``attention_forward_triton`` (without dropout:
this kernel is for inference).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .checks import CAUSAL_NONE, AttentionShape, causal_offset
from .forward import (LN2, MASK_BOOL_ROW, cdiv, clamp_to_span, interpreter_active, key_span,
                      launch_params, mask_kind_of, masked_scores, next_pow2, visible_key_span)
from .launch import (PlanCache, call_key, launch_fixed, log_kernel_choice,
                     specialization_classes, tensor_key)

# use_decode_kernel: at most this many stacked query rows (GROUP·L) per program, and an fp32
# accumulator of at most MAX_ACC_ELEMENTS (rows x padded head dim) so 4 warps do not spill.
MAX_DECODE_ROWS = 64
MAX_ACC_ELEMENTS = 64 * 128
# ... and only for key sequences long enough that splitting them pays for the merge (H100
# bf16, B=1, Hq=32, Hkv=8, L=1: even at S=512, 8.6 us against the forward's 9.4).
MIN_DECODE_KV_LEN = 512
# The forward launches about one program per (batch, query head) for L <= 64; below this many
# waves of such programs per SM it leaves the GPU partly idle while each program walks all S.
FORWARD_FILL_WAVES = 2

# num_splits: aim at SPLIT_WAVES programs per SM, each split at least MIN_TILES_PER_SPLIT key
# tiles so the per-split cost of loading Q and writing partials stays small next to its K/V
# reads. Measured on an H100 (bf16, D=128, S=4k-64k): 1 or 2 waves beat 3 and 4 by 5-10%.
SPLIT_WAVES = 2
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 128

# The interpreter has no SMs; this many makes the automatic choice split the short sequences
# of the tests too.
_INTERPRETER_SM_COUNT = 4
# Interpreter: 16-key tiles, so small test shapes cross several tiles and several splits.
_INTERPRETER_CONFIG = dict(BLOCK_N=16, num_warps=4, num_stages=1)
_MERGE_TILE = 4096


@triton.jit
def _decode_tiles(
    acc, l_i, m_i, q,
    k_base, v_base, mask_base, kpm_base,
    offs_m, offs_d, offs_dv,
    lo, hi,
    qk_scale, softcap_log2,
    stride_kn, stride_kd, stride_vn, stride_vd,
    stride_mm, stride_mn, stride_pn,
    L, S, offset, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BOUNDARY: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of the stacked rows over key tiles [lo, hi). BOUNDARY tiles get
    the positional predicate (sequence end, causal diagonal, window); interior tiles are
    known visible to every row and skip it."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        if BOUNDARY:
            k = tl.load(k_ptrs, mask=(offs_n[None, :] < S) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < S) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        else:
            if BLOCK_D != HEAD_DIM:
                k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            else:
                k = tl.load(k_ptrs)
            if BLOCK_DV != HEAD_DIM_V:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
            else:
                v = tl.load(v_ptrs)
        if DOT_UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk, _ = masked_scores(
            tl.dot(q, k, input_precision=DOT_PRECISION), offs_m[:, None], offs_n[None, :],
            mask_base, kpm_base,
            stride_mm, stride_mn, stride_pn, L, S, offset, window, qk_scale, softcap_log2,
            MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, BOUNDARY,
        )
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Rows that have seen only masked keys keep m = -inf; subtracting 0 for them keeps
        # exp2(-inf - m) at 0 instead of NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Lengths, offsets and key ranges change every decode step; specialising on them (Triton
# specialises integers equal to 1 or divisible by 16) would compile a kernel per value.
@triton.jit(do_not_specialize=[
    "Hkv", "L", "S", "GROUP", "offset", "window", "ROWS_TOTAL",
    "kv_lo", "mid_lo", "mid_hi", "kv_hi", "chunk",
])
def _decode_split_kernel(
    Q, K, V, MASK, KPM, ACC_WS, M_WS, L_WS,
    qk_scale, softcap_log2,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    Hkv, L, S, GROUP, offset, window, ROWS_TOTAL,
    kv_lo, mid_lo, mid_hi, kv_hi, chunk,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, KEY_SPAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # (B·Hkv) on grid axis 0, whose limit is 2**31 - 1; splits (at most MAX_SPLITS) on axis 1.
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_b = (pid_bh // Hkv).to(tl.int64)
    off_hkv = (pid_bh % Hkv).to(tl.int64)

    # Stacked row r is query position r % L of query head off_hkv·GROUP + r // L. Padding rows
    # (r >= GROUP·L) get position L, which masked_scores and every load treat as out of range.
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * L
    offs_m = tl.where(row_valid, rows % L, L)
    off_h = off_hkv * GROUP + tl.where(row_valid, rows // L, 0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # 64-bit base offsets: B·H·S·D can pass 2**31 elements for long caches.
    q_ptrs = (Q + off_b * stride_qb + off_h[:, None] * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    # The first head of the group's row of the mask: the row every stacked row reads where
    # the host passes MASK_BOOL_ROW (one row of keys that the group's heads share), loaded once
    # per key tile as a vector.
    mask_row = MASK + off_b * stride_mb + (off_hkv * GROUP) * stride_mh
    if MASK_KIND == 3:
        mask_base = mask_row
    else:
        # A column of per-row bases: masked_scores adds offs_m·stride_mm + offs_n·stride_mn
        # to it, so each stacked row reads the mask of its own head through its own strides.
        mask_base = (MASK + off_b * stride_mb + off_h * stride_mh)[:, None]
    kpm_base = KPM + off_b * stride_pb

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)

    # This split's share of the visible keys [kv_lo, kv_hi), cut at the host-computed band
    # [mid_lo, mid_hi) of tiles every row sees. chunk is a whole number of tiles, so only the
    # last split can end inside a tile. A split past kv_hi sees nothing and stores an empty
    # partial (m = -inf, l = 0), which the merge weighs 0.
    lo = kv_lo + pid_s * chunk
    hi = tl.minimum(lo + chunk, kv_hi)
    band_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    band_hi = tl.minimum(tl.maximum(mid_hi, band_lo), hi)
    if KEY_SPAN != 0:
        # padding: the split's tiles outside its visible keys are skipped (the host flags a
        # mask here only where every stacked row reads the same row of keys: the first head's)
        first, end = visible_key_span(kpm_base, stride_pn, mask_row, stride_mn, lo, hi,
                                      KEY_SPAN)
        lo, band_lo, band_hi, hi = clamp_to_span(lo, band_lo, band_hi, hi, first, end, BLOCK_N)
    acc, l_i, m_i = _decode_tiles(
        acc, l_i, m_i, q, k_base, v_base, mask_base, kpm_base, offs_m, offs_d, offs_dv,
        lo, band_lo, qk_scale, softcap_log2,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_pn,
        L, S, offset, window,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, HAS_KPM,
        IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, True, DOT_UPCAST, DOT_PRECISION,
    )
    acc, l_i, m_i = _decode_tiles(
        acc, l_i, m_i, q, k_base, v_base, mask_base, kpm_base, offs_m, offs_d, offs_dv,
        band_lo, band_hi, qk_scale, softcap_log2,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_pn,
        L, S, offset, window,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, HAS_KPM,
        IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, False, DOT_UPCAST, DOT_PRECISION,
    )
    acc, l_i, m_i = _decode_tiles(
        acc, l_i, m_i, q, k_base, v_base, mask_base, kpm_base, offs_m, offs_d, offs_dv,
        band_hi, hi, qk_scale, softcap_log2,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_pn,
        L, S, offset, window,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, HAS_KPM,
        IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, True, DOT_UPCAST, DOT_PRECISION,
    )

    # Workspace rows: (b·Hq + h)·L + i = pid_bh·GROUP·L + r, so a group's rows are contiguous.
    ws_rows = pid_bh.to(tl.int64) * GROUP * L + rows
    ws_split = pid_s.to(tl.int64) * ROWS_TOTAL
    tl.store(M_WS + ws_split + ws_rows, m_i, mask=row_valid)
    tl.store(L_WS + ws_split + ws_rows, l_i, mask=row_valid)
    acc_ptrs = ACC_WS + (ws_split + ws_rows[:, None]) * HEAD_DIM_V + offs_dv[None, :]
    tl.store(acc_ptrs, acc, mask=row_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit(do_not_specialize=["ROWS_TOTAL", "NUM_SPLITS"])
def _decode_merge_kernel(
    ACC_WS, M_WS, L_WS, O, LSE,
    ROWS_TOTAL, NUM_SPLITS,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    NAN_ON_EMPTY: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Rows (b·Hq + h)·L + i of the contiguous out (B, Hq, L, Dv) and lse (B, Hq, L).

    BLOCK_S splits of BLOCK_R rows are loaded at once: decode has few rows, and a loop over
    single splits would wait one memory latency per split."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS_TOTAL
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DIM_V
    m_run = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_run = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), tl.float32)
    for first in range(0, NUM_SPLITS, BLOCK_S):
        splits = first + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (splits[None, :] < NUM_SPLITS)
        ws_rows = splits[None, :].to(tl.int64) * ROWS_TOTAL + rows[:, None]  # (R, S)
        m_s = tl.load(M_WS + ws_rows, mask=ok, other=float("-inf"))
        l_s = tl.load(L_WS + ws_rows, mask=ok, other=0.0)
        acc_s = tl.load(ACC_WS + ws_rows[:, :, None] * HEAD_DIM_V + offs_dv[None, None, :],
                        mask=ok[:, :, None] & dv_ok[None, None, :], other=0.0)  # (R, S, DV)
        m_new = tl.maximum(m_run, tl.max(m_s, 1))
        # as in the split kernel: a row with no visible key so far keeps m = -inf without NaNs
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_run - m_safe)
        weight = tl.math.exp2(m_s - m_safe[:, None])  # 0 for empty splits (m = -inf)
        l_run = l_run * alpha + tl.sum(l_s * weight, 1)
        acc = acc * alpha[:, None] + tl.sum(acc_s * weight[:, :, None], 1)
        m_run = m_new

    empty = l_run == 0.0
    if NAN_ON_EMPTY:
        # eager softmax over a row of -inf gives NaN
        l_safe = tl.where(empty, float("nan"), l_run)
    else:
        # SDPA's convention: a row with no visible key outputs zeros
        l_safe = tl.where(empty, 1.0, l_run)
    tl.store(O + rows[:, None] * HEAD_DIM_V + offs_dv[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), (m_run + tl.math.log2(tl.where(empty, 1.0, l_run))) * LN2)
        tl.store(LSE + rows, lse, mask=row_ok)


def visible_key_range(q_len: int, kv_len: int, offset: int, window: int, causal: bool,
                      block_n: int) -> tuple[int, int, int, int]:
    """(lo, mid_lo, mid_hi, hi): keys [lo, hi) can be visible to some query row 0..L-1 (lo a
    tile start), and the tiles of [mid_lo, mid_hi) are visible to every row. The forward
    kernel's tile ranges for a single M tile holding exactly the rows 0..L-1."""
    hi = kv_len
    full_hi = (kv_len // block_n) * block_n
    if causal:
        # row i sees j <= i + offset: the last row bounds the range, the first the full band
        hi = min(hi, q_len + offset)
        full_hi = min(full_hi, ((offset + 1) // block_n) * block_n)
    hi = max(hi, 0)
    full_hi = max(full_hi, 0)
    lo = 0
    full_lo = 0
    if window != -1:
        # row i sees j > i + offset - window
        lo = (max(offset - window + 1, 0) // block_n) * block_n
        full_lo = max(cdiv(q_len + offset - window, block_n) * block_n, lo)
    mid_lo = min(full_lo, hi)
    mid_hi = min(max(full_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, max(hi, lo)


def choose_num_splits(kv_programs: int, visible_keys: int, block_n: int, sm_count: int) -> int:
    """Splits of the visible keys per (batch, K/V head): enough programs for SPLIT_WAVES per
    SM, no split shorter than MIN_TILES_PER_SPLIT tiles, at most MAX_SPLITS."""
    tiles = cdiv(visible_keys, block_n)
    wanted = cdiv(SPLIT_WAVES * sm_count, max(kv_programs, 1))
    return max(1, min(wanted, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


def _sm_count_of(device_props_or_sm_count) -> int:
    if isinstance(device_props_or_sm_count, int):
        return device_props_or_sm_count
    return int(device_props_or_sm_count.multi_processor_count)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a nominal count for the CPU (Triton's
    interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_m(rows: int) -> int:
    # tl.dot needs at least 16 rows
    return max(16, next_pow2(rows))


def use_decode_kernel(shape: AttentionShape, device_props_or_sm_count) -> bool:
    """Whether the split-KV kernel should run this call instead of the forward kernel.

    The rule: all GROUP·L query rows of a GQA group fit one M tile (at most MAX_DECODE_ROWS,
    and with the fp32 accumulator rows x padded Dv at most MAX_ACC_ELEMENTS, so it stays in
    registers), the keys are long enough to be worth splitting (S >= MIN_DECODE_KV_LEN), and
    either
    - K/V heads are shared (GROUP > 1): the forward reads each K/V head once per query head,
      this kernel once per group. Measured on an H100 (bf16, D=128, Hq=32, Hkv=8, L=1), it
      wins even with the GPU full: B=32, S=4096: 198 us against the forward's 295; or
    - the forward would launch fewer than FORWARD_FILL_WAVES programs per SM (it launches
      cdiv(L, 64)·B·Hq programs at best, one per (batch, query head) here), so it would leave
      SMs idle while each program walks all S keys alone. With K/V not shared and the GPU
      full, the forward is as fast or faster (MHA, B=16, Hq=32, S=4096: 351 us against 387).

    device_props_or_sm_count: ``torch.cuda.get_device_properties(...)`` or its
    ``multi_processor_count``.
    """
    sm_count = _sm_count_of(device_props_or_sm_count)
    L, S = shape.q_len, shape.kv_len
    if L == 0 or shape.kv_heads == 0:
        return False
    rows = shape.group * L
    if rows > MAX_DECODE_ROWS:
        return False
    block_dv = max(16, next_pow2(max(shape.head_dim, shape.v_head_dim)))
    if _block_m(rows) * block_dv > MAX_ACC_ELEMENTS:
        return False
    if S < MIN_DECODE_KV_LEN:
        return False
    if shape.group > 1:
        return True
    forward_programs = cdiv(L, 64) * shape.batch * shape.q_heads
    return forward_programs < FORWARD_FILL_WAVES * sm_count


def _gpu_config(block_d: int, block_dv: int, dtype: torch.dtype) -> dict:
    # K and V tiles of num_stages stages in shared memory: at most ~130 KiB. Half types at
    # D <= 128 measured on an H100 (64/4/2 best or within noise of the best among BLOCK_N
    # 64/128, 4/8 warps, 2/3 stages); fp32 and D > 128 are not tuned.
    width = max(block_d, block_dv)
    if dtype == torch.float32:
        if width <= 64:
            return dict(BLOCK_N=64, num_warps=4, num_stages=3)
        return dict(BLOCK_N=32 if width > 128 else 64, num_warps=4, num_stages=2)
    if width <= 64:
        return dict(BLOCK_N=128, num_warps=4, num_stages=3)
    return dict(BLOCK_N=64, num_warps=4, num_stages=2)


def attention_decode_triton(
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
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_forward_triton`` for few query rows, by splitting the keys.

    Same arguments and outputs: out (B, Hq, L, Dv) in q.dtype and lse (B, Hq, L) fp32 natural
    log (or an empty (0,) tensor when not return_lse). num_splits forces the number of key
    splits (tests); None chooses it from B·Hkv, the visible keys and the SM count.
    """
    B, Hq, Hkv, L, S = shape.batch, shape.q_heads, shape.kv_heads, shape.q_len, shape.kv_len
    D, DV = shape.head_dim, shape.v_head_dim
    rows_per_group = shape.group * L
    if rows_per_group > 2 * MAX_DECODE_ROWS:
        raise ValueError(
            f"the split-KV decode kernel stacks GROUP*L = {shape.group}*{L} = {rows_per_group} "
            f"query rows in one tile, more than {2 * MAX_DECODE_ROWS}; call it only where "
            "use_decode_kernel(shape, sm_count) is True"
        )
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    out = torch.empty((B, Hq, L, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L) if return_lse else (0,), dtype=torch.float32, device=q.device)
    if L == 0 or B * Hq == 0:
        return out, lse
    if S == 0:
        out.fill_(float("nan") if nan_on_empty else 0.0)
        lse.fill_(float("-inf"))
        return out, lse

    mask_kind, mask, mstrides, kpm, pstrides, qk_scale, softcap_log2, block_d, block_dv = (
        launch_params(q, attn_mask, key_padding_mask, shape, scale, softcap))
    # What the launches below decide from and Triton specializes on (kernels/launch.py): a
    # later call with the same key launches the compiled kernels of this one directly.
    # Under SDPA_PASS_DECODE_SHARED_PLANS=1 the launches' own keys (_shared_key) replace the
    # layout: the plan is then the variables alone (None with plans off, as always).
    shared = os.environ.get("SDPA_PASS_DECODE_SHARED_PLANS", "") == "1"
    plan = call_key() if shared else call_key(
        tensor_key(q), tensor_key(k), tensor_key(v), tensor_key(attn_mask),
        tensor_key(key_padding_mask), causal_align, diagonal, window, softcap > 0.0,
        nan_on_empty, return_lse, num_splits)
    shared = shared and plan is not None

    has_softcap = softcap > 0.0
    interpreting = interpreter_active()
    # The interpreter's tl.dot is wrong on bf16 operands (triton 3.9); fp32 there is exact.
    dot_upcast = interpreting and q.dtype == torch.bfloat16
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if interpreting:
        config, sms = _INTERPRETER_CONFIG, _INTERPRETER_SM_COUNT
    else:
        config, sms = _gpu_config(block_d, block_dv, q.dtype), sm_count(q.device)
    block_n = config["BLOCK_N"]

    is_causal = causal_align != CAUSAL_NONE
    offset = causal_offset(causal_align, diagonal, L, S)
    kv_lo, mid_lo, mid_hi, kv_hi = visible_key_range(L, S, offset, window, is_causal, block_n)
    visible_tiles = cdiv(kv_hi - kv_lo, block_n)
    if num_splits is None:
        num_splits = choose_num_splits(B * Hkv, kv_hi - kv_lo, block_n, sms)
    # whole tiles per split; with more splits than tiles the last ones see no key
    chunk = max(cdiv(visible_tiles, num_splits), 1) * block_n

    rows_total = B * Hq * L
    acc_ws = torch.empty((num_splits, rows_total, DV), dtype=torch.float32, device=q.device)
    m_ws = torch.empty((num_splits, rows_total), dtype=torch.float32, device=q.device)
    l_ws = torch.empty((num_splits, rows_total), dtype=torch.float32, device=q.device)

    # A bool mask that is one row of keys is read as that row (a vector per key tile) and
    # bounds the split's visible keys, but only where it serves every stacked row: the group's
    # query heads share it. Otherwise each stacked row reads its own head's mask as a tile.
    kernel_mask = mask_kind_of(mask_kind, mstrides, L)
    if kernel_mask == MASK_BOOL_ROW and not (mstrides[1] == 0 or shape.group == 1):
        kernel_mask = mask_kind
    split_args = (
        q, k, v, mask, kpm, acc_ws, m_ws, l_ws,
        qk_scale, softcap_log2,
        *q.stride(), *k.stride(), *v.stride(), *mstrides, *pstrides,
        Hkv, L, S, shape.group, offset, window, rows_total,
        kv_lo, mid_lo, mid_hi, kv_hi, chunk)
    split_params = dict(
        HEAD_DIM=D, HEAD_DIM_V=DV, BLOCK_D=block_d, BLOCK_DV=block_dv,
        MASK_KIND=kernel_mask, HAS_KPM=key_padding_mask is not None,
        IS_CAUSAL=is_causal, HAS_WINDOW=window != -1, HAS_SOFTCAP=has_softcap,
        DOT_UPCAST=dot_upcast, DOT_PRECISION=dot_precision,
        KEY_SPAN=key_span(kernel_mask == MASK_BOOL_ROW, key_padding_mask is not None),
        BLOCK_M=_block_m(rows_per_group), **config,
    )
    split_grid = (B * Hkv, num_splits)
    split_key = (_shared_key(plan, "split", split_args, split_params, split_grid) if shared
                 else plan and (plan, "split"))
    if split_key is None or split_key not in _DECODE_CALLS:  # a new plan (launch.kernel_log)
        log_kernel_choice("decode", shape, q.dtype,
                          f"split-KV Triton, {num_splits} key splits of up to {chunk} keys")
    launch_fixed(_DECODE_CALLS, split_key, _decode_split_kernel, split_grid, split_args,
                 split_params)
    # The merge loads (rows x splits x Dv) fp32 tiles of at most _MERGE_TILE elements: every
    # split at once where it fits. The interpreter takes 2 splits per step, so tests with 3+
    # splits cross a step.
    if interpreting:
        merge_rows, merge_splits = 16, 2
    else:
        merge_splits = min(next_pow2(num_splits), max(_MERGE_TILE // block_dv, 1))
        merge_rows = max(_MERGE_TILE // (merge_splits * block_dv), 1)
    merge_grid = (cdiv(rows_total, merge_rows),)
    merge_args = (acc_ws, m_ws, l_ws, out, lse, rows_total, num_splits)
    merge_params = dict(HEAD_DIM_V=DV, BLOCK_DV=block_dv, BLOCK_R=merge_rows,
                        BLOCK_S=merge_splits, NAN_ON_EMPTY=nan_on_empty, STORE_LSE=return_lse,
                        num_warps=4)
    merge_key = (_shared_key(plan, "merge", merge_args, merge_params, merge_grid) if shared
                 else plan and (plan, "merge"))
    launch_fixed(_DECODE_CALLS, merge_key, _decode_merge_kernel, merge_grid, merge_args,
                 merge_params)
    return out, lse


def _shared_key(plan: tuple, site: str, args, params: dict, grid: tuple):
    """Under SDPA_PASS_DECODE_SHARED_PLANS=1, a launch's plan key that leaves the cache length
    out: the call's ``plan`` (its variables), the launch ``site``, what Triton specializes the
    compiled kernel on (``launch.specialization_classes``), the meta-parameters and the grid.
    Each step of a growing cache (a new length every step, so a new key under the default
    per-layout key) then runs the compiled kernel of an earlier step with the same classes,
    number of splits and grid, through ``KernelCall``, instead of Triton's own launch path."""
    classes = specialization_classes(args)
    return None if classes is None else (plan, site, classes, tuple(params.items()), grid)


# Compiled decode launches by (call key, launch site) (kernels/launch.py).
_DECODE_CALLS = PlanCache()
