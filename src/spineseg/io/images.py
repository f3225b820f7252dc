"""Read DICOM, NIfTI, MHA/NRRD and PNG/TIFF into one display convention; write label maps back.

Display convention for every axial slice: a ``(S, H, W)`` array, rows run anterior -> posterior
(anterior at the top), columns run patient right -> patient left (patient left on image right),
slices run inferior -> superior. Internally this is the ``L, P, S`` voxel orientation, transposed.
Every :class:`Image` remembers how it was reoriented so that a label map computed in the display
convention can be written back on the file's own voxel grid with the file's own affine.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from ..errors import SpinesegError
from .atomic import atomic_path, atomic_write_bytes
from .intensity import percentile_window

NIFTI_EXT = (".nii", ".nii.gz")
ITK_EXT = (".mha", ".mhd", ".nrrd", ".nhdr")
RASTER_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
DICOM_EXT = (".dcm", ".dicom", ".ima")
IMAGE_EXT = NIFTI_EXT + ITK_EXT + RASTER_EXT + DICOM_EXT

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


def _to_display(data: np.ndarray, affine: np.ndarray, source: str, dtype) -> Image:
    file_shape = data.shape
    if data.ndim == 2:
        data = data[:, :, None]
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

def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types on corrupt files
        raise SpinesegError(f"cannot read NIfTI file ({type(exc).__name__}: {exc})", path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise SpinesegError(f"expected a 2D or 3D image, got shape {data.shape}", path)
    zooms = img.header.get_zooms()[:3]
    if any(z <= 0 for z in zooms[:2]):
        raise SpinesegError("missing pixel spacing in the NIfTI header (pixdim is 0)", path)
    return data, img.affine


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        im = sitk.ReadImage(str(path))
    except Exception as exc:
        raise SpinesegError(f"cannot read image ({str(exc).strip().splitlines()[-1][:200]})", path) from None
    if im.GetNumberOfComponentsPerPixel() != 1:
        raise SpinesegError("multi-component images are not supported", path)
    arr = sitk.GetArrayFromImage(im)  # (k, j, i) or (j, i)
    dim = im.GetDimension()
    data = np.transpose(arr, tuple(range(arr.ndim))[::-1])  # (i, j, k)
    direction = np.array(im.GetDirection(), float).reshape(dim, dim)
    spacing = np.array(im.GetSpacing(), float)
    origin = np.array(im.GetOrigin(), float)
    lps = np.eye(4)
    lps[:dim, :dim] = direction * spacing[None, :]
    lps[:dim, 3] = origin
    return data, _LPS_TO_RAS @ lps


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_dicom(paths: list[Path], source: Path) -> tuple[np.ndarray, np.ndarray]:
    import pydicom

    slices = []
    for p in paths:
        try:
            ds = pydicom.dcmread(str(p))
        except Exception as exc:
            if source.is_dir():
                continue  # non-DICOM files in a series folder are skipped
            raise SpinesegError(f"not a readable DICOM file ({exc})", p) from None
        if "PixelData" not in ds:
            continue
        slices.append((p, ds))
    if not slices:
        raise SpinesegError("no DICOM image files found", source)
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise SpinesegError(f"folder holds {len(series)} DICOM series; give one series folder", source)
    first = slices[0][1]
    if "PixelSpacing" not in first:
        raise SpinesegError("DICOM has no PixelSpacing", slices[0][0])
    iop = np.array(getattr(first, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    rowdir, coldir = iop[:3], iop[3:]
    normal = np.cross(rowdir, coldir)
    if all("ImagePositionPatient" in ds for _, ds in slices):
        key = [float(np.dot(np.array(ds.ImagePositionPatient, float), normal)) for _, ds in slices]
    else:
        key = [float(getattr(ds, "InstanceNumber", i)) for i, (_, ds) in enumerate(slices)]
    order = np.argsort(key, kind="stable")
    slices = [slices[i] for i in order]
    arrays = []
    for p, ds in slices:
        try:
            px = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise SpinesegError(f"cannot decode DICOM pixel data ({exc})", p) from None
        if px.ndim != 2:
            raise SpinesegError(f"expected a single-frame 2D DICOM image, got shape {px.shape}", p)
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        arrays.append(px * slope + inter)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise SpinesegError(f"DICOM slices differ in size: {sorted(shapes)}", source)
    vol = np.stack(arrays, axis=-1)  # (rows, cols, k)
    data = np.transpose(vol, (1, 0, 2))  # (i=col, j=row, k)
    ps = [float(v) for v in first.PixelSpacing]  # [row spacing, column spacing]
    ipp0 = np.array(getattr(slices[0][1], "ImagePositionPatient", [0, 0, 0]), float)
    if len(slices) > 1 and "ImagePositionPatient" in slices[-1][1]:
        step = (np.array(slices[-1][1].ImagePositionPatient, float) - ipp0) / (len(slices) - 1)
        if np.linalg.norm(step) < 1e-6:
            step = normal * float(getattr(first, "SpacingBetweenSlices", getattr(first, "SliceThickness", 1.0)))
    else:
        step = normal * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = rowdir * ps[1]
    lps[:3, 1] = coldir * ps[0]
    lps[:3, 2] = step
    lps[:3, 3] = ipp0
    return data, _LPS_TO_RAS @ lps


def _read_raster(path: Path, spacing: float | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image as PILImage

    if spacing is None:
        raise SpinesegError("PNG/TIFF files carry no pixel spacing; pass it with --spacing (mm)", path)
    try:
        with PILImage.open(path) as im:
            if im.mode in ("RGB", "RGBA", "P", "LA"):
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


def read_image(path: str | Path, spacing: float | None = None, kind: str = "image") -> Image:
    """Read one image (``kind='image'``) or label map (``kind='label'``) into the display convention.

    ``path`` may be a NIfTI/MHA/NRRD/DICOM/PNG/TIFF file or a folder holding one DICOM series.
    ``spacing`` (mm) is required for PNG/TIFF and ignored otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise SpinesegError("no such file or folder", path)
    if path.is_dir():
        files = _dicom_files(path)
        if not files:
            raise SpinesegError("folder is empty", path)
        data, affine = _read_dicom(files, path)
    else:
        ext = file_ext(path)
        if path.stat().st_size == 0:
            raise SpinesegError("file is empty", path)
        if ext in NIFTI_EXT:
            data, affine = _read_nifti(path)
        elif ext in ITK_EXT:
            data, affine = _read_itk(path)
        elif ext in RASTER_EXT:
            data, affine = _read_raster(path, spacing)
        else:
            data, affine = _read_dicom([path], path)  # DICOM files often have no extension
    if kind == "label":
        data = _as_labels(np.asarray(data, dtype=np.float64), str(path))
        return _to_display(data, affine, str(path), np.uint8)
    img = _to_display(np.asarray(data), affine, str(path), np.float32)
    return _check_values(img, kind)


def read_images(path: str | Path, spacing: float | None = None) -> list[Image]:
    """Every stack of one input, in the order of acquisition: one :class:`Image` per stack.

    A multi-slab DICOM series (several angled stacks under one series) gives several images; every
    other input gives one.
    """
    return [read_image(path, spacing=spacing)]


def stack_output_name(name: str, image: Image) -> str:
    """Output name of one stack: ``name`` for a single-stack input, ``{name}_stack{k}`` otherwise."""
    return name if image.stack_count == 1 else f"{name}_stack{image.stack}"


def read_label(path: str | Path, spacing: float | None = None) -> Image:
    return read_image(path, spacing=spacing, kind="label")


def check_pair(image: Image, label: Image) -> None:
    if image.data.shape != label.data.shape:
        raise SpinesegError(f"mask size {label.data.shape[::-1]} does not match image size {image.data.shape[::-1]} "
                            f"({image.source})", label.source)


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
