"""Robustness (issue 9): try to make the pass or the op wrong, and compare with eager.

Pass level (the op on its PyTorch CPU path, ``TRITON_INTERPRET=0`` per test as in
tests/test_fuzz.py: these tests are about the pass and torch.compile, the kernels have their own):
- graph breaks between two attention sites; ``torch.no_grad`` / ``torch.inference_mode``;
- ``torch.export``: rewrite an exported program, export it again, ``save``/``load`` round trip;
  its core-ATen form (``run_decompositions``: matmul as expand/view/bmm/view);
- Inductor's FX graph cache shared by two processes;
- several models compiled in one process; deterministic training steps.

Kernel level (``sdpa_pass.kernels.attention``, both routes of the op: the Triton kernels —
interpreted on CPU — and the PyTorch CPU path): empty sequences, NaN/inf inputs, unusual strides,
bad masks, float masks of another dtype than the query.

Known bugs are ``xfail(strict=True)`` with the bug named, so a fix turns them into failures that
ask for the mark to go.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import idioms
import sdpa_pass
from sdpa_pass.kernels import attention, launch, ops
from sdpa_pass.kernels.forward import interpreter_active
from reference import DEVICE, assert_close_to_reference, reference_attention

ATTENTION_OP = torch.ops.sdpa_pass.attention_forward.default


# ---------------------------------------------------------------------------------------------
# Pass level
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def pytorch_op_path(monkeypatch, fresh_dynamo):
    # the op reads TRITON_INTERPRET on every call; its PyTorch CPU path keeps these tests fast
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _float64_output(model, *args):
    with torch.no_grad():
        return copy.deepcopy(model).double()(*(a.double() for a in args))


def _nano_gpt(n_head=idioms.H):
    """nanoGPT CausalSelfAttention (non-flash branch: tril buffer, masked_fill(-inf)), eval."""
    torch.manual_seed(0)
    return idioms.NanoGPTCausalSelfAttention(n_head=n_head).eval()


def _hidden(T=idioms.T):
    return torch.randn(idioms.B, T, idioms.C)


def _optimize(model, backend="eager"):
    """sdpa_pass.optimize with a list that collects the Report of every graph compiled."""
    reports = []
    return sdpa_pass.optimize(model, backend=backend, on_report=reports.append), reports


def _rewritten_per_graph(reports):
    return [r.num_rewritten for r in reports]


class TwoBlocksWithGraphBreak(nn.Module):
    """Two attention sites with a graph break between them (a print, a .item(), a data-dependent
    branch in a real model): Dynamo compiles two graphs and the pass must see both."""

    def __init__(self):
        super().__init__()
        self.first, self.second = _nano_gpt(), _nano_gpt()

    def forward(self, x):
        x = x + self.first(x)
        torch._dynamo.graph_break()
        return x + self.second(x)


def test_graph_break_between_two_sites(pytorch_op_path):
    model = TwoBlocksWithGraphBreak().eval()
    x = _hidden()
    expected = _float64_output(model, x)
    model, reports = _optimize(model)
    with torch.no_grad():
        for _ in range(2):  # the second call reuses both graphs: no recompile, no third report
            assert_close_to_reference(model(x), expected, torch.float32)
    assert _rewritten_per_graph(reports) == [1, 1], [str(r) for r in reports]


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(pytorch_op_path, grad_mode):
    """The compiled model called inside the mode, with inputs made inside it (inference tensors
    under inference_mode), through AOTAutograd (aot_eager) which handles both modes itself."""
    model = _nano_gpt()
    expected = _float64_output(model, _hidden_seeded())
    model, reports = _optimize(model, backend="aot_eager")
    with grad_mode():
        x = _hidden_seeded()
        out = model(x)
    assert not out.requires_grad
    assert_close_to_reference(out, expected, torch.float32)
    assert _rewritten_per_graph(reports) == [1], [str(r) for r in reports]


def _hidden_seeded():
    torch.manual_seed(1)
    return _hidden()


# torch.export --------------------------------------------------------------------------------


class GQACausalAttention(nn.Module):
    """A Llama-style site (repeat_kv, additive causal mask, fp32 softmax) written as a
    module, small enough to export quickly."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(idioms.C, idioms.C, bias=False)
        self.kv_proj = nn.Linear(idioms.C, 2 * idioms.HKV * idioms.D, bias=False)

    def forward(self, x, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, idioms.H, idioms.D).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, T, 2 * idioms.HKV, idioms.D).transpose(1, 2).chunk(2, dim=1)
        k, v = idioms.repeat_kv(k, idioms.H // idioms.HKV), idioms.repeat_kv(v, idioms.H // idioms.HKV)
        w = torch.matmul(q, k.transpose(2, 3)) * idioms.D ** -0.5 + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v).transpose(1, 2).reshape(B, T, -1)


def _export_cases():
    torch.manual_seed(0)
    x = _hidden()
    mask = torch.full((idioms.T, idioms.T), torch.finfo(torch.float32).min).triu(1)[None, None]
    return {
        "nano_gpt": (_nano_gpt(), (x,)),
        "gqa_additive_mask": (GQACausalAttention().eval(), (x, mask)),
    }


