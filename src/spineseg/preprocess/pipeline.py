"""The paper's preprocessing, invertible: wavelet denoising, CLAHE, ROI crop, resize, pad, z-score.

Every geometric step is recorded in a :class:`Geometry`, so a prediction on the network grid maps
back to the original pixel grid (where all millimetre metrics are computed).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .. import __version__
from ..errors import SpinesegError
from ..io.images import RASTER_EXT, file_ext
from ..io.intensity import percentile_window
from .morphology import largest_component


@dataclass
class PreprocessConfig:
    __pydantic_config__ = {"extra": "forbid"}  # validated as the `preprocess` section of the config schema

    target_size: int = 512  # network input is target_size x target_size
    denoise: bool = True  # wavelet denoising, BayesShrink soft thresholding
    clahe: bool = True
    clahe_clip: float = 0.01
    roi: bool = True  # automatic ROI (Otsu on the body outline) with a context margin
    roi_margin_mm: float = 10.0
    target_spacing: float | None = None  # None: paper behaviour (fit ROI to target_size); else mm per pixel
    posterior_shift: float = 0.0  # when the ROI exceeds the window, centre it this fraction of the ROI height
    #                               behind the ROI centre (the spine lies in the posterior half of the body)
    zscore: bool = True

    @classmethod
    def from_dict(cls, d: dict | None) -> "PreprocessConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpinesegError(f"unknown preprocessing options: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Geometry:
    """How a slice of shape ``orig_shape`` became the ``out_size`` x ``out_size`` network input."""

    orig_shape: tuple[int, int]
    spacing: tuple[float, float]  # original pixel spacing (row, col), mm
    crop: tuple[int, int, int, int]  # r0, r1, c0, c1 of the ROI in the original grid
    resized_shape: tuple[int, int]  # the ROI after resizing
    window: tuple[int, int, int, int]  # part of the resized ROI kept: r0, r1, c0, c1
    offset: tuple[int, int]  # where that part sits in the output
    out_size: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        d = dict(d)
        for k in ("orig_shape", "spacing", "crop", "resized_shape", "window", "offset"):
            d[k] = tuple(d[k])
        return cls(**d)

    def content_mask(self) -> np.ndarray:
        """Where the image lies on the network canvas (the rest is zero padding)."""
        wr0, wr1, wc0, wc1 = self.window
        orr, oc = self.offset
        mask = np.zeros((self.out_size, self.out_size), bool)
        mask[orr:orr + wr1 - wr0, oc:oc + wc1 - wc0] = True
        return mask

    @property
    def out_spacing(self) -> tuple[float, float]:
        """Pixel spacing (mm) on the network grid."""
        r0, r1, c0, c1 = self.crop
        return (self.spacing[0] * (r1 - r0) / self.resized_shape[0], self.spacing[1] * (c1 - c0) / self.resized_shape[1])


# ----------------------------------------------------------------------------------------------- intensity

def denoise(img01: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its noise estimate on a flat image: "mean of empty slice"
        out = denoise_wavelet(img01, method="BayesShrink", mode="soft", rescale_sigma=True)
    # a noise-free image (estimated sigma 0) makes BayesShrink divide 0 by 0: there is nothing to denoise
    return out if np.all(np.isfinite(out)) else img01


def clahe(img01: np.ndarray, clip: float) -> np.ndarray:
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(np.clip(img01, 0, 1), clip_limit=clip)


# bump when the pipeline's output changes for the same inputs and options (invalidates cached slices)
PIPELINE_REVISION = 2
MIN_SIDE_PX = 16
NO_CONTENT = "no image content"
MIN_OUTLINE_MM2 = 1000.0  # a body cross-section smaller than ~3 x 3 cm cannot hold a lumbar vertebra


def check_image_content(img: np.ndarray) -> None:
    """Refuse a slice with nothing to segment: too small, all one value (e.g. all zero), or not finite."""
    if min(img.shape) < MIN_SIDE_PX:
        raise SpinesegError(f"{NO_CONTENT}: {img.shape[1]}x{img.shape[0]} pixels (at least {MIN_SIDE_PX} per side)")
    if not np.all(np.isfinite(img)):
        raise SpinesegError(f"{NO_CONTENT}: NaN or infinite pixels")
    if float(img.max()) == float(img.min()):
        raise SpinesegError(f"{NO_CONTENT}: every pixel is {float(img.min()):g}")


def body_outline(img01: np.ndarray, spacing: tuple[float, float] | None = None) -> np.ndarray | None:
    """The body outline (Otsu + largest component), or None where none covers 2 % of the image (and, given a
    ``spacing``, ``MIN_OUTLINE_MM2``)."""
    from skimage.filters import threshold_otsu

    smooth = ndi.gaussian_filter(img01, 2.0)
    try:
        thr = threshold_otsu(smooth)
    except ValueError:
        return None
    body = largest_component(smooth > thr * 0.5)
    if body.sum() < 0.02 * body.size or (spacing is not None and body.sum() * spacing[0] * spacing[1] < MIN_OUTLINE_MM2):
        return None
    return body


def roi_box(img01: np.ndarray, spacing: tuple[float, float], margin_mm: float) -> tuple[int, int, int, int]:
    """Bounding box of the body outline, with a margin; a slice without one has no image content."""
    body = body_outline(img01, spacing)
    if body is None:
        raise SpinesegError(f"{NO_CONTENT}: no body outline found")
    H, W = img01.shape
    rows = np.flatnonzero(body.any(1))
    cols = np.flatnonzero(body.any(0))
    mr, mc = int(round(margin_mm / spacing[0])), int(round(margin_mm / spacing[1]))
    return (int(max(0, rows[0] - mr)), int(min(H, rows[-1] + 1 + mr)), int(max(0, cols[0] - mc)),
            int(min(W, cols[-1] + 1 + mc)))


# ----------------------------------------------------------------------------------------------- geometry

def _resize(arr: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """Resample to ``shape``; images (order >= 1) are low-pass filtered first when shrinking (no aliasing)."""
    from skimage.transform import resize

    if tuple(arr.shape[-2:]) == tuple(shape):
        return arr.copy()
    shrink = order >= 1 and (shape[0] < arr.shape[-2] or shape[1] < arr.shape[-1])
    return resize(arr, shape, order=order, mode="edge", anti_aliasing=shrink, preserve_range=True).astype(arr.dtype)


def plan_geometry(shape, spacing, crop, cfg: PreprocessConfig) -> Geometry:
    r0, r1, c0, c1 = crop
    h, w = r1 - r0, c1 - c0
    S = cfg.target_size
    if cfg.target_spacing is None:
        f = S / max(h, w)
    else:
        f = None
    if f is not None:
        rh, rw = max(1, int(round(h * f))), max(1, int(round(w * f)))
    else:
        rh = max(1, int(round(h * spacing[0] / cfg.target_spacing)))
        rw = max(1, int(round(w * spacing[1] / cfg.target_spacing)))
    # keep a window of at most S x S of the resized ROI (centred, or shifted posteriorly), centred in the output
    kh, kw = min(rh, S), min(rw, S)
    wr0, wc0 = (rh - kh) // 2, (rw - kw) // 2
    if rh > S and cfg.posterior_shift:
        wr0 = int(min(rh - kh, wr0 + round(cfg.posterior_shift * rh)))
    return Geometry(tuple(int(x) for x in shape), tuple(float(x) for x in spacing),
                    tuple(int(x) for x in (r0, r1, c0, c1)), (rh, rw), (wr0, wr0 + kh, wc0, wc0 + kw),
                    ((S - kh) // 2, (S - kw) // 2), int(S))


def _place(resized: np.ndarray, g: Geometry, fill=0) -> np.ndarray:
    """Cut the window out of the resized ROI and pad it into the ``out_size`` x ``out_size`` output."""
    wr0, wr1, wc0, wc1 = g.window
    out = np.full((g.out_size, g.out_size), fill, dtype=resized.dtype)
    orr, oc = g.offset
    out[orr:orr + wr1 - wr0, oc:oc + wc1 - wc0] = resized[wr0:wr1, wc0:wc1]
    return out


def forward_geometry(arr: np.ndarray, g: Geometry, order: int, fill=0) -> np.ndarray:
    """Apply crop -> resize -> window -> pad to a 2D array (order 0 for label maps, 1 for images)."""
    r0, r1, c0, c1 = g.crop
    return _place(_resize(arr[r0:r1, c0:c1], g.resized_shape, order), g, fill)


def forward_labels(label: np.ndarray, g: Geometry, num_classes: int = 4) -> np.ndarray:
    """Label map onto the network grid: one-hot, anti-aliased linear resampling, argmax (keeps thin structures)."""
    r0, r1, c0, c1 = g.crop
    if tuple(g.resized_shape) == (r1 - r0, c1 - c0):
        return forward_geometry(label, g, order=0)
    from skimage.transform import resize

    roi = label[r0:r1, c0:c1]
    down = g.resized_shape[0] < (r1 - r0)
    probs = np.stack([resize((roi == k).astype(np.float32), g.resized_shape, order=1, mode="edge",
                             anti_aliasing=down, preserve_range=True) for k in range(num_classes)])
    return _place(probs.argmax(0).astype(np.uint8), g)


def inverse_geometry(arr: np.ndarray, g: Geometry, order: int = 0, fill=0) -> np.ndarray:
    """Map a network-grid array (``(S, S)`` or ``(C, S, S)``) back onto the original grid."""
    lead = arr.shape[:-2]
    wr0, wr1, wc0, wc1 = g.window
    orr, oc = g.offset
    part = arr[..., orr:orr + wr1 - wr0, oc:oc + wc1 - wc0]
    roi = np.full(lead + tuple(g.resized_shape), fill, dtype=arr.dtype)
    roi[..., wr0:wr1, wc0:wc1] = part
    r0, r1, c0, c1 = g.crop
    if lead:
        back = np.stack([_resize(c, (r1 - r0, c1 - c0), order) for c in roi.reshape((-1,) + roi.shape[-2:])])
        back = back.reshape(lead + back.shape[-2:])
    else:
        back = _resize(roi, (r1 - r0, c1 - c0), order)
    out = np.full(lead + tuple(g.orig_shape), fill, dtype=arr.dtype)
    out[..., r0:r1, c0:c1] = back
    return out


# a network-grid pixel counts as foreground for the windowed mapping back when some class comes within this
# much of background's probability there (see probabilities_to_labels)
BACKGROUND_MARGIN = 1e-4


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear resampling of an axis of ``n_in`` pixels to ``n_out``, as ``skimage.transform.resize`` does it
    (pixel centres aligned, ``grid_mode``; edge pixels repeated): output ``i`` is ``(1 - f) * in[i0] + f * in[i1]``."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0


def _touching(i0: np.ndarray, i1: np.ndarray, lo: int, hi: int) -> slice:
    """The output pixels (a contiguous run: the taps grow with the output index) that read input ``lo..hi``."""
    hit = np.flatnonzero((i1 >= lo) & (i0 <= hi))
    return slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0)


def probabilities_to_labels(probs: np.ndarray, g: Geometry) -> np.ndarray:
    """Resample class probabilities ``(C, S, S)`` to the original grid (linear), then take the argmax.

    Where the network grid is not coarser than the original, only the part of the original grid that reads a
    network pixel where some class comes within ``BACKGROUND_MARGIN`` of background is resampled. Everywhere
    else each output value is a convex combination of network pixels where background leads every class by
    more than the margin, so background leads there too and the label is 0: the labels equal those of
    resampling the whole grid (``_labels_by_resampling``), at a fraction of the cost.
    """
    probs = np.asarray(probs, np.float32)
    r0, r1, c0, c1 = g.crop
    (rh, rw), (h, w) = g.resized_shape, (r1 - r0, c1 - c0)
    if rh > h or rw > w:  # mapping back shrinks (anti-aliased): resample everything
        return _labels_by_resampling(probs, g)
    wr0, wr1, wc0, wc1 = g.window
    orr, oc = g.offset
    part = probs[:, orr:orr + wr1 - wr0, oc:oc + wc1 - wc0]
    near = (part[1:] >= part[:1] - BACKGROUND_MARGIN).any(0)
    out = np.zeros(g.orig_shape, np.uint8)
    if not near.any():
        return out
    rows, cols = np.flatnonzero(near.any(1)), np.flatnonzero(near.any(0))
    # the ROI on the resized grid: the window's probabilities, zero (every class) around them
    roi = np.zeros((len(probs), rh, rw), np.float64)
    roi[:, wr0:wr1, wc0:wc1] = part
    ri0, ri1, rf = _linear_taps(rh, h)
    ci0, ci1, cf = _linear_taps(rw, w)
    rs = _touching(ri0, ri1, wr0 + rows[0], wr0 + rows[-1])
    cs = _touching(ci0, ci1, wc0 + cols[0], wc0 + cols[-1])
    f = rf[rs, None]
    across = roi[:, ri0[rs]] * (1.0 - f) + roi[:, ri1[rs]] * f
    f = cf[cs]
    back = across[:, :, ci0[cs]] * (1.0 - f) + across[:, :, ci1[cs]] * f
    out[r0 + rs.start:r0 + rs.stop, c0 + cs.start:c0 + cs.stop] = back.astype(np.float32).argmax(0)
    return out


def _labels_by_resampling(probs: np.ndarray, g: Geometry) -> np.ndarray:
    """Argmax of the class probabilities resampled onto the whole original grid (skimage)."""
    # outside the ROI and the window every class is 0, so the argmax there is background (0)
    back = inverse_geometry(probs.astype(np.float32), g, order=1, fill=0.0)
    return back.argmax(0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- pipeline

def preprocess_slice(img: np.ndarray, spacing: tuple[float, float], cfg: PreprocessConfig,
                     label: np.ndarray | None = None):
    """Return ``(image, label_or_None, geometry)`` on the network grid."""
    img = np.asarray(img, np.float32)
    if img.ndim != 2:
        raise SpinesegError(f"expected a 2D slice, got shape {img.shape}")
    check_image_content(img)
    x = percentile_window(img)
    if cfg.denoise:
        x = denoise(x)
    if cfg.clahe:
        x = clahe(x, cfg.clahe_clip)
    crop = roi_box(x, spacing, cfg.roi_margin_mm) if cfg.roi else (0, img.shape[0], 0, img.shape[1])
    g = plan_geometry(img.shape, spacing, crop, cfg)
    valid = g.content_mask()
    out = forward_geometry(x.astype(np.float32), g, order=1, fill=0.0)
    if cfg.zscore:
        vals = out[valid]
        out = np.where(valid, (out - vals.mean()) / (vals.std() + 1e-6), 0.0).astype(np.float32)
    lab = None if label is None else forward_labels(np.asarray(label, np.uint8), g)
    return out.astype(np.float32), lab, g


# ----------------------------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("SPINESEG_CACHE", Path.home() / ".cache" / "spineseg" / "preprocessed"))


class PreprocessCache:
    """Preprocessed slices on disk, keyed by source file (path, size, mtime), slice and parameters (and, for a
    PNG / TIFF, the pixel spacing it was read at: given, not in the file)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def key(self, image: Path, label: Path | None, index: int, cfg: PreprocessConfig,
            spacing: float | None = None) -> str:
        def stamp(p):
            if p is None:
                return None
            st = Path(p).stat()
            return [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]

        parts = [stamp(image), stamp(label), index, cfg.to_dict(), __version__, PIPELINE_REVISION]
        if spacing is not None and file_ext(image) in RASTER_EXT:  # other formats carry their spacing
            parts.append(float(spacing))
        payload = json.dumps(parts, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()

    def get(self, key: str):
        f = self.root / key[:2] / f"{key}.npz"
        if not f.exists():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                lab = z["label"] if "label" in z.files else None
                return z["image"], lab, Geometry.from_dict(json.loads(str(z["geometry"])))
        except Exception:
            return None  # a damaged cache entry is simply recomputed

    def put(self, key: str, image, label, geom: Geometry) -> None:
        import io

        from ..io.atomic import atomic_write_bytes

        buf = io.BytesIO()
        arrays = {"image": image, "geometry": np.array(json.dumps(geom.to_dict()))}
        if label is not None:
            arrays["label"] = label
        np.savez(buf, **arrays)
        atomic_write_bytes(self.root / key[:2] / f"{key}.npz", buf.getvalue())
