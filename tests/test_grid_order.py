"""The order in which the kernels take their programs (``program_tile``, ``batch_inner``).

A mask broadcast over the batch is read again by every batch element; the forward, dK/dV and
dQ kernels can decode their program ids batch element first, so the programs reading one mask
tile run side by side (and share it in L2). By default the forward does for float masks at
head dims up to 128, the backward kernels only when asked (the kernels' comments give the
measurements). The order must not change what any program computes: outputs and gradients
are bitwise those of the plain order, and right against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import sdpa_pass.kernels.backward as bwd
import sdpa_pass.kernels.forward as fwd
from sdpa_pass.kernels import attention
from sdpa_pass.kernels.launch import clear_plans
from reference import DEVICE, assert_close_to_reference, randn, reference_attention
from test_backward import assert_grads_close, reference_grads

B, HQ, HKV, L, S, D = 2, 4, 2, 19, 37, 32


@triton.jit
def _record_order(OUT, H, BATCH_INNER: tl.constexpr):
    tile, bh = fwd.program_tile(H, BATCH_INNER)
    lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(OUT + 2 * lin, tile)
    tl.store(OUT + 2 * lin + 1, bh)


@pytest.mark.parametrize("batch_inner", [False, True])
def test_program_order(batch_inner):
    """Every (tile, b, h) exactly once; in launch order (the linear program id) the plain
    order runs the tiles of one (b, h) together, the batch-inner order the batch elements
    of one (tile, h)."""
    tiles, batch, heads = 5, 3, 4
    out = torch.full((tiles * batch * heads, 2), -1, dtype=torch.int32, device=DEVICE)
    _record_order[(tiles, batch * heads)](out, heads, batch_inner)
    got = [(t, bh // heads, bh % heads) for t, bh in out.tolist()]
    assert sorted(got) == [(t, b, h) for t in range(tiles) for b in range(batch)
                           for h in range(heads)]
    if batch_inner:
        want = [(t, b, h) for h in range(heads) for t in range(tiles) for b in range(batch)]
    else:
        want = [(t, b, h) for b in range(batch) for h in range(heads) for t in range(tiles)]
    assert got == want


# name: (mask maker, is_causal); each broadcasts over the batch
SHARED_MASKS = {
    "float_1HLS": (lambda dtype: randn(1, HQ, L, S, dtype=dtype), False),
    "float_1HLS_causal": (lambda dtype: randn(1, HQ, L, S, dtype=dtype), True),
    "bool_LS_causal": (lambda dtype: torch.rand(L, S, device=DEVICE) > 0.3, True),
}


def _forward_meta():
    (plan,) = fwd._FORWARD_PLANS._plans.values()
    return plan.call.kwargs


def _backward_meta():
    (decisions,) = bwd._BACKWARD_DECISIONS._plans.values()
    return decisions.dkdv_meta, decisions.dq_meta


@pytest.mark.parametrize("mask", SHARED_MASKS)
def test_batch_inner_order_gives_the_same_results(monkeypatch, mask):
    """A mask shared by the batch: by default the forward takes its programs batch first for a
    float mask (where it measured faster), SDPA_PASS_BATCH_INNER=1 every kernel for every
    mask, =0 none. Outputs and gradients (GQA, the split dQ path, a float mask's gradient) are
    bitwise the same in every order and right against the float64 reference."""
    make, causal = SHARED_MASKS[mask]
    monkeypatch.setenv("SDPA_PASS_AUTOTUNE", "0")  # on a GPU: the same tiles for every order
    dtype = torch.float16
    torch.manual_seed(0)
    q, k, v = (randn(B, h, n, D, dtype=dtype) for h, n in ((HQ, L), (HKV, S), (HKV, S)))
    attn_mask = make(dtype)
    if attn_mask.is_floating_point():
        attn_mask.requires_grad_()
    grad_out = randn(B, HQ, L, D, dtype=dtype)
    kwargs = dict(is_causal=causal, enable_gqa=True)
    # setting: (forward batch-first, backward batch-first)
    expected = {None: (mask.startswith("float"), False), "1": (True, True), "0": (False, False)}
    results = []
    for setting, (forward_order, backward_order) in expected.items():
        if setting is None:
            monkeypatch.delenv("SDPA_PASS_BATCH_INNER", raising=False)
        else:
            monkeypatch.setenv("SDPA_PASS_BATCH_INNER", setting)
        clear_plans()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        inputs = leaves + ([attn_mask] if attn_mask.requires_grad else [])
        out = attention(*leaves, attn_mask, **kwargs)
        grads = torch.autograd.grad(out, inputs, grad_out)
        assert _forward_meta()["BATCH_INNER"] is forward_order
        assert [m["BATCH_INNER"] for m in _backward_meta()] == [backward_order] * 2
        results.append((out, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    ref, _ = reference_attention(q, k, v, attn_mask, is_causal=causal)
    assert_close_to_reference(results[0][0], ref, dtype)
    assert_grads_close(results[0][1:], reference_grads(q, k, v, attn_mask, grad_out,
                                                       is_causal=causal), dtype)


def test_batch_first_needs_a_mask_shared_by_a_batch(monkeypatch):
    """Only a mask with a broadcast (stride 0) batch dim and a batch of more than one: a mask
    of every batch element, no mask, or one batch element keep the plain order, whatever the
    setting."""
    shared, own = (0, 4 * L * S, S, 1), (4 * L * S, L * S, S, 1)
    decide = fwd.batch_inner
    for setting in (None, "1"):
        if setting is None:
            monkeypatch.delenv("SDPA_PASS_BATCH_INNER", raising=False)
        else:
            monkeypatch.setenv("SDPA_PASS_BATCH_INNER", setting)
        assert decide(fwd.MASK_FLOAT, shared, 3, measured_faster=True)
        assert decide(fwd.MASK_BOOL, shared, 3, measured_faster=False) == (setting == "1")
        assert not decide(fwd.MASK_FLOAT, own, 3, measured_faster=True)
        assert not decide(fwd.MASK_NONE, (0, 0, 0, 0), 3, measured_faster=True)
        assert not decide(fwd.MASK_FLOAT, shared, 1, measured_faster=True)
    monkeypatch.setenv("SDPA_PASS_BATCH_INNER", "0")
    assert not decide(fwd.MASK_FLOAT, shared, 3, measured_faster=True)


def test_batch_of_one_keeps_the_plain_order(monkeypatch):
    monkeypatch.setenv("SDPA_PASS_BATCH_INNER", "1")
    clear_plans()
    q, k, v = (randn(1, HQ, n, D, dtype=torch.float16) for n in (L, S, S))
    attention(q, k, v, randn(1, HQ, L, S, dtype=torch.float16))
    assert _forward_meta()["BATCH_INNER"] is False


def test_wide_heads_keep_the_plain_order(monkeypatch):
    """At head dims past 128 the forward keeps the plain order for a shared float mask (where
    batch-first measured slower) unless SDPA_PASS_BATCH_INNER=1 asks for it."""
    q, k, v = (randn(B, HQ, n, 256, dtype=torch.float16) for n in (L, S, S))
    bias = randn(1, HQ, L, S, dtype=torch.float16)
    for setting, expected in ((None, False), ("1", True)):
        if setting is None:
            monkeypatch.delenv("SDPA_PASS_BATCH_INNER", raising=False)
        else:
            monkeypatch.setenv("SDPA_PASS_BATCH_INNER", setting)
        clear_plans()
        out = attention(q, k, v, bias)
        assert _forward_meta()["BATCH_INNER"] is expected
    ref, _ = reference_attention(q, k, v, bias)
    assert_close_to_reference(out, ref, torch.float16)
