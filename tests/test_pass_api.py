"""The three ways to use the pass — the backend by name, optimize(), explain() — and rewrite()
on graphs that did not come from Dynamo, plus one golden rewritten graph."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sdpa_pass
from reference import assert_close_to_reference


class CausalSelfAttention(nn.Module):
    """nanoGPT model.py CausalSelfAttention (the non-flash branch), small."""

    def __init__(self, n_embd=32, n_head=4, block_size=16):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def _model_and_input():
    torch.manual_seed(0)
    return CausalSelfAttention().eval(), torch.randn(2, 11, 32)


def _float64(model, x):
    import copy
    return copy.deepcopy(model).double()(x.double())


def test_backend_by_name_with_inner_backends():
    model, x = _model_and_input()
    ref = _float64(model, x)
    for options in ({"backend": "eager"}, {"backend": "aot_eager"}, None):
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend="sdpa_pass", options=options)(x)
        assert_close_to_reference(out, ref, torch.float32)


def test_backend_inner_callable_sees_the_rewritten_graph():
    model, x = _model_and_input()
    seen = []

    def inner(gm, example_inputs):
        seen.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="sdpa_pass", options={"backend": inner})(x)
    assert len(seen) == 1
    assert "torch.ops.sdpa_pass.attention_forward" in seen[0]
    assert "softmax" not in seen[0]


def test_entry_point_registers_backend_without_import():
    """After pip install, backend="sdpa_pass" works in a process that never imports us."""
    code = textwrap.dedent("""
        import torch
        f = lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        q = torch.randn(1, 2, 5, 8)
        out = torch.compile(f, backend="sdpa_pass", options={"backend": "eager"})(q, q, q)
        import sys
        assert "sdpa_pass" in sys.modules, "the backend was not loaded through its entry point"
        torch.testing.assert_close(out, f(q, q, q))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_optimize_module_keeps_the_module():
    model, x = _model_and_input()
    ref = _float64(model, x)
    keys = set(model.state_dict())
    torch._dynamo.reset()
    optimized = sdpa_pass.optimize(model, backend="eager")
    assert optimized is model and set(optimized.state_dict()) == keys
    assert optimized.n_head == 4
    with torch.no_grad():
        assert_close_to_reference(optimized(x), ref, torch.float32)


def test_optimize_function():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)

    def attn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v

    torch._dynamo.reset()
    out = sdpa_pass.optimize(attn, backend="eager")(q, k, v)
    assert_close_to_reference(out, attn(q.double(), k.double(), v.double()), torch.float32)


def test_explain_report_table_graphs_and_logging(caplog):
    model, x = _model_and_input()
    with caplog.at_level(logging.INFO, logger="sdpa_pass"), torch.no_grad():
        report = sdpa_pass.explain(model, x)
    assert report.num_rewritten == 1 and len(report.sites) == 1
    site = report.sites[0]
    assert site.status == "rewritten" and site.source.startswith("test_pass_api.py:")
    assert site.mask.startswith("bool (1, 1, 11, 11)") and site.scale == 1.0 / math.sqrt(8)
    text = str(report)
    for column in ("source", "status", "mask", "causal", "GQA", "dtype", "reason"):
        assert column in text
    assert "1 of 1 attention sites rewritten" in text
    before, after = report.graphs[0].before, report.graphs[0].after
    assert "softmax" in before and "attention_forward" not in before
    assert "sdpa_pass.attention_forward" in after and "softmax" not in after
    assert any("rewrote attention at test_pass_api.py" in r.getMessage() for r in caplog.records)


