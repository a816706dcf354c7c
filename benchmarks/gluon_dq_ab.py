"""Kernel times (profiler) of forward + backward with the Gluon dQ kernel (the default on
Hopper at hd128) and with the Triton one (SDPA_PASS_GLUON_DQ=0), two alternating rounds in one
process; hd128 bf16, B = 16384 / N, 16 query heads; the gradients of the two compared.

    python benchmarks/gluon_dq_ab.py          # writes $OUTDIR (default .)/gluon_dq_ab.json
"""
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, os.getcwd())
from sdpa_pass.kernels import attention
out = []
for name, (hkv, n, causal) in {"4k": (16, 4096, False), "4k_causal": (16, 4096, True),
                               "16k": (16, 16384, False), "16k_causal": (16, 16384, True),
                               "gqa_4k_causal": (4, 4096, True), "1k": (16, 1024, False)}.items():
    b = 16384 // n
    q = torch.randn(b, 16, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, hkv, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    fb = lambda: torch.autograd.grad(attention(q, k, v, is_causal=causal, enable_gqa=hkv != 16), (q, k, v), do)  # noqa: E731
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
    fl = 4 * b * 16 * n * n * 128 / (2 if causal else 1)
    row = dict(shape=name, B=b, N=n, Hkv=hkv, causal=causal, rel_diff_grads=diff)
    for setting, label in (("1", "gluon_dq"), ("0", "triton_dq")):
        for rnd, t in enumerate(res[setting]):
            dq = sum(v for k_, v in t.items() if "dq" in k_)
            tot = sum(t.values())
            row[f"{label}_r{rnd}"] = dict(dq_ms=dq, total_ms=tot, fwdbwd_tflops_kernels=3.5 * fl / tot / 1e9,
                                          dq_tflops=1.5 * fl / dq / 1e9 if dq else None)
    print(name, f"rel diff {diff:.1e}", " | ".join(f"{k_}: dq {v['dq_ms']:.3f} ms ({v['dq_tflops']:.0f}) total {v['total_ms']:.3f} ({v['fwdbwd_tflops_kernels']:.0f})"
                                                 for k_, v in row.items() if isinstance(v, dict)), flush=True)
    out.append(row)
json.dump(out, open(os.path.join(os.environ.get("OUTDIR", "."), "gluon_dq_ab.json"), "w"), indent=1)
