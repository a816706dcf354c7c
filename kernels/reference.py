"""The float64 math reference: the op's semantics written with differentiable torch ops.

``attention_math`` takes the arguments of ``torch.ops.sdpa_pass.attention_forward`` and means
exactly what that op means (see its docstring in ``ops.py``), but computes in float64 on any
device and casts the output back to the query's dtype. It is a plain function, not a custom
op: a rewritten graph that calls it is traced through by Dynamo, AOTAutograd and Inductor like
any torch code, and its gradients come from autograd. ``sdpa_pass.implementation("math")``
puts it behind rewritten sites, to debug (does a wrong answer come from our kernels or from
the rewrite?) and to compare. It holds every score at once: a debugging tool, not a kernel.

The scores come from ``cpu.score_chunks`` (one chunk, in float64) and the row softmax from
``cpu.softmax_rows``, the definitions the op's CPU path uses too.
"""

from __future__ import annotations

from typing import Optional

import torch

from .checks import AttentionShape
from .cpu import FILL_THRESHOLD, group_by_kv_head, score_chunks, softmax_rows, ungroup


def attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
    causal_align: int,
    diagonal: int,
    window: int,
    softcap: float,
    nan_on_empty: bool,
    return_lse: bool,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
    mask_fills: bool = False,
    uniform_on_empty: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, L, Dv) in q's dtype, lse (B, Hq, L) fp32 or empty), computed in float64.

    Gradients, by autograd, follow the op's rules: rows with no visible key pass nothing back;
    with ``mask_fills`` no gradient reaches a score (or the mask) a fill replaced; a uniform
    row (``uniform_on_empty``) passes a uniform softmax's gradient to q and k, or with
    ``mask_fills`` nothing (only V's mean depends on the inputs). No dropout: its keep
    decisions are the Triton kernels' own, so there is nothing independent to check them by.
    Unlike the kernels, any head dim and any floating dtype.
    """
    if dropout_p > 0.0:
        raise ValueError("the math reference has no dropout; use the attention op for dropout_p > 0")
    shape = _shape(q, k, v)
    if uniform_on_empty and softcap > 0.0:
        raise ValueError("uniform_on_empty cannot be combined with softcap: the probabilities "
                         "of a uniform row would no longer be 1/S")
    Hq, Hkv, S = shape.q_heads, shape.kv_heads, shape.kv_len
    qd, kd, vd = q.double(), k.double(), v.double()
    (chunk,) = score_chunks(
        qd, kd, attn_mask, key_padding_mask, shape, scale=scale, causal_align=causal_align,
        diagonal=diagonal, window=window, softcap=softcap, compute_dtype=torch.float64,
        whole=True,
    )
    scores = chunk.scores
    if mask_fills and attn_mask is not None and attn_mask.is_floating_point():
        # where a fill replaced the score, score + fill rounds to the fill (in float64 too, for
        # fills near finfo(float32).min); detaching keeps that value and passes no gradient
        filled = attn_mask.expand(scores.shape) <= FILL_THRESHOLD
        scores = torch.where(filled, scores.detach(), scores)
    p, lse = softmax_rows(scores)
    empty = (lse == float("-inf"))[..., None]
    if uniform_on_empty:
        if mask_fills:
            uniform = (torch.ones_like(p) / S).detach()
        else:
            # eager's row is softmax(s + c) for one huge c: uniform, with the gradient of a
            # softmax at the uniform point, which softmax(s - s.detach()) has too
            raw = ungroup(group_by_kv_head(qd, Hkv) @ kd.transpose(-2, -1), Hq) * scale
            uniform = torch.softmax(raw - raw.detach(), dim=-1)
        p = torch.where(empty, uniform, p)
    out = ungroup(group_by_kv_head(p, Hkv) @ vd, Hq)
    if nan_on_empty and not uniform_on_empty:
        out = out.masked_fill(empty, float("nan"))
    lse_out = lse.float() if return_lse else q.new_empty((0,), dtype=torch.float32)
    return out.to(q.dtype), lse_out


def _shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionShape:
    """The call's dimensions (the rewrite made them consistent). Not
    ``checks.check_attention_inputs``: that also enforces the kernels' limits (head dim,
    dtypes), which this reference serves past."""
    if not q.dim() == k.dim() == v.dim() == 4:
        raise ValueError(f"query, key and value must be (B, H, L, D); got ranks {q.dim()}, "
                         f"{k.dim()}, {v.dim()}")
    B, Hq, L, D = q.shape
    _, Hkv, S, _ = k.shape
    return AttentionShape(B, Hq, Hkv, L, S, D, v.shape[3])
