"""More transformers families through the pass: tiny random configs with
attn_implementation="eager", every attention module rewritten and the outputs equal to eager.

Three checks per family, each through one compile whose report is read from the same graphs
that produce the output (``sdpa_pass.make_backend(..., on_report=...)``):
- inference in fp32, left-padded batch (text families), every output tensor equal to eager;
- training (a subset): every dropout probability 0 in the config, one forward + backward,
  the loss and every parameter gradient equal to eager's;
- fp16 inference (a subset), judged against fp32 eager of the same weights (see below).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers as T

import sdpa_pass

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, attn_implementation="eager")
BATCH, SEQ, PAD = 2, 9, 2


def padded_ids(left_padding):
    ids = torch.randint(3, 60, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if left_padding:
        mask[1, :PAD] = 0
    else:
        mask[1, SEQ - PAD:] = 0
    return ids, mask


def text_inputs(config, left_padding=True):
    ids, mask = padded_ids(left_padding)
    kwargs = dict(attention_mask=mask)
    if config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    return (ids,), kwargs


def speech_inputs(config, left_padding=True):
    # WhisperModel: log-mel features (B, mel bins, 2 * max_source_positions) into the encoder
    # (no encoder mask: Whisper attends to every frame), a padded decoder batch.
    features = torch.randn(BATCH, config.num_mel_bins, 2 * config.max_source_positions)
    ids, mask = padded_ids(left_padding)
    return (features,), dict(decoder_input_ids=ids, decoder_attention_mask=mask)


def image_inputs(config, left_padding=True):
    return (torch.randn(BATCH, config.num_channels, config.image_size, config.image_size),), {}


def text_and_image_inputs(config, left_padding=True):
    # CLIP: causal text tower with its padding mask (right padding, as its tokenizer pads), plus
    # the vision tower
    args, kwargs = text_inputs(config.text_config, left_padding=False)
    vision = config.vision_config
    kwargs["pixel_values"] = torch.randn(BATCH, vision.num_channels, vision.image_size, vision.image_size)
    return args, kwargs


@dataclass(frozen=True)
class Family:
    make_config: Callable[[], T.PretrainedConfig]
    model_class: type
    sites: int  # attention computations per forward (one per attention module call)
    make_inputs: Callable = text_inputs


def _clip_config():
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=16, patch_size=4)
    return T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, attn_implementation="eager")


FAMILIES = {
    "qwen2_gqa": Family(lambda: T.Qwen2Config(**DECODER, num_key_value_heads=2), T.Qwen2ForCausalLM, 2),
    "qwen3_qk_norm_gqa": Family(lambda: T.Qwen3Config(**DECODER, num_key_value_heads=2, head_dim=8),
                                T.Qwen3ForCausalLM, 2),
    "mistral_sliding_window": Family(lambda: T.MistralConfig(**DECODER, num_key_value_heads=2, sliding_window=4),
                                     T.MistralForCausalLM, 2),
    "gemma_mqa": Family(lambda: T.GemmaConfig(**DECODER, num_key_value_heads=1, head_dim=8),
                        T.GemmaForCausalLM, 2),
    "gemma2_softcap": Family(lambda: T.Gemma2Config(**DECODER, num_key_value_heads=2, head_dim=16),
                             T.Gemma2ForCausalLM, 2),
    "phi3": Family(lambda: T.Phi3Config(**DECODER, num_key_value_heads=4, pad_token_id=0), T.Phi3ForCausalLM, 2),
    "gpt_neox": Family(lambda: T.GPTNeoXConfig(**DECODER), T.GPTNeoXForCausalLM, 2),
    "opt": Family(lambda: T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                      num_attention_heads=4, word_embed_proj_dim=32, attn_implementation="eager"),
                  T.OPTForCausalLM, 2),
    "falcon_mqa": Family(lambda: T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, multi_query=True,
                                                attn_implementation="eager"),
                         T.FalconForCausalLM, 2),
    "roberta": Family(lambda: T.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64,
                                              attn_implementation="eager"), T.RobertaModel, 2),
    "distilbert": Family(lambda: T.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                    attn_implementation="eager"), T.DistilBertModel, 2),
    "vit": Family(lambda: T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, image_size=16, patch_size=4,
                                      attn_implementation="eager"), T.ViTModel, 2, image_inputs),
    # text tower (causal + padding mask) and vision tower, one layer each
    "clip": Family(_clip_config, T.CLIPModel, 2, text_and_image_inputs),
    # encoder self, decoder self and cross attention per layer
    "t5_position_bias": Family(lambda: T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                  num_heads=4, attn_implementation="eager"), T.T5Model, 6),
    "bart": Family(lambda: T.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, attn_implementation="eager"), T.BartModel, 6),
    # one encoder and one decoder layer: encoder self, decoder self, cross attention (scale split on q and k)
    "whisper": Family(lambda: T.WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1,
                                              decoder_layers=1, encoder_attention_heads=4,
                                              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                              max_source_positions=8, max_target_positions=16, pad_token_id=0,
                                              bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                              attn_implementation="eager"),
                      T.WhisperModel, 3, speech_inputs),
}


def compile_with_report(model, inner="eager"):
    report = sdpa_pass.Report()
    return torch.compile(model, backend=sdpa_pass.make_backend(inner, on_report=report.extend)), report


def output_tensors(output):
    """Every tensor an HF ModelOutput holds, nested outputs (CLIP's towers) included."""
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            yield key, value
        elif isinstance(value, T.utils.ModelOutput):
            yield from ((f"{key}.{k}", v) for k, v in output_tensors(value))


def assert_every_site_rewritten(report, family):
    assert len(report.sites) == family.sites, str(report)
    assert report.num_rewritten == family.sites, str(report)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_rewritten_and_equal_to_eager(name):
    family = FAMILIES[name]
    model = family.model_class(family.make_config()).eval()
    args, kwargs = family.make_inputs(model.config)
    compiled, report = compile_with_report(model)
    with torch.no_grad():
        expected = dict(output_tensors(model(*args, **kwargs)))
        got = dict(output_tensors(compiled(*args, **kwargs)))
    assert_every_site_rewritten(report, family)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4, msg=lambda m: f"{key}: {m}")


