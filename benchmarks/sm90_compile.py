"""Compile an attention kernel for Hopper (sm_90) on a machine without a GPU and report what the
compiler made of it: how many loads stayed synchronous, how many are copied ahead (cp.async
or the TMA copy engine), registers per thread, spill stack, shared memory and machine (SASS)
instruction counts: all, the wgmmas and the waits for them.

    python benchmarks/sm90_compile.py --mask bias                    # mask read through pointers
    python benchmarks/sm90_compile.py --mask bias --mask-tma         # ... through a descriptor
    python benchmarks/sm90_compile.py --mask bool --tile 128,64,8,3 --head-dim 128
    python benchmarks/sm90_compile.py --mask bias --log2 --ttgir /tmp/k.ttgir
    python benchmarks/sm90_compile.py --mask row [--no-span]         # a (B, 1, 1, N) padding mask
    python benchmarks/sm90_compile.py --kernel dkdv --mask none --causal --tile 64,128,8,3
    python benchmarks/sm90_compile.py --kernel dkdv --dq-atomic --descriptors --tile 64,128,8,2
    python benchmarks/sm90_compile.py --kernel dkdv --descriptors --masked-rows --sass k.sass

Needs the triton wheel's bundled ptxas and cuobjdump (triton 3.x ships them); no CUDA driver.
The specialisations are those of a launch on contiguous (B, H, N, D) bf16 tensors with N a
multiple of 16 (16-byte aligned pointers, unit strides as constants) and a (1, H, N, N) mask
broadcast over the batch. This is how BENCHMARKS.md's statements about the pipelining of the
mask tile (session 7) and the backward's spills (session 8) were checked. ``--kernel dkdv``
compiles the backward's dK/dV kernel: ``--dq-atomic`` with the dQ adds, ``--descriptors``
with Q/dO/K/V (and, with --dq-atomic, the adds) through tensor descriptors, ``--mask-tma``
the mask tile through one (with or without --descriptors).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns unless it is set

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

try:  # installed (sdpa_pass.kernels maps to the repository's kernels/), or a copy laid out so
    from sdpa_pass.kernels.backward import _bwd_dkdv_kernel, _bwd_dq_kernel
    from sdpa_pass.kernels.forward import _attention_fwd_kernel
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels.backward import _bwd_dkdv_kernel, _bwd_dq_kernel
    from kernels.forward import _attention_fwd_kernel

MASK_KINDS = {"none": 0, "bool": 1, "bias": 2, "row": 3}  # row: a (B, 1, 1, N) padding mask
SCALARS = ("qk_scale", "softcap_log2", "dropout_p", "dropout_scale", "sm_scale")


def signature(args) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, attributes) for one launch of the forward kernel."""
    d, n = args.head_dim, N
    kind = MASK_KINDS[args.mask]
    meta = dict(
        HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d, MASK_KIND=kind, HAS_KPM=False,
        IS_CAUSAL=args.causal, HAS_WINDOW=False, HAS_SOFTCAP=False, NAN_ON_EMPTY=False,
        STORE_LSE=True, DROPOUT=False, DOT_UPCAST=False, DOT_PRECISION="tf32",
        TMA=args.descriptors,
        MASK_TMA=args.mask_tma and kind != 0, FOLD_SCALE=kind != 2,
        NATURAL=kind == 2 and not args.log2, REVERSE=args.causal, PIPELINE=args.pipeline,
        BATCH_INNER=False, KEY_SPAN=2 if kind == 3 and args.span else 0,
        BLOCK_M=args.tile[0], BLOCK_N=args.tile[1])
    pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32",
                "MASK": _mask_type(kind, meta["MASK_TMA"], args.tile), "KPM": "*bf16",
                "SEED": "*i64"}
    if meta["TMA"]:
        for name, rows in (("Q", args.tile[0]), ("O", args.tile[0]), ("K", args.tile[1]),
                           ("V", args.tile[1])):
            pointers[name] = f"tensordesc<bf16[1, 1, {rows}, {d}]>"
    strides = {f"stride_{t}{dim}": v for t in "qkvo" for dim, v in
               zip("bhmd" if t in "qo" else "bhnd", _bhnd_strides(d).values())}
    strides.update(stride_mb=0, stride_mh=n * n, stride_mm=0 if kind == 3 else n, stride_mn=1,
                   stride_pb=0, stride_pn=0, stride_lb=0, stride_lh=0)
    return _specialise(_attention_fwd_kernel, meta, pointers, strides)


