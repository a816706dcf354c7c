"""Padding masks in the Hopper kernels in Gluon (kernels/gluon_forward.py, gluon_backward.py).

A padding mask is one row of keys per (batch, head), the same for every query row: a
key_padding_mask, or a bool attn_mask broadcast over query rows (HF's (B, 1, 1, S)). The Gluon
forward and both Gluon backward kernels read it (``KEY_SPAN``): the forward and dQ visit only
the key tiles of the row's visible span and mask inside it, dK/dV gives a key tile the row
hides entirely no work. Any other mask keeps the Triton kernels.

Off a Hopper GPU these tests check what the host code hands the refusals and kernels (which
masks count as padding rows, with which flags and strides) and what the compiler makes of the
padded kernels for sm_90; on a Hopper GPU the outputs, LSEs and gradients of every padding
form (right, left, scattered, both masks, rows of their own per head, rows with no key,
causal rows before the first visible key) are compared with the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from sdpa_pass.kernels import attention
from sdpa_pass.kernels import backward as bwd
from sdpa_pass.kernels import forward as fwd
from sdpa_pass.kernels import gluon_backward as gbwd
from sdpa_pass.kernels import gluon_forward as gfwd
from sdpa_pass.kernels.checks import AttentionShape
from sdpa_pass.kernels.launch import clear_plans
from reference import DEVICE, assert_close_to_reference, randn, reference_attention
from script_runner import last_json
from test_gluon_backward import default_gluon_kernels
from test_gluon_forward import launches_of

HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(gfwd.gluon is None, reason="this Triton has no Gluon Hopper API")
needs_hopper = pytest.mark.skipif(not HOPPER or gfwd.gluon is None,
                                  reason="the Gluon kernels run on a Hopper GPU only")


def test_padding_flags_name_the_rows_read():
    assert gfwd.padding_flags(False, False, 0) == 0
    assert gfwd.padding_flags(True, False, 2) == 2
    assert gfwd.padding_flags(False, True, 1) == 1
    assert gfwd.padding_flags(True, True, 3) == 3
    assert gfwd.padding_flags(True, True, 0) == -1  # SDPA_PASS_KEY_SPAN=0


@needs_gluon
def test_refusals_take_padding_rows_and_name_what_they_do_not(monkeypatch):
    h = torch.bfloat16
    q, kv = torch.zeros(2, 4, 256, 128, dtype=h), torch.zeros(2, 2, 384, 128, dtype=h)
    shape = AttentionShape(2, 4, 2, 256, 384, 128, 128)
    fwd_args = dict(scale=0.1, causal_align=0, diagonal=0, window=-1, softcap=0.0,
                    dropout_p=0.0, capability=9)
    bwd_args = dict(window=-1, softcapped=False, dropout=False, dq_atomic=False,
                    padded_rows=True, rows=256, small=False, capability=9)

    def refusals(**flags):
        return (gfwd.gluon_forward_refusal(q, kv, kv, shape, **fwd_args, **flags),
                gbwd.gluon_backward_refusal(q, kv, kv, q, shape, **bwd_args, **flags))

    for padding in (0, 1, 2, 3):
        assert refusals(masked=False, padding=padding) == (None, None)
    for reason in refusals(masked=True, padding=0):
        assert "does not read" in reason
    for reason in refusals(masked="a float32 attn_mask", padding=0):  # tile_mask_refusal's
        assert reason == "a float32 attn_mask"
    for reason in refusals(masked=False, padding=-1):
        assert "SDPA_PASS_KEY_SPAN=0" in reason
    monkeypatch.setenv("SDPA_PASS_GLUON_PADDING", "0")
    for reason in refusals(masked=False, padding=2):
        assert "SDPA_PASS_GLUON_PADDING=0" in reason
    assert refusals(masked=False, padding=0) == (None, None)  # no padding: not concerned


def test_padded_calls_at_hd64_take_the_gluon_forward_where_it_was_measured_faster():
    """(Any device.) At head dim 64 a padded call without a causal mask takes the persistent
    Gluon forward from HD64_PERSISTENT_MIN_KEYS keys, as an unpadded one (H200: 1.20-1.23x
    the Triton forward at 512-2k keys, session 36); a causal padded one, which keeps the
    one-tile kernel, from HD64_MIN_KEYS."""
    h = torch.bfloat16
    fwd_args = dict(scale=0.1, masked=False, diagonal=0, window=-1, softcap=0.0,
                    dropout_p=0.0, capability=9)
    q = torch.zeros(2, 4, 256, 64, dtype=h)

    def refusal(keys, causal_align):
        kv = torch.zeros(2, 2, keys, 64, dtype=h)
        shape = AttentionShape(2, 4, 2, 256, keys, 64, 64)
        return gfwd.gluon_forward_refusal(q, kv, kv, shape, padding=2,
                                          causal_align=causal_align, **fwd_args)

    least = gfwd.HD64_PERSISTENT_MIN_KEYS[False]
    assert refusal(least, 0) is None
    assert f"under {least} " in refusal(least - 128, 0)
    assert refusal(gfwd.HD64_MIN_KEYS, 1) is None
    assert f"under {gfwd.HD64_MIN_KEYS} " in refusal(gfwd.HD64_MIN_KEYS - 128, 1)


def expected_spans(visible: torch.Tensor) -> torch.Tensor:
    """(..., 3): first visible key, past the last, dense; (S, 0, 0) where none is."""
    S = visible.shape[-1]
    idx = torch.arange(S, device=visible.device)
    first = torch.where(visible, idx, S).amin(-1)
    end = torch.where(visible, idx + 1, 0).amax(-1)
    dense = visible.sum(-1) == end - first
    return torch.stack([first, end, dense.long()], -1).to(torch.int32)


def test_padding_spans_find_the_visible_span_and_whether_it_is_dense():
    """``forward.padding_spans`` (the Gluon kernels' key tile ranges, run here in the
    interpreter): each row's first visible key, past the last, and whether every key between
    is visible, over rows longer than one scan step, for each padding form and their
    combination; a row per query head where the mask has one."""
    generator = torch.Generator().manual_seed(0)
    B, H, S = 6, 3, 2500  # three 1024-key steps, the last ragged
    row = torch.ones(B, S, dtype=torch.bool)
    row[1, 1700:] = False  # right padding
    row[2, :40] = False  # left padding
    row[3] = torch.rand(S, generator=generator) < 0.5  # scattered: not dense
    row[4] = False  # nothing visible
    row[5, :1024] = False
    row[5, 2047:] = False  # a span across a step boundary
    row = row.to(DEVICE)
    other = torch.ones_like(row)
    other[:, 2400:] = False
    other[0, 100] = False  # a hole in an otherwise full row: not dense
    mask_strides = row[:, None, None, :].expand(B, H, 8, S).stride()
    spans = fwd.padding_spans(None, (0, 0), row[:, None, None, :], mask_strides, B, H, S, 2)
    torch.testing.assert_close(spans.cpu(), expected_spans(row.cpu())[:, None])
    spans = fwd.padding_spans(row, row.stride(), None, (0, 0, 0, 0), B, H, S, 1)
    torch.testing.assert_close(spans.cpu(), expected_spans(row.cpu())[:, None])
    spans = fwd.padding_spans(row, row.stride(), other[:, None, None, :], mask_strides, B, H,
                              S, 3)
    torch.testing.assert_close(spans.cpu(), expected_spans((row & other).cpu())[:, None])
    heads = torch.stack([row, other, row.flip(0)], dim=1)  # (B, H, S): a row per head
    mask = heads[:, :, None, :]
    spans = fwd.padding_spans(None, (0, 0), mask, mask.expand(B, H, 8, S).stride(), B, H, S, 2)
    assert spans.shape == (B, H, 3)
    torch.testing.assert_close(spans.cpu(), expected_spans(heads.cpu()))


def padding_masks(B, Hq, L, S, device=DEVICE):
    """(name, attn_mask, key_padding_mask, expected masked, expected padding flags)."""
    row = torch.ones(B, S, dtype=torch.bool, device=device)
    row[0, S // 2:] = False
    return [
        ("hf_row", row[:, None, None, :], None, False, 2),
        ("kpm", None, row, False, 1),
        ("both", row[:, None, None, :], row, False, 3),
        ("per_head_rows", row[:, None, None, :].expand(B, Hq, 1, S).clone(), None, False, 2),
        ("shared_row_2d", row[0][None, :], None, False, 2),  # (1, S): one row for every batch
        ("rows_of_their_own", row[:, None, None, :].expand(B, 1, L, S).clone(), None, True, 0),
        ("float_bias", torch.zeros(B, 1, 1, S, device=device), None, True, 0),
    ]


@pytest.mark.parametrize("span_off", [False, True])
def test_the_forward_and_backward_hand_the_kernels_the_padding_rows(span_off, monkeypatch):
    """(Any device: the refusals record their arguments, then refuse.) Which masks reach the
    Gluon kernels' refusals as padding rows, with which KEY_SPAN flags: a key_padding_mask and
    a bool mask broadcast over query rows do; a bool mask with rows of its own and a float
    mask are 'masked'; with SDPA_PASS_KEY_SPAN=0 padding rows are -1 (refused)."""
    if span_off:
        monkeypatch.setenv("SDPA_PASS_KEY_SPAN", "0")
    clear_plans()
    seen = []

    def record(*args, masked, padding, **kwargs):
        seen.append((bool(masked), padding))  # (the forward passes its reason, a string)
        return "recorded"

    monkeypatch.setattr(fwd, "gluon_forward_refusal", record)
    monkeypatch.setattr(bwd, "gluon_backward_refusal", record)
    monkeypatch.setattr(fwd, "host_bound", lambda shape: False)
    B, Hq, Hkv, L, S, D = 2, 4, 2, 24, 40, 16
    for name, mask, kpm, masked, padding in padding_masks(B, Hq, L, S):
        seen.clear()
        q = randn(B, Hq, L, D).requires_grad_()
        k, v = (randn(B, Hkv, S, D).requires_grad_() for _ in range(2))
        out = attention(q, k, v, attn_mask=mask, key_padding_mask=kpm, enable_gqa=True)
        out.sum().backward()
        expected = padding if not span_off or padding == 0 else -1
        assert seen == [(masked, expected)] * 2, name


def compile_report(probe: str, *args: str) -> dict:
    return last_json(probe, "--compile", *args)


@needs_gluon
@pytest.mark.parametrize("kernel", ["forward", "dkdv", "dq"])
def test_padded_kernels_compile_for_sm90_with_their_overlap(kernel):
    """Compiled for sm_90 with HF's padding row (KEY_SPAN 2): the exponentials still between
    the waits they overlap with, the same wgmma count, and little more stack. The forward's
    120 more bytes (triton 3.9) are the row's 32 per-thread key addresses, computed once before
    the key loop and reloaded only on the branch that reads the row (a dense span's edge
    tiles); read on every tile, ahead of the products, the row spilled in the loop itself
    (312 bytes causal)."""
    if kernel == "forward":
        plain = compile_report("gluon_fwd_probe.py", "--product", "bf16", "--causal")
        padded = compile_report("gluon_fwd_probe.py", "--product", "bf16", "--causal",
                                "--padding", "2")
        assert padded["EX2 between W1 and W0"] == plain["EX2 between W1 and W0"]
    else:
        args = ["--product", "bf16", "--product-kernel", kernel, "--causal-product"]
        plain = compile_report("gluon_bwd_probe.py", *args)
        padded = compile_report("gluon_bwd_probe.py", *args, "--padding", "2")
        assert padded["MUFU.EX2"] == plain["MUFU.EX2"]
    assert padded["stack_bytes"] <= plain["stack_bytes"] + (128 if kernel == "forward" else 32), (
        padded, plain)
    assert padded["HGMMA"] == plain["HGMMA"]
    assert not padded["wgmma serialized (ptxas C7514)"]


def _rows(B, S, kind, generator):
    """(B, S) bool visibility rows: batch 0 keeps every key, the others as ``kind`` says."""
    row = torch.ones(B, S, dtype=torch.bool)
    for b in range(1, B):
        if kind == "right":
            row[b, S * (b + 1) // (2 * B) + 37:] = False
        elif kind == "left":
            row[b, : S // 3 + 61 * b] = False
        elif kind == "scattered":
            row[b] = torch.rand(S, generator=generator) < 0.7
        elif kind == "none_visible":
            row[b] = False
    return row.to(DEVICE)


# (B, Hq, Hkv, L, S, dtype, head_dim, padding kind, how it is passed, extras)
GPU_CASES = {
    "hf_right_bf16": (2, 8, 2, 1024, 1024, torch.bfloat16, 128, "right", "hf", {}),
    "hf_left_causal_bottom_right": (2, 8, 2, 1024, 1024, torch.bfloat16, 128, "left", "hf",
                                    dict(causal="bottom_right")),
    "kpm_ragged_fp16": (2, 8, 8, 1000, 1100, torch.float16, 128, "right", "kpm", {}),
    "both_scattered": (2, 4, 4, 768, 1536, torch.bfloat16, 128, "scattered", "both", {}),
    "per_head_rows_gqa": (2, 8, 2, 512, 2048, torch.bfloat16, 128, "scattered", "per_head", {}),
    "none_visible": (3, 4, 4, 1024, 1024, torch.float16, 128, "none_visible", "hf", {}),
    "none_visible_nan": (3, 4, 4, 1024, 1024, torch.float16, 128, "none_visible", "hf",
                         dict(empty_rows="nan")),
    "hd64_right_causal": (2, 8, 4, 1024, 4096, torch.bfloat16, 64, "right", "hf",
                          dict(is_causal=True)),
    "hd64_left_kpm": (2, 4, 4, 600, 4100, torch.float16, 64, "left", "kpm", {}),
    # hd256: the forward's 64-key tiles, the dK/dV and dQ kernels' split schedule
    "hd256_right_causal": (2, 4, 4, 1024, 1536, torch.float16, 256, "right", "hf",
                           dict(is_causal=True)),
    "hd256_per_head_rows_gqa": (2, 8, 2, 512, 1024, torch.bfloat16, 256, "scattered",
                                "per_head", {}),
    "hd256_left_kpm_bottom_right": (2, 4, 2, 700, 1100, torch.bfloat16, 256, "left", "kpm",
                                    dict(causal="bottom_right")),
}


def _masks(kind, how, B, Hq, S, generator):
    row = _rows(B, S, kind, generator)
    if how == "hf":
        return dict(attn_mask=row[:, None, None, :])
    if how == "kpm":
        return dict(key_padding_mask=row)
    if how == "both":
        other = _rows(B, S, "right", generator)
        return dict(attn_mask=other[:, None, None, :], key_padding_mask=row)
    # per_head: each query head a row of its own (a GQA group's heads differ)
    heads = torch.stack([_rows(B, S, kind, generator) for _ in range(Hq)], dim=1)
    return dict(attn_mask=heads[:, :, None, :])


def record_calls(monkeypatch):
    calls = []
    real_fwd = fwd.attention_forward_gluon
    monkeypatch.setattr(fwd, "attention_forward_gluon",
                        lambda *a, **k: calls.append(("forward", a[11])) or real_fwd(*a, **k))
    for name in ("dkdv", "dq"):
        real = getattr(bwd, f"attention_{name}_gluon")
        monkeypatch.setattr(bwd, f"attention_{name}_gluon",
                            lambda *a, _n=name, _r=real, **k: calls.append((_n, k.get("padding", 0)))
                            or _r(*a, **k))
    return calls


@needs_hopper
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_padded_gluon_kernels_match_the_reference(case, monkeypatch):
    """Every case as the library runs it: without a causal mask the persistent forward at head
    dims 64 / 128 (since session 36), else the one-tile one."""
    launched = launches_of(monkeypatch)
    padded_against_the_reference(case, monkeypatch)
    assert [kernel for kernel, _ in launched] == [
        gfwd._attention_fwd_persistent if case in PERSISTENT_PADDED else gfwd._attention_fwd_ws]


# Padded cases the persistent forward takes (no causal mask, head dims 64 / 128): through it
# with a few CTAs (each walks many work tiles of different spans, the K / V ring's count
# running across them), and through the one-tile forward (SDPA_PASS_GLUON_PERSISTENT=0)
PERSISTENT_PADDED = [case for case, (*_, D, _kind, _how, extras) in sorted(GPU_CASES.items())
                     if D in gfwd.HEAD_DIMS and not (extras.get("is_causal") or "causal" in extras)]


@needs_hopper
@pytest.mark.parametrize("kernel", ["persistent_5_ctas", "one_tile"])
@pytest.mark.parametrize("case", PERSISTENT_PADDED)
def test_padded_forward_kernels_match_the_reference(case, kernel, monkeypatch):
    if kernel == "one_tile":
        monkeypatch.setenv("SDPA_PASS_GLUON_PERSISTENT", "0")
    else:
        monkeypatch.setattr(gfwd, "PERSISTENT_MAX_CTAS", 5)
    launched = launches_of(monkeypatch)
    padded_against_the_reference(case, monkeypatch)
    assert [kernel_ for kernel_, _ in launched] == [
        gfwd._attention_fwd_ws if kernel == "one_tile" else gfwd._attention_fwd_persistent]



# Padding rows beside soft-capped scores (taken by default since session 27, when these first
# ran on a GPU; SDPA_PASS_GLUON_SOFTCAP=1 here so hd128's short keys take the Gluon forward too)
SOFTCAP_CASES = ("hf_right_bf16", "hf_left_causal_bottom_right", "kpm_ragged_fp16", "none_visible",
                 "per_head_rows_gqa", "hd64_right_causal", "hd256_left_kpm_bottom_right")


@needs_hopper
@pytest.mark.parametrize("case", SOFTCAP_CASES)
def test_padded_gluon_kernels_with_soft_capped_scores(case, monkeypatch):
    """The Gluon kernels take padding rows and a cap together (tanh before the padding's mask,
    every key tile outside the span still skipped)."""
    monkeypatch.setenv("SDPA_PASS_GLUON_SOFTCAP", "1")
    padded_against_the_reference(case, monkeypatch, softcap=5.0)


def padded_against_the_reference(case, monkeypatch, **more):
    """GPU_CASES[case] (with ``more`` arguments) through the Gluon forward and backward: output,
    LSE and gradients against float64, and each kernel handed the padding flags."""
    B, Hq, Hkv, L, S, dtype, D, kind, how, extras = GPU_CASES[case]
    extras = dict(extras, **more)
    generator = torch.Generator().manual_seed(len(case))
    masks = _masks(kind, how, B, Hq, S, generator)
    flags = (1 if "key_padding_mask" in masks else 0) | (2 if "attn_mask" in masks else 0)
    calls = record_calls(monkeypatch)
    q = randn(B, L, Hq, D, dtype=dtype).transpose(1, 2).requires_grad_()  # HF's storage
    k, v = (randn(B, Hkv, S, D, dtype=dtype).requires_grad_() for _ in range(2))
    grad = randn(B, Hq, L, D, dtype=dtype)
    out, lse = attention(q, k, v, enable_gqa=True, return_lse=True, **masks, **extras)
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference_attention(*refs, **masks, **extras)
    assert_close_to_reference(out, ref, dtype)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=1e-3, atol=1e-3)
    if extras.get("empty_rows") == "nan":
        assert calls == [("forward", flags)]
        return
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, refs, grad.double().cpu())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_to_reference(g, r, dtype, what=f"d{name}")
    assert calls == [("forward", flags)] + [(name, flags)
                                            for name in default_gluon_kernels(D)]


@needs_hopper
def test_padding_off_keeps_the_triton_kernels(monkeypatch):
    """SDPA_PASS_GLUON_PADDING=0: a padded call takes the Triton kernels (same answers)."""
    monkeypatch.setenv("SDPA_PASS_GLUON_PADDING", "0")
    calls = record_calls(monkeypatch)
    dtype = torch.bfloat16
    q = randn(2, 8, 1024, 128, dtype=dtype)
    k, v = (randn(2, 8, 1024, 128, dtype=dtype) for _ in range(2))
    mask = _rows(2, 1024, "right", None)[:, None, None, :]
    out = attention(q, k, v, attn_mask=mask)
    assert calls == []
    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=mask)[0], dtype)
