"""The one percentile normalisation: intensities to [0, 1] between two percentiles."""

from __future__ import annotations

import numpy as np


def percentile_window(img: np.ndarray, low: float = 0.5, high: float = 99.5, mask: np.ndarray | None = None) -> np.ndarray:
    """Map ``img`` linearly so that its ``low`` / ``high`` percentiles become 0 / 1, clipped to [0, 1].

    The percentiles are taken over ``mask`` when one is given. A constant image maps to 0.
    """
    img = np.asarray(img, np.float32)
    vals = img[mask] if mask is not None else img
    if vals.size == 0:
        return np.zeros_like(img)
    lo, hi = np.percentile(vals, [low, high])
    if hi - lo < 1e-6:  # (nearly) constant: one intensity unit per unit
        hi = lo + 1.0
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)
