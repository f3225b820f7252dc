"""`spineseg evaluate`: per-slice metrics of predicted label maps against ground truth, and summaries."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .. import STRUCTURES
from ..errors import SpinesegError
from ..io.atomic import atomic_write_text
from ..data.splits import load_splits
from ..io.images import IMAGE_EXT, case_stem, file_ext, read_label
from ..io.layouts import read_patient_map
from .metrics import METRICS, slice_metrics, summarise

PER_SLICE_COLUMNS = ("case", "slice", "structure") + METRICS  # what a per-slice file must hold
# what evaluate writes: the patient (empty when no patient map is known) and the fold (empty when unknown)
WRITTEN_COLUMNS = ("case", "patient", "fold", "slice", "structure") + METRICS + ("absent_both",)


def _label_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise SpinesegError("folder does not exist", folder)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and file_ext(p) in IMAGE_EXT and not p.name.startswith("."):
            stem = case_stem(p)
            files[stem[:-5] if stem.endswith("_0000") else stem] = p
    if not files:
        raise SpinesegError("folder holds no label maps", folder)
    return files


def gt_label_files(path: Path, cases: list[str] | None = None) -> dict[str, Path]:
    """Ground-truth label maps by case id, from a label folder or a data set root (masks/ or labels/ for
    image / mask pairs). In an nnU-Net root, all cases means labelsTs (the test set) where it exists, else
    labelsTr; named cases (a run's test fold) are looked up in both, and a case in both is refused."""
    if (path / "dataset.json").exists():
        folders = [path / sub for sub in ("labelsTs", "labelsTr") if (path / sub).is_dir()]
        if folders and cases is None:
            return _label_files(folders[0])
        if folders:
            found = [_label_files(f) for f in folders]
            both = [c for c in cases if all(c in f for f in found)] if len(found) == 2 else []
            if both:
                raise SpinesegError(f"case {both[0]} is in both labelsTs and labelsTr; give the label folder", path)
            return {k: v for f in reversed(found) for k, v in f.items()}
    for sub in ("masks", "labels"):
        if (path / sub).is_dir():
            return _label_files(path / sub)
    return _label_files(path)


def dataset_cases_csv(gt: Path) -> Path | None:
    """The data set's ``cases.csv``, looked up beside a label folder or in a data set root."""
    for root in (gt, gt.parent):
        if (root / "cases.csv").is_file():
            return root / "cases.csv"
    return None


def dataset_patient_map(gt: Path) -> dict[str, str] | None:
    """The data set's ``cases.csv`` patient map (see ``dataset_cases_csv``)."""
    path = dataset_cases_csv(gt)
    return None if path is None else read_patient_map(path)


def dice_by_position(slices: list[dict], cases_csv: str | Path) -> dict | None:
    """Mean Dice per structure by the phantom's slice position (disc, endplate, ...) for per-slice dicts
    ``{case, structure: metrics | None}``; ``None`` where ``cases_csv`` has no ``position`` column (real data
    sets). Slices without a structure in truth and prediction are left out; a false one counts Dice 0."""
    with open(cases_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "position" not in rows[0]:
        return None
    position = {r["case"]: r["position"] for r in rows}
    unknown = sorted({row["case"] for row in slices} - set(position))
    if unknown:
        raise SpinesegError(f"case {unknown[0]}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                            + " is not in the data set's cases.csv, so its slice position is unknown", cases_csv)
    values: dict[tuple[str, str], list[float]] = {}
    for row in slices:
        for s in STRUCTURES:
            if row.get(s) is not None:
                values.setdefault((position[row["case"]], s), []).append(row[s]["dice"])
    out: dict[str, dict] = {}
    for (pos, s), v in sorted(values.items()):
        out.setdefault(pos, {})[s] = {"slices": len(v), "dice": round(float(np.mean(v)), 4)}
    return out


def fold_test_cases(splits_file: str | Path, fold: int) -> list[str]:
    """The test case ids of fold ``fold`` of a ``splits.json``; a fold without a test list is refused."""
    splits = load_splits(splits_file)
    if not 0 <= fold < len(splits):
        raise SpinesegError(f"fold {fold} does not exist ({len(splits)} folds)", splits_file)
    test = splits[fold].get("test")
    if not test:
        raise SpinesegError(f"fold {fold} has no test list", splits_file)
    return list(test)


def training_run_fold(run: str | Path) -> tuple[Path, int, str | None]:
    """``(splits.json, fold, data set)`` of a training run folder (its ``splits.json`` and ``config.json``)."""
    run = Path(run)
    try:
        cfg = json.loads((run / "config.json").read_text())
        fold = int(cfg["run"]["fold"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise SpinesegError("not a training run: needs config.json with run.fold", run) from None
    if not (run / "splits.json").is_file():
        raise SpinesegError("not a training run: splits.json is missing", run)
    return run / "splits.json", fold, cfg["run"].get("data")


def evaluate_folders(pred: str | Path, gt: str | Path, hd95: str = "monai", spacing: float | None = None,
                     cases: list[str] | None = None, patients: dict[str, str] | None = None,
                     fold: int | None = None) -> list[dict]:
    """Rows ``{case, patient, fold, slice, structure, dice, iou, ppv, sensitivity, hd, hd95}`` per GT case.

    ``patients`` maps case ids to patients (default: the data set's ``cases.csv`` if there is one);
    ``fold`` is written into every row when the cases are one fold's test set.
    """
    pred_files = _label_files(Path(pred))
    gt_files = gt_label_files(Path(gt), cases)
    if patients is None:
        patients = dataset_patient_map(Path(gt)) or {}
    wanted = list(gt_files) if cases is None else list(cases)
    missing = [c for c in wanted if c not in pred_files]
    if missing:
        raise SpinesegError(f"no prediction for ground-truth case {missing[0]}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), Path(pred))
    rows = []
    for c in wanted:
        if c not in gt_files:
            raise SpinesegError(f"no ground truth for case {c}", Path(gt))
        g = read_label(gt_files[c], spacing=spacing)
        p = read_label(pred_files[c], spacing=spacing)
        if p.data.shape != g.data.shape:
            raise SpinesegError(f"prediction size {p.data.shape} differs from ground truth {g.data.shape}", pred_files[c])
        _check_same_grid(p, g, pred_files[c], gt_files[c])
        for s in range(g.num_slices):
            m = slice_metrics(p.data[s], g.data[s], g.spacing, hd95)
            for name in STRUCTURES:
                r = {"case": c, "patient": patients.get(c, ""), "fold": "" if fold is None else fold,
                     "slice": s, "structure": name}
                r.update({k: (None if m[name] is None else m[name].get(k)) for k in METRICS})
                r["absent_both"] = m[name] is None
                rows.append(r)
    return rows


def _check_same_grid(p, g, pred_file: Path, gt_file: Path) -> None:
    """Refuse a prediction whose voxels are not the ground truth's voxels in space (spacing, position or
    direction differ): scoring them voxel by voxel, with the truth's spacing, would give wrong figures."""
    from .sanity import display_to_world  # same layer; imported here to keep the modules' import order simple

    a, b = display_to_world(p), display_to_world(g)
    sizes = np.linalg.norm(b[:3, :3], axis=0)  # mm per display step (slice, row, col)
    axes = slice(0 if g.num_slices > 1 else 1, 3)  # a single slice's thickness does not enter the metrics
    axes_differ = np.abs(a[:3, axes] - b[:3, axes]) > 1e-3 * np.maximum(sizes[axes], 1e-6)
    origin_off = np.abs(a[:3, 3] - b[:3, 3]) > 0.5 * sizes[axes].min()
    if axes_differ.any() or origin_off.any():
        raise SpinesegError(f"prediction grid differs from the ground truth's {gt_file} (voxel size "
                            f"{np.round(np.linalg.norm(a[:3, :3], axis=0), 4).tolist()} vs "
                            f"{np.round(sizes, 4).tolist()} mm, origin {np.round(a[:3, 3], 2).tolist()} vs "
                            f"{np.round(b[:3, 3], 2).tolist()}); write predictions on the truth's grid", pred_file)


def rows_to_slices(rows: list[dict]) -> list[dict]:
    """Back from long rows to ``[{case, slice, structure: metrics|None}]`` per (case, slice)."""
    by: dict[tuple, dict] = {}
    for r in rows:
        d = by.setdefault((r["case"], int(r["slice"])), {"case": r["case"], "slice": int(r["slice"])})
        d[r["structure"]] = None if _truthy(r.get("absent_both")) else {k: _num(r.get(k)) for k in METRICS}
    return list(by.values())


def _truthy(v) -> bool:
    return v is True or str(v).lower() in ("true", "1")


def _num(v):
    if v is None or v == "":
        return None
    return float(v)


def read_per_slice(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise SpinesegError("per_slice.csv not found", path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not set(PER_SLICE_COLUMNS) <= set(rows[0]):
        raise SpinesegError(f"not a per-slice metrics file (needs columns {', '.join(PER_SLICE_COLUMNS)})", path)
    for r in rows:
        r["absent_both"] = _truthy(r.get("absent_both"))
        r["patient"] = r.get("patient") or ""
        r["fold"] = r.get("fold") or ""
        for k in METRICS:
            r[k] = _num(r[k])
    return rows


def _fmt(v, digits=3):
    return "" if v is None else f"{v:.{digits}f}"


def write_reports(rows: list[dict], out: str | Path, title: str = "", cases_csv: str | Path | None = None) -> dict:
    """per_slice.csv and summary.md / .csv / .json / .tex; with a phantom's ``cases_csv`` (which names each
    slice's position) also ``by_position.json``, the mean Dice per slice position."""
    out = Path(out)
    slices = rows_to_slices(rows)
    positions = dice_by_position(slices, cases_csv) if cases_csv is not None else None  # may refuse: before writing
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(WRITTEN_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in w.fieldnames})
    atomic_write_text(out / "per_slice.csv", buf.getvalue())
    summ = summarise(slices)
    if positions is not None:
        atomic_write_text(out / "by_position.json", json.dumps(positions, indent=1) + "\n")
    else:  # the report files of an earlier evaluation in this folder are all replaced: so is this one
        (out / "by_position.json").unlink(missing_ok=True)
    # CSV
    buf = io.StringIO()
    cols = ["structure", "n", "skipped_absent_both", "hd_missing"] + [f"{m}{s}" for m in METRICS for s in ("", "_std")]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for name in STRUCTURES:
        w.writerow({"structure": name, **{k: ("" if v is None else v) for k, v in summ[name].items()}})
    atomic_write_text(out / "summary.csv", buf.getvalue())
    # Markdown
    n_slices = len({(r.get("fold", ""), r["case"], str(r["slice"])) for r in rows})
    known = {r["patient"] for r in rows if r.get("patient")}
    who = (f"{len(known)} patients" if known and all(r.get("patient") for r in rows)
           else "patients unknown (no cases.csv)")
    md = [f"# {title or 'Segmentation metrics'}", "",
          f"Mean ± std over {n_slices} test slices ({who}), on the original image grid. HD / HD95 in mm.", "",
          "| structure | Dice | IoU | PPV | sensitivity | HD (mm) | HD95 (mm) | n | skipped (absent in both) | HD missing |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name in STRUCTURES:
        s = summ[name]
        cells = [f"{_fmt(s[m])} ± {_fmt(s[m + '_std'])}" if s[m] is not None else "–" for m in METRICS]
        md.append(f"| {name} | " + " | ".join(cells) + f" | {s['n']} | {s['skipped_absent_both']} | {s['hd_missing']} |")
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    # JSON, for results files that other tools read
    atomic_write_text(out / "summary.json", json.dumps(
        {"slices": n_slices, "patients": len(known) if known else None, "title": title,
         "structures": {name: summ[name] for name in STRUCTURES}}, indent=1) + "\n")
    # LaTeX
    tex = [r"\begin{tabular}{lcccccc}", r"\hline",
           r"Structure & Dice & IoU & PPV & Sensitivity & HD (mm) & HD95 (mm) \\", r"\hline"]
    for name in STRUCTURES:
        s = summ[name]
        cells = [f"${_fmt(s[m])} \\pm {_fmt(s[m + '_std'])}$" if s[m] is not None else "--" for m in METRICS]
        tex.append(name.replace("_", r"\_") + " & " + " & ".join(cells) + r" \\")
    tex += [r"\hline", r"\end{tabular}"]
    atomic_write_text(out / "summary.tex", "\n".join(tex) + "\n")
    return summ
