"""A bool attn_mask with rows of its own, read in tiles: ours (on Hopper the Gluon forward reads
it through the copy engine), ours_triton (the same under ``SDPA_PASS_GLUON_MASK=0``: the Triton
forward), flex attention and SDPA's cuDNN backend, in one run.

The matrix's bool variant (``attention.py``: a random (N, N) mask, ~80% True, the diagonal kept,
broadcast over batch and heads), hd128, 16 heads, batch 16384 / N, N = 1k / 4k / 16k, forward
and forward + backward (the backward is the Triton one for both of ours).

Run: ``python benchmarks/bool_mask.py [--out DIR]`` on one GPU: a markdown table and
``bool_mask_bf16_<device>.json``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (PEERS, Peer, Shape, bench_shape, build_ours, metadata,  # noqa: E402
                       rates_line, save, slug)
from padding import setting  # noqa: E402

LENGTHS = (1024, 4096, 16384)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="N values")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="fwd and / or fwdbwd")
    parser.add_argument("--tag", default="bf16", help="put in the file name")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    peers = [Peer("ours", build_ours),
             Peer("ours_triton", build_ours, lambda: setting("SDPA_PASS_GLUON_MASK", "0")),
             *[p for p in PEERS if p.name in ("flex", "sdpa_cudnn")]]
    meta = metadata(argparse.Namespace(mode="bool_mask", dtype="bf16", quick=False), device)
    meta.update(benchmark="bool_mask", impls=[p.name for p in peers])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bool_mask_{args.tag}_{slug(meta['device'])}.json"
    rows = []
    for mode in args.modes.split(","):
        for n in map(int, args.lengths.split(",")):
            shape = Shape(16384 // n, 16, n, 128, False, "bool", 16)
            new = bench_shape(shape, peers, torch.bfloat16, device, mode)
            for r in new:
                r["mode"] = mode
            rows += new
            save(path, meta, rows)
            print(rates_line(f"{mode} N{n}", new), flush=True)
    meta["complete"] = True
    save(path, meta, rows)


if __name__ == "__main__":
    main()
