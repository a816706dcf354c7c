"""The benchmark harness's timing rounds (benchmarks/attention.py, ``bench_shape``): with
``rounds`` > 1 the peers are timed in alternating order and each keeps its fastest time; one
round times each peer once, in the given order. The timer is replaced, so these run anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import attention as harness  # noqa: E402


def named_peers(names: str, current: list):
    """Peers giving the same output; entering one's context puts its name in ``current[0]``
    (which the replaced timer reads)."""
    def build(x):
        return lambda: x.q.float() * 2

    def context(name):
        current[0] = name
        return torch.no_grad()  # any context manager
    return [harness.Peer(name, build, lambda n=name: context(n)) for name in names]


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_rounds_alternate_the_order_and_keep_each_peers_fastest(rounds, monkeypatch):
    # each peer's time falls with every measurement, except "b", whose second is slower
    times = {"a": [4.0, 2.0, 1.0], "b": [3.0, 5.0, 2.5], "c": [6.0, 1.5, 1.2]}
    calls = []

    def fake_time_ms(fn, device):
        name = current[0]
        calls.append(name)
        return times[name][calls.count(name) - 1]

    current = [None]
    peers = named_peers("abc", current)
    monkeypatch.setattr(harness, "time_ms", fake_time_ms)
    shape = harness.Shape(1, 2, 16, 8, False)
    rows = harness.bench_shape(shape, peers, torch.float32, torch.device("cpu"), "fwd", rounds)
    expected_order = {1: list("abc"), 2: list("abccba"), 3: list("abccbaabc")}[rounds]
    assert calls == expected_order
    best = {name: min(values[:rounds]) for name, values in times.items()}
    assert {r["impl"]: r["ms"] for r in rows} == best
    assert all(r["error"] is None and r["tflops"] > 0 for r in rows)


def test_a_timing_error_is_the_peers_row_and_not_timed_again(monkeypatch):
    calls = []

    def fake_time_ms(fn, device):
        calls.append(current[0])
        if current[0] == "b":
            raise RuntimeError("out of memory")
        return 1.0

    current = [None]
    peers = named_peers("ab", current)
    monkeypatch.setattr(harness, "time_ms", fake_time_ms)
    rows = harness.bench_shape(harness.Shape(1, 2, 16, 8, False), peers, torch.float32,
                               torch.device("cpu"), "fwd", 2)
    assert calls == ["a", "b", "a"]
    by = {r["impl"]: r for r in rows}
    assert by["a"]["ms"] == 1.0 and by["a"]["error"] is None
    assert by["b"]["ms"] is None and "out of memory" in by["b"]["error"]


@pytest.mark.parametrize("variant", sorted(harness.EXTRA_VARIANTS))
def test_the_extra_variants_mean_what_the_library_means(variant, monkeypatch):
    """``window`` and ``softcap`` (wide_backward.py's forms cuDNN has no kernel for): the
    harness's fp32 eager reference, ours and SDPA (the window as its bool mask; soft-capping it
    cannot express) against the tests' float64 reference with the library's own arguments;
    the window's FLOPs count its visible pairs."""
    monkeypatch.setattr(harness, "WINDOW", 24)
    from reference import reference_attention

    shape = harness.Shape(1, 2, 64, 16, True, variant, 2)
    x = harness.make_inputs(shape, torch.float32, torch.device("cpu"), requires_grad=False)
    extras = (dict(causal="top_left", window=24) if variant == "window"
              else dict(is_causal=True, softcap=harness.SOFTCAP))
    ref, _ = reference_attention(x.q, x.k, x.v, **extras)
    outputs = {"eager_fp32": harness.eager_fp32_reference(x, "fwd"),
               "ours": harness.build_ours(x)()}
    if variant == "window":
        outputs["sdpa"] = harness.build_sdpa(x)()
        assert shape.flops == 4.0 * 2 * (64 * 24 - 24 * 24 / 2) * 16
    else:
        with pytest.raises(harness.Skipped, match="soft-capping"):
            harness.build_sdpa(x)
        assert shape.flops == 4.0 * 2 * 64 * 64 * 16 / 2
    for name, out in outputs.items():
        torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-4, msg=name)


def test_the_failure_log_keeps_each_traceback_as_it_happens(tmp_path):
    """SDPA_PASS_FAILURE_LOG (tests/conftest.py, set by benchmarks/gpu_session.sh): a failing
    test's traceback lands in the file once, a passing test's nothing, without waiting for
    pytest's summary."""
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_two.py").write_text(
        "def test_ok():\n    pass\n\n\ndef test_bad():\n    assert 1 == 2, 'one is not two'\n")
    log = tmp_path / "failures.log"
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PYTEST_XDIST")}  # this suite's own workers set them
    env["SDPA_PASS_FAILURE_LOG"] = str(log)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_two.py"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert "1 failed, 1 passed" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    text = log.read_text()
    assert text.count("==== ") == 1 and "==== test_two.py::test_bad (call)" in text
    assert "one is not two" in text and "test_ok" not in text


def test_the_model_benchmark_builds_gemma2_with_its_caps_windows_and_reference():
    """benchmarks/model.py --family gemma2: Gemma 2's attention (soft-capped logits, a sliding
    window, head dim 256) at the benchmark's sizes, compared with eager (HF has no SDPA path
    for it), its HF flex column built with flex attention; llama keeps hf_sdpa."""
    import model
    cfg = model.config("gemma2")
    assert (cfg.attn_logit_softcapping, cfg.sliding_window, cfg.head_dim) == (50.0, 4096, 256)
    assert cfg.hidden_size == model.CONFIG["hidden_size"]
    assert model.REFERENCE.get("gemma2") == "eager" and "llama" not in model.REFERENCE
    assert [model.attention_of(k) for k in ("hf_flex+inductor", "hf_sdpa", "optimize", "eager")] == [
        "flex_attention", "sdpa", "eager", "eager"]
    assert model.config("llama", "sdpa")._attn_implementation == "sdpa"
