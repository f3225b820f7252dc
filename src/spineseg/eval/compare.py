"""Paired comparison of evaluated runs at the patient level, and the paper's tables (Tables 2-6).

A *run* is a folder holding ``per_slice.csv`` (``spineseg evaluate`` output, or an experiment's
``runs/<model>/fold<K>/eval``), named after its folder (or the ``name`` in a ``run.json`` beside it).
Folders sharing a name are folds of one model and are pooled (their rows carry different ``fold`` values).

- **Columns.** Every structure x Dice / HD95 / IoU / PPV, plus the mean IoU over the three structures
  (per slice: the mean over the structures that are not absent from both prediction and truth).
- **Same pairs for means and p-values.** A (fold, case, slice) enters a column only where every run
  has a value there (an HD missing in one run leaves that slice out of that column for all runs).
- **Empty slices stay in.** Where the truth has no such structure, a run that draws none there is right:
  it scores 1 for Dice, IoU and PPV whenever another run draws one there (which scores 0), so a false
  positive on an empty slice counts against its run instead of dropping the slice for all. A slice that
  every run leaves empty carries no comparison and stays out; HD95 has no value on such slices.
- **Pairing.** Tests pair runs on per-patient means of those slices (default), or per slice (option).
  The table's mean ± std (sample standard deviation, n − 1) is over the same units the test pairs
  (patient means, or slices), so the bold "best" and the star describe one quantity.
  Patients come from the ``patient`` column, else from a ``cases.csv`` map, else each case is its
  own patient (and the tables say so).
- **A table** is one ``compare`` call: Holm's correction runs over all its tests, i.e. every run other
  than the reference x every column.
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
from ..io.layouts import read_patient_map
from ..models.registry import ABLATION_ROWS
from .evaluate import read_per_slice

TABLE_METRICS = ("dice", "hd95", "iou", "ppv")
MEAN_IOU = ("mean", "miou")  # (structure, metric) key of the mean IoU over the three structures
COLUMNS = tuple((s, m) for s in STRUCTURES for m in TABLE_METRICS) + (MEAN_IOU,)
LOWER_IS_BETTER = {"hd", "hd95"}
TESTS = ("ttest", "wilcoxon")
PAIRINGS = ("patient", "slice")
CORRECTIONS = ("holm", "none")
TEST_NAMES = {"ttest": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}
METRIC_LABELS = {"dice": "Dice (%)", "hd95": "HD95 (mm)", "iou": "IoU (%)", "ppv": "PPV (%)", "miou": "mean IoU (%)"}


# ----------------------------------------------------------------------------------------------- runs

def load_run(path: str | Path) -> tuple[str, list[dict]]:
    p = Path(path)
    csv_path = p if p.suffix == ".csv" else (p / "per_slice.csv" if (p / "per_slice.csv").exists() else p / "eval" / "per_slice.csv")
    rows = read_per_slice(csv_path)
    meta = csv_path.parent / "run.json"
    name = json.loads(meta.read_text()).get("name") if meta.exists() else None
    if not name:
        name = p.name if p.name not in ("eval", "per_slice.csv") else p.parent.name
    return name, rows


def pool_folds(runs: list[tuple[str, list[dict]]]) -> list[tuple[str, list[dict]]]:
    """Runs sharing a name are folds of one model: pool them, refusing overlapping (fold, case, slice) rows."""
    pooled: dict[str, list[dict]] = {}
    for name, rows in runs:
        if name in pooled:
            seen = {_slice_key(r) for r in pooled[name]}
            if any(_slice_key(r) in seen for r in rows):
                raise SpinesegError(f"two runs named {name!r} hold the same slices; give each fold its own "
                                    f"'fold' column or the runs different names")
        pooled.setdefault(name, []).extend(rows)
    return list(pooled.items())


def assign_patients(runs: list[tuple[str, list[dict]]], patient_map: dict[str, str] | None = None,
                    map_name: str = "") -> str:
    """Fill each row's ``patient``; return where the patients came from (a phrase for the tables)."""
    sources = set()
    for _, rows in runs:
        for r in rows:
            if r.get("patient"):
                sources.add("the per_slice.csv patient column")
            elif patient_map is not None and r["case"] in patient_map:
                r["patient"] = patient_map[r["case"]]
                sources.add(map_name or "the patient map")
            else:
                r["patient"] = ""
    unmapped = sorted({r["case"] for _, rows in runs for r in rows if not r["patient"]})
    for _, rows in runs:
        for r in rows:
            r["patient"] = r["patient"] or r["case"]
    if unmapped and not sources:
        return "none known: each case is treated as its own patient"
    if unmapped:
        return (f"{' and '.join(sorted(sources))}; {len(unmapped)} cases without an entry are treated as their own "
                f"patients (e.g. {unmapped[0]})")
    return " and ".join(sorted(sources))


