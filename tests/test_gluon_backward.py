"""The Hopper backward's dK/dV kernel in Gluon (kernels/gluon_backward.py).

Gluon kernels do not run in the interpreter, so on a machine without a Hopper GPU these tests
check which calls take the kernel (``gluon_backward_refusal``), what the compiler makes of it
for sm_90 (no spill without the causal mask, the register split, the exponentials issued while
the dPᵀ product is in flight), and the contract between the backward and the kernel: the
prep kernel's statistics (delta, m, r) in the order and units the kernel reads them, the
causal offset and the plan, with the kernel replaced by the same arithmetic in torch. On a
Hopper GPU the gradients are compared with the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from sdpa_pass.kernels import CAUSAL_NONE, attention
from sdpa_pass.kernels import backward as bwd
from sdpa_pass.kernels import forward as fwd
from sdpa_pass.kernels import gluon_backward as gbwd
from sdpa_pass.kernels import gluon_forward as gfwd
from sdpa_pass.kernels.checks import AttentionShape
from sdpa_pass.kernels.launch import clear_plans
from reference import (DEVICE, assert_close_to_reference, randn, reference_attention,
                       rounded_gradients, rounding_tolerance)
from script_runner import last_json
from test_gluon_forward import GPU_CASES as FORWARD_CASES
from test_gluon_forward import (BIAS_CASES, SOFTCAP_CASES, TILE_MASK_CASES, WINDOW_CASES,
                                bias_case, tile_mask_case, window_case)

HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(gbwd.gluon is None, reason="this Triton has no Gluon Hopper API")
needs_hopper = pytest.mark.skipif(not HOPPER or gbwd.gluon is None,
                                  reason="the Gluon kernel runs on a Hopper GPU only")


def refusal(q, k, v, do=None, **overrides):
    B, H, L, D = q.shape
    shape = AttentionShape(B, H, k.shape[1], L, k.shape[2], D, v.shape[-1])
    kwargs = dict(masked=False, padding=0, window=-1, softcapped=False, dropout=False, dq_atomic=False,
                  padded_rows=True, rows=-(-L // 64) * 64, small=False, capability=9)
    kwargs.update(overrides)
    return gbwd.gluon_backward_refusal(q, k, v, q if do is None else do, shape, **kwargs)


@needs_gluon
def test_refusals_name_why_a_backward_stays_on_the_triton_kernel(monkeypatch):
    h = torch.bfloat16
    q = torch.zeros(2, 4, 200, 128, dtype=h)
    kv = torch.zeros(2, 2, 300, 128, dtype=h)
    assert refusal(q, kv, kv) is None  # GQA, ragged lengths
    assert refusal(torch.zeros(2, 200, 4, 128, dtype=h).transpose(1, 2), kv, kv) is None
    assert "Hopper" in refusal(q, kv, kv, capability=8)
    assert "Hopper" in refusal(q, kv, kv, capability=None)
    assert "dtype" in refusal(q.float(), kv.float(), kv.float())
    q64, kv64 = torch.zeros(2, 4, 200, 64, dtype=h), torch.zeros(2, 2, 300, 64, dtype=h)
    assert refusal(q64, kv64, kv64) is None
    q256, kv256 = torch.zeros(2, 4, 200, 256, dtype=h), torch.zeros(2, 2, 300, 256, dtype=h)
    assert refusal(q256, kv256, kv256) is None  # the split schedule
    assert gbwd.gluon_dq_refusal(refusal(q256, kv256, kv256), 256) is None
    q80, kv80 = torch.zeros(2, 4, 200, 80, dtype=h), torch.zeros(2, 2, 300, 80, dtype=h)
    assert "head dims" in refusal(q80, kv80, kv80)
    assert "head dims" in refusal(q64, kv64, kv)  # V's head dim differs
    assert "mask" in refusal(q, kv, kv, masked=True)  # (padding rows: test_gluon_padding.py)
    # soft-capping: taken, beside padding rows too; SDPA_PASS_GLUON_SOFTCAP=0 never
    monkeypatch.delenv("SDPA_PASS_GLUON_SOFTCAP", raising=False)
    assert refusal(q, kv, kv, softcapped=True) is None
    assert refusal(q, kv, kv, softcapped=True, padding=1) is None
    with monkeypatch.context() as m:
        m.setenv("SDPA_PASS_GLUON_SOFTCAP", "0")
        assert "SDPA_PASS_GLUON_SOFTCAP=0" in refusal(q, kv, kv, softcapped=True)
        assert "SDPA_PASS_GLUON_SOFTCAP=0" in refusal(q, kv, kv, softcapped=True, padding=1)
    assert "dropout" in refusal(q, kv, kv, dropout=True)
    # a (causal) sliding window: taken unless SDPA_PASS_GLUON_WINDOW=0, not beside padding
    monkeypatch.delenv("SDPA_PASS_GLUON_WINDOW", raising=False)
    assert refusal(q, kv, kv, window=16) is None
    assert "padding" in refusal(q, kv, kv, window=16, padding=1)
    with monkeypatch.context() as m:
        m.setenv("SDPA_PASS_GLUON_WINDOW", "0")
        assert "SDPA_PASS_GLUON_WINDOW=0" in refusal(q, kv, kv, window=16)
    assert "atomic" in refusal(q, kv, kv, dq_atomic=True)
    assert "padded" in refusal(q, kv, kv, padded_rows=False)
    assert "padded" in refusal(q, kv, kv, rows=200)
    assert "host-bound" in refusal(q, kv, kv, small=True)
    expanded = torch.zeros(1, 1, 1, 128, dtype=h).expand(2, 4, 200, 128)  # d(sum) -> stride 0
    assert "dO's layout" in refusal(q, kv, kv, do=expanded)
    misaligned = torch.zeros(2, 2, 300, 132, dtype=h)[..., :128]  # rows 264 bytes apart
    assert "V's layout" in refusal(q, kv, misaligned)
    for name in ("SDPA_PASS_GLUON", "SDPA_PASS_GLUON_BWD"):
        with monkeypatch.context() as m:
            m.setenv(name, "0")
            assert name in refusal(q, kv, kv)



def test_float_biases_reach_the_backward_kernels_unless_turned_off(monkeypatch):
    """The backward's kernels read a float bias in tiles at BIAS_HEAD_DIMS by default; under
    SDPA_PASS_GLUON_BWD_BIAS=0 the refusal names the variable."""
    bias = torch.zeros(1, 4, 64, 256, dtype=torch.bfloat16).expand(2, 4, 64, 256)
    monkeypatch.delenv("SDPA_PASS_GLUON_BWD_BIAS", raising=False)
    assert gbwd.bias_head_dims() == gbwd.BIAS_HEAD_DIMS
    for head_dim in gbwd.BIAS_HEAD_DIMS:
        assert gfwd.tile_mask_refusal(bias, gbwd.bias_head_dims(), head_dim) is None
    assert "head dim 80" in gfwd.tile_mask_refusal(bias, gbwd.bias_head_dims(), 80)
    monkeypatch.setenv("SDPA_PASS_GLUON_BWD_BIAS", "0")
    assert gbwd.bias_head_dims() == ()
    assert "SDPA_PASS_GLUON_BWD_BIAS=0" in gfwd.tile_mask_refusal(bias, gbwd.bias_head_dims())


@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_the_backward_hands_the_kernels_a_bias_and_natural_statistics(causal, monkeypatch):
    """(Any device: the refusals and the kernels replaced by ``torch_dkdv`` / ``torch_dq``.)
    A float bias reaches the kernels as TILE_BIAS with the
    plain scale and the prep kernel's NATURAL statistics, whose units the stand-ins' natural-
    log P (the kernels' formula) turns into the float64 reference's gradients, rows whose
    every key is at finfo.min (P uniform) included."""
    clear_plans()
    monkeypatch.delenv("SDPA_PASS_GLUON_BWD_BIAS", raising=False)
    monkeypatch.setenv("SDPA_PASS_GLUON_FUSED_DQ", "0")  # both kernels (hd64 forms dQ in one)
    monkeypatch.setattr(bwd, "gluon_backward_refusal", lambda *a, **k: None)
    monkeypatch.setattr(bwd, "gluon_dq_refusal", lambda *a, **k: None)
    seen = []

    def stand_in(fn):
        def kernel(*args, **kwargs):
            seen.append((kwargs["mask_tile"], kwargs["qk_scale"], kwargs["scale"]))
            fn(*args, **kwargs)
        return kernel

    monkeypatch.setattr(bwd, "attention_dkdv_gluon", stand_in(torch_dkdv))
    monkeypatch.setattr(bwd, "attention_dq_gluon", stand_in(torch_dq))
    dtype = torch.float16
    L, S = 40, 48
    q = randn(1, 4, L, 64, dtype=dtype).requires_grad_()  # (a head dim of BIAS_HEAD_DIMS)
    k, v = (randn(1, 2, S, 64, dtype=dtype).requires_grad_() for _ in range(2))
    grad = randn(1, 4, L, 64, dtype=dtype)
    generator = torch.Generator().manual_seed(5)
    bias = 2 * torch.randn(1, 4, L, S, generator=generator)
    bias = bias.masked_fill(torch.rand(1, 4, L, S, generator=generator) < 0.3,
                            torch.finfo(dtype).min)
    bias[0, 1, 3:30:4] = torch.finfo(dtype).min  # rows with every key at finfo.min
    bias = bias.to(DEVICE, dtype)
    extras = dict(causal=causal) if causal else {}
    out = attention(q, k, v, attn_mask=bias, enable_gqa=True, **extras)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert seen == [(gfwd.TILE_BIAS, 0.125, 0.125)] * 2  # the plain scale 64 ** -0.5, twice
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_attention(*refs, attn_mask=bias, **extras)
    ref_grads = torch.autograd.grad(ref, refs, grad.double().cpu())
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close_to_reference(g, rg, dtype, what=f"d{name}")


@needs_gluon
def test_the_dq_kernel_takes_the_dkdv_kernels_calls_at_head_dim_128(monkeypatch):
    """The Gluon dQ kernel: the dK/dV kernel's scope (its reason passed on) at hd128 only."""
    h = torch.bfloat16
    q, kv = torch.zeros(2, 4, 200, 128, dtype=h), torch.zeros(2, 2, 300, 128, dtype=h)
    assert gbwd.gluon_dq_refusal(refusal(q, kv, kv), 128) is None
    reason = refusal(q, kv, kv, masked=True)
    assert gbwd.gluon_dq_refusal(reason, 128) == reason
    q64, kv64 = torch.zeros(2, 4, 200, 64, dtype=h), torch.zeros(2, 2, 300, 64, dtype=h)
    assert refusal(q64, kv64, kv64) is None  # dK/dV in Gluon, dQ not
    assert "head dim 64" in gbwd.gluon_dq_refusal(refusal(q64, kv64, kv64), 64)
    monkeypatch.setenv("SDPA_PASS_GLUON_DQ", "0")
    assert refusal(q, kv, kv) is None
    assert "SDPA_PASS_GLUON_DQ=0" in gbwd.gluon_dq_refusal(refusal(q, kv, kv), 128)

def probe_compile(*args: str) -> dict:
    """``benchmarks/gluon_bwd_probe.py --compile *args`` without the interpreter
    (``script_runner``), its last line read as JSON."""
    return last_json("gluon_bwd_probe.py", "--compile", *args)


def compile_report(dtype: str, causal: bool | str, head_dim: int, kernel: str = "dkdv",
                   mask_tile: bool | str = False, softcap: bool | str = False,
                   ragged: bool = False, fused_dq: bool = False) -> dict:
    """The probe's report of the library's kernel; ``causal``: True, or "window" with a
    sliding window ("window_one": of one key, specialized as a launch would); ``mask_tile``:
    True or "mask" a bool attn_mask read in tiles, "bias" a float bias of ``dtype``;
    ``softcap``: soft-capped scores;
    ``ragged``: dQ's RAGGED_KEYS; ``fused_dq``: the dK/dV kernel's FUSED_DQ."""
    tile = {True: "mask", False: ""}.get(mask_tile, mask_tile)
    return probe_compile(
        "--product", dtype, "--head-dim", str(head_dim), "--product-kernel", kernel,
        *({"window": ["--window-product"], "window_one": ["--window-one-product"]}.get(
            causal, ["--causal-product"] if causal else [])),
        *([f"--{tile}-tile"] if tile else []),
        *(["--softcap-product"] if softcap else []),
        *(["--ragged-product"] if ragged else []),
        *(["--fused-dq-product"] if fused_dq else []))


@needs_gluon
@pytest.mark.parametrize("dtype, causal, head_dim", [("bf16", False, 128), ("fp16", True, 128),
                                                     ("bf16", True, 64)])
def test_compiled_for_sm90_the_exponentials_run_under_the_dp_product(dtype, causal, head_dim):
    """The dK/dV kernel compiled for sm_90: little spill (without the causal mask none under
    triton 3.9, 8 bytes of stack under 3.6; with it 136 bytes under 3.9: a bound that catches
    a kernel spilling its tiles, kilobytes), 240 registers for each consumer warpgroup and 24
    for the copy warp, the wgmmas not serialized by ptxas, and in each consumer's loop the
    tile's 32 exponentials a thread between the wait that leaves dPᵀ in flight and the next
    wait."""
    report = compile_report(dtype, causal, head_dim)
    assert report["stack_bytes"] <= (256 if causal else 16), report
    assert {24, gbwd.CONSUMER_REGS} <= set(report["setmaxnreg"])
    assert not report["wgmma serialized (ptxas C7514)"]
    events = report["events"].split()
    after_first_wait = []
    for i, e in enumerate(events):
        if e == "W1" and (i == 0 or not events[i - 1].startswith("A")):
            nxt = events[i + 1] if i + 1 < len(events) else ""
            if nxt.startswith("E"):
                after_first_wait.append(int(nxt.split("x")[1]) if "x" in nxt else 1)
    assert after_first_wait == [32, 32], report["events"]



@needs_gluon
@pytest.mark.parametrize("kernel, head_dim", [("dkdv", 64), ("dkdv", 128), ("dq", 128),
                                              ("dkdv", 256), ("dq", 256)])
def test_windowed_kernels_compile_for_sm90(kernel, head_dim):
    """WINDOW (a causal sliding window): each kernel's causal schedule as compiled for sm_90,
    the same wgmmas, exponentials and order of waits, not serialized, a few bytes more stack
    (hd128 dK/dV: 8, triton 3.9) and shared memory (the partitions' one more argument: 16)
    at most."""
    causal = compile_report("bf16", True, head_dim, kernel)
    windowed = compile_report("bf16", "window", head_dim, kernel)
    if head_dim == 128:  # a window of 1, which a launch specializes as a constexpr, compiles
        assert compile_report("bf16", "window_one", head_dim, kernel)["HGMMA"] == causal["HGMMA"]
    for key in ("HGMMA", "MUFU.EX2", "events"):
        assert windowed[key] == causal[key], (key, windowed, causal)
    assert not windowed["wgmma serialized (ptxas C7514)"]
    assert windowed["stack_bytes"] <= causal["stack_bytes"] + 16, (windowed, causal)
    assert windowed["shared_bytes"] <= causal["shared_bytes"] + 64, (windowed, causal)


@needs_gluon
@pytest.mark.parametrize("tile", ["mask", "bias"])
@pytest.mark.parametrize("kernel, causal", [("dkdv", False), ("dkdv", True), ("dq", False)])
def test_tile_mask_kernels_compile_for_sm90(kernel, causal, tile):
    """Both backward kernels with an attn_mask read in tiles (MASK_TILE: a bool mask, or a
    bf16 bias) compiled for sm_90: the same wgmma and
    exponential counts as without, the wgmmas not serialized, little more stack (the bias's
    dK/dV kernel: 48 bytes without the causal mask, 32 more with it, triton 3.9; a kernel
    spilling its tiles spills kilobytes), and the mask's ring within Hopper's shared memory."""
    plain = compile_report("bf16", causal, 128, kernel)
    tiled = compile_report("bf16", causal, 128, kernel, mask_tile=tile)
    for key in ("HGMMA", "MUFU.EX2"):
        assert tiled[key] == plain[key], (key, tiled, plain)
    assert not tiled["wgmma serialized (ptxas C7514)"]
    assert tiled["stack_bytes"] <= plain["stack_bytes"] + (16 if tile == "mask" else 64), (
        tiled, plain)
    assert tiled["shared_bytes"] <= 227 * 1024


@needs_gluon
@pytest.mark.parametrize("kernel, causal, mask_tile", [("dkdv", False, False),
                                                       ("dkdv", True, True),
                                                       ("dkdv", True, "bias"),
                                                       ("dq", False, False), ("dq", True, True),
                                                       ("dq", False, "bias")])
def test_hd256_kernels_compiled_for_sm90_fit_hoppers_shared_memory(kernel, causal, mask_tile):
    """The hd256 dK/dV and dQ kernels (two consumers on the same 64 keys or rows, module
    docstring) for sm_90: the tiles and the P ring (one slot beside a mask's tiles: a bf16
    bias's take the dK/dV kernel to 231,424 bytes) within Hopper's 227 KB of shared memory, no spill, the register split, the wgmmas not
    serialized; the wgmmas (Sᵀ / S and dPᵀ / dP 16 k-steps each, dV and dK 4, dQ 4) and the
    32 exponentials a thread of the first consumer only."""
    report = compile_report("bf16", causal, 256, kernel, mask_tile=mask_tile)
    assert report["shared_bytes"] <= 227 * 1024, report
    assert report["stack_bytes"] <= 16, report
    assert {24, gbwd.CONSUMER_REGS} <= set(report["setmaxnreg"])
    assert not report["wgmma serialized (ptxas C7514)"]
    wgmmas = 40 if kernel == "dkdv" else 36
    assert (report["HGMMA"], report["MUFU.EX2"]) == (wgmmas, 32), report


def exponentials_between_waits(events: str) -> list[int]:
    """For each wait that leaves one product in flight (W1), the exponentials (E) before the
    next wait."""
    counts, current = [], None
    for e in events.split():
        if e.startswith("W"):
            if current is not None:
                counts.append(current)
            current = 0 if e == "W1" else None
        elif e.startswith("E") and current is not None:
            current += int(e.split("x")[1]) if "x" in e else 1
    return counts


@needs_gluon
@pytest.mark.parametrize("dtype, causal", [("bf16", False), ("fp16", True)])
def test_dq_kernel_compiled_for_sm90_runs_the_exponentials_under_the_dp_product(dtype, causal):
    """The dQ kernel for sm_90 (hd128): no spill, the consumers' and the copy warp's register
    split, the wgmmas not serialized, and in each consumer's loop the key tile's 32
    exponentials a thread between the wait that leaves dP in flight and the wait for dP
    (before the first tile's, peeled off the loop, ptxas may put a few after it)."""
    report = compile_report(dtype, causal, 128, kernel="dq")
    assert report["stack_bytes"] == 0, report
    assert {24, gbwd.CONSUMER_REGS} <= set(report["setmaxnreg"])
    assert not report["wgmma serialized (ptxas C7514)"]
    counts = exponentials_between_waits(report["events"])
    assert counts.count(32) == 2 and len(counts) == 4, report["events"]

def _torch_products(q, k, v, grad_out, stats, shape, qk_scale, causal_align, offset, rows,
                    bias=None, window=-1, cap_scale=0.0):
    """P and dS of the Gluon kernels, in torch from their arguments, with the group's K and V
    repeated for each query head; ``bias``: a float attn_mask read in tiles (TILE_BIAS), the
    scores then in natural-log units (qk_scale the plain scale, m the prep kernel's NATURAL
    statistic), as ``_pt_tile`` and ``_dq_p`` compute them; ``window``: a causal sliding
    window's keys (-1: none); ``cap_scale``: soft-capped scores (t = tanh as ``_soft_cap``
    computes it, qk_scale then cap · log2(e); dS takes the factor 1 - t², as
    ``_cap_derivative``)."""
    L, S, group = shape.q_len, shape.kv_len, shape.group
    assert stats.shape == (3, shape.batch, shape.q_heads, rows) and rows % gbwd.BLOCK_M == 0
    delta, m, r = (t[..., :L, None] for t in stats)
    kk, vv = (t.float().repeat_interleave(group, 1) for t in (k, v))
    s = q.float() @ kk.transpose(-2, -1)
    if cap_scale != 0.0:  # (negative with a negative scale)
        s = 1.0 - 2.0 / (torch.exp2(s * cap_scale) + 1.0)
    if causal_align != CAUSAL_NONE:
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        s = s.masked_fill(j > i + offset, float("-inf"))
        if window > 0:
            s = s.masked_fill(j <= i + offset - window, float("-inf"))
    if bias is not None:
        s = s * qk_scale + bias.float()
        s = s.masked_fill(s.isnan(), float("-inf"))  # (-inf causal + a bias)
        p = torch.exp2((s - m) * gbwd.LOG2E - r)
    else:
        p = torch.exp2((s * qk_scale - m) - r)
    dp = grad_out.float() @ vv.transpose(-2, -1)
    factor = p * (1.0 - torch.minimum(s * s, torch.ones(()))) if cap_scale != 0.0 else p
    return p, factor * (dp - delta), kk


def _bias(mask, mask_tile):
    return mask if mask_tile == gfwd.TILE_BIAS else None


def torch_dkdv(q, k, v, grad_out, stats, dk, dv, shape, *, scale, qk_scale, causal_align, offset,
               rows, plan_key, mask=None, mask_tile=0, window=-1, cap_scale=0.0, **padding):
    """The Gluon dK/dV kernel's arithmetic in torch, from the same arguments (the CPU
    stand-in)."""
    p, ds, _ = _torch_products(q, k, v, grad_out, stats, shape, qk_scale, causal_align, offset,
                               rows, _bias(mask, mask_tile), window, cap_scale)
    B, Hkv, S, group = shape.batch, shape.kv_heads, shape.kv_len, shape.group
    dv.copy_((p.transpose(-2, -1) @ grad_out.float()).view(B, Hkv, group, S, -1).sum(2))
    dk.copy_((ds.transpose(-2, -1) @ q.float()).view(B, Hkv, group, S, -1).sum(2) * scale)


def torch_dq(q, k, v, grad_out, stats, dq, shape, *, scale, qk_scale, causal_align, offset, rows,
             plan_key, mask=None, mask_tile=0, spans=None, window=-1, cap_scale=0.0, **padding):
    """The Gluon dQ kernel's arithmetic in torch (the CPU stand-in)."""
    _, ds, kk = _torch_products(q, k, v, grad_out, stats, shape, qk_scale, causal_align, offset,
                                rows, _bias(mask, mask_tile), window, cap_scale)
    dq.copy_(ds @ kk * scale)


@pytest.mark.parametrize("causal, L, S, window", [("top_left", 40, 24, 5),
                                                  ("bottom_right", 24, 40, 9),
                                                  ("top_left", 40, 16, 3)])
def test_the_backward_hands_the_kernels_its_window(causal, L, S, window, monkeypatch):
    """(Any device: the refusals and the kernels replaced by ``torch_dkdv`` / ``torch_dq``.)
    A causal call with a sliding window gives both kernels the window and the prep kernel's
    statistics of the windowed rows (rows past every key's window, top-left L > S, included:
    m = +inf, P = 0); the stand-ins' gradients from them match the float64 reference."""
    clear_plans()
    monkeypatch.delenv("SDPA_PASS_GLUON_WINDOW", raising=False)  # the default
    monkeypatch.setattr(bwd, "gluon_backward_refusal", lambda *a, **k: None)
    monkeypatch.setattr(bwd, "gluon_dq_refusal", lambda *a, **k: None)
    seen = []

    def stand_in(fn):
        def kernel(*args, **kwargs):
            seen.append(kwargs["window"])
            fn(*args, **kwargs)
        return kernel

    monkeypatch.setattr(bwd, "attention_dkdv_gluon", stand_in(torch_dkdv))
    monkeypatch.setattr(bwd, "attention_dq_gluon", stand_in(torch_dq))
    q = randn(1, 4, L, 16).requires_grad_()
    k, v = (randn(1, 2, S, 16).requires_grad_() for _ in range(2))
    grad = randn(1, 4, L, 16)
    extras = dict(causal=causal, window=window)
    grads = torch.autograd.grad(attention(q, k, v, enable_gqa=True, **extras), (q, k, v), grad)
    assert seen == [window, window]
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference_attention(*refs, **extras)[0], refs,
                                    grad.double().cpu())
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close_to_reference(g, rg, torch.float32, what=f"d{name}")


