"""PNG previews: image grids with label outlines, and prediction overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .intensity import percentile_window

# structure colours (RGB, 0-1): body, foramen, lamina
LABEL_COLORS = {1: (0.20, 0.55, 1.00), 2: (0.10, 0.90, 0.30), 3: (1.00, 0.60, 0.10)}


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return mask & ~ndi.binary_erosion(mask)


def to_gray(img: np.ndarray) -> np.ndarray:
    return percentile_window(img)


def outline_rgb(img: np.ndarray, label: np.ndarray | None) -> np.ndarray:
    g = to_gray(img.astype(np.float32))
    rgb = np.repeat(g[..., None], 3, axis=-1)
    if label is not None:
        for lab, col in LABEL_COLORS.items():
            edge = _outline(label == lab)
            rgb[edge] = col
    return rgb


def preview_grid(images, labels, path: str | Path, titles=None, ncols: int = 4, outlines: bool = True) -> None:
    """Write a grid of slices (labels drawn as outlines) to ``path`` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.3 * nrows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        lab = labels[i] if (labels is not None and outlines) else None
        ax.imshow(outline_rgb(images[i], lab), interpolation="nearest")
        if titles:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
