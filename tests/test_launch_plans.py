"""Launch plans (kernels/launch.py): a forward call whose plan key was seen before reuses the
first call's launch decisions and only passes its own tensors and floats; the backward's and
the decode kernel's launches reuse the first call's compiled kernels.

Each case runs a first call (which records the plan), a second call with new tensors of the
same layout and different float arguments (scale, soft-cap, dropout probability), and that
second call again with the plans cleared (the full path). The planned call must give bitwise
the same output and LSE as the full path: same kernel, same config, same arguments. On CPU the
kernel runs in the interpreter (the plan launches through ``kernel[grid]``); on a GPU the plan
calls the compiled kernel's launcher directly, which the GPU-only test asserts.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import triton

import sdpa_pass.kernels.forward as fwd
from sdpa_pass.kernels import attention
from sdpa_pass.kernels.launch import KernelCall, PlanCache, clear_plans
from reference import DEVICE, assert_close_to_reference, randn, reference_attention

B, HQ, HKV, L, S, D = 2, 4, 2, 19, 37, 32


def _bool_mask(S):
    mask = torch.rand(L, S, device=DEVICE) > 0.3
    mask[:, 0] = True
    return mask


def _padding(S):
    kpm = torch.rand(B, S, device=DEVICE) > 0.3
    kpm[:, 0] = True
    return kpm


# name: (per-call keyword arguments for call 1 and call 2, environment and shape overrides).
# Descriptor cases: S = 48 (a mask descriptor needs 16-byte aligned rows, which 37 keys are
# not) and D = 64 (on a GPU half-precision value tiles are at least 64 wide, and Q/K/V
# descriptors need head dims that are whole tiles).
CASES = {
    "plain": ([dict(enable_gqa=True), dict(enable_gqa=True, scale=0.3)], {}),
    "causal_gqa": ([dict(is_causal=True, enable_gqa=True),
                    dict(is_causal=True, enable_gqa=True, scale=0.11)], {}),
    "bottom_right_window": ([dict(causal="bottom_right", window=9, enable_gqa=True)] * 2, {}),
    "bool_mask": ([dict(attn_mask="bool", enable_gqa=True), dict(attn_mask="bool", enable_gqa=True, scale=0.2)], {}),
    "float_mask": ([dict(attn_mask="float", enable_gqa=True)] * 2, {}),
    "padding": ([dict(key_padding_mask="kpm", enable_gqa=True)] * 2, {}),
    "softcap": ([dict(softcap=5.0, enable_gqa=True), dict(softcap=2.0, enable_gqa=True)], {}),
    "dropout": ([dict(dropout_p=0.2, enable_gqa=True), dict(dropout_p=0.4, enable_gqa=True)], {}),
    "lse": ([dict(return_lse=True, is_causal=True, enable_gqa=True)] * 2, {}),
    "descriptors_causal": ([dict(is_causal=True, enable_gqa=True),
                            dict(is_causal=True, enable_gqa=True, scale=0.2)],
                           {"SDPA_PASS_TMA": "1", "D": 64}),
    "descriptors_bool_mask": ([dict(attn_mask="bool", enable_gqa=True)] * 2,
                              {"SDPA_PASS_TMA": "1", "SDPA_PASS_MASK_TMA": "1", "S": 48, "D": 64}),
    "mask_descriptor_float": ([dict(attn_mask="float", enable_gqa=True, scale=0.4)] * 2,
                              {"SDPA_PASS_MASK_TMA": "1", "S": 48}),
}


def _inputs(dtype, S=S, D=D):
    q = randn(B, HQ, L, D, dtype=dtype)
    k = randn(B, HKV, S, D, dtype=dtype)
    v = randn(B, HKV, S, D, dtype=dtype)
    return q, k, v


def _resolve(kwargs, dtype, S=S):
    """Materialise the mask placeholders of a case with fresh values (same layout)."""
    out = dict(kwargs)
    if out.get("attn_mask") == "bool":
        out["attn_mask"] = _bool_mask(S)
    elif out.get("attn_mask") == "float":
        out["attn_mask"] = randn(1, HQ, L, S, dtype=dtype)
    if out.get("key_padding_mask") == "kpm":
        out["key_padding_mask"] = _padding(S)
    return out


def _call(q, k, v, kwargs, seed):
    torch.manual_seed(seed)  # dropout's key comes from the default generator
    result = attention(q, k, v, **kwargs)
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("case", sorted(CASES))
def test_planned_call_matches_the_full_path(case, monkeypatch):
    calls, env = CASES[case]
    env = dict(env)
    keys, dim = env.pop("S", S), env.pop("D", D)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    dtype = torch.float16
    torch.manual_seed(0)
    clear_plans()
    first = _resolve(calls[0], dtype, keys)
    _call(*_inputs(dtype, keys, dim), first, seed=1)
    assert len(fwd._FORWARD_PLANS) == 1 and fwd._FORWARD_PLANS.hits == 0
    (plan,) = fwd._FORWARD_PLANS._plans.values()
    # the argument positions the plan wraps in descriptors: Q, K, V, O and the mask
    descriptors = {i for i, _ in plan.call.templates}
    assert descriptors == ({0, 1, 2, 3} if "SDPA_PASS_TMA" in env else set()) | (
        {5} if "SDPA_PASS_MASK_TMA" in env else set())

    q, k, v = _inputs(dtype, keys, dim)
    second = _resolve(calls[1], dtype, keys)
    planned = _call(q, k, v, second, seed=2)
    assert fwd._FORWARD_PLANS.hits == 1, "the second call did not use the plan"
    clear_plans()
    full = _call(q, k, v, second, seed=2)
    for a, b in zip(planned, full):
        assert torch.equal(a, b)
    if not second.get("dropout_p"):
        ref, _ = reference_attention(q, k, v, **{
            k_: v_ for k_, v_ in second.items() if k_ not in ("return_lse", "enable_gqa")})
        assert_close_to_reference(planned[0], ref, dtype)


def test_plan_key_separates_layouts_and_settings(monkeypatch):
    """A call differing in strides, alignment or a variable gets its own plan, and each
    planned call is still right."""
    monkeypatch.setenv("SDPA_PASS_TMA", "1")
    dtype = torch.float16
    torch.manual_seed(0)
    clear_plans()
    q, k, v = _inputs(dtype, D=64)  # whole descriptor tiles on a GPU too (see CASES)
    # same shape, (B, L, H, D) storage seen through a transpose
    qt = randn(B, L, HQ, 64, dtype=dtype).transpose(1, 2)
    # same shape and strides, base one element past a 16-byte boundary: no descriptors
    buf = randn(q.numel() + 1, dtype=dtype)
    qm = buf[1:].view(q.shape)
    outs = []
    for query in (q, qt, qm):
        outs.append((query, attention(query, k, v, is_causal=True, enable_gqa=True)))
    monkeypatch.setenv("SDPA_PASS_TMA", "0")
    outs.append((q, attention(q, k, v, is_causal=True, enable_gqa=True)))
    assert len(fwd._FORWARD_PLANS) == 4 and fwd._FORWARD_PLANS.hits == 0
    for query, out in outs:
        ref, _ = reference_attention(query, k, v, is_causal=True)
        assert_close_to_reference(out, ref, dtype)


def test_gradients_through_a_planned_forward():
    dtype = torch.float32
    torch.manual_seed(0)
    clear_plans()

    def run():
        q, k, v = (t.requires_grad_() for t in _inputs(dtype))
        out = attention(q, k, v, is_causal=True, enable_gqa=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return out, grads, (q, k, v)

    run()
    out, grads, (q, k, v) = run()
    assert fwd._FORWARD_PLANS.hits == 1
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(qd, kd, vd, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), torch.ones_like(ref))
    assert_close_to_reference(out, ref, dtype)
    for g, r in zip(grads, ref_grads):
        assert_close_to_reference(g, r, dtype)


def test_each_new_plan_logs_the_kernels_it_runs(caplog):
    """The ``sdpa_pass.kernels`` logger (DEBUG) names the kernels of each new forward and
    backward plan and why not the Gluon ones, once per plan: a second call with the same
    shape and layout logs nothing, another length logs again."""
    clear_plans()
    caplog.set_level(logging.DEBUG, logger="sdpa_pass.kernels")

    def step(S):
        q, k, v = (t.requires_grad_() for t in _inputs(torch.float16, S=S))
        attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        lines = [r.getMessage() for r in caplog.records if r.name == "sdpa_pass.kernels"]
        caplog.clear()
        return lines

    first = step(S)
    head = f"B{B} Hq{HQ}/Hkv{HKV} L{L} S{S} D{D}/{D} float16: "
    assert len(first) == 2, first
    assert first[0].startswith("forward " + head), first
    assert first[1].startswith("backward " + head + "dK/dV "), first
    # this small a call is host-bound wherever it runs, so the Triton kernels, with the reason
    assert first[0].endswith(f": Triton ({fwd.HOST_BOUND_REFUSAL})"), first
    assert "Triton (" in first[1], first
    assert step(S) == []
    assert [line.split(":")[0] for line in step(S + 8)] == [
        f"{what} B{B} Hq{HQ}/Hkv{HKV} L{L} S{S + 8} D{D}/{D} float16" for what in ("forward", "backward")]


def test_each_new_decode_plan_logs_its_splits(caplog):
    """The decode kernel's line, once per plan: its key splits (forced here) and their
    length; a second call with the same layout logs nothing."""
    import sdpa_pass.kernels.decode as dec
    from sdpa_pass.kernels.checks import CAUSAL_BOTTOM_RIGHT, check_attention_inputs

    clear_plans()
    caplog.set_level(logging.DEBUG, logger="sdpa_pass.kernels")
    q = randn(B, HQ, 1, D, dtype=torch.float16)
    k, v = randn(B, HKV, 70, D, dtype=torch.float16), randn(B, HKV, 70, D, dtype=torch.float16)
    shape = check_attention_inputs(q, k, v, None, None, causal_align=CAUSAL_BOTTOM_RIGHT)

    def step():
        dec.attention_decode_triton(q, k, v, None, None, shape, scale=0.2,
                                    causal_align=CAUSAL_BOTTOM_RIGHT, diagonal=0, window=-1,
                                    softcap=0.0, nan_on_empty=False, return_lse=False,
                                    num_splits=3)
        lines = [r.getMessage() for r in caplog.records if r.name == "sdpa_pass.kernels"]
        caplog.clear()
        return lines

    first = step()
    assert len(first) == 1, first
    assert first[0].startswith(f"decode B{B} Hq{HQ}/Hkv{HKV} L1 S70 D{D}/{D} float16: "
                               "split-KV Triton, 3 key splits of up to "), first
    assert step() == []
    assert dec._DECODE_CALLS.hits == 2  # the check for a new plan is not counted as a use


def test_backward_choices_name_each_kernel():
    """(Any device.) The backward's line: both kernels under one reason when dQ shares the
    dK/dV kernel's, each with its own otherwise, and dQ by atomics."""
    from sdpa_pass.kernels.backward import backward_choices
    assert backward_choices(None, None, False) == "dK/dV Gluon, dQ Gluon"
    assert backward_choices(None, "head dim 64", False) == "dK/dV Gluon, dQ Triton (head dim 64)"
    assert backward_choices("dropout", "dropout", False) == "dK/dV and dQ Triton (dropout)"
    assert backward_choices("dropout", "dropout", True) == (
        "dK/dV Triton (dropout) with dQ by atomics")