@pytest.mark.parametrize("extras", [dict(softcap=2.0, scale=0.9),
                                    dict(causal="bottom_right", softcap=1.0),
                                    dict(is_causal=True, window=7, softcap=3.0, scale=0.6),
                                    dict(softcap=30.0),
                                    dict(is_causal=True, softcap=3.0, scale=-0.4)])
def test_the_backward_hands_the_kernels_its_soft_cap(extras, monkeypatch):
    """(Any device: the refusals and the kernels replaced by ``torch_dkdv`` / ``torch_dq``.)
    Soft-capped scores: both kernels get qk_scale = cap · log2(e) and ``_soft_cap``'s factor
    (``gluon_score_scales``) beside the prep kernel's statistics of the capped scores; the
    stand-ins, which replay the kernels' tanh and their 1 - t² factor of dS, give the float64
    reference's gradients (caps and scales that put most scores on the curve, a near-linear
    one; GQA). (Masks beside a cap: the GPU cases.)"""
    clear_plans()
    monkeypatch.setattr(bwd, "gluon_backward_refusal", lambda *a, **k: None)
    monkeypatch.setattr(bwd, "gluon_dq_refusal", lambda *a, **k: None)
    seen = []

    def stand_in(fn):
        def kernel(*args, **kwargs):
            seen.append((kwargs["qk_scale"], kwargs["cap_scale"]))
            fn(*args, **kwargs)
        return kernel

    monkeypatch.setattr(bwd, "attention_dkdv_gluon", stand_in(torch_dkdv))
    monkeypatch.setattr(bwd, "attention_dq_gluon", stand_in(torch_dq))
    L, S, D = 24, 40, 16
    q = randn(1, 4, L, D).requires_grad_()
    k, v = (randn(1, 2, S, D).requires_grad_() for _ in range(2))
    grad = randn(1, 4, L, D)
    grads = torch.autograd.grad(attention(q, k, v, enable_gqa=True, **extras), (q, k, v), grad)
    cap, scale = extras["softcap"], extras.get("scale", D ** -0.5)
    want = (cap * gbwd.LOG2E, 2 * gbwd.LOG2E * scale / cap)
    assert len(seen) == 2 and all(
        got == pytest.approx(want, rel=1e-12) for got in seen), (seen, want)
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference_attention(*refs, **extras)[0], refs,
                                    grad.double().cpu())
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close_to_reference(g, rg, torch.float32, what=f"d{name}")


