"""Hand-written attention as real models spell it: the catalogue the pass must recognise.

Each idiom is the attention code of one model (or one spelling variant), quoted from its source
as closely as a few lines allow, with the file it comes from. ``build(dtype, **shape)`` returns
``(callable_or_module, args)`` with small random CPU tensors; ``shape`` overrides the sequence
lengths (``L``/``S`` for query/key length, ``T`` for self-attention, ``P`` for a KV-cache past),
which the ``dynamic=True`` tests use to call one compiled function at two lengths.

Positives must be rewritten (``expected_rewrites`` sites, each "rewritten"); negatives must be
left alone, every candidate site "skipped" with ``expected_reason``. Eager PyTorch is the ground
truth for both.

Sources quoted (spellings as of transformers 5.24 unless a version is named):
  transformers/models/*/modeling_*.py, transformers/masking_utils.py, nanoGPT model.py,
  timm vision_transformer.py / swin_transformer.py / swin_transformer_v2.py, DINO
  vision_transformer.py, diffusers attention_processor.py, openai/whisper model.py, Meta llama
  model.py, google-deepmind gemma_pytorch model.py, CompVis ldm attention.py, lucidrains
  x-transformers attend.py, the Annotated Transformer, PyTorch's documented SDPA reference.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import masking_utils

B, H, HKV, D = 2, 4, 2, 16  # batch, query heads, KV heads for GQA, head dim
C = H * D  # model width for idioms that start from hidden states
L, S, T, P = 9, 13, 12, 8  # query length, key length, self-attention length, KV-cache past
PAD = 3  # the second sequence of a batch has PAD padding tokens


@dataclass(frozen=True)
class Idiom:
    name: str
    build: Callable[..., tuple[Callable, tuple]]
    expected_rewrites: int
    expected_reason: str | None = None
    source: str = ""

    def __str__(self):
        return self.name


CATALOGUE: list[Idiom] = []


def idiom(source, inputs, *, rewrites=1, reason=None, train=False):
    """Registers a forward function, or an nn.Module class built with no arguments, as an idiom
    whose arguments come from ``inputs(dtype, **shape)``."""

    def register(forward):
        def build(dtype, **shape):
            fn = forward
            if isinstance(forward, type):
                fn = forward().to(dtype).train(train)
            return fn, inputs(dtype, **shape)

        CATALOGUE.append(Idiom(_snake(forward.__name__), build, 0 if reason else rewrites, reason, source))
        return forward

    return register


def _snake(name):
    """Idiom names are snake_case whether a function or a class (NanoGPTCausal... -> nano_gpt_causal...)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


# ---------------------------------------------------------------------------------------------
# Inputs. Every maker takes the test dtype and its sequence lengths as keywords.
# ---------------------------------------------------------------------------------------------


def randn(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def padding_mask(length, left=False):
    """HF-style (B, length) int64 attention_mask: 1 = token, 0 = padding in the second row."""
    mask = torch.ones(B, length, dtype=torch.long)
    if left:
        mask[1, :PAD] = 0
    else:
        mask[1, length - PAD :] = 0
    return mask


def qkv(dtype, L=L, S=S, hq=H, hkv=H, d=D):
    """(q, k, v) as (B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, D)."""
    return randn(B, hq, L, d, dtype=dtype), randn(B, hkv, S, d, dtype=dtype), randn(B, hkv, S, d, dtype=dtype)


def qkv_gqa(dtype, L=L, S=S):
    return qkv(dtype, L, S, hkv=HKV)


def qkv_mqa(dtype, L=L, S=S):
    return qkv(dtype, L, S, hkv=1)


def qkv_self(dtype, T=T):
    return qkv(dtype, T, T)


def qkv_merged(dtype, L=L, S=S):
    """(B*H, L, D) merged-head layout of bmm code."""
    q, k, v = qkv(dtype, L, S)
    return q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)


def qkv_shared_kv(dtype, L=L, S=S):
    """Per-head queries, one key/value head stored without a head dim: (B, S, D)."""
    return randn(B, H, L, D, dtype=dtype), randn(B, S, D, dtype=dtype), randn(B, S, D, dtype=dtype)


def qkv_wrong_contraction(dtype):
    """k is (B, H, S, D) with S == D, so ``q @ k`` type-checks but contracts q's D with k's S."""
    return qkv(dtype, L, D)


def hidden(dtype, T=T):
    return (randn(B, T, C, dtype=dtype),)


def hidden_q_kv(dtype, L=L, S=S):
    """Projected (B, L, C) queries and (B, S, C) keys/values, heads not yet split."""
    return randn(B, L, C, dtype=dtype), randn(B, S, C, dtype=dtype), randn(B, S, C, dtype=dtype)


def with_padding(make, left=False):
    """Appends the (B, S) int64 padding mask for the keys to what ``make`` returns."""

    def inputs(dtype, **shape):
        args = make(dtype, **shape)
        return (*args, padding_mask(args[1].shape[-2], left))

    return inputs


def with_additive_mask(make, causal=True, left=True):
    """Appends an HF 4-D additive float mask (B, 1, L, S): 0 where visible, finfo(dtype).min
    elsewhere, bottom-right causal (query i is at position S - L + i) and key padding."""

    def inputs(dtype, **shape):
        args = make(dtype, **shape)
        return (*args, hf_additive_mask(args[0].shape[-2], args[1].shape[-2], dtype, causal, left))

    return inputs


def hf_additive_mask(L, S, dtype, causal=True, left=True):
    visible = padding_mask(S, left).bool()[:, None, None, :]
    if causal:
        q_pos = torch.arange(L)[:, None] + (S - L)
        visible = visible & (torch.arange(S)[None, :] <= q_pos)
    return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)


def extended_padding_mask(dtype, S):
    """Encoder padding as HF 4.x passed it: (B, 1, 1, S) additive, finfo.min on padding."""
    return hf_additive_mask(1, S, dtype, causal=False, left=False)


def random_bool_mask(L, S, p_keep=0.7):
    """(B, 1, L, S) bool, True = attend; key 0 always kept so no row is fully masked."""
    mask = torch.rand(B, 1, L, S) < p_keep
    mask[..., 0] = True
    return mask


def kv_cache(dtype, L=L, P=P, hq=H, hkv=H):
    """(q, past_k, past_v, k, v): L new tokens after P cached ones, (B, H, seq, D) layout."""
    q, k, v = qkv(dtype, L, L, hq, hkv)
    past_k, past_v = randn(B, hkv, P, D, dtype=dtype), randn(B, hkv, P, D, dtype=dtype)
    return q, past_k, past_v, k, v