def test_plans_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SDPA_PASS_LAUNCH_PLANS", "0")
    clear_plans()
    q, k, v = _inputs(torch.float16)
    attention(q, k, v, enable_gqa=True)
    attention(q, k, v, enable_gqa=True)
    assert len(fwd._FORWARD_PLANS) == 0 and fwd._FORWARD_PLANS.hits == 0


def test_plan_cache_drops_the_oldest_past_capacity():
    cache = PlanCache(capacity=2)
    for key in "abc":
        cache.add(key, key.upper())
    assert len(cache) == 2 and cache.get("a") is None
    assert (cache.get("b"), cache.get("c"), cache.hits) == ("B", "C", 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
def test_gpu_plan_calls_the_compiled_kernel_unless_a_launch_hook_is_set(monkeypatch):
    """On a GPU a planned call launches the compiled kernel itself, not through Triton's
    ``JITFunction.run``; with a launch hook installed (a profiler) it goes through Triton's
    launch, which calls the hook."""
    from triton import knobs

    q, k, v = _inputs(torch.bfloat16, D=64)
    attention(q, k, v, is_causal=True, enable_gqa=True)
    (plan,) = fwd._FORWARD_PLANS._plans.values()
    assert isinstance(plan.call, KernelCall) and plan.call._run is not None
    if triton.__version__.startswith("3.6."):  # its launcher is bypassed (_DirectLaunch)
        assert plan.call._direct is not None

    kernel, jit_runs = fwd._attention_fwd_kernel, []
    real_run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **kw: jit_runs.append(1) or real_run(*a, **kw))
    direct = attention(q, k, v, is_causal=True, enable_gqa=True)
    assert fwd._FORWARD_PLANS.hits == 1 and jit_runs == []

    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # triton's HookChain
        chain.add(hook)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    try:
        hooked = attention(q, k, v, is_causal=True, enable_gqa=True)
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
    assert fwd._FORWARD_PLANS.hits == 2 and jit_runs == [1] and len(seen) == 1
    assert torch.equal(direct, hooked)


