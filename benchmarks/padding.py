"""Padded batches: attention under a key padding mask, against the peers in one run.

Batch element b keeps n_b of the N keys, the lengths spread evenly from N/4 to N (mean 5/8 N):
right padding for prefill and training rows (as a tokenizer pads an encoder's batch), left
padding for the decode rows (as ``generate`` pads a batch of prompts). The mask is what HF
models hand to attention: a (B, 1, 1, N) bool ``attn_mask``, True = attend; with causal
attention SDPA takes no attn_mask beside ``is_causal``, so the SDPA, eager and Inductor peers
get the (B, 1, N, N) bool / additive mask HF builds for them, and ours and flex the padding
row plus their own causal predicate. One row per shape with no key padded ("full") prices
the span scan where there is nothing to skip.

Peers: ours (``sdpa_pass.kernels.attention``); ours_triton, the same with
``SDPA_PASS_GLUON_PADDING=0`` (the Triton kernels where the Gluon ones read the padding row on
a Hopper GPU); ours_no_span, with ``SDPA_PASS_KEY_SPAN=0`` (the Triton kernels, every key tile
visited, the padding applied per element: what the span skipping buys); SDPA's cuDNN and memory-efficient backends (flash takes no mask); flex
attention, compiled, with a block mask built from the same padding (flex skips the padded
blocks too); eager and Inductor on the hand-written spelling.

TFLOP/s counts the visible (query, key) pairs only: 4·H·D per pair (x3.5 forward + backward),
so a peer that computes the padded keys too spends that time for nothing. Decode rows report
GB/s of the visible K and V (bytes of K and V the step must read). Outputs (and gradients)
are compared with the first of SDPA efficient / cuDNN / ours that ran.

Run: ``python benchmarks/padding.py [--out DIR]``: a markdown table and
``padding_bf16_<device>.json``. About 5 minutes on an H100 (flex and Inductor compile, and
ours autotunes, per row).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (DO_BENCH, Skipped, describe, eager_attention, is_refusal,  # noqa: E402
                       error_summary, metadata, rel_err, save, slug, synchronize,
                       with_backward)

from sdpa_pass.kernels import attention  # noqa: E402

HEADS, HEAD_DIM = 16, 128
# (mode, causal, N, padded): batch 32k tokens / N. Decode: 32 query / 8 KV heads, batch 16.
PREFILL = [(mode, causal, n, padded) for mode in ("fwd", "fwdbwd") for causal in (False, True)
           for n, padded in ((4096, True), (4096, False))]
DECODE = [(16, 32, 8, 32768, padded) for padded in (True, False)]
REFERENCE_ORDER = ("sdpa_efficient", "sdpa_cudnn", "ours")
EAGER_MAX_SCORE_BYTES = 8 * 2**30


def lengths(batch: int, n: int, padded: bool) -> torch.Tensor:
    """Kept keys per batch element: evenly from n/4 to n, or n everywhere."""
    if not padded or batch == 1:
        return torch.full((batch,), n)
    return torch.linspace(n // 4, n, batch).round().long()


def keep_mask(lens: torch.Tensor, n: int, left: bool, device) -> torch.Tensor:
    """(B, N) bool: the first n_b keys (right padding) or the last n_b (left padding)."""
    pos = torch.arange(n, device=device)[None, :]
    lens = lens.to(device)[:, None]
    return pos >= n - lens if left else pos < lens


@contextlib.contextmanager
def setting(name: str, value: str):
    """The environment variable ``name`` set to ``value`` inside the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def peers(q, k, v, keep, causal: bool, gqa: bool):
    """{name: (context, build)}; build() returns a no-argument callable giving the output."""
    L, S = q.shape[-2], k.shape[-2]
    row = keep[:, None, None, :]                                   # (B, 1, 1, S)
    full = row & torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L) if causal else row
    group = q.shape[1] // k.shape[1]

    def ours():
        return lambda: attention(q, k, v, row, is_causal=causal, enable_gqa=gqa)

    def sdpa():
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=gqa)

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        offset = S - L

        def mask_mod(b, h, q_idx, kv_idx):
            visible = keep[b, kv_idx]
            return visible & (kv_idx <= q_idx + offset) if causal else visible

        block_mask = create_block_mask(mask_mod, keep.shape[0], None, L, S, device=q.device)
        compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    def additive():
        B, H = q.shape[:2]
        if B * H * L * S * q.element_size() > EAGER_MAX_SCORE_BYTES:
            raise Skipped("too large (score matrix)")
        return torch.zeros(full.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~full, torch.finfo(q.dtype).min)

    def eager():
        mask = additive()
        return lambda: eager_attention(q, k, v, mask, group)

    def inductor():
        mask = additive()
        compiled = torch.compile(eager_attention, dynamic=False, fullgraph=True)
        return lambda: compiled(q, k, v, mask, group)

    null = contextlib.nullcontext
    return {
        "ours": (null, ours),
        "ours_triton": (lambda: setting("SDPA_PASS_GLUON_PADDING", "0"), ours),
        "ours_no_span": (lambda: setting("SDPA_PASS_KEY_SPAN", "0"), ours),
        "sdpa_cudnn": (lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION), sdpa),
        "sdpa_efficient": (lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), sdpa),
        "flex": (null, flex),
        "eager": (null, eager),
        "inductor": (null, inductor),
    }