def _op_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is ATTENTION_OP)


@pytest.mark.parametrize("case", ["nano_gpt", "gqa_additive_mask"])
def test_export_rewrite_save_load(pytorch_op_path, tmp_path, case):
    """rewrite() on an exported program's graph (aten ops, pre-dispatch IR) in place; the
    program runs as rewritten (ep.module()), and exporting that module again gives a valid
    program with our op, which round-trips through torch.export.save / load."""
    model, args = _export_cases()[case]
    expected = _float64_output(model, *args)
    ep = torch.export.export(model, args)
    report = sdpa_pass.rewrite(ep.graph_module)
    assert report.num_rewritten == 1, str(report)
    assert _op_calls(ep.graph_module) == 1 and "softmax" not in ep.graph_module.code
    with torch.no_grad():
        assert_close_to_reference(ep.module()(*args), expected, torch.float32)
    reexported = torch.export.export(ep.module(), args)
    assert _op_calls(reexported.graph_module) == 1
    path = tmp_path / f"{case}.pt2"
    torch.export.save(reexported, path)
    loaded = torch.export.load(path)
    assert _op_calls(loaded.graph_module) == 1
    with torch.no_grad():
        assert_close_to_reference(loaded.module()(*args), expected, torch.float32)
    # the op is a custom op, not decomposed by the core-ATen decompositions
    assert _op_calls(loaded.run_decompositions().graph_module) == 1


def test_export_save_after_rewrite_in_place(pytorch_op_path, tmp_path):
    """An ExportedProgram rewritten in place verifies and saves: the nodes the rewrite inserts
    get meta["val"] (they once lacked it: 'Node.meta permute_default is missing val field')."""
    model, args = _export_cases()["nano_gpt"]
    ep = torch.export.export(model, args)
    assert sdpa_pass.rewrite(ep.graph_module).num_rewritten == 1
    torch.export.save(ep, tmp_path / "in_place.pt2")
    loaded = torch.export.load(tmp_path / "in_place.pt2")
    assert_close_to_reference(loaded.module()(*args), _float64_output(model, *args), torch.float32)


def _core_aten(model, args, **export_options):
    """The program as core ATen spells it (``run_decompositions``): torch.matmul of 4-D tensors
    becomes expand -> clone -> view (B*H, ...) -> bmm -> view (B, H, ...)."""
    return torch.export.export(model, args, **export_options).run_decompositions()


@pytest.mark.parametrize("case", ["nano_gpt", "gqa_additive_mask"])
def test_export_core_aten_graph_is_rewritten(pytorch_op_path, case):
    """Both products read as the 4-D matmuls they decompose from; no softmax or bmm is left
    behind (their merged views and expands go with them)."""
    model, args = _export_cases()[case]
    ep = _core_aten(model, args)
    report = sdpa_pass.rewrite(ep.graph_module)
    with torch.no_grad():  # whatever the pass did, the program still computes eager's output
        assert_close_to_reference(ep.module()(*args), _float64_output(model, *args), torch.float32)
    assert report.num_rewritten == 1, str(report)
    assert _op_calls(ep.graph_module) == 1
    assert not re.search(r"softmax|bmm", ep.graph_module.code), ep.graph_module.code


def test_export_core_aten_repeat_kv_is_native_gqa(pytorch_op_path):
    model, args = _export_cases()["gqa_additive_mask"]
    ep = _core_aten(model, args)
    report = sdpa_pass.rewrite(ep.graph_module)
    assert report.num_rewritten == 1, str(report)
    assert report.sites[0].gqa_group == idioms.H // idioms.HKV, str(report)
    assert "expand" not in ep.graph_module.code, ep.graph_module.code


def test_export_core_aten_graph_dynamic_shapes(pytorch_op_path):
    """Batch and sequence symbolic: the merged batch (4*s0) is proved equal to the product of
    the batch dims it came from, with no guard added, and the program serves another size."""
    model, args = _export_cases()["nano_gpt"]
    T, B = torch.export.Dim("T", min=2, max=31), torch.export.Dim("B", min=2, max=8)
    ep = _core_aten(model, args, dynamic_shapes=({0: B, 1: T},))
    assert sdpa_pass.rewrite(ep.graph_module).num_rewritten == 1
    torch.manual_seed(2)
    x = torch.randn(3, 7, idioms.C)
    with torch.no_grad():
        assert_close_to_reference(ep.module()(x), _float64_output(model, x), torch.float32)


