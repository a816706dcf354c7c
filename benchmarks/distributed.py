"""Training step time under DDP, FSDP2 and tensor parallelism: sdpa_pass against HF's SDPA.

A Llama-style decoder (8 layers, hidden 1024, 16 query / 4 KV heads of 64, vocab 32000, bf16,
random weights), sequences of 2048 random token ids, batch 4 per data-parallel rank, an
all-ones attention_mask as a tokenizer gives (``--mask none``: no mask), causal LM loss
(labels = the inputs), AdamW at a fixed lr. The same batch every step, so the loss falls and
the implementations' loss curves can be compared. Implementations, same weights, same data:
- ``optimize``: ``attn_implementation="eager"`` under ``sdpa_pass.optimize`` (the pass in front
  of Inductor);
- ``hf_sdpa``: ``attn_implementation="sdpa"`` (HF's own fused path), not compiled;
- ``hf_sdpa+inductor``: that model under ``torch.compile`` (Inductor).
Parallelisms (``--parallel``):
- ``ddp``: DistributedDataParallel, the wrapper compiled (Dynamo's DDPOptimizer splits the graph
  at the gradient buckets, so that each bucket's all-reduce overlaps the rest of the backward;
  the layers after the first split then receive the causal mask as a graph input, which the
  pass cannot lift to a predicate; ``--no-ddp-split`` compiles one graph instead);
- ``fsdp2``: ``fully_shard`` per decoder layer and the root, then the root compiled (a graph
  per layer: the mask is a graph input there too);
- ``tp``: ColwiseParallel q/k/v/gate/up, RowwiseParallel o/down (heads split over the ranks,
  each rank's attention on its local heads), the same batch on every rank;
- ``single``: one process, no wrapper (the single-GPU baseline, ``--nproc_per_node 1``).

Per parallelism and implementation: the first step's time (compilation included), then after
the warm-up steps the median of the timed steps (forward + backward + optimizer step, CUDA
events, the slowest rank's median), tokens/s (the tokens the whole job trains on per step over
that time), peak memory (the most any rank allocated, weights and optimizer state included),
every step's loss (averaged over the data-parallel ranks), and for compiled runs Dynamo's graph
breaks and the attention sites the pass rewrote. A failing run records its error and the next
one runs.

    torchrun --standalone --nproc_per_node 2 benchmarks/distributed.py --out DIR
    torchrun --standalone --nproc_per_node 1 benchmarks/distributed.py --out DIR   # single GPU
    # CPU smoke run: gloo, the kernels in Triton's interpreter, a tiny model, 1 + 2 steps
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 benchmarks/distributed.py --device cpu --tiny --out /tmp/d

Results go to ``{out}/distributed_train_{dtype}_{device}_x{ranks}.json`` (plus ``_mask-none``,
``_no-ddp-split`` for those options), rewritten after every run, so an interrupted job keeps
what it measured, and copied to ``$OUT`` when set; the last lines of rank 0's stdout are a
markdown table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import metadata, save, slug  # noqa: E402

import sdpa_pass  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
TINY_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
IMPLS = ("optimize", "hf_sdpa", "hf_sdpa+inductor")
PARALLELS = ("ddp", "fsdp2", "tp", "single")


class Job:
    """This process's place in the job and the settings every run shares."""

    def __init__(self, args):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        cuda = args.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        # The interpreter's bf16 tl.dot is wrong: CPU runs in fp32.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.config = TINY_CONFIG if args.tiny else CONFIG
        self.args = args
        # the ranks agree on failures and wait for each other between runs over gloo, whatever
        # the training backend
        self.control = dist.new_group(backend="gloo")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reduce(self, values: list[float], op=dist.ReduceOp.MAX) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=self.control)
        return t.tolist()


def build(job: Job, impl: str, base_state: dict) -> torch.nn.Module:
    attn = "sdpa" if impl.startswith("hf_sdpa") else "eager"
    config = T.LlamaConfig(**job.config, attn_implementation=attn)
    with job.device:
        model = T.LlamaForCausalLM(config)
    model.load_state_dict(base_state)
    return model.to(job.dtype).train()


