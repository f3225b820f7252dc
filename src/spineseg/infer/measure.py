"""Measurements from label maps: canal size, body and lamina size, and a stenosis flag per slice.

All lengths and areas are in millimetres of the slice's own pixel spacing ``(row, column)``. The
antero-posterior (AP) axis of a slice is anatomical, not the image rows: it runs from the centroid of
the vertebral body to the centroid of the laminae (falling back to body -> canal or canal -> laminae
when one structure is missing, and to the image rows only when both are). The canal's AP diameter is
the length of the canal along the line in that direction through the canal's centroid (the
midsagittal diameter); its transverse diameter is the canal's width across that axis (the widest
interpedicular distance).

The canal is its largest 4-connected region; other pieces under ``MIN_CANAL_MM2`` in all are stray pixels, left
out (``canal_note`` says how much). It is graded only where its measurement can hold: not where the other pieces
are larger (a canal split in two: one half is not the canal, and a caliper across both measures the gap), nor
where the canal itself is under ``MIN_CANAL_MM2`` (the smallest canal of the anatomical ranges in
:data:`spineseg.anatomy.AREA_LIMITS_MM2`; a few pixels, as on an oblique end slice, are not a canal with absolute
stenosis). There the sizes are still written, with ``stenosis`` empty and ``canal_note`` saying why, and the slice
is not a case's narrowest.

The stenosis flags are research-only: the area thresholds come from dural-sac studies (Bolender et
al. 1985, Hamanishi et al. 1994) and the AP thresholds from Verbiest's bony-canal diameters, while the
canal label here is the whole vertebral foramen.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .. import LABELS
from ..anatomy import AREA_LIMITS_MM2
from ..anatomy.order import FOUR_CONNECTED
from ..errors import SpinesegError
from ..io.atomic import atomic_write_text

BODY, CANAL, LAMINA = LABELS["vertebral_body"], LABELS["vertebral_foramen"], LABELS["lamina"]

MEASUREMENT_COLUMNS = ("case", "stack", "slice", "position_mm", "canal_area_mm2", "canal_ap_mm", "canal_transverse_mm",
                       "body_area_mm2", "lamina_area_mm2", "lamina_thickness_mm", "stenosis", "canal_note")
SUMMARY_COLUMNS = ("case", "stack", "slices", "measured_slices", "narrowest_slice", "position_mm", "canal_area_mm2",
                   "canal_ap_mm", "canal_transverse_mm", "stenosis", "slices_relative", "slices_absolute",
                   "ungraded_slices")
MIN_CANAL_MM2 = AREA_LIMITS_MM2["vertebral_foramen"][0]  # a smaller canal is a fragment, not graded
STENOSIS_GRADES = ("none", "relative", "absolute")


@dataclass(frozen=True)
class StenosisThresholds:
    """Canal area (mm^2) and AP diameter (mm) below which a slice is flagged relative / absolute stenosis."""

    relative_area_mm2: float = 100.0  # Bolender et al. 1985
    absolute_area_mm2: float = 75.0  # Hamanishi et al. 1994
    relative_ap_mm: float = 12.0  # Verbiest
    absolute_ap_mm: float = 10.0  # Verbiest

    def __post_init__(self):
        for rel, ab, what in ((self.relative_area_mm2, self.absolute_area_mm2, "--stenosis-area"),
                              (self.relative_ap_mm, self.absolute_ap_mm, "--stenosis-ap")):
            if not (math.isfinite(rel) and math.isfinite(ab) and rel >= ab > 0):
                raise SpinesegError(f"{what} needs RELATIVE,ABSOLUTE with RELATIVE >= ABSOLUTE > 0 (got {rel},{ab})")

    @classmethod
    def parse(cls, area: str | None = None, ap: str | None = None) -> "StenosisThresholds":
        """From the command-line form ``"100,75"`` (relative, absolute) for area and ``"12,10"`` for AP."""
        d = cls()
        rel_area, abs_area = _pair(area, "--stenosis-area") if area else (d.relative_area_mm2, d.absolute_area_mm2)
        rel_ap, abs_ap = _pair(ap, "--stenosis-ap") if ap else (d.relative_ap_mm, d.absolute_ap_mm)
        return cls(rel_area, abs_area, rel_ap, abs_ap)

    def grade(self, canal_area_mm2: float, canal_ap_mm: float) -> str:
        if canal_area_mm2 < self.absolute_area_mm2 or canal_ap_mm < self.absolute_ap_mm:
            return "absolute"
        if canal_area_mm2 < self.relative_area_mm2 or canal_ap_mm < self.relative_ap_mm:
            return "relative"
        return "none"

    def to_dict(self) -> dict:
        return {"relative_area_mm2": self.relative_area_mm2, "absolute_area_mm2": self.absolute_area_mm2,
                "relative_ap_mm": self.relative_ap_mm, "absolute_ap_mm": self.absolute_ap_mm}


def _pair(text: str, option: str) -> tuple[float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise SpinesegError(f"{option} needs two numbers RELATIVE,ABSOLUTE (got {text!r})")
    return values[0], values[1]


# ----------------------------------------------------------------------------------------------- geometry

def _points_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Pixel centres of ``mask`` as (row, column) millimetres."""
    return np.argwhere(mask) * np.asarray(spacing, float)


