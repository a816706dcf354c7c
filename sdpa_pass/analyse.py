"""Step 3: what a candidate computes, in the kernel's terms.

Layouts are found from dimensions, not from spellings (as OpenVINO's SDPAFusion does): the
QK product says which dims are batch, query, key and head-dim; a transpose or permute of K is
folded into one permutation; einsum equations are read letter by letter. Masks are classified
by what they do to the scores; the scale is the product of every scalar factor on the scores.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch
import torch.fx as fx

from .canonicalize import canonical, constant_value, is_runtime_number, tensor_of
from .masks import Lift, NotLiftable, lift_site
from .match import Candidate, NotASite

# A masked_fill value at or below this is a mask (eager's exp() of it underflows to 0 next to
# any real score); a fill above it is a value the scores are set to, which we do not rewrite.
MASK_FILL_THRESHOLD = -1.0e4
log = logging.getLogger("sdpa_pass")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass
class Operand:
    """A (B, H, len, dim) kernel operand: ``node`` viewed through ``perm``, then either with
    size-1 dims inserted at ``unsqueeze`` positions or reshaped to ``reshape`` (regrouping the
    leading batch dims when the masks live in another view of the scores)."""

    node: fx.Node
    perm: list
    unsqueeze: list = dataclasses.field(default_factory=list)
    reshape: Optional[tuple] = None
    shape: tuple = ()          # (B, H, len, dim) as the kernel sees it
    repeat_source: Optional[fx.Node] = None   # K/V before repeat_kv, if peeled


@dataclasses.dataclass
class Mask:
    kind: str                  # "bool_attend" | "bool_masked" | "additive" | "fill_min"[_attend]
    node: fx.Node
    space: tuple = ()          # the shape of the scores view the mask is applied in
    expand: Optional[tuple] = None    # broadcast a run of batch dims before regrouping
    reshape: Optional[tuple] = None   # the mask regrouped onto the kernel's (B, H, L, S)
    fill: Optional[float] = None      # the value a masked_fill / where writes ("fill" kinds)


@dataclasses.dataclass
class Plan:
    cand: Candidate
    q: Operand
    k: Operand
    v: Operand
    scale: float
    q_scale_nodes: list        # (op, node): scalar tensors the query is multiplied/divided by
    softcap: float
    masks: list
    out_perm: Optional[list]   # einsum PV output layout, else None
    out_shape: tuple           # shape of the value product the kernel output replaces
    dtype: torch.dtype
    group: int
    # p of an active dropout on the probabilities (training mode). Where p is known only at
    # run time it is 1.0, its bound, so every decision taken from it here holds for any p,
    # and dropout_node is the graph's number the op reads p from.
    dropout_p: float = 0.0
    lift: Optional[Lift] = None          # the masks as kernel predicates (masks.py), if proven
    lift_note: Optional[str] = None      # why the masks stay tensors, when they do
    dropout_node: Optional[fx.Node] = None

    @property
    def dropout_arg(self):
        """The op's dropout_p argument: the constant, or the node computing it at run time."""
        return self.dropout_node if self.dropout_node is not None else self.dropout_p

    @property
    def kernel_masks(self) -> list:
        """The masks the kernel gets as tensors: all of them, or what lifting left."""
        if self.lift is None:
            return self.masks
        return [Mask(kind, node) for kind, node in self.lift.residual]


def _perm_of_permute(node, gm):
    c = canonical(node, gm)
    if c is not None and c.op == "permute":
        return c.args[0], list(c.args[1])
    return None


def _fold_permutes(node, perm, gm):
    """Walk through stacked permutes: returns (source, perm) with view = source.permute(perm)."""
    while True:
        inner = _perm_of_permute(node, gm)
        if inner is None:
            return node, perm
        src, p = inner
        r = len(p)
        p = [d % r for d in p]
        perm = [p[i] for i in perm]
        node = src


def _einsum_layout(eq: str):
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return None
    return ops[0], ops[1], out


