"""Distributed training through rewritten attention: DDP, FSDP2 and tensor parallelism.

Two CPU processes on gloo, spawned once for the module (the imports and the first compile are
most of the time), train a tiny random HF Llama with GQA (``attn_implementation="eager"``,
every dropout 0, fp32) compiled as ``torch.compile(model, backend="sdpa_pass",
options={"backend": "aot_eager"})``. Each test compares what the ranks got with
single-process eager on the whole batch, computed here from the same seed:
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

The workers set TRITON_INTERPRET=1 before importing sdpa_pass (the kernels run in Triton's
interpreter, as in every CPU test), so this module imports sdpa_pass only inside functions.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build",
                allow_module_level=True)

WORLD = 2
LAYERS = 2
BATCH = 4            # the whole batch; DDP and FSDP2 give each rank BATCH // WORLD rows
OP_BATCH = 2         # the op on its own: the interpreter's time grows with batch x heads
# fp32 on both sides: the losses agree to accumulation-order noise, and so do the gradients
# (DDP/FSDP2 average two half-batch gradients where eager sums one batch)
LOSS_REL_TOL = 1e-5
GRAD_REL_TOL = 1e-5
# the op on shards against the same op on whole tensors: the same rows through the same kernel
OP_REL_TOL = 1e-6
COMPILED_SCENARIOS = ("ddp", "fsdp2", "tp_local_output", "tp_dtensor_output")
SCENARIOS = COMPILED_SCENARIOS + ("op_sharding",)
# the spawn takes about 60 s on 2 cores; a hung collective or process exit fails the tests
# instead of hanging CI
SPAWN_TIMEOUT_S = 300


# ---- what both sides build: model, batch, loss ---------------------------------------------

def _model():
    from test_hf_models import tiny_llama_gqa

    torch.manual_seed(0)
    model = tiny_llama_gqa()
    assert model.config.attention_dropout == 0.0
    return model.train()


def _batch():
    from test_hf_models import SEQ, VOCAB

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    # right padding in one row of each rank's half, so no query row is masked everywhere
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, SEQ - 3:] = 0
    attention_mask[3, SEQ - 4:] = 0
    return input_ids, attention_mask


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


def _compile(model, record):
    """The pass in front of aot_eager, noting the Reports and the type of the tensors each
    rewritten attention call receives (DTensor or a plain tensor)."""
    from torch._dynamo import lookup_backend

    def aot_eager_noting_inputs(gm, example_inputs):
        for node in gm.graph.find_nodes(op="call_function",
                                        target=torch.ops.sdpa_pass.attention_forward.default):
            record["attention_input_types"].append(type(node.args[0].meta["example_value"]).__name__)
        return lookup_backend("aot_eager")(gm, example_inputs)

    record.update(sites=[], graphs=0, attention_input_types=[])

    def on_report(report):
        record["sites"] += [(site.status, site.reason) for site in report.sites]
        record["graphs"] += len(report.graphs)

    return torch.compile(model, backend="sdpa_pass",
                         options={"backend": aot_eager_noting_inputs, "on_report": on_report})


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _train_step(model, compiled, input_ids, attention_mask, record, context=contextlib.nullcontext):
    with context():
        loss = _loss(compiled, input_ids, attention_mask)
        counter = _CountSdpaOps()
        with counter:
            loss.backward()
    record["loss"] = loss.detach()
    record["backward_calls"] = counter.calls.get("attention_backward", 0)
    record["grads"] = {name: _full(p.grad).detach().clone() for name, p in model.named_parameters()}
    return record


def _run_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    record = {}
    compiled = _compile(DistributedDataParallel(model), record)
    input_ids, attention_mask = _batch()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return _train_step(model, compiled, input_ids[rows], attention_mask[rows], record)


def _run_fsdp2(rank):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    record = {}
    compiled = _compile(model, record)
    input_ids, attention_mask = _batch()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return _train_step(model, compiled, input_ids[rows], attention_mask[rows], record)


def _run_tp(rank, use_local_output):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
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
    record = {}
    compiled = _compile(model, record)
    input_ids, attention_mask = _batch()  # the whole batch on every rank
    # With DTensor projections, RoPE's cos/sin and the padding mask stay plain tensors, which
    # DTensor accepts only as implicitly replicated.
    context = contextlib.nullcontext if use_local_output else implicit_replication
    record = _train_step(model, compiled, input_ids, attention_mask, record, context)
    record["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    return record


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


def _run_op_sharding(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import implicit_replication

    from sdpa_pass.kernels import attention

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name, hq, hkv, split, kwargs, bias_shape in _op_sharding_cases():
        kwargs = dict(kwargs)
        generator = torch.Generator().manual_seed(2)
        L = 6 if kwargs.get("causal") == "bottom_right" else 8
        q = torch.randn(OP_BATCH, hq, L, 16, generator=generator)
        k, v = (torch.randn(OP_BATCH, hkv, 8, 16, generator=generator) for _ in range(2))
        bias = None if bias_shape is None else torch.randn(bias_shape, generator=generator)
        weight = torch.randn(OP_BATCH, hq, L, 16, generator=generator)
        sharded_kwargs = dict(kwargs)
        if kwargs.pop("key_padding", False):
            kwargs["key_padding_mask"] = torch.arange(8) < torch.tensor([8, 3])[:, None]
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
    q, k, v = (distribute_tensor(torch.randn(OP_BATCH, 4, 8, 16), mesh, [Shard(1)]).requires_grad_()
               for _ in range(3))
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


def _worker(rank, store_path, out_dir):
    # triton.jit reads this when sdpa_pass's kernels are decorated: before any sdpa_pass import
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)  # two ranks share the two cores
    import sdpa_pass  # noqa: F401  (registers the backend and the ops)

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=90))
    # A scenario that fails on a rank is recorded, and then no rank runs the next ones: a rank
    # that failed between collectives leaves the default group's collectives out of step, so
    # the rest would hang or pair unrelated data. The ranks agree on that through their own
    # group, which the failure cannot have unsettled.
    control = dist.new_group(backend="gloo")
    first_failure = None
    for name in SCENARIOS:
        if first_failure is not None:
            result = {"error": f"not run: scenario {first_failure!r} failed first"}
        else:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            try:
                result = _RUNNERS[name](rank)
            except Exception:
                result = {"error": f"rank {rank}:\n{traceback.format_exc()}"}
            failed = torch.tensor(["error" in result], dtype=torch.int32)
            dist.all_reduce(failed, group=control)
            if failed.item():
                first_failure = name
        torch.save(result, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    dist.destroy_process_group()


# ---- test side -----------------------------------------------------------------------------

def _spawn_workers(out_dir):
    import torch.multiprocessing as mp

    workers = mp.spawn(_worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD,
                       join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not workers.join(timeout=1):  # raises when a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the {WORLD} workers did not finish in {SPAWN_TIMEOUT_S} s", pytrace=False)


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
            _spawn_workers(out_dir)
            (out_dir / "done").touch()
    return {name: [torch.load(out_dir / f"{name}.rank{rank}.pt", weights_only=False)
                   for rank in range(WORLD)] for name in SCENARIOS}


@pytest.fixture(scope="module")
def eager():
    """Single-process eager on the whole batch: its loss and every parameter's gradient."""
    model = _model()
    loss = _loss(model, *_batch())
    loss.backward()
    return dict(loss=loss.detach(), grads={n: p.grad.detach().clone() for n, p in model.named_parameters()})


