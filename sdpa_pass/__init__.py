"""sdpa_pass: find hand-written attention in PyTorch models and run it on fused Triton kernels.

    compiled = torch.compile(model, backend="sdpa_pass")      # or options={"backend": ...}
    model = sdpa_pass.optimize(model)
    print(sdpa_pass.explain(model, *example_args))
    report = sdpa_pass.rewrite(graph_module)                    # any torch.fx GraphModule
    with sdpa_pass.implementation(["sdpa", "triton"]): ...      # what rewritten sites run
"""

from __future__ import annotations

from . import kernels
from .api import explain, optimize
from .backend import make_backend, sdpa_pass_backend
from .implementations import Implementation, implementation
from .kernels import attention
from .report import Report, Site
from .rewrite import rewrite

__version__ = "0.1.0"

__all__ = ["attention", "explain", "Implementation", "implementation", "kernels", "make_backend",
           "optimize", "Report", "rewrite", "sdpa_pass_backend", "Site", "__version__"]
