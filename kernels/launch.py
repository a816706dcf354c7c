"""Host-side launch plans: a call's launch decisions, remembered so the next call with the
same layout only fills in its pointers and scalars.

Why: on the H100 machine's host (torch 2.11, triton 3.6) one forward call spent ~80-140 us of
host time in ``attention_forward_triton`` (measured; BENCHMARKS.md, session 9), of which
~35-50 us was Triton's ``JITFunction.run`` (binding and specializing 43 arguments, building its
cache key) and most of the rest our own per-call decisions (which load path, tensor
descriptors, strides), against ~8-16 us for calling the compiled kernel's launcher directly.
With the custom op's dispatch on top, calls whose kernels take ~100 us (N = 512 prefills,
decode steps) were host-bound.

Safety: a plan is keyed on everything the decisions and Triton's specialization read (shapes,
strides, dtypes, device, 16-byte alignment of every pointer, the call's flags and integer
arguments, the SDPA_PASS_* and TRITON_INTERPRET variables); floats (scale, soft-cap, dropout
probability) are plain runtime arguments Triton does not specialize on. So the kernel Triton
compiled for a plan's first call is the one it would select again, and ``KernelCall`` calls it
directly. Where that would skip something Triton does (launch hooks, set by profilers such as
proton; the interpreter, which has no compiled kernel) it goes through ``kernel[grid]``.
``SDPA_PASS_LAUNCH_PLANS=0`` turns plans off. On triton 3.6 a planned launch skips the compiled
kernel's Python launcher too (``_DirectLaunch``; ``SDPA_PASS_DIRECT_LAUNCH=0`` keeps it).
``SDPA_PASS_DECODE_SHARED_PLANS=1`` keys the decode kernel's launches on
``specialization_classes`` instead of the layout, so steps of a growing cache share them
(decode.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from typing import Any, Hashable, Optional, Sequence

import torch
from triton import knobs
from triton.runtime.driver import driver

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - triton without host tensor descriptors
    TensorDescriptor = None
try:  # Gluon kernels take their own descriptor class (it carries the shared-memory layout)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
except ImportError:  # pragma: no cover - triton without Gluon's Hopper API
    GluonTensorDescriptor = None
_DESCRIPTOR_TYPES = tuple(t for t in (TensorDescriptor, GluonTensorDescriptor) if t is not None)

# The variables that change a launch's decisions; part of every plan key.
_VARIABLES = ("TRITON_INTERPRET", "SDPA_PASS_TMA", "SDPA_PASS_MASK_TMA", "SDPA_PASS_AUTOTUNE",
              "SDPA_PASS_BWD_TMA", "SDPA_PASS_BWD_DQ", "SDPA_PASS_FWD_PIPELINE",
              "SDPA_PASS_BWD_PADDED_ROWS", "SDPA_PASS_BATCH_INNER", "SDPA_PASS_GLUON",
              "SDPA_PASS_GLUON_BWD", "SDPA_PASS_GLUON_BWD_ORDER", "SDPA_PASS_DQ_ORDER",
              "SDPA_PASS_GLUON_DQ", "SDPA_PASS_KEY_SPAN", "SDPA_PASS_GLUON_PADDING",
              "SDPA_PASS_GLUON_MASK", "SDPA_PASS_GLUON_FWD_HD256", "SDPA_PASS_GLUON_BIAS",
              "SDPA_PASS_GLUON_BWD_BIAS", "SDPA_PASS_GLUON_WINDOW",
              "SDPA_PASS_GLUON_SOFTCAP", "SDPA_PASS_DECODE_SHARED_PLANS",
              "SDPA_PASS_DIRECT_LAUNCH", "SDPA_PASS_GLUON_FUSED_DQ")


# os.environ.get costs ~1 us a name (CPython's Mapping.get -> __getitem__ -> key encoding and
# value decoding), ~17 us for the 17 names a plan key reads, twice per eager forward +
# backward: ~30 us of host time on CPU (torch 2.13), about twice that on the H100 machine.
# os.environ keeps the encoded mapping in ``_data`` (every CPython since 3.2; os.putenv and
# monkeypatch.setenv go through os.environ, which updates it), so the same values are read
# from it directly with the keys encoded once; where it is missing, the public route.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = (tuple(os.environ.encodekey(name) for name in ("SDPA_PASS_LAUNCH_PLANS", *_VARIABLES))
             if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None)
_PLANS_OFF = (b"0" if _ENV_KEYS is not None and isinstance(_ENV_KEYS[0], bytes) else "0")


def _variables() -> tuple:
    """(SDPA_PASS_LAUNCH_PLANS, *_VARIABLES) as the environment holds them (None if unset);
    encoded (bytes on POSIX) when read from os.environ's own mapping."""
    if _ENV_KEYS is not None:
        return tuple(map(_ENV_DATA.get, _ENV_KEYS))
    return tuple(map(os.environ.get, ("SDPA_PASS_LAUNCH_PLANS", *_VARIABLES)))


