"""Dropout inside the attention kernels.

The kernels draw each probability's keep decision from Philox (``kernels/dropout.py``), seeded
by a (2,) key that ``attention`` draws from torch's generator. The tests rebuild that key the
same way (``torch.manual_seed`` then ``draw_seed``), build the whole mask with the PyTorch twin
of the generator, and check forward and gradients against the float64 reference applying that
mask; that the mask the kernel used is exactly that one; that its rate and the output's mean
match ``F.dropout``'s within statistical tolerance; and reproducibility. Gradient tests run both
backward routes (Triton kernels and the chunked PyTorch code), as tests/test_backward.py does.
The last tests take an ``nn.Dropout`` through the pass under ``dynamic=True``, where its p is a
number the graph reads at run time.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import sdpa_pass.kernels.cpu as cpu_path
import sdpa_pass.kernels.ops as ops
from sdpa_pass.kernels import attention
from sdpa_pass.kernels.checks import AttentionShape
from sdpa_pass.kernels.dropout import draw_seed, dropout_mask
from reference import DEVICE, assert_close_to_reference, randn, reference_attention
from test_backward import (
    _chunked_instead_of_triton, assert_grads_close, leaves, op_grads, reference_grads,
)
from test_kernel_forward import B, CAUSAL_KINDS, make_qkv

L, S, D = 13, 24, 16
FORWARD = torch.ops.sdpa_pass.attention_forward.default

CONFIGS = {
    "mha": dict(heads=(4, 4), mask=None, extras={}),
    "gqa_bottom_right_padding": dict(heads=(4, 2), mask="padding", extras=CAUSAL_KINDS["bottom_right"]),
    "mqa_bias_window_softcap": dict(heads=(4, 1), mask="bias",
                                    extras=dict(softcap=5.0, **CAUSAL_KINDS["window7_bottom_right"])),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["triton_backward", "triton_atomic_dq_backward", "chunked_backward"])
def backward_route(request, monkeypatch):
    """Gradient tests run through both backward implementations (the Triton one with either
    dQ path); the chunked one with chunks of a few rows, so the dropout draws of several
    chunks are stitched together."""
    if request.param == "triton_atomic_dq_backward":
        monkeypatch.setenv("SDPA_PASS_BWD_DQ", "atomic")
    if request.param == "chunked_backward":
        monkeypatch.setattr(ops, "attention_backward_triton", _chunked_instead_of_triton)
        monkeypatch.setattr(cpu_path, "_CHUNK_ELEMENTS", 30 * 4 * B * 4 * S)
    return request.param


def _inputs(dtype, config, requires_grad=False):
    hq, hkv = config["heads"]
    q, k, v = make_qkv(dtype, hq, hkv, L=L, S=S, D=D)
    extras = dict(config["extras"])
    mask = None
    if config["mask"] == "padding":
        kpm = torch.rand(B, S) > 0.3
        kpm[:, -1] = True
        extras["key_padding_mask"] = kpm.to(DEVICE)
    elif config["mask"] == "bias":
        mask = randn(B, 1, L, S, dtype=dtype)
    if requires_grad:
        q, k, v = leaves(q, k, v)
        if mask is not None:
            mask.requires_grad_()
    return q, k, v, mask, extras


def _seeded_mask(seed, hq, p, L=L, S=S):
    """The mask ``attention`` will use after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return dropout_mask(draw_seed(DEVICE), B, hq, L, S, p)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_matches_reference_with_kernel_mask(dtype, config):
    q, k, v, mask, extras = _inputs(dtype, CONFIGS[config])
    p = 0.3
    keep = _seeded_mask(7, q.shape[1], p)
    torch.manual_seed(7)
    out, lse = attention(q, k, v, mask, dropout_p=p, enable_gqa=True, return_lse=True, **extras)
    ref, ref_lse = reference_attention(q, k, v, mask, dropout_p=p, keep=keep, **extras)
    assert_close_to_reference(out, ref, dtype)
    # the LSE is that of the probabilities before dropout
    assert_close_to_reference(lse, ref_lse, torch.float32, what="lse")


