"""The self-training comparison table: python results/self-training/summarise.py -> summary.json

Reads each run's sanity.csv (written by `spineseg sanity`) and phantom-test/summary.json (written by
`spineseg evaluate`) in the folders below, and splits the clinical slices into those the runs saw
unlabelled in training (`with_pain`) and those they never saw (`without_pain`).
"""

import csv
import json
from pathlib import Path

HERE = Path(__file__).parent
RUNS = ("F2", "C", "P", "P2")
SETS = ("clinical_seen", "clinical_held_out", "TUM01_water", "TUM02_water", "TUM01_fat", "TUM02_fat",
        "TUM01_inphase", "TUM02_inphase")


def _set(row: dict) -> str:
    if row["input"] == "axial-clinical":
        return "clinical_seen" if "with_pain" in row["source"] else "clinical_held_out"
    return row["input"].replace("_img_img_L2-L5", "").replace("_L2-L5", "")


def _counts(rows: list[dict]) -> dict:
    post = [r for r in rows if r["order_post"] == "True"]
    return {"slices": len(rows), "order_raw": sum(r["order_raw"] == "True" for r in rows), "order_post": len(post),
            "both_laminae_post": sum(r["both_laminae_post"] == "True" for r in post),
            "no_body_post": sum(r["body_found_post"] != "True" for r in post)}


def main() -> None:
    out = {}
    for run in RUNS:
        with open(HERE / run / "sanity.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        sets = {s: _counts([r for r in rows if _set(r) == s]) for s in SETS}
        sets["unseen"] = _counts([r for r in rows if _set(r) in ("clinical_held_out", "TUM02_water", "TUM02_fat",
                                                                  "TUM02_inphase")])
        sets["all"] = _counts(rows)
        phantom = json.loads((HERE / run / "phantom-test" / "summary.json").read_text())
        dice = {k: round(v["dice"], 4) for k, v in phantom["structures"].items()}
        out[run] = {"sanity": sets, "phantom_test_dice": dice,
                    "phantom_test_body_correctly_absent": phantom["structures"]["vertebral_body"]["skipped_absent_both"]}
    (HERE / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    for run in RUNS:
        s = out[run]["sanity"]
        print(run, " ".join(f"{k}:{v['order_raw']}/{v['order_post']}/{v['both_laminae_post']}" for k, v in s.items()))


if __name__ == "__main__":
    main()