# Which kernel each new launch plan runs, and why not the Gluon one: a child of the pass's
# "sdpa_pass" logger, at DEBUG, once per plan (so once per shape and layout, not per call).
kernel_log = logging.getLogger("sdpa_pass.kernels")


# A launch grid's second and third dimensions hold at most 65535 programs each (CUDA's
# gridDim.y / gridDim.z; the first holds 2**31 - 1). The Triton kernels put B * H on the second
# (``split_rows`` folds it into the third past that); a module constant, so tests can lower it.
GRID_ROWS_LIMIT = 65535


def split_rows(rows: int) -> tuple:
    """(y, z) with y * z == ``rows`` (B * H programs' rows) and both within GRID_ROWS_LIMIT,
    z as small as it can be (1 for any rows up to the limit): the kernels take row
    ``program_id(1) + program_id(2) * num_programs(1)`` (``forward.program_tile``). Raises
    ValueError where no such split exists (a count with no divisor in range, e.g. a prime batch
    past the limit with one head)."""
    limit = GRID_ROWS_LIMIT
    if rows <= limit:
        return rows, 1
    for z in range(-(-rows // limit), min(rows, limit) + 1):
        if rows % z == 0:
            return rows // z, z
    raise ValueError(
        f"batch x heads = {rows} rows of programs cannot be laid out on a GPU launch grid "
        f"(two dims of at most {limit} whose product is {rows}); call attention on chunks "
        f"of the batch")


def log_kernel_choice(what: str, shape, dtype, choices: str) -> None:
    """``kernel_log``: ``what`` (forward, backward, decode) of a ``shape``
    (checks.AttentionShape) of ``dtype`` runs ``choices``."""
    if kernel_log.isEnabledFor(logging.DEBUG):
        kernel_log.debug("%s B%d Hq%d/Hkv%d L%d S%d D%d/%d %s: %s", what, shape.batch,
                         shape.q_heads, shape.kv_heads, shape.q_len, shape.kv_len,
                         shape.head_dim, shape.v_head_dim, str(dtype).replace("torch.", ""),
                         choices)


def kernel_choice(refusal: Optional[str]) -> str:
    """"Gluon", or "Triton (<why not Gluon>)" for a ``refusal`` (None: taken)."""
    return "Gluon" if refusal is None else f"Triton ({refusal})"


def call_key(*parts) -> Optional[tuple]:
    """A call's plan key: ``parts`` (what its launches decide from, ``tensor_key`` for each
    tensor) plus the variables of _VARIABLES; None when SDPA_PASS_LAUNCH_PLANS=0."""
    plans, *variables = _variables()
    if plans == _PLANS_OFF:
        return None
    return (*parts, *variables)


def tensor_key(t) -> Optional[tuple]:
    """What a launch may depend on about one tensor argument: layout, dtype, device and
    whether its address is 16-byte aligned (Triton specializes pointers on that)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


def specialization_classes(args: Sequence) -> Optional[tuple]:
    """What Triton may specialize a compiled kernel on, per positional argument, as a superset
    of its rules (triton 3.6-3.9 on NVIDIA): a tensor's dtype, device and 16-byte alignment;
    an integer's type (the range of i32, i64, u64), whether it is 1 and whether 16 divides it;
    a bool's or None's value; a float's type alone. Launches whose arguments agree on these,
    with the same kernel, meta-parameters and grid, run the same compiled kernel: a key for
    sharing a plan between calls whose integers differ (decode steps of a growing cache).
    None for an argument of another kind (a tensor descriptor): no such key."""
    classes = []
    for a in args:  # (by exact type first: ints are most of a launch's arguments)
        kind = type(a)
        if kind is int:
            classes.append((a == 1) + 2 * (a % 16 == 0) + 4 * (-2**31 <= a < 2**31)
                           + 8 * (a < 2**63))
        elif kind is float:
            classes.append(float)
        elif a is None or kind is bool:
            classes.append(a)
        elif isinstance(a, torch.Tensor):
            classes.append((a.dtype, a.device, a.data_ptr() % 16 == 0))
        else:
            return None
    return tuple(classes)


_CACHES: list = []


def clear_plans() -> None:
    """Forget every remembered launch (tests that swap kernel internals start with this)."""
    for cache in _CACHES:
        cache.clear()


class PlanCache:
    """Plans by key, oldest dropped first past ``capacity`` (a decode loop with a growing
    cache makes a new key every step)."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._plans: dict = {}
        self.hits = 0
        _CACHES.append(self)

    def get(self, key: Hashable):
        plan = self._plans.get(key)
        if plan is not None:
            self.hits += 1
        return plan

    def add(self, key: Hashable, plan) -> None:
        if len(self._plans) >= self.capacity:
            del self._plans[next(iter(self._plans))]
        self._plans[key] = plan

    def __contains__(self, key: Hashable) -> bool:
        return key in self._plans  # (not a use: ``hits`` counts only ``get``)

    def clear(self) -> None:
        self._plans.clear()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._plans)


def descriptor_template(desc) -> tuple:
    """A descriptor's class and fields without its tensor (a plan must not keep the first
    call's tensors alive); ``from_template`` rebuilds one around a new tensor."""
    fields = dict(vars(desc))
    fields["base"] = None
    return type(desc), fields


def from_template(template: tuple, base):
    # A TensorDescriptor's __post_init__ re-validates shape, strides and alignment on every
    # construction (~3 us each, 4-5 per call); the plan key already fixes all three, so the
    # fields are copied as they were validated on the plan's first call.
    cls, fields = template
    desc = object.__new__(cls)
    vars(desc).update(fields)
    desc.base = base
    return desc


def launch_hooks_set() -> bool:
    """Whether a launch hook is installed. Triton 3.6-3.9 keep each hook as a ``HookChain``
    (never None; empty unless a profiler added a function); a plain function assigned
    instead counts too."""
    runtime = knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def descriptor_templates(args: Sequence) -> dict:
    """{position: descriptor_template} for the tensor descriptors among a launch's arguments."""
    if not _DESCRIPTOR_TYPES:
        return {}
    return {i: descriptor_template(a) for i, a in enumerate(args)
            if isinstance(a, _DESCRIPTOR_TYPES)}


# Triton 3.6's launch path, below the compiled kernel's ``run`` (``CudaLauncher.__call__``):
# for every launch it builds two scratch-allocation closures, walks every argument in Python
# and, for each tensor descriptor, re-encodes a CUtensorMap (``make_tensordesc_arg``: Python
# plus ``cuTensorMapEncodeTiled``). On the H200 machine's host (session 29, under cProfile)
# ``run`` took ~80 us of a planned launch's ~110, the C launch (``cuLaunchKernelEx`` included)
# ~10-35 of it; an eager Gluon forward + backward passes ~17 descriptors in four launches, and
# its rows at N <= 1k were host-bound. torch's C++ launcher for Triton kernels
# (Inductor's ``static_triton_launcher``) refuses kernels with descriptors ("nvTmaDesc
# kernels are not yet supported", torch 2.13), so ``_DirectLaunch`` does it by hand: the same
# C launch function with the same arguments, the descriptors' encodings kept by address.
# A plan fixes a descriptor's shape, strides, dtype, tiles and layout (``from_template``), so
# its encoding depends only on the tensor's address: one encoded for an address is the one
# Triton would encode again, whichever tensor lives there now (the plan fixes the device too,
# so an address is one device's).
_TENSOR_MAPS: dict = {}  # (launch id, argument position, address) -> expanded arguments
_TENSOR_MAPS_CAPACITY = 4096
_LAUNCH_IDS = itertools.count()
# the launch's fixed arguments ahead of the kernel's, as triton 3.6's launcher parses them
_TRITON36_BASE_FORMAT = "iiiKKppOOOOOO"


def _triton36_launch(run) -> Optional[tuple]:
    """(C launch function, {kernel argument position: descriptor metadata},
    ``make_tensordesc_arg``) of a compiled kernel's launcher when it is triton 3.6's
    ``CudaLauncher`` with no scratch memory to allocate per launch; None otherwise (another
    Triton, another backend, a kernel with global or profile scratch): the launch then goes
    through ``run`` itself."""
    module = sys.modules.get(type(run).__module__)
    if (type(run).__name__ != "CudaLauncher" or module is None
            or getattr(module, "_BASE_ARGS_FORMAT", None) != _TRITON36_BASE_FORMAT
            or getattr(run, "global_scratch_size", 1) != 0
            or getattr(run, "profile_scratch_size", 1) != 0):
        return None
    launch = run.launch
    code = getattr(launch, "__code__", None)
    if code is None:  # no descriptor among the arguments: the C function itself
        return (launch, {}, None) if callable(launch) else None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in launch.__closure__ or ())))
    if code.co_name != "inner" or set(cells) != {"launcher", "tensordesc_indices",
                                                   "tensordesc_meta"}:
        return None
    make_arg = launch.__globals__.get("make_tensordesc_arg")
    indices = sorted(cells["tensordesc_indices"])
    metas = cells["tensordesc_meta"] or [None] * len(indices)
    if make_arg is None or len(metas) != len(indices):
        return None
    return cells["launcher"], dict(zip(indices, metas)), make_arg


