"""Inference speed of the full model on one 512 x 512 slice, 2 CPU threads.

    python benchmarks/bench_inference.py [--json benchmarks/inference.json]

Rows: the paper configuration (512 input, base 32, CTM after stages 2-4) and cpu-quick (128 input,
base 16); "network" times the forward pass alone, "end to end" adds preprocessing (wavelet, CLAHE,
ROI, resize) and mapping the probabilities back to the 512 x 512 grid.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/inference.json")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import torch

    from spineseg.data.phantom import phantom_slice
    from spineseg.preprocess.pipeline import PreprocessConfig, preprocess_slice, probabilities_to_labels
    from spineseg.train.config import resolve_config
    from spineseg.models.checkpoint import model_from_config

    torch.set_num_threads(2)
    s = phantom_slice(0, 0, 0)
    rows = []
    for cfg_name in ("paper", "cpu-quick"):
        cfg = resolve_config("spineseg", cfg_name)
        model = model_from_config(cfg).eval()
        pp = PreprocessConfig.from_dict(cfg["preprocess"])
        S = pp.target_size

        def net():
            with torch.no_grad():
                return torch.softmax(model(torch.randn(1, 1, S, S)), 1)

        def e2e():
            x, _, g = preprocess_slice(s.image, s.spacing, pp)
            with torch.no_grad():
                p = torch.softmax(model(torch.from_numpy(x)[None, None]), 1)[0].numpy()
            return probabilities_to_labels(p, g)

        for what, fn in (("network", net), ("end to end", e2e)):
            fn()
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            rows.append({"config": cfg_name, "input": S, "what": what, "seconds": round(statistics.median(ts), 3),
                         "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "threads": 2,
                         "target_seconds": 0.5})
    print(f"{'config':<10}{'input':>6}{'what':>12}{'seconds':>9}{'params (M)':>12}")
    for r in rows:
        print(f"{r['config']:<10}{r['input']:>6}{r['what']:>12}{r['seconds']:>9}{r['params_m']:>12}")
    Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
