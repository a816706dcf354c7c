"""Forward kernel against the float64 reference, over the feature grid.

On CPU these run the Triton kernel in the interpreter (TRITON_INTERPRET=1, set by conftest);
the interpreter uses 16x16 tiles, so the small shapes here still cross several tiles, the
causal diagonal and the window edges.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdpa_pass.kernels import attention
from reference import DEVICE, DTYPES, assert_close_to_reference, randn, reference_attention

B, L, S, D = 2, 19, 37, 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_qkv(dtype, hq=4, hkv=4, L=L, S=S, D=D, DV=None):
    q = randn(B, hq, L, D, dtype=dtype)
    k = randn(B, hkv, S, D, dtype=dtype)
    v = randn(B, hkv, S, D if DV is None else DV, dtype=dtype)
    return q, k, v


def make_mask(kind, hq, L, S, dtype):
    """Returns (attn_mask, key_padding_mask) for a mask kind of the grid."""
    kpm = torch.rand(B, S) > 0.3
    kpm[:, 0] = True  # keep at least one key per batch so rows are not all masked by padding
    if kind == "none":
        return None, None
    if kind == "bool_full":  # every dim materialised
        return (torch.rand(B, hq, L, S) > 0.2).to(DEVICE), None
    if kind == "bool_LS":  # (L, S), broadcast over batch and heads with stride 0
        return (torch.rand(L, S) > 0.2).to(DEVICE), None
    if kind == "float_B11S":  # HF-style additive padding bias
        bias = torch.zeros(B, 1, 1, S).masked_fill(~kpm[:, None, None, :], torch.finfo(dtype).min)
        return bias.to(DEVICE, dtype), None
    if kind == "float_1HLS":  # learned relative-position bias, T5/ALiBi style
        return randn(1, hq, L, S, dtype=dtype), None
    if kind == "padding":
        return None, kpm.to(DEVICE)
    if kind == "bool_and_padding":
        return (torch.rand(1, 1, L, S) > 0.2).to(DEVICE), kpm.to(DEVICE)
    raise AssertionError(kind)


MASK_KINDS = ["none", "bool_full", "bool_LS", "float_B11S", "float_1HLS", "padding", "bool_and_padding"]
CAUSAL_KINDS = {
    "none": {},
    "top_left": {"is_causal": True},
    "bottom_right": {"causal": "bottom_right"},
    "tril_diag_minus3": {"causal": "top_left", "diagonal": -3},
    "tril_diag_plus5": {"causal": "top_left", "diagonal": 5},
    "window7_bottom_right": {"causal": "bottom_right", "window": 7},
}
HEADS = {"mha": (4, 4), "gqa2": (4, 2), "mqa": (4, 1)}


def forward_grid():
    """(dtype, mask, causal form, heads): the whole grid in fp32 and on a GPU. In the
    interpreter (CI's time is mostly its) the half types take each (mask, causal form) pair
    once, with the heads layouts in turn, so any two values of any two axes still meet: the
    mask, causal and GQA logic does not depend on the dtype, and what does (the casts, the
    products' precision, the float masks' dtype) meets every value of the other axes."""
    return [(dtype, mask, causal, heads)
            for dtype in DTYPES
            for i, mask in enumerate(MASK_KINDS)
            for j, causal in enumerate(CAUSAL_KINDS)
            for k, heads in enumerate(HEADS)
            if dtype == torch.float32 or DEVICE == "cuda" or (i + j) % len(HEADS) == k]


@pytest.mark.parametrize("dtype, mask, causal, heads", forward_grid(), ids=str)
def test_matches_reference(dtype, mask, causal, heads):
    hq, hkv = HEADS[heads]
    q, k, v = make_qkv(dtype, hq, hkv)
    attn_mask, kpm = make_mask(mask, hq, L, S, dtype)
    extras = CAUSAL_KINDS[causal]
    # empty_rows="nan" makes every fully masked row visible as NaN in the comparison
    out = attention(q, k, v, attn_mask, enable_gqa=hq != hkv, key_padding_mask=kpm,
                    empty_rows="nan", **extras)
    ref, _ = reference_attention(q, k, v, attn_mask, key_padding_mask=kpm, empty_rows="nan", **extras)
    assert out.dtype == dtype
    assert_close_to_reference(out, ref, dtype)


@pytest.mark.parametrize("dims", [(16, 16), (40, 40), (80, 80), (96, 96), (112, 112), (160, 160),
                                  (256, 256), (64, 32), (40, 128)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dims(dtype, dims):
    d, dv = dims
    q, k, v = make_qkv(dtype, 2, 1, L=17, S=23, D=d, DV=dv)
    out = attention(q, k, v, causal="bottom_right", enable_gqa=True)
    ref, _ = reference_attention(q, k, v, causal="bottom_right")
    assert out.shape == (B, 2, 17, dv)
    assert_close_to_reference(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_without_copies(dtype):
    # (B, L, H, D) storage viewed as (B, H, L, D): what models produce before .transpose(1, 2)
    q = randn(B, L, 4, D, dtype=dtype).transpose(1, 2)
    kv = randn(B, S, 2, 2, D, dtype=dtype)  # packed K and V, as in fused-qkv projections
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = (torch.rand(B, 1, 1, 2 * S) > 0.2).to(DEVICE)[..., ::2]  # non-unit last stride
    assert not q.is_contiguous() and not k.is_contiguous() and mask.stride(-1) == 2
    out = attention(q, k, v, mask, is_causal=True, enable_gqa=True, empty_rows="nan")
    ref, _ = reference_attention(q, k, v, mask, is_causal=True, empty_rows="nan")
    assert_close_to_reference(out, ref, dtype)


@pytest.mark.parametrize(
    "lengths", [(1, 1), (1, 37), (1, 64), (37, 19), (16, 16), (33, 33)], ids=str
)
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_sequence_lengths(lengths, causal):
    """L = 1 (decode), L > S (rows with no key under bottom-right), tile-exact lengths."""
    ql, kl = lengths
    dtype = torch.float16
    q, k, v = make_qkv(dtype, 4, 2, L=ql, S=kl)
    extras = CAUSAL_KINDS[causal]
    out = attention(q, k, v, enable_gqa=True, empty_rows="nan", **extras)
    ref, _ = reference_attention(q, k, v, empty_rows="nan", **extras)
    assert_close_to_reference(out, ref, dtype)


def test_empty_sequences():
    q, k, v = make_qkv(torch.float32, L=0)
    assert attention(q, k, v).shape == (B, 4, 0, D)
    q, k, v = make_qkv(torch.float32, S=0)
    out, lse = attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and (lse == float("-inf")).all()
    assert attention(q, k, v, empty_rows="nan").isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_softcap(dtype, causal):
    """Gemma 2: scores = cap * tanh(scores / cap) before the mask; large logits saturate."""
    q, k, v = make_qkv(dtype)
    q = q * 4  # logits well past the cap
    bias = randn(B, 1, 1, S, dtype=dtype)
    extras = CAUSAL_KINDS[causal]
    out = attention(q, k, v, bias, softcap=5.0, scale=0.3, **extras)
    ref, _ = reference_attention(q, k, v, bias, softcap=5.0, scale=0.3, **extras)
    assert_close_to_reference(out, ref, dtype)


@pytest.mark.parametrize("mask", ["bool_full", "float_neg_inf", "padding"])
def test_fully_masked_rows(mask):
    """SDPA gives zeros for a row with every key masked; eager softmax(-inf) gives NaN."""
    q, k, v = make_qkv(torch.float32, 2, 2)
    attn_mask, kpm = None, None
    if mask == "bool_full":
        attn_mask = (torch.rand(B, 2, L, S) > 0.2)
        attn_mask[:, :, 3] = False
        attn_mask = attn_mask.to(DEVICE)
    elif mask == "float_neg_inf":
        attn_mask = torch.zeros(B, 1, L, S)
        attn_mask[0, 0, 5] = float("-inf")
        attn_mask = attn_mask.to(DEVICE)
    else:
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[1] = False
        kpm = kpm.to(DEVICE)
    for empty_rows in ("zero", "nan"):
        out, lse = attention(q, k, v, attn_mask, key_padding_mask=kpm, empty_rows=empty_rows,
                             return_lse=True)
        ref, ref_lse = reference_attention(q, k, v, attn_mask, key_padding_mask=kpm,
                                           empty_rows=empty_rows)
        assert ((ref_lse == float("-inf")).sum() > 0)
        assert_close_to_reference(out, ref, torch.float32)
        assert_close_to_reference(lse, ref_lse, torch.float32, what="lse")
    if mask == "bool_full":  # and the zero convention is SDPA's own (torch >= 2.5)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask)
        assert torch.equal(sdpa[:, :, 3], torch.zeros_like(sdpa[:, :, 3]))
        assert_close_to_reference(attention(q, k, v, attn_mask), sdpa.double().cpu(), torch.float32)


@pytest.mark.parametrize("causal", ["none", "top_left", "window7_bottom_right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_lse(dtype, causal):
    q, k, v = make_qkv(dtype, 4, 2)
    extras = CAUSAL_KINDS[causal]
    out, lse = attention(q, k, v, enable_gqa=True, return_lse=True, **extras)
    ref, ref_lse = reference_attention(q, k, v, **extras)
    assert lse.dtype == torch.float32 and lse.shape == (B, 4, L)
    assert_close_to_reference(out, ref, dtype)
    assert_close_to_reference(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype,
                              what="lse")


@pytest.mark.parametrize(
    "sdpa_args",
    [
        {},
        {"is_causal": True},
        {"scale": 0.05},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"enable_gqa": True},
        {"is_causal": True, "enable_gqa": True, "scale": 1.0},
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_result_as_sdpa(dtype, sdpa_args):
    """Positional/keyword arguments mean exactly what they mean for SDPA."""
    args = dict(sdpa_args)
    hkv = 2 if args.get("enable_gqa") else 4
    q, k, v = make_qkv(dtype, 4, hkv, L=S, S=S)
    if args.get("attn_mask") == "bool":
        args["attn_mask"] = (torch.rand(S, S) > 0.3).fill_diagonal_(True).to(DEVICE)
    elif args.get("attn_mask") == "float":
        args["attn_mask"] = randn(B, 1, S, S, dtype=dtype)
    out = attention(q, k, v, **args)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **{
        key: (val.float() if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
        for key, val in args.items()
    })
    assert_close_to_reference(out, expected.double().cpu(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finfo_min_rows_average_uniformly(dtype):
    """HF pads with finfo.min, not -inf: a row with every key at finfo(float32).min is a uniform
    average in eager fp32 softmax, not an empty row. The kernel's fp32 scores must keep that."""
    q, k, v = make_qkv(dtype, 2, 2)
    bias = torch.zeros(B, 1, L, S)
    bias[:, :, 4] = torch.finfo(torch.float32).min
    bias[:, :, 6, :5] = torch.finfo(torch.float32).min
    bias = bias.to(DEVICE)
    out, lse = attention(q, k, v, bias, empty_rows="nan", return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, bias, empty_rows="nan")
    assert not out.isnan().any()
    assert_close_to_reference(out, ref, dtype)
    uniform = v.double().cpu().mean(dim=2)
    assert_close_to_reference(out[:, :, 4], uniform, dtype, what="row 4 (all finfo.min)")
    # the LSE of that row is finfo.min + log(sum of exp(scores)), finite and that close to
    # finfo.min (the kernel's natural-log scores keep it; log2 units would overflow there)
    torch.testing.assert_close(lse.double().cpu()[:, :, 4], ref_lse[:, :, 4], rtol=1e-6, atol=0)
    rest = torch.ones(L, dtype=torch.bool)
    rest[4] = False
    torch.testing.assert_close(lse.double().cpu()[:, :, rest], ref_lse[:, :, rest], rtol=1e-3, atol=1e-3)


def record_choices(monkeypatch, name):
    """Wrap the forward's path chooser ``name`` (use_tma, use_mask_tma) so each call's answer
    is appended to the returned list."""
    import sdpa_pass.kernels.forward as fwd

    chosen, real = [], getattr(fwd, name)
    monkeypatch.setattr(fwd, name, lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    return chosen


TMA_CASES = {
    # name: (hq, hkv, L, S, extras); lengths cross tiles and stop mid-tile, so the copy
    # engine's zero fill past L and S and its clipped stores are exercised
    "plain": (4, 4, 19, 37, {}),
    "causal_top_left": (4, 2, 37, 37, dict(is_causal=True)),
    "causal_bottom_right_gqa": (4, 1, 19, 37, dict(causal="bottom_right")),
    "window": (2, 2, 33, 33, dict(causal="top_left", window=7)),
    "rows_past_keys": (2, 2, 37, 19, dict(causal="bottom_right")),
    "decode_row": (4, 2, 1, 37, dict(causal="bottom_right")),
}


@pytest.mark.parametrize("case", sorted(TMA_CASES))
def test_tensor_descriptor_path(case, monkeypatch):
    """The Hopper copy-engine path (tensor descriptors for Q, K, V, O) against the reference.
    On CPU it runs through the interpreter, forced by SDPA_PASS_TMA=1; on a GPU the same
    variable forces it for non-causal inputs too. Strided (B, L, H, D) storage included."""
    hq, hkv, ql, kl, extras = TMA_CASES[case]
    monkeypatch.setenv("SDPA_PASS_TMA", "1")
    chosen = record_choices(monkeypatch, "use_tma")
    dtype = torch.float16
    # on a GPU, half-precision value tiles are at least 64 wide (launch_params), and the
    # descriptor path wants head dims that are whole tiles
    d = 64 if DEVICE == "cuda" else D
    q = randn(B, ql, hq, d, dtype=dtype).transpose(1, 2)
    k, v = (randn(B, hkv, kl, d, dtype=dtype) for _ in range(2))
    mask = torch.rand(B, 1, ql, kl, device=DEVICE) > 0.2
    out, lse = attention(q, k, v, mask, enable_gqa=True, empty_rows="nan", return_lse=True, **extras)
    assert chosen == [True]
    ref, ref_lse = reference_attention(q, k, v, mask, empty_rows="nan", **extras)
    assert_close_to_reference(out, ref, dtype)
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite().cpu(), finite)
    torch.testing.assert_close(lse.double().cpu()[finite], ref_lse[finite], rtol=1e-3, atol=1e-3)


def test_tensor_descriptor_path_refused_for_layouts_the_copy_engine_cannot_read(monkeypatch):
    """Broadcast (stride 0) K/V, a head dim that is not a whole tile, fp32: pointer path."""
    import sdpa_pass.kernels.forward as fwd

    monkeypatch.setenv("SDPA_PASS_TMA", "1")
    h = torch.float16
    q = randn(B, 4, 16, 32, dtype=h)
    kv = randn(1, 4, 16, 32, dtype=h)
    assert fwd.use_tma(q, kv, kv, q, head_dims=(32, 32), block_dims=(32, 32), skips_tiles=True)
    wide = kv.expand(B, -1, -1, -1)
    assert not fwd.use_tma(q, wide, wide, q, head_dims=(32, 32), block_dims=(32, 32), skips_tiles=True)
    assert not fwd.use_tma(q, kv, kv, q, head_dims=(24, 24), block_dims=(32, 32), skips_tiles=True)
    f = q.float()
    assert not fwd.use_tma(f, f, f, f, head_dims=(32, 32), block_dims=(32, 32), skips_tiles=True)
    monkeypatch.setenv("SDPA_PASS_TMA", "0")
    assert not fwd.use_tma(q, kv, kv, q, head_dims=(32, 32), block_dims=(32, 32), skips_tiles=True)


def test_descriptor_paths_not_chosen_for_host_bound_calls(monkeypatch):
    """Below HOST_BOUND_WORK a call's host time, not its kernels, sets its speed: every
    descriptor path of the forward and the backward (Q/K/V/O, dK/dV operands, the mask in
    both) is asked with measured_faster=False, so only a forcing variable takes it (the forced
    small calls of test_tensor_descriptor_path still do). The rule's threshold against the
    matrix's smallest shape (B32 H16 N512 D128, kernels longer than the host)."""
    import sdpa_pass.kernels.backward as bwd
    import sdpa_pass.kernels.forward as fwd
    from sdpa_pass.kernels.checks import AttentionShape

    assert fwd.host_bound(AttentionShape(1, 2, 2, 128, 128, 128, 128))
    assert fwd.host_bound(AttentionShape(4, 4, 1, 19, 37, 32, 64))
    assert not fwd.host_bound(AttentionShape(32, 16, 16, 512, 512, 128, 128))
    assert not fwd.host_bound(AttentionShape(1, 1, 1, 1 << 10, 1 << 10, 64, 1 << 10))  # 2**30
    assert fwd.host_bound(AttentionShape(1, 1, 1, 1 << 10, (1 << 10) - 1, 64, 1 << 10))

    asked = []
    real = fwd._descriptors_wanted

    def recording(q, variable, measured_faster):
        asked.append((variable, measured_faster))
        return real(q, variable, measured_faster)

    monkeypatch.setattr(fwd, "_descriptors_wanted", recording)
    monkeypatch.setattr(bwd, "_descriptors_wanted", recording)
    # on a GPU half-precision tiles are at least 64 wide: a head dim of 64 is a whole tile
    d = 64 if DEVICE == "cuda" else D
    q, k, v = (t.requires_grad_() for t in make_qkv(torch.float16, hq=4, hkv=2, D=d))
    bias = randn(1, 4, L, S, dtype=torch.float16)
    out = attention(q, k, v, bias, is_causal=True, enable_gqa=True)
    out.sum().backward()
    variables = {variable for variable, _ in asked}
    assert {"SDPA_PASS_TMA", "SDPA_PASS_MASK_TMA", "SDPA_PASS_BWD_TMA"} <= variables
    assert not any(measured for _, measured in asked)


# (mask layout, dtype, causal, softcap, query heads, KV heads): the mask read through a tensor
# descriptor. Lengths that are not whole tiles (L = 37, S = 48 against 16-wide interpreter
# tiles for the bool masks: bytes need S % 16 == 0 for aligned rows; S = 40 for fp16).
MASK_TMA_CASES = {
    "bias_1HLS": ("float_1HLS", torch.float16, {}, 0.0, 4, 4),
    "bias_B1LS_causal": ("float_B1LS", torch.float16, dict(is_causal=True), 0.0, 4, 2),
    "bias_fp32_softcap_window": ("float32_1HLS", torch.float16,
                                 dict(causal="bottom_right", window=9), 20.0, 4, 4),
    "bool_LS": ("bool_LS", torch.float16, {}, 0.0, 4, 1),
    "bool_full_bottom_right": ("bool_full", torch.float16, dict(causal="bottom_right"), 0.0, 4, 4),
}


def _mask_for_descriptor(kind, hq, L, S, dtype):
    """make_mask's kinds, plus an fp32 bias beside half inputs and HF's (B, 1, L, S) mask."""
    if kind in MASK_KINDS:
        return make_mask(kind, hq, L, S, dtype)[0]
    if kind == "float32_1HLS":
        return randn(1, hq, L, S, dtype=torch.float32)
    if kind == "float_B1LS":  # HF's 4-D mask: finfo.min where hidden, left padding
        keep = torch.ones(B, 1, L, S, dtype=torch.bool)
        keep[0, ..., :5] = False
        return torch.zeros(B, 1, L, S, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min).to(DEVICE)
    raise AssertionError(kind)


@pytest.mark.parametrize("case", sorted(MASK_TMA_CASES))
def test_mask_descriptor_path(case, monkeypatch):
    """attn_mask read through a tensor descriptor (so the Hopper pipeliner copies its tiles
    ahead), with broadcast batch / head dims as descriptor dims of size 1, against the float64
    reference. Forced by SDPA_PASS_MASK_TMA=1 under the interpreter."""
    kind, dtype, extras, softcap, hq, hkv = MASK_TMA_CASES[case]
    monkeypatch.setenv("SDPA_PASS_MASK_TMA", "1")
    chosen = record_choices(monkeypatch, "use_mask_tma")
    L, S = 37, 48 if kind.startswith("bool") else 40
    q, k, v = make_qkv(dtype, hq=hq, hkv=hkv, L=L, S=S)
    mask = _mask_for_descriptor(kind, hq, L, S, dtype)
    if softcap:
        extras = dict(extras, softcap=softcap)
    out = attention(q, k, v, mask, enable_gqa=True, empty_rows="nan", **extras)
    assert chosen == [True]
    ref, _ = reference_attention(q, k, v, mask, empty_rows="nan", **extras)
    assert_close_to_reference(out, ref, dtype)


@pytest.mark.parametrize("seed", range(12))
def test_descriptor_paths_random_layouts(seed, monkeypatch):
    """Q/K/V/O and the mask all through descriptors (forced), on random layouts the copy
    engine can read: mask kinds and dtypes, every broadcast pattern, a mask sliced out of wider
    storage, GQA, causal forms and windows, lengths off the tile grid; against float64."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    monkeypatch.setenv("SDPA_PASS_TMA", "1")
    monkeypatch.setenv("SDPA_PASS_MASK_TMA", "1")
    chosen = record_choices(monkeypatch, "use_mask_tma")
    kind = pick(["bool", "float16", "float32"])
    hq, hkv = pick([(4, 4), (4, 2), (4, 1)])
    L = pick([5, 16, 23, 40])
    S = pick([16, 32, 48]) if kind == "bool" else pick([8, 24, 40, 48])
    dims = pick([(1, 1), (1, hq), (B, 1), (B, hq)])
    extras = pick([{}, dict(is_causal=True), dict(causal="bottom_right"),
                   dict(causal="bottom_right", window=6)])
    dtype = torch.float16
    q, k, v = make_qkv(dtype, hq=hq, hkv=hkv, L=L, S=S)
    wide = S + pick([0, 16])  # a view of the first S keys of wider rows
    if kind == "bool":
        storage = torch.rand(*dims, L, wide, generator=gen) > 0.25
    else:
        storage = torch.randn(*dims, L, wide, generator=gen).to(getattr(torch, kind))
        storage[..., 1] = torch.finfo(storage.dtype).min  # HF's fill, beside real scores
    mask = storage.to(DEVICE)[..., :S]
    if kind == "bool":
        mask[..., 0] = True  # no empty row: its output is NaN under empty_rows="nan"
    out = attention(q, k, v, mask, enable_gqa=True, empty_rows="nan", **extras)
    assert chosen == [True], (kind, dims, L, S, wide)
    ref, _ = reference_attention(q, k, v, mask, empty_rows="nan", **extras)
    assert_close_to_reference(out, ref, dtype)


def test_mask_descriptor_refused_for_layouts_the_copy_engine_cannot_read(monkeypatch):
    """Rows broadcast (a padding mask), keys not contiguous, rows not 16-byte aligned, 8-byte
    elements, or turned off: the pointer path."""
    from sdpa_pass.kernels.forward import use_mask_tma

    monkeypatch.setenv("SDPA_PASS_MASK_TMA", "1")
    q = randn(B, 4, 16, 32, dtype=torch.float16)
    ok = torch.zeros(1, 4, 16, 40, dtype=torch.float16, device=DEVICE).expand(B, 4, 16, 40)
    assert use_mask_tma(q, ok)
    assert use_mask_tma(q, torch.zeros(16, 48, dtype=torch.bool, device=DEVICE).expand(B, 4, 16, 48))
    padding = torch.zeros(B, 1, 1, 40, dtype=torch.float16, device=DEVICE).expand(B, 4, 16, 40)
    assert not use_mask_tma(q, padding)
    keys_strided = torch.zeros(B, 4, 40, 16, dtype=torch.float16, device=DEVICE).transpose(-1, -2)
    assert not use_mask_tma(q, keys_strided)
    odd_rows = torch.zeros(B, 4, 16, 37, dtype=torch.float16, device=DEVICE)
    assert not use_mask_tma(q, odd_rows)
    assert not use_mask_tma(q, torch.zeros(B, 4, 16, 40, dtype=torch.float64, device=DEVICE))
    assert not use_mask_tma(q.float(), ok)  # fp32 inputs: products off the tensor-core path
    monkeypatch.setenv("SDPA_PASS_MASK_TMA", "0")
    assert not use_mask_tma(q, ok)


def test_mask_descriptor_keeps_key_tiles_at_least_64_wide():
    """With the mask read through a descriptor, the autotuner never tries key tiles narrower
    than 64 (one faulted on the H100: forward.MASK_TMA_MIN_BLOCK_N); without it they stay."""
    import triton

    from sdpa_pass.kernels.forward import MASK_TMA_MIN_BLOCK_N, _GPU_CONFIGS, _prune_configs

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
               for m, n, w, st in _GPU_CONFIGS]
    q = torch.empty(1, dtype=torch.bfloat16)
    for d in (64, 128, 256):
        args = dict(Q=q, MASK=q, BLOCK_D=d, BLOCK_DV=d, TMA=False)
        described = _prune_configs(configs, dict(args, MASK_TMA=True))
        assert described
        assert all(c.kwargs["BLOCK_N"] >= MASK_TMA_MIN_BLOCK_N for c in described)
        assert any(c.kwargs["BLOCK_N"] < 64 for c in _prune_configs(configs, dict(args, MASK_TMA=False)))


def test_autotuning_key_has_a_length_class(monkeypatch):
    """GPU launches are tuned per length class as well as per variant: rows of fewer than
    LONG_ROWS keys and longer ones get their own tuning run (and the autotuner's own key has
    the class too), lengths within a class share one. The launch is recorded, not run."""
    import sdpa_pass.kernels.forward as fwd
    from sdpa_pass.kernels.checks import CAUSAL_NONE, check_attention_inputs

    keys = []
    monkeypatch.setattr(fwd, "interpreter_active", lambda: False)
    monkeypatch.setenv("SDPA_PASS_AUTOTUNE", "1")
    monkeypatch.setenv("SDPA_PASS_LAUNCH_PLANS", "0")  # the stand-in launches nothing to plan
    monkeypatch.setattr(fwd._FORWARD, "launch", lambda key, grid, *args, **meta: keys.append(
        (key, dict(zip(fwd._attention_fwd_kernel.arg_names, args))["len_class"])) or (None, {}))
    assert "len_class" in fwd._attention_fwd_autotuned.keys
    for kv_len in (100, 2000, fwd.LONG_ROWS, 3 * fwd.LONG_ROWS):
        q = torch.zeros(1, 2, 16, 32, dtype=torch.float16)
        k = v = torch.zeros(1, 2, kv_len, 32, dtype=torch.float16)
        shape = check_attention_inputs(q, k, v, None, None, causal_align=CAUSAL_NONE)
        fwd.attention_forward_triton(q, k, v, None, None, shape, scale=0.1, causal_align=CAUSAL_NONE,
                                     diagonal=0, window=-1, softcap=0.0, nan_on_empty=False,
                                     return_lse=False)
    assert [cls for _, cls in keys] == [0, 0, 1, 1]
    assert keys[0][0] == keys[1][0] != keys[2][0] == keys[3][0]


def test_tuned_kernel_tunes_once_per_key_then_launches_the_plain_kernel():
    """TunedKernel (GPU launches): the first call of a key goes through triton's autotuner,
    later ones launch the JIT kernel itself with the config the autotuner chose, after the
    pre-hook (the descriptors' tile shapes). Stand-ins record the launches: the autotuner
    needs a GPU to time configs."""
    from types import SimpleNamespace

    from sdpa_pass.kernels.forward import TunedKernel, next_pow2

    launches = []

    class Launcher:
        def __init__(self, name, arg_names=("X", "n")):
            self.name, self.arg_names = name, list(arg_names)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, grid, args, kwargs))

    autotuned = Launcher("autotuner")
    hooks = []
    tuned = TunedKernel(autotuned, Launcher("kernel"), pre_hook=hooks.append)
    chosen = {"BLOCK": 64, "num_warps": 4, "num_stages": 2}
    autotuned.best_config = SimpleNamespace(all_kwargs=lambda: dict(chosen))
    tuned.launch(("key", 1), "grid", "x", 3, FLAG=True)
    tuned.launch(("key", 1), "grid", "y", 5, FLAG=True)
    tuned.launch(("key", 2), "grid", "z", 7, FLAG=False)
    assert [(name, args) for name, _, args, _ in launches] == [
        ("autotuner", ("x", 3)), ("kernel", ("y", 5)), ("autotuner", ("z", 7))]
    assert launches[1][3] == {"FLAG": True, **chosen}
    assert hooks == [{"X": "y", "n": 5, "FLAG": True, **chosen}]
    assert [next_pow2(n) for n in (0, 1, 2, 3, 16, 17, 96, 128, 129)] == [1, 1, 2, 4, 16, 32, 128, 128, 256]
