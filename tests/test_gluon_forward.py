"""The Hopper forward in Gluon (kernels/gluon_forward.py).

Gluon kernels do not run in the interpreter, so on a machine without a Hopper GPU these tests
check which calls the path takes (``gluon_forward_refusal``) and what the compiler makes of the
kernel for sm_90 (the installed Triton's own ptxas, in a subprocess without TRITON_INTERPRET):
no spill, the register split between the copy partition and the two consumer warpgroups, and
the softmax's exponentials issued while the P·V product is in flight (the overlap the kernel
exists for). On a Hopper GPU the kernel's output, LSE and the gradients of the backward that
uses that LSE are compared with the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdpa_pass.kernels import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT, attention
from sdpa_pass.kernels import forward as fwd
from sdpa_pass.kernels import gluon_forward as gfwd
from sdpa_pass.kernels.checks import AttentionShape
from reference import DEVICE, assert_close_to_reference, randn, reference_attention
from script_runner import last_json

HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(gfwd.gluon is None, reason="this Triton has no Gluon Hopper API")
needs_hopper = pytest.mark.skipif(not HOPPER or gfwd.gluon is None,
                                  reason="the Gluon kernel runs on a Hopper GPU only")


def fwd_probe_report(*args: str, dtype: str = "bf16") -> dict:
    """``benchmarks/gluon_fwd_probe.py --compile --product DTYPE *args``'s report of the
    library's forward kernel compiled for sm_90 (``script_runner``)."""
    return last_json("gluon_fwd_probe.py", "--compile", "--product", dtype, *args)


def refusal(q, k, v, shape=None, **overrides):
    B, H, L, D = q.shape
    shape = shape or AttentionShape(B, H, k.shape[1], L, k.shape[2], D, v.shape[-1])
    kwargs = dict(scale=D ** -0.5, masked=False, padding=0, causal_align=CAUSAL_NONE, diagonal=0,
                  window=-1, softcap=0.0, dropout_p=0.0, capability=9)
    kwargs.update(overrides)
    return gfwd.gluon_forward_refusal(q, k, v, shape, **kwargs)


@needs_gluon
def test_refusals_name_why_a_call_stays_on_the_triton_kernel(monkeypatch):
    h = torch.bfloat16
    q = torch.zeros(2, 4, 256, 128, dtype=h)
    kv = torch.zeros(2, 2, 384, 128, dtype=h)
    assert refusal(q, kv, kv) is None  # GQA, L != S, whole tiles
    assert "Hopper" in refusal(q, kv, kv, capability=8)
    assert "Hopper" in refusal(q, kv, kv, capability=None)
    assert "dtype" in refusal(q.float(), kv.float(), kv.float())
    q64, kv64 = torch.zeros(2, 4, 256, 64, dtype=h), torch.zeros(2, 2, 384, 64, dtype=h)
    # hd64: the persistent kernel from HD64_PERSISTENT_MIN_KEYS keys (causal or not), the
    # one-tile kernel (masks read in tiles, windows, padding rows) from HD64_MIN_KEYS
    assert "384 keys (under 512 " in refusal(q64, kv64, kv64)
    for causal, least in gfwd.HD64_PERSISTENT_MIN_KEYS.items():
        align = CAUSAL_TOP_LEFT if causal else CAUSAL_NONE
        keys = torch.zeros(2, 2, least, 64, dtype=h)
        assert refusal(q64, keys, keys, causal_align=align) is None
        fewer = torch.zeros(2, 2, least - 128, 64, dtype=h)
        assert f"under {least} " in refusal(q64, fewer, fewer, causal_align=align)
    window = torch.zeros(2, 2, 2048, 64, dtype=h)
    assert f"under {gfwd.HD64_MIN_KEYS} " in refusal(q64, window, window, window=256,
                                                     causal_align=CAUSAL_TOP_LEFT)
    assert f"under {gfwd.HD64_MIN_KEYS} " in refusal(q64, window, window, tiled=True)
    with monkeypatch.context() as m:
        m.setenv("SDPA_PASS_GLUON_PERSISTENT", "0")
        assert f"under {gfwd.HD64_MIN_KEYS} " in refusal(q64, window, window)
    long64 = torch.zeros(1, 2, gfwd.HD64_MIN_KEYS, 64, dtype=h)
    assert refusal(q64, long64, long64, window=256, causal_align=CAUSAL_TOP_LEFT) is None
    q80, kv80 = torch.zeros(2, 4, 256, 80, dtype=h), torch.zeros(2, 2, 384, 80, dtype=h)
    assert "head dims" in refusal(q80, kv80, kv80)
    assert "head dims" in refusal(q64, kv64, kv)  # V's head dim differs
    # hd256: 64-key tiles; SDPA_PASS_GLUON_FWD_HD256=0 keeps the Triton forward
    q256, kv256 = torch.zeros(2, 4, 256, 256, dtype=h), torch.zeros(2, 2, 384, 256, dtype=h)
    assert refusal(q256, kv256, kv256) is None
    assert "head dims" in refusal(q256, kv256, kv)  # V's head dim differs
    with monkeypatch.context() as m:
        m.setenv("SDPA_PASS_GLUON_FWD_HD256", "0")
        assert "SDPA_PASS_GLUON_FWD_HD256=0" in refusal(q256, kv256, kv256)
    assert gfwd.forward_block_n(256) == 64 and gfwd.forward_block_n(128) == gfwd.BLOCK_N
    assert "mask" in refusal(q, kv, kv, masked=True)  # (padding rows: test_gluon_padding.py)
    assert "dropout" in refusal(q, kv, kv, dropout_p=0.1)
    # soft-capping: taken at hd256 and at hd128 from SOFTCAP_MIN_KEYS keys, where it measured
    # faster, beside padding rows too; SDPA_PASS_GLUON_SOFTCAP=0 never, =1 wherever it runs
    monkeypatch.delenv("SDPA_PASS_GLUON_SOFTCAP", raising=False)
    least = gfwd.SOFTCAP_MIN_KEYS[128]
    long_kv = torch.zeros(2, 2, least, 128, dtype=h)
    assert refusal(q, long_kv, long_kv, softcap=30.0) is None
    assert f"with 384 keys (the Triton kernel measured faster under {least})" in refusal(
        q, kv, kv, softcap=30.0)
    assert refusal(q256, kv256, kv256, softcap=30.0) is None
    assert "head dim 64 with 4096 keys" in refusal(q64, long64, long64, softcap=30.0)
    assert refusal(q, long_kv, long_kv, softcap=30.0, padding=1) is None
    with monkeypatch.context() as m:
        m.setenv("SDPA_PASS_GLUON_SOFTCAP", "0")
        assert "SDPA_PASS_GLUON_SOFTCAP=0" in refusal(q256, kv256, kv256, softcap=30.0)
    with monkeypatch.context() as m:
        m.setenv("SDPA_PASS_GLUON_SOFTCAP", "1")
        assert refusal(q, kv, kv, softcap=30.0) is None
        assert refusal(q64, long64, long64, softcap=30.0) is None
        assert refusal(q, kv, kv, softcap=30.0, padding=1) is None
        assert refusal(q, kv, kv, softcap=30.0, causal_align=CAUSAL_TOP_LEFT, window=16) is None
        assert "dropout" in refusal(q, kv, kv, softcap=30.0, dropout_p=0.1)
    # a causal sliding window: taken unless SDPA_PASS_GLUON_WINDOW=0, not beside padding rows
    causal_window = dict(causal_align=CAUSAL_TOP_LEFT, window=16)
    monkeypatch.delenv("SDPA_PASS_GLUON_WINDOW", raising=False)
    assert refusal(q, kv, kv, **causal_window) is None
    assert "padding" in refusal(q, kv, kv, padding=1, **causal_window)
    with monkeypatch.context() as m:
        m.setenv("SDPA_PASS_GLUON_WINDOW", "0")
        assert "SDPA_PASS_GLUON_WINDOW=0" in refusal(q, kv, kv, **causal_window)
    # causal: taken while every row sees a key (diagonal offset >= 0)
    assert refusal(q, kv, kv, causal_align=CAUSAL_TOP_LEFT) is None
    assert refusal(q, kv, kv, causal_align=CAUSAL_BOTTOM_RIGHT) is None  # L < S: offset 128
    assert "without keys" in refusal(q, kv, kv, causal_align=CAUSAL_TOP_LEFT, diagonal=-1)
    assert "without keys" in refusal(kv, q, q, causal_align=CAUSAL_BOTTOM_RIGHT)  # L > S
    assert "scale" in refusal(q, kv, kv, scale=-0.1)
    # any lengths, and the (B, L, H, D) storage models transpose from
    assert refusal(q[:, :, :200], kv[:, :, :300], kv[:, :, :300]) is None
    strided = torch.zeros(2, 256, 4, 128, dtype=h).transpose(1, 2)
    assert refusal(strided, kv, kv) is None
    broadcast = kv[:, :1].expand(2, 2, 384, 128)  # stride 0: no descriptor dim for it
    assert "layout" in refusal(q, broadcast, kv)
    odd_rows = torch.zeros(2, 2, 384, 136, dtype=h)[..., :128]  # rows 272 bytes apart
    assert refusal(q, odd_rows, kv) is None
    misaligned = torch.zeros(2, 2, 384, 132, dtype=h)[..., :128]  # rows 264 bytes apart
    assert "layout" in refusal(q, kv, misaligned)
    monkeypatch.setenv("SDPA_PASS_GLUON", "0")
    assert "SDPA_PASS_GLUON" in refusal(q, kv, kv)