class MatmulsSpelledOut(nn.Module):
    """Attention whose two products are written the way core ATen decomposes torch.matmul:
    ``x.expand(B, H, ...).reshape(B * H, ...)``, ``torch.bmm``, ``.view(B, H, ...)``.
    ``returns`` also returns one merged intermediate (a second user of it); ``scores_split``
    views the (B*H, L, S) scores as (H, B, L, S) instead, the probabilities going back to
    (B, H, L, S) before the product with V; ``batch`` expands batch-1 inputs to that batch,
    further than torch.matmul would broadcast them."""

    def __init__(self, returns=None, scores_split="BH", batch=None):
        super().__init__()
        self.returns, self.scores_split, self.batch = returns, scores_split, batch

    def forward(self, q, k, v):
        B, H, L, D = q.shape
        B = self.batch or B
        S = k.shape[2]
        scores = torch.bmm(q.expand(B, H, L, D).reshape(B * H, L, D),
                           k.transpose(2, 3).expand(B, H, D, S).reshape(B * H, D, S))
        split = (B, H) if self.scores_split == "BH" else (H, B)
        p = (scores.view(*split, L, S) * D ** -0.5).softmax(dim=-1).reshape(B, H, L, S)
        probs = p.expand(B, H, L, S).reshape(B * H, L, S)
        out = torch.bmm(probs, v.expand(B, H, S, D).reshape(B * H, S, D))
        merged = {"scores": scores, "probs": probs, "output": out}
        out_bhld = out.view(B, H, L, D)
        return out_bhld if self.returns is None else (out_bhld, merged[self.returns])


def _rewrite_core_aten(model, args):
    """(report, expected outputs, outputs of the rewritten program) for ``model``'s core-ATen
    program."""
    ep = _core_aten(model, args)
    report = sdpa_pass.rewrite(ep.graph_module)
    with torch.no_grad():
        expected = model(*(a.double() for a in args))
        got = ep.module()(*args)
    return report, expected, got


def test_core_aten_spelling_written_by_hand_is_rewritten(pytorch_op_path):
    """The negatives below differ from this positive in one place each."""
    args = idioms.qkv(torch.float32)
    report, expected, got = _rewrite_core_aten(MatmulsSpelledOut(), args)
    assert report.num_rewritten == 1, str(report)
    assert_close_to_reference(got, expected, torch.float32)


@pytest.mark.parametrize("returns, reason_code, reason", [
    # the (B*H, L, S) bmm of the scores
    ("scores", "scores_used_elsewhere", "bmm is also used by output"),
    # the probabilities viewed as (B*H, L, S): the walk from softmax or verify says so
    ("probs", "probs_used_elsewhere", ""),
    # the bmm with V, before its (B, H, L, D) view
    ("output", "probs_used_elsewhere", "bmm_1 is also used by output"),
])
def test_core_aten_merged_intermediate_with_a_second_user(pytorch_op_path, returns, reason_code,
                                                          reason):
    """The nodes the rewrite removes include the merged views and bmms of the decomposed
    matmuls: one of them read by something else keeps the site as it is."""
    args = idioms.qkv(torch.float32)
    report, expected, got = _rewrite_core_aten(MatmulsSpelledOut(returns=returns), args)
    assert report.num_rewritten == 0, str(report)
    site = report.sites[0]
    assert site.reason_code == reason_code and reason in site.reason, str(report)
    for g, e in zip(got, expected):
        assert_close_to_reference(g, e, torch.float32)


@pytest.mark.parametrize("options, reason", [
    # bmm's (B*H, L, S) viewed as (H, B, L, S)
    ({"scores_split": "HB"}, "into (4, 2, 9, 13), not back into the batch dims (2, 4)"),
    # q, k, v of batch 1 all expanded to batch 2: torch.matmul's broadcast would keep batch 1
    ({"batch": 2}, "(1, 4, 9, 16) and (1, 4, 16, 13) to the batch dims (2, 4), beyond their "
                   "common broadcast"),
])
def test_core_aten_spelling_that_is_not_a_matmul(pytorch_op_path, options, reason):
    """One step differs from torch.matmul's decomposition: not read as one, the site is left
    alone with the step named."""
    args = tuple(x[:1] if "batch" in options else x for x in idioms.qkv(torch.float32))
    report, expected, got = _rewrite_core_aten(MatmulsSpelledOut(**options), args)
    assert report.num_rewritten == 0, str(report)
    site = report.sites[0]
    assert site.reason_code == "not_provable" and reason in site.reason, str(report)
    assert_close_to_reference(got, expected, torch.float32)


def test_export_function_calling_the_op(tmp_path):
    """A program that calls the op itself (GQA, float mask, bottom-right causal, dynamic
    query length) exports, saves, loads and gives the kernel's eager answer."""
    torch.manual_seed(0)

    class Attend(nn.Module):
        def forward(self, q, k, v, bias):
            return attention(q, k, v, bias, causal="bottom_right", enable_gqa=True)

    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    bias = torch.randn(2, 1, 1, 9)
    L = torch.export.Dim("L", min=1, max=9)
    ep = torch.export.export(Attend(), (q, k, v, bias),
                             dynamic_shapes=({2: L}, None, None, None))
    torch.export.save(ep, tmp_path / "op.pt2")
    loaded = torch.export.load(tmp_path / "op.pt2").module()
    for length in (5, 3):
        ref, _ = reference_attention(q[:, :, :length], k, v, bias, causal="bottom_right")
        assert_close_to_reference(loaded(q[:, :, :length], k, v, bias), ref, torch.float32)


# Inductor's cache across processes -----------------------------------------------------------