class _DirectLaunch:
    """One compiled kernel's launch through triton 3.6's C launch function, the arguments laid
    out as ``CudaLauncher`` lays them (``_triton36_launch``), each descriptor's expansion
    (encoded map, shape, strides) taken from ``_TENSOR_MAPS`` by address when there."""

    def __init__(self, launch, metas: dict, make_arg, templates: dict, run, function,
                 metadata, grid3: tuple, tail: tuple):
        self._launch, self._make_arg = launch, make_arg
        uid = next(_LAUNCH_IDS)
        # (position, template, metadata, cache key prefix), in argument order
        self._descriptors = tuple((i, templates[i], metas[i], (uid, i)) for i in sorted(metas))
        self._head = (*grid3, None, function, run.launch_cooperative_grid, run.launch_pdl,
                      None, None, metadata, None, None, None)
        self._tail = tail

    def __call__(self, stream, args: Sequence) -> None:
        final = list(self._head)
        final[3] = stream
        maps, start = _TENSOR_MAPS, 0
        for i, template, meta, prefix in self._descriptors:
            final.extend(args[start:i])
            tensor = args[i]
            key = (prefix, tensor.data_ptr())
            expanded = maps.get(key) if meta is not None else None
            if expanded is None:
                expanded = self._make_arg(from_template(template, tensor), meta)
                if meta is not None:  # (without metadata the expansion holds the tensor)
                    if len(maps) >= _TENSOR_MAPS_CAPACITY:
                        maps.clear()
                    maps[key] = expanded
            final.extend(expanded)
            start = i + 1
        final.extend(args[start:])
        final.extend(self._tail)
        self._launch(*final)


