"""What the compiler makes of the Hopper paths, checked on a machine without a GPU.

The descriptor paths (tensor-memory-accelerator copies, the dQ reduce-add) only run on a
Hopper GPU, and the interpreter has no form of the reduce-add, so CPU tests cannot execute
that branch. ``benchmarks/sm90_compile.py`` compiles the kernels for sm_90 with the triton
wheel's own ptxas; these tests check the structure of the result: the branch compiles, the
adds are the copy engine's, and the tiles are copied ahead rather than loaded synchronously.
Each compile runs in a subprocess without TRITON_INTERPRET (this process interprets).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compiled(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sm90_compile.py"), *args],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    pairs = (part.removesuffix(" B").rsplit(" ", 1) for part in line.split(", "))
    return {name: int(value) for name, value in pairs}


@pytest.mark.parametrize("mask", ["none", "bool"])
def test_dkdv_descriptor_path_adds_dq_with_the_copy_engine(mask):
    """The backward's hd128 default: Q, dO, K, V (and a bool mask) copied ahead, dQ added by
    TMA reduce-adds, no atomic instructions and no synchronous tile load left."""
    extra = ["--mask-tma"] if mask != "none" else []
    report = compiled("--kernel", "dkdv", "--dq-atomic", "--descriptors", "--mask", mask,
                      "--causal", "--head-dim", "128", "--tile", "64,128,8,2", *extra)
    assert report["TMA reduce-adds"] >= 1
    assert report["atomic adds"] == 0
    assert report["TMA copies"] >= 1
    assert report["synchronous loads (tt.load)"] == 0


def test_forward_mask_descriptor_is_copied_ahead():
    """The forward's mask tile: through pointers it stays a synchronous load; through a
    descriptor it is one more TMA copy (session 7's change)."""
    pointers = compiled("--mask", "bias", "--tile", "128,64,8,3")
    descriptor = compiled("--mask", "bias", "--mask-tma", "--tile", "128,64,8,3")
    assert descriptor["synchronous loads (tt.load)"] < pointers["synchronous loads (tt.load)"]
    assert descriptor["TMA copies"] > pointers["TMA copies"]
