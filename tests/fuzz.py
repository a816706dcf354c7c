"""Random hand-written attention for differential fuzzing of the pass (issue 9).

``generate(seed)`` builds, from ``random.Random(seed)``, the source text of a small
``nn.Module`` with one or two attention sites, each combining at random:

  layout          (B, H, L, D) | (B, L, H, D) transposed in forward | merged heads (B*H, L, D)
  scores product  @ | torch.matmul | Tensor.matmul + .mT | permute | einsum (incl. straight on
                  (B, L, H, D)) | bmm on merged heads | baddbmm(beta=0, alpha=scale) | K pre-permuted
                  (0, 2, 3, 1) as Whisper does
  scale           none | on the scores (* / or scalar on the left, 0-d tensor) | on q | on k
                  (before or after the transpose) | d ** -0.25 on both | baddbmm alpha
  masks (0-2)     bool masked_fill (~m, m == 0, True = masked), torch.where either way round,
                  fills -inf / finfo.min / -1e4 / -1e9, additive float biases (HF 0/finfo.min,
                  0/-inf, ALiBi-like), causal built in the graph from tril / triu / arange
                  (any diagonal offset, bottom-right, sliding window), nanoGPT tril buffers,
                  nn.Transformer's triu(full(-inf)), a (B, S) key-padding mask, BERT's
                  (1 - m) * -10000, masks in every broadcast shape, BART's 4-D view of 3-D scores
  soft-capping    Gemma 2's tanh(s / cap) * cap, sometimes
  softmax         F.softmax | torch.softmax | .softmax | nn.Softmax | positive dim, with
                  dtype=float32 and .to / .type_as back, or .float() first
  dropout         none | eval-mode nn.Dropout / F.dropout(training=False) | p = 0 in training
  GQA             none | HF repeat_kv | unsqueeze + expand + reshape | repeat_interleave |
                  a 1-head K/V broadcast | K/V tiled with .repeat (not GQA: head h reads h % Hkv)
  dtype, shapes   fp32 / fp16, L != S, L = 1, S = 1, head dims 8 / 16 / 24 / 40, Dv != D

and MUTATIONS the pass must leave alone (softmax over another dim, scores or probabilities with
another user, a per-head (H, 1, 1) scale, probabilities changed before the value product, a
scale applied after an additive mask, a mask that broadcasts the scores to a larger shape) or
may rewrite (dropout in training mode, now in-kernel) or may rewrite only exactly (off-by-one causal diagonals, masks that
leave rows with no visible key, a (B, L, S) mask that broadcasts over the heads dim).

Each ``Case`` states the number of rewritten sites the pass must report (``expected``, a set
when either answer is acceptable). Eager PyTorch is the ground truth for everything else.
Changing anything here reshuffles which case a seed gives: the seed lists in test_fuzz.py
(known bugs, regressions) must then be re-derived.
"""

from __future__ import annotations

import dataclasses
import linecache
import math
import os
import random
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# Where cases run: SDPA_PASS_FUZZ_DEVICE=cuda puts modules and inputs on the GPU (the op then
# runs its Triton kernels); inputs are drawn on the CPU first, so a seed is the same case anywhere.
DEVICE = torch.device(os.environ.get("SDPA_PASS_FUZZ_DEVICE", "cpu"))

FP32, FP16 = torch.float32, torch.float16


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One forward argument. ``kind``: "randn", "bool" (True = attend), "bool_masked" (True =
    masked), "int01" (1 = attend), "additive" (``fill`` where masked: "finfo", "-inf" or "-1e4";
    "bias" for a random ALiBi-like bias, "bias_finfo" for a bias plus finfo.min where masked),
    "padding" ((B, S) long 0/1 key padding) or "padding_bool"."""

    name: str
    kind: str
    shape: tuple
    fill: str = ""
    empty_rows: bool = False    # may leave rows (or batches) with no visible key


@dataclasses.dataclass
class Case:
    seed: int
    source: str
    inputs: list
    expected: frozenset          # acceptable numbers of rewritten sites
    dtype: torch.dtype
    features: list               # one line of choices per site
    grads: bool                  # also compare d/dq, d/dk, d/dv
    train: bool                  # module in training mode
    random_dropout: bool         # a site draws dropout in training mode
    attention_outputs: list      # per returned value: an attention output (else scores/probs)
    train_submodules: list       # submodules in training mode in an eval-mode module
    filename: str = ""

    def describe(self) -> str:
        return (f"seed={self.seed} dtype={str(self.dtype).replace('torch.', '')} "
                f"expected rewrites={sorted(self.expected)} grads={self.grads}\n"
                + "\n".join(f"  site {i}: {f}" for i, f in enumerate(self.features))
                + f"\n--- generated source ({self.filename}) ---\n{self.source}")

    def module(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A fresh instance of the generated module, in ``dtype`` (default the case's)."""
        module = self._instantiate(self.source, self.filename).to(DEVICE, dtype or self.dtype)
        return self._mode(module)

    def _mode(self, mod):
        mod.train(self.train)
        for name in self.train_submodules:   # nn.Dropout(0.0) left in training mode
            mod.get_submodule(name).train()
        return mod

    def float64_module(self, module: nn.Module) -> nn.Module:
        """``module`` (its buffers as rounded in the case's dtype) in float64, with its fp32
        upcasts (``softmax(dtype=torch.float32)``, ``.float()``) made float64: on float64 scores
        they would be downcasts, turning finfo(float64).min fills into -inf."""
        source = self.source.replace("dtype=torch.float32", "dtype=torch.float64").replace(".float()", ".double()")
        ref = self._mode(self._instantiate(source, self.filename + " float64"))
        for name, buf in module.named_buffers():
            ref.get_buffer(name).copy_(buf)
        return ref.to(DEVICE, torch.float64)

    @staticmethod
    def _instantiate(source, filename):
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        namespace = {"torch": torch, "nn": nn, "F": F, "math": math}
        exec(compile(source, filename, "exec"), namespace)
        return namespace["Attention"]()

    def args(self, dtype: Optional[torch.dtype] = None, requires_grad: bool = False) -> tuple:
        """The forward arguments. Float inputs are drawn in fp32, rounded to the case's dtype and
        then converted to ``dtype`` (float64 for the reference), so every dtype sees the same
        values; finfo.min fills use ``dtype``'s own finfo, as a model run in that dtype would."""
        dtype = dtype or self.dtype
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for spec in self.inputs:
            x = _make_input(spec, gen, self.dtype, dtype)
            x = x.to(DEVICE) if isinstance(x, torch.Tensor) else x
            if requires_grad and spec.kind == "randn" and spec.name[0] in "qkv":
                x.requires_grad_(True)
            out.append(x)
        return tuple(out)


