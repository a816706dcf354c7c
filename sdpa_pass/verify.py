"""Step 4: prove the rewrite replaces exactly what the candidate computes.

Each check is a named predicate that raises ``NotASite`` with a reason code and words:
- every intermediate between the QK product and the PV product has exactly one user, the next
  step (no other reader of scores or probabilities would lose its input);
- no score-chain op changes the shape of the scores (a mask that broadcasts the scores to a
  larger shape is not a mask);
- the kernel's output has the shape and dtype of the PV product it replaces;
- a site that needs gradients does not mix finite fills with additive biases.
"""

from __future__ import annotations

import math

import torch.fx as fx

from sdpa_pass.kernels.cpu import FILL_THRESHOLD

from .analyse import Plan
from .canonicalize import canonical, mutates, tensor_of
from .match import NotASite, candidate_nodes


def single_user_chain(plan: Plan) -> None:
    nodes = candidate_nodes(plan.cand)
    inside = set(nodes)
    for node in nodes[:-1]:
        outside = [u for u in node.users if u not in inside]
        if outside:
            code = "probs_used_elsewhere" if _after_softmax(plan, node) else "scores_used_elsewhere"
            raise NotASite(code, f"{node.name} is also used by {', '.join(u.name for u in outside)}")


def _after_softmax(plan: Plan, node: fx.Node) -> bool:
    return node is plan.cand.softmax or node in plan.cand.prob_nodes


def scores_keep_their_shape(plan: Plan) -> None:
    """Each mask, scale or cast leaves the scores' shape as it found it (a mask that would
    broadcast the scores to a larger shape is not a mask); views of the scores only regroup
    batch dims (same element count, same L and S)."""
    nodes = candidate_nodes(plan.cand)
    end = nodes.index(plan.cand.softmax)
    shape = tuple(tensor_of(plan.cand.qk).shape)
    for prev, node in zip(nodes[:end - 1], nodes[1:end]):
        t, tp = tensor_of(node), tensor_of(prev)
        got = None if t is None else tuple(t.shape)
        before = None if tp is None else tuple(tp.shape)
        c = canonical(node)
        if c is not None and c.op == "reshape":
            ok = got is not None and math.prod(got) == math.prod(shape) and got[-2:] == shape[-2:]
        else:
            ok = got is not None and got == before
        if not ok:
            raise NotASite("mask_not_provable", f"{node.name} changes the scores' shape {before} to {got}")


def output_matches(plan: Plan) -> None:
    out = tensor_of(plan.cand.pv)
    B, H, L, _ = plan.q.shape
    if out is None or math.prod(out.shape) != B * H * L * plan.v.shape[3]:
        raise NotASite("not_provable", f"the value product's shape "
                                       f"{None if out is None else tuple(out.shape)} is not the "
                                       f"attention output {(B, H, L, plan.v.shape[3])}")


def no_mutation_inside(plan: Plan) -> None:
    """The fused op reads its inputs where the value product was; an in-place write between
    the QK product and there (other than the chain's own ``scores += bias``) could change
    what eager read."""
    chain = set(candidate_nodes(plan.cand))
    node = plan.cand.qk.next
    while node is not plan.cand.pv and node.op != "output":
        if node not in chain and mutates(node):
            raise NotASite("not_provable", f"{node.name} writes a tensor in place inside the attention")
        node = node.next


def fills_and_biases_apart_in_training(plan: Plan) -> None:
    """A row filled everywhere by ``masked_fill(..., finfo.min)`` passes no gradient to its
    scores in eager, one shifted by an additive ``finfo.min`` bias does; the op tells them
    apart by ``mask_fills``, one rule per site, so a site that has both and needs gradients
    cannot be proved."""
    kinds = {m.kind.split("_")[0] for m in plan.masks}
    if {"fill", "additive"} <= kinds and needs_grad(plan):
        raise NotASite("not_provable", "a finite fill and an additive bias on one site that needs "
                                       "gradients: rows filled everywhere would get the wrong one")


def finite_fills_beside_additive_masks(plan: Plan) -> None:
    """A finite fill shares the kernel's one float mask with an additive mask only if the fill
    is at most FILL_THRESHOLD (-1e30, e.g. finfo(float32).min): the mask then holds the fill
    itself (plus what is added after it), which the kernel takes as the score, as eager does.
    A weaker fill (-1e4, -1e9, float16's finfo.min) would have to become such a value, and
    eager ranks it against the bias: ``masked_fill(c, -1e9)`` beside a finfo.min padding bias
    averages the filled keys of a row whose other keys are padded, and ``+ bias`` after
    ``masked_fill(c, -1e4)`` still ranks the filled keys (GPT-2's legacy ``where(causal, w,
    finfo.min) + attention_mask`` in float16 on a left-padded row). One float mask cannot hold
    that, so such a site stays as written."""
    masks = plan.kernel_masks
    weak = [m.fill for m in masks if m.kind.startswith("fill") and m.fill > FILL_THRESHOLD]
    if weak and any(m.kind == "additive" for m in masks):
        raise NotASite("mask_not_provable",
                       f"a finite fill of {max(weak):g} beside an additive mask: eager ranks the "
                       f"filled scores against the bias's, one float mask cannot")


def needs_grad(plan: Plan) -> bool:
    """Whether a gradient can flow into the site (the graph's example values say which inputs
    require grad)."""
    return any(getattr(tensor_of(n), "requires_grad", False)
               for n in (plan.q.node, plan.k.node, plan.v.node, *[m.node for m in plan.masks]))


CHECKS = (single_user_chain, scores_keep_their_shape, output_matches, no_mutation_inside,
          fills_and_biases_apart_in_training, finite_fills_beside_additive_masks)


def verify(plan: Plan) -> None:
    for check in CHECKS:
        check(plan)
