"""Inference speed per slice: the paper configuration and the shipped (cpu-quick) configuration.

    python benchmarks/bench_inference.py [--json benchmarks/inference.json] [--repeats 5] [--threads N]
        [--configs paper cpu-quick] [--engines torch onnx] [--batches 1 4]
    python benchmarks/bench_inference.py --compare-bf16 PHANTOM_DIR [--json ...]

Rows ``{config, precision, engine, batch, what, seconds_per_slice, gflop}``: "network" times the
network on a batch of preprocessed slices, once; "end to end" (with ``tta``: flip or none) is
``Predictor.predict_both`` on a volume of
``batch`` phantom slices at 512 x 512 (wavelet denoising, CLAHE, ROI, resize, network, mapping the
probabilities back, post-processing), per slice. ``seconds_per_slice`` is the median over the repeats,
``seconds_per_slice_min`` the fastest (what the machine does when nothing else competes). The shipped
configuration (cpu-quick) runs its trained weights; other configurations run random weights (the network's speed is
the same as a trained one's), and their "end to end" rows skip the post-processing (``postprocess: none`` in the
row): a random network's output is speckle, which the anatomical post-processing takes seconds per slice to sort
out, and that would time the speckle, not a model.
bf16 rows run only where the processor has native bfloat16 (``spineseg.precision.native_bf16``);
elsewhere one emulated row of the small configuration shows why predict refuses it. Each value is the
median of ``--repeats`` runs after a warm-up; other processes on the machine are not controlled, so the
JSON records the load average of every row and before / after every run. ``load``: seconds to load
each model in fp32; on onnx from a checkpoint once with an empty graph cache (the one-time export) and
once cached (every later run).

``--compare-bf16`` predicts a phantom data set's images with fp32 and with bf16 autocast (emulated if
need be) and reports the Dice of each against the ground truth and between the two.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _seconds(fn, repeats: int) -> tuple[float, float]:
    """Median and minimum wall time of ``fn`` over ``repeats`` runs after a warm-up (allocations, kernel choice)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def _random_checkpoint(config_name: str, folder: Path, overrides: dict | None = None) -> Path:
    """A checkpoint file with random weights for a named training config (what Predictor loads)."""
    import torch

    from spineseg.models.checkpoint import model_from_config, save_checkpoint
    from spineseg.train.config import resolve_config

    cfg = resolve_config("spineseg", config_name)
    for section, values in (overrides or {}).items():
        cfg[section] = {**cfg[section], **values}
    torch.manual_seed(0)
    path = folder / f"{config_name}.pt"
    save_checkpoint(path, {"model": model_from_config(cfg).state_dict(), "config": cfg, "preprocess": cfg["preprocess"],
                           "version": "bench", "model_name": "spineseg"})
    return path


def _gflop_per_slice(model, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 1, size, size))
    return counter.get_total_flops() / 1e9


def _phantom_volume(slices: int):
    """``slices`` phantom slices at 512 x 512, 0.3906 mm, as one display-convention Image."""
    import numpy as np
    from nibabel import orientations as nio

    from spineseg.data.phantom import phantom_slice
    from spineseg.io.images import Image, slice_affine

    data = np.stack([phantom_slice(0, p, 0).image for p in range(slices)]).astype(np.float32)
    spacing = (0.3906, 0.3906)
    return Image(data, spacing, 4.0, "phantom", slice_affine(spacing, 4.0), tuple(data.shape[::-1]),
                 nio.axcodes2ornt(("L", "P", "S")))


