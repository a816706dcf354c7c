"""Model-level prefill: a Llama-style decoder (8 layers, hidden 2048, 16 query / 4 KV heads of
128, bf16, random weights) run over a whole prompt, as a generate() prefill runs it.

Implementations, same weights, same run, same GPU:
- ``eager``: ``attn_implementation="eager"`` (the hand-written attention the pass targets);
- ``eager+inductor``: that model under ``torch.compile`` (Inductor, no pass);
- ``hf_sdpa``: ``attn_implementation="sdpa"`` (HF's own fused path), eager PyTorch around it;
- ``optimize``: ``sdpa_pass.optimize(eager model)`` (the pass in front of Inductor).

Per prompt length: median latency of the forward (``logits_to_keep=1``, no cache, as the
prefill of a generation with its KV cache disabled), peak GPU memory above the weights, and
the largest relative difference of the last-token logits against ``hf_sdpa``.

Run: ``python benchmarks/model.py [--lengths 2048,8192] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import metadata, slug  # noqa: E402

import sdpa_pass  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=16384)


def build(kind: str, base_state: dict) -> torch.nn.Module:
    attn = "sdpa" if kind == "hf_sdpa" else "eager"
    model = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG, attn_implementation=attn))
    model.load_state_dict(base_state)
    model = model.to("cuda", torch.bfloat16).eval()
    if kind == "eager+inductor":
        model.compile()
    elif kind == "optimize":
        sdpa_pass.optimize(model)
    return model


def measure(model, ids, runs: int = 10) -> tuple[float, float, torch.Tensor]:
    with torch.no_grad():
        for _ in range(2):  # compile, autotune, warm up
            logits = model(ids, use_cache=False, logits_to_keep=1).logits
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = model(ids, use_cache=False, logits_to_keep=1).logits
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak / 2**30, logits.float()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--impls", default="hf_sdpa,eager,eager+inductor,optimize")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base_state = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).state_dict()
    meta = metadata(argparse.Namespace(mode="prefill", dtype="bf16", quick=False), torch.device("cuda"))
    meta.update(benchmark="model_prefill", flops=None, model=CONFIG, timer="CUDA events, median of 10")
    rows = []
    lengths = [int(n) for n in args.lengths.split(",")]
    for kind in args.impls.split(","):
        model = build(kind, base_state)
        for n in lengths:
            ids = torch.randint(0, CONFIG["vocab_size"], (1, n), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(n))
            row = dict(impl=kind, seq_len=n, ms=None, peak_gib=None, rel_err=None, error=None)
            try:
                row["ms"], row["peak_gib"], logits = measure(model, ids)
                torch.save(logits.cpu(), f"/tmp/logits_{slug(kind)}_{n}.pt")
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: a result
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    for row in rows:
        ref = Path(f"/tmp/logits_hf-sdpa_{row['seq_len']}.pt")
        mine = Path(f"/tmp/logits_{slug(row['impl'])}_{row['seq_len']}.pt")
        if row["ms"] is not None and ref.exists() and row["impl"] != "hf_sdpa":
            a, b = torch.load(mine), torch.load(ref)
            row["rel_err"] = ((a - b).norm() / b.norm()).item()
    meta["complete"] = True
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"model_prefill_bf16_{slug(meta['device'])}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nLlama-style prefill (8 layers, hidden 2048, 16/4 heads, bf16), {meta['device']}, "
          f"torch {meta['torch']}, triton {meta['triton']}: ms (peak GiB above weights; "
          "last-token logits vs hf_sdpa)\n")
    impls = args.impls.split(",")
    print("| tokens | " + " | ".join(impls) + " |")
    print("|---:|" + "---:|" * len(impls))
    for n in lengths:
        cells = []
        for kind in impls:
            r = next(r for r in rows if r["impl"] == kind and r["seq_len"] == n)
            if r["ms"] is None:
                cells.append("failed")
            else:
                err = "" if r["rel_err"] is None else f", {r['rel_err']:.0e}"
                cells.append(f"{r['ms']:.1f} ({r['peak_gib']:.2f} GiB{err})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["error"]:
            print(f"  {r['impl']} {r['seq_len']}: {r['error']}")


if __name__ == "__main__":
    main()