def visible_pairs(lens: torch.Tensor, L: int, S: int, causal: bool) -> int:
    """(query, key) pairs the masks leave visible, summed over the batch (per head): with
    right padding and causal attention query i sees keys j <= i + S - L below n_b."""
    total = 0
    for n in lens.tolist():
        total += sum(min(i + S - L + 1, n) for i in range(L)) if causal else L * n
    return total


def bench(fields: dict, q, k, v, keep, causal: bool, gqa: bool, mode: str, work: float,
          unit: str, impls) -> list[dict]:
    device = q.device
    torch._dynamo.reset()
    rows, fns, outputs = [], {}, {}
    table = {name: peer for name, peer in peers(q, k, v, keep, causal, gqa).items()
             if impls is None or name in impls}
    for name, (context, build) in table.items():
        row = dict(fields, impl=name, ms=None, rate=None, rel_err=None, ref=None,
                   first_call_s=None, error=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                start = time.perf_counter()
                with context():
                    fn = build()
                    if mode == "fwdbwd":
                        fn = with_backward(fn, q, k, v)
                    outputs[name] = fn()
                    synchronize(device)
                row["first_call_s"] = time.perf_counter() - start
                fns[name] = fn
            except Skipped as exc:
                row["error"] = f"skipped: {exc}"
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a result
                row["error"] = ("skipped: SDPA refused: " if is_refusal(exc) else "") + describe(exc, caught)
        rows.append(row)
        if row["error"]:
            torch.cuda.empty_cache()
    ref = next((name for name in REFERENCE_ORDER if name in outputs), None)
    for row in rows:
        name = row["impl"]
        if name in outputs and ref is not None and name != ref:
            row["rel_err"], row["ref"] = rel_err(outputs[name], outputs[ref]), ref
        if name in fns:
            with table[name][0]():
                ms = triton.testing.do_bench(fns[name], **DO_BENCH)
            row["ms"], row["rate"] = ms, work / (ms * 1e-3) / 1e12 if unit == "TFLOP/s" else work / (ms * 1e-3) / 1e9
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--impls", default=None,
                        help="comma-separated subset of: ours, ours_triton, ours_no_span, sdpa_cudnn, "
                             "sdpa_efficient, flex, eager, inductor (default: all)")
    parser.add_argument("--tag", default="bf16", help="put in the file name")
    args = parser.parse_args(argv)
    impls = None if args.impls is None else args.impls.split(",")
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16
    meta = metadata(argparse.Namespace(mode="padding", dtype="bf16", quick=False), device)
    meta.update(benchmark="padding", reference_order=list(REFERENCE_ORDER), impls=impls,
                flops="4*H*D per visible (query, key) pair, x3.5 for forward+backward",
                bandwidth="decode: bytes of the visible K and V / do_bench time",
                lengths="kept keys per batch element: linspace(N/4, N, B), or N ('full')")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"padding_{args.tag}_{slug(meta['device'])}.json"
    rows = []
    width = 8 if impls is None else len(impls)  # rows per shape
    for mode, causal, n, padded in PREFILL:
        batch = max(1, 32768 // n)
        lens = lengths(batch, n, padded)
        keep = keep_mask(lens, n, left=False, device=device)
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, dtype=dtype, device=device,
                               requires_grad=mode == "fwdbwd") for _ in range(3))
        work = 4.0 * HEADS * HEAD_DIM * visible_pairs(lens, n, n, causal)
        work *= 3.5 if mode == "fwdbwd" else 1.0
        fields = dict(kind="prefill", mode=mode, causal=causal, batch=batch, heads=HEADS,
                      kv_heads=HEADS, seqlen=n, head_dim=HEAD_DIM,
                      padding="right" if padded else "full", kept=lens.sum().item() / (batch * n))
        rows += bench(fields, q, k, v, keep, causal, False, mode, work, "TFLOP/s", impls)
        save(path, meta, rows)
        print(f"{mode} {'causal' if causal else 'none'} N{n} B{batch} {fields['padding']}: " + " | ".join(
            f"{r['impl']} {r['rate']:.1f}" if r["rate"] else f"{r['impl']} -" for r in rows[-width:]), flush=True)
        del q, k, v
    for batch, hq, hkv, s, padded in DECODE:
        lens = lengths(batch, s, padded)
        keep = keep_mask(lens, s, left=True, device=device)
        torch.manual_seed(0)
        q = torch.randn(batch, hq, 1, HEAD_DIM, dtype=dtype, device=device)
        k, v = (torch.randn(batch, hkv, s, HEAD_DIM, dtype=dtype, device=device) for _ in range(2))
        work = 2.0 * hkv * HEAD_DIM * dtype.itemsize * lens.sum().item()
        fields = dict(kind="decode", mode="fwd", causal=False, batch=batch, heads=hq, kv_heads=hkv,
                      seqlen=s, head_dim=HEAD_DIM, padding="left" if padded else "full",
                      kept=lens.sum().item() / (batch * s))
        # one query row at the end of the cache sees every kept key: no causal mask needed
        rows += bench(fields, q, k, v, keep, False, True, "fwd", work, "GB/s", impls)
        save(path, meta, rows)
        print(f"decode S{s} B{batch} {fields['padding']}: " + " | ".join(
            f"{r['impl']} {r['rate']:.0f}" if r["rate"] else f"{r['impl']} -" for r in rows[-width:]), flush=True)
        del q, k, v
    meta["complete"] = True
    save(path, meta, rows)
    names = [r["impl"] for r in rows[:width]]
    print(f"\nPadded batches, bf16, {meta['device']}, torch {meta['torch']}, triton {meta['triton']}: "
          "TFLOP/s of the visible pairs (decode: GB/s of the visible K/V); ms in brackets\n")
    print("| row | " + " | ".join(names) + " |")
    print("|:---|" + "---:|" * len(names))
    for i in range(0, len(rows), len(names)):
        r0 = rows[i]
        label = (f"{r0['kind']} {r0['mode']} {'causal' if r0['causal'] else 'none'} "
                 f"N{r0['seqlen']} B{r0['batch']} {r0['padding']} ({r0['kept']:.0%} kept)")
        cells = [f"{r['rate']:.1f} ({r['ms']:.3f})" if r["rate"] else "n/a" for r in rows[i:i + len(names)]]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\n" + error_summary(rows, lambda r: f"{r['kind']} {r['mode']} N{r['seqlen']}"))


if __name__ == "__main__":
    main()