def parallelize(job: Job, parallel: str, model: torch.nn.Module) -> torch.nn.Module:
    """The module to call: ``model`` wrapped or sharded in place for ``parallel``."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = None if job.device.index is None else [job.device.index]
        return DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if parallel == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        heads = job.config["num_key_value_heads"]
        if heads % job.world:
            raise ValueError(f"tp: {heads} KV heads do not split over {job.world} ranks")
        mesh = init_device_mesh(job.device.type, (job.world,))
        # local outputs: HF's view(..., -1, head_dim) then sees each rank's own heads
        plan = {
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        for layer in model.model.layers:
            parallelize_module(layer, mesh, plan)
        return model
    assert parallel == "single", parallel
    return model


def compile_for(job: Job, impl: str, module: torch.nn.Module, sites: collections.Counter) -> torch.nn.Module:
    compiler = job.args.compiler
    if impl == "optimize":
        def on_report(report):
            # what the kernel was given: masks lifted to a causal predicate, or a mask tensor
            sites.update(f"rewritten ({site.implementation}, causal {site.causal}, mask {site.mask})"
                         if site.rewritten else f"{site.status}: {site.reason}" for site in report.sites)

        return sdpa_pass.optimize(module, backend=compiler, on_report=on_report)
    if impl == "hf_sdpa+inductor":
        module.compile(backend=compiler)
    return module


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    from torch.distributed.tensor import DTensor

    # Tensor parallelism leaves some parameters plain (embeddings, norms, lm_head) beside
    # DTensor ones, and one foreach call rejects the mix: a param group for each kind.
    params = list(model.parameters())
    groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                          [p for p in params if not isinstance(p, DTensor)]) if g]
    return torch.optim.AdamW([{"params": g} for g in groups], lr=1e-3, weight_decay=0.0)


def batch(job: Job, parallel: str) -> torch.Tensor:
    """Random token ids; a data-parallel rank's own, the same on every rank for TP."""
    data_rank = 0 if parallel == "tp" else job.rank
    generator = torch.Generator().manual_seed(1000 + data_rank)
    ids = torch.randint(0, job.config["vocab_size"], (job.args.batch, job.args.seq), generator=generator)
    return ids.to(job.device)


