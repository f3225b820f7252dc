"""The main candidates for the shipped model, one row each, judged by the same six criteria (rules/C2.rule).

    python results/dixon-disc/candidates.py   ->  results/dixon-disc/candidates.csv (and a printed Markdown table)

Every figure comes from the run folders of this directory (``sanity.csv``, ``dixon.json``,
``phantom-test-summary.json``), through ``judge.judge``. Runs before C2 were judged by the rules of their own time;
the last column applies C2.rule's six criteria to every row alike, E2 (the shipped model) as the reference.
"""

import csv
from pathlib import Path

from judge import HELD_OUT, judge

HERE = Path(__file__).parent
CANDIDATES = {  # run -> what it is (details: README.md, "Runs", and rules/)
    "E2": "shipped before: self-training with the TUM01 disc list (no-body label)",
    "E3": "E2 trained 10 epochs more",
    "S3": "average of E3, E3s1, H",
    "C": "change term on the corrected pixels",
    "C3": "change term on body corrections only",
    "A1": "average of C2w, C3",
    "G": "random convolution on the phantom",
    "A7": "average of C2w, C3, C2g",
    "B": "positive slice label (all 17 vertebral TUM01 slices)",
    "N": "positive and negative slice labels",
    "L": "N plus the no-body term on labelled phantom slices",
    "K": "N with the positive label on the 10 core vertebral slices",
    "A10": "average of K and its seed 1",
    "A11": "average of K and its seeds 1 and 2",
    "KF": "K with left-right mirrored training slices",
    "LB-A11": "A11 with the lopsided-body post-processing step (reverted: it failed LB.rule on E2)",
    "KC": "K's recipe again, from A11",
    "WA": "shipped: average of E2 and A11 (WiSE-FT at 0.5)",
    "A13": "K's recipe with the canal's corrections in the change term (KV), three seeds averaged",
    "WV": "average of E2 and A13 (WA's construction with KV's seeds)",
}
COLUMNS = ("run", "what", "raw_of_197", "post_of_197", "both_laminae_post", "never_seen_raw_of_98",
           "heldout_discs_body_water_fat_inphase_of_8", "vertebral_dixon_slices_with_body_of_102",
           "phantom_dice_body", "fails_criteria")


def row(run: str) -> dict:
    crit = judge(run)
    values = list(crit.values())
    rows = list(csv.DictReader((HERE / run / "sanity.csv").open()))
    passing = [r for r in rows if r["order_post"] == "True"]
    discs = values[3][0]
    return {"run": run, "what": CANDIDATES[run], "raw_of_197": values[0][0], "post_of_197": len(passing),
            "both_laminae_post": sum(r["both_laminae_post"] == "True" for r in passing),
            "never_seen_raw_of_98": values[1][0],
            "heldout_discs_body_water_fat_inphase_of_8": " / ".join(str(discs[k]) for k in HELD_OUT),
            "vertebral_dixon_slices_with_body_of_102": sum(values[5][0].values()),
            "phantom_dice_body": round(values[4][0]["vertebral_body"], 3),
            "fails_criteria": ", ".join(name.split()[0] for name, (_, ok) in crit.items() if not ok) or "none"}


def main() -> None:
    table = [row(run) for run in CANDIDATES]
    with open(HERE / "candidates.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(table)
    print("| run | what | raw / post / both laminae (of 197) | never-seen raw (of 98) | held-out discs labelled body "
          "(water / fat / in-phase, of 8) | vertebral Dixon slices with a body (of 102) | phantom body Dice | "
          "fails (C2.rule) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['run']} | {r['what']} | {r['raw_of_197']} / {r['post_of_197']} / {r['both_laminae_post']} | "
              f"{r['never_seen_raw_of_98']} | {r['heldout_discs_body_water_fat_inphase_of_8']} | "
              f"{r['vertebral_dixon_slices_with_body_of_102']} | {r['phantom_dice_body']} | {r['fails_criteria']} |")


if __name__ == "__main__":
    main()
