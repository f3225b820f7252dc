"""Collect every comparison row's real-scan sanity figures into one table.

python results/phantom-cpu/real/summarise.py  ->  results/phantom-cpu/real/real_sanity.csv and .md

Each ``real/<model>/sanity.json`` was written by ``spineseg sanity`` (command in ../README.md).
"""

import csv
import json
from pathlib import Path

HERE = Path(__file__).parent
SETS = {"axial-clinical": "clinical", "TUM01_water_img_img_L2-L5": "TUM01 water",
        "TUM02_water_img_img_L2-L5": "TUM02 water", "TUM01_fat_img_img_L2-L5": "TUM01 fat",
        "TUM02_fat_img_img_L2-L5": "TUM02 fat"}


def main() -> None:
    order = json.loads((HERE.parent / "experiment.json").read_text())["models"]
    rows = []
    for model in order:
        f = HERE / model / "sanity.json"
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        for key, label in [*SETS.items(), ("overall", "all")]:
            s = d["overall"] if key == "overall" else d["inputs"][key]
            for kind in ("raw", "post"):
                rows.append({"model": model, "set": label, "kind": kind, "slices": s["slices"],
                             "order_pass": s[kind]["order_pass"],
                             "order_percent": round(100 * s[kind]["order_fraction"], 1),
                             "both_laminae_of_passing": s[kind]["both_laminae_of_passing"]})
    with (HERE / "real_sanity.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    labels = [*SETS.values(), "all"]
    lines = ["| model | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for label in labels:
            raw, post = (next(r for r in rows if r["model"] == model and r["set"] == label and r["kind"] == k)
                         for k in ("raw", "post"))
            cells.append(f"{raw['order_percent']:.0f} / {post['order_percent']:.0f}")
        lines.append(f"| `{model}` | " + " | ".join(cells) + " |")
    note = "\n\nAnatomical order, % of slices passing: raw / post-processed (anatomical).\n"
    (HERE / "real_sanity.md").write_text("\n".join(lines) + note)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
