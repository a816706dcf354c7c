"""More transformers families through the pass (the families issue's list, started): tiny
random configs with attn_implementation="eager", a left-padded batch, every attention module
rewritten and the output equal to eager."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import sdpa_pass

DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, attn_implementation="eager")
FAMILIES = {
    # name: (config, model class, attention sites)
    "qwen2_gqa": (lambda: T.Qwen2Config(**DECODER, num_key_value_heads=2), T.Qwen2ForCausalLM, 2),
    "mistral_sliding_window": (lambda: T.MistralConfig(**DECODER, num_key_value_heads=2, sliding_window=4),
                               T.MistralForCausalLM, 2),
    "gemma2_softcap": (lambda: T.Gemma2Config(**DECODER, num_key_value_heads=2, head_dim=16),
                       T.Gemma2ForCausalLM, 2),
    "phi3": (lambda: T.Phi3Config(**DECODER, num_key_value_heads=4, pad_token_id=0), T.Phi3ForCausalLM, 2),
    "gpt_neox": (lambda: T.GPTNeoXConfig(**DECODER), T.GPTNeoXForCausalLM, 2),
    "opt": (lambda: T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=32, attn_implementation="eager"),
            T.OPTForCausalLM, 2),
    "falcon_mqa": (lambda: T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, multi_query=True, attn_implementation="eager"),
                   T.FalconForCausalLM, 2),
    "roberta": (lambda: T.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, attn_implementation="eager"), T.RobertaModel, 2),
    "distilbert": (lambda: T.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                              attn_implementation="eager"), T.DistilBertModel, 2),
    # encoder self, decoder self and cross attention per layer
    "t5_position_bias": (lambda: T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                            attn_implementation="eager"), T.T5Model, 6),
    "bart": (lambda: T.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, attn_implementation="eager"), T.BartModel, 6),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_rewritten_and_equal_to_eager(name):
    make_config, model_class, sites = FAMILIES[name]
    torch.manual_seed(0)
    model = model_class(make_config()).eval()
    ids = torch.randint(3, 60, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask)
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(ids, **kwargs)
        report = sdpa_pass.explain(model, ids, **kwargs)
        got = torch.compile(model, backend="sdpa_pass", options={"backend": "eager"})(ids, **kwargs)
    torch._dynamo.reset()
    assert report.num_rewritten == sites == len(report.sites), str(report)
    key = "logits" if "logits" in expected else "last_hidden_state"
    torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4)
