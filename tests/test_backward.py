"""Gradients of the attention op against the float64 reference, over the feature grid.

The forward runs the Triton kernel (in the interpreter on CPU). Every test runs against both
backward implementations: the Triton kernels (``kernels/backward.py``, used when the forward
kept its LSE) and the chunked PyTorch code of ``kernels/cpu.py`` (the CPU path, and the
fallback without an LSE). An autouse fixture shrinks the chunks to a few query rows, so the
chunked runs cross chunk boundaries.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import sdpa_pass.kernels.backward as bwd
import sdpa_pass.kernels.cpu as cpu_path
import sdpa_pass.kernels.ops as ops
from sdpa_pass.kernels import attention
from reference import DEVICE, DTYPES, assert_close_to_reference, randn, reference_attention
from test_kernel_forward import B, CAUSAL_KINDS, HEADS, MASK_KINDS, make_mask, make_qkv

# Smaller than the forward grid's shapes: the interpreter's time is per tile.
L, S, D = 13, 24, 16
FORWARD = torch.ops.sdpa_pass.attention_forward.default
BACKWARD = torch.ops.sdpa_pass.attention_backward.default
GRAD_MASK_KINDS = MASK_KINDS + ["float_LS"]


def _chunked_instead_of_triton(grad_out, q, k, v, attn_mask, key_padding_mask, out, lse, shape,
                               grad_lse=None, **params):
    return cpu_path.attention_backward_chunked(grad_out, q, k, v, attn_mask, key_padding_mask,
                                               out, grad_lse, shape, **params)


@pytest.fixture(autouse=True, params=["triton_backward", "chunked_backward"])
def _seed_and_small_chunks(request, monkeypatch):
    if request.param == "chunked_backward":
        monkeypatch.setattr(ops, "attention_backward_triton", _chunked_instead_of_triton)
    torch.manual_seed(0)
    # For (B=2, H=4, S=24) the 13 query rows take 7 backward chunks of 2 rows (4 blocks of
    # scores alive) and 2 chunked-forward chunks of 8 rows.
    monkeypatch.setattr(cpu_path, "_CHUNK_ELEMENTS", 8 * B * 4 * S)


class _DifferentiableReference(TorchFunctionMode):
    """Lets gradients flow through ``reference_attention``, which detaches q, k and v, and
    gives rows with no visible key zero probabilities instead of softmax's NaN, whose backward
    would turn all of dV into NaN (NaN * 0 in P^T dO). Zero contribution from such rows is the
    op's convention; the forward value is not compared here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach:
            return args[0]
        result = func(*args, **(kwargs or {}))
        if func is torch.softmax:
            result = result.nan_to_num(nan=0.0)
        return result


def reference_grads(q, k, v, attn_mask, grad_out, grad_lse=None, **kwargs):
    """float64 (dq, dk, dv[, dmask]) of the reference; dmask when attn_mask requires grad."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = attn_mask
    if attn_mask is not None and attn_mask.requires_grad:
        mask = attn_mask.detach().double().requires_grad_()
        leaves.append(mask)
    with _DifferentiableReference():
        out, lse = reference_attention(*leaves[:3], mask, **kwargs)
    outputs, grads = [out], [grad_out.double().cpu()]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse.double().cpu())
    return torch.autograd.grad(outputs, leaves, grads)


def op_grads(q, k, v, attn_mask, grad_out, grad_lse=None, **kwargs):
    """(dq, dk, dv[, dmask]) of ``attention``; dmask when attn_mask requires grad."""
    leaves = [q, k, v] + ([attn_mask] if attn_mask is not None and attn_mask.requires_grad else [])
    result = attention(q, k, v, attn_mask, return_lse=grad_lse is not None, **kwargs)
    if grad_lse is None:
        return torch.autograd.grad(result, leaves, grad_out)
    return torch.autograd.grad(result, leaves, (grad_out, grad_lse))


def assert_grads_close(grads, ref_grads, dtype):
    for name, g, r in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads):
        assert_close_to_reference(g, r, dtype, what=name)


def make_grad_mask(kind, hq, dtype):
    """A mask of the forward grid, or an (L, S) float bias; float masks require grad."""
    if kind == "float_LS":
        attn_mask, kpm = randn(L, S, dtype=dtype), None
    else:
        attn_mask, kpm = make_mask(kind, hq, L, S, dtype)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask.requires_grad_()
    return attn_mask, kpm


def leaves(*tensors):
    return [t.requires_grad_() for t in tensors]


def grads_grid():
    """(dtype, mask, causal form): the whole grid in fp32 and on a GPU; in the interpreter
    the half types take every third (mask, causal form) pair, so each mask and each causal
    form still runs in them (see test_kernel_forward.forward_grid)."""
    return [(dtype, mask, causal)
            for dtype in DTYPES
            for i, mask in enumerate(GRAD_MASK_KINDS)
            for j, causal in enumerate(CAUSAL_KINDS)
            if dtype == torch.float32 or DEVICE == "cuda" or (i + j) % 3 == 0]


@pytest.mark.parametrize("dtype, mask, causal", grads_grid(), ids=str)
def test_grads_match_reference(dtype, mask, causal):
    """dq, dk, dv and a float mask's gradient, with GQA (dk/dv summed over each group)."""
    hq, hkv = HEADS["gqa2"]
    q, k, v = leaves(*make_qkv(dtype, hq, hkv, L=L, S=S, D=D))
    attn_mask, kpm = make_grad_mask(mask, hq, dtype)
    dout = randn(B, hq, L, D, dtype=dtype)
    extras = dict(key_padding_mask=kpm, **CAUSAL_KINDS[causal])
    grads = op_grads(q, k, v, attn_mask, dout, enable_gqa=True, **extras)
    assert [g.dtype for g in grads] == [dtype] * len(grads)
    assert_grads_close(grads, reference_grads(q, k, v, attn_mask, dout, **extras), dtype)


