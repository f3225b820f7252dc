"""A trivial baseline for the phantom's acceptance test: per-structure intensity window + largest component.

The windows are tuned on training slices (grid search over quantiles of each structure's own
intensities); if this scores well, the data set is too easy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .. import STRUCTURES
from ..io.intensity import percentile_window
from ..overlap import dice
from ..preprocess.morphology import largest_component


def _norm(img: np.ndarray) -> np.ndarray:
    return percentile_window(img, 1, 99)


class ThresholdBaseline:
    def __init__(self, quantiles=(0.0, 0.02, 0.05, 0.1, 0.2, 0.3), smooth: float = 1.0):
        self.q = quantiles
        self.smooth = smooth
        self.windows: dict[int, tuple[float, float]] = {}

    def _prep(self, img):
        return ndi.gaussian_filter(_norm(img), self.smooth) if self.smooth else _norm(img)

    def predict_structure(self, img_n: np.ndarray, lab: int) -> np.ndarray:
        lo, hi = self.windows[lab]
        return largest_component((img_n >= lo) & (img_n <= hi))

    def fit(self, images, labels) -> "ThresholdBaseline":
        imgs = [self._prep(i) for i in images]
        for lab in range(1, len(STRUCTURES) + 1):
            vals = np.concatenate([i[l == lab] for i, l in zip(imgs, labels)])
            best, best_d = (0.0, 1.0), -1.0
            for qa in self.q:
                for qb in self.q:
                    lo, hi = np.quantile(vals, qa), np.quantile(vals, 1.0 - qb)
                    self.windows[lab] = (lo, hi)
                    d = np.mean([dice(self.predict_structure(i, lab), l == lab) for i, l in zip(imgs, labels)])
                    if d > best_d:
                        best, best_d = (lo, hi), d
            self.windows[lab] = best
        return self

    def score(self, images, labels) -> dict[str, float]:
        imgs = [self._prep(i) for i in images]
        return {name: float(np.mean([dice(self.predict_structure(i, k), l == k) for i, l in zip(imgs, labels)]))
                for k, name in enumerate(STRUCTURES, start=1)}
