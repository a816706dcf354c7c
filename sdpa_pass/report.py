"""Step 6: what the pass did, one ``Site`` per candidate, readable in ten seconds."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Optional, Union

import torch.fx as fx


@dataclasses.dataclass
class Site:
    status: str                      # "rewritten" | "skipped"
    source: str                      # "file.py:123" of the softmax in the user's code
    reason_code: Optional[str] = None
    reason: Optional[str] = None
    mask: str = "none"               # the mask tensor the kernel reads: "bool (2, 1, 1, 9)", ...
    causal: str = "none"             # the predicate lifted from the masks: "bottom-right, window 4"
    gqa_group: int = 1
    dtype: str = ""
    scale: Optional[float] = None
    softcap: Optional[float] = None
    # p of the in-kernel dropout (training mode), or "symbolic" where p is read at run time
    dropout: Union[float, str] = 0.0
    graph: int = 0                   # index of the graph in the report
    mask_note: Optional[str] = None  # why a mask stayed a tensor instead of a predicate
    # "none", "tensor" (what the kernel reads is a tensor), "predicate" (the masks became the
    # kernel's causal / window parameters) or "predicate+tensor" (a part stays a tensor, e.g.
    # a (B, 1, 1, S) padding mask)
    mask_form: str = "none"
    implementation: str = ""         # what the rewritten site runs: "triton", "sdpa", "math"
    implementation_note: str = ""    # why: "first choice", or which choices could not serve

    @property
    def rewritten(self) -> bool:
        return self.status == "rewritten"


@dataclasses.dataclass
class GraphRecord:
    before: str
    after: str


@dataclasses.dataclass
class Report:
    sites: list = dataclasses.field(default_factory=list)
    graphs: list = dataclasses.field(default_factory=list)   # GraphRecord per graph
    seconds: float = 0.0
    # explain(): the kernels the rewritten sites ran, a line per launch plan made while it ran
    # the model (KernelChoices); empty where none ran (the op's CPU path, other implementations)
    kernels: list = dataclasses.field(default_factory=list)

    @property
    def num_rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    @property
    def num_skipped(self) -> int:
        return sum(not s.rewritten for s in self.sites)

    def extend(self, other: "Report") -> None:
        offset = len(self.graphs)
        for s in other.sites:
            s.graph += offset
            self.sites.append(s)
        self.graphs.extend(other.graphs)
        self.seconds += other.seconds
        self.kernels.extend(k for k in other.kernels if k not in self.kernels)

    def __str__(self) -> str:
        head = (f"sdpa_pass: {self.num_rewritten} of {len(self.sites)} attention sites "
                f"rewritten in {len(self.graphs)} graph(s), pass time {self.seconds * 1e3:.1f} ms")
        if not self.sites:
            return head + "\n(no softmax fed by a matrix product was found)"
        cols = ["#", "source", "status", "runs", "mask", "causal", "GQA", "dtype", "scale",
                "dropout", "reason"]
        rows = []
        for i, s in enumerate(self.sites):
            rows.append([str(i), s.source, s.status, s.implementation or "-", s.mask, s.causal,
                         f"{s.gqa_group}:1" if s.gqa_group > 1 else "-", s.dtype,
                         "-" if s.scale is None else f"{s.scale:.4g}",
                         _dropout_text(s.dropout),
                         _reason(s)])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        widths[-1] = len(cols[-1])
        fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [head, fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        if self.kernels:
            lines += ["kernels run (a line per launch plan):"] + [f"  {k}" for k in self.kernels]
        return "\n".join(lines)

    __repr__ = __str__


def _dropout_text(p: Union[float, str]) -> str:
    if isinstance(p, str):
        return p
    return f"{p:g}" if p else "-"


def _reason(s: Site) -> str:
    if s.reason is not None:
        return f"[{s.reason_code}] {s.reason}"
    notes = []
    if s.implementation_note and s.implementation_note != "first choice":
        notes.append(s.implementation_note)
    if s.rewritten and s.mask_note is not None and s.mask != "none":
        notes.append(f"mask kept as a tensor: {s.mask_note}")
    return "; ".join(notes)


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def source_of(node: fx.Node) -> str:
    """file:line of the user's code that created ``node`` (Dynamo records a stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return f"<graph node {node.name}>"
    path, line = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def shape_text(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


class KernelChoices(logging.Handler):
    """Collects the ``sdpa_pass.kernels`` log lines (which kernels each new launch plan runs,
    and why not the Gluon ones) while installed as a context manager: distinct, in order. The
    logger is set to DEBUG for the duration and does not propagate then, so the lines land
    here rather than on the console of a root handler that shows everything."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if line not in self.lines:
            self.lines.append(line)

    def __enter__(self) -> "KernelChoices":
        logger = logging.getLogger("sdpa_pass.kernels")
        self._saved = logger.level, logger.propagate
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("sdpa_pass.kernels")
        logger.removeHandler(self)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]
