"""Run every benchmark (`make bench`): phantom speed, attention, inference, training. Prints tables, writes JSON."""

import argparse
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(here))
    a = ap.parse_args()
    out = Path(a.out)
    out = out.parent if out.suffix == ".json" else out
    py = sys.executable
    subprocess.run([py, str(here / "bench_phantom.py"), "--json", str(out / "phantom.json")], check=True)
    subprocess.run([py, "-m", "spineseg.cli", "bench", "attention", "--json", str(out / "attention.json")], check=True)
    subprocess.run([py, str(here / "bench_inference.py"), "--repeats", "11", "--json", str(out / "inference.json")], check=True)
    subprocess.run([py, str(here / "bench_train.py"), "--json", str(out / "train.json")], check=True)


if __name__ == "__main__":
    main()
