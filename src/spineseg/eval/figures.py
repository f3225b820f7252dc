"""Figures in the paper's style (matplotlib, headless): error overlays (Figs. 6, 9) and bar charts (Figs. 7, 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import STRUCTURES
from ..io.atomic import atomic_path
from ..io.preview import LABEL_COLORS, to_gray

FP_COLOR = (1.0, 0.0, 0.0)  # red
FN_COLOR = (1.0, 0.9, 0.0)  # yellow


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """RGB: true positives in the structure colours, false positives red, false negatives yellow."""
    rgb = np.repeat(to_gray(image.astype(np.float32))[..., None], 3, -1)
    paint = np.zeros_like(rgb)
    mask = np.zeros(image.shape, bool)
    for k, col in LABEL_COLORS.items():
        tp = (pred == k) & (gt == k)
        paint[tp] = col
        mask |= tp
    fp = (pred > 0) & (pred != gt)
    fn = (gt > 0) & (pred != gt) & ~fp
    paint[fp] = FP_COLOR
    paint[fn] = FN_COLOR
    mask |= fp | fn
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * paint[mask]
    return rgb


def _crop_box(gt_list, margin=25):
    m = np.zeros(gt_list[0].shape, bool)
    for g in gt_list:
        m |= g > 0
    if not m.any():
        return slice(None), slice(None)
    r = np.flatnonzero(m.any(1))
    c = np.flatnonzero(m.any(0))
    return (slice(max(0, r[0] - margin), r[-1] + margin), slice(max(0, c[0] - margin), c[-1] + margin))


def overlay_grid(images, gts, preds_by_model: dict[str, list], path, titles=None, crop: bool = True) -> None:
    """Rows = test slices, columns = ground truth + one per model."""
    plt = _plt()
    models = list(preds_by_model)
    n = len(images)
    fig, axes = plt.subplots(n, len(models) + 1, figsize=(2.4 * (len(models) + 1), 2.4 * n), squeeze=False)
    for i in range(n):
        sl = _crop_box([gts[i]]) if crop else (slice(None), slice(None))
        img, gt = images[i][sl], gts[i][sl]
        axes[i, 0].imshow(error_overlay(img, gt, gt))
        axes[i, 0].set_ylabel(titles[i] if titles else f"slice {i}", fontsize=7)
        for j, m in enumerate(models, start=1):
            axes[i, j].imshow(error_overlay(img, preds_by_model[m][i][sl], gt))
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(["ground truth"] + models):
        axes[0, j].set_title(name, fontsize=8)
    fig.suptitle("TP: body blue / foramen green / lamina orange;  FP red;  FN yellow", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def bar_charts(res: dict, out: str | Path) -> list[Path]:
    """Dice and HD95 per structure across models: the comparison's means with std error bars.

    ``res`` is :func:`spineseg.eval.compare.compare_runs` output, so the bars show exactly the table's
    numbers (same slices per column, and the same units: per-patient means unless paired per slice).
    """
    plt = _plt()
    out = Path(out)
    paths = []
    names = res["models"]
    for metric, label, scale in (("dice", "Dice (%)", 100.0), ("hd95", "HD95 (mm)", 1.0)):
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) * 1.2), 3.8))
        width = 0.8 / max(len(names), 1)
        x = np.arange(len(STRUCTURES))
        for j, name in enumerate(names):
            cells = [res["cells"][(name, s, metric)] for s in STRUCTURES]
            means = [np.nan if c["mean"] is None else c["mean"] * scale for c in cells]
            stds = [0.0 if c["std"] is None else c["std"] * scale for c in cells]
            ax.bar(x + (j - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=name)
        ax.set_xticks(x)
        ax.set_xticklabels([s.replace("_", " ") for s in STRUCTURES])
        ax.set_ylabel(label)
        if metric == "dice":
            ax.set_ylim(0, 105)
        folds = f", {res['n_folds']} folds" if res["n_folds"] > 1 else ""
        # the cells' units are the comparison's: per-patient means under the default pairing, else slices
        units = "per-patient means" if res.get("pairing", "patient") == "patient" else "test slices"
        ax.set_xlabel(f"mean ± std over {units}; n = {res['n_patients']} patients, "
                      f"{res['n_slices']} slices{folds}", fontsize=8)
        ax.legend(fontsize=7, ncol=min(len(names), 5), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        fig.tight_layout()
        p = out / f"bar_{metric}.png"
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(p)
    return paths
