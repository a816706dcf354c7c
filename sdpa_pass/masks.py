"""Step 3b: masks built in the graph become kernel predicates.

A model that builds its mask in ``forward`` (HF ``create_causal_mask``: aranges, ``kv_idx <=
q_idx``, ``padding_mask[batch_idx, kv_idx]``, ``where(mask, 0, finfo.min)``; transformers 5's
``position_ids[b, kv] <= position_ids[b, q]`` and packed-sequence test ``cumsum(diff(
position_ids) != 1)``; ``tril`` / ``triu`` of ``ones``; arange comparisons with a cache offset;
sliding windows) hands the scores an L x S
tensor whose every element is a known function of its position. This module evaluates the
mask's subgraph symbolically and, where it can prove the mask is

    visible(i, j) = [j <= i + d] and [j >= i + lo] and T_1[...] and ... and T_n[...]

for query row i, key column j, integer expressions d and lo, and graph tensors T (kept as they
are: a (B, 1, 1, S) padding mask, anything it cannot read), passes the first two to the
kernel as its causal alignment, diagonal and window, so the kernel skips masked tiles and no
L x S tensor is formed; the mask-building nodes then die.

The proof is symbolic: each integer is a sympy expression over the graph's size symbols (the
``SymInt``s Dynamo or ``torch.export`` put in the node values), and a causal offset counts as
bottom-right only when ``d - (S - L)`` simplifies to a constant, i.e. for every size the
compiled graph may see. An arange counts as the query (key) position only when its length
equals L (S) symbolically; one of length 1 broadcast along a longer dim is a constant.

Values (each with the node's shape, dims counted from the right so broadcasting keeps them):
  Idx    integer tensor  const + sum(coef * position along dim)
  Pred   bool tensor     conjunction of Ineq (sum(coef * position) + const <= 0) and Opaque
                         (a graph bool tensor, possibly negated)
  Const  every element the same number
  Sel    where(Pred, a, b) for numbers a, b
A node that is none of these is Opaque if it is bool and unreadable otherwise. Disjunctions
(``|``, ``~`` of a conjunction, ``!=``) are not read; such masks stay tensors.
"""

from __future__ import annotations

import dataclasses
import operator
import threading
from typing import Optional

import sympy
import torch
import torch.fx as fx

from sdpa_pass.kernels.checks import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from sdpa_pass.kernels.empty_rows import every_row_sees_a_key

from .canonicalize import canonical, mutates, tensor_of, value_of

aten = torch.ops.aten

# additive fills at or below this are exact "masked" values next to any score, so a row they
# cover entirely averages uniformly (s + fill rounds to fill in fp32 and bf16 for |s| < 1e31)
UNIFORM_FILL = -1.0e30


class NotLiftable(Exception):
    """The mask stays a tensor; args[0] says why."""


# ----------------------------------------------------------------------------- values

@dataclasses.dataclass(frozen=True)
class Term:
    dim: int          # negative: counted from the right
    coef: int
    length: object    # sympy size of the arange along that dim


@dataclasses.dataclass(frozen=True)
class Idx:
    shape: tuple
    const: object                 # sympy expression
    terms: tuple = ()


@dataclasses.dataclass(frozen=True)
class Ineq:
    terms: tuple                  # sum(coef * pos) + const <= 0
    const: object


@dataclasses.dataclass(frozen=True)
class Opaque:
    node: fx.Node
    negated: bool = False


@dataclasses.dataclass(frozen=True)
class Pred:
    shape: tuple
    atoms: tuple = ()             # conjunction; () is all-True


@dataclasses.dataclass(frozen=True)
class Not:
    """The negation of a conjunction of two or more atoms: a disjunction, not read itself,
    but ``masked_fill(~(a & b), -inf)`` masks where it holds, i.e. attends where a & b."""
    pred: Pred

    @property
    def shape(self):
        return self.pred.shape


@dataclasses.dataclass(frozen=True)
class Const:
    shape: tuple
    value: object


@dataclasses.dataclass(frozen=True)
class Sel:
    shape: tuple
    pred: Pred
    a: object                     # value where pred holds
    b: object                     # value elsewhere


