"""Single-frame DICOM files and folders read as stacks: one regular voxel grid per slab.

A lumbar axial series often holds several slabs, one per disc level, each tilted its own way, under one
SeriesInstanceUID; a folder may also hold several series, echoes or Dixon images. The rule, in order:

1. Every file in the folder is read (with or without extension). Files that are not DICOM, or DICOM
   files without pixel data (DICOMDIR, reports), are named in one logged warning and not used.
   Multi-frame and colour images are refused.
2. Instances are grouped by SeriesInstanceUID, then by ImageType and EchoNumbers (echoes and Dixon
   water / fat / in / out images become separate stacks), then by geometry: ImageOrientationPatient
   within ``ORIENTATION_TOL`` per cosine, the in-plane position of the slice origin within
   ``INPLANE_TOL_PX`` pixels, and equal Rows, Columns and PixelSpacing.
3. Within a group, slices are sorted along the slice normal. Two slices at the same position (within
   ``POSITION_TOL_MM``) are refused, naming the files. Walking along the normal, a stack keeps its
   first step; a step that differs from it by more than ``STEP_RTOL`` (a missing slice, uneven
   spacing) ends the stack, starts a new one and is named in a warning with the jump in mm. A gap is
   never bridged with an averaged step: every stack is a regular grid at the slices' true positions.
4. Stacks are numbered in the order of acquisition: the earliest AcquisitionDateTime (or
   AcquisitionDate/Time, ContentDate/Time, SeriesDate/Time) of their slices, then SeriesNumber, then
   the lowest InstanceNumber.

Pixel values are the modality values (RescaleSlope / RescaleIntercept or a Modality LUT, via pydicom);
MONOCHROME1 images are inverted within their representable range so that bright means high signal.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np

from ..errors import SpinesegError

log = logging.getLogger(__name__)

ORIENTATION_TOL = 1e-3  # largest difference per direction cosine within one stack
INPLANE_TOL_PX = 0.1  # largest in-plane shift of the slice origin within one stack, in pixels
POSITION_TOL_MM = 0.01  # two slices closer than this along the normal share a position
STEP_RTOL = 0.01  # a step differing from the stack's first step by more than this fraction splits the stack
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SHOWN = 5  # file names listed in one message before "and N more"


@dataclass
class DicomStack:
    """One regular stack of slices: voxel ``(i, j, k)`` is pixel (row ``j``, column ``i``) of slice ``k``."""

    voxels: np.ndarray  # (Columns, Rows, slices), float32 modality values
    affine: np.ndarray  # RAS affine of that voxel grid
    sources: list[dict]  # per slice k: the instance it came from


@dataclass
class _Slice:
    path: Path
    ds: object  # pydicom Dataset, pixel data deferred

    @property
    def orientation(self) -> np.ndarray:
        return np.asarray(self.ds.ImageOrientationPatient, float)

    @property
    def position(self) -> np.ndarray:
        return np.asarray(self.ds.ImagePositionPatient, float)

    @property
    def pixel_spacing(self) -> tuple[float, float]:  # (between rows, between columns)
        return tuple(float(v) for v in self.ds.PixelSpacing)


def _names(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return None if value in (None, "") else str(value)


def _number(ds, keyword: str) -> int | None:
    value = ds.get(keyword)
    return None if value in (None, "") else int(value)


# ----------------------------------------------------------------------------------------------- files

def _read_header(path: Path):
    """The dataset of a DICOM file (pixel data deferred), or None when the file is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), defer_size="4 KB")
    except InvalidDicomError:
        pass  # no "DICM" preamble: old files may still be raw DICOM
    except Exception as exc:
        raise SpinesegError(f"cannot read DICOM file ({type(exc).__name__}: {exc})", path) from None
    try:
        ds = pydicom.dcmread(str(path), defer_size="4 KB", force=True)
        return ds if "SOPClassUID" in ds and "Rows" in ds else None
    except Exception:
        return None


