"""Anatomical plausibility of predictions on unlabelled scans (`spineseg sanity`).

Every slice's raw and post-processed prediction is checked by the rule of :mod:`spineseg.anatomy.order`
(order, both laminae, areas).

Directions come from the image's affine, never from the array layout, so an image stored in any
orientation gets the same verdict.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from .. import STRUCTURES
from ..anatomy.order import DISPLAY_TO_GRID, LOPSIDED_BODY, check_slice, midline_distance, reason_kind
from ..anatomy.postprocess import MIN_BODY_MM2
from ..errors import SpinesegError
from ..io.atomic import atomic_path, atomic_write_text
from ..io.images import case_stem, display_affine, read_images, slice_affine, stack_output_name
from ..io.layouts import collect_inputs
from ..io.preview import LABEL_COLORS, to_gray
from ..progress import progress as progress_bar

STAGES = ("raw", "post")
CROP_HALF_MM = 50.0  # montage panels show at least 100 mm around the predicted spine


# ----------------------------------------------------------------------------------------------- geometry

def display_to_world(img) -> np.ndarray:
    """4x4 matrix taking display indices ``(slice, row, col, 1)`` to RAS millimetres of the file's grid."""
    if img.ornt is None:  # an in-memory image without a file: the display convention itself (L, P, S)
        m = slice_affine(img.spacing, img.slice_thickness)
    else:
        m = display_affine(img)  # (i=col, j=row, k=slice) -> world
    return m @ DISPLAY_TO_GRID


def plane_to_world(img, index: int) -> np.ndarray:
    """3x3 matrix taking ``(row, col, 1)`` of display slice ``index`` to RAS millimetres."""
    m = display_to_world(img)
    return np.column_stack([m[:3, 1], m[:3, 2], m[:3, 0] * index + m[:3, 3]])


# ----------------------------------------------------------------------------------------------- reports

def check_image(img, raw: np.ndarray, post: np.ndarray, indices=None) -> list[dict]:
    """One row per slice: both stages' checks, columns suffixed ``_raw`` / ``_post``."""
    rows = []
    for j, i in enumerate(range(img.num_slices) if indices is None else indices):
        plane = plane_to_world(img, i)
        row = {"slice": i}
        for stage, labels in (("raw", raw[j]), ("post", post[j])):
            row.update({f"{k}_{stage}": v for k, v in check_slice(labels, plane).items()})
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Counts per stage: slices passing the order rule, both laminae among them, area warnings, lopsided bodies and
    the failing slices by kind of reason (:func:`failure_kinds`)."""
    out = {"slices": len(rows)}
    for stage in STAGES:
        passing = [r for r in rows if r[f"order_{stage}"]]
        both = sum(r[f"both_laminae_{stage}"] for r in passing)
        out[stage] = {"order_pass": len(passing), "order_fraction": len(passing) / len(rows) if rows else 0.0,
                      "both_laminae_of_passing": both,
                      "both_laminae_fraction": both / len(passing) if passing else 0.0,
                      "passing_without_body": sum(not r[f"body_found_{stage}"] for r in passing),
                      "area_warnings": sum(bool(r[f"area_warning_{stage}"]) for r in rows),
                      "lopsided_bodies": sum(_lopsided(r, stage) for r in rows),
                      "failures": failure_kinds(r[f"reason_{stage}"] for r in rows if not r[f"order_{stage}"])}
    return out


def failure_kinds(reasons) -> dict[str, int]:
    """How many failing slices give each kind of reason (:func:`~spineseg.anatomy.order.reason_kind`; a slice may
    give several), from the ``"; "``-joined ``reason`` of each failing slice."""
    counts: dict[str, int] = {}
    for text in reasons:
        for reason in (reason_kind(part) for part in text.split("; ") if part):
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _lopsided(row: dict, stage: str) -> bool:
    """A body, not a speck (at least MIN_BODY_MM2), lopsided about the canal's midline."""
    balance = row[f"body_balance_{stage}"]
    big_enough = row[f"area_vertebral_body_mm2_{stage}"] >= MIN_BODY_MM2
    return balance is not None and balance < LOPSIDED_BODY and big_enough


def summary_line(name: str, s: dict) -> str:
    def stage(k):
        t = s[k]
        return (f"{k} {t['order_pass']}/{s['slices']} ({100 * t['order_fraction']:.1f} %, both laminae on "
                f"{t['both_laminae_of_passing']}/{t['order_pass']}, {t['passing_without_body']} without body)")

    return f"{name}: order {stage('raw')}; {stage('post')}"


_VERDICTS = ("order", "both_laminae", "reason", "area_warning", "body_found")
_MEASURES = tuple(f"area_{s}_mm2" for s in STRUCTURES) + tuple(f"regions_{s}" for s in STRUCTURES) + (
    "lamina_left_mm2", "lamina_right_mm2", "body_balance")
CSV_COLUMNS = (("input", "source", "slice") + tuple(f"{k}_{stage}" for k in _VERDICTS for stage in STAGES)
               + tuple(f"{k}_{stage}" for stage in STAGES for k in _MEASURES))


# ----------------------------------------------------------------------------------------------- montage

