"""Turn attention benchmark results (JSON from ``benchmarks/attention.py``) into BENCHMARKS.md.

    python benchmarks/report.py                          # every benchmarks/results/attention_*.json
    python benchmarks/report.py a.json b.json --output /tmp/BENCH.md --plot /tmp/bench.png

Each results file becomes one section: a heading naming the device, software versions, dtype
and date, then a table of TFLOP/s (rows: shape and causal; columns: implementations, plus the
ratio of ours to SDPA's flash backend). The generated text sits between two marker comments;
anything outside them in the output file is kept, so BENCHMARKS.md can carry hand-written notes.

This module needs neither torch nor triton (the results may be read anywhere); attention.py
imports its table helpers so the console table and the markdown table agree.
"""

from __future__ import annotations

import argparse
import json
import math
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
    return (row["batch"], row["heads"], row["seqlen_q"], row["seqlen_kv"], row["head_dim"],
            row["causal"])


def shape_label(row: dict) -> str:
    b, h, lq, lk, d = row["batch"], row["heads"], row["seqlen_q"], row["seqlen_kv"], row["head_dim"]
    seq = f"N{lq}" if lq == lk else f"L{lq} S{lk}"
    return f"B{b} H{h} {seq} D{d}"


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
    header = ["shape", "causal", *impls]
    ratio_wanted = "ours" in impls and "sdpa_flash" in impls
    if ratio_wanted:
        header.append("ours / SDPA flash")
    body = []
    for first, by_impl in shapes:
        line = [shape_label(first), "yes" if first["causal"] else "no"]
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
    notes = error_notes(rows)
    if notes:
        out += ["", "Not measured:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path,
                        help=f"result JSON files (default: {DEFAULT_RESULTS}/attention_*.json)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="markdown file to write (default: BENCHMARKS.md at the repo root)")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="also write a bar chart PNG here (needs matplotlib)")
    args = parser.parse_args(argv)

    paths = args.paths or sorted(DEFAULT_RESULTS.glob("attention_*.json"))
    if not paths:
        sys.exit(f"report.py: no result files given and none in {DEFAULT_RESULTS}")
    results = [(p, load(p)) for p in paths]
    plt = import_pyplot() if args.plot else None  # fail before writing anything
    write_report(args.output, [section(p, d) for p, d in results])
    print(f"wrote {args.output} ({len(results)} result file{'s' if len(results) > 1 else ''})")
    if args.plot:
        plot(args.plot, results, plt)


if __name__ == "__main__":
    main()
