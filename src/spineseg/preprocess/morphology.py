"""Connected-component helpers shared by preprocessing, the phantom, prediction and baselines."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def largest_component(mask: np.ndarray, eight_connected: bool = False) -> np.ndarray:
    """The largest connected region of a boolean mask (the empty mask if there is none)."""
    structure = np.ones((3,) * mask.ndim) if eight_connected else None
    lab, n = ndi.label(mask, structure=structure)
    if n <= 1:
        return lab == 1
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    return lab == (1 + int(np.argmax(sizes)))
