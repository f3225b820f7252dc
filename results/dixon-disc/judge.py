"""The six criteria of rules/C2.rule (also used by C2w, C3, C4 and A), for run folders of this directory.

    python results/dixon-disc/judge.py C3 A1 A2

Reads each folder's ``sanity.csv``, ``dixon.json`` and ``phantom-test-summary.json`` (as ``summarise.py``) and prints
every criterion's figure and whether it is met; E2's figures are the reference the rule names.
"""

import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
E2_DICE = {"vertebral_body": 0.892, "vertebral_foramen": 0.895, "lamina": 0.936}
DISC_LIMIT = {"TUM02_water": 3, "TUM02_fat": 1, "TUM02_inphase": 2}  # held-out discs labelled body, at most
E2_BODIES = {"TUM01_water": 17, "TUM01_fat": 16, "TUM01_inphase": 14, "TUM02_water": 17, "TUM02_fat": 16,
             "TUM02_inphase": 15}


def _set(row: dict) -> str:
    return "clinical" if row["input"] == "axial-clinical" else row["input"].replace("_img_img_L2-L5", "").replace("_L2-L5", "")


def judge(run: str) -> dict:
    folder = HERE / run
    rows = list(csv.DictReader((folder / "sanity.csv").open()))
    yes = lambda r, k: r[k] == "True"  # noqa: E731
    never = [r for r in rows if _set(r).startswith("TUM02") or "without_pain" in r["source"]]
    sets = {}
    for r in rows:
        sets.setdefault(_set(r), []).append(r)
    per_set = {}
    for name, part in sets.items():
        passing = [r for r in part if yes(r, "order_post")]
        per_set[name] = (len(passing) / len(part), sum(yes(r, "both_laminae_post") for r in passing) / max(len(passing), 1))
    dixon = json.loads((folder / "dixon.json").read_text())["images"]
    dice = {k: v["dice"] for k, v in json.loads((folder / "phantom-test-summary.json").read_text())["structures"].items()}
    crit = {
        "1 raw >= 164": (sum(yes(r, "order_raw") for r in rows), sum(yes(r, "order_raw") for r in rows) >= 164),
        "2 never-seen raw >= 80": (sum(yes(r, "order_raw") for r in never), sum(yes(r, "order_raw") for r in never) >= 80),
        "3 post >= 95 %, both laminae >= 85 %": (
            {k: f"{p:.0%}/{b:.0%}" for k, (p, b) in per_set.items()},
            all(p >= 0.95 and b >= 0.85 for p, b in per_set.values())),
        "4 held-out discs labelled body": ({k: dixon[k]["disc_labelled_body"] for k in DISC_LIMIT},
                                           all(dixon[k]["disc_labelled_body"] <= v for k, v in DISC_LIMIT.items())),
        "5 phantom Dice within 0.01 of E2": ({k: round(v, 3) for k, v in dice.items()},
                                             all(dice[k] >= v - 0.01 for k, v in E2_DICE.items())),
        "6 vertebral slices with a body >= E2 - 1": ({k: dixon[k]["vertebra_body_found"] for k in E2_BODIES},
                                                     all(dixon[k]["vertebra_body_found"] >= v - 1
                                                         for k, v in E2_BODIES.items())),
    }
    return crit


def main() -> None:
    for run in sys.argv[1:]:
        crit = judge(run)
        print(f"{run}: {'meets all six' if all(ok for _, ok in crit.values()) else 'fails'}")
        for name, (figure, ok) in crit.items():
            print(f"  {'ok  ' if ok else 'FAIL'} {name}: {figure}")


if __name__ == "__main__":
    main()