def test_tile_mask_refusals_name_what_the_copy_engine_cannot_read(monkeypatch):
    """Bool attn_masks with rows of their own are read in tiles through the copy engine where
    its layout rules hold; float masks, misaligned rows and SDPA_PASS_GLUON_MASK=0 say why
    not."""
    B, H, L, S = 2, 4, 64, 256
    full = lambda m: m.expand(B, H, L, S)  # noqa: E731 - the (B, Hq, L, S) view the forward reads
    square = torch.ones(L, S, dtype=torch.bool)
    assert gfwd.tile_mask_refusal(full(square)) is None  # broadcast over batch and heads
    assert gfwd.tile_mask_refusal(full(torch.ones(B, 1, L, S, dtype=torch.bool))) is None
    assert "float" in gfwd.tile_mask_refusal(full(torch.zeros(L, S)))
    odd = torch.ones(L, S + 4, dtype=torch.bool)[:, :S]  # rows 260 bytes apart
    assert "16-byte" in gfwd.tile_mask_refusal(full(odd))
    assert "16-byte" in gfwd.tile_mask_refusal(full(square.t().contiguous().t()))  # keys strided
    monkeypatch.setenv("SDPA_PASS_GLUON_MASK", "0")
    assert "SDPA_PASS_GLUON_MASK=0" in gfwd.tile_mask_refusal(full(square))


def test_the_forward_reads_16_bit_float_biases_in_tiles(monkeypatch):
    """The forward (at BIAS_HEAD_DIMS; the backward's kernels at theirs, none under
    SDPA_PASS_GLUON_BWD_BIAS=0) reads fp16 / bf16 float masks with rows of their own in tiles;
    fp32 ones, rows that are not 16-byte multiples, a bias broadcast over the rows and
    SDPA_PASS_GLUON_BIAS=0 say why not."""
    B, H, L, S = 2, 4, 64, 256
    full = lambda m: m.expand(B, H, L, S)  # noqa: E731
    for dtype in (torch.float16, torch.bfloat16):
        bias = torch.zeros(1, H, L, S, dtype=dtype)
        assert gfwd.tile_mask_refusal(full(bias), gfwd.BIAS_HEAD_DIMS) is None
        assert "SDPA_PASS_GLUON_BWD_BIAS=0" in gfwd.tile_mask_refusal(full(bias))
    assert "16-bit" in gfwd.tile_mask_refusal(full(torch.zeros(L, S)), gfwd.BIAS_HEAD_DIMS)
    odd = torch.zeros(L, S + 4, dtype=torch.bfloat16)[:, :S]  # rows 520 bytes apart
    assert "16-byte" in gfwd.tile_mask_refusal(full(odd), gfwd.BIAS_HEAD_DIMS)
    assert gfwd.tile_mask_refusal(full(torch.zeros(L, S + 8, dtype=torch.bfloat16)[:, :S]),
                                  gfwd.BIAS_HEAD_DIMS) is None  # 528 bytes apart
    row = torch.zeros(B, 1, 1, S, dtype=torch.bfloat16)  # one row of keys, every query's
    assert "strides" in gfwd.tile_mask_refusal(full(row), gfwd.BIAS_HEAD_DIMS)
    square = torch.zeros(L, S, dtype=torch.float16)
    assert "head dim 64" in gfwd.tile_mask_refusal(full(square), gfwd.BIAS_HEAD_DIMS, 64)
    assert gfwd.tile_mask_refusal(full(square), gfwd.BIAS_HEAD_DIMS, 256) is None
    assert gfwd.tile_mask_refusal(full(square > 0), (), 64) is None  # bool: every head dim
    monkeypatch.setenv("SDPA_PASS_GLUON_MASK", "0")  # bool masks' variable: not this one
    assert gfwd.tile_mask_refusal(full(square), gfwd.BIAS_HEAD_DIMS) is None
    monkeypatch.setenv("SDPA_PASS_GLUON_BIAS", "0")
    assert "SDPA_PASS_GLUON_BIAS=0" in gfwd.tile_mask_refusal(full(square), gfwd.BIAS_HEAD_DIMS)


@needs_gluon
@pytest.mark.parametrize("own", ["", "b", "h", "bh"])
def test_tile_mask_descriptors_index_the_masks_own_dims(own):
    """The copy engine's view of a bool mask: its own batch and head dims (a broadcast one of
    size 1, which the kernels index at 0), the (B, Hq, L, S) view's row stride, bytes, and
    the tiles each kernel copies (forward: 64 rows x 128 keys; dK/dV and dQ: 64 x 64)."""
    B, H, L, S = 2, 4, 96, 160
    mask = torch.ones(B if "b" in own else 1, H if "h" in own else 1, L, S, dtype=torch.bool)
    strides = mask.expand(B, H, L, S).stride()
    assert gfwd.tile_mask_refusal(mask.expand(B, H, L, S)) is None
    for rows, keys in ((64, 128), (64, 64)):
        desc = gfwd.mask_tile_descriptor(B, H, strides, L, S, rows, keys)(mask.view(torch.uint8))
        assert list(desc.shape) == [B if "b" in own else 1, H if "h" in own else 1, L, S]
        assert list(desc.strides)[2:] == [S, 1] and list(desc.block_shape) == [1, 1, rows, keys]
        assert all(stride % 16 == 0 for stride in desc.strides[:3])
    assert gfwd.mask_tile_indexing(True, strides) == ("b" in own, "h" in own)
    assert gfwd.mask_tile_indexing(False, strides) == (0, 0)
    # a float bias: the same dims and strides (elements), its own dtype
    bias = torch.zeros(mask.shape, dtype=torch.bfloat16)
    desc = gfwd.mask_tile_descriptor(B, H, strides, L, S)(bias)
    assert list(desc.shape)[2:] == [L, S] and list(desc.strides)[2:] == [S, 1]
    assert desc.layout.element_bitwidth == 16 and desc.base is bias


@needs_gluon
@pytest.mark.parametrize("tile", ["mask", "bias"])
@pytest.mark.parametrize("causal, head_dim", [(False, 128), (True, 128), (False, 64),
                                             (True, 256)])
def test_tile_mask_kernel_compiles_for_sm90_with_its_overlap(causal, head_dim, tile):
    """With an attn_mask read in tiles (MASK_TILE, a bool mask or a bf16 bias): the softmax's
    exponentials still run under the P·V product, little stack, and the mask's ring (two
    stages of two 64-row tiles of a key tile: bytes, or at hd128 a bias's 64 KB beside Q, K
    and V's 160) within Hopper's shared memory."""
    report = fwd_probe_report("--head-dim", str(head_dim), f"--{tile}-tile",
                              *(["--causal"] if causal else []))
    # (hd256 causal: 104 bytes under triton 3.9, the tiles' per-thread addresses; a kernel
    # spilling its tiles spills kilobytes)
    assert report["stack_bytes"] <= (128 if head_dim == 256 else 64)
    assert report["shared_bytes"] <= 227 * 1024
    assert not report["wgmma serialized (ptxas C7514)"]
    overlapped = report["EX2 between W1 and W0"]
    # a key tile's exponentials a thread: 64 rows x BN keys over 128 threads
    tile = gfwd.forward_block_n(head_dim) // 2
    assert len(overlapped) == 2 and min(overlapped) >= tile, report["loop window"]


