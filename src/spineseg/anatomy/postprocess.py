"""Anatomically informed post-processing of one axial slice's label map.

Keeping each structure's largest region (nnU-Net's rule) deletes one of the two laminae whenever they
do not touch, and keeps a body blob on the psoas when it happens to be larger. Anatomy says more:

- the canal is one region: its largest 4-connected region, holes filled (nerve roots, a dark CSF dot);
- the vertebral body lies in front of the canal: of its regions, the one nearest the canal among those
  anterior of it (the largest when there is no canal), holes filled, one 4-connected piece; specks far
  smaller than any body section are no body at all (a disc-level slice has none), and neither is a region
  whose nearest edge lies more than ``BODY_REACH_MM`` from the canal's centre (bowel, kidney, psoas: the
  body's back wall borders the canal);
- the laminae lie behind the canal, one on each side of the midline (or one V-shaped arch across it):
  on each side the largest region whose centre lies behind the canal's front and within reach of it.

Slices are in the display convention (rows run anterior -> posterior, columns patient right -> left),
so "in front of" is "above"; distances are in millimetres with the slice's own pixel spacing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from . import AREA_LIMITS_MM2

# anatomical (default): the rules above; largest: each structure's largest region (nnU-Net's rule); none: raw argmax
POSTPROCESS = ("anatomical", "largest", "none")
DEFAULT_POSTPROCESS = "anatomical"
BODY, CANAL, LAMINA = 1, 2, 3
LAMINA_REACH_MM = 45.0  # a lamina's centre lies within this distance of the canal's centre
# the body's nearest edge lies within this distance of the canal's centre: at most 10.6 mm on 368 phantom
# slices, 5-11 mm on the real volumes where the body is right; 30-60 mm where a real prediction put it on
# another organ
BODY_REACH_MM = 25.0
MIN_BODY_MM2 = 0.4 * AREA_LIMITS_MM2["vertebral_body"][0]  # smaller regions are specks, not a body
MAX_HOLE_MM2 = 150.0  # holes up to this size are errors; a disc within the body's bony rim is larger
CROP_MARGIN = 2  # background pixels kept around the labels' bounding box
FOUR = ndi.generate_binary_structure(2, 1)
EIGHT = np.ones((3, 3), bool)


def _regions(mask: np.ndarray, structure=EIGHT) -> list[np.ndarray]:
    lab, n = ndi.label(mask, structure=structure)
    if n == 0:
        return []
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    return [lab == i + 1 for i in np.argsort(-sizes)]  # largest first


def _centre_mm(mask: np.ndarray, spacing) -> np.ndarray:
    return np.argwhere(mask).mean(0) * np.asarray(spacing, float)


def _largest_four_connected(mask: np.ndarray) -> np.ndarray:
    regions = _regions(mask, FOUR)
    return regions[0] if regions else mask


def _fill(mask: np.ndarray, spacing) -> np.ndarray:
    """Fill holes smaller than ``MAX_HOLE_MM2`` (a dark marrow focus, a nerve root), not a disc inside a bony rim."""
    holes = ndi.binary_fill_holes(mask) & ~mask
    lab, n = ndi.label(holes)
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * spacing[0] * spacing[1]
        small = np.flatnonzero(sizes < MAX_HOLE_MM2)
        mask = mask | np.isin(lab, small[small > 0])
    return mask


def _pick_body(labels: np.ndarray, canal_centre, spacing) -> np.ndarray:
    pixel_mm2 = float(spacing[0]) * float(spacing[1])
    regions = [r for r in _regions(labels == BODY) if r.sum() * pixel_mm2 >= MIN_BODY_MM2]
    if not regions:
        return np.zeros(labels.shape, bool)
    if canal_centre is None:
        return regions[0]
    centre_px = tuple(np.round(canal_centre / spacing).astype(int))

    def edge_mm(r):
        return ndi.distance_transform_edt(~r, sampling=spacing)[centre_px]

    near = [(r, d) for r in regions if (d := edge_mm(r)) <= BODY_REACH_MM]
    if not near:
        return np.zeros(labels.shape, bool)
    front = [(r, d) for r, d in near if _centre_mm(r, spacing)[0] < canal_centre[0]]
    # nearest to the canal, weighing size so that a speck next to the canal does not beat the body
    return min(front or near, key=lambda rd: rd[1] - 0.01 * rd[0].sum() * pixel_mm2)[0]


def _pick_laminae(labels: np.ndarray, canal: np.ndarray, canal_centre, spacing) -> np.ndarray:
    regions = _regions(labels == LAMINA)
    if not regions or canal_centre is None:
        return regions[0] if regions else np.zeros(labels.shape, bool)
    canal_front_mm = np.argwhere(canal)[:, 0].min() * spacing[0]
    keep = np.zeros(labels.shape, bool)
    sides: dict[int, bool] = {}
    for r in regions:  # largest first
        c = _centre_mm(r, spacing)
        if c[0] <= canal_front_mm or np.linalg.norm(c - canal_centre) > LAMINA_REACH_MM:
            continue
        cols = np.argwhere(r)[:, 1] * spacing[1]
        spans = cols.min() < canal_centre[1] < cols.max()
        side = 0 if spans else int(np.sign(c[1] - canal_centre[1]))
        if side == 0 and not sides:  # one arch across the midline holds both laminae
            return r
        if side != 0 and side not in sides and 0 not in sides:
            sides[side] = True
            keep |= r
        if len(sides) == 2:
            break
    return keep


def anatomical_postprocess(labels: np.ndarray, spacing) -> np.ndarray:
    """Clean one slice's label map ``(H, W)`` by the anatomy above; removed pixels become background.

    The rules run on the labels' bounding box plus a background margin, which gives the same result as the
    whole slice (every rule is relative, and outside the box there is only background) several times faster.
    """
    fg = np.argwhere(labels > 0)
    if not len(fg):
        return np.zeros_like(labels)
    (r0, c0), (r1, c1) = np.maximum(fg.min(0) - CROP_MARGIN, 0), fg.max(0) + CROP_MARGIN + 1
    out = np.zeros_like(labels)
    out[r0:r1, c0:c1] = _postprocess(labels[r0:r1, c0:c1], spacing)
    return out


def _postprocess(labels: np.ndarray, spacing) -> np.ndarray:
    """The rules on a whole label map (see :func:`anatomical_postprocess`)."""
    spacing = (float(spacing[0]), float(spacing[1]))
    out = np.zeros_like(labels)
    canal_regions = _regions(labels == CANAL, FOUR)
    canal = _fill(canal_regions[0], spacing) if canal_regions else np.zeros(labels.shape, bool)
    canal_centre = _centre_mm(canal, spacing) if canal.any() else None
    body = _largest_four_connected(_fill(_pick_body(labels, canal_centre, spacing), spacing))
    laminae = _pick_laminae(labels, canal, canal_centre, spacing)
    out[laminae] = LAMINA
    out[body & ~canal] = BODY
    out[canal] = CANAL
    return out