def _slice_key(r: dict) -> tuple[str, str, str]:
    return (str(r.get("fold", "")), r["case"], str(r["slice"]))


EMPTY_AGREES = {"dice", "iou", "ppv"}  # metrics where a structure absent from truth and prediction is a full match


def drawn_somewhere(runs: list[tuple[str, list[dict]]]) -> set[tuple]:
    """``(fold, case, slice, structure)`` where at least one run's truth or prediction holds the structure."""
    return {_slice_key(r) + (r["structure"],) for _, rows in runs for r in rows if not r["absent_both"]}


def column_values(rows: list[dict], column: tuple[str, str], drawn: set[tuple] | None = None) -> dict[tuple, float | None]:
    """``{(fold, case, slice): value}`` of one column; ``None`` where the value is missing or skipped.

    ``drawn`` (:func:`drawn_somewhere` over all compared runs): where a structure is absent from this run's
    truth and prediction but another run draws it, Dice / IoU / PPV are 1 here instead of missing.
    """
    structure, metric = column
    drawn = drawn or set()

    def value(r, m):
        if not r["absent_both"]:
            return r[m]
        return 1.0 if m in EMPTY_AGREES and _slice_key(r) + (r["structure"],) in drawn else None

    if column == MEAN_IOU:
        ious: dict[tuple, list] = {}
        for r in rows:
            ious.setdefault(_slice_key(r), [])
            v = value(r, "iou")
            if v is not None:
                ious[_slice_key(r)].append(v)
        return {k: (float(np.mean(v)) if v else None) for k, v in ious.items()}
    return {_slice_key(r): value(r, metric) for r in rows if r["structure"] == structure}


# ----------------------------------------------------------------------------------------------- statistics

def paired_tests(x: np.ndarray, y: np.ndarray) -> dict:
    """Two-sided paired t-test and Wilcoxon signed-rank test of ``x`` against ``y``."""
    d = np.asarray(x, float) - np.asarray(y, float)
    out = {"n_pairs": int(len(x)), "n_nonzero_pairs": int(np.count_nonzero(d)),
           "mean_diff": float(np.mean(d)) if len(x) else None, "p_ttest": None, "p_wilcoxon": None}
    if len(x) >= 2 and np.any(d != 0):
        # the t statistic is undefined when every pair differs by the same amount (no spread): no p-value
        out["p_ttest"] = None if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())) else float(stats.ttest_rel(x, y).pvalue)
        out["p_wilcoxon"] = float(stats.wilcoxon(x, y).pvalue)  # zero differences are dropped (n_nonzero_pairs)
        out = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}
    elif len(x) >= 2:  # identical values: no evidence of a difference
        out["p_ttest"] = out["p_wilcoxon"] = 1.0
    return out


def wilcoxon_floor(n_pairs: int) -> float:
    """The smallest two-sided p the exact Wilcoxon signed-rank test can give with ``n_pairs`` nonzero pairs."""
    return min(1.0, 2.0 / 2.0 ** n_pairs) if n_pairs > 0 else 1.0


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


def _sample_std(values) -> float | None:
    """The sample standard deviation (n - 1), as papers report it; 0 for one value, None for none."""
    v = np.asarray(values, float)
    return None if not len(v) else float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _group_means(values: np.ndarray, groups: list[str]) -> dict[str, float]:
    out: dict[str, list] = {}
    for v, g in zip(values, groups):
        out.setdefault(g, []).append(v)
    return {g: float(np.mean(v)) for g, v in out.items()}


