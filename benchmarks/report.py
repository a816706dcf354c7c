"""Turn attention benchmark results (JSON from ``benchmarks/attention.py``) into BENCHMARKS.md.

    python benchmarks/report.py                          # every benchmarks/results/attention_*.json
    python benchmarks/report.py a.json b.json --output /tmp/BENCH.md --plot /tmp/bench.png
    python benchmarks/report.py results/attention_fwd_bf16-matrix_*_shard*of5.json --plot m.png

Each results file becomes one section: a heading naming the device, software versions, dtype
and date, then a table of TFLOP/s (rows: shape and causal; columns: implementations, plus the
ratio of ours to SDPA's flash backend). The shard files of one ``--matrix`` run (names equal
but for ``_shardIofN``) make one section together: a table per head dim and variant (rows: N;
columns: implementations, plus ours against the fastest other correct one), each with its
largest errors, then notes and what was not measured; ``--plot`` draws them as TFLOP/s against
N, a panel per variant and head dim (``<plot>_<run>.png`` when there are several figures). The generated text sits between two marker comments;
anything outside them in the output file is kept, so BENCHMARKS.md can carry hand-written notes.

This module needs neither torch nor triton (the results may be read anywhere); attention.py
imports its table helpers so the console table and the markdown table agree.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "results"
DEFAULT_OUTPUT = BENCH_DIR.parent / "BENCHMARKS.md"

# An output whose relative error against the reference exceeds this is flagged MISMATCH.
# bf16 has an 8-bit significand, so correct kernels land around 1e-3..5e-3 from each other.
MISMATCH_TOL = 2e-2

BEGIN_MARK = "<!-- BEGIN benchmarks/report.py output; regenerate instead of editing -->"
END_MARK = "<!-- END benchmarks/report.py output -->"

DEFAULT_HEADER = """\
# Benchmarks

Forward attention throughput of `sdpa_pass.kernels.attention` against PyTorch's attention
implementations, all measured in the same run on the same GPU.

- Run: `python benchmarks/attention.py [--dtype bf16|fp16] [--tag NAME]`, which writes
  `benchmarks/results/attention_fwd_<tag>_<device>.json`; then `python benchmarks/report.py`
  regenerates the tables below.
- Shapes (FlashAttention benchmark convention): L = S = N, batch = 16384 / N,
  heads = 2048 / D, so every shape holds the same number of tokens.
- TFLOP/s count useful work only: 4·B·H·L·S·D, halved for causal.
- Time is the median of `triton.testing.do_bench` (25 ms warm-up, 100 ms of runs, L2 cleared
  before each run).
- Before timing, every output is compared with a reference (SDPA flash, else cuDNN, else
  memory-efficient, else ours); a relative error ‖a−b‖/‖b‖ above 2e-2 is flagged MISMATCH.
