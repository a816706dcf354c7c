"""Step 5: replace each proven site with one ``torch.ops.sdpa_pass.attention_forward`` call
(or, as ``implementations.py`` chooses, an exact ``aten.scaled_dot_product_attention`` call or
the float64 math reference), and the driver that runs steps 1-6 over a GraphModule.

New nodes are aten ops, which are valid both in Dynamo's torch-level graphs and in exported
aten graphs. Masks keep their own (broadcast) shapes: a (B, 1, 1, S) padding mask stays that
size and reaches the kernel through stride-0 views.
"""

from __future__ import annotations

import logging
import operator
import time
from typing import Optional

import torch
import torch.fx as fx

# importing sdpa_pass.kernels registers torch.ops.sdpa_pass, used below
from sdpa_pass.kernels.checks import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
from sdpa_pass.kernels.reference import attention_math

from .analyse import Plan, analyse
from .canonicalize import removable_if_unused, tensor_of
from .implementations import (Choices, Implementation, causal_of, choose, current_implementations,
                              resolve, rows_may_be_empty_for, sdpa_is_causal, uniform_rows)
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


def _build_mask(graph, plan: Plan, for_sdpa: bool = False):
    """One bool or float mask tensor equivalent to the score chain's masks (those lifting
    left as tensors), or None. ``for_sdpa``: a float mask in the query's dtype, as SDPA takes
    it."""
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
    # 4x apart, so exp() of their difference is 0 as it is in eager. Beside an additive mask
    # the fills are all <= FILL_THRESHOLD (verify.finite_fills_beside_additive_masks) and stay
    # themselves, so the bias ranks them as eager does.
    finite = sorted({m.fill for m in masks if m.kind.startswith("fill")})
    if any(m.kind == "additive" for m in masks):
        replace = {f: f for f in finite}
    else:
        replace = {f: FP32_MIN / 4.0 ** rank for rank, f in enumerate(finite)}
    bias = None
    upcast = False
    for m, node in zip(masks, nodes):
        if m.kind == "additive":
            if finite and tensor_of(m.node).dtype == torch.float16:
                # those values overflow float16 (CUDA's where raises, CPU's makes -inf); the
                # kernel adds the bias in float32 whatever its dtype
                node, upcast = _call(graph, aten._to_copy.default, node, dtype=torch.float32), True
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
    if upcast and for_sdpa:
        bias = _call(graph, aten._to_copy.default, bias, dtype=plan.dtype)
    return bias, "float " + text


def _dim(graph, node: fx.Node, size, dim: int):
    """``size`` (the operand's length along ``dim``) usable as a graph argument."""
    return size if isinstance(size, int) else _call(graph, aten.sym_size.int, node, dim)


def _positional_mask(graph, plan: Plan, q: fx.Node, k: fx.Node) -> fx.Node:
    """The lifted causal / window predicate as an (L, S) bool tensor, True = attend."""
    causal_align, diagonal, window = causal_of(plan)
    device = tensor_of(plan.q.node).device
    rows = _call(graph, aten.arange.default, _dim(graph, q, plan.q.shape[2], 2),
                 dtype=torch.int64, device=device)
    cols = _call(graph, aten.arange.default, _dim(graph, k, plan.k.shape[2], 2),
                 dtype=torch.int64, device=device)
    if causal_align == CAUSAL_BOTTOM_RIGHT:
        # counted from the last position: (L-1-i) - (S-1-j) = j - i - (S - L), with no
        # arithmetic on (possibly symbolic) sizes
        rows = _call(graph, aten.flip.default, rows, [0])
        cols = _call(graph, aten.flip.default, cols, [0])
        rel = _call(graph, aten.sub.Tensor, _call(graph, aten.unsqueeze.default, rows, 1),
                    _call(graph, aten.unsqueeze.default, cols, 0))
    else:
        rel = _call(graph, aten.sub.Tensor, _call(graph, aten.unsqueeze.default, cols, 0),
                    _call(graph, aten.unsqueeze.default, rows, 1))
    visible = _call(graph, aten.le.Scalar, rel, diagonal)   # j <= i + offset
    if window != -1:
        visible = _call(graph, aten.logical_and.default, visible,
                        _call(graph, aten.gt.Scalar, rel, diagonal - window))
    return visible


