"""The CPU path used when Triton cannot run (CPU tensors without ``TRITON_INTERPRET=1``).

Two routes, both exact for what they accept:
- PyTorch's own fused CPU attention (``F.scaled_dot_product_attention``) when the call means
  exactly what SDPA computes: no mask tensor, no padding, no soft-cap, no window, and either no
  causal mask or SDPA's top-left one. None of those calls can have a row with every key masked,
  so SDPA's zero-for-empty-rows convention never differs from eager's NaN.
- Otherwise a chunked fp32 computation that never holds more than a block of query rows'
  scores at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import CAUSAL_NONE, CAUSAL_TOP_LEFT, AttentionShape, causal_offset

# Scores held at once by the chunked path, in elements (about 64 MiB of fp32).
_CHUNK_ELEMENTS = 1 << 24


def attention_forward_cpu(
    q, k, v, attn_mask, key_padding_mask, shape: AttentionShape, *,
    scale: float, causal_align: int, diagonal: int, window: int, softcap: float,
    nan_on_empty: bool, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    sdpa_exact = (
        attn_mask is None and key_padding_mask is None and softcap == 0.0 and window == -1
        and (causal_align == CAUSAL_NONE or (causal_align == CAUSAL_TOP_LEFT and diagonal == 0))
        and not return_lse and shape.q_len > 0 and shape.kv_len > 0
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
        return_lse=return_lse,
    )


def _chunked_attention(
    q, k, v, attn_mask, key_padding_mask, shape: AttentionShape, *,
    scale, causal_align, diagonal, window, softcap, nan_on_empty, return_lse,
):
    B, Hq, Hkv, L, S = shape.batch, shape.q_heads, shape.kv_heads, shape.q_len, shape.kv_len
    G = shape.group
    out = torch.empty((B, Hq, L, shape.v_head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L) if return_lse else (0,), dtype=torch.float32, device=q.device)
    if L == 0:
        return out, lse
    # Group query heads under their K/V head instead of repeating K/V: (B, Hkv, G*rows, D).
    kf = k.float()
    vf = v.float()
    offset = causal_offset(causal_align, diagonal, L, S)
    mask = None if attn_mask is None else attn_mask.expand(B, Hq, L, S)
    rows = max(1, min(L, _CHUNK_ELEMENTS // max(1, B * Hq * S)))
    cols = torch.arange(S, device=q.device)
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, G * (r1 - r0), -1)
        s = (qc @ kf.transpose(-2, -1)).reshape(B, Hq, r1 - r0, S) * scale
        if softcap > 0.0:
            s = softcap * torch.tanh(s / softcap)
        visible = torch.ones((1, 1, r1 - r0, S), dtype=torch.bool, device=q.device)
        if causal_align != CAUSAL_NONE:
            i = torch.arange(r0, r1, device=q.device)[:, None]
            visible = visible & (cols[None, :] <= i + offset)
            if window != -1:
                visible = visible & (cols[None, :] > i + offset - window)
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, None, :]
        if mask is not None:
            mc = mask[:, :, r0:r1]
            if mc.dtype == torch.bool:
                visible = visible & mc
            else:
                s = s + mc.float()
        s = s.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        empty = row_lse == float("-inf")
        p = torch.exp(s - torch.where(empty, 0.0, row_lse)[..., None])
        o = (p.reshape(B, Hkv, G * (r1 - r0), S) @ vf).reshape(B, Hq, r1 - r0, -1)
        if nan_on_empty:
            o = o.masked_fill(empty[..., None], float("nan"))
        out[:, :, r0:r1] = o.to(q.dtype)
        if return_lse:
            lse[:, :, r0:r1] = row_lse
    return out, lse
