"""`make demo`: phantom -> train the full model (adversarial, cpu-quick) -> predict held-out patients -> metrics.

    python -m spineseg.demo --out runs/demo [--patients 40] [--slices-per-patient 5] [--minutes 9] [--no-randomize]
                            [--set KEY=VALUE ...]

The phantom is domain-randomised by default (contrast, field of view, pixel size, blur, noise, bias),
as is training (cpu-quick); metrics are computed on held-out randomised patients at their own grids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import STRUCTURES
from .errors import SpinesegError

TARGETS = {"vertebral_body": 0.90, "vertebral_foramen": 0.88, "lamina": 0.75}


def evaluate_cases(predictor, cases, overlay_dir: Path | None = None, max_overlays: int = 8) -> tuple[list, list]:
    from .eval.metrics import slice_metrics
    from .infer.predict import overlay_png
    from .io.images import read_image, read_label

    rows, per_case = [], []
    for i, c in enumerate(cases):
        img = read_image(c.image)
        gt = read_label(c.label)
        pred = predictor.predict_volume(img)
        for s in range(img.num_slices):
            m = slice_metrics(pred[s], gt.data[s], img.spacing)
            rows.append(m)
            per_case.append({"case": c.case_id, "slice": s, **{k: v for k, v in m.items()}})
        if overlay_dir is not None and i < max_overlays:
            overlay_png(overlay_dir / f"{c.case_id}.png", img.data, pred)
    return rows, per_case


def _check_existing_phantom(data: Path, a) -> None:
    """A phantom already in ``--out`` is reused only if this call's flags describe it (metrics.json reports them)."""
    meta_file = data / "phantom.json"
    if not meta_file.exists():
        return
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise SpinesegError(f"unreadable phantom description ({exc})", meta_file) from None
    asked = {"patients": a.patients, "slices_per_patient": a.slices_per_patient, "seed": a.seed,
             "randomize": not a.no_randomize}
    differ = [f"{k} {meta[k]!r} (asked {v!r})" for k, v in asked.items() if k in meta and meta[k] != v]
    if differ:
        raise SpinesegError("this demo folder's phantom was made with other settings: " + ", ".join(differ)
                            + "; use another --out, or the same flags", meta_file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="spineseg.demo")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--slices-per-patient", type=int, default=5)
    ap.add_argument("--no-randomize", action="store_true", help="plain T2 phantom at 512 x 0.3906 mm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="training wall-time cap (default: cpu-quick's)")
    ap.add_argument("--model", default="spineseg")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                    help="override one cpu-quick value for training, dotted key (repeatable), e.g. --set "
                         "train.dice_batch=true; a resumed demo refuses a change, as train --resume does")
    a = ap.parse_args(argv)
    try:
        return _run(a)
    except SpinesegError as exc:
        print(f"spineseg demo: error: {exc}", file=sys.stderr)
        return 2


def _run(a) -> int:
    from .data.phantom_dataset import write_phantom_dataset
    from .eval.evaluate import dice_by_position
    from .eval.metrics import summarise
    from .infer.predict import Predictor
    from .io.atomic import atomic_write_text
    from .io.layouts import load_dataset
    from .train.config import config_differences, describe_value, parse_set, resolve_config
    from .train.loop import Trainer

    out = Path(a.out)
    overrides = {"train": {"max_minutes": a.minutes}} if a.minutes else None
    sets = parse_set(a.set)
    resolve_config(a.model, "cpu-quick", overrides, sets)  # a malformed or unknown --set fails before any work
    data = out / "phantom"
    t0 = time.perf_counter()
    _check_existing_phantom(data, a)
    if not (data / "dataset.json").exists():
        kind = "T2, 512 x 512" if a.no_randomize else "domain-randomised"
        print(f"[1/4] generating the phantom: {a.patients} patients x {a.slices_per_patient} slices ({kind})")
        write_phantom_dataset(data, a.patients, a.slices_per_patient, seed=a.seed, preview=out / "phantom_preview.png",
                              randomize=not a.no_randomize)
    run = out / "run"
    print(f"[2/4] training {a.model} (cpu-quick) -> {run}")
    if (run / "last.pt").exists():
        # a new --minutes extends (or shortens) the cap, as `train --resume --set train.max_minutes=M` does
        trainer = Trainer(data, a.model, run, resume=True, cache=out / "cache", overrides=overrides, sets=sets)
    else:
        trainer = Trainer(data, a.model, run, config="cpu-quick", fold=0, seed=a.seed, cache=out / "cache",
                          overrides=overrides, sets=sets)
    res = trainer.fit()
    train_s = res["seconds"]  # cumulative over resumed sessions
    print("[3/4] predicting the held-out test patients of fold 0 on their original grids")
    test_ids = set(trainer.split["test"])
    cases = [c for c in load_dataset(data) if c.case_id in test_ids]
    pred = Predictor(run / "best.pt")
    rows, per_case = evaluate_cases(pred, cases, out / "overlays")
    summary = summarise(rows)
    metrics = {
        "model": a.model, "config": "cpu-quick", "randomized_phantom": not a.no_randomize, "test_patients": len({c.patient for c in cases}),
        # what the run trained with beyond cpu-quick (a resumed demo keeps its first --set), and in which precision
        "config_changes": {k: describe_value(trainer.cfg, k) for k in
                           config_differences(resolve_config(a.model, "cpu-quick"), trainer.cfg) if k != "run"},
        "train_precision": trainer.precision,
        "test_slices": len(rows), "train_epochs": res["epochs"], "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1), "hd95_definition": "MONAI (max of directed 95th percentiles)",
        "predictor": pred.describe(),  # the file that was tested (with its SHA-256), engine, post-processing
        **{s: {"dice": summary[s]["dice"], "dice_std": summary[s]["dice_std"], "hd95": summary[s]["hd95"],
               "hd95_std": summary[s]["hd95_std"], "hd95_missing": summary[s]["hd95_missing"],
               "iou": summary[s]["iou"], "ppv": summary[s]["ppv"], "target_dice": TARGETS[s]} for s in STRUCTURES},
    }
    positions = dice_by_position(per_case, data / "cases.csv")
    if positions is not None:
        metrics["dice_by_slice_position"] = positions
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    atomic_write_text(out / "per_slice.json", json.dumps(per_case, indent=1) + "\n")
    print("[4/4] held-out test patients (original grid):")
    print(f"{'structure':<20}{'Dice':>14}{'HD95 (mm)':>16}{'target Dice':>13}")
    for s in STRUCTURES:
        m = metrics[s]
        hd = "-" if m["hd95"] is None else f"{m['hd95']:.2f} ±{m['hd95_std']:.2f}"  # None: no slice had both masks
        print(f"{s:<20}{m['dice']:>8.3f} ±{m['dice_std']:.3f}{hd:>16}{TARGETS[s]:>13.2f}")
    if positions is not None:
        print("Dice by slice position: " + "; ".join(
            f"{pos} ({next(iter(d.values()))['slices']} slices) " + " / ".join(
                f"{d[k]['dice']:.2f}" if k in d else "-" for k in STRUCTURES) for pos, d in positions.items()))
    print(f"training {train_s / 60:.1f} min ({res['epochs']} epochs); metrics: {out / 'metrics.json'}; "
          f"overlays: {out / 'overlays'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
