"""One-call use: ``optimize`` and ``explain``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from .backend import make_backend
from .implementations import Choices, resolve
from .kernels.launch import clear_plans
from .report import KernelChoices, Report


def optimize(model: Union[torch.nn.Module, Callable], backend: Union[str, Callable] = "inductor",
             dynamic: Optional[bool] = None,
             on_report: Optional[Callable[[Report], Any]] = None,
             implementation: Optional[Choices] = None, **options):
    """Compile ``model`` with the pass in front of ``backend``.

    An ``nn.Module`` is compiled in place (``Module.compile``) and returned, so attributes,
    ``state_dict`` and methods such as ``generate`` (which call the module) keep working and
    run the compiled forward. A function is returned compiled. ``on_report`` is called with
    the Report of every graph the pass sees (each compile, recompile and graph-break
    segment), as it is compiled. ``implementation``: what rewritten sites run, ``"triton"``,
    ``"sdpa"``, ``"math"`` or an ordered list of them (``sdpa_pass.Implementation``); it beats
    an enclosing ``sdpa_pass.implementation(...)`` block. Other keyword options go to
    ``backend``.
    """
    compile_options = {"backend": backend, **options}
    if on_report is not None:
        compile_options["on_report"] = on_report
    if implementation is not None:
        compile_options["implementation"] = resolve(implementation)  # a bad name fails here
    if isinstance(model, torch.nn.Module):
        model.compile(backend="sdpa_pass", dynamic=dynamic, options=compile_options)
        return model
    return torch.compile(model, backend="sdpa_pass", dynamic=dynamic, options=compile_options)


def explain(model: Union[torch.nn.Module, Callable], *args: Any, **kwargs: Any) -> Report:
    """Run ``model(*args, **kwargs)`` once under the pass (graphs run eagerly after the
    rewrite) and return the Report: every candidate site, rewritten or skipped with its
    reason, what each rewritten site runs and why, the FX graphs before and after, and the
    kernels the sites' launches ran (``Report.kernels``: Gluon or Triton, and why not Gluon;
    none where the op's CPU path or another implementation ran). The implementation is that
    of the enclosing ``sdpa_pass.implementation(...)`` block."""
    report = Report()
    backend = make_backend("eager", on_report=report.extend)
    torch._dynamo.reset()
    # the launch plans dropped, so every kernel the rewritten sites launch logs its choice
    # (built again on the next calls: host work only, the compiled kernels stay cached)
    clear_plans()
    try:
        with KernelChoices() as choices:
            torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        # explain() must not leave its graphs in the cache that the user's own compile uses
        torch._dynamo.reset()
    report.kernels = choices.lines
    return report
