"""Paired tests between runs on the same test slices, and the paper's tables (Tables 2-6).

A *run* here is a folder holding ``per_slice.csv`` (``spineseg evaluate`` output, or an experiment's
``runs/<model>/eval``), named after its folder (or the ``name`` in a ``run.json`` beside it).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from scipy import stats

from .. import STRUCTURES
from ..errors import SpinesegError
from ..io.atomic import atomic_write_text
from ..models.registry import ABLATION_ROWS
from .evaluate import read_per_slice

TABLE_METRICS = ("dice", "hd95", "iou", "ppv")
LOWER_IS_BETTER = {"hd", "hd95"}


def load_run(path: str | Path) -> tuple[str, list[dict]]:
    p = Path(path)
    csv_path = p if p.suffix == ".csv" else (p / "per_slice.csv" if (p / "per_slice.csv").exists() else p / "eval" / "per_slice.csv")
    rows = read_per_slice(csv_path)
    meta = csv_path.parent / "run.json"
    name = json.loads(meta.read_text()).get("name") if meta.exists() else None
    if not name:
        name = p.name if p.name not in ("eval", "per_slice.csv") else p.parent.name
    return name, rows


def paired_values(a: list[dict], b: list[dict], structure: str, metric: str, names=("A", "B")):
    """Values of ``metric`` for ``structure`` on the slices both runs share; error if slice sets differ."""
    ka = {(r["case"], str(r["slice"])) for r in a if r["structure"] == structure}
    kb = {(r["case"], str(r["slice"])) for r in b if r["structure"] == structure}
    if ka != kb:
        only = sorted(ka ^ kb)[:3]
        raise SpinesegError(f"runs {names[0]} and {names[1]} were evaluated on different test slices, e.g. {only}")
    va = {(r["case"], str(r["slice"])): r[metric] for r in a if r["structure"] == structure}
    vb = {(r["case"], str(r["slice"])): r[metric] for r in b if r["structure"] == structure}
    keys = sorted(k for k in ka if va[k] is not None and vb[k] is not None)
    return np.array([va[k] for k in keys], float), np.array([vb[k] for k in keys], float)


def paired_tests(x: np.ndarray, y: np.ndarray) -> dict:
    """Paired t-test and Wilcoxon signed-rank test (two-sided)."""
    out = {"n": int(len(x)), "mean_diff": float(np.mean(x - y)) if len(x) else None, "t_p": None, "wilcoxon_p": None}
    if len(x) >= 2 and np.any(x != y):
        out["t_p"] = float(stats.ttest_rel(x, y).pvalue)
        try:
            out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue)
        except ValueError:
            out["wilcoxon_p"] = None
    elif len(x) >= 2:
        out["t_p"] = out["wilcoxon_p"] = 1.0
    return out


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None entries are left out and kept as None)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    adj: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


def _stat(rows, structure, metric):
    vals = np.array([r[metric] for r in rows if r["structure"] == structure and r[metric] is not None], float)
    return (float(vals.mean()), float(vals.std())) if len(vals) else (None, None)


def compare_runs(runs: list[tuple[str, list[dict]]], reference: str | None = None, test: str = "wilcoxon",
                 use_holm: bool = False, alpha: float = 0.05) -> dict:
    """Means, stds and p-values against ``reference`` (default: the last run) for every structure / metric."""
    if len(runs) < 1:
        raise SpinesegError("compare needs at least one run")
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise SpinesegError(f"two runs share a name: {names}")
    ref = reference or names[-1]
    if ref not in names:
        raise SpinesegError(f"reference run {ref!r} is not among {names}")
    ref_rows = dict(runs)[ref]
    result = {"reference": ref, "test": test, "holm": use_holm, "alpha": alpha, "models": names, "cells": {}}
    pkeys, pvals = [], []
    for name, rows in runs:
        for s in STRUCTURES:
            for m in TABLE_METRICS:
                mean, std = _stat(rows, s, m)
                cell = {"mean": mean, "std": std, "p": None}
                if name != ref:
                    x, y = paired_values(rows, ref_rows, s, m, (name, ref))
                    t = paired_tests(x, y)
                    cell.update(t)
                    cell["p"] = t["wilcoxon_p"] if test == "wilcoxon" else t["t_p"]
                    pkeys.append((name, s, m))
                    pvals.append(cell["p"])
                result["cells"][(name, s, m)] = cell
    if use_holm:
        for k, p in zip(pkeys, holm(pvals)):
            result["cells"][k]["p"] = p
    for s in STRUCTURES:
        for m in TABLE_METRICS:
            vals = [(result["cells"][(n, s, m)]["mean"], n) for n in names if result["cells"][(n, s, m)]["mean"] is not None]
            if vals:
                best = min(vals)[1] if m in LOWER_IS_BETTER else max(vals)[1]
                result["cells"][(best, s, m)]["best"] = True
    return result


def _cell_text(c: dict, scale: float, digits: int, alpha: float, fmt: str) -> str:
    if c["mean"] is None:
        return "–"
    txt = f"{c['mean'] * scale:.{digits}f} ± {c['std'] * scale:.{digits}f}"
    if fmt == "tex":
        txt = f"${c['mean'] * scale:.{digits}f} \\pm {c['std'] * scale:.{digits}f}$"
        if c.get("best"):
            txt = r"\textbf{" + txt + "}"
    elif c.get("best"):
        txt = f"**{txt}**"
    if c.get("p") is not None and c["p"] < alpha:
        txt += "*" if fmt != "tex" else "$^*$"
    return txt


def _scale(metric):
    return (1.0, 2) if metric in LOWER_IS_BETTER else (100.0, 1)


def render_tables(res: dict, ablation_only: bool = False) -> dict[str, str]:
    """Markdown / LaTeX / CSV text: one table per structure (Tables 2-4) and the ablation tables (5-6)."""
    names = res["models"]
    note = (f"Mean ± std over test slices; Dice, IoU, PPV in %, HD95 in mm. Bold: best per column. "
            f"*: p < {res['alpha']} against `{res['reference']}` ({res['test']} signed-rank"
            f"{', Holm-corrected' if res['holm'] else ''}) on the same slices."
            if res["test"] == "wilcoxon" else
            f"Mean ± std over test slices; *: p < {res['alpha']} against `{res['reference']}` (paired t-test"
            f"{', Holm-corrected' if res['holm'] else ''}).")
    md, tex = [], []
    rows_csv = [["table", "model", "structure", "metric", "mean", "std", "p", "best"]]
    for s in STRUCTURES:
        md += [f"### {s}", "", note, "", "| model | Dice (%) | HD95 (mm) | IoU (%) | PPV (%) |", "|---|---|---|---|---|"]
        tex += [f"% {s}", r"\begin{tabular}{lcccc}", r"\hline", r"Model & Dice (\%) & HD95 (mm) & IoU (\%) & PPV (\%) \\", r"\hline"]
        for n in names:
            cells = [res["cells"][(n, s, m)] for m in TABLE_METRICS]
            md.append(f"| {n} | " + " | ".join(_cell_text(c, *_scale(m), res["alpha"], "md") for c, m in zip(cells, TABLE_METRICS)) + " |")
            tex.append(n.replace("_", r"\_") + " & " + " & ".join(_cell_text(c, *_scale(m), res["alpha"], "tex") for c, m in zip(cells, TABLE_METRICS)) + r" \\")
            for c, m in zip(cells, TABLE_METRICS):
                rows_csv.append(["structure", n, s, m, c["mean"], c["std"], c.get("p"), bool(c.get("best"))])
        md.append("")
        tex += [r"\hline", r"\end{tabular}", ""]
    abl = [n for n in ABLATION_ROWS if n in names]
    if abl:
        for m in ("dice", "hd95"):
            label = "Dice (%)" if m == "dice" else "HD95 (mm)"
            md += [f"### Ablation: {label}", "", note, "",
                   "| model | " + " | ".join(STRUCTURES) + " |", "|---" * (len(STRUCTURES) + 1) + "|"]
            for n in abl:
                md.append(f"| {n} | " + " | ".join(_cell_text(res["cells"][(n, s, m)], *_scale(m), res["alpha"], "md")
                                                   for s in STRUCTURES) + " |")
                for s in STRUCTURES:
                    c = res["cells"][(n, s, m)]
                    rows_csv.append(["ablation", n, s, m, c["mean"], c["std"], c.get("p"), bool(c.get("best"))])
            md.append("")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows_csv)
    return {"md": "\n".join(md) + "\n", "tex": "\n".join(tex) + "\n", "csv": buf.getvalue()}


def write_comparison(run_paths, out: str | Path, reference: str | None = None, test: str = "wilcoxon",
                     use_holm: bool = False) -> dict:
    runs = [load_run(p) for p in run_paths]
    res = compare_runs(runs, reference, test, use_holm)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = render_tables(res)
    atomic_write_text(out / "tables.md", text["md"])
    atomic_write_text(out / "tables.tex", text["tex"])
    atomic_write_text(out / "tables.csv", text["csv"])
    from .figures import bar_charts

    bar_charts(runs, out)
    return res
