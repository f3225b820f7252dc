"""What a training run learns from: the data set, its patient-level split, preprocessed slices, loaders."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..data.dataset import SliceRecord, prepare_slices
from ..data.splits import check_splits, load_splits, make_splits
from ..errors import SpinesegError
from ..io.layouts import Case, has_patient_map, load_dataset
from ..preprocess.pipeline import PreprocessCache, PreprocessConfig


def dataset_fingerprint(cases: list[Case]) -> str:
    """A digest of the data set's content (case ids, patients and file bytes), not of where it lies."""
    h = hashlib.sha1()
    for c in sorted(cases, key=lambda c: c.case_id):
        h.update(f"{c.case_id}\0{c.patient}\0".encode())
        for f in (c.image, c.label):
            if f is None:
                h.update(b"-")
                continue
            files = sorted(p for p in Path(f).rglob("*") if p.is_file()) if Path(f).is_dir() else [Path(f)]
            for p in files:
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()


def training_cases(data: str | Path, case_is_patient: bool) -> list[Case]:
    """The labelled training cases of a data set; refuse one that cannot say which slices share a patient."""
    cases = load_dataset(data)  # first: a missing or malformed folder is said as such, not as a missing patient map
    if not has_patient_map(data) and not case_is_patient:
        raise SpinesegError("the data set has no patient map (cases.csv with columns case,patient), so slices of one "
                            "patient could end up in both training and test; add cases.csv, or pass "
                            "--case-is-patient if every case is its own patient", data)
    return [c for c in cases if c.subset == "train"]


def resolve_splits(cases: list[Case], scheme: str, run_splits: Path, splits_file: str | Path | None,
                   resume: bool = True) -> list[dict]:
    """A resumed run's own splits.json; for a new run the given file, else computed; always checked for leakage.
    A new run refuses a splits.json already in its folder (e.g. left by a run killed in its first epoch) that is
    not the split it asks for, rather than train on it while its config records another."""
    if resume and run_splits.exists():
        splits, source = load_splits(run_splits), run_splits
    elif splits_file is not None:
        splits, source = load_splits(splits_file), splits_file
    else:
        splits, source = make_splits(cases, scheme), None
    if not resume and run_splits.exists() and load_splits(run_splits) != splits:
        asked = f"the split in {splits_file}" if splits_file is not None else f"the {scheme} split of this data set"
        raise SpinesegError(f"the run folder already holds a splits.json (an earlier run that never finished an "
                            f"epoch?) that differs from {asked}; remove it, or choose another --out", run_splits)
    check_splits(splits, cases, source)
    return splits


@dataclass
class TrainingData:
    cases: list[Case]
    splits: list[dict]
    fold: int
    train: list[SliceRecord]
    val: list[SliceRecord]

    @property
    def split(self) -> dict:
        return self.splits[self.fold]


