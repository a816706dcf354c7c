"""Greedy generation through the pass: ``sdpa_pass.optimize(model)`` then ``model.generate``
gives exactly eager's tokens.

Tiny random decoders (no download), left-padded and unpadded batches, HF's default dynamic
cache and a static cache. Prefill is an L x S attention; each decode step is one query row
against the cache (bottom-right aligned by HF's mask), so every step goes through a rewritten
site too: the test also counts that the decode graphs were rewritten, not left to eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import sdpa_pass

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

COMMON = dict(vocab_size=96, num_hidden_layers=2, attn_implementation="eager", pad_token_id=0)
MODELS = {
    "llama_gqa": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, **COMMON)),
    "mistral_sliding_window": lambda: T.MistralForCausalLM(T.MistralConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, sliding_window=5, **COMMON)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_head=4, n_positions=64,
                                                   vocab_size=96, n_layer=2,
                                                   attn_implementation="eager", pad_token_id=0)),
}
NEW_TOKENS = 6


def _prompt(left_padding: bool):
    torch.manual_seed(1)
    ids = torch.randint(1, 96, (2, 9))
    mask = torch.ones_like(ids)
    if left_padding:
        ids[1, :3] = 0
        mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("left_padding", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("name", MODELS)
def test_generate_tokens_equal_eager(name, left_padding, cache):
    torch.manual_seed(0)
    eager = MODELS[name]().eval()
    model = copy.deepcopy(eager)
    ids, mask = _prompt(left_padding)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                  min_new_tokens=NEW_TOKENS)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    reports = []
    with torch.no_grad():
        want = eager.generate(ids, **kwargs)
        sdpa_pass.optimize(model, backend="eager", on_report=reports.append)
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, want), f"optimized {got[:, 9:].tolist()} != eager {want[:, 9:].tolist()}"
    sites = [site for report in reports for site in report.sites]
    assert sites and all(site.rewritten for site in sites), "\n".join(map(str, reports))
    # the prefill graph and at least one one-token decode graph were rewritten
    assert len(reports) >= 2, f"{len(reports)} compiled graph(s)"