def expr(x):
    """A sympy integer expression for an int, a SymInt or a node holding one; else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    if isinstance(x, fx.Node):
        v = value_of(x)
        if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
            return expr(v)
    return None


# The ShapeEnv of the graph being lifted: its value ranges hold for every input the compiled
# graph runs on (Dynamo's guards check them first; an exported program carries them), so a
# simplification under them (Mistral's cache offset Max(0, s - 3) is s - 3 when s >= 4) is a
# proof for the graph.
_env = threading.local()


def _simplify(e):
    e = sympy.expand(e)
    env = getattr(_env, "shape_env", None)
    if env is not None and not e.is_Integer:
        e = sympy.expand(env.simplify(e))
    return e


def same(a, b) -> bool:
    """Whether two size expressions are equal for every size the graph may see."""
    return a is not None and b is not None and _simplify(a - b) == 0


def constant_int(e) -> Optional[int]:
    e = _simplify(e)
    return int(e) if e.is_Integer else None


def _find_shape_env(gm, *sizes):
    for x in sizes:
        if isinstance(x, torch.SymInt):
            return x.node.shape_env
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        v = value_of(node)
        values = list(v.shape) if isinstance(v, torch.Tensor) else [v]
        for x in values:
            if isinstance(x, torch.SymInt):
                return x.node.shape_env
    return None


def _shape(node) -> tuple:
    t = tensor_of(node)
    if t is None:
        raise NotLiftable(f"{node} has no known shape")
    return tuple(expr(s) for s in t.shape)


def _dtype(node):
    t = tensor_of(node)
    return None if t is None else t.dtype


def _in_dtype(value, dtype):
    """``value`` as stored in a tensor of ``dtype`` (fp16 turns -3.4e38 into -inf)."""
    if dtype is None:
        return value
    return torch.tensor(value, dtype=dtype).item()


def _fit(terms, shape) -> tuple:
    """Terms of a value broadcast to ``shape``: an arange of length 1 stretched along a longer
    dim is the constant 0 there; one whose length differs otherwise cannot be read."""
    out = []
    for t in terms:
        if -t.dim > len(shape):
            raise NotLiftable("an index dim falls off the tensor")
        m = shape[t.dim]
        if same(t.length, m):
            out.append(t)
        elif t.length == 1:
            continue
        else:
            raise NotLiftable(f"an arange of length {t.length} broadcast to {m}")
    return _merge(out)


def _merge(terms) -> tuple:
    by_dim = {}
    for t in terms:
        if t.dim in by_dim:
            prev = by_dim[t.dim]
            by_dim[t.dim] = Term(t.dim, prev.coef + t.coef, t.length)
        else:
            by_dim[t.dim] = t
    return tuple(sorted((t for t in by_dim.values() if t.coef != 0), key=lambda t: t.dim))


# ----------------------------------------------------------------------------- evaluator

_ARANGE = {torch.arange, aten.arange.default, aten.arange.start, aten.arange.start_step}
_CONSTRUCT = {torch.ones: 1, torch.zeros: 0, aten.ones.default: 1, aten.zeros.default: 0,
              torch.ones_like: 1, torch.zeros_like: 0, aten.ones_like.default: 1,
              aten.zeros_like.default: 0}
_FULL = {torch.full, aten.full.default, torch.full_like, aten.full_like.default}
_SCALAR_TENSOR = {torch.tensor, torch.scalar_tensor, aten.scalar_tensor.default}
_TRIL = {torch.tril: "tril", aten.tril.default: "tril", torch.triu: "triu", aten.triu.default: "triu"}
_CMP = {operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt",
        operator.eq: "eq", operator.ne: "ne", torch.le: "le", torch.lt: "lt", torch.ge: "ge",
        torch.gt: "gt", torch.eq: "eq", torch.ne: "ne",
        aten.le.Tensor: "le", aten.lt.Tensor: "lt", aten.ge.Tensor: "ge", aten.gt.Tensor: "gt",
        aten.eq.Tensor: "eq", aten.ne.Tensor: "ne", aten.le.Scalar: "le", aten.lt.Scalar: "lt",
        aten.ge.Scalar: "ge", aten.gt.Scalar: "gt", aten.eq.Scalar: "eq", aten.ne.Scalar: "ne"}
_CMP_METHODS = {"le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne",
                "__le__": "le", "__lt__": "lt", "__ge__": "ge", "__gt__": "gt", "__eq__": "eq",
                "__ne__": "ne"}
_DIFF = {torch.diff, aten.diff.default}
_CUMSUM = {torch.cumsum, aten.cumsum.default}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and, aten.logical_and.default,
        aten.bitwise_and.Tensor}
_AND_METHODS = {"__and__", "logical_and", "bitwise_and"}
_OR = {operator.or_, torch.logical_or, torch.bitwise_or, aten.logical_or.default,
       aten.bitwise_or.Tensor, "__or__", "logical_or", "bitwise_or"}
_CAST_METHODS = {"bool", "long", "int", "float", "half", "bfloat16", "double", "to", "type_as",
                 "type"}
_NEW_METHODS = {"new_ones": 1, "new_zeros": 0}


class Evaluator:
    def __init__(self, gm):
        self.gm = gm
        self.memo = {}
        self.why = {}      # bool node kept as a tensor -> why it was not read
        self.written = _written_in_place(gm)

    def __call__(self, x):
        """The symbolic value of a node or Python number; raises NotLiftable."""
        if not isinstance(x, fx.Node):
            if isinstance(x, bool):
                return Const((), x)
            if isinstance(x, (int, float)):
                return Const((), x)
            e = expr(x)
            if e is not None:
                return Idx((), e)
            raise NotLiftable(f"argument {x!r}")
        if x not in self.memo:
            try:
                self.memo[x] = self._eval(x)
            except NotLiftable as why:
                if _dtype(x) != torch.bool:
                    raise
                self.memo[x] = Pred(_shape(x), (Opaque(x),))
                self.why[x] = why.args[0]
        return self.memo[x]

    # -- dispatch
    def _eval(self, node):
        v = value_of(node)
        if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
            return Idx((), expr(v))
        if not isinstance(v, torch.Tensor):
            raise NotLiftable(f"{node.name} is not a tensor")
        if node.op not in ("call_function", "call_method"):
            raise NotLiftable(_outside(node))
        if node in self.written:
            # attn_bias = zeros(L, S); attn_bias.masked_fill_(...): the node's own op is not
            # what the mask holds when it is read (the SDPA docs' reference does this)
            raise NotLiftable(f"{node.name} is written in place")
        t, a, kw = node.target, node.args, node.kwargs
        shape, dtype = _shape(node), v.dtype
        method = node.op == "call_method"
        if not method and t in _ARANGE:
            return self._arange(node, shape, dtype)
        if not method and t in _CONSTRUCT:
            return Const(shape, _in_dtype(_CONSTRUCT[t], dtype))
        if not method and t in _FULL:
            return self._full(a[1] if len(a) > 1 else kw.get("fill_value"), shape, dtype)
        if not method and t in _SCALAR_TENSOR:
            return self._full(a[0] if a else None, shape, dtype)
        if method and t in _NEW_METHODS:
            return Const(shape, _in_dtype(_NEW_METHODS[t], dtype))
        if method and t == "new_full":
            return self._full(a[2] if len(a) > 2 else kw.get("fill_value"), shape, dtype)
        if (not method and t in _TRIL) or (method and t in ("tril", "triu")):
            kind = t if method else _TRIL[t]
            d = a[1] if len(a) > 1 else kw.get("diagonal", 0)
            return self._tril(self(a[0]), kind, d, shape, dtype)
        if (not method and t in _DIFF) or (method and t == "diff"):
            return self._diff(node, shape)
        if (not method and t in _CUMSUM) or (method and t == "cumsum"):
            return self._cumsum(node, shape, dtype)
        cmp = _CMP_METHODS.get(t) if method else _CMP.get(t)
        if cmp is not None:
            return self._compare(cmp, self(a[0]), self(a[1]), shape)
        if t in _OR:
            raise NotLiftable(f"{node.name} is a disjunction (|)")
        if (method and t in _AND_METHODS) or (not method and t in _AND):
            return self._and(self(a[0]), self(a[1]), shape)
        if method and t in _CAST_METHODS:
            return self._cast(self(a[0]), shape, dtype)
        c = canonical(node, self.gm)
        if c is None:
            raise NotLiftable(f"{node.name} ({getattr(t, '__name__', t)}) is not read")
        return self._canonical(node, c, shape, dtype)

    def _canonical(self, node, c, shape, dtype):
        op = c.op
        if op == "cast":
            return self._cast(self(c.args[0]), shape, dtype)
        if op == "contiguous":
            return _restate(self(c.args[0]), shape)
        if op in ("add", "sub", "mul"):
            return self._arith(op, self(c.args[0]), self(c.args[1]), shape, dtype)
        if op == "neg":
            return self._arith("mul", self(c.args[0]), Const((), -1), shape, dtype)
        if op == "logical_not":
            return self._not(self(c.args[0]), shape)
        if op == "where":
            return self._where(self(c.args[0]), self(c.args[1]), self(c.args[2]), shape, dtype)
        if op == "masked_fill":
            return self._where(self(c.args[1]), self(c.args[2]), self(c.args[0]), shape, dtype)
        if op == "getitem" and _tensor_indices(c.args[1]):
            return self._gather(self(c.args[0]), c.args[1], shape)
        if op in ("expand", "reshape", "unsqueeze", "getitem", "permute"):
            return self._view(node, c, shape)
        raise NotLiftable(f"{node.name} ({op}) is not read")

    def _gather(self, x, index, shape):
        """x[I_0, ..., I_n-1], one integer index tensor per dim of x (HF's
        ``position_ids[batch_idx, kv_idx]``): the indices' positions substituted into x's, where
        every index provably stays inside its dim (eager would raise, or wrap a negative one)."""
        if not isinstance(x, (Idx, Const)) or not _is_int(x) or len(index) != len(x.shape):
            raise NotLiftable("indexing with tensors of a value that is not positions")
        x_shape, x = x.shape, _as_idx(x, x.shape)
        out = Idx(shape, x.const, ())
        for d, node in enumerate(index):
            i = self(node)
            if not isinstance(i, (Idx, Const)) or not _is_int(i):
                raise NotLiftable("an index tensor that is not positions")
            i = _as_idx(i, shape)
            if not _inside(i, x_shape[d]):
                raise NotLiftable("an index tensor that may fall outside its dim")
            coef = sum(t.coef for t in x.terms if t.dim == d - len(x_shape))
            if coef:
                out = _idx_add(out, _idx_scale(i, coef), shape)
        return out

    # -- leaves
    def _arange(self, node, shape, dtype):
        if dtype.is_floating_point or dtype == torch.bool:
            raise NotLiftable("a floating-point arange")
        a, kw = node.args, node.kwargs
        if len(a) >= 2:
            start, step = a[0], a[2] if len(a) > 2 else kw.get("step", 1)
        else:
            start, step = kw.get("start", 0), kw.get("step", 1)
        if step != 1:
            raise NotLiftable("an arange with a step")
        s = expr(start)
        if s is None:
            raise NotLiftable("an arange with a non-integer start")
        return Idx(shape, s, (Term(-1, 1, shape[-1]),))

    def _full(self, value, shape, dtype):
        if isinstance(value, (bool, int, float)):
            return Const(shape, _in_dtype(value, dtype))
        raise NotLiftable("a fill value not known while compiling")

    def _tril(self, x, kind, d, shape, dtype):
        e = expr(d)
        if e is None or len(shape) < 2:
            raise NotLiftable("tril/triu with a diagonal not known while compiling")
        i, j = Term(-2, 1, shape[-2]), Term(-1, 1, shape[-1])
        # tril keeps j - i <= d; triu keeps j - i >= d
        if kind == "tril":
            keep = Ineq(_merge([j, Term(-2, -1, shape[-2])]), -e)
        else:
            keep = Ineq(_merge([Term(-1, -1, shape[-1]), i]), e)
        zero = _in_dtype(0, dtype)
        if isinstance(x, Const):
            if dtype == torch.bool:
                return Pred(shape, (keep,)) if x.value else Const(shape, False)
            return Sel(shape, Pred(shape, (keep,)), x.value, zero)
        if isinstance(x, Pred) and dtype == torch.bool:
            return Pred(shape, _and_atoms(_restate(x, shape).atoms, (keep,)))
        raise NotLiftable("tril/triu of a tensor that is not constant")

    # -- operations
    def _diff(self, node, shape):
        """torch.diff(x, prepend=p, dim=-1) of positions: constant when every step along the
        last dim is the same and the first element minus ``p`` is that step too (HF's
        packed-sequence test over arange positions: all ones)."""
        a, kw = list(node.args), dict(node.kwargs)
        names = ("input", "n", "dim", "prepend", "append")
        args = {**dict(zip(names, a)), **kw}
        n, dim = args.get("n", 1), args.get("dim", -1)
        if n != 1 or args.get("append") is not None or args.get("prepend") is None \
                or dim not in (-1, len(shape) - 1):
            raise NotLiftable("a diff other than one step along the last dim after a prepend")
        x, first = self(args["input"]), self(args["prepend"])
        if not all(isinstance(v, (Idx, Const)) and _is_int(v) for v in (x, first)):
            raise NotLiftable("a diff of values that are not positions")
        x = _as_idx(x, shape)
        step = sum(t.coef for t in x.terms if t.dim == -1)
        rest = Idx(shape[:-1] + (1,), x.const, tuple(t for t in x.terms if t.dim != -1))
        head = _idx_sub(rest, _as_idx(first, shape[:-1] + (1,)), shape[:-1] + (1,))
        # a term along a dim of length 1 is position 0 there: a constant
        if any(not same(t.length, 1) for t in head.terms) or constant_int(head.const) != step:
            raise NotLiftable("a diff whose steps are not all the same")
        return Const(shape, step)

    def _cumsum(self, node, shape, dtype):
        """cumsum of a constant c along a dim: c * (position + 1)."""
        a, kw = node.args, node.kwargs
        dim = a[1] if len(a) > 1 else kw.get("dim")
        x = self(a[0])
        if not isinstance(x, Const) or not isinstance(dim, int) or dtype.is_floating_point:
            raise NotLiftable("a cumsum of values that are not one integer")
        c = int(x.value)
        if c == 0:
            return Const(shape, 0)
        d = dim - len(shape) if dim >= 0 else dim
        return Idx(shape, sympy.Integer(c), (Term(d, c, shape[d]),))

    def _compare(self, op, x, y, shape):
        if isinstance(x, (Idx, Const)) and isinstance(y, (Idx, Const)) and \
                _is_int(x) and _is_int(y):
            diff = _idx_sub(_as_idx(x, shape), _as_idx(y, shape), shape)   # x - y
            c = constant_int(diff.const) if not diff.terms else None
            if c is not None:   # the same number everywhere
                return Const(shape, {"le": c <= 0, "lt": c < 0, "ge": c >= 0, "gt": c > 0,
                                     "eq": c == 0, "ne": c != 0}[op])
            if op == "le":
                return Pred(shape, (Ineq(diff.terms, diff.const),))
            if op == "lt":
                return Pred(shape, (Ineq(diff.terms, diff.const + 1),))
            neg = _idx_scale(diff, -1)
            if op == "ge":
                return Pred(shape, (Ineq(neg.terms, neg.const),))
            if op == "gt":
                return Pred(shape, (Ineq(neg.terms, neg.const + 1),))
            if op == "eq":
                return Pred(shape, (Ineq(diff.terms, diff.const), Ineq(neg.terms, neg.const)))
            raise NotLiftable("!= of positions is a disjunction")
        # a selection compared with a number: which of its two values pass
        sel, num, flip = (x, y, False) if isinstance(y, Const) and not y.shape else (y, x, True)
        if isinstance(sel, Pred):
            sel = Sel(sel.shape, sel, True, False)
        if isinstance(sel, Sel) and isinstance(num, Const) and not num.shape:
            fn = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt,
                  "eq": operator.eq, "ne": operator.ne}[op]
            test = (lambda v: fn(num.value, v)) if flip else (lambda v: fn(v, num.value))
            return _select_bool(sel.pred, test(sel.a), test(sel.b), shape)
        raise NotLiftable(f"a comparison ({op}) of values that are not positions")

    def _and(self, x, y, shape):
        x, y = _as_pred(x, shape), _as_pred(y, shape)
        if isinstance(x, Const) or isinstance(y, Const):
            if isinstance(x, Const) and isinstance(y, Const):
                return Const(shape, bool(x.value and y.value))
            c, p = (x, y) if isinstance(x, Const) else (y, x)
            return _restate(p, shape) if c.value else Const(shape, False)
        return Pred(shape, _and_atoms(_restate(x, shape).atoms, _restate(y, shape).atoms))

    def _not(self, x, shape):
        if isinstance(x, Const) and isinstance(x.value, bool):
            return Const(shape, not x.value)
        if isinstance(x, Sel) and isinstance(x.a, bool):
            return Sel(shape, x.pred, not x.a, not x.b)
        if isinstance(x, (Pred, Not)):
            return negation(_restate(x, shape))
        raise NotLiftable("~ of a value that is not a predicate")

    def _cast(self, x, shape, dtype):
        if dtype == torch.bool:
            if isinstance(x, (Pred, Not)):
                return _restate(x, shape)
            if isinstance(x, Const):
                return Const(shape, bool(x.value))
            if isinstance(x, Sel):
                return _select_bool(x.pred, bool(x.a), bool(x.b), shape)
            raise NotLiftable("a cast of positions to bool")
        if isinstance(x, Pred):
            x = Sel(x.shape, x, 1, 0)
        if isinstance(x, Const):
            return Const(shape, _in_dtype(x.value, dtype))
        if isinstance(x, Sel):
            return Sel(shape, _restate(x.pred, shape), _in_dtype(x.a, dtype), _in_dtype(x.b, dtype))
        if isinstance(x, Idx) and not dtype.is_floating_point:
            return Idx(shape, x.const, _fit(x.terms, shape))
        raise NotLiftable("a cast of positions to floating point")

    def _arith(self, op, x, y, shape, dtype):
        if isinstance(x, (Idx, Const)) and isinstance(y, (Idx, Const)) and _is_int(x) and _is_int(y) \
                and not dtype.is_floating_point and dtype != torch.bool:
            xi, yi = _as_idx(x, shape), _as_idx(y, shape)
            if op == "add":
                return _idx_add(xi, yi, shape)
            if op == "sub":
                return _idx_sub(xi, yi, shape)
            for u, w in ((xi, yi), (yi, xi)):
                c = constant_int(u.const) if not u.terms else None
                if c is not None:
                    return _idx_scale(Idx(shape, w.const, _fit(w.terms, shape)), c)
            raise NotLiftable("a product of two positions")
        if dtype == torch.bool:
            if op == "mul":
                return self._and(x, y, shape)
            raise NotLiftable(f"{op} of bool tensors")
        # numbers: a selection and a constant
        fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[op]
        x, y = _as_sel(x), _as_sel(y)
        if isinstance(x, Const) and isinstance(y, Const):
            return Const(shape, _in_dtype(fn(x.value, y.value), dtype))
        if isinstance(x, Sel) and isinstance(y, Const) and not y.shape:
            return Sel(shape, _restate(x.pred, shape), _in_dtype(fn(x.a, y.value), dtype),
                       _in_dtype(fn(x.b, y.value), dtype))
        if isinstance(y, Sel) and isinstance(x, Const) and not x.shape:
            return Sel(shape, _restate(y.pred, shape), _in_dtype(fn(x.value, y.a), dtype),
                       _in_dtype(fn(x.value, y.b), dtype))
        raise NotLiftable(f"{op} of tensors that are not a selection and a number")

    def _where(self, cond, x, y, shape, dtype):
        cond = _as_pred(cond, shape)
        if isinstance(cond, Const):
            return _restate(x if cond.value else y, shape)
        x, y = _as_sel(x), _as_sel(y)
        if isinstance(x, Const) and isinstance(y, Const):
            if dtype == torch.bool:
                return _select_bool(cond, bool(x.value), bool(y.value), shape)
            return Sel(shape, _restate(cond, shape), _in_dtype(x.value, dtype), _in_dtype(y.value, dtype))
        if isinstance(x, Sel) and isinstance(y, Const) and x.b == y.value:
            # where(c, where(p, a, b), b) = where(c and p, a, b)
            pred = Pred(shape, _and_atoms(_restate(cond, shape).atoms, _restate(x.pred, shape).atoms))
            return Sel(shape, pred, _in_dtype(x.a, dtype), _in_dtype(x.b, dtype))
        if isinstance(y, Sel) and isinstance(x, Const) and y.b == x.value and len(cond.atoms) == 1:
            # where(c, b, where(p, a, b)) = where(not c and p, a, b)
            pred = Pred(shape, _and_atoms((_negate(_restate(cond, shape).atoms[0]),),
                                          _restate(y.pred, shape).atoms))
            return Sel(shape, pred, _in_dtype(y.a, dtype), _in_dtype(y.b, dtype))
        raise NotLiftable("where/masked_fill whose branches are not constants")

    def _view(self, node, c, shape):
        x = self(c.args[0])
        in_shape = x.shape
        if isinstance(x, Const):
            return Const(shape, x.value)
        op = c.op
        if op == "expand":
            return _restate(x, shape)
        dims = _dim_map(op, c, in_shape, shape)
        if dims is None:
            raise NotLiftable(f"a {op} view that is not read")
        return _remap(x, dims, in_shape, shape)


# ----------------------------------------------------------------------------- helpers

# ops whose output is a new tensor, never a view of an input
_FRESH = {"matmul", "baddbmm", "einsum", "mul", "div", "add", "sub", "masked_fill", "where",
          "softmax", "tanh", "neg", "logical_not", "dropout", "repeat_interleave"}


def _written_in_place(gm) -> set:
    """Nodes whose tensor an in-place op may change (the written tensor and everything it may
    be a view of). Conservative: through any op not known to return a fresh tensor."""
    written = set()
    for node in gm.graph.nodes:
        if not mutates(node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        stack = [node.args[0]]
        while stack:
            x = stack.pop()
            if x in written:
                continue
            written.add(x)
            c = canonical(x, gm)
            fresh = (c is not None and c.op in _FRESH) or x.target in _CMP or x.target in _AND \
                or x.target in _ARANGE or x.target in _CONSTRUCT or x.target in _FULL \
                or x.target in _TRIL
            if not fresh:
                stack.extend(a for a in x.all_input_nodes)
    return written


def _outside(node) -> str:
    if node.op in ("placeholder", "get_attr"):
        return (f"{node.name} is an input of the graph (a buffer or an argument): its values "
                "are not built in the graph")
    return f"{node.name} is a float tensor the pass does not read"


def _is_int(x) -> bool:
    if isinstance(x, Idx):
        return True
    return isinstance(x, Const) and isinstance(x.value, int) and not isinstance(x.value, bool)


def _tensor_indices(index) -> bool:
    """Whether a getitem index is a tuple of tensors only (advanced indexing of every dim)."""
    return isinstance(index, tuple) and bool(index) and all(isinstance(i, fx.Node) for i in index)


def _inside(i: Idx, length) -> bool:
    """Whether every value of ``i`` is provably in [0, length)."""
    lo = hi = i.const
    for t in i.terms:
        span = t.coef * (t.length - 1)
        lo, hi = (lo, hi + span) if t.coef > 0 else (lo + span, hi)
    return all(_nonnegative(e) for e in (lo, length - 1 - hi))


def _nonnegative(e) -> bool:
    """Whether the size expression ``e`` is >= 0 for every size the graph may see."""
    e = _simplify(sympy.sympify(e))
    if e.is_Integer:
        return bool(e >= 0)
    if e.is_nonnegative:
        return True
    env = getattr(_env, "shape_env", None)
    return env is not None and env._maybe_evaluate_static(sympy.Ge(e, 0)) == sympy.true


def _as_idx(x, shape) -> Idx:
    if isinstance(x, Const):
        return Idx((), sympy.Integer(x.value))
    return x


def _idx_add(x: Idx, y: Idx, shape) -> Idx:
    return Idx(shape, x.const + y.const, _fit(_merge(_fit(x.terms, shape) + _fit(y.terms, shape)), shape))


def _idx_scale(x: Idx, c: int) -> Idx:
    return Idx(x.shape, x.const * c, tuple(Term(t.dim, t.coef * c, t.length) for t in x.terms))


def _idx_sub(x: Idx, y: Idx, shape) -> Idx:
    return _idx_add(x, _idx_scale(y, -1), shape)


def _negate(atom):
    if isinstance(atom, Opaque):
        return Opaque(atom.node, not atom.negated)
    # not (sum + c <= 0)  <=>  sum + c >= 1  <=>  -sum - c + 1 <= 0
    return Ineq(tuple(Term(t.dim, -t.coef, t.length) for t in atom.terms), -atom.const + 1)


def _and_atoms(a, b) -> tuple:
    out = list(a)
    for x in b:
        if x not in out:
            out.append(x)
    return tuple(out)


def _as_pred(x, shape):
    if isinstance(x, Pred):
        return x
    if isinstance(x, Const) and isinstance(x.value, bool):
        return x
    if isinstance(x, Sel) and isinstance(x.a, bool):
        return _select_bool(x.pred, x.a, x.b, shape)
    raise NotLiftable("a condition that is not a predicate")


def _as_sel(x):
    if isinstance(x, Pred):
        return Sel(x.shape, x, True, False)
    return x


def negation(x):
    """not x, for a Pred, a Not or a bool Const."""
    if isinstance(x, Not):
        return x.pred
    if isinstance(x, Const):
        return Const(x.shape, not x.value)
    if len(x.atoms) == 1:
        return Pred(x.shape, (_negate(x.atoms[0]),))
    if not x.atoms:
        return Const(x.shape, False)
    return Not(x)


def _select_bool(pred, a: bool, b: bool, shape):
    if a and not b:
        return _restate(pred, shape)
    if b and not a:
        return negation(_restate(pred, shape))
    return Const(shape, bool(a))


def _restate(x, shape):
    """``x`` broadcast to ``shape`` (dims kept from the right)."""
    if isinstance(x, Const):
        return Const(shape, x.value)
    if isinstance(x, Idx):
        return Idx(shape, x.const, _fit(x.terms, shape))
    if isinstance(x, Pred):
        atoms = []
        for a in x.atoms:
            if isinstance(a, Ineq):
                atoms.append(Ineq(_fit(a.terms, shape), a.const))
            else:
                atoms.append(a)
        return Pred(shape, tuple(atoms))
    if isinstance(x, Sel):
        return Sel(shape, _restate(x.pred, shape), x.a, x.b)
    if isinstance(x, Not):
        return Not(_restate(x.pred, shape))
    raise NotLiftable("a value that cannot be broadcast")


def _dim_map(op, c, in_shape, out_shape):
    """For a view: {input dim (from the right): (output dim (from the right), start offset)},
    the input dims not listed being size 1 (or indexed away, with their offset); None if the
    view is not read."""
    rin, rout = len(in_shape), len(out_shape)
    if op == "unsqueeze":
        p = c.args[1] if c.args[1] >= 0 else c.args[1] + rin + 1
        return {k - rin: ((k if k < p else k + 1) - rout, 0) for k in range(rin)}
    if op == "permute":
        perm = [d % rin for d in c.args[1]]
        return {perm[o] - rin: (o - rout, 0) for o in range(rout)}
    if op == "reshape":
        # only size-1 dims inserted or removed
        kin = [k for k in range(rin) if in_shape[k] != 1]
        kout = [k for k in range(rout) if out_shape[k] != 1]
        if len(kin) != len(kout) or not all(same(in_shape[a], out_shape[b]) for a, b in zip(kin, kout)):
            return None
        return {a - rin: (b - rout, 0) for a, b in zip(kin, kout)}
    if op == "getitem":
        idx = c.args[1]
        if not isinstance(idx, tuple):
            idx = (idx,)
        n_real = sum(1 for s in idx if s is not None and s is not Ellipsis)
        if sum(1 for s in idx if s is Ellipsis) > 1 or n_real > rin:
            return None
        dims, k, o = {}, 0, 0
        for s in idx:
            if s is None:
                o += 1
            elif s is Ellipsis:
                for _ in range(rin - n_real):
                    dims[k - rin] = (o - rout, 0)
                    k += 1
                    o += 1
            elif isinstance(s, slice):
                if s.step not in (None, 1) or not (s.start is None or (isinstance(s.start, int) and s.start >= 0)):
                    return None
                dims[k - rin] = (o - rout, s.start or 0)
                k += 1
                o += 1
            elif isinstance(s, int) and not isinstance(s, bool) and s >= 0:
                dims[k - rin] = (None, s)
                k += 1
            else:
                return None
        while k < rin:
            dims[k - rin] = (o - rout, 0)
            k += 1
            o += 1
        return dims
    return None


def _remap_terms(terms, dims, out_shape):
    """Index terms through a view: a slice starting at ``start`` shifts positions by it, an
    integer index fixes them."""
    const = 0
    out = []
    for t in terms:
        if t.dim not in dims:
            if t.length != 1:
                raise NotLiftable("a view moves an index dim")
            continue
        new_dim, start = dims[t.dim]
        const += t.coef * start
        if new_dim is not None:
            out.append(Term(new_dim, t.coef, out_shape[new_dim]))
    return tuple(out), const


def _remap(x, dims, in_shape, shape):
    if isinstance(x, Idx):
        terms, c = _remap_terms(x.terms, dims, shape)
        return Idx(shape, x.const + c, _merge(terms))
    if isinstance(x, Pred):
        # a graph tensor in the conjunction keeps its meaning only if the view leaves every dim
        # where broadcasting puts it (size-1 dims added on the left, nothing sliced or moved)
        keeps = len(dims) == len(in_shape) and all(
            v == (k, 0) and same(in_shape[k], shape[k]) for k, v in dims.items())
        atoms = []
        for a in x.atoms:
            if isinstance(a, Opaque):
                if not keeps:
                    raise NotLiftable("a view of a mask that holds a graph tensor")
                atoms.append(a)
            else:
                terms, c = _remap_terms(a.terms, dims, shape)
                atoms.append(Ineq(_merge(terms), a.const + c))
        return Pred(shape, tuple(atoms))
    if isinstance(x, Sel):
        return Sel(shape, _remap(x.pred, dims, in_shape, shape), x.a, x.b)
    if isinstance(x, Not):
        return Not(_remap(x.pred, dims, in_shape, shape))
    raise NotLiftable("a view of an unread value")


# ----------------------------------------------------------------------------- sites



@dataclasses.dataclass
class Lift:
    """What the kernel gets instead of the site's masks."""

    causal_align: int
    diagonal: int
    window: int
    residual: list               # (kind, node): masks kept as tensors (analyse.Mask kinds)
    uniform_on_empty: bool       # the masks were finite fills: empty rows average uniformly
    fills: bool                  # ... written with masked_fill / where on the scores
    notes: list = dataclasses.field(default_factory=list)  # why residual L x S parts stay

    @property
    def text(self) -> str:
        if self.causal_align == CAUSAL_NONE:
            return "none"
        name = {CAUSAL_TOP_LEFT: "top-left", CAUSAL_BOTTOM_RIGHT: "bottom-right"}[self.causal_align]
        if self.diagonal:
            name += f"{self.diagonal:+d}"
        if self.window != -1:
            name += f", window {self.window}"
        return name


