"""Render benchmark results (JSON from ``python -m benchmarks``) as PNG plots + a markdown table.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--out DIR]
    python -m benchmarks.report benchmarks/results/<date>-<gpu>/*.json --readme README.md

A result file is either the runner's (``cases``) or the GPU campaign's ``campaign.json`` (``python
-m benchmarks.campaign``, :func:`from_campaign`: its rows of kind ``case`` are the cases, ``train``
the end-to-end table, ``gemm`` and ``exact`` the cuBLAS rates and the exactness table); any of them
can be merged. ``--readme`` rewrites the block between
``<!-- perf:begin -->`` and ``<!-- perf:end -->`` of a README with the tables and links to the
plots, so the top-level performance table is always regenerated from the committed JSON.

Several result files (e.g. one GPU call per family) are merged; they should come from the same
device. Per lm_head family one PNG with three panels against tokens (log-log): forward time with
the 2NHV floor, forward+backward time with the 6NHV floor (both at the measured bf16 matmul
rate), and peak extra memory; one line per implementation (only rows whose status is ``ok``).
The markdown lists every row, failures included, so nothing is hidden, and, where the runner
recorded them, the cost model's predicted times beside the measured ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMPL_ORDER = ("eager", "torch", "triton", "triton-pairs", "triton-vocab", "triton-fused", "liger", "cce",
              "cce-nofilter", "torch-lce")
STYLE = {"eager": ("tab:gray", "o"), "torch": ("tab:blue", "s"), "triton": ("tab:red", "D"),
         "triton-pairs": ("tab:orange", "P"), "triton-vocab": ("tab:brown", "X"),
         "triton-fused": ("tab:pink", "d"), "liger": ("tab:green", "^"), "cce": ("tab:purple", "v"),
         "cce-nofilter": ("tab:cyan", ">"), "torch-lce": ("tab:olive", "<")}


def from_campaign(data: dict) -> dict:
    """The campaign's JSON (``steps`` rows, the environment under ``env``) in the runner's schema:
    the rows of kind ``case`` (one per (case, impl), skipped ones included) are the ``cases``, the
    ``train`` rows the ``e2e`` paths, the ``gemm`` and ``exact`` rows the ``check`` tables."""
    env = data.get("env") or {}
    steps = data.get("steps", [])
    out = {"schema": data.get("schema"), "device": env.get("device"),
           "device_type": env.get("device_type"), "torch": env.get("torch"),
           "triton": env.get("triton"), "commit": env.get("commit"), "date": data.get("date"),
           "matmul_bf16_tflops": data.get("matmul_bf16_tflops"), "call": data.get("call"),
           "dry_run": data.get("dry_run"),
           "cases": [dict(s) for s in steps if s.get("kind") == "case"]}
    precompute = [dict(s) for s in steps if s.get("kind") == "precompute"]
    if precompute:
        out["precompute"] = precompute
    train = [dict(s) for s in steps if s.get("kind") == "train"]
    if train:
        model = data.get("train_model") or {}
        out["e2e"] = {"model": model.get("model"), "dtype": model.get("dtype"), "paths": train}
    if any(s.get("kind") in ("gemm", "exact") for s in steps):
        out["check"] = {"gemm": [s for s in steps if s.get("kind") == "gemm"],
                        "exact": [s for s in steps if s.get("kind") == "exact"], "tuned": data.get("tuned")}
    return out


def read(path) -> dict:
    """One result file, in the runner's schema (campaign files converted by :func:`from_campaign`)."""
    data = json.loads(Path(path).read_text())
    if "cases" not in data and "steps" in data:
        data = from_campaign(data)
    return data


def load(paths) -> dict:
    """Merge result files: device info from the first, ``cases`` concatenated, ``e2e`` kept."""
    merged = None
    for p in paths:
        data = read(p)
        if merged is None:
            merged = dict(data)
            merged["cases"] = list(data.get("cases", []))
            merged["sources"] = [str(p)]
            continue
        if data.get("device") != merged.get("device"):
            merged.setdefault("warnings", []).append(
                f"{p}: device {data.get('device')!r} differs from {merged.get('device')!r}")
        merged["cases"].extend(data.get("cases", []))
        merged["sources"].append(str(p))
        if merged.get("matmul_bf16_tflops") is None:
            merged["matmul_bf16_tflops"] = data.get("matmul_bf16_tflops")
        for key in ("e2e", "check"):
            if key in data and key not in merged:
                merged[key] = data[key]
        if data.get("precompute"):
            merged["precompute"] = list(merged.get("precompute", [])) + list(data["precompute"])
    if merged is None:
        raise ValueError("no result files given")
    return merged