def _analyse_qk(cand: Candidate, gm):
    """Returns (q Operand, k Operand, extra scale, baddbmm bias node or None, score letters)."""
    c = cand.qk_call
    bias = None
    scale = 1.0
    if c.op in ("matmul", "baddbmm"):
        if c.op == "baddbmm":
            bias_in, a, b = c.args
            beta, alpha = c.kwargs["beta"], c.kwargs["alpha"]
            if beta not in (0, 1) or not (isinstance(alpha, (int, float)) or is_runtime_number(alpha)):
                raise NotASite("unsupported_scale", f"baddbmm with beta={beta}, alpha={alpha}")
            bias = bias_in if beta == 1 else None
        else:
            a, b = c.args
        ta, tb = tensor_of(a), tensor_of(b)
        if ta is None or tb is None:
            raise NotASite("not_provable", "the scores product has operands of unknown shape")
        if ta.dim() != tb.dim() or ta.dim() not in (2, 3, 4):
            raise NotASite("not_attention", f"scores product of ranks {ta.dim()} and {tb.dim()}")
        r = ta.dim()
        # Whisper scales k after permuting it: (k.permute(0, 2, 3, 1) * d ** -0.25)
        key_scales = [("mul", c.kwargs["alpha"])] if c.op == "baddbmm" else []
        while True:
            cb = canonical(b, gm)
            if cb is None or cb.op not in ("mul", "div") or not isinstance(cb.args[0], fx.Node):
                break
            f = cb.args[1]
            if constant_value(f, gm) is None and not is_runtime_number(f):
                break
            key_scales.append((cb.op, f))
            b = cb.args[0]
        inner = _perm_of_permute(b, gm)
        if inner is None:
            raise NotASite("not_attention", "the second operand of the scores product is not a "
                                            "transposed key (k.transpose(-2, -1), k.mT, permute)")
        src, perm = inner
        perm = [d % r for d in perm]
        key_perm = perm[:-2] + [perm[-1], perm[-2]]
        src, key_perm = _fold_permutes(src, key_perm, gm)
        return (_operand(a, list(range(r))), _operand(src, key_perm), scale, bias,
                None, key_scales)
    # einsum
    layout = _einsum_layout(c.args[0])
    if layout is None:
        raise NotASite("not_attention", f"einsum {c.args[0]!r} is not a two-operand product")
    ia, ib, out = layout
    contracted = [x for x in ia if x in ib and x not in out]
    if len(out) < 3 or len(contracted) != 1:
        raise NotASite("not_attention", f"einsum {c.args[0]!r} is not Q·Kᵀ over the last dim")
    lq, sk, batch = [out[-2]], [out[-1]], list(out[:-2])
    k_batch = [x for x in batch if x in ib]
    if (lq[0] not in ia or lq[0] in ib or sk[0] not in ib or sk[0] in ia
            or sorted(ia) != sorted(batch + [lq[0], contracted[0]])
            or sorted(ib) != sorted(k_batch + [sk[0], contracted[0]])):
        raise NotASite("not_attention", f"einsum {c.args[0]!r} is not Q·Kᵀ over the last dim")
    d = contracted[0]
    q_perm = [ia.index(x) for x in batch + [lq[0], d]]
    k_perm = [ib.index(x) for x in k_batch + [sk[0], d]]
    a, b = c.args[1], c.args[2]
    src, k_perm = _fold_permutes(b, k_perm, gm)
    key = _operand(src, k_perm)
    # a batch letter the key lacks (x-transformers' shared-KV 'b j d') is a broadcast dim
    key.unsqueeze = [i for i, x in enumerate(batch) if x not in ib]
    return _operand(a, q_perm), key, scale, bias, "".join(batch) + lq[0] + sk[0], []


def _operand(node, perm) -> Operand:
    return Operand(node=node, perm=perm)