# ---------------------------------------------------------------------------------------------
# Shared helpers, quoted.
# ---------------------------------------------------------------------------------------------


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    # transformers/models/llama/modeling_llama.py: repeat_kv
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def meta_repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # meta-llama/llama model.py: repeat_kv, on the (bs, seqlen, n_kv_heads, head_dim) layout
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class HFAttention(nn.Module):
    """The attributes that transformers' attention modules hand to ``eager_attention_forward``."""

    eager_attention_forward: Callable = None
    extra: dict = {}

    def __init__(self):
        super().__init__()
        self.head_dim = D
        self.scaling = D**-0.5
        self.attention_dropout = 0.1
        self.num_key_value_groups = H // HKV

    def forward(self, query, key, value, attention_mask):
        attn_output, _ = type(self).eager_attention_forward(
            self, query, key, value, attention_mask, scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout, **self.extra,
        )
        return attn_output


# =============================================================================================
# Positives: the score matmul Q·Kᵀ and its layouts
# =============================================================================================


@idiom("nanoGPT model.py: CausalSelfAttention.forward (non-flash path)", hidden)
class NanoGPTCausalSelfAttention(nn.Module):
    def __init__(self, n_embd=C, n_head=H, block_size=32):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.attn_dropout = nn.Dropout(0.1)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        return y.transpose(1, 2).contiguous().view(B, T, C)


@idiom("timm/models/vision_transformer.py: Attention.forward (fused_attn=False)", hidden)
class TimmVitAttention(nn.Module):
    def __init__(self, dim=C, num_heads=H):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.1)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        return x.transpose(1, 2).reshape(B, N, C)


@idiom("facebookresearch/dino vision_transformer.py: Attention.forward (qkv[0], qkv[1], qkv[2])", hidden)
class DinoVitAttention(nn.Module):
    def __init__(self, dim=C, num_heads=H):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return x


def llama_eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # transformers/models/llama/modeling_llama.py: eager_attention_forward
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()

    return attn_output, attn_weights


@idiom("transformers/models/llama/modeling_llama.py: eager_attention_forward + repeat_kv, "
       "4-D additive mask (left padding, chunked prefill)", with_additive_mask(qkv_gqa))
class LlamaEagerAttention(HFAttention):
    eager_attention_forward = llama_eager_attention_forward


def gemma2_eager_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                   softcap=None, **kwargs):
    # transformers/models/gemma2/modeling_gemma2.py: eager_attention_forward
    if scaling is None:
        scaling = module.head_dim**-0.5

    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling

    if softcap is not None:
        attn_weights = attn_weights / softcap
        attn_weights = torch.tanh(attn_weights)
        attn_weights = attn_weights * softcap
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    # upcast attention to fp32
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


@idiom("transformers/models/gemma2/modeling_gemma2.py: eager_attention_forward with "
       "attn_logit_softcapping and query_pre_attn_scalar**-0.5", with_additive_mask(qkv_gqa))
class Gemma2SoftcapAttention(HFAttention):
    eager_attention_forward = gemma2_eager_attention_forward
    # Gemma-2 caps at 50; scores here are O(1), so a cap of 50 would be invisible to the test.
    extra = {"softcap": 2.0}

    def __init__(self):
        super().__init__()
        self.scaling = 24**-0.5  # query_pre_attn_scalar, deliberately not head_dim


def gpt2_eager_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # transformers/models/gpt2/modeling_gpt2.py: eager_attention_forward
    if scaling is None:
        scaling = query.size(-1) ** -0.5

    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling

    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1)

    # Downcast (if necessary) back to V's dtype (if in mixed-precision) -- No-Op otherwise
    attn_weights = attn_weights.type(value.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)

    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2)

    return attn_output, attn_weights


@idiom("transformers/models/gpt2/modeling_gpt2.py: eager_attention_forward", with_additive_mask(qkv, left=False))
class Gpt2EagerAttention(HFAttention):
    eager_attention_forward = gpt2_eager_attention_forward


@idiom("transformers 4.x models/gpt2/modeling_gpt2.py: GPT2Attention._attn — bias[:, :, key_length - "
       "query_length : key_length, :key_length], torch.where(causal_mask, attn_weights, mask_value), "
       "/ torch.full([], value.size(-1) ** 0.5), then + attention_mask, left padding as in "
       "generation (the bias after the fill still ranks the filled keys of a padded query row: "
       "exact in float32, where the fill is finfo.min and the mask holds it; float16's -65504 "
       "is refused, verify.finite_fills_beside_additive_masks)",
       lambda dtype, L=L, S=S: (*qkv(dtype, L, S), hf_additive_mask(1, S, dtype, causal=False, left=True)))
class Gpt2LegacyAttn(nn.Module):
    def __init__(self, max_positions=32):
        super().__init__()
        self.register_buffer(
            "bias",
            torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool)).view(
                1, 1, max_positions, max_positions
            ),
            persistent=False,
        )
        self.attn_dropout = nn.Dropout(0.1)

    def forward(self, query, key, value, attention_mask):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full(
            [], value.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device
        )
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length : key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.full([], mask_value, dtype=attn_weights.dtype, device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value)


@idiom("transformers 4.x models/t5/modeling_t5.py: T5Attention.forward — no scaling, transpose(3, 2), "
       "scores += position_bias, softmax(scores.float()).type_as(scores)",
       lambda dtype, L=L, S=S: (*qkv(dtype, L, S), randn(1, H, L, S, dtype=dtype), extended_padding_mask(dtype, S)))
class T5Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = 0.1

    def forward(self, query_states, key_states, value_states, position_bias, mask):
        scores = torch.matmul(query_states, key_states.transpose(3, 2))
        position_bias = position_bias + mask  # (batch_size, n_heads, seq_length, key_length)
        position_bias_masked = position_bias
        scores += position_bias_masked
        attn_weights = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        attn_weights = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        return torch.matmul(attn_weights, value_states)


