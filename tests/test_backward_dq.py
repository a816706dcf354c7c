"""The backward's dQ paths: the atomic one (the dK/dV kernel also forms dQ,
SDPA_PASS_BWD_DQ=atomic), the split one's load paths, and which the kernel takes.

Apart from tests/test_backward.py, whose every test also runs through the chunked PyTorch
backward: these test the Triton kernel's own path choice.
"""

from __future__ import annotations

import pytest
import torch

import sdpa_pass.kernels.backward as bwd
from reference import DEVICE, randn
from test_backward import L, D, assert_grads_close, leaves, op_grads, reference_grads
from test_kernel_forward import B, CAUSAL_KINDS, HEADS, make_mask, make_qkv


# 32 keys: mask rows of 16-byte multiples, which a mask descriptor needs (bool masks too)
S = 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def launches(monkeypatch):
    """The meta-parameters of every dK/dV and dQ kernel launch of the test, in order."""
    seen = []
    launch = bwd._launch
    monkeypatch.setattr(bwd, "_launch", lambda kernel, tiles, grid, args, meta, *rest: (
        seen.append(meta), launch(kernel, tiles, grid, args, meta, *rest))[1])
    return seen


def test_dq_path_choice(monkeypatch):
    """Atomic dQ only when asked; never when the mask's gradient is wanted (only the dQ kernel
    writes dS); a bad setting is named."""
    monkeypatch.setattr(bwd, "interpreter_active", lambda: False)
    monkeypatch.delenv("SDPA_PASS_BWD_DQ", raising=False)
    assert not bwd.dq_by_atomics(need_mask_grad=False)
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", "split")
    assert not bwd.dq_by_atomics(need_mask_grad=False)
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", "atomic")
    assert bwd.dq_by_atomics(need_mask_grad=False)
    assert not bwd.dq_by_atomics(need_mask_grad=True)
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", "atomics")
    with pytest.raises(ValueError, match="SDPA_PASS_BWD_DQ must be 'atomic' or 'split'"):
        bwd.dq_by_atomics(need_mask_grad=False)


# (dtype, loads): the dK/dV kernel adding dQ with pointer atomics, reading Q/dO/K/V and the
# mask through pointers or through tensor descriptors (fp16 only, as on the GPU). The GPU's
# reduce-add of the descriptor path has no interpreter form; this file on a GPU runs it.
ATOMIC_ROUTES = {"fp32_pointers": (torch.float32, "0"), "fp16_pointers": (torch.float16, "0"),
                 "fp16_descriptors": (torch.float16, "1")}


@pytest.mark.parametrize("causal", ["none", "top_left", "window7_bottom_right"])
@pytest.mark.parametrize("mask", ["none", "bool_LS", "float_1HLS", "padding"])
@pytest.mark.parametrize("route", ATOMIC_ROUTES)
def test_dq_added_by_the_dkdv_kernel(monkeypatch, launches, route, mask, causal):
    """The atomic dQ path (SDPA_PASS_BWD_DQ=atomic): one kernel forms dK, dV and dQ (GQA,
    every mask kind that does not want its own gradient, causal and window tile ranges)."""
    dtype, loads = ATOMIC_ROUTES[route]
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", "atomic")
    monkeypatch.setenv("SDPA_PASS_BWD_TMA", loads)
    monkeypatch.setenv("SDPA_PASS_MASK_TMA", loads)
    hq, hkv = HEADS["gqa2"]
    # head dim 64: on a GPU, narrower value tiles are widened to 64 (launch_params), and
    # descriptors need whole-tile head dims
    q, k, v = leaves(*make_qkv(dtype, hq, hkv, L=L, S=S, D=64))
    attn_mask, kpm = make_mask(mask, hq, L, S, dtype)
    dout = randn(B, hq, L, 64, dtype=dtype)
    extras = dict(key_padding_mask=kpm, **CAUSAL_KINDS[causal])
    grads = op_grads(q, k, v, attn_mask, dout, enable_gqa=True, **extras)
    mask_descriptor = loads == "1" and mask in ("bool_LS", "float_1HLS")
    assert [(m["DQ_ATOMIC"], m["TMA"], m["MASK_TMA"]) for m in launches] == [
        (True, loads == "1", mask_descriptor)]
    assert_grads_close(grads, reference_grads(q, k, v, attn_mask, dout, **extras), dtype)


