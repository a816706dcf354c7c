"""The ``sdpa_pass`` backend held to what PyTorch asks of a Dynamo backend.

A standing check (issue 9, "Never wrong") adapted from PyTorch's own backend tests,
``test/dynamo/test_backends.py`` and ``test/dynamo/test_compile.py``: registration, listing and
lookup (by name and through the ``torch_dynamo_backends`` entry point), ``options``, the inner
compiler's contract (example inputs, boxed AOTAutograd compilers), ``fullgraph``, dynamic shapes,
recompiles and ``reset``, training, in-place ops on buffers, ``torch.compiler.disable``.

The checks use two kinds of model, with the inner backends where each means something:
- without attention (``Seq``, ``ConvBnRelu``): the pass must be invisible, with outputs,
  gradients and buffers equal to eager's and no site in the Report;
- with nanoGPT's causal attention (tests/test_pass_api.py): the site is rewritten and outputs and
  gradients equal float64 eager's within fp32 tolerance.

Inductor compiles C++ on a CPU machine (several seconds a graph, 10-20 s for the first), so
only the tests where Inductor adds something run with it. Not covered here, already in tests/test_robustness.py: graph breaks
between sites, no_grad / inference_mode around the call, export, caches, several models.
"""

from __future__ import annotations

import copy
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch._inductor.config
import torch.nn as nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.testing import CompileCounterWithBackend

import sdpa_pass
from reference import assert_close_to_reference, reference_attention
from test_pass_api import CausalSelfAttention


@pytest.fixture(autouse=True)
def pytorch_op_path(monkeypatch, fresh_dynamo):
    # These tests are about the backend and torch.compile; the op reads TRITON_INTERPRET on
    # every call, and its PyTorch CPU path keeps them fast (the kernels have their own tests).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # no pool of Inductor compile workers: on 2 cores under pytest -n 2 it costs more than it saves
    with torch._inductor.config.patch(compile_threads=1):
        yield


ATTENTION_FORWARD = "torch.ops.sdpa_pass.attention_forward"
INNER_BACKENDS = ["eager", "aot_eager", "inductor"]
CHEAP_INNER_BACKENDS = ["eager", "aot_eager"]


# Models ---------------------------------------------------------------------------------------


class Seq(nn.Module):
    """No attention: the Linear / ReLU / Linear / Sigmoid stack PyTorch checks backends with."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10), nn.Sigmoid())

    def forward(self, x):
        return self.layers(x)


class ConvBnRelu(nn.Module):
    """No attention; in training BatchNorm writes its running statistics (buffers) in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=1e-3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def causal_attention():
    """nanoGPT's CausalSelfAttention without its dropout (tests/test_pass_api.py): a tril
    buffer, masked_fill(-inf), softmax(q @ k^T * scale) @ v; small."""
    return CausalSelfAttention(n_embd=32, n_head=2, block_size=16)