@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_the_backward_hands_the_kernel_its_statistics_and_plan(causal, monkeypatch):
    """(Any device: the refusals and the kernels replaced by ``torch_dkdv`` / ``torch_dq``.) A
    backward the kernels take gives them the prep kernel's statistics as they read them, the
    causal offset and the backward's plan key (each its own launch site); gradients match the
    float64 reference (so the order delta, m, r and their units hold), rows past the keys
    included (bottom-right, L > S). A later call with the same layouts reuses the decisions
    without asking again."""
    clear_plans()
    checks, launches = [], []
    monkeypatch.setattr(bwd, "gluon_backward_refusal", lambda *a, **k: checks.append(1))
    monkeypatch.setattr(bwd, "gluon_dq_refusal", lambda *a, **k: checks.append(2))

    def stand_in(name, fn):
        def kernel(*args, **kwargs):
            assert kwargs["plan_key"][-1] == f"gluon_{name}"
            launches.append((name, kwargs["offset"]))
            fn(*args, **kwargs)
        return kernel

    monkeypatch.setattr(bwd, "attention_dkdv_gluon", stand_in("dkdv", torch_dkdv))
    monkeypatch.setattr(bwd, "attention_dq_gluon", stand_in("dq", torch_dq))
    dtype = torch.float32
    for L, S in ((40, 24), (40, 24), (24, 40)):
        q = randn(1, 4, L, 16, dtype=dtype).requires_grad_()
        k, v = (randn(1, 2, S, 16, dtype=dtype).requires_grad_() for _ in range(2))
        grad = randn(1, 4, L, 16, dtype=dtype)
        extras = dict(causal=causal) if causal else {}
        out = attention(q, k, v, enable_gqa=True, **extras)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
        ref, _ = reference_attention(*refs, **extras)
        ref_grads = torch.autograd.grad(ref, refs, grad.double().cpu())
        for name, g, rg in zip("qkv", grads, ref_grads):
            assert_close_to_reference(g, rg, dtype, what=f"d{name}")
    assert checks == [1, 2] * 2  # the second (40, 24) call: its plan
    assert [name for name, _ in launches] == ["dkdv", "dq"] * 3
    if causal:
        offsets = {"bottom_right": [-16, -16, 16], "top_left": [0, 0, 0]}[causal]
        assert [o for _, o in launches] == [o for o in offsets for _ in range(2)]