@needs_gluon
@pytest.mark.parametrize("dtype, causal, head_dim", [("bf16", False, 128), ("fp16", True, 128),
                                                     ("bf16", True, 64), ("bf16", False, 256),
                                                     ("fp16", True, 256)])
def test_compiled_for_sm90_the_softmax_runs_under_the_pv_product(dtype, causal, head_dim):
    """Compiled for sm_90: at most a few bytes of stack (none without the causal mask), 240
    registers for each consumer warpgroup and 24 for the copy warp (setmaxnreg), the wgmmas
    not serialized by ptxas, and in each consumer's key loop the tile's exponentials (64, 32
    with hd256's 64-key tiles, plus the rescale's) between the wait that leaves the P·V
    product in flight and the wait for it."""
    report = fwd_probe_report("--head-dim", str(head_dim), *(["--causal"] if causal else []),
                              dtype=dtype)
    assert report["stack_bytes"] <= ((32 if head_dim == 256 else 16) if causal else 0)
    assert {24, gfwd.CONSUMER_REGS} <= set(report["setmaxnreg"])
    assert not report["wgmma serialized (ptxas C7514)"]
    assert report["shared_bytes"] <= 227 * 1024
    overlapped = report["EX2 between W1 and W0"]
    tile = gfwd.forward_block_n(head_dim) // 2
    assert len(overlapped) == 2 and min(overlapped) >= tile, report["loop window"]


@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_the_windowed_kernel_compiles_for_sm90_with_its_overlap(head_dim):
    """WINDOW (a causal sliding window): the causal kernel's wgmmas and exponentials, the
    exponentials still under the P·V product, not serialized, no more stack than the causal
    kernel's (triton 3.9: 8 bytes at hd128 against 16; a bound kept live across the loop
    had made it 136)."""
    reports = {}
    # (--window-one: a window of 1, which a launch specializes as a constexpr)
    for form in ("--causal", "--window", *(["--window-one"] if head_dim == 128 else [])):
        reports[form] = fwd_probe_report("--head-dim", str(head_dim), form)
    windowed, causal = reports["--window"], reports["--causal"]
    for key in ("HGMMA", "MUFU.EX2", "shared_bytes", "setmaxnreg"):
        assert windowed[key] == causal[key], (key, windowed, causal)
    assert not windowed["wgmma serialized (ptxas C7514)"]
    assert windowed["stack_bytes"] <= causal["stack_bytes"], (windowed, causal)
    overlapped = windowed["EX2 between W1 and W0"]
    tile = gfwd.forward_block_n(head_dim) // 2
    assert len(overlapped) == 2 and min(overlapped) >= tile, windowed["loop window"]


def test_the_forward_plan_remembers_a_gluon_call(monkeypatch):
    """(Any device: the refusal and the kernel replaced.) A call the Gluon kernel took is
    remembered under the forward's plan key: the next call with the same layouts skips
    ``gluon_forward_refusal`` and reaches the kernel with the same fixed arguments and its own
    tensors, scale and soft cap; a call with another layout is decided afresh."""
    checks, launches = [], []
    monkeypatch.setattr(fwd, "host_bound", lambda shape: False)
    monkeypatch.setattr(fwd, "gluon_forward_refusal", lambda *a, **k: checks.append(a[3]))

    def kernel(q, k, v, out, lse, shape, scale, return_lse, causal_align, diagonal, plan_key,
               padding, *masks):
        assert plan_key is not None  # the forward's key, under which the launch is remembered
        assert padding == 0 and masks[:-1] == (None, (0, 0), None, (0, 0, 0, 0), False, None,
                                               False, -1)
        launches.append((shape, scale, return_lse, causal_align, diagonal, plan_key,
                         masks[-1]))
        out.copy_(q * scale)

    monkeypatch.setattr(fwd, "attention_forward_gluon", kernel)

    def call(q, scale, softcap=30.0):
        shape = AttentionShape(*q.shape[:2], 2, q.shape[2], 32, 32, 32)
        kv = randn(2, 2, 32, 32, dtype=q.dtype)
        return fwd.attention_forward_triton(
            q, kv, kv, None, None, shape, scale=scale, causal_align=CAUSAL_BOTTOM_RIGHT,
            diagonal=0, window=-1, softcap=softcap, nan_on_empty=False, return_lse=True)

    q = randn(2, 4, 16, 32, dtype=torch.float16)
    call(q, 0.5)
    out, _ = call(q + 1, 0.25, 20.0)  # the same plan: a cap is a value, as the scale
    assert len(checks) == 1 and len(launches) == 2
    assert launches[0][0] == launches[1][0] and launches[0][5] == launches[1][5]
    assert launches[0][6] == 30.0
    assert launches[1][1:5] + launches[1][6:] == (0.25, True, CAUSAL_BOTTOM_RIGHT, 0, 20.0)
    torch.testing.assert_close(out, (q + 1) * 0.25)
    call(q[:, :, :8], 0.5)  # another plan key
    assert len(checks) == 2 and len(launches) == 3


def record_gluon_calls(monkeypatch):
    calls, real = [], fwd.attention_forward_gluon
    monkeypatch.setattr(fwd, "attention_forward_gluon",
                        lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    return calls


# (B, Hq, Hkv, L, S, dtype, scale, causal extras): none host-bound (B·Hq·L·S·128 >= 2**30)
GPU_CASES = {
    "mha_bf16": (1, 8, 8, 1024, 1024, torch.bfloat16, None, {}),
    "gqa_fp16_keys_longer": (1, 8, 2, 512, 2048, torch.float16, None, {}),
    "rows_longer_scale": (2, 4, 4, 2048, 512, torch.bfloat16, 0.3, {}),
    "causal_top_left": (1, 8, 8, 1024, 1024, torch.bfloat16, None, dict(is_causal=True)),
    "causal_top_left_keys_longer": (1, 8, 4, 512, 2048, torch.float16, None, dict(is_causal=True)),
    "causal_bottom_right_gqa": (1, 8, 2, 512, 2048, torch.bfloat16, None,
                                dict(causal="bottom_right")),
    "causal_diagonal_64": (2, 4, 4, 1024, 1024, torch.float16, 0.2,
                           dict(causal="top_left", diagonal=64)),
    # lengths that are not whole tiles: zero-filled rows and keys past L and S
    "ragged_lengths": (1, 8, 8, 1000, 1100, torch.bfloat16, None, {}),
    "ragged_causal_bottom_right": (1, 8, 2, 900, 1300, torch.float16, None,
                                   dict(causal="bottom_right")),
    "ragged_causal_top_left": (2, 8, 4, 1000, 1000, torch.bfloat16, None, dict(is_causal=True)),
    # head dim 64 (B·Hq·L·S >= 2**24, S >= HD64_MIN_KEYS)
    "hd64_gqa": (1, 8, 2, 512, 4096, torch.bfloat16, None, dict(head_dim=64)),
    "hd64_ragged_causal_bottom_right": (2, 8, 4, 600, 4100, torch.float16, None,
                                        dict(causal="bottom_right", head_dim=64)),
}


@needs_hopper
@pytest.mark.parametrize("persistent", ["1", "0"])
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gluon_forward_matches_the_reference(case, persistent, monkeypatch):
    """Each case through the persistent kernel (the default for these unmasked calls) and
    through the one-tile kernel (SDPA_PASS_GLUON_PERSISTENT=0), whose masked, padded and
    windowed calls the other tests run."""
    monkeypatch.setenv("SDPA_PASS_GLUON_PERSISTENT", persistent)
    monkeypatch.setattr(gfwd, "_GLUON_CALLS", gfwd.PlanCache())
    B, Hq, Hkv, L, S, dtype, scale, extras = GPU_CASES[case]
    extras = dict(extras)
    D = extras.pop("head_dim", 128)
    forward_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, scale=scale, **extras)