@pytest.mark.parametrize("config", CONFIGS)
def test_grads_match_reference_with_kernel_mask(config, backward_route):
    q, k, v, mask, extras = _inputs(torch.float32, CONFIGS[config], requires_grad=True)
    p = 0.5
    keep = _seeded_mask(11, q.shape[1], p)
    dout = randn(B, q.shape[1], L, D)
    torch.manual_seed(11)
    grads = op_grads(q, k, v, mask, dout, dropout_p=p, enable_gqa=True, **extras)
    ref = reference_grads(q, k, v, mask, dout, dropout_p=p, keep=keep, **extras)
    assert_grads_close(grads, ref, torch.float32)


def test_fp16_grads_with_dropout(backward_route):
    q, k, v, mask, extras = _inputs(torch.float16, CONFIGS["gqa_bottom_right_padding"], requires_grad=True)
    keep = _seeded_mask(3, 4, 0.2)
    dout = randn(B, 4, L, D, dtype=torch.float16)
    torch.manual_seed(3)
    grads = op_grads(q, k, v, mask, dout, dropout_p=0.2, enable_gqa=True, **extras)
    ref = reference_grads(q, k, v, mask, dout, dropout_p=0.2, keep=keep, **extras)
    assert_grads_close(grads, ref, torch.float16)


def test_cpu_path_matches_reference_with_kernel_mask(monkeypatch):
    """The path of CPU tensors without TRITON_INTERPRET (the chunked PyTorch forward), in
    chunks of 3 query rows."""
    monkeypatch.setattr(cpu_path, "_CHUNK_ELEMENTS", 25 * 3 * B * 4 * S)
    q, k, v = make_qkv(torch.float32, 4, 2, L=L, S=S, D=D)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    seed = draw_seed("cpu")
    keep = dropout_mask(seed, B, 4, L, S, 0.25)
    out, _ = cpu_path.attention_forward_cpu(
        q, k, v, None, None, AttentionShape(B, 4, 2, L, S, D, D), scale=D**-0.5, causal_align=1,
        diagonal=0, window=-1, softcap=0.0, nan_on_empty=False, return_lse=False,
        dropout_p=0.25, dropout_seed=seed,
    )
    ref, _ = reference_attention(q, k, v, is_causal=True, dropout_p=0.25, keep=keep)
    assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_mask_rate_and_mean_match_f_dropout(p):
    """With q = 0 every probability of a row is 1/S, and V = I makes out[i, j] the kept-and-
    scaled probability of key j: the output is the kernel's own mask. It must equal the mask
    the PyTorch twin generates, keep a fraction 1 - p like F.dropout (5 sigma), and give the
    same mean output as F.dropout applied to the same probabilities."""
    n = 64
    hq = 4
    q = torch.zeros(B, hq, n, n, device=DEVICE)
    v = torch.eye(n, device=DEVICE).expand(B, 1, n, n)
    keep = _seeded_mask(5, hq, p, L=n, S=n)
    torch.manual_seed(5)
    out = attention(q, v, v, dropout_p=p, enable_gqa=True).cpu()
    kept = out * n * (1 - p)
    torch.testing.assert_close(kept, keep.float(), atol=1e-5, rtol=0)

    count = keep.numel()
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    probs = torch.full((B, hq, n, n), 1.0 / n)
    eager_kept = F.dropout(probs, p=p, training=True) != 0
    assert abs(keep.float().mean().item() - eager_kept.float().mean().item()) < 5 * math.sqrt(2) * sigma
    # E[out] = P @ V = 1/n everywhere for both; their means differ only by sampling noise
    eager_out = F.dropout(probs, p=p, training=True) @ torch.eye(n)
    out_sigma = math.sqrt(p / (1 - p) / count) / n
    assert abs(out.mean().item() - 1.0 / n) < 5 * out_sigma
    assert abs(out.mean().item() - eager_out.mean().item()) < 5 * math.sqrt(2) * out_sigma


