"""Which classes the change term's pixels are: what self-training's post-processing corrects on the unlabelled slices.

    python results/dixon-disc/change_classes.py --model MODEL --out FILE

On every unlabelled slice of the shipped model's last stage (the 12 `with_pain` clinical slices, TUM01 water, fat and
in-phase; `--unlabeled-no-body` slices left out, as the change term leaves them out), plain or through the
training augmentation (`--augment PASSES`): the
model's raw arg-max, the self-training target (`pseudo_labels`, confidence 0.9, change limit 0.05) and, for the
accepted slices, the changed pixels counted by (raw class -> corrected class), with the area of the raw region each
changed pixel belonged to (a speck or a piece). Writes JSON. Raw regions are 4-connected here (SciPy's default),
while the change term's area limit (`in_small_regions`) uses 8-connected ones: a diagonal chain of specks counts as
several small regions here and as one there. The committed JSON files were written this way.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from spineseg import STRUCTURES
from spineseg.models.checkpoint import load_checkpoint, load_model, resolve_checkpoint
from spineseg.data.augment import AugmentConfig
from spineseg.data.dataset import make_loader
from spineseg.preprocess.pipeline import PreprocessCache, PreprocessConfig
from spineseg.train.config import resolve_config
from spineseg.train.data import load_unlabeled, read_slice_list, unlabeled_cases
from spineseg.train.selftrain import IGNORE, pseudo_labels

U = Path("../shared/realdata/axial-unlabeled")
UNLABELED = ["runs/unl", U / "TUM01_water_img_img_L2-L5.nii.gz", U / "TUM01_fat_img_img_L2-L5.nii.gz",
             "runs/inphase/TUM01_inphase_L2-L5.nii.gz"]
NAMES = ("background",) + STRUCTURES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--augment", type=int, default=0, metavar="PASSES",
                    help="draw the slices through cpu-quick's training augmentation this many times instead of once plain")
    a = ap.parse_args()
    ck = load_checkpoint(resolve_checkpoint(a.model))
    net = load_model(ck).eval()
    pp = PreprocessConfig(**ck["preprocess"])
    cases = unlabeled_cases(UNLABELED)
    no_body = read_slice_list("results/dixon-disc/no_body_TUM01_inphase.csv", cases)
    recs = load_unlabeled(cases, 0.6875, pp, PreprocessCache(None), False)
    recs = [r for r in recs if (r.case_id, r.index) not in no_body]
    if a.augment:
        augment = AugmentConfig.from_dict(resolve_config("spineseg", "cpu-quick")["augment"])
        batches = [b for e in range(a.augment) for b in make_loader(recs, 1, False, augment, seed=0, epoch=e)]
    else:
        batches = list(make_loader(recs, 1, False))
    pairs, areas, accepted, used = {}, {}, 0, 0
    for b in batches:
        used += 1
        with torch.no_grad():
            probs = torch.softmax(net(b["image"]).float(), 1)
        spacing = b["spacing"].reshape(1, 2)
        target, ok = pseudo_labels(probs, spacing, 0.9, 0.05)
        if not ok:
            continue
        accepted += 1
        raw, t = probs.argmax(1)[0].numpy(), target[0].numpy()
        changed = (t != IGNORE) & (t != raw)
        px_mm2 = float(spacing[0, 0] * spacing[0, 1])
        for c in range(4):
            lab, _ = ndi.label(raw == c)
            sizes = np.bincount(lab.ravel())
            sel = changed & (raw == c)
            for d in range(4):
                m = sel & (t == d)
                if m.any():
                    key = f"{NAMES[c]} -> {NAMES[d]}"
                    pairs[key] = pairs.get(key, 0) + int(m.sum())
                    areas.setdefault(key, []).extend((sizes[lab[m]] * px_mm2).tolist())
    out = {"model": a.model, "augment_passes": a.augment, "slices": used, "accepted": accepted,
           "changed_pixels": dict(sorted(pairs.items(), key=lambda kv: -kv[1])),
           "raw_region_area_mm2_median": {k: float(np.median(v)) for k, v in areas.items()},
           "changed_pixels_in_raw_regions_under_50_mm2": {k: int((np.asarray(v) < 50).sum()) for k, v in areas.items()}}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
