"""The anatomical order rule of one axial label map, in world coordinates (`spineseg sanity`, self-training).

- **Order**: canal and laminae present; the body present (except that a slice without a body, as at
  disc level, passes on canal + laminae); body and canal each one 4-connected region; in world
  coordinates the body anterior of the canal and the canal anterior of the laminae, and the canal
  between body and laminae (not off to one side).
- **Both laminae**: lamina area on each side of the body-canal axis (the world anterior-posterior line
  through the canal where there is no body).
- **Areas** outside :data:`spineseg.anatomy.AREA_LIMITS_MM2` are a warning, not part of the order rule.
- **Body balance** (a measure, not part of the order rule): the smaller over the larger body area on the two sides
  of the line from the laminae' centre through the canal's centre (the world anterior-posterior line through the
  canal where there are no laminae). That line follows the spine's axial rotation and does not depend on the body.
  A whole body straddles it; half a body, as drawn on some real disc-level slices, lies on one side of it (and
  tilts the body-canal axis the laminae are split by). Below :data:`LOPSIDED_BODY` the body is reported lopsided.

A slice's ``plane`` (3x3) takes ``(row, col, 1)`` to RAS millimetres; :func:`display_plane` gives it for
a slice in the display convention (rows anterior -> posterior, columns patient right -> left).
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage as ndi

from .. import STRUCTURES
from ..io.images import slice_affine
from . import AREA_LIMITS_MM2

FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)
ANTERIOR = np.array([0.0, 1.0, 0.0])  # RAS: +y points to the patient's front
PATIENT_RIGHT = np.array([1.0, 0.0, 0.0])  # RAS: +x points to the patient's right
# lamina pixels this close to the midline axis belong to neither side (the laminae meet in the midline)
MIDLINE_MM = 2.0
# a side holds a lamina when it carries at least this much of the lamina area, and at least LAMINA_SIDE_MM2
LAMINA_SIDE_FRACTION = 0.2
LAMINA_SIDE_MM2 = 20.0  # a fifth of the smallest single lamina of PHANTOM.md (5 mm x 20 mm)
# the canal centroid may lie at most this far (relative to the body-lamina distance) off the body-lamina line
CANAL_OFF_AXIS = 0.5
# body balance below this is a lopsided body; on the phantom's truth (120 patients, 368 slices with a body, axial
# rotation up to 15 degrees) it is 0.66 or more
LOPSIDED_BODY = 0.25
SHORT = {"vertebral_body": "body", "vertebral_foramen": "canal", "lamina": "laminae"}

# display indices (slice, row, col) -> the file grid's (i=col, j=row, k=slice) of `slice_affine`
DISPLAY_TO_GRID = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)


def display_plane(spacing) -> np.ndarray:
    """:func:`check_slice`'s plane for a display-convention slice with pixel ``spacing`` (row, col) in mm."""
    m = slice_affine((float(spacing[0]), float(spacing[1]))) @ DISPLAY_TO_GRID
    return np.column_stack([m[:3, 1], m[:3, 2], m[:3, 3]])


def _world_points(mask: np.ndarray, plane: np.ndarray) -> np.ndarray:
    rc = np.argwhere(mask)
    return np.c_[rc, np.ones(len(rc))] @ plane.T


def reason_kind(reason: str) -> str:
    """The kind of one order-rule reason of :func:`check_slice`: "body in 3 regions" is "body in pieces", so a split
    structure is told apart from a missing or misplaced one whatever the count; other reasons are their own kind."""
    return re.sub(r" in \d+ regions$", " in pieces", reason)


