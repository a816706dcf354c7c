"""``uniform_on_empty``: masks given as predicates (causal offset, key padding) that stand for an
additive ``finfo.min`` bias, as HF writes masks. Rows whose every key is masked must then be
what eager gives for the bias: the uniform average of every value, with that softmax's
gradients (kernels/empty_rows.py). The reference is the float64 attention with the additive
bias itself, where the scores of such rows round to the same ``finfo(float32).min`` too.
"""

from __future__ import annotations

import pytest
import torch

import sdpa_pass.kernels.cpu as cpu_path
import sdpa_pass.kernels.ops as ops
from reference import DEVICE, DTYPES, assert_close_to_reference, randn, reference_attention
from test_backward import _chunked_instead_of_triton, assert_grads_close, leaves, reference_grads
from test_kernel_forward import B, make_qkv

L, S, D = 13, 24, 16
FORWARD = torch.ops.sdpa_pass.attention_forward.default
FP32_MIN = torch.finfo(torch.float32).min


@pytest.fixture(autouse=True, params=["triton_backward", "chunked_backward"])
def backward_route(request, monkeypatch):
    torch.manual_seed(0)
    if request.param == "chunked_backward":
        monkeypatch.setattr(ops, "attention_backward_triton", _chunked_instead_of_triton)
        monkeypatch.setattr(cpu_path, "_CHUNK_ELEMENTS", 3 * 4 * B * 4 * S)


def _padding():
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[1, :6] = False  # left padding: in batch 1, query rows 0..5 see only padded keys
    return kpm.to(DEVICE)


def _bias(kpm, diagonal, dtype=torch.float32):
    """The additive mask the predicates stand for: 0 where visible, finfo(float32).min else."""
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    visible = (j <= i + diagonal) & kpm.cpu()[:, None, None, :]
    return torch.zeros(B, 1, L, S).masked_fill(~visible, FP32_MIN).to(DEVICE, dtype)


def _op(q, k, v, kpm, diagonal, bias=None, return_lse=True):
    return FORWARD(q, k, v, bias, kpm, D**-0.5, 1, diagonal, -1, 0.0, False, return_lse, 0.0, None,
                   False, True)


@pytest.mark.parametrize("diagonal", [0, -3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_uniform_rows_equal_additive_finfo_min_bias(dtype, diagonal):
    """Forward and q/k/v gradients; diagonal -3 also empties rows 0..2 of every batch."""
    q, k, v = leaves(*make_qkv(dtype, 4, 2, L=L, S=S, D=D))
    kpm = _padding()
    out, lse = _op(q, k, v, kpm, diagonal)
    bias = _bias(kpm, diagonal)
    ref, _ = reference_attention(q, k, v, bias)
    assert_close_to_reference(out, ref, dtype)
    assert torch.isinf(lse[1, :, :6]).all()  # the uniform rows keep LSE -inf
    dout = randn(B, 4, L, D, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert_grads_close(grads, reference_grads(q, k, v, bias, dout), dtype)
    assert grads[0][1, :, :6].abs().sum() > 0  # uniform rows pass gradient to q, as eager's do


def test_uniform_rows_with_a_learned_bias_gradient():
    """A float bias that requires grad on top of the predicates: its gradient on uniform rows
    is that of the additive form, reduced to the bias's broadcast shape."""
    q, k, v = leaves(*make_qkv(torch.float32, 4, 4, L=L, S=S, D=D))
    kpm = _padding()
    learned = randn(1, 4, L, S).requires_grad_()
    out, _ = _op(q, k, v, kpm, 0, bias=learned)
    dout = randn(B, 4, L, D)
    grads = torch.autograd.grad(out, (q, k, v, learned), dout)
    full = (learned.detach() + _bias(kpm, 0)).requires_grad_()
    ref = reference_grads(q, k, v, full, dout)
    assert_grads_close(grads, ref[:3] + (ref[3].sum(0, keepdim=True),), torch.float32)


def test_uniform_rows_refuse_softcap_and_dropout_and_need_lse():
    q, k, v = make_qkv(torch.float32, 4, 4, L=L, S=S, D=D)
    with pytest.raises(ValueError, match="uniform_on_empty cannot be combined"):
        FORWARD(q, k, v, None, None, 0.25, 1, 0, -1, 5.0, False, True, 0.0, None, False, True)
    q, k, v = leaves(q, k, v)
    out, _ = _op(q, k, v, _padding(), 0, return_lse=False)
    with pytest.raises(ValueError, match="need the forward's LSE"):
        out.sum().backward()


def test_rows_may_be_empty_agrees_with_the_visibility_it_describes():
    """The op skips the uniform rows' work when the predicate alone leaves every row a key;
    checked against the brute-force visibility over small sizes and every alignment."""
    from sdpa_pass.kernels.checks import AttentionShape
    from sdpa_pass.kernels.empty_rows import rows_may_be_empty

    for L in range(0, 6):
        for S in range(0, 6):
            shape = AttentionShape(1, 1, 1, L, S, 4, 4)
            for align in (0, 1, 2):
                for d in (range(-3, 4) if align else [0]):
                    for w in ([-1, 1, 2, 3, 5] if align else [-1]):
                        off = d + (S - L if align == 2 else 0)
                        i = torch.arange(L)[:, None]
                        j = torch.arange(S)[None, :]
                        vis = torch.ones(L, S, dtype=torch.bool)
                        if align:
                            vis &= j <= i + off
                            if w != -1:
                                vis &= j > i + off - w
                        empty = bool((~vis.any(-1)).any()) if L else False
                        claim = rows_may_be_empty(shape, align, d, w, False)
                        # "may": never False when a row is empty
                        assert claim or not empty, (L, S, align, d, w)
                        if L and S and claim:
                            assert empty, f"needless uniform work at {(L, S, align, d, w)}"
            assert rows_may_be_empty(shape, 1, 0, -1, True)  # a tensor mask may hide anything