def default_gluon_kernels(head_dim: int) -> list:
    """The Gluon backward kernels a call launches as the environment stands: the dK/dV
    kernel, and the dQ kernel at DQ_HEAD_DIMS unless the dK/dV kernel forms dQ
    (``fused_dq``)."""
    if head_dim in gbwd.DQ_HEAD_DIMS and not gbwd.fused_dq(None, head_dim):
        return ["dkdv", "dq"]
    return ["dkdv"]


def record_gluon_calls(monkeypatch):
    """The launches of the two Gluon kernels, by name (dkdv, dq), in order."""
    calls = []
    for name in ("dkdv", "dq"):
        real = getattr(bwd, f"attention_{name}_gluon")
        monkeypatch.setattr(bwd, f"attention_{name}_gluon",
                            lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    return calls


# The forward's cases (B, Hq, Hkv, L, S, dtype, scale, extras), with these changes
GPU_CASES = {
    **FORWARD_CASES,
    # (a scale of 0.3 puts bf16's rounding of dS in the dQ kernel at the tolerance's edge)
    "rows_longer_scale": (2, 4, 4, 2048, 512, torch.bfloat16, 0.2, {}),
    # rows before the diagonal's first key see nothing: m = +inf, so P = 0 there
    "causal_bottom_right_rows_past_keys": (1, 8, 8, 2048, 512, torch.bfloat16, None,
                                           dict(causal="bottom_right")),
    # the dK/dV kernel takes hd64 at every length (the forward from HD64_MIN_KEYS keys)
    "hd64_short_keys": (1, 8, 2, 2048, 1024, torch.bfloat16, None, dict(head_dim=64)),
    "hd64_short_keys_ragged_bottom_right": (2, 8, 4, 1000, 1300, torch.float16, None,
                                            dict(causal="bottom_right", head_dim=64)),
    # hd256: the dK/dV and dQ kernels' split schedule (64 keys / rows a CTA)
    "hd256": (2, 8, 8, 1024, 1024, torch.bfloat16, None, dict(head_dim=256)),
    "hd256_gqa_ragged_bottom_right": (2, 8, 2, 1000, 1300, torch.float16, None,
                                      dict(causal="bottom_right", head_dim=256)),
    "hd256_rows_past_keys_scale": (1, 8, 4, 1536, 640, torch.bfloat16, 0.05,
                                   dict(causal="bottom_right", head_dim=256)),
    "hd256_top_left_mqa": (1, 8, 1, 700, 900, torch.bfloat16, None,
                           dict(is_causal=True, head_dim=256)),
}

# Bool masks read in tiles at hd256 (laid out as test_gluon_forward.TILE_MASK_CASES)
WIDE_TILE_MASK_CASES = {
    "hd256_per_head_causal": (1, 8, 4, 1024, 1024, torch.bfloat16, "bh", dict(is_causal=True,
                                                                              head_dim=256)),
    "hd256_with_key_padding": (2, 4, 4, 1024, 1024, torch.float16, None, dict(kpm=True,
                                                                               head_dim=256)),
    "hd256_empty_rows_ragged": (2, 4, 2, 1000, 1104, torch.bfloat16, "bh",
                                dict(empty=True, head_dim=256)),
}


@needs_hopper
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gluon_backward_matches_the_reference(case, monkeypatch):
    B, Hq, Hkv, L, S, dtype, scale, extras = GPU_CASES[case]
    extras = dict(extras)
    D = extras.pop("head_dim", 128)
    calls = record_gluon_calls(monkeypatch)
    q = randn(B, L, Hq, D, dtype=dtype).transpose(1, 2).requires_grad_()  # HF's storage
    k, v = (randn(B, Hkv, S, D, dtype=dtype).requires_grad_() for _ in range(2))
    grad = randn(B, Hq, L, D, dtype=dtype)
    out = attention(q, k, v, scale=scale, enable_gqa=True, **extras)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert calls == default_gluon_kernels(D)
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_attention(*refs, scale=scale, **extras)
    ref_grads = torch.autograd.grad(ref, refs, grad.double().cpu())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_to_reference(g, r, dtype, what=f"d{name}")


@needs_hopper
@pytest.mark.parametrize("case", sorted(set(TILE_MASK_CASES) - {"empty_rows_nan"})
                         + sorted(WIDE_TILE_MASK_CASES))
def test_gluon_backward_reads_bool_masks_in_tiles(case, monkeypatch):
    """The forward's bool-mask cases (test_gluon_forward.TILE_MASK_CASES: broadcast, per
    batch with GQA, per head under causal, ragged lengths under bottom-right causal, beside a
    key_padding_mask, rows it hides entirely, hd64) and hd256's: the gradients of the Gluon
    dK/dV and dQ kernels reading the mask in tiles against the float64 reference."""
    B, Hq, Hkv, L, S, D, dtype, kwargs = tile_mask_case(
        case, WIDE_TILE_MASK_CASES if case in WIDE_TILE_MASK_CASES else TILE_MASK_CASES)
    masked_gradients_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, **kwargs)