def direct_launch(run, templates: dict, function, metadata, grid3: tuple, n_args: int,
                  tail: tuple) -> Optional[_DirectLaunch]:
    """A ``_DirectLaunch`` for a compiled kernel's launcher ``run`` whose descriptors are
    exactly the ``templates`` (position: template) among the first ``n_args`` arguments, or
    None (not triton 3.6's launcher, or descriptors elsewhere): Triton's ``run`` then."""
    found = _triton36_launch(run)
    if found is None:
        return None
    launch, metas, make_arg = found
    if set(metas) != set(templates) or any(i >= n_args for i in metas):
        return None
    return _DirectLaunch(launch, metas, make_arg, templates, run, function, metadata, grid3,
                         tail)


class KernelCall:
    """One kernel launch with everything but the leading per-call arguments fixed: ``tail``
    is the values of the kernel's remaining parameters in order (constexprs included), as
    Triton's own launch passes them.

    ``launched``: the first launch's positional arguments, after its pre-hook gave its tensor
    descriptors their config's tiles. A later call passes plain tensors in those positions and
    gets descriptors made from the first launch's (``from_template``: same shape, strides and
    tiles, so neither re-validated nor given to the pre-hook again), or, through triton 3.6's
    launcher (``_DirectLaunch``), their encodings."""

    def __init__(self, kernel, compiled: Any, grid: Sequence[int], launched: Sequence,
                 params: dict):
        self.kernel = kernel
        self.grid = tuple(grid)
        self.kwargs = params  # meta-parameters and config, for the kernel[grid] route
        names = kernel.arg_names[len(launched):]
        self.tail = tuple(params[name] for name in names)
        self.templates = tuple(descriptor_templates(launched).items())
        g = tuple(grid) + (1, 1)
        self._grid3 = g[:3]
        self._run = self._direct = None
        if compiled is not None and hasattr(compiled, "packed_metadata"):
            self._run = compiled.run  # a property: loads the module on first use
            self._function, self._metadata = compiled.function, compiled.packed_metadata
            if os.environ.get("SDPA_PASS_DIRECT_LAUNCH", "") != "0":
                self._direct = direct_launch(self._run, dict(self.templates), self._function,
                                             self._metadata, self._grid3, len(launched),
                                             self.tail)

    def __call__(self, args: Sequence) -> None:
        if self._run is None or launch_hooks_set():
            self.kernel[self.grid](*self._described(args), **self.kwargs)
            return
        device = driver.active.get_current_device()
        stream = driver.active.get_current_stream(device)
        if self._direct is not None:
            self._direct(stream, args)
            return
        self._run(*self._grid3, stream, self._function, self._metadata, None, None, None,
                  *self._described(args), *self.tail)

    def _described(self, args: Sequence) -> Sequence:
        """``args`` with tensor descriptors made from the templates in their positions."""
        if not self.templates:
            return args
        args = list(args)
        for i, template in self.templates:
            args[i] = from_template(template, args[i])
        return args


