"""Step 5: replace each proven site with one ``torch.ops.sdpa_pass.attention_forward`` call,
and the driver that runs steps 1-6 over a GraphModule.

New nodes are aten ops, which are valid both in Dynamo's torch-level graphs and in exported
aten graphs. Masks keep their own (broadcast) shapes: a (B, 1, 1, S) padding mask stays that
size and reaches the kernel through stride-0 views.
"""

from __future__ import annotations

import logging
import operator
import time

import torch
import torch.fx as fx

import sdpa_pass.kernels  # noqa: F401  (registers torch.ops.sdpa_pass, used below)
from sdpa_pass.kernels.checks import CAUSAL_NONE

from .analyse import Plan, analyse
from .canonicalize import removable_if_unused, tensor_of
from .match import NotASite, candidate_nodes, find_softmaxes, match_softmax
from .report import GraphRecord, Report, Site, shape_text, source_of
from .verify import needs_grad, verify

log = logging.getLogger("sdpa_pass")
aten = torch.ops.aten
ATTENTION_OP = torch.ops.sdpa_pass.attention_forward.default
FP32_MIN = torch.finfo(torch.float32).min


def _call(graph: fx.Graph, target, *args, **kwargs) -> fx.Node:
    return graph.call_function(target, args, kwargs)


def _size(graph, node: fx.Node, dim: int):
    """A size usable as a graph argument: an int, or a sym_size node when it is symbolic."""
    s = tensor_of(node).shape[dim]
    return s if isinstance(s, int) else _call(graph, aten.sym_size.int, node, dim)


def _build_operand(graph, op) -> fx.Node:
    if op.repeat_source is not None:
        return op.repeat_source
    x = op.node
    if op.perm != list(range(len(op.perm))):
        x = _call(graph, aten.permute.default, x, op.perm)
    if op.reshape is not None:
        return _call(graph, aten.reshape.default, x, list(op.reshape))
    for pos in op.unsqueeze:
        x = _call(graph, aten.unsqueeze.default, x, pos)
    return x


def _to_output_shape(graph, out: fx.Node, plan: Plan) -> fx.Node:
    """From the kernel's (B, H, L, Dv) to the shape of the value product it replaces."""
    if plan.out_perm is not None:
        out = _call(graph, aten.permute.default, out, plan.out_perm)
        return _call(graph, aten.clone.default, out, memory_format=torch.contiguous_format)
    want = plan.out_shape
    if len(want) < 4 and tuple(plan.q.shape[4 - len(want):]) == tuple(want):
        for _ in range(4 - len(want)):
            out = _call(graph, aten.squeeze.dim, out, 0)
        return out
    if tuple(want) != tuple(plan.q.shape[:3]) + (plan.v.shape[3],):
        out = _call(graph, aten.reshape.default, out, list(want))
    return out


def _broadcast_batch(graph, x: fx.Node, own_batch, batch, batch_src: fx.Node) -> fx.Node:
    if own_batch == 1 and batch != 1:
        return _call(graph, aten.expand.default, x, [_size(graph, batch_src, 0), -1, -1, -1])
    return x


def _build_mask(graph, plan: Plan):
    """One bool or float mask tensor equivalent to the score chain's masks (those lifting
    left as tensors), or None."""
    masks = plan.kernel_masks
    if not masks:
        return None, "none"
    text = "+".join(shape_text(tensor_of(m.node)) for m in masks)
    nodes = []
    for m in masks:
        node = m.node
        if m.expand is not None:
            node = _call(graph, aten.expand.default, node, list(m.expand))
        if m.reshape is not None:
            node = _call(graph, aten.reshape.default, node, list(m.reshape))
        nodes.append(node)
    if all(m.kind in ("bool_masked", "bool_attend") for m in masks):
        attend = None
        for m, node in zip(masks, nodes):
            a = node if m.kind == "bool_attend" else _call(graph, aten.logical_not.default, node)
            attend = a if attend is None else _call(graph, aten.logical_and.default, attend, a)
        return attend, "bool " + text
    # Replay the masks in graph order on a float bias, as eager applies them to the scores.
    # Finite fills become values near finfo(float32).min: the kernel adds the bias in fp32,
    # where any score plus such a value rounds back to it, so a row filled everywhere averages
    # uniformly, as in eager; -inf fills stay -inf. Different fills keep their order (a row
    # masked everywhere by -1e9 here and finfo.min there averages the -1e9 keys only), each
    # 4x apart, so exp() of their difference is 0 as it is in eager.
    finite = sorted({m.fill for m in masks if m.kind.startswith("fill")})
    replace = {f: FP32_MIN / 4.0 ** rank for rank, f in enumerate(finite)}
    bias = None
    for m, node in zip(masks, nodes):
        if m.kind == "additive":
            bias = node if bias is None else _call(graph, aten.add.Tensor, bias, node)
            continue
        fill = float("-inf") if m.kind.startswith("bool") else replace[m.fill]
        masked_when_true = m.kind in ("bool_masked", "fill_min")
        if bias is None:
            bias = (_call(graph, aten.where.Scalar, node, fill, 0.0) if masked_when_true
                    else _call(graph, aten.where.Scalar, node, 0.0, fill))
        elif masked_when_true:
            bias = _call(graph, aten.where.ScalarSelf, node, fill, bias)
        else:
            bias = _call(graph, aten.where.ScalarOther, node, bias, fill)
    return bias, "float " + text


