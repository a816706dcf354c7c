"""What a rewritten site runs: our Triton kernels, PyTorch's SDPA, or the float64 math reference.

    with sdpa_pass.implementation(["sdpa", "triton"]):     # as torch.nn.attention.sdpa_kernel
        model = sdpa_pass.optimize(model)
        model(x)                                            # compiles here: the choice applies
    sdpa_pass.optimize(model, implementation="math")        # or per compile; beats the context
    torch.compile(model, backend="sdpa_pass", options={"implementation": ["sdpa"]})

An ordered list means "the first that can serve this site". ``can_serve`` says why one cannot
(an old GPU, a head dim over our maximum, a soft-cap SDPA has no argument for); the pass then
tries the next, then our Triton op as the last resort, and leaves a site that none can serve
as the user wrote it (reason ``no_implementation``). Each reason is logged once and shown per
site by ``explain()``.

The choice is read when a graph is rewritten, that is when it is compiled: the first call of
a compiled model, or a recompile. Like a ``torch.compile`` config it is baked into the compiled
code, so a context manager around a later call of an already compiled model changes nothing;
compile again (a fresh ``torch.compile``, or ``torch._dynamo.reset()``) to switch.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from typing import Iterable, Iterator, Optional, Union

import torch

from sdpa_pass.kernels.checks import (CAUSAL_NONE, CAUSAL_TOP_LEFT, MAX_HEAD_DIM,
                                      SUPPORTED_DTYPES, AttentionShape)
from sdpa_pass.kernels.empty_rows import rows_may_be_empty

from .analyse import Plan
from .canonicalize import tensor_of
from .match import NotASite
from .verify import needs_grad

log = logging.getLogger("sdpa_pass")


class Implementation(str, enum.Enum):
    """What a rewritten site calls.

    TRITON: ``torch.ops.sdpa_pass.attention_forward``, our fused kernels (CUDA sm_80+; on CPU
      the Triton interpreter under ``TRITON_INTERPRET=1``, else the op's PyTorch CPU path).
    SDPA: ``F.scaled_dot_product_attention`` (whichever SDPA backend PyTorch picks: flash,
      memory-efficient, cuDNN, math; ``torch.nn.attention.sdpa_kernel`` still chooses among
      them), where it computes exactly what the site computes.
    MATH: ``sdpa_pass.kernels.reference.attention_math``, the op's semantics in plain torch ops
      computed in float64 and cast back to the inputs' dtype, on any device with float64; slow
      and memory-hungry (every score at once), for debugging and comparing.
    """

    TRITON = "triton"
    SDPA = "sdpa"
    MATH = "math"

    def __str__(self) -> str:
        return self.value


DEFAULT: tuple[Implementation, ...] = (Implementation.TRITON,)
# tried after the user's choices: a site their choices cannot serve runs our op if it can
LAST_RESORT = Implementation.TRITON
Choices = Union[Implementation, str, Iterable[Union[Implementation, str]]]


def resolve(choices: Choices) -> tuple[Implementation, ...]:
    """``choices`` as an ordered tuple without repeats; ValueError names what is wrong."""
    if isinstance(choices, (Implementation, str)):
        choices = [choices]
    try:
        items = list(choices)
    except TypeError:
        raise ValueError(f"implementation must be one of {_NAMES}, or an ordered list of them; "
                         f"got {choices!r}") from None
    if not items:
        raise ValueError(f"implementation needs at least one choice of {_NAMES}; got an empty list")
    out = []
    for item in items:
        try:
            impl = Implementation(item.lower() if isinstance(item, str) else item)
        except (ValueError, AttributeError):
            raise ValueError(f"unknown implementation {item!r}: choose from {_NAMES}") from None
        if impl not in out:
            out.append(impl)
    return tuple(out)


_NAMES = ", ".join(repr(i.value) for i in Implementation)
_state = threading.local()


def _stack() -> list:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def current_implementations() -> tuple[Implementation, ...]:
    """The choices in force in this thread: the innermost ``implementation(...)``, else DEFAULT."""
    stack = _stack()
    return stack[-1] if stack else DEFAULT


@contextlib.contextmanager
def implementation(choices: Choices) -> Iterator[tuple[Implementation, ...]]:
    """Choose what sites rewritten inside this block run, as ``sdpa_kernel`` does for SDPA:
    one choice, or an ordered list (the first that can serve a site). Nests: the innermost
    block wins, and leaving a block (by an exception too) restores the choice around it. Per
    thread. An ``implementation=`` argument of ``optimize()`` / the backend's options beats it.
    Read when a graph is compiled, not when a compiled model is called (see the module doc)."""
    resolved = resolve(choices)
    stack = _stack()
    stack.append(resolved)
    depth = len(stack)
    try:
        yield resolved
    finally:
        del stack[depth - 1:]


# ----------------------------------------------------------------------------- availability


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """(major, minor) compute capability of a CUDA device, None for other devices."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def _shape(plan: Plan) -> AttentionShape:
    B, H, L, D = plan.q.shape
    return AttentionShape(B, H, H // plan.group, L, plan.k.shape[2], D, plan.v.shape[3])


def causal_of(plan: Plan) -> tuple[int, int, int]:
    """(causal_align, diagonal, window) the site's masks were lifted to."""
    lift = plan.lift
    return (lift.causal_align, lift.diagonal, lift.window) if lift else (CAUSAL_NONE, 0, -1)


def uniform_rows(plan: Plan) -> bool:
    """Whether eager averages a row masked everywhere uniformly (finite fills), not NaN."""
    if plan.lift is not None:
        return plan.lift.uniform_on_empty
    return any(m.kind.startswith("fill") for m in plan.masks)


def rows_may_be_empty_for(plan: Plan) -> bool:
    """Whether some query row of the site may see no key (then SDPA and eager differ)."""
    return rows_may_be_empty(_shape(plan), *causal_of(plan), has_tensor_mask=bool(plan.kernel_masks))


def sdpa_is_causal(plan: Plan) -> bool:
    """Whether SDPA's own ``is_causal`` says the site's mask: top-left, no shift, no window,
    no tensor mask (SDPA takes is_causal or attn_mask, not both)."""
    return causal_of(plan) == (CAUSAL_TOP_LEFT, 0, -1) and not plan.kernel_masks


def can_serve(impl: Implementation, plan: Plan) -> Optional[str]:
    """None when ``impl`` computes exactly what the site computes on its inputs' device,
    dtype and shapes; else the reason it cannot, in words."""
    device = tensor_of(plan.q.node).device
    if impl is Implementation.TRITON:
        capability = device_capability(device)
        if capability is not None and tuple(capability) < (8, 0):
            return f"GPU sm_{capability[0]}{capability[1]}: our kernels need sm_80+"
        if device.type not in ("cuda", "cpu"):
            return f"{device.type} device: our kernels run on CUDA GPUs (and on CPU)"
        head_dim = max(plan.q.shape[3], plan.v.shape[3])
        if head_dim > MAX_HEAD_DIM:
            return f"head dim {head_dim}: our kernels take at most {MAX_HEAD_DIM}"
        if plan.dtype not in SUPPORTED_DTYPES:
            return f"{plan.dtype}: our kernels take float16, bfloat16 and float32"
        return None
    if impl is Implementation.SDPA:
        if plan.dropout_p > 0.0:
            return "dropout (SDPA draws other random numbers than eager and our kernels)"
        if plan.softcap:
            return "softcap (SDPA has no logit soft-capping)"
        if uniform_rows(plan) and rows_may_be_empty_for(plan):
            # the rewrite sets such rows to mean(V) after SDPA (which gives zeros there): right
            # for the values, and for the gradients where a fill replaced the scores; an
            # additive fill passes a uniform softmax's gradient to q and k, which it cannot
            if plan.lift is None:
                return (f"finite fills not read as one mask ({plan.lift_note}): eager's rows "
                        "masked everywhere may average only some keys")
            if not plan.lift.fills and needs_grad(plan):
                return ("an additive finite fill with gradients: eager's rows masked everywhere "
                        "pass a uniform softmax's gradient to q and k")
        return None
    if impl is Implementation.MATH:
        if plan.dropout_p > 0.0:
            return "dropout (the math reference has none)"
        if device.type == "mps":
            return "mps device: no float64"
        return None
    raise ValueError(f"unknown implementation {impl!r}")


_logged: set = set()


def choose(plan: Plan, choices: tuple[Implementation, ...]) -> tuple[Implementation, str]:
    """The first of ``choices`` (then TRITON) that can serve the site, and why it was picked.
    Raises NotASite("no_implementation") with every choice's reason when none can."""
    reasons = []
    for impl in choices + ((LAST_RESORT,) if LAST_RESORT not in choices else ()):
        why = can_serve(impl, plan)
        if why is None:
            note = "first choice" if not reasons else "; ".join(reasons) + f"; fell back to {impl.value}"
            if impl is Implementation.SDPA and causal_of(plan)[0] != CAUSAL_NONE and not sdpa_is_causal(plan):
                note += "; the causal predicate becomes an (L, S) bool mask for SDPA"
            return impl, note
        reasons.append(f"{impl.value} cannot serve: {why}")
        if (impl, why) not in _logged:
            _logged.add((impl, why))
            log.warning("sdpa_pass: %s cannot serve an attention site: %s", impl.value, why)
    raise NotASite("no_implementation", "; ".join(reasons))
