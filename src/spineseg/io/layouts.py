"""Data-set layouts: nnU-Net v2 raw (imagesTr/labelsTr, imagesTs/labelsTs) and plain image / mask folders."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel import orientations as nio

from ..errors import SpinesegError
from .images import IMAGE_EXT, Image, case_stem, check_pair, display_affine, file_ext


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None
    patient: str
    subset: str = "train"  # "train" (imagesTr / images) or "test" (imagesTs)


def check_label_grid(image: Image, label: Image) -> None:
    """Refuse a label map that is not on its image's voxel grid: another shape, another spacing or axis direction,
    or (where the two files store their voxels in different orders) another position. Each file is turned to the
    display convention by its own header, so a mask whose header disagrees with its image's (one saved with an
    identity affine, say) would come out mis-scaled or mirrored against the image. The same grid stored in
    another voxel order is the same grid; files in one voxel order pair voxel by voxel, whatever their origins."""
    check_pair(image, label)
    img_grid, lab_grid = display_affine(image), display_affine(label)
    axes = 2 if image.num_slices == 1 else 3  # one slice: its thickness and normal play no part
    size = np.linalg.norm(img_grid[:3, :axes], axis=0)
    same_axes = np.all(np.linalg.norm(img_grid[:3, :axes] - lab_grid[:3, :axes], axis=0) <= 0.01 * size)
    same_order = np.array_equal(image.ornt, label.ornt)
    if same_axes and (same_order or np.linalg.norm(img_grid[:3, 3] - lab_grid[:3, 3]) <= 0.5 * size.min()):
        return

    def grid(img, g):
        spacing = np.linalg.norm(g[:3, :axes], axis=0)[::-1]  # (slice,) row, column
        return (f"{' x '.join(f'{v:.4g}' for v in spacing)} mm, {''.join(nio.aff2axcodes(img.affine))}, "
                f"origin {np.round(np.asarray(img.affine)[:3, 3], 1).tolist()}")

    raise SpinesegError(f"mask's voxel grid ({grid(label, lab_grid)}) is not its image's ({grid(image, img_grid)}, "
                        f"{image.source}): save the mask with the image's header (spacing, orientation, origin)",
                        label.source)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and (p.is_dir() or file_ext(p) in IMAGE_EXT))


PATIENT_MAP = "cases.csv"


def has_patient_map(root: str | Path) -> bool:
    """Whether a data set groups its cases into patients (``cases.csv`` with columns case, patient)."""
    return (Path(root) / PATIENT_MAP).is_file()


def _patients(root: Path) -> dict[str, str] | None:
    """The data set's patient map, or None where it has none (then every case is its own patient)."""
    f = root / PATIENT_MAP
    return read_patient_map(f) if f.exists() else None


def read_patient_map(f: str | Path) -> dict[str, str]:
    """``{case: patient}`` from a ``cases.csv`` (columns ``case`` and ``patient``); a case listed twice or without
    a patient is refused."""
    f = Path(f)
    if not f.is_file():
        raise SpinesegError("patient map (cases.csv) not found", f)
    try:
        with open(f, newline="", encoding="utf-8-sig") as fh:  # a spreadsheet's UTF-8 starts with a BOM
            rows = list(csv.DictReader(fh))
    except UnicodeDecodeError:
        raise SpinesegError("cases.csv is not UTF-8 text (save it as CSV UTF-8)", f) from None
    except csv.Error as exc:
        raise SpinesegError(f"cases.csv is not a readable CSV file ({exc})", f) from None
    if not rows or not {"case", "patient"} <= set(rows[0]):
        raise SpinesegError("cases.csv needs the columns 'case' and 'patient' and one row per case", f)
    out: dict[str, str] = {}
    for n, r in enumerate(rows, start=2):
        # a space after the comma must not make " P1" a second patient beside "P1"
        case, patient = (r.get("case") or "").strip(), (r.get("patient") or "").strip()
        if not case:
            raise SpinesegError(f"cases.csv line {n}: no case id", f)
        if not patient:
            raise SpinesegError(f"cases.csv line {n}: case {case!r} has no patient", f)
        if case in out:
            raise SpinesegError(f"cases.csv line {n}: case {case!r} is listed twice", f)
        out[case] = patient
    return out


def _with_patients(cases: list[Case], pat: dict[str, str] | None, root: Path) -> list[Case]:
    """``cases`` with their patients from the map; every case must be in it (a case left out would silently be a
    patient of its own, and slices of one patient could then land in both training and test)."""
    if pat is None:
        return cases
    unmapped = [c.case_id for c in cases if c.case_id not in pat]
    if unmapped:
        raise SpinesegError(f"case {unmapped[0]!r} is not in cases.csv ({len(unmapped)} of {len(cases)} cases "
                            "are not); its column 'case' must hold every case id (the image name without "
                            + ("'_0000' and " if (root / "dataset.json").exists() else "") + "extension)",
                            root / PATIENT_MAP)
    return [dataclasses.replace(c, patient=pat[c.case_id]) for c in cases]


