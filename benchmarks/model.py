"""Model-level prefill and decode: a Llama-style decoder (8 layers, hidden 2048, 16 query / 4 KV
heads of 128, bf16, random weights; ``--family qwen2`` the same sizes as Qwen2, with q/k/v
biases; ``--family gemma2`` Gemma 2's attention at those sizes: 8 query / 4 KV heads of 256,
logits soft-capped at 50, every other layer a 4096-token sliding window) run over a whole
prompt, as a generate() prefill runs it (``--mode prefill``), or generating tokens greedily with
HF's default dynamic KV cache (``--mode decode``).

Implementations, same weights, same run, same GPU:
- ``eager``: ``attn_implementation="eager"`` (the hand-written attention the pass targets);
- ``eager+inductor``: that model under ``torch.compile`` (Inductor, no pass);
- ``hf_sdpa``: ``attn_implementation="sdpa"`` (HF's own fused path), eager PyTorch around it;
- ``hf_sdpa+inductor``: the HF SDPA model under ``torch.compile`` (Inductor);
- ``hf_flex``, ``hf_flex+inductor``: ``attn_implementation="flex_attention"`` (HF's flex
  attention path, which takes Gemma 2's soft-cap; HF has no SDPA path for Gemma 2);
- ``optimize``: ``sdpa_pass.optimize(eager model)`` (the pass in front of Inductor), its sites
  on our Triton kernels; with ``--implementations triton,sdpa,math`` also ``optimize[sdpa]``
  (the sites as exact ``F.scaled_dot_product_attention`` calls) and ``optimize[math]`` (the
  float64 math reference, skipped above ``MATH_MAX_TOKENS``: it holds every score at once).
- any compiled column with ``+cudagraphs`` (``optimize+cudagraphs``,
  ``hf_sdpa+inductor+cudagraphs``, ``eager+inductor+cudagraphs``): the same under Inductor's
  CUDA graphs (``mode="reduce-overhead"``), which takes the host's launch cost out.

Prefill, per prompt length: median latency of the forward (``logits_to_keep=1``, no cache, as
the prefill of a generation with its KV cache disabled), peak GPU memory above the weights, and
the relative difference of the last-token logits against the family's reference column
(``REFERENCE``: ``hf_sdpa``, or ``eager`` for Gemma 2).
Decode: ``generate`` of ``--new-tokens`` tokens after a prompt of each length, batch
``--batch``; tokens/s of the whole call (prefill included, once compiled: one warm-up call
first), peak memory, and whether the tokens equal the reference column's.

Run: ``python benchmarks/model.py [--mode prefill|decode] [--family llama|qwen2]
[--lengths 2048,8192] [--implementations triton,sdpa,math] [--out DIR]``.
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
from sdpa_pass.kernels.launch import clear_plans  # noqa: E402
from sdpa_pass.report import KernelChoices  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=16384)


FAMILIES = {"llama": (T.LlamaForCausalLM, T.LlamaConfig), "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config),
            "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config)}
# Each family's attention over CONFIG's sizes: Gemma 2's head dim, soft-caps and windows (its
# 2B model's attention, 8 / 4 heads of 256, at hidden 2048)
FAMILY_CONFIG = {"gemma2": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                query_pre_attn_scalar=256, sliding_window=4096,
                                attn_logit_softcapping=50.0, final_logit_softcapping=30.0)}
# The column the others' logits are compared with: HF's SDPA path, except where HF has none
# (Gemma 2: its SDPA path would drop the soft-cap, so HF refuses it) and eager is the model
REFERENCE = {"gemma2": "eager"}
# attn_implementation by column prefix
ATTENTION = {"hf_sdpa": "sdpa", "hf_flex": "flex_attention"}


def config(family: str, attn_implementation: str = "eager"):
    """The family's config at CONFIG's sizes (with FAMILY_CONFIG's changes)."""
    _, config_class = FAMILIES[family]
    return config_class(**{**CONFIG, **FAMILY_CONFIG.get(family, {})},
                        attn_implementation=attn_implementation)


def attention_of(kind: str) -> str:
    """The attn_implementation a column's model is built with."""
    base, _ = split_cudagraphs(kind)
    return next((attn for prefix, attn in ATTENTION.items() if base.startswith(prefix)), "eager")
# The float64 math reference materialises (B, H, L, S) float64 scores and probabilities per
# layer: 8.6 GB each at 8192 tokens. Longer prompts are skipped for it.
MATH_MAX_TOKENS = 4096


CUDAGRAPHS = "+cudagraphs"


def optimize_kind(implementation: str, suffix: str = "") -> str:
    """The implementation column name: ``optimize`` (our kernels) or ``optimize[sdpa]``."""
    return ("optimize" if implementation == "triton" else f"optimize[{implementation}]") + suffix


def split_cudagraphs(kind: str) -> tuple[str, bool]:
    """(the column without its ``+cudagraphs`` suffix, whether it had one)."""
    if kind.endswith(CUDAGRAPHS):
        return kind[:-len(CUDAGRAPHS)], True
    return kind, False


def implementation_of(kind: str):
    """The implementation an ``optimize...`` column asks for, or None for other columns."""
    kind, _ = split_cudagraphs(kind)
    if kind == "optimize":
        return "triton"
    if kind.startswith("optimize[") and kind.endswith("]"):
        return kind[len("optimize["):-1]
    return None


def skip_reason(kind: str, tokens: int):
    if implementation_of(kind) == "math" and tokens > MATH_MAX_TOKENS:
        return f"skipped: too large for the float64 math reference (> {MATH_MAX_TOKENS} tokens)"
    return None


def build(kind: str, base_state: dict, family: str = "llama") -> torch.nn.Module:
    base, cudagraphs = split_cudagraphs(kind)
    if cudagraphs and base in ("hf_sdpa", "hf_flex", "eager"):
        raise ValueError(f"{kind}: CUDA graphs come with a compiled column (+inductor, optimize)")
    model_class, _ = FAMILIES[family]
    model = model_class(config(family, attention_of(kind)))
    model.load_state_dict(base_state)
    model = model.to("cuda", torch.bfloat16).eval()
    if base in ("eager+inductor", "hf_sdpa+inductor", "hf_flex+inductor"):
        model.compile(mode="reduce-overhead" if cudagraphs else None)
    elif implementation_of(kind) is not None:
        reports = []
        options = {"triton.cudagraphs": True} if cudagraphs else {}
        sdpa_pass.optimize(model, implementation=implementation_of(kind), on_report=reports.append,
                           **options)
        model.sdpa_pass_reports = reports   # what each compile's sites run, for the row
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


def profile(model, ids, path: Path) -> None:
    """One more (warm) prefill under torch.profiler: the kernels and host ops by GPU time, and
    by host time, written to ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(ids, use_cache=False, logits_to_keep=1)
        if ids.is_cuda:
            torch.cuda.synchronize()
    table = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.table(sort_by="cuda_time_total", row_limit=30) + "\n\n"
                    + table.table(sort_by="self_cpu_time_total", row_limit=30))


def measure_decode(model, ids, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **kwargs)  # compile (prefill, decode, dynamic decode), warm up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            tokens = model.generate(ids, **kwargs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak / 2**30, tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--impls", default=None,
                        help="columns: hf_sdpa, hf_sdpa+inductor, hf_flex, hf_flex+inductor, "
                             "eager, eager+inductor, optimize, each compiled one also with "
                             "+cudagraphs (default: the reference column, eager, "
                             "eager+inductor, optimize)")
    parser.add_argument("--implementations", default="triton",
                        help="what the optimize column's rewritten sites run, one column each: "
                             "any of triton,sdpa,math (sdpa_pass.Implementation)")
    parser.add_argument("--mode", choices=["prefill", "decode"], default="prefill")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--profile", action="store_true",
                        help="prefill: also write each column's torch.profiler table per length "
                             "(profile_<column>_<tokens>.txt in --out), to see where time goes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model_class, _ = FAMILIES[args.family]
    base_state = model_class(config(args.family)).state_dict()
    reference = REFERENCE.get(args.family, "hf_sdpa")
    if args.impls is None:
        args.impls = ",".join(dict.fromkeys([reference, "eager", "eager+inductor", "optimize"]))
    meta = metadata(argparse.Namespace(mode=args.mode, dtype="bf16", quick=False), torch.device("cuda"))
    decode = args.mode == "decode"
    meta.update(benchmark=f"model_{args.mode}", family=args.family, flops=None,
                model={**CONFIG, **FAMILY_CONFIG.get(args.family, {})}, reference=reference,
                batch=args.batch, new_tokens=args.new_tokens if decode else None,
                timer="CUDA events, median of " + ("3 generate calls" if decode else "10"))
    rows = []
    lengths = [int(n) for n in args.lengths.split(",")]
    choices = sdpa_pass.implementations.resolve(args.implementations.split(","))
    impls = []
    for kind in args.impls.split(","):
        base, cudagraphs = split_cudagraphs(kind)
        suffix = CUDAGRAPHS if cudagraphs else ""
        impls += [optimize_kind(c.value, suffix) for c in choices] if base == "optimize" else [kind]
    meta["implementations"] = [c.value for c in choices]
    for kind in impls:
        model = build(kind, base_state, args.family)
        for n in lengths:
            ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, n), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(n))
            row = dict(impl=kind, seq_len=n, ms=None, peak_gib=None, rel_err=None, error=None)
            if skip_reason(kind, n):
                row["error"] = skip_reason(kind, n)
                rows.append(row)
                print(row, flush=True)
                continue
            # plans dropped first, so each row logs the kernel choices of its own launches
            clear_plans()
            with KernelChoices() as choices:
                try:
                    if decode:
                        row["ms"], row["peak_gib"], logits = measure_decode(model, ids,
                                                                            args.new_tokens)
                        row["tokens_per_s"] = args.batch * args.new_tokens / (row["ms"] / 1e3)
                    else:
                        row["ms"], row["peak_gib"], logits = measure(model, ids)
                        row["tokens_per_s"] = args.batch * n / (row["ms"] / 1e3)
                        if args.profile:
                            profile(model, ids, args.out / f"profile_{slug(kind)}_{n}.txt")
                    torch.save(logits.cpu(), f"/tmp/logits_{slug(kind)}_{n}.pt")
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: a result
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    torch.cuda.empty_cache()
            if choices.lines:  # which kernels our sites ran (Gluon or Triton, and why)
                row["kernel_choices"] = choices.lines
            reports = getattr(model, "sdpa_pass_reports", None)
            if reports:  # which implementation the sites ran (a fallback shows here)
                ran = sorted({s.implementation or f"skipped:{s.reason_code}" for r in reports for s in r.sites})
                row["sites_ran"] = ",".join(ran)
            rows.append(row)
            print(row, flush=True)
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    for row in rows:
        ref = Path(f"/tmp/logits_{slug(reference)}_{row['seq_len']}.pt")
        mine = Path(f"/tmp/logits_{slug(row['impl'])}_{row['seq_len']}.pt")
        if row["ms"] is not None and ref.exists() and row["impl"] != reference:
            a, b = torch.load(mine), torch.load(ref)
            if decode:  # greedy tokens: the fraction that differ from the reference's
                row["tokens_differ"] = (a != b).float().mean().item()
            else:
                row["rel_err"] = ((a.float() - b.float()).norm() / b.float().norm()).item()
    meta["complete"] = True
    args.out.mkdir(parents=True, exist_ok=True)
    family = "" if args.family == "llama" else f"_{args.family}"
    path = args.out / f"model_{args.mode}{family}_bf16_{slug(meta['device'])}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    what = (f"decode, batch {args.batch}, {args.new_tokens} new tokens: tokens/s (peak GiB above "
            f"weights; share of tokens unlike {reference}'s)" if decode else
            f"prefill: ms (peak GiB above weights; last-token logits vs {reference})")
    cfg = config(args.family)
    print(f"\n{args.family}-style model ({cfg.num_hidden_layers} layers, hidden "
          f"{cfg.hidden_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads of "
          f"{cfg.head_dim}, bf16) {what}; {meta['device']}, torch {meta['torch']}, triton {meta['triton']}\n")
    print("| tokens | " + " | ".join(impls) + " |")
    print("|---:|" + "---:|" * len(impls))
    for n in lengths:
        cells = []
        for kind in impls:
            r = next(r for r in rows if r["impl"] == kind and r["seq_len"] == n)
            if r["ms"] is None:
                cells.append("skipped" if (r["error"] or "").startswith("skipped") else "failed")
            elif decode:
                diff = "" if r.get("tokens_differ") is None else f", {r['tokens_differ']:.0%}"
                cells.append(f"{r['tokens_per_s']:.0f} ({r['peak_gib']:.2f} GiB{diff})")
            else:
                err = "" if r["rel_err"] is None else f", {r['rel_err']:.0e}"
                cells.append(f"{r['ms']:.1f} ({r['peak_gib']:.2f} GiB{err})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["error"]:
            print(f"  {r['impl']} {r['seq_len']}: {r['error']}")
        if r.get("sites_ran") and r["sites_ran"] != (implementation_of(r["impl"]) or ""):
            print(f"  {r['impl']} {r['seq_len']}: sites ran {r['sites_ran']}")


if __name__ == "__main__":
    main()
