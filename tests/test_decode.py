"""Split-KV decode kernel against the float64 reference, and the rule that picks it.

On CPU these run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest) with 16-key
tiles, so S = 45..130 crosses several tiles; num_splits is forced to 1, 3 and to more splits
than there are key tiles, so the merge also sees splits with no visible key. The cases are
hand-picked (the interpreter is slow): each one names the decode situation it stands for.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

import sdpa_pass.kernels.ops as ops
from sdpa_pass.kernels import attention
from sdpa_pass.kernels.checks import CAUSAL_NAMES, CAUSAL_NONE, AttentionShape, check_attention_inputs
from sdpa_pass.kernels.forward import interpreter_active
from sdpa_pass.kernels.decode import (
    MAX_DECODE_ROWS,
    MIN_TILES_PER_SPLIT,
    SPLIT_WAVES,
    attention_decode_triton,
    choose_num_splits,
    use_decode_kernel,
)
from reference import DEVICE, assert_close_to_reference, randn, reference_attention

B = 2
H100_SMS = 132


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def decode(q, k, v, attn_mask=None, *, key_padding_mask=None, is_causal=False, causal=None,
           diagonal=0, window=None, softcap=None, scale=None, empty_rows="nan",
           return_lse=True, num_splits=None):
    """The kernel called with the reference's keyword spelling of the same attention."""
    if is_causal:
        causal = "top_left"
    causal_align = CAUSAL_NAMES[causal] if causal is not None else CAUSAL_NONE
    window = -1 if window is None else window
    shape = check_attention_inputs(q, k, v, attn_mask, key_padding_mask,
                                   causal_align=causal_align, window=window)
    return attention_decode_triton(
        q, k, v, attn_mask, key_padding_mask, shape,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale,
        causal_align=causal_align, diagonal=diagonal, window=window,
        softcap=0.0 if softcap is None else softcap, nan_on_empty=empty_rows == "nan",
        return_lse=return_lse, num_splits=num_splits,
    )


def make_mask(kind, hq, L, S, dtype):
    """(attn_mask, key_padding_mask) for one mask kind."""
    kpm = torch.rand(B, S) > 0.3
    kpm[:, -1] = True  # the newest key (bottom-right diagonal) stays visible
    if kind == "none":
        return None, None
    if kind == "bool_full":  # every dim materialised, a different mask per query head
        return (torch.rand(B, hq, L, S) > 0.2).to(DEVICE), None
    if kind == "bool_11LS":  # broadcast over batch and heads with stride 0
        return (torch.rand(1, 1, L, S) > 0.2).to(DEVICE), None
    if kind == "float_B1LS":  # HF eager: finfo.min where padded, 0 elsewhere, broadcast heads
        bias = torch.zeros(B, 1, L, S).masked_fill(~kpm[:, None, None, :], torch.finfo(dtype).min)
        return bias.to(DEVICE, dtype), None
    if kind == "float_1HLS":  # learned relative-position bias per query head (ALiBi/T5 style)
        return randn(1, hq, L, S, dtype=dtype), None
    if kind == "bool_B11S":  # HF's padding mask: one row of keys the group's heads share
        return kpm[:, None, None, :].to(DEVICE), None
    if kind == "bool_BH1S":  # one row of keys per query head: a GQA group's heads differ
        return (torch.rand(B, hq, 1, S) > 0.3).to(DEVICE), None
    if kind == "bool_and_padding":
        return (torch.rand(B, 1, 1, S) > 0.2).to(DEVICE), kpm.to(DEVICE)
    raise AssertionError(kind)