# hd256 (64-key tiles; laid out as GPU_CASES)
WIDE_CASES = {
    "hd256_mha": (1, 8, 8, 1024, 1024, torch.bfloat16, None, {}),
    "hd256_ragged_causal_bottom_right_gqa": (2, 8, 2, 1000, 1300, torch.float16, None,
                                             dict(causal="bottom_right")),
    "hd256_causal_top_left_scale": (2, 4, 4, 1024, 1024, torch.bfloat16, 0.05,
                                    dict(is_causal=True)),
}


@needs_hopper
@pytest.mark.parametrize("case", sorted(WIDE_CASES))
def test_gluon_forward_at_head_dim_256_matches_the_reference(case, monkeypatch):
    B, Hq, Hkv, L, S, dtype, scale, extras = WIDE_CASES[case]
    forward_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, 256, dtype, scale=scale,
                                  **extras)


def forward_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, **kwargs):
    """One Gluon forward (GQA, Q in the (B, L, H, D) storage models transpose from): its
    output and LSE against the float64 reference."""
    calls = record_gluon_calls(monkeypatch)
    q = randn(B, L, Hq, D, dtype=dtype).transpose(1, 2)
    k, v = (randn(B, Hkv, S, D, dtype=dtype) for _ in range(2))
    out, lse = attention(q, k, v, enable_gqa=True, return_lse=True, **kwargs)
    assert len(calls) == 1
    ref, ref_lse = reference_attention(q, k, v, **kwargs)
    assert_close_to_reference(out, ref, dtype)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=1e-3, atol=1e-3)


def _bool_mask(shape, generator, keep=0.8):
    """A random bool mask (True = attend) with the diagonal kept."""
    mask = torch.rand(*shape, generator=generator) < keep
    L, S = shape[-2:]
    idx = torch.arange(min(L, S))
    mask[..., idx, idx] = True
    return mask.to(DEVICE)


@needs_hopper
@pytest.mark.parametrize("causal, masked", [(False, False), (True, False), (False, True)])
def test_gradients_through_the_gluon_forward(causal, masked, monkeypatch):
    """The backward runs on the LSE the Gluon kernel wrote; ``masked``: under a bool mask the
    forward reads in tiles (and so does the Gluon backward) that hides some rows
    entirely."""
    calls = record_gluon_calls(monkeypatch)
    dtype = torch.bfloat16
    extras = dict(is_causal=causal)
    if masked:
        extras["attn_mask"] = _bool_mask((1, 1, 1024, 1024), torch.Generator().manual_seed(3))
        extras["attn_mask"][..., 100:140, :] = False
    forward_and_gradients_against_the_reference(calls, 1, 8, 4, 1024, 1024, 128, dtype, **extras)


def forward_and_gradients_against_the_reference(calls, B, Hq, Hkv, L, S, D, dtype, **kwargs):
    """One call that the Gluon forward takes (``calls``: record_gluon_calls') and its backward,
    whatever kernels that takes: output and gradients against the float64 reference."""
    q = randn(B, Hq, L, D, dtype=dtype).requires_grad_()
    k, v = (randn(B, Hkv, S, D, dtype=dtype).requires_grad_() for _ in range(2))
    grad = randn(B, Hq, L, D, dtype=dtype)
    out = attention(q, k, v, enable_gqa=True, **kwargs)
    assert len(calls) == 1
    grads = torch.autograd.grad(out, (q, k, v), grad)
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_attention(*refs, **kwargs)
    assert_close_to_reference(out, ref, dtype)
    ref_grads = torch.autograd.grad(ref, refs, grad.double().cpu())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_to_reference(g, r, dtype, what=f"d{name}")


# (B, Hq, Hkv, L, S, dtype, mask shape (None: (L, S)), extras)
TILE_MASK_CASES = {
    "square_broadcast": (2, 8, 8, 1024, 1024, torch.bfloat16, None, {}),
    "per_batch_gqa": (2, 8, 2, 768, 1536, torch.float16, "b", {}),
    "per_head_causal": (1, 8, 4, 1024, 1024, torch.bfloat16, "bh", dict(is_causal=True)),
    "ragged_bottom_right": (2, 4, 4, 1000, 1104, torch.bfloat16, "b",
                            dict(causal="bottom_right")),
    "with_key_padding": (2, 8, 8, 1024, 1024, torch.float16, None, dict(kpm=True)),
    "empty_rows": (2, 4, 4, 1024, 1024, torch.bfloat16, "bh", dict(empty=True)),
    "empty_rows_nan": (2, 4, 4, 1024, 1024, torch.float16, "bh",
                       dict(empty=True, empty_rows="nan")),
    "hd64": (1, 8, 2, 512, 4096, torch.bfloat16, "b", dict(head_dim=64)),
}


@needs_hopper
@pytest.mark.parametrize("case", sorted(TILE_MASK_CASES))
def test_gluon_forward_reads_bool_masks_in_tiles(case, monkeypatch):
    """A bool attn_mask with rows of its own (broadcast over batch and heads, per batch, per
    head), with causal masks, GQA, ragged lengths, a key_padding_mask beside it and rows it
    hides entirely (zeros, or NaN with empty_rows="nan"): the Gluon forward's output and LSE
    against the float64 reference."""
    B, Hq, Hkv, L, S, D, dtype, kwargs = tile_mask_case(case)
    forward_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, **kwargs)