class StatefulAttentionBlock(nn.Module):
    """Buffers and in-place ops around one attention site: a call counter (``+=`` on a long
    buffer), a BatchNorm-style running mean updated with ``mul_().add_()`` under no_grad, an
    fp32 activation multiplied in place by a float64 buffer (in-place type promotion), an
    in-place residual add, a slice assignment and an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.attn = causal_attention()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_mean", torch.zeros(32))
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 32, dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        with torch.no_grad():
            self.running_mean.mul_(0.9).add_(x.mean(dim=(0, 1)), alpha=0.1)
        h = x - self.running_mean
        h.mul_(self.gain)
        y = self.attn(h)
        y.add_(h)
        y[:, 0] = 0.0
        return torch.nn.functional.relu(y, inplace=True)


class EagerOnlyAttention(CausalSelfAttention):
    @torch.compiler.disable
    def forward(self, x):
        return super().forward(x)


class CompiledThenDisabledSite(nn.Module):
    """Two attention sites, the second in a submodule whose forward is
    ``torch.compiler.disable``d: Dynamo runs it eagerly, between two graphs."""

    def __init__(self):
        super().__init__()
        self.first = causal_attention()
        self.second = EagerOnlyAttention(n_embd=32, n_head=2, block_size=16)
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        h = x + self.first(x)
        h = h + self.second(h)
        return self.proj(h)


# Helpers --------------------------------------------------------------------------------------


def _compile(fn, inner, **compile_kwargs):
    """torch.compile(backend="sdpa_pass") with ``inner`` behind it, and the Reports it makes."""
    reports = []
    compiled = torch.compile(fn, backend="sdpa_pass",
                             options={"backend": inner, "on_report": reports.append}, **compile_kwargs)
    return compiled, reports


def _hidden(T=7, requires_grad=False):
    return torch.randn(2, T, 32).requires_grad_(requires_grad)


def _train_step(model, x):
    """Forward, a loss that weights every output differently, backward; returns the output
    and every gradient by name (the input's as "input")."""
    out = model(x)
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view(out.shape)
    (out * weights).sum().backward()
    module = getattr(model, "_orig_mod", model)  # the compiled wrapper prefixes the names
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["input"] = x.grad
    return out, grads


def _float64_step(model, x):
    return _train_step(copy.deepcopy(model).double(), x.detach().double().requires_grad_())


def _assert_matches_float64(got, want, what=""):
    (out, grads), (ref_out, ref_grads) = got, want
    assert_close_to_reference(out, ref_out, torch.float32, what=f"{what}output")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"{what}no gradient reached {name}"
        assert_close_to_reference(grad, ref_grads[name], torch.float32, what=f"{what}grad of {name}")


def _rewritten(reports):
    return [r.num_rewritten for r in reports]


# Registration -----------------------------------------------------------------------------------


def test_listed_and_looked_up_by_name():
    """list_backends() hides backends tagged "debug" or "experimental"; ours has no tag, so it
    is listed by default as well as with no tag excluded, and the name resolves to our entry."""
    assert "sdpa_pass" in torch._dynamo.list_backends()
    assert "sdpa_pass" in torch._dynamo.list_backends(exclude_tags=())
    assert "sdpa_pass" in torch.compiler.list_backends()
    assert torch._dynamo.lookup_backend("sdpa_pass") is sdpa_pass.sdpa_pass_backend
    assert sdpa_pass.sdpa_pass_backend._tags == ()


def test_entry_point_found_by_dynamo_discovery():
    """The installed metadata and pyproject.toml declare one entry point, and Dynamo's own
    discovery (what a process that never imported us relies on; the subprocess version is in
    tests/test_pass_api.py) lists the name from the metadata before loading anything, then
    loads our function on lookup."""
    from torch._dynamo.backends import registry

    (entry,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "sdpa_pass"]
    assert entry.value == "sdpa_pass.backend:sdpa_pass_backend"
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["torch_dynamo_backends"] == {"sdpa_pass": entry.value}

    saved = dict(registry._BACKENDS), dict(registry._COMPILER_FNS)
    try:
        del registry._BACKENDS["sdpa_pass"], registry._COMPILER_FNS["sdpa_pass"]
        registry._lazy_import.cache_clear()
        registry._discover_entrypoint_backends.cache_clear()
        assert "sdpa_pass" in torch._dynamo.list_backends()
        assert registry._BACKENDS["sdpa_pass"] is not None, "listed, but not from the entry point"
        assert "sdpa_pass" not in registry._COMPILER_FNS  # listed, not loaded yet
        assert torch._dynamo.lookup_backend("sdpa_pass") is sdpa_pass.sdpa_pass_backend
    finally:
        for table, old in zip((registry._BACKENDS, registry._COMPILER_FNS), saved):
            table.clear()
            table.update(old)
        registry._lazy_import.cache_clear()
        registry._discover_entrypoint_backends.cache_clear()


# Models work: eager's outputs and gradients ---------------------------------------------------

_PASS_THROUGH = [("seq", inner) for inner in INNER_BACKENDS] + [
    ("conv_bn_relu", inner) for inner in CHEAP_INNER_BACKENDS]


@pytest.mark.parametrize("model_name, inner", _PASS_THROUGH, ids=[f"{m}-{i}" for m, i in _PASS_THROUGH])
def test_model_without_attention_is_passed_through(model_name, inner):
    """test_backends.py _check_backend_works, in training: no site in the Report, and outputs,
    every gradient and BatchNorm's running statistics equal eager's."""
    model = Seq() if model_name == "seq" else ConvBnRelu()
    x = torch.randn(2, 10) if model_name == "seq" else torch.randn(2, 3, 8, 8)
    eager_model = copy.deepcopy(model)
    want_out, want_grads = _train_step(eager_model, x.clone().requires_grad_())
    compiled, reports = _compile(model, inner)
    out, grads = _train_step(compiled, x.clone().requires_grad_())
    torch.testing.assert_close(out, want_out)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], msg=f"grad of {name}")
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, dict(eager_model.named_buffers())[name], msg=name)
    assert reports and all(not r.sites for r in reports), [str(r) for r in reports]


