"""Read DICOM, NIfTI, MHA/NRRD and PNG/TIFF into one display convention; write label maps back.

Display convention for every axial slice: a ``(S, H, W)`` array, rows run anterior -> posterior
(anterior at the top), columns run patient right -> patient left (patient left on image right),
slices run inferior -> superior. Internally this is the ``L, P, S`` voxel orientation, transposed.
Every :class:`Image` remembers how it was reoriented so that a label map computed in the display
convention can be written back on the file's own voxel grid with the file's own affine.
"""

from __future__ import annotations

import functools
import gzip
import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from ..errors import SpinesegError
from .atomic import atomic_path, atomic_write_bytes
from .dicom import plan_dicom_stacks
from .intensity import percentile_window

NIFTI_EXT = (".nii", ".nii.gz")
ITK_EXT = (".mha", ".mhd", ".nrrd", ".nhdr")
RASTER_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
DICOM_EXT = (".dcm", ".dicom", ".ima")
IMAGE_EXT = NIFTI_EXT + ITK_EXT + RASTER_EXT + DICOM_EXT

log = logging.getLogger(__name__)

_DISPLAY_ORNT = nio.axcodes2ornt(("L", "P", "S"))
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def file_ext(path: str | Path) -> str:
    name = Path(path).name.lower()
    for ext in (".nii.gz",) + IMAGE_EXT:
        if name.endswith(ext):
            return ext
    return Path(path).suffix.lower()


def case_stem(path: str | Path) -> str:
    """File name without its (possibly double) image extension."""
    name = Path(path).name
    ext = file_ext(path)
    return name[: -len(ext)] if ext and name.lower().endswith(ext) else Path(path).stem


@dataclass
class Image:
    """A 2D or 3D image in the display convention, with what is needed to go back to the file's grid."""

    data: np.ndarray  # (S, H, W), float32 for images, uint8 for label maps
    spacing: tuple[float, float]  # (row, column) pixel spacing in mm
    slice_thickness: float
    source: str
    affine: np.ndarray = field(repr=False)  # RAS affine of the file's voxel grid
    file_shape: tuple[int, ...] = ()  # shape of the voxel array in the file (2D or 3D)
    ornt: np.ndarray = field(default=None, repr=False)  # file orientation (nibabel ornt)
    stack: int = 0  # index of this stack among the input's stacks, in the order of acquisition
    stack_count: int = 1  # how many stacks the input holds (several for a multi-slab DICOM series)
    # DICOM only: per display slice, the source instance ({"path", "sop_instance_uid", ...}); None otherwise
    sources: list | None = field(default=None, repr=False)

    @property
    def num_slices(self) -> int:
        return int(self.data.shape[0])

    def to_file_layout(self, arr: np.ndarray) -> np.ndarray:
        """Map a ``(S, H, W)`` display array back to the file's voxel layout."""
        if arr.shape != self.data.shape:
            raise SpinesegError(f"array shape {arr.shape} does not match image {self.data.shape}", self.source)
        lps = np.transpose(arr, (2, 1, 0))
        back = nio.apply_orientation(lps, nio.ornt_transform(_DISPLAY_ORNT, self.ornt))
        return np.ascontiguousarray(back.reshape(self.file_shape))


def _check_affine(affine: np.ndarray, source: str) -> None:
    """Refuse a voxel grid that cannot be placed in space: non-finite, a zero-length or a degenerate axis."""
    affine = np.asarray(affine, float)
    m = affine[:3, :3]
    if not np.all(np.isfinite(affine)):
        raise SpinesegError("missing or invalid pixel spacing or orientation in the header (non-finite values)", source)
    zooms = np.sqrt((m ** 2).sum(axis=0))
    if np.any(zooms <= 0):
        raise SpinesegError(f"missing or invalid pixel spacing in the header (voxel sizes {np.round(zooms, 6).tolist()} "
                            "mm; 0 is not a spacing)", source)
    if abs(np.linalg.det(m / zooms)) < 1e-6:
        raise SpinesegError("invalid orientation in the header (two voxel axes point the same way)", source)


