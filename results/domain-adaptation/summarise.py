"""Summarise the equal-epoch A/B comparison of output-space domain adaptation from the sanity CSVs.

python results/domain-adaptation/summarise.py  ->  results/domain-adaptation/summary.json

Each run's ``sanity_*.csv`` was written by ``spineseg sanity`` (see README.md here). Slices are split
into the images the domain-adapted run saw unlabelled during training and the held-out ones.
"""

import csv
import json
from pathlib import Path

HERE = Path(__file__).parent
RUNS = {"A (phantom only)": "A", "B (+ unlabelled real, --unlabeled)": "B"}
SEEN = ("validation_with_pain", "TUM01_water")  # in B's --unlabeled list (TUM01_fat too, not evaluated here)


def subset(row: dict) -> str:
    name = row["source"] if row["input"] == "axial-clinical" else row["input"]
    clinical = row["input"] == "axial-clinical"
    seen = any(name.startswith(s) for s in SEEN)
    return f"{'clinical' if clinical else 'TUM water'}, {'seen unlabelled by B' if seen else 'held out'}"


def tally(rows: list[dict]) -> dict:
    out = {}
    for key in sorted({subset(r) for r in rows}):
        part = [r for r in rows if subset(r) == key]
        out[key] = {"slices": len(part)}
        for kind in ("raw", "post"):
            passing = [r for r in part if r[f"order_{kind}"] == "True"]
            out[key][f"order_{kind}"] = len(passing)
            out[key][f"both_laminae_{kind}"] = sum(r[f"both_laminae_{kind}"] == "True" for r in passing)
    return out


def main() -> None:
    summary = {}
    for label, tag in RUNS.items():
        rows = []
        for f in sorted(HERE.glob(f"sanity_{tag}_*.csv")):
            rows += list(csv.DictReader(f.open()))
        summary[label] = tally(rows)
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
