"""Distributed training through rewritten attention: DDP, FSDP2 and tensor parallelism.

Two processes, spawned once for the module (the imports and the first compile are most of the
time), train a tiny random HF Llama with GQA (``attn_implementation="eager"``, every dropout 0)
compiled as ``torch.compile(model, backend="sdpa_pass", options={"backend": "aot_eager"})``:
by default CPU processes on gloo in fp32 (CI); with ``SDPA_PASS_DIST_DEVICE=cuda`` one GPU each
on NCCL in bf16 (below). Each test compares what the ranks got with single-process eager on
the whole batch, computed here from the same seed:
  - DDP and FSDP2 (``fully_shard`` per decoder layer and the root): each rank a different half
    of the batch; the rank losses average to eager's loss and every gradient (FSDP2's gathered
    with ``full_tensor()``) is eager's gradient.
  - Tensor parallelism (``parallelize_module``, ColwiseParallel q/k/v/gate/up, RowwiseParallel
    o/down, heads split over the 2 ranks), both ways torch's TP tutorials write it: projections
    returning local tensors (HF's ``view(..., -1, head_dim)`` then sees the local head count,
    so the kernel runs on plain local tensors), and returning DTensors, so the attention op
    itself is called on DTensors and ``kernels/sharding.py``'s rules split it over heads.
  - The sharding rules on their own: the op on DTensors split over batch and over heads
    (float masks whose gradient comes back ``Partial``, key padding, LSE, an uneven GQA split
    that must be refused, dropout that must run replicated) against the op on whole tensors.
Every compiled case also checks that both attention sites were rewritten, that the backward
ran ``torch.ops.sdpa_pass.attention_backward`` once per layer and that no graph break came
from our ops.

On GPUs (``SDPA_PASS_DIST_DEVICE=cuda``, 2 GPUs, NCCL): the same scenarios with the model, the
inputs and the op's tensors in bf16, eager on one GPU, and a loss curve: STEPS steps on the
batch, each after the first following an AdamW step, every step's loss checked. bf16 eager is
itself an approximation, so, as test_families.py judges bf16, each loss and gradient is
compared with fp32 eager of the same weights and may be at most twice as far from it as bf16
eager is, plus a slack. The kernels compile for the GPU with fixed tiles
(``SDPA_PASS_AUTOTUNE=0`` unless set otherwise): this suite compiles many kernel variants, and
tuning is not what it tests.

The CPU workers set TRITON_INTERPRET=1 before importing sdpa_pass (the kernels run in Triton's
interpreter, as in every CPU test; the GPU workers clear it), so this module imports sdpa_pass
only inside functions.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import importlib
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

WORLD = 2
DEVICE = os.environ.get("SDPA_PASS_DIST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"SDPA_PASS_DIST_DEVICE={DEVICE!r}: expected 'cpu' (the default) or 'cuda'")
ON_GPU = DEVICE == "cuda"

# gloo in both modes: on GPUs the ranks still agree on failures through a gloo group (_worker)
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build",
                allow_module_level=True)
if ON_GPU and not (dist.is_nccl_available() and torch.cuda.device_count() >= WORLD):
    pytest.skip(f"SDPA_PASS_DIST_DEVICE=cuda needs NCCL and {WORLD} GPUs; this machine has "
                f"{torch.cuda.device_count()} GPU(s)" + ("" if dist.is_nccl_available() else " and no NCCL"),
                allow_module_level=True)

BACKEND = "nccl" if ON_GPU else "gloo"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
LAYERS = 2
BATCH = 4            # the whole batch; DDP and FSDP2 give each rank BATCH // WORLD rows
OP_BATCH = 2         # the op on its own: the interpreter's time grows with batch x heads
# A loss curve on GPUs; on CPU one step, as CI's time allows (the interpreter runs every kernel).
STEPS = 5 if ON_GPU else 1
LR = 1e-3            # AdamW: a step moves every weight by about LR, 5% of its init scale
# CPU, fp32 on both sides: the losses agree to accumulation-order noise, and so do the gradients
# (DDP/FSDP2 average two half-batch gradients where eager sums one batch)
LOSS_REL_TOL = 1e-5
GRAD_REL_TOL = 1e-5
# GPU, bf16: the slack over "twice bf16 eager's distance from fp32". One loss can be luckily
# close in bf16 (on CPU, bf16 eager's first loss was 3e-5 from fp32's, the TP ranks' 3e-4), so
# the loss slack is about half bf16's unit roundoff (2^-8); past the first step the curves'
# distance from fp32 is mostly the bf16 AdamW updates, which every bf16 run shares (2e-2 by
# the fifth step on CPU, eager and distributed alike). Gradients take one more bf16 rounding
# per all-reduce (DDP, TP) or reduce-scatter (FSDP2) than eager's. A wrong attention is off by
# far more: in this model the attention branch is about as large as the embeddings it is added
# to. (This file run on CPU with these bf16 settings used at most 57% of any bound.)
LOSS_BF16_SLACK = 2e-3
GRAD_BF16_SLACK = 1e-2
# the op on shards against the same op on whole tensors: the same rows through the same kernel
# with the same tiles. fp32: rounding noise. bf16: a float mask's gradient that comes back
# Partial is summed over the ranks in bf16 where the whole run sums in fp32 and rounds once,
# up to bf16's unit roundoff (2^-8) per element (3e-3 of the norm on CPU); a wrong pairing of
# rows or heads is off by O(1).
OP_REL_TOL = 1e-2 if ON_GPU else 1e-6
# Seen on torch 2.11 (2 H100s, NCCL): Dynamo's fake-tensor run of HF's own eager
# `q @ k.transpose(2, 3)` on DTensors sharded over heads fails in DTensor's sharding
# propagation (the matmul's view to 3-D flattens the sharded head dim), before any backend
# sees the graph; torch 2.13 traces it. Not something the pass can change. Below 2.13 the
# scenario is not run at all (a failed scenario stops the ranks before the next ones).
TP_DTENSOR_TRACEABLE = torch.torch_version.TorchVersion(torch.__version__) >= "2.13"
COMPILED_SCENARIOS = ("ddp", "fsdp2", "tp_local_output") + (
    ("tp_dtensor_output",) if TP_DTENSOR_TRACEABLE else ())
SCENARIOS = COMPILED_SCENARIOS + ("op_sharding",)
# The spawn takes about 60 s on 2 cores; on GPUs the kernels' compiles take a minute or two
# (270 s: inside a 5-minute step of a device session). A hung collective or process exit fails
# the scenarios without results instead of hanging CI.
SPAWN_TIMEOUT_S = 270 if ON_GPU else 300
# how long a collective waits for the other rank, which may still be compiling
COLLECTIVE_TIMEOUT_S = 240 if ON_GPU else 90


# ---- what both sides build: model, batch, loss ---------------------------------------------

def _model(dtype=DTYPE):
    from test_hf_models import tiny_llama_gqa

    torch.manual_seed(0)
    model = tiny_llama_gqa()
    assert model.config.attention_dropout == 0.0
    # drawn in fp32 whatever the dtype: the fp32 reference and the bf16 runs hold the same weights
    return model.to(DEVICE, dtype).train()


def _batch():
    from test_hf_models import SEQ, VOCAB

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    # right padding in one row of each rank's half, so no query row is masked everywhere
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, SEQ - 3:] = 0
    attention_mask[3, SEQ - 4:] = 0
    return input_ids.to(DEVICE), attention_mask.to(DEVICE)


def _loss(model, input_ids, attention_mask):
    out = model(input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits.float().square().mean()


# ---- worker side ---------------------------------------------------------------------------

class _CountSdpaOps(TorchDispatchMode):
    """Counts the torch.ops.sdpa_pass calls that actually run."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "sdpa_pass":
            name = func.overloadpacket.__name__
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _compile(model, seen):
    """The pass in front of aot_eager, noting the Reports and the type of the tensors each
    rewritten attention call receives (DTensor or a plain tensor)."""
    from torch._dynamo import lookup_backend

    def aot_eager_noting_inputs(gm, example_inputs):
        for node in gm.graph.find_nodes(op="call_function",
                                        target=torch.ops.sdpa_pass.attention_forward.default):
            seen["attention_input_types"].append(type(node.args[0].meta["example_value"]).__name__)
        return lookup_backend("aot_eager")(gm, example_inputs)

    seen.update(sites=[], graphs=0, attention_input_types=[])

    def on_report(report):
        seen["sites"] += [(site.status, site.reason) for site in report.sites]
        seen["graphs"] += len(report.graphs)

    return torch.compile(model, backend="sdpa_pass",
                         options={"backend": aot_eager_noting_inputs, "on_report": on_report})


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _on_cpu(result):
    """``result`` with its tensors on the CPU, where the test side compares them."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.cpu(), result)


def _train(model, forward, input_ids, attention_mask, seen=None, context=contextlib.nullcontext):
    """STEPS steps of ``forward`` (``model``, compiled or not) on one batch, each after the
    first following an AdamW step: every step's loss ("losses"); from the first step its
    gradients as whole tensors, how often its backward ran attention_backward, the graph breaks
    and what _compile had ``seen`` by then (a later step's recompile is not what this judges)."""
    # foreach=False: a TP model mixes DTensor and plain parameters, which one foreach call rejects
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, foreach=False)
    losses, record = [], {}
    for step in range(STEPS):
        if step:
            optimizer.step()
            optimizer.zero_grad()
        with context():
            loss = _loss(forward, input_ids, attention_mask)
            counter = _CountSdpaOps()
            with counter:
                loss.backward()
        losses.append(loss.detach())
        if not step:
            record = dict(copy.deepcopy(seen or {}),
                          backward_calls=counter.calls.get("attention_backward", 0),
                          graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values()),
                          grads={name: _full(p.grad).detach().clone()
                                 for name, p in model.named_parameters()})
    record["losses"] = torch.stack(losses)
    return record


