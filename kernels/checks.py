"""Input validation shared by every attention entry point.

Errors name the problem and print the shapes involved, so a user never meets a Triton crash
dump or a silent wrong answer for bad input. The same checks run in the fake (meta)
implementation, so a bad call fails while ``torch.compile`` traces it, not at run time.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Causal alignments. The visible keys of query row i are those j with j <= i + offset where
# offset = diagonal (top-left) or diagonal + S - L (bottom-right); NONE ignores the diagonal.
CAUSAL_NONE = 0
CAUSAL_TOP_LEFT = 1
CAUSAL_BOTTOM_RIGHT = 2
CAUSAL_NAMES = {"top_left": CAUSAL_TOP_LEFT, "bottom_right": CAUSAL_BOTTOM_RIGHT}


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """The dimensions of one attention call, in (B, H, L, D) terms."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads if self.kv_heads else 1


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    *,
    enable_gqa: bool = True,
    causal_align: int = CAUSAL_NONE,
    window: int = -1,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
) -> AttentionShape:
    """Validate an attention call and return its dimensions.

    Raises ``ValueError``/``TypeError`` with a message that names the offending argument.
    """
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4 laid out as (batch, heads, seq_len, head_dim); "
                f"got shape {_fmt(t.shape)} of rank {t.dim()}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"query, key and value must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"unsupported dtype {q.dtype}: sdpa_pass attention supports float16, bfloat16 and float32"
        )
    for name, t in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    devices = {t.device for t in (q, k, v)}
    for name, t in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if t is not None:
            devices.add(t.device)
    if len(devices) > 1:
        raise ValueError(
            "all tensors of an attention call must be on one device; got "
            + ", ".join(sorted(str(d) for d in devices))
        )

    B, Hq, L, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    Bv, Hv, Sv, DV = v.shape
    if not (B == Bk == Bv):
        raise ValueError(
            f"batch sizes differ: query {_fmt(q.shape)}, key {_fmt(k.shape)}, value {_fmt(v.shape)}"
        )
    if Hkv != Hv:
        raise ValueError(f"key has {Hkv} heads but value has {Hv}; they must be equal")
    if S != Sv:
        raise ValueError(f"key has sequence length {S} but value has {Sv}; they must be equal")
    if D != Dk:
        raise ValueError(
            f"head dims differ: query has {D}, key has {Dk} (query {_fmt(q.shape)}, key {_fmt(k.shape)})"
        )
    if D > MAX_HEAD_DIM or DV > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim {max(D, DV)} is over the supported maximum of {MAX_HEAD_DIM}"
        )
    if D == 0 or DV == 0:
        raise ValueError("head dim must be at least 1")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads and key/value have {Hkv}; pass enable_gqa=True for "
                "grouped-query attention"
            )
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(
                f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for grouped-query attention"
            )

    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(
                f"attn_mask must be bool (True = attend) or floating point (added to the scores); got {attn_mask.dtype}"
            )
        if attn_mask.dim() > 4 or not _broadcasts(attn_mask.shape, (B, Hq, L, S)):
            raise ValueError(
                f"attn_mask of shape {_fmt(attn_mask.shape)} does not broadcast to "
                f"(B={B}, H={Hq}, L={L}, S={S})"
            )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(
                f"key_padding_mask must have shape (B={B}, S={S}); got {_fmt(key_padding_mask.shape)}"
            )
    if window != -1:
        if causal_align == CAUSAL_NONE:
            raise ValueError("a sliding window needs a causal alignment (is_causal=True or causal=...)")
        if window < 1:
            raise ValueError(f"window must be a positive number of keys, got {window}")
    if softcap < 0:
        raise ValueError(f"softcap must be positive (or 0 for none), got {softcap}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if dropout_p > 0.0:
        if (dropout_seed is None or dropout_seed.dtype != torch.int64
                or tuple(dropout_seed.shape) != (2,)):
            raise ValueError(
                "dropout_p > 0 needs dropout_seed, a (2,) int64 tensor (see "
                "sdpa_pass.kernels.dropout.draw_seed); got "
                + ("None" if dropout_seed is None else f"{dropout_seed.dtype} {_fmt(dropout_seed.shape)}")
            )
        if dropout_seed.device != q.device:
            raise ValueError(f"dropout_seed is on {dropout_seed.device}, the inputs on {q.device}")
    return AttentionShape(B, Hq, Hkv, L, S, D, DV)


def _broadcasts(shape, target) -> bool:
    shape = tuple(shape)
    target = tuple(target)
    for s, t in zip(reversed(shape), reversed(target)):
        if s != 1 and s != t:
            return False
    return True


def causal_offset(causal_align: int, diagonal: int, q_len: int, kv_len: int) -> int:
    """The diagonal offset of the causal band: query i sees key j iff j <= i + offset."""
    if causal_align == CAUSAL_BOTTOM_RIGHT:
        return diagonal + kv_len - q_len
    return diagonal
