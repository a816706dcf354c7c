"""Rows with no visible key that average every key uniformly: eager's answer under a finite fill.

When a mask is written as an additive ``finfo.min`` bias (HF's ``where(mask, 0, finfo.min)``)
a query row whose every key is masked does not become empty: every score rounds to the same
``finfo.min``, softmax is uniform over all S keys, the row outputs mean(V) and its gradient is
that of a uniform softmax. When such a mask reaches the kernels as predicates (causal offset,
window, key padding), those rows come out empty (LSE = -inf); the op's ``uniform_on_empty``
turns them into eager's uniform rows here, in closed form, so nothing L x S is formed:

  forward:  O_i = v̄ = mean_j v_j
  backward: P_ij = 1/S, dS_ij = (dO_i·v_j - dO_i·v̄) / S, so with E the empty rows
            dV_j += (1/S) Σ_{i∈E} dO_i
            dQ_i  = (scale/S) (dO_i Vᵀ K - (dO_i·v̄) Σ_j k_j)              (i ∈ E)
            dK_j += (scale/S) (v_j Σ_{i∈E} dO_iᵀ q_i - Σ_{i∈E} (dO_i·v̄) q_i)

When the fill replaced the scores (``masked_fill`` / ``where`` on the scores: the op's
``mask_fills``) a uniform row does not depend on q or k at all: only dV gets its term.

GQA: the query heads of a group share K and V, so the sums over i run over the group's rows.
Soft-capping and dropout make P or dS depend on (i, j); the op refuses them with this mode.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backward import _reduce_to
from .checks import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, AttentionShape
from .cpu import group_by_kv_head, ungroup


def rows_may_be_empty(shape: AttentionShape, causal_align: int, diagonal: int, window: int,
                      has_tensor_mask: bool) -> bool:
    """Whether some query row may see no key. False only when the positional predicate alone
    leaves every row a key: then the uniform rows' work (a pass over V, its host cost) is
    skipped."""
    return has_tensor_mask or not every_row_sees_a_key(shape.q_len, shape.kv_len, causal_align,
                                                       diagonal, window)


def every_row_sees_a_key(q_len, kv_len, causal_align: int, diagonal, window: int,
                         nonnegative=lambda e: e >= 0) -> bool:
    """Whether the positional predicate alone leaves every query row a key. Row i sees keys j
    in [max(0, i + off - W + 1), min(S - 1, i + off)] (off: the causal offset; no upper bound
    without causal, no lower one without a window). Sizes are ints, or size expressions with a
    ``nonnegative`` that proves e >= 0 for every size a graph may see (sdpa_pass/masks.py)."""
    if not nonnegative(kv_len - 1):
        return False
    if causal_align == CAUSAL_NONE:
        return True
    offset = diagonal + (kv_len - q_len if causal_align == CAUSAL_BOTTOM_RIGHT else 0)
    if not nonnegative(offset):
        return False   # row 0 sees no key (or, bottom-right, the rows above the diagonal)
    # the last row's window must still reach a key below S
    return window == -1 or nonnegative(kv_len - 1 - (q_len - 1 + offset - window + 1))


def _empty(lse: torch.Tensor) -> torch.Tensor:
    return lse == float("-inf")


def fill_uniform_rows(out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor,
                      shape: AttentionShape) -> torch.Tensor:
    """``out`` with every row whose LSE is -inf replaced by the mean of its group's values."""
    if shape.kv_len == 0:
        return out  # no key to average: the empty output eager gives
    v_mean = v.mean(dim=-2, keepdim=True, dtype=torch.float32)         # (B, Hkv, 1, Dv)
    v_mean = v_mean.repeat_interleave(shape.group, dim=1)              # (B, Hq, 1, Dv)
    return torch.where(_empty(lse)[..., None], v_mean.to(out.dtype), out)


def add_uniform_rows_grads(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
    shape: AttentionShape, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    attn_mask: Optional[torch.Tensor], dmask: torch.Tensor, need_mask_grad: bool,
    fills: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the uniform rows (which the kernels skipped as empty) added to those
    of the other rows; in the inputs' dtypes."""
    S, Hkv = shape.kv_len, shape.kv_heads
    if S == 0 or shape.q_len == 0:
        return dq, dk, dv, dmask
    empty = _empty(lse)[..., None]                                     # (B, Hq, L, 1)
    do = grad_out.float().masked_fill(~empty, 0.0)                     # dO of the uniform rows
    qe = q.float().masked_fill(~empty, 0.0)
    kf, vf = k.float(), v.float()
    v_mean = vf.mean(dim=-2, keepdim=True)                             # (B, Hkv, 1, Dv)
    k_sum = kf.sum(dim=-2, keepdim=True)                               # (B, Hkv, 1, D)
    do_g, qe_g = group_by_kv_head(do, Hkv), group_by_kv_head(qe, Hkv)  # (B, Hkv, G*L, .)
    do_vbar = do_g @ v_mean.transpose(-2, -1)                          # (B, Hkv, G*L, 1)

    dv_add = do_g.sum(dim=-2, keepdim=True) / S                        # (B, Hkv, 1, Dv)
    if fills:  # the filled scores pass nothing back; a fill mask has no gradient
        return dq, dk, (dv.float() + dv_add).to(dv.dtype), dmask
    dq_add = (do_g @ (vf.transpose(-2, -1) @ kf) - do_vbar * k_sum) * (scale / S)
    g1 = do_g.transpose(-2, -1) @ qe_g                                 # (B, Hkv, Dv, D)
    c = (do_vbar * qe_g).sum(dim=-2, keepdim=True)                     # (B, Hkv, 1, D)
    dk_add = (vf @ g1 - c) * (scale / S)

    dq = torch.where(empty, ungroup(dq_add, shape.q_heads).to(dq.dtype), dq)
    dk = (dk.float() + dk_add).to(dk.dtype)
    dv = (dv.float() + dv_add).to(dv.dtype)
    if need_mask_grad:
        # an additive mask gets dS, which is dense here as it is for the other rows
        dp = ungroup(do_g @ vf.transpose(-2, -1), shape.q_heads)        # (B, Hq, L, S)
        ds = (dp - ungroup(do_vbar, shape.q_heads)) / S
        dmask = (dmask.float() + _reduce_to(ds, attn_mask.shape)).to(dmask.dtype)
    return dq, dk, dv, dmask