def _make_input(spec: InputSpec, gen, case_dtype, dtype):
    shape = spec.shape
    if spec.kind == "randn":
        return torch.randn(shape, generator=gen).to(case_dtype).to(dtype)
    if spec.kind in ("bool", "bool_masked", "int01", "additive"):
        keep = torch.rand(shape, generator=gen) < 0.7
        if spec.kind == "additive" and spec.fill.startswith("bias"):
            bias = torch.randn(shape, generator=gen).to(case_dtype).to(dtype)
            if spec.fill == "bias_finfo":
                bias = bias.masked_fill(~_keep_first(keep, spec), torch.finfo(dtype).min)
            return bias
        keep = _keep_first(keep, spec)
        if spec.kind == "bool":
            return keep
        if spec.kind == "bool_masked":
            return ~keep
        if spec.kind == "int01":
            return keep.long()
        fill = {"finfo": torch.finfo(dtype).min, "-inf": float("-inf"), "-1e4": -1.0e4}[spec.fill]
        return torch.zeros(shape, dtype=dtype).masked_fill(~keep, fill)
    if spec.kind in ("padding", "padding_bool"):
        b, s = shape
        keep = torch.ones(b, s, dtype=torch.bool)
        for i in range(1, b):
            pad = int(torch.randint(0, s + (1 if spec.empty_rows else 0), (1,), generator=gen))
            # left padding can hide key 0, which a causal mask keeps: only where rows may be empty
            if spec.empty_rows and torch.rand((), generator=gen) < 0.5:
                keep[i, :pad] = False
            else:
                keep[i, s - pad:] = False
        return keep if spec.kind == "padding_bool" else keep.long()
    raise ValueError(spec.kind)


def _keep_first(keep, spec):
    if not spec.empty_rows:
        keep = keep.clone()
        keep[..., 0] = True   # every row keeps key 0 (through any broadcast)
    return keep


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------

# Mutations of a site. All but the last must be left alone (the site's expected count is 0);
# dropout in training mode may be rewritten (in-kernel dropout) or not, its draws differ.
MUTATIONS = {
    "softmax_dim": "softmax over the query or heads dim",
    "return_probs": "the probabilities are also returned",
    "return_scores": "the (pre-softmax) scores are also returned",
    "scores_other_user": "the scores also feed another computation",
    "probs_other_user": "the probabilities also feed another computation",
    "per_head_scale": "scores times a (H, 1, 1) per-head scale",
    "probs_head_mask": "probabilities times a (1, H, 1, 1) head mask",
    "scale_after_additive": "scale applied after an additive mask",
    "mask_expands_scores": "a mask that broadcasts the scores to a larger shape",
    "dropout_training": "dropout p > 0 in training mode (rewritten or not)",
}


def _finite_fill(line: str) -> bool:
    return (("masked_fill(" in line or "torch.where(" in line)
            and any(f in line for f in ("finfo", "-10000.0", "-1e9")))


