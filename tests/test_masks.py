"""Masks built in the graph become kernel predicates (issue 6).

For each way models build a mask in ``forward`` (``tril`` / ``triu`` of ``ones``, arange
comparisons with a cache offset, sliding windows, ``where(mask, 0, -inf / finfo.min)``,
HF's ``masking_utils`` with a padding mask), the report shows the lifted form, the rewritten
graph holds no L x S tensor, and outputs and gradients equal the float64 eager function. With
``dynamic=True`` one graph serves every length. Masks that are not provably causal / window
(a disjunction, a slope of 2, a chunked mask, a buffer's values) stay tensors, with a reason,
and still give eager's answer.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import masking_utils

import sdpa_pass
from reference import DEVICE, assert_close_to_reference

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

B, H, D = 2, 2, 8
NEG_INF = float("-inf")


def _scores(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def _attend(s, v):
    return torch.softmax(s, dim=-1) @ v


def _positions(q, k):
    L, S = q.shape[-2], k.shape[-2]
    return torch.arange(L, device=q.device), torch.arange(S, device=q.device), L, S


# ---------------------------------------------------------------- constructions (q, k, v, pad)

def tril_bool(q, k, v, pad):
    L, S = q.shape[-2], k.shape[-2]
    m = torch.tril(torch.ones(L, S, dtype=torch.bool, device=q.device))
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def tril_float_eq_zero(q, k, v, pad):
    """nanoGPT's test, on a mask built in forward: masked_fill(mask == 0, -inf)."""
    L, S = q.shape[-2], k.shape[-2]
    m = torch.ones(L, S, device=q.device).tril().view(1, 1, L, S)
    return _attend(_scores(q, k).masked_fill(m[:, :, :L, :S] == 0, NEG_INF), v)


def triu_fill_min(q, k, v, pad):
    L, S = q.shape[-2], k.shape[-2]
    m = torch.triu(torch.ones(L, S, dtype=torch.bool, device=q.device), diagonal=1)
    s = _scores(q, k)
    return _attend(s.masked_fill(m, torch.finfo(s.dtype).min), v)


def tril_diagonal_2(q, k, v, pad):
    L, S = q.shape[-2], k.shape[-2]
    m = torch.ones(L, S, device=q.device).tril(diagonal=2).bool()
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def tril_diagonal_minus_1_fill_min(q, k, v, pad):
    """Row 0 sees no key: eager's masked_fill(finfo.min) averages it uniformly."""
    L, S = q.shape[-2], k.shape[-2]
    m = torch.tril(torch.ones(L, S, dtype=torch.bool, device=q.device), diagonal=-1)
    s = _scores(q, k)
    return _attend(torch.where(m, s, torch.finfo(s.dtype).min), v)


def arange_cache_offset(q, k, v, pad):
    """KV cache: query i sits at position S - L + i (chunked prefill / decode)."""
    i, j, L, S = _positions(q, k)
    q_pos = i + (S - L)
    m = j[None, :] <= q_pos[:, None]
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def sliding_window_3(q, k, v, pad):
    i, j, L, S = _positions(q, k)
    m = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - 3)
    return _attend(_scores(q, k).masked_fill(m.logical_not(), NEG_INF), v)


def where_additive_inf(q, k, v, pad):
    i, j, L, S = _positions(q, k)
    bias = torch.where(i.unsqueeze(-1) >= j.unsqueeze(0), 0.0, NEG_INF)
    return _attend(_scores(q, k) + bias, v)


def causal_and_padding_fill_min(q, k, v, pad):
    L, S = q.shape[-2], k.shape[-2]
    causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    m = causal[None, None] & pad.bool()[:, None, None, :]
    s = _scores(q, k)
    return _attend(s.masked_fill(~m, torch.finfo(s.dtype).min), v)


def _hf_mask(mask_function):
    def hf(q, k, v, pad):
        L, S = q.shape[-2], k.shape[-2]
        mask = masking_utils.eager_mask(
            batch_size=q.shape[0], q_length=L, kv_length=S, q_offset=S - L,
            mask_function=mask_function, attention_mask=pad.bool(), dtype=q.dtype,
            device=q.device)
        return _attend(_scores(q, k) + mask, v)
    hf.__name__ = f"hf_eager_mask_{mask_function.__name__}"
    return hf