def _mask_spaces(cand: Candidate) -> list:
    """The shape of the scores view each mask step is applied in, in score-step order; the
    baddbmm bias (if any) first, in the product's own shape."""
    cur = tuple(tensor_of(cand.qk).shape)
    # only a baddbmm whose input is added (beta=1, as _analyse_qk reads it) has a bias mask;
    # with beta=0 a space here would shift every mask onto the space of the one before it
    spaces = [cur] if cand.qk_call.op == "baddbmm" and cand.qk_call.kwargs["beta"] == 1 else []
    for step in cand.score_steps:
        if step[0] == "reshape":
            new = tuple(tensor_of(step[1]).shape)
            if new[-2:] != cur[-2:]:
                raise NotASite("not_provable", f"a view of the scores {cur} -> {new} moves the "
                                               "query/key dims")
            cur = new
        elif step[0] in ("add", "fill"):
            spaces.append(cur)
    return spaces


def _kernel_batch_dims(cand: Candidate, spaces: list) -> tuple:
    """The two leading (batch, heads) dims the kernel runs in: those of the first rank-4 view
    the masks are applied in, else the scores' own (padded with 1s to two)."""
    space = next((sp for sp in spaces if len(sp) == 4), tuple(tensor_of(cand.qk).shape))
    if len(space) > 4:
        raise NotASite("not_provable", f"rank-{len(space)} scores; the kernel takes (batch, heads, L, S)")
    return (1,) * (4 - len(space)) + tuple(space[:-2])


def _place_mask(mask: Mask, lead: tuple) -> None:
    """A mask applied in another view of the scores (BART's 4-D view of 3-D scores, Swin's 5-D
    one) is regrouped onto the kernel's (batch, heads): split the view's batch dims into two
    runs whose products are the kernel's; a run the mask broadcasts over entirely stays size
    1 (stride 0), a run it covers is merged by a view, and a run it covers only in part (Swin:
    windows but not images) is expanded there first, materialising that run alone."""
    space_lead = tuple(mask.space[:-2])
    t = tensor_of(mask.node)
    if (1,) * (4 - len(mask.space)) + space_lead == lead or t.dim() <= 2:
        return
    shape = (1,) * (len(mask.space) - t.dim()) + tuple(t.shape)
    m_lead, last = shape[:-2], shape[-2:]
    if all(x == 1 for x in m_lead):
        mask.reshape = (1, 1) + tuple(last)
        return
    if not all(isinstance(x, int) for x in (*space_lead, *lead)):
        raise NotASite("not_provable", "a mask in another view of the scores, with symbolic sizes")
    if tuple(m_lead) == space_lead:  # covers every batch dim: a plain view
        mask.reshape = tuple(lead) + tuple(last)
        return
    split = next((j for j in range(len(space_lead) + 1)
                  if math.prod(space_lead[:j]) == lead[0] and math.prod(space_lead[j:]) == lead[1]), None)
    if split is None:
        raise NotASite("not_provable", f"the scores view {mask.space} does not regroup onto {lead}")
    expand, merged = [], []
    for lo, hi in ((0, split), (split, len(space_lead))):
        run, full = m_lead[lo:hi], space_lead[lo:hi]
        if all(x == 1 for x in run):
            expand += list(run)
            merged.append(1)
        else:
            expand += list(full)
            merged.append(math.prod(full))
    mask.expand = None if tuple(expand) == tuple(m_lead) else tuple(expand) + tuple(last)
    mask.reshape = tuple(merged) + tuple(last)


def _place(op: Operand, lead: tuple, what: str) -> Operand:
    """Map an operand's leading dims onto the kernel's (batch, heads)."""
    t = tensor_of(op.node)
    if t is None:
        raise NotASite("not_provable", f"{what} has no known shape")
    shape = [t.shape[i] for i in op.perm]
    for pos in op.unsqueeze:
        shape.insert(pos, 1)
    nat = tuple(shape[:-2])
    if len(nat) > 2:
        raise NotASite("not_provable", f"{what} has {len(nat)} batch dims; the kernel takes two")
    padded = (1,) * (2 - len(nat)) + nat
    if all(p == 1 or p == want for p, want in zip(padded, lead)):
        op.unsqueeze = [0] * (2 - len(nat)) + op.unsqueeze
        op.shape = padded + tuple(shape[-2:])
        return op
    if math.prod(nat) == math.prod(lead) and all(isinstance(x, int) for x in (*nat, *lead)):
        op.reshape = tuple(lead) + tuple(shape[-2:])
        op.shape = op.reshape
        return op
    raise NotASite("not_provable", f"{what}'s batch dims {nat} do not map onto {lead}")