class _Site:
    """Source lines of one attention site: its inputs, __init__ lines and forward lines."""

    def __init__(self, rng: random.Random, idx: int, dtype, allow_empty: bool, mutate: bool):
        self.rng, self.i, self.dtype = rng, idx, dtype
        self.inputs: list = []
        self.init: list = []
        self.fwd: list = []
        self.returns: list = []
        self.features: list = []
        self.expected = {1}
        self.allow_empty = allow_empty
        self.random_dropout = False
        self.train = False
        self.train_submodules: list = []
        # a finite masked_fill/where fill and an additive mask on the scores: with gradients the
        # pass may refuse the site (eager's gradient on rows masked everywhere differs
        # between the two, verify.fills_and_biases_apart_in_training)
        self.additive = False
        self.mutation = rng.choice(sorted(MUTATIONS)) if mutate else None
        self._build()
        self.finite_fill = any(_finite_fill(line) for line in self.fwd)
        # a fill above -1e30 (-1e4, -1e9, float16's finfo.min) beside an additive mask, in
        # either order: refused (verify.finite_fills_beside_additive_masks)
        self.weak_fill_beside_additive = self.additive and any(
            _finite_fill(line) and ("finfo" not in line or dtype != FP32) for line in self.fwd)

    # helpers -----------------------------------------------------------------------------
    def n(self, name):
        return f"{name}{self.i}"

    def feat(self, key, value):
        self.features.append(f"{key}={value}")
        return value

    def choice(self, key, options, weights=None):
        return self.feat(key, self.rng.choices(options, weights=weights)[0])

    def add_input(self, name, kind, shape, fill="", empty_rows=False):
        self.inputs.append(InputSpec(self.n(name), kind, tuple(shape), fill, empty_rows))
        return self.n(name)

    def line(self, text):
        self.fwd.append(text)

    def must_not(self):
        self.expected = {0}

    def may(self):
        self.expected = self.expected | {0}

    # the site ----------------------------------------------------------------------------
    def _build(self):
        r = self.rng
        mut = self.mutation
        B = r.choice([1, 2, 3])
        H = r.choice([1, 2, 4, 6])
        L = r.choice([1, 3, 7, 9, 16])
        S = r.choice([1, 5, 8, 13, 17]) if r.random() < 0.75 else L
        D = r.choice([8, 16, 24, 40])
        Dv = D if r.random() < 0.8 else r.choice([8, 24])
        self.B, self.H, self.L, self.S, self.D, self.Dv = B, H, L, S, D, Dv
        if mut is not None:
            self.feat("MUTATION", mut)
            if mut == "mask_expands_scores":
                # merged scores (B*H, L, S) plus a (B, 1, L, S) mask become (B, B*H, L, S); a
                # 4-D site gets a 5-D mask.
                pass
        self.feat("shape", f"B={B} H={H} L={L} S={S} D={D} Dv={Dv}")

        layout = self.choice("layout", ["bhld", "blhd", "merged"], [5, 3, 3])
        self.layout = layout
        if layout == "merged":
            spelling = self.choice("scores", ["at", "matmul", "bmm", "einsum", "baddbmm", "method_mT"])
        else:
            spelling = self.choice("scores", ["at", "matmul", "method_mT", "permute", "einsum", "bmm", "kpre"])
        self.spelling = spelling

        # GQA
        gqa = "none"
        if layout != "merged" and H > 1:
            options = ["none", "repeat_kv", "repeat_kv_unsqueeze", "repeat_interleave", "broadcast", "tile"]
            if spelling in ("bmm", "einsum"):
                options.remove("broadcast")
            if spelling == "kpre":
                options = ["none", "broadcast"]
            gqa = self.choice("gqa", options, [4] + [2] * (len(options) - 1))
        Hkv = H
        if gqa == "broadcast":
            Hkv = 1
        elif gqa != "none":
            Hkv = r.choice([d for d in range(1, H) if H % d == 0])
        self.Hkv = Hkv
        n_rep = H // Hkv

        # inputs and layout
        q, k, v = self.n("q"), self.n("k"), self.n("v")
        einsum_blhd = layout == "blhd" and spelling == "einsum" and gqa == "none" and r.random() < 0.6
        if layout == "merged":
            self.add_input("q", "randn", (B * H, L, D))
            self.add_input("k", "randn", (B * H, S, D))
            self.add_input("v", "randn", (B * H, S, Dv))
        elif layout == "bhld":
            self.add_input("q", "randn", (B, H, L, D))
            if spelling == "kpre":
                self.add_input("k", "randn", (B, S, Hkv, D))
            else:
                self.add_input("k", "randn", (B, Hkv, S, D))
            self.add_input("v", "randn", (B, Hkv, S, Dv))
        else:
            self.add_input("q", "randn", (B, L, H, D))
            self.add_input("k", "randn", (B, S, Hkv, D))
            self.add_input("v", "randn", (B, S, Hkv, Dv))
            if not einsum_blhd:
                tr = r.choice(["{x}.transpose(1, 2)", "{x}.permute(0, 2, 1, 3)"])
                names = (q, v) if spelling == "kpre" else (q, k, v)
                for x in names:
                    self.line(f"{x} = {tr.format(x=x)}")
        if einsum_blhd:
            self.feat("einsum_on", "blhd")

        if gqa in ("repeat_kv", "repeat_kv_unsqueeze", "repeat_interleave", "tile"):
            for x in (k, v):
                if gqa == "repeat_kv":
                    self.line(f"{x} = repeat_kv({x}, {n_rep})")
                elif gqa == "repeat_kv_unsqueeze":
                    shape = f"{x}.shape[0], {x}.shape[1], {n_rep}, {x}.shape[2], {x}.shape[3]"
                    self.line(f"{x} = {x}.unsqueeze(2).expand({shape}).reshape({x}.shape[0], {H}, {x}.shape[2], {x}.shape[3])")
                elif gqa == "repeat_interleave":
                    self.line(r.choice([f"{x} = {x}.repeat_interleave({n_rep}, dim=1)",
                                        f"{x} = torch.repeat_interleave({x}, {n_rep}, dim=1)",
                                        f"{x} = {x}.repeat_interleave({n_rep}, dim=-3)"]))
                else:
                    self.line(f"{x} = {x}.repeat(1, {n_rep}, 1, 1)")

        # scale
        scale_value = D ** -0.5 if r.random() < 0.8 else r.choice([0.1, 0.3, 1.7])
        self.feat("scale_value", f"{scale_value:.4g}")
        placements = ["none", "scores_mul", "scores_div", "scores_rmul", "scores_tensor", "q", "k_before",
                      "split"]
        if spelling in ("at", "matmul", "method_mT", "permute", "kpre"):
            placements.append("k_after")
        if spelling == "baddbmm":
            placements += ["alpha"] * 3
        placement = self.choice("scale", placements)
        if placement == "none":
            scale_value = 1.0
        sv = repr(scale_value)
        quarter = repr(scale_value ** 0.5)

        if placement == "q":
            self.line(r.choice([f"{q} = {q} * {sv}", f"{q} = {q} / {repr(1 / scale_value)}", f"{q} = {sv} * {q}"]))
        elif placement == "split":
            self.line(f"{q} = {q} * {quarter}")
        if placement in ("k_before", "split") and spelling != "kpre":
            self.line(f"{k} = {k} * {sv if placement == 'k_before' else quarter}")

        # the key, transposed, for the product spellings that take one
        r4 = layout != "merged"
        kt = None
        if spelling == "at":
            kt = f"{k}.transpose(-2, -1)" if r.random() < 0.7 else f"{k}.transpose(-1, -2)"
        elif spelling == "matmul":
            kt = f"{k}.transpose(2, 3)" if r4 else f"{k}.transpose(1, 2)"
        elif spelling == "method_mT":
            kt = f"{k}.mT"
        elif spelling == "permute":
            kt = f"{k}.permute(0, 1, 3, 2)"
        elif spelling == "kpre":
            self.line(f"{k}t = {k}.permute(0, 2, 3, 1)")
            kt = f"{k}t"
            if placement == "split":
                self.line(f"{kt} = {kt} * {quarter}")
            elif placement == "k_before":
                self.line(f"{kt} = {kt} * {sv}")
        if placement == "k_after":
            kt = f"({kt} * {sv})"

        s = self.n("s")
        alpha = sv if placement == "alpha" else "1.0"
        if spelling in ("at", "kpre", "permute"):
            self.line(f"{s} = {q} @ {kt}")
        elif spelling == "matmul":
            self.line(f"{s} = torch.matmul({q}, {kt})")
        elif spelling == "method_mT":
            self.line(f"{s} = {q}.matmul({kt})")
        elif spelling == "einsum":
            if einsum_blhd:
                self.line(f"{s} = torch.einsum('blhd,bshd->bhls', {q}, {k})")
            elif r4:
                eq = r.choice(["bhld,bhsd->bhls", "bhqd,bhkd->bhqk", "b h i d, b h j d -> b h i j"])
                self.line(f"{s} = torch.einsum('{eq}', {q}, {k})")
            else:
                self.line(f"{s} = torch.einsum('bld,bsd->bls', {q}, {k})")
        elif spelling == "bmm":
            if r4:
                self.line(f"{s} = torch.bmm({q}.reshape({B * H}, {L}, {D}), {k}.reshape({B * H}, {S}, {D}).transpose(1, 2))"
                          f".view({B}, {H}, {L}, {S})")
            else:
                self.line(f"{s} = torch.bmm({q}, {k}.transpose(1, 2))")
        elif spelling == "baddbmm":
            bias_in = f"torch.empty({B * H}, {L}, {S}, dtype={q}.dtype, device={q}.device)"
            self.line(f"{s} = torch.baddbmm({bias_in}, {q}, {k}.transpose(-1, -2), beta=0, alpha={alpha})")

        # scale on the scores
        if placement == "scores_mul":
            self.line(r.choice([f"{s} = {s} * {sv}", f"{s} = {s} * ({q}.size(-1) ** -0.5)" if scale_value == D ** -0.5
                                else f"{s} = {s} * {sv}", f"{s} = {s} * self.scale{self.i}"]))
            self.init.append(f"self.scale{self.i} = {sv}")
        elif placement == "scores_div":
            self.line(r.choice([f"{s} = {s} / {repr(1 / scale_value)}", f"{s} = {s} / math.sqrt({repr(1 / scale_value ** 2)})"]))
        elif placement == "scores_rmul":
            self.line(f"{s} = {sv} * {s}")
        elif placement == "scores_tensor":
            if r.random() < 0.5:
                self.init.append(f"self.register_buffer('scale{self.i}', torch.tensor({sv}))")
                self.line(f"{s} = {s} * self.scale{self.i}")
            else:
                self.line(f"{s} = {s} / torch.full([], {repr(1 / scale_value)}, dtype={s}.dtype, device={s}.device)")
        if mut == "per_head_scale":
            self.init.append(f"self.register_buffer('head_scale{self.i}', torch.linspace(0.5, 1.5, {H}).view({H}, 1, 1))")
            self.line(f"{s} = {s} * self.head_scale{self.i}" if r4 else
                      f"{s} = ({s}.view({B}, {H}, {L}, {S}) * self.head_scale{self.i}).view({B * H}, {L}, {S})")
            if H > 1:
                self.must_not()
            else:
                # one head: a (1, 1, 1) "per-head" scale is a scalar; the pass may read it as
                # one (a symbolic_trace get_attr of one element is) or not (a Dynamo input)
                self.may()

        if r.random() < 0.1:
            cap = r.choice([1.5, 3.0])
            self.feat("softcap", cap)
            self.line(f"{s} = torch.tanh({s} / {cap}) * {cap}")

        # masks
        self._masks(s, q)

        if mut == "scale_after_additive":
            bias = self.add_input("alibi", "additive", self._mask_shape_full(), "bias")
            self.line(f"{s} = ({s} + {bias}) * 0.5")
            self.must_not()
        if mut == "mask_expands_scores":
            if r4:
                m = self.add_input("big", "additive", (2, 1, 1, L, S), "bias")
            else:
                m = self.add_input("big", "additive", (B, 1, L, S) if B > 1 else (2, 1, L, S), "bias")
            self.line(f"{s} = {s} + {m}")
            self.must_not()
        if mut == "scores_other_user":
            self.line(f"{self.n('extra')} = ({s} > 0).to({s}.dtype).mean()")
            self.must_not()
        if mut == "return_scores":
            self.returns.append(s)
            self.must_not()

        # softmax
        p = self.n("p")
        rank = 4 if r4 else 3
        if mut == "mask_expands_scores" and r4:
            rank = 5
        elif mut == "mask_expands_scores":
            rank = 4
        dim = self.choice("softmax_dim", ["-1", str(rank - 1)], [4, 1])
        if mut == "softmax_dim":
            dim = self.feat("softmax_dim_mutated", r.choice(["-2", str(rank - 2), "1"]))
            if L > 1 or dim == "1":
                self.must_not()
            else:
                self.may()   # over a size-1 dim: every probability is 1 in eager
        upcast = self.choice("upcast", ["none", "dtype32", "float_first"], [3, 2, 1])
        spell = self.choice("softmax", ["F", "torch", "method", "method_pos", "module", "nn_functional"])
        x = f"{s}.float()" if upcast == "float_first" else s
        dt = ", dtype=torch.float32" if upcast == "dtype32" else ""
        if spell == "F":
            expr = f"F.softmax({x}, dim={dim}{dt})"
        elif spell == "nn_functional":
            expr = f"nn.functional.softmax({x}, dim={dim}{dt})"
        elif spell == "torch":
            expr = f"torch.softmax({x}, {dim}{dt})"
        elif spell == "method":
            expr = f"{x}.softmax(dim={dim}{dt})"
        elif spell == "method_pos":
            expr = f"{x}.softmax({dim}{dt})" if not dt else f"{x}.softmax({dim}, dtype=torch.float32)"
        else:
            self.init.append(f"self.softmax{self.i} = nn.Softmax(dim={dim})")
            expr = f"self.softmax{self.i}({x})"
            if upcast == "dtype32":
                expr = f"self.softmax{self.i}({x}.float())"
        if upcast != "none":
            expr += r.choice([f".to({q}.dtype)", f".type_as({v})", f".to({v}.dtype)"])
        self.line(f"{p} = {expr}")

        # dropout
        if mut == "dropout_training":
            self.line(f"{p} = F.dropout({p}, p=0.25, training=True)")
            self.random_dropout = True
            self.may()
        else:
            drop = self.choice("dropout", ["none", "F_eval", "F_false", "module_eval", "p0", "module_p0_train",
                                           "torch_dropout"], [4, 1, 1, 1, 1, 1, 1])
            if drop == "F_eval":
                self.line(f"{p} = F.dropout({p}, p=0.1, training=self.training)")
            elif drop == "F_false":
                self.line(f"{p} = nn.functional.dropout({p}, p=0.1, training=False)")
            elif drop == "module_eval":
                self.init.append(f"self.drop{self.i} = nn.Dropout(0.1)")
                self.line(f"{p} = self.drop{self.i}({p})")
            elif drop == "p0":
                self.line(f"{p} = F.dropout({p}, p=0.0, training=True)")
            elif drop == "module_p0_train":
                self.init.append(f"self.drop{self.i} = nn.Dropout(0.0)")
                self.train_submodules.append(f"drop{self.i}")
                self.line(f"{p} = self.drop{self.i}({p})")
            elif drop == "torch_dropout":
                self.line(f"{p} = torch.dropout({p}, 0.1, False)")

        if mut == "probs_head_mask":
            self.init.append(f"self.register_buffer('head_mask{self.i}', torch.linspace(1.0, 0.0, {H}).view(1, {H}, 1, 1))")
            self.line(f"{p} = {p} * self.head_mask{self.i}" if r4 else
                      f"{p} = ({p}.view({B}, {H}, {L}, {S}) * self.head_mask{self.i}).view({B * H}, {L}, {S})")
            self.must_not()
        if mut == "return_probs":
            self.returns.append(p)
            self.must_not()
        if mut == "probs_other_user":
            self.line(f"{self.n('extra')} = {p}.sum(-1, keepdim=True)")
            self.must_not()

        # the value product
        o = self.n("o")
        if spelling == "einsum" and (r.random() < 0.7):
            if einsum_blhd and self.mutation != "mask_expands_scores":
                out_l = r.choice(["blhd", "bhld"])
                self.line(f"{o} = torch.einsum('bhls,bshd->{out_l}', {p}, {v})")
                if out_l == "blhd":
                    self.out_layout = "blhd"
            elif einsum_blhd:
                self.line(f"{v} = {v}.transpose(1, 2)")
                self.line(f"{o} = {p} @ {v}")
            elif r4 and self.mutation != "mask_expands_scores":
                self.line(f"{o} = torch.einsum('bhls,bhsd->bhld', {p}, {v})")
            elif self.mutation != "mask_expands_scores":
                self.line(f"{o} = torch.einsum('bls,bsd->bld', {p}, {v})")
            else:
                self.line(f"{o} = {p} @ {v}")
        elif spelling in ("bmm", "baddbmm") and self.mutation != "mask_expands_scores":
            if r4:
                self.line(f"{o} = torch.bmm({p}.reshape({B * H}, {L}, {S}), {v}.reshape({B * H}, {S}, {Dv}))"
                          f".view({B}, {H}, {L}, {Dv})")
            else:
                self.line(f"{o} = torch.bmm({p}, {v})")
        else:
            if einsum_blhd:
                self.line(f"{v} = {v}.transpose(1, 2)")
            self.line(r.choice([f"{o} = {p} @ {v}", f"{o} = torch.matmul({p}, {v})", f"{o} = {p}.matmul({v})"]))
        if mut == "probs_other_user":
            self.line(f"{o} = {o} + {self.n('extra')}")
        if mut == "scores_other_user":
            self.line(f"{o} = {o} + {self.n('extra')}")

        # output layout
        if getattr(self, "out_layout", None) != "blhd" and r4 and mut != "mask_expands_scores":
            post = r.choice(["none", "transpose_reshape", "contiguous_view"])
            if post == "transpose_reshape":
                self.line(f"{o} = {o}.transpose(1, 2).reshape({B}, {L}, {H * Dv})")
            elif post == "contiguous_view":
                self.line(f"{o} = {o}.transpose(1, 2).contiguous().view({B}, {L}, -1)")
        self.returns.insert(0, o)

    def _mask_shape_full(self):
        B, H, L, S = self.B, self.H, self.L, self.S
        return (B, H, L, S) if self.layout != "merged" else (B * H, L, S)

    def _masks(self, s, q):
        r = self.rng
        B, H, L, S = self.B, self.H, self.L, self.S
        n_masks = r.choices([0, 1, 2], [3, 5, 2])[0]
        if n_masks == 0:
            self.feat("masks", "none")
            return
        view4 = self.layout == "merged" and r.random() < 0.3
        if view4:
            self.feat("mask_space", "bart_view4")
            self.line(f"{s} = {s}.view({B}, {H}, {L}, {S})")
        r4 = self.layout != "merged" or view4
        for j in range(n_masks):
            self._one_mask(s, q, j, r4, alone=n_masks == 1)
        if view4:
            self.line(f"{s} = {s}.view({B * H}, {L}, {S})")

    def _neg(self, s):
        """A fill value that masks, as models spell it."""
        options = ['float("-inf")', "-math.inf", f"torch.finfo({s}.dtype).min", "-10000.0"]
        if self.dtype != FP16:
            options.append("-1e9")
        return self.rng.choice(options)

    def _broadcast_shape(self, r4):
        B, H, L, S = self.B, self.H, self.L, self.S
        if r4:
            shapes = [(B, 1, L, S), (1, 1, L, S), (B, H, L, S), (L, S), (1, H, L, S), (B, 1, 1, S), (H, L, S),
                      (1, L, S), (B, 1, L, 1), (1, H, 1, S)]
        else:
            shapes = [(B * H, L, S), (1, L, S), (L, S), (B * H, 1, S), (S,)]
        return self.rng.choice(shapes)

    def _one_mask(self, s, q, j, r4, alone):
        r = self.rng
        B, H, L, S = self.B, self.H, self.L, self.S
        empty = self.allow_empty and r.random() < 0.3
        kinds = ["bool_fill", "bool_where", "additive", "causal_tril", "causal_triu", "causal_arange",
                 "sliding_window", "transformer_triu_additive", "padding", "padding_additive", "heads_as_batch"]
        if r4 and L <= S:
            kinds.append("causal_buffer")
        kind = self.feat(f"mask{j}", r.choice(kinds))
        if kind in ("padding", "padding_additive") and not r4:
            kind = self.feat(f"mask{j}_merged", "bool_fill")
        if kind == "heads_as_batch" and not (r4 and B == H and B > 1):
            kind = self.feat(f"mask{j}_not_heads", "additive")
        neg = self._neg(s)
        if kind in ("bool_fill", "bool_where"):
            shape = self._broadcast_shape(r4)
            form = r.choice(["attend", "masked", "int01"])
            ikind = {"attend": "bool", "masked": "bool_masked", "int01": "int01"}[form]
            m = self.add_input(f"m{j}_", ikind, shape, empty_rows=empty)
            if kind == "bool_fill":
                cond = {"attend": r.choice([f"~{m}", f"{m}.logical_not()"]), "masked": m, "int01": f"{m} == 0"}[form]
                self.line(f"{s} = {s}.masked_fill({cond}, {neg})")
            else:
                if form == "masked":
                    self.line(f"{s} = torch.where({m}, {neg}, {s})")
                else:
                    cond = m if form == "attend" else f"{m} == 1"
                    if r.random() < 0.3:
                        neg = f"torch.tensor({neg}, dtype={s}.dtype, device={s}.device)" if "finfo" not in neg \
                            else f"torch.full([], {neg}, dtype={s}.dtype, device={s}.device)"
                    self.line(f"{s} = torch.where({cond}, {s}, {neg})")
            self.feat(f"mask{j}_detail", f"{form} shape={shape} empty={empty}")
        elif kind == "additive":
            shape = self._broadcast_shape(r4)
            fill = r.choice(["finfo", "-inf", "-1e4", "bias", "bias_finfo"])
            m = self.add_input(f"bias{j}_", "additive", shape, fill, empty_rows=empty)
            self.line(r.choice([f"{s} = {s} + {m}", f"{s} = {m} + {s}", f"{s} += {m}"]))
            self.additive = True
            self.feat(f"mask{j}_detail", f"fill={fill} shape={shape} empty={empty}")
        elif kind == "heads_as_batch":
            # a (B, L, S) mask on (B, H, L, S) scores with B == H broadcasts as (1, H, L, S): its
            # first dim indexes heads, whatever the author meant. Eager is the truth.
            m = self.add_input(f"m{j}_", "bool", (B, L, S), empty_rows=empty)
            self.line(f"{s} = {s}.masked_fill(~{m}, {neg})")
        elif kind.startswith("causal") or kind == "sliding_window" or kind == "transformer_triu_additive":
            self._causal(kind, s, q, j, neg, empty, alone)
        elif kind == "padding":
            form = r.choice(["long", "bool"])
            pad = self.add_input(f"pad{j}_", "padding" if form == "long" else "padding_bool", (B, S),
                                 empty_rows=empty)
            view = r.choice([f"{pad}[:, None, None, :]", f"{pad}.view({B}, 1, 1, {S})", f"{pad}.unsqueeze(1).unsqueeze(2)"])
            cond = f"{view} == 0" if form == "long" else f"~{view}"
            self.line(f"{s} = {s}.masked_fill({cond}, {neg})")
        elif kind == "padding_additive":
            pad = self.add_input(f"pad{j}_", "padding", (B, S), empty_rows=empty)
            fill = r.choice(["-10000.0", f"torch.finfo({s}.dtype).min"])
            self.line(f"{self.n('ext')}{j} = (1.0 - {pad}[:, None, None, :].to({s}.dtype)) * {fill}")
            self.line(f"{s} = {s} + {self.n('ext')}{j}")
            self.additive = True

    def _causal(self, kind, s, q, j, neg, empty, alone):
        r = self.rng
        L, S = self.L, self.S
        align = r.choice(["top_left", "bottom_right"])
        base = S - L if align == "bottom_right" else 0
        d = r.choice([0, 0, 0, 1, -1, 2, -2])   # tril's diagonal offset
        if not self.allow_empty and base + d < 0:
            d = -base   # every query row keeps key 0
        off = base + d
        if kind == "sliding_window" and not self.allow_empty and not (alone and off >= 0 and L - 1 + off <= S - 1):
            kind = self.feat(f"mask{j}_no_window", "causal_arange")   # a window could empty a row
        self.feat(f"mask{j}_causal", f"{align} diagonal={d} offset={off}")
        dev = f"device={q}.device"
        m = f"{self.n('c')}{j}"
        if kind == "causal_tril":
            if r.random() < 0.5:
                self.line(f"{m} = torch.tril(torch.ones({L}, {S}, {dev}), diagonal={off})")
                self.line(f"{s} = {s}.masked_fill({m} == 0, {neg})")
            else:
                self.line(f"{m} = torch.ones({L}, {S}, dtype=torch.bool, {dev}).tril(diagonal={off})")
                self.line(r.choice([f"{s} = {s}.masked_fill(~{m}, {neg})", f"{s} = torch.where({m}, {s}, {neg})"]))
        elif kind == "causal_triu":
            self.line(f"{m} = torch.triu(torch.ones({L}, {S}, dtype=torch.bool, {dev}), diagonal={off + 1})")
            self.line(f"{s} = {s}.masked_fill({m}, {neg})")
        elif kind in ("causal_arange", "sliding_window"):
            qi, kj = f"{self.n('qi')}{j}", f"{self.n('kj')}{j}"
            self.line(f"{qi} = torch.arange({L}, {dev})[:, None] + {off}" if r.random() < 0.5 else
                      f"{qi} = torch.arange({off}, {off + L}, {dev}).view(-1, 1)")
            self.line(f"{kj} = torch.arange({S}, {dev})[None, :]")
            cmp = r.choice(["le", "lt_plus1", "gt_masked"])
            if kind == "sliding_window":
                w = r.choice([1, 2, 4])
                self.feat(f"mask{j}_window", w)
                self.line(f"{m} = ({kj} <= {qi}) & ({kj} > {qi} - {w})")
                self.line(f"{s} = {s}.masked_fill(~{m}, {neg})")
            elif cmp == "le":
                self.line(f"{m} = {kj} <= {qi}")
                self.line(f"{s} = {s}.masked_fill(~{m}, {neg})")
            elif cmp == "lt_plus1":
                self.line(f"{m} = {kj} < {qi} + 1")
                self.line(f"{s} = torch.where({m}, {s}, {neg})")
            else:
                self.line(f"{m} = {kj} > {qi}")
                self.line(f"{s} = {s}.masked_fill({m}, {neg})")
        elif kind == "causal_buffer":
            N = max(L, S) + 3
            self.init.append(f"self.register_buffer('tril{self.i}_{j}', torch.tril(torch.ones({N}, {N})).view(1, 1, {N}, {N}))")
            if align == "bottom_right":
                self.line(f"{s} = {s}.masked_fill(self.tril{self.i}_{j}[:, :, {S - L}:{S}, :{S}] == 0, {neg})")
            else:
                self.line(f"{s} = {s}.masked_fill(self.tril{self.i}_{j}[:, :, :{L}, :{S}] == 0, {neg})")
            self.feat(f"mask{j}_causal_buffer", "diagonal ignored (0)")
        elif kind == "transformer_triu_additive":
            self.line(f"{m} = torch.triu(torch.full(({L}, {S}), float('-inf'), dtype={s}.dtype, {dev}), diagonal={off + 1})")
            self.line(f"{s} = {s} + {m}")
            self.additive = True