hf_causal = _hf_mask(masking_utils.causal_mask_function)
hf_sliding = _hf_mask(masking_utils.sliding_window_causal_mask_function(3))
hf_sliding.__name__ = "hf_eager_mask_sliding_window_3"


def bias_plus_causal(q, k, v, pad):
    """A float bias (kept as a tensor) next to a causal mask (lifted)."""
    i, j, L, S = _positions(q, k)
    bias = -(i[:, None] - j[None, :]).abs().float() * 0.5
    s = _scores(q, k) + bias.to(q.dtype)
    return _attend(s.masked_fill(j[None, :] > i[:, None], NEG_INF), v)


# not lifted: not provably a causal offset or a window
def prefix_lm_disjunction(q, k, v, pad):
    i, j, L, S = _positions(q, k)
    m = (j[None, :] <= i[:, None]) | (j[None, :] < 2)
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def slope_two(q, k, v, pad):
    i, j, L, S = _positions(q, k)
    m = j[None, :] <= 2 * i[:, None]
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def chunked_and_causal(q, k, v, pad):
    """Llama-4 style chunks: the chunk test stays a tensor, the causal part is lifted."""
    i, j, L, S = _positions(q, k)
    m = (j[None, :] // 2 == i[:, None] // 2) & (j[None, :] <= i[:, None])
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def _softcapped_causal_fill_min(q, k, v, diagonal):
    L, S = q.shape[-2], k.shape[-2]
    m = torch.tril(torch.ones(L, S, dtype=torch.bool, device=q.device), diagonal=diagonal)
    s = 5.0 * torch.tanh(_scores(q, k) / 5.0)
    return _attend(s.masked_fill(~m, torch.finfo(s.dtype).min), v)


def softcap_causal_fill_min(q, k, v, pad):
    """Gemma 2: soft-capped scores, then a finfo.min causal fill. Every row sees its diagonal
    key, so no row is filled everywhere and the predicate is exact with soft-capping too."""
    return _softcapped_causal_fill_min(q, k, v, 0)


def softcap_row_filled_everywhere(q, k, v, pad):
    """The same with tril(diagonal=-1): row 0 is filled everywhere and averages uniformly in
    eager, which the op cannot do with soft-capping; the mask stays a tensor."""
    return _softcapped_causal_fill_min(q, k, v, -1)


def constant_term_written_in_place(q, k, v, pad):
    """A constant-looking term whose tensor an in-place op changes before it is read: the
    zeros are not what the comparison sees, so the term must not be read as all True."""
    i, j, L, S = _positions(q, k)
    parity = torch.zeros(S, dtype=torch.long, device=q.device)
    parity.add_(j % 2)
    m = (j[None, :] <= i[:, None]) & (parity[None, :] == 0)
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def _gather_indices(q, k):
    """HF 5's index-based mask: batch, query and key aranges as (B, 1, 1, 1), (1, 1, L, 1),
    (1, 1, 1, S) index tensors."""
    i, j, L, S = _positions(q, k)
    b = torch.arange(q.shape[0], device=q.device)
    return b[:, None, None, None], i[None, None, :, None], j[None, None, None, :], L, S


def positions_gathered_causal(q, k, v, pad):
    """transformers 5: causal as ``position_ids[b, kv] <= position_ids[b, q]`` with position_ids
    an arange expanded over the batch, read through advanced indexing."""
    b, i, j, L, S = _gather_indices(q, k)
    pos = torch.arange(S, device=q.device)[None, :].expand(q.shape[0], -1)
    m = pos[b, j] <= pos[b, i + (S - L)]
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def packed_sequence_term(q, k, v, pad):
    """transformers 5 without an attention mask: causal and ``seq[b, q] == seq[b, kv]`` with
    ``seq = cumsum(diff(position_ids) != 1)``, all True for position_ids = arange: the diff of
    positions is the constant 1, so seq is 0 for every length (dynamic shapes too)."""
    b, i, j, L, S = _gather_indices(q, k)
    pos = torch.arange(L, device=q.device)[None, :].expand(q.shape[0], -1)
    seq = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    m = (j <= i) & (seq[b, i] == seq[b, j])
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def packed_two_sequences(q, k, v, pad):
    """Two sequences packed in one row (positions restart at L // 2): the packed-sequence term
    hides the first sequence's keys from the second's queries, so it is no constant and
    stays a tensor next to the lifted causal part."""
    b, i, j, L, S = _gather_indices(q, k)
    half = torch.arange(L // 2, device=q.device)
    pos = torch.cat([half, half])[None, :].expand(q.shape[0], -1)
    seq = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    m = (j <= i) & (seq[b, i] == seq[b, j])
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def positions_from_the_padding(q, k, v, pad):
    """position_ids from the caller's mask (HF's ``cumsum(mask) - 1``): a graph input's values,
    so the gathered comparison stays a tensor."""
    b, i, j, L, S = _gather_indices(q, k)
    pos = pad.cumsum(-1) - 1
    m = pos[b, j] <= pos[b, i]
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def gather_index_may_wrap(q, k, v, pad):
    """An index that can be -1 wraps around in eager (x[-1] is the last element): not read."""
    b, i, j, L, S = _gather_indices(q, k)
    pos = torch.arange(S, device=q.device)[None, :].expand(q.shape[0], -1)
    m = pos[b, j - 1] <= pos[b, i]
    return _attend(_scores(q, k).masked_fill(~m, NEG_INF), v)


def written_in_place(q, k, v, pad):
    """The SDPA docs' reference: zeros, then masked_fill_ in place. The zeros node is not what
    the mask holds when read; the mask must not be read as all-zero."""
    L, S = q.shape[-2], k.shape[-2]
    bias = torch.zeros(L, S, dtype=q.dtype, device=q.device)
    keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    bias.masked_fill_(keep.logical_not(), NEG_INF)
    s = _scores(q, k)
    s += bias
    return _attend(s, v)


def written_by_setitem(q, k, v, pad):
    i, j, L, S = _positions(q, k)
    bias = torch.zeros(L, S, dtype=q.dtype, device=q.device)
    view = bias[:, :]
    view[j[None, :] > i[:, None]] = NEG_INF   # through a view of the zeros
    return _attend(_scores(q, k) + bias, v)


class BufferMask(torch.nn.Module):
    """nanoGPT keeps its causal mask in a buffer: its values are not in the graph."""

    def __init__(self, n=16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

    def forward(self, q, k, v, pad):
        T = q.shape[-2]
        return _attend(_scores(q, k).masked_fill(self.bias[:, :, :T, :T] == 0, NEG_INF), v)


# name: (function, L, S, causal column, mask form, L x S tensor allowed in the rewritten graph)
CASES = {
    "tril_bool": (tril_bool, 6, 6, "top-left", "predicate", False),
    "tril_float_eq_zero": (tril_float_eq_zero, 6, 6, "top-left", "predicate", False),
    "triu_fill_min": (triu_fill_min, 6, 6, "top-left", "predicate", False),
    "tril_diagonal_2": (tril_diagonal_2, 6, 6, "top-left+2", "predicate", False),
    "tril_diagonal_minus_1_fill_min": (tril_diagonal_minus_1_fill_min, 6, 6, "top-left-1",
                                       "predicate", False),
    "arange_cache_offset": (arange_cache_offset, 5, 9, "bottom-right", "predicate", False),
    # one query row at the end of the cache sees every key: the mask is proven all-true and goes
    "arange_cache_offset_decode": (arange_cache_offset, 1, 9, "none", "none", False),
    "sliding_window_3": (sliding_window_3, 7, 7, "top-left, window 3", "predicate", False),
    "where_additive_inf": (where_additive_inf, 6, 6, "top-left", "predicate", False),
    "causal_and_padding_fill_min": (causal_and_padding_fill_min, 6, 6, "top-left",
                                    "predicate+tensor", False),
    "hf_causal": (hf_causal, 6, 6, "top-left", "predicate+tensor", False),
    "hf_causal_cache": (hf_causal, 3, 7, "bottom-right", "predicate+tensor", False),
    "hf_sliding_window_3": (hf_sliding, 7, 7, "top-left, window 3", "predicate+tensor", False),
    "bias_plus_causal": (bias_plus_causal, 6, 6, "top-left", "predicate+tensor", True),
    "chunked_and_causal": (chunked_and_causal, 6, 6, "top-left", "predicate+tensor", True),
    "constant_term_written_in_place": (constant_term_written_in_place, 6, 6, "top-left",
                                       "predicate+tensor", True),
    "softcap_causal_fill_min": (softcap_causal_fill_min, 6, 6, "top-left", "predicate", False),
    "softcap_row_filled_everywhere": (softcap_row_filled_everywhere, 6, 6, "none", "tensor", True),
    "positions_gathered_causal": (positions_gathered_causal, 6, 6, "top-left", "predicate", False),
    "positions_gathered_cache": (positions_gathered_causal, 3, 7, "bottom-right", "predicate", False),
    "packed_sequence_term": (packed_sequence_term, 6, 6, "top-left", "predicate", False),
    "packed_two_sequences": (packed_two_sequences, 6, 6, "top-left", "predicate+tensor", True),
    "positions_from_the_padding": (positions_from_the_padding, 6, 6, "none", "tensor", True),
    "gather_index_may_wrap": (gather_index_may_wrap, 6, 6, "none", "tensor", True),
    "prefix_lm_disjunction": (prefix_lm_disjunction, 6, 6, "none", "tensor", True),
    "slope_two": (slope_two, 6, 6, "none", "tensor", True),
    "buffer_mask": (BufferMask(), 6, 6, "none", "tensor", True),
    "written_in_place": (written_in_place, 6, 6, "none", "tensor", True),
    "written_by_setitem": (written_by_setitem, 6, 6, "none", "tensor", True),
}


def _inputs(L, S, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(DEVICE, dtype) for n in (L, S, S))
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, :2] = 0  # left padding on the second sequence
    return q, k, v, pad.to(DEVICE)


def _compile(fn, dynamic=False):
    graphs, reports = [], []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fn, backend="sdpa_pass", dynamic=dynamic,
                             options={"backend": inner, "on_report": reports.append})
    return compiled, graphs, reports


def _reference(fn, q, k, v, pad):
    args = [t.detach().double().requires_grad_() for t in (q, k, v)]
    fn64 = copy.deepcopy(fn).double() if isinstance(fn, torch.nn.Module) else fn
    out = fn64(*args, pad)
    return out, args


def _lxs_nodes(gm, L, S):
    found = []
    for node in gm.graph.nodes:
        t = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (L, S):
            found.append(f"{node.name} {tuple(t.shape)}")
    return found


@pytest.mark.parametrize("name", CASES)
def test_lifted_form_graph_and_values(name):
    fn, L, S, causal, form, lxs_allowed = CASES[name]
    if isinstance(fn, torch.nn.Module):
        fn = copy.deepcopy(fn).to(DEVICE)
    q, k, v, pad = _inputs(L, S)
    for t in (q, k, v):
        t.requires_grad_()
    compiled, graphs, reports = _compile(fn)
    out = compiled(q, k, v, pad)
    site = reports[0].sites[0]
    assert site.rewritten, str(reports[0])
    assert (site.causal, site.mask_form) == (causal, form), str(reports[0])
    if form == "tensor":
        assert site.mask_note, "a mask left as a tensor says why"
    if not lxs_allowed:
        assert D not in (L, S)
        assert _lxs_nodes(graphs[0], L, S) == [], "an L x S tensor is left in the rewritten graph"
    ref, args = _reference(fn, q, k, v, pad)
    assert_close_to_reference(out, ref, torch.float32)
    assert not ref.isnan().any()  # no construction here empties a row under -inf
    g = torch.randn_like(ref)
    out.backward(g.to(out.dtype))
    ref.backward(g)
    for t, t_ref, what in zip((q, k, v), args, "qkv"):
        assert_close_to_reference(t.grad, t_ref.grad, torch.float32, what=f"d{what}")


@pytest.mark.parametrize("name", ["tril_bool", "triu_fill_min", "hf_causal", "hf_sliding_window_3"])
def test_lifted_fp16(name):
    """fp16 inputs: HF's fill is finfo(float16).min = -65504, which an fp16 score plus it does
    not round to; such a site keeps its mask as a tensor (the kernel's answer equals eager's
    there only while no row is masked everywhere), the others lift."""
    fn, L, S, causal, form, _ = CASES[name]
    q, k, v, pad = _inputs(L, S, torch.float16)
    compiled, graphs, reports = _compile(fn)
    out = compiled(q, k, v, pad)
    site = reports[0].sites[0]
    assert site.rewritten, str(reports[0])
    if name.startswith("hf"):
        assert site.mask_form == "tensor" and "not large enough" in site.mask_note, str(reports[0])
    else:
        assert (site.causal, site.mask_form) == (causal, form), str(reports[0])
    ref, _ = _reference(fn, q, k, v, pad)
    if name.startswith("hf"):
        # rows masked everywhere (left padding) differ in eager fp16 itself; compare the rest
        ok = ~ref.isnan().any(-1, keepdim=True) & pad.bool()[:, None, -L:, None].expand_as(ref)
        out, ref = out[ok], ref[ok]
    assert_close_to_reference(out, ref, torch.float16)


# lengths that vary between calls, with one compiled graph
DYNAMIC = {
    "tril_bool": [(5, 5), (7, 7), (9, 9)],
    "sliding_window_3": [(5, 5), (8, 8), (11, 11)],
    "arange_cache_offset": [(3, 6), (3, 8), (4, 11)],
    "hf_causal": [(5, 5), (7, 7), (9, 9)],
    "hf_causal_cache": [(3, 6), (3, 8), (4, 11)],
    "packed_sequence_term": [(5, 5), (7, 7), (9, 9)],
}


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_lengths_one_graph(name):
    fn = CASES[name][0]
    compiled, graphs, reports = _compile(fn, dynamic=True)
    for L, S in DYNAMIC[name]:
        q, k, v, pad = _inputs(L, S, seed=L * 100 + S)
        with torch.no_grad():
            out = compiled(q, k, v, pad)
        ref, _ = _reference(fn, q, k, v, pad)
        assert_close_to_reference(out, ref, torch.float32, what=f"output at L={L}, S={S}")
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled for {len(DYNAMIC[name])} lengths"
    site = reports[0].sites[0]
    assert site.mask_form.startswith("predicate"), str(reports[0])


def test_explain_names_the_lifted_form():
    """``explain()`` prints the predicate in the causal column and, for a mask kept as a
    tensor, why it was."""
    q, k, v, pad = _inputs(5, 9)
    text = str(sdpa_pass.explain(arange_cache_offset, q, k, v, pad))
    assert "bottom-right" in text, text
    q, k, v, pad = _inputs(6, 6)
    text = str(sdpa_pass.explain(prefix_lm_disjunction, q, k, v, pad))
    assert "mask kept as a tensor" in text, text


def test_padding_rows_masked_everywhere_average_uniformly_with_gradients():
    """A left-padded query row under causal & padding filled with finfo.min sees no key: eager
    averages every value, and its gradient goes to V only (masked_fill cuts q and k off)."""
    q, k, v, pad = _inputs(6, 6)
    pad[1, :4] = 0
    for t in (q, k, v):
        t.requires_grad_()
    compiled, _, reports = _compile(causal_and_padding_fill_min)
    out = compiled(q, k, v, pad)
    assert reports[0].sites[0].mask_form == "predicate+tensor"
    ref, args = _reference(causal_and_padding_fill_min, q, k, v, pad)
    assert_close_to_reference(out, ref, torch.float32)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    for t, t_ref, what in zip((q, k, v), args, "qkv"):
        assert_close_to_reference(t.grad, t_ref.grad, torch.float32, what=f"d{what}")


def test_sdpa_reading_of_the_lifted_mask():
    """The lifted bottom-right predicate means what SDPA's causal_lower_right means."""
    from torch.nn.attention.bias import causal_lower_right

    q, k, v, pad = _inputs(3, 8)
    compiled, _, _ = _compile(arange_cache_offset)
    with torch.no_grad():
        out = compiled(q, k, v, pad)
        want = F.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(),
                                              attn_mask=causal_lower_right(3, 8))
    assert_close_to_reference(out, want, torch.float32)