def load_training_data(cases: list[Case], splits: list[dict], fold: int, pp: PreprocessConfig,
                       cache: PreprocessCache, progress: bool = True) -> TrainingData:
    if not 0 <= fold < len(splits):
        raise SpinesegError(f"fold {fold} does not exist ({len(splits)} splits)")
    by_id = {c.case_id: c for c in cases}
    split = splits[fold]
    train = prepare_slices([by_id[c] for c in split["train"]], pp, cache, progress=progress)
    val = prepare_slices([by_id[c] for c in split["val"]], pp, cache, progress=progress)
    if not train:
        raise SpinesegError(f"fold {fold} has no training cases")
    if not val:  # a tiny data set: validate on a tenth of the training slices rather than not at all
        val = train[: max(1, len(train) // 10)]
    return TrainingData(cases, splits, fold, train, val)


def unlabeled_cases(paths: list[str | Path]) -> list[Case]:
    """Unlabelled real images (files, DICOM series folders, or folders of them), one case per input; two inputs
    of one name (``siteA/scan.nii.gz`` and ``siteB/scan.nii.gz``) are refused, as a slice list could not tell
    them apart."""
    from ..io.images import case_stem
    from ..io.layouts import collect_inputs

    inputs = collect_inputs(paths)
    missing = [p for p in inputs if not Path(p).exists()]
    if missing:
        raise SpinesegError("no such file or folder (--unlabeled)", missing[0])
    if not inputs:
        raise SpinesegError("no images found (--unlabeled)", paths[0] if paths else None)
    seen: dict[str, Path] = {}
    for p in map(Path, inputs):
        other = seen.setdefault(case_stem(p), p)
        if other.resolve() != p.resolve():
            raise SpinesegError(f"two unlabelled images have the name {case_stem(p)!r} ({other} and {p}), which a "
                                "slice list (and the run's log) cannot tell apart; rename one (--unlabeled)", p)
    return [Case(f"{case_stem(p)}", Path(p), None, f"unlabeled:{case_stem(p)}") for p in inputs]


def check_unlabeled_spacing(cases: list[Case], spacing: float | None) -> None:
    """PNG / TIFF slices carry no pixel spacing: refuse them without ``--unlabeled-spacing``, before any work."""
    from ..io.images import RASTER_EXT, file_ext

    if spacing is not None:
        return
    raster = next((c.image for c in cases if Path(c.image).is_file() and file_ext(c.image) in RASTER_EXT), None)
    if raster is not None:
        raise SpinesegError("PNG/TIFF files carry no pixel spacing; pass it with --unlabeled-spacing (mm)", raster)


def read_slice_list(path: str | Path, cases: list[Case], flag: str = "--unlabeled-no-body") -> set[tuple[str, int]]:
    """A slice list of ``train --unlabeled-no-body`` or ``--unlabeled-body`` (``flag``, named in errors): a CSV with
    columns ``image`` (an unlabelled image's file name, or its name without extension) and ``slice`` (0-based, in
    the order ``spineseg sanity`` numbers them), naming slices known to hold no vertebral body (disc level) or known
    to hold one. Returns ``{(case id, slice)}``. UTF-8 with or without a byte-order mark (a spreadsheet's "CSV
    UTF-8")."""
    import csv

    from ..io.images import case_stem

    path = Path(path)
    if not path.is_file():
        raise SpinesegError(f"no such file ({flag})", path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except UnicodeDecodeError:
        raise SpinesegError(f"not UTF-8 text; save the list as CSV UTF-8 ({flag})", path) from None
    except csv.Error as exc:
        raise SpinesegError(f"not a readable CSV file ({exc}) ({flag})", path) from None
    if not rows or not {"image", "slice"} <= set(rows[0]):
        raise SpinesegError(f"needs a header with columns image,slice and at least one row ({flag})", path)
    known = {c.case_id for c in cases}
    out = set()
    for n, row in enumerate(rows, start=2):
        if row["slice"] is None:
            raise SpinesegError(f"line {n}: no slice given (each row is image,slice) ({flag})", path)
        stem = case_stem(Path(row["image"] or ""))
        if stem not in known:
            raise SpinesegError(f"line {n}: image {row['image']!r} is not one of the --unlabeled images ({flag})", path)
        try:
            index = int(row["slice"])
        except (TypeError, ValueError):
            raise SpinesegError(f"line {n}: slice {row['slice']!r} is not a whole number ({flag})", path) from None
        out.add((stem, index))
    return out


def load_unlabeled(cases: list[Case], spacing: float | None, pp: PreprocessConfig, cache: PreprocessCache,
                   progress: bool = True, no_body: set[tuple[str, int]] | None = None,
                   no_body_source: str | Path | None = None, body: set[tuple[str, int]] | None = None,
                   body_source: str | Path | None = None) -> list[SliceRecord]:
    """Preprocessed slices of the unlabelled real images; empty slices are left out with a warning.
    ``no_body``: ``{(case id, slice)}`` known to hold no vertebral body (see ``read_slice_list``); ``body``:
    those known to hold one."""
    recs = prepare_slices(cases, pp, cache, spacing=spacing, progress=progress, skip_empty=True)
    if not recs:
        raise SpinesegError("the unlabelled images hold no slice with image content", cases[0].image)
    no_body, body = no_body or set(), body or set()
    present = {(r.case_id, r.index) for r in recs}
    for listed, flag, source in ((no_body, "--unlabeled-no-body", no_body_source), (body, "--unlabeled-body", body_source)):
        missing = sorted(listed - present)
        if missing:
            case, index = missing[0]
            raise SpinesegError(f"slice {index} of {case} does not exist or has no image content ({flag})", source)
    both = sorted(body & no_body)
    if both:
        case, index = both[0]
        raise SpinesegError(f"slice {index} of {case} is listed both as holding a body and as holding none "
                            "(--unlabeled-body and --unlabeled-no-body)", body_source)
    for r in recs:
        r.no_body = (r.case_id, r.index) in no_body
        r.has_body = (r.case_id, r.index) in body
    return recs
