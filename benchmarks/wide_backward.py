"""Forward + backward at head dim 256: ours (on Hopper the backward's dK/dV and dQ kernels in
Gluon, gluon_backward.py's split schedule), ours_triton (the same under
``SDPA_PASS_GLUON_BWD=0``: the Triton backward), SDPA's cuDNN and flash backends and flex
attention, in one run; ``--orders`` adds ours under each dK/dV program order, ``--peers
ours_triton_fwd`` ours with the Triton forward at hd256 (``SDPA_PASS_GLUON_FWD_HD256=0``),
``ours_triton_bias`` ours with the Triton forward for a float bias (``SDPA_PASS_GLUON_BIAS=0``),
``ours_triton_bwd_bias`` ours with the Triton backward for it (``SDPA_PASS_GLUON_BWD_BIAS=0``),
``ours_triton_window`` ours with the Triton kernels for a sliding window
(``SDPA_PASS_GLUON_WINDOW=0``; session 24's ``ours_gluon_window`` under ``=1`` when the Gluon
kernels' window was opt-in), ``ours_triton_softcap`` ours with the Triton kernels for
soft-capped scores (``SDPA_PASS_GLUON_SOFTCAP=0``), ``ours_gluon_softcap`` ours with the Gluon
kernels for them wherever those run (``=1``: the forward's ``SOFTCAP_MIN_KEYS`` off);
``--mode fwd`` times forwards alone. Any head dim (``--head-dim``) and any of attention.py's
matrix variants (``--variants``, e.g. ``bias``) or its EXTRA_VARIANTS (``window``,
``softcap``: forms cuDNN has no kernel for) run the same way.

The matrix's rows (``attention.py --matrix full``: 2048 / D heads, batch 16384 / N; causal, no
mask, GQA 4:1 causal, the random (N, N) bool mask), hd256 and N = 1k / 4k / 16k by default.
For ours and ours_triton the JSON also holds each kernel's time per forward + backward
(``torch.profiler``, mean of 5 steps).

Run: ``python benchmarks/wide_backward.py [--out DIR] [--head-dim D] [--orders a,b]`` on one
GPU: a line per row and ``wide_backward_<tag>_<device>.json``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (CAUSAL_VARIANTS, EXTRA_VARIANTS, GQA_GROUP, PEERS,  # noqa: E402
                       VARIANTS as MATRIX_VARIANTS, Peer, Shape, bench_shape, build_ours,
                       make_inputs, metadata, rates_line, save, slug, with_backward)
from padding import setting  # noqa: E402
from padding_overhead import kernel_times  # noqa: E402

LENGTHS = (1024, 4096, 16384)
HEAD_DIM = 256
VARIANTS = ("none", "causal", "gqa", "bool")
# Ours under its variables, by peer name (with kernel times in the JSON, as ours): the
# Triton backward; the Triton forward at hd256 and for a float bias (the defaults until
# session 23); the Triton backward for a float bias (the default until session 24); the Triton
# kernels for a sliding window (the default until session 25) and for soft-capping (until
# session 26); the Gluon kernels for soft-capping wherever they run
OURS_UNDER = {
    "ours_triton": {"SDPA_PASS_GLUON_BWD": "0"},
    "ours_triton_fwd": {"SDPA_PASS_GLUON_FWD_HD256": "0"},
    "ours_triton_bias": {"SDPA_PASS_GLUON_BIAS": "0"},
    "ours_triton_bwd_bias": {"SDPA_PASS_GLUON_BWD_BIAS": "0"},
    "ours_triton_window": {"SDPA_PASS_GLUON_WINDOW": "0"},
    "ours_triton_softcap": {"SDPA_PASS_GLUON_SOFTCAP": "0"},
    "ours_gluon_softcap": {"SDPA_PASS_GLUON_SOFTCAP": "1"},
}


@contextlib.contextmanager
def under(settings: dict):
    """OURS_UNDER's ``settings`` ({variable: value}) inside the block."""
    with contextlib.ExitStack() as stack:
        for name, value in settings.items():
            stack.enter_context(setting(name, value))
        yield


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="N values")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="any of " + ", ".join([*MATRIX_VARIANTS, *EXTRA_VARIANTS]))
    parser.add_argument("--peers", default="ours_triton,flex,sdpa_cudnn,sdpa_flash",
                        help="besides ours: " + ", ".join(OURS_UNDER) + " and attention.py's "
                             "peers")
    parser.add_argument("--orders", default="",
                        help="dK/dV program orders (gluon_backward.ORDERS), each a peer "
                             "ours_<order> (SDPA_PASS_GLUON_BWD_ORDER)")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timing rounds, alternating the peers' order (bench_shape)")
    parser.add_argument("--tag", default="bf16", help="put in the file name")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    wanted = args.peers.split(",")
    peers = [Peer("ours", build_ours)]
    peers += [Peer(name, build_ours, lambda v=variable: under(v))
              for name, variable in OURS_UNDER.items() if name in wanted]
    for order in filter(None, args.orders.split(",")):
        peers.append(Peer(f"ours_{order}", build_ours,
                          lambda o=order: setting("SDPA_PASS_GLUON_BWD_ORDER", o)))
    peers += [p for p in PEERS if p.name in wanted]
    meta = metadata(argparse.Namespace(mode="wide_backward", dtype="bf16", quick=False), device)
    meta.update(benchmark="wide_backward", impls=[p.name for p in peers], rounds=args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"wide_backward_{args.tag}_{slug(meta['device'])}.json"
    head_dim = args.head_dim
    heads = 2048 // head_dim
    rows = []
    for variant in args.variants.split(","):
        for n in map(int, args.lengths.split(",")):
            shape = Shape(max(1, 16384 // n), heads, n, head_dim, variant in CAUSAL_VARIANTS,
                          variant, heads // GQA_GROUP if variant == "gqa" else heads)
            new = bench_shape(shape, peers, torch.bfloat16, device, args.mode, args.rounds)
            for peer in [p for p in peers if p.name == "ours" or p.name in OURS_UNDER]:
                x = make_inputs(shape, torch.bfloat16, device,
                                requires_grad=args.mode == "fwdbwd")
                with peer.context():
                    fn = peer.build(x)
                    times = kernel_times(with_backward(fn, x.q, x.k, x.v)
                                         if args.mode == "fwdbwd" else fn)
                del x
                for r in new:
                    if r["impl"] == peer.name:
                        r["kernels_ms"] = times
            rows += new
            save(path, meta, rows)
            print(rates_line(f"{variant} N{n}", new), flush=True)
            for r in new:
                if "kernels_ms" in r:
                    print(f"  {r['impl']}: " + ", ".join(
                        f"{k[:36]} {v:.3f}" for k, v in list(r["kernels_ms"].items())[:5]))
    meta["complete"] = True
    save(path, meta, rows)


if __name__ == "__main__":
    main()