# (L, S, Hq, Hkv, D, Dv, dtype, mask, causal extras, num_splits); None splits = automatic
CASES = {
    "L1_mha_nomask_1split": (1, 77, 2, 2, 64, 64, torch.float32, "none", {}, 1),
    "L1_mqa_kvcache_bottom_right_3splits": (1, 77, 4, 1, 64, 64, torch.float16, "none",
                                            {"causal": "bottom_right"}, 3),
    "L3_gqa4_d40_bool_broadcast_bottom_right": (3, 77, 8, 2, 40, 40, torch.float32, "bool_11LS",
                                                {"causal": "bottom_right"}, 3),
    "L7_gqa4_float_hf_padding_top_left_splits_gt_tiles": (7, 50, 8, 2, 64, 64, torch.float16,
                                                         "float_B1LS", {"is_causal": True}, 9),
    "L3_mha_dv24_ne_d40_bool_per_head": (3, 45, 2, 2, 40, 24, torch.float32, "bool_full", {}, 3),
    "L7_gqa4_window20_bottom_right": (7, 77, 8, 2, 64, 64, torch.float16, "none",
                                      {"causal": "bottom_right", "window": 20}, 3),
    "L3_mqa_tril_diag_minus2_empty_rows": (3, 45, 4, 1, 64, 64, torch.float32, "float_1HLS",
                                           {"causal": "top_left", "diagonal": -2}, 2),
    "L5_gqa4_rows20_bool_and_padding_auto_splits": (5, 130, 8, 2, 64, 64, torch.float32,
                                                    "bool_and_padding",
                                                    {"causal": "bottom_right"}, None),
    # one query row: a bool mask is one row of keys, read as a vector where the group's heads
    # share it and as a tile per stacked row where they do not
    "L1_gqa4_bool_shared_row_bottom_right": (1, 77, 8, 2, 64, 64, torch.float16, "bool_B11S",
                                             {"causal": "bottom_right"}, 3),
    "L1_gqa4_bool_row_per_head": (1, 77, 8, 2, 64, 64, torch.float32, "bool_BH1S", {}, 3),
    "L3_speculative_window5_more_splits_than_tiles": (3, 61, 4, 2, 64, 64, torch.float16,
                                                      "float_1HLS",
                                                      {"causal": "bottom_right", "window": 5}, 6),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case):
    L, S, hq, hkv, d, dv, dtype, mask_kind, extras, splits = CASES[case]
    q = randn(B, hq, L, d, dtype=dtype)
    k = randn(B, hkv, S, d, dtype=dtype)
    v = randn(B, hkv, S, dv, dtype=dtype)
    attn_mask, kpm = make_mask(mask_kind, hq, L, S, dtype)
    # empty_rows="nan" makes every row with no visible key show up as NaN in the comparison
    out, lse = decode(q, k, v, attn_mask, key_padding_mask=kpm, num_splits=splits, **extras)
    ref, ref_lse = reference_attention(q, k, v, attn_mask, key_padding_mask=kpm,
                                       empty_rows="nan", **extras)
    assert out.dtype == dtype and out.shape == (B, hq, L, dv)
    assert lse.dtype == torch.float32 and lse.shape == (B, hq, L)
    assert_close_to_reference(out, ref, dtype)
    assert_close_to_reference(lse, ref_lse, dtype, what="lse")


@pytest.mark.parametrize("empty_rows", ["zero", "nan"])
def test_fully_padded_batch_row(empty_rows):
    """A batch entry with every key padded: SDPA gives zeros, eager softmax NaN; LSE -inf."""
    L, S = 3, 45
    q, k, v = randn(B, 4, L, 64), randn(B, 1, S, 64), randn(B, 1, S, 64)
    kpm = torch.rand(B, S) > 0.3
    kpm[1] = False
    kpm = kpm.to(DEVICE)
    out, lse = decode(q, k, v, key_padding_mask=kpm, causal="bottom_right",
                      empty_rows=empty_rows, num_splits=3)
    ref, ref_lse = reference_attention(q, k, v, key_padding_mask=kpm, causal="bottom_right",
                                       empty_rows=empty_rows)
    assert (ref_lse[1] == float("-inf")).all() and (ref_lse[0] > float("-inf")).all()
    assert_close_to_reference(out, ref, torch.float32)
    assert_close_to_reference(lse, ref_lse, torch.float32, what="lse")
    if empty_rows == "zero":
        assert torch.equal(out[1], torch.zeros_like(out[1]))
    else:
        assert out[1].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_softcap_with_bias(dtype):
    """Gemma 2 decode: cap * tanh(scores / cap) before the bias; large logits saturate."""
    L, S = 3, 61
    q = randn(B, 4, L, 64, dtype=dtype) * 4  # logits well past the cap
    k, v = randn(B, 2, S, 64, dtype=dtype), randn(B, 2, S, 64, dtype=dtype)
    bias = randn(B, 1, 1, S, dtype=dtype)
    extras = dict(softcap=5.0, scale=0.3, causal="bottom_right")
    out, lse = decode(q, k, v, bias, num_splits=3, **extras)
    ref, ref_lse = reference_attention(q, k, v, bias, **extras)
    assert_close_to_reference(out, ref, dtype)
    assert_close_to_reference(lse, ref_lse, dtype, what="lse")