def anatomical_ap_axis(labels: np.ndarray, spacing) -> np.ndarray:
    """Unit (row, column) vector from anterior to posterior along the body -> canal -> laminae axis."""
    centroids = {k: _points_mm(labels == k, spacing).mean(0) for k in (BODY, CANAL, LAMINA) if (labels == k).any()}
    for front, back in ((BODY, LAMINA), (BODY, CANAL), (CANAL, LAMINA)):
        if front in centroids and back in centroids:
            axis = centroids[back] - centroids[front]
            norm = float(np.hypot(*axis))
            if norm > 0:
                return axis / norm
    return np.array([1.0, 0.0])  # display convention: rows run anterior -> posterior


def chord_length_mm(mask: np.ndarray, spacing, through_mm: np.ndarray, direction: np.ndarray) -> float:
    """Length of the part of ``mask`` on the line through ``through_mm`` along the unit ``direction``."""
    spacing = np.asarray(spacing, float)
    reach = float(np.hypot(*(np.asarray(mask.shape) * spacing)))
    step = 0.05 * float(spacing.min())
    t = np.arange(-reach, reach, step)
    idx = np.rint((through_mm[None, :] + t[:, None] * direction[None, :]) / spacing).astype(int)
    inside = np.all((idx >= 0) & (idx < np.asarray(mask.shape)), axis=1)
    hits = np.zeros(len(t), bool)
    hits[inside] = mask[idx[inside, 0], idx[inside, 1]]
    return float(hits.sum() * step)


def width_across_mm(mask: np.ndarray, spacing, direction: np.ndarray) -> float:
    """Caliper width of ``mask`` along the unit ``direction``: extent of the pixel centres plus one pixel."""
    proj = _points_mm(mask, spacing) @ direction
    pixel = float(np.hypot(direction[0] * spacing[0], direction[1] * spacing[1]))  # pixel length along it
    return float(proj.max() - proj.min() + pixel)


def mean_thickness_mm(mask: np.ndarray, spacing) -> float:
    """Mean local thickness: at every pixel, the diameter of the largest disc inside ``mask`` covering it.

    The discs are centred on the medial axis (Hildebrand and Ruegsegger's local thickness, in 2D), so the
    thin branches a skeleton grows towards corners do not pull a plate's thickness down.
    """
    from skimage.morphology import skeletonize

    spacing = np.asarray(spacing, float)
    # the distance reaches the nearest outside pixel centre, 0 to 1 pixel past the edge: a quarter pixel
    # leaves the width of a plate unbiased over its sub-pixel positions (its medial axis picks the larger half)
    radius = ndi.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1] - 0.25 * float(spacing.mean())
    thickness = np.zeros(mask.shape)
    centres = np.argwhere(skeletonize(mask))
    for r, c in centres[np.argsort(-radius[tuple(centres.T)], kind="stable")]:
        reach = radius[r, c] + 0.5 * spacing  # half a pixel of slack so that every pixel of the plate is covered
        r0, r1 = max(0, int(r - reach[0] / spacing[0])), min(mask.shape[0], int(r + reach[0] / spacing[0]) + 1)
        c0, c1 = max(0, int(c - reach[1] / spacing[1])), min(mask.shape[1], int(c + reach[1] / spacing[1]) + 1)
        rows, cols = np.ogrid[r0:r1, c0:c1]
        disc = ((rows - r) * spacing[0]) ** 2 + ((cols - c) * spacing[1]) ** 2 <= float(np.max(reach)) ** 2
        window = thickness[r0:r1, c0:c1]
        np.maximum(window, np.where(disc, 2.0 * radius[r, c], 0.0), out=window)
    covered = thickness[mask]
    return float(covered[covered > 0].mean()) if (covered > 0).any() else float(2.0 * max(radius[mask].max(), 0.0))


# ----------------------------------------------------------------------------------------------- per slice