@pytest.mark.parametrize("dkdv_loads", ["pointers", "descriptors"])
@pytest.mark.parametrize("causal", ["none", "window7_bottom_right"])
@pytest.mark.parametrize("mask", ["bool_LS", "float_1HLS", "float_1HLS_grad", "float_B11S"])
def test_split_path_reads_the_mask_through_descriptors(monkeypatch, launches, mask, causal,
                                                       dkdv_loads):
    """The split path's kernels read the mask tile through a tensor descriptor
    (SDPA_PASS_MASK_TMA=1 here; by default on Hopper both kernels at head dims <= 128, and
    the dK/dV kernel wherever its Q/dO/K/V loads are descriptors too), the dK/dV kernel with
    its other loads through pointers or descriptors: GQA, a mask broadcast over batch or
    heads, the float mask's own gradient (dS), a window."""
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", "split")
    monkeypatch.setenv("SDPA_PASS_BWD_TMA", "1" if dkdv_loads == "descriptors" else "0")
    monkeypatch.setenv("SDPA_PASS_MASK_TMA", "1")
    dtype = torch.float16
    hq, hkv = HEADS["gqa2"]
    q, k, v = leaves(*make_qkv(dtype, hq, hkv, L=L, S=S, D=64))
    attn_mask, kpm = make_mask(mask.removesuffix("_grad"), hq, L, S, dtype)
    if mask.endswith("_grad"):
        attn_mask.requires_grad_()
    dout = randn(B, hq, L, 64, dtype=dtype)
    extras = CAUSAL_KINDS[causal]
    grads = op_grads(q, k, v, attn_mask, dout, enable_gqa=True, **extras)
    # a (B, 1, 1, S) padding bias broadcasts over rows: pointer loads (use_mask_tma)
    descriptor = mask != "float_B11S"
    assert [(m["MASK_TMA"], m.get("TMA")) for m in launches] == [
        (descriptor, dkdv_loads == "descriptors"), (descriptor, None)]
    assert_grads_close(grads, reference_grads(q, k, v, attn_mask, dout, **extras), dtype)


@pytest.mark.parametrize("extras", [dict(softcap=5.0, causal="bottom_right"),
                                    dict(dropout_p=0.3, is_causal=True)], ids=["softcap", "dropout"])
