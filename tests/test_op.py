"""The ``torch.ops.sdpa_pass`` operator: opcheck, tracing under torch.compile, the CPU path."""

from __future__ import annotations

import pytest
import torch

import sdpa_pass  # noqa: F401  (registers torch.ops.sdpa_pass)
from sdpa_pass.kernels import attention
from sdpa_pass.kernels.checks import AttentionShape
from sdpa_pass.kernels.cpu import attention_forward_cpu
from reference import DEVICE, assert_close_to_reference, randn, reference_attention

OP = torch.ops.sdpa_pass.attention_forward.default


def _args(dtype=torch.float32, mask="bool", causal_align=2, window=-1, softcap=0.0, lse=True):
    q, k, v = randn(2, 4, 9, 16, dtype=dtype), randn(2, 2, 13, 16, dtype=dtype), randn(2, 2, 13, 16, dtype=dtype)
    attn_mask = None
    if mask == "bool":
        attn_mask = (torch.rand(1, 1, 9, 13) > 0.2).to(DEVICE)
    elif mask == "float":
        attn_mask = randn(2, 1, 1, 13, dtype=dtype)
    kpm = torch.ones(2, 13, dtype=torch.bool, device=DEVICE)
    return (q, k, v, attn_mask, kpm, 0.25, causal_align, 0, window, softcap, False, lse)