def dkdv_signature(args) -> tuple[dict, dict, dict]:
    """The same for the backward's dK/dV kernel."""
    d, n = args.head_dim, N
    kind = MASK_KINDS[args.mask]
    m_tile, n_tile = args.tile[:2]
    meta = dict(
        HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d, MASK_KIND=kind, HAS_KPM=False,
        IS_CAUSAL=args.causal, HAS_WINDOW=False, HAS_SOFTCAP=False, DROPOUT=False,
        FILLS=False, DQ_ATOMIC=args.dq_atomic, TMA=args.descriptors,
        DQ_TMA_ADD=args.descriptors and args.dq_atomic,
        MASK_TMA=args.mask_tma and kind != 0,
        DOT_UPCAST=False, DOT_PRECISION="tf32", NATURAL=kind == 2 and not args.log2,
        PADDED_ROWS=args.padded_rows, BATCH_INNER=False, KEY_SPAN=2 if kind == 3 and args.span else 0,
        BLOCK_M=m_tile, BLOCK_N=n_tile)
    pointers = {name: "*fp32" for name in ("ROW_M", "ROW_R", "DELTA", "DQ_ACC")}
    pointers.update({name: "*bf16" for name in ("Q", "K", "V", "DO", "DK", "DV", "KPM")},
                    MASK=_mask_type(kind, meta["MASK_TMA"], args.tile), SEED="*i64")
    if meta["TMA"]:
        for name, rows in (("Q", m_tile), ("DO", m_tile), ("K", n_tile), ("V", n_tile)):
            pointers[name] = f"tensordesc<bf16[1, 1, {rows}, {d}]>"
    if meta["DQ_TMA_ADD"]:
        pointers["DQ_ACC"] = f"tensordesc<fp32[1, 1, {m_tile}, {d}]>"
    strides = {f"stride_{t}{dim}": v for t in ("q", "k", "v", "do", "dk", "dv") for dim, v in
               zip("bhmd" if t in ("q", "do") else "bhnd", _bhnd_strides(d).values())}
    strides.update(stride_mb=0, stride_mh=n * n, stride_mm=0 if kind == 3 else n, stride_mn=1, stride_pb=0,
                   stride_pn=0, stride_lb=16 * n, stride_lh=n, stride_ab=16 * n * d,
                   stride_ah=n * d, stride_am=d)
    return _specialise(_bwd_dkdv_kernel, meta, pointers, strides)


def dq_signature(args) -> tuple[dict, dict, dict]:
    """The same for the backward's dQ kernel (the split path: dQ from its own key loop)."""
    d, n = args.head_dim, N
    kind = MASK_KINDS[args.mask]
    meta = dict(
        HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d, MASK_KIND=kind, HAS_KPM=False,
        IS_CAUSAL=args.causal, HAS_WINDOW=False, HAS_SOFTCAP=False, DROPOUT=False,
        STORE_DS=False, FILLS=False, DOT_UPCAST=False, DOT_PRECISION="tf32",
        NATURAL=kind == 2 and not args.log2, BATCH_INNER=False,
        MASK_TMA=args.mask_tma and kind != 0, LONGEST_FIRST=args.causal,
        KEY_SPAN=2 if kind == 3 and args.span else 0,
        BLOCK_M=args.tile[0], BLOCK_N=args.tile[1])
    pointers = {name: "*fp32" for name in ("ROW_M", "ROW_R", "DELTA")}
    pointers.update({name: "*bf16" for name in ("Q", "K", "V", "DO", "DQ", "DS", "KPM")},
                    MASK=_mask_type(kind, meta["MASK_TMA"], args.tile), SEED="*i64")
    strides = {f"stride_{t}{dim}": v for t in ("q", "k", "v", "do", "dq") for dim, v in
               zip("bhmd" if t in ("q", "do", "dq") else "bhnd", _bhnd_strides(d).values())}
    strides.update(stride_sb=0, stride_sh=0, stride_sm=0, stride_sn=0, stride_mb=0,
                   stride_mh=n * n, stride_mm=0 if kind == 3 else n, stride_mn=1, stride_pb=0,
                   stride_pn=0, stride_lb=16 * n, stride_lh=n)
    return _specialise(_bwd_dq_kernel, meta, pointers, strides)


N = 4096  # keys and queries of the launch the specialisations describe


def _bhnd_strides(d: int) -> dict:
    return dict(b=16 * N * d, h=N * d, m=d, d=1)


def _mask_type(kind: int, descriptor: bool, tile) -> str:
    if descriptor:
        return f"tensordesc<{'u8' if kind == 1 else 'bf16'}[1, 1, {tile[0]}, {tile[1]}]>"
    return "*i1" if kind in (1, 3) else "*bf16"


