"""Patient-level splits, written in nnU-Net's splits_final.json shape (plus a "test" list)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import SpinesegError
from ..io.atomic import atomic_write_text


def group_by_patient(cases) -> "OrderedDict[str, list[str]]":
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for c in cases:
        groups.setdefault(c.patient, []).append(c.case_id)
    return groups


def _expand(groups, patients):
    return sorted(cid for p in patients for cid in groups[p])


def kfold_splits(cases, folds: int = 5, val_fraction: float = 0.1, seed: int = 12345) -> list[dict]:
    """``folds`` folds over patients; each fold's training patients give ``val_fraction`` to validation."""
    groups = group_by_patient(cases)
    patients = sorted(groups)
    if len(patients) < folds:
        raise SpinesegError(f"{len(patients)} patients cannot make {folds} folds")
    rng = np.random.default_rng(seed)
    order = [patients[i] for i in rng.permutation(len(patients))]
    chunks = [order[i::folds] for i in range(folds)]
    out = []
    for k in range(folds):
        test = chunks[k]
        rest = [p for j, c in enumerate(chunks) if j != k for p in c]
        n_val = max(1, int(round(val_fraction * len(rest)))) if len(rest) > 1 else 0
        val, train = rest[:n_val], rest[n_val:]
        out.append({"train": _expand(groups, train), "val": _expand(groups, val), "test": _expand(groups, test)})
    return out


def paper_splits(cases, repeats: int = 5, fractions=(0.6, 0.1, 0.3)) -> list[dict]:
    """The paper's protocol: ``repeats`` random 60/10/30 patient splits with seeds 0..repeats-1."""
    groups = group_by_patient(cases)
    patients = sorted(groups)
    if len(patients) < 3:
        raise SpinesegError(f"{len(patients)} patients cannot make a train/val/test split")
    out = []
    for seed in range(repeats):
        rng = np.random.default_rng(seed)
        order = [patients[i] for i in rng.permutation(len(patients))]
        n = len(order)
        n_test = max(1, int(round(fractions[2] * n)))
        n_val = max(1, int(round(fractions[1] * n)))
        test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
        if not train:
            raise SpinesegError(f"{n} patients leave no training patients in a 60/10/30 split")
        out.append({"train": _expand(groups, train), "val": _expand(groups, val), "test": _expand(groups, test)})
    return out


def make_splits(cases, scheme: str = "kfold", **kw) -> list[dict]:
    if scheme == "kfold":
        return kfold_splits(cases, **kw)
    if scheme == "paper":
        return paper_splits(cases, **kw)
    raise SpinesegError(f"unknown split scheme {scheme!r} (kfold or paper)")


def write_splits(path: str | Path, splits: list[dict]) -> None:
    atomic_write_text(path, json.dumps(splits, indent=1) + "\n")


def load_splits(path: str | Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise SpinesegError("not a text file (a splits.json was expected)", path) from None
    except (OSError, ValueError) as exc:
        raise SpinesegError(f"cannot read splits file ({exc})", path) from None
    ok = isinstance(data, list) and data and all(
        isinstance(d, dict) and "train" in d and "val" in d and set(d) <= set(SUBSETS)
        and all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in d.values()) for d in data)
    if not ok:
        raise SpinesegError("not a splits file: expected a list of {train, val[, test]} lists of case ids", path)
    return data


SUBSETS = ("train", "val", "test")


def check_splits(splits: list[dict], cases, source: str | Path | None = None) -> None:
    """Refuse splits that name unknown cases or put one patient (or case) in two subsets of a fold."""
    patient_of = {c.case_id: c.patient for c in cases}
    for k, fold in enumerate(splits):
        seen: dict[str, str] = {}
        for subset in SUBSETS:
            for cid in fold.get(subset, []):
                if cid not in patient_of:
                    raise SpinesegError(f"fold {k}: case {cid!r} ({subset}) is not in the data set", source)
                patient = patient_of[cid]
                other = seen.setdefault(patient, subset)
                if other != subset:
                    raise SpinesegError(f"fold {k}: patient {patient!r} is in both {other} and {subset} "
                                        f"(e.g. case {cid}): patient leakage", source)