def tile_mask_case(case: str, cases: dict = TILE_MASK_CASES) -> tuple:
    """(B, Hq, Hkv, L, S, D, dtype, attention keyword arguments) of ``cases[case]`` (laid out
    as TILE_MASK_CASES), its masks made on the test device."""
    B, Hq, Hkv, L, S, dtype, per, extras = cases[case]
    extras = dict(extras)
    D = extras.pop("head_dim", 128)
    generator = torch.Generator().manual_seed(len(case))
    shape = {None: (L, S), "b": (B, 1, L, S), "bh": (B, Hq, L, S)}[per]
    mask = _bool_mask(shape, generator)
    if extras.pop("empty", False):
        mask[0, 0, 5:300:7] = False  # rows that see no key
    if extras.pop("kpm", False):
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[1, S // 2 + 3:] = False
        extras["key_padding_mask"] = kpm.to(DEVICE)
    return B, Hq, Hkv, L, S, D, dtype, dict(attn_mask=mask, **extras)


# Float biases read in tiles: (B, Hq, Hkv, L, S, dtype, bias (None: (L, S), "h": (1, Hq, L, S),
# "b": (B, 1, L, S), "bh": (B, Hq, L, S)), extras). "fill": the HF additive mask's finfo.min
# on random keys, and rows with every key at finfo.min (eager softmax averages them
# uniformly) or at -inf (no visible key: zeros, or NaN with empty_rows="nan").
BIAS_CASES = {
    "alibi_per_head": (2, 8, 8, 1024, 1024, torch.bfloat16, "h", dict(alibi=True)),
    "per_batch_gqa_fp16": (2, 8, 2, 768, 1536, torch.float16, "b", {}),
    "broadcast_causal_scale": (1, 8, 4, 1024, 1024, torch.bfloat16, None,
                               dict(is_causal=True, scale=0.3)),
    "ragged_bottom_right": (2, 4, 4, 1000, 1104, torch.bfloat16, "bh",
                            dict(causal="bottom_right")),
    "finfo_min": (2, 4, 4, 1024, 1024, torch.bfloat16, "bh", dict(fill="finfo")),
    # keys past S in the last tile, no causal mask to hide them: rows at finfo.min see them
    # as the largest scores unless the kernels hide them
    "ragged_finfo_min": (2, 4, 2, 1000, 1104, torch.bfloat16, "bh", dict(fill="finfo")),
    "all_inf_rows": (2, 4, 4, 1024, 1024, torch.float16, "bh", dict(fill="inf")),
    "all_inf_rows_nan": (2, 4, 4, 1024, 1024, torch.bfloat16, "bh",
                         dict(fill="inf", empty_rows="nan")),
    "with_key_padding": (2, 8, 8, 1024, 1024, torch.float16, "b", dict(kpm=True)),
    "hd256_causal": (1, 8, 4, 1024, 1024, torch.bfloat16, "h",
                     dict(is_causal=True, head_dim=256, alibi=True)),
    # an fp16 bias beside bf16 Q, K, V (the tile is read in its own dtype)
    "fp16_bias_bf16_inputs": (2, 8, 8, 1024, 1024, torch.bfloat16, "b",
                              dict(bias_dtype=torch.float16)),
}


def bias_case(case: str, cases: dict = BIAS_CASES) -> tuple:
    """(B, Hq, Hkv, L, S, D, dtype, attention keyword arguments) of ``cases[case]`` (laid out
    as BIAS_CASES), its bias (the query's dtype unless ``bias_dtype``) made on the test
    device."""
    B, Hq, Hkv, L, S, dtype, per, extras = cases[case]
    extras = dict(extras)
    D = extras.pop("head_dim", 128)
    generator = torch.Generator().manual_seed(len(case))
    shape = {None: (L, S), "h": (1, Hq, L, S), "b": (B, 1, L, S), "bh": (B, Hq, L, S)}[per]
    if extras.pop("alibi", False):
        slopes = 2.0 ** (-8.0 * torch.arange(1, Hq + 1) / Hq)
        distance = (torch.arange(S)[None, :] - torch.arange(L)[:, None]).abs()
        bias = -slopes[:, None, None] * distance
    else:
        bias = 2 * torch.randn(*shape, generator=generator)
    fill = extras.pop("fill", None)
    if fill is not None:
        low = torch.finfo(dtype).min if fill == "finfo" else float("-inf")
        bias = bias.masked_fill(torch.rand(*shape, generator=generator) < 0.3, low)
        bias[0, 0, 5:300:7] = low  # rows with every key at the fill value
    if extras.pop("kpm", False):
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[1, S // 2 + 3:] = False
        extras["key_padding_mask"] = kpm.to(DEVICE)
    bias = bias.reshape(shape).to(DEVICE, extras.pop("bias_dtype", dtype))
    return B, Hq, Hkv, L, S, D, dtype, dict(attn_mask=bias, **extras)


@needs_hopper
@pytest.mark.parametrize("case", sorted(BIAS_CASES))
def test_gluon_forward_reads_float_biases_in_tiles(case, monkeypatch):
    """A 16-bit float attn_mask with rows of its own (ALiBi per head, random per batch and per
    head, broadcast over both, the HF mask's finfo.min, rows all at finfo.min or -inf; causal
    either corner, GQA, ragged lengths, a key_padding_mask beside it, hd256): the Gluon
    forward's output and LSE against the float64 reference."""
    B, Hq, Hkv, L, S, D, dtype, kwargs = bias_case(case)
    forward_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, **kwargs)


@needs_hopper
def test_gradients_through_a_gluon_forward_with_a_bias(monkeypatch):
    """The Triton backward (SDPA_PASS_GLUON_BWD_BIAS=0) from the Gluon forward's LSE, which
    a bias leaves in natural-log units as the Triton forward's: gradients against float64."""
    monkeypatch.setenv("SDPA_PASS_GLUON_BWD_BIAS", "0")
    calls = record_gluon_calls(monkeypatch)
    B, Hq, Hkv, L, S, D, dtype, kwargs = bias_case("finfo_min")
    forward_and_gradients_against_the_reference(calls, B, Hq, Hkv, L, S, D, dtype,
                                                is_causal=True, **kwargs)


@needs_hopper
def test_a_bias_at_head_dim_64_takes_the_triton_forward(monkeypatch):
    """hd64 with a float bias: the Triton forward (BIAS_HEAD_DIMS), the same answers."""
    calls = record_gluon_calls(monkeypatch)
    dtype = torch.bfloat16
    q = randn(1, 8, 512, 64, dtype=dtype)
    k, v = (randn(1, 8, 4096, 64, dtype=dtype) for _ in range(2))
    bias = randn(1, 8, 512, 4096, dtype=dtype)
    out = attention(q, k, v, attn_mask=bias)
    assert calls == []
    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=bias)[0], dtype)


@needs_hopper
def test_refused_calls_take_the_triton_kernel(monkeypatch):
    """K and V broadcast over heads (stride 0) and a bottom-right causal call with rows past
    the keys: the Triton kernel, same answers."""
    calls = record_gluon_calls(monkeypatch)
    dtype = torch.bfloat16
    q = randn(1, 8, 1024, 128, dtype=dtype)
    k, v = (randn(1, 1, 1024, 128, dtype=dtype).expand(1, 8, 1024, 128) for _ in range(2))
    out = attention(q, k, v)
    short_k, short_v = k[:, :, :512].contiguous(), v[:, :, :512].contiguous()
    causal = attention(q, short_k, short_v, causal="bottom_right")
    assert calls == []
    assert_close_to_reference(out, reference_attention(q, k, v)[0], dtype)
    ref = reference_attention(q, short_k, short_v, causal="bottom_right")[0]
    assert_close_to_reference(causal, ref, dtype)


@needs_hopper
def test_a_later_call_launches_the_remembered_kernel():
    """The second call with the same layouts takes the forward's plan (no refusal checks)
    and launches the compiled kernel directly, its descriptors rebuilt from the first call's
    around the new tensors."""
    dtype = torch.bfloat16
    q, k, v = (randn(1, 8, 1024, 128, dtype=dtype) for _ in range(3))
    attention(q, k, v, is_causal=True)
    hits, plan_hits = gfwd._GLUON_CALLS.hits, fwd._FORWARD_PLANS.hits
    q2, k2, v2 = (randn(1, 8, 1024, 128, dtype=dtype) for _ in range(3))
    out = attention(q2, k2, v2, is_causal=True)
    assert (gfwd._GLUON_CALLS.hits, fwd._FORWARD_PLANS.hits) == (hits + 1, plan_hits + 1)
    assert_close_to_reference(out, reference_attention(q2, k2, v2, is_causal=True)[0], dtype)


def test_the_persistent_forward_takes_unmasked_and_padded_calls_at_hd64_and_hd128(monkeypatch):
    """(Any device.) SDPA_PASS_GLUON_PERSISTENT=1 gives the persistent kernel the calls
    without an attn_mask read in tiles or a window, padding rows too where not causal, at head
    dims 64 and 128; its grid is at most the SMs (PERSISTENT_MAX_CTAS where set)."""
    monkeypatch.setenv("SDPA_PASS_GLUON_PERSISTENT", "1")
    for head_dim in gfwd.HEAD_DIMS:
        assert gfwd.persistent_forward(head_dim, 0, 0, -1, False, 64)
        assert gfwd.persistent_forward(head_dim, 0, 0, -1, True, gfwd.SCHEDULE_LIMIT)
    assert not gfwd.persistent_forward(gfwd.WIDE_HEAD_DIM, 0, 0, -1, False, 64)
    for padding in (1, 2, 3):  # padding rows (since session 36), without a causal mask
        assert gfwd.persistent_forward(128, padding, 0, -1, False, 64)
        assert not gfwd.persistent_forward(128, padding, 0, -1, True, 64)
    assert not gfwd.persistent_forward(128, 0, gfwd.TILE_BOOL, -1, False, 64)
    assert not gfwd.persistent_forward(128, 0, gfwd.TILE_BIAS, -1, False, 64)
    assert not gfwd.persistent_forward(128, 0, 0, 256, True, 64)  # a window
    # a causal call's schedule is laid out on the host: up to SCHEDULE_LIMIT tiles
    assert not gfwd.persistent_forward(128, 0, 0, -1, True, gfwd.SCHEDULE_LIMIT + 1)
    assert gfwd.persistent_forward(128, 0, 0, -1, False, gfwd.SCHEDULE_LIMIT + 1)
    monkeypatch.setenv("SDPA_PASS_GLUON_PERSISTENT", "0")
    assert not gfwd.persistent_forward(128, 0, 0, -1, False, 64)
    monkeypatch.setattr(gfwd, "PERSISTENT_MAX_CTAS", 3)
    assert gfwd.persistent_ctas(torch.device("cuda", 0)) == 3


