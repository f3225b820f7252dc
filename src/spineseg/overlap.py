"""The one Dice: overlap counts of label maps, used by training validation, evaluation and baselines."""

from __future__ import annotations

import numpy as np


def overlap_counts(pred: np.ndarray, truth: np.ndarray, label=True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives and false negatives of ``label`` over the last two axes.

    ``pred`` and ``truth`` are label maps ``(..., H, W)`` (or boolean masks with ``label=True``);
    the counts have the leading shape.
    """
    p, t = np.asarray(pred) == label, np.asarray(truth) == label
    tp = np.logical_and(p, t).sum((-2, -1)).astype(np.float64)
    return tp, p.sum((-2, -1)) - tp, t.sum((-2, -1)) - tp


def dice_from_counts(tp, fp, fn, empty=np.nan):
    """2 TP / (2 TP + FP + FN); ``empty`` where the structure is absent from both."""
    tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), empty)


def dice_per_structure(pred: np.ndarray, truth: np.ndarray, num_classes: int = 4) -> np.ndarray:
    """Dice of every foreground class per slice: ``(N, num_classes - 1)``, NaN where absent from both."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.ndim == 2:
        pred, truth = pred[None], truth[None]
    return np.stack([dice_from_counts(*overlap_counts(pred, truth, k)) for k in range(1, num_classes)], axis=-1)


def dice(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> float:
    """Dice of two binary masks (``empty`` when both are empty)."""
    return float(dice_from_counts(*overlap_counts(a, b), empty=empty))
