"""Forward + backward at hd128, bf16, B4 H16 N4096 (MHA causal, GQA 4:1 causal, MHA): the
table's timer (``do_bench``, the host's launches included) against ``do_bench_cudagraph``
(the same calls replayed from a CUDA graph: kernels only), two rounds each. Where the two
agree, the host is not what a table row measures.

    python benchmarks/fwdbwd_timers.py        # writes $OUTDIR (default .)/graph_vs_bench.json
"""
import json
import os
import sys

import torch
from triton.testing import do_bench, do_bench_cudagraph
sys.path.insert(0, os.getcwd())
from sdpa_pass.kernels import attention
out = []
for name, (hkv, causal) in {"mha_causal_4k": (16, True), "gqa_causal_4k": (4, True), "mha_4k": (16, False)}.items():
    b, n = 4, 4096
    q = torch.randn(b, 16, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, hkv, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    fb = lambda: torch.autograd.grad(attention(q, k, v, is_causal=causal, enable_gqa=hkv != 16), (q, k, v), do)  # noqa: E731
    fb(); torch.cuda.synchronize()
    fl = 3.5 * 4 * b * 16 * n * n * 128 / (2 if causal else 1)
    row = dict(shape=name)
    for r in range(2):
        t1 = do_bench(fb, warmup=25, rep=100, return_mode="median")
        t2 = do_bench_cudagraph(fb, rep=100, return_mode="median")
        row[f"r{r}"] = dict(do_bench_ms=t1, cudagraph_ms=t2, do_bench_tflops=fl / t1 / 1e9, cudagraph_tflops=fl / t2 / 1e9)
        print(name, r, f"do_bench {t1:.3f} ms ({fl / t1 / 1e9:.0f})  cudagraph {t2:.3f} ms ({fl / t2 / 1e9:.0f})", flush=True)
    out.append(row)
json.dump(out, open(os.path.join(os.environ.get("OUTDIR", "."), "graph_vs_bench.json"), "w"), indent=1)