@pytest.mark.parametrize("causal", ["none", "bottom_right", "window7_bottom_right"])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_layouts(dtype, heads, causal):
    """MHA, GQA and MQA: each K/V head's gradient sums over its query heads."""
    hq, hkv = HEADS[heads]
    q, k, v = leaves(*make_qkv(dtype, hq, hkv, L=L, S=S, D=D, DV=8))
    bias = randn(B, 1, 1, S, dtype=dtype).requires_grad_()
    dout = randn(B, hq, L, 8, dtype=dtype)
    extras = CAUSAL_KINDS[causal]
    grads = op_grads(q, k, v, bias, dout, enable_gqa=True, **extras)
    assert_grads_close(grads, reference_grads(q, k, v, bias, dout, **extras), dtype)


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap(dtype, causal):
    """Gemma 2: the gradient passes through cap * tanh(s / cap), saturated at large logits."""
    q, k, v = make_qkv(dtype, 4, 2, L=L, S=S, D=D)
    q, k, v = leaves((q * 4).detach(), k, v)
    bias = randn(1, 4, L, S, dtype=dtype).requires_grad_()
    dout = randn(B, 4, L, D, dtype=dtype)
    extras = dict(softcap=5.0, scale=0.3, **CAUSAL_KINDS[causal])
    grads = op_grads(q, k, v, bias, dout, enable_gqa=True, **extras)
    assert_grads_close(grads, reference_grads(q, k, v, bias, dout, **extras), dtype)


