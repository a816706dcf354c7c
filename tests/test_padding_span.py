"""Key padding skipped by whole tiles (``KEY_SPAN``, kernels/forward.py).

A key_padding_mask, or a bool attn_mask that is one row of keys per (batch, head) as HF's
(B, 1, 1, S) padding masks are, hides every key before its first and after its last visible
one; the forward, the dQ loop and the split-KV decode kernel skip the key tiles wholly outside
that span, and the dK/dV kernel gives such a key tile no work. The masks still apply inside.

Two kinds of test: gradients and outputs against the float64 reference for every padding
source, causal form and GQA layout (contiguous padding on the right, on the left, and a span
with a hole, so spans start and end inside tiles), and K/V poisoned with NaN where the
padding hides whole tiles, which come out finite only if those tiles are never read (and
come out NaN with ``SDPA_PASS_KEY_SPAN=0``, so the test can fail).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import triton
import triton.language as tl

from sdpa_pass.kernels import attention
from sdpa_pass.kernels.checks import CAUSAL_NONE, check_attention_inputs
from sdpa_pass.kernels.decode import attention_decode_triton
from sdpa_pass.kernels.forward import (MASK_BOOL, MASK_BOOL_ROW, MASK_FLOAT, MASK_NONE, SPAN_KPM,
                                       SPAN_CHUNK, SPAN_MASK, SPAN_NONE, key_span,
                                       mask_kind_of, visible_key_span)
from reference import DEVICE, DTYPES, assert_close_to_reference, randn, reference_attention
from test_backward import assert_grads_close, op_grads, reference_grads

B, HQ, HKV, L, S, D = 3, 4, 2, 12, 48, 16
CAUSAL = {
    "none": {},
    "top_left": {"is_causal": True},
    "bottom_right": {"causal": "bottom_right"},
    "window9_bottom_right": {"causal": "bottom_right", "window": 9},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def padding(S: int, spans) -> torch.Tensor:
    """(len(spans), S) bool, True on each row's [start, stop) pairs."""
    kpm = torch.zeros(len(spans), S, dtype=torch.bool)
    for row, pairs in enumerate(spans):
        for start, stop in pairs:
            kpm[row, start:stop] = True
    return kpm


# right padding, left padding, and a span with a hole; each starts or ends inside a tile (16
# keys in the interpreter)
SPANS = [[(0, 29)], [(21, 48)], [(10, 16), (20, 36)]]


def masks(source: str, all_padded: bool = False):
    """(attn_mask, key_padding_mask) of a padding source."""
    kpm = padding(S, SPANS)
    if all_padded:
        kpm[2] = False
    if source == "key_padding_mask":
        return None, kpm.to(DEVICE)
    if source == "bool_B11S":  # HF's padding mask, broadcast over heads and query rows
        return kpm[:, None, None, :].to(DEVICE), None
    if source == "bool_BH1S":  # a different span per query head
        per_head = torch.stack([kpm.roll(3 * h, dims=-1) for h in range(HQ)], dim=1)
        return per_head[:, :, None, :].to(DEVICE), None
    if source == "bool_B11S_and_kpm":  # both: the kernel intersects them
        row = torch.rand(B, 1, 1, S) > 0.2
        row[:, :, :, 33:] = False
        return row.to(DEVICE), kpm.to(DEVICE)
    raise AssertionError(source)


SOURCES = ["key_padding_mask", "bool_B11S", "bool_BH1S", "bool_B11S_and_kpm"]


def qkv(dtype, S=S, L=L, D=D, b=B):
    return [randn(b, h, n, D, dtype=dtype).requires_grad_()
            for h, n in ((HQ, L), (HKV, S), (HKV, S))]


# every source and causal form in fp32; the half types (bf16 on a GPU) on two of them
GRID = [(torch.float32, source, causal) for source in SOURCES for causal in CAUSAL] + [
    (dtype, source, causal) for dtype in DTYPES[1:]
    for source, causal in (("bool_BH1S", "bottom_right"), ("key_padding_mask", "top_left"))]