def _records(runs, name):
    records = runs[name]
    for record in records:
        if "error" in record:
            pytest.fail(f"{name}: {record['error']}", pytrace=False)
    return records


def _assert_close(actual, expected, tol, what):
    err = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


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
    for name, grad in eager["grads"].items():
        _assert_close(record["grads"][name], grad, GRAD_REL_TOL, f"{scenario} rank {rank}, grad of {name}")


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_data_parallel_matches_eager_on_the_whole_batch(runs, eager, scenario):
    records = _records(runs, scenario)
    losses = torch.stack([r["loss"] for r in records])
    # the halves differ, so equal gradients below mean the ranks really averaged them
    assert (losses[0] - losses[1]).abs() > 1e-3 * losses.abs().max(), losses
    _assert_close(losses.mean(), eager["loss"], LOSS_REL_TOL, f"{scenario} mean loss")
    for rank, record in enumerate(records):
        _assert_rewritten_and_ran(record, scenario, "FakeTensor", graph_per_layer=scenario == "fsdp2")
        _assert_grads_match(record, eager, scenario, rank)


@pytest.mark.parametrize("scenario,input_type", [("tp_local_output", "FakeTensor"),
                                                 ("tp_dtensor_output", "DTensor")])
def test_tensor_parallel_matches_eager(runs, eager, scenario, input_type):
    for rank, record in enumerate(_records(runs, scenario)):
        _assert_close(record["loss"], eager["loss"], LOSS_REL_TOL, f"{scenario} rank {rank} loss")
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