def test_same_seed_same_outputs_and_grads(backward_route):
    q, k, v, mask, extras = _inputs(torch.float32, CONFIGS["mqa_bias_window_softcap"], requires_grad=True)
    dout = randn(B, 4, L, D)
    runs = []
    for seed in (21, 21, 22):
        torch.manual_seed(seed)
        out = attention(q, k, v, mask, dropout_p=0.4, enable_gqa=True, **extras)
        runs.append([out] + list(torch.autograd.grad(out, (q, k, v, mask), dout)))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])


def test_p_one_drops_everything(backward_route):
    q, k, v = leaves(*make_qkv(torch.float32, 4, 2, L=L, S=S, D=D))
    out = attention(q, k, v, dropout_p=1.0, enable_gqa=True)
    assert torch.equal(out, torch.zeros_like(out))
    expected = F.dropout(torch.ones(3), p=1.0)
    assert torch.equal(expected, torch.zeros(3))
    for g in torch.autograd.grad(out, (q, k, v), torch.ones_like(out)):
        assert torch.equal(g, torch.zeros_like(g))


def test_dropout_errors():
    q, k, v = make_qkv(torch.float32, 4, 4, L=L, S=S, D=D)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="needs dropout_seed"):
        FORWARD(q, k, v, None, None, 0.25, 0, 0, -1, 0.0, False, False, 0.1, None)
    with pytest.raises(ValueError, match="needs dropout_seed"):
        FORWARD(q, k, v, None, None, 0.25, 0, 0, -1, 0.0, False, False, 0.1,
                torch.zeros(2, dtype=torch.int32, device=DEVICE))


def test_opcheck_with_dropout():
    q, k, v = leaves(*make_qkv(torch.float32, 4, 2, L=L, S=S, D=D))
    bias = randn(B, 1, 1, S).requires_grad_()
    args = (q, k, v, bias, None, 0.25, 2, 0, -1, 0.0, False, True, 0.3, draw_seed(DEVICE))
    torch.library.opcheck(FORWARD, args, test_utils=(
        "test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic",
    ))


class TimmAttentionDropout(nn.Module):
    """timm/models/vision_transformer.py Attention.forward (fused_attn=False) from the split heads
    on: ``attn = self.attn_drop(attn)``. Under dynamic=True Dynamo does not specialise the float
    ``attn_drop.p``: it passes it as a 0-d tensor input and reads it with ``.item()``."""

    def __init__(self, p):
        super().__init__()
        self.attn_drop = nn.Dropout(p)

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)) * D**-0.5
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        return attn @ v


