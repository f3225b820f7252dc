"""Anatomical plausibility of predictions on unlabelled scans (`spineseg sanity`).

A slice passes when the prediction holds all three structures, each one connected region, with the
canal lying between the vertebral body and the laminae, and every area inside the anatomical ranges of
the phantom specification (the loosest range over slice positions and pathology).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .. import STRUCTURES
from ..anatomy import AREA_LIMITS_MM2 as AREA_LIMITS
from ..io.atomic import atomic_write_text

CSV_COLUMNS = ("slice", "passed", "reason") + tuple(f"area_{s}" for s in STRUCTURES) + tuple(f"regions_{s}" for s in STRUCTURES)


def check_slice(labels: np.ndarray, spacing) -> dict:
    px = float(spacing[0] * spacing[1])
    row = {"reason": []}
    cents = {}
    for k, s in enumerate(STRUCTURES, start=1):
        m = labels == k
        row[f"area_{s}"] = round(float(m.sum()) * px, 1)
        row[f"regions_{s}"] = int(ndi.label(m, structure=np.ones((3, 3)))[1])
        if not m.any():
            row["reason"].append(f"{s} missing")
            continue
        if row[f"regions_{s}"] != 1:
            row["reason"].append(f"{s} in {row[f'regions_{s}']} regions")
        lo, hi = AREA_LIMITS[s]
        if not lo <= row[f"area_{s}"] <= hi:
            row["reason"].append(f"{s} area {row[f'area_{s}']:.0f} mm2 outside [{lo:.0f}, {hi:.0f}]")
        cents[s] = np.argwhere(m).mean(0) * np.asarray(spacing)
    if len(cents) == 3:
        b, c, l = cents["vertebral_body"], cents["vertebral_foramen"], cents["lamina"]
        axis = l - b
        t = float(np.dot(c - b, axis) / max(np.dot(axis, axis), 1e-6))
        off = float(np.linalg.norm((c - b) - t * axis) / max(np.linalg.norm(axis), 1e-6))
        if not (0.0 < t < 1.0 and off < 0.5):
            row["reason"].append("canal not between body and laminae")
    row["passed"] = not row["reason"]
    row["reason"] = "; ".join(row["reason"])
    return row


def sanity_report(image, labels: np.ndarray, out: str | Path, slices=None) -> dict:
    from ..io.preview import preview_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    idx = list(range(image.num_slices)) if slices is None else list(slices)
    rows = []
    for i in idx:
        r = check_slice(labels[i], image.spacing)
        r["slice"] = i
        rows.append(r)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "sanity.csv", buf.getvalue())
    # montage around the predicted spine (or the image centre when nothing was predicted)
    fg = labels[idx] > 0
    H, W = labels.shape[1:]
    if fg.any():
        rr = np.flatnonzero(fg.any((0, 2)))
        cc = np.flatnonzero(fg.any((0, 1)))
        cy, cx = (rr[0] + rr[-1]) // 2, (cc[0] + cc[-1]) // 2
    else:
        cy, cx = H // 2, W // 2
    half = int(round(60.0 / image.spacing[0]))
    sl = (slice(max(0, cy - half), cy + half), slice(max(0, cx - half), cx + half))
    preview_grid([image.data[i][sl] for i in idx], [labels[i][sl] for i in idx], out / "montage.png",
                 [f"slice {r['slice']}: {'pass' if r['passed'] else 'FAIL'}" for r in rows], ncols=6)
    frac = float(np.mean([r["passed"] for r in rows])) if rows else 0.0
    return {"fraction": frac, "passed": int(sum(r["passed"] for r in rows)), "slices": len(rows), "rows": rows}
