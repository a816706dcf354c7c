"""Kernel times (profiler) of forward + backward with the Gluon dQ kernel (the default on
Hopper at hd128) and with the Triton one (SDPA_PASS_GLUON_DQ=0), two alternating rounds in one
process; bf16, B = 16384 / N, 16 query heads at hd128, 32 at hd64 (the FA table's shapes);
the gradients of the two compared. ``--head-dim 64`` lets the Gluon dQ kernel take hd64 calls
too (``DQ_HEAD_DIMS``), which the library does only where it measured faster.

    python benchmarks/gluon_dq_ab.py [--head-dim 64]   # writes $OUTDIR (default .)/gluon_dq_ab[_hd64].json
"""
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, os.getcwd())
from sdpa_pass.kernels import attention
from sdpa_pass.kernels import gluon_backward as gbwd

D = int(sys.argv[sys.argv.index("--head-dim") + 1]) if "--head-dim" in sys.argv else 128
H = 16 if D == 128 else 32
gbwd.DQ_HEAD_DIMS = tuple(sorted({*gbwd.DQ_HEAD_DIMS, D}))
out = []
for name, (hkv, n, causal) in {"4k": (H, 4096, False), "4k_causal": (H, 4096, True),
                               "16k": (H, 16384, False), "16k_causal": (H, 16384, True),
                               "gqa_4k_causal": (H // 4, 4096, True), "1k": (H, 1024, False),
                               "1k_causal": (H, 1024, True)}.items():
    b = 16384 // n
    q = torch.randn(b, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, hkv, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    fb = lambda: torch.autograd.grad(attention(q, k, v, is_causal=causal, enable_gqa=hkv != H), (q, k, v), do)  # noqa: E731
    res = {}
    for rnd in range(2):
        for setting in ("1", "0"):
            os.environ["SDPA_PASS_GLUON_DQ"] = setting
            for _ in range(3):
                g = fb()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fb()
                torch.cuda.synchronize()
            t = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    t[e.name[:40]] = t.get(e.name[:40], 0.0) + e.device_time / 1e3 / 5
            res.setdefault(setting, []).append(t)
            if rnd == 0:
                res.setdefault("grads", {})[setting] = [x.float() for x in g]
    gl, tr = res["grads"]["1"], res["grads"]["0"]
    diff = max(((a - c).norm() / c.norm()).item() for a, c in zip(gl, tr))
    fl = 4 * b * H * n * n * D / (2 if causal else 1)
    row = dict(shape=name, D=D, B=b, H=H, N=n, Hkv=hkv, causal=causal, rel_diff_grads=diff)
    for setting, label in (("1", "gluon_dq"), ("0", "triton_dq")):
        for rnd, t in enumerate(res[setting]):
            dq = sum(v for k_, v in t.items() if "dq" in k_)
            tot = sum(t.values())
            row[f"{label}_r{rnd}"] = dict(dq_ms=dq, total_ms=tot, fwdbwd_tflops_kernels=3.5 * fl / tot / 1e9,
                                          dq_tflops=1.5 * fl / dq / 1e9 if dq else None)
    print(name, f"rel diff {diff:.1e}", " | ".join(f"{k_}: dq {v['dq_ms']:.3f} ms ({v['dq_tflops']:.0f}) total {v['total_ms']:.3f} ({v['fwdbwd_tflops_kernels']:.0f})"
                                                 for k_, v in row.items() if isinstance(v, dict)), flush=True)
    out.append(row)
json.dump(out, open(os.path.join(os.environ.get("OUTDIR", "."), f"gluon_dq_ab{'' if D == 128 else f'_hd{D}'}.json"), "w"), indent=1)
