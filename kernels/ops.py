"""``torch.ops.sdpa_pass`` operators: what rewritten graphs call.

Registered with ``torch.library.custom_op`` plus ``register_fake``. We do not use
``triton_op`` + ``wrap_triton``: measured on torch 2.13 CPU / triton 3.9 with
TRITON_INTERPRET=1, such an op fails under ``aot_eager`` and ``inductor`` ("Cannot access data
pointer of Tensor") even with a fake registration, while a ``custom_op`` that launches the same
kernel works under eager, aot_eager and inductor, on CPU through the interpreter and on CUDA.
Inductor treats the op as an opaque extern call, which costs nothing here: there is nothing
around a fused attention kernel for Inductor to fuse into it.

``attention_backward`` is a second op so that AOTAutograd traces the backward graph through a
fake implementation too, exactly as it does the forward; ``register_autograd`` ties the two.
"""

from __future__ import annotations

from typing import Optional

import torch

from .checks import check_attention_inputs
from .backward import attention_backward_triton
from .cpu import attention_backward_chunked, attention_forward_cpu
from .decode import attention_decode_triton, sm_count, use_decode_kernel
from .empty_rows import add_uniform_rows_grads, fill_uniform_rows, rows_may_be_empty
from .forward import attention_forward_triton, interpreter_active


def _use_triton(q: torch.Tensor) -> bool:
    return q.is_cuda or (q.device.type == "cpu" and interpreter_active())