def without_dropout(config):
    for key, value in config.to_dict().items():
        if "drop" in key and isinstance(value, float):  # dropout, *_dropout_prob, *_pdrop, layerdrop
            setattr(config, key, 0.0)
    return config


def loss_of(output):
    # Each output against fixed random weights. Not sum-of-squares: after a final LayerNorm /
    # RMSNorm (T5, BART) the mean square is ~1 whatever the input, so every gradient below
    # the norm would be ~0 and compare only rounding noise.
    weights = torch.Generator().manual_seed(0)
    return sum((value.float() * torch.randn(value.shape, generator=weights)).mean()
               for _, value in output_tensors(output))


# fp32 on both sides: loss and gradients agree to accumulation-order noise (as test_training)
LOSS_TOL, GRAD_REL_TOL = 1e-5, 1e-4


# A subset, one per kind of attention code: Gemma 2 (GQA, soft-capping), RoBERTa (BERT-style
# encoder, padding mask), T5 (learned position bias: a float-mask gradient, no scale), Whisper
# (encoder-decoder with cross attention; its attention is BART's, copied). Llama (GQA) and GPT-2
# train in test_training.py.
@pytest.mark.parametrize("name", ["gemma2_softcap", "roberta", "t5_position_bias", "whisper"])
def test_family_trains_like_eager(name):
    family = FAMILIES[name]
    eager = family.model_class(without_dropout(family.make_config())).train()
    assert all(m.p == 0 for m in eager.modules() if isinstance(m, torch.nn.Dropout))
    model = copy.deepcopy(eager)
    args, kwargs = family.make_inputs(eager.config)
    compiled, report = compile_with_report(model, inner="aot_eager")

    loss_eager = loss_of(eager(*args, **kwargs))
    loss = loss_of(compiled(*args, **kwargs))
    assert_every_site_rewritten(report, family)
    torch.testing.assert_close(loss, loss_eager, atol=LOSS_TOL, rtol=LOSS_TOL)
    loss_eager.backward()
    loss.backward()
    # A key projection's bias gets a gradient that is exactly 0 in exact arithmetic (it adds
    # q . b to a whole score row, and softmax ignores a per-row shift): both sides hold rounding
    # noise there (~1e-13), so errors are relative to max(the parameter's gradient, 1e-6 x the
    # whole model's gradient).
    total = torch.stack([p.grad.norm() for p in eager.parameters() if p.grad is not None]).norm()
    for (param_name, p), p_eager in zip(model.named_parameters(), eager.parameters()):
        if p_eager.grad is None:
            assert p.grad is None, param_name
            continue
        err = (p.grad - p_eager.grad).norm() / torch.maximum(p_eager.grad.norm(), 1e-6 * total)
        assert err <= GRAD_REL_TOL, f"grad of {param_name}: relative error {err:.2e}"