def compare_runs(runs: list[tuple[str, list[dict]]], reference: str | None = None, test: str = "ttest",
                 pairing: str = "patient", correction: str = "holm", alpha: float = 0.05,
                 patients_from: str | None = None) -> dict:
    """Means, stds and p-values against ``reference`` (default: the last run) for every column.

    Rows must carry ``patient`` (see :func:`assign_patients`; without it each case is its own patient).
    """
    if test not in TESTS or pairing not in PAIRINGS or correction not in CORRECTIONS:
        raise SpinesegError(f"test must be one of {TESTS}, pairing one of {PAIRINGS}, correction one of {CORRECTIONS}")
    if not runs:
        raise SpinesegError("compare needs at least one run")
    runs = pool_folds(runs)
    if patients_from is None:
        patients_from = assign_patients(runs)
    names = [n for n, _ in runs]
    ref = reference or names[-1]
    if ref not in names:
        raise SpinesegError(f"reference run {ref!r} is not among {names}")
    by_name = dict(runs)
    patient_of = _patients_of_slices(runs)
    all_keys = set(patient_of)
    res = {"reference": ref, "test": test, "pairing": pairing, "correction": correction, "alpha": alpha,
           "models": names, "patients_from": patients_from, "n_slices": len(all_keys),
           "n_patients": len(set(patient_of.values())), "n_folds": len({k[0] for k in all_keys}),
           "columns": {}, "cells": {}}
    family = []
    drawn = drawn_somewhere(runs)
    for col in COLUMNS:
        values = {n: column_values(by_name[n], col, drawn) for n in names}
        for n in names:
            if set(values[n]) != set(values[ref]):
                only = sorted(set(values[n]) ^ set(values[ref]))[:3]
                raise SpinesegError(f"runs {n} and {ref} were evaluated on different test slices, e.g. {only}")
        common = sorted(k for k in values[ref] if all(values[n][k] is not None for n in names))
        groups = [patient_of[k] for k in common]
        folds = [k[0] for k in common]
        empty = sum((all(values[n][k] is None for n in names) if col == MEAN_IOU else k + (col[0],) not in drawn)
                    for k in values[ref])  # slices on which no model's truth or prediction holds the structure
        res["columns"][col] = {"n_slices": len(common), "n_patients": len(set(groups)),
                               "left_out": len(values[ref]) - len(common) - empty, "empty_in_every_model": empty}
        arrays = {n: np.array([values[n][k] for k in common], float) for n in names}
        for n in names:
            v = arrays[n]
            fold_means = list(_group_means(v, folds).values())
            # the table's units are the test's units: patient means (default) or slices
            units = np.array(list(_group_means(v, groups).values())) if pairing == "patient" else v
            cell = {"mean": float(units.mean()) if len(units) else None,
                    "std": _sample_std(units),
                    "slice_mean": float(v.mean()) if len(v) else None,
                    "n_slices": len(common), "n_patients": len(set(groups)), "n_folds": len(fold_means),
                    "fold_mean": float(np.mean(fold_means)) if len(fold_means) > 1 else None,
                    "fold_std": _sample_std(fold_means) if len(fold_means) > 1 else None}
            if n != ref:
                if pairing == "patient":
                    x, y = _group_means(v, groups), _group_means(arrays[ref], groups)
                    x, y = np.array([x[g] for g in sorted(x)]), np.array([y[g] for g in sorted(x)])
                else:
                    x, y = v, arrays[ref]
                cell.update(paired_tests(x, y))
                family.append(cell)
            res["cells"][(n,) + col] = cell
        _mark_best(res, names, col)
    for kind in TESTS:
        raw = [c[f"p_{kind}"] for c in family]
        adjusted = holm(raw) if correction == "holm" else raw
        for c, p in zip(family, adjusted):
            c[f"p_{kind}_adjusted"] = p
    for c in family:
        c["p"] = c[f"p_{test}_adjusted"]
    res["n_tests"] = sum(c["p"] is not None for c in family)
    return res


def _patients_of_slices(runs) -> dict[tuple, str]:
    patient_of: dict[tuple, str] = {}
    for _, rows in runs:
        for r in rows:
            k = _slice_key(r)
            if patient_of.setdefault(k, r["patient"]) != r["patient"]:
                raise SpinesegError(f"runs disagree on the patient of case {r['case']} "
                                    f"({patient_of[k]} vs {r['patient']})")
    return patient_of


