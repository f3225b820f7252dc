"""Phantom test Dice of the shipped model by slice position (disc, endplate, infrapedicular, pedicle).

python results/shipped/by_position.py  ->  results/shipped/phantom-test/by_position.json

Reads phantom-test/per_slice.csv (written by ``spineseg evaluate``) and phantom-test/cases.csv (the
phantom's own case table, which holds each slice's position).
"""

import csv
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent / "phantom-test"


def main() -> None:
    position = {r["case"]: r["position"] for r in csv.DictReader((HERE / "cases.csv").open())}
    groups = defaultdict(list)
    for r in csv.DictReader((HERE / "per_slice.csv").open()):
        groups[(position[r["case"]], r["structure"])].append(r)
    out = {}
    for (pos, structure), rows in sorted(groups.items()):
        scored = [float(r["dice"]) for r in rows if r["absent_both"] not in ("True", "1", "true")]
        out.setdefault(pos, {})[structure] = {
            "slices": len(rows), "absent_in_both": len(rows) - len(scored),
            "dice": round(sum(scored) / len(scored), 4) if scored else None}
    (HERE / "by_position.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