def _nnunet(root: Path, require_labels: bool) -> list[Case]:
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpinesegError(f"cannot read dataset.json ({exc})", root / "dataset.json") from None
    ending = meta.get("file_ending", ".nii.gz")
    pat = _patients(root)
    cases = []
    for img_dir, lab_dir, subset in (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test")):
        d = root / img_dir
        if not d.is_dir():
            continue
        for f in _image_files(d):
            if f.is_dir():
                continue
            if not f.name.endswith(f"_0000{ending}"):
                _refuse_nnunet_name(f, ending)
            cid = f.name[: -len(f"_0000{ending}")]
            lab = root / lab_dir / f"{cid}{ending}"
            if not lab.exists():
                if require_labels and subset == "train":
                    raise SpinesegError(f"no label map for case {cid} (expected {lab.name})", root / lab_dir)
                lab = None
            cases.append(Case(cid, f, lab, cid, subset))
    return _with_patients(cases, pat, root)


def _refuse_nnunet_name(f: Path, ending: str) -> None:
    """An image in imagesTr / imagesTs that is not ``{case}_0000{file_ending}``: it would be left out silently."""
    stem = f.name[: -len(ending)] if f.name.endswith(ending) else case_stem(f)
    if f.name.endswith(ending) and len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        raise SpinesegError(f"channel {stem[-4:]} of case {stem[:-5]!r}: spineseg reads one channel, "
                            f"{stem[:-5]}_0000{ending}", f)
    if not f.name.endswith(ending):
        raise SpinesegError(f"file ending {file_ext(f)!r} is not dataset.json's file_ending {ending!r} "
                            f"(expected {stem.removesuffix('_0000')}_0000{ending})", f)
    raise SpinesegError(f"not named {{case}}_0000{ending}, as nnU-Net raw images are (expected {stem}_0000{ending})",
                        f)


def _by_case_name(files: list[Path], folder: Path) -> dict[str, Path]:
    """``{case name: file}``; two files of one name (``a.nii`` and ``a.nii.gz``) are refused, as a pairing of
    image and mask between them would be a guess."""
    out: dict[str, Path] = {}
    for f in files:
        cid = case_stem(f)
        if cid in out:
            raise SpinesegError(f"{out[cid].name} and {f.name} have one case name ({cid!r}); keep one of them",
                                folder)
        out[cid] = f
    return out


def _pairs(root: Path, require_labels: bool) -> list[Case]:
    img_dir = root / "images"
    lab_dir = next((root / n for n in ("masks", "labels") if (root / n).is_dir()), None)
    images = _by_case_name(_image_files(img_dir), img_dir)
    labels = _by_case_name(_image_files(lab_dir), lab_dir) if lab_dir else {}
    for cid, lab in labels.items():
        if cid not in images:  # a naming slip (case, a suffix): its image would be read as unlabelled
            near = [f.name for c, f in images.items() if c.lower() == cid.lower()]
            raise SpinesegError(f"mask has no image of its name in {img_dir}"
                                + (f" (names differ in case: {near[0]})" if near else ""), lab)
    pat = _patients(root)
    cases = []
    for cid, f in images.items():
        lab = labels.get(cid)
        if lab is None and require_labels:
            raise SpinesegError(f"no mask for image {f.name} in {lab_dir or root / 'masks'}", f)
        cases.append(Case(cid, f, lab, cid))
    return _with_patients(cases, pat, root)


def load_dataset(root: str | Path, require_labels: bool = True) -> list[Case]:
    """Discover the cases of a data set folder (nnU-Net raw layout or ``images/`` + ``masks/``)."""
    root = Path(root)
    if not root.is_dir():
        raise SpinesegError("data set folder does not exist", root)
    if (root / "dataset.json").exists():
        cases = _nnunet(root, require_labels)
    elif (root / "images").is_dir():
        cases = _pairs(root, require_labels)
    else:
        raise SpinesegError("not a data set: expected dataset.json + imagesTr/ (nnU-Net raw) "
                            "or images/ + masks/", root)
    if not cases:
        raise SpinesegError("data set folder holds no images", root)
    return cases


def collect_inputs(paths) -> list[Path]:
    """Expand prediction inputs: files, DICOM series folders, or folders of images / series."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            out.append(p)  # reported as an error per input later
        elif p.is_dir():
            entries = _image_files(p)
            has_sub = any(e.is_dir() for e in entries)
            images = [e for e in entries if e.is_file() and file_ext(e) in IMAGE_EXT and file_ext(e) not in (".dcm", ".dicom", ".ima")]
            if not images and not has_sub:
                out.append(p)  # a DICOM series folder (or empty: error later)
            else:
                out.extend(images)
                out.extend(e for e in entries if e.is_dir())
                dicoms = [e for e in entries if e.is_file() and file_ext(e) in (".dcm", ".dicom", ".ima")]
                if dicoms:
                    out.append(p)
        else:
            out.append(p)
    return out
