"""The examples run as a user runs them (each checks its own result and exits non-zero if
it is wrong)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script, interpret", [
    ("quickstart.py", "0"),       # the op's CPU path, as a CPU user gets it
    ("kernel_vs_sdpa.py", "1"),   # the Triton kernel through the interpreter
    ("hf_causal_lm.py", "0"),     # optimize() + generate() on a tiny HF Llama
    ("train_nanogpt.py", "0"),    # training steps through rewritten nanoGPT attention
    ("explain_encoder_decoder.py", "0"),  # explain() on a tiny BART: encoder, decoder, cross
])
def test_example_runs(script, interpret):
    if torch.cuda.is_available():
        # the examples put their tensors on the GPU there: compiled kernels, not the interpreter
        interpret = "0"
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "OK" in result.stdout