class _Triton36Driver:
    """A stand-in for triton 3.6's ``triton.backends.nvidia.driver`` module, as far as
    ``launch._triton36_launch`` reads it: the format of the arguments ahead of the kernel's
    and the launcher class, whose ``launch`` wraps the C function in ``inner`` (3.6's
    ``wrap_handle_tensordesc``: descriptors expanded by the module's ``make_tensordesc_arg``).
    The C function records what it is given; the encoder, which addresses it encoded."""

    name = "fake_triton36_driver"

    def __init__(self, monkeypatch):
        self.encoded, self.launched = [], []
        self.module = type(sys)(self.name)
        self.module._BASE_ARGS_FORMAT = "iiiKKppOOOOOO"
        self.module.make_tensordesc_arg = self.make_tensordesc_arg
        monkeypatch.setitem(sys.modules, self.name, self.module)

    def make_tensordesc_arg(self, arg, metadata):  # 3.6's: [encoded map, *shape, *strides]
        self.encoded.append(arg.base.data_ptr())
        return [("map", arg.base.data_ptr(), tuple(arg.block_shape), metadata["swizzle"]),
                *arg.shape, *arg.strides]

    def launcher(self, descriptor_positions):
        def c_launch(*args):
            self.launched.append(args)

        def wrap(launcher, tensordesc_indices, tensordesc_meta):
            def inner(*args):
                final_args = list(args[:13])
                tensordesc_idx = 0
                for i, arg in enumerate(args[13:]):
                    if i in tensordesc_indices:
                        final_args.extend(make_tensordesc_arg(  # noqa: F821 (module's)
                            arg, tensordesc_meta[tensordesc_idx]))
                        tensordesc_idx += 1
                    else:
                        final_args.append(arg)
                return launcher(*final_args)
            # a function of the module (its globals), as the real one is
            return types.FunctionType(inner.__code__, vars(self.module), "inner", None,
                                      inner.__closure__)

        class CudaLauncher:  # 3.6's __call__, with no scratch memory to allocate
            global_scratch_size = profile_scratch_size = 0
            launch_cooperative_grid, launch_pdl = False, True

            def __call__(self, gridX, gridY, gridZ, stream, function, *args):
                self.launch(gridX, gridY, gridZ, stream, function,
                            self.launch_cooperative_grid, self.launch_pdl, None, None, *args)

        CudaLauncher.__module__ = self.name
        run = CudaLauncher()
        run.launch = wrap(c_launch, set(descriptor_positions),
                          [dict(swizzle=128)] * len(descriptor_positions))
        return run