def _compile_dynamic(module):
    """``module`` compiled through the pass with dynamic=True; the (graph, example inputs) the
    inner backend receives, which runs the graph as it is, and the pass's Reports."""
    graphs, reports = [], []

    def inner(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    compiled = torch.compile(module, backend="sdpa_pass", dynamic=True, fullgraph=True,
                             options={"backend": inner, "on_report": reports.append})
    return compiled, graphs, reports


def _op_reads_p_at_run_time(gm) -> bool:
    """One op call in ``gm``, whose dropout_p is a node of the graph rather than a constant."""
    calls = [n for n in gm.graph.nodes if n.target is FORWARD]
    return len(calls) == 1 and isinstance(calls[0].args[12], fx.Node)


@pytest.mark.usefixtures("fresh_dynamo")
def test_module_p_read_at_run_time_one_graph_two_lengths():
    """The site is rewritten with p a graph node; one graph serves both lengths (B=2, H=4,
    D=16 and the lengths all differ, so each length is its own symbol), and its outputs and
    gradients are the reference's under the kernel's own mask."""
    p = 0.3
    compiled, graphs, reports = _compile_dynamic(TimmAttentionDropout(p).train())
    for seed, (l, s) in ((31, (7, 11)), (32, (9, 17))):
        q, k, v = leaves(*make_qkv(torch.float32, 4, 4, L=l, S=s, D=D))
        dout = randn(B, 4, l, D)
        keep = _seeded_mask(seed, 4, p, L=l, S=s)
        torch.manual_seed(seed)
        out = compiled(q, k, v)
        ref, _ = reference_attention(q, k, v, dropout_p=p, keep=keep)
        assert_close_to_reference(out, ref, torch.float32)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        assert_grads_close(grads, reference_grads(q, k, v, None, dout, dropout_p=p, keep=keep),
                           torch.float32)
    assert len(graphs) == 1, f"{len(graphs)} graphs: the pass specialised on a sequence length"
    assert _op_reads_p_at_run_time(graphs[0][0]), graphs[0][0].code
    assert [site.dropout for site in reports[0].sites] == ["symbolic"], str(reports[0])


@pytest.mark.usefixtures("fresh_dynamo")
def test_changed_module_p_is_honoured():
    """Setting ``attn_drop.p`` between calls (Dynamo retraces or not; either way the output
    follows the new p): 0 is attention without dropout, 1 drops everything as ``F.dropout``
    does, and another p drops what the kernel's mask for it drops."""
    module = TimmAttentionDropout(0.3).train()
    compiled, graphs, _ = _compile_dynamic(module)
    q, k, v = make_qkv(torch.float32, 4, 4, L=7, S=11, D=D)
    compiled(q, k, v)
    module.attn_drop.p = 0.0
    assert_close_to_reference(compiled(q, k, v), reference_attention(q, k, v)[0], torch.float32)
    module.attn_drop.p = 1.0
    out = compiled(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    module.attn_drop.p = 0.6
    keep = _seeded_mask(41, 4, 0.6, L=7, S=11)
    torch.manual_seed(41)
    out = compiled(q, k, v)
    assert_close_to_reference(out, reference_attention(q, k, v, dropout_p=0.6, keep=keep)[0],
                              torch.float32)
    assert graphs and all(_op_reads_p_at_run_time(gm) for gm, _ in graphs)


@pytest.mark.usefixtures("fresh_dynamo")
def test_p_read_at_run_time_out_of_range_raises():
    """A compiled call never gets there (Dynamo traces F.dropout's own range check again for
    each p), but the graph reads p when it runs: run with another p, the op checks it as
    eager's dropout would, instead of scaling by 1 / (1 - p)."""
    compiled, graphs, _ = _compile_dynamic(TimmAttentionDropout(0.3).train())
    q, k, v = make_qkv(torch.float32, 4, 4, L=7, S=11, D=D)
    compiled(q, k, v)
    (gm, example_inputs), = graphs
    assert _op_reads_p_at_run_time(gm), gm.code
    for p in (1.5, -0.25):
        inputs = [torch.tensor(p, dtype=x.dtype) if isinstance(x, torch.Tensor) and x.dim() == 0
                  else x for x in example_inputs]
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            gm(*inputs)


class TwoDropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_drop, self.second_drop = nn.Dropout(0.1), nn.Dropout(0.2)

    def forward(self, q, k, v):
        attn = ((q @ k.transpose(-2, -1)) * D**-0.5).softmax(dim=-1)
        return self.second_drop(self.attn_drop(attn)) @ v


@pytest.mark.usefixtures("fresh_dynamo")
def test_two_dropouts_read_at_run_time_are_left_to_eager():
    """Two dropouts whose p the graph reads at run time may both be active, which one in-kernel
    dropout cannot be: the site stays as written."""
    compiled, graphs, reports = _compile_dynamic(TwoDropouts().train())
    compiled(*make_qkv(torch.float32, 4, 4, L=7, S=11, D=D))
    assert [(s.status, s.reason) for s in reports[-1].sites] == [
        ("skipped", "two dropouts on the probabilities that may both be active")], str(reports[-1])