def test_dq_paths_agree(monkeypatch, extras):
    """Soft-capping and dropout (same seed) through both dQ paths: the same gradients up to
    the sums' order."""
    q, k, v = leaves(*make_qkv(torch.float32, 4, 1, L=L, S=S, D=D))
    dout = randn(B, 4, L, D)
    runs = []
    for path in ("split", "atomic"):
        monkeypatch.setenv("SDPA_PASS_BWD_DQ", path)
        torch.manual_seed(5)
        runs.append(op_grads(q, k, v, None, dout, enable_gqa=True, **extras))
    for name, a, b in zip(("dq", "dk", "dv"), *runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_default_path_at_head_dim_128(monkeypatch, launches):
    """hd128 with a bool mask, GQA and causal, Gluon backward off: on a GPU (Hopper, bf16) the
    Triton default is the split dQ path, the dK/dV kernel's loads (mask included) and the dQ
    kernel's mask through descriptors; the CPU interpreter takes them when asked."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    on_hopper = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    monkeypatch.delenv("SDPA_PASS_BWD_DQ", raising=False)
    # the Triton kernels' defaults: on Hopper the Gluon backward takes bool tile masks at hd128
    # (session 21) and would leave no Triton launch to inspect
    monkeypatch.setenv("SDPA_PASS_GLUON_BWD", "0")
    # the test's shapes are host-bound (forward.host_bound), which keeps pointer loads
    monkeypatch.setattr(bwd, "host_bound", lambda shape: False)
    if not on_hopper:
        for name in ("SDPA_PASS_BWD_TMA", "SDPA_PASS_MASK_TMA"):
            monkeypatch.setenv(name, "1")
    q, k, v = leaves(*make_qkv(dtype, 4, 2, L=L, S=S, D=128))
    attn_mask, _ = make_mask("bool_LS", 4, L, S, dtype)
    dout = randn(B, 4, L, 128, dtype=dtype)
    extras = CAUSAL_KINDS["bottom_right"]
    grads = op_grads(q, k, v, attn_mask, dout, enable_gqa=True, **extras)
    dkdv, dq = launches
    assert (dkdv["DQ_ATOMIC"], dkdv["TMA"], dkdv["MASK_TMA"], dq["MASK_TMA"]) == (
        False, True, True, True)
    assert_grads_close(grads, reference_grads(q, k, v, attn_mask, dout, **extras), dtype)


# (dQ path, SDPA_PASS_BWD_TMA): the split path with pointer loads, the atomic one with descriptors
PADDED_ROUTES = {"split_pointers": ("split", "0"), "atomic_descriptors": ("atomic", "1")}


@pytest.mark.parametrize("causal", ["none", "window7_bottom_right"])
@pytest.mark.parametrize("mask", ["none", "bool_LS", "float_1HLS", "padding"])
@pytest.mark.parametrize("route", PADDED_ROUTES)
@pytest.mark.parametrize("rows", ["padded", "masked"])
def test_row_statistics_layouts(monkeypatch, launches, rows, route, mask, causal):
    """By default the dK/dV kernel loads the row statistics (m, r, delta) unmasked from rows
    padded to whole tiles; L = %d is no multiple of the padding, so the last query tile reads
    padded rows, which must act as rows that see no key (P = 0), as the masked loads' fill
    values do. SDPA_PASS_BWD_PADDED_ROWS=0 loads them masked from L rows.""" % L
    path, loads = PADDED_ROUTES[route]
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", path)
    monkeypatch.setenv("SDPA_PASS_BWD_TMA", loads)
    if rows == "masked":
        monkeypatch.setenv("SDPA_PASS_BWD_PADDED_ROWS", "0")
    else:
        monkeypatch.delenv("SDPA_PASS_BWD_PADDED_ROWS", raising=False)
    hq, hkv = HEADS["gqa2"]
    q, k, v = leaves(*make_qkv(torch.float16, hq, hkv, L=L, S=S, D=64))
    attn_mask, kpm = make_mask(mask, hq, L, S, torch.float16)
    dout = randn(B, hq, L, 64, dtype=torch.float16)
    extras = dict(key_padding_mask=kpm, **CAUSAL_KINDS[causal])
    grads = op_grads(q, k, v, attn_mask, dout, enable_gqa=True, **extras)
    assert [(m["PADDED_ROWS"], m["TMA"]) for m in launches[:1]] == [
        (rows == "padded", loads == "1")]
    assert_grads_close(grads, reference_grads(q, k, v, attn_mask, dout, **extras),
                       torch.float16)


def test_row_padding_covers_every_dkdv_tile():
    """The padding is a whole number of tiles for every tile the dK/dV kernel may run with
    (tuned, fixed or interpreted), so its unmasked loads never pass the padded end."""
    rows = [m for m, *_ in bwd._DKDV_CONFIGS] + [bwd._INTERPRETER_CONFIG["BLOCK_M"]] + [
        bwd._fixed_config(d, dt)["BLOCK_M"] for d in (64, 128, 256)
        for dt in (torch.float16, torch.float32)]
    assert all(bwd.ROW_PAD % m == 0 for m in rows)


def test_autotuning_key_has_a_length_class(monkeypatch):
    """GPU launches of both backward kernels are tuned per length class of their loop (the dK/dV
    kernel's over queries, the dQ kernel's over keys), as the forward's: a sweep's first
    length no longer chooses the tiles of every later one. The launches are recorded, not run
    (the autotuner needs a GPU to time configs); the prep kernel runs."""
    from sdpa_pass.kernels.checks import CAUSAL_NONE, check_attention_inputs
    from sdpa_pass.kernels.forward import LONG_ROWS

    keys = []

    def record(tuned):
        def launch(key, grid, *args, **meta):
            keys.append((tuned, key, meta["len_class"]))
            return None, dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        return launch

    monkeypatch.setattr(bwd, "interpreter_active", lambda: False)
    monkeypatch.setenv("SDPA_PASS_AUTOTUNE", "1")
    monkeypatch.setenv("SDPA_PASS_LAUNCH_PLANS", "0")  # the stand-ins launch nothing to plan
    monkeypatch.setattr(bwd._DKDV, "launch", record("dkdv"))
    monkeypatch.setattr(bwd._DQ, "launch", record("dq"))
    for tuned in (bwd._bwd_dkdv_autotuned, bwd._bwd_dq_autotuned):
        assert "len_class" in tuned.keys
    lengths = [(16, 100), (16, LONG_ROWS - 1), (16, LONG_ROWS), (LONG_ROWS, 16)]
    for q_len, kv_len in lengths:
        q, out, grad_out = (randn(1, 2, q_len, 32, dtype=torch.float16) for _ in range(3))
        k, v = (randn(1, 2, kv_len, 32, dtype=torch.float16) for _ in range(2))
        lse = torch.zeros(1, 2, q_len, device=q.device)
        shape = check_attention_inputs(q, k, v, None, None, causal_align=CAUSAL_NONE)
        bwd.attention_backward_triton(
            grad_out, q, k, v, None, None, out, lse, shape, scale=0.1, causal_align=CAUSAL_NONE,
            diagonal=0, window=-1, softcap=0.0, need_mask_grad=False)
    dkdv = [(key, cls) for tuned, key, cls in keys if tuned == "dkdv"]
    dq = [(key, cls) for tuned, key, cls in keys if tuned == "dq"]
    assert [cls for _, cls in dkdv] == [0, 0, 0, 1]  # queries
    assert [cls for _, cls in dq] == [0, 0, 1, 0]  # keys
    assert dq[0][0] == dq[1][0] != dq[2][0]
    assert dkdv[0][0] == dkdv[2][0] != dkdv[3][0]


def test_wide_head_tiles_are_tried_only_at_wide_heads():
    """The tiles measured faster at head dim 256 (backward._WIDE_ONLY) are among the autotuner's
    candidates there, fit its shared-memory and register rule, and are not compiled and timed
    at head dims up to 128."""
    import triton

    def kept(prune, configs, d):
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in configs]
        q = torch.empty(1, 1, 1, d, dtype=torch.bfloat16)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in prune(configs, {"Q": q, "BLOCK_D": d, "BLOCK_DV": d})}

    dkdv = (bwd._fits("n", "m", "d+dv"), bwd._DKDV_CONFIGS)
    dq = (bwd._fits("m", "n", "d", mask_stages=True), bwd._DQ_CONFIGS)
    for wide, (prune, configs) in zip(((64, 64, 8, 1), (128, 32, 8, 1)), (dkdv, dq)):
        assert wide in bwd._WIDE_ONLY and wide in configs
        assert wide in kept(prune, configs, 256)
        for d in (64, 128):
            assert wide not in kept(prune, configs, d)
            assert kept(prune, configs, d)  # the other tiles remain


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled tiles need a GPU")
@pytest.mark.parametrize("mask", ["none", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_wide_head_tiles_match_reference(monkeypatch, mask, causal):
    """The hd256 tiles of backward._WIDE_ONLY (dK/dV 64 x 64, 8 warps, 1 stage; dQ 128 x 32,
    8 warps, 1 stage), forced in place of whatever the autotuner would pick: gradients against
    float64 on a ragged GQA shape, bf16."""
    from sdpa_pass.kernels.launch import clear_plans

    def tiles(m, n, w, s):
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)

    monkeypatch.setattr(bwd, "_kernels", lambda *_: (
        bwd._bwd_dkdv_kernel, tiles(64, 64, 8, 1), bwd._bwd_dq_kernel, tiles(128, 32, 8, 1)))
    clear_plans()
    dtype = torch.bfloat16
    q, k, v = leaves(*make_qkv(dtype, 4, 2, L=200, S=333, D=256))
    attn_mask = randn(1, 4, 200, 333, dtype=dtype) if mask == "float" else None
    dout = randn(B, 4, 200, 256, dtype=dtype)
    extras = dict(causal="bottom_right") if causal else {}
    grads = op_grads(q, k, v, attn_mask, dout, enable_gqa=True, **extras)
    clear_plans()
    assert_grads_close(grads, reference_grads(q, k, v, attn_mask, dout, **extras), dtype)