def _crop(raw: np.ndarray, post: np.ndarray, spacing) -> tuple[slice, slice]:
    fg = (post > 0) if post.any() else (raw > 0)
    h, w = raw.shape
    half_r, half_c = (int(round(CROP_HALF_MM / sp)) for sp in spacing)
    if not fg.any():
        return slice(max(0, h // 2 - half_r), h // 2 + half_r), slice(max(0, w // 2 - half_c), w // 2 + half_c)
    rr, cc = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
    cr, cc_ = (rr[0] + rr[-1]) // 2, (cc[0] + cc[-1]) // 2
    half_r, half_c = max(half_r, (rr[-1] - rr[0]) // 2 + 8), max(half_c, (cc[-1] - cc[0]) // 2 + 8)
    return slice(max(0, cr - half_r), cr + half_r), slice(max(0, cc_ - half_c), cc_ + half_c)


def _verdict(row: dict, stage: str) -> str:
    return (("pass" if row[f"order_{stage}"] else "FAIL") + ("" if row[f"both_laminae_{stage}"] else " 1L")
            + (" LB" if _lopsided(row, stage) else ""))


def montage(panels: list[dict], path: str | Path, title: str, ncols: int = 6) -> None:
    """Every slice cropped around the spine: post-processed outlines solid, raw outlines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.7 * ncols, 3.1 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), panels):
        sl = _crop(p["raw"], p["post"], p["spacing"])
        ax.imshow(to_gray(p["image"][sl].astype(np.float32)), cmap="gray", interpolation="nearest")
        for k, colour in LABEL_COLORS.items():
            for labels, style, width in ((p["raw"], (0, (2, 2)), 1.6), (p["post"], "solid", 0.9)):
                m = (labels[sl] == k).astype(float)
                if m.any():
                    ax.contour(m, levels=[0.5], colors=[colour], linestyles=[style], linewidths=width)
        r = p["row"]
        d = midline_distance(p["post"], p["plane"]) if "plane" in p and not r["both_laminae_post"] else None
        if d is not None:  # the axis the lamina sides were split by, where they were not both found
            ax.contour(d[sl], levels=[0.0], colors=["yellow"], linestyles=[(0, (1, 1.5))], linewidths=1.0)
        ax.set_title(f"{p['label']}\nraw {_verdict(r, 'raw')} | post {_verdict(r, 'post')}", fontsize=7,
                     color="black" if r["order_post"] else "red")
    fig.suptitle(f"{title}\nsolid: post-processed, dashed: raw; body blue, canal green, lamina orange; "
                 "FAIL = order rule fails, 1L = both laminae not found\n"
                 "dotted yellow (post 1L): the body-canal midline the lamina sides are split by; LB = a body (not a "
                 "speck) lopsided about the canal's midline", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- command

def _input_groups(inputs) -> list[tuple[str, list[Path]]]:
    """One group per ``--input``: its name and the image files (or DICOM folders) it expands to."""
    groups, names = [], set()
    for given in map(Path, inputs):
        files = collect_inputs([given])
        name = given.name if given.is_dir() and (len(files) > 1 or files[0] != given) else case_stem(given)
        base, k = name or "input", 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        groups.append((name, files))
    return groups


def run_sanity(predictor, inputs, out, spacing: float | None = None, slices: tuple[int, int] | None = None,
               progress: bool = True) -> dict:
    """Predict every input with ``predictor.predict_both`` and check raw and post-processed label maps.

    Writes ``sanity.csv`` (per slice), ``sanity.json`` (per input and overall) and one
    ``montage_<input>.png`` per input (a folder of single slices is one input, a volume is one input).
    """
    out = Path(out)
    all_rows, per_input = [], {}
    montages = []
    for name, files in _input_groups(inputs):
        panels, rows = [], []
        for f in progress_bar(files, desc=f"sanity {name}", unit="image", disable=not progress or len(files) < 2):
            for img in read_images(f, spacing=spacing):
                lo, hi = (0, img.num_slices) if slices is None else (slices[0], min(slices[1], img.num_slices))
                if lo >= hi:
                    raise SpinesegError(f"--slices {slices[0]}:{slices[1]} selects no slice of {img.num_slices}", f)
                part = dataclasses.replace(img, data=img.data[lo:hi])
                raw, post = predictor.predict_both(part)
                source = stack_output_name(case_stem(f), img)
                for row, j in zip(check_image(img, raw, post, range(lo, hi)), range(hi - lo)):
                    row.update(input=name, source=source)
                    rows.append(row)
                    label = (source if img.num_slices == 1 else f"slice {row['slice']}" if len(files) == 1
                             else f"{source} [{row['slice']}]")
                    panels.append({"image": part.data[j], "raw": raw[j], "post": post[j], "spacing": img.spacing,
                                   "plane": plane_to_world(img, row["slice"]), "row": row, "label": label})
        per_input[name] = summarise(rows)
        path = out / f"montage_{name}.png"
        montage(panels, path, summary_line(name, per_input[name]))
        montages.append(path)
        all_rows += rows
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(all_rows)
    atomic_write_text(out / "sanity.csv", buf.getvalue())
    report = {"model": getattr(predictor, "name", "?"), "checkpoint": str(getattr(predictor, "source", "?")),
              "model_sha256": getattr(predictor, "sha256", "?"), "postprocess": getattr(predictor, "postprocess", "?"),
              "tta": getattr(predictor, "tta", "?"), "engine": getattr(getattr(predictor, "engine", None), "name", "?"),
              "overall": summarise(all_rows), "inputs": per_input,
              "rule": "order: canal and laminae present; body present or absent (disc level); body and canal one "
                      "4-connected region each; body anterior of canal, canal anterior of laminae (world "
                      "coordinates); canal between body and laminae. both laminae: lamina area on each side of "
                      "the body-canal axis. Area warnings are not part of order. body balance (not part of order): "
                      "smaller over larger body area either side of a midline through the canal's centre, the "
                      "better of the world anterior-posterior line and the line from the laminae's centre; a body "
                      f"of {MIN_BODY_MM2:.0f} mm2 or more is lopsided below {LOPSIDED_BODY}."}
    atomic_write_text(out / "sanity.json", json.dumps(report, indent=1) + "\n")
    return {**report, "rows": all_rows, "montages": montages}