def _repeat_kv_source(node: fx.Node, gm):
    """The K/V tensor before HF ``repeat_kv`` (x[:, :, None].expand(...).reshape(...)) or
    ``repeat_interleave(n, dim=1)``; None if ``node`` is neither."""
    c = canonical(node, gm)
    if c is None:
        return None
    out = tensor_of(node)
    if c.op == "repeat_interleave":
        src = c.args[0]
        t = tensor_of(src)
        if (t is not None and out is not None and t.dim() == 4 and c.kwargs.get("dim") in (1, -3)
                and isinstance(c.args[1], int) and out.shape[1] == t.shape[1] * c.args[1]):
            return src
        return None
    if c.op != "reshape":
        return None
    expanded = c.args[0]
    e = canonical(expanded, gm)
    if e is not None and e.op == "contiguous":
        # core ATen (run_decompositions) copies the expanded tensor before viewing it: a copy
        # in another layout, the same values
        expanded = e.args[0]
        e = canonical(expanded, gm)
    if e is None or e.op != "expand":
        return None
    u = canonical(e.args[0], gm)
    if u is None:
        return None
    if u.op == "unsqueeze" and u.args[1] in (2, -3):
        src = u.args[0]
    elif u.op == "getitem" and isinstance(u.args[1], tuple) and len(u.args[1]) >= 3 \
            and u.args[1][2] is None and all(isinstance(s, slice) and s == slice(None) for s in u.args[1][:2]) \
            and all(isinstance(s, slice) and s == slice(None) for s in u.args[1][3:]):
        src = u.args[0]
    else:
        return None
    t, te = tensor_of(src), tensor_of(expanded)
    if t is None or te is None or out is None or t.dim() != 4 or te.dim() != 5:
        return None
    B, Hkv, S, D = t.shape
    if (te.shape[0] == B and te.shape[1] == Hkv and te.shape[3] == S and te.shape[4] == D
            and tuple(out.shape) == (B, Hkv * te.shape[2], S, D)):
        return src
    return None


def _classify_masks(cand: Candidate, bias, gm) -> list:
    masks = []
    if bias is not None:
        masks.append(Mask("additive", bias))
    for step in cand.score_steps:
        if step[0] == "add":
            t = tensor_of(step[2])
            if t is None or not t.dtype.is_floating_point:
                raise NotASite("mask_not_provable", "a non-float tensor is added to the scores")
            masks.append(Mask("additive", step[2]))
        elif step[0] == "fill":
            _, node, cond, value, masked_when = step
            tc = tensor_of(cond)
            if tc is None or tc.dtype != torch.bool:
                raise NotASite("mask_not_provable", "a fill condition is not a bool tensor")
            v = constant_value(value, gm)
            if v is None:
                raise NotASite("mask_not_provable", "the fill value is not a constant")
            if v == float("-inf"):
                masks.append(Mask("bool_masked" if masked_when else "bool_attend", cond))
            elif v <= MASK_FILL_THRESHOLD:
                masks.append(Mask("fill_min" if masked_when else "fill_min_attend", cond, fill=v))
            else:
                raise NotASite("mask_not_provable",
                               f"masked_fill/where with {v!r} sets scores to a value; only -inf "
                               f"or fills <= {MASK_FILL_THRESHOLD:g} are masks")
    return masks


