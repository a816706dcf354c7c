"""What rewritten sites run: ``sdpa_pass.implementation(...)``, ``optimize(implementation=...)``
and ``options={"implementation": ...}`` choosing among our Triton op, PyTorch's SDPA and the
float64 math reference (sdpa_pass/implementations.py).

Each choice equals eager float64 on a representative subset of the idiom catalogue — outputs,
and q/k/v gradients — with the expected call in the rewritten graph; a choice that cannot serve
a site falls back with its reason; a site nothing can serve stays as written. Our op under the
default choice is what tests/test_idioms.py checks on the whole catalogue.
"""

from __future__ import annotations

import logging

import expecttest
import pytest
import torch
import torch.nn.functional as F

import sdpa_pass
import sdpa_pass.implementations as implementations
from idioms import CATALOGUE, IDIOMS
from reference import assert_close_to_reference
from sdpa_pass import Implementation
from sdpa_pass.kernels.reference import attention_math
from test_idioms import DROPOUT_IDIOMS, as_float64, assert_outputs_match, reference_output

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

TARGETS = {
    "triton": torch.ops.sdpa_pass.attention_forward.default,
    "sdpa": torch.ops.aten.scaled_dot_product_attention.default,
    "math": attention_math,
}

# idiom -> what it covers; each choice serves every one of them but SDPA the soft-cap
FORWARD_IDIOMS = {
    "tensor_matmul_method": "no mask",
    "tril_ones_in_forward": "top-left causal (is_causal)",
    "masked_fill_eq0_neg_inf": "bool mask",
    "llama_eager_attention": "float additive mask, GQA by repeat_kv",
    "kv_cache_chunked_prefill_arange_causal": "bottom-right causal, L < S",
    "arange_sliding_window": "sliding window",
    "fully_masked_rows_neg_inf_nan": "rows with no visible key: NaN",
    "hf_eager_mask_causal_padding_in_graph": "finite fill: uniform rows, padding, GQA",
    "gemma2_softcap_attention": "soft-cap: SDPA falls back to our op",
}
FP16_IDIOMS = ["llama_eager_attention", "kv_cache_chunked_prefill_arange_causal",
               "hf_eager_mask_causal_padding_in_graph"]


def expected_implementation(choice: str, idiom: str, grad: bool = False) -> str:
    if choice == "sdpa" and (idiom == "gemma2_softcap_attention"
                             or (grad and idiom == "hf_eager_mask_causal_padding_in_graph")):
        return "triton"
    return choice


def compile_recording(fn, graphs, reports, **options):
    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, backend="sdpa_pass", fullgraph=True,
                         options={"backend": inner, "on_report": reports.append, **options})


