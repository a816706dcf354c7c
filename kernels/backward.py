"""Backward attention kernels in Triton (FlashAttention-2 style), from the forward's LSE.

Two kernels after a preprocess step (delta_i = rowsum(dO_i * O_i)):
- dK/dV: one program per key tile of one K/V head. It walks the query tiles that can see its
  keys, for every query head of its GQA group, so the group's dK/dV are summed in registers:
  no atomics, no repeated K/V, and a deterministic order.
- dQ: one program per query tile of one query head, walking the key tiles it can see (and,
  when a float mask needs its gradient, writing dS so the caller reduces it to the mask's
  broadcast shape).
Both recompute P = exp(S - LSE) tile by tile; no L×S matrix is saved. Masks, causal offsets,
windows, key padding and soft-capping come from the forward's ``masked_scores``, so they mean
exactly what they mean there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import CAUSAL_NONE, AttentionShape, causal_offset
from .dropout import dropout_keep, keep_scale
from .forward import LOG2E, LOG2E_C, MASK_BOOL, MASK_FLOAT, MASK_NONE, interpreter_active, masked_scores


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KPM, SEED,
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
    HKV, L, S, GROUP, offset, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // HKV).to(tl.int64)
    off_hkv = (pid_bh % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd
    kT = tl.load(k_ptrs, mask=(offs_n[None, :] < S) & (offs_d[:, None] < HEAD_DIM), other=0.0)
    vT = tl.load(v_ptrs, mask=(offs_n[None, :] < S) & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
    if DOT_UPCAST:
        kT = kT.to(tl.float32)
        vT = vT.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)

    # Query rows that can see a key of this tile: i >= j - offset (causal), i < j - offset + window.
    lo = 0
    hi = L
    if IS_CAUSAL:
        lo = tl.maximum(start_n - offset, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 - offset + window)
    kpm_base = KPM + off_b * stride_pb
    seed0 = 0
    seed1 = 0
    if DROPOUT:
        seed0 = tl.load(SEED).to(tl.uint32)
        seed1 = tl.load(SEED + 1).to(tl.uint32)
    for g in range(0, GROUP):
        off_h = off_hkv * GROUP + g
        bh = off_b * (HKV * GROUP) + off_h  # the forward's batch·query-head index
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        mask_base = MASK + off_b * stride_mb + off_h * stride_mh
        l_base = LSE + off_b * stride_lb + off_h * stride_lh
        d_base = DELTA + off_b * stride_lb + off_h * stride_lh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=(offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            if DOT_UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(l_base + offs_m, mask=offs_m < L, other=float("inf")) * LOG2E_C
            # rows with no visible key have lse = -inf: make their P exactly 0
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(d_base + offs_m, mask=offs_m < L, other=0.0)
            # rows past L have q = 0 and lse = +inf below: P = 0 there
            s, t = masked_scores(tl.dot(q, kT, input_precision=DOT_PRECISION), offs_m, offs_n,
                                 mask_base, kpm_base, stride_mm, stride_mn, stride_pn, L, S,
                                 offset, window, qk_scale, softcap_log2, MASK_KIND, HAS_KPM,
                                 IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, True)
            p = tl.math.exp2(s - lse[:, None])                          # (M, N)
            dp = tl.dot(do, vT, input_precision=DOT_PRECISION)          # (M, N)
            if DROPOUT:
                # O = (P * Z) V with Z = keep / (1 - p): dV sees P * Z, dP is Z * dO Vᵀ
                keep = dropout_keep(seed0, seed1, bh, offs_m, offs_n, dropout_p)
                dv += tl.dot(tl.trans(tl.where(keep, p * dropout_scale, 0.0).to(do.dtype)), do,
                             input_precision=DOT_PRECISION)
                dp = tl.where(keep, dp * dropout_scale, 0.0)
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    dk_ptrs = DK + off_b * stride_dkb + off_hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + off_b * stride_dvb + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DS, MASK, KPM, SEED,
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
    H, L, S, GROUP, offset, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, STORE_DS: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, mask=offs_m < L, other=float("inf")) * LOG2E_C
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + off_b * stride_lb + off_h * stride_lh + offs_m, mask=offs_m < L, other=0.0)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    mask_base = MASK + off_b * stride_mb + off_h * stride_mh
    kpm_base = KPM + off_b * stride_pb
    seed0 = 0
    seed1 = 0
    if DROPOUT:
        seed0 = tl.load(SEED).to(tl.uint32)
        seed1 = tl.load(SEED + 1).to(tl.uint32)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    lo = 0
    hi = S
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(hi, start_m + BLOCK_M + offset), 0)
    if HAS_WINDOW:
        lo = tl.maximum(start_m + offset - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < S) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=(offs_n[None, :] < S) & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        if DOT_UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s, t = masked_scores(tl.dot(q, kT, input_precision=DOT_PRECISION), offs_m, offs_n,
                             mask_base, kpm_base, stride_mm, stride_mn, stride_pn, L, S, offset,
                             window, qk_scale, softcap_log2, MASK_KIND, HAS_KPM, IS_CAUSAL,
                             HAS_WINDOW, HAS_SOFTCAP, True)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed0, seed1, pid_bh, offs_m, offs_n, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])        # gradient of the (scaled, biased) scores
        if STORE_DS:
            tl.store(DS + off_b * stride_sb + off_h * stride_sh + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                     ds, mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM))


def _config(head_dim_pad: int, dtype: torch.dtype) -> dict:
    if interpreter_active():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    # Not tuned yet (the Hopper performance issue): dK and dV accumulate in registers, so
    # wide head dims take 8 warps to keep them from spilling.
    if dtype == torch.float32 or head_dim_pad > 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim_pad > 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def attention_backward_triton(
    grad_out, q, k, v, attn_mask, key_padding_mask, out, lse, shape: AttentionShape, *,
    scale: float, causal_align: int, diagonal: int, window: int, softcap: float,
    need_mask_grad: bool, grad_lse=None, dropout_p: float = 0.0, dropout_seed=None,
):
    """(dq, dk, dv, dmask) from the forward's output and natural-log LSE (B, Hq, L).

    ``grad_lse`` (or None): gradient of the LSE output. d lse_i / d s_ij = P_ij, so it only
    shifts delta: dS = P * (dP - (rowsum(dO * O) - grad_lse))."""
    B, Hq, Hkv, L, S = shape.batch, shape.q_heads, shape.kv_heads, shape.q_len, shape.kv_len
    D, DV = shape.head_dim, shape.v_head_dim
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    dmask = q.new_empty((0,))
    if L == 0 or S == 0:
        if need_mask_grad:
            dmask = torch.zeros_like(attn_mask)
        return dq, dk, dv, dmask
    # preprocess: delta_i = rowsum(dO_i * O_i), fp32
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()

    if attn_mask is None:
        mask_kind, mask, mstrides = MASK_NONE, q, (0, 0, 0, 0)
    else:
        mask_kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_FLOAT
        mask = attn_mask.expand(B, Hq, L, S)
        mstrides = mask.stride()
    kpm = key_padding_mask if key_padding_mask is not None else q
    pstrides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    has_softcap = softcap > 0.0
    if has_softcap:
        qk_scale, softcap_log2 = scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_log2 = scale * LOG2E, 0.0
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(DV))
    cfg = _config(max(block_d, block_dv), q.dtype)
    common = dict(
        HEAD_DIM=D, HEAD_DIM_V=DV, BLOCK_D=block_d, BLOCK_DV=block_dv,
        MASK_KIND=mask_kind, HAS_KPM=key_padding_mask is not None,
        IS_CAUSAL=causal_align != CAUSAL_NONE, HAS_WINDOW=window != -1, HAS_SOFTCAP=has_softcap,
        DROPOUT=dropout_p > 0.0,
        DOT_UPCAST=interpreter_active() and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **cfg,
    )
    offset = causal_offset(causal_align, diagonal, L, S)
    seed = dropout_seed if dropout_p > 0.0 else q
    grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
    _bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * Hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, mask, kpm, seed,
        qk_scale, softcap_log2, scale, dropout_p, keep_scale(dropout_p),
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *mstrides, *pstrides, *lse.stride()[:2],
        Hkv, L, S, shape.group, offset, window, **common,
    )
    ds = torch.zeros((B, Hq, L, S), dtype=torch.float32, device=q.device) if need_mask_grad else q
    sstrides = ds.stride() if need_mask_grad else (0, 0, 0, 0)
    _bwd_dq_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * Hq)](
        q, k, v, grad_out, lse, delta, dq, ds, mask, kpm, seed,
        qk_scale, softcap_log2, scale, dropout_p, keep_scale(dropout_p),
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *sstrides,
        *mstrides, *pstrides, *lse.stride()[:2],
        Hq, L, S, shape.group, offset, window, STORE_DS=need_mask_grad, **common,
    )
    if need_mask_grad:
        # dS is zero where the kernels skipped tiles; sum it over the mask's broadcast dims
        dmask = _reduce_to(ds, attn_mask.shape).to(attn_mask.dtype)
    return dq, dk, dv, dmask


def _reduce_to(x: torch.Tensor, shape) -> torch.Tensor:
    lead = x.dim() - len(shape)
    x = x.sum(dim=tuple(range(lead))) if lead > 0 else x
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x
