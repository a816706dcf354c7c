"""The one reference for every test: attention written out in float64 eager PyTorch.

It spells each mask out as the explicit index predicate the kernel claims to implement, so it
shares no code with the kernels or their CPU path.
"""

from __future__ import annotations

import math

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

# ‖out − ref‖ / ‖ref‖ bounds (METHOD: fp32 far under 1e-3, half types from rounding of P and O)
REL_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
ABS_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def reference_attention(
    q, k, v, attn_mask=None, is_causal=False, scale=None, *, causal=None, diagonal=0,
    window=None, key_padding_mask=None, softcap=None, empty_rows="zero", dropout_p=0.0,
    keep=None,
):
    """Returns (out, lse) in float64 on the CPU. ``keep``: a (B, Hq, L, S) bool dropout mask
    (True = kept) applied to the probabilities with ``F.dropout``'s 1 / (1 - p) scaling."""
    # no detach: gradient tests differentiate through this reference
    q, k, v, _, s, p, _ = _probabilities(q, k, v, attn_mask, is_causal, scale, causal, diagonal,
                                         window, key_padding_mask, softcap, empty_rows)
    lse = torch.logsumexp(s, dim=-1)
    if keep is not None:
        p = p * keep.cpu() / (1.0 - dropout_p)
    return p @ v, lse


def _probabilities(q, k, v, attn_mask, is_causal, scale, causal, diagonal, window,
                   key_padding_mask, softcap, empty_rows):
    """(q, k, v in float64 with K and V repeated per query head, the scale, the masked scores,
    P, and tanh of the scaled scores over the cap, or None without one)."""
    q, k, v = (t.to("cpu", torch.float64) for t in (q, k, v))
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = softcap * t
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    visible = torch.ones(B, Hq, L, S, dtype=torch.bool)
    if is_causal:
        causal = "top_left"
    if causal is not None:
        offset = diagonal + (S - L if causal == "bottom_right" else 0)
        visible &= j <= i + offset
        if window is not None:
            visible &= j > i + offset - window
    if key_padding_mask is not None:
        visible &= key_padding_mask.cpu()[:, None, None, :]
    if attn_mask is not None:
        m = attn_mask.cpu()
        if m.dtype == torch.bool:
            visible &= m
        else:
            # a -inf entry hides its key as a bool mask's False does, gradients included: a
            # row of them gives zero gradients, not eager's NaN (the library's contract,
            # test_backward.test_fully_masked_rows_contribute_nothing)
            visible &= m != float("-inf")
            s = s + m.to(torch.float64)
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)  # NaN on rows with no visible key, as eager gives
    if empty_rows == "zero":
        # such rows output zeros and, differentiated, contribute nothing (not NaN * 0)
        p = p.nan_to_num(nan=0.0)
    return q, k, v, scale, s, p, t


def rounded_gradients(q, k, v, grad, dtype, attn_mask=None, is_causal=False, scale=None, *,
                      causal=None, diagonal=0, window=None, key_padding_mask=None, softcap=None):
    """(dQ, dK, dV) of ``reference_attention`` in float64 with a fused kernel's rounding to
    ``dtype`` in it (none for float64), written out as FlashAttention's backward: P rounded
    where it meets V and dO, the output O rounded before delta = rowsum(dO O) (the prep
    kernel reads the stored output), dS = P (dP - delta) (times 1 - t² under a cap) rounded
    where it meets K and Q. What is left of such a kernel's error once its fp32 sums are taken
    as exact (``rounding_tolerance``)."""
    group = q.shape[1] // k.shape[1]
    q, kk, vv, scale, _, p, t = _probabilities(
        q, k, v, attn_mask, is_causal, scale, causal, diagonal, window, key_padding_mask,
        softcap, "zero")
    low = lambda x: x.to(dtype).to(torch.float64)  # noqa: E731
    g = grad.to("cpu", torch.float64)
    dp = g @ vv.transpose(-2, -1)
    ds = p * (dp - (g * low(low(p) @ vv)).sum(-1, keepdim=True))
    if t is not None:
        ds = ds * (1 - t * t)
    ds = low(ds)
    B, Hkv, S = k.shape[0], k.shape[1], k.shape[2]
    fold = lambda x: x.view(B, Hkv, group, S, -1).sum(2)  # noqa: E731 (GQA: sum the group)
    return (scale * ds @ kk, fold(scale * ds.transpose(-2, -1) @ q),
            fold(low(p).transpose(-2, -1) @ g))


