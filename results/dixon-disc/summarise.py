"""One table from the runs of this folder: real-scan sanity per set, the Dixon disc-level score, the phantom test.

    python results/dixon-disc/summarise.py   ->  results/dixon-disc/summary.json (and a printed table)

Each run folder holds three checks of one model, made with the commands in README.md ("Runs"):
``sanity.csv`` (``spineseg sanity``, default settings, the seven real inputs), ``dixon.json``
(``dixon_levels.py score``) and the phantom test's ``phantom-test-summary.json`` /
``phantom-test-by_position.json`` (``spineseg predict`` then ``spineseg evaluate``).
"""

import csv
import json
from pathlib import Path

HERE = Path(__file__).parent
RUNS = ("P2", "P3", "D", "D2", "E", "E2", "E3", "E3s1", "H", "Hs1", "S3", "M", "W", "T", "C", "C2p", "E3p", "E3pf", "C2w", "C3", "A1", "A2", "A3", "C4", "R3", "R2w", "A4", "A5", "C3s1", "G", "C2g", "A6", "A7", "B", "N", "Ns1", "A8", "A9", "L", "K", "Ks1", "A10", "Ks2", "A11", "KF", "LB-E2old", "LB-E2", "LB-A11", "KC", "WA", "A13", "WV")
SETS = ("clinical", "TUM01_water", "TUM02_water", "TUM01_fat", "TUM02_fat", "TUM01_inphase", "TUM02_inphase")


def _set(row: dict) -> str:
    return "clinical" if row["input"] == "axial-clinical" else row["input"].replace("_img_img_L2-L5", "").replace("_L2-L5", "")


def main() -> None:
    out = {}
    for run in RUNS:
        folder = HERE / run
        if not (folder / "sanity.csv").is_file():
            continue
        rows = list(csv.DictReader((folder / "sanity.csv").open()))
        sanity = {}
        for name in SETS + ("all",):
            part = [r for r in rows if name == "all" or _set(r) == name]
            passing = [r for r in part if r["order_post"] == "True"]
            sanity[name] = {"slices": len(part), "raw": sum(r["order_raw"] == "True" for r in part),
                            "post": len(passing), "both_laminae_post": sum(r["both_laminae_post"] == "True" for r in passing)}
        dixon = json.loads((folder / "dixon.json").read_text())["images"]
        phantom = json.loads((folder / "phantom-test-summary.json").read_text())["structures"]
        disc = json.loads((folder / "phantom-test-by_position.json").read_text())["disc"]
        out[run] = {"sanity": sanity, "dixon": dixon,
                    "phantom_dice": {k: round(v["dice"], 3) for k, v in phantom.items()},
                    "phantom_disc_slices_with_a_body": disc.get("vertebral_body", {}).get("slices", 0)}
    (HERE / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    print("run  " + " ".join(f"{s:>14}" for s in SETS + ("all",)) + "   (raw/post/both laminae)")
    for run, r in out.items():
        print(f"{run:<4} " + " ".join(f"{'/'.join(str(r['sanity'][s][k]) for k in ('raw', 'post', 'both_laminae_post')):>14}"
                                      for s in SETS + ("all",)))
    print("\nrun  disc slices labelled body: TUM01 water, in-phase; TUM02 water, in-phase, fat    vertebra slices with a body (same)")
    for run, r in out.items():
        d = r["dixon"]
        disc = " ".join(f"{d[k]['disc_labelled_body']}/{d[k]['disc_slices']}" for k in
                        ("TUM01_water", "TUM01_inphase", "TUM02_water", "TUM02_inphase", "TUM02_fat"))
        vert = " ".join(f"{d[k]['vertebra_body_found']}/{d[k]['vertebra_slices']}" for k in
                        ("TUM01_water", "TUM01_inphase", "TUM02_water", "TUM02_inphase", "TUM02_fat"))
        print(f"{run:<4} {disc:<40} {vert}   phantom Dice {r['phantom_dice']}, disc-level slices with a body "
              f"{r['phantom_disc_slices_with_a_body']}/22")


if __name__ == "__main__":
    main()