# ---------------------------------------------------------------- transformers models

import transformers as T  # noqa: E402

_COMMON = dict(vocab_size=64, num_hidden_layers=2, attn_implementation="eager")
HF_MODELS = {
    # name: (model factory, lifted causal column, mask form)
    "llama": (lambda: T.LlamaModel(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        **_COMMON)), "top-left", "predicate+tensor"),
    "mistral": (lambda: T.MistralModel(T.MistralConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=4, **_COMMON)), "top-left, window 4", "predicate+tensor"),
    "gpt2": (lambda: T.GPT2Model(T.GPT2Config(
        n_embd=32, n_head=4, n_layer=2, vocab_size=64, attn_implementation="eager")),
        "top-left", "predicate+tensor"),
    "bert": (lambda: T.BertModel(T.BertConfig(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, **_COMMON)),
        "none", "tensor"),
}


def _hf_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :3] = 0   # left padding (decoders) / padded keys (encoders)
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_model_masks_lifted(name):
    """HF 5.x builds its masks in forward; every site gets the predicate plus the (B, 1, 1, S)
    padding mask, no L x S tensor is left in the rewritten graph, and the hidden states equal
    the eager model's (padded query rows included: they average uniformly there). The eager
    model in float64 is no reference here: its finfo(float64).min fill overflows to -inf."""
    factory, causal, form = HF_MODELS[name]
    torch.manual_seed(0)
    model = factory().eval().to(DEVICE)
    ref_model = copy.deepcopy(model)
    n = 11
    ids, mask = _hf_inputs(n)
    compiled, graphs, reports = _compile(model)
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask).last_hidden_state
        ref = ref_model(ids, attention_mask=mask).last_hidden_state
    sites = [s for r in reports for s in r.sites]
    assert len(sites) == 2 and all(s.rewritten for s in sites), str(reports[0])
    assert {(s.causal, s.mask_form) for s in sites} == {(causal, form)}, str(reports[0])
    assert all(s.mask == f"bool (2, 1, 1, {n})" for s in sites), str(reports[0])
    assert _lxs_nodes(graphs[0], n, n) == []
    assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_hf_decoder_without_a_mask_is_plain_causal(name):
    """No attention mask and no cache (training, or a prefill with ``use_cache=False``):
    transformers 5 builds causal from ``position_ids[b, kv] <= position_ids[b, q]`` and ANDs a
    packed-sequence term ``seq[b, q] == seq[b, kv]`` over ``cumsum(diff(position_ids) != 1)``;
    with position_ids an in-graph arange both are positions or all True, so the site is the
    plain predicate with no tensor at all, and equals eager in float64."""
    factory, causal, _ = HF_MODELS[name]
    torch.manual_seed(0)
    model = factory().eval().to(DEVICE)
    n = 11
    ids, _ = _hf_inputs(n)
    compiled, graphs, reports = _compile(model)
    with torch.no_grad():
        out = compiled(ids, use_cache=False).last_hidden_state
        ref = copy.deepcopy(model).double()(ids, use_cache=False).last_hidden_state
    sites = [s for r in reports for s in r.sites]
    assert len(sites) == 2 and all(s.rewritten for s in sites), str(reports[0])
    assert {(s.causal, s.mask_form, s.mask) for s in sites} == {(causal, "predicate", "none")}, \
        str(reports[0])
    assert _lxs_nodes(graphs[0], n, n) == []
    assert_close_to_reference(out, ref, torch.float32)


def test_hf_llama_dynamic_lengths_one_graph():
    """``dynamic=True``: one rewritten graph serves prompts of 7, 10 and 13 tokens."""
    torch.manual_seed(0)
    model = HF_MODELS["llama"][0]().eval().to(DEVICE)
    ref_model = copy.deepcopy(model)
    compiled, graphs, reports = _compile(model, dynamic=True)
    for n in (7, 10, 13):
        ids, mask = _hf_inputs(n, seed=n)
        with torch.no_grad():
            out = compiled(ids, attention_mask=mask).last_hidden_state
            ref = ref_model(ids, attention_mask=mask).last_hidden_state
        assert_close_to_reference(out, ref, torch.float32, what=f"hidden states at {n} tokens")
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 lengths"
    assert all(s.mask_form == "predicate+tensor" for s in reports[0].sites), str(reports[0])