def _run_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    seen = {}
    compiled = _compile(DistributedDataParallel(model, device_ids=[rank] if ON_GPU else None), seen)
    input_ids, attention_mask = _batch()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return _train(model, compiled, input_ids[rows], attention_mask[rows], seen)


def _run_fsdp2(rank):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    seen = {}
    compiled = _compile(model, seen)
    input_ids, attention_mask = _batch()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return _train(model, compiled, input_ids[rows], attention_mask[rows], seen)


def _run_tp(rank, use_local_output):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh(DEVICE, (WORLD,))
    model = _model()
    heads = ColwiseParallel(use_local_output=use_local_output)
    plan = {
        "self_attn.q_proj": heads, "self_attn.k_proj": heads, "self_attn.v_proj": heads,
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    seen = {}
    compiled = _compile(model, seen)
    input_ids, attention_mask = _batch()  # the whole batch on every rank
    # With DTensor projections, RoPE's cos/sin and the padding mask stay plain tensors, which
    # DTensor accepts only as implicitly replicated.
    context = contextlib.nullcontext if use_local_output else implicit_replication
    return _train(model, compiled, input_ids, attention_mask, seen, context)


def _op_sharding_cases():
    """(name, q heads, kv heads, input split, attention kwargs, float-mask shape or None).
    Every case returns the LSE and uses it in the loss, so its gradient reaches the backward
    as a DTensor too (see test_dtensor_call_with_unused_lse for why an unused one fails)."""
    return [
        # mask broadcast over heads: replicated in, its gradient Partial out
        ("heads, (B, 1, L, S) bias, causal", 4, 2, "heads", dict(is_causal=True), (OP_BATCH, 1, 8, 8)),
        # a per-head mask is split with the heads
        ("heads, (1, H, L, S) bias", 4, 2, "heads", {}, (1, 4, 8, 8)),
        ("batch, key padding, (1, H, L, S) bias, bottom-right", 4, 2, "batch",
         dict(causal="bottom_right", key_padding=True), (1, 4, 6, 8)),
        ("batch, sliding window", 4, 4, "batch", dict(is_causal=True, window=3), None),
        # 3 KV heads do not split evenly over 2 ranks: rank 0 would hold 6 Q heads and 2 KV
        # heads, pairing Q heads 3-5 with the wrong KV heads (group 3 instead of 4), with no
        # error anywhere, so the rule must refuse the split
        ("heads, uneven GQA 12:3", 12, 3, "heads", {}, None),
        # dropout runs replicated: its keep decisions depend on the indices of the whole tensor
        ("heads, dropout 0.3", 4, 2, "heads", dict(dropout_p=0.3), None),
    ]


def _attention_and_grads(q, k, v, bias, weight, kwargs):
    """attention() on q, k, v (DTensors or not), then the gradients of a loss on its output
    and LSE, all as whole tensors."""
    from sdpa_pass.kernels import attention

    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    if bias is not None:
        inputs.append(bias.detach().requires_grad_())
    torch.manual_seed(3)  # the dropout seed attention() draws
    out, lse = attention(*inputs[:3], attn_mask=None if bias is None else inputs[3],
                         enable_gqa=True, return_lse=True, **kwargs)
    placements = str(getattr(out, "placements", None))
    out, lse = _full(out), _full(lse)
    ((out * weight).sum() + lse.sum()).backward()
    return dict(out=out.detach(), lse=lse.detach(), placements=placements,
                grads=[_full(t.grad) for t in inputs])


def _on_device(t):
    return t.to(DEVICE, DTYPE)


def _run_op_sharding(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import implicit_replication

    from sdpa_pass.kernels import attention

    mesh = init_device_mesh(DEVICE, (WORLD,))
    results = {}
    for name, hq, hkv, split, kwargs, bias_shape in _op_sharding_cases():
        kwargs = dict(kwargs)
        generator = torch.Generator().manual_seed(2)
        L = 6 if kwargs.get("causal") == "bottom_right" else 8
        q = _on_device(torch.randn(OP_BATCH, hq, L, 16, generator=generator))
        k, v = (_on_device(torch.randn(OP_BATCH, hkv, 8, 16, generator=generator)) for _ in range(2))
        bias = None if bias_shape is None else _on_device(torch.randn(bias_shape, generator=generator))
        weight = _on_device(torch.randn(OP_BATCH, hq, L, 16, generator=generator))
        sharded_kwargs = dict(kwargs)
        if kwargs.pop("key_padding", False):
            kwargs["key_padding_mask"] = (torch.arange(8) < torch.tensor([8, 3])[:, None]).to(DEVICE)
            # replicated in; the batch rule splits it with the rows
            sharded_kwargs = dict(kwargs, key_padding_mask=distribute_tensor(
                kwargs["key_padding_mask"], mesh, [Replicate()]))

        placement = [Shard(1) if split == "heads" else Shard(0)]
        # The dropout seed attention() draws is a plain tensor, the same draw on every rank:
        # replicated.
        context = implicit_replication() if kwargs.get("dropout_p") else contextlib.nullcontext()
        with context:
            sharded = _attention_and_grads(
                *(distribute_tensor(t, mesh, placement) for t in (q, k, v)),
                None if bias is None else distribute_tensor(bias, mesh, [Replicate()]),
                weight, sharded_kwargs)
        results[name] = dict(sharded=sharded, whole=_attention_and_grads(q, k, v, bias, weight, kwargs))

    # attention() keeps the LSE for the backward even when the caller does not ask for it, so
    # autograd fills the unused LSE's gradient with zeros: a plain tensor, not a DTensor.
    q, k, v = (distribute_tensor(_on_device(torch.randn(OP_BATCH, 4, 8, 16)), mesh, [Shard(1)])
               .requires_grad_() for _ in range(3))
    try:
        attention(q, k, v).full_tensor().sum().backward()
        results["unused lse"] = None
    except RuntimeError as error:
        results["unused lse"] = str(error)
    return results


_RUNNERS = {
    "ddp": _run_ddp,
    "fsdp2": _run_fsdp2,
    "tp_local_output": lambda rank: _run_tp(rank, use_local_output=True),
    "tp_dtensor_output": lambda rank: _run_tp(rank, use_local_output=False),
    "op_sharding": _run_op_sharding,
}


def _save(result, path):
    # whole or not at all: the test side reads whatever is there when a worker is killed
    torch.save(result, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def _worker(rank, store_path, out_dir):
    # triton.jit reads TRITON_INTERPRET when sdpa_pass's kernels are decorated: before any
    # sdpa_pass import
    if ON_GPU:
        # the kernels compile for the GPU, whatever the parent's environment holds
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.setdefault("SDPA_PASS_AUTOTUNE", "0")
        # before any CUDA work, so that NCCL and every allocation use this rank's GPU
        torch.cuda.set_device(rank)
    else:
        os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(1)  # two ranks share the two cores
    importlib.import_module("sdpa_pass")  # registers the backend and the ops

    # No device_id: NCCL connects lazily on the device set above, and the gloo group below is
    # made alike on both backends (a bound device_id would be carried into new groups).
    dist.init_process_group(BACKEND, init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    # A scenario that fails on a rank is recorded, and then no rank runs the next ones: a rank
    # that failed between collectives leaves the default group's collectives out of step, so
    # the rest would hang or pair unrelated data. The ranks agree on that through their own
    # group, which the failure cannot have unsettled.
    control = dist.new_group(backend="gloo")
    first_failure = None
    for name in SCENARIOS:
        path = os.path.join(out_dir, f"{name}.rank{rank}.pt")
        if first_failure is not None:
            _save({"error": f"not run: scenario {first_failure!r} failed first"}, path)
            continue
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        try:
            result = _on_cpu(_RUNNERS[name](rank))
        except Exception:
            result = {"error": f"rank {rank}:\n{traceback.format_exc()}"}
        # saved before the ranks compare: if the other rank is stuck in a collective this one
        # left, the error is on disk for the tests to report
        _save(result, path)
        failed = torch.tensor(["error" in result], dtype=torch.int32)
        dist.all_reduce(failed, group=control)
        if failed.item():
            first_failure = name
    dist.destroy_process_group()


# ---- test side -----------------------------------------------------------------------------

def _spawn_workers(out_dir) -> str:
    """Runs the workers: "" once they all finished, else why not."""
    import torch.multiprocessing as mp

    workers = mp.spawn(_worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD,
                       join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not workers.join(timeout=1):  # raises when a worker failed
            if time.monotonic() > deadline:
                for process in workers.processes:
                    process.kill()
                return f"the {WORLD} workers did not finish in {SPAWN_TIMEOUT_S} s"
    except Exception as error:  # a worker died (a crash, NCCL's watchdog)
        return f"{type(error).__name__}: {error}"
    return ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario's per-rank records, from one spawn of WORLD processes. Under
    pytest-xdist every worker that runs a test here needs them: the workers share the
    session's temp dir, and the first one to take the lock spawns for all."""
    from filelock import FileLock  # a dependency of torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        out_dir = tmp_path_factory.getbasetemp().parent / "distributed"
    else:
        out_dir = tmp_path_factory.mktemp("distributed")
    with FileLock(f"{out_dir}.lock"):
        if not (out_dir / "done").exists():
            out_dir.mkdir(exist_ok=True)
            (out_dir / "done").write_text(_spawn_workers(out_dir))
    # A scenario whose result is missing fails its tests with the spawn's failure; those that
    # finished before it are still judged (a worker saves each result as it ends).
    missing = {"error": f"no result: {(out_dir / 'done').read_text()}"}
    paths = {name: [out_dir / f"{name}.rank{rank}.pt" for rank in range(WORLD)] for name in SCENARIOS}
    return {name: [torch.load(path, weights_only=False) if path.exists() else missing for path in rank_paths]
            for name, rank_paths in paths.items()}


def _eager(dtype):
    model = _model(dtype)
    return _on_cpu(_train(model, model, *_batch()))


@pytest.fixture(scope="module")
def eager():
    """Single-process eager on the whole batch (on GPU runs, on one GPU), trained as the ranks
    are: every step's loss and the first step's gradients; on GPU runs also the same in fp32
    ("fp32"), the reference that the bf16 runs are judged against."""
    return dict(_eager(DTYPE), fp32=_eager(torch.float32) if ON_GPU else None)


def _records(runs, name):
    records = runs[name]
    for record in records:
        if "error" in record:
            pytest.fail(f"{name}: {record['error']}", pytrace=False)
    return records


def _rel_err(actual, expected):
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _assert_close(actual, expected, tol, what):
    err = _rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _assert_like_eager(actual, eager, reference, tol, bf16_slack, what):
    """fp32 (no ``reference``): ``actual`` within ``tol`` of eager's value. bf16: ``actual`` at
    most twice as far from fp32 eager's value (``reference``) as bf16 eager's is, plus
    ``bf16_slack``."""
    if reference is None:
        _assert_close(actual, eager, tol, what)
        return
    err, eager_err = _rel_err(actual, reference), _rel_err(eager, reference)
    assert err <= 2 * eager_err + bf16_slack, (
        f"{what}: relative distance from fp32 eager {err:.2e} > 2 x bf16 eager's ({eager_err:.2e}) "
        f"+ {bf16_slack:.0e}")


def _assert_losses_match(losses, eager, what):
    """Each step's loss against eager's at the same step (one step on CPU)."""
    reference = eager["fp32"]
    for step, loss in enumerate(losses):
        _assert_like_eager(loss, eager["losses"][step],
                           None if reference is None else reference["losses"][step],
                           LOSS_REL_TOL, LOSS_BF16_SLACK, f"{what}, step {step}")


def _assert_rewritten_and_ran(record, scenario, input_type, graph_per_layer=False):
    # With a graph per layer (FSDP2 breaks the graph at its layer hooks) the layers may share
    # one compiled graph; the backward count below still says both layers ran our op.
    sites = len(record["sites"])
    assert (1 <= sites <= LAYERS) if graph_per_layer else sites == LAYERS, f"{scenario}: {record['sites']}"
    assert record["sites"] == [("rewritten", None)] * sites, f"{scenario}: {record['sites']}"
    assert record["attention_input_types"] == [input_type] * sites, scenario
    assert record["backward_calls"] == LAYERS, (
        f"{scenario}: the backward ran torch.ops.sdpa_pass.attention_backward "
        f"{record['backward_calls']} times, expected once per layer")


def _assert_grads_match(record, eager, scenario, rank):
    assert record["grads"].keys() == eager["grads"].keys()
    reference = eager["fp32"]
    for name, grad in eager["grads"].items():
        _assert_like_eager(record["grads"][name], grad,
                           None if reference is None else reference["grads"][name],
                           GRAD_REL_TOL, GRAD_BF16_SLACK, f"{scenario} rank {rank}, grad of {name}")


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_data_parallel_matches_eager_on_the_whole_batch(runs, eager, scenario):
    records = _records(runs, scenario)
    losses = torch.stack([r["losses"] for r in records])  # (rank, step)
    # the halves differ, so equal gradients below mean the ranks really averaged them
    assert (losses[0, 0] - losses[1, 0]).abs() > 1e-3 * losses[:, 0].abs().max(), losses
    _assert_losses_match(losses.mean(0), eager, f"{scenario} mean loss")
    for rank, record in enumerate(records):
        _assert_rewritten_and_ran(record, scenario, "FakeTensor", graph_per_layer=scenario == "fsdp2")
        _assert_grads_match(record, eager, scenario, rank)


@pytest.mark.parametrize("scenario,input_type", [("tp_local_output", "FakeTensor"),
                                                 ("tp_dtensor_output", "DTensor")])
def test_tensor_parallel_matches_eager(runs, eager, scenario, input_type):
    if scenario == "tp_dtensor_output" and not TP_DTENSOR_TRACEABLE:
        pytest.skip("torch < 2.13 cannot trace HF eager attention on head-sharded DTensors "
                    "(see TP_DTENSOR_TRACEABLE)")
    for rank, record in enumerate(_records(runs, scenario)):
        _assert_losses_match(record["losses"], eager, f"{scenario} rank {rank} loss")
        _assert_rewritten_and_ran(record, scenario, input_type)
        # one graph for the whole model: no graph break, ours or anyone's
        assert record["graph_breaks"] == 0 and record["graphs"] == 1, (
            f"{scenario}: {record['graph_breaks']} graph breaks, {record['graphs']} graphs")
        _assert_grads_match(record, eager, scenario, rank)


def _assert_placements(case, placements):
    if "uneven" in case:
        assert placements != "(Shard(dim=1),)", placements
    elif "dropout" in case:
        assert placements == "(Replicate(),)", placements
    else:
        assert placements == ("(Shard(dim=1),)" if case.startswith("heads") else "(Shard(dim=0),)"), placements


@pytest.mark.parametrize("case", [c[0] for c in _op_sharding_cases()])
def test_sharding_rules_split_the_op_like_the_whole_tensors(runs, case):
    for rank, record in enumerate(_records(runs, "op_sharding")):
        sharded, whole = record[case]["sharded"], record[case]["whole"]
        _assert_close(sharded["out"], whole["out"], OP_REL_TOL, f"rank {rank} out")
        _assert_close(sharded["lse"], whole["lse"], OP_REL_TOL, f"rank {rank} lse")
        for what, grad, grad_whole in zip(("q", "k", "v", "mask"), sharded["grads"], whole["grads"]):
            _assert_close(grad, grad_whole, OP_REL_TOL, f"rank {rank} grad of {what}")
        _assert_placements(case, sharded["placements"])


def test_dtensor_call_with_unused_lse(runs):
    """Regression: an LSE nobody differentiates reached attention_backward as autograd's plain
    zeros beside DTensor arguments ("mixed torch.Tensor and DTensor"); the op's autograd now
    leaves such gradients None."""
    for record in _records(runs, "op_sharding"):
        assert record["unused lse"] is None, record["unused lse"]
