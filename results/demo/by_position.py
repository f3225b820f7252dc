"""`make demo`'s test Dice by slice position (disc, endplate, infrapedicular, pedicle).

python results/demo/by_position.py  ->  results/demo/by_position.json

Reads per_slice.json (written by `make demo`, copied from runs/demo/) and cases.csv (the demo
phantom's own case table, copied from runs/demo/phantom/).
"""

import csv
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
STRUCTURES = ("vertebral_body", "vertebral_foramen", "lamina")


def main() -> None:
    position = {r["case"]: r["position"] for r in csv.DictReader((HERE / "cases.csv").open())}
    dice = defaultdict(list)
    for row in json.loads((HERE / "per_slice.json").read_text()):
        for s in STRUCTURES:
            if row.get(s) and row[s].get("dice") is not None:
                dice[(position[row["case"]], s)].append(row[s]["dice"])
    out = {}
    for (pos, s), values in sorted(dice.items()):
        out.setdefault(pos, {})[s] = {"slices": len(values), "dice": round(sum(values) / len(values), 4)}
    (HERE / "by_position.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