def whisper_qkv_attention(q, k, v, mask=None, n_head=H):
    # openai/whisper whisper/model.py: MultiHeadAttention.qkv_attention (2023, before the SDPA path)
    n_batch, n_ctx, n_state = q.shape
    scale = (n_state // n_head) ** -0.25
    q = q.view(*q.shape[:2], n_head, -1).permute(0, 2, 1, 3) * scale
    k = k.view(*k.shape[:2], n_head, -1).permute(0, 2, 3, 1) * scale
    v = v.view(*v.shape[:2], n_head, -1).permute(0, 2, 1, 3)

    qk = q @ k
    if mask is not None:
        qk = qk + mask[:n_ctx, :n_ctx]
    qk = qk.float()

    w = F.softmax(qk, dim=-1).to(q.dtype)
    return (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2), qk.detach()


def whisper_causal_mask(dtype, n_ctx=32):
    # openai/whisper whisper/model.py: TextDecoder.__init__
    return torch.empty(n_ctx, n_ctx).fill_(-np.inf).triu_(1).to(dtype)


@idiom("openai/whisper model.py: qkv_attention as cross-attention — k pre-permuted (0, 2, 3, 1), "
       "(n_state // n_head) ** -0.25 on both q and k", hidden_q_kv)
def whisper_cross_attention_split_scale(q, k, v):
    return whisper_qkv_attention(q, k, v)[0]


@idiom("openai/whisper model.py: qkv_attention in the decoder — qk + mask[:n_ctx, :n_ctx] with "
       "mask = torch.empty(n_ctx, n_ctx).fill_(-np.inf).triu_(1)",
       lambda dtype, T=T: (*hidden_q_kv(dtype, T, T), whisper_causal_mask(dtype)))
def whisper_decoder_self_attention_triu_mask(q, k, v, mask):
    return whisper_qkv_attention(q, k, v, mask)[0]


class WhisperMultiHeadAttention(nn.Module):
    # openai/whisper model.py: MultiHeadAttention.forward (no kv_cache)
    def __init__(self, n_state=C, n_head=H):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x, xa=None, mask=None):
        q = self.query(x)
        k = self.key(x if xa is None else xa)
        v = self.value(x if xa is None else xa)
        wv, qk = whisper_qkv_attention(q, k, v, mask, self.n_head)
        return self.out(wv)


@idiom("openai/whisper model.py: ResidualAttentionBlock.forward — self-attention (causal) then "
       "cross-attention in one block: two sites",
       lambda dtype, L=L, S=S: (randn(B, L, C, dtype=dtype), randn(B, S, C, dtype=dtype), whisper_causal_mask(dtype)),
       rewrites=2)
class WhisperDecoderBlockSelfAndCross(nn.Module):
    # MultiHeadAttention.forward drops qk, but Dynamo keeps its dead qk.detach() node: a user of
    # the scores that the pass must recognise as dead, not as "scores_used_elsewhere".
    def __init__(self, n_state=C):
        super().__init__()
        self.attn, self.attn_ln = WhisperMultiHeadAttention(), nn.LayerNorm(n_state)
        self.cross_attn, self.cross_attn_ln = WhisperMultiHeadAttention(), nn.LayerNorm(n_state)

    def forward(self, x, xa, mask):
        x = x + self.attn(self.attn_ln(x), mask=mask)
        x = x + self.cross_attn(self.cross_attn_ln(x), xa)
        return x