@pytest.mark.parametrize("dtype, source, causal", GRID, ids=str)
def test_matches_reference(dtype, source, causal):
    """Output (rows with no visible key as NaN) and dq, dk, dv against float64."""
    q, k, v = qkv(dtype)
    attn_mask, kpm = masks(source)
    extras = dict(key_padding_mask=kpm, enable_gqa=True, **CAUSAL[causal])
    out = attention(q, k, v, attn_mask, empty_rows="nan", **extras)
    ref, _ = reference_attention(q, k, v, attn_mask, key_padding_mask=kpm, empty_rows="nan",
                                 **CAUSAL[causal])
    assert_close_to_reference(out, ref, dtype)
    dout = randn(B, HQ, L, D, dtype=dtype)
    grads = op_grads(q, k, v, attn_mask, dout, **extras)
    ref_extras = dict(key_padding_mask=kpm, **CAUSAL[causal])
    assert_grads_close(grads, reference_grads(q, k, v, attn_mask, dout, **ref_extras), dtype)


@pytest.mark.parametrize("source, dq_path", [("key_padding_mask", "atomic"),
                                             ("bool_BH1S", "split")])
def test_all_padded_batch_element(monkeypatch, source, dq_path):
    """A batch element with every key padded: its rows are empty (zeros, or NaN when asked),
    its keys get no gradient; both dQ paths."""
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", dq_path)
    q, k, v = qkv(torch.float32)
    attn_mask, kpm = masks(source, all_padded=True)
    for empty_rows in ("zero", "nan"):
        out = attention(q, k, v, attn_mask, key_padding_mask=kpm, enable_gqa=True,
                        causal="bottom_right", empty_rows=empty_rows)
        ref, _ = reference_attention(q, k, v, attn_mask, key_padding_mask=kpm,
                                     causal="bottom_right", empty_rows=empty_rows)
        assert_close_to_reference(out, ref, torch.float32)
    dout = randn(B, HQ, L, D)
    extras = dict(key_padding_mask=kpm, causal="bottom_right")
    grads = op_grads(q, k, v, attn_mask, dout, enable_gqa=True, **extras)
    assert_grads_close(grads, reference_grads(q, k, v, attn_mask, dout, **extras), torch.float32)
    assert not grads[1][2].any() and not grads[2][2].any()


# NaN-poisoned keys: visible spans far from the poison, so that whatever the key tile (16 in
# the interpreter, up to 128 on a GPU) the poisoned rows lie in tiles the span never touches.
POISON_S = 384
POISON_SPANS = [[(0, 100)], [(260, 384)]]
POISON_ROWS = [slice(256, 384), slice(0, 128)]


def poisoned(dtype, L):
    q, k, v = qkv(dtype, S=POISON_S, L=L, b=2)
    with torch.no_grad():
        for b, rows in enumerate(POISON_ROWS):
            k[b, :, rows] = float("nan")
            v[b, :, rows] = float("nan")
    return q, k, v


def poison_masks(source):
    kpm = padding(POISON_S, POISON_SPANS).to(DEVICE)
    return (None, kpm) if source == "key_padding_mask" else (kpm[:, None, None, :], None)


@pytest.mark.parametrize("source, dq_path", [("key_padding_mask", "atomic"),
                                             ("bool_B11S", "split")])
