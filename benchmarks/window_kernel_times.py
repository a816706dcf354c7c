"""Forward + backward of a causal sliding window against plain causal attention: wall time
(``triton.testing.do_bench``) and each kernel's time (torch.profiler), with the Gluon kernels'
window (the default on Hopper) and with the Triton kernels' (``SDPA_PASS_GLUON_WINDOW=0``).

Session 25 (BENCHMARKS.md) used it to tell a kernel difference from a host-time one at N = 1k,
where a forward + backward is about as long as the host's work for it.

    python benchmarks/window_kernel_times.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton.testing

from backward_variants import kernel_times  # benchmarks/ is sys.path[0] when run as a script
from sdpa_pass.kernels import attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--windows", default="1024,256")
    parser.add_argument("--batch-heads", default="16,16", help="B,H")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    B, H = (int(x) for x in args.batch_heads.split(","))
    D = args.head_dim
    cases = [(None, "")] + [(int(w), flag) for w in args.windows.split(",") for flag in ("", "0")]
    results = {}
    for N in (int(n) for n in args.lengths.split(",")):
        for window, flag in cases:
            os.environ["SDPA_PASS_GLUON_WINDOW"] = flag
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            grad_out = torch.randn_like(q)

            def forward_backward():
                attention(q, k, v, is_causal=True, window=window).backward(grad_out)

            def forward():
                with torch.no_grad():
                    attention(q, k, v, is_causal=True, window=window)

            forward_backward()
            torch.cuda.synchronize()
            row = dict(ms_fwdbwd=triton.testing.do_bench(forward_backward, warmup=50, rep=300),
                       ms_fwd=triton.testing.do_bench(forward, warmup=50, rep=300),
                       kernels=kernel_times(forward_backward, calls=5))
            key = f"N{N} window{window} " + ("triton" if flag == "0" else "default")
            results[key] = row
            top = {name[:40]: round(ms, 3) for name, ms in list(row["kernels"].items())[:5]}
            print(f"{key}: fwd+bwd {row['ms_fwdbwd']:.3f} ms, fwd {row['ms_fwd']:.3f} ms, {top}",
                  flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, B=B, H=H, D=D, dtype="bf16")
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    path = Path(args.out) / f"window_kernel_times_{name}.json"
    path.write_text(json.dumps(dict(meta=meta, rows=results), indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