def head_to_batch_dim(tensor, head_size=H):
    # diffusers/models/attention_processor.py: Attention.head_to_batch_dim (out_dim=3)
    batch_size, seq_len, dim = tensor.shape
    tensor = tensor.reshape(batch_size, seq_len, head_size, dim // head_size)
    tensor = tensor.permute(0, 2, 1, 3)
    return tensor.reshape(batch_size * head_size, seq_len, dim // head_size)


def batch_to_head_dim(tensor, head_size=H):
    # diffusers/models/attention_processor.py: Attention.batch_to_head_dim
    batch_size, seq_len, dim = tensor.shape
    tensor = tensor.reshape(batch_size // head_size, head_size, seq_len, dim)
    return tensor.permute(0, 2, 1, 3).reshape(batch_size // head_size, seq_len, dim * head_size)


def get_attention_scores(query, key, attention_mask=None, scale=D**-0.5, upcast_attention=False, upcast_softmax=False):
    # diffusers/models/attention_processor.py: Attention.get_attention_scores
    dtype = query.dtype
    if upcast_attention:
        query = query.float()
        key = key.float()

    if attention_mask is None:
        baddbmm_input = torch.empty(
            query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device
        )
        beta = 0
    else:
        baddbmm_input = attention_mask
        beta = 1

    attention_scores = torch.baddbmm(
        baddbmm_input,
        query,
        key.transpose(-1, -2),
        beta=beta,
        alpha=scale,
    )
    del baddbmm_input

    if upcast_softmax:
        attention_scores = attention_scores.float()

    attention_probs = attention_scores.softmax(dim=-1)
    del attention_scores

    attention_probs = attention_probs.to(dtype)

    return attention_probs


def diffusers_attn_processor(query, key, value, attention_mask=None, **scores_options):
    # diffusers/models/attention_processor.py: AttnProcessor.__call__ (projections omitted)
    query = head_to_batch_dim(query)
    key = head_to_batch_dim(key)
    value = head_to_batch_dim(value)
    attention_probs = get_attention_scores(query, key, attention_mask, **scores_options)
    hidden_states = torch.bmm(attention_probs, value)
    return batch_to_head_dim(hidden_states)


@idiom("diffusers attention_processor.py: AttnProcessor — baddbmm(mask, q, k.transpose(-1, -2), beta=1, "
       "alpha=scale), bmm; encoder mask (1 - m) * -10000.0 repeated per head (prepare_attention_mask)",
       with_padding(hidden_q_kv))
def diffusers_baddbmm_attention_mask(query, key, value, encoder_attention_mask):
    # diffusers/models/unets/unet_2d_condition.py: UNet2DConditionModel.forward
    encoder_attention_mask = (1 - encoder_attention_mask.to(query.dtype)) * -10000.0
    encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
    # diffusers attention_processor.py: Attention.prepare_attention_mask
    attention_mask = encoder_attention_mask.repeat_interleave(H, dim=0)
    return diffusers_attn_processor(query, key, value, attention_mask)


@idiom("diffusers attention_processor.py: get_attention_scores without mask — baddbmm(torch.empty(...), "
       "beta=0) with upcast_attention and upcast_softmax", hidden_q_kv)
def diffusers_baddbmm_empty_beta0_upcast(query, key, value):
    return diffusers_attn_processor(query, key, value, upcast_attention=True, upcast_softmax=True)


@idiom("transformers 4.x models/bart/modeling_bart.py: BartAttention.forward — q_proj(x) * scaling, "
       "bmm on (bsz * num_heads, len, head_dim), view to 4-D to add the mask and back",
       lambda dtype, L=L, S=S: (*hidden_q_kv(dtype, L, S)[:2], extended_padding_mask(dtype, S)))
class BartAttention(nn.Module):
    def __init__(self, embed_dim=C, num_heads=H):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = 0.1
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)

    def _shape(self, tensor, seq_len, bsz):
        return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(self, hidden_states, key_value_states, attention_mask):
        bsz, tgt_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states) * self.scaling
        key_states = self._shape(self.k_proj(key_value_states), -1, bsz)
        value_states = self._shape(self.v_proj(key_value_states), -1, bsz)

        proj_shape = (bsz * self.num_heads, -1, self.head_dim)
        query_states = self._shape(query_states, tgt_len, bsz).view(*proj_shape)
        key_states = key_states.reshape(*proj_shape)
        value_states = value_states.reshape(*proj_shape)

        src_len = key_states.size(1)
        attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
        attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + attention_mask
        attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_probs = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        attn_output = torch.bmm(attn_probs, value_states)

        attn_output = attn_output.view(bsz, self.num_heads, tgt_len, self.head_dim)
        attn_output = attn_output.transpose(1, 2)
        return attn_output.reshape(bsz, tgt_len, self.embed_dim)


@idiom("fairseq/modules/multihead_attention.py: MultiheadAttention.forward — bmm on merged (B*H, L, D), "
       "key_padding_mask (True = pad) filled with -inf in a 4-D view, utils.softmax(dtype=float32).type_as",
       lambda dtype, L=L, S=S: (*qkv_merged(dtype, L, S), padding_mask(S) == 0))
def fairseq_bmm_key_padding_mask(q, k, v, key_padding_mask, num_heads=H):
    bsz, tgt_len, src_len = q.size(0) // num_heads, q.size(1), k.size(1)
    q = q * (q.size(-1) ** -0.5)  # fairseq: q *= self.scaling, on its own projection output
    attn_weights = torch.bmm(q, k.transpose(1, 2))
    attn_weights = attn_weights.view(bsz, num_heads, tgt_len, src_len)
    attn_weights = attn_weights.masked_fill(key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
    attn_weights = attn_weights.view(bsz * num_heads, tgt_len, src_len)
    attn_weights_float = F.softmax(attn_weights, dim=-1, dtype=torch.float32)  # fairseq utils.softmax
    attn_weights = attn_weights_float.type_as(attn_weights)
    return torch.bmm(attn_weights, v)


@idiom("einsum spelling, 4-D heads: torch.einsum('bhqd,bhkd->bhqk') and ('bhqk,bhkd->bhqd')", qkv)
def einsum_4d_heads(q, k, v):
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.size(-1) ** -0.5
    attn = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", attn, v)


@idiom("lucidrains x-transformers attend.py: Attend.forward (non-flash) — einsum('b h i d, b h j d -> b h i j'), "
       "sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)",
       lambda dtype, L=L, S=S: (*qkv(dtype, L, S), padding_mask(S).bool()[:, None, None, :]))
def xtransformers_einsum_masked_fill_finfo_max(q, k, v, mask):
    scale = q.shape[-1] ** -0.5
    sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * scale
    mask_value = -torch.finfo(sim.dtype).max
    sim = sim.masked_fill(~mask, mask_value)
    attn = F.softmax(sim, dim=-1)
    return torch.einsum("b h i j, b h j d -> b h i d", attn, v)


@idiom("lucidrains x-transformers attend.py: kv_einsum_eq = 'b j d' — one shared key/value head "
       "for all query heads (multi-query) through einsum", qkv_shared_kv)
def xtransformers_einsum_shared_kv_mqa(q, k, v):
    scale = q.shape[-1] ** -0.5
    sim = torch.einsum("b h i d, b j d -> b h i j", q, k) * scale
    attn = F.softmax(sim, dim=-1)
    return torch.einsum("b h i j, b j d -> b h i d", attn, v)


@idiom("CompVis ldm/modules/attention.py: CrossAttention.forward — rearrange 'b n (h d) -> (b h) n d', "
       "einsum('b i d, b j d -> b i j') * scale, einsum('b i j, b j d -> b i d')", hidden_q_kv)
def ldm_einsum_3d_merged_heads(q, k, v, h=H):
    # einops.rearrange(t, 'b n (h d) -> (b h) n d', h=h), written out: einops is not a test dependency
    q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2).reshape(t.shape[0] * h, t.shape[1], -1)
               for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * (q.shape[-1] ** -0.5)
    attn = sim.softmax(dim=-1)
    out = torch.einsum("b i j, b j d -> b i d", attn, v)
    return out.reshape(-1, h, out.shape[1], out.shape[2]).transpose(1, 2).flatten(2)


@idiom("Tensor.matmul method spelling for both matmuls", qkv)
def tensor_matmul_method(q, k, v):
    scores = q.matmul(k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return F.softmax(scores, dim=-1).matmul(v)


@idiom("Tensor.mT spelling of the key transpose", qkv)
def key_transpose_mt(q, k, v):
    scores = (q @ k.mT) * (1.0 / math.sqrt(q.size(-1)))
    return F.softmax(scores, dim=-1) @ v


# =============================================================================================
# Positives: scale spellings (none, divide, multiply, tensor constant, on q, split, alpha)
# =============================================================================================


@idiom("scale spelling / d ** 0.5", qkv)
def scale_divide_d_pow_half(q, k, v):
    d = q.size(-1)
    scores = q @ k.transpose(-2, -1) / d**0.5
    return F.softmax(scores, dim=-1) @ v


@idiom("scale spelling * d ** -0.5", qkv)
def scale_multiply_d_pow_minus_half(q, k, v):
    d = q.size(-1)
    scores = q @ k.transpose(-2, -1) * d**-0.5
    return F.softmax(scores, dim=-1) @ v


@idiom("scale kept as a registered 0-d buffer: self.register_buffer('scale', torch.tensor(d ** -0.5))", qkv)
class BufferScaleAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(D**-0.5))

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)) * self.scale
        return attn.softmax(dim=-1) @ v


# =============================================================================================
# Positives: masks
# =============================================================================================


def annotated_attention(query, key, value, mask=None, dropout=None):
    # harvardnlp The Annotated Transformer: attention
    d_k = query.size(-1)
    scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(d_k)
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    p_attn = scores.softmax(dim=-1)
    if dropout is not None:
        p_attn = dropout(p_attn)
    return torch.matmul(p_attn, value), p_attn


