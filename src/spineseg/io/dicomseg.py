"""DICOM SEG output with highdicom: one segment per structure, frames referencing the source instances.

The label map arrives in the display convention; each display slice goes back to its source
instance's own pixel grid through the :class:`~spineseg.io.images.Image`'s file layout, so the SEG's
frames overlay the instances they reference in any viewer. A structure absent from a slice gives no
frame (highdicom's ``omit_empty_frames``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import LABELS, __version__
from ..errors import SpinesegError
from .atomic import atomic_path
from .images import DICOM_EXT, IMAGE_EXT, file_ext, file_slices_in_display

# the SEG's series gets its own number, far from the scanner's usual 1-99
SEG_SERIES_NUMBER = 9901
# the SEG joins its source's study and frame of reference, so without these there is nothing to join
REQUIRED_SOURCE_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "Modality")
# Type 2 patient / study attributes (present, may be empty) that de-identification tools often delete outright
TYPE2_SOURCE_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _segment_codes() -> dict[int, tuple[str, object]]:
    """Per label: segment label and segmented property type (SNOMED CT from DICOM's own code tables)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    # DICOM's code tables hold no SNOMED CT concept for the vertebral body alone: a local (99) code says so
    body = CodedConcept(value="VB", scheme_designator="99SPINESEG", meaning="Vertebral body")
    return {LABELS["vertebral_body"]: ("Vertebral body", body),
            LABELS["vertebral_foramen"]: ("Vertebral foramen", codes.SCT.VertebralForamen),
            LABELS["lamina"]: ("Lamina", codes.SCT.LaminaOfVertebra)}


def _is_dicom_source(source: Path) -> bool:
    return source.is_dir() or file_ext(source) in DICOM_EXT or file_ext(source) not in IMAGE_EXT


def _sorted_series(source: Path) -> list[tuple[Path, object]]:
    """The image instances of a single-stack series, in the reader's order (along the slice normal)."""
    import pydicom

    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")) if source.is_dir() \
        else [source]
    instances = []
    for p in files:
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception:  # pydicom raises many types on non-DICOM files; the reader skipped them too
            continue
        if "Rows" in ds and "SOPInstanceUID" in ds:
            instances.append((p, ds))
    iop = np.array(getattr(instances[0][1], "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float) if instances else None
    if instances and all("ImagePositionPatient" in ds for _, ds in instances):
        normal = np.cross(iop[:3], iop[3:])
        key = [float(np.dot(np.array(ds.ImagePositionPatient, float), normal)) for _, ds in instances]
    else:
        key = [float(getattr(ds, "InstanceNumber", i)) for i, (_, ds) in enumerate(instances)]
    return [instances[i] for i in np.argsort(key, kind="stable")]


def file_to_display_slices(image) -> np.ndarray:
    """For every slice of the file's voxel grid, the display slice it became.

    The file's slice axis is its last one for DICOM and for axially stored volumes; for a volume stored
    in another order it is the axis the display slices run along.
    """
    index = np.broadcast_to(np.arange(image.num_slices, dtype=np.int32)[:, None, None], image.data.shape)
    layout = image.to_file_layout(np.ascontiguousarray(index))
    if layout.ndim < 3 or image.num_slices == 1:
        return np.zeros(1, int)
    axis = next(a for a in range(3) if np.ptp(layout, axis=a).max() > 0)
    return np.moveaxis(layout, axis, -1).reshape(-1, layout.shape[axis])[0].astype(int)


def _slices_are_instances(image) -> bool:
    """Whether the display slices run along the file's slice axis (the DICOM instances), as for an axial series."""
    return len(image.file_shape) < 3 or file_slices_in_display(image)[0] == 2


def dicom_sources(image) -> list[dict] | None:
    """Per display slice, its source instance (``path``, ``sop_instance_uid``, ...); None for non-DICOM input.

    Uses ``image.sources`` where the reader filled it; otherwise reads the headers of the series beside
    ``image.source`` (a single-stack series, as the reader read it).
    """
    if image.sources is not None:
        return list(image.sources)
    source = Path(image.source)
    if not _is_dicom_source(source):
        return None
    if image.ornt is not None and not _slices_are_instances(image):
        raise SpinesegError("no DICOM SEG: the series is not axial (sagittal or coronal images), so every axial "
                            "slice cuts across all of its images and no frame can reference one instance", source)
    series = _sorted_series(source)
    if len(series) != image.num_slices:
        raise SpinesegError(f"found {len(series)} DICOM instances for an image of {image.num_slices} slices", source)
    sources: list[dict] = [{}] * image.num_slices
    for k, display in enumerate(file_to_display_slices(image)):
        path, ds = series[k]
        sources[int(display)] = {
            "path": str(path), "sop_instance_uid": str(ds.SOPInstanceUID), "sop_class_uid": str(ds.SOPClassUID),
            "series_instance_uid": str(getattr(ds, "SeriesInstanceUID", "")),
            "study_instance_uid": str(getattr(ds, "StudyInstanceUID", "")),
            "frame_of_reference_uid": str(getattr(ds, "FrameOfReferenceUID", "")),
            "instance_number": int(getattr(ds, "InstanceNumber", k + 1) or k + 1)}
    return sources


def write_dicom_seg(path: str | Path, labels: np.ndarray, image, sources: list[dict], algorithm: str = "spineseg",
                    series_description: str = "spineseg segmentation") -> Path:
    """Write ``(S, H, W)`` display-convention ``labels`` of ``image`` as a DICOM SEG referencing ``sources``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    labels = np.asarray(labels, np.uint8)
    if not labels.any():
        raise SpinesegError("no structure in any slice: a DICOM SEG needs at least one non-empty frame", image.source)
    if len(sources) != labels.shape[0]:
        raise SpinesegError(f"{len(sources)} source instances for {labels.shape[0]} slices", image.source)
    file_labels = image.to_file_layout(labels)
    if file_labels.ndim == 2:
        file_labels = file_labels[:, :, None]
    frames, datasets = [], []
    for k, display in enumerate(file_to_display_slices(image)):
        src = sources[int(display)]
        ds = pydicom.dcmread(src["path"], stop_before_pixels=True)
        if str(ds.SOPInstanceUID) != src["sop_instance_uid"]:
            raise SpinesegError("source instance changed since it was read", src["path"])
        frame = file_labels[:, :, k].T  # the file grid is (column, row, slice); a DICOM frame is (row, column)
        if frame.shape != (int(ds.Rows), int(ds.Columns)):
            raise SpinesegError(f"label slice {frame.shape} does not match the instance's {ds.Rows}x{ds.Columns} pixels",
                                src["path"])
        missing = [keyword for keyword in REQUIRED_SOURCE_ATTRIBUTES if not ds.get(keyword)]
        if missing:
            raise SpinesegError(f"cannot build a DICOM SEG: the source instance has no {', '.join(missing)}",
                                src["path"])
        for keyword in TYPE2_SOURCE_ATTRIBUTES:
            if keyword not in ds:
                setattr(ds, keyword, "")  # the SEG copies them; empty is what Type 2 allows
        frames.append(frame)
        datasets.append(ds)
    algorithm_id = hd.AlgorithmIdentificationSequence(name=algorithm or "spineseg", version=__version__,
                                                      family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(segment_number=number, segment_label=label,
                                          segmented_property_category=codes.SCT.AnatomicalStructure,
                                          segmented_property_type=code,
                                          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                          algorithm_identification=algorithm_id)
                for number, (label, code) in sorted(_segment_codes().items())]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=np.stack(frames), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="spineseg", manufacturer_model_name=algorithm,
            software_versions=__version__, device_serial_number="none", series_description=series_description,
            omit_empty_frames=True)
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks on the source instances
        raise SpinesegError(f"cannot build a DICOM SEG from this series ({exc})", image.source) from None
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)
