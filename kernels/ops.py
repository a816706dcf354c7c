"""``torch.ops.sdpa_pass`` operators: what rewritten graphs call.

Registered with ``torch.library.custom_op`` plus ``register_fake``. We do not use
``triton_op`` + ``wrap_triton``: measured on torch 2.13 CPU / triton 3.9 with
TRITON_INTERPRET=1, such an op fails under ``aot_eager`` and ``inductor`` ("Cannot access data
pointer of Tensor") even with a fake registration, while a ``custom_op`` that launches the same
kernel works under eager, aot_eager and inductor, on CPU through the interpreter and on CUDA.
Inductor treats the op as an opaque extern call, which costs nothing here: there is nothing
around a fused attention kernel for Inductor to fuse into it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .checks import check_attention_inputs
from .cpu import attention_forward_cpu
from .forward import attention_forward_triton, interpreter_active


def _use_triton(q: torch.Tensor) -> bool:
    return q.is_cuda or (q.device.type == "cpu" and interpreter_active())


@torch.library.custom_op("sdpa_pass::attention_forward", mutates_args=(), device_types=None)
def attention_forward(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward. Returns (out (B, Hq, L, Dv), lse (B, Hq, L) fp32 or empty).

    causal_align: 0 none, 1 top-left, 2 bottom-right; query i sees key j iff
    j <= i + diagonal (+ S - L for bottom-right). window: -1 for none, else keys with
    j > i + offset - window. softcap: 0.0 for none. nan_on_empty: rows with no visible key give
    NaN (eager softmax) instead of zeros (SDPA).
    """
    shape = check_attention_inputs(
        q, k, v, attn_mask, key_padding_mask, causal_align=causal_align, window=window,
        softcap=softcap,
    )
    impl = attention_forward_triton if _use_triton(q) else attention_forward_cpu
    return impl(
        q, k, v, attn_mask, key_padding_mask, shape, scale=scale, causal_align=causal_align,
        diagonal=diagonal, window=window, softcap=softcap, nan_on_empty=nan_on_empty,
        return_lse=return_lse,
    )


@attention_forward.register_fake
def _attention_forward_fake(
    q, k, v, attn_mask, key_padding_mask, scale, causal_align, diagonal, window, softcap,
    nan_on_empty, return_lse,
):
    shape = check_attention_inputs(
        q, k, v, attn_mask, key_padding_mask, causal_align=causal_align, window=window,
        softcap=softcap,
    )
    out = q.new_empty((shape.batch, shape.q_heads, shape.q_len, shape.v_head_dim))
    lse_shape = (shape.batch, shape.q_heads, shape.q_len) if return_lse else (0,)
    return out, q.new_empty(lse_shape, dtype=torch.float32)