@pytest.mark.parametrize("case", [
    dict(), dict(mask="float", causal_align=0), dict(mask=None, window=4),
    dict(mask=None, softcap=20.0, lse=False), dict(dtype=torch.float16),
], ids=str)
def test_opcheck(case):
    torch.manual_seed(0)
    # Forward-only inputs here; tests/test_backward.py runs opcheck with inputs that require
    # grad, including test_autograd_registration.
    torch.library.opcheck(OP, _args(**case),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiles_fullgraph(backend):
    torch.manual_seed(0)
    q, k, v = randn(2, 4, 9, 16), randn(2, 2, 13, 16), randn(2, 2, 13, 16)
    bias = randn(2, 1, 1, 13)

    def f(q, k, v, bias):
        out = attention(q * 2.0, k, v, bias, causal="bottom_right", enable_gqa=True)
        return out.transpose(1, 2).relu()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    expected = f(q, k, v, bias)
    torch.testing.assert_close(compiled(q, k, v, bias), expected)


@pytest.mark.parametrize("route", ["sdpa", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpu_path(dtype, route):
    """The path CPU tensors take without TRITON_INTERPRET: SDPA's CPU kernel or chunks."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 21, 24).to(dtype), torch.randn(2, 2, 30, 24).to(dtype),
               torch.randn(2, 2, 30, 24).to(dtype))
    shape = AttentionShape(2, 4, 2, 21, 30, 24, 24)
    if route == "sdpa":
        kw = dict(attn_mask=None, kpm=None, causal_align=1, window=-1, softcap=0.0, lse=False)
        ref_kw = dict(is_causal=True)
    else:
        kw = dict(attn_mask=torch.rand(1, 4, 21, 30) > 0.3, kpm=torch.rand(2, 30) > 0.2,
                  causal_align=2, window=9, softcap=7.0, lse=True)
        ref_kw = dict(attn_mask=kw["attn_mask"], key_padding_mask=kw["kpm"], causal="bottom_right",
                      window=9, softcap=7.0)
    out, lse = attention_forward_cpu(
        q, k, v, kw["attn_mask"], kw["kpm"], shape, scale=0.2, causal_align=kw["causal_align"],
        diagonal=0, window=kw["window"], softcap=kw["softcap"], nan_on_empty=True,
        return_lse=kw["lse"],
    )
    ref, ref_lse = reference_attention(q, k, v, scale=0.2, empty_rows="nan", **ref_kw)
    assert_close_to_reference(out, ref, dtype)
    if kw["lse"]:
        assert_close_to_reference(lse, ref_lse, torch.float32, what="lse")


@pytest.mark.parametrize("mask", ["float", "bool"])
def test_eager_attention_gradients_equal_the_ops_registered_autograd(mask):
    """An eager ``attention()`` call that needs a gradient runs the op's autograd formula as a
    plain autograd.Function (kernels/__init__.py, _EagerAttention); the gradients are bitwise
    those of calling the op itself through its torch.library autograd registration, the float
    mask's included."""
    q, k, v, attn_mask, kpm, scale, causal_align, *_ = _args(mask=mask)
    leaves = [q, k, v] + ([attn_mask] if mask == "float" else [])
    grad_out = randn(2, 4, 9, 16)

    def grads(via_op):
        inputs = [t.detach().clone().requires_grad_() for t in leaves]
        qq, kk, vv = inputs[:3]
        m = inputs[3] if mask == "float" else attn_mask
        if via_op:
            out, _ = torch.ops.sdpa_pass.attention_forward(
                qq, kk, vv, m, kpm, scale, causal_align, 0, -1, 0.0, False, True)
        else:
            out = attention(qq, kk, vv, m, scale=scale, causal="bottom_right", enable_gqa=True,
                            key_padding_mask=kpm)
            assert type(out.grad_fn).__name__ == "_EagerAttentionBackward"
        return torch.autograd.grad(out, inputs, grad_out)

    for a, b in zip(grads(via_op=False), grads(via_op=True)):
        assert torch.equal(a, b)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher's Python mode."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher_only_when_nothing_needs_it(monkeypatch):
    """A plain eager forward + backward, or forward without grad, runs the ops'
    implementations directly (ops.dispatch_free); under a dispatch mode, the profiler, or for a backward that builds
    its own graph (create_graph=True), the calls go through torch.ops so the mode sees them,
    the profiler names them and the op's missing derivative is reported. The gradients are
    the same either way."""
    import sdpa_pass.kernels.ops as ops

    q, k, v, attn_mask, kpm, scale, *_ = _args(mask="float")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad_out = randn(2, 4, 9, 16)
    # The implementations after the inputs' check (which ``attention`` ran already), and the
    # check inside the ops module: only the op's implementations (the dispatcher's route) run
    # it again.
    direct = []
    for name in ("_forward_checked", "_backward_checked", "check_attention_inputs"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **kw: (
            direct.append(_name), _real(*a, **kw))[1])
    implementations = ["_forward_checked", "_backward_checked"]
    through_ops = ["check_attention_inputs", "_forward_checked",
                   "check_attention_inputs", "_backward_checked"]

    def grads():
        out = attention(*leaves, attn_mask, scale=scale, enable_gqa=True, key_padding_mask=kpm)
        return torch.autograd.grad(out, leaves, grad_out)

    plain = grads()
    assert direct == implementations
    with torch.no_grad():
        attention(*leaves, attn_mask, scale=scale, enable_gqa=True, key_padding_mask=kpm)
    assert direct == implementations + ["_forward_checked"]
    direct.clear()
    with _OpNames() as mode:
        moded = grads()
    assert "sdpa_pass.attention_forward" in mode.names
    assert "sdpa_pass.attention_backward" in mode.names
    assert direct == through_ops
    direct.clear()
    with torch.profiler.profile() as prof:
        profiled = grads()
    names = {event.name for event in prof.events()}
    assert {"sdpa_pass::attention_forward", "sdpa_pass::attention_backward"} <= names
    assert direct == through_ops  # the op's registration ran its implementation, once
    for a, b, c in zip(plain, moded, profiled):
        assert torch.equal(a, b) and torch.equal(a, c)
    direct.clear()
    out = attention(*leaves, attn_mask, scale=scale, enable_gqa=True, key_padding_mask=kpm)
    (dq,) = torch.autograd.grad(out, leaves[0], grad_out, create_graph=True)
    assert direct == ["_forward_checked"] + through_ops[2:]
    assert dq.requires_grad  # through the op's autograd registration, not the plain function


def test_dispatch_free_refuses_what_the_dispatcher_must_see():
    """ops.dispatch_free: plain tensors with nothing active only; a tensor subclass, a
    torch-function mode (``torch.device`` as a context is one), a dispatch mode, a functorch
    transform or the profiler each send the call through torch.ops."""
    from sdpa_pass.kernels.ops import dispatch_free

    x = torch.zeros(2)
    assert dispatch_free(x, None, x)

    class Sub(torch.Tensor):
        pass

    assert not dispatch_free(x, x.as_subclass(Sub))
    with torch.device("cpu"):
        assert not dispatch_free(x)
    with _OpNames():
        assert not dispatch_free(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(dispatch_free(x)) or t)(torch.zeros(3, 2))
    assert seen == [False]
    with torch.profiler.profile():
        assert not dispatch_free(x)
    assert dispatch_free(x)