def _attention_forward(
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
    """Fused attention forward. Returns (out (B, Hq, L, Dv), lse (B, Hq, L) fp32 or empty).

    causal_align: 0 none, 1 top-left, 2 bottom-right; query i sees key j iff
    j <= i + diagonal (+ S - L for bottom-right). window: -1 for none, else keys with
    j > i + offset - window. softcap: 0.0 for none. nan_on_empty: rows with no visible key give
    NaN (eager softmax) instead of zeros (SDPA). dropout_p > 0: dropout on the probabilities
    with the keep decisions of ``kernels/dropout.py`` under the (2,) int64 ``dropout_seed``;
    the LSE is that of the probabilities before dropout. mask_fills: attn_mask values at or
    below -1e30 are fills (``masked_fill``/``where`` semantics: they replace the score) rather
    than additions; it changes only gradients, on rows filled everywhere (see the backward).
    uniform_on_empty: a row with no visible key averages every key's value uniformly, as
    eager's softmax does when the masks are an additive finfo.min bias (HF); its LSE stays
    -inf. Not with softcap or dropout; gradients then need return_lse=True.
    """
    shape = check_attention_inputs(
        q, k, v, attn_mask, key_padding_mask, causal_align=causal_align, window=window,
        softcap=softcap, dropout_p=dropout_p, dropout_seed=dropout_seed,
    )
    return _forward_checked(shape, q, k, v, attn_mask, key_padding_mask, scale, causal_align,
                            diagonal, window, softcap, nan_on_empty, return_lse, dropout_p,
                            dropout_seed, mask_fills, uniform_on_empty)


def _forward_checked(shape, q, k, v, attn_mask, key_padding_mask, scale, causal_align, diagonal,
                     window, softcap, nan_on_empty, return_lse, dropout_p, dropout_seed,
                     mask_fills, uniform_on_empty):
    """``_attention_forward`` after ``check_attention_inputs`` gave ``shape``."""
    _check_uniform(uniform_on_empty, softcap, dropout_p)
    uniform = _uniform_rows(uniform_on_empty, shape, causal_align, diagonal, window, attn_mask,
                            key_padding_mask)
    params = dict(scale=scale, causal_align=causal_align, diagonal=diagonal, window=window,
                  softcap=softcap, nan_on_empty=nan_on_empty,
                  return_lse=return_lse or uniform)
    if not _use_triton(q):
        out, lse = attention_forward_cpu(q, k, v, attn_mask, key_padding_mask, shape, **params,
                                         dropout_p=dropout_p, dropout_seed=dropout_seed)
    elif dropout_p == 0.0 and use_decode_kernel(shape, sm_count(q.device)):
        # few query rows against many keys (decode steps): split the keys over programs
        out, lse = attention_decode_triton(q, k, v, attn_mask, key_padding_mask, shape, **params)
    else:
        out, lse = attention_forward_triton(q, k, v, attn_mask, key_padding_mask, shape, **params,
                                            dropout_p=dropout_p, dropout_seed=dropout_seed)
    if uniform:
        out = fill_uniform_rows(out, lse, v, shape)
        if not return_lse:
            lse = lse.new_empty((0,))
    return out, lse


attention_forward = torch.library.custom_op(
    "sdpa_pass::attention_forward", mutates_args=(), device_types=None)(_attention_forward)


def _uniform_rows(uniform_on_empty, shape, causal_align, diagonal, window, attn_mask,
                  key_padding_mask) -> bool:
    """Whether this call has uniform-row work to do: asked for, and some row may see no key."""
    return uniform_on_empty and rows_may_be_empty(
        shape, causal_align, diagonal, window, attn_mask is not None or key_padding_mask is not None)


def _check_uniform(uniform_on_empty: bool, softcap: float, dropout_p: float) -> None:
    if uniform_on_empty and (softcap > 0.0 or dropout_p > 0.0):
        raise ValueError("uniform_on_empty cannot be combined with softcap or dropout: the "
                         "probabilities of a uniform row would no longer be 1/S")


@attention_forward.register_fake
def _attention_forward_fake(
    q, k, v, attn_mask, key_padding_mask, scale, causal_align, diagonal, window, softcap,
    nan_on_empty, return_lse, dropout_p=0.0, dropout_seed=None, mask_fills=False,
    uniform_on_empty=False,
):
    shape = check_attention_inputs(
        q, k, v, attn_mask, key_padding_mask, causal_align=causal_align, window=window,
        softcap=softcap, dropout_p=dropout_p, dropout_seed=dropout_seed,
    )
    _check_uniform(uniform_on_empty, softcap, dropout_p)
    out = q.new_empty((shape.batch, shape.q_heads, shape.q_len, shape.v_head_dim))
    lse_shape = (shape.batch, shape.q_heads, shape.q_len) if return_lse else (0,)
    return out, q.new_empty(lse_shape, dtype=torch.float32)


def _attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal_align: int,
    diagonal: int,
    window: int,
    softcap: float,
    need_mask_grad: bool,
    grad_lse: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
    mask_fills: bool = False,
    uniform_on_empty: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_forward``: (dq, dk, dv, dmask) in the inputs' dtypes.

    out and lse are the forward's outputs; lse may be empty (forward run with return_lse=False).
    dmask is the gradient for a floating-point attn_mask in attn_mask's own (broadcast) shape
    when need_mask_grad, else an empty tensor. grad_lse: gradient of the forward's lse output,
    or None when it was not returned or not used. Rows with no visible key contribute nothing.
    dropout_p and dropout_seed: the forward's, so the same probabilities are dropped.
    mask_fills: no gradient reaches a score (or the mask) where a fill replaced it. That only
    matters on rows filled everywhere (elsewhere P = 0 there): eager's softmax averages such a
    row uniformly and, for masked_fill, passes nothing back to q and k, while an additive
    finfo.min bias passes the uniform P's gradient through. uniform_on_empty: the forward's
    rows with LSE -inf were uniform averages; their gradients are added in closed form.
    """
    shape = check_attention_inputs(
        q, k, v, attn_mask, key_padding_mask, causal_align=causal_align, window=window,
        softcap=softcap, dropout_p=dropout_p, dropout_seed=dropout_seed,
    )
    return _backward_checked(shape, grad_out, q, k, v, attn_mask, key_padding_mask, out, lse,
                             scale, causal_align, diagonal, window, softcap, need_mask_grad,
                             grad_lse, dropout_p, dropout_seed, mask_fills, uniform_on_empty)


def _backward_checked(shape, grad_out, q, k, v, attn_mask, key_padding_mask, out, lse, scale,
                      causal_align, diagonal, window, softcap, need_mask_grad, grad_lse,
                      dropout_p, dropout_seed, mask_fills, uniform_on_empty):
    """``_attention_backward`` after ``check_attention_inputs`` gave ``shape``."""
    _check_mask_grad(attn_mask, need_mask_grad)
    uniform = _uniform_rows(uniform_on_empty, shape, causal_align, diagonal, window, attn_mask,
                            key_padding_mask)
    if uniform and lse.numel() == 0:
        raise ValueError("uniform_on_empty gradients need the forward's LSE (return_lse=True)")
    dq, dk, dv, dmask = _backward_impl(
        grad_out, q, k, v, attn_mask, key_padding_mask, out, lse, shape, scale=scale,
        causal_align=causal_align, diagonal=diagonal, window=window, softcap=softcap,
        need_mask_grad=need_mask_grad, grad_lse=grad_lse, dropout_p=dropout_p,
        dropout_seed=dropout_seed, mask_fills=mask_fills,
    )
    if uniform:
        dq, dk, dv, dmask = add_uniform_rows_grads(
            grad_out, q, k, v, lse, shape, scale, dq, dk, dv, attn_mask, dmask, need_mask_grad,
            fills=mask_fills)
    # The fake promises contiguous gradients whatever the inputs' strides (HF's K/V are
    # transposed views); Inductor checks real strides against it. Free when already so.
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask.contiguous()


attention_backward = torch.library.custom_op(
    "sdpa_pass::attention_backward", mutates_args=(), device_types=None)(_attention_backward)


def dispatch_free(*tensors) -> bool:
    """Whether an eager call may run an op's implementation itself rather than through the
    dispatcher: plain tensors only (a DTensor, FakeTensor or other subclass is handled by the
    op's registrations), no torch-function or dispatch mode (fake mode, FlopCounterMode,
    DebugMode), no functorch transform (vmap, grad) and no profiler (which records the op by
    name). Hand-written because the dispatcher's path into a torch.library custom op costs
    ~30 us of host time per call (CPU, torch 2.13; about twice that on the H100 machine's
    host): its Python autograd and backend wrappers and an aliasing check of the outputs,
    around an implementation that is ours; an eager forward + backward makes two such calls."""
    return (not torch._C._len_torch_dispatch_stack()
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and not torch._C._autograd._profiler_enabled()
            and all(t is None or type(t) is torch.Tensor for t in tensors))


def forward_eager(shape, *args):
    """``attention_forward(*args)`` from eager code (``attention``, its autograd.Function),
    which validated ``args`` already: ``shape`` is what ``check_attention_inputs`` returned
    (the op's own implementation checks them again, for callers that did not)."""
    if dispatch_free(*args[:5], args[13]):
        return _forward_checked(shape, *args)
    return torch.ops.sdpa_pass.attention_forward(*args)


def _backward_impl(
    grad_out, q, k, v, attn_mask, key_padding_mask, out, lse, shape, *, scale, causal_align,
    diagonal, window, softcap, need_mask_grad, grad_lse, dropout_p, dropout_seed, mask_fills,
):
    # The path is chosen from devices and shapes only, never from GPU values (no host sync):
    # the Triton backward handles rows whose LSE lost precision on the device (backward.py).
    if _use_triton(q) and lse.numel() > 0:
        return attention_backward_triton(
            grad_out, q, k, v, attn_mask, key_padding_mask, out, lse, shape, scale=scale,
            causal_align=causal_align, diagonal=diagonal, window=window, softcap=softcap,
            need_mask_grad=need_mask_grad, grad_lse=grad_lse, dropout_p=dropout_p,
            dropout_seed=dropout_seed, mask_fills=mask_fills,
        )
    # CPU tensors, or a forward run without its LSE: the chunked path, which recomputes each
    # row's max and sum itself.
    return attention_backward_chunked(
        grad_out, q, k, v, attn_mask, key_padding_mask, out, grad_lse, shape, scale=scale,
        causal_align=causal_align, diagonal=diagonal, window=window, softcap=softcap,
        need_mask_grad=need_mask_grad, dropout_p=dropout_p, dropout_seed=dropout_seed,
        mask_fills=mask_fills,
    )


@attention_backward.register_fake
def _attention_backward_fake(
    grad_out, q, k, v, attn_mask, key_padding_mask, out, lse, scale, causal_align, diagonal,
    window, softcap, need_mask_grad, grad_lse=None, dropout_p=0.0, dropout_seed=None,
    mask_fills=False, uniform_on_empty=False,
):
    check_attention_inputs(
        q, k, v, attn_mask, key_padding_mask, causal_align=causal_align, window=window,
        softcap=softcap, dropout_p=dropout_p, dropout_seed=dropout_seed,
    )
    _check_mask_grad(attn_mask, need_mask_grad)
    dmask = attn_mask.new_empty(attn_mask.shape) if need_mask_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _check_mask_grad(attn_mask, need_mask_grad: bool) -> None:
    if need_mask_grad and (attn_mask is None or not attn_mask.is_floating_point()):
        raise ValueError(
            "need_mask_grad=True needs a floating-point attn_mask (an additive bias); got "
            + ("None" if attn_mask is None else f"a {attn_mask.dtype} mask")
        )


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, key_padding_mask, scale, causal_align, diagonal, window, softcap,
     _nan_on_empty, return_lse, dropout_p, dropout_seed, mask_fills, uniform_on_empty) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, key_padding_mask, out, lse, dropout_seed)
    # An output nobody differentiates (the LSE, mostly) gets None rather than zeros made by
    # autograd: those zeros are plain tensors even when the inputs are DTensors, and the
    # backward op would then mix the two.
    ctx.set_materialize_grads(False)
    ctx.params = (scale, causal_align, diagonal, window, softcap)
    ctx.return_lse = return_lse
    ctx.dropout_p = dropout_p
    ctx.mask_fills = mask_fills
    ctx.uniform_on_empty = uniform_on_empty