@pytest.mark.parametrize("inner", INNER_BACKENDS)
def test_attention_is_rewritten_and_trains(inner):
    """The same with an attention site: rewritten, and output, input and parameter gradients
    equal float64 eager's (the backward runs the op's registered backward)."""
    model = causal_attention()
    x = _hidden(requires_grad=True)
    want = _float64_step(model, x)
    compiled, reports = _compile(model, inner)
    _assert_matches_float64(_train_step(compiled, x), want)
    assert _rewritten(reports) == [1], [str(r) for r in reports]


# The inner compiler's contract ---------------------------------------------------------------


def test_inner_backend_can_run_the_rewritten_graph_on_its_example_inputs():
    """test_backends.py test_example_inputs(_runtime_use): the inner compiler gets the
    rewritten graph with one placeholder per example input (the tril buffer stays an input even
    when the rewrite reads it differently), can run it at compile time on those inputs, and may
    return any callable that wraps it."""
    model = causal_attention().eval()
    x = _hidden()
    seen = {}

    def inner(gm, example_inputs):
        seen["placeholders"] = sum(n.op == "placeholder" for n in gm.graph.nodes)
        seen["example_inputs"] = len(example_inputs)
        seen["code"] = gm.code
        seen["at_compile"] = gm(*example_inputs)[0]

        def run(*args):
            outputs = gm.forward(*args)
            seen["at_run"] = outputs[0]
            return outputs

        return run

    compiled = torch.compile(model, backend="sdpa_pass", options={"backend": inner})
    with torch.no_grad():
        out = compiled(x)
        want = copy.deepcopy(model).double()(x.double())
    assert seen["placeholders"] == seen["example_inputs"] >= 2, seen
    assert ATTENTION_FORWARD in seen["code"] and "softmax" not in seen["code"]
    for what in ("at_compile", "at_run"):
        assert_close_to_reference(seen[what], want, torch.float32, what=what)
    assert out is seen["at_run"]