def test_explain_reports_the_kernels_the_sites_ran():
    """explain()'s Report.kernels: the kernel-choice line of each launch plan the rewritten
    site made (plans dropped first, so a second explain() logs again), also in its text; the
    ``sdpa_pass.kernels`` logger as it was after."""
    model, x = _model_and_input()
    with torch.no_grad():
        sdpa_pass.explain(model, x)  # its plans made: the second call still logs
        report = sdpa_pass.explain(model, x)
    assert len(report.kernels) == 1 and report.kernels[0].startswith("forward B"), report.kernels
    assert ": Triton (" in report.kernels[0] or report.kernels[0].endswith(": Gluon")
    assert "kernels run (a line per launch plan):\n  forward B" in str(report)
    assert logging.getLogger("sdpa_pass.kernels").propagate


def test_kernel_choices_collect_each_plans_line():
    """KernelChoices (sdpa_pass/report.py; model.py records each row's with it): the
    ``sdpa_pass.kernels`` lines of a real forward and backward (distinct, in order) while
    installed, none passed on to the root logger's handlers; the logger's level, handlers and
    propagation as they were after."""
    from sdpa_pass.kernels import attention
    from sdpa_pass.kernels.launch import clear_plans
    from sdpa_pass.report import KernelChoices
    logger = logging.getLogger("sdpa_pass.kernels")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    seen = []
    root_handler = logging.Handler()
    root_handler.emit = seen.append
    logging.getLogger().addHandler(root_handler)
    clear_plans()
    try:
        with KernelChoices() as choices:
            for _ in range(2):  # the second call runs the plans: nothing new
                q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
                attention(q, k, v, is_causal=True).sum().backward()
            logger.debug("forward x")
            logger.debug("forward x")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert [line.split(" B1 ")[0] for line in choices.lines] == ["forward", "backward", "forward x"]
    assert not [r for r in seen if r.name == "sdpa_pass.kernels"]
    assert (logger.level, logger.handlers, logger.propagate) == (level, handlers, propagate)