@pytest.mark.parametrize("use_lse", ["lse_returned", "lse_in_loss"])
@pytest.mark.parametrize("causal", ["none", "window7_bottom_right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_lse(dtype, causal, use_lse):
    """Grads are the same with the LSE returned; when the loss uses it, d lse / d s = P."""
    q, k, v = leaves(*make_qkv(dtype, 4, 2, L=L, S=S, D=D))
    bias = randn(B, 4, 1, S, dtype=dtype).requires_grad_()
    dout = randn(B, 4, L, D, dtype=dtype)
    extras = CAUSAL_KINDS[causal]
    if use_lse == "lse_returned":
        out, _ = attention(q, k, v, bias, enable_gqa=True, return_lse=True, **extras)
        grads = torch.autograd.grad(out, (q, k, v, bias), dout)
        ref = reference_grads(q, k, v, bias, dout, **extras)
    else:
        dlse = randn(B, 4, L)
        grads = op_grads(q, k, v, bias, dout, dlse, enable_gqa=True, **extras)
        ref = reference_grads(q, k, v, bias, dout, dlse, **extras)
    assert_grads_close(grads, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype):
    """(B, L, H, D) storage viewed as (B, H, L, D), packed K/V, a mask with stride 2."""
    q_store = randn(B, L, 4, D, dtype=dtype).requires_grad_()
    kv_store = randn(B, S, 2, 2, D, dtype=dtype).requires_grad_()
    q = q_store.transpose(1, 2)
    k, v = kv_store[:, :, 0].transpose(1, 2), kv_store[:, :, 1].transpose(1, 2)
    bias_store = randn(B, 1, 1, 2 * S, dtype=dtype).requires_grad_()
    bias = bias_store[..., ::2]
    dout = randn(B, L, 4, D, dtype=dtype).transpose(1, 2)  # a non-contiguous incoming gradient
    assert not q.is_contiguous() and bias.stride(-1) == 2 and not dout.is_contiguous()
    out = attention(q, k, v, bias, is_causal=True, enable_gqa=True)
    dq_store, dkv_store, dbias_store = torch.autograd.grad(out, (q_store, kv_store, bias_store), dout)
    dq, dk, dv, dbias = reference_grads(q, k, v, bias, dout, is_causal=True)
    assert_grads_close([dq_store.transpose(1, 2), dkv_store[:, :, 0].transpose(1, 2),
                        dkv_store[:, :, 1].transpose(1, 2), dbias_store[..., ::2]],
                       [dq, dk, dv, dbias], dtype)
    assert (dbias_store[..., 1::2] == 0).all()


@pytest.mark.parametrize("lengths, causal", [
    ((1, 24), "none"), ((1, 24), "bottom_right"), ((24, 13), "top_left"),
    ((24, 13), "bottom_right"), ((16, 16), "top_left"),
], ids=str)
def test_sequence_lengths(lengths, causal):
    """Decode (L = 1), L > S (bottom-right rows with no key at all), L = S. (Top-left decode
    is left out: its one row sees one key, so dq is exactly 0 and has no relative error.)"""
    ql, kl = lengths
    q, k, v = leaves(*make_qkv(torch.float32, 4, 2, L=ql, S=kl, D=D))
    dout = randn(B, 4, ql, D)
    extras = CAUSAL_KINDS[causal]
    grads = op_grads(q, k, v, None, dout, enable_gqa=True, **extras)
    assert_grads_close(grads, reference_grads(q, k, v, None, dout, **extras), torch.float32)


def test_empty_sequences():
    q, k, v = leaves(*make_qkv(torch.float32, L=0, S=S, D=D))
    dq, dk, dv = torch.autograd.grad(attention(q, k, v), (q, k, v), randn(B, 4, 0, D))
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(dk)) and not dv.any()
    q, k, v = leaves(*make_qkv(torch.float32, L=L, S=0, D=D))
    out = attention(q, k, v, empty_rows="nan")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), randn(B, 4, L, D))
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.numel() == 0


