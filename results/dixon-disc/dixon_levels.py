"""Disc level or vertebra? The fat fraction of a Dixon pair tells, independently of any segmentation model.

Vertebral marrow holds fat (fat fraction about 0.25-0.40 in these volunteers); an intervertebral disc holds
almost none (below 0.10). On slices of a two-point Dixon volume, the median fat fraction
fat / (water + fat) inside the region a model calls "vertebral body" therefore says whether that region is
a vertebral body or a disc the model took for one. This gives real, model-independent evidence on the
failure the phantom test shows (the disc labelled as body) without any hand labels.

    # 1. each slice's level, from one reference model's body region on the water image
    python results/dixon-disc/dixon_levels.py levels --model MODEL --out results/dixon-disc/levels.csv
    # 2. the disc-level slices of the training volume (TUM01) as a --unlabeled-no-body list (`body`: the
    #    vertebra-level slices, as a --unlabeled-body list; `body --core`: only those whose neighbours are both
    #    vertebra-level too, away from the end plates)
    python results/dixon-disc/dixon_levels.py no-body --levels results/dixon-disc/levels.csv \
        --subjects TUM01 [--kinds water fat inphase] --out results/dixon-disc/no_body_TUM01.csv
    # 3. how often a model labels a disc as body, and finds the body at vertebral levels
    python results/dixon-disc/dixon_levels.py score --model MODEL --levels results/dixon-disc/levels.csv \
        --inphase runs/inphase --out results/dixon-disc/score_NAME.json
    # 4. marrow signal on the water and fat images, relative to fat and CSF (what the phantom's Dixon marrow
    #    was set against in run M)
    python results/dixon-disc/dixon_levels.py marrow --model pretrained --levels results/dixon-disc/levels.csv \
        --out results/dixon-disc/marrow_signal.json

Levels (``levels.csv``): ``disc`` where the reference body region's median fat fraction is below 0.15,
``vertebra`` at 0.22 or above, ``partial`` between (end plates, partial volume), ``unknown`` where the
reference model found no body. The thresholds sit in the gap between the two groups of the measured
values (discs 0.04-0.13, vertebral bodies 0.23-0.40 in TUM01 and TUM02; see levels.csv).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

DIXON = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata" / "axial-unlabeled"
SUBJECTS = ("TUM01", "TUM02")
DISC_BELOW, VERTEBRA_FROM = 0.15, 0.22
MIN_BODY_PX = 50


def _images(dixon: Path, subject: str):
    from spineseg.io.images import read_image

    water = read_image(dixon / f"{subject}_water_img_img_L2-L5.nii.gz")
    fat = read_image(dixon / f"{subject}_fat_img_img_L2-L5.nii.gz")
    if water.data.shape != fat.data.shape:
        raise SystemExit(f"{subject}: water and fat images differ in shape")
    return water, fat


def fat_fraction(water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """Smoothed fat fraction (a 1-pixel Gaussian on both signals keeps noise from deciding)."""
    w, f = ndi.gaussian_filter(water, (0, 1, 1)), ndi.gaussian_filter(fat, (0, 1, 1))
    return f / np.maximum(w + f, 1e-3 * float(np.max(w + f)))


def levels(a) -> None:
    from spineseg.infer.predict import Predictor

    predictor = Predictor(a.model, device="cpu", batch_size=4)
    rows = []
    for subject in SUBJECTS:
        water, fat = _images(a.dixon, subject)
        ff = fat_fraction(water.data, fat.data)
        _, post = predictor.predict_both(water)
        for s in range(water.num_slices):
            body = post[s] == 1
            value = float(np.median(ff[s][body])) if body.sum() >= MIN_BODY_PX else None
            level = ("unknown" if value is None else "disc" if value < DISC_BELOW
                     else "vertebra" if value >= VERTEBRA_FROM else "partial")
            rows.append({"subject": subject, "slice": s, "body_fat_fraction": "" if value is None else round(value, 3),
                         "level": level})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w", newline="") as fh:
        fh.write(f"# reference model sha256 {predictor.sha256}; body region on the water image, post-processed\n")
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    for subject in SUBJECTS:
        print(subject, " ".join(r["level"][0] for r in rows if r["subject"] == subject))


def _read_levels(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"dixon_levels.py: error: {path}: no such levels file (write one with the 'levels' command)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    missing = {"subject", "slice", "level"} - set(rows[0] if rows else ())
    if missing:
        raise SystemExit(f"dixon_levels.py: error: {path}: not a levels file (no rows, or no column {sorted(missing)})")
    return rows


def no_body(a) -> None:
    _slice_list(a, "disc")


def body(a) -> None:
    _slice_list(a, "vertebra")


def _slice_list(a, level: str) -> None:
    """The slices of ``level`` of a.subjects, for each of a.kinds, as a train --unlabeled-no-body / --unlabeled-body
    CSV; with ``a.core``, only those whose two neighbouring slices are of ``level`` too."""
    every = _read_levels(a.levels)
    at = {(r["subject"], int(r["slice"])): r["level"] for r in every}
    rows = [r for r in every if r["subject"] in a.subjects and r["level"] == level]
    if getattr(a, "core", False):
        rows = [r for r in rows if all(at.get((r["subject"], int(r["slice"]) + d)) == level for d in (-1, 1))]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    names = {"water": "{}_water_img_img_L2-L5.nii.gz", "fat": "{}_fat_img_img_L2-L5.nii.gz",
             "inphase": "{}_inphase_L2-L5.nii.gz"}
    with open(a.out, "w", newline="") as fh:
        fh.write("image,slice\n")
        for r in rows:
            for kind in a.kinds:
                fh.write(f"{names[kind].format(r['subject'])},{r['slice']}\n")
    print(f"{len(rows)} {level}-level slices x ({', '.join(a.kinds)}) -> {a.out}")


def score(a) -> None:
    from spineseg.infer.predict import Predictor
    from spineseg.io.images import read_image

    ref = {(r["subject"], int(r["slice"])): r["level"] for r in _read_levels(a.levels)}
    predictor = Predictor(a.model, device="cpu", batch_size=4)
    out = {"model_sha256": predictor.sha256, "levels": str(a.levels), "images": {}}
    for subject in SUBJECTS:
        water, fat = _images(a.dixon, subject)
        ff = fat_fraction(water.data, fat.data)
        images = {"water": water, "fat": fat}
        if a.inphase:
            images["inphase"] = read_image(a.inphase / f"{subject}_inphase_L2-L5.nii.gz")
        for kind, image in images.items():
            raw, post = predictor.predict_both(image)
            counts = {"disc_slices": 0, "disc_labelled_body": 0, "vertebra_slices": 0, "vertebra_body_found": 0,
                      "vertebra_body_is_marrow": 0}
            for s in range(image.num_slices):
                level = ref[(subject, s)]
                body = post[s] == 1
                found = body.sum() >= MIN_BODY_PX
                if level == "disc":
                    counts["disc_slices"] += 1
                    counts["disc_labelled_body"] += int(found)
                elif level == "vertebra":
                    counts["vertebra_slices"] += 1
                    counts["vertebra_body_found"] += int(found)
                    counts["vertebra_body_is_marrow"] += int(found and np.median(ff[s][body]) >= VERTEBRA_FROM)
            out["images"][f"{subject}_{kind}"] = counts
            print(subject, kind, counts)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")


def marrow(a) -> None:
    """Median marrow signal at vertebra-level slices: on the fat image relative to fat (pixels with fat fraction
    above 0.9 and a total signal above the volume's 60th percentile: subcutaneous and paraspinal fat), on the
    water image relative to CSF (the 90th percentile of the water signal inside the canal label)."""
    from spineseg.infer.predict import Predictor

    predictor = Predictor(a.model, device="cpu", batch_size=4)
    rows = _read_levels(a.levels)
    out = {"model_sha256": predictor.sha256, "levels": str(a.levels), "subjects": {}}
    for subject in SUBJECTS:
        water, fat = _images(a.dixon, subject)
        ff = fat_fraction(water.data, fat.data)
        total = water.data + fat.data
        fat_ref = float(np.median(fat.data[(ff > 0.9) & (total > np.percentile(total, 60))]))
        _, post = predictor.predict_both(water)
        vertebra = [int(r["slice"]) for r in rows if r["subject"] == subject and r["level"] == "vertebra"]
        fat_rel, water_rel, marrow_ff = [], [], []
        for s in vertebra:
            body = ndi.binary_erosion(post[s] == 1, iterations=2)
            canal = post[s] == 2
            if body.sum() < MIN_BODY_PX or not canal.any():
                continue
            csf = float(np.percentile(water.data[s][canal], 90))
            fat_rel.append(float(np.median(fat.data[s][body])) / fat_ref)
            water_rel.append(float(np.median(water.data[s][body])) / csf)
            marrow_ff.append(float(np.median(ff[s][body])))
        out["subjects"][subject] = {
            "vertebra_slices": len(fat_rel),
            "fat_image_marrow_over_fat": [round(float(np.percentile(fat_rel, q)), 3) for q in (10, 50, 90)],
            "water_image_marrow_over_csf": [round(float(np.percentile(water_rel, q)), 3) for q in (10, 50, 90)],
            "marrow_fat_fraction": [round(float(np.percentile(marrow_ff, q)), 3) for q in (10, 50, 90)],
        }
        print(subject, out["subjects"][subject])
    out["note"] = "each list: 10th, 50th and 90th percentile over the subject's vertebra-level slices"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dixon", type=Path, default=DIXON, help="folder of the *_water_img / *_fat_img volumes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("levels")
    p.add_argument("--model", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=levels)
    for name, func in (("no-body", no_body), ("body", body)):
        p = sub.add_parser(name)
        p.add_argument("--levels", type=Path, required=True)
        p.add_argument("--subjects", nargs="+", default=["TUM01"])
        p.add_argument("--kinds", nargs="+", choices=["water", "fat", "inphase"], default=["water", "fat"],
                       help="which images of each subject the list names (in-phase: dixon_inphase.py's file names)")
        p.add_argument("--out", type=Path, required=True)
        if name == "body":
            p.add_argument("--core", action="store_true",
                           help="only slices whose two neighbours are vertebra-level too (no end-plate slices)")
        p.set_defaults(func=func)
    p = sub.add_parser("score")
    p.add_argument("--model", required=True)
    p.add_argument("--levels", type=Path, required=True)
    p.add_argument("--inphase", type=Path, default=None, help="folder of dixon_inphase.py's volumes")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=score)
    p = sub.add_parser("marrow")
    p.add_argument("--model", required=True)
    p.add_argument("--levels", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=marrow)
    a = ap.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