def test_boxed_aot_autograd_inner_backend():
    """test_backends.py test_aot_autograd_api: an inner backend built with aot_autograd and
    boxed forward / backward compilers receives our ops in its ATen graphs (not decomposed,
    no softmax left) and the gradients equal float64 eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    codes = {}

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            codes[kind] = gm.code
            return make_boxed_func(gm.forward)
        return compile_graph

    inner = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))
    model = causal_attention()
    x = _hidden(requires_grad=True)
    want = _float64_step(model, x)
    compiled, reports = _compile(model, inner)
    _assert_matches_float64(_train_step(compiled, x), want)
    assert "sdpa_pass.attention_forward" in codes["forward"], codes["forward"]
    assert "sdpa_pass.attention_backward" in codes["backward"], codes["backward"]
    assert not any("softmax" in code for code in codes.values())
    assert _rewritten(reports) == [1]


# options ---------------------------------------------------------------------------------------


def _scaled_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v


def test_options_reach_the_inner_backend():
    """Our keys (backend, on_report) are taken out; the rest reaches the inner compiler.
    Inductor checks its config keys: an unknown one fails the compile and names the key (at the
    first call; torch.compile(backend="inductor", options=...) checks them in torch.compile
    itself, a RuntimeError). test_backends.py test_backend_recompilation's switch
    _raise_error_for_testing fails the compile when on. eager and aot_eager ignore keys they
    do not know, as under torch.compile(backend="eager", options=...) (test_compile.py)."""
    q = torch.randn(1, 2, 6, 8)
    want = _scaled_attention(q.double(), q.double(), q.double())

    def compile_with(**options):
        torch._dynamo.reset()
        return torch.compile(_scaled_attention, backend="sdpa_pass", options=options)

    with pytest.raises(BackendCompilerFailed, match=r"torch\._inductor\.config\.no_such_option does not exist"):
        compile_with(backend="inductor", no_such_option=1)(q, q, q)
    with pytest.raises(BackendCompilerFailed, match="AssertionError"):
        compile_with(backend="inductor", _raise_error_for_testing=True)(q, q, q)
    reports = []
    out = compile_with(backend="inductor", _raise_error_for_testing=False, on_report=reports.append)(q, q, q)
    assert_close_to_reference(out, want, torch.float32)
    assert _rewritten(reports) == [1]
    for inner in CHEAP_INNER_BACKENDS:
        reports = []
        out = compile_with(backend=inner, no_such_option=2, on_report=reports.append)(q, q, q)
        assert_close_to_reference(out, want, torch.float32, what=inner)
        assert _rewritten(reports) == [1], inner


def test_compile_mode_is_accepted(monkeypatch, caplog):
    """torch.compile passes mode= to a backend named by string (a TypeError here before). It
    becomes Inductor's config for the mode, what `torch.compile(backend="inductor", mode=...)`
    applies, with explicit options winning; other inner compilers ignore it with a warning
    (torch.compile itself refuses mode and options together, so those two paths are called
    directly)."""
    import torch.fx as fx
    from torch._inductor import list_mode_options

    import sdpa_pass.backend as backend_module

    seen = []
    real = backend_module.make_backend
    monkeypatch.setattr(backend_module, "make_backend",
                        lambda backend, **kw: seen.append((backend, kw)) or real(backend, **kw))
    q = torch.randn(1, 2, 6, 8)
    with torch.no_grad():
        out = torch.compile(_scaled_attention, backend="sdpa_pass", mode="max-autotune-no-cudagraphs")(q, q, q)
    assert_close_to_reference(out, _scaled_attention(q.double(), q.double(), q.double()), torch.float32)
    assert seen == [("inductor", list_mode_options("max-autotune-no-cudagraphs"))]

    seen.clear()
    gm = fx.symbolic_trace(lambda x: x * 2.0)
    x = torch.randn(3)
    backend_module.sdpa_pass_backend(gm, [x], options={"backend": "inductor", "max_autotune": False},
                                     mode="max-autotune-no-cudagraphs")
    assert seen == [("inductor", {**list_mode_options("max-autotune-no-cudagraphs"), "max_autotune": False})]
    seen.clear()
    with caplog.at_level("WARNING", logger="sdpa_pass"):
        compiled = backend_module.sdpa_pass_backend(gm, [x], options={"backend": "aot_eager"},
                                                    mode="reduce-overhead")
    assert seen == [("aot_eager", {})] and "ignores it" in caplog.text
    out = compiled(x)
    assert torch.equal(out[0] if isinstance(out, (list, tuple)) else out, x * 2.0)


# fullgraph, dynamic shapes, recompiles ----------------------------------------------------------


def _attention_op_user(q, k, v):
    """Calls our op directly, as a model ported to it would."""
    return sdpa_pass.attention(q, k, v, is_causal=True) * 2.0


@pytest.mark.parametrize("entry", ["torch.compile", "optimize_assert"])
def test_fullgraph_no_graph_break(entry):
    """fullgraph=True (and torch._dynamo.optimize_assert, its older spelling) with a
    hand-written site and with a function calling our op: one graph each, no break, gradients
    through it equal float64 eager's."""
    counter = CompileCounterWithBackend("aot_eager")
    reports = []
    backend = sdpa_pass.make_backend(counter, on_report=reports.append)

    def compile_fn(fn):
        if entry == "torch.compile":
            return torch.compile(fn, backend=backend, fullgraph=True)
        return torch._dynamo.optimize_assert(backend)(fn)

    model = causal_attention()
    x = _hidden(requires_grad=True)
    want = _float64_step(model, x)
    _assert_matches_float64(_train_step(compile_fn(model), x), want)
    assert counter.frame_count == 1 and _rewritten(reports) == [1]

    q, k, v = (torch.randn(2, 2, 6, 16, requires_grad=True) for _ in range(3))
    out = compile_fn(_attention_op_user)(q, k, v)
    ref, _ = reference_attention(q, k, v, is_causal=True)
    assert_close_to_reference(out, ref * 2.0, torch.float32)
    grad_out = torch.randn(out.shape)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(ref * 2.0, (q, k, v), grad_out.double())
    for name, g, w in zip("qkv", got, expected):
        assert_close_to_reference(g, w, torch.float32, what=f"grad of {name}")
    assert counter.frame_count == 2
    assert ATTENTION_FORWARD in counter.graphs[1].code


@pytest.mark.parametrize("inner", INNER_BACKENDS)
def test_dynamic_one_compile_for_three_lengths(inner):
    """dynamic=True: one graph, rewritten once, serves sequence lengths 5, 7 and 11 (a slice of
    the tril buffer of symbolic size; the op's fake implementation on symbolic shapes), forward
    and backward; Inductor forward only (its backward would be one more C++ compile)."""
    counter = CompileCounterWithBackend(inner)
    model = causal_attention()
    compiled, reports = _compile(model, counter, dynamic=True)
    for T in (5, 7, 11):
        x = _hidden(T, requires_grad=True)
        want = _float64_step(model, x)
        model.zero_grad(set_to_none=True)
        if inner == "inductor":
            with torch.no_grad():
                assert_close_to_reference(compiled(x), want[0], torch.float32, what=f"T={T}: output")
        else:
            _assert_matches_float64(_train_step(compiled, x), want, what=f"T={T}: ")
    assert counter.frame_count == 1, f"{counter.frame_count} compiles: specialised on the length"
    assert _rewritten(reports) == [1]


def _causal_attention_fn(q, k, v):
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v