def _fill_class(fill: float) -> str:
    if fill == float("-inf"):
        return "nan"
    if fill <= UNIFORM_FILL:
        return "uniform"
    raise NotLiftable(f"an additive fill of {fill:g} is not large enough for a row masked "
                      "everywhere to average uniformly, as eager's does")


def lift_site(masks, L, S, gm, allow_uniform: bool) -> Lift:
    """Read the site's masks (``analyse.Mask`` list, graph order) as a causal offset, a
    window and the tensors that stay; raises NotLiftable with the reason otherwise.
    ``L`` and ``S`` are the kernel's query and key lengths (ints or SymInts)."""
    _env.shape_env = _find_shape_env(gm, L, S)
    try:
        return _lift_site(masks, expr(L), expr(S), gm, allow_uniform)
    finally:
        _env.shape_env = None


def _lift_site(masks, L, S, gm, allow_uniform: bool) -> Lift:
    ev = Evaluator(gm)
    classes, fill_kinds, fills = set(), set(), []
    atoms, residual = [], []
    for m in masks:
        if m.expand is not None or m.reshape is not None:
            raise NotLiftable("a mask applied in another view of the scores")
        if m.kind == "additive":
            try:
                v = ev(m.node)
            except NotLiftable:
                residual.append(("additive", m.node))
                classes.add("float")
                continue
            if isinstance(v, Const) and v.value == 0:
                continue
            if not isinstance(v, Sel):
                residual.append(("additive", m.node))
                classes.add("float")
                continue
            if v.a == 0 and v.b != 0:
                attend, fill = v.pred, v.b
            elif v.b == 0 and v.a != 0:
                attend, fill = negation(v.pred), v.a
            else:
                raise NotLiftable("an additive mask whose values are not 0 and a fill")
            classes.add(_fill_class(float(fill)))
            fill_kinds.add("additive")
            fills.append(("additive", float(fill)))
        else:
            cond = ev(m.node)
            if not isinstance(cond, Not):
                cond = _as_pred(cond, _shape(m.node))
            attend = negation(cond) if m.kind in ("bool_masked", "fill_min") else cond
            classes.add("nan" if m.kind.startswith("bool") else "uniform")
            if m.kind.startswith("fill"):
                fill_kinds.add("fill")
                fills.append(("fill", m.fill))
        if isinstance(attend, Not):
            raise NotLiftable("the mask is a disjunction")
        if isinstance(attend, Const):
            if not attend.value:
                raise NotLiftable("the mask hides every key")
            continue
        for a in attend.atoms:
            if isinstance(a, Opaque):
                residual.append(("bool_masked" if a.negated else "bool_attend", a.node))
            else:
                atoms.append(a)
    if "uniform" in classes and len(classes) > 1:
        raise NotLiftable("finite fills mixed with -inf masks or float biases")
    if "uniform" in classes and not _one_fill(fills):
        # a row masked everywhere averages the keys holding the largest fill, not every key:
        # -1e9 here and finfo.min there, or two finfo.min biases adding up to -inf
        raise NotLiftable("several different finite fills on one site")
    causal, diagonal, window = _kernel_predicate(atoms, L, S)
    uniform = "uniform" in classes
    if uniform and not allow_uniform:
        # A row filled everywhere would average uniformly, which the op cannot do with
        # soft-capping or dropout; with no such row the fills are exact zeros of P anyway.
        if residual or not every_row_sees_a_key(L, S, causal, diagonal, window, _nonnegative):
            raise NotLiftable("finite fills with soft-capping or dropout, on rows that may see "
                              "no key")
        uniform = False
    notes = []
    for _, node in residual:
        shape = _shape(node)
        if len(shape) >= 2 and shape[-1] != 1 and shape[-2] != 1:
            notes.append(ev.why.get(node) or _outside(node))
    return Lift(causal, diagonal, window, residual, uniform,
                uniform and fill_kinds == {"fill"}, notes)