def test_explain_says_why_a_site_is_left_alone():
    def returns_probs(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return p @ v, p

    q = torch.randn(1, 2, 5, 8)
    report = sdpa_pass.explain(returns_probs, q, q, q)
    assert report.num_rewritten == 0
    assert report.sites[0].reason_code == "probs_used_elsewhere"
    assert "probs_used_elsewhere" in str(report)


def test_rewrite_symbolic_trace_graph_with_example_inputs():
    """symbolic_trace graphs carry no shapes: rewrite() propagates the example inputs'."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.softmax = nn.Softmax(dim=-1)  # a leaf module under symbolic_trace
            self.dropout = nn.Dropout(0.1)

        def forward(self, q, k, v, mask):
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
            scores = scores.masked_fill(mask == 0, -1e9)
            return torch.matmul(self.dropout(self.softmax(scores)), v)

    torch.manual_seed(0)
    model = Attention().eval()
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    mask = (torch.rand(2, 1, 1, 9) > 0.3).int()
    ref = model(q.double(), k.double(), v.double(), mask)
    gm = torch.fx.symbolic_trace(model)
    assert sdpa_pass.rewrite(gm).num_rewritten == 0  # no shapes, nothing proven
    report = sdpa_pass.rewrite(gm, example_inputs=(q, k, v, mask))
    assert report.num_rewritten == 1, str(report)
    assert any(n.target is torch.ops.sdpa_pass.attention_forward.default for n in gm.graph.nodes)
    assert_close_to_reference(gm(q, k, v, mask), ref, torch.float32)


class GoldenGraph(expecttest.TestCase):
    def test_rewritten_llama_style_graph(self):
        """HF eager_attention_forward with repeat_kv, scaling and an additive mask becomes one
        op call on the un-repeated K/V (native GQA), the mask passed as it is."""

        def eager_attention_forward(query, key, value, attention_mask, scaling=0.25):
            def repeat_kv(hidden_states, n_rep):
                batch, num_key_value_heads, slen, head_dim = hidden_states.shape
                hidden_states = hidden_states[:, :, None, :, :].expand(
                    batch, num_key_value_heads, n_rep, slen, head_dim)
                return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)

            key_states = repeat_kv(key, 2)
            value_states = repeat_kv(value, 2)
            attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
            attn_weights = attn_weights + attention_mask
            attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
            attn_weights = F.dropout(attn_weights, p=0.0, training=False)
            attn_output = torch.matmul(attn_weights, value_states)
            return attn_output.transpose(1, 2).contiguous()

        q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
        mask = torch.zeros(2, 1, 5, 5)
        codes = []

        def inner(gm, example_inputs):
            codes.append(gm.code.strip())
            return gm.forward

        torch._dynamo.reset()
        torch.compile(eager_attention_forward, backend="sdpa_pass",
                      options={"backend": inner})(q, k, k, mask)
        self.assertExpectedInline(codes[0], """\
def forward(self, L_key_ : torch.Tensor, L_query_ : torch.Tensor, L_attention_mask_ : torch.Tensor):
    l_key_ = L_key_
    l_query_ = L_query_
    l_attention_mask_ = L_attention_mask_
    attention_forward_default = torch.ops.sdpa_pass.attention_forward.default(l_query_, l_key_, l_key_, l_attention_mask_, None, 0.25, 0, 0, -1, 0.0, True, False);  l_query_ = l_key_ = l_attention_mask_ = None
    getitem_2 = attention_forward_default[0];  attention_forward_default = None
    transpose_1 = getitem_2.transpose(1, 2);  getitem_2 = None
    contiguous = transpose_1.contiguous();  transpose_1 = None
    return (contiguous,)""")


def test_training_through_a_rewritten_site():
    """Gradients flow through the rewritten op (its autograd registration) under aot_eager:
    every parameter's gradient equals the float64 eager one."""
    import copy

    model, x = _model_and_input()
    model.train()  # no dropout in this block: the site is rewritten in training too
    ref_model = copy.deepcopy(model).double()
    ref_model(x.double()).square().sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sdpa_pass", options={"backend": "aot_eager"})
    compiled(x).square().sum().backward()
    report = sdpa_pass.explain(copy.deepcopy(model), x)
    assert report.num_rewritten == 1
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert_close_to_reference(p.grad, p_ref.grad, torch.float32, what=f"grad of {name}")


def test_fill_and_additive_bias_on_one_site_need_no_gradient():
    """masked_fill(finfo.min) and an additive bias on one site: rewritten for inference,
    left alone with its reason when a gradient flows (rows filled everywhere would get the
    gradient of the wrong one; kernels/ops.py mask_fills)."""
    def fill_and_bias(q, k, v, keep, bias):
        s = q @ k.transpose(-2, -1) + bias
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        return torch.softmax(s, dim=-1) @ v

    q = torch.randn(1, 2, 5, 8)
    keep, bias = torch.rand(5, 5) > 0.3, torch.randn(1, 1, 5, 5)
    with torch.no_grad():
        assert sdpa_pass.explain(fill_and_bias, q, q, q, keep, bias).num_rewritten == 1
    report = sdpa_pass.explain(fill_and_bias, q.requires_grad_(), q, q, keep, bias)
    assert [s.reason_code for s in report.sites] == ["not_provable"], str(report)
    assert "finite fill and an additive bias" in report.sites[0].reason


def test_inner_inductor_options_reach_inductor():
    """options={"backend": "inductor", <Inductor config>}: the config reaches Inductor as its
    config patches (as torch.compile(backend="inductor", options=...) passes them; this once
    failed with compile_fx() got an unexpected keyword argument 'options')."""
    seen = []

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v

    q = torch.randn(1, 2, 8, 16)
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="sdpa_pass",
                             options={"backend": "inductor", "max_autotune": False,
                                      "on_report": seen.append})
    try:
        out = compiled(q, q, q)
    finally:
        torch._dynamo.reset()
    assert seen and seen[0].num_rewritten == 1, seen
    assert_close_to_reference(out, attend(q.double(), q.double(), q.double()), torch.float32)