def test_finfo_min_row_averages_uniformly():
    """HF pads with finfo.min, not -inf: a row with every key at finfo(float32).min is a
    uniform average in eager fp32 softmax. Split partials and their merge must keep that."""
    L, S = 3, 45
    q, k, v = randn(B, 4, L, 64), randn(B, 2, S, 64), randn(B, 2, S, 64)
    bias = torch.zeros(B, 1, L, S)
    bias[:, :, 1] = torch.finfo(torch.float32).min
    bias = bias.to(DEVICE)
    out, lse = decode(q, k, v, bias, num_splits=3)
    ref, ref_lse = reference_attention(q, k, v, bias, empty_rows="nan")
    assert not out.isnan().any() and torch.isfinite(lse).all()
    assert_close_to_reference(out, ref, torch.float32)
    keep = torch.arange(L) != 1
    assert_close_to_reference(lse[:, :, keep], ref_lse[:, :, keep], torch.float32, what="lse")
    # As in the forward kernel, finite biases are clamped to the fp32 range in log2 units, so
    # this row's LSE is finite but not the reference's; ops.py routes the backward of such
    # rows (lse < -1e30) to the chunked path.
    assert (lse[:, :, 1] < -1e30).all()
    uniform = v.double().cpu().repeat_interleave(2, dim=1).mean(dim=2)
    assert_close_to_reference(out[:, :, 1], uniform, torch.float32, what="row 1 (all finfo.min)")


def test_strided_inputs_without_copies():
    """(B, L, H, D) storage viewed as (B, H, L, D), packed K/V, a mask with a non-unit last
    stride: every tensor is read through its own strides."""
    L, S = 3, 45
    q = randn(B, L, 4, 40).transpose(1, 2)
    kv = randn(B, S, 2, 2, 40)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = (torch.rand(B, 1, 1, 2 * S) > 0.2).to(DEVICE)[..., ::2]
    assert not q.is_contiguous() and not k.is_contiguous() and mask.stride(-1) == 2
    out, _ = decode(q, k, v, mask, causal="bottom_right", num_splits=3)
    ref, _ = reference_attention(q, k, v, mask, causal="bottom_right", empty_rows="nan")
    assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("extras", [
    {"causal": "bottom_right", "window": 10},  # decode with a sliding window
    {"is_causal": True},  # top-left with L < S: only the first keys are visible
], ids=["window10_bottom_right", "top_left"])
def test_invisible_key_tiles_are_not_read(extras):
    """Whole key tiles no row can see hold NaN: reading any of them (even with p = 0) would
    put NaN in the output, so a finite output proves they were skipped."""
    tile = 16 if interpreter_active() else 128  # a multiple of every BLOCK_N in use
    L, S = 3, 5 * tile
    if "window" in extras:
        first, end = S - L - extras["window"] + 1, S  # row 0 sees j > 0 + (S - L) - window
    else:
        first, end = 0, L  # row i sees j <= i
    lo, hi = first // tile * tile, -(-end // tile) * tile
    assert lo > 0 or hi < S
    q, k, v = randn(B, 4, L, 64), randn(B, 2, S, 64), randn(B, 2, S, 64)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    for t in (k_poisoned, v_poisoned):
        t[:, :, :lo] = float("nan")
        t[:, :, hi:] = float("nan")
    out, lse = decode(q, k_poisoned, v_poisoned, num_splits=4, **extras)
    ref, ref_lse = reference_attention(q, k, v, **extras)
    assert_close_to_reference(out, ref, torch.float32)
    assert_close_to_reference(lse, ref_lse, torch.float32, what="lse")


def test_return_lse_false_and_empty_sequences():
    q, k, v = randn(B, 4, 1, 64), randn(B, 2, 33, 64), randn(B, 2, 33, 64)
    out, lse = decode(q, k, v, return_lse=False, num_splits=2)
    assert lse.shape == (0,) and lse.dtype == torch.float32
    assert_close_to_reference(out, reference_attention(q, k, v)[0], torch.float32)
    q, k, v = randn(B, 4, 1, 64), randn(B, 2, 0, 64), randn(B, 2, 0, 64)
    out, lse = decode(q, k, v, empty_rows="zero")
    assert torch.equal(out, torch.zeros_like(out)) and (lse == float("-inf")).all()
    assert decode(q, k, v, empty_rows="nan")[0].isnan().all()