def _to_display(data: np.ndarray, affine: np.ndarray, source: str, dtype) -> Image:
    file_shape = data.shape
    if data.ndim == 2:
        data = data[:, :, None]
    _check_affine(affine, source)
    ornt = nio.io_orientation(affine)
    tr = nio.ornt_transform(ornt, _DISPLAY_ORNT)
    lps = nio.apply_orientation(data, tr)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    zooms_lps = np.empty(3)
    for i in range(3):
        zooms_lps[int(tr[i, 0])] = zooms[i]
    if not np.all(np.isfinite(zooms_lps)) or np.any(zooms_lps[:2] <= 0):
        raise SpinesegError("missing or invalid pixel spacing in the header", source)
    disp = np.ascontiguousarray(np.transpose(lps, (2, 1, 0)), dtype=dtype)
    return Image(disp, (float(zooms_lps[1]), float(zooms_lps[0])), float(zooms_lps[2]) or 1.0, source,
                 np.asarray(affine, float), tuple(file_shape), ornt)


def _check_values(img: Image, kind: str) -> Image:
    if kind == "image":
        if not np.all(np.isfinite(img.data)):
            raise SpinesegError("image contains NaN or infinite pixels", img.source)
        if img.data.size == 0:
            raise SpinesegError("image is empty", img.source)
    return img


def _as_labels(data: np.ndarray, source: str, num_classes: int = 4) -> np.ndarray:
    if not np.all(np.isfinite(data)):
        raise SpinesegError("label map contains NaN values", source)
    rounded = np.rint(data)
    if np.any(np.abs(rounded - data) > 1e-3):
        raise SpinesegError("label map has non-integer values", source)
    values = np.unique(rounded)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise SpinesegError(f"label values outside 0-{num_classes - 1}: {bad[:5].astype(int).tolist()}", source)
    return rounded.astype(np.uint8)


# ----------------------------------------------------------------------------------------------- readers

def _raw_pixdim(path: Path, img) -> np.ndarray:
    """``pixdim`` as stored in the file: nibabel replaces 0 by 1 when it loads a header."""
    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            return np.asarray(type(img.header).from_fileobj(fh, check=False)["pixdim"], float)
    except Exception as exc:
        raise SpinesegError(f"cannot read NIfTI header ({type(exc).__name__}: {exc})", path) from None


def _check_nifti_spacing(path: Path, img, shape: tuple) -> None:
    """Without an sform the affine is built from ``pixdim``: refuse a 0 or non-finite in-plane spacing there."""
    if int(img.header["sform_code"]) != 0:
        return  # the sform's columns carry the spacing; _to_display checks them
    n = min(len(shape), 3)
    pixdim = _raw_pixdim(path, img)[1:1 + n]
    bad = [i for i in range(n) if not (np.isfinite(pixdim[i]) and pixdim[i] != 0)]
    if not bad:
        return
    shown = [float(v) for v in pixdim]
    if any(not np.isfinite(pixdim[i]) for i in bad):
        raise SpinesegError(f"invalid pixel spacing in the NIfTI header (pixdim {shown}); set the voxel size in the "
                            "file's header", path)
    ornt = nio.io_orientation(img.affine)  # built with 1 in place of 0: the directions are still the file's
    in_plane = [i for i in bad if int(ornt[i, 0]) != 2]
    if in_plane:
        raise SpinesegError(f"missing pixel spacing in the NIfTI header (pixdim {shown}: 0 along an in-plane axis, "
                            "and no sform); areas in mm2 would be wrong; set the voxel size in the file's header",
                            path)
    if any(shape[i] > 1 for i in bad):
        log.warning("%s: no slice spacing in the NIfTI header (pixdim 0 along the slice axis); slices are read 1 mm apart",
                    path)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    quiet, level = nib.imageglobals.logger, nib.imageglobals.logger.level
    quiet.setLevel(logging.ERROR)  # nibabel logs the header fixes it makes (pixdim 0 -> 1); they are refused below
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types on corrupt files
        raise SpinesegError(f"cannot read NIfTI file ({type(exc).__name__}: {exc})", path) from None
    finally:
        quiet.setLevel(level)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise SpinesegError(f"expected a 2D or 3D image, got shape {data.shape}", path)
    _check_nifti_spacing(path, img, data.shape)
    return data, img.affine


_HEADER_BYTES = 1 << 16  # an ITK text header is far shorter


