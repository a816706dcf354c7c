"""Step 1: one spelling per operation.

Models write the same operation many ways (``x @ y``, ``torch.matmul``, ``x.matmul``,
``torch.bmm``; ``F.softmax``, ``x.softmax``, ``nn.Softmax``; ``.float()``, ``.to(dtype)``,
``.type_as``), and graphs come from Dynamo (torch-level calls), ``symbolic_trace`` (leaf
modules) or ``torch.export`` (aten ops). ``canonical(node)`` reads any of them as one
``Call(op, args, kwargs)`` without changing the graph, so the matcher is written once.

Canonical ops and their arguments:
  matmul(a, b)                      matmul / bmm / @, and torch.matmul as core ATen writes it
                                    (expand, clone, view, bmm, view: see merged_matmul); that
                                    spelling carries its bmm as kwargs["bmm"]
  baddbmm(input, a, b; beta, alpha)
  einsum(equation, a, b)
  permute(x, perm)                  transpose / permute / .mT / .T on rank 2
  mul(a, b), div(a, b), add(a, b), sub(a, b)
  masked_fill(x, cond, value), where(cond, a, b)
  softmax(x; dim)                   any dtype= argument shows as a cast of the output
  cast(x)                           dtype change only; target dtype from the node's value
  dropout(x; p, training)
  tanh(x), neg(x), logical_not(x), contiguous(x)
  expand(x), reshape(x), unsqueeze(x, dim), getitem(x, index), repeat_interleave(x, n; dim)
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

aten = torch.ops.aten


@dataclasses.dataclass
class Call:
    op: str
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)


def value_of(node: Any):
    """The example value (FakeTensor / tensor / number) a node carries, if any."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    for key in ("example_value", "val", "tensor_meta"):
        if key in meta:
            return meta[key]
    return None


def tensor_of(node: Any) -> Optional[torch.Tensor]:
    v = value_of(node)
    return v if isinstance(v, torch.Tensor) else None


def rank_of(node: Any) -> Optional[int]:
    t = tensor_of(node)
    return None if t is None else t.dim()


