"""A minimal dK/dV loop in the shape of flex attention's backward, compiled for sm_90 on the CPU.

    python benchmarks/flex_dkdv_probe.py

The dK/dV half of the flex backward template (torch/_inductor/kernel/flex/templates/
flex_backwards.py.jinja) reduced to what the benchmark's no-mask case runs: K and V tiles
resident, Qᵀ and dO streamed through pointer loads, P from one (``TWO_VEC``: two) row
statistic, dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dK += dSᵀ·Q. No masks, no boundary checks (the rows are
whole tiles). Prints, for a few tiles, registers, spill stack, shared memory and SASS counts,
and writes each kernel's SASS to /tmp/flexlike_*.sass: the yardstick for ours
(``sm90_compile.py --kernel dkdv``); BENCHMARKS.md, session 11.
"""
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sm90_compile as sc  # noqa: E402


@triton.jit
def dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, N, stride_m,
         BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, D: tl.constexpr, TWO_VEC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N * D
    start_n = pid * BLOCK_N1
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_k = tl.arange(0, D)
    k = tl.load(K + base + offs_n[:, None] * D + offs_k[None, :])
    v = tl.load(V + base + offs_n[:, None] * D + offs_k[None, :])
    dk = tl.zeros((BLOCK_N1, D), tl.float32)
    dv = tl.zeros((BLOCK_N1, D), tl.float32)
    offs_m = tl.arange(0, BLOCK_M1)
    for start_m in range(0, N, BLOCK_M1):
        om = start_m + offs_m
        qT = tl.load(Q + base + om[None, :] * D + offs_k[:, None])
        lse = tl.load(LSE + bh * N + om)
        qkT = tl.dot(k, qT)
        if TWO_VEC:  # ours keeps the row max and the log-sum apart
            r = tl.load(LSE + bh * N + N + om)
            pT = tl.math.exp2(qkT - lse[None, :] - r[None, :])
        else:
            pT = tl.math.exp2(qkT - lse[None, :])
        do = tl.load(DO + base + om[:, None] * D + offs_k[None, :])
        dv += tl.dot(pT.to(tl.bfloat16), do)
        Di = tl.load(DELTA + bh * N + om)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - Di[None, :])
        dk += tl.dot(dsT.to(tl.bfloat16), tl.trans(qT))
    tl.store(DK + base + offs_n[:, None] * D + offs_k[None, :], (dk * sm_scale).to(tl.bfloat16))
    tl.store(DV + base + offs_n[:, None] * D + offs_k[None, :], dv.to(tl.bfloat16))


def compile_(m, n, w, st, two):
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "LSE": "*fp32", "DELTA": "*fp32",
           "DK": "*bf16", "DV": "*bf16", "sm_scale": "fp32", "N": "i32", "stride_m": "i32",
           "BLOCK_M1": "constexpr", "BLOCK_N1": "constexpr", "D": "constexpr", "TWO_VEC": "constexpr"}
    consts = {"BLOCK_M1": m, "BLOCK_N1": n, "D": 128, "TWO_VEC": two}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(10)}
    k = triton.compile(ASTSource(dkdv, sig, consts, attrs), target=GPUTarget("cuda", 90, 128),
                       options=dict(num_warps=w, num_stages=st))
    usage = sc.resources(k.asm["cubin"])
    sass = sc._cuobjdump(k.asm["cubin"], "-sass")
    open(f"/tmp/flexlike_{m}_{n}_{w}_{st}_{two}.sass", "w").write(sass)
    print(m, n, w, st, "two" if two else "one", usage, "smem", k.metadata.shared, sc.sass_counts(k.asm["cubin"]))


def main() -> None:
    for cfg in [(64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)]:
        for two in (False, True):
            compile_(*cfg, two)


if __name__ == "__main__":
    main()