def test_too_many_rows_is_refused():
    q, k, v = randn(1, 8, 40, 16), randn(1, 1, 20, 16), randn(1, 1, 20, 16)
    with pytest.raises(ValueError, match="use_decode_kernel"):
        decode(q, k, v)


def shape_of(batch=1, q_heads=32, kv_heads=8, q_len=1, kv_len=4096, head_dim=128):
    return AttentionShape(batch, q_heads, kv_heads, q_len, kv_len, head_dim, head_dim)


@pytest.mark.parametrize("shape,expected", [
    (shape_of(), True),  # Llama-3-8B decode, batch 1: 32 forward programs on 132 SMs
    (shape_of(batch=4, q_len=4), True),  # speculative decoding, 4 draft tokens: 16 rows
    (shape_of(q_heads=8, kv_heads=8, q_len=16), True),  # MHA, 16 rows
    (shape_of(kv_len=256), False),  # too few keys to split
    (shape_of(batch=16, kv_heads=32), False),  # MHA: 512 forward programs fill 132 SMs
    (shape_of(batch=64), True),  # GQA: the forward would read each K/V head 4 times
    (shape_of(q_len=32), False),  # GROUP*L = 128 rows: a prefill chunk, not decode
    (shape_of(q_heads=64, kv_heads=1, q_len=2), False),  # MQA with 128 rows in a group
    (shape_of(q_len=16, head_dim=256), False),  # 64 rows x 256 fp32 accumulator spills
    (shape_of(q_len=0), False),
], ids=["llama8b_b1", "spec4_b4", "mha_L16", "short_S", "mha_full_batch", "gqa_full_batch",
        "prefill_chunk",
        "mqa_big_group", "hd256_64rows", "L0"])
def test_use_decode_kernel(shape, expected):
    assert use_decode_kernel(shape, H100_SMS) is expected
    props = types.SimpleNamespace(multi_processor_count=H100_SMS)  # get_device_properties
    assert use_decode_kernel(shape, props) is expected


def test_use_decode_kernel_depends_on_sm_count():
    shape = shape_of(batch=4, kv_heads=32)  # MHA, 128 forward programs
    assert use_decode_kernel(shape, 132) and not use_decode_kernel(shape, 32)
    assert shape.group * shape.q_len <= MAX_DECODE_ROWS


def test_choose_num_splits():
    # Llama-8B decode on an H100: 8 K/V programs, 4096 keys in 64-key tiles: SPLIT_WAVES
    # would want 33 splits, but each keeps at least MIN_TILES_PER_SPLIT tiles (64 / 4 = 16).
    assert choose_num_splits(8, 4096, 64, H100_SMS) == 64 // MIN_TILES_PER_SPLIT
    # 1M-token cache: the wave target rules
    assert choose_num_splits(8, 1 << 20, 64, H100_SMS) == math.ceil(SPLIT_WAVES * H100_SMS / 8)
    # enough (batch, K/V head) programs already: no split
    assert choose_num_splits(512, 4096, 64, H100_SMS) == 1
    # too few keys for two splits of MIN_TILES_PER_SPLIT tiles, or none visible at all
    assert choose_num_splits(8, 7 * 64, 64, H100_SMS) == 1
    assert choose_num_splits(8, 0, 64, H100_SMS) == 1
    assert 1 <= choose_num_splits(1, 1 << 30, 64, 10_000) <= 128


def test_attention_routes_decode_shapes_here(monkeypatch):
    """``attention`` (the op) sends a GQA decode step with a long cache to this kernel, the
    same call with dropout to the forward kernel; both equal the reference."""
    calls = []
    real = ops.attention_decode_triton
    monkeypatch.setattr(ops, "attention_decode_triton",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    q = randn(1, 4, 1, 16)
    k, v = randn(1, 1, 530, 16), randn(1, 1, 530, 16)
    out = attention(q, k, v, causal="bottom_right", enable_gqa=True)
    assert calls == [1]
    ref, _ = reference_attention(q, k, v, causal="bottom_right")
    assert_close_to_reference(out, ref, torch.float32)
    attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    assert calls == [1]
