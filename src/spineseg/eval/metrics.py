"""Per-slice, per-structure overlap and boundary metrics in millimetres (on the original grid)."""

from __future__ import annotations

import numpy as np

from .. import STRUCTURES


def hd95_mm(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float]:
    """(HD, HD95) between two non-empty binary masks, boundaries, MONAI's definition, in mm."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    g = torch.from_numpy(gt[None, None].astype(np.float32))
    hd = float(compute_hausdorff_distance(p, g, include_background=True, spacing=list(spacing)))
    hd95 = float(compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(spacing)))
    return hd, hd95


def slice_metrics(pred: np.ndarray, gt: np.ndarray, spacing) -> dict[str, dict]:
    """Dice, IoU, PPV, sensitivity, HD, HD95 per structure; None where undefined (see SPEC: empty cases)."""
    out = {}
    for k, name in enumerate(STRUCTURES, start=1):
        p, g = pred == k, gt == k
        tp = float(np.logical_and(p, g).sum())
        fp, fn = float(p.sum()) - tp, float(g.sum()) - tp
        if not p.any() and not g.any():
            out[name] = None  # absent from both: skipped and counted
            continue
        m = {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn),
             "ppv": tp / (tp + fp) if tp + fp else 0.0, "sensitivity": tp / (tp + fn) if tp + fn else 0.0}
        if p.any() and g.any():
            m["hd"], m["hd95"] = hd95_mm(p, g, spacing)
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
        for metric in ("dice", "iou", "ppv", "sensitivity", "hd", "hd95"):
            vals = [r[metric] for r in present if r.get(metric) is not None]
            s[metric] = float(np.mean(vals)) if vals else None
            s[f"{metric}_std"] = float(np.std(vals)) if vals else None
            if metric in ("hd", "hd95"):
                s[f"{metric}_missing"] = len(present) - len(vals)
        summary[name] = s
    return summary