def measure_slice(labels: np.ndarray, spacing, thresholds: StenosisThresholds = StenosisThresholds()) -> dict:
    """Measurements of one ``(H, W)`` label map; canal values (and the flag) are None without a canal, and the
    flag is None (``canal_note`` says why) where the canal is split or smaller than ``MIN_CANAL_MM2``."""
    labels = np.asarray(labels)
    spacing = (float(spacing[0]), float(spacing[1]))
    pixel_mm2 = spacing[0] * spacing[1]
    canal, lamina = labels == CANAL, labels == LAMINA
    row = {"canal_area_mm2": None, "canal_ap_mm": None, "canal_transverse_mm": None,
           "body_area_mm2": float((labels == BODY).sum() * pixel_mm2), "lamina_area_mm2": float(lamina.sum() * pixel_mm2),
           "lamina_thickness_mm": mean_thickness_mm(lamina, spacing) if lamina.any() else None, "stenosis": None,
           "canal_note": None}
    if canal.any():
        pieces, sizes = ndi.label(canal, structure=FOUR_CONNECTED)
        stray = 0.0
        if sizes > 1:  # the largest piece is the canal; the rest are strays, or a canal split in two
            counts = np.bincount(pieces.ravel())[1:]
            canal = pieces == int(np.argmax(counts)) + 1
            stray = float((counts.sum() - counts.max()) * pixel_mm2)
        ap = anatomical_ap_axis(labels, spacing)
        across = np.array([-ap[1], ap[0]])
        row["canal_area_mm2"] = float(canal.sum() * pixel_mm2)
        row["canal_ap_mm"] = chord_length_mm(canal, spacing, _points_mm(canal, spacing).mean(0), ap)
        row["canal_transverse_mm"] = width_across_mm(canal, spacing, across)
        if stray >= MIN_CANAL_MM2:
            row["canal_note"] = f"canal in {sizes} pieces: not graded"
        elif row["canal_area_mm2"] < MIN_CANAL_MM2:
            row["canal_note"] = f"canal under {MIN_CANAL_MM2:.0f} mm2 (a fragment): not graded"
        else:
            row["stenosis"] = thresholds.grade(row["canal_area_mm2"], row["canal_ap_mm"])
            if stray:
                row["canal_note"] = f"{stray:.0f} mm2 of stray canal pixels left out"
    return row


def slice_positions_mm(image) -> np.ndarray:
    """Position of every display slice along the slice normal (mm, world coordinates) of an ``Image``."""
    from ..io.images import display_affine

    affine = display_affine(image)  # voxel (i=column, j=row, k=slice) of the display array -> world
    normal = affine[:3, 2] / (np.linalg.norm(affine[:3, 2]) or 1.0)
    centres = affine[:3, 3][None, :] + np.arange(image.num_slices)[:, None] * affine[:3, 2][None, :]
    return centres @ normal


def measure_image(labels: np.ndarray, image, case: str, thresholds: StenosisThresholds = StenosisThresholds()) -> list[dict]:
    """One row per display slice of ``(S, H, W)`` label maps predicted on ``image``.

    ``slice`` is the index along the last axis of the written label map (the file's own slice order).
    """
    positions = slice_positions_mm(image)
    file_index = file_slice_index(image)
    rows = []
    for s in range(labels.shape[0]):
        rows.append({"case": case, "stack": image.stack, "slice": int(file_index[s]), "position_mm": float(positions[s]),
                     **measure_slice(labels[s], image.spacing, thresholds)})
    return sorted(rows, key=lambda r: r["slice"])


def file_slice_index(image) -> np.ndarray:
    """For every display slice, its index along the slice axis of the written label map."""
    from ..io.dicomseg import file_to_display_slices

    return np.argsort(file_to_display_slices(image), kind="stable")


def narrowest(rows: list[dict]) -> dict | None:
    """Summary of one case (one stack): its narrowest graded slice, how many slices are flagged, and how many
    have a canal that was not graded (in pieces, or a fragment)."""
    measured = [r for r in rows if r["stenosis"] is not None]
    if not rows:
        return None
    first = rows[0]
    out = {"case": first["case"], "stack": first["stack"], "slices": len(rows), "measured_slices": len(measured),
           "slices_relative": sum(r["stenosis"] == "relative" for r in measured),
           "slices_absolute": sum(r["stenosis"] == "absolute" for r in measured),
           "ungraded_slices": sum(r["canal_area_mm2"] is not None and r["stenosis"] is None for r in rows)}
    if measured:
        low = min(measured, key=lambda r: r["canal_area_mm2"])
        out.update(narrowest_slice=low["slice"], **{k: low[k] for k in ("position_mm", "canal_area_mm2", "canal_ap_mm",
                                                                         "canal_transverse_mm", "stenosis")})
    return out


# ----------------------------------------------------------------------------------------------- CSV

def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def csv_text(rows: list[dict], columns) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_cell(r.get(c)) for c in columns] for r in rows])
    return buf.getvalue()


def write_measurements(folder: str | Path, rows: list[dict]) -> list[Path]:
    """``measurements.csv`` (every slice) and ``measurements_summary.csv`` (one row per case with several
    slices; only the header when there is none). Both replace, atomically, those of an earlier run in
    ``folder``, so a summary never outlives the measurements it summarised."""
    folder = Path(folder)
    written = [folder / "measurements.csv", folder / "measurements_summary.csv"]
    by_case: dict[tuple, list[dict]] = {}
    for r in rows:
        by_case.setdefault((r["case"], r["stack"]), []).append(r)
    summaries = [narrowest(group) for group in by_case.values() if len(group) > 1]
    # the earlier summary goes first: a write that fails after it leaves no summary rather than a stale one
    written[1].unlink(missing_ok=True)
    atomic_write_text(written[0], csv_text(rows, MEASUREMENT_COLUMNS))
    atomic_write_text(written[1], csv_text(summaries, SUMMARY_COLUMNS))
    return written