def subsequent_and_padding_mask(dtype, L=L, S=S):
    # The Annotated Transformer: subsequent_mask, combined with the source padding mask
    subsequent = torch.triu(torch.ones(1, L, S), diagonal=1).type(torch.uint8) == 0
    return (*qkv(dtype, L, S), (padding_mask(S)[:, None, None, :] == 1) & subsequent[:, None])


@idiom("The Annotated Transformer: attention — masked_fill(mask == 0, -1e9); caller keeps only the output",
       subsequent_and_padding_mask)
def annotated_transformer_mask_eq0_minus_1e9(q, k, v, mask):
    return annotated_attention(q, k, v, mask)[0]


@idiom("masked_fill(mask == 0, float('-inf')) with an int 0/1 (B, 1, L, S) mask",
       lambda dtype, L=L, S=S: (*qkv(dtype, L, S), random_bool_mask(L, S).long()))
def masked_fill_eq0_neg_inf(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(mask == 0, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


@idiom("masked_fill(~mask, torch.finfo(scores.dtype).min) with a bool (B, 1, L, S) mask",
       lambda dtype, L=L, S=S: (*qkv(dtype, L, S), random_bool_mask(L, S)))
def masked_fill_not_mask_finfo_min(q, k, v, mask):
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.size(-1) ** -0.5
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(F.softmax(scores, dim=-1), v)


@idiom("key_padding_mask with True = padding (fairseq / nn.MultiheadAttention convention), "
       "masked_fill(key_padding_mask[:, None, None, :], -1e4)",
       lambda dtype, L=L, S=S: (*qkv(dtype, L, S), padding_mask(S) == 0))
def masked_fill_padding_true_minus_1e4(q, k, v, key_padding_mask):
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    scores = scores.masked_fill(key_padding_mask[:, None, None, :], -1e4)
    return F.softmax(scores, dim=-1) @ v


@idiom("torch.where(mask, scores, torch.finfo(scores.dtype).min) with a bool (B, 1, L, S) mask",
       lambda dtype, L=L, S=S: (*qkv(dtype, L, S), random_bool_mask(L, S)))
def where_mask_scores_fill(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1) @ v


def bert_self_attention(query_layer, key_layer, value_layer, attention_mask, head_mask=None):
    # transformers 4.x models/bert/modeling_bert.py: get_extended_attention_mask (older releases, and
    # models/markuplm today) and BertSelfAttention.forward
    extended_attention_mask = attention_mask[:, None, None, :]
    extended_attention_mask = extended_attention_mask.to(dtype=query_layer.dtype)
    extended_attention_mask = (1.0 - extended_attention_mask) * -10000.0

    attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
    attention_scores = attention_scores / math.sqrt(query_layer.size(-1))
    attention_scores = attention_scores + extended_attention_mask
    attention_probs = nn.functional.softmax(attention_scores, dim=-1)
    attention_probs = nn.functional.dropout(attention_probs, p=0.1, training=False)
    if head_mask is not None:
        attention_probs = attention_probs * head_mask
    return torch.matmul(attention_probs, value_layer)


@idiom("transformers 4.x BERT: (1.0 - extended_attention_mask) * -10000.0 padding mask", with_padding(qkv))
def bert_extended_mask_minus_10000(q, k, v, attention_mask):
    return bert_self_attention(q, k, v, attention_mask)


@idiom("causal mask built in forward: torch.tril(torch.ones(L, S)), masked_fill(mask == 0, -inf) (top-left)", qkv)
def tril_ones_in_forward(q, k, v):
    L, S = q.size(-2), k.size(-2)
    mask = torch.tril(torch.ones(L, S, device=q.device))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(mask == 0, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


@idiom("torch.tril(ones, diagonal=2): an offset causal mask (query i sees keys j <= i + 2), not a bug", qkv)
def tril_diagonal_offset(q, k, v):
    L, S = q.size(-2), k.size(-2)
    mask = torch.tril(torch.ones(L, S, dtype=torch.bool, device=q.device), diagonal=2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


@idiom("future = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=1); masked_fill(future, -inf)", qkv)
def triu_future_masked_fill(q, k, v):
    L, S = q.size(-2), k.size(-2)
    future = torch.triu(torch.ones(L, S, dtype=torch.bool, device=q.device), diagonal=1)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    scores = scores.masked_fill(future, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


@idiom("torch/nn/modules/transformer.py: _generate_square_subsequent_mask — "
       "torch.triu(torch.full((sz, sz), float('-inf')), diagonal=1) added to the scores", qkv_self)
def nn_transformer_square_subsequent_mask(q, k, v):
    sz = q.size(-2)
    mask = torch.triu(torch.full((sz, sz), float("-inf"), dtype=q.dtype, device=q.device), diagonal=1)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5 + mask
    return F.softmax(scores, dim=-1) @ v


@idiom("meta-llama/llama model.py: Attention.forward + Transformer.forward mask — KV cache, "
       "torch.hstack([zeros((seqlen, start_pos)), triu(full(-inf), diagonal=1)]), "
       "F.softmax(scores.float(), dim=-1).type_as(xq), GQA via repeat_kv on (bs, seqlen, heads, dim)",
       lambda dtype, L=L, P=P: (randn(B, L, H, D, dtype=dtype), randn(B, P, HKV, D, dtype=dtype),
                                randn(B, P, HKV, D, dtype=dtype), randn(B, L, HKV, D, dtype=dtype),
                                randn(B, L, HKV, D, dtype=dtype)))
def meta_llama_kv_cache_triu_hstack(xq, cache_k, cache_v, xk, xv):
    bsz, seqlen, n_local_heads, head_dim = xq.shape
    start_pos = cache_k.shape[1]
    mask = torch.full((seqlen, seqlen), float("-inf"), device=xq.device)
    mask = torch.triu(mask, diagonal=1)
    mask = torch.hstack([torch.zeros((seqlen, start_pos), device=xq.device), mask]).type_as(xq)

    # the cache write self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk, kept functional
    keys = torch.cat([cache_k, xk], dim=1)
    values = torch.cat([cache_v, xv], dim=1)
    keys = meta_repeat_kv(keys, n_local_heads // keys.shape[2])
    values = meta_repeat_kv(values, n_local_heads // values.shape[2])

    xq = xq.transpose(1, 2)
    keys = keys.transpose(1, 2)
    values = values.transpose(1, 2)
    scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(head_dim)
    scores = scores + mask
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    output = torch.matmul(scores, values)
    return output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)


@idiom("KV cache: torch.cat([past_k, k], dim=2), chunked prefill (L < S), bottom-right causal "
       "kv_idx <= cache_position built from arange with the cache offset", kv_cache)
def kv_cache_chunked_prefill_arange_causal(q, past_k, past_v, k, v):
    k = torch.cat([past_k, k], dim=2)
    v = torch.cat([past_v, v], dim=2)
    past = past_k.size(2)
    cache_position = torch.arange(past, past + q.size(2), device=q.device)
    kv_idx = torch.arange(k.size(2), device=q.device)
    causal = kv_idx[None, :] <= cache_position[:, None]
    scores = torch.matmul(q, k.transpose(2, 3)) * q.size(-1) ** -0.5
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.matmul(F.softmax(scores, dim=-1), v)


@idiom("KV cache decode: one query token, torch.cat([past_k, k], dim=2), left-padded batch as a "
       "(B, 1, 1, S) additive mask",
       lambda dtype, P=P: (*kv_cache(dtype, 1, P), hf_additive_mask(1, P + 1, dtype, causal=False, left=True)))
def kv_cache_decode_one_token(q, past_k, past_v, k, v, attention_mask):
    k = torch.cat([past_k, k], dim=2)
    v = torch.cat([past_v, v], dim=2)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.size(-1) ** -0.5 + attention_mask
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


@idiom("sliding-window causal mask from arange: (kv_idx <= q_idx) & (kv_idx > q_idx - window), "
       "as transformers masking_utils sliding_window_causal_mask_function spells it", qkv_self)
def arange_sliding_window(q, k, v, window=4):
    q_idx = torch.arange(q.size(-2), device=q.device)[:, None]
    kv_idx = torch.arange(k.size(-2), device=q.device)[None, :]
    visible = (kv_idx <= q_idx) & (kv_idx > q_idx - window)
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


def hf_mask_in_graph(mask_function):
    """The HF decoder's eager mask built inside the compiled region from the 2-D padding mask, then
    Llama's eager_attention_forward: what a compiled LlamaModel with attn_implementation="eager" runs."""

    class HFMaskInGraph(HFAttention):
        eager_attention_forward = llama_eager_attention_forward

        def forward(self, query, key, value, padding):
            q_length, kv_length = query.shape[-2], key.shape[-2]
            attention_mask = masking_utils.eager_mask(
                batch_size=query.shape[0], q_length=q_length, kv_length=kv_length,
                q_offset=kv_length - q_length, mask_function=mask_function,
                attention_mask=padding.bool(), dtype=query.dtype, device=query.device,
            )
            return super().forward(query, key, value, attention_mask)

    return HFMaskInGraph


@idiom("transformers masking_utils.py: eager_mask(causal_mask_function, attention_mask=padding) built in "
       "forward — arange, kv_idx <= q_idx, padding_mask[batch_idx, kv_idx], where(mask, 0, finfo.min)",
       with_padding(qkv_gqa, left=True))
class HfEagerMaskCausalPaddingInGraph(hf_mask_in_graph(masking_utils.causal_mask_function)):
    pass


@idiom("transformers masking_utils.py: eager_mask(sliding_window_causal_mask_function(4)) built in "
       "forward (Mistral / Gemma-2 sliding layers)", with_padding(qkv_gqa, left=True))
class HfEagerMaskSlidingWindowInGraph(hf_mask_in_graph(masking_utils.sliding_window_causal_mask_function(4))):
    pass


def bloom_alibi(attention_mask, num_heads, dtype):
    # transformers/models/bloom/modeling_bloom.py: build_alibi_tensor, for a power-of-two num_heads
    batch_size, seq_length = attention_mask.shape
    base = torch.full((), 2 ** (-(2 ** -(math.log2(num_heads) - 3))), device=attention_mask.device, dtype=torch.float32)
    powers = torch.arange(1, 1 + num_heads, device=attention_mask.device, dtype=torch.int32)
    slopes = torch.pow(base, powers)
    arange_tensor = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
    alibi = slopes[..., None] * arange_tensor
    return alibi.reshape(batch_size * num_heads, 1, seq_length).to(dtype)


@idiom("transformers/models/bloom/modeling_bloom.py: BloomAttention.forward — ALiBi as the baddbmm input "
       "(alibi.baddbmm(batch1=q, batch2=k, beta=1.0, alpha=inv_norm_factor)), + 4-D causal/padding mask, "
       "softmax(dtype=float32), bmm",
       lambda dtype, T=T: (*qkv(dtype, T, T), padding_mask(T, left=True),
                           hf_additive_mask(T, T, dtype, causal=True, left=True)))
class BloomAlibiBaddbmm(nn.Module):
    def __init__(self, num_heads=H, head_dim=D):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.inv_norm_factor, self.beta = 1.0 / math.sqrt(head_dim), 1.0
        self.attention_dropout = nn.Dropout(0.1)

    def forward(self, query_layer, key_layer, value_layer, padding, attention_mask):
        batch_size, _, q_length, _ = query_layer.shape
        alibi = bloom_alibi(padding, self.num_heads, query_layer.dtype)
        query_layer = query_layer.reshape(batch_size * self.num_heads, -1, self.head_dim)
        key_layer = key_layer.reshape(batch_size * self.num_heads, -1, self.head_dim).transpose(-1, -2)
        value_layer = value_layer.reshape(batch_size * self.num_heads, -1, self.head_dim)

        attention_scores = alibi.baddbmm(
            batch1=query_layer,
            batch2=key_layer,
            beta=self.beta,
            alpha=self.inv_norm_factor,
        )
        attn_weights = attention_scores.view(batch_size, self.num_heads, q_length, -1)
        attn_weights = attn_weights + attention_mask
        attention_probs = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_layer.dtype)
        attention_probs = self.attention_dropout(attention_probs)
        attention_probs_reshaped = attention_probs.view(batch_size * self.num_heads, q_length, -1)
        return torch.bmm(attention_probs_reshaped, value_layer)


@idiom("ALiBi relative bias slopes * (kv_idx - q_idx) of shape (1, H, L, S) added to the scores, "
       "plus a causal masked_fill(finfo.min): two masks together (MPT / ALiBi paper style)", qkv_self)
def alibi_relative_bias_plus_causal(q, k, v):
    L, S = q.size(-2), k.size(-2)
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, device=q.device) / H)
    relative = torch.arange(S, device=q.device)[None, :] - torch.arange(L, device=q.device)[:, None]
    alibi = (slopes[:, None, None] * relative)[None].to(q.dtype)
    causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5 + alibi
    scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1) @ v


def get_relative_position_index(win_h, win_w):
    # timm/layers/pos_embed_rel.py (swin_transformer.py): get_relative_position_index
    coords = torch.stack(torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += win_h - 1
    relative_coords[:, :, 1] += win_w - 1
    relative_coords[:, :, 0] *= 2 * win_w - 1
    return relative_coords.sum(-1)


SWIN_WINDOW = (3, 4)
SWIN_N, SWIN_WINDOWS = SWIN_WINDOW[0] * SWIN_WINDOW[1], 2  # tokens per window, windows per image


class TimmWindowAttention(nn.Module):
    # timm/models/swin_transformer.py: WindowAttention.forward (fused_attn=False)
    def __init__(self, dim=C, num_heads=H, window_size=SWIN_WINDOW):
        super().__init__()
        self.num_heads, self.window_area = num_heads, window_size[0] * window_size[1]
        self.scale = (dim // num_heads) ** -0.5
        table = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.randn(table, num_heads))
        self.register_buffer("relative_position_index", get_relative_position_index(*window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.1)
        self.softmax = nn.Softmax(dim=-1)

    def _get_rel_pos_bias(self):
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_area, self.window_area, -1
        )
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        return relative_position_bias.unsqueeze(0)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = attn @ v
        return x.transpose(1, 2).reshape(B_, N, -1)


def swin_windows(dtype):
    return (randn(B * SWIN_WINDOWS, SWIN_N, C, dtype=dtype),)


def swin_shifted_windows(dtype):
    # timm swin_transformer.py: SwinTransformerBlock attn_mask — 0 within a region, -100.0 across
    region = torch.randint(0, 2, (SWIN_WINDOWS, SWIN_N))
    attn_mask = (region[:, None, :] != region[:, :, None]).float() * -100.0
    return (*swin_windows(dtype), attn_mask.to(dtype))


@idiom("timm/models/swin_transformer.py: WindowAttention — relative position bias from the table, "
       "nn.Softmax(dim=-1) module", swin_windows)
class TimmSwinWindowAttention(TimmWindowAttention):
    pass


@idiom("timm/models/swin_transformer.py: WindowAttention with the shifted-window mask — scores viewed "
       "(-1, num_win, H, N, N), + mask.unsqueeze(1).unsqueeze(0), viewed back", swin_shifted_windows)
class TimmSwinShiftedWindowMask(TimmWindowAttention):
    pass


def padded_query_and_key_mask(L, S):
    """(B, 1, L, S) bool: the second sequence's last PAD queries see no key at all."""
    mask = padding_mask(S).bool()[:, None, None, :] & padding_mask(L).bool()[:, None, :, None]
    return mask


@idiom("rows with every key masked by -inf: eager softmax gives NaN there, and so must the rewrite",
       lambda dtype, L=L, S=S: (*qkv(dtype, L, S), padded_query_and_key_mask(L, S)))
def fully_masked_rows_neg_inf_nan(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


@idiom("rows with every key masked by finfo.min: eager softmax averages the values uniformly there",
       lambda dtype, L=L, S=S: (*qkv(dtype, L, S), padded_query_and_key_mask(L, S)))
def fully_masked_rows_finfo_min_uniform(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1) @ v


@idiom("torch docs, F.scaled_dot_product_attention reference implementation, is_causal=True, "
       "enable_gqa=True — masked_fill_ on a zeros bias, attn_weight += attn_bias, torch.softmax, "
       "torch.dropout(p=0.0, train=True)", qkv_gqa)
def sdpa_docs_reference_causal_gqa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None,
                                   enable_gqa=True):
    L, S = query.size(-2), key.size(-2)
    scale_factor = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    attn_bias = torch.zeros(L, S, dtype=query.dtype, device=query.device)
    if is_causal:
        assert attn_mask is None
        temp_mask = torch.ones(L, S, dtype=torch.bool).tril(diagonal=0)
        attn_bias.masked_fill_(temp_mask.logical_not(), float("-inf"))
        attn_bias.to(query.dtype)

    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)

    attn_weight = query @ key.transpose(-2, -1) * scale_factor
    attn_weight += attn_bias
    attn_weight = torch.softmax(attn_weight, dim=-1)
    attn_weight = torch.dropout(attn_weight, dropout_p, train=True)
    return attn_weight @ value


# =============================================================================================
# Positives: softmax spellings, GQA / MQA layouts
# =============================================================================================


@idiom("softmax as a method with a positional dim: scores.softmax(-1)", qkv)
def softmax_method_positional_dim(q, k, v):
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    return scores.softmax(-1) @ v


@idiom("softmax over the key dim named by its positive index: F.softmax(scores, dim=3)", qkv)
def softmax_positive_dim3(q, k, v):
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    return F.softmax(scores, dim=3) @ v


@idiom("GQA by k.repeat_interleave(n_rep, dim=1) on (B, Hkv, S, D)", qkv_gqa)
def gqa_repeat_interleave_dim1(q, k, v):
    n_rep = q.size(1) // k.size(1)
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.matmul(F.softmax(scores, dim=-1), v)


@idiom("google-deepmind/gemma_pytorch gemma/model.py: GemmaAttention.forward — torch.repeat_interleave(key, "
       "n, dim=2) on (B, S, Hkv, D), q.mul_(self.scaling) in place, "
       "F.softmax(scores.float(), dim=-1).type_as(q), additive mask", hidden)
class GemmaPytorchAttention(nn.Module):
    def __init__(self, hidden_size=C, num_heads=H, num_kv_heads=HKV, head_dim=D, max_len=32):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scaling = head_dim**-0.5
        self.qkv_proj = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=False)
        # gemma_pytorch builds this in GemmaForCausalLM.__init__ and slices it per step
        mask = torch.full((1, 1, max_len, max_len), -2.3819763e38).triu(diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, hidden_states):
        batch_size, input_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)
        xq, xk, xv = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        xq = xq.view(batch_size, -1, self.num_heads, self.head_dim)
        xk = xk.view(batch_size, -1, self.num_kv_heads, self.head_dim)
        xv = xv.view(batch_size, -1, self.num_kv_heads, self.head_dim)
        mask = self.mask[:, :, :input_len, :input_len]

        key = torch.repeat_interleave(xk, self.num_queries_per_kv, dim=2)
        value = torch.repeat_interleave(xv, self.num_queries_per_kv, dim=2)
        q = xq.transpose(1, 2)
        k = key.transpose(1, 2)
        v = value.transpose(1, 2)

        q.mul_(self.scaling)  # in place on a view of split(): legal only under no_grad, as gemma_pytorch runs
        scores = torch.matmul(q, k.transpose(2, 3))
        scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(q)
        output = torch.matmul(scores, v)
        return output.transpose(1, 2).contiguous().view(batch_size, input_len, -1)


