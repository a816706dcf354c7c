"""Whole tiny Hugging Face models with attn_implementation="eager" through the pass.

Random-weight configs (hidden 32, 2 layers, vocab 64) and a padded batch, so the in-graph mask
building of transformers 5.x (masking_utils: arange, padding gather, where(0, finfo.min)) is
part of what the pass has to see through. Every attention layer must be rewritten and the
model output must not change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import sdpa_pass
import sdpa_pass.kernels.backward as backward_kernels
import sdpa_pass.kernels.decode as decode_kernels
import sdpa_pass.kernels.forward as forward_kernels
from sdpa_pass.kernels.forward import MASK_BOOL_ROW, mask_kind_of
from reference import DEVICE

VOCAB, SEQ, PAD = 64, 10, 3


@dataclass(frozen=True)
class HFCase:
    name: str
    make_model: Callable[[], torch.nn.Module]
    attention_class: str  # the module that holds one eager attention computation
    output: str  # "logits" or "last_hidden_state"
    left_padding: bool
    # float64 eager where it is clean; see the Llama case for why not always.
    reference_dtype: torch.dtype


def tiny_llama_gqa():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager",
    ))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    ))


def tiny_bert():
    return BertModel(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, attn_implementation="eager",
    ))


CASES = [
    # Llama in float64 is not a clean reference: eager_attention_forward computes
    # softmax(..., dtype=torch.float32), which turns float64's finfo.min padding fill into -inf
    # and the left-padded rows into NaN. So Llama is compared with fp32 eager.
    HFCase("llama_gqa_left_padding", tiny_llama_gqa, "LlamaAttention", "logits", True, torch.float32),
    HFCase("gpt2_right_padding", tiny_gpt2, "GPT2Attention", "logits", False, torch.float64),
    HFCase("bert_right_padding", tiny_bert, "BertSelfAttention", "last_hidden_state", False, torch.float64),
]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def build(case):
    model = case.make_model().eval()
    input_ids = torch.randint(3, VOCAB, (2, SEQ))
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    if case.left_padding:
        attention_mask[1, :PAD] = 0
    else:
        attention_mask[1, SEQ - PAD :] = 0
    return model, input_ids, attention_mask


def count_attention_modules(model, case):
    return sum(1 for m in model.modules() if type(m).__name__ == case.attention_class)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_explain_rewrites_every_attention_layer(case):
    model, input_ids, attention_mask = build(case)
    layers = count_attention_modules(model, case)
    assert layers == 2, f"expected one {case.attention_class} per layer, found {layers}"
    with torch.no_grad():
        report = sdpa_pass.explain(model, input_ids, attention_mask=attention_mask)
    assert [site.status for site in report.sites] == ["rewritten"] * layers, str(report)
    assert report.num_rewritten == layers, str(report)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_model_matches_eager(case):
    model, input_ids, attention_mask = build(case)
    reference_model = copy.deepcopy(model).to(case.reference_dtype)
    with torch.no_grad():
        expected = getattr(reference_model(input_ids, attention_mask=attention_mask), case.output)
        compiled = torch.compile(model, backend="sdpa_pass", options={"backend": "eager"})
        got = getattr(compiled(input_ids, attention_mask=attention_mask), case.output)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_padding_reaches_the_kernels_as_a_key_row(case, monkeypatch):
    """What the rewritten graph hands the kernels for HF's padding is a bool mask that is one
    row of keys per batch element, which they read as a vector of keys and skip the padded
    key tiles of (``MASK_BOOL_ROW``, ``KEY_SPAN``: tests/test_padding_span.py), not a mask
    with rows of its own."""
    monkeypatch.setenv("SDPA_PASS_LAUNCH_PLANS", "0")  # decide every call afresh
    kinds = []

    def recorded(*args):
        kinds.append(mask_kind_of(*args))
        return kinds[-1]

    # every kernel family that reads a mask decides its kind here (on a GPU these short
    # GQA rows go to the split-KV decode kernel, in the interpreter to the forward)
    for module in (forward_kernels, backward_kernels, decode_kernels):
        monkeypatch.setattr(module, "mask_kind_of", recorded)
    # on the kernels' device: CPU tensors outside the interpreter take the torch fallback
    model, input_ids, attention_mask = (t.to(DEVICE) for t in build(case))
    compiled = torch.compile(model, backend="sdpa_pass", options={"backend": "eager"})
    with torch.no_grad():
        compiled(input_ids, attention_mask=attention_mask)
    assert len(kinds) == 2 and set(kinds) == {MASK_BOOL_ROW}, kinds
