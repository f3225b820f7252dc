"""Write the phantom as an nnU-Net v2 raw data set (single-slice NIfTI), with cases.csv and a preview."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .. import LABELS
from ..errors import SpinesegError
from ..progress import progress as progress_bar
from ..io.atomic import atomic_dir, atomic_write_text
from ..io.images import save_slice_nifti
from .phantom import CONTRASTS, POSITION_P, POSITIONS, check_positions, phantom_slice

CASES_COLUMNS = ("case", "patient", "level", "position", "stenosis", "protrusion", "modic", "osteophytes",
                 "contrast", "spacing_mm", "size")


def case_id(patient: int, k: int) -> str:
    return f"P{patient:03d}_{k:02d}"


def dataset_json(num_training: int, name: str = "spineseg-phantom") -> dict:
    return {
        "name": name,
        "channel_names": {"0": "T2"},
        "labels": dict(LABELS),
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }


def write_phantom_dataset(out: str | Path, patients: int, slices_per_patient: int, size: int = 512,
                          spacing: float = 0.3906, seed: int = 0, contrast: str = "t2",
                          preview: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                          randomize: bool = False, positions=POSITION_P) -> Path:
    if patients < 1 or slices_per_patient < 1:
        raise SpinesegError("--patients and --slices-per-patient must be at least 1")
    if size < 64 or size > 2048:
        raise SpinesegError(f"--size must be between 64 and 2048 (got {size})")
    if not (0.05 <= spacing <= 5.0):
        raise SpinesegError(f"--spacing must be between 0.05 and 5 mm (got {spacing})")
    try:
        positions = check_positions(positions)
    except ValueError as exc:
        raise SpinesegError(f"--positions: {exc}") from None
    if contrast not in CONTRASTS + ("random", "mixed"):
        raise SpinesegError(f"unknown --contrast {contrast!r}")
    out = Path(out)
    jobs = [(p, k) for p in range(patients) for k in range(slices_per_patient)]
    rows = []
    prev = {position: [] for position in POSITIONS}  # the preview shows up to 3 slices of every slice position
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for p, k in progress_bar(jobs, desc="phantom", unit="slice", disable=not progress):
            c = contrast if contrast != "mixed" else (CONTRASTS + ("random",))[(p * 7 + k) % 6]
            s = phantom_slice(seed, p, k, size=size, spacing=spacing, contrast=c, randomize=randomize,
                              positions=positions)
            cid = case_id(p, k)
            save_slice_nifti(tmp / "imagesTr" / f"{cid}_0000.nii.gz", s.image, s.spacing, 4.0)
            save_slice_nifti(tmp / "labelsTr" / f"{cid}.nii.gz", s.label, s.spacing, 4.0)
            m = s.meta
            rows.append([cid, f"P{p:03d}", m["level"], m["position"], int(m["stenosis"]), int(m["protrusion"]),
                         int(m["modic"]), int(m["osteophytes"]), m["contrast"], m["spacing"], m["size"]])
            if preview is not None and len(prev[m["position"]]) < 3:
                prev[m["position"]].append((s.image, s.label, f"{cid} {m['level']} {m['position']}"))
        atomic_write_text(tmp / "dataset.json", json.dumps(dataset_json(len(jobs)), indent=2) + "\n")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CASES_COLUMNS)
        w.writerows(rows)
        atomic_write_text(tmp / "cases.csv", buf.getvalue())
        meta = {"generator": "spineseg.phantom", "seed": seed, "patients": patients,
                "slices_per_patient": slices_per_patient, "size": size, "spacing": spacing, "contrast": contrast,
                "randomize": randomize, "positions": dict(zip(POSITIONS, positions))}
        atomic_write_text(tmp / "phantom.json", json.dumps(meta, indent=2) + "\n")
    if preview is not None:
        from ..io.preview import preview_grid

        shown = [item for position in POSITIONS for item in prev[position]]
        preview_grid([a for a, _, _ in shown], [b for _, b, _ in shown], preview, [t for _, _, t in shown])
    return out