def assert_sites_run(graphs, reports, want: str):
    sites = [s for r in reports for s in r.sites]
    assert sites and all(s.implementation == want for s in sites), "\n".join(map(str, reports))
    targets = {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    for name, target in TARGETS.items():
        assert (target in targets) == (name == want), f"{name} in the graph: {graphs[0].code}"
    assert not any("softmax" in str(t) for t in targets), graphs[0].code


FORWARD_CASES = [pytest.param(choice, name, torch.float32, id=f"{choice}-{name}-fp32")
                 for choice in ("triton", "sdpa", "math") for name in FORWARD_IDIOMS
                 if choice != "triton" or name in ("tensor_matmul_method", "gemma2_softcap_attention")]
FORWARD_CASES += [pytest.param(choice, name, torch.float16, id=f"{choice}-{name}-fp16")
                  for choice in ("sdpa", "math") for name in FP16_IDIOMS]


@pytest.mark.parametrize("choice,name,dtype", FORWARD_CASES)
def test_forward_matches_eager(choice, name, dtype):
    """The chosen implementation (or the fallback) is in the graph and equals eager float64."""
    fn, args = IDIOMS[name].build(dtype)
    graphs, reports = [], []
    with torch.no_grad():
        got = compile_recording(fn, graphs, reports, implementation=choice)(*args)
    assert_sites_run(graphs, reports, expected_implementation(choice, name))
    assert_outputs_match(IDIOMS[name], got, reference_output(fn, args), dtype)


GRAD_IDIOMS = ["tril_ones_in_forward", "llama_eager_attention",
               "kv_cache_chunked_prefill_arange_causal", "hf_eager_mask_causal_padding_in_graph",
               "fully_masked_rows_finfo_min_uniform"]


# our op's gradients are tests/test_backward.py's and test_training.py's: here once, on the
# site SDPA hands back to it
GRAD_CASES = [pytest.param(choice, name, id=f"{choice}-{name}") for choice in ("sdpa", "math")
              for name in GRAD_IDIOMS]
GRAD_CASES.append(pytest.param("triton", "hf_eager_mask_causal_padding_in_graph",
                               id="triton-hf_eager_mask_causal_padding_in_graph"))


@pytest.mark.parametrize("choice,name", GRAD_CASES)
def test_gradients_match_eager(choice, name):
    """Under aot_eager (AOTAutograd traces the op's autograd, SDPA's, or through the math
    function): q/k/v (every float input) gradients equal eager float64's, rows filled
    everywhere by masked_fill(finfo.min) included (SDPA: set to mean(V) after the call). With
    gradients, SDPA cannot give HF's additive-fill uniform rows theirs: that site falls back
    to our op."""
    fn, args = IDIOMS[name].build(torch.float32)
    args = tuple(a.requires_grad_() if a.is_floating_point() else a for a in args)
    ref_fn, ref_args = as_float64(fn, args)
    ref_args = tuple(a.detach().requires_grad_() if a.is_floating_point() else a for a in ref_args)
    ref_out = ref_fn(*ref_args)
    grad_out = torch.randn(ref_out.shape, dtype=torch.float64)
    floats = [i for i, a in enumerate(args) if a.is_floating_point()]
    ref_grads = torch.autograd.grad(ref_out, [ref_args[i] for i in floats], grad_out)

    reports = []
    compiled = torch.compile(fn, backend="sdpa_pass", fullgraph=True, options={
        "backend": "aot_eager", "implementation": choice, "on_report": reports.append})
    out = compiled(*args)
    grads = torch.autograd.grad(out, [args[i] for i in floats], grad_out.float())
    want = expected_implementation(choice, name, grad=True)
    assert [s.implementation for s in reports[0].sites] == [want], str(reports[0])
    assert_close_to_reference(out, ref_out, torch.float32)
    for i, g, g_ref in zip(floats, grads, ref_grads):
        assert_close_to_reference(g, g_ref, torch.float32, what=f"{name}: grad of input {i}")


def test_math_under_inductor():
    """The math reference is a plain function in the graph: Inductor compiles through it."""
    fn, args = IDIOMS["hf_eager_mask_causal_padding_in_graph"].build(torch.float32)
    reports = []
    compiled = sdpa_pass.optimize(fn, implementation="math", on_report=reports.append)
    with torch.no_grad():
        got = compiled(*args)
    assert [s.implementation for s in reports[0].sites] == ["math"]
    assert_outputs_match(IDIOMS["hf_eager_mask_causal_padding_in_graph"], got,
                         reference_output(fn, args), torch.float32)


def old_gpu(monkeypatch):
    monkeypatch.setattr(implementations, "device_capability", lambda device: (7, 5))


def softcap_attention(q, k, v):
    s = torch.tanh(q @ k.transpose(-2, -1) * 0.25 / 2.0) * 2.0
    return torch.softmax(s, dim=-1) @ v


def wide_head_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.05, dim=-1) @ v


def small_qkv(d=16):
    return torch.randn(1, 2, 5, d), torch.randn(1, 2, 7, d), torch.randn(1, 2, 7, d)


