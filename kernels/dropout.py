"""Dropout on the attention probabilities, without a mask in memory.

Each element (b·Hq + h, i, j) of the L×S probability matrix keeps or drops from its own
Philox-4x32-10 draw: counter (j, i, b·Hq + h, 0), key = the call's 64-bit seed as two 32-bit
words, first output word. Any tile of any kernel regenerates exactly the draws of its elements,
so the backward drops what the forward dropped and nothing is stored. The seed is a (2,) int64
tensor drawn from torch's default generator of the device (``draw_seed``): ``torch.manual_seed``
makes runs reproducible, and the seed lives on the device, so no host sync is needed.

keep iff u >= p with u = (word >> 8) / 2**24 in fp32, kept values scaled by 1 / (1 - p):
``F.dropout``'s rate and scaling (p = 1 drops everything, as ``F.dropout`` does).

Triton's ``tl.philox_impl`` (identical in triton 3.6-3.9) generates the draws in the kernels;
``keep_mask`` is the same generator in PyTorch integer arithmetic, for the CPU path and for
tests that check a kernel against a reference applying the kernel's own mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
_ROUNDS = 10


def draw_seed(device) -> torch.Tensor:
    """A fresh (2,) int64 key from torch's default generator for ``device``."""
    return torch.randint(0, 1 << 32, (2,), dtype=torch.int64, device=device)


def keep_scale(p: float) -> float:
    """What a kept probability is multiplied by (0 when everything is dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


@triton.jit
def load_seed(SEED, DROPOUT: tl.constexpr):
    """The (2,) int64 dropout key as the two uint32 words Philox takes (zeros without dropout;
    then SEED is never read)."""
    if DROPOUT:
        return tl.load(SEED).to(tl.uint32), tl.load(SEED + 1).to(tl.uint32)
    else:
        return tl.full((), 0, tl.uint32), tl.full((), 0, tl.uint32)


@triton.jit
def dropout_keep(k0, k1, bh, rows, cols, p):
    """Bool tile: which probabilities of batch·head ``bh`` are kept, for query indices ``rows``
    and key indices ``cols`` given as broadcastable 2-D tensors (either orientation).
    k0, k1: the seed's two words as uint32 scalars."""
    zero = (rows * 0 + cols * 0).to(tl.uint32)
    c0 = zero + cols.to(tl.uint32)
    c1 = zero + rows.to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    x, _, _, _ = tl.philox_impl(c0, c1, c2, zero, k0, k1)
    u = (x >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= p


def _mul_wide(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for 32-bit unsigned values held in int64: the product
    is split at 16 bits of b so no intermediate leaves int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo          # each < 2**48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return high, low


def keep_mask(seed: torch.Tensor, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              p: float) -> torch.Tensor:
    """The kernels' keep decisions for broadcastable int64 index tensors ``bh`` (b·Hq + h),
    ``rows`` (query i) and ``cols`` (key j); bool, True = kept."""
    k0, k1 = (int(w) & _MASK32 for w in seed.tolist())
    c0, c1, c2 = torch.broadcast_tensors(cols.long(), rows.long(), bh.long())
    c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_wide(c2, _ROUND_B)
        hi_a, lo_a = _mul_wide(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    u = (c0 >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return u >= torch.tensor(p, dtype=torch.float32)


def dropout_mask(seed: torch.Tensor, batch: int, q_heads: int, q_len: int, kv_len: int,
                 p: float) -> torch.Tensor:
    """The whole (B, Hq, L, S) keep mask of one call, on the CPU: for tests and debugging."""
    seed = seed.cpu()
    bh = torch.arange(batch * q_heads).reshape(batch, q_heads, 1, 1)
    return keep_mask(seed, bh, torch.arange(q_len)[:, None], torch.arange(kv_len), p)