def _mark_best(res: dict, names: list[str], col: tuple[str, str]) -> None:
    vals = [(res["cells"][(n,) + col]["mean"], n) for n in names if res["cells"][(n,) + col]["mean"] is not None]
    if vals:
        best = min(vals)[1] if col[1] in LOWER_IS_BETTER else max(vals)[1]
        res["cells"][(best,) + col]["best"] = True


# ----------------------------------------------------------------------------------------------- tables

def _scale(metric):
    return (1.0, 2) if metric in LOWER_IS_BETTER else (100.0, 1)


def _cell_text(c: dict, metric: str, alpha: float, fmt: str, spread: str = "slices") -> str:
    mean, std = (c["mean"], c["std"]) if spread == "slices" else (c["fold_mean"], c["fold_std"])
    if mean is None:
        return "–"
    scale, digits = _scale(metric)
    if fmt == "tex":
        txt = f"${mean * scale:.{digits}f} \\pm {std * scale:.{digits}f}$"
        txt = r"\textbf{" + txt + "}" if c.get("best") else txt
        return txt + ("$^*$" if c.get("p") is not None and c["p"] < alpha else "")
    txt = f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    txt = f"**{txt}**" if c.get("best") else txt
    return txt + ("*" if c.get("p") is not None and c["p"] < alpha else "")


def _column_name(col) -> str:
    return "mean IoU" if col == MEAN_IOU else f"{METRIC_LABELS[col[1]].split(' (')[0]} of {col[0].replace('_', ' ')}"


def table_note(res: dict, columns) -> str:
    """What the numbers of a table are: n patients / slices, spread, test, pairing, correction, left-out slices."""
    n_models = len(res["models"])
    folds = f", {res['n_folds']} folds pooled" if res["n_folds"] > 1 else ""
    units = "per-patient means (each patient's mean over its slices)" if res["pairing"] == "patient" else "test slices"
    parts = [f"n = {res['n_patients']} patients, {res['n_slices']} test slices{folds}. "
             f"Mean ± sample std over {units}; Dice, IoU, PPV in %, HD95 in mm. Bold: best per column."]
    if n_models > 1:
        paired = (f"p-values are paired on per-patient means (each patient's mean over its slices; "
                  f"n = {res['n_patients']} pairs)" if res["pairing"] == "patient" else
                  f"p-values are paired per slice (n = {res['n_slices']} pairs; option: slices of one patient "
                  f"are not independent)")
        corr = (f"Holm-corrected over all {res['n_tests']} tests of this table, {n_models - 1} models × "
                f"{len(COLUMNS)} columns" if res["correction"] == "holm" else "not corrected for multiple tests")
        parts.append(f"*: p < {res['alpha']} against `{res['reference']}` ({TEST_NAMES[res['test']]}, {corr}); "
                     f"{paired}.")
        n_pairs = res["n_patients"] if res["pairing"] == "patient" else res["n_slices"]
        floor = wilcoxon_floor(n_pairs)
        bound = res["alpha"] / max(res["n_tests"], 1) if res["correction"] == "holm" else res["alpha"]
        if res["test"] == "wilcoxon" and floor >= bound:
            parts.append(f"With {n_pairs} pairs the smallest possible two-sided Wilcoxon p is {floor:.2g}, not below "
                         f"{bound:.2g} ({'α / number of tests, the first Holm step' if res['correction'] == 'holm' else 'α'}): "
                         f"no cell of this table can be marked, whatever the data.")
    parts.append("Means and p-values use the same (patient, slice) pairs: a slice enters a column only where "
                 "every model has a value. Where the truth lacks a structure, a model that draws none there scores "
                 "1 in Dice, IoU and PPV if another model draws one (a false positive, 0); HD95 has no value there.")
    gaps = [f"{_column_name(c)}: {res['columns'][c]['n_slices']} slices"
            for c in columns if res["columns"][c]["left_out"]]
    if gaps:
        parts.append("Fewer slices where a model's value is undefined (HD95 with the structure in only one of "
                     "truth and prediction): " + "; ".join(gaps) + ".")
    parts.append(f"Patients: {res['patients_from']}.")
    return " ".join(parts)


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("×", r"$\times$"), ("`", ""), ("*:", r"$^*$:")):
        text = text.replace(a, b)
    return text


