"""Bridge to nnU-Net v2 (run through its own tool, not re-implemented).

``export``: any supported data set -> ``RAW/DatasetXXX_NAME`` with single-slice NIfTI (spacing kept),
``dataset.json`` and a patient-grouped ``splits_final.json`` (nnU-Net's "val" = our held-out test fold;
our train + val = nnU-Net's "train"), so nnU-Net's fold K tests on exactly the patients ours does.

``import``: nnU-Net's predicted ``{case}.nii.gz`` -> a run folder ``pred/`` that ``spineseg evaluate``
and ``spineseg compare`` read like any other model's.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from .. import LABELS
from ..errors import SpinesegError
from .atomic import atomic_dir, atomic_write_text
from .images import read_image, read_label, save_slice_nifti
from .layouts import PATIENT_MAP, check_label_grid, load_dataset

SLICE_SUFFIX = re.compile(r"^(?P<case>.+)_s(?P<idx>\d{3})$")


def export_nnunet(data: str | Path, raw: str | Path, splits: list[dict] | None = None, dataset_id: int = 501,
                  name: str = "LumbarAxial", overwrite: bool = False, splits_source: str | Path | None = None) -> Path:
    """``splits_source``: the file ``splits`` came from, named in errors about them."""
    if not 1 <= dataset_id <= 999:
        raise SpinesegError(f"nnU-Net dataset ids run from 1 to 999 (got {dataset_id})")
    cases = [c for c in load_dataset(data) if c.subset == "train"]
    folder = Path(raw) / f"Dataset{dataset_id:03d}_{name}"
    mapping: dict[str, list[str]] = {}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for c in cases:
            img = read_image(c.image)
            lab = read_label(c.label)
            check_label_grid(img, lab)
            # a single slice keeps its name unless import would read that as a volume's slice (a_s001 -> a)
            single = img.num_slices == 1 and not SLICE_SUFFIX.match(c.case_id)
            ids = [c.case_id] if single else [f"{c.case_id}_s{i:03d}" for i in range(img.num_slices)]
            for i, cid in enumerate(ids):
                save_slice_nifti(tmp / "imagesTr" / f"{cid}_0000.nii.gz", img.data[i].astype(np.float32), img.spacing,
                                 img.slice_thickness)
                save_slice_nifti(tmp / "labelsTr" / f"{cid}.nii.gz", lab.data[i], img.spacing, img.slice_thickness)
            mapping[c.case_id] = ids
        n = sum(len(v) for v in mapping.values())
        # the patient map travels with the cases, so nnU-Net's folds (and anyone else's) stay patient-level
        rows = io.StringIO()
        csv.writer(rows, lineterminator="\n").writerows([("case", "patient")] + [
            (i, c.patient) for c in cases for i in mapping[c.case_id]])
        atomic_write_text(tmp / PATIENT_MAP, rows.getvalue())
        meta = {"channel_names": {"0": "T2"}, "labels": dict(LABELS), "numTraining": n, "file_ending": ".nii.gz",
                "name": name, "description": "exported by spineseg; single-slice NIfTI, pixel spacing kept"}
        atomic_write_text(tmp / "dataset.json", json.dumps(meta, indent=2) + "\n")
        if splits is not None:
            nn_splits = []
            patient_of = {c.case_id: c.patient for c in cases}
            for s in splits:
                unknown = [c for k in ("train", "val", "test") for c in s.get(k, []) if c not in mapping]
                if unknown:
                    raise SpinesegError(f"splits name cases not in the data set: {unknown[:3]}", splits_source)
                held_out = s.get("test") or s["val"]
                train = [c for k in ("train", "val") for c in s[k] if c not in held_out]
                leaked = sorted({patient_of[c] for c in train} & {patient_of[c] for c in held_out})
                if leaked:
                    raise SpinesegError(f"split {len(nn_splits)}: patient {leaked[0]!r} is in both nnU-Net's train "
                                        "and its held-out cases: patient leakage", splits_source)
                nn_splits.append({"train": sorted(i for c in train for i in mapping[c]),
                                  "val": sorted(i for c in held_out for i in mapping[c])})
            atomic_write_text(tmp / "splits_final.json", json.dumps(nn_splits, indent=1) + "\n")
    return folder


def import_nnunet(pred_dir: str | Path, out: str | Path, name: str = "nnunet", overwrite: bool = False) -> Path:
    """Copy nnU-Net predictions into ``out/pred`` (slices of exported volumes re-joined) and write run.json."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise SpinesegError("nnU-Net prediction folder does not exist", pred_dir)
    files = sorted(p for p in pred_dir.iterdir() if p.name.endswith(".nii.gz"))
    if not files:
        raise SpinesegError("no .nii.gz predictions found", pred_dir)
    groups: dict[str, list[tuple[int, Path]]] = {}
    for f in files:
        stem = f.name[: -len(".nii.gz")]
        m = SLICE_SUFFIX.match(stem)
        case, idx = (m["case"], int(m["idx"])) if m else (stem, 0)
        groups.setdefault(case, []).append((idx, f))
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "pred").mkdir()
        for case, items in groups.items():
            items.sort()
            missing = sorted(set(range(items[-1][0] + 1)) - {i for i, _ in items})
            if missing:
                raise SpinesegError(f"case {case}: no prediction for slice {missing[0]:03d} "
                                    f"({case}_s{missing[0]:03d}.nii.gz) of its {items[-1][0] + 1}", pred_dir)
            labs = [read_label(f) for _, f in items]
            ref = labs[0]
            data = np.concatenate([lab.data for lab in labs], axis=0)
            _save_stack(tmp / "pred" / f"{case}.nii.gz", data, ref)
        atomic_write_text(tmp / "run.json", json.dumps({"name": name, "source": str(pred_dir.resolve()),
                                                        "cases": len(groups)}, indent=1) + "\n")
    return out


def _save_stack(path: Path, data: np.ndarray, ref) -> None:
    """Write display-convention slices ``(S, H, W)`` as one NIfTI ``(W, H, S)`` in L, P, S order."""
    from .images import save_nifti, slice_affine

    save_nifti(path, np.ascontiguousarray(np.transpose(data, (2, 1, 0))), slice_affine(ref.spacing, ref.slice_thickness))