_CACHE_SCRIPT = textwrap.dedent("""
    import json, math
    import torch
    import torch.nn.functional as F
    from torch._dynamo.utils import counters
    import sdpa_pass

    def attn(q, k, v, mask):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        s = s.masked_fill(~mask, float("-inf"))
        return F.softmax(s, dim=-1) @ v

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    reports = []
    with torch.no_grad():
        out = sdpa_pass.optimize(attn, backend="inductor", on_report=reports.append)(q, k, v, mask)
    ref = attn(q.double(), k.double(), v.double(), mask)
    print(json.dumps({
        "max_abs_error": float((out.double() - ref).abs().max()),
        "rewritten": sum(r.num_rewritten for r in reports),
        "inductor": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
        "aot_autograd": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
    }))
""")


def test_inductor_fx_graph_cache_across_processes(tmp_path):
    """Two processes compile the same rewritten graph with one TORCHINDUCTOR_CACHE_DIR: the
    first misses and saves, the second hits Inductor's FX graph cache (and AOTAutograd's), so
    the custom op does not make the graph uncacheable; both give eager's output.

    Counters as torch 2.13 names them: counters["inductor"]["fxgraph_cache_{hit,miss,bypass}"]
    and counters["aot_autograd"]["autograd_cache_{hit,miss,saved,bypass}"]."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_AUTOGRAD_CACHE="1",
               # no pool of compile workers to start: it costs ~7 s per process on 2 cores
               TORCHINDUCTOR_COMPILE_THREADS="1", TRITON_INTERPRET="0")
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], capture_output=True,
                                text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    first, second = runs
    for run in runs:
        assert run["rewritten"] == 1, run
        assert run["max_abs_error"] < 1e-5, run
        assert run["inductor"].get("fxgraph_cache_bypass", 0) == 0, run
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1, first
    assert first["aot_autograd"].get("autograd_cache_saved", 0) >= 1, first
    # a warm start: the second process compiles nothing
    assert second["aot_autograd"].get("autograd_cache_hit", 0) >= 1, second
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1, second
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second


# Several models in one process ---------------------------------------------------------------


def test_several_models_in_one_process(pytorch_op_path):
    """A GPT-2 and a Llama (GQA, left padding) from tests/test_hf_models.py and two nanoGPT
    blocks of one class with different head counts (same code object, so the same Dynamo cache
    entry list: the scale 1/sqrt(head dim) must come from the right instance), compiled side by
    side and called interleaved: every site rewritten, every output equal to its eager one."""
    from test_hf_models import SEQ, VOCAB, tiny_gpt2, tiny_llama_gqa

    torch.manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (2, SEQ))
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[1, :3] = 0
    hf_args = ((input_ids,), {"attention_mask": attention_mask})
    x = _hidden()
    models = {
        "gpt2": (tiny_gpt2().eval(), hf_args, 2),
        "llama": (tiny_llama_gqa().eval(), hf_args, 2),
        "nano_gpt_4_heads": (_nano_gpt(n_head=4), ((x,), {}), 1),
        "nano_gpt_2_heads": (_nano_gpt(n_head=2), ((x,), {}), 1),
    }

    def output(model, args, kwargs):
        out = model(*args, **kwargs)
        return out.logits if hasattr(out, "logits") else out

    # fp32 eager as the reference for every model (float64 turns Llama's fp32-softmax
    # finfo.min padding into NaN rows: see tests/test_hf_models.py)
    with torch.no_grad():
        expected = {name: output(m, *a) for name, (m, a, _) in models.items()}
    compiled = {name: _optimize(m) for name, (m, _, _) in models.items()}
    with torch.no_grad():
        for _ in range(2):
            for name, (model, reports) in compiled.items():
                got = output(model, *models[name][1])
                torch.testing.assert_close(got, expected[name], atol=1e-4, rtol=1e-4, msg=name)
    for name, (_, reports) in compiled.items():
        assert sum(_rewritten_per_graph(reports)) == models[name][2], (name, [str(r) for r in reports])


# Deterministic algorithms --------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_deterministic_training_step(pytorch_op_path, dropout):
    """With torch.use_deterministic_algorithms(True), forward + backward through a rewritten
    site (aot_eager: the op's registered backward) twice from one seed gives bitwise-identical
    gradients; without dropout they also equal float64 eager's."""
    model = _nano_gpt().train()
    model.attn_dropout.p = dropout
    x = _hidden()
    reference = copy.deepcopy(model).double()
    if dropout == 0.0:
        reference(x.double()).square().sum().backward()
    model, reports = _optimize(model, backend="aot_eager")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1234)  # the in-kernel dropout's seed comes from torch's generator
            model(x).square().sum().backward()
            runs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        torch.use_deterministic_algorithms(previous)
    assert [s.dropout for r in reports for s in r.sites if s.rewritten] == [dropout], \
        [str(r) for r in reports]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"grad of {name} differs between runs"
    if dropout == 0.0:
        for name, p_ref in reference.named_parameters():
            assert_close_to_reference(runs[0][name], p_ref.grad, torch.float32, what=f"grad of {name}")


# ---------------------------------------------------------------------------------------------
# Kernel level: bad and unusual input through sdpa_pass.kernels.attention
# ---------------------------------------------------------------------------------------------

_TRITON_RUNS = DEVICE == "cuda" or interpreter_active()