# (function, inputs, choices, what runs, words every reason must contain); None runs: skipped
FALLBACKS = {
    "sdpa_softcap": (softcap_attention, small_qkv, ["sdpa"], "triton", ["sdpa cannot serve: softcap"]),
    "sdpa_math_dropout": ("llama_dropout_in_training", None, ["sdpa", "math"], "triton",
                          ["sdpa cannot serve: dropout", "math cannot serve: dropout"]),
    "head_dim_320": (wide_head_attention, lambda: small_qkv(320), ["triton", "math"], "math",
                     ["triton cannot serve: head dim 320: our kernels take at most 256"]),
    "head_dim_320_default": (wide_head_attention, lambda: small_qkv(320), None, None,
                             ["triton cannot serve: head dim 320"]),
    "old_gpu": (softcap_attention, small_qkv, ["triton", "sdpa", "math"], "math",
                ["triton cannot serve: GPU sm_75: our kernels need sm_80+", "sdpa cannot serve: softcap"]),
    "old_gpu_nothing_serves": (softcap_attention, small_qkv, ["sdpa"], None,
                               ["sdpa cannot serve: softcap", "triton cannot serve: GPU sm_75"]),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallback_reason(case, monkeypatch, caplog):
    """A choice that cannot serve passes the site to the next (then our op), saying why in the
    site's note and, once per reason, in a warning; a site nothing serves stays as the user
    wrote it (reason no_implementation) and the model still equals eager."""
    fn, make, choices, runs, words = FALLBACKS[case]
    if isinstance(fn, str):
        fn, args = IDIOMS[fn].build(torch.float32)
    else:
        args = make()
    if case.startswith("old_gpu"):
        old_gpu(monkeypatch)
    monkeypatch.setattr(implementations, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="sdpa_pass"):
        for _ in range(2):
            with torch.no_grad(), sdpa_pass.implementation(choices or implementations.DEFAULT):
                report = sdpa_pass.explain(fn, *args)
    (site,) = report.sites
    text = site.implementation_note if runs else site.reason
    assert all(w in text for w in words), str(report)
    if runs is None:
        assert (site.status, site.reason_code, site.implementation) == ("skipped", "no_implementation", "")
    else:
        assert site.rewritten and site.implementation == runs, str(report)
        assert text.endswith(f"fell back to {runs}") and text in str(report)
    warnings = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
    assert len(warnings) == len(set(warnings)) == text.count("cannot serve"), warnings
    if runs is None and "train" not in case:
        with torch.no_grad():
            got = sdpa_pass.optimize(fn, backend="eager", implementation=choices or "triton")(*args)
        assert_close_to_reference(got, fn(*(a.double() for a in args)), torch.float32)


def test_context_manager_nests_and_restores():
    """As torch.nn.attention.sdpa_kernel: the innermost block wins, leaving one (by an
    exception too) restores the choice around it; one member, a name or an ordered list."""
    current = implementations.current_implementations
    assert current() == (Implementation.TRITON,)
    with sdpa_pass.implementation(["sdpa", "math", "sdpa"]) as outer:
        assert outer == current() == (Implementation.SDPA, Implementation.MATH)
        with sdpa_pass.implementation(Implementation.MATH):
            assert current() == (Implementation.MATH,)
            with pytest.raises(RuntimeError, match="boom"):
                with sdpa_pass.implementation("TRITON"):
                    assert current() == (Implementation.TRITON,)
                    raise RuntimeError("boom")
            assert current() == (Implementation.MATH,)
        assert current() == (Implementation.SDPA, Implementation.MATH)
    assert current() == (Implementation.TRITON,)


def plain_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def test_option_beats_context_and_choice_is_read_when_compiling():
    """optimize(implementation=...) beats the enclosing block; a block around a later call
    of the compiled function changes nothing (the choice is baked in when it compiles)."""
    q, k, v = small_qkv()
    reports = []
    with sdpa_pass.implementation("math"):
        compiled = sdpa_pass.optimize(plain_attention, backend="eager", implementation="sdpa",
                                      on_report=reports.append)
        compiled(q, k, v)
    assert [s.implementation for s in reports[0].sites] == ["sdpa"]
    torch._dynamo.reset()
    compiled = sdpa_pass.optimize(plain_attention, backend="eager", on_report=reports.append)
    with sdpa_pass.implementation("math"):
        compiled(q, k, v)           # compiles here: the block's choice
    with sdpa_pass.implementation("sdpa"):
        out = compiled(q, k, v)     # already compiled: no new graph
    assert [s.implementation for r in reports[1:] for s in r.sites] == ["math"]
    assert_close_to_reference(out, plain_attention(q.double(), k.double(), v.double()), torch.float32)


@pytest.mark.parametrize("bad,words", [([], "at least one choice"),
                                       ("cudnn", "unknown implementation 'cudnn'"),
                                       (["sdpa", "flash"], "unknown implementation 'flash'"),
                                       (3, "or an ordered list of them; got 3")])
def test_bad_choice_is_a_value_error(bad, words):
    with pytest.raises(ValueError, match=words):
        sdpa_pass.implementation(bad).__enter__()
    with pytest.raises(ValueError, match=words):
        sdpa_pass.optimize(plain_attention, implementation=bad)
    gm = torch.fx.symbolic_trace(plain_attention)
    with pytest.raises(ValueError, match=words):
        sdpa_pass.rewrite(gm, example_inputs=small_qkv(), implementation=bad)
    assert implementations.current_implementations() == (Implementation.TRITON,)


def test_backend_option_names_a_bad_choice():
    compiled = torch.compile(plain_attention, backend="sdpa_pass",
                             options={"backend": "eager", "implementation": "cudnn"})
    with pytest.raises(Exception, match="unknown implementation 'cudnn'"):
        compiled(*small_qkv())


def test_report_table_says_what_runs_and_why():
    q, k, v = small_qkv()
    with sdpa_pass.implementation(["sdpa"]), torch.no_grad():
        report = sdpa_pass.explain(softcap_attention, q, k, v)
    text = str(report)
    header = text.splitlines()[1].split()
    assert header[:4] == ["#", "source", "status", "runs"], text
    assert text.splitlines()[3].split()[3] == "triton", text
    assert "sdpa cannot serve: softcap (SDPA has no logit soft-capping); fell back to triton" in text


class GoldenSdpaGraph(expecttest.TestCase):
    def test_llama_style_graph_with_sdpa(self):
        """The golden graph of test_pass_api with implementation="sdpa": SDPA on the
        un-repeated K/V (enable_gqa), the additive mask as attn_mask, and rows the mask may
        empty set to NaN, as eager's softmax gives them."""

        def eager_attention_forward(query, key, value, attention_mask, scaling=0.25):
            key_states = key[:, :, None].expand(2, 2, 2, 5, 16).reshape(2, 4, 5, 16)
            value_states = value[:, :, None].expand(2, 2, 2, 5, 16).reshape(2, 4, 5, 16)
            attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
            attn_weights = attn_weights + attention_mask
            attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
            return torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()

        q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
        graphs, reports = [], []
        compile_recording(eager_attention_forward, graphs, reports,
                          implementation="sdpa")(q, k, k, torch.zeros(2, 1, 5, 5))
        self.assertExpectedInline(graphs[0].code.strip(), """\
def forward(self, L_key_ : torch.Tensor, L_query_ : torch.Tensor, L_attention_mask_ : torch.Tensor):
    l_key_ = L_key_
    l_query_ = L_query_
    l_attention_mask_ = L_attention_mask_
    scaled_dot_product_attention_default = torch.ops.aten.scaled_dot_product_attention.default(l_query_, l_key_, l_key_, l_attention_mask_, 0.0, False, scale = 0.25, enable_gqa = True);  l_query_ = l_key_ = None
    eq_scalar = torch.ops.aten.eq.Scalar(l_attention_mask_, -inf);  l_attention_mask_ = None
    all_dim = torch.ops.aten.all.dim(eq_scalar, -1, True);  eq_scalar = None
    where_scalar_self = torch.ops.aten.where.ScalarSelf(all_dim, nan, scaled_dot_product_attention_default);  all_dim = scaled_dot_product_attention_default = None
    transpose_1 = where_scalar_self.transpose(1, 2);  where_scalar_self = None
    contiguous = transpose_1.contiguous();  transpose_1 = None
    return (contiguous,)""")


CATALOGUE_CASES = [pytest.param(choice, i, id=f"{choice}-{i.name}")
                   for choice in ("sdpa", "math") for i in CATALOGUE
                   # dropout sites fall back to our op under both (see can_serve), whose
                   # draws tests/test_idioms.py checks against the kernels' own mask
                   if i.name not in DROPOUT_IDIOMS]


@pytest.mark.parametrize("choice,idiom", CATALOGUE_CASES)
def test_whole_catalogue_equals_eager(choice, idiom):
    """Every idiom of the catalogue under the sdpa and math choices, fp32 forward: the
    compiled function equals eager float64, the catalogue's sites are rewritten, and each runs
    the choice or names why it could not (then our op, which test_idioms checks)."""
    fn, args = idiom.build(torch.float32)
    expected = reference_output(fn, args)
    reports = []
    with torch.no_grad():
        got = torch.compile(fn, backend="sdpa_pass", fullgraph=True,
                            options={"backend": "eager", "implementation": choice,
                                     "on_report": reports.append})(*args)
    assert_outputs_match(idiom, got, expected, torch.float32)
    rewritten = [s for r in reports for s in r.sites if s.rewritten]
    assert len(rewritten) == idiom.expected_rewrites, "\n".join(map(str, reports))
    for site in rewritten:
        assert site.implementation == choice or (
            site.implementation == "triton" and f"{choice} cannot serve" in site.implementation_note
        ), f"{idiom.name}: runs {site.implementation} ({site.implementation_note})"
