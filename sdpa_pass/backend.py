"""The ``sdpa_pass`` Dynamo backend: rewrite attention in the captured graph, then hand the
graph to an inner backend (default ``"inductor"``; any Dynamo backend name or callable).

Registered under the name ``sdpa_pass`` both on import and through the
``torch_dynamo_backends`` entry point, so ``torch.compile(model, backend="sdpa_pass")`` works
after ``pip install`` without importing this package first.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Union

import torch.fx as fx
from torch._dynamo import lookup_backend, register_backend

from .implementations import Choices, resolve
from .report import Report
from .rewrite import rewrite

BackendLike = Union[str, Callable]
log = logging.getLogger("sdpa_pass")


def _inner(backend: BackendLike) -> Callable:
    return lookup_backend(backend) if isinstance(backend, str) else backend


def _is_inductor(backend: BackendLike, inner: Callable) -> bool:
    if backend == "inductor":
        return True
    from torch._inductor.compile_fx import compile_fx

    return inner is compile_fx


def make_backend(backend: BackendLike = "inductor", on_report: Optional[Callable[[Report], Any]] = None,
                 implementation: Optional[Choices] = None, **inner_options) -> Callable:
    """A Dynamo backend callable that runs the pass, reports, then compiles with ``backend``.
    ``implementation``: what rewritten sites run (default: the enclosing
    ``sdpa_pass.implementation(...)`` block's choice when a graph is compiled, else Triton)."""
    inner = _inner(backend)
    choices = None if implementation is None else resolve(implementation)

    def compile_fn(gm: fx.GraphModule, example_inputs):
        report = rewrite(gm, implementation=choices)
        if on_report is not None:
            on_report(report)
        if inner_options:
            if _is_inductor(backend, inner):
                # Inductor's Dynamo entry (compile_fx) takes its config as config_patches, as
                # torch.compile(backend="inductor", options=...) passes it
                return inner(gm, example_inputs, config_patches=inner_options)
            return inner(gm, example_inputs, options=inner_options)
        return inner(gm, example_inputs)

    return compile_fn


def sdpa_pass_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None,
                      mode: Optional[str] = None):
    """Entry point for ``torch.compile(..., backend="sdpa_pass", mode=..., options={...})``.

    options: ``backend`` names the inner compiler; ``implementation`` says what rewritten
    sites run (``"triton"``, ``"sdpa"``, ``"math"`` or an ordered list); ``on_report`` is
    called with each graph's Report; other keys are passed to the inner compiler as its
    ``options`` (Inductor's config dict, for example). mode: ``torch.compile``'s mode
    ("reduce-overhead", "max-autotune", ...), which torch passes to a backend named by string;
    it means Inductor settings, so it becomes Inductor's config for that mode (explicit
    options win) and, as Dynamo's own non-Inductor backends do, is ignored by other inner
    compilers (with a warning).
    """
    options = dict(options or {})
    backend = options.pop("backend", "inductor")
    if mode not in (None, "default"):
        if _is_inductor(backend, _inner(backend)):
            from torch._inductor import list_mode_options

            options = {**list_mode_options(mode), **options}
        elif mode not in _warned_modes:
            _warned_modes.add(mode)
            log.warning("sdpa_pass: mode=%r configures Inductor; the inner backend %r ignores it",
                        mode, backend)
    return make_backend(backend, **options)(gm, example_inputs)


_warned_modes: set = set()


def _register() -> None:
    # Dynamo registers an entry-point backend itself when the name is first looked up, by
    # loading this module and then calling register_backend, which rejects a name that is
    # already there. So register on import only when no entry point was discovered for the
    # name (a source checkout on sys.path without `pip install`); else leave it to Dynamo.
    from torch._dynamo.backends import registry

    if "sdpa_pass" not in registry._COMPILER_FNS and registry._BACKENDS.get("sdpa_pass") is None:
        register_backend(name="sdpa_pass")(sdpa_pass_backend)


_register()