def _check_supported(ds, path: Path) -> None:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SpinesegError(f"multi-frame DICOM ({frames} frames, e.g. Enhanced MR) is not supported; "
                            "export the series as single-frame images", path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SpinesegError(f"colour DICOM ({photometric}) is not supported; spineseg reads grey-scale MR", path)


def _image_slices(files: list[Path], source: Path) -> list[_Slice]:
    """Headers of the image files; the other files are named in one warning (a lone file is refused)."""
    slices, ignored = [], []
    for p in files:
        ds = _read_header(p)
        if ds is None:
            if len(files) == 1:
                raise SpinesegError("not a DICOM file", p)
            ignored.append((p, "not DICOM"))
        elif "PixelData" not in ds:
            what = "DICOMDIR" if "DirectoryRecordSequence" in ds else getattr(ds.get("SOPClassUID"), "name", "?")
            if len(files) == 1:
                raise SpinesegError(f"DICOM file without an image ({what})", p)
            ignored.append((p, f"DICOM without pixel data: {what}"))
        else:
            _check_supported(ds, p)
            slices.append(_Slice(p, ds))
    if ignored:
        log.warning("%s: ignored %d file(s) that are not DICOM images: %s", source, len(ignored),
                    _names([f"{p.name} ({why})" for p, why in ignored]))
    if not slices:
        raise SpinesegError("no DICOM image files found", source)
    return slices


# ----------------------------------------------------------------------------------------------- grouping

def _cluster(items: list, same) -> list[list]:
    """Greedy grouping: each item joins the first group whose first member is ``same`` as it."""
    groups: list[list] = []
    for it in items:
        for g in groups:
            if same(g[0], it):
                g.append(it)
                break
        else:
            groups.append([it])
    return groups


def _unit_normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)


def _same_grid(a: _Slice, b: _Slice) -> bool:
    """Same orientation, size and pixel spacing, and the same in-plane origin (slices of one slab)."""
    if (a.ds.Rows, a.ds.Columns) != (b.ds.Rows, b.ds.Columns):
        return False
    if not np.allclose(a.pixel_spacing, b.pixel_spacing, rtol=1e-4, atol=1e-6):
        return False
    if np.max(np.abs(a.orientation - b.orientation)) > ORIENTATION_TOL:
        return False
    shift = b.position - a.position
    in_plane = np.array([shift @ a.orientation[:3], shift @ a.orientation[3:]])
    return bool(np.all(np.abs(in_plane) <= INPLANE_TOL_PX * np.array(a.pixel_spacing[::-1])))


def _check_geometry(slices: list[_Slice], source: Path) -> None:
    for s in slices:
        if "PixelSpacing" not in s.ds:
            raise SpinesegError("DICOM has no PixelSpacing", s.path)
    located = [s for s in slices if "ImagePositionPatient" in s.ds and "ImageOrientationPatient" in s.ds]
    if len(located) == len(slices):
        return
    if len(slices) == 1:  # a lone slice without patient geometry: place it axially at the origin
        log.warning("%s: no ImagePositionPatient / ImageOrientationPatient; read as an axial slice at the origin",
                    slices[0].path)
        slices[0].ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        slices[0].ds.ImagePositionPatient = [0, 0, 0]
        return
    missing = [s.path.name for s in slices if s not in located]
    raise SpinesegError(f"{len(missing)} slice(s) lack ImagePositionPatient / ImageOrientationPatient, so they "
                        f"cannot be placed in space: {_names(missing)}", source)


def _values(ds, keyword: str, count: int, path: Path) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in ds[keyword].value], float)
    except (TypeError, ValueError, KeyError) as exc:
        raise SpinesegError(f"unreadable {keyword} ({exc})", path) from None
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise SpinesegError(f"invalid {keyword} {values.tolist()}: expected {count} finite numbers", path)
    return values


def _check_values(slices: list[_Slice]) -> None:
    """Refuse a pixel spacing or an orientation that cannot place the pixels in space, naming the file."""
    for s in slices:
        spacing = _values(s.ds, "PixelSpacing", 2, s.path)
        if np.any(spacing <= 0):
            raise SpinesegError(f"invalid PixelSpacing {spacing.tolist()}: pixel spacing must be above 0 mm", s.path)
        orientation = _values(s.ds, "ImageOrientationPatient", 6, s.path)
        row, col = orientation[:3], orientation[3:]
        if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-3 or np.linalg.norm(np.cross(row, col)) < 1e-3 * \
                np.linalg.norm(row) * np.linalg.norm(col):
            raise SpinesegError(f"invalid ImageOrientationPatient {orientation.tolist()}: the row and column "
                                "directions must be non-zero and not parallel", s.path)
        _values(s.ds, "ImagePositionPatient", 3, s.path)


