"""Fused attention kernels behind ``sdpa_pass``.

``attention`` takes the arguments of ``torch.nn.functional.scaled_dot_product_attention`` with
the same meaning, plus keyword extras for what SDPA cannot say. This package knows nothing
about FX; the pass only uses the ``torch.ops.sdpa_pass`` operator signatures.
"""

from __future__ import annotations

import math
import sys
from typing import Optional, Union

import torch

if __name__ != "sdpa_pass.kernels":
    # Run from a checkout's root (python -m pytest, a script there), this folder is importable
    # as top-level "kernels" too, and transformers imports that name while probing for the PyPI
    # "kernels" package. A second copy of ops.py would register the torch.ops.sdpa_pass ops
    # again, replacing the first registration: op handles taken before then crash the process
    # (torch 2.13). Alias the real modules instead, so the imports below re-execute nothing.
    import sdpa_pass.kernels

    for _name, _module in list(sys.modules.items()):
        if _name == "sdpa_pass.kernels" or _name.startswith("sdpa_pass.kernels."):
            sys.modules[__name__ + _name[len("sdpa_pass.kernels"):]] = _module

from . import ops
from . import sharding  # noqa: F401  (DTensor rules for the ops; no-op without torch.distributed)
from .dropout import draw_seed
from .checks import (
    CAUSAL_BOTTOM_RIGHT,
    CAUSAL_NAMES,
    CAUSAL_NONE,
    CAUSAL_TOP_LEFT,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    check_attention_inputs,
)

__all__ = [
    "attention",
    "CAUSAL_NONE",
    "CAUSAL_TOP_LEFT",
    "CAUSAL_BOTTOM_RIGHT",
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    causal: Union[str, None] = None,
    diagonal: int = 0,
    window: Optional[int] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    empty_rows: str = "zero",
    return_lse: bool = False,
):
    """Scaled dot-product attention on fused Triton kernels.

    Positional arguments mean what they mean for ``F.scaled_dot_product_attention``: tensors
    laid out (B, H, L, D) with any strides, a bool mask (True = attend) or an additive float
    mask broadcastable to (B, Hq, L, S), ``is_causal`` for the top-left causal mask, ``scale``
    defaulting to ``1/sqrt(D)``, ``enable_gqa`` for Hq a multiple of Hkv (K/V are never copied).
    ``attn_mask`` may be combined with any causal form. Differentiable with respect to query,
    key, value and a floating-point ``attn_mask`` (its gradient in the mask's own broadcast
    shape); bool masks and ``key_padding_mask`` have none. Rows with no visible key pass no
    gradient back. ``dropout_p`` applies dropout to the probabilities, as SDPA does, with
    a seed drawn from torch's default generator of the device: ``torch.manual_seed`` makes it
    reproducible, and the backward drops exactly what the forward dropped.

    Extras:
      causal: ``"top_left"`` or ``"bottom_right"`` (query i sees key j iff j <= i + S - L, the
        KV-cache / chunked-prefill alignment). ``is_causal=True`` means ``"top_left"``.
      diagonal: shifts the causal diagonal as ``torch.tril(..., diagonal=d)`` does.
      window: sliding window; a query sees only the ``window`` keys ending at its diagonal.
      key_padding_mask: (B, S) bool, True = attend. The key tiles before a batch element's
        first and after its last visible key are skipped (as are those of a bool ``attn_mask``
        that is one row of keys, e.g. (B, 1, 1, S)); ``SDPA_PASS_KEY_SPAN=0`` visits them.
      softcap: logit soft-capping ``cap * tanh(s / cap)`` applied before any mask (Gemma 2).
      empty_rows: a row where every key is masked gives ``"zero"`` (SDPA) or ``"nan"`` (eager
        ``softmax`` over ``-inf``).
      return_lse: also return the natural-log log-sum-exp of each row, (B, Hq, L) fp32.
    """
    if causal is not None and causal not in CAUSAL_NAMES:
        raise ValueError(f"causal must be 'top_left', 'bottom_right' or None, got {causal!r}")
    if is_causal and causal not in (None, "top_left"):
        raise ValueError(f"is_causal=True means top-left alignment; it conflicts with causal={causal!r}")
    if empty_rows not in ("zero", "nan"):
        raise ValueError(f"empty_rows must be 'zero' or 'nan', got {empty_rows!r}")
    causal_align = CAUSAL_NAMES[causal] if causal is not None else CAUSAL_NONE
    if is_causal:
        causal_align = CAUSAL_TOP_LEFT
    if diagonal != 0 and causal_align == CAUSAL_NONE:
        raise ValueError("diagonal shifts a causal mask; pass is_causal=True or causal=...")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    # Checked here, once for an eager call (its shape goes on to the op's implementation), so
    # the default scale reads a valid head dim and enable_gqa, which the op does not take, is
    # honoured; the op checks for itself when traced code or the dispatcher calls it.
    seed = draw_seed(query.device) if dropout_p > 0.0 and isinstance(query, torch.Tensor) else None
    shape = check_attention_inputs(
        query, key, value, attn_mask, key_padding_mask, enable_gqa=enable_gqa,
        causal_align=causal_align, window=-1 if window is None else window, dropout_p=dropout_p,
        dropout_seed=seed,
    )
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    # The backward kernels start from the forward's LSE: keep it whenever a gradient can flow.
    differentiable = [query, key, value] + ([attn_mask] if attn_mask is not None else [])
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    args = (
        query, key, value, attn_mask, key_padding_mask, float(scale), causal_align,
        int(diagonal), -1 if window is None else int(window),
        0.0 if softcap is None else float(softcap), empty_rows == "nan", return_lse or want_grad,
        float(dropout_p), seed, False, False,
    )
    if torch.compiler.is_compiling():
        out, lse = torch.ops.sdpa_pass.attention_forward(*args)
    elif want_grad:
        out, lse = _EagerAttention.apply(*args, shape)
    else:
        # the op's implementation where nothing needs dispatch
        out, lse = ops.forward_eager(shape, *args)
    return (out, lse) if return_lse else out


class _EagerAttention(torch.autograd.Function):
    """An eager ``attention`` call that needs a gradient: the op's own autograd formula
    (``ops._setup_context`` and ``ops._backward``, what ``register_autograd`` gave the op) as a
    plain autograd.Function around the op. Hand-written because torch.library's autograd
    wrapper calls ``torch._library.utils.fill_defaults`` on every forward, which re-reads
    ``schema.arguments`` (a fresh pybind list) twice per argument: 128 us a call for this op's
    16 arguments (torch 2.13, CPU), more than the kernel's launch. Inside ``forward`` grad mode
    is off, so the op takes its no-grad route. Traced code (torch.compile) keeps calling the op,
    whose registration AOTAutograd uses.

    ``forward`` takes ``ctx`` itself rather than a separate ``setup_context``: with one,
    ``Function.apply`` binds the arguments through ``inspect.signature(forward)`` on every
    call (torch 2.11-2.13), ~30 us of host time here for nothing (this path is never traced)."""

    @staticmethod
    def forward(ctx, *args_and_shape):
        # the op's arguments, then check_attention_inputs' result for them (last, so that
        # ctx.needs_input_grad keeps the op's argument positions), kept for ops._backward
        *args, shape = args_and_shape
        output = ops.forward_eager(shape, *args)
        ops._setup_context(ctx, args, output)
        ctx.shape = shape
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return (*ops._backward(ctx, grad_out, grad_lse), None)