def test_direct_launch_passes_what_triton36_launcher_passes(monkeypatch):
    """``_DirectLaunch`` hands triton 3.6's C launch function the same arguments as the
    compiled kernel's ``run`` would (descriptors expanded in place, the fixed tail after the
    per-call arguments), and encodes a descriptor once per address: a second call on the
    same tensors reuses the encodings, a tensor at a new address gets its own."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from sdpa_pass.kernels import launch

    monkeypatch.setattr(launch, "_TENSOR_MAPS", {})
    run = (fake := _Triton36Driver(monkeypatch)).launcher(descriptor_positions=(0, 2))
    a, b, c = (torch.zeros(32, 16) for _ in range(3))
    descriptors = {0: TensorDescriptor.from_tensor(a, [16, 16]),
                   2: TensorDescriptor.from_tensor(c, [8, 16])}
    templates = {i: launch.descriptor_template(d) for i, d in descriptors.items()}
    tail = (64, True, 3)  # the kernel's parameters after the per-call ones
    direct = launch.direct_launch(run, templates, "function", "metadata", (4, 2, 1), 4, tail)
    assert direct is not None

    def through_run(args):
        wrapped = [launch.from_template(templates[i], t) if i in templates else t
                   for i, t in enumerate(args)]
        run(4, 2, 1, 7, "function", "metadata", None, None, None, *wrapped, *tail)
        return fake.launched.pop()

    def through_direct(args):
        direct(7, args)
        return fake.launched.pop()

    args = (a, b, c, 0.5)
    expected = through_run(args)
    fake.encoded.clear()
    assert through_direct(args) == expected and fake.encoded == [a.data_ptr(), c.data_ptr()]
    assert through_direct(args) == expected and len(fake.encoded) == 2  # kept by address
    d = torch.zeros(32, 16)
    args = (d, b, c, 0.25)
    expected = through_run(args)
    fake.encoded.clear()
    assert through_direct(args) == expected and fake.encoded == [d.data_ptr()]
    # another launch (another plan: here other tiles) on the same tensors encodes its own
    other_templates = {0: launch.descriptor_template(TensorDescriptor.from_tensor(d, [8, 16])),
                       2: templates[2]}
    other = launch.direct_launch(run, other_templates, "function", "metadata", (4, 2, 1), 4,
                                 tail)
    fake.encoded.clear()
    other(7, args)
    assert fake.encoded == [d.data_ptr(), c.data_ptr()]
    assert fake.launched.pop()[13] == ("map", d.data_ptr(), (8, 16), 128)


def test_direct_launch_only_for_triton36_launcher(monkeypatch):
    """Anything but triton 3.6's launcher shape (other argument formats, scratch memory to
    allocate, descriptors that are not the plan's templates) keeps Triton's own ``run``."""
    from sdpa_pass.kernels import launch

    fake = _Triton36Driver(monkeypatch)
    run = fake.launcher(descriptor_positions=(0,))
    templates = {0: None}
    assert launch.direct_launch(run, templates, "f", "m", (1, 1, 1), 2, ()) is not None
    assert launch.direct_launch(run, {}, "f", "m", (1, 1, 1), 2, ()) is None
    assert launch.direct_launch(run, {0: None, 1: None}, "f", "m", (1, 1, 1), 2, ()) is None
    run.global_scratch_size = 256
    assert launch.direct_launch(run, templates, "f", "m", (1, 1, 1), 2, ()) is None
    run.global_scratch_size = 0
    monkeypatch.setattr(fake.module, "_BASE_ARGS_FORMAT", "iiiKKOOOO")  # another version's
    assert launch.direct_launch(run, templates, "f", "m", (1, 1, 1), 2, ()) is None
    assert launch.direct_launch(object(), templates, "f", "m", (1, 1, 1), 2, ()) is None


# Backward: (environment, forward keyword arguments, whether the dK/dV kernel adds dQ).
BACKWARD_CASES = {
    "split": ({}, dict(is_causal=True, enable_gqa=True), False),
    "atomic_dq": ({"SDPA_PASS_BWD_DQ": "atomic"}, dict(is_causal=True, enable_gqa=True), True),
    "bool_mask": ({}, dict(attn_mask="bool", enable_gqa=True), False),
    "mask_gradient": ({}, dict(attn_mask="float_grad", enable_gqa=True), False),
    "dropout": ({}, dict(dropout_p=0.3, enable_gqa=True), False),
    "descriptors_atomic": ({"SDPA_PASS_BWD_TMA": "1", "SDPA_PASS_BWD_DQ": "atomic", "D": 64},
                           dict(is_causal=True, enable_gqa=True), True),
    "mask_descriptors": ({"SDPA_PASS_BWD_TMA": "1", "SDPA_PASS_MASK_TMA": "1", "D": 64, "S": 48},
                         dict(attn_mask="bool", enable_gqa=True), False),
    "float_mask_descriptors": ({"SDPA_PASS_MASK_TMA": "1", "S": 48},
                               dict(attn_mask="float_grad", enable_gqa=True), False),
}
# The argument positions each launch wraps in tensor descriptors (dK/dV: Q, K, V, dO, the
# mask and, on a GPU, the dQ sums it adds with the copy engine; dQ: the mask), by case.
BACKWARD_DESCRIPTORS = {
    "descriptors_atomic": {"dkdv": {0, 1, 2, 3} | ({12} if DEVICE == "cuda" else set())},
    "mask_descriptors": {"dkdv": {0, 1, 2, 3, 9}, "dq": {9}},
    "float_mask_descriptors": {"dkdv": {9}, "dq": {9}},
}


def _grads(q, k, v, kwargs, grad_out, seed):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kwargs = dict(kwargs)
    wrt = [q, k, v]
    if kwargs.get("attn_mask") is not None and kwargs["attn_mask"].is_floating_point():
        kwargs["attn_mask"] = kwargs["attn_mask"].detach().requires_grad_()
        wrt.append(kwargs["attn_mask"])
    torch.manual_seed(seed)
    out = attention(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, wrt, grad_out))


@pytest.mark.parametrize("case", sorted(BACKWARD_CASES))
def test_planned_backward_matches_the_full_path(case, monkeypatch):
    """The backward's launches (prep, dK/dV, dQ) reuse the first call's decisions and
    compiled kernels."""
    import sdpa_pass.kernels.backward as bwd

    env, kwargs, atomic = BACKWARD_CASES[case]
    env = dict(env)
    dim, keys = env.pop("D", D), env.pop("S", S)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    dtype = torch.float16
    torch.manual_seed(0)

    def call_inputs():
        resolved = _resolve({**kwargs, "attn_mask": "float"} if kwargs.get("attn_mask") == "float_grad"
                            else kwargs, dtype, keys)
        q, k, v = _inputs(dtype, keys, dim)
        return q, k, v, resolved, randn(B, HQ, L, dim, dtype=dtype)

    q, k, v, first, grad_out = call_inputs()
    _grads(q, k, v, first, grad_out, seed=1)
    # prep, dK/dV, then the dQ kernel or (atomic) the pass scaling the fp32 sums into dQ
    launches = 3
    assert len(bwd._BACKWARD_CALLS) == launches and bwd._BACKWARD_CALLS.hits == 0
    descriptors = {site: {i for i, _ in call.templates}
                   for (_, site), call in bwd._BACKWARD_CALLS._plans.items()}
    assert descriptors == {"prep": set(), "dkdv": set(), ("dq_sums" if atomic else "dq"): set(),
                           **BACKWARD_DESCRIPTORS.get(case, {})}
    assert len(bwd._BACKWARD_DECISIONS) == 1 and bwd._BACKWARD_DECISIONS.hits == 0

    q, k, v, second, grad_out = call_inputs()
    planned = _grads(q, k, v, second, grad_out, seed=2)
    assert bwd._BACKWARD_CALLS.hits == launches and bwd._BACKWARD_DECISIONS.hits == 1
    clear_plans()
    full = _grads(q, k, v, second, grad_out, seed=2)
    for a, b in zip(planned, full):
        if atomic and DEVICE == "cuda":  # the adds' order varies between runs on a GPU
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
        else:
            assert torch.equal(a, b)


def test_backward_decisions_follow_the_variables(monkeypatch):
    """A remembered backward decision is keyed on the SDPA_PASS_* variables too: changing one
    between two otherwise identical calls decides (and launches) afresh."""
    import sdpa_pass.kernels.backward as bwd

    seen = []
    launch = bwd._launch
    monkeypatch.setattr(bwd, "_launch", lambda kernel, tiles, grid, args, meta, *rest: (
        seen.append(meta), launch(kernel, tiles, grid, args, meta, *rest))[1])
    q, k, v = _inputs(torch.float16)
    grad_out = randn(B, HQ, L, D, dtype=torch.float16)
    kwargs = dict(is_causal=True, enable_gqa=True)
    results = []
    for padded in ("1", "0", "1"):
        monkeypatch.setenv("SDPA_PASS_BWD_PADDED_ROWS", padded)
        results.append(_grads(q, k, v, kwargs, grad_out, seed=1))
    assert [m["PADDED_ROWS"] for m in seen[::2]] == [True, False, True]
    assert len(bwd._BACKWARD_DECISIONS) == 2 and bwd._BACKWARD_DECISIONS.hits == 1
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_planned_decode_matches_the_full_path():
    """The split-KV decode kernel's two launches reuse the first call's compiled kernels."""
    import sdpa_pass.kernels.decode as dec
    from sdpa_pass.kernels.checks import CAUSAL_BOTTOM_RIGHT, check_attention_inputs

    dtype = torch.float16
    torch.manual_seed(0)

    def run(scale, mask):
        q = randn(B, HQ, 1, D, dtype=dtype)
        k, v = randn(B, HKV, 70, D, dtype=dtype), randn(B, HKV, 70, D, dtype=dtype)
        shape = check_attention_inputs(q, k, v, mask, None, causal_align=CAUSAL_BOTTOM_RIGHT)
        return q, k, v, lambda: dec.attention_decode_triton(
            q, k, v, mask, None, shape, scale=scale, causal_align=CAUSAL_BOTTOM_RIGHT,
            diagonal=0, window=-1, softcap=0.0, nan_on_empty=False, return_lse=True,
            num_splits=3)

    mask = torch.rand(1, 70, device=DEVICE) > 0.2
    mask[:, -1] = True
    run(0.2, mask)[3]()
    assert len(dec._DECODE_CALLS) == 2 and dec._DECODE_CALLS.hits == 0
    q, k, v, call = run(0.35, torch.rand(1, 70, device=DEVICE) > 0.5)
    planned = call()
    assert dec._DECODE_CALLS.hits == 2
    clear_plans()
    full = call()
    for a, b in zip(planned, full):
        assert torch.equal(a, b)


def test_shared_decode_plans_span_cache_lengths(monkeypatch):
    """SDPA_PASS_DECODE_SHARED_PLANS=1: decode steps whose cache lengths differ share the
    launches of an earlier step where Triton would pick the same compiled kernel (the same
    specialization classes of every argument: here 70, 86 and 102 keys leave 6 over 16) and
    the grid agrees (3 forced splits); a length that 16 divides makes its own split launch
    (the merge launch, whose arguments do not hold the length, is shared by all). Every output
    equals the one without plans bit for bit (on a GPU the shared launches call the first
    step's compiled kernel directly, so a class left out of the key would show here)."""
    import sdpa_pass.kernels.decode as dec
    from sdpa_pass.kernels.checks import CAUSAL_BOTTOM_RIGHT, check_attention_inputs

    torch.manual_seed(0)
    q = randn(B, HQ, 1, D, dtype=torch.float16)
    caches = {n: tuple(randn(B, HKV, n, D, dtype=torch.float16) for _ in range(2))
              for n in (70, 86, 102, 80)}

    def step(n, splits=3):
        k, v = caches[n]
        shape = check_attention_inputs(q, k, v, None, None, causal_align=CAUSAL_BOTTOM_RIGHT)
        return dec.attention_decode_triton(
            q, k, v, None, None, shape, scale=0.2, causal_align=CAUSAL_BOTTOM_RIGHT,
            diagonal=0, window=-1, softcap=0.0, nan_on_empty=False, return_lse=True,
            num_splits=splits)

    monkeypatch.setenv("SDPA_PASS_LAUNCH_PLANS", "0")
    expected = {n: step(n) for n in caches}
    expected_own = {n: step(n, None) for n in caches}
    monkeypatch.delenv("SDPA_PASS_LAUNCH_PLANS")
    monkeypatch.setenv("SDPA_PASS_DECODE_SHARED_PLANS", "1")
    clear_plans()
    for n in (70, 86, 102):
        for got, want in zip(step(n), expected[n]):
            assert torch.equal(got, want), n
    assert len(dec._DECODE_CALLS) == 2 and dec._DECODE_CALLS.hits == 4
    for got, want in zip(step(80), expected[80]):
        assert torch.equal(got, want)
    # a split launch of its own; the merge's arguments do not hold the length: shared still
    assert len(dec._DECODE_CALLS) == 3 and dec._DECODE_CALLS.hits == 5
    for n in caches:  # the number of splits the library chooses (on a GPU, from the SM count)
        for got, want in zip(step(n, None), expected_own[n]):
            assert torch.equal(got, want), n


def test_specialization_classes_name_what_triton_specializes_on():
    """(Any device.) Integers by their type's range, == 1 and divisibility by 16; tensors by
    dtype, device and 16-byte alignment; bools and None by value; floats by type alone; a
    tensor descriptor has no class (no shared key)."""
    from sdpa_pass.kernels.launch import specialization_classes
    t = torch.zeros(8, dtype=torch.float16)
    assert specialization_classes((70, 86)) == specialization_classes((86, 70))
    assert specialization_classes((70,)) != specialization_classes((80,))
    assert specialization_classes((1,)) != specialization_classes((17,))
    assert specialization_classes((2**31 + 6,)) != specialization_classes((22,))
    assert specialization_classes((0.5, None, True)) == specialization_classes((2.0, None, True))
    assert specialization_classes((True,)) != specialization_classes((False,))
    other = torch.ones(8, dtype=torch.float16)
    assert specialization_classes((t,)) == specialization_classes((other,))
    assert specialization_classes((t,)) != specialization_classes((t[1:],))  # 2 bytes in
    assert specialization_classes((t,)) != specialization_classes((t.float(),))
    assert specialization_classes((object(),)) is None


def test_backward_keys_separate_mask_gradient_and_deterministic_mode(monkeypatch):
    """Same layouts, different launches: a float mask's gradient adds a dS output to the dQ
    kernel; deterministic mode turns the forced atomic dQ path into the split one."""
    import sdpa_pass.kernels.backward as bwd

    dtype = torch.float16
    torch.manual_seed(0)
    q, k, v = _inputs(dtype)
    grad_out = randn(B, HQ, L, D, dtype=dtype)
    bias = randn(1, HQ, L, S, dtype=dtype)
    qg = q.detach().requires_grad_()
    out = attention(qg, k, v, attn_mask=bias, enable_gqa=True)  # no mask gradient wanted
    torch.autograd.grad(out, qg, grad_out)
    out = attention(q, k, v, attn_mask=bias.requires_grad_(), enable_gqa=True)
    planned = torch.autograd.grad(out, bias, grad_out)[0]
    assert bwd._BACKWARD_CALLS.hits == 0 and len(bwd._BACKWARD_CALLS) == 6
    clear_plans()
    out = attention(q, k, v, attn_mask=bias, enable_gqa=True)
    assert torch.equal(planned, torch.autograd.grad(out, bias, grad_out)[0])

    clear_plans()
    monkeypatch.setenv("SDPA_PASS_BWD_DQ", "atomic")
    _grads(q, k, v, dict(is_causal=True, enable_gqa=True), grad_out, seed=1)
    assert len(bwd._BACKWARD_CALLS) == 3  # prep, dK/dV adding dQ's sums, their scaling
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # reproducible gradients: no atomic adds
    try:
        planned = _grads(q, k, v, dict(is_causal=True, enable_gqa=True), grad_out, seed=1)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert bwd._BACKWARD_CALLS.hits == 0 and len(bwd._BACKWARD_CALLS) == 6  # a key of its own
    monkeypatch.delenv("SDPA_PASS_BWD_DQ")
    clear_plans()
    full = _grads(q, k, v, dict(is_causal=True, enable_gqa=True), grad_out, seed=1)
    for a, b in zip(planned, full):
        assert torch.equal(a, b)
