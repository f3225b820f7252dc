"""The six criteria of rules/C2.rule (also used by C2w, C3, C4 and A), for run folders of this directory.

    python results/dixon-disc/judge.py C3 A1 A2

Reads each folder's ``sanity.csv``, ``dixon.json`` and ``phantom-test-summary.json`` (as ``summarise.py``) and prints
every criterion's figure and whether it is met, relative to E2's figures (read from its folder), as the rule says.
"""

import csv
import json
import sys
from pathlib import Path

from summarise import _set

HERE = Path(__file__).parent
REFERENCE = "E2"  # the shipped model, whose figures the criteria are relative to
HELD_OUT = ("TUM02_water", "TUM02_fat", "TUM02_inphase")


def _dixon(run: str) -> dict:
    return json.loads((HERE / run / "dixon.json").read_text())["images"]


def _dice(run: str) -> dict:
    return {k: v["dice"] for k, v in json.loads((HERE / run / "phantom-test-summary.json").read_text())["structures"].items()}


def judge(run: str) -> dict:
    folder = HERE / run
    rows = list(csv.DictReader((folder / "sanity.csv").open()))
    yes = lambda r, k: r[k] == "True"
    never = [r for r in rows if _set(r).startswith("TUM02") or "without_pain" in r["source"]]
    sets = {}
    for r in rows:
        sets.setdefault(_set(r), []).append(r)
    per_set = {}
    for name, part in sets.items():
        passing = [r for r in part if yes(r, "order_post")]
        per_set[name] = (len(passing) / len(part), sum(yes(r, "both_laminae_post") for r in passing) / max(len(passing), 1))
    dixon, dice = _dixon(run), _dice(run)
    ref_dixon, ref_dice = _dixon(REFERENCE), {k: round(v, 3) for k, v in _dice(REFERENCE).items()}
    disc_limit = {k: ref_dixon[k]["disc_labelled_body"] + 1 for k in HELD_OUT}  # at most one more than E2
    ref_bodies = {k: v["vertebra_body_found"] for k, v in ref_dixon.items()}
    crit = {
        "1 raw >= 164": (sum(yes(r, "order_raw") for r in rows), sum(yes(r, "order_raw") for r in rows) >= 164),
        "2 never-seen raw >= 80": (sum(yes(r, "order_raw") for r in never), sum(yes(r, "order_raw") for r in never) >= 80),
        "3 post >= 95 %, both laminae >= 85 %": (
            {k: f"{p:.0%}/{b:.0%}" for k, (p, b) in per_set.items()},
            all(p >= 0.95 and b >= 0.85 for p, b in per_set.values())),
        "4 held-out discs labelled body": ({k: dixon[k]["disc_labelled_body"] for k in disc_limit},
                                           all(dixon[k]["disc_labelled_body"] <= v for k, v in disc_limit.items())),
        "5 phantom Dice within 0.01 of E2": ({k: round(v, 3) for k, v in dice.items()},
                                             all(dice[k] >= v - 0.01 for k, v in ref_dice.items())),
        "6 vertebral slices with a body >= E2 - 1": ({k: dixon[k]["vertebra_body_found"] for k in ref_bodies},
                                                     all(dixon[k]["vertebra_body_found"] >= v - 1
                                                         for k, v in ref_bodies.items())),
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