@pytest.mark.parametrize("mask", ["bool_rows", "padding", "float_neg_inf_rows"])
def test_fully_masked_rows_contribute_nothing(mask):
    """Rows with no visible key give zero gradient, whether their output is 0 or NaN, and a
    float mask of -inf masks exactly like a bool mask (the reference has NaN there)."""
    q, k, v = leaves(*make_qkv(torch.float32, 2, 2, L=L, S=S, D=D))
    keep = (torch.rand(B, 2, L, S) > 0.2).to(DEVICE)
    keep[:, :, 3] = False
    kpm = None
    if mask == "padding":
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[1] = False
        kpm, keep = kpm.to(DEVICE), None
    attn_mask = keep
    if mask == "float_neg_inf_rows":
        attn_mask = torch.zeros(B, 2, L, S, device=DEVICE).masked_fill(~keep, float("-inf"))
        attn_mask.requires_grad_()
    dout = randn(B, 2, L, D)
    ref = reference_grads(q, k, v, keep, dout, key_padding_mask=kpm)
    for empty_rows in ("zero", "nan"):
        grads = op_grads(q, k, v, attn_mask, dout, key_padding_mask=kpm, empty_rows=empty_rows)
        assert_grads_close(grads[:3], ref, torch.float32)
        if mask == "float_neg_inf_rows":
            dmask = grads[3]
            assert torch.isfinite(dmask).all() and (dmask[~keep] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finfo_min_rows_average_uniformly(dtype):
    """A row with every key at finfo(float32).min (HF padding) averages V in eager fp32
    softmax; its gradients are those of that average, not of an empty row."""
    q, k, v = leaves(*make_qkv(dtype, 2, 2, L=L, S=S, D=D))
    bias = torch.zeros(B, 1, L, S)
    bias[:, :, 4] = torch.finfo(torch.float32).min
    bias[:, :, 6, :5] = torch.finfo(torch.float32).min
    bias = bias.to(DEVICE).requires_grad_()
    dout = randn(B, 2, L, D, dtype=dtype)
    grads = op_grads(q, k, v, bias, dout)
    assert_grads_close(grads, reference_grads(q, k, v, bias, dout), dtype)
    assert grads[2].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_fills_pass_no_gradient_to_filled_scores(dtype):
    """mask_fills=True (what the pass sets for masked_fill/where with finfo.min): a row filled
    everywhere still averages V, but as in eager masked_fill no gradient reaches q or k
    through a filled score; partly filled rows are ordinary."""
    q, k, v = leaves(*make_qkv(dtype, 2, 2, L=L, S=S, D=D))
    filled = torch.zeros(B, 1, L, S, dtype=torch.bool)
    filled[:, :, 4] = True
    filled[:, :, 6, :5] = True
    bias = torch.zeros(B, 1, L, S).masked_fill(filled, torch.finfo(torch.float32).min).to(DEVICE)
    dout = randn(B, 2, L, D, dtype=dtype)
    out, _ = FORWARD(q, k, v, bias, None, D**-0.5, 0, 0, -1, 0.0, False, True, 0.0, None, True)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    scores = (qd @ kd.transpose(-2, -1) * D**-0.5).masked_fill(filled, torch.finfo(torch.float64).min)
    ref_out = torch.softmax(scores, dim=-1) @ vd
    assert_close_to_reference(out, ref_out, dtype)
    assert_grads_close(grads, torch.autograd.grad(ref_out, (qd, kd, vd), dout.cpu().double()), dtype)
    assert grads[0][:, :, 4].abs().max() == 0
    assert grads[2].abs().sum() > 0


# Fills where fp32 and the float64 reference agree that a filled row is a uniform average (at
# -1e9 fp32 rounds the scores' own part away while float64 keeps it, in eager as here).
@pytest.mark.parametrize("fill", [-1e30, torch.finfo(torch.float32).min], ids=["minus_1e30", "finfo_min"])
@pytest.mark.parametrize("mask_fills", [False, True], ids=["additive", "mask_fills"])
def test_rows_of_huge_negative_scores_stay_on_the_kernels(request, monkeypatch, fill, mask_fills):
    """Rows whose every score sits at a finite fill have an LSE whose fp32 rounding lost
    log(n); the Triton backward (its prep kernel) recomputes their max and log-sum on the
    device instead of handing the call to the chunked path after a host sync (which the
    Triton run forbids here). Causal, GQA, the mask's own gradient, the LSE's gradient and
    partly filled rows in one call."""
    if request.node.callspec.params["_seed_and_small_chunks"] == "triton_backward":
        def no_chunked(*args, **kwargs):
            raise AssertionError("the backward left the Triton kernels")

        monkeypatch.setattr(ops, "attention_backward_chunked", no_chunked)
    q, k, v = leaves(*make_qkv(torch.float32, 4, 2, L=L, S=S, D=D))
    filled = torch.zeros(B, 1, L, S, dtype=torch.bool)
    filled[:, :, 4] = True          # every key it sees is filled
    filled[1, :, 9, 3:] = True      # partly filled
    filled[0, :, 11, :] = True
    bias = randn(B, 1, L, S).cpu().masked_fill(filled, fill).to(DEVICE)
    dout, dlse = randn(B, 4, L, D), randn(B, 4, L)
    # not on the rows filled everywhere: the float64 reference's own logsumexp backward,
    # exp(s - lse) at s ~ fill, has the very rounding problem this test is about
    dlse[:, :, 4] = 0
    dlse[0, :, 11] = 0
    if mask_fills:
        out, lse = FORWARD(q, k, v, bias, None, D**-0.5, 2, 0, -1, 0.0, False, True, 0.0, None, True)
        grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
        # eager masked_fill: the filled scores take no gradient (their rows still average V)
        qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
        kd_, vd_ = (t.repeat_interleave(2, dim=1) for t in (kd, vd))
        keep = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        scores = (qd @ kd_.transpose(-2, -1) * D**-0.5 + bias.cpu().double().masked_fill(filled, 0))
        scores = scores.masked_fill(filled, fill).masked_fill(~keep, float("-inf"))
        ref_lse = scores.logsumexp(-1)
        ref_out = torch.softmax(scores, dim=-1) @ vd_
        ref = torch.autograd.grad((ref_out, ref_lse), (qd, kd, vd), (dout.cpu().double(), dlse.cpu().double()))
        assert grads[0][:, :, 4].abs().max() == 0
    else:
        bias.requires_grad_()
        grads = op_grads(q, k, v, bias, dout, grad_lse=dlse, causal="bottom_right", enable_gqa=True)
        ref = reference_grads(q, k, v, bias, dout, grad_lse=dlse, causal="bottom_right")
    assert_grads_close(grads, ref, torch.float32)


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["natural_log", "log2_softcap"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_mask_grad", "mask_grad"])
def test_rows_far_below_zero_keep_their_spread(softcap, requires_grad):
    """Rows whose float-mask scores all sit far below zero (LSE < -100, so the prep kernel
    recomputes their max and log-sum) yet differ from key to key: their P keeps its spread.
    With all-equal fills (the tests above) the base of that log-sum is invisible; here it is
    not, for the natural-log scores of a plain float mask and the log2 ones of a soft-capped
    call alike."""
    q, k, v = leaves(*make_qkv(torch.float32, 4, 2, L=L, S=S, D=D))
    bias = randn(B, 1, L, S).cpu()
    bias[:, :, 4] = bias[:, :, 4] * 3 - 500
    bias[1, :, 9] = bias[1, :, 9] * 2 - 250
    bias = bias.to(DEVICE).requires_grad_(requires_grad)
    dout, dlse = randn(B, 4, L, D), randn(B, 4, L)
    kwargs = dict(causal="bottom_right", softcap=softcap)
    grads = op_grads(q, k, v, bias, dout, grad_lse=dlse, enable_gqa=True, **kwargs)
    assert_grads_close(grads, reference_grads(q, k, v, bias, dout, grad_lse=dlse, **kwargs),
                       torch.float32)


@pytest.mark.parametrize("route", ["sdpa", "chunked"])
def test_pytorch_forward_path(monkeypatch, route):
    """The op on CPU tensors without the interpreter: the forward runs SDPA's CPU kernel
    (which returns no LSE) or the chunks; the backward is the same either way."""
    monkeypatch.setattr(ops, "_use_triton", lambda q: False)
    q, k, v = leaves(*make_qkv(torch.float32, 4, 2, L=L, S=S, D=D))
    dout = randn(B, 4, L, D)
    if route == "sdpa":
        bias, extras = None, dict(is_causal=True)
    else:
        bias = torch.zeros(1, 1, L, S, device=DEVICE)
        bias[..., 6, :] = torch.finfo(torch.float32).min  # averaged, not summed (fixed bug)
        bias = bias.requires_grad_()
        extras = dict(causal="bottom_right", window=9, softcap=7.0)
    grads = op_grads(q, k, v, bias, dout, enable_gqa=True, **extras)
    assert_grads_close(grads, reference_grads(q, k, v, bias, dout, **extras), torch.float32)
    out = attention(q, k, v, bias, enable_gqa=True, **extras)
    ref, _ = reference_attention(q, k, v, bias, **extras)
    assert_close_to_reference(out, ref, torch.float32)


def test_no_mask_grad_unless_asked(monkeypatch):
    """A float mask that does not require grad (or a bool mask) costs no mask gradient."""
    seen = []

    def spy_on(name):
        real = getattr(ops, name)

        def spy(*args, **kwargs):
            seen.append(kwargs["need_mask_grad"])
            return real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)

    spy_on("attention_backward_chunked")  # whichever implementation the op picks
    spy_on("attention_backward_triton")
    q, k, v = leaves(*make_qkv(torch.float32, 4, 4, L=L, S=S, D=D))
    for mask in (randn(B, 1, 1, S), torch.rand(L, S, device=DEVICE) > 0.2,
                 randn(B, 1, 1, S).requires_grad_()):
        attention(q, k, v, mask).sum().backward()
    assert seen == [False, False, True]


def _forward_args(dtype=torch.float32, mask="float", causal_align=2, window=-1, softcap=0.0,
                  lse=True, requires_grad=True):
    q, k, v = make_qkv(dtype, 4, 2, L=9, S=13, D=16)
    attn_mask = None
    if mask == "bool":
        attn_mask = (torch.rand(1, 1, 9, 13) > 0.2).to(DEVICE)
    elif mask == "float":
        attn_mask = randn(2, 1, 1, 13, dtype=dtype).requires_grad_(requires_grad)
    kpm = (torch.rand(2, 13) > 0.1).to(DEVICE)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return (q, k, v, attn_mask, kpm, 0.25, causal_align, 0, window, softcap, False, lse)


OPCHECK_CASES = [
    dict(), dict(mask="bool", causal_align=0), dict(mask=None, window=4),
    dict(softcap=20.0, lse=False), dict(dtype=torch.float16),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_forward_autograd(case):
    torch.library.opcheck(FORWARD, _forward_args(**case), test_utils=(
        "test_schema", "test_autograd_registration", "test_faketensor",
        "test_aot_dispatch_dynamic",
    ))


@pytest.mark.parametrize("grad_lse", [False, True])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_backward(case, grad_lse):
    (q, k, v, attn_mask, kpm, scale, causal_align, diagonal, window, softcap, nan_on_empty,
     return_lse) = _forward_args(requires_grad=False, **case)
    out, lse = FORWARD(q, k, v, attn_mask, kpm, scale, causal_align, diagonal, window, softcap,
                       nan_on_empty, return_lse)
    need_mask_grad = attn_mask is not None and attn_mask.is_floating_point()
    args = (randn(*out.shape, dtype=out.dtype), q, k, v, attn_mask, kpm, out, lse, scale,
            causal_align, diagonal, window, softcap, need_mask_grad,
            randn(*lse.shape) if grad_lse and return_lse else None)
    torch.library.opcheck(BACKWARD, args, test_utils=(
        "test_schema", "test_faketensor", "test_aot_dispatch_dynamic",
    ))


def test_compiles_fullgraph_with_backward():
    """AOTAutograd traces forward and backward through the ops' fake implementations."""
    q, k, v = leaves(*make_qkv(torch.float32, 4, 2, L=L, S=S, D=D))
    bias = randn(B, 1, 1, S).requires_grad_()
    dout = randn(B, L, 4, D)

    def f(q, k, v, bias):
        out = attention(q * 2.0, k, v, bias, causal="bottom_right", window=9, enable_gqa=True)
        return out.transpose(1, 2).relu()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(f(q, k, v, bias), (q, k, v, bias), dout)
    got = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias), dout)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("mask_grad", [True, False], ids=["mask_grad", "no_mask_grad"])