@pytest.fixture(params=["triton", "pytorch"])
def route(request, monkeypatch):
    """Which implementation the op runs: its Triton kernels (CUDA, or the interpreter when
    TRITON_INTERPRET=1 was set before import) or its PyTorch path (SDPA's CPU kernel / chunks)."""
    if request.param == "triton":
        if not _TRITON_RUNS:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")
    else:
        monkeypatch.setattr(ops, "_use_triton", lambda q: False)
    return request.param


def _device(route) -> str:
    # the PyTorch path is what CPU tensors run; CUDA tensors always take the Triton kernels
    return "cpu" if route == "pytorch" else DEVICE


def _qkv(B=2, H=2, L=5, S=6, D=8, Hkv=None, dtype=torch.float32, grad=False, device=DEVICE):
    torch.manual_seed(0)
    ts = (torch.randn(B, H, L, D), torch.randn(B, Hkv or H, S, D), torch.randn(B, Hkv or H, S, D))
    return tuple(t.to(device, dtype).requires_grad_(grad) for t in ts)


def _eager_attention(q, k, v, attn_mask=None, is_causal=False):
    """The math as a model writes it (float64): softmax(q kᵀ / sqrt(d) masked) v."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("lengths", [(0, 6), (5, 0), (0, 0)], ids=lambda x: f"L{x[0]}_S{x[1]}")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_empty_sequences(route, lengths, is_causal):
    """L = 0 gives an empty output; S = 0 gives zeros, as SDPA and as eager math (softmax over
    an empty dim is empty, and the product with an empty V sums nothing) — not NaN. Gradients
    are zeros / empty like eager's."""
    L, S = lengths
    q, k, v = _qkv(L=L, S=S, grad=True, device=_device(route))
    out = attention(q, k, v, is_causal=is_causal)
    eager = _eager_attention(q, k, v, is_causal=is_causal)
    assert out.shape == eager.shape == (2, 2, L, 8)
    assert torch.equal(out.double(), eager)
    if q.device.type == "cpu":  # SDPA's CPU kernels agree (torch 2.13); its CUDA ones are not ours
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))
    grad_out = torch.randn(out.shape, device=q.device)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(eager, (q, k, v), grad_out.double())
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape and torch.equal(g.double(), w), f"d{name}"


@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 0, 5, 8)], ids=["B0", "H0"])
def test_empty_batch_or_heads(route, shape):
    """No batch or no heads: the empty output SDPA gives, and empty gradients (no heads once
    crashed the launch with a ZeroDivisionError in AttentionShape.group, and the backward's
    grouping by K/V head; torch 2.11's CPU SDPA kernel dies with SIGFPE on either, so the
    PyTorch path must not call it)."""
    q = torch.randn(shape, device=_device(route), requires_grad=True)
    out = attention(q, q, q, is_causal=True)
    assert out.shape == shape
    (grad,) = torch.autograd.grad(out, q, torch.ones_like(out))
    assert grad.shape == shape


# More batch x heads than a launch grid dim holds (65535): the Triton kernels lay the rows over
# two dims (launch.split_rows), the Gluon kernels refuse such calls. The interpreter has no
# such limit, so these tests lower launch.GRID_ROWS_LIMIT to make small calls cross it.
_GRID_ROWS_CASES = {
    # (B, Hq, Hkv, limit, keyword arguments): rows B*Hq / B*Hkv over (y, z) = split_rows
    "gqa_causal": (3, 4, 2, 4, dict(is_causal=True)),  # 12 -> (4, 3), 6 -> (3, 2)
    "bias_batch_inner": (3, 2, 2, 4, dict(bias=True)),  # 6 -> (3, 2); batch element first
}


@pytest.mark.parametrize("case", sorted(_GRID_ROWS_CASES))
def test_batch_times_heads_past_a_grid_dim_is_split_over_two(case, monkeypatch):
    """Forward and backward of calls whose B * H rows exceed the (lowered) grid limit: the
    same results as the float64 reference (with a bias broadcast over the batch, the kernels'
    batch-element-first order decodes the split rows too)."""
    if not _TRITON_RUNS:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")
    B, Hq, Hkv, limit, extras = _GRID_ROWS_CASES[case]
    monkeypatch.setattr(launch, "GRID_ROWS_LIMIT", limit)
    monkeypatch.setenv("SDPA_PASS_BATCH_INNER", "1")
    q, k, v = _qkv(B=B, H=Hq, Hkv=Hkv, L=24, S=24, D=16, grad=True)
    kwargs = dict(is_causal=extras.get("is_causal", False))
    if extras.get("bias"):
        kwargs["attn_mask"] = torch.randn(1, Hq, 24, 24, device=q.device)
    out = attention(q, k, v, enable_gqa=Hq != Hkv, **kwargs)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    refs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*refs, **kwargs)[0]
    ref_grads = torch.autograd.grad(ref_out, refs, grad.double().cpu())
    assert_close_to_reference(out, ref_out, torch.float32)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_to_reference(g, r, torch.float32, what=f"d{name}")


def test_batch_times_heads_with_no_split_names_the_problem(monkeypatch):
    """Rows that no two grid dims hold (7 with a limit of 3: no divisor in range) raise a
    ValueError that says so, not a launch failure."""
    if not _TRITON_RUNS:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")
    monkeypatch.setattr(launch, "GRID_ROWS_LIMIT", 3)
    q, k, v = _qkv(B=7, H=1, L=8, S=8, D=16)
    with pytest.raises(ValueError, match=r"batch x heads = 7 rows .* chunks of the batch"):
        attention(q, k, v)