def test_hidden_tiles_are_never_read(monkeypatch, source, dq_path):
    """Forward and backward leave the poisoned (fully padded) key tiles unread: finite
    outputs and dQ, zero dK/dV there; with SDPA_PASS_KEY_SPAN=0 the NaN gets through."""
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", dq_path)
    q, k, v = poisoned(torch.float32, L=8)
    attn_mask, kpm = poison_masks(source)
    out = attention(q, k, v, attn_mask, key_padding_mask=kpm, enable_gqa=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    for b, rows in enumerate(POISON_ROWS):
        assert not dk[b, :, rows].any() and not dv[b, :, rows].any()
    # against the reference on the same keys with the poison replaced (it is never seen)
    clean = [t.detach().nan_to_num(0.0) for t in (k, v)]
    ref, _ = reference_attention(q, *clean, attn_mask, key_padding_mask=kpm)
    assert_close_to_reference(out, ref, torch.float32)

    monkeypatch.setenv("SDPA_PASS_KEY_SPAN", "0")
    assert attention(q, k, v, attn_mask, key_padding_mask=kpm, enable_gqa=True).isnan().any()


@pytest.mark.parametrize("source", ["key_padding_mask", "bool_B11S"])
def test_decode_skips_hidden_tiles(monkeypatch, source):
    """The split-KV decode kernel: each split reads only its share of the visible span."""
    q, k, v = (t.detach() for t in poisoned(torch.float16, L=2))
    attn_mask, kpm = poison_masks(source)
    shape = check_attention_inputs(q, k, v, attn_mask, kpm, causal_align=CAUSAL_NONE, window=-1)

    def decode():
        return attention_decode_triton(
            q, k, v, attn_mask, kpm, shape, scale=1.0 / math.sqrt(D), causal_align=CAUSAL_NONE,
            diagonal=0, window=-1, softcap=0.0, nan_on_empty=True, return_lse=True,
            num_splits=5)

    out, lse = decode()
    clean = [t.nan_to_num(0.0) for t in (k, v)]
    ref, ref_lse = reference_attention(q, *clean, attn_mask, key_padding_mask=kpm)
    assert_close_to_reference(out, ref, torch.float16)
    assert_close_to_reference(lse, ref_lse, torch.float16, what="lse")
    monkeypatch.setenv("SDPA_PASS_KEY_SPAN", "0")
    assert decode()[0].isnan().any()


def test_which_masks_are_rows_of_keys(monkeypatch):
    """Only a bool mask that is one row of keys per (batch, head) is read as a key vector and
    scanned for a span, beside a key_padding_mask."""
    row, full = (0, 0, 0, 1), (0, 0, 64, 1)
    assert mask_kind_of(MASK_BOOL, row, 20) == MASK_BOOL_ROW
    assert mask_kind_of(MASK_BOOL, full, 20) == MASK_BOOL      # rows of its own
    assert mask_kind_of(MASK_BOOL, full, 1) == MASK_BOOL_ROW   # ... but only one
    assert mask_kind_of(MASK_FLOAT, row, 20) == MASK_FLOAT     # a bias, not a pattern
    assert mask_kind_of(MASK_NONE, (0, 0, 0, 0), 20) == MASK_NONE
    assert key_span(False, False) == SPAN_NONE
    assert key_span(False, True) == SPAN_KPM
    assert key_span(True, False) == SPAN_MASK
    assert key_span(True, True) == SPAN_KPM | SPAN_MASK
    monkeypatch.setenv("SDPA_PASS_KEY_SPAN", "0")
    assert key_span(True, True) == SPAN_NONE


# start / stop not specialised: Triton folds an integer argument equal to 1 into a constant,
# and triton 3.6's compiler crashes on the scan's loops with constant bounds (an LLVM assertion
# in make_ttgir, seen for start = stop = 1 here); the kernels pass computed bounds.
@triton.jit(do_not_specialize=["start", "stop"])
def _span_kernel(VISIBLE, OUT, start, stop, CHUNK: tl.constexpr):
    first, end = visible_key_span(VISIBLE, 1, VISIBLE, 1, start, stop, 1, CHUNK)
    tl.store(OUT, first)
    tl.store(OUT + 1, end)


@pytest.mark.parametrize("chunk", [16, SPAN_CHUNK.value])
def test_span_scan_finds_the_first_and_last_visible_key(chunk):
    """The scan from both ends (``chunk`` keys a step; the kernels' SPAN_CHUNK, and 16 to
    cross many steps cheaply): no, one, a few, a run of and random visible keys, over random
    [start, stop) ranges of up to five steps, against the direct answer."""
    gen = random.Random(0)
    for _ in range(60):
        n = gen.randint(1, 5 * chunk)
        visible = torch.zeros(n, dtype=torch.bool)
        kind = gen.random()
        if kind < 0.3:
            visible[[gen.randrange(n) for _ in range(gen.randint(0, 3))]] = True
        elif kind < 0.6:
            a = gen.randint(0, n)
            visible[a:gen.randint(a, n)] = True
        else:
            density = gen.choice([0.001, 0.5])
            visible = torch.rand(n, generator=torch.Generator().manual_seed(gen.randrange(99))) < density
        start = gen.randint(0, n)
        stop = gen.randint(start, n)
        out = torch.zeros(2, dtype=torch.int32, device=DEVICE)
        _span_kernel[(1,)](visible.to(DEVICE), out, start, stop, chunk)
        keys = visible[start:stop].nonzero().flatten() + start
        expected = (keys[0].item(), keys[-1].item() + 1) if len(keys) else (stop, start)
        assert tuple(out.tolist()) == expected, (n, start, stop, expected)