def _perm_swap(rank: int, d0: int, d1: int) -> list[int]:
    perm = list(range(rank))
    d0, d1 = d0 % rank, d1 % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _dims(args) -> list[int]:
    """permute(x, 0, 2, 1, 3) and permute(x, (0, 2, 1, 3)) both give [0, 2, 1, 3]."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    return list(args)


_MATMUL = {operator.matmul, torch.matmul, torch.bmm, aten.matmul.default, aten.bmm.default,
           aten.mm.default}
# The in-place forms (``scores += bias``) read the same: the matcher only accepts them on
# intermediates with a single user, where nobody can observe the mutation.
_MUL = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, aten.div.Tensor,
        aten.div.Scalar}
_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add.Scalar}
_SUB = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor, aten.sub.Scalar}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, aten.softmax.int, aten._softmax.default}
_DROPOUT = {F.dropout, torch.dropout, aten.dropout.default}
_TANH = {torch.tanh, aten.tanh.default}
_WHERE = {torch.where, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
          aten.where.Scalar}
_MASKED_FILL = {torch.masked_fill, aten.masked_fill.Scalar, aten.masked_fill.Tensor}
_CAST = {aten._to_copy.default, aten.to.dtype, torch.ops.prims.convert_element_type.default}
_EINSUM = {torch.einsum, aten.einsum.default}
_PERMUTE = {torch.permute, aten.permute.default}
_TRANSPOSE = {torch.transpose, aten.transpose.int}
_EXPAND = {aten.expand.default}
_RESHAPE = {torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_UNSQUEEZE = {torch.unsqueeze, aten.unsqueeze.default}
_REPEAT_INTERLEAVE = {torch.repeat_interleave, aten.repeat_interleave.self_int}
_NEG = {operator.neg, torch.neg, aten.neg.default}
_NOT = {operator.invert, torch.logical_not, torch.bitwise_not, aten.logical_not.default,
        aten.bitwise_not.default}
_CONTIGUOUS = {aten.clone.default, aten.contiguous.default}

_METHOD_CASTS = {"float", "half", "bfloat16", "double", "to", "type_as", "type"}


def canonical(node: Any, gm: Optional[fx.GraphModule] = None) -> Optional[Call]:
    """Read ``node`` as a canonical Call, or None when it is none of the ops above."""
    if not isinstance(node, fx.Node):
        return None
    a, kw = node.args, node.kwargs
    if node.op == "call_function":
        return _function(node, node.target, a, kw)
    if node.op == "call_method":
        return _method(node, node.target, a, kw)
    if node.op == "call_module" and gm is not None:
        return _module(gm.get_submodule(node.target), a, kw)
    return None


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _function(node, t, a, kw) -> Optional[Call]:
    if t in _MATMUL:
        return Call("matmul", (a[0], a[1]))
    if t in (torch.baddbmm, aten.baddbmm.default):
        return Call("baddbmm", (a[0], _arg(a, kw, 1, "batch1"), _arg(a, kw, 2, "batch2")),
                    {"beta": kw.get("beta", 1), "alpha": kw.get("alpha", 1)})
    if t in _EINSUM:
        operands = a[1:] if not (len(a) == 2 and isinstance(a[1], (list, tuple))) else a[1]
        if len(operands) == 2 and isinstance(a[0], str):
            return Call("einsum", (a[0], operands[0], operands[1]))
        return None
    if t in _MUL:
        return Call("mul", (a[0], a[1]))
    if t in _DIV:
        if kw.get("rounding_mode") is not None:
            return None
        return Call("div", (a[0], a[1]))
    if t in _ADD:
        if _arg(a, kw, 2, "alpha", 1) != 1:
            return None
        return Call("add", (a[0], a[1]))
    if t in _SUB:
        if _arg(a, kw, 2, "alpha", 1) != 1:
            return None
        return Call("sub", (a[0], a[1]))
    if t in _SOFTMAX:
        return Call("softmax", (a[0],), {"dim": _arg(a, kw, 1, "dim")})
    if t in _DROPOUT:
        if t is torch.dropout or t is aten.dropout.default:
            return Call("dropout", (a[0],), {"p": _arg(a, kw, 1, "p"), "training": _arg(a, kw, 2, "train")})
        return Call("dropout", (a[0],), {"p": _arg(a, kw, 1, "p", 0.5),
                                         "training": _arg(a, kw, 2, "training", True)})
    if t in _TANH:
        return Call("tanh", (a[0],))
    if t in _WHERE:
        if len(a) == 3:
            return Call("where", (a[0], a[1], a[2]))
        return None
    if t in _MASKED_FILL:
        return Call("masked_fill", (a[0], a[1], _arg(a, kw, 2, "value")))
    if t in _CAST:
        return Call("cast", (a[0],))
    if t in _PERMUTE:
        return Call("permute", (a[0], _dims(a[1:]) if len(a) > 1 else list(kw["dims"])))
    if t in _TRANSPOSE:
        r = rank_of(a[0])
        return None if r is None else Call("permute", (a[0], _perm_swap(r, a[1], a[2])))
    if t is getattr and len(a) == 2 and a[1] in ("mT", "T", "mH"):
        r = rank_of(a[0])
        if r is None or (a[1] == "T" and r != 2):
            return None
        return Call("permute", (a[0], _perm_swap(r, -2, -1)))
    if t in _EXPAND:
        return Call("expand", (a[0],))
    if t in _RESHAPE:
        merged = merged_matmul(node)
        return merged if isinstance(merged, Call) else Call("reshape", (a[0],))
    if t in _UNSQUEEZE:
        return Call("unsqueeze", (a[0], _arg(a, kw, 1, "dim")))
    if t is operator.getitem:
        return Call("getitem", (a[0], a[1]))
    if t in _REPEAT_INTERLEAVE:
        return Call("repeat_interleave", (a[0], _arg(a, kw, 1, "repeats")),
                    {"dim": _arg(a, kw, 2, "dim")})
    if t in _NEG:
        return Call("neg", (a[0],))
    if t in _NOT:
        return Call("logical_not", (a[0],))
    if t in _CONTIGUOUS:
        return Call("contiguous", (a[0],))
    return None


def _method(node, name, a, kw) -> Optional[Call]:
    self = a[0]
    rest = a[1:]
    if name in ("matmul", "bmm", "__matmul__"):
        return Call("matmul", (self, rest[0]))
    if name == "baddbmm":
        return Call("baddbmm", (self, _arg(rest, kw, 0, "batch1"), _arg(rest, kw, 1, "batch2")),
                    {"beta": kw.get("beta", 1), "alpha": kw.get("alpha", 1)})
    if name in ("mul", "__mul__"):
        return Call("mul", (self, rest[0]))
    if name in ("div", "__truediv__", "true_divide"):
        if kw.get("rounding_mode") is not None:
            return None
        return Call("div", (self, rest[0]))
    if name in ("add", "__add__"):
        if kw.get("alpha", 1) != 1:
            return None
        return Call("add", (self, rest[0]))
    if name in ("sub", "__sub__"):
        if kw.get("alpha", 1) != 1:
            return None
        return Call("sub", (self, rest[0]))
    if name == "softmax":
        return Call("softmax", (self,), {"dim": _arg(rest, kw, 0, "dim")})
    if name == "tanh":
        return Call("tanh", (self,))
    if name == "masked_fill":
        return Call("masked_fill", (self, _arg(rest, kw, 0, "mask"), _arg(rest, kw, 1, "value")))
    if name in _METHOD_CASTS:
        return Call("cast", (self,))
    if name == "transpose":
        r = rank_of(self)
        return None if r is None else Call("permute", (self, _perm_swap(r, rest[0], rest[1])))
    if name == "permute":
        return Call("permute", (self, _dims(rest) if rest else list(kw["dims"])))
    if name == "expand":
        return Call("expand", (self,))
    if name in ("reshape", "view"):
        merged = merged_matmul(node)
        return merged if isinstance(merged, Call) else Call("reshape", (self,))
    if name == "unsqueeze":
        return Call("unsqueeze", (self, _arg(rest, kw, 0, "dim")))
    if name == "repeat_interleave":
        return Call("repeat_interleave", (self, _arg(rest, kw, 0, "repeats")),
                    {"dim": _arg(rest, kw, 1, "dim")})
    if name in ("neg", "__neg__"):
        return Call("neg", (self,))
    if name in ("logical_not", "bitwise_not", "__invert__"):
        return Call("logical_not", (self,))
    if name == "contiguous":
        return Call("contiguous", (self,))
    return None


def _module(mod: torch.nn.Module, a, kw) -> Optional[Call]:
    if isinstance(mod, torch.nn.Softmax):
        return Call("softmax", (a[0],), {"dim": mod.dim})
    if isinstance(mod, torch.nn.Dropout):
        return Call("dropout", (a[0],), {"p": mod.p, "training": mod.training})
    if isinstance(mod, torch.nn.Identity):
        return Call("contiguous", (a[0],))
    return None


# torch.matmul of tensors of rank >= 3 as its CompositeImplicit decomposition writes it, which
# is what every core-ATen graph (torch.export(...).run_decompositions()) has:
#   a.expand(batch + [n, m]) [.clone()] .view(prod(batch), n, m)    b likewise, to [m, p]
#   bmm(a', b').view(batch + [n, p])
# Read as matmul(a, b) at the last view, and only where each step is proven to be the step of
# that decomposition it looks like; anything else would let a view that regroups rows (heads
# split another way, a different broadcast) pass for attention over the wrong rows.


def merged_matmul(node) -> Union[Call, str, None]:
    """``node``, a view of a bmm, read as ``matmul(a, b)`` over the batch dims the bmm merged
    (the Call's ``kwargs["bmm"]`` is the bmm). A reason instead when ``node`` has that shape
    (a view of a bmm whose operands are views of expands) but a step is not proven; None when
    it is not that spelling."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    bmm = node.args[0]
    product = canonical(bmm)
    if product is None or product.op != "matmul" or "bmm" in product.kwargs:
        return None
    merges = [_merged_operand(x) for x in product.args]
    if None in merges:
        return None
    (a, expand_a, view_a), (b, expand_b, view_b) = merges
    ta, tb, tea, teb, tva, tvb, tp, out = map(
        tensor_of, (a, b, expand_a, expand_b, view_a, view_b, bmm, node))
    if any(t is None for t in (ta, tb, tea, teb, tva, tvb, tp, out)):
        return f"{node.name}: a bmm on merged batch dims whose shapes are not known"
    if tea.dim() < 3 or tea.dim() != teb.dim() or not tva.dim() == tvb.dim() == tp.dim() == 3:
        return (f"{bmm.name} multiplies {_text(tva.shape)} by {_text(tvb.shape)} merged from "
                f"{_text(tea.shape)} and {_text(teb.shape)}: not one batch of matrices")
    batch = tuple(tea.shape[:-2])
    if not _known_equal(tuple(teb.shape[:-2]), batch):
        return (f"{expand_a.name} and {expand_b.name} broadcast the operands of {bmm.name} to "
                f"different batch dims, {_text(batch)} and {_text(teb.shape[:-2])}")
    for src, t, te in ((a, ta, tea), (b, tb, teb)):
        matrix, expanded = tuple(t.shape[-2:]), tuple(te.shape[-2:])
        if not 2 <= t.dim() <= te.dim() or not _known_equal(matrix, expanded):
            return (f"{src.name} {_text(t.shape)} is expanded to {_text(te.shape)}: not a "
                    "broadcast of its batch dims only")
    # expand lets each operand's size-1 dims grow to any size; matmul's broadcast grows them
    # only to the other operand's size
    for i in range(1, len(batch) + 1):
        sizes = [t.shape[-2 - i] if t.dim() >= 2 + i else 1 for t in (ta, tb)]
        if not any(_known_equal(x, batch[-i]) for x in (*sizes, 1)):
            return (f"{expand_a.name} and {expand_b.name} broadcast {_text(ta.shape)} and "
                    f"{_text(tb.shape)} to the batch dims {_text(batch)}, beyond their common "
                    "broadcast")
    merged = math.prod(batch)
    for view, tv, te in ((view_a, tva, tea), (view_b, tvb, teb)):
        if not _known_equal(tuple(tv.shape), (merged, *te.shape[-2:])):
            return (f"{view.name} reshapes {_text(te.shape)} to {_text(tv.shape)}, not merging its "
                    f"batch dims {_text(batch)} into one")
    if not _known_equal(tuple(out.shape), (*batch, *tp.shape[-2:])):
        return (f"{node.name} splits the product {bmm.name} {_text(tp.shape)} into "
                f"{_text(out.shape)}, not back into the batch dims {_text(batch)} its operands "
                "were merged from")
    return Call("matmul", (a, b), {"bmm": bmm})


def _merged_operand(view):
    """(source, expand, view) for ``view(expand(source))``, a clone between allowed (a copy,
    in whatever memory format: the same values); None for anything else."""
    c = canonical(view)
    if c is None or c.op != "reshape":
        return None
    expand = c.args[0]
    inner = canonical(expand)
    if inner is not None and inner.op == "contiguous":
        expand = inner.args[0]
        inner = canonical(expand)
    if inner is None or inner.op != "expand":
        return None
    return inner.args[0], expand, view


def _known_equal(x, y) -> bool:
    """Sizes (or tuples of them) equal for every input the graph may see. Symbolic sizes that
    are not provably equal count as different, and no guard is added for them."""
    if isinstance(x, tuple):
        return isinstance(y, tuple) and len(x) == len(y) and all(map(_known_equal, x, y))
    if isinstance(x, torch.SymInt) and isinstance(y, torch.SymInt) and x.node.expr == y.node.expr:
        return True   # one expression (4*s0 and 4*s0), the common case: no need for the solver
    return statically_known_true(sym_eq(x, y))


def _text(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def constant_value(node: Any, gm: Optional[fx.GraphModule] = None):
    """A Python number for a constant scalar: a literal, ``torch.full([], c)`` /
    ``torch.tensor(c)`` with constant arguments, or a one-element ``get_attr`` tensor.
    None when the value is not known while compiling."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        if node.target in (torch.full, aten.full.default) and len(node.args) >= 2:
            size, fill = node.args[0], node.args[1]
            if list(size) == [] and isinstance(fill, (int, float)):
                return fill
        if node.target in (torch.tensor, torch.scalar_tensor, aten.scalar_tensor.default):
            if node.args and isinstance(node.args[0], (int, float)):
                return node.args[0]
    if node.op == "get_attr" and gm is not None:
        try:
            t = operator.attrgetter(node.target)(gm)
        except AttributeError:
            return None
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.requires_grad:
            return t.item()
    return None


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.setitem}


def mutates(node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its inputs (x.add_(), x += y, x[i] = y, out=...)."""
    if node.op == "call_method":
        name = node.target
        return name.endswith("_") and not name.startswith("__") or name in ("__setitem__",)
    if node.op == "call_function":
        t = node.target
        if t in _INPLACE_OPERATORS or "out" in node.kwargs:
            return True
        if getattr(t, "__module__", None) == "_operator":
            return False  # operator.and_ / or_ end in "_" but return a new tensor
        schema = getattr(t, "_schema", None)
        if schema is not None:
            return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        name = getattr(t, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    return False


# torch.export puts aten._assert_tensor_metadata(x, dtype=...) before each .to(dtype): a check
# of x's metadata, not a reader of its values, and it returns nothing. Left in the graph it is
# a second user of the probabilities (softmax(..., dtype=float32).to(q.dtype), every HF model)
# and the site is skipped as probs_used_elsewhere; dropping it changes no value computed.
_PURE_EXTRA = {torch.Tensor.detach, torch.detach, aten.detach.default,
               aten._assert_tensor_metadata.default}


# what mask building calls (masks.py reads them), all pure
_PURE_FUNCTIONS = {
    torch.arange, torch.ones, torch.zeros, torch.full, torch.ones_like, torch.zeros_like,
    torch.full_like, torch.tensor, torch.scalar_tensor, torch.tril, torch.triu, torch.finfo,
    operator.eq, operator.ne, operator.le, operator.lt, operator.ge, operator.gt,
    operator.and_, operator.or_, operator.floordiv, operator.mod, torch.eq, torch.ne, torch.le,
    torch.lt, torch.ge, torch.gt, torch.logical_and, torch.logical_or, torch.bitwise_and,
    torch.bitwise_or}
_PURE_METHODS = {
    "detach", "size", "dim", "tril", "triu", "bool", "long", "int", "new_ones", "new_zeros",
    "new_full", "eq", "ne", "le", "lt", "ge", "gt", "__eq__", "__ne__", "__le__", "__lt__",
    "__ge__", "__gt__", "__and__", "__or__", "logical_and", "logical_or", "bitwise_and",
    "bitwise_or", "abs", "__floordiv__"}


def removable_if_unused(node: fx.Node, gm=None) -> bool:
    """Dead-code elimination may drop ``node``: a pure op we know, never one that mutates."""
    if node.op not in ("call_function", "call_method") or node.users or mutates(node):
        return False
    if node.op == "call_method" and node.target in _PURE_METHODS:
        return True
    return (node.target in _PURE_EXTRA or canonical(node, gm) is not None
            or node.target in _PURE_FUNCTIONS)


def is_runtime_number(x) -> bool:
    """A graph node holding a Python number computed at run time (``q.size(-1) ** -0.5``
    under dynamic shapes or symbolic_trace, ``tensor.item()``): used as a node, never folded."""
    if not isinstance(x, fx.Node):
        return False
    v = value_of(x)
    if v is None:
        # shape propagation on some torch versions records no value for Python-number nodes
        # (math.sqrt(q.size(-1)) in a symbolic_trace graph): recognise them by their op
        return x.op == "call_function" and (getattr(x.target, "__module__", None) == "math" or (
            x.target in (operator.pow, operator.truediv, operator.mul, operator.floordiv)
            and not any(isinstance(value_of(a), torch.Tensor) for a in x.args)))
    return isinstance(v, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(v, bool)
