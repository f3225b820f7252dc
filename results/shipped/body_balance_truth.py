"""Body balance (``spineseg.anatomy.order``) of a phantom's true label maps: how even a whole body sits about the
canal's midline, which ``spineseg sanity`` calls lopsided below ``LOPSIDED_BODY``.

    spineseg phantom --out runs/ph120d --patients 120 --slices-per-patient 4 --randomize --seed 2
    python results/shipped/body_balance_truth.py --data runs/ph120d --out results/shipped/body_balance_truth.json
"""

import argparse
import json
from pathlib import Path

import numpy as np

from spineseg.anatomy.order import LOPSIDED_BODY, check_slice
from spineseg.eval.sanity import plane_to_world
from spineseg.io.images import read_label


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a phantom folder (labelsTr/)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    values = []
    for f in sorted((Path(a.data) / "labelsTr").glob("*.nii.gz")):
        lab = read_label(f)
        for i, labels in enumerate(lab.data):
            b = check_slice(labels, plane_to_world(lab, i))["body_balance"]
            if b is not None:
                values.append(b)
    out = {"data": str(a.data), "slices_with_body": len(values), "min": min(values),
           "percentile_1": float(np.percentile(values, 1)), "median": float(np.median(values)),
           "below_lopsided": sum(v < LOPSIDED_BODY for v in values), "lopsided_below": LOPSIDED_BODY}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()