def _backward(ctx, grad_out, grad_lse):
    q, k, v, attn_mask, key_padding_mask, out, lse, dropout_seed = ctx.saved_tensors
    if grad_out is None:  # only the LSE was differentiated
        grad_out = torch.zeros_like(out)
    # Bool masks and key padding are not differentiable; a float mask gets a gradient only
    # when it asked for one, since reducing dS to its shape costs a pass over every score.
    need_mask_grad = (
        attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[3]
    )
    grad_lse = grad_lse if ctx.return_lse else None
    args = (grad_out, q, k, v, attn_mask, key_padding_mask, out, lse, *ctx.params, need_mask_grad,
            grad_lse, ctx.dropout_p, dropout_seed, ctx.mask_fills, ctx.uniform_on_empty)
    # Eager (not traced) and without a graph of the backward itself (the op has no derivative,
    # so create_graph=True goes through it to be refused): the implementation, see
    # dispatch_free. AOTAutograd traces this function with fake tensors: the op.
    # The inputs were validated by the forward (an eager call's shape is on ctx; autograd
    # gives grad_out the output's shape), so the implementation skips the check.
    shape = getattr(ctx, "shape", None)
    if not torch.is_grad_enabled() and dispatch_free(grad_out, q, k, v, attn_mask,
                                                      key_padding_mask, out, lse, grad_lse,
                                                      dropout_seed):
        dq, dk, dv, dmask = (_backward_checked(shape, *args) if shape is not None
                             else _attention_backward(*args))
    else:
        dq, dk, dv, dmask = torch.ops.sdpa_pass.attention_backward(*args)
    return (dq, dk, dv, dmask if need_mask_grad else None) + (None,) * 12


attention_forward.register_autograd(_backward, setup_context=_setup_context)