# Not BART: in fp16 its encoder layer branches on torch.isfinite(hidden_states).all(), a
# graph break, and the resumed graph is compiled once for both layers, so the report counts
# 5 sites for 6 attention calls.
@pytest.mark.parametrize("name", ["qwen2_gqa", "whisper"])
def test_family_fp16_as_accurate_as_eager_fp16(name):
    # The reference is fp32 eager with the same weights, not fp16 eager: fp16 eager is itself an
    # approximation (scores and the value product rounded to fp16), while the kernel keeps
    # scores, softmax and accumulation in fp32, so "equal to fp16 eager" would test rounding
    # noise, not correctness. The rewrite must be at most twice as far from fp32 as fp16 eager
    # is (plus 1e-3 so a lucky-small eager error does not make the bound meaningless).
    # Right padding: with left padding, padding query rows of the decoder see no key, and eager
    # fp16 adds finfo(fp16).min in fp16 where the kernel adds it in fp32 (README, Limits).
    assert_half_as_accurate_as_eager(FAMILIES[name], torch.float16, "cpu", left_padding=False,
                                     slack=1e-3)


def _to(x, device, dtype=None):
    if not isinstance(x, torch.Tensor):
        return x
    return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)


def assert_half_as_accurate_as_eager(family, dtype, device, left_padding, slack):
    """The family in ``dtype`` through the pass is at most twice as far from fp32 eager (same
    weights) as eager in ``dtype`` is, plus ``slack``."""
    model32 = family.model_class(family.make_config()).eval().to(device)
    model16 = copy.deepcopy(model32).to(dtype)
    args, kwargs = family.make_inputs(model32.config, left_padding=left_padding)
    args, kwargs = [_to(a, device) for a in args], {k: _to(v, device) for k, v in kwargs.items()}
    args16 = [_to(a, device, dtype) for a in args]
    compiled, report = compile_with_report(copy.deepcopy(model16))
    with torch.no_grad():
        reference = dict(output_tensors(model32(*args, **kwargs)))
        eager16 = dict(output_tensors(model16(*args16, **kwargs)))
        got = dict(output_tensors(compiled(*args16, **kwargs)))
    assert_every_site_rewritten(report, family)
    assert {s.dtype for s in report.sites} == {str(dtype).replace("torch.", "")}, str(report)
    for key, ref in reference.items():
        assert got[key].dtype == dtype, key
        eager_err = (eager16[key].float() - ref).abs().max().item()
        err = (got[key].float() - ref).abs().max().item()
        assert err <= 2 * eager_err + slack, \
            f"{key}: |ours - fp32| = {err:.2e}, |eager {dtype} - fp32| = {eager_err:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 runs on the GPU: the Triton interpreter's bf16 tl.dot is wrong")
@pytest.mark.parametrize("name", FAMILIES)
def test_family_bf16_on_gpu_as_accurate_as_eager_bf16(name):
    """Every family in bf16 on the GPU (the kernels natively, left-padded batches), judged as
    the fp16 test is (slack 1e-2). bf16's finfo.min masks are lifted: padded query rows
    average uniformly as in eager."""
    assert_half_as_accurate_as_eager(FAMILIES[name], torch.bfloat16, "cuda", left_padding=True,
                                     slack=1e-2)
