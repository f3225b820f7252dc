"""Do the onnx and torch engines give the shipped model the same sanity results on the real slices?

    spineseg sanity --model pretrained --engine torch ... --out runs/sanity-torch   # same inputs as sanity/
    python results/shipped/compare_engines.py --onnx results/shipped/sanity --torch runs/sanity-torch \
        --out results/shipped/engine_agreement.json

Compares the two sanity.csv files row by row: the verdicts (order raw / post, both laminae, body found),
each slice whose verdicts differ (with both engines' reasons), and the largest difference of any area
(where, and the two values).
"""

import argparse
import csv
import json
from pathlib import Path

VERDICTS = ("order_raw", "order_post", "both_laminae_raw", "both_laminae_post", "body_found_raw", "body_found_post")


def rows(folder: Path) -> list[dict]:
    with (folder / "sanity.csv").open() as f:
        return list(csv.DictReader(f))


def compare(onnx: Path, torch: Path) -> dict:
    a, b = rows(onnx), rows(torch)
    keys = [(r["input"], r["source"], r["slice"]) for r in a]
    if keys != [(r["input"], r["source"], r["slice"]) for r in b]:
        raise SystemExit("the two sanity runs did not see the same slices")
    areas = [k for k in a[0] if k.startswith("area_") and "warning" not in k]
    changed = [(x, y, [v for v in VERDICTS if x[v] != y[v]]) for x, y in zip(a, b)]
    differ = {v: sum(v in vs for _, _, vs in changed) for v in VERDICTS}
    slices = [{"input": x["input"], "source": x["source"], "slice": int(x["slice"]),
               **{v: {"onnx": x[v], "torch": y[v]} for v in vs},
               "reason_raw": {"onnx": x["reason_raw"], "torch": y["reason_raw"]}}
              for x, y, vs in changed if vs]
    gap = max(((abs(float(x[k] or 0) - float(y[k] or 0)), x, y, k) for x, y in zip(a, b) for k in areas),
              key=lambda t: t[0])
    engines = [json.loads((d / "sanity.json").read_text()).get("engine") for d in (onnx, torch)]
    return {"slices": len(a), "engines": engines, "verdicts_that_differ": differ, "slices_that_differ": slices,
            "max_area_difference_mm2": round(gap[0], 2),
            "max_area_difference_at": {"input": gap[1]["input"], "slice": int(gap[1]["slice"]), "area": gap[3],
                                       "onnx": float(gap[1][gap[3]] or 0), "torch": float(gap[2][gap[3]] or 0)}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, required=True)
    ap.add_argument("--torch", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    result = compare(a.onnx, a.torch)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