def masked_gradients_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype,
                                           kernels=None, **kwargs):
    """Gradients of one call that the Gluon dK/dV (and at DQ_HEAD_DIMS dQ) kernels take, Q in
    the (B, L, H, D) storage models transpose from, against the float64 reference;
    ``kernels``: the Gluon kernels it launches, when not those. Seeded inputs: the same draw
    whichever worker and order the test runs in (bf16 elements of dK near a tolerance's edge
    made an unseeded draw fail one run in many: broadcast_causal_scale, session 33)."""
    calls = record_gluon_calls(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    q = randn(B, L, Hq, D, dtype=dtype, generator=generator).transpose(1, 2).requires_grad_()
    k, v = (randn(B, Hkv, S, D, dtype=dtype, generator=generator).requires_grad_()
            for _ in range(2))
    grad = randn(B, Hq, L, D, dtype=dtype, generator=generator)
    grads = torch.autograd.grad(attention(q, k, v, enable_gqa=True, **kwargs), (q, k, v), grad)
    assert calls == (kernels or default_gluon_kernels(D))
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference_attention(*refs, **kwargs)[0], refs,
                                    grad.double().cpu())
    rounded = rounded_gradients(q, k, v, grad, dtype, **kwargs)
    for name, g, r, low in zip("qkv", grads, ref_grads, rounded):
        assert_close_to_reference(g, r, dtype, what=f"d{name}",
                                  abs_tol=rounding_tolerance(low, r, dtype))


# Float biases for the backward alone (laid out as test_gluon_forward.BIAS_CASES): hd64, where
# the forward keeps the Triton kernel, and hd256's finfo.min rows
BACKWARD_BIAS_CASES = {
    "hd64_gqa": (1, 8, 2, 512, 4096, torch.bfloat16, "h", dict(head_dim=64)),
    "hd256_finfo_min": (2, 4, 2, 1000, 1104, torch.bfloat16, "bh",
                        dict(fill="finfo", head_dim=256)),
}


@needs_hopper
@pytest.mark.parametrize("case", sorted(set(BIAS_CASES) - {"all_inf_rows_nan"})
                         + sorted(BACKWARD_BIAS_CASES))
def test_gluon_backward_reads_float_biases_in_tiles(case, monkeypatch):
    """The forward's float-bias cases (test_gluon_forward's
    BIAS_CASES: ALiBi, random per batch / head / broadcast, causal either corner, GQA, ragged
    lengths, finfo.min and -inf rows, a key_padding_mask beside it, hd256) and hd64: the
    gradients of the Gluon dK/dV and dQ kernels reading the bias in tiles (natural-log
    scores, the prep kernel's NATURAL statistics) against the float64 reference."""
    monkeypatch.delenv("SDPA_PASS_GLUON_BWD_BIAS", raising=False)
    B, Hq, Hkv, L, S, D, dtype, kwargs = bias_case(
        case, BACKWARD_BIAS_CASES if case in BACKWARD_BIAS_CASES else BIAS_CASES)
    masked_gradients_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, **kwargs)


@needs_hopper
@pytest.mark.parametrize("order", gbwd.ORDERS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_program_order_gives_the_reference_gradients(order, head_dim, monkeypatch):
    """SDPA_PASS_GLUON_BWD_ORDER: the dK/dV kernel's programs in each order (``groups`` with
    B * Hkv = 9 heads, so the last group holds one) and ragged keys under bottom-right causal,
    against the float64 reference (at hd64 and hd128 the kernel forms dQ too)."""
    monkeypatch.setenv("SDPA_PASS_GLUON_BWD_ORDER", order)
    calls = record_gluon_calls(monkeypatch)
    dtype = torch.bfloat16
    # twice the query heads at hd64: a call with hd128's work (smaller ones are host-bound)
    q = randn(3, 12 if head_dim == 64 else 6, 700, head_dim, dtype=dtype).requires_grad_()
    k, v = (randn(3, 3, 900, head_dim, dtype=dtype).requires_grad_() for _ in range(2))
    grad = randn(*q.shape, dtype=dtype)
    kwargs = dict(causal="bottom_right", enable_gqa=True)
    grads = torch.autograd.grad(attention(q, k, v, **kwargs), (q, k, v), grad)
    assert calls[0] == "dkdv"
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference_attention(*refs, causal="bottom_right")[0], refs,
                                    grad.double().cpu())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_to_reference(g, r, dtype, what=f"d{name}")


@needs_hopper
def test_refused_backwards_take_the_triton_kernel(monkeypatch):
    """K's rows 264 bytes apart (no descriptor for it) and a bool mask whose rows are not
    16-byte aligned: the Triton dK/dV kernel, same answers."""
    calls = record_gluon_calls(monkeypatch)
    dtype = torch.bfloat16
    q, v = (randn(1, 8, 1024, 128, dtype=dtype).requires_grad_() for _ in range(2))
    k_storage = randn(1, 8, 1024, 132, dtype=dtype).requires_grad_()
    k = k_storage[..., :128]
    mask = (torch.rand(1024, 1032, device=DEVICE) > 0.2)[:, :1024]  # rows 1032 bytes apart
    grad = randn(1, 8, 1024, 128, dtype=dtype)
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    for kwargs in (dict(), dict(attn_mask=mask)):
        grads = torch.autograd.grad(attention(q, k, v, **kwargs), (q, k, v), grad)
        ref_grads = torch.autograd.grad(reference_attention(*refs, **kwargs)[0], refs,
                                        grad.double().cpu())
        for name, g, r in zip("qkv", grads, ref_grads):
            assert_close_to_reference(g, r, dtype, what=f"d{name}")
    assert calls == []


@needs_hopper
def test_a_later_backward_launches_the_remembered_kernel():
    dtype = torch.bfloat16

    def step():
        q, k, v = (randn(1, 8, 1024, 128, dtype=dtype).requires_grad_() for _ in range(3))
        grad = randn(1, 8, 1024, 128, dtype=dtype)
        return (q, k, v), grad, torch.autograd.grad(attention(q, k, v, is_causal=True),
                                                    (q, k, v), grad)

    step()
    hits = gbwd._GLUON_BWD_CALLS.hits
    inputs, grad, grads = step()
    assert gbwd._GLUON_BWD_CALLS.hits == hits + len(default_gluon_kernels(128))
    refs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref_grads = torch.autograd.grad(reference_attention(*refs, is_causal=True)[0], refs,
                                    grad.double().cpu())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_to_reference(g, r, dtype, what=f"d{name}")


@needs_hopper
@pytest.mark.parametrize("case", sorted(set(WINDOW_CASES) - {"rows_past_the_keys_nan"}))
def test_gluon_backward_with_a_sliding_window(case, monkeypatch):
    """The forward's window cases (test_gluon_forward's
    WINDOW_CASES: windows of 1 to 1024 keys, either causal corner, a diagonal, ragged
    lengths, rows past every key's window, GQA, hd64 / 256, a bool mask beside it): the
    gradients of the Gluon dK/dV kernel (query tiles past its keys' last window skipped,
    the band's edge tiles masked) and dQ kernel against the float64 reference."""
    monkeypatch.delenv("SDPA_PASS_GLUON_WINDOW", raising=False)  # the default
    B, Hq, Hkv, L, S, D, dtype, kwargs = window_case(case)
    masked_gradients_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, **kwargs)