def _with_descriptors(args: Sequence, descriptors: Optional[dict]) -> Sequence:
    if not descriptors:
        return args
    return tuple(descriptors[i](a) if i in descriptors else a for i, a in enumerate(args))


def launch_remembered(calls: PlanCache, key: Optional[Hashable], args: Sequence, first,
                      descriptors: Optional[dict] = None) -> None:
    """Launch ``args`` through the ``KernelCall`` remembered under ``key`` (a call key plus
    the launch site). Without one, ``first(launched)`` launches the Triton way and returns
    (jit kernel, compiled kernel, grid, meta-parameters and config), remembered for the next
    call; ``key`` None (plans off) always goes that way. ``descriptors``: {position: maker}
    for the arguments the kernel takes as tensor descriptors; ``args`` holds their tensors,
    which the first launch wraps with the makers and later ones with the remembered
    templates (``KernelCall``)."""
    call = calls.get(key) if key is not None else None
    if call is not None:
        call(args)
        return
    launched = _with_descriptors(args, descriptors)
    kernel, compiled, grid, params = first(launched)
    if key is not None:
        calls.add(key, KernelCall(kernel, compiled, grid, launched, params))


def launch_fixed(calls: PlanCache, key: Optional[Hashable], kernel, grid, args: Sequence,
                 params: dict, pre_hook=None, descriptors: Optional[dict] = None) -> None:
    """``launch_remembered`` for a kernel launched with fixed meta-parameters and tiles (no
    autotuner): the first call goes through ``kernel[grid]``, after ``pre_hook`` if any;
    ``grid`` may be a tuple or, as Triton takes it, a function of the meta-parameters."""
    def first(launched):
        if pre_hook is not None:
            pre_hook({**dict(zip(kernel.arg_names, launched)), **params})
        compiled = kernel[grid](*launched, **params)
        return kernel, compiled, grid(params) if callable(grid) else grid, params

    launch_remembered(calls, key, args, first, descriptors)