def test_recompile_on_dtype_change_and_after_reset():
    """A new dtype recompiles and the pass rewrites the new graph for it; the first dtype again
    reuses its graph; torch._dynamo.reset() forgets everything and the next call compiles anew."""
    counter = CompileCounterWithBackend("eager")
    compiled, reports = _compile(_causal_attention_fn, counter)
    torch.manual_seed(0)
    q32 = torch.randn(2, 2, 6, 16)
    q16 = q32.half()
    want = _causal_attention_fn(q32.double(), q32.double(), q32.double())
    for q, dtype, compiles in ((q32, torch.float32, 1), (q16, torch.float16, 2), (q32, torch.float32, 2)):
        out = compiled(q, q, q)
        assert out.dtype == dtype
        assert_close_to_reference(out, want, dtype, what=str(dtype))
        assert counter.frame_count == compiles, (dtype, counter.frame_count)
    assert [(r.num_rewritten, r.sites[0].dtype) for r in reports] == [(1, "float32"), (1, "float16")]
    torch._dynamo.reset()
    compiled(q32, q32, q32)
    assert counter.frame_count == 3 and len(reports) == 3


def test_deterministic_graph_for_the_same_model():
    """Compiling the same model twice (after a reset), and a fresh copy of it, gives the inner
    backend the same rewritten graph text and the same Report sites."""
    codes, reports = [], []

    def inner(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    model = causal_attention().eval()
    x = _hidden()
    for m in (model, model, copy.deepcopy(model)):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(m, backend="sdpa_pass", options={"backend": inner, "on_report": reports.append})(x)
    assert len(codes) == 3 and ATTENTION_FORWARD in codes[0]
    assert codes[0] == codes[1] == codes[2]
    assert reports[0].sites == reports[1].sites == reports[2].sites
    assert reports[0].graphs == reports[1].graphs == reports[2].graphs


# Grad mode, buffers, disable -----------------------------------------------------------------


@pytest.mark.parametrize("inner", CHEAP_INNER_BACKENDS)
def test_no_grad_block_inside_the_compiled_function(inner):
    """A torch.no_grad() block inside the compiled function around the attention: the site is
    rewritten, no gradient reaches its parameters, and the input's gradient (through the path
    outside the block) equals float64 eager's."""
    model = causal_attention()

    def gated(attn, x):
        h = x * 2.0
        with torch.no_grad():
            context = attn(h)
        return h * context.sigmoid()

    x = _hidden(requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    model64 = copy.deepcopy(model).double()
    want = gated(model64, x64)
    want.sum().backward()
    compiled, reports = _compile(gated, inner)
    out = compiled(model, x)
    out.sum().backward()
    assert_close_to_reference(out, want, torch.float32)
    assert_close_to_reference(x.grad, x64.grad, torch.float32, what="grad of input")
    assert all(p.grad is None for p in model.parameters())
    assert _rewritten(reports) == [1], [str(r) for r in reports]


@pytest.mark.parametrize("inner", CHEAP_INNER_BACKENDS)
def test_buffers_and_in_place_ops_around_attention(inner):
    """StatefulAttentionBlock, two training steps: outputs, gradients and every buffer (the
    counter, the running mean) equal float64 eager's after each; the site is rewritten."""
    model = StatefulAttentionBlock()
    model64 = copy.deepcopy(model).double()
    compiled, reports = _compile(model, inner)
    for step in range(2):
        x = _hidden(requires_grad=True)
        model.zero_grad(set_to_none=True)
        model64.zero_grad(set_to_none=True)
        want = _train_step(model64, x.detach().double().requires_grad_())
        _assert_matches_float64(_train_step(compiled, x), want, what=f"step {step}: ")
        assert int(model.calls) == int(model64.calls) == step + 1
        assert_close_to_reference(model.running_mean, model64.running_mean, torch.float32, what="running_mean")
    assert _rewritten(reports) == [1], [str(r) for r in reports]


@pytest.mark.parametrize("inner", CHEAP_INNER_BACKENDS)
def test_compiler_disable_on_a_submodule(inner):
    """A submodule under torch.compiler.disable runs eagerly: the pass never sees its site
    (two graphs, one site in all, rewritten), and the whole model still trains like float64
    eager."""
    model = CompiledThenDisabledSite()
    x = _hidden(requires_grad=True)
    want = _float64_step(model, x)
    compiled, reports = _compile(model, inner)
    _assert_matches_float64(_train_step(compiled, x), want)
    assert _rewritten(reports) == [1, 0], [str(r) for r in reports]
    assert sum(len(r.sites) for r in reports) == 1