def test_split_rows_and_the_gluon_kernels_refusal():
    """The real limit: up to 65535 rows on one dim; past it the smallest second dim that
    divides them; none for a prime past the limit. The Gluon kernels refuse past it."""
    from sdpa_pass.kernels.checks import AttentionShape
    from sdpa_pass.kernels.gluon_forward import grid_rows_refusal

    assert launch.split_rows(65535) == (65535, 1)
    assert launch.split_rows(4096 * 16) == (32768, 2)
    assert launch.split_rows(4097 * 17) == (4097, 17)  # odd: no split in two
    assert launch.split_rows(5 * 65521) == (65521, 5)
    with pytest.raises(ValueError, match="65537"):
        launch.split_rows(65537)
    shape = AttentionShape(4096, 16, 16, 128, 128, 64, 64)
    assert "65536" in grid_rows_refusal(shape)
    assert grid_rows_refusal(AttentionShape(4095, 16, 16, 128, 128, 64, 64)) is None


# NaN and inf. The reference is eager math as the pass sees it — masks applied with
# masked_fill (a masked key's NaN score is replaced, not propagated), and a row without a
# finite-or-+inf score giving NaN (empty_rows="nan", what rewritten graphs ask for). Not SDPA:
# SDPA's CPU kernel turns a row whose scores are all NaN into zeros (torch 2.13), and its math
# backend adds the causal mask (NaN + -inf = NaN poisons keys the row cannot see).
_NONFINITE_CASES = {
    f"{tensor}_{name}_{where}": (tensor, value, where)
    for tensor in "qkv"
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("neg_inf", float("-inf")))
    for where in ("first", "last")
}

# The PyTorch path once sent mask-free calls to SDPA's CPU kernel, which returns zeros for a
# query row with no finite-or-+inf score (a NaN in q, an inf in q or k), where eager gives NaN;
# it now takes that route only for finite q and k. These cases caught it.


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", _NONFINITE_CASES)
def test_nan_and_inf_inputs(route, case, is_causal):
    tensor, value, where = _NONFINITE_CASES[case]
    q, k, v = _qkv(B=1, L=5, S=6, device=_device(route))
    t = {"q": q, "k": k, "v": v}[tensor]
    # the first / last query row, or the first key (visible to every row) / last key (visible
    # under the causal mask only to rows that reach it)
    t[0, 1, 0 if where == "first" else -1, 3] = value
    out = attention(q, k, v, is_causal=is_causal, empty_rows="nan")
    ref, _ = reference_attention(q, k, v, is_causal=is_causal, empty_rows="nan")
    assert_close_to_reference(out, ref, torch.float32)
    assert_close_to_reference(out, _eager_attention(q, k, v, is_causal=is_causal), torch.float32,
                              what="against eager masked_fill math")



def test_optimized_site_keeps_eager_nan(pytorch_op_path):
    """optimize() on CPU keeps the NaN row of a rewritten, mask-free site (eager: NaN); the
    SDPA CPU route once turned it into zeros, hiding a NaN from training or debugging."""
    def attn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v

    q, k, v = _qkv(B=1, L=5, S=6, device="cpu")
    q[0, 1, 2, 3] = float("nan")
    reports = []
    out = sdpa_pass.optimize(attn, backend="eager", on_report=reports.append)(q, k, v)
    assert _rewritten_per_graph(reports) == [1]
    assert_close_to_reference(out, attn(q.double(), k.double(), v.double()), torch.float32)

# Strides: views a model hands over without copying. Each maker returns (q, k, v, mask).
def _layout_cases(device=DEVICE):
    B, H, L, S, D = 2, 4, 5, 7, 8

    def r(*shape):
        return torch.randn(*shape, device=device)

    k1 = r(B, 1, S, D)
    return {
        # MQA written as a broadcast: one K/V head expanded over the query heads (stride 0)
        "kv_expanded_over_heads": lambda: (r(B, H, L, D), k1.expand(B, H, S, D), k1.expand(B, H, S, D), None),
        "k_expanded_over_batch": lambda: (r(B, H, L, D), r(1, H, S, D).expand(B, H, S, D), r(B, H, S, D), None),
        # (B, L, H, D) storage viewed through transpose(1, 2); K stored as (B, H, D, S)
        "transposed_views": lambda: (r(B, L, H, D).transpose(1, 2), r(B, H, D, S).mT,
                                     r(B, S, H, D).transpose(1, 2), None),
        "last_dim_stride_2": lambda: tuple(t[..., ::2] for t in (r(B, H, L, 2 * D), r(B, H, S, 2 * D),
                                                                 r(B, H, S, 2 * D))) + (None,),
        # overlapping rows: key j and key j + 1 share D - 1 elements of one buffer
        "overlapping_key_rows": lambda: (r(B, H, L, D), r(S + D).as_strided((B, H, S, D), (0, 0, 1, 1)),
                                         r(S + D).as_strided((B, H, S, D), (0, 0, 1, 1)), None),
        "storage_offset": lambda: (r(B * H * L * D + 3)[3:].view(B, H, L, D), r(B, H, S, D), r(B, H, S, D), None),
        "query_expanded_over_rows": lambda: (r(B, H, 1, D).expand(B, H, L, D), r(B, H, S, D), r(B, H, S, D), None),
        "mask_expanded_and_transposed": lambda: (r(B, H, L, D), r(B, H, S, D), r(B, H, S, D),
                                                 (torch.rand(S, 1, L, device=device) > 0.3).permute(1, 2, 0)
                                                 .expand(B, H, L, S)),
        "float_mask_stride_0_rows": lambda: (r(B, H, L, D), r(B, H, S, D), r(B, H, S, D),
                                             r(S).as_strided((B, H, L, S), (0, 0, 0, 1))),
    }


