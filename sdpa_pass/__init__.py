"""sdpa_pass: find hand-written attention in PyTorch models and run it on fused Triton kernels."""

from __future__ import annotations

from . import kernels
from .kernels import attention

__version__ = "0.1.0"

__all__ = ["attention", "kernels", "__version__"]