def _active_dropout(cand: Candidate):
    """(p, node) of the one dropout on the probabilities that may be active: p a constant, or,
    when p is a number computed at run time (``nn.Dropout.p`` under ``dynamic=True``: Dynamo
    passes it as a 0-d tensor and calls ``.item()``), 1.0, its bound, with the node the op
    reads p from. (0.0, None) when none can be."""
    dropout_p, dropout_node = 0.0, None
    for p, training in cand.dropout:
        if training is False:
            continue  # identity whatever p is
        if not isinstance(training, bool):
            raise NotASite("not_provable", "dropout with a training flag known only at run time")
        if is_runtime_number(p):
            # the op checks that p is a probability when it runs, as eager's dropout does
            active, node = 1.0, p
        elif isinstance(p, (int, float)):
            if not 0.0 <= p <= 1.0:
                raise NotASite("not_provable", f"dropout p={p} is not a probability (eager raises)")
            if p == 0:
                continue
            active, node = float(p), None
        else:
            raise NotASite("not_provable", "dropout with a p that is neither a constant nor a "
                                           "number computed at run time")
        if dropout_p > 0:
            raise NotASite("not_provable", "two dropouts on the probabilities that may both "
                                           "be active")
        dropout_p, dropout_node = active, node
    return dropout_p, dropout_node