def _one_fill(fills) -> bool:
    """Whether every masked position ends up holding one and the same value: masked_fill steps
    that all write one value, or a single additive fill."""
    kinds = {k for k, _ in fills}
    if kinds == {"fill"}:
        return len({v for _, v in fills}) == 1
    return len(fills) <= 1


def _describe(a: Ineq) -> str:
    names = {-2: "i", -1: "j"}
    lhs = " + ".join(f"{t.coef}*{names.get(t.dim, f'dim{t.dim}')}" for t in a.terms) or "0"
    return f"{lhs} + {a.const} <= 0"


def _kernel_predicate(atoms, L, S):
    uppers, lowers = [], []
    for a in atoms:
        coefs = {}
        for t in a.terms:
            want = {-2: L, -1: S}.get(t.dim)
            if want is None or not same(t.length, want):
                raise NotLiftable(f"a positional mask over a dim that is not the query or key "
                                  f"position ({_describe(a)})")
            coefs[t.dim] = t.coef
        key = (coefs.get(-2, 0), coefs.get(-1, 0))
        if _always(a, L, S):      # e.g. HF's bidirectional q_idx >= 0
            continue
        if key == (-1, 1):        # j - i + c <= 0: j <= i - c
            uppers.append(-a.const)
        elif key == (1, -1):      # i - j + c <= 0: j >= i + c
            lowers.append(a.const)
        elif key == (0, 0):
            c = constant_int(a.const)
            if c is None or c > 0:
                raise NotLiftable("a mask that hides every key, or may")
        else:
            raise NotLiftable(f"a positional mask that is not causal or a window ({_describe(a)})")
    upper = _tightest(uppers, min)
    lower = _tightest(lowers, max)
    if upper is None:
        if lower is not None:
            raise NotLiftable("a window without a causal bound")
        return CAUSAL_NONE, 0, -1
    # the same diagonal may read both ways (L == S, or static sizes): prefer the corner it
    # passes through, then top-left
    top, bottom = constant_int(upper), constant_int(upper - (S - L))
    if bottom == 0 and top != 0:
        causal, diagonal = CAUSAL_BOTTOM_RIGHT, 0
    elif top is not None:
        causal, diagonal = CAUSAL_TOP_LEFT, top
    elif bottom is not None:
        causal, diagonal = CAUSAL_BOTTOM_RIGHT, bottom
    else:
        raise NotLiftable(f"the causal diagonal {upper} is not a constant distance from a "
                          "corner of the scores")
    window = -1
    if lower is not None:
        w = constant_int(upper - lower + 1)
        if w is None:
            raise NotLiftable(f"the window {upper - lower + 1} is not a constant")
        if w < 1:
            raise NotLiftable("the window hides every key")
        window = w
    return causal, diagonal, window


def _always(a: Ineq, L, S) -> bool:
    """Whether the atom holds at every position 0 <= i < L, 0 <= j < S."""
    lengths = {-2: L, -1: S}
    worst = a.const + sum(t.coef * (lengths[t.dim] - 1) for t in a.terms if t.coef > 0)
    e = _simplify(worst)
    if e.is_Integer:
        return int(e) <= 0
    env = getattr(_env, "shape_env", None)
    return env is not None and env._maybe_evaluate_static(sympy.Le(e, 0)) == sympy.true


def _tightest(bounds, pick):
    if not bounds:
        return None
    best = bounds[0]
    for b in bounds[1:]:
        diff = constant_int(b - best)
        if diff is None:
            raise NotLiftable("two causal bounds at a distance that is not constant")
        best = pick(best, b, key=lambda e: constant_int(e - bounds[0]))
    return best