def _families(cases):
    seen = []
    for c in cases:
        if c["family"] not in seen:
            seen.append(c["family"])
    return seen


def _impls(cases):
    present = {c["impl"] for c in cases}
    return [i for i in IMPL_ORDER if i in present] + sorted(present - set(IMPL_ORDER))


def _label(impl, rows):
    notes = sorted({n for r in rows for n in (r.get("notes") or [])})
    return impl + (f" ({', '.join(notes)})" if notes else "")


def plot_family(data: dict, family: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in data["cases"] if c["family"] == family]
    c0 = cases[0]
    H, V = c0["hidden"], c0["vocab"]
    rate = data.get("matmul_bf16_tflops")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("fwd_ms", "forward time (ms)", 2.0), ("fwd_bwd_ms", "forward+backward time (ms)", 6.0),
              ("peak_mem_mib", "peak extra memory, fwd+bwd (MiB)", None))
    all_tokens = sorted({c["tokens"] for c in cases})
    for ax, (key, title, k) in zip(axes, panels):
        for impl in _impls(cases):
            rows = sorted((c for c in cases if c["impl"] == impl and c["status"] == "ok"
                           and c.get(key) is not None), key=lambda c: c["tokens"])
            if not rows:
                continue
            color, marker = STYLE.get(impl, (None, "x"))
            ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], marker=marker,
                    color=color, label=_label(impl, rows))
            ooms = [c["tokens"] for c in cases if c["impl"] == impl and c["status"] == "oom"]
            if ooms and rows:
                ax.scatter(ooms, [rows[-1][key]] * len(ooms), marker="x", color=color, s=60)
        if k is not None and rate:
            floor = [k * n * H * V / (rate * 1e12) * 1e3 for n in all_tokens]
            ax.plot(all_tokens, floor, "k--", lw=1,
                    label=f"{int(k)}NHV floor @ {rate:.3g} TFLOP/s (measured)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
    cap = c0.get("softcap")
    loss = {"simpo": "SimPO", "dpo": "DPO (precomputed reference)"}.get(c0.get("loss") or "simpo", c0.get("loss"))
    fig.suptitle(f"{loss} lm_head loss, {family}: H={H}, V={V}, {c0['dtype']}, "
                 f"softcap {cap if cap is not None else 'none'}{_layout_text(cases)}; "
                 f"{data.get('device')} (x = out of memory)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layout_text(cases) -> str:
    """``", ultrafeedback layout, target frac 0.40"`` for a non-default input layout, else ``""``."""
    layout = next((c["layout"] for c in cases if c.get("layout")), "random")
    if layout == "random":
        return ""
    fracs = [c["target_frac"] for c in cases if c.get("target_frac") is not None]
    return f", {layout} layout" + (f", target frac {fracs[0]:.2f}" if fracs else "")


def _cell(c):
    if c is None:
        return ""
    if c["status"] != "ok":
        s = c["status"]
        return s if len(s) <= 40 else s[:37] + "..."
    parts = [f"{c['fwd_bwd_ms']:.1f}" if c.get("fwd_bwd_ms") is not None else "-",
             f"{c['fwd_ms']:.1f}" if c.get("fwd_ms") is not None else "-"]
    mem = c.get("peak_mem_mib")
    cell = " / ".join(parts) + (f" / {mem:.0f}" if mem is not None else "")
    return cell + ("*" if c.get("notes") else "")


def _prediction_table(cases) -> list:
    """Measured ms beside the cost model's ``pred_*`` ms (rows written by the runner since the
    cost model landed; older result files have none and get no table)."""
    rows = [c for c in cases if c.get("pred_fwd_bwd_ms") is not None]
    if not rows:
        return []
    f = (lambda v: "-" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.3g}")
    rate = rows[0].get("pred_matmul_tflops")
    bw = rows[0].get("pred_hbm_tbps")
    out = ["", f"### Measured vs predicted (`benchmarks/cost_model.py` at {rate:.4g} TFLOP/s, {bw:g} TB/s; "
               "a model, not a measurement)", "",
           "| family | N | impl | status | target frac | fwd ms | pred_fwd_ms | fwd+bwd ms | pred_fwd_bwd_ms "
           "| measured / pred |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        meas, pred = c.get("fwd_bwd_ms"), c["pred_fwd_bwd_ms"]
        ratio = f"{meas / pred:.2f}" if meas is not None and pred else "-"
        out.append(f"| {c['family']} | {c['tokens']} | {c['impl']} | {c['status'][:30]} | "
                   f"{c.get('target_frac', '-')} | {f(c.get('fwd_ms'))} | {f(c.get('pred_fwd_ms'))} | "
                   f"{f(meas)} | {f(pred)} | {ratio} |")
    return out


def table(data: dict) -> str:
    lines = []
    rate = data.get("matmul_bf16_tflops")
    lines.append(f"Device: {data.get('device')}; torch {data.get('torch')}, triton "
                 f"{data.get('triton')}; commit {data.get('commit')}; {data.get('date')}.")
    if rate:
        lines.append(f"Measured bf16 matmul rate: {rate:.4g} TFLOP/s.")
    if data.get("device_type") == "cpu":
        lines.append("**CPU smoke run: not a speed measurement.**")
    for w in data.get("warnings", []):
        lines.append(f"Warning: {w}")
    lines.append("")
    lines.append("Cells: fwd+bwd ms / fwd ms / peak extra MiB (fwd+bwd); `*` = see notes.")
    notes = {}
    for fam in _families(data["cases"]):
        cases = [c for c in data["cases"] if c["family"] == fam]
        c0 = cases[0]
        tokens = sorted({c["tokens"] for c in cases})
        lines.append("")
        cap = next((c["softcap"] for c in cases if c.get("softcap") is not None), None)
        loss = c0.get("loss") or "simpo"
        lines.append(f"### {fam} (H={c0['hidden']}, V={c0['vocab']}, {c0['dtype']}, "
                     f"softcap {cap if cap is not None else 'none'}{_layout_text(cases)}"
                     + ("" if loss == "simpo" else f"; loss {loss}, reference precomputed") + ")")
        lines.append("")
        lines.append("| impl | " + " | ".join(f"N={n}" for n in tokens) + " |")
        lines.append("|---|" + "---|" * len(tokens))
        if rate:
            floor = [f"{6 * n * c0['hidden'] * c0['vocab'] / (rate * 1e12) * 1e3:.1f}"
                     for n in tokens]
            lines.append("| 6NHV floor (ms) | " + " | ".join(floor) + " |")
        for impl in _impls(cases):
            by_n = {c["tokens"]: c for c in cases if c["impl"] == impl}
            for c in by_n.values():
                if c.get("notes"):
                    notes.setdefault(impl, set()).update(c["notes"])
            lines.append(f"| {impl} | " + " | ".join(_cell(by_n.get(n)) for n in tokens) + " |")
    if notes:
        lines.append("")
        for impl, ns in notes.items():
            lines.append(f"`*` {impl}: {', '.join(sorted(ns))}.")
    lines += _prediction_table(data["cases"])
    lines += _precompute_table(data.get("precompute"))
    lines += _check_tables(data.get("check"))
    e2e = data.get("e2e")
    if e2e and e2e.get("paths"):
        lines.append("")
        lines.append(f"### End to end: {e2e.get('model')}, one training step "
                     f"(forward, backward, AdamW), {e2e.get('dtype')}, gradient checkpointing")
        lines.append("")
        lines.append("| loss path | pairs x seq | step ms | tokens/s | peak MiB | largest batch (pairs) |")
        lines.append("|---|---|---|---|---|---|")
        for p in e2e["paths"]:
            lb = p.get("largest_batch") or {}
            big = "-" if not lb else (f">= {lb['max_pairs']} (cap)" if lb.get("capped")
                                      else str(lb["max_pairs"]))
            f = (lambda v, s=".1f": "-" if v is None else format(v, s))
            lines.append(f"| {p['path']} ({p['status']}) | {p.get('pairs', '')} x {p.get('seq', '')} | "
                         f"{f(p.get('step_ms'))} | {f(p.get('tokens_per_s'), '.0f')} | "
                         f"{f(p.get('peak_mem_mib'), '.0f')} | {big} |")
    return "\n".join(lines) + "\n"


def _precompute_table(rows) -> list:
    """The reference precompute pass (``sequence_logps``, forward only, no gradient): measured
    forward ms beside the cost model's (2MHV), peak extra memory, error of the sums against float64."""
    if not rows:
        return []
    f = (lambda v, spec: "-" if v is None else format(v, spec))
    out = ["", "### Reference precompute pass (`sequence_logps`: per-row sums, forward only, no logits kept)", "",
           "| family | N | impl | status | target frac | fwd ms | pred_fwd_ms | x 2NHV | peak MiB | sums rel err |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.get("errors") or {}
        out.append(f"| {r['family']} | {r['tokens']} | {r['impl']} | {r['status'][:30]} | "
                   f"{r.get('target_frac', '-')} | {f(r.get('fwd_ms'), '.2f')} | {f(r.get('pred_fwd_ms'), '.2f')} | {f(r.get('x_floor'), '.2f')} | "
                   f"{f(r.get('fwd_peak_mem_mib'), '.0f')} | {f(e.get('sums'), '.1e')} |")
    return out


def _check_tables(check) -> list:
    """The ``check`` call's cuBLAS rates and exactness table (relative norm errors against float64)."""
    if not check:
        return []
    f = (lambda v, spec: "-" if v is None else format(v, spec))
    lines = ["", "### cuBLAS rates (M x N x K)", "", "| GEMM | shape | out dtype | ms | TFLOP/s |", "|---|---|---|---|---|"]
    for g in check["gemm"]:
        lines.append(f"| {g['name']} | {g['m']}x{g['n']}x{g['k']} | {g.get('out_dtype')} | "
                     f"{f(g.get('median_ms'), '.3f')} | {f(g.get('tflops'), '.0f')} |")
    lines += ["", "### Exactness against float64 (relative norm errors; every backend and schedule)", "",
              "| case | impl | loss | log-probs | dH | dW | status |", "|---|---|---|---|---|---|---|"]
    for r in check["exact"]:
        e = r.get("errors") or {}
        lines.append(f"| {r.get('case')} ({r.get('dtype')}) | {r['impl']} | {f(e.get('loss'), '.1e')} | "
                     f"{f(e.get('logps'), '.1e')} | {f(e.get('dhidden'), '.1e')} | {f(e.get('dweight'), '.1e')} | "
                     f"{r['status'][:60]} |")
    return lines


README_BEGIN, README_END = "<!-- perf:begin -->", "<!-- perf:end -->"


def readme_block(paths, readme: Path) -> str:
    """The README's performance block from result files: provenance, tables, links to the plots
    (``<stem>-<family>.png`` beside the first file, as :func:`render` writes them)."""
    import os

    paths = [Path(p) for p in paths]
    data = load(paths)
    if data.get("dry_run"):
        raise ValueError(f"{paths[0]} is a dry run: CPU numbers never go into the README")
    rel = Path(os.path.relpath(paths[0].parent, readme.resolve().parent))
    stem = next((p.stem for p in paths if read(p).get("cases")), paths[0].stem)
    head = (f"Measured on **{data.get('device')}** ({data.get('date')}, commit {data.get('commit')}, torch "
            f"{data.get('torch')}, triton {data.get('triton')}); regenerated from "
            + ", ".join(f"`{(rel / p.name).as_posix()}`" for p in paths) + " by `python -m benchmarks.report "
            "... --readme README.md`.")
    plots = [f"![{fam}]({(rel / f'{stem}-{fam}.png').as_posix()})" for fam in _families(data["cases"])
             if (paths[0].parent / f"{stem}-{fam}.png").exists()]
    return "\n".join([README_BEGIN, head, "", table(data).rstrip(), ""] + plots + [README_END])


def update_readme(readme: Path, block: str) -> None:
    """Replace the text between the markers of ``readme`` by ``block`` (ValueError without them)."""
    text = readme.read_text()
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} block to replace")
    readme.write_text(text[:i] + block + text[j + len(README_END):])


def render(paths, out_dir=None, stem=None) -> str:
    """Write ``<stem>-<family>.png`` per family and ``<stem>.md`` into ``out_dir``; return the md."""
    paths = [Path(p) for p in paths]
    data = load(paths)
    out_dir = Path(out_dir) if out_dir else paths[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or paths[0].stem
    md = [f"## SimPO loss benchmarks ({stem})", "", table(data)]
    for fam in _families(data["cases"]):
        png = plot_family(data, fam, out_dir / f"{stem}-{fam}.png")
        md.append(f"![{fam}]({png.name})")
    text = "\n".join(md) + "\n"
    (out_dir / f"{stem}.md").write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default=None)
    ap.add_argument("--stem", default=None)
    ap.add_argument("--readme", default=None, help="rewrite this README's performance block instead")
    args = ap.parse_args(argv)
    if args.readme:
        update_readme(Path(args.readme), readme_block(args.results, Path(args.readme)))
        print(f"updated {args.readme}")
        return
    print(render(args.results, args.out, args.stem))


if __name__ == "__main__":
    main()