def analyse(cand: Candidate, gm) -> Plan:
    scores = tensor_of(cand.qk)
    if scores is None:
        raise NotASite("not_provable", "the scores have no known shape")
    r = scores.dim()
    # softmax's dim counts in its own input, which may be a view of the scores of another
    # rank (bmm on merged heads, softmax on the (B, H, L, S) view); views keep S last
    probs = tensor_of(cand.softmax)
    r_softmax = r if probs is None else probs.dim()
    if cand.dim not in (-1, r_softmax - 1):
        raise NotASite("softmax_not_over_keys",
                       f"softmax over dim {cand.dim} of rank-{r_softmax} scores; attention "
                       "normalises over the keys (the last dim)")
    dropout_p, dropout_node = _active_dropout(cand)

    q, k, qk_scale, bias, score_letters, key_scales = _analyse_qk(cand, gm)

    # V operand and output layout
    pc = cand.pv_call
    out_perm = None
    if pc.op == "matmul":
        v_node = pc.args[1]
        tv = tensor_of(v_node)
        if tv is None or tv.dim() != r:
            raise NotASite("not_attention", "the value operand's rank differs from the scores'")
        v = _operand(v_node, list(range(r)))
    else:
        layout = _einsum_layout(pc.args[0])
        if layout is None:
            raise NotASite("not_attention", f"einsum {pc.args[0]!r} for the value product")
        ip, iv, out = layout
        batch, l_, s_ = list(ip[:-2]), ip[-2], ip[-1]
        dv = [x for x in iv if x not in ip]
        v_batch = [x for x in batch if x in iv]
        if (len(dv) != 1 or s_ not in iv or l_ in iv or sorted(out) != sorted(batch + [l_, dv[0]])
                or sorted(iv) != sorted(v_batch + [s_, dv[0]])):
            raise NotASite("not_attention", f"einsum {pc.args[0]!r} is not P·V over the keys")
        v = _operand(pc.args[2], [iv.index(x) for x in v_batch + [s_, dv[0]]])
        v.unsqueeze = [i for i, x in enumerate(batch) if x not in iv]
        natural = batch + [l_, dv[0]]
        out_perm = [natural.index(x) for x in out]
        if out_perm == list(range(len(out_perm))):
            out_perm = None

    spaces = _mask_spaces(cand)
    lead = _kernel_batch_dims(cand, spaces)
    q = _place(q, lead, "the query")
    k = _place(k, lead, "the key")
    v = _place(v, lead, "the value")
    out_t = tensor_of(cand.pv)
    out_shape = tuple(out_t.shape) if out_t is not None else ()
    B, H, L, D = q.shape
    Bk, Hk, S, Dk = k.shape
    Bv, Hv, Sv, DV = v.shape
    if D != Dk:
        raise NotASite("not_attention", f"query head dim {D} != key head dim {Dk}")
    if S != Sv:
        raise NotASite("not_attention", f"key length {S} != value length {Sv}")
    for name, b_, h_ in (("key", Bk, Hk), ("value", Bv, Hv)):
        if b_ not in (1, B) or h_ not in (1, H):
            raise NotASite("not_provable", f"{name} batch/heads ({b_}, {h_}) do not broadcast "
                                           f"against the query's ({B}, {H})")

    # repeat_kv / repeat_interleave -> native GQA (only when the view is already (B,H,S,D))
    for op in (k, v):
        if op.perm == list(range(len(op.perm))) and not op.unsqueeze and op.reshape is None:
            op.repeat_source = _repeat_kv_source(op.node, gm)
    hk = tensor_of(k.repeat_source).shape[1] if k.repeat_source is not None else None
    hv = tensor_of(v.repeat_source).shape[1] if v.repeat_source is not None else None
    if hk is None or hv is None or hk != hv:
        k.repeat_source = v.repeat_source = None
        hkv = max(Hk, Hv)
    else:
        hkv = hk
    group = H // hkv if hkv else 1

    # dtypes
    dt = {tensor_of(x.node).dtype for x in (q, k, v)}
    if len(dt) != 1:
        raise NotASite("unsupported_dtype", f"query, key and value dtypes differ: {sorted(map(str, dt))}")
    dtype = dt.pop()
    if dtype not in SUPPORTED_DTYPES:
        raise NotASite("unsupported_dtype", f"{dtype} attention (the kernels take fp16, bf16, fp32)")
    if out_t is None or out_t.dtype != dtype:
        raise NotASite("unsupported_dtype", "the attention output dtype differs from the inputs'")

    # scale, soft-capping, masks, in graph order
    scale = qk_scale
    q_scale_nodes = []
    for op_, f in key_scales:
        c_ = constant_value(f, gm)
        if c_ is not None:
            scale = scale * c_ if op_ == "mul" else scale / c_
        else:
            q_scale_nodes.append((op_, f))
    softcap = 0.0
    seen_mask_or_cap = False
    for step in cand.score_steps:
        kind = step[0]
        if kind == "scale":
            if seen_mask_or_cap:
                raise NotASite("unsupported_scale", "the scores are scaled after a mask or soft-cap")
            factor = constant_value(step[2], gm)
            if factor is not None:
                scale = scale * factor if step[3] == "mul" else scale / factor
            elif is_runtime_number(step[2]):
                q_scale_nodes.append((step[3], step[2]))
            else:
                t = tensor_of(step[2])
                if t is None or t.numel() != 1 or not t.dtype.is_floating_point:
                    raise NotASite("unsupported_scale", "the scores are scaled by a non-scalar tensor")
                q_scale_nodes.append((step[3], step[2]))
        elif kind == "softcap":
            if seen_mask_or_cap:
                raise NotASite("not_provable", "soft-capping after a mask")
            softcap = float(step[2])
            seen_mask_or_cap = True
        elif kind in ("add", "fill"):
            seen_mask_or_cap = True
        elif kind == "cast":
            t = tensor_of(step[1])
            if t is None or t.dtype not in (torch.float32, torch.float64, dtype):
                raise NotASite("not_provable", "the scores are cast to a narrower dtype")
    if not math.isfinite(scale) or scale == 0:
        raise NotASite("unsupported_scale", f"scale {scale}")
    masks = _classify_masks(cand, bias, gm)
    for mask, space in zip(masks, spaces):
        mask.space = space
        _place_mask(mask, lead)
    lift, lift_note = None, None
    if masks:
        try:
            lift = lift_site(masks, L, S, gm, allow_uniform=softcap == 0.0 and dropout_p == 0.0)
            lift_note = "; ".join(dict.fromkeys(lift.notes)) or None
        except NotLiftable as why:
            lift_note = why.args[0]
        except Exception as exc:  # noqa: BLE001  (a bug here must not stop the site's rewrite)
            lift_note = f"mask analysis failed: {type(exc).__name__}: {exc}"
            log.warning("sdpa_pass: %s", lift_note)
    return Plan(cand, q, k, v, float(scale), q_scale_nodes, softcap, masks, out_perm,
                out_shape, dtype, group, dropout_p, lift, lift_note, dropout_node)
