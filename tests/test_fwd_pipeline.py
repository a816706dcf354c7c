"""The forward's software-pipelined interior loop (SDPA_PASS_FWD_PIPELINE=1,
``_attend_tiles(PIPELINE=True)``): each key tile's P·V is issued one iteration late so the next
tile's softmax overlaps it on Hopper. It must compute what the plain loop computes: the same
products and sums in the same order per row, so in the interpreter the outputs are bitwise
those of the plain loop (on a GPU the two compiled kernels may contract differently, so
there they are compared with the float64 reference only).

The lengths give query tiles with no interior key tile, with one and with several (16x16
tiles in the interpreter); every case of
``test_launch_plans.CASES`` (masks, windows, padding, soft-capping, dropout, LSE, the
descriptor paths) runs at each.
"""

from __future__ import annotations

import pytest
import torch

from sdpa_pass.kernels import forward as fwd
from sdpa_pass.kernels.forward import interpreter_active, pipeline_supported
from sdpa_pass.kernels.launch import clear_plans
from reference import assert_close_to_reference, reference_attention
from test_launch_plans import CASES, D, S, _call, _inputs, _resolve

# (queries, keys), 16x16 interpreter tiles: "long_keys" gives seven whole key tiles per query
# tile, and in the causal cases query tiles with none, one and two before the diagonal (a
# square 64x64 length covered nothing these two do not, and cost CI time)
LENGTHS = {"short": (19, S), "long_keys": (40, 112)}


def test_the_variable_is_ignored_with_a_warning_where_the_loop_does_not_compile(monkeypatch):
    assert pipeline_supported("3.6.0", interpreting=True)
    assert not pipeline_supported("3.6.0", interpreting=False)
    assert pipeline_supported("3.9.0", interpreting=False)
    assert pipeline_supported("3.10.1+gitabc", interpreting=False)
    monkeypatch.setenv("SDPA_PASS_FWD_PIPELINE", "1")
    assert fwd.pipeline_requested() == pipeline_supported()
    monkeypatch.setattr(fwd, "pipeline_supported", lambda: False)
    with pytest.warns(UserWarning, match="SDPA_PASS_FWD_PIPELINE=1 is ignored"):
        assert not fwd.pipeline_requested()
    monkeypatch.setenv("SDPA_PASS_FWD_PIPELINE", "0")
    assert not fwd.pipeline_requested()


@pytest.mark.skipif(not pipeline_supported(), reason=(
    "this Triton's ptxas crashes compiling the pipelined loop, so SDPA_PASS_FWD_PIPELINE=1 is "
    "ignored here (kernels/forward.py, PIPELINE_MIN_TRITON)"))
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_pipelined_interior_loop_matches_the_plain_one(case, lengths, monkeypatch):
    import test_launch_plans

    calls, env = CASES[case]
    env = dict(env)
    keys, dim = env.pop("S", S), env.pop("D", D)
    queries, keys = LENGTHS[lengths][0], max(keys, LENGTHS[lengths][1])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(test_launch_plans, "L", queries)  # _inputs / _resolve read it
    dtype = torch.float16
    torch.manual_seed(0)
    q, k, v = _inputs(dtype, keys, dim)
    kwargs = _resolve(calls[1], dtype, keys)
    results = {}
    for pipeline in ("0", "1"):
        monkeypatch.setenv("SDPA_PASS_FWD_PIPELINE", pipeline)
        clear_plans()
        results[pipeline] = _call(q, k, v, kwargs, seed=2)
    if interpreter_active():
        for plain, pipelined in zip(results["0"], results["1"]):
            assert torch.equal(plain, pipelined)
    if not kwargs.get("dropout_p"):
        ref, _ = reference_attention(q, k, v, **{
            k_: v_ for k_, v_ in kwargs.items() if k_ not in ("return_lse", "enable_gqa")})
        assert_close_to_reference(results["1"][0], ref, dtype)
