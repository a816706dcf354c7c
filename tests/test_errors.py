"""Bad input gets an error that names the problem, never a Triton crash or a wrong answer."""

from __future__ import annotations

import re

import pytest
import torch

from sdpa_pass.kernels import attention
from reference import DEVICE, randn


def qkv(hq=4, hkv=4, L=5, S=7, D=16, DV=None, dtype=torch.float32):
    return (randn(2, hq, L, D, dtype=dtype), randn(2, hkv, S, D, dtype=dtype),
            randn(2, hkv, S, DV or D, dtype=dtype))


CASES = {
    "rank": (lambda: (randn(4, 5, 16), *qkv()[1:]), {}, ValueError, "query must have rank 4"),
    "batch": (lambda: (randn(3, 4, 5, 16), *qkv()[1:]), {}, ValueError, "batch sizes differ"),
    "head_dim": (lambda: (randn(2, 4, 5, 8), *qkv()[1:]), {}, ValueError, "head dims differ: query has 8, key has 16"),
    "heads_not_multiple": (lambda: qkv(hq=6, hkv=4), {"enable_gqa": True}, ValueError,
                           "query heads (6) must be a multiple of key/value heads (4)"),
    "gqa_not_enabled": (lambda: qkv(hq=4, hkv=2), {}, ValueError, "pass enable_gqa=True"),
    "kv_len": (lambda: (*qkv()[:2], randn(2, 4, 6, 16)), {}, ValueError,
               "key has sequence length 7 but value has 6"),
    "mask_shape": (lambda: qkv(), {"attn_mask": torch.ones(2, 1, 7, 9, dtype=torch.bool, device=DEVICE)},
                   ValueError, "attn_mask of shape (2, 1, 7, 9) does not broadcast to (B=2, H=4, L=5, S=7)"),
    "mask_dtype": (lambda: qkv(), {"attn_mask": torch.ones(5, 7, dtype=torch.int64, device=DEVICE)},
                   TypeError, "attn_mask must be bool (True = attend) or floating point"),
    "padding_shape": (lambda: qkv(), {"key_padding_mask": torch.ones(2, 5, dtype=torch.bool, device=DEVICE)},
                      ValueError, "key_padding_mask must have shape (B=2, S=7); got (2, 5)"),
    "mixed_dtypes": (lambda: (qkv()[0].half(), *qkv()[1:]), {}, TypeError, "must share one dtype"),
    "int_dtype": (lambda: tuple(t.to(torch.int32) for t in qkv()), {}, TypeError,
                  "unsupported dtype torch.int32"),
    "double": (lambda: tuple(t.double() for t in qkv()), {}, TypeError, "unsupported dtype torch.float64"),
    "head_dim_too_large": (lambda: qkv(D=320), {}, ValueError, "head dim 320 is over the supported maximum of 256"),
    "window_without_causal": (lambda: qkv(), {"window": 3}, ValueError, "needs a causal alignment"),
    "dropout_not_a_probability": (lambda: qkv(), {"dropout_p": -0.1}, ValueError,
                                  "dropout probability has to be between 0 and 1"),
    "bad_causal": (lambda: qkv(), {"causal": "top-right"}, ValueError, "causal must be"),
    "softcap": (lambda: qkv(), {"softcap": -1.0}, ValueError, "softcap must be positive"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_names_the_problem(case):
    make, kwargs, exc, message = CASES[case]
    with pytest.raises(exc, match=re.escape(message)):
        attention(*make(), **kwargs)


def test_mixed_devices():
    q, k, v = qkv()
    other = "meta"
    with pytest.raises(ValueError, match="must be on one device"):
        attention(q, k.to(other), v)


def test_op_checks_inputs_when_called_directly():
    """Rewritten graphs call the op without going through attention(): it checks too."""
    q, k, v = qkv(hq=6, hkv=4)
    with pytest.raises(ValueError, match=re.escape("query heads (6) must be a multiple")):
        torch.ops.sdpa_pass.attention_forward(q, k, v, None, None, 0.1, 0, 0, -1, 0.0, False, False)