"""


# --------------------------------------------------------------------------------------------
# Table helpers (shared with attention.py)
# --------------------------------------------------------------------------------------------

def shape_key(row: dict) -> tuple:
    # variant and kv_heads: --matrix rows only (None elsewhere)
    return (row["batch"], row["heads"], row["seqlen_q"], row["seqlen_kv"], row["head_dim"],
            row["causal"], row.get("variant"), row.get("kv_heads"))


def heads_label(row: dict) -> str:
    kv = row.get("kv_heads")
    return f"H{row['heads']}" + (f"/{kv}" if kv and kv != row["heads"] else "")


def shape_label(row: dict) -> str:
    b, lq, lk, d = row["batch"], row["seqlen_q"], row["seqlen_kv"], row["head_dim"]
    seq = f"N{lq}" if lq == lk else f"L{lq} S{lk}"
    return f"B{b} {heads_label(row)} {seq} D{d}"


def is_mismatch(row: dict, tol: float = MISMATCH_TOL) -> bool:
    rel = row.get("rel_err")
    # `not rel <= tol` rather than `rel > tol`: a NaN error (NaN in the output) is a mismatch.
    return rel is not None and not rel <= tol


def format_tflops(tflops: float) -> str:
    # GPU numbers are in the hundreds; CPU smoke runs give tiny ones that .1f would show as 0.0.
    return f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.2g}"


def cell(row: dict | None, tol: float = MISMATCH_TOL) -> str:
    """One table cell: TFLOP/s, flagged if the output was wrong, or why there is no number."""
    if row is None:
        return "-"
    if row.get("error"):
        return "skipped" if row["error"].startswith("skipped") else "error"
    text = format_tflops(row["tflops"])
    return f"{text} MISMATCH" if is_mismatch(row, tol) else text


def ratio(by_impl: dict, num: str = "ours", den: str = "sdpa_flash") -> str:
    a, b = by_impl.get(num), by_impl.get(den)
    if not a or not b or a.get("error") or b.get("error") or not b.get("tflops"):
        return "-"
    return f"{a['tflops'] / b['tflops']:.2f}x"


def pivot(rows: list[dict]) -> tuple[list[str], list[tuple[dict, dict]]]:
    """Implementations (in first-seen order) and, per shape, (a row for its fields, {impl: row})."""
    impls: list[str] = []
    shapes: dict[tuple, tuple[dict, dict]] = {}
    for row in rows:
        if row["impl"] not in impls:
            impls.append(row["impl"])
        shapes.setdefault(shape_key(row), (row, {}))[1][row["impl"]] = row
    return impls, list(shapes.values())


def table(rows: list[dict], tol: float = MISMATCH_TOL) -> tuple[list[str], list[list[str]]]:
    """Header and body of the TFLOP/s table: one line per shape, one column per impl."""
    impls, shapes = pivot(rows)
    # --matrix rows name their variant (which says causal or not); the others say causal
    matrix = any(row.get("variant") for row in rows)
    header = ["shape", "variant" if matrix else "causal", *impls]
    ratio_wanted = "ours" in impls and "sdpa_flash" in impls
    if ratio_wanted:
        header.append("ours / SDPA flash")
    body = []
    for first, by_impl in shapes:
        line = [shape_label(first),
                (first.get("variant") or "-") if matrix else ("yes" if first["causal"] else "no")]
        line += [cell(by_impl.get(impl), tol) for impl in impls]
        if ratio_wanted:
            line.append(ratio(by_impl))
        body.append(line)
    return header, body


def format_text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt(r):
        # First two columns (shape, causal) left-aligned, numbers right-aligned.
        cells = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "  ".join(cells)
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def format_markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def error_notes(rows: list[dict], max_len: int = 200) -> list[str]:
    """One line per (impl, message): which implementations failed or were skipped, and why."""
    seen: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.get("error"):
            key = (row["impl"], row["error"][:max_len])
            seen[key] = seen.get(key, 0) + 1
    return [f"{impl} ({n} shape{'s' if n > 1 else ''}): {msg}" for (impl, msg), n in seen.items()]


def worst_errors(rows: list[dict]) -> dict[str, float]:
    """Largest relative error per implementation (against that shape's reference)."""
    worst: dict[str, float] = {}
    for row in rows:
        rel = row.get("rel_err")
        if rel is None:
            continue
        prev = worst.get(row["impl"])
        # NaN (a NaN in the output) is the worst error of all and, once in, stays.
        if prev is None or math.isnan(rel) or rel > prev:
            worst[row["impl"]] = rel
    return worst


# What ``first_calls`` reports: the autotuner's choice and the compiled kernels are kept per
# process, so a later shape of the same kernel variant (or a row re-measured after others)
# shows ~0 for ours, while peers that compile per shape (flex, Inductor) pay on every row.
FIRST_CALLS = "First call (compile, autotune, first run), seconds, largest / smallest"


def first_calls(rows: list[dict]) -> str:
    """Each implementation's first call (compile, autotune, run) over ``rows``, in seconds:
    "ours 7.6 / 0.00, flex 6.7 / 5.36" (largest / smallest), or "" when none was recorded."""
    firsts: dict[str, list[float]] = {}
    for r in rows:
        if r.get("first_call_s") is not None:
            firsts.setdefault(r["impl"], []).append(r["first_call_s"])
    return ", ".join(f"{k} {max(v):.1f} / {min(v):.2f}" for k, v in firsts.items())


# --------------------------------------------------------------------------------------------
# Markdown report
# --------------------------------------------------------------------------------------------

def load(path: Path) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "meta" not in data or "rows" not in data:
        raise ValueError(f"{path}: not an attention benchmark result (no 'meta' / 'rows')")
    return data


def section(path: Path, data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    tol = meta.get("mismatch_tol", MISMATCH_TOL)
    cuda = f", CUDA {meta['cuda']}" if meta.get("cuda") else ""
    out = [
        f"## {meta.get('device', '?')}: torch {meta.get('torch', '?')}, "
        f"triton {meta.get('triton', '?')}{cuda}, {meta.get('dtype', '?')}, "
        f"{meta.get('date', '?')}",
        "",
        f"{'Forward + backward' if meta.get('benchmark') == 'attention_fwdbwd' else 'Forward'}, "
        f"TFLOP/s (higher is better). Source: `{path.name}`"
        + (f", code `{meta['git']}`" if meta.get("git") else "")
        + (". Quick run (smoke shapes only)." if meta.get("quick") else ".")
        + ("" if meta.get("complete", True) else " **Incomplete run.**"),
        "",
        format_markdown_table(*table(rows, tol)),
    ]
    worst = worst_errors(rows)
    if worst:
        refs = sorted({r["ref"] for r in rows if r.get("ref")})
        out += ["", f"Largest relative error against the reference ({', '.join(refs)}): "
                + ", ".join(f"{impl} {err:.1e}" for impl, err in worst.items()) + "."]
    firsts = first_calls(rows)
    if firsts:
        out += ["", f"{FIRST_CALLS}: {firsts}."]
    notes = error_notes(rows)
    if notes:
        out += ["", "Not measured:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# --matrix results: shards merged, one table per (head dim, variant)
# --------------------------------------------------------------------------------------------

SHARD_SUFFIX = re.compile(r"_shard(\d+)of(\d+)$")


def is_matrix(data: dict) -> bool:
    return bool(data["meta"].get("matrix"))


def group_results(results: list[tuple[Path, dict]]) -> list[list[tuple[Path, dict]]]:
    """Report sections, in the order of the files: an ordinary file alone, the shards of one
    --matrix run (the same file name but for _shardIofN) together."""
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for path, data in results:
        key = SHARD_SUFFIX.sub("", path.stem) if is_matrix(data) else str(path)
        groups.setdefault(key, []).append((path, data))
    return list(groups.values())


def group_name(parts: list[tuple[Path, dict]]) -> str:
    return SHARD_SUFFIX.sub("", parts[0][0].stem)


def best_other(by_impl: dict, tol: float, mine: str = "ours") -> str:
    """ours / the fastest other implementation with a correct output, naming it."""
    ours = by_impl.get(mine)
    others = [r for name, r in by_impl.items() if name != mine and not r.get("error")
              and r.get("tflops") and not is_mismatch(r, tol)]
    if not ours or ours.get("error") or not others:
        return "-"
    best = max(others, key=lambda r: r["tflops"])
    return f"{ours['tflops'] / best['tflops']:.2f}x {best['impl']}"


def matrix_table(rows: list[dict], tol: float = MISMATCH_TOL) -> tuple[list[str], list[list[str]]]:
    """One (head dim, variant): a line per N, a column per implementation."""
    impls, shapes = pivot(rows)
    header = ["N", "B, H", *impls, "ours / best other"]
    body = [[str(first["seqlen_q"]), f"B{first['batch']} {heads_label(first)}"]
            + [cell(by_impl.get(impl), tol) for impl in impls] + [best_other(by_impl, tol)]
            for first, by_impl in sorted(shapes, key=lambda s: s[0]["seqlen_q"])]
    return header, body


def matrix_cells(rows: list[dict]) -> tuple[list[int], list[str], dict]:
    """Head dims, variants (in the order of the run's VARIANTS) and {(head dim, variant): rows}."""
    cells: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["head_dim"], row["variant"]), []).append(row)
    head_dims = sorted({d for d, _ in cells})
    variants = list(dict.fromkeys(v for _, v in cells))
    return head_dims, variants, cells


def shard_status(metas: list[dict]) -> tuple[bool, str]:
    """Whether every shard is there and complete, and a phrase saying which are."""
    counts = {tuple(m["shard"])[1] for m in metas if m.get("shard")}
    if not counts:
        return all(m.get("complete", True) for m in metas), "one file"
    n = max(counts)
    have = sorted({m["shard"][0] for m in metas if m.get("shard")})
    missing = [i for i in range(n) if i not in have]
    incomplete = [m["shard"][0] for m in metas if m.get("shard") and not m.get("complete", True)]
    text = f"{len(have)} of {n} shards"
    if missing:
        text += f", missing {', '.join(f'{i}/{n}' for i in missing)}"
    if incomplete:
        text += f", incomplete {', '.join(f'{i}/{n}' for i in incomplete)}"
    return not missing and not incomplete and len(counts) == 1, text


def matrix_section(parts: list[tuple[Path, dict]]) -> str:
    metas = [data["meta"] for _, data in parts]
    meta = metas[0]
    rows = [row for _, data in parts for row in data["rows"]]
    tol = meta.get("mismatch_tol", MISMATCH_TOL)
    cuda = f", CUDA {meta['cuda']}" if meta.get("cuda") else ""
    dates = sorted(m.get("date", "?") for m in metas)
    complete, shards = shard_status(metas)
    gits = sorted({m["git"] for m in metas if m.get("git")})
    names = [p.name for p, _ in parts]
    out = [
        f"## {meta.get('device', '?')}: torch {meta.get('torch', '?')}, "
        f"triton {meta.get('triton', '?')}{cuda}, {meta.get('dtype', '?')}, "
        + (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"),
        "",
        f"{'Forward + backward' if meta.get('benchmark') == 'attention_fwdbwd' else 'Forward'}, "
        f"TFLOP/s (higher is better), `--matrix {meta['matrix']}`: one table per head dim and "
        f"variant, a line per N ({meta.get('shapes', 'L = S = N')}). Sources ({shards}): "
        + ", ".join(f"`{n}`" for n in names)
        + (f", code {', '.join(f'`{g}`' for g in gits)}" if gits else "")
        + (". Quick run (smoke shapes only)." if meta.get("quick") else ".")
        + ("" if complete else " **Incomplete run.**"),
        "",
    ]
    out += [f"- {name}: {text}" for name, text in meta.get("variants", {}).items()]
    redone = sorted({(tuple(r["seqlens"]), r.get("date", "?")[:10], r.get("git") or "?")
                     for m in metas for r in m.get("remeasured", [])})
    if redone:
        out += ["", "Rows measured again later, every peer in the same run (`--remeasure`): "
                + "; ".join(f"N = {', '.join(map(str, n))} on {date}"
                            + (f" (code `{git}`)" if git not in ("?", None) else "")
                            for n, date, git in redone) + "."]
    head_dims, variants, cells = matrix_cells(rows)
    for variant in variants:
        for d in head_dims:
            part = cells.get((d, variant))
            if not part:
                continue
            out += ["", f"### D{d}, {variant}", "", format_markdown_table(*matrix_table(part, tol))]
            worst = worst_errors(part)
            if worst:
                refs = sorted({r["ref"] for r in part if r.get("ref")})
                out += ["", f"Largest relative error against {', '.join(refs)}: "
                        + ", ".join(f"{impl} {err:.1e}" for impl, err in worst.items()) + "."]
            firsts = first_calls(part)
            if firsts:
                out += ["", f"{FIRST_CALLS} (in the run that gave each row): {firsts}."]
    notes = [f"{impl} ({', '.join(vs)}): {note}" for (impl, note), vs in row_notes(rows).items()]
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    # a shape skipped as a whole (its mask too large) is one line, not one per implementation
    whole: dict[str, list[str]] = {}
    per_impl = []
    for first, by_impl in pivot(rows)[1]:
        messages = {r.get("error") for r in by_impl.values()}
        if len(messages) == 1 and None not in messages:
            whole.setdefault(messages.pop(), []).append(f"{shape_label(first)} {first['variant']}")
        else:
            per_impl += by_impl.values()
    errors = [f"every implementation ({', '.join(labels)}): {message}"
              for message, labels in whole.items()] + error_notes(per_impl)
    if errors:
        out += ["", "Not measured:", ""] + [f"- {n}" for n in errors]
    return "\n".join(out)


def row_notes(rows: list[dict]) -> dict[tuple[str, str], list[str]]:
    """(impl, note) -> the variants it was seen in, e.g. Inductor's SDPA substitution."""
    notes: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if row.get("note"):
            seen = notes.setdefault((row["impl"], row["note"]), [])
            variant = row.get("variant") or "all"
            if variant not in seen:
                seen.append(variant)
    return notes


def write_report(output: Path, sections: list[str]) -> None:
    block = "\n\n".join([BEGIN_MARK, *sections, END_MARK]) + "\n"
    text = output.read_text() if output.exists() else DEFAULT_HEADER
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        tail = rest.split(END_MARK, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    output.write_text(text)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------

def _tflops_or_zero(row: dict | None) -> float:
    # A failed or skipped implementation simply has no bar for that shape.
    return row["tflops"] if row and not row.get("error") else 0.0


def import_pyplot():
    # Imported only for --plot: matplotlib is an optional dependency (the "bench" extra).
    try:
        import matplotlib
    except ImportError:
        sys.exit("report.py: --plot needs matplotlib: pip install matplotlib "
                 "(or pip install -e '.[bench]')")
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot(path: Path, results: list[tuple[Path, dict]], plt) -> None:
    """Grouped bar chart, one panel per results file: TFLOP/s per shape and implementation."""
    n_shapes = max(len(pivot(d["rows"])[1]) for _, d in results)
    fig, axes = plt.subplots(len(results), 1, squeeze=False,
                             figsize=(max(8.0, 1.2 * n_shapes), 4.5 * len(results)))
    for ax, (_, data) in zip(axes[:, 0], results):
        meta = data["meta"]
        impls, shapes = pivot(data["rows"])
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            ys = [_tflops_or_zero(by_impl.get(impl)) for _, by_impl in shapes]
            ax.bar([x + (i - (len(impls) - 1) / 2) * width for x in range(len(shapes))],
                   ys, width, label=impl)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([shape_label(f) + ("\ncausal" if f["causal"] else "")
                            for f, _ in shapes], fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{meta.get('device')} · torch {meta.get('torch')} · "
                     f"triton {meta.get('triton')} · {meta.get('dtype')}", fontsize=10)
        ax.legend(fontsize=8, ncol=len(impls))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_matrix(path: Path, parts: list[tuple[Path, dict]], plt,
                variants: list[str] | None = None) -> None:
    """TFLOP/s against N, one panel per (variant, head dim), a line per implementation; a
    skipped or failed point is a gap."""
    meta = parts[0][1]["meta"]
    rows = [row for _, data in parts for row in data["rows"]]
    head_dims, present, cells = matrix_cells(rows)
    variants = [v for v in variants or present if v in present]
    impls = pivot(rows)[0]
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    seqlens = sorted({row["seqlen_q"] for row in rows})
    fig, axes = plt.subplots(len(variants), len(head_dims), squeeze=False, sharex=True,
                             figsize=(4.6 * len(head_dims), 0.8 + 3.0 * len(variants)),
                             layout="constrained")
    for i, variant in enumerate(variants):
        for j, d in enumerate(head_dims):
            ax = axes[i, j]
            _, shapes = pivot(cells.get((d, variant), []))
            shapes.sort(key=lambda s: s[0]["seqlen_q"])
            xs = [first["seqlen_q"] for first, _ in shapes]
            for impl in impls:
                ys = [_tflops_or_nan(by_impl.get(impl)) for _, by_impl in shapes]
                ax.plot(xs, ys, marker="o", markersize=3, color=colors[impl], label=impl,
                        linewidth=2.5 if impl == "ours" else 1.2, zorder=3 if impl == "ours" else 2)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [f"{n // 1024}k" if n >= 1024 else str(n) for n in seqlens])
            ax.set_title(f"D{d}, {variant}", fontsize=10)
            ax.grid(True, alpha=0.3)
            if j == 0:
                ax.set_ylabel("TFLOP/s")
            if i == len(variants) - 1:
                ax.set_xlabel("N (batch = 16384 / N)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(impls), fontsize=9)
    fig.suptitle(f"{meta.get('device')} · torch {meta.get('torch')} · triton {meta.get('triton')}"
                 f" · {meta.get('dtype')}", fontsize=11)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _tflops_or_nan(row: dict | None) -> float:
    return row["tflops"] if row and not row.get("error") and row.get("tflops") else math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path,
                        help=f"result JSON files (default: {DEFAULT_RESULTS}/attention_*.json)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="markdown file to write (default: BENCHMARKS.md at the repo root)")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="also write a bar chart PNG here (needs matplotlib)")
    parser.add_argument("--plot-variants", default=None, metavar="LIST",
                        help="--matrix figures: only these variants (comma-separated, e.g. "
                             "causal for a compact README figure; default: all)")
    args = parser.parse_args(argv)

    paths = args.paths or sorted(DEFAULT_RESULTS.glob("attention_*.json"))
    if not paths:
        sys.exit(f"report.py: no result files given and none in {DEFAULT_RESULTS}")
    results = [(p, load(p)) for p in paths]
    plt = import_pyplot() if args.plot else None  # fail before writing anything
    groups = group_results(results)
    write_report(args.output, [matrix_section(g) if is_matrix(g[0][1]) else section(*g[0])
                               for g in groups])
    print(f"wrote {args.output} ({len(results)} result file{'s' if len(results) > 1 else ''})")
    if args.plot:
        plain = [g[0] for g in groups if not is_matrix(g[0][1])]
        matrices = [g for g in groups if is_matrix(g[0][1])]
        if plain:
            plot(args.plot, plain, plt)
        for parts in matrices:
            # the --plot path itself when it is the only figure, else one file per run
            alone = not plain and len(matrices) == 1
            plot_matrix(args.plot if alone else args.plot.with_name(
                f"{args.plot.stem}_{group_name(parts)}{args.plot.suffix}"), parts, plt,
                args.plot_variants and args.plot_variants.split(","))

if __name__ == "__main__":
    main()
