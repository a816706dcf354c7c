"""The float64 reference's written-out backward with a fused kernel's rounding in it
(``rounded_gradients``) and the element-wise bound it gives (``rounding_tolerance``)."""

import pytest
import torch

from reference import ABS_TOL, reference_attention, rounded_gradients, rounding_tolerance

CASES = {
    # (Hq, Hkv, L, S, keyword arguments of reference_attention; "bias" / "bool" / "padding"
    # stand for a random float bias, a random bool mask, a key_padding_mask hiding the tail)
    "bias_causal_gqa_scale": (4, 2, 40, 40, dict(attn_mask="bias", is_causal=True, scale=0.3)),
    "softcap_bottom_right_window": (4, 4, 24, 40, dict(causal="bottom_right", window=9,
                                                       softcap=3.0)),
    "bool_mask_padding_empty_rows": (4, 1, 32, 48, dict(attn_mask="bool",
                                                        key_padding_mask="padding")),
}


def case_inputs(case):
    Hq, Hkv, L, S, kwargs = CASES[case]
    generator = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    q, k, v, grad = draw(2, Hq, L, 16), draw(2, Hkv, S, 16), draw(2, Hkv, S, 16), draw(2, Hq, L, 16)
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "bias":
        kwargs["attn_mask"] = 2 * draw(L, S)
    elif kwargs.get("attn_mask") == "bool":
        mask = torch.rand(L, S, generator=generator) > 0.3
        mask[3] = False  # a row that sees no key
        kwargs["attn_mask"] = mask
    if kwargs.get("key_padding_mask") == "padding":
        padding = torch.ones(2, S, dtype=torch.bool)
        padding[1, S // 2:] = False
        kwargs["key_padding_mask"] = padding
    return q, k, v, grad, kwargs


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_written_out_backward_is_the_references_gradient_without_rounding(case):
    """With float64 as the dtype (no rounding), the written-out backward is autograd's
    through ``reference_attention``: masks, causal corners, windows, caps, GQA, empty rows."""
    q, k, v, grad, kwargs = case_inputs(case)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(reference_attention(*leaves, **kwargs)[0], leaves, grad)
    for got, want in zip(rounded_gradients(q, k, v, grad, torch.float64, **kwargs), exact):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_rounded_backward_is_off_by_about_the_dtypes_rounding(case, dtype):
    q, k, v, grad, kwargs = case_inputs(case)
    exact = rounded_gradients(q, k, v, grad, torch.float64, **kwargs)
    for got, want in zip(rounded_gradients(q, k, v, grad, dtype, **kwargs), exact):
        error = float((got - want).norm() / want.norm())
        assert torch.finfo(dtype).eps / 16 < error < torch.finfo(dtype).eps * 2


def test_rounding_tolerance_is_abs_tol_or_twice_the_rounded_backwards_error():
    dtype = torch.bfloat16
    ref = torch.tensor([1.0, -4.0, 0.5, float("inf")], dtype=torch.float64)
    small = ref + torch.tensor([0.01, 0.0, -0.02, 0.0], dtype=torch.float64)
    assert rounding_tolerance(small, ref, dtype) == ABS_TOL[dtype]
    large = ref + torch.tensor([0.0, 0.1, 0.0, 0.0], dtype=torch.float64)
    # the error past two units in the last place at |x| = 4 (eps 2**-7), twice
    assert rounding_tolerance(large, ref, dtype) == pytest.approx(2 * (0.1 - 2 * 4 * 2 ** -7))