def apply_plan(gm: fx.GraphModule, plan: Plan) -> str:
    graph = gm.graph
    cand = plan.cand
    with graph.inserting_before(cand.pv):
        q = _build_operand(graph, plan.q)
        for op, t in plan.q_scale_nodes:
            # operator.mul/truediv: t may be a tensor or a symbolic float (dynamic shapes)
            q = _call(graph, operator.mul if op == "mul" else operator.truediv, q, t)
        B = plan.q.shape[0]
        q_src = q
        k = _build_operand(graph, plan.k)
        v = _build_operand(graph, plan.v)
        if plan.k.repeat_source is None:
            hk, hv = plan.k.shape[1], plan.v.shape[1]
            if hk != hv:  # one of them broadcasts its single head
                if hk == 1:
                    k = _call(graph, aten.expand.default, k, [-1, hv, -1, -1])
                else:
                    v = _call(graph, aten.expand.default, v, [-1, hk, -1, -1])
        k = _broadcast_batch(graph, k, plan.k.shape[0], B, q_src)
        v = _broadcast_batch(graph, v, plan.v.shape[0], B, q_src)
        mask, mask_text = _build_mask(graph, plan)
        dropout = ()
        if plan.dropout_p > 0.0:
            # In-kernel dropout: the key is drawn in the graph from torch's generator, as
            # kernels.dropout.draw_seed draws it, so torch.manual_seed reproduces a run;
            # AOTAutograd saves it for the backward, which regenerates the same mask.
            seed = _call(graph, aten.randint.low, 0, 1 << 32, [2], dtype=torch.int64,
                         device=tensor_of(plan.q.node).device)
            dropout = (plan.dropout_p, seed)
        lift = plan.lift
        causal = (lift.causal_align, lift.diagonal, lift.window) if lift else (0, 0, -1)
        extra = {}
        # finite fills (masked_fill / where with finfo.min) replace scores: see mask_fills
        if (lift.fills if lift else any(m.kind.startswith("fill") for m in plan.masks)):
            extra["mask_fills"] = True
        if lift and lift.uniform_on_empty:
            extra["uniform_on_empty"] = True   # rows the predicates empty were uniform in eager
        # The backward reads the forward's log-sum-exp; ask for it only where a gradient can
        # flow (the example values say so), and always with uniform rows, whose gradients
        # need it whatever the chunked path could recompute.
        return_lse = needs_grad(plan) or bool(extra.get("uniform_on_empty"))
        call = _call(graph, ATTENTION_OP, q, k, v, mask, None, plan.scale, *causal,
                     plan.softcap, True, return_lse, *dropout, **extra)
        out = _to_output_shape(graph, _call(graph, operator.getitem, call, 0), plan)
    out.meta.update({k_: v_ for k_, v_ in cand.pv.meta.items() if k_ in ("example_value", "val", "stack_trace")})
    cand.pv.replace_all_uses_with(out)
    for node in reversed(candidate_nodes(cand)):
        if not node.users:
            graph.erase_node(node)
    return mask_text


def _mask_form(plan: Plan, mask_text: str) -> str:
    lifted = plan.lift is not None and plan.lift.causal_align != CAUSAL_NONE
    if mask_text == "none":
        return "predicate" if lifted else "none"
    return "predicate+tensor" if lifted else "tensor"