@pytest.mark.parametrize("n_m, rows, ctas, S, offset", [
    (4, 512, 132, 512, 0), (128, 16, 132, 16384, 0), (8, 30, 7, 1000, 0),
    (5, 3, 16, 2100, 1460), (2, 2, 4, 256, 0)])
def test_the_causal_schedule_gives_every_tile_once_and_balances_the_work(n_m, rows, ctas, S,
                                                                          offset):
    """(Any device.) ``persistent_schedule``: CTA p's list (entries starts[p]:starts[p + 1]
    after the ctas + 1 starts) holds tiles in increasing order, every tile of the launch once,
    and the largest CTA's work (key tiles plus TILE_COST a tile) is within one tile's work of
    the mean, as list scheduling promises; tiles p, p + P, ... are not (N = 512 and 16k on 132
    SMs: 1.47x and 1.56x the mean)."""
    bn = gfwd.BLOCK_N
    schedule = gfwd.persistent_schedule(n_m, rows, ctas, S, offset, bn, torch.device("cpu"))
    assert schedule.dtype == torch.int32
    starts, tiles = schedule[:ctas + 1].tolist(), schedule[ctas + 1:].tolist()
    assert starts[0] == 0 and starts[-1] == len(tiles) == n_m * rows
    lists = [tiles[starts[p]:starts[p + 1]] for p in range(ctas)]
    assert all(lst == sorted(lst) for lst in lists)
    assert sorted(tiles) == list(range(n_m * rows))

    def cost(t):  # the kernel's key tiles of work tile t (_work_tile), plus TILE_COST
        start_m = (n_m - 1 - t % n_m) * gfwd.BLOCK_M
        return -(-min(S, start_m + gfwd.BLOCK_M + offset) // bn) + gfwd.TILE_COST

    loads = [sum(map(cost, lst)) for lst in lists]
    assert max(loads) <= sum(loads) / ctas + max(map(cost, tiles))
    if (n_m, ctas) in ((4, 132), (128, 132)):
        round_robin = [sum(map(cost, range(p, n_m * rows, ctas))) for p in range(ctas)]
        assert max(round_robin) > 1.4 * sum(loads) / ctas


@needs_gluon
@pytest.mark.parametrize("causal, head_dim, padding",
                         [(False, 128, 0), (True, 128, 0), (True, 64, 0), (True, 128, 2)])
def test_the_persistent_kernel_compiles_for_sm90_with_its_overlap(causal, head_dim, padding):
    """The persistent kernel keeps the one-tile kernel's wgmmas, exponentials and register
    split, the exponentials under the P·V product, within the shared memory (an O buffer of
    its own and two Q buffers per consumer: 224 KB at hd128) and a few bytes of stack; with
    HF's padding row too (``padding`` 2, KEY_SPAN)."""
    form = (["--causal"] if causal else []) + (["--padding", str(padding)] if padding else [])
    one = fwd_probe_report("--head-dim", str(head_dim), *form)
    persistent = fwd_probe_report("--head-dim", str(head_dim), *form, "--persistent")
    for key in ("HGMMA", "MUFU.EX2", "setmaxnreg"):
        assert persistent[key] == one[key], (key, persistent, one)
    assert not persistent["wgmma serialized (ptxas C7514)"]
    assert persistent["shared_bytes"] <= 227 * 1024
    # (triton 3.9, causal hd128: 136 bytes of stack and no spill store; a kernel spilling its
    # tiles spills kilobytes)
    assert persistent["stack_bytes"] <= 160
    overlapped = persistent["EX2 between W1 and W0"]
    assert len(overlapped) == 2 and min(overlapped) >= gfwd.BLOCK_N // 2, (
        persistent["loop window"])


def test_causal_schedules_are_kept_and_none_is_made_during_a_graph_capture(monkeypatch):
    """(Any device.) ``causal_schedule`` lays a shape's list out once and keeps the last
    SCHEDULE_CACHE (the oldest dropped first). While a CUDA stream captures a graph it makes
    none (its host-to-device copy cannot be captured) and answers None, so the launch takes
    the one-tile kernel; a kept one it returns then too."""
    monkeypatch.setattr(gfwd, "_SCHEDULES", {})
    monkeypatch.setattr(gfwd, "SCHEDULE_CACHE", 2)
    cpu = torch.device("cpu")
    first = gfwd.causal_schedule(4, 8, 5, 512, 0, 128, cpu)
    assert torch.equal(first, gfwd.persistent_schedule(4, 8, 5, 512, 0, 128, cpu))
    assert gfwd.causal_schedule(4, 8, 5, 512, 0, 128, cpu) is first
    gfwd.causal_schedule(4, 8, 6, 512, 0, 128, cpu)
    gfwd.causal_schedule(4, 8, 7, 512, 0, 128, cpu)  # drops the first
    assert gfwd.causal_schedule(4, 8, 5, 512, 0, 128, cpu) is not first
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert gfwd.causal_schedule(4, 8, 5, 512, 0, 128, cuda) is None
    kept = torch.zeros(1)
    gfwd._SCHEDULES[(4, 8, 5, 512, 0, 128, cuda)] = kept
    assert gfwd.causal_schedule(4, 8, 5, 512, 0, 128, cuda) is kept


@needs_hopper
def test_a_causal_shape_first_seen_in_a_graph_capture_replays_the_eager_output(monkeypatch):
    """A causal call captured into a CUDA graph before its shape ran eagerly (no schedule
    kept) takes the one-tile kernel there, and no plan under its key; the replay equals the
    eager call after it, which takes the persistent kernel."""
    monkeypatch.setenv("SDPA_PASS_GLUON_PERSISTENT", "1")
    monkeypatch.setattr(gfwd, "_SCHEDULES", {})
    launched = launches_of(monkeypatch)
    q, k, v = (randn(2, 4, 1024, 128, dtype=torch.bfloat16) for _ in range(3))
    # compile both kernels outside the capture, on another shape of the same specialization
    warm = [randn(2, 4, 512, 128, dtype=torch.bfloat16) for _ in range(3)]
    attention(*warm, is_causal=True)
    with monkeypatch.context() as m:
        m.setenv("SDPA_PASS_GLUON_PERSISTENT", "0")
        attention(*warm, is_causal=True)
    torch.cuda.synchronize()
    launched.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attention(q, k, v, is_causal=True)
    assert [kernel for kernel, _ in launched] == [gfwd._attention_fwd_ws]
    graph.replay()
    want = attention(q, k, v, is_causal=True)
    assert [kernel for kernel, _ in launched[1:]] == [gfwd._attention_fwd_persistent]
    torch.cuda.synchronize()
    ref = reference_attention(q, k, v, is_causal=True)[0]
    assert_close_to_reference(captured, ref, torch.bfloat16, "captured output")
    assert_close_to_reference(want, ref, torch.bfloat16)


# The persistent kernel, its grid held to a few CTAs so each walks many work tiles of
# different lengths (causal) and the K / V ring's count runs across them: (B, Hq, Hkv, L, S,
# dtype, scale, extras, CTAs; None: one per SM)
PERSISTENT_CASES = {
    "mha_bf16": (2, 4, 4, 1024, 1024, torch.bfloat16, None, {}, 5),
    "causal_gqa_ragged": (2, 8, 2, 1000, 1000, torch.float16, None, dict(is_causal=True), 7),
    "bottom_right_keys_longer": (1, 8, 4, 640, 2100, torch.bfloat16, 0.2,
                                 dict(causal="bottom_right"), 3),
    "one_cta": (1, 4, 4, 1024, 2048, torch.bfloat16, None, dict(is_causal=True, diagonal=40),
                1),
    "soft_capped": (1, 8, 8, 1024, 2048, torch.bfloat16, None,
                    dict(is_causal=True, softcap=30.0), 6),
    "hd64_gqa": (1, 8, 2, 512, 4096, torch.bfloat16, None, dict(head_dim=64), 4),
    "hd64_ragged_causal_bottom_right": (2, 4, 4, 600, 4100, torch.float16, None,
                                        dict(causal="bottom_right", head_dim=64), 9),
    "every_sm": (4, 16, 4, 2048, 2048, torch.bfloat16, None, dict(is_causal=True), None),
}