def _emit_sdpa(graph, plan: Plan, q, k, v, mask) -> fx.Node:
    """``aten.scaled_dot_product_attention`` computing exactly the site (``can_serve`` said
    it can): the predicate as is_causal or a materialised (L, S) mask. SDPA's backends give
    zeros (or NaN) on rows with no visible key; those rows are set to what eager gives: NaN
    (softmax over -inf), or the mean of V when the masks were finite fills (a uniform row)."""
    is_bool = all(m.kind in ("bool_masked", "bool_attend") for m in plan.kernel_masks)
    is_causal = sdpa_is_causal(plan)
    if causal_of(plan)[0] != CAUSAL_NONE and not is_causal:
        visible = _positional_mask(graph, plan, q, k)
        if mask is None:
            mask, is_bool = visible, True
        elif is_bool:
            mask = _call(graph, aten.logical_and.default, mask, visible)
        else:
            mask = _call(graph, aten.where.ScalarOther, visible, mask, float("-inf"))
    # a Python bool: with symbolic head counts this guards on the group size being 1 or not
    gqa = bool(plan.group != 1)
    out = _call(graph, aten.scaled_dot_product_attention.default, q, k, v, mask, 0.0, is_causal,
                scale=plan.scale, enable_gqa=gqa)
    if mask is not None and rows_may_be_empty_for(plan):
        if is_bool:
            empty = _call(graph, aten.logical_not.default, _call(graph, aten.any.dim, mask, -1, True))
        else:
            empty = _call(graph, aten.all.dim,
                          _call(graph, aten.eq.Scalar, mask, float("-inf")), -1, True)
        if uniform_rows(plan):
            v_mean = _call(graph, aten.mean.dim, v, [-2], True)     # (B, Hkv, 1, Dv)
            if gqa:
                group = plan.group
                if not isinstance(group, int):
                    group = _call(graph, operator.floordiv, _call(graph, aten.sym_size.int, q, 1),
                                  _call(graph, aten.sym_size.int, v, 1))
                v_mean = _call(graph, aten.repeat_interleave.self_int, v_mean, group, 1)
            out = _call(graph, aten.where.self, empty, v_mean, out)
        else:
            out = _call(graph, aten.where.ScalarSelf, empty, float("nan"), out)
    return out


def apply_plan(gm: fx.GraphModule, plan: Plan,
               implementation: Implementation = Implementation.TRITON) -> str:
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
        mask, mask_text = _build_mask(graph, plan, for_sdpa=implementation is Implementation.SDPA)
        dropout = ()
        if plan.dropout_p > 0.0:
            # In-kernel dropout: the key is drawn in the graph from torch's generator, as
            # kernels.dropout.draw_seed draws it, so torch.manual_seed reproduces a run;
            # AOTAutograd saves it for the backward, which regenerates the same mask.
            seed = _call(graph, aten.randint.low, 0, 1 << 32, [2], dtype=torch.int64,
                         device=tensor_of(plan.q.node).device)
            dropout = (plan.dropout_arg, seed)
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
        if implementation is Implementation.SDPA:
            out = _emit_sdpa(graph, plan, q, k, v, mask)
        else:
            if implementation is Implementation.MATH:
                # its gradients come from autograd, which needs no LSE
                target, return_lse = attention_math, False
            else:
                target = ATTENTION_OP
            call = _call(graph, target, q, k, v, mask, None, plan.scale, *causal,
                         plan.softcap, True, return_lse, *dropout, **extra)
            out = _call(graph, operator.getitem, call, 0)
        out = _to_output_shape(graph, out, plan)
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


def rewrite(gm: fx.GraphModule, example_inputs=None,
            implementation: Optional[Choices] = None) -> Report:
    """Run the pass on ``gm`` in place; returns the Report of every candidate site.

    Graphs from Dynamo and ``torch.export`` carry the shapes the pass proves things from.
    For others (``torch.fx.symbolic_trace``) pass ``example_inputs``: their shapes are
    propagated with fake tensors first, and the proof holds for those shapes.
    ``implementation``: what rewritten sites run (``implementations.py``); default the
    choice of the enclosing ``sdpa_pass.implementation(...)`` block, else our Triton op.
    The math reference is a Python function in the graph: fine for torch.compile, not for a
    graph that must stay a ``torch.export`` program.
    """
    choices = current_implementations() if implementation is None else resolve(implementation)
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
            impl, impl_note = choose(plan, choices)
        except NotASite as skip:
            sites.append(Site("skipped", source, skip.args[0], skip.args[1]))
            continue
        try:
            mask_text = apply_plan(gm, plan, impl)
        except Exception as exc:  # noqa: BLE001
            # apply_plan replaces uses only as its last step: before that, what it inserted is
            # dead and removed below, and the site stays as the user wrote it.
            log.warning("sdpa_pass: could not rewrite %s: %r", source, exc)
            sites.append(Site("skipped", source, "internal_error", f"{type(exc).__name__}: {exc}"))
            continue
        sites.append(Site("rewritten", source, mask=mask_text, gqa_group=plan.group,
                          dtype=str(plan.dtype).replace("torch.", ""), scale=plan.scale,
                          softcap=plan.softcap or None,
                          dropout="symbolic" if plan.dropout_node is not None else plan.dropout_p,
                          causal=plan.lift.text if plan.lift else "none",
                          mask_note=plan.lift_note, mask_form=_mask_form(plan, mask_text),
                          implementation=impl.value, implementation_note=impl_note))
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    if any(s.rewritten for s in sites):
        _refresh_values(gm)
    after = gm.print_readable(print_output=False)
    report = Report(sites, [GraphRecord(before, after)], time.perf_counter() - start)
    for s in sites:
        if s.rewritten:
            log.info("rewrote attention at %s (mask %s, GQA %d:1) to run %s (%s)", s.source, s.mask,
                     s.gqa_group, s.implementation, s.implementation_note)
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