def _itk_header_has_spacing(path: Path) -> bool | None:
    """Whether a MetaImage or NRRD text header states the voxel spacing (ITK reads 1 mm otherwise);
    None when the header cannot be looked at (ITK's own reader will say why)."""
    ext = file_ext(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEADER_BYTES)
    except OSError:
        return None
    lines = head.decode("latin-1").splitlines()
    keys = set()
    if ext in (".mha", ".mhd"):
        for line in lines:
            key = line.split("=", 1)[0].strip()
            keys.add(key)
            if key == "ElementDataFile":  # the last header line
                return "ElementSpacing" in keys or "ElementSize" in keys  # MetaIO takes ElementSize as the spacing
        return None
    if not lines or not lines[0].startswith("NRRD"):
        return None
    for line in lines[1:]:  # NRRD: the magic line, then "field: value" lines up to a blank line
        if not line.strip():
            break
        if not line.startswith("#") and ":" in line and ":=" not in line:
            keys.add(line.split(":", 1)[0].strip().lower())
    return "space directions" in keys or "spacings" in keys


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        im = sitk.ReadImage(str(path))
    except Exception as exc:
        raise SpinesegError(f"cannot read image ({str(exc).strip().splitlines()[-1][:200]})", path) from None
    if im.GetNumberOfComponentsPerPixel() != 1:
        raise SpinesegError("multi-component images are not supported", path)
    dim = im.GetDimension()
    if dim not in (2, 3):
        raise SpinesegError(f"expected a 2D or 3D image, got a {dim}D image of size {list(im.GetSize())}", path)
    if _itk_header_has_spacing(path) is False:
        key = "ElementSpacing" if file_ext(path) in (".mha", ".mhd") else "'space directions' or 'spacings'"
        raise SpinesegError(f"no pixel spacing in the header (no {key}), so ITK would read 1 mm per pixel and areas "
                            "in mm2 would be wrong; add the spacing to the header", path)
    spacing = np.array(im.GetSpacing(), float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise SpinesegError(f"invalid pixel spacing in the header ({spacing.tolist()})", path)
    arr = sitk.GetArrayFromImage(im)  # (k, j, i) or (j, i)
    data = np.transpose(arr, tuple(range(arr.ndim))[::-1])  # (i, j, k)
    direction = np.array(im.GetDirection(), float).reshape(dim, dim)
    origin = np.array(im.GetOrigin(), float)
    lps = np.eye(4)
    lps[:dim, :dim] = direction * spacing[None, :]
    lps[:dim, 3] = origin
    return data, _LPS_TO_RAS @ lps


def _read_raster(path: Path, spacing: float | None, kind: str = "image") -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image as PILImage

    if spacing is None:
        raise SpinesegError("PNG/TIFF files carry no pixel spacing; pass it with --spacing (mm)", path)
    if not (np.isfinite(spacing) and spacing > 0):
        raise SpinesegError(f"pixel spacing must be a number of mm above 0 (got {spacing})", path)
    try:
        with PILImage.open(path) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:
                raise SpinesegError(f"holds {frames} pages or frames; spineseg reads single-page 2D images (save "
                                    "each slice as its own file, or the stack as NIfTI)", path)
            # a palette ("P") label map holds class indices, as labelling tools save masks: kept, not made grey
            if im.mode in ("RGB", "RGBA", "P", "LA") and not (kind == "label" and im.mode == "P"):
                im = im.convert("L")
            arr = np.array(im)
    except SpinesegError:
        raise
    except Exception as exc:
        raise SpinesegError(f"cannot read image ({exc})", path) from None
    if arr.ndim != 2:
        raise SpinesegError(f"expected a grey-scale 2D image, got shape {arr.shape}", path)
    data = arr.T  # raster is already in the display convention: (row, col) -> (i=col, j=row)
    affine = _LPS_TO_RAS @ np.diag([spacing, spacing, 1.0, 1.0])
    return data, affine


def _grid_loaders(path: Path, spacing: float | None, kind: str = "image") -> list:
    """Per stack of one input, a function giving ``(voxels, RAS affine, DICOM sources per slice or None)``.

    A problem with the input as a whole is raised here; a DICOM stack's pixels are decoded when its
    function is called (other formats are read here, as one stack)."""
    if not path.exists():
        raise SpinesegError("no such file or folder", path)
    if path.is_dir():
        return _dicom_loaders(path)
    if path.stat().st_size == 0:
        raise SpinesegError("file is empty", path)
    ext = file_ext(path)
    if ext in NIFTI_EXT:
        grid = _read_nifti(path) + (None,)
    elif ext in ITK_EXT:
        grid = _read_itk(path) + (None,)
    elif ext in RASTER_EXT:
        grid = _read_raster(path, spacing, kind) + (None,)
    else:
        return _dicom_loaders(path)  # DICOM often has no extension
    return [lambda: grid]


def _dicom_loaders(path: Path) -> list:
    def grid(load):
        s = load()
        return s.voxels, s.affine, s.sources

    return [functools.partial(grid, load) for load in plan_dicom_stacks(path)]


def file_slices_in_display(img: Image) -> tuple[int, int]:
    """The display axis the file's slice axis (its last voxel axis: the DICOM instances) becomes, and +1 / -1 as
    the display runs along or against it; the axis is 2 (the display slices) for an axially stored series."""
    axis, direction = nio.ornt_transform(img.ornt, _DISPLAY_ORNT)[2]
    return int(axis), int(direction)


def _display_sources(sources: list | None, img: Image) -> list | None:
    """Per-slice DICOM sources in display slice order; None when display slices are not the DICOM slices."""
    if sources is None:
        return None
    axis, direction = file_slices_in_display(img)
    if axis != 2:
        return None  # a sagittal or coronal stack: each display slice cuts across every DICOM image
    return list(sources) if direction > 0 else list(sources)[::-1]


def _image(grid, source: Path, kind: str, stack: int = 0, stack_count: int = 1) -> Image:
    data, affine, sources = grid
    if kind == "label":
        img = _to_display(_as_labels(np.asarray(data, dtype=np.float64), str(source)), affine, str(source), np.uint8)
    else:
        img = _check_values(_to_display(np.asarray(data), affine, str(source), np.float32), kind)
    img.stack, img.stack_count = stack, stack_count
    img.sources = _display_sources(sources, img)
    return img


def read_image(path: str | Path, spacing: float | None = None, kind: str = "image") -> Image:
    """Read one image (``kind='image'``) or label map (``kind='label'``) into the display convention.

    ``path`` may be a NIfTI/MHA/NRRD/DICOM/PNG/TIFF file or a folder holding one DICOM stack; an input
    with several stacks is refused (:func:`read_images` reads them all).
    ``spacing`` (mm) is required for PNG/TIFF and ignored otherwise.
    """
    path = Path(path)
    grids = _grid_loaders(path, spacing, kind)
    if len(grids) > 1:
        raise SpinesegError(f"holds {len(grids)} image stacks (DICOM slabs or series differing in orientation, "
                            "position, image type or echo); this step reads one stack: spineseg predict, "
                            "spineseg info and spineseg sanity handle every stack", path)
    return _image(grids[0](), path, kind)


def read_images(path: str | Path, spacing: float | None = None) -> list[Image]:
    """Every stack of one input, in the order of acquisition: one :class:`Image` per stack.

    A DICOM folder or file gives one image per regular stack (see :mod:`spineseg.io.dicom` for the
    grouping rule); every other input gives one. Each image's affine is its own stack's voxel grid.
    """
    return [load() for load in image_loaders(path, spacing)]


def image_loaders(path: str | Path, spacing: float | None = None) -> list:
    """One function per stack of one input (as :func:`read_images` orders them) that reads it as an
    :class:`Image`: a stack that cannot be read (a DICOM slab whose pixels do not decode) raises only when
    its own function is called, so the other stacks can still be read. Problems with the input as a whole
    raise here."""
    path = Path(path)
    loaders = _grid_loaders(path, spacing)

    def load(k, grid):
        return _image(grid(), path, "image", k, len(loaders))

    return [functools.partial(load, k, grid) for k, grid in enumerate(loaders)]


def stack_name(name: str, stack: int, stack_count: int) -> str:
    """Output name of stack ``stack`` of ``stack_count``: ``name`` alone, ``{name}_stack{k}`` among several."""
    return name if stack_count == 1 else f"{name}_stack{stack}"


def stack_output_name(name: str, image: Image) -> str:
    """Output name of one stack: ``name`` for a single-stack input, ``{name}_stack{k}`` otherwise."""
    return stack_name(name, image.stack, image.stack_count)


def read_label(path: str | Path, spacing: float | None = None) -> Image:
    return read_image(path, spacing=spacing, kind="label")


def display_affine(img: Image) -> np.ndarray:
    """RAS affine (4x4) of the display-convention array's voxels, indexed ``(column, row, slice)`` as in the file
    grid of :func:`slice_affine`: the file's own affine carried through the reorientation to the display."""
    shape3 = tuple(img.file_shape) + (1,) * (3 - len(img.file_shape))
    to_display = nio.ornt_transform(img.ornt, _DISPLAY_ORNT)
    return np.asarray(img.affine, float) @ nio.inv_ornt_aff(to_display, shape3)


def check_pair(image: Image, label: Image) -> None:
    if image.data.shape != label.data.shape:
        raise SpinesegError(f"mask size {label.data.shape[::-1]} does not match image size {image.data.shape[::-1]} "
                            f"({image.source})", label.source)


_PLANES = ("sagittal", "coronal", "axial")  # the plane whose normal is the R-L, A-P, S-I axis


def stack_geometry(image: Image) -> dict:
    """Geometry of an image on its file's own voxel grid: orientation codes, affine, slices, spacing, plane.

    The slice normal is the stacking direction for DICOM and 2D files, otherwise the voxel axis with the
    largest spacing (the last one among equals). ``note`` is set when that normal is closer to the
    left-right or anterior-posterior axis than to the superior-inferior one.
    """
    affine = np.asarray(image.affine, float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    shape = tuple(image.file_shape) + (1,) * (3 - len(image.file_shape))
    if image.sources is not None or len(image.file_shape) == 2 or input_format(image.source) == "dicom":
        slice_axis = 2
    else:
        slice_axis = max(range(3), key=lambda a: (round(zooms[a] / zooms.max(), 2), a))
    column_axis, row_axis = (a for a in range(3) if a != slice_axis)
    normal = affine[:3, slice_axis] / zooms[slice_axis]
    nearest = int(np.argmax(np.abs(normal)))
    info = {"orientation": "".join(nib.aff2axcodes(affine)), "affine": np.round(affine, 6).tolist(),
            "file_shape": list(image.file_shape), "slice_axis": slice_axis, "slices": int(shape[slice_axis]),
            "pixel_spacing_mm": [round(float(zooms[row_axis]), 6), round(float(zooms[column_axis]), 6)],
            "slice_spacing_mm": round(float(zooms[slice_axis]), 6), "plane": _PLANES[nearest],
            "tilt_deg": round(float(np.degrees(np.arccos(min(1.0, abs(normal[nearest]))))), 2)}
    if nearest != 2:
        info["note"] = f"looks {_PLANES[nearest]}: spineseg expects axial slices"
    return info


def input_format(source: str | Path) -> str:
    """``dicom``, ``nifti``, ``itk`` or ``raster``: which reader an input goes to."""
    path = Path(source)
    if path.is_dir():
        return "dicom"
    ext = file_ext(path)
    return "nifti" if ext in NIFTI_EXT else "itk" if ext in ITK_EXT else "raster" if ext in RASTER_EXT else "dicom"


# ----------------------------------------------------------------------------------------------- writers

def nifti_bytes(data: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    """Serialise a NIfTI-1 image deterministically (gzip with a fixed timestamp)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


def save_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> None:
    path = Path(path)
    atomic_write_bytes(path, nifti_bytes(data, affine, compress=str(path).lower().endswith(".gz")))


def slice_affine(spacing: tuple[float, float], thickness: float = 1.0, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine of a display-convention slice stored as ``(i=col, j=row, k)`` in L, P, S order."""
    lps = np.diag([spacing[1], spacing[0], thickness, 1.0])
    lps[:3, 3] = origin
    return _LPS_TO_RAS @ lps


def save_slice_nifti(path: str | Path, slice2d: np.ndarray, spacing: tuple[float, float], thickness: float = 1.0) -> None:
    """Write one display-convention slice ``(H, W)`` as a single-slice 3D NIfTI ``(W, H, 1)``."""
    arr = np.ascontiguousarray(slice2d.T[:, :, None])
    save_nifti(path, arr, slice_affine(spacing, thickness))


def write_labels_like(path: str | Path, labels: np.ndarray, ref: Image) -> None:
    """Write a ``(S, H, W)`` display-convention label map on the reference image's own voxel grid."""
    arr = ref.to_file_layout(np.asarray(labels, dtype=np.uint8))
    save_nifti(path, arr, ref.affine)


def save_png(path: str | Path, rgb_or_gray: np.ndarray) -> None:
    from PIL import Image as PILImage

    arr = np.asarray(rgb_or_gray)
    if arr.dtype != np.uint8:
        arr = (percentile_window(arr) * 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        PILImage.fromarray(arr).save(tmp, format="PNG")
