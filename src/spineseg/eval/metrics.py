"""Per-slice, per-structure overlap and boundary metrics in millimetres (on the original grid).

Boundaries are the mask minus its erosion by the cross-shaped (4-connected) structuring element,
the definition MONAI and MedPy share. Distances come from a Euclidean distance transform with the
slice's own pixel spacing.

HD95 has two definitions in use:
- ``monai`` (default): the larger of the two directed 95th percentiles;
- ``pooled``: the 95th percentile of both directed distance sets pooled together (MedPy's ``hd95``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .. import STRUCTURES
from ..overlap import dice_from_counts, overlap_counts

HD95_MODES = ("monai", "pooled")
METRICS = ("dice", "iou", "ppv", "sensitivity", "hd", "hd95")


def _border(mask: np.ndarray) -> np.ndarray:
    st = ndi.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndi.binary_erosion(mask, structure=st, iterations=1, border_value=0)


def directed_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from every boundary pixel of ``a`` to the nearest boundary pixel of ``b``."""
    ba, bb = _border(a), _border(b)
    dt = ndi.distance_transform_edt(~bb, sampling=spacing)
    return dt[ba]


def hausdorff(pred: np.ndarray, gt: np.ndarray, spacing, hd95: str = "monai") -> tuple[float, float]:
    """(HD, HD95) in mm between two non-empty binary masks."""
    if hd95 not in HD95_MODES:
        raise ValueError(f"hd95 must be one of {HD95_MODES}")
    d_pg = directed_distances(pred, gt, spacing)
    d_gp = directed_distances(gt, pred, spacing)
    hd = float(max(d_pg.max(), d_gp.max()))
    if hd95 == "monai":
        h95 = float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    else:
        h95 = float(np.percentile(np.hstack([d_pg, d_gp]), 95))
    return hd, h95


def slice_metrics(pred: np.ndarray, gt: np.ndarray, spacing, hd95: str = "monai") -> dict[str, dict | None]:
    """Dice, IoU, PPV, sensitivity, HD, HD95 per structure.

    A structure absent from both prediction and truth gives ``None`` (skipped, and counted). Absent from
    one only: Dice / IoU 0, PPV 0 when nothing is predicted and sensitivity 0 when nothing is true (MONAI gives
    NaN there and drops the slice), and HD / HD95 ``None`` (missing, and counted).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth {gt.shape}")
    out: dict[str, dict | None] = {}
    for k, name in enumerate(STRUCTURES, start=1):
        p, g = pred == k, gt == k
        tp, fp, fn = (float(x) for x in overlap_counts(p, g))
        if tp + fp + fn == 0:
            out[name] = None
            continue
        m = {"dice": float(dice_from_counts(tp, fp, fn)), "iou": tp / (tp + fp + fn),
             "ppv": tp / (tp + fp) if tp + fp else 0.0, "sensitivity": tp / (tp + fn) if tp + fn else 0.0}
        if p.any() and g.any():
            m["hd"], m["hd95"] = hausdorff(p, g, spacing, hd95)
        else:
            m["hd"] = m["hd95"] = None
        out[name] = m
    return out


def summarise(per_slice: list[dict]) -> dict:
    """Mean and std per structure and metric over slices, with counts of skipped and missing values."""
    summary = {}
    for name in STRUCTURES:
        rows = [r[name] for r in per_slice]
        present = [r for r in rows if r is not None]
        s = {"n": len(present), "skipped_absent_both": len(rows) - len(present)}
        for metric in METRICS:
            vals = [r[metric] for r in present if r.get(metric) is not None]
            s[metric] = float(np.mean(vals)) if vals else None
            s[f"{metric}_std"] = float(np.std(vals)) if vals else None
            if metric in ("hd", "hd95"):
                s[f"{metric}_missing"] = len(present) - len(vals)
        summary[name] = s
    return summary