@idiom("transformers/models/falcon/modeling_falcon.py: FalconAttention.forward (eager, no alibi) — "
       "multi-query key (B, 1, S, D) broadcast in query_layer @ key_layer.transpose(-1, -2), "
       "attention_scores /= math.sqrt(head_dim), F.softmax(scores + mask, dim=-1, dtype=...)",
       with_additive_mask(qkv_mqa))
def falcon_mqa_broadcast(query_layer, key_layer, value_layer, attention_mask):
    head_dim = query_layer.size(-1)
    attention_scores = query_layer @ key_layer.transpose(-1, -2)
    attention_scores /= math.sqrt(head_dim)
    attention_scores = F.softmax(attention_scores + attention_mask, dim=-1, dtype=query_layer.dtype)
    return attention_scores @ value_layer


# =============================================================================================
# Negatives: attention-shaped code the pass must leave alone, with the reason it gives
# =============================================================================================


@idiom("The Annotated Transformer: attention returns (torch.matmul(p_attn, value), p_attn) "
       "and the caller keeps p_attn (output_attentions)", subsequent_and_padding_mask, reason="probs_used_elsewhere")
def annotated_transformer_returns_p_attn(q, k, v, mask):
    return annotated_attention(q, k, v, mask)


@idiom("softmax over the query dim: softmax(q @ kᵀ * s, dim=-2) @ v (pytorch#196468: Inductor rewrote "
       "it into attention over keys)", qkv, reason="softmax_not_over_keys")