@needs_hopper
@pytest.mark.parametrize("head_dim, fused", [(128, "1"), (128, "0"), (256, "0"), (64, "1")],
                         ids=["hd128_fused_dq", "hd128_dq_kernel", "hd256", "hd64_fused_dq"])
@pytest.mark.parametrize("L, causal", [(1000, None), (1300, "top_left")])
def test_rows_far_below_zero_keep_finite_gradients_at_ragged_keys(L, causal, head_dim, fused,
                                                                   monkeypatch):
    """Every score of every row near -113 (natural units: Q against every K; a row's LSE
    under -88.7, so exp(-LSE) overflows fp32), keys not a whole number of tiles: the dQ kernel
    hides keys past S (K's zero rows give a score of 0, P = exp2(-m - r) = inf, NaN in dQ)
    without a mask as it does with a bias (top-left causal with L > S: the rows past S see
    the last tile's keys past S too), and so does the dK/dV kernel where it forms dQ
    (SDPA_PASS_GLUON_FUSED_DQ, RAGGED_KEYS).

    The scores' mean comes from Q's constant part against K's; K's noise is orthogonal to
    that (zero mean over the head dim), so the scores spread by ~1 and P is not concentrated,
    and K's and V's unit noise keeps the exact gradients from cancelling. (An earlier form
    with K and V near constants made every bf16 backward, SDPA's flash, cuDNN and efficient
    ones included, miss dQ by 4x its norm on the H200; one with K's noise along Q made P
    peak on a few keys, whose dV sums of many rows cancel past bf16's rounding.)"""
    # heads 8 at hd128: the same work at each head dim (a smaller call is host-bound, where
    # the Triton kernels run: forward.host_bound)
    B, H, S = 1, 8 * 128 // head_dim, 1104
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(B, H, S, head_dim, generator=gen)
    k = (1.0 + noise - noise.mean(-1, keepdim=True)).to(DEVICE, torch.bfloat16)
    v = torch.randn(B, H, S, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    q = (-10.0 * (128 / head_dim) ** 0.5 + torch.randn(B, H, L, head_dim, generator=gen)
         ).to(DEVICE, torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad = randn(B, H, L, head_dim, dtype=torch.bfloat16)
    monkeypatch.setenv("SDPA_PASS_GLUON_FUSED_DQ", fused)
    calls = record_gluon_calls(monkeypatch)
    extras = dict(causal=causal) if causal else {}
    grads = torch.autograd.grad(attention(q, k, v, **extras), (q, k, v), grad)
    assert calls == (["dkdv"] if fused == "1" else ["dkdv", "dq"])
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_attention(*refs, **extras)
    assert (torch.logsumexp((refs[0] @ refs[1].transpose(-2, -1)) * head_dim ** -0.5, -1)
            < -89).all()  # every row's P at a key past S would overflow
    ref_grads = torch.autograd.grad(ref, refs, grad.double().cpu())
    # dK = scale * dS^T Q sums rows of Q, ~10 an element here, not 1: its rounding is ten
    # times the unit-sized inputs' that ABS_TOL describes, so dK is compared in Q's units
    sizes = (1.0, float(refs[0].detach().abs().max()), 1.0)
    for name, g, r, size in zip("qkv", grads, ref_grads, sizes):
        assert_close_to_reference(g / size, r / size, torch.bfloat16, what=f"d{name}")


# Soft-capped scores for the backward alone: a negative scale (the Gluon forward takes only
# positive ones; the backward's cap_scale is then negative, and still a cap)
BACKWARD_SOFTCAP_CASES = {
    "negative_scale": (1, 8, 4, 1000, 1104, torch.bfloat16, -0.3,
                       dict(is_causal=True, softcap=5.0)),
}


@needs_hopper
@pytest.mark.parametrize("case", sorted(set(SOFTCAP_CASES) - {"with_bias"})
                         + sorted(BACKWARD_SOFTCAP_CASES))
def test_gluon_backward_with_soft_capped_scores(case, monkeypatch):
    """SDPA_PASS_GLUON_SOFTCAP=1: the forward's soft-capping cases (test_gluon_forward's
    SOFTCAP_CASES; beside a float bias the Triton kernels keep the backward) and a negative
    scale: the gradients of the Gluon dK/dV and dQ kernels (tanh recomputed, dS times 1 - t²)
    against the float64 reference."""
    monkeypatch.setenv("SDPA_PASS_GLUON_SOFTCAP", "1")
    B, Hq, Hkv, L, S, D, dtype, kwargs = window_case(
        case, {**SOFTCAP_CASES, **BACKWARD_SOFTCAP_CASES})
    masked_gradients_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype, **kwargs)


@needs_hopper
@pytest.mark.parametrize("L, head_dim", [(1024, 128), (1536, 256)])
def test_soft_capped_defaults_pair_the_forward_each_shape_takes_with_the_gluon_backward(
        L, head_dim, monkeypatch):
    """SDPA_PASS_GLUON_SOFTCAP unset: at hd128 under SOFTCAP_MIN_KEYS keys the Triton forward
    (its LSE) before the Gluon dK/dV and dQ kernels, at hd256 the Gluon forward before them;
    gradients against float64."""
    monkeypatch.delenv("SDPA_PASS_GLUON_SOFTCAP", raising=False)
    forwards, real = [], fwd.attention_forward_gluon
    monkeypatch.setattr(fwd, "attention_forward_gluon",
                        lambda *a, **k: forwards.append("gluon") or real(*a, **k))
    masked_gradients_against_the_reference(monkeypatch, 2, 8, 4, L, L, head_dim,
                                           torch.bfloat16, is_causal=True, softcap=30.0)
    gluon_forward = head_dim == 256 or L >= gfwd.SOFTCAP_MIN_KEYS[128]
    assert forwards == (["gluon"] if gluon_forward else [])


def test_a_negative_scale_keeps_the_backward_kernels_capped(monkeypatch):
    """(Any device.) The launches' SOFTCAP follows whether there is a cap, not cap_scale's
    sign: a negative scale gives a negative cap_scale (as tanh(s · scale / cap) needs) and
    the scores are still capped. The launchers run up to the launch, which is recorded
    instead."""
    forms = []
    monkeypatch.setattr(gbwd, "launch_fixed", lambda calls, key, kernel, grid, args, params,
                        **kw: forms.append(params["SOFTCAP"]))
    B, H, L, D = 1, 2, 64, 128
    q, k, v, do, dq, dk, dv = (torch.zeros(B, H, L, D, dtype=torch.bfloat16) for _ in range(7))
    shape = AttentionShape(B, H, H, L, L, D, D)
    stats = torch.zeros(3, B, H, L)
    for scale in (-0.3, 0.3):
        qk_scale, cap_scale = gfwd.gluon_score_scales(scale, 5.0, False)
        assert (cap_scale < 0) == (scale < 0)
        common = dict(scale=scale, qk_scale=qk_scale, causal_align=CAUSAL_NONE, offset=0,
                      rows=L, plan_key=None, cap_scale=cap_scale)
        gbwd.attention_dkdv_gluon(q, k, v, do, stats, dk, dv, shape, **common)
        gbwd.attention_dq_gluon(q, k, v, do, stats, dq, shape, **common)
        assert forms[-2:] == [True, True], (scale, forms)
    gbwd.attention_dq_gluon(q, k, v, do, stats, dq, shape, **dict(common, cap_scale=0.0))
    assert forms[-1] is False


@needs_gluon
@pytest.mark.parametrize("kernel, head_dim", [("dkdv", 64), ("dkdv", 128), ("dkdv", 256),
                                              ("dq", 128), ("dq", 256)])
def test_soft_capped_kernels_compile_for_sm90(kernel, head_dim):
    """SOFTCAP: each kernel's causal schedule as compiled for sm_90, the same wgmmas and order
    of waits, twice the exponentials (tanh's beside P's), not serialized, and no more stack
    than the causal kernel's (triton 3.9, hd128 dK/dV: 8 bytes against 136)."""
    causal = compile_report("bf16", True, head_dim, kernel)
    capped = compile_report("bf16", True, head_dim, kernel, softcap=True)
    assert capped["HGMMA"] == causal["HGMMA"], (capped, causal)
    assert capped["MUFU.EX2"] == 2 * causal["MUFU.EX2"], (capped, causal)
    assert not capped["wgmma serialized (ptxas C7514)"]
    assert capped["stack_bytes"] <= causal["stack_bytes"] + 16, (capped, causal)
    # (the partitions' one more argument: 16 bytes of dQ's)
    assert capped["shared_bytes"] <= causal["shared_bytes"] + 64, (capped, causal)


@needs_gluon
@pytest.mark.parametrize("head_dim, tile", [(128, False), (128, "bias"), (256, False)])
def test_the_ragged_dq_kernel_compiles_for_sm90(head_dim, tile):
    """RAGGED_KEYS (the dQ kernel hides the last tile's keys past S): the same wgmmas and
    exponentials, not serialized, no stack."""
    whole = compile_report("bf16", False, head_dim, "dq", mask_tile=tile)
    ragged = compile_report("bf16", False, head_dim, "dq", mask_tile=tile, ragged=True)
    for key in ("HGMMA", "MUFU.EX2", "stack_bytes"):
        assert ragged[key] == whole[key], (key, ragged, whole)
    assert not ragged["wgmma serialized (ptxas C7514)"]


def test_the_window_schedule_of_the_dkdv_kernel():
    """(Any device.) The windowed dK/dV kernel's query tiles, replayed in Python as
    ``_attention_bwd_dkdv_ws`` and ``_pt_tile`` compute them (hd128's 128-key CTAs of two
    64-key warpgroups, hd256's 64-key CTAs; 64-row query tiles): every (row, key) pair a key
    of the CTA is seen by lies in a visited query tile, and every visited tile holding a pair
    outside the band (past the diagonal, before the window, rows past L) is masked. (The dQ
    kernel's key tiles are the forward's: test_gluon_forward.)"""
    BM = gbwd.BLOCK_M
    for (BN, NK), L, S, offset, window in [
            ((128, 64), 1000, 1000, 0, 17), ((128, 64), 2048, 2048, 0, 1024),
            ((128, 64), 512, 512, 0, 1), ((128, 64), 700, 1300, 600, 300),
            ((128, 64), 1024, 1024, 5, 129), ((128, 64), 1500, 600, 0, 200),
            ((64, 64), 1024, 1024, 0, 200), ((64, 64), 300, 900, 600, 64),
            ((128, 64), 256, 256, 0, 5000)]:
        for start_n in range(0, S, BN):
            first_m = max(start_n - offset, 0) // BM
            seen_rows = max(start_n + BN - 1 - offset + window, 0)
            end_m = min(-(-L // BM), (seen_rows + BM - 1) // BM)
            visited = range(first_m, first_m + max(end_m - first_m, 0))
            for key0 in range(start_n, start_n + BN, NK):
                for key in range(key0, min(key0 + NK, S)):
                    for i in range(max(key - offset, 0), min(key - offset + window, L)):
                        assert i // BM in visited, (BN, L, S, offset, window, key, i)
                for tile in visited:
                    m0 = tile * BM
                    masked = (m0 + offset < key0 + NK - 1
                              or m0 + BM - 1 + offset - window >= key0)
                    hidden = any(not (0 <= i + offset - key < window)
                                 for i in range(m0, m0 + BM) for key in range(key0, key0 + NK))
                    assert masked or not hidden, (BN, L, S, offset, window, key0, m0)


@needs_gluon
def test_the_probes_fused_dq_is_added_by_the_copy_engine():
    """``benchmarks/gluon_bwd_probe.py``'s ``tma_dq_causal`` (session 30: FA3's dQ inside the
    dK/dV kernel, each consumer warpgroup's (64 x 64) fp32 dQ half reduce-added from shared
    memory) compiled for sm_90: the adds are the copy engine's, two 128-byte-wide boxes a
    warpgroup (triton 3.6 encodes a wider fp32 box as such boxes but would issue one reduce
    for it, adding half the columns), no atomic instruction, its products unserialized and
    the whole within Hopper's shared memory."""
    report = probe_compile("--json", "--variants", "tma_dq_causal")
    assert report["variant"] == "tma_dq_causal"
    assert report["TMA reduce-adds"] == 4, report
    assert report["RED/ATOM"] == 0, report
    assert report["HGMMA"] > 0 and not report["wgmma serialized (ptxas C7514)"], report
    assert report["shared_bytes"] <= 227 * 1024, report


def test_fused_dq_is_asked_for_at_head_dims_64_and_128_and_not_when_deterministic(monkeypatch):
    """``fused_dq``: by default where the Gluon dK/dV kernel runs at head dims 64 and 128,
    causal or not, any length; never with SDPA_PASS_GLUON_FUSED_DQ=0, at hd256, where the
    Gluon kernel is refused, or under torch.use_deterministic_algorithms (the reduce-adds'
    order varies between runs)."""
    monkeypatch.delenv("SDPA_PASS_GLUON_FUSED_DQ", raising=False)
    assert gbwd.fused_dq(None, 128) and gbwd.fused_dq(None, 64)
    assert not gbwd.fused_dq(None, 256) and not gbwd.fused_dq("not on Hopper", 128)
    monkeypatch.setenv("SDPA_PASS_GLUON_FUSED_DQ", "0")
    assert not gbwd.fused_dq(None, 128) and not gbwd.fused_dq(None, 64)
    monkeypatch.setenv("SDPA_PASS_GLUON_FUSED_DQ", "1")
    assert gbwd.fused_dq(None, 128) and gbwd.fused_dq(None, 64)
    assert not gbwd.fused_dq(None, 256) and not gbwd.fused_dq("not on Hopper", 64)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not gbwd.fused_dq(None, 128) and not gbwd.fused_dq(None, 64)


def test_dkdv_program_order_tiles_without_a_causal_mask_groups_with_one(monkeypatch):
    """``dkdv_order``: a head's key tiles side by side without a causal mask, groups of heads
    with one; SDPA_PASS_GLUON_BWD_ORDER overrides, and an unknown name leaves the rule; tiles
    whatever is asked where the key tiles are more than a grid dim other than the first holds
    (65535)."""
    monkeypatch.delenv("SDPA_PASS_GLUON_BWD_ORDER", raising=False)
    assert (gbwd.dkdv_order(False, 32), gbwd.dkdv_order(True, 32)) == ("tiles", "groups")
    assert gbwd.dkdv_order(True, 65535) == "groups" and gbwd.dkdv_order(True, 65536) == "tiles"
    for order in gbwd.ORDERS:
        monkeypatch.setenv("SDPA_PASS_GLUON_BWD_ORDER", order)
        assert gbwd.dkdv_order(True, 32) == gbwd.dkdv_order(False, 32) == order
        assert gbwd.dkdv_order(True, 65536) == "tiles"
    monkeypatch.setenv("SDPA_PASS_GLUON_BWD_ORDER", "diagonal")
    assert (gbwd.dkdv_order(False, 32), gbwd.dkdv_order(True, 32)) == ("tiles", "groups")


def torch_dkdv_fused(q, k, v, grad_out, stats, dk, dv, shape, *, dq_acc, **kwargs):
    """``torch_dkdv`` plus what FUSED_DQ adds: dQ's unscaled sums dS K into ``dq_acc``."""
    torch_dkdv(q, k, v, grad_out, stats, dk, dv, shape, **kwargs)
    _, ds, kk = _torch_products(q, k, v, grad_out, stats, shape, kwargs["qk_scale"],
                                kwargs["causal_align"], kwargs["offset"], kwargs["rows"],
                                _bias(kwargs.get("mask"), kwargs.get("mask_tile", 0)),
                                kwargs.get("window", -1), kwargs.get("cap_scale", 0.0))
    dq_acc.add_(ds @ kk)


@pytest.mark.parametrize("causal, L, S", [(None, 40, 24), ("bottom_right", 24, 40)])
def test_the_backward_takes_dq_from_the_dkdv_kernel_when_fused(causal, L, S, monkeypatch):
    """(Any device: the refusals and the kernel replaced by ``torch_dkdv_fused``.) With
    ``fused_dq`` the backward hands the dK/dV kernel a zeroed fp32 (B, Hq, L, D) buffer,
    launches no dQ kernel, and scales the sums into dQ: the gradients match the float64
    reference, GQA and both causal corners included; the plan remembers the choice."""
    clear_plans()
    monkeypatch.setattr(bwd, "gluon_backward_refusal", lambda *a, **k: None)
    monkeypatch.setattr(bwd, "gluon_dq_refusal", lambda *a, **k: None)
    monkeypatch.setattr(bwd, "fused_dq", lambda *a: True)
    handed = []

    def dkdv(*args, dq_acc, **kwargs):
        handed.append((dq_acc.dtype, tuple(dq_acc.shape), bool((dq_acc == 0).all())))
        torch_dkdv_fused(*args, dq_acc=dq_acc, **kwargs)

    monkeypatch.setattr(bwd, "attention_dkdv_gluon", dkdv)
    monkeypatch.setattr(bwd, "attention_dq_gluon",
                        lambda *a, **k: pytest.fail("no dQ kernel beside the fused dQ"))
    for _ in range(2):
        q = randn(1, 4, L, 16).requires_grad_()
        k, v = (randn(1, 2, S, 16).requires_grad_() for _ in range(2))
        grad = randn(1, 4, L, 16)
        extras = dict(causal=causal) if causal else {}
        grads = torch.autograd.grad(attention(q, k, v, enable_gqa=True, **extras), (q, k, v),
                                    grad)
        refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
        ref_grads = torch.autograd.grad(reference_attention(*refs, **extras)[0], refs,
                                        grad.double().cpu())
        for name, g, r in zip("qkv", grads, ref_grads):
            assert_close_to_reference(g, r, torch.float32, what=f"d{name}")
    assert handed == [(torch.float32, (1, 4, L, 16), True)] * 2


@needs_gluon
def test_the_fused_dq_sums_descriptor_tiles_the_rows_of_every_head():
    """(Host side only, any device.) The reduce-adds' target: the fp32 sums viewed as
    (B * Hq * L, D) rows, in boxes of BLOCK_M rows x FUSED_DQ_COLS columns (128 bytes, the
    widest box triton 3.6 reduces whole). The GPU run of session 31 found this maker raising
    (a list handed to the cached layout) where the torch stand-in above cannot see it."""
    sums = torch.zeros(2 * 4 * 40, 128)
    desc = gbwd._dq_sum_descriptor(sums)
    assert list(desc.shape) == [320, 128] and list(desc.strides) == [128, 1]
    assert list(desc.block_shape) == [gbwd.BLOCK_M, gbwd.FUSED_DQ_COLS]
    assert gbwd.FUSED_DQ_COLS * sums.element_size() == 128
    assert desc.layout.swizzle_byte_width == 128 and desc.layout.element_bitwidth == 32


@needs_gluon
@pytest.mark.parametrize("causal, tile, head_dim", [(True, False, 128), (False, "mask", 128),
                                                    (False, "bias", 128), (True, False, 64)])
def test_fused_dq_kernel_compiles_for_sm90_within_shared_memory(causal, tile, head_dim):
    """The dK/dV kernel with FUSED_DQ compiled for sm_90: dQ added by four copy-engine
    reduce-adds (two 32-column boxes a consumer: hd128 its 64 of dQ's columns, hd64 all of
    them over its own keys), no atomic instruction, five products a tile pair (hd128: two
    dQ products of 128 keys x 64 columns a consumer, 16 more wgmmas than without; hd64: one
    of 64 keys x 64 columns, 8 more), no spill at hd64, and, with a float bias's tiles beside
    the dSᵀ slots and the dQ stages, still within Hopper's 227 KB of shared memory."""
    fused, plain = (compile_report("bf16", causal, head_dim, mask_tile=tile, fused_dq=on)
                    for on in (True, False))
    assert fused["TMA reduce-adds"] == 4 and plain["TMA reduce-adds"] == 0, (fused, plain)
    assert fused["RED/ATOM"] == 0, fused
    assert fused["HGMMA"] == plain["HGMMA"] + head_dim // 8, (fused, plain)
    if head_dim == 64:
        assert fused["spill_store_bytes"] == plain["spill_store_bytes"] == 0, (fused, plain)
    assert fused["shared_bytes"] <= 227 * 1024, fused
    assert not fused["wgmma serialized (ptxas C7514)"], fused


# Each dQ path at hd128, forced (SDPA_PASS_GLUON_FUSED_DQ=0 / =1; by default the tests above
# take the one ``fused_dq`` picks for their length and causality): GPU_CASES' hd128 cases,
# and one or two of each of the bool mask, float bias, window and soft-capping cases
DQ_PATH_CASES = {
    **{name: ("plain", name) for name, case in GPU_CASES.items() if "head_dim" not in case[-1]},
    **{f"bool_{name}": ("bool", name) for name in ("per_head_causal", "with_key_padding")},
    **{f"bias_{name}": ("bias", name) for name in ("alibi_per_head", "ragged_finfo_min")},
    **{f"window_{name}": ("window", name) for name in ("small_ragged_gqa", "bottom_right_ragged")},
    "softcap_causal_gqa": ("softcap", "causal_gqa_fp16_keys_longer"),
}
# hd64's two dQ paths: every hd64 case of each kind
HD64_DQ_PATH_CASES = {
    **{name: ("plain", name) for name, case in GPU_CASES.items()
       if case[-1].get("head_dim") == 64},
    "bool_hd64": ("bool", "hd64"), "bias_hd64_gqa": ("bias", "hd64_gqa"),
    "window_hd64": ("window", "hd64"), "softcap_hd64": ("softcap", "hd64"),
}


def dq_path_case(kind: str, name: str) -> tuple:
    """(B, Hq, Hkv, L, S, D, dtype, attention kwargs) of a case of DQ_PATH_CASES' kinds."""
    if kind == "plain":
        B, Hq, Hkv, L, S, dtype, scale, kwargs = GPU_CASES[name]
        kwargs = dict(kwargs, scale=scale)
        return B, Hq, Hkv, L, S, kwargs.pop("head_dim", 128), dtype, kwargs
    if kind == "bool":
        return tile_mask_case(name, TILE_MASK_CASES)
    if kind == "bias":
        return bias_case(name, {**BIAS_CASES, **BACKWARD_BIAS_CASES})
    return window_case(name, SOFTCAP_CASES if kind == "softcap" else WINDOW_CASES)


@needs_hopper
@pytest.mark.parametrize("fused", ["0", "1"], ids=["dq_kernel", "fused_dq"])
@pytest.mark.parametrize("case", sorted(DQ_PATH_CASES))
def test_each_dq_path_at_head_dim_128_matches_the_reference(case, fused, monkeypatch):
    """At hd128, SDPA_PASS_GLUON_FUSED_DQ=0: the Gluon dK/dV kernel, then the dQ kernel
    (recomputing S and dP); =1: the dK/dV kernel forming dQ too. Gradients against the
    float64 reference."""
    monkeypatch.setenv("SDPA_PASS_GLUON_FUSED_DQ", fused)
    monkeypatch.setenv("SDPA_PASS_GLUON_SOFTCAP", "1")  # (the soft-capped case's forward)
    B, Hq, Hkv, L, S, D, dtype, kwargs = dq_path_case(*DQ_PATH_CASES[case])
    assert D == 128, case
    masked_gradients_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype,
                                           kernels=["dkdv"] if fused == "1" else ["dkdv", "dq"],
                                           **kwargs)


@needs_hopper
@pytest.mark.parametrize("fused", ["0", "1"], ids=["dq_kernel", "fused_dq"])
@pytest.mark.parametrize("case", sorted(HD64_DQ_PATH_CASES))
def test_each_dq_path_at_head_dim_64_matches_the_reference(case, fused, monkeypatch):
    """At hd64, SDPA_PASS_GLUON_FUSED_DQ=0: the Gluon dK/dV kernel, then the Triton dQ
    kernel; =1 (the default): the dK/dV kernel forming dQ too (KEY_SPLIT: each consumer
    warpgroup forms all of dQ's columns over its own 64 keys), and no Triton kernel.
    Gradients against the float64 reference."""
    monkeypatch.setenv("SDPA_PASS_GLUON_FUSED_DQ", fused)
    monkeypatch.setenv("SDPA_PASS_GLUON_SOFTCAP", "1")
    if fused == "1":
        monkeypatch.setattr(bwd, "_launch",
                            lambda *a, **k: pytest.fail("a Triton kernel launched"))
    B, Hq, Hkv, L, S, D, dtype, kwargs = dq_path_case(*HD64_DQ_PATH_CASES[case])
    assert D == 64, case
    masked_gradients_against_the_reference(monkeypatch, B, Hq, Hkv, L, S, D, dtype,
                                           kernels=["dkdv"], **kwargs)