def launches_of(monkeypatch) -> list:
    """(kernel, grid) of each launch of the Gluon forward, its compiled plans forgotten."""
    launched, real = [], gfwd.launch_fixed
    monkeypatch.setattr(gfwd, "_GLUON_CALLS", gfwd.PlanCache())

    def recording(calls, key, kernel, grid, *args, **kwargs):
        launched.append((kernel, grid))
        return real(calls, key, kernel, grid, *args, **kwargs)

    monkeypatch.setattr(gfwd, "launch_fixed", recording)
    return launched


@needs_hopper
@pytest.mark.parametrize("case", sorted(PERSISTENT_CASES))
def test_the_persistent_forward_matches_the_reference(case, monkeypatch):
    B, Hq, Hkv, L, S, dtype, scale, extras, ctas = PERSISTENT_CASES[case]
    extras = dict(extras)
    D = extras.pop("head_dim", 128)
    monkeypatch.setenv("SDPA_PASS_GLUON_PERSISTENT", "1")
    monkeypatch.setattr(gfwd, "PERSISTENT_MAX_CTAS", ctas)
    launched = launches_of(monkeypatch)
    forward_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, scale=scale,
                                  **extras)
    tiles = B * Hq * -(-L // gfwd.BLOCK_M)
    assert launched == [(gfwd._attention_fwd_persistent,
                         (min(tiles, gfwd.persistent_ctas(torch.device(DEVICE))),))]


@needs_hopper
def test_gradients_through_the_persistent_forward(monkeypatch):
    """The backward runs on the LSE the persistent kernel wrote (causal GQA, 5 CTAs)."""
    monkeypatch.setenv("SDPA_PASS_GLUON_PERSISTENT", "1")
    monkeypatch.setattr(gfwd, "PERSISTENT_MAX_CTAS", 5)
    launched = launches_of(monkeypatch)
    calls = record_gluon_calls(monkeypatch)
    forward_and_gradients_against_the_reference(calls, 2, 8, 4, 1024, 1024, 128,
                                                torch.bfloat16, is_causal=True)
    assert [kernel for kernel, _ in launched] == [gfwd._attention_fwd_persistent]


# Causal sliding windows (laid out as GPU_CASES, "mask" / "bias": a
# random (B, Hq, L, S) bool mask / bf16 bias read in tiles beside the window;
# B·Hq·L·S·D >= 2**30, under which a call is host-bound and takes the Triton kernel)
WINDOW_CASES = {
    "top_left_1024": (2, 8, 8, 2048, 2048, torch.bfloat16, None, dict(is_causal=True, window=1024)),
    # a window under one tile, lengths that are not whole tiles, GQA
    "small_ragged_gqa": (2, 8, 2, 1000, 1000, torch.float16, None,
                         dict(is_causal=True, window=17)),
    "one_key": (1, 8, 8, 1024, 1024, torch.bfloat16, 0.3, dict(is_causal=True, window=1)),
    "bottom_right_ragged": (2, 8, 4, 700, 1300, torch.bfloat16, None,
                            dict(causal="bottom_right", window=300)),
    "diagonal_5": (1, 8, 8, 1024, 1024, torch.float16, None,
                   dict(is_causal=True, diagonal=5, window=129)),
    # rows past every key's window (top-left, L > S) see nothing: zeros, or NaN
    "rows_past_the_keys": (2, 8, 8, 1500, 600, torch.bfloat16, None,
                           dict(is_causal=True, window=200)),
    "rows_past_the_keys_nan": (2, 8, 8, 1500, 600, torch.bfloat16, None,
                               dict(is_causal=True, window=200, empty_rows="nan")),
    "hd64": (1, 8, 8, 4096, 4096, torch.bfloat16, None,
             dict(is_causal=True, window=512, head_dim=64)),
    "hd256_gqa": (1, 8, 4, 1024, 1024, torch.bfloat16, None,
                  dict(is_causal=True, window=200, head_dim=256)),
    "with_bool_mask": (2, 4, 4, 1024, 1024, torch.bfloat16, None,
                       dict(is_causal=True, window=300, mask=True)),
    "with_bias": (2, 4, 4, 1024, 1024, torch.bfloat16, None,
                  dict(is_causal=True, window=300, bias=True)),
}


def window_case(case: str, cases: dict = WINDOW_CASES) -> tuple:
    """(B, Hq, Hkv, L, S, D, dtype, attention keyword arguments) of cases[case]."""
    B, Hq, Hkv, L, S, dtype, scale, extras = cases[case]
    extras = dict(extras, scale=scale)
    D = extras.pop("head_dim", 128)
    generator = torch.Generator().manual_seed(3)
    if extras.pop("mask", False):
        extras["attn_mask"] = _bool_mask((B, Hq, L, S), generator)
    if extras.pop("bias", False):
        extras["attn_mask"] = (2 * torch.randn(B, Hq, L, S, generator=generator)).to(DEVICE, dtype)
    return B, Hq, Hkv, L, S, D, dtype, extras


@needs_hopper
@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_gluon_forward_with_a_sliding_window(case, monkeypatch):
    """The Gluon forward's causal sliding window: key tiles before the CTA's first window
    skipped, the windows' edge tiles masked; output and LSE against float64."""
    monkeypatch.delenv("SDPA_PASS_GLUON_WINDOW", raising=False)  # the default
    B, Hq, Hkv, L, S, D, dtype, kwargs = window_case(case)
    forward_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, **kwargs)


@needs_hopper
def test_gradients_through_a_windowed_gluon_forward(monkeypatch):
    """The Triton backward (SDPA_PASS_GLUON_BWD=0) from the windowed Gluon forward's LSE."""
    monkeypatch.delenv("SDPA_PASS_GLUON_WINDOW", raising=False)
    monkeypatch.setenv("SDPA_PASS_GLUON_BWD", "0")
    calls = record_gluon_calls(monkeypatch)
    B, Hq, Hkv, L, S, D, dtype, kwargs = window_case("bottom_right_ragged")
    forward_and_gradients_against_the_reference(calls, B, Hq, Hkv, L, S, D, dtype, **kwargs)


# Soft-capped scores (run under SDPA_PASS_GLUON_SOFTCAP=1, which takes the Gluon kernels at
# every shape it runs, these 1k-key hd128 ones too; laid out as WINDOW_CASES): caps and scales
# that put most scores on tanh's curve or its saturation (randn inputs: raw products of about
# sqrt(D)), beside every mask form and head dim the kernel takes; one near-linear cap.
SOFTCAP_CASES = {
    "mha_cap5": (1, 8, 8, 1024, 1024, torch.bfloat16, 0.5, dict(softcap=5.0)),
    "causal_gqa_fp16_keys_longer": (1, 8, 2, 1024, 2048, torch.float16, None,
                                    dict(is_causal=True, softcap=2.0)),
    "bottom_right_ragged": (1, 8, 4, 900, 1300, torch.bfloat16, 0.3,
                            dict(causal="bottom_right", softcap=3.0)),
    "window": (2, 8, 8, 1024, 1024, torch.bfloat16, None,
               dict(is_causal=True, window=200, softcap=1.0)),
    "with_bool_mask": (2, 4, 4, 1024, 1024, torch.bfloat16, 0.5, dict(mask=True, softcap=4.0)),
    "with_bias": (2, 4, 4, 1024, 1024, torch.bfloat16, 0.5, dict(bias=True, softcap=4.0)),
    "hd64": (1, 8, 8, 4096, 4096, torch.bfloat16, None,
             dict(is_causal=True, softcap=1.5, head_dim=64)),
    "hd256_gqa": (1, 8, 4, 1024, 1024, torch.bfloat16, 0.2,
                  dict(is_causal=True, softcap=4.0, head_dim=256)),
    "near_linear_cap50": (1, 8, 8, 1024, 1024, torch.float16, None, dict(softcap=50.0)),
}