def _table(res, title: str, rows: list[str], columns, headers: list[str], spread: str = "slices"):
    """Markdown and LaTeX lines of one table (rows = models) with its note."""
    note = table_note(res, columns)
    if spread == "folds":
        note = f"Mean ± std over the {res['n_folds']} fold means (each over that fold's test slices). " + note
    md = [f"### {title}", "", note, "", "| model | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    tex = [f"% {title}", r"\begin{tabular}{l" + "c" * len(headers) + "}", r"\hline",
           "Model & " + " & ".join(h.replace("%", r"\%") for h in headers) + r" \\", r"\hline"]
    for n in rows:
        cells = [res["cells"][(n,) + c] for c in columns]
        md.append(f"| {n} | " + " | ".join(_cell_text(x, c[1], res["alpha"], "md", spread)
                                           for x, c in zip(cells, columns)) + " |")
        tex.append(n.replace("_", r"\_") + " & " + " & ".join(_cell_text(x, c[1], res["alpha"], "tex", spread)
                                                               for x, c in zip(cells, columns)) + r" \\")
    tex += [r"\hline", r"\end{tabular}", r"\par\footnotesize " + _tex_escape(note) + r"\normalsize", ""]
    return md + [""], tex


CSV_COLUMNS = ("model", "structure", "metric", "mean", "std", "slice_mean", "n_slices", "n_patients", "n_folds",
               "fold_mean", "fold_std", "mean_diff", "n_pairs", "n_nonzero_pairs", "p_ttest", "p_wilcoxon", "p_ttest_adjusted", "p_wilcoxon_adjusted",
               "significant", "best", "reference", "test", "pairing", "correction", "n_tests")


def render_tables(res: dict) -> dict[str, str]:
    """Markdown / LaTeX / CSV: one table per structure (Tables 2-4), mean IoU, the ablation tables (5-6)."""
    names = res["models"]
    spreads = ("slices", "folds") if res["n_folds"] > 1 else ("slices",)
    md, tex = [], []
    for spread in spreads:
        suffix = "" if spread == "slices" else " (over folds)"
        for s in STRUCTURES:
            cols = [(s, m) for m in TABLE_METRICS]
            a, b = _table(res, s + suffix, names, cols, [METRIC_LABELS[m] for m in TABLE_METRICS], spread)
            md, tex = md + a, tex + b
        a, b = _table(res, "Mean IoU over the three structures" + suffix, names, [MEAN_IOU],
                      [METRIC_LABELS["miou"]], spread)
        md, tex = md + a, tex + b
        abl = [n for n in ABLATION_ROWS if n in names]
        for m in ("dice", "hd95") if abl else ():
            a, b = _table(res, f"Ablation: {METRIC_LABELS[m]}{suffix}", abl, [(s, m) for s in STRUCTURES],
                          list(STRUCTURES), spread)
            md, tex = md + a, tex + b
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for (n, s, m), c in res["cells"].items():
        row = {k: ("" if v is None else v) for k, v in c.items()}
        row.update(model=n, structure=s, metric=m, best=bool(c.get("best")), reference=res["reference"],
                   significant=c.get("p") is not None and c["p"] < res["alpha"], test=res["test"],
                   pairing=res["pairing"], correction=res["correction"], n_tests=res["n_tests"])
        w.writerow(row)
    return {"md": "\n".join(md) + "\n", "tex": "\n".join(tex) + "\n", "csv": buf.getvalue()}


def write_comparison(run_paths, out: str | Path, reference: str | None = None, test: str = "ttest",
                     pairing: str = "patient", correction: str = "holm", patients: str | Path | None = None) -> dict:
    """Load runs, compare them and write tables.md / .tex / .csv and the bar charts into ``out``.

    ``patients``: a ``cases.csv`` giving the patient of every case whose per-slice rows carry none.
    """
    runs = pool_folds([load_run(p) for p in run_paths])
    patient_map = read_patient_map(patients) if patients else None
    source = assign_patients(runs, patient_map, f"`{Path(patients).name}`" if patients else "")
    res = compare_runs(runs, reference, test, pairing, correction, patients_from=source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = render_tables(res)
    atomic_write_text(out / "tables.md", text["md"])
    atomic_write_text(out / "tables.tex", text["tex"])
    atomic_write_text(out / "tables.csv", text["csv"])
    from .figures import bar_charts

    bar_charts(res, out)
    return res