def check_slice(labels: np.ndarray, plane: np.ndarray) -> dict:
    """Order, both laminae, areas and region counts of one ``(H, W)`` label map.

    ``plane`` is the slice's :func:`display_plane` (or ``spineseg.eval.sanity.plane_to_world`` for a slice of a
    file); the pixel area comes from it too.
    """
    px_mm2 = float(np.linalg.norm(np.cross(plane[:, 0], plane[:, 1])))
    masks = {s: labels == k for k, s in enumerate(STRUCTURES, start=1)}
    row: dict = {}
    for s, m in masks.items():
        row[f"area_{s}_mm2"] = round(float(m.sum()) * px_mm2, 1)
        row[f"regions_{s}"] = int(ndi.label(m, structure=FOUR_CONNECTED)[1])
    found = {s: bool(m.any()) for s, m in masks.items()}
    centre = {s: _world_points(m, plane).mean(0) for s, m in masks.items() if found[s]}
    body, canal, lamina = STRUCTURES
    reasons = [f"{SHORT[s]} missing" for s in (canal, lamina) if not found[s]]
    reasons += [f"{SHORT[s]} in {row[f'regions_{s}']} regions" for s in (body, canal)
                if found[s] and row[f"regions_{s}"] != 1]
    if found[body] and found[canal] and np.dot(centre[body] - centre[canal], ANTERIOR) <= 0:
        reasons.append("body not anterior of the canal")
    if found[canal] and found[lamina] and np.dot(centre[canal] - centre[lamina], ANTERIOR) <= 0:
        reasons.append("canal not anterior of the laminae")
    if all(found.values()) and not _canal_between(centre[body], centre[canal], centre[lamina]):
        reasons.append("canal not between body and laminae")
    row["order"] = not reasons
    row["reason"] = "; ".join(reasons)
    row["body_found"] = found[body]
    left, right = _lamina_sides(masks[lamina], plane, centre.get(body), centre.get(canal), px_mm2)
    row["lamina_left_mm2"], row["lamina_right_mm2"] = round(left, 1), round(right, 1)
    row["body_balance"] = _body_balance(masks[body], plane, centre.get(canal), centre.get(lamina))
    total = row[f"area_{lamina}_mm2"]
    row["both_laminae"] = bool(found[lamina] and min(left, right) >= max(LAMINA_SIDE_MM2, LAMINA_SIDE_FRACTION * total))
    row["area_warning"] = "; ".join(
        f"{SHORT[s]} {row[f'area_{s}_mm2']:.0f} mm2 outside [{lo:.0f}, {hi:.0f}]"
        for s, (lo, hi) in AREA_LIMITS_MM2.items() if found[s] and not lo <= row[f"area_{s}_mm2"] <= hi)
    return row


def _canal_between(body: np.ndarray, canal: np.ndarray, lamina: np.ndarray) -> bool:
    axis = lamina - body
    length2 = max(float(np.dot(axis, axis)), 1e-6)
    t = float(np.dot(canal - body, axis)) / length2
    off = float(np.linalg.norm((canal - body) - t * axis)) / np.sqrt(length2)
    return 0.0 < t < 1.0 and off < CANAL_OFF_AXIS


def _lateral_axis(plane: np.ndarray, body, canal) -> np.ndarray:
    """Unit world vector pointing to the patient's right, across the midline axis (body -> canal, or anterior)."""
    normal = np.cross(plane[:, 0], plane[:, 1])
    normal /= np.linalg.norm(normal)
    axis = (body - canal) if body is not None else ANTERIOR - np.dot(ANTERIOR, normal) * normal
    axis = axis - np.dot(axis, normal) * normal
    lateral = np.cross(normal, axis)
    lateral /= max(np.linalg.norm(lateral), 1e-9)
    return lateral * (np.sign(np.dot(lateral, PATIENT_RIGHT)) or 1.0)


def _lamina_sides(lamina: np.ndarray, plane: np.ndarray, body, canal, px_mm2: float) -> tuple[float, float]:
    """Lamina area (mm^2) on the patient's left and right of the midline axis (0, 0 without canal)."""
    if canal is None or not lamina.any():
        return 0.0, 0.0
    d = (_world_points(lamina, plane) - canal) @ _lateral_axis(plane, body, canal)
    return float((d < -MIDLINE_MM).sum() * px_mm2), float((d > MIDLINE_MM).sum() * px_mm2)


def _body_balance(body: np.ndarray, plane: np.ndarray, canal, lamina) -> float | None:
    """Smaller over larger body area either side of the midline through the canal's centre, drawn from the laminae'
    centre (the world anterior-posterior line without laminae); None without body or canal."""
    if canal is None or not body.any():
        return None
    points, best = _world_points(body, plane) - canal, 0.0
    for front in (None, None if lamina is None else canal + (canal - lamina)):  # world axis; lamina-canal axis
        d = points @ _lateral_axis(plane, front, canal)
        left, right = int((d < 0).sum()), int((d > 0).sum())
        best = max(best, min(left, right) / max(left, right, 1))
    return round(best, 3)


def midline_distance(labels: np.ndarray, plane: np.ndarray) -> np.ndarray | None:
    """Signed distance (mm, positive to the patient's right) of every pixel from the midline axis by which
    :func:`check_slice` splits the laminae into left and right; ``None`` when the slice has no canal.

    Its zero level is the axis the sanity montages draw on a slice whose laminae are not both found.
    """
    body, canal = labels == 1, labels == 2  # the first two of STRUCTURES
    if not canal.any():
        return None
    centre = {name: _world_points(m, plane).mean(0) for name, m in (("body", body), ("canal", canal)) if m.any()}
    grid = np.ones(labels.shape, bool)
    d = (_world_points(grid, plane) - centre["canal"]) @ _lateral_axis(plane, centre.get("body"), centre["canal"])
    return d.reshape(labels.shape)
