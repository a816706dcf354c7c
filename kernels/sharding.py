"""DTensor sharding rules for the ``torch.ops.sdpa_pass`` operators.

A rewritten graph whose q, k and v are DTensors (tensor parallelism that keeps the projections'
outputs as DTensors, ``ColwiseParallel(use_local_output=False)``, or any DTensor model) sends
our ops through DTensor's dispatcher, which needs to know how they shard; without these rules
AOTAutograd stops with "Operator sdpa_pass.attention_forward.default does not have a sharding
strategy registered". With them the ops run on each rank's local shards, no communication.

Why the rules are valid: attention is independent across batch rows and across query heads.
Output row (b, h, i) reads q[b, h, i], k and v of batch b and KV head h // group, the masks at
(b, h, i, :) and nothing else. So
  - split over batch (dim 0): every rank computes its own batch rows from its own rows of q, k,
    v, out, LSE, grads and key padding; a mask with a batch dim of size B is split alike, one
    broadcast over batch (size 1, or no such dim) is needed whole on every rank;
  - split over heads (dim 1): Q heads and KV heads split together, so rank r holds Q heads
    [r·Hq/n, (r+1)·Hq/n) and KV heads [r·Hkv/n, (r+1)·Hkv/n), which are exactly the KV heads
    those Q heads read (Hq/n = group·Hkv/n) as long as n divides Hkv. Uneven shards would pair
    Q heads with another group's KV head, often with no error (12:3 heads over 2 ranks gives
    6:2 and 6:1), so the split is refused unless n divides Hkv. Masks are split when they have
    a head dim of size Hq, else replicated; key padding is per batch row, so replicated.
The gradient of a floating-point mask is, on each rank, dS summed over the rows that rank holds;
where the mask is broadcast over the split dim the full gradient is the sum over ranks, so it
comes out ``Partial("sum")``; where the mask is split, each rank's part is complete.

Not offered: splitting the query/key sequence (context parallelism needs the ranks to exchange
K/V blocks and merge partial softmaxes by their LSE; a causal or window predicate also reads
global positions that a local shard does not know) and splitting the head dim (every score
sums over all of it). Dropout (p > 0) only runs replicated: the kernels draw each keep decision
from (seed, b·Hq + h, i, j) with *local* indices and the seed is the same on every rank, so
shards would repeat one another's keep pattern and differ from the unsharded run.

Written against DTensor's op-strategy registry (the machinery under the public
``register_sharding``) because the heads rule needs a check per combination of mesh dims (n,
the product of the mesh dims that split heads, divides Hkv) that ``register_sharding`` cannot
state. Registered on import when torch.distributed is available; a no-op otherwise.
"""

from __future__ import annotations

import math

import torch

from . import ops  # noqa: F401  (registers the ops described here)

BATCH, HEADS = 0, 1
# Tensors laid out (B, H, L, ...): split exactly as q is.
_ROW_TENSORS = ("q", "k", "v", "grad_out", "out", "lse", "grad_lse")


def _input_placement(name: str, shape, split: int):
    if name in _ROW_TENSORS:
        # an empty LSE (forward run without return_lse) is the same (0,) tensor everywhere
        return Shard(split) if len(shape) >= 3 else Replicate()
    if name == "attn_mask":
        # broadcast to (B, H, L, S): split where it has the split dim at full size
        dim = split - (4 - len(shape))
        return Replicate() if dim < 0 or shape[dim] == 1 else Shard(dim)
    if name == "key_padding_mask":
        return Shard(0) if split == BATCH else Replicate()
    if name == "dropout_seed":
        return Replicate()
    raise AssertionError(f"no sharding rule for the tensor argument {name!r}")


def _forward_outputs(bound, split: int):
    """(out, lse) of attention_forward."""
    return [Shard(split), Shard(split) if bound["return_lse"] else Replicate()]


def _backward_outputs(bound, split: int):
    """(dq, dk, dv, dmask) of attention_backward."""
    grads = [Shard(split)] * 3
    if not bound["need_mask_grad"]:
        return grads + [Replicate()]  # dmask is an empty (0,) tensor
    mask = _input_placement("attn_mask", bound["attn_mask"].shape, split)
    return grads + [Partial() if isinstance(mask, Replicate) else mask]


def _strategy(outputs, n_outputs: int):
    def strategy(op_schema):
        arguments = op_schema.op._schema.arguments
        bound = {a.name: a.default_value for a in arguments if a.has_default_value()}
        bound.update({a.name: v for a, v in zip(arguments, op_schema.args_schema)})
        bound.update(op_schema.kwargs_schema)
        # the DTensor arguments in the order DTensor lists their strategies: positional ones,
        # then keyword ones as passed
        names = [a.name for a, v in zip(arguments, op_schema.args_schema) if isinstance(v, OpStrategy)]
        names += [n for n, v in op_schema.kwargs_schema.items() if isinstance(v, OpStrategy)]

        single_mesh_dim = [[Replicate()] * (n_outputs + len(names))]
        if bound["dropout_p"] == 0.0:
            for split in (BATCH, HEADS):
                single_mesh_dim.append(outputs(bound, split) + [
                    _input_placement(n, bound[n].shape, split) for n in names])

        def kv_heads_split_evenly(input_specs, output_specs) -> bool:
            if "k" not in names:
                return True
            k_spec = input_specs[names.index("k")]
            head_shards = math.prod(
                k_spec.mesh.size(i) for i, p in enumerate(k_spec.placements)
                if isinstance(p, Shard) and p.dim == HEADS)
            return bound["k"].shape[HEADS] % head_shards == 0

        return expand_to_full_mesh_op_strategy(
            op_schema.get_mesh_from_args(), op_schema, single_mesh_dim, input_index=n_outputs,
            is_valid_strategy_cb=kv_heads_split_evenly)

    return strategy


def _is_tensor_type(t) -> bool:
    if isinstance(t, torch.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch.TensorType)


def _register() -> None:
    for op, outputs, n_outputs in (
        (torch.ops.sdpa_pass.attention_forward.default, _forward_outputs, 2),
        (torch.ops.sdpa_pass.attention_backward.default, _backward_outputs, 4),
    ):
        arguments = op._schema.arguments
        scalars = [i for i, a in enumerate(arguments) if not _is_tensor_type(a.type)]
        # Every non-tensor argument (return_lse, need_mask_grad, dropout_p, ...) can change the
        # strategy, so all of them go into the key DTensor caches sharding decisions under.
        info = RuntimeSchemaInfo(static_argnum=scalars[0],
                                 static_kwargkey=[arguments[i].name for i in scalars])
        DTensor._op_dispatcher.sharding_propagator.register_op_strategy(
            op, _strategy(outputs, n_outputs), info)


if torch.distributed.is_available():
    # Private DTensor modules: if a torch release moves them, the ops still work on plain
    # tensors everywhere; only DTensor inputs lose their rules (logged once, here).
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
        from torch.distributed.tensor._op_schema import OpStrategy, RuntimeSchemaInfo
        from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy

        _register()
    except (ImportError, AttributeError, TypeError) as exc:  # pragma: no cover - torch version
        import logging

        logging.getLogger("sdpa_pass").warning(
            "sdpa_pass: DTensor sharding rules not registered (%s: %s)", type(exc).__name__, exc)