REPEAT_KV = '''
def repeat_kv(hidden_states, n_rep):
    # transformers/models/llama/modeling_llama.py: repeat_kv
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)
'''


def generate(seed: int) -> Case:
    rng = random.Random(seed)
    dtype = FP16 if rng.random() < 0.2 else FP32
    # fp16 eager adds a finite fill in half precision, where a row masked everywhere rounds the
    # scores away differently from float64: no such rows there (README "Limits").
    allow_empty = dtype == FP32 and rng.random() < 0.3
    n_sites = 2 if rng.random() < 0.15 else 1
    mutate = [rng.random() < 0.25 for _ in range(n_sites)]
    sites = [_Site(rng, i, dtype, allow_empty, m) for i, m in enumerate(mutate)]
    grads = dtype == FP32 and rng.random() < 0.3
    expected = {0}
    for site in sites:
        # refused, unless the fill turns out to be a no-op the pass drops (e.g. a causal mask
        # that hides nothing at L = S = 1); the gradient comparison judges a rewrite
        site_expected = site.expected | {0} if grads and site.finite_fill and site.additive else site.expected
        if site.weak_fill_beside_additive:
            site_expected = {0}
        expected = {a + b for a in expected for b in site_expected}
    inputs = [spec for site in sites for spec in site.inputs]
    init = [line for site in sites for line in site.init]
    fwd = [line for site in sites for line in site.fwd]
    returns = [x for site in sites for x in site.returns]
    train = any(site.train for site in sites)
    lines = [REPEAT_KV, "", "class Attention(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    lines += [f"        {x}" for x in init]
    lines += ["", f"    def forward(self, {', '.join(s.name for s in inputs)}):"]
    lines += [f"        {x}" for x in fwd]
    lines.append(f"        return {', '.join(returns)}")
    source = "\n".join(lines) + "\n"
    filename = f"<sdpa_pass fuzz seed {seed}>"
    return Case(seed, source, inputs, frozenset(expected), dtype, [" ".join(s.features) for s in sites],
                grads, train, any(s.random_dropout for s in sites),
                [j == 0 for site in sites for j in range(len(site.returns))],
                [m for site in sites for m in site.train_submodules], filename)