def speed_rows(args) -> tuple[list[dict], list[dict]]:
    import numpy as np
    import torch

    from spineseg.anatomy.postprocess import DEFAULT_POSTPROCESS
    from spineseg.infer.predict import Predictor, resolve_checkpoint
    from spineseg.precision import native_bf16
    from spineseg.preprocess.pipeline import preprocess_slice

    native = native_bf16(torch.device("cpu"))
    rows, loads = [], []
    volume = _phantom_volume(max(args.batches))
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            # cpu-quick is the shipped model's configuration: time its real weights. A random network's output
            # is speckle, which the anatomical post-processing takes seconds per slice to sort out: those end-to-end
            # rows run without it.
            checkpoint = (resolve_checkpoint("pretrained") if config == "cpu-quick"
                          else _random_checkpoint(config, Path(tmp)))
            gflop = None  # the network's operation count: the same for every engine and precision, counted once
            for engine in args.engines:
                precisions = ["fp32"] + (["bf16"] if engine == "torch" and (native or config == "cpu-quick") else [])
                for precision in precisions:
                    emulated = precision == "bf16" and not native
                    if precision == "fp32":
                        loads.extend(_load_rows(config, engine, checkpoint, args.threads, Path(tmp)))
                    predictor = Predictor(checkpoint, device="cpu", threads=args.threads, engine=engine,
                                          precision=precision, require_native_bf16=False,
                                          postprocess=DEFAULT_POSTPROCESS if config == "cpu-quick" else "none")
                    size = predictor.pp.target_size
                    if gflop is None:
                        net = predictor.model if (engine, precision) == ("torch", "fp32") else \
                            Predictor(checkpoint, device="cpu", threads=args.threads, engine="torch").model
                        gflop = _gflop_per_slice(net, size)
                    x = np.stack([preprocess_slice(volume.data[i], volume.spacing, predictor.pp)[0]
                                  for i in range(volume.num_slices)])[:, None]
                    for batch in ([1] if emulated else args.batches):
                        predictor.batch_size = batch
                        sub = _phantom_subvolume(volume, batch)
                        repeats = 1 if emulated else args.repeats
                        timed = [("network", None, lambda: predictor.engine.logits(x[:batch]))] + [
                            ("end to end", tta, lambda: predictor.predict_both(sub)) for tta in args.tta]
                        for what, tta, fn in timed:
                            if emulated and what == "end to end":
                                continue
                            predictor.tta = tta or "none"
                            seconds, fastest = (t / batch for t in _seconds(fn, repeats))
                            row = {"config": config, "input": size, "precision": precision, "engine": engine,
                                   "batch": batch, "what": what, "seconds_per_slice": round(seconds, 4),
                                   "seconds_per_slice_min": round(fastest, 4),
                                   "gflop": round(gflop, 2), "gflop_per_s": round(gflop / seconds, 1),
                                   "threads": predictor.threads, "load_1min": round(os.getloadavg()[0], 2)}
                            if tta:
                                row["tta"] = tta
                                row["postprocess"] = predictor.postprocess
                            if emulated:
                                row["note"] = "emulated bf16 (no native bfloat16): predict refuses this"
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    ratios = []
    for r in rows:
        if r["precision"] != "bf16":
            continue
        for f in rows:
            if f["precision"] == "fp32" and all(f.get(k) == r.get(k) for k in ("config", "engine", "batch", "what", "tta")):
                ratios.append({k: r[k] for k in ("config", "engine", "batch", "what")}
                              | {"fp32_over_bf16": round(f["seconds_per_slice"] / r["seconds_per_slice"], 3),
                                 "native_bf16": native})
    return rows, ratios, loads