def run(job: Job, parallel: str, impl: str, base_state: dict) -> dict:
    args = job.args
    row = dict(parallel=parallel, impl=impl, ranks=job.world, step_ms=None, tokens_per_s=None,
               peak_gib=None, first_step_s=None, losses=None, graph_breaks=None, sites=None, error=None)
    model = build(job, impl, base_state)
    sites = collections.Counter()
    forward = compile_for(job, impl, parallelize(job, parallel, model), sites)
    optimizer = optimizer_for(model)
    ids = batch(job, parallel)
    mask = torch.ones_like(ids) if args.mask == "ones" else None
    torch._dynamo.utils.counters.clear()

    def step():
        loss = forward(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = []
    start = time.perf_counter()
    losses.append(step())
    job.sync()
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        losses.append(step())
    job.sync()
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        if job.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            losses.append(step())
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            losses.append(step())
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if job.device.type == "cuda" else 0.0

    step_ms, first_step_s, peak = job.reduce([statistics.median(times), first_step_s, peak])
    data_ranks = 1 if parallel == "tp" else job.world
    curve = job.reduce([loss.item() / job.world for loss in losses], op=dist.ReduceOp.SUM)
    row.update(step_ms=step_ms, first_step_s=first_step_s, losses=curve,
               tokens_per_s=data_ranks * args.batch * args.seq / (step_ms / 1e3),
               peak_gib=peak if job.device.type == "cuda" else None)
    if impl != "hf_sdpa":
        row["graph_breaks"] = dict(torch._dynamo.utils.counters["graph_break"])
    if impl == "optimize":
        row["sites"] = dict(sites)
    return row


def curve_diff(row: dict, rows: list[dict]) -> float | None:
    """The largest relative difference of this run's losses from hf_sdpa's, same parallelism."""
    ref = next((r for r in rows if r["parallel"] == row["parallel"] and r["impl"] == "hf_sdpa"
                and r["losses"]), None)
    if ref is None or not row["losses"] or row is ref:
        return None
    return max(abs(a - b) / abs(b) for a, b in zip(row["losses"], ref["losses"]))


def table(rows: list[dict]) -> str:
    lines = ["| parallel | impl | step ms | tokens/s | peak GiB | first step s | loss first -> last "
             "| max rel. diff vs hf_sdpa | graph breaks | sites |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['parallel']} | {r['impl']} | failed: {r['error'].splitlines()[0][:80]} "
                         "| | | | | | | |")
            continue
        diff = curve_diff(r, rows)
        breaks = "" if r["graph_breaks"] is None else sum(r["graph_breaks"].values())
        sites = "" if r["sites"] is None else ", ".join(f"{n} {s}" for s, n in r["sites"].items())
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {r['parallel']} | {r['impl']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {peak} "
            f"| {r['first_step_s']:.0f} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} "
            f"| {'' if diff is None else f'{diff:.1e}'} | {breaks} | {sites} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, seq 16, batch 2, 1 + 2 steps")
    parser.add_argument("--parallel", default=None, help=f"comma-separated subset of {PARALLELS} "
                        "(default: ddp,fsdp2,tp; single on one rank)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of: %(default)s")
    parser.add_argument("--batch", type=int, default=None, help="sequences per data-parallel rank (4)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (2048)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps, the first compiles (3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10)")
    parser.add_argument("--mask", choices=("ones", "none"), default="ones",
                        help="attention_mask: all ones, as a tokenizer gives an unpadded batch, or none")
    parser.add_argument("--no-ddp-split", action="store_true",
                        help="compile DDP as one graph (torch._dynamo.config.optimize_ddp=False): no "
                        "gradient-bucket overlap, but the pass sees the causal mask built")
    parser.add_argument("--compiler", default="inductor",
                        help="the compiled runs' backend (sdpa_pass's inner one for optimize)")
    args = parser.parse_args(argv)
    sizes = dict(batch=2, seq=16, warmup=1, steps=2) if args.tiny else \
        dict(batch=4, seq=2048, warmup=3, steps=10)
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.device == "cuda" and interpreted:
        sys.exit("distributed.py: unset TRITON_INTERPRET: on GPUs the kernels must compile for the GPU")
    if args.device == "cpu" and not interpreted:
        sys.exit("distributed.py: --device cpu needs TRITON_INTERPRET=1 (the kernels run in the interpreter)")
    if "LOCAL_RANK" not in os.environ:
        sys.exit("distributed.py: launch with torchrun, e.g. torchrun --standalone --nproc_per_node 2 "
                 "benchmarks/distributed.py --out DIR")
    if args.no_ddp_split:
        torch._dynamo.config.optimize_ddp = False
    if args.device == "cuda":
        # before any CUDA work, so NCCL and every allocation use this rank's GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    # A collective waits this long for a rank that is still compiling.
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=600))
    job = Job(args)
    parallels = (args.parallel or ("ddp,fsdp2,tp" if job.world > 1 else "single")).split(",")
    impls = args.impls.split(",")
    unknown = set(parallels) - set(PARALLELS) | set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --parallel/--impls {sorted(unknown)}")
    if "single" in parallels and job.world > 1:
        parser.error("--parallel single runs on one rank: torchrun --nproc_per_node 1")

    torch.manual_seed(0)
    # on the CPU: off the GPU while the runs' memory is measured
    base_state = T.LlamaForCausalLM(T.LlamaConfig(**job.config)).state_dict()
    dtype_name = "bf16" if job.dtype == torch.bfloat16 else "fp32"
    meta = metadata(argparse.Namespace(mode="train", dtype=dtype_name, quick=args.tiny), job.device)
    for key in ("reference_order", "mismatch_tol", "flops"):
        meta.pop(key, None)
    meta.update(benchmark="distributed_train", ranks=job.world, backend=dist.get_backend(),
                model=job.config, batch_per_data_rank=args.batch, seq_len=args.seq,
                optimizer="AdamW lr 1e-3, no weight decay",
                compiler=args.compiler, warmup_steps=args.warmup, timed_steps=args.steps,
                attention_mask=args.mask, ddp_graph_split=not args.no_ddp_split,
                timer=("CUDA events" if job.device.type == "cuda" else "time.perf_counter")
                + f", median of {args.steps} steps, slowest rank",
                transformers=T.__version__)
    variant = ("_mask-none" if args.mask == "none" else "") + ("_no-ddp-split" if args.no_ddp_split else "")
    path = args.out / f"distributed_train_{dtype_name}_{slug(meta['device'])}_x{job.world}{variant}.json"
    if job.rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{meta['device']} x{job.world}, torch {meta['torch']}, triton {meta['triton']}, "
              f"transformers {T.__version__}, {dtype_name}", flush=True)

    rows = []
    for parallel in parallels:
        for impl in impls:
            try:
                row = run(job, parallel, impl, base_state)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory or a compile error: a result
                row = dict(parallel=parallel, impl=impl, ranks=job.world, losses=None,
                           error=f"rank {job.rank}: {type(exc).__name__}: {str(exc)[:500]}")
            if row["error"]:
                print(f"{parallel} {impl}: {row['error']}", file=sys.stderr, flush=True)
            # rank 0 writes the results: it must know of a failure on another rank
            failed = job.reduce([row["error"] is not None], op=dist.ReduceOp.SUM)[0]
            if failed and row["error"] is None:
                row = dict(row, error=f"failed on {failed:.0f} other rank(s)")
            torch._dynamo.reset()  # its graphs hold the model
            gc.collect()
            if job.device.type == "cuda":
                torch.cuda.empty_cache()
            dist.barrier(group=job.control)
            rows.append(row)
            if job.rank == 0:
                save(path, meta, rows)
                print({k: v for k, v in row.items() if k != "losses"}, flush=True)
    meta["complete"] = True
    if job.rank == 0:
        save(path, meta, rows)
        print(f"\nLlama-style training step, {job.config['num_hidden_layers']} layers, hidden "
              f"{job.config['hidden_size']}, {job.config['num_attention_heads']}/"
              f"{job.config['num_key_value_heads']} heads, seq {args.seq}, batch {args.batch} per "
              f"data-parallel rank, attention_mask {args.mask}, {dtype_name}, {job.world} x "
              f"{meta['device']}; median of {args.steps} steps after {args.warmup} warm-up\n")
        print(table(rows))
        for r in rows:
            if r["error"]:
                print(f"  {r['parallel']} {r['impl']}: {r['error']}")
    dist.barrier(group=job.control)  # torchrun ends every rank once one exits non-zero
    dist.destroy_process_group()
    if any(r["error"] for r in rows):
        sys.exit(1)  # the results are written; the exit status says not every run ran


if __name__ == "__main__":
    main()
