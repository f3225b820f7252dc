"""Phantom generation speed: N slices at 512 x 512 written as an nnU-Net raw data set (2 threads).

    python benchmarks/bench_phantom.py [--slices 100] [--json benchmarks/phantom.json]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--json", default="benchmarks/phantom.json")
    a = ap.parse_args()
    from spineseg.data.phantom_dataset import write_phantom_dataset

    per = 4
    patients = (a.slices + per - 1) // per
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        write_phantom_dataset(Path(d) / "p", patients, per, size=a.size, seed=0, progress=False)
        dt = time.perf_counter() - t
    row = {"what": "phantom dataset", "slices": patients * per, "size": a.size, "seconds": round(dt, 2),
           "slices_per_s": round(patients * per / dt, 2), "target_seconds": 60 * patients * per / 100,
           "cpu": platform.processor() or platform.machine(), "threads": os.environ.get("OMP_NUM_THREADS")}
    print(f"{'slices':>7} {'size':>5} {'seconds':>8} {'slices/s':>9} {'target s':>9}")
    print(f"{row['slices']:>7} {row['size']:>5} {row['seconds']:>8} {row['slices_per_s']:>9} {row['target_seconds']:>9}")
    Path(a.json).write_text(json.dumps([row], indent=1) + "\n")


if __name__ == "__main__":
    main()