def _excess(o: torch.Tensor, r: torch.Tensor, dtype) -> torch.Tensor:
    """Each element's error past two units in the last place of ``dtype`` at its size."""
    return (o - r).abs() - 2 * torch.finfo(dtype).eps * r.abs()


def rounding_tolerance(rounded: torch.Tensor, ref: torch.Tensor, dtype) -> float:
    """An element-wise bound for a kernel's result in ``dtype``: ABS_TOL, or twice the largest
    error that ``rounded_gradients(..., dtype)`` itself makes (``rounded``) where that is
    larger. FlashAttention's tests bound a kernel's error by twice a low-precision
    computation's the same way. Gradients of tens with peaked rows sum terms of that size: a
    bf16 case's (test_gluon_forward BIAS_CASES' broadcast_causal_scale) rounding alone left dQ
    and dK 0.07-0.08 off (ABS_TOL: 0.06; session 33)."""
    finite = torch.isfinite(ref) & torch.isfinite(rounded)
    r = ref.detach().to("cpu", torch.float64)[finite.cpu()]
    o = rounded.detach().to("cpu", torch.float64)[finite.cpu()]
    worst = float(_excess(o, r, dtype).max()) if r.numel() else 0.0
    return max(ABS_TOL[dtype], 2 * worst)


def assert_close_to_reference(out, ref, dtype, what="output", abs_tol=None):
    """Same NaN pattern, relative error within the dtype's bound, no element far off
    (``abs_tol``: that bound, ABS_TOL's unless given; ``rounding_tolerance``)."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    nan_out, nan_ref = out.isnan(), ref.isnan()
    assert torch.equal(nan_out, nan_ref), (
        f"{what}: NaN at {int(nan_out.sum())} places, reference has {int(nan_ref.sum())}"
    )
    o, r = out[~nan_ref], ref[~nan_ref]
    if r.numel() == 0:
        return
    finite = torch.isfinite(r)
    assert torch.equal(o[~finite], r[~finite]), f"{what}: infinities differ"
    o, r = o[finite], r[finite]
    # relative to the reference's norm, floored at one unit roundoff of the dtype per element:
    # the inputs are of unit size, so where the exact result cancels to (near) zero, as dQ does
    # for a window of one key (P = 1, dS = P * (dP - delta) = 0), rounding of unit-sized terms
    # is what remains, and ‖ref‖ alone would turn 1e-6 of it into an unbounded ratio
    floor = torch.finfo(dtype).eps * r.numel() ** 0.5
    rel = (o - r).norm() / r.norm().clamp_min(floor)
    assert rel <= REL_TOL[dtype], f"{what}: relative error {rel:.3e} > {REL_TOL[dtype]:.1e} ({dtype})"
    # each element within ABS_TOL plus two units in the last place of the dtype at its size:
    # a value stored in bf16 at |x| = 16 is off by up to 0.0625 after rounding alone
    abs_tol = ABS_TOL[dtype] if abs_tol is None else abs_tol
    excess = _excess(o, r, dtype)
    worst = int(excess.argmax())
    assert excess[worst] <= abs_tol, (
        f"{what}: abs error {(o - r).abs()[worst]:.3e} at {r[worst]:.3e} > {abs_tol:.1e} "
        f"+ 2 ulp ({dtype})")


def randn(*shape, dtype=torch.float32, device=DEVICE, generator=None):
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