def _load_rows(config: str, engine: str, checkpoint, threads: int, tmp: Path) -> list[dict]:
    """Seconds to load a model: on onnx from a checkpoint, once with an empty graph cache (export) and
    once from the cache (what every later run pays)."""
    from spineseg.infer.predict import Predictor

    cache = tempfile.mkdtemp(dir=tmp)
    old = os.environ.get("SPINESEG_CACHE")
    os.environ["SPINESEG_CACHE"] = cache
    rows = []
    try:
        for state in (["empty cache", "cached"] if engine == "onnx" else ["-"]):
            t = time.perf_counter()
            Predictor(checkpoint, device="cpu", threads=threads, engine=engine)
            rows.append({"config": config, "engine": engine, "graph_cache": state,
                         "load_seconds": round(time.perf_counter() - t, 3)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if old is None:
            os.environ.pop("SPINESEG_CACHE", None)
        else:
            os.environ["SPINESEG_CACHE"] = old
    return rows


def _phantom_subvolume(volume, n: int):
    from dataclasses import replace

    return replace(volume, data=volume.data[:n], file_shape=tuple(volume.data[:n].shape[::-1]))


def compare_bf16(args) -> dict:
    """fp32 vs bf16 labels on a phantom data set: the shipped model and the paper architecture (random weights)."""
    import numpy as np

    from spineseg.infer.predict import Predictor
    from spineseg.io.images import read_image, read_label
    from spineseg.io.layouts import load_dataset
    from spineseg.overlap import dice_per_structure

    cases = load_dataset(args.compare_bf16)[: args.cases]
    images = [read_image(c.image) for c in cases]
    truths = [read_label(c.label).data for c in cases]  # randomised phantoms differ in size: one array per image

    def dice(a, b):  # mean over slices of each structure's Dice, absent-from-both skipped
        return np.nanmean(np.concatenate([dice_per_structure(x, y) for x, y in zip(a, b)]), axis=0)
    out = {"data": str(args.compare_bf16), "cases": [c.case_id for c in cases]}
    with tempfile.TemporaryDirectory() as tmp:
        # the paper architecture (base 32, 100 clusters, CTM after stages 2-4) with random weights; its
        # 512 x 512 input is reduced to --paper-size because emulated bf16 would take minutes per slice
        paper = _random_checkpoint("paper", Path(tmp), {"preprocess": {"target_size": args.paper_size,
                                                                       "target_spacing": 200.0 / args.paper_size}})
        for label, checkpoint in (("pretrained (cpu-quick, 192 x 192)", "pretrained"),
                                  (f"paper architecture, random weights, {args.paper_size} x {args.paper_size}", paper)):
            preds = {}
            for precision in ("fp32", "bf16"):
                p = Predictor(checkpoint, device="cpu", threads=args.threads, precision=precision,
                              engine="torch", require_native_bf16=False)
                t = time.perf_counter()
                preds[precision] = [p.predict_volume(im) for im in images]
                preds[precision + "_seconds_per_slice"] = (time.perf_counter() - t) / len(truths)
            vs_truth = {k: dice(preds[k], truths).round(4).tolist() for k in ("fp32", "bf16")}
            between = dice(preds["bf16"], preds["fp32"])
            out[label] = {"dice_vs_truth_fp32": vs_truth["fp32"], "dice_vs_truth_bf16": vs_truth["bf16"],
                          "dice_difference_max": float(np.max(np.abs(np.subtract(vs_truth["fp32"], vs_truth["bf16"])))),
                          "dice_bf16_vs_fp32": between.round(4).tolist(),
                          "pixels_equal": float(np.mean(np.concatenate([(a == b).ravel() for a, b in
                                                                        zip(preds["fp32"], preds["bf16"])]))),
                          "seconds_per_slice": {k: round(preds[k + "_seconds_per_slice"], 3) for k in ("fp32", "bf16")}}
            print(label, json.dumps(out[label]), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/inference.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: every available core")
    ap.add_argument("--configs", nargs="+", default=["paper", "cpu-quick"])
    ap.add_argument("--engines", nargs="+", default=["torch", "onnx"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tta", nargs="+", choices=["flip", "none"], default=["flip", "none"],
                    help="test-time mirroring of the end-to-end rows (predict's default is none)")
    ap.add_argument("--compare-bf16", metavar="PHANTOM_DIR", help="compare fp32 and bf16 labels on this data set")
    ap.add_argument("--cases", type=int, default=6, help="images of --compare-bf16 to use")
    ap.add_argument("--paper-size", type=int, default=128, help="input size of the paper architecture in --compare-bf16")
    a = ap.parse_args()
    import torch

    from spineseg.infer.engine import available_cores
    from spineseg.precision import native_bf16

    a.threads = a.threads or available_cores()
    path = Path(a.json)
    result = json.loads(path.read_text()) if path.exists() and path.read_text().lstrip().startswith("{") else {}
    result.setdefault("runs", []).append({"configs": a.configs, "threads": a.threads, "load_average_before": os.getloadavg()})
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": available_cores(),
                         "threads": a.threads, "torch": torch.__version__,
                         "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                         "native_bf16": native_bf16(torch.device("cpu"))}
    if a.compare_bf16:
        result["bf16_agreement"] = compare_bf16(a)
    else:
        rows, ratios, loads = speed_rows(a)
        result["load"] = [r for r in result.get("load", []) if r["config"] not in a.configs] + loads
        # rows of other configs, or of these at another thread count, stay
        keep = [r for r in result.get("rows", []) if r["config"] not in a.configs or r["threads"] != a.threads]
        result["rows"] = keep + rows
        result["fp32_over_bf16"] = [r for r in result.get("fp32_over_bf16", []) if r["config"] not in a.configs] + ratios
        print(f"{'config':<10}{'prec':>6}{'engine':>7}{'thr':>4}{'batch':>6}{'what':>12}{'s/slice':>9}{'min':>8}"
              f"{'GFLOP':>8}{'GFLOP/s':>9}{'load':>6}")
        for r in result["rows"]:
            print(f"{r['config']:<10}{r['precision']:>6}{r['engine']:>7}{r['threads']:>4}{r['batch']:>6}{r['what']:>12}"
                  f"{r['seconds_per_slice']:>9}{r.get('seconds_per_slice_min', ''):>8}{r['gflop']:>8}{r['gflop_per_s']:>9}"
                  f"{r.get('load_1min', ''):>6}")
        for r in ratios:
            print(f"fp32 / bf16 ({r['config']}, {r['engine']}, batch {r['batch']}, {r['what']}): {r['fp32_over_bf16']}"
                  + ("" if r["native_bf16"] else " (bf16 emulated)"))
    result["runs"][-1]["load_average_after"] = os.getloadavg()
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