@needs_hopper
@pytest.mark.parametrize("case", sorted(SOFTCAP_CASES))
def test_gluon_forward_soft_caps_the_scores(case, monkeypatch):
    """SDPA_PASS_GLUON_SOFTCAP=1 (the Gluon kernel wherever it runs): the Gluon forward's
    cap · tanh(s · scale / cap) before the masks (a bias added after it); output and LSE
    against float64, the launch specialized for it."""
    monkeypatch.setenv("SDPA_PASS_GLUON_SOFTCAP", "1")
    forms, real = [], gfwd.launch_fixed
    monkeypatch.setattr(gfwd, "launch_fixed", lambda *a, **k: forms.append(a[5]["SOFTCAP"])
                        or real(*a, **k))
    B, Hq, Hkv, L, S, D, dtype, kwargs = window_case(case, SOFTCAP_CASES)
    forward_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, **kwargs)
    assert forms == [True]


@needs_hopper
@pytest.mark.parametrize("case", ["bottom_right_ragged", "with_bias"])
def test_gradients_through_a_soft_capped_gluon_forward(case, monkeypatch):
    """The backward from the soft-capped Gluon forward's LSE: the Gluon kernels under the
    same variable, the Triton ones beside a float bias."""
    monkeypatch.setenv("SDPA_PASS_GLUON_SOFTCAP", "1")
    calls = record_gluon_calls(monkeypatch)
    B, Hq, Hkv, L, S, D, dtype, kwargs = window_case(case, SOFTCAP_CASES)
    forward_and_gradients_against_the_reference(calls, B, Hq, Hkv, L, S, D, dtype, **kwargs)


@pytest.mark.parametrize("bias", [False, True])
def test_the_soft_cap_constants_give_capped_logits_in_the_softmax_units(bias):
    """(Any device.) ``gluon_score_scales``' two factors in ``_soft_cap``'s formula (replayed
    here in fp32, as the kernel computes it): the capped logit cap · tanh(s · scale / cap) in
    log2 units (natural ones beside a bias, which the kernel adds in them), saturating to
    +-cap without NaN for products far past the cap; without a cap the plain scale."""
    scale, cap = 0.3, 4.0
    qk_scale, cap_scale = gfwd.gluon_score_scales(scale, cap, bias)
    s = torch.cat([torch.linspace(-60.0, 60.0, 2001), torch.tensor([-1e30, -3e4, 3e4, 1e30])])
    t = 1.0 - 2.0 / (torch.exp2(s * cap_scale) + 1.0)  # _soft_cap, fp32
    units = 1.0 if bias else math.log2(math.e)
    want = cap * torch.tanh(s.double() * scale / cap) * units
    assert not t.isnan().any()
    torch.testing.assert_close((t * qk_scale).double(), want, rtol=0, atol=4e-6 * cap * units)
    assert (t[-4:] == torch.tensor([-1.0, -1.0, 1.0, 1.0])).all()
    assert gfwd.gluon_score_scales(scale, 0.0, bias) == ((scale if bias else scale * units), 0.0)


@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_the_soft_capped_kernel_compiles_for_sm90_with_its_overlap(head_dim):
    """SOFTCAP: the causal kernel's wgmmas and shared memory, twice its exponentials (tanh's
    and the softmax's), both under the P·V product, not serialized, at most 8 bytes more
    stack (triton 3.9: 24 against 16 at hd128)."""
    reports = {}
    for form in (["--causal"], ["--causal", "--softcap"]):
        reports[len(form)] = fwd_probe_report("--head-dim", str(head_dim), *form)
    capped, causal = reports[2], reports[1]
    for key in ("HGMMA", "shared_bytes", "setmaxnreg"):
        assert capped[key] == causal[key], (key, capped, causal)
    assert capped["MUFU.EX2"] >= 2 * causal["MUFU.EX2"] - 8, (capped, causal)
    assert not capped["wgmma serialized (ptxas C7514)"]
    assert capped["stack_bytes"] <= causal["stack_bytes"] + 8, (capped, causal)
    overlapped = capped["EX2 between W1 and W0"]
    tile = gfwd.forward_block_n(head_dim) // 2
    assert len(overlapped) == 2 and min(overlapped) >= 2 * tile, capped["loop window"]


def _window_tiles(L, S, offset, window, BM, BN):
    """The windowed forward's schedule as ``_attention_fwd_ws`` and ``_consumer`` compute it
    (every quotient of non-negative numbers, so truncating and flooring agree): for each consumer
    warpgroup's rows, the key tiles it visits, each with whether it is masked."""
    BMW = BM // 2
    for start_m in range(0, L, BM):
        n_tiles = (min(S, start_m + BM + offset) + BN - 1) // BN
        full_tiles = min(S // BN, (start_m + offset + 1) // BN)
        t0 = max(start_m + offset - window + 1, 0) // BN
        n_tiles -= t0
        if n_tiles <= 0:
            t0, n_tiles = 0, 1
        for row0 in (start_m, start_m + BMW):
            edge = row0 + BMW - 1 + offset - window  # the last key a row of them hides
            yield row0, [(j, j >= full_tiles or j * BN <= edge) for j in range(t0, t0 + n_tiles)]


def test_the_window_schedule_visits_every_visible_key_and_masks_the_rest():
    """(Any device.) The tile arithmetic of the windowed Gluon forward, replayed in Python over
    lengths, diagonals, windows and both head dims' tiles: every (row, key) pair a row may see
    lies in a tile its warpgroup visits, and every visited tile holding a pair it may not see
    (the band's edges, keys past S) is one the kernel masks."""
    for (BM, BN), L, S, diagonal, window in [
            ((128, 128), 1000, 1000, 0, 17), ((128, 128), 2048, 2048, 0, 1024),
            ((128, 128), 512, 512, 0, 1), ((128, 128), 700, 1300, 600, 300),
            ((128, 128), 1024, 1024, 5, 129), ((128, 128), 1500, 600, 0, 200),
            ((128, 64), 1024, 1024, 0, 200), ((128, 64), 300, 900, 600, 64),
            ((128, 128), 256, 256, 0, 5000), ((128, 64), 1000, 100, 0, 30)]:
        offset = diagonal
        for row0, tiles in _window_tiles(L, S, offset, window, BM, BN):
            rows = range(row0, min(row0 + BM // 2, L))
            visited = {j for j, _ in tiles}
            for i in rows:
                for key in range(max(0, i + offset - window + 1), min(S, i + offset + 1)):
                    assert key // BN in visited, (BM, BN, L, S, offset, window, i, key)
            for j, masked in tiles:
                keys = range(j * BN, (j + 1) * BN)
                hidden = any(not (i + offset - window < key <= i + offset and key < S)
                             for i in rows for key in keys)
                assert masked or not hidden, (BM, BN, L, S, offset, window, row0, j)


@needs_hopper
def test_the_kernel_log_names_the_gluon_kernels_and_the_triton_ones_with_their_reason():
    """``sdpa_pass.kernels`` (through ``sdpa_pass.report.KernelChoices``) on a GPU: causal
    hd128 at 2048 keys runs the Gluon forward and the Gluon dK/dV kernel, which forms dQ too
    (``gluon_backward.fused_dq``, the hd128 default since session 31); soft-capped at 1024
    keys the Triton forward (under SOFTCAP_MIN_KEYS, said so) before the Gluon backward;
    under deterministic algorithms the Gluon dQ kernel forms dQ."""
    from sdpa_pass.kernels.launch import clear_plans
    from sdpa_pass.report import KernelChoices

    def lines(N, **kwargs):
        clear_plans()
        q, k, v = (randn(2, 8, N, 128, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        with KernelChoices() as choices:
            attention(q, k, v, is_causal=True, **kwargs).sum().backward()
        return [line.split(": ", 1)[1] for line in choices.lines]

    fused = "dK/dV Gluon with dQ by the copy engine's reduce-adds"
    assert lines(2048) == ["Gluon", fused]
    forward, backward = lines(1024, softcap=30.0)
    assert forward.startswith("Triton (soft-capping at head dim 128 with 1024 keys"), forward
    assert backward == fused, backward
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert lines(2048) == ["Gluon", "dK/dV Gluon, dQ Gluon"]
    finally:
        torch.use_deterministic_algorithms(previous)
