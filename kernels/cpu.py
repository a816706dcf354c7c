"""The PyTorch paths: the forward when Triton cannot run (CPU tensors without
``TRITON_INTERPRET=1``), and the backward there and wherever the Triton backward does not
apply (a forward run without its LSE, rows masked everywhere by a finite fill).

Forward, two routes, both exact for what they accept:
- PyTorch's own fused CPU attention (``F.scaled_dot_product_attention``) when the call means
  exactly what SDPA computes: no mask tensor, no padding, no soft-cap, no window, and either no
  causal mask or SDPA's top-left one. None of those calls can have a row with every key masked,
  so SDPA's zero-for-empty-rows convention never differs from eager's NaN.
- Otherwise a chunked fp32 computation that never holds more than a block of query rows'
  scores at once.

Backward: the same chunks, FlashAttention-2's equations (dS = P * (dP - D) with the
D = rowsum(dO * O) preprocess), in fp32.

Forward and backward read their scores from one place, ``score_chunks``: scale, soft-cap,
additive bias, and every visibility rule (causal band, window, key padding, bool mask).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .checks import CAUSAL_NONE, CAUSAL_TOP_LEFT, AttentionShape, causal_offset
from .dropout import keep_mask, keep_scale

# Scores held at once by the chunked forward, in elements (about 64 MiB of fp32). The backward
# keeps four such blocks alive (scores, P, dP, dS), so it takes a quarter as many rows.
_CHUNK_ELEMENTS = 1 << 24
_BACKWARD_BLOCKS = 4
# Mask values at or below this are fills (finfo.min-like), not biases, under mask_fills.
FILL_THRESHOLD = -1e30
# Generating a chunk's dropout draws keeps about a dozen int64 blocks alive.
_DROPOUT_BLOCKS = 24


@dataclasses.dataclass(frozen=True)
class ScoreChunk:
    """Query rows [start, stop) against every key, for every (batch, query head)."""

    start: int
    stop: int
    # (B, Hkv, G*rows, D) fp32: the rows' queries grouped under their K/V head.
    q: torch.Tensor
    # (B, Hq, rows, S) fp32: scaled, soft-capped, bias added; -inf where a key is not visible.
    scores: torch.Tensor
    # tanh(scaled / softcap) when soft-capping (the backward needs its derivative), else None.
    capped: Optional[torch.Tensor]
    # (B, Hq, rows, S): 1 / (1 - p) where a probability is kept, 0 where dropped; None without
    # dropout.
    dropout_scale: Optional[torch.Tensor]


def score_chunks(
    q, k, attn_mask, key_padding_mask, shape: AttentionShape, *,
    scale: float, causal_align: int, diagonal: int, window: int, softcap: float,
    dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None, blocks_alive: int = 1,
    compute_dtype: torch.dtype = torch.float32, whole: bool = False,
) -> Iterator[ScoreChunk]:
    """The attention scores, a block of query rows at a time, as the op's semantics define them.

    GQA without copies: the G query heads of a K/V head are reshaped into one (G*rows) matrix
    against that head's keys, so K is read once per K/V head, never repeated. A chunk has as
    many rows as keep ``blocks_alive`` score-sized blocks within ``_CHUNK_ELEMENTS``; ``whole``
    yields every row in one chunk instead (the float64 reference of ``reference.py``, traced
    with symbolic sizes, which a loop over the rows would specialise). The scores are
    computed in ``compute_dtype``.
    """
    B, Hq, Hkv, L, S = shape.batch, shape.q_heads, shape.kv_heads, shape.q_len, shape.kv_len
    kt = k.to(compute_dtype).transpose(-2, -1)
    offset = causal_offset(causal_align, diagonal, L, S)
    mask = None if attn_mask is None else attn_mask.expand(B, Hq, L, S)
    if dropout_p > 0.0:
        blocks_alive += _DROPOUT_BLOCKS
        batch_head = torch.arange(B * Hq, device=q.device).reshape(B, Hq, 1, 1)
    if whole:
        bounds = [(0, L)]
    elif B == 0 or Hq == 0:
        bounds = []  # no rows; grouping the heads by K/V head would divide by zero
    else:
        rows = max(1, min(L, _CHUNK_ELEMENTS // (blocks_alive * max(1, B * Hq * S))))
        bounds = [(start, min(L, start + rows)) for start in range(0, L, rows)]
    cols = torch.arange(S, device=q.device)
    for start, stop in bounds:
        qc = group_by_kv_head(q[:, :, start:stop].to(compute_dtype), Hkv)
        s = ungroup(qc @ kt, Hq) * scale
        capped = None
        if softcap > 0.0:
            capped = torch.tanh(s / softcap)
            s = softcap * capped
        visible = torch.ones((1, 1, stop - start, S), dtype=torch.bool, device=q.device)
        if causal_align != CAUSAL_NONE:
            i = torch.arange(start, stop, device=q.device)[:, None]
            visible = visible & (cols[None, :] <= i + offset)
            if window != -1:
                visible = visible & (cols[None, :] > i + offset - window)
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, None, :]
        if mask is not None:
            mc = mask[:, :, start:stop]
            if mc.dtype == torch.bool:
                visible = visible & mc
            else:
                s = s + mc.to(compute_dtype)
        dropout_scale = None
        if dropout_p > 0.0:
            i = torch.arange(start, stop, device=q.device)[:, None]
            dropout_scale = keep_mask(dropout_seed, batch_head, i, cols, dropout_p) * keep_scale(dropout_p)
        yield ScoreChunk(start, stop, qc, s.masked_fill(~visible, float("-inf")), capped, dropout_scale)


def softmax_rows(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, lse) of fp32 scores over the last dim; rows with no visible key get P = 0, lse = -inf.

    P is normalised by the row's own sum rather than computed as exp(s - lse): when every score
    of a row is near finfo(float32).min (HF's additive padding mask), lse = max + log(n) rounds
    to max in fp32 and exp(s - lse) would weigh each key 1 instead of 1/n (the row sums its
    values instead of averaging them); at fp16's finfo.min (-65504) the same rounding costs
    about 1e-3 relative.
    """
    if scores.shape[-1] == 0:
        return scores, scores.new_full(scores.shape[:-1], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # an empty row's max is -inf; shifting by 0 instead keeps exp(-inf) = 0 rather than NaN
    shifted = torch.exp(scores - row_max.masked_fill(row_max == float("-inf"), 0.0))
    row_sum = shifted.sum(dim=-1, keepdim=True)
    p = shifted / row_sum.masked_fill(row_sum == 0.0, 1.0)
    return p, (row_max + torch.log(row_sum)).squeeze(-1)


def group_by_kv_head(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, rows, N) -> (B, Hkv, G*rows, N): query head h sits under K/V head h // G."""
    B, Hq, rows, N = x.shape
    return x.reshape(B, kv_heads, (Hq // kv_heads) * rows, N)


def ungroup(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """(B, Hkv, G*rows, N) -> (B, Hq, rows, N), the inverse of ``group_by_kv_head``."""
    B, Hkv, grouped_rows, N = x.shape
    return x.reshape(B, q_heads, grouped_rows * Hkv // q_heads, N)


def attention_forward_cpu(
    q, k, v, attn_mask, key_padding_mask, shape: AttentionShape, *,
    scale: float, causal_align: int, diagonal: int, window: int, softcap: float,
    nan_on_empty: bool, return_lse: bool, dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    sdpa_exact = (
        dropout_p == 0.0 and attn_mask is None and key_padding_mask is None and softcap == 0.0 and window == -1
        and (causal_align == CAUSAL_NONE or (causal_align == CAUSAL_TOP_LEFT and diagonal == 0))
        and not return_lse and shape.q_len > 0 and shape.kv_len > 0
        # torch 2.11's CPU SDPA kernel dies with SIGFPE (integer division by zero) on an empty
        # batch or no heads
        and shape.batch > 0 and shape.q_heads > 0
        # SDPA's CPU kernel outputs zeros for a row whose scores are all NaN or -inf (a NaN or
        # inf in q or k), where eager softmax gives NaN
        and bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())
    )
    if sdpa_exact:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal_align == CAUSAL_TOP_LEFT, scale=scale,
            enable_gqa=shape.q_heads != shape.kv_heads,
        )
        return out.contiguous(), q.new_empty((0,), dtype=torch.float32)
    return _chunked_attention(
        q, k, v, attn_mask, key_padding_mask, shape, scale=scale, causal_align=causal_align,
        diagonal=diagonal, window=window, softcap=softcap, nan_on_empty=nan_on_empty,
        return_lse=return_lse, dropout_p=dropout_p, dropout_seed=dropout_seed,
    )


def _chunked_attention(
    q, k, v, attn_mask, key_padding_mask, shape: AttentionShape, *,
    scale, causal_align, diagonal, window, softcap, nan_on_empty, return_lse, dropout_p,
    dropout_seed,
):
    B, Hq, Hkv, L = shape.batch, shape.q_heads, shape.kv_heads, shape.q_len
    out = torch.empty((B, Hq, L, shape.v_head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L) if return_lse else (0,), dtype=torch.float32, device=q.device)
    vf = v.float()
    for chunk in score_chunks(
        q, k, attn_mask, key_padding_mask, shape, scale=scale, causal_align=causal_align,
        diagonal=diagonal, window=window, softcap=softcap, dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    ):
        rows = slice(chunk.start, chunk.stop)
        p, row_lse = softmax_rows(chunk.scores)
        if chunk.dropout_scale is not None:
            p = p * chunk.dropout_scale
        o = ungroup(group_by_kv_head(p, Hkv) @ vf, Hq)
        if nan_on_empty:
            o = o.masked_fill((row_lse == float("-inf"))[..., None], float("nan"))
        out[:, :, rows] = o.to(q.dtype)
        if return_lse:
            lse[:, :, rows] = row_lse
    return out, lse


def attention_backward_chunked(
    grad_out, q, k, v, attn_mask, key_padding_mask, out, grad_lse, shape: AttentionShape, *,
    scale: float, causal_align: int, diagonal: int, window: int, softcap: float,
    need_mask_grad: bool, dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None,
    mask_fills: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradients of the op, a block of query rows at a time, in fp32.

    Returns (dq, dk, dv, dmask) in the inputs' dtypes; dmask has attn_mask's own (broadcast)
    shape, or is empty unless ``need_mask_grad``. ``grad_lse`` (or None) is the gradient of
    the returned LSE: d lse / d s = P, so it enters as a shift of D. Rows with no visible key
    contribute nothing: their dO is dropped (the forward's output there is 0 or NaN, not a
    function of the inputs).

    ``mask_fills``: attn_mask values <= FILL_THRESHOLD replaced their scores (masked_fill), so
    dS is 0 there, for the scores and the mask alike.

    Each chunk holds whole rows, so P comes from the row's own max and sum (``softmax_rows``)
    and the forward's LSE is not needed; tiled Triton kernels that see a block of keys at a time
    will recompute P = exp(s - lse) from it instead.
    """
    B, Hq, Hkv, S = shape.batch, shape.q_heads, shape.kv_heads, shape.kv_len
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros((B, Hkv, S, shape.head_dim), dtype=torch.float32, device=q.device)
    dv = torch.zeros((B, Hkv, S, shape.v_head_dim), dtype=torch.float32, device=q.device)
    if need_mask_grad:
        # fp32 accumulator in the mask's own shape, left-padded to rank 4
        dmask = torch.zeros((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape),
                            dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    for chunk in score_chunks(
        q, k, attn_mask, key_padding_mask, shape, scale=scale, causal_align=causal_align,
        diagonal=diagonal, window=window, softcap=softcap, dropout_p=dropout_p,
        dropout_seed=dropout_seed, blocks_alive=_BACKWARD_BLOCKS,
    ):
        rows = slice(chunk.start, chunk.stop)
        p, row_lse = softmax_rows(chunk.scores)
        empty = (row_lse == float("-inf"))[..., None]
        do = grad_out[:, :, rows].float().masked_fill(empty, 0.0)
        # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, FlashAttention-2's preprocess: it lets
        # dS = P * (dP - D) be formed a key block at a time. Empty rows may hold NaN in O.
        delta = (do * out[:, :, rows].float()).sum(dim=-1, keepdim=True).masked_fill(empty, 0.0)
        if grad_lse is not None:
            delta = delta - grad_lse[:, :, rows, None].float().masked_fill(empty, 0.0)
        do = group_by_kv_head(do, Hkv)
        # with dropout O = (P * Z) V, Z = keep / (1 - p): dV sees P * Z and dP is Z * dO Vᵀ
        pz = p if chunk.dropout_scale is None else p * chunk.dropout_scale
        dv += group_by_kv_head(pz, Hkv).transpose(-2, -1) @ do
        dp = ungroup(do @ vf.transpose(-2, -1), Hq)
        if chunk.dropout_scale is not None:
            dp = dp * chunk.dropout_scale
        ds = p * (dp - delta)  # gradient of the masked scores, which the bias is added to
        if mask_fills and attn_mask is not None and attn_mask.is_floating_point():
            filled = attn_mask.expand(B, Hq, shape.q_len, S)[:, :, rows] <= FILL_THRESHOLD
            ds = ds.masked_fill(filled, 0.0)
        if need_mask_grad:
            target = dmask.shape[:2] + (1 if dmask.shape[2] == 1 else chunk.stop - chunk.start,
                                        dmask.shape[3])
            if dmask.shape[2] == 1:
                dmask += ds.sum_to_size(target)
            else:
                dmask[:, :, rows] += ds.sum_to_size(target)
        if chunk.capped is not None:
            ds = ds * (1.0 - chunk.capped * chunk.capped)  # d(cap * tanh(x / cap)) / dx
        ds = group_by_kv_head(ds * scale, Hkv)
        dq[:, :, rows] = ungroup(ds @ kf, Hq).to(q.dtype)
        dk += ds.transpose(-2, -1) @ chunk.q
    dmask_out = (
        dmask.reshape(attn_mask.shape).to(attn_mask.dtype) if need_mask_grad
        else q.new_empty((0,))
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype), dmask_out