@pytest.mark.parametrize("layout", list(_layout_cases()))
def test_strided_and_overlapping_inputs(route, layout):
    q, k, v, mask = _layout_cases(_device(route))[layout]()
    out = attention(q, k, v, mask, empty_rows="nan")
    ref, _ = reference_attention(q, k, v, mask, empty_rows="nan")
    assert_close_to_reference(out, ref, torch.float32)


def test_gradient_through_stride_0_heads(route):
    """K/V broadcast from one head (stride 0): the gradient w.r.t. the one-head leaf sums the
    heads, as eager autograd through expand does."""
    torch.manual_seed(0)
    device = _device(route)
    q = torch.randn(2, 4, 5, 8, device=device, requires_grad=True)
    k1, v1 = (torch.randn(2, 1, 7, 8, device=device, requires_grad=True) for _ in range(2))
    out = attention(q, k1.expand(-1, 4, -1, -1), v1.expand(-1, 4, -1, -1), is_causal=True)
    grad_out = torch.randn(out.shape, device=device)
    got = torch.autograd.grad(out, (q, k1, v1), grad_out)
    ref, _ = reference_attention(q, k1.expand(-1, 4, -1, -1), v1.expand(-1, 4, -1, -1), is_causal=True)
    want = torch.autograd.grad(ref, (q, k1, v1), grad_out.double().cpu())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close_to_reference(g, w, torch.float32, what=name)



# (mask maker, keyword, exception, message). A keyword of None means attn_mask.
_BAD_MASKS = {
    "rank_5": (lambda: torch.ones(1, 2, 1, 5, 6, dtype=torch.bool), None, ValueError,
               "attn_mask of shape (1, 2, 1, 5, 6) does not broadcast to (B=2, H=2, L=5, S=6)"),
    "empty_key_dim": (lambda: torch.ones(5, 0, dtype=torch.bool), None, ValueError,
                      "attn_mask of shape (5, 0) does not broadcast"),
    "batch_3": (lambda: torch.zeros(3, 1, 5, 6), None, ValueError, "attn_mask of shape (3, 1, 5, 6)"),
    "uint8": (lambda: torch.ones(5, 6, dtype=torch.uint8), None, TypeError,
              "attn_mask must be bool (True = attend) or floating point (added to the scores); got torch.uint8"),
    "complex": (lambda: torch.ones(5, 6, dtype=torch.complex64), None, TypeError,
                "attn_mask must be bool (True = attend) or floating point"),
    "list": (lambda: [[True] * 6] * 5, None, TypeError, "attn_mask must be a torch.Tensor or None, got list"),
    "padding_float": (lambda: torch.ones(2, 6), "key_padding_mask", TypeError,
                      "key_padding_mask must be bool (True = attend), got torch.float32"),
    "padding_list": (lambda: [[True] * 6] * 2, "key_padding_mask", TypeError, "key_padding_mask must be"),
    "other_device": (lambda: torch.ones(5, 6, dtype=torch.bool, device="meta"), None, ValueError,
                     "must be on one device"),
}


@pytest.mark.parametrize("case", list(_BAD_MASKS))
def test_bad_masks_name_the_problem(case):
    make, keyword, exc, message = _BAD_MASKS[case]
    mask = make()
    if isinstance(mask, torch.Tensor) and mask.device.type != "meta":
        mask = mask.to(DEVICE)
    q, k, v = _qkv()
    with pytest.raises(exc, match=re.escape(message)):
        attention(q, k, v, **{keyword or "attn_mask": mask})


@pytest.mark.parametrize("mask_shape", [(), (6,), (5, 1)], ids=str)
def test_masks_of_low_rank_broadcast(route, mask_shape):
    """Rank-0 and rank-1 masks broadcast to (B, H, L, S) like any other: SDPA raises an
    IndexError for them (it reads mask.size(-2)), eager ``scores.masked_fill(~m, -inf)``
    broadcasts them, and so do we — the documented contract is 'broadcastable'."""
    q, k, v = _qkv(device=_device(route))
    torch.manual_seed(1)
    mask = (torch.rand(mask_shape) > 0.4).to(q.device) if mask_shape else torch.tensor(True, device=q.device)
    out = attention(q, k, v, mask, empty_rows="nan")
    assert_close_to_reference(out, _eager_attention(q, k, v, mask), torch.float32)