def _kind(s: _Slice) -> tuple:
    """What makes two images at one position different pictures: image type (Dixon W/F/IP/OP) and echo."""
    return (s.ds.get("SeriesInstanceUID", ""), tuple(s.ds.get("ImageType", ())),
            str(s.ds.get("EchoNumbers", "")))


def _describe(s: _Slice) -> str:
    number = s.ds.get("SeriesNumber", None)
    return f"series {number}" if number not in (None, "") else f"series {s.ds.get('SeriesInstanceUID', '?')}"


def _common_step(steps: np.ndarray) -> float | None:
    """The series' most common slice step (within ``STEP_RTOL``; the smallest among equally common ones)."""
    if not len(steps):
        return None
    counts = [int(np.sum(np.abs(steps - s) <= STEP_RTOL * s)) for s in steps]
    best = max(counts)
    return float(min(s for s, c in zip(steps, counts) if c == best))


def _skips_slices(step: float, common: float | None) -> bool:
    """Whether ``step`` is two or more of the series' common steps: one or more slices missing between."""
    if common is None:
        return False
    k = round(step / common)
    return k >= 2 and abs(step - k * common) <= STEP_RTOL * k * common


def _split_regular(group: list[_Slice], source: Path) -> list[list[_Slice]]:
    """Sort one geometry group along its normal and cut it into runs of one constant step."""
    normal = _unit_normal(group[0].orientation)
    group = sorted(group, key=lambda s: float(s.position @ normal))
    steps = np.diff([float(s.position @ normal) for s in group])
    dup = np.flatnonzero(steps <= POSITION_TOL_MM)
    if dup.size:
        pairs = [f"{group[i].path.name} = {group[i + 1].path.name}" for i in dup]
        raise SpinesegError(f"{dup.size} pair(s) of images of {_describe(group[0])} share a slice position with the "
                            f"same ImageType and echo number, so they cannot be told apart: {_names(pairs)}; "
                            "give one acquisition per folder", source)
    common = _common_step(steps)
    runs, run_step = [[group[0]]], None
    for i, step in enumerate(steps):
        if run_step is None and _skips_slices(step, common):
            run_step = common  # a new run may not start across a gap: that would bridge it
        if run_step is None or abs(step - run_step) <= STEP_RTOL * run_step:
            runs[-1].append(group[i + 1])
            run_step = step if run_step is None else run_step
            continue
        missing = step / run_step - 1  # a whole number for missing slices, a fraction for uneven spacing
        why = (f"{round(missing)} missing slice(s)" if round(missing) >= 1
               and abs(missing - round(missing)) <= STEP_RTOL * (missing + 1) else "uneven spacing")
        log.warning("%s: %s: slice positions jump by %.2f mm between %s and %s where the step is %.2f mm (%s); "
                    "read as separate stacks, not bridged", source, _describe(group[0]), step, group[i].path.name,
                    group[i + 1].path.name, run_step, why)
        runs.append([group[i + 1]])
        run_step = None
    return runs


# ----------------------------------------------------------------------------------------------- order

def _moment(ds) -> datetime | None:
    """When this image was acquired: the first of AcquisitionDateTime, Acquisition/Content/Series date+time."""
    from pydicom.valuerep import DA, DT, TM

    try:
        if ds.get("AcquisitionDateTime"):
            return DT(str(ds.AcquisitionDateTime)).replace(tzinfo=None)
        for prefix in ("Acquisition", "Content", "Series"):
            tm = ds.get(f"{prefix}Time")
            if tm:
                day = ds.get(f"{prefix}Date") or ds.get("StudyDate")
                return datetime.combine(DA(str(day)) if day else date.min, TM(str(tm)))
    except ValueError:
        return None  # a malformed date or time: fall back to the instance numbers
    return None