def rewrite(gm: fx.GraphModule, example_inputs=None) -> Report:
    """Run the pass on ``gm`` in place; returns the Report of every candidate site.

    Graphs from Dynamo and ``torch.export`` carry the shapes the pass proves things from.
    For others (``torch.fx.symbolic_trace``) pass ``example_inputs``: their shapes are
    propagated with fake tensors first, and the proof holds for those shapes.
    """
    start = time.perf_counter()
    if example_inputs is not None:
        _propagate_shapes(gm, example_inputs)
    before = gm.print_readable(print_output=False)
    fold_metadata_reads(gm)
    # Dynamo keeps nodes nobody uses (e.g. a detached copy of the scores); they are not users.
    eliminate_dead_code(gm)
    sites = []
    # each softmax belongs to one site, and a rewrite erases only its own site's nodes
    for softmax in find_softmaxes(gm):
        source = source_of(softmax)
        found = match_softmax(softmax, gm)
        if found is None:
            continue
        if isinstance(found, NotASite):
            sites.append(Site("skipped", source, found.args[0], found.args[1]))
            continue
        try:
            plan = analyse(found, gm)
            verify(plan)
        except NotASite as skip:
            sites.append(Site("skipped", source, skip.args[0], skip.args[1]))
            continue
        try:
            mask_text = apply_plan(gm, plan)
        except Exception as exc:  # noqa: BLE001
            # apply_plan replaces uses only as its last step: before that, what it inserted is
            # dead and removed below, and the site stays as the user wrote it.
            log.warning("sdpa_pass: could not rewrite %s: %r", source, exc)
            sites.append(Site("skipped", source, "internal_error", f"{type(exc).__name__}: {exc}"))
            continue
        sites.append(Site("rewritten", source, mask=mask_text, gqa_group=plan.group,
                          dtype=str(plan.dtype).replace("torch.", ""), scale=plan.scale,
                          softcap=plan.softcap or None, dropout=plan.dropout_p,
                          causal=plan.lift.text if plan.lift else "none",
                          mask_note=plan.lift_note, mask_form=_mask_form(plan, mask_text)))
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    if any(s.rewritten for s in sites):
        _refresh_values(gm)
    after = gm.print_readable(print_output=False)
    report = Report(sites, [GraphRecord(before, after)], time.perf_counter() - start)
    for s in sites:
        if s.rewritten:
            log.info("rewrote attention at %s (mask %s, GQA %d:1)", s.source, s.mask, s.gqa_group)
        else:
            log.info("left attention at %s: [%s] %s", s.source, s.reason_code, s.reason)
    _trace_artifacts(before, after)
    return report


def _propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                                         for x in example_inputs])


def _refresh_values(gm: fx.GraphModule) -> None:
    """Give the nodes the rewrite inserted their ``meta["val"]`` where the graph carries fake
    values (``torch.export`` programs, whose verifier and ``save`` require one on every node),
    by propagating the placeholders' fake values through the rewritten graph."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(vals)
    if mode is None or any(v is None for v in vals):
        return
    with mode:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)


def fold_metadata_reads(gm: fx.GraphModule) -> None:
    """Replace ``x.dtype`` / ``x.device`` reads by their values. Dynamo's graphs have them as
    constants already; ``torch.fx.symbolic_trace`` keeps them as ``getattr`` nodes, which would
    count as users of the scores (``.to(scores.dtype)``) and keep a site from being proved.
    A traced graph is specialised to its inputs' dtypes and devices, so the values are fixed."""
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is getattr and len(node.args) == 2
                and node.args[1] in ("dtype", "device")):
            continue
        t = tensor_of(node.args[0])
        if t is None:
            continue
        value = getattr(t, node.args[1])
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
        gm.graph.erase_node(node)


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Drop unused pure nodes. Not ``Graph.eliminate_dead_code``: it treats in-place methods
    on Dynamo graphs (``bias.masked_fill_(...)``, whose result nobody reads) as dead and
    removes the mutation, changing what the graph computes."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if removable_if_unused(node, gm):
                gm.graph.erase_node(node)
                changed = True


def _trace_artifacts(before: str, after: str) -> None:
    # tlparse shows these as artifacts of the compile they belong to.
    try:
        from torch._logging import trace_structured
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    for name, text in (("sdpa_pass_before", before), ("sdpa_pass_after", after)):
        trace_structured("artifact", metadata_fn=lambda name=name: {"name": name, "encoding": "string"},
                         payload_fn=lambda text=text: text)