# Mixed dtypes between the query and a float mask. SDPA accepts a float mask only in the query's
# dtype or float32 (else "Expected attn_mask dtype to be bool or float or to match query
# dtype"). We accept any floating mask dtype, a superset: rewritten graphs pass the mask the
# eager graph adds, and eager type-promotes `scores + mask` (fp16 scores + an fp32 HF mask, an
# fp32 model with a float64 bias buffer). The kernel adds the mask in fp32, so the answer is
# eager's up to the query dtype's rounding, which is what this test asserts.
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                    (torch.float32, torch.float64), (torch.float16, torch.float32),
                                    (torch.float16, torch.bfloat16)],
                         ids=lambda d: f"q_{str(d[0])[6:]}_mask_{str(d[1])[6:]}")
def test_float_mask_of_another_dtype(route, dtypes):
    q_dtype, mask_dtype = dtypes
    q, k, v = _qkv(dtype=q_dtype, device=_device(route))
    torch.manual_seed(1)
    mask = (torch.randn(2, 1, 5, 6) * 3).to(q.device, mask_dtype)
    mask[0, 0, 1, :4] = float("-inf")
    out = attention(q, k, v, mask)
    assert out.dtype == q_dtype
    # the one pairing SDPA takes; on CPU only: SDPA's CUDA backends are not the reference (its
    # dispatch on an H200, torch 2.11, gave NaN rows here that eager does not)
    if (q_dtype, mask_dtype) == (torch.float16, torch.float32) and q.device.type == "cpu":
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, mask),
                                   atol=2e-3, rtol=2e-3)
    ref, _ = reference_attention(q, k, v, mask)
    assert_close_to_reference(out, ref, q_dtype)


def _tiny_llama_on_cuda(padding: bool):
    """A 2-layer HF Llama (eager attention) on the GPU, token ids and an attention mask, the
    second sequence left-padded by 3 when ``padding``."""
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaModel(T.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")).cuda()
    ids = torch.randint(1, 64, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    if padding:
        mask[1, :3] = 0
    return model, ids, mask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("padding", [False, True], ids=["unpadded", "left_padded"])
def test_cuda_graphs_inference(padding):
    """``triton.cudagraphs`` (what ``mode="reduce-overhead"`` turns on) captures the rewritten
    forward: the op decides its routes (decode kernel, uniform rows) from shapes, never by
    reading the GPU, so nothing syncs during capture. Replays equal eager, and Inductor skipped
    no graph. (Training: test_cuda_graphs_training.)"""
    from torch._dynamo.utils import counters

    model, ids, mask = _tiny_llama_on_cuda(padding)
    model.eval()
    reports = []
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="sdpa_pass", options={
        "backend": "inductor", "triton.cudagraphs": True, "on_report": reports.append})
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state
        for _ in range(3):   # warm-up, record, replay
            got = compiled(ids, attention_mask=mask).last_hidden_state.clone()
    assert sum(r.num_rewritten for r in reports) == 2, str(reports[0])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("padding", [False, True], ids=["unpadded", "left_padded"])
def test_cuda_graphs_training(padding):
    """Training under ``triton.cudagraphs``: the backward op picks its path from devices and
    shapes only (rows of huge negative scores are handled on the device), so Inductor captures
    the forward and the backward graphs; the replayed step's loss and gradients equal eager's."""
    from torch._dynamo.utils import counters

    model, ids, mask = _tiny_llama_on_cuda(padding)
    eager = copy.deepcopy(model)
    reports = []
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="sdpa_pass", options={
        "backend": "inductor", "triton.cudagraphs": True, "on_report": reports.append})
    for _ in range(3):   # warm-up, record, replay
        model.zero_grad(set_to_none=True)
        loss = compiled(ids, attention_mask=mask).last_hidden_state.pow(2).mean()
        loss.backward()
    want = eager(ids, attention_mask=mask).last_hidden_state.pow(2).mean()
    want.backward()
    assert sum(r.num_rewritten for r in reports) == 2, str(reports[0])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-4)
    for (name, p), p_eager in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_backward_of_filled_rows_syncs_nothing_and_captures():
    """A float mask with rows filled everywhere by -1e9 (their LSE lost log(n) to rounding):
    forward and backward run without a device-to-host sync and replay from a CUDA graph with
    the gradients of an uncaptured call (the kernels are deterministic: equal bit for bit)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 80, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(2, 1, 80, 80, device="cuda")
    bias[:, :, 5] = -1e9
    bias[1, :, 40:60] = -1e9
    dout = torch.randn(2, 4, 80, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        return torch.autograd.grad(attention(q, k, v, bias), (q, k, v), dout)

    want = step()   # compiles and tunes outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert torch.equal(g, w)
    # a row filled everywhere averages V uniformly: with dO = 1 on that row alone, dV = 1 / S
    dout_row = torch.zeros_like(dout)
    dout_row[:, :, 5] = 1
    (dv_row,) = torch.autograd.grad(attention(q, k, v, bias), v, dout_row)
    torch.testing.assert_close(dv_row.float(), torch.full(dv_row.shape, 1 / 80, device="cuda"),
                               atol=1e-4, rtol=0)