def softmax_over_queries_dim_minus2(q, k, v):
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    return F.softmax(scores, dim=-2) @ v


@idiom("openai/whisper model.py: qkv_attention returns qk.detach() beside the output (the cast "
       "pre-softmax scores have a second user)", hidden_q_kv, reason="scores_used_elsewhere")
def whisper_returns_qk_detach(q, k, v):
    return whisper_qkv_attention(q, k, v)


@idiom("queries times a learned (D, S) weight: a matmul before softmax, but not Q·Kᵀ", qkv, reason="not_attention")
class QueryTimesWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, S))

    def forward(self, q, k, v):
        scores = q @ self.w * q.size(-1) ** -0.5
        return F.softmax(scores, dim=-1) @ v


@idiom("q @ k with no transpose: k is (B, H, S, D) with S == D, so it contracts q's head dim "
       "with k's sequence dim", qkv_wrong_contraction, reason="not_attention")
def q_matmul_k_without_transpose(q, k, v):
    scores = q @ k * q.size(-1) ** -0.5
    return F.softmax(scores, dim=-1) @ v


@idiom("transformers 4.x BERT: attention_probs = attention_probs * head_mask before the value matmul",
       lambda dtype, L=L, S=S: (*with_padding(qkv)(dtype, L=L, S=S),
                                torch.tensor([1.0, 0.0, 1.0, 0.5]).view(1, H, 1, 1).to(dtype)),
       reason="probs_modified")