def _specialise(kernel, meta, pointers, strides) -> tuple[dict, dict, dict]:
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in meta:
            sig[name], consts[name] = "constexpr", meta[name]
        elif name in pointers:
            sig[name] = pointers[name]
            if not sig[name].startswith("tensordesc"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in SCALARS:
            sig[name] = "fp32"
        elif strides.get(name) == 1:  # triton specialises integers equal to 1 as constants
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if name in strides and strides[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name],
                              capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict:
    text = _cuobjdump(cubin, "--dump-resource-usage")
    return {key.lower(): int(re.search(rf"{key}:(\d+)", text).group(1)) for key in ("REG", "STACK")}


def sass_counts(cubin: bytes) -> dict:
    """Static counts in the machine code (each inlined tile loop once): all instructions,
    the wgmma (HGMMA) instructions and the waits for them (WARPGROUP.DEPBAR; where ptxas
    serializes the wgmmas there is one after each)."""
    sass = _cuobjdump(cubin, "-sass")
    return {"instructions": len(re.findall(r"/\*[0-9a-f]{4}\*/\s+\S", sass)),
            "wgmma instructions": sass.count("HGMMA"),
            "wgmma waits": sass.count("WARPGROUP.DEPBAR"),
            "key loop instructions": _shortest_wgmma_loop(sass)}


def _shortest_wgmma_loop(sass: str) -> int:
    """Instructions in the shortest loop that issues wgmmas (the body of a predicated
    backward branch): a kernel's interior tile loop, the one that runs for all but a few
    tiles. 0 without one. Unpredicated backward branches are not loops here: ptxas puts the
    retry paths of the copy engine's barrier waits after the kernel's end, and each jumps back
    into the code it left (with descriptors those made a 603-instruction "loop" of the
    forward's 822-instruction interior one)."""
    code = [(int(addr, 16), text) for addr, text in
            re.findall(r"/\*([0-9a-f]+)\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in code:
        branch = re.search(r"^@!?U?P\w+\s+BRA\b.*?0x([0-9a-f]+)", text.strip())
        if branch and int(branch.group(1), 16) < addr:
            body = [t for a, t in code if int(branch.group(1), 16) <= a <= addr]
            if any("HGMMA" in t for t in body):
                loops.append(len(body))
    return min(loops, default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask", choices=sorted(MASK_KINDS), default="bias")
    parser.add_argument("--mask-tma", action="store_true", help="read the mask through a descriptor")
    parser.add_argument("--log2", action="store_true",
                        help="float mask in log2 units (the clamped form) instead of NATURAL")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--no-span", dest="span", action="store_false",
                        help="--mask row: visit every key tile (KEY_SPAN=0)")
    parser.add_argument("--pipeline", action="store_true",
                        help="forward: the software-pipelined interior loop (SDPA_PASS_FWD_PIPELINE=1)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tile", default="128,64,8,3", help="BLOCK_M,BLOCK_N,num_warps,num_stages")
    parser.add_argument("--ttgir", type=Path, help="also write the TTGIR here")
    parser.add_argument("--sass", type=Path, help="also write the machine code (SASS) here")
    parser.add_argument("--kernel", choices=("forward", "dkdv", "dq"), default="forward")
    parser.add_argument("--dq-atomic", action="store_true", help="dkdv: it also adds dQ")
    parser.add_argument("--masked-rows", dest="padded_rows", action="store_false",
                        help="dkdv: the row statistics m, r, delta loaded masked from L rows "
                             "(SDPA_PASS_BWD_PADDED_ROWS=0), not padded to whole tiles and "
                             "loaded unmasked (the default)")
    parser.add_argument("--descriptors", action="store_true",
                        help="Q/K/V/O (dkdv: Q/dO/K/V and the dQ adds) through descriptors")
    args = parser.parse_args(argv)
    args.tile = tuple(int(x) for x in args.tile.split(","))
    fn, build = {"forward": (_attention_fwd_kernel, signature),
                 "dkdv": (_bwd_dkdv_kernel, dkdv_signature),
                 "dq": (_bwd_dq_kernel, dq_signature)}[args.kernel]
    sig, consts, attrs = build(args)
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs),
                            target=GPUTarget("cuda", 90, 128),
                            options=dict(num_warps=args.tile[2], num_stages=args.tile[3]))
    ttgir = kernel.asm["ttgir"]
    if args.ttgir:
        args.ttgir.write_text(ttgir)
    if args.sass:
        args.sass.write_text(_cuobjdump(kernel.asm["cubin"], "-sass"))
    counts = {op: len(re.findall(pattern, ttgir)) for op, pattern in (
        ("synchronous loads (tt.load)", r"= tt\.load "),
        ("cp.async copies", r"async_copy_global_to_local"),
        ("TMA copies", r"async_tma_copy_global_to_local"),
        ("atomic adds", r"tt\.atomic_rmw"), ("TMA reduce-adds", r"async_tma_reduce"))}
    usage = resources(kernel.asm["cubin"])
    # one line, "name value" pairs split by ", " (tests/test_sm90_compile.py reads it)
    print(", ".join(f"{k} {v}" for k, v in counts.items())
          + f", registers {usage['reg']}, spill stack {usage['stack']} B,"
            f" shared memory {kernel.metadata.shared} B, "
          + ", ".join(f"{k} {v}" for k, v in sass_counts(kernel.asm["cubin"]).items()))


if __name__ == "__main__":
    main()