def _acquisition_key(stack: list[_Slice]) -> tuple:
    moments = [m for m in (_moment(s.ds) for s in stack) if m is not None]
    numbers = [n for n in (_number(s.ds, "InstanceNumber") for s in stack) if n is not None]
    series = _number(stack[0].ds, "SeriesNumber")
    return (min(moments) if moments else datetime.max, 1 << 31 if series is None else series,
            min(numbers) if numbers else 1 << 31, str(stack[0].path))


# ----------------------------------------------------------------------------------------------- volumes

def _modality_values(s: _Slice) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        stored = s.ds.pixel_array
    except Exception as exc:
        raise SpinesegError(f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})", s.path) from None
    if stored.shape != (s.ds.Rows, s.ds.Columns):
        raise SpinesegError(f"expected a single-frame 2D DICOM image, got shape {stored.shape}", s.path)
    values = np.asarray(apply_modality_lut(stored, s.ds), np.float32)
    if s.ds.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are white: invert within the range
        bits = int(s.ds.BitsStored)
        lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if s.ds.get("PixelRepresentation", 0) else (0, (1 << bits) - 1)
        ends = np.asarray(apply_modality_lut(np.array([lo, hi]), s.ds), np.float32)
        values = ends.min() + ends.max() - values
    return values


def _source(s: _Slice) -> dict:
    """What a derived object (DICOM SEG) needs to reference this instance, as plain JSON-ready values."""
    ds = s.ds
    uids = {key: _text(ds, keyword) for key, keyword in (
        ("sop_instance_uid", "SOPInstanceUID"), ("sop_class_uid", "SOPClassUID"),
        ("series_instance_uid", "SeriesInstanceUID"), ("study_instance_uid", "StudyInstanceUID"),
        ("frame_of_reference_uid", "FrameOfReferenceUID"))}
    echoes = ds.get("EchoNumbers")
    return {"path": str(s.path), **uids, "instance_number": _number(ds, "InstanceNumber"),
            "image_position_patient": [float(v) for v in ds.ImagePositionPatient],
            "series_number": _number(ds, "SeriesNumber"), "series_description": _text(ds, "SeriesDescription"),
            "image_type": [str(v) for v in ds.get("ImageType", [])],
            "echo_numbers": None if echoes in (None, "") else str(echoes)}


def _stack(stack: list[_Slice]) -> DicomStack:
    """Voxels and the exact affine of one regular stack (sorted along its normal)."""
    first = stack[0]
    orientation = first.orientation
    row_spacing, col_spacing = first.pixel_spacing
    normal = _unit_normal(orientation)
    if len(stack) > 1:
        step = float((stack[-1].position - first.position) @ normal) / (len(stack) - 1)
    else:
        step = float(first.ds.get("SpacingBetweenSlices") or first.ds.get("SliceThickness") or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * col_spacing  # i: along a row, one column further
    lps[:3, 1] = orientation[3:] * row_spacing  # j: down a column, one row further
    lps[:3, 2] = normal * step
    lps[:3, 3] = first.position
    voxels = np.stack([_modality_values(s).T for s in stack], axis=-1)
    return DicomStack(voxels, _LPS_TO_RAS @ lps, [_source(s) for s in stack])


def dicom_files(folder: Path) -> list[Path]:
    """Every file of a series folder, with or without extension (sub-folders are other inputs)."""
    return sorted(p for p in folder.iterdir() if p.is_file())


def plan_dicom_stacks(path: str | Path) -> list:
    """Every stack of a DICOM file or folder, in the order of acquisition, as a function that reads it.

    The headers are read and grouped now (a problem there refuses the whole input); each stack's pixels
    are decoded only when its function is called, so one stack that cannot be decoded spares the others.
    """
    path = Path(path)
    files = dicom_files(path) if path.is_dir() else [path]
    if not files:
        raise SpinesegError("folder is empty" if not any(path.iterdir()) else "folder holds no files, only "
                            "sub-folders; give a series folder", path)
    slices = _image_slices(files, path)
    stacks = []
    for kind in _cluster(slices, lambda a, b: _kind(a) == _kind(b)):
        _check_geometry(kind, path)
        _check_values(kind)
        for group in _cluster(kind, _same_grid):
            stacks.extend(_split_regular(group, path))
    stacks.sort(key=_acquisition_key)
    return [functools.partial(_stack, s) for s in stacks]
