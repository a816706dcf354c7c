"""Step 2: find candidate attention sites, rooted at softmax.

From each softmax, walk back through the score chain (casts, scales, soft-capping, masks) to
the Q·Kᵀ product, and forward through the probability chain (casts, inactive dropout) to the
product with V. The result is a ``Candidate`` that names every node involved; whether it may
be rewritten is decided later (analyse, verify). A softmax whose input does not come from a
matrix product is not a candidate at all.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch.fx as fx

import torch

from .canonicalize import (Call, canonical, constant_value, is_runtime_number, merged_matmul,
                           tensor_of, value_of)

# Score-chain steps, in graph order (from the QK product towards softmax):
#   ("cast", node)
#   ("scale", node, factor, "mul" | "div")      factor: number or scalar-tensor node
#   ("softcap", [div, tanh, mul] nodes, cap)
#   ("add", node, mask_node)                     additive float mask / bias
#   ("fill", node, cond_node, value, masked_when) value at positions where cond == masked_when
Step = tuple

_SCORE_OPS = {"cast", "mul", "div", "add", "masked_fill", "where", "tanh", "contiguous", "reshape"}
_PRODUCT_OPS = {"matmul", "baddbmm", "einsum"}


class NotASite(Exception):
    """This softmax is a candidate that must be left alone; args: (reason_code, words)."""


@dataclasses.dataclass
class Candidate:
    softmax: fx.Node
    dim: object
    qk: fx.Node                # the matmul / baddbmm / einsum producing the scores
    qk_call: Call
    score_steps: list          # Step tuples, graph order
    prob_nodes: list           # nodes between softmax and the PV product (casts, dropout; for
                               # torch.matmul in core ATen the expand, views and the bmm)
    pv: fx.Node
    pv_call: Call
    dropout: list              # (p, training) of dropouts on the probabilities


def _is_scalar(x, gm) -> bool:
    """A number, a constant scalar node, a 0-dim tensor node, or a symbolic number (Dynamo
    turns a float attribute into ``tensor.item()`` under dynamic shapes)."""
    if constant_value(x, gm) is not None or is_runtime_number(x):
        return True
    v = value_of(x)
    return isinstance(v, torch.Tensor) and v.dim() == 0


def _reaches_product(node, gm, depth=12) -> bool:
    """Whether a chain of score ops leads from ``node`` back to a matrix product."""
    for _ in range(depth):
        c = canonical(node, gm)
        if c is None:
            return False
        if c.op in _PRODUCT_OPS:
            return True
        if c.op not in _SCORE_OPS:
            return False
        node = _score_operand(c, gm)
        if node is None:
            return False
    return False


def _score_operand(c: Call, gm):
    """Which argument of a score-chain op carries the scores (None if it cannot be told)."""
    if c.op in ("cast", "tanh", "contiguous", "masked_fill", "reshape"):
        return c.args[0]
    if c.op in ("mul", "div"):
        a, b = c.args
        if _is_scalar(b, gm):
            return a
        if c.op == "mul" and _is_scalar(a, gm):
            return b
        return a if isinstance(a, fx.Node) else None
    if c.op == "add":
        a, b = c.args
        if isinstance(a, fx.Node) and _reaches_product(a, gm, depth=8):
            return a
        return b if isinstance(b, fx.Node) else None
    if c.op == "where":
        _, a, b = c.args
        if isinstance(a, fx.Node) and _reaches_product(a, gm, depth=8):
            return a
        return b if isinstance(b, fx.Node) else None
    return None


def _softcap(c: Call, node: fx.Node, gm):
    """(the softcap step, the node before it) when ``node`` is cap * tanh(s / cap), the
    product written either way round; else None."""
    if c.op != "mul":
        return None
    for t, k in (c.args, reversed(c.args)):
        tanh_call = canonical(t, gm) if isinstance(t, fx.Node) else None
        cap = constant_value(k, gm)
        if cap is None or tanh_call is None or tanh_call.op != "tanh":
            continue
        inner = canonical(tanh_call.args[0], gm)
        if inner is not None and inner.op == "div" and constant_value(inner.args[1], gm) == cap:
            return ("softcap", [tanh_call.args[0], t, node], cap), inner.args[0]
    return None


def _trace_scores(start: fx.Node, gm) -> tuple[fx.Node, Call, list]:
    steps: list = []
    node = start
    for _ in range(32):
        c = canonical(node, gm)
        if c is None:
            raise NotASite("not_attention", f"the softmax input comes from {_describe(node)}, "
                                            "not from a Q·Kᵀ product")
        if c.op in _PRODUCT_OPS:
            bmm = c.kwargs.get("bmm")
            if bmm is not None and len(bmm.users) != 1:
                # the scores in their merged layout: the rewrite removes them with the site
                others = ", ".join(u.name for u in bmm.users if u is not node)
                raise NotASite("scores_used_elsewhere", f"{bmm.name} is also used by {others}")
            steps.reverse()
            return node, c, steps
        if c.op in ("cast", "contiguous"):
            steps.append(("cast", node))
            node = c.args[0]
        elif c.op == "reshape":
            _refuse_unproven_merge(node)
            steps.append(("reshape", node))
            node = c.args[0]
        elif c.op in ("mul", "div"):
            a, b = c.args
            softcap = _softcap(c, node, gm)
            if softcap is not None:
                steps.append(softcap[0])
                node = softcap[1]
                continue
            if _is_scalar(b, gm):
                steps.append(("scale", node, b, c.op))
                node = a
            elif c.op == "mul" and _is_scalar(a, gm):
                steps.append(("scale", node, a, "mul"))
                node = b
            else:
                _, other = (a, b) if _reaches_product(a, gm) else (b, a)
                t = tensor_of(other)
                if t is not None and t.dim() >= 2 and t.shape[-1] == 1 and t.shape[-2] == 1:
                    raise NotASite("unsupported_scale", f"the scores are scaled by a tensor of "
                                                        f"shape {_shape(other)} (one scale per head?), not by one scalar")
                raise NotASite("mask_not_provable", f"the scores are multiplied by a tensor of "
                                                    f"shape {_shape(other)} (a multiplicative mask)")
        elif c.op == "add":
            score = _score_operand(c, gm)
            other = c.args[1] if score is c.args[0] else c.args[0]
            if not isinstance(other, fx.Node):
                raise NotASite("mask_not_provable", f"a constant {other!r} is added to the scores")
            steps.append(("add", node, other))
            node = score
        elif c.op == "masked_fill":
            steps.append(("fill", node, c.args[1], c.args[2], True))
            node = c.args[0]
        elif c.op == "where":
            cond, a, b = c.args
            score = _score_operand(c, gm)
            if score is a:
                steps.append(("fill", node, cond, b, False))
            else:
                steps.append(("fill", node, cond, a, True))
            node = score
        else:
            raise NotASite("not_attention", f"the scores pass through {_describe(node)}")
    raise NotASite("not_attention", "the score chain is too long to be attention")


def _describe(node) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _shape(node) -> str:
    t = tensor_of(node)
    return "?" if t is None else "(" + ", ".join(str(s) for s in t.shape) + ")"


def _refuse_unproven_merge(view: fx.Node) -> None:
    """A view of a bmm on merged batch dims that is not provably torch.matmul's decomposition
    (canonicalize.merged_matmul says which step): the site is left alone with that reason,
    not read as a bmm on heads merged by hand, which it is not either."""
    why = merged_matmul(view)
    if isinstance(why, str):
        raise NotASite("not_provable", why)


def _merged_value_product(bmm: fx.Node, probs: fx.Node, gm) -> tuple[fx.Node, Call]:
    """The product with V when the probabilities were broadcast (expand) and merged into
    ``bmm``: the bmm's view read as matmul(probs, v), torch.matmul as core ATen writes it.
    Other readers of the bmm are left to verify (the bmm is one of the site's nodes)."""
    for view in bmm.users:
        c = canonical(view, gm)
        if c is not None and c.op == "matmul" and c.kwargs.get("bmm") is bmm and c.args[0] is probs:
            return view, c
    for view in bmm.users:
        c = canonical(view, gm)
        if c is not None and c.op == "reshape":
            _refuse_unproven_merge(view)
    raise NotASite("no_value_matmul", f"the probabilities are expanded into {bmm.name}, whose "
                                      "result is not viewed back as one batched product with V")


def _trace_probs(softmax: fx.Node, gm) -> tuple[list, fx.Node, Call, list]:
    nodes: list = []
    dropouts: list = []
    node = softmax
    broadcast_from = None   # the probabilities before an expand (torch.matmul in core ATen)
    for _ in range(16):
        users = list(node.users)
        if len(users) != 1:
            raise NotASite("probs_used_elsewhere",
                           f"the attention probabilities have {len(users)} users; only the "
                           "product with V may use them (output_attentions?)")
        user = users[0]
        c = canonical(user, gm)
        if c is None:
            raise NotASite("no_value_matmul", f"the probabilities feed {_describe(user)}")
        if c.op in ("cast", "contiguous", "reshape"):
            nodes.append(user)
        elif c.op == "expand" and broadcast_from is None:
            nodes.append(user)
            broadcast_from = node
        elif c.op == "dropout":
            nodes.append(user)
            dropouts.append((c.kwargs["p"], c.kwargs["training"]))
        elif c.op in ("matmul", "einsum") and (c.args[0] is node if c.op == "matmul" else c.args[1] is node):
            if c.op == "einsum" and c.args[2] is node:
                raise NotASite("no_value_matmul", "the probabilities are the second einsum operand")
            if broadcast_from is not None:
                nodes.append(user)
                user, c = _merged_value_product(user, broadcast_from, gm)
            return nodes, user, c, dropouts
        elif c.op in ("mul", "div", "add", "sub", "masked_fill", "where"):
            raise NotASite("probs_modified",
                           f"the probabilities are changed ({c.op}) before the product with V")
        else:
            raise NotASite("no_value_matmul", f"the probabilities feed {_describe(user)}")
        node = user
    raise NotASite("no_value_matmul", "no product with V after the softmax")


def match_softmax(softmax: fx.Node, gm) -> Union[Candidate, NotASite, None]:
    """A Candidate, a NotASite (a candidate to leave alone, with its reason), or None when this
    softmax is not attention-shaped at all (its input does not come from a matrix product)."""
    c = canonical(softmax, gm)
    if c is None or c.op != "softmax":
        return None
    if not _reaches_product(c.args[0], gm):
        return None
    try:
        qk, qk_call, steps = _trace_scores(c.args[0], gm)
        prob_nodes, pv, pv_call, dropouts = _trace_probs(softmax, gm)
    except NotASite as skip:
        return skip
    return Candidate(softmax, c.kwargs["dim"], qk, qk_call, steps, prob_nodes, pv, pv_call, dropouts)


def find_softmaxes(gm: fx.GraphModule) -> list[fx.Node]:
    out = []
    for node in gm.graph.nodes:
        c = canonical(node, gm)
        if c is not None and c.op == "softmax":
            out.append(node)
    return out


def candidate_nodes(cand: Candidate) -> list[fx.Node]:
    """Every node the rewrite replaces, in graph order (QK product ... PV product)."""
    nodes = [cand.qk]
    for step in cand.score_steps:
        if step[0] == "softcap":
            nodes.extend(step[1])
        else:
            nodes.append(step[1])
    return nodes + [cand.softmax] + cand.prob_nodes + [cand.pv]


__all__ = ["Candidate", "NotASite", "match_softmax", "find_softmaxes", "candidate_nodes"]