def bert_head_mask(q, k, v, attention_mask, head_mask):
    return bert_self_attention(q, k, v, attention_mask, head_mask)


@idiom("timm/models/swin_transformer_v2.py: WindowAttention cosine attention — attn * logit_scale with "
       "logit_scale a per-head (H, 1, 1) parameter", qkv, reason="unsupported_scale")
class SwinV2PerHeadLogitScale(nn.Module):
    def __init__(self, num_heads=H):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(torch.linspace(2.0, 10.0, num_heads)).view(num_heads, 1, 1))

    def forward(self, q, k, v):
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale
        attn = attn.softmax(dim=-1)
        return attn @ v


@idiom("transformers/models/llama/modeling_llama.py: eager_attention_forward in training mode with "
       "attention_dropout=0.1: F.dropout(p=0.1, training=True) on the probabilities, rewritten "
       "to in-kernel dropout", with_additive_mask(qkv_gqa), train=True)
class LlamaDropoutInTraining(LlamaEagerAttention):
    pass


@idiom("facebookresearch/dino visualize_attention.py: attentions[0, :, 0, 1:] of get_last_selfattention — "
       "the [CLS] attention map; no value matmul at all", qkv_self, reason="no_value_matmul")
def dino_cls_attention_map(q, k, v):
    # DINO's Attention still computes the dead attn @ v; Dynamo keeps dead nodes, so that spelling
    # would also test dead-code handling. Here the value matmul is simply absent.
    attn = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    attn = attn.softmax(dim=-1)
    return attn[:, :, 0, 1:]


@idiom("transformers/models/openai/modeling_openai.py: Attention._attn (GPT-1) — k pre-permuted "
       "(0, 2, 3, 1), w = w * b + -1e4 * (1 - b) with b a float buffer: a multiplicative mask whose "
       "values are not known to be 0/1", hidden, reason="mask_not_provable")
class OpenaiGptMultiplicativeMask(nn.Module):
    def __init__(self, nx=C, n_head=H, n_positions=32):
        super().__init__()
        self.n_head, self.split_size = n_head, nx
        self.register_buffer(
            "bias",
            torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions),
            persistent=False,
        )
        self.c_attn = nn.Linear(nx, nx * 3)
        self.attn_dropout = nn.Dropout(0.1)

    def split_heads(self, x, k=False):
        new_x_shape = x.size()[:-1] + (self.n_head, x.size(-1) // self.n_head)
        x = x.view(*new_x_shape)
        if k:
            return x.permute(0, 2, 3, 1)
        else:
            return x.permute(0, 2, 1, 3)

    def forward(self, x):
        query, key, value = self.c_attn(x).split(self.split_size, dim=2)
        q, k, v = self.split_heads(query), self.split_heads(key, k=True), self.split_heads(value)
        w = torch.matmul(q, k)
        w = w / math.sqrt(v.size(-1))
        b = self.bias[:, :, : w.size(-2), : w.size(-1)]
        w = w * b + -1e4 * (1 - b)
        w = nn.functional.softmax(w, dim=-1)
        w = self.attn_dropout(w)
        return torch.matmul(w, v)


IDIOMS = {i.name: i for i in CATALOGUE}
assert len(IDIOMS) == len(CATALOGUE), "idiom names must be unique"