def test_deterministic_gradients(monkeypatch, mask_grad):
    """Under torch.use_deterministic_algorithms(True) the backward takes the path without
    atomics, even when the atomic dQ path is asked for: the GQA group's dK/dV are summed in
    one program's registers and dQ by the program that owns the rows, so two runs give
    bitwise-identical gradients."""
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", "atomic")
    q, k, v = make_qkv(torch.float32, 4, 2, L=L, S=S, D=D)
    bias = randn(B, 1, 1, S).requires_grad_(mask_grad)
    grad_out = randn(B, 4, L, D)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            leaves_ = [t.detach().requires_grad_() for t in (q, k, v)]
            out = attention(*leaves_, bias, causal="bottom_right", enable_gqa=True)
            runs.append(torch.autograd.grad(out, leaves_ + [bias] * mask_grad, grad_out))
        assert not bwd.dq_by_atomics(need_mask_grad=False)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dims, lengths", [((40, 8), (130, 130)), ((24, 24), (130, 130)),
                                           ((56, 8), (70, 200)), ((40, 8), (1, 200))], ids=str)
@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32], ids=str)
def test_narrow_value_heads_with_odd_head_dims(dtype, dims, lengths):
    """Head dims that are not a multiple of 16 (24, 40, 56) with value head dims of 8 or 24,
    over several key tiles, a float mask and causal: forward (the decode kernel at L = 1) and
    gradients. Triton 3.6 on the H100 gave wrong outputs, NaN and illegal memory accesses
    here with value tiles narrower than 64 (found by the GPU fuzzer, seeds 30512, 31728,
    31866, 32001, 32620); launch_params widens them."""
    (d, dv), (n_q, n_k) = dims, lengths
    q, k, v = make_qkv(dtype, 2, 2, L=n_q, S=n_k, D=d, DV=dv)
    bias = randn(1, 2, n_q, n_k, dtype=dtype)
    causal = {} if n_q == 1 else {"causal": "bottom_right"}
    out = attention(q, k, v, bias, **causal)
    ref, _ = reference_attention(q, k, v, bias, **causal)
    assert_close_to_reference(out, ref, dtype)
    if n_q > 1:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        grad_out = randn(*out.shape, dtype=dtype)
        assert_grads_close(op_grads(q, k, v, bias, grad_out, **causal),
                           reference_grads(q, k, v, bias, grad_out, **causal), dtype)
