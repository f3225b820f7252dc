"""`spineseg experiment`: train, predict and evaluate several models on one split, then compare them.

Layout of OUT::

    experiment.json          the command, data seed, models, budget
    splits.json              the one split every model uses
    runs/<model>/fold<K>/    training run (best.pt, last.pt, log.csv, tb/), pred/, eval/ (per_slice.csv, summary.*)
    compare/                 tables.md/.tex/.csv, bar_dice.png, bar_hd95.png, overlays.png, per_slice.csv per model

Finished steps are skipped, so an interrupted experiment resumes where it stopped. A later call on the same OUT
must ask for the settings recorded in experiment.json (data, split, budget, config, --set, seed, post-processing,
...) and in each run's config.json; it may only add models or folds, whose runs are independent of the others.
An experiment's budget cannot be extended: its learning rate decays over exactly that budget.

Under torchrun (``torchrun --nproc_per_node N $(which spineseg) experiment ...``) every rank trains
each model together; rank 0 alone writes, predicts, evaluates and compares, while the others wait.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .data.splits import check_splits, load_splits, make_splits, write_splits
from .errors import SpinesegError
from .io.atomic import atomic_write_text
from .models.registry import model_names
from .train.distributed import current as current_ranks

# experiment.json keys a later call on the same OUT must repeat exactly (models and folds may only grow)
SAME_SETTINGS = ("data", "split", "budget_minutes", "epochs", "config", "sets", "seed", "postprocess",
                 "case_is_patient", "nnunet_epochs", "phantom")


def parse_folds(text: str) -> list[int]:
    """``--folds 0,2`` -> [0, 2]; anything but comma-separated non-negative whole numbers is refused."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise SpinesegError(f"--folds must be comma-separated fold numbers such as 0 or 0,1,2 (got {text!r})")
    return [int(p) for p in parts]


def check_arguments(models: list[str], folds, reference: str | None) -> None:
    """Refuse an empty or repeated model list, unknown models, bad or repeated folds and a reference that is not
    one of the models, before any work is done."""
    from .nnunet_row import NNUNET

    if not models:
        raise SpinesegError("--models names no model; give comma-separated registry names, e.g. unet,segnet")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise SpinesegError(f"--models lists {', '.join(repeated)} more than once")
    unknown = [m for m in models if m not in model_names() and m != NNUNET]
    if unknown:
        raise SpinesegError(f"unknown models {unknown}; choose from {', '.join(model_names() + [NNUNET])}")
    folds = list(folds)
    if not folds:
        raise SpinesegError("--folds names no fold")
    bad = [k for k in folds if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0]
    if bad:
        raise SpinesegError(f"--folds must be non-negative whole numbers (got {bad})")
    repeated_folds = sorted({k for k in folds if folds.count(k) > 1})
    if repeated_folds:
        raise SpinesegError(f"--folds lists {', '.join(map(str, repeated_folds))} more than once")
    if reference is not None and reference not in models:
        raise SpinesegError(f"--reference {reference} is not one of the models ({', '.join(models)})")


def _short(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def check_same_settings(path: Path, meta: dict) -> None:
    """Refuse a call on an existing experiment whose settings differ from its experiment.json: its finished steps
    would be reused under settings they were never run with. Models and folds may only be added."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpinesegError(f"cannot read this experiment's settings ({exc}); use another --out", path) from None
    if not isinstance(stored, dict):
        raise SpinesegError("is not an experiment's settings file (no JSON object); use another --out", path)
    requested = json.loads(json.dumps(meta))  # compare as stored (tuples -> lists, ...)
    diffs = [f"{k} {_short(requested.get(k))} (was {_short(stored[k])})" for k in SAME_SETTINGS
             if k in stored and stored[k] != requested.get(k)]  # keys an older file lacks are not compared
    for k in ("models", "folds"):
        dropped = [x for x in stored.get(k) or [] if x not in requested[k]]
        if dropped:
            diffs.append(f"{k} {_short(requested[k])} leaves out {_short(dropped)}")
    if diffs:
        raise SpinesegError(f"this experiment was run with other settings: {'; '.join(diffs)}; a later call may only "
                            "add models or folds (an experiment's budget cannot be extended); use another --out",
                            path)


def check_runs_match(out: Path, models, folds, config, overrides: dict, sets, seed: int) -> None:
    """Each existing run of the experiment must have been trained with the configuration asked for now (a changed
    config file or model default would otherwise be reused silently)."""
    from .nnunet_row import NNUNET
    from .train.config import config_differences, describe_value, resolve_config, validate_config

    for m in models:
        if m == NNUNET:
            continue
        requested = resolve_config(m, config, overrides, sets)
        for k in folds:
            cfg_path = out / "runs" / m / f"fold{k}" / "config.json"
            if not cfg_path.exists():
                continue
            try:
                stored = json.loads(cfg_path.read_text())
                run = stored.get("run") or {}
                current = validate_config({key: v for key, v in stored.items() if key != "run"}, cfg_path)
            except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
                raise SpinesegError(f"cannot read this run's configuration ({exc}); use another --out",
                                    cfg_path) from None
            diffs = [f"{d} (was {_short(describe_value(current, d))}, now {_short(describe_value(requested, d))})"
                     for d in config_differences(current, requested)]
            if "seed" in run and run["seed"] != seed:
                diffs.append(f"seed (was {run['seed']}, now {seed})")
            if diffs:
                raise SpinesegError(f"this run was trained with other settings: {'; '.join(diffs)}; use another "
                                    "--out", cfg_path)


def _log(msg: str) -> None:
    if current_ranks().is_main:
        print(msg, flush=True)


def run_experiment(data, models: list[str], out, split: str = "kfold", folds=(0,), budget_minutes: float | None = None,
                   epochs: int | None = None, config: str = "cpu-quick", seed: int = 0, reference: str | None = None,
                   progress: bool = True, argv: list[str] | None = None, postprocess: str = "anatomical",
                   sets: dict | None = None, case_is_patient: bool = False, nnunet_epochs: int | None = None) -> Path:
    from .nnunet_row import EPOCH_VARIANTS, INSTALL_HINT, NNUNET, nnunet_installed
    from .train.config import resolve_config
    from .train.data import training_cases
    from .train.loop import Trainer

    models, folds = list(models), list(folds)
    check_arguments(models, folds, reference)
    if NNUNET in models and not nnunet_installed():
        raise SpinesegError(f"the {NNUNET} row needs nnU-Net: {INSTALL_HINT}")
    if nnunet_epochs is not None and nnunet_epochs not in EPOCH_VARIANTS:
        raise SpinesegError(f"nnU-Net trains in fixed lengths: --nnunet-epochs must be one of {EPOCH_VARIANTS}")
    # nnU-Net last: without a minute budget it gets the mean training time the other rows took
    models = [m for m in models if m != NNUNET] + ([NNUNET] if NNUNET in models else [])
    if budget_minutes is None and epochs is None:
        raise SpinesegError("give --budget-minutes or --epochs (an equal budget for every model)")
    overrides = {"train": {}}
    if budget_minutes is not None:  # the schedule follows whichever is further along: epochs / schedule_epochs or the elapsed fraction of the budget
        overrides["train"].update(max_minutes=float(budget_minutes), epochs=epochs or 100000)
    else:  # the learning rate decays over exactly the epoch budget
        overrides["train"].update(epochs=int(epochs), max_minutes=None, schedule_epochs=int(epochs))
    for m in models:  # every config error surfaces before anything is written
        if m != NNUNET:
            resolve_config(m, config, overrides, sets)
    out = Path(out)
    meta = {"command": "spineseg " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "data": str(Path(data).resolve()), "models": models, "split": split, "folds": folds,
            "budget_minutes": budget_minutes, "epochs": epochs, "config": config, "sets": sets or {}, "seed": seed,
            "postprocess": postprocess, "case_is_patient": bool(case_is_patient), "nnunet_epochs": nnunet_epochs}
    phantom = Path(data) / "phantom.json"
    if phantom.exists():
        meta["phantom"] = json.loads(phantom.read_text())
    if (out / "experiment.json").exists():  # nothing is reused, nor experiment.json rewritten, under other settings
        check_same_settings(out / "experiment.json", meta)
    check_runs_match(out, models, folds, config, overrides, sets, seed)
    ranks = current_ranks()
    cases = training_cases(data, case_is_patient)
    by_id = {c.case_id: c for c in cases}
    split_path = out / "splits.json"
    splits = ranks.broadcast(load_splits(split_path) if split_path.exists() else make_splits(cases, split))
    check_splits(splits, cases, split_path if split_path.exists() else None)
    for k in folds:
        if not 0 <= k < len(splits):
            raise SpinesegError(f"fold {k} does not exist ({len(splits)} splits)")
        if not splits[k].get("test"):
            raise SpinesegError(f"fold {k} has no test list: an experiment tests on held-out patients, never on "
                                "the validation patients", split_path if split_path.exists() else data)
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not split_path.exists():
            write_splits(split_path, splits)
        atomic_write_text(out / "experiment.json", json.dumps(meta, indent=1) + "\n")
    ranks.barrier()  # every rank's trainer reads splits.json
    eval_dirs: dict[str, list[Path]] = {m: [] for m in models}
    for k in folds:
        test_ids = splits[k]["test"]
        for m in models:
            run = out / "runs" / m / f"fold{k}"
            done = run / "done.json"
            if m == NNUNET:
                if ranks.is_main:
                    _nnunet_row(run, k, data, splits, test_ids, budget_minutes, nnunet_epochs, out, models, postprocess)
                eval_dirs[m].append(run / "eval")
                if ranks.is_main:
                    _predict_and_evaluate(m, k, run, test_ids, by_id, data, postprocess)
                ranks.barrier()
                continue
            if not done.exists():
                t0 = time.perf_counter()
                if (run / "last.pt").exists():
                    _log(f"[{m} fold {k}] resuming training")
                    trainer = Trainer(data, m, run, resume=True, cache=out / "cache", progress=progress,
                                      case_is_patient=case_is_patient)
                else:
                    _log(f"[{m} fold {k}] training")
                    trainer = Trainer(data, m, run, config=config, fold=k, seed=seed, cache=out / "cache",
                                      overrides=overrides, sets=sets, progress=progress, splits_file=split_path,
                                      case_is_patient=case_is_patient)
                res = trainer.fit()
                if ranks.is_main:
                    atomic_write_text(done, json.dumps({**res, "wall_seconds": time.perf_counter() - t0}, indent=1)
                                      + "\n")
            eval_dirs[m].append(run / "eval")
            if ranks.is_main:
                _predict_and_evaluate(m, k, run, test_ids, by_id, data, postprocess)
            ranks.barrier()  # the next model starts from what rank 0 has written
    if ranks.is_main:
        _compare(out, models, folds, eval_dirs, reference, splits, by_id)
    return out


def matched_budget_minutes(out: Path, models, k: int) -> float:
    """The nnunet row's time budget under ``--epochs``: the mean training time (minutes) of the other rows of fold
    ``k``, each the whole run's time across resumes (``seconds`` of its ``done.json``), not only the last process's."""
    from .nnunet_row import NNUNET

    times = []
    for m in models:
        if m == NNUNET:
            continue
        done = json.loads((out / "runs" / m / f"fold{k}" / "done.json").read_text())
        times.append(done.get("seconds", done["wall_seconds"]))
    if not times:
        raise SpinesegError("with --epochs, the nnunet row needs other rows to match their time, or --nnunet-epochs")
    return float(np.mean(times)) / 60


def _nnunet_row(run: Path, k: int, data, splits, test_ids, budget_minutes, nnunet_epochs, out: Path, models,
                postprocess: str) -> None:
    """Train and apply nnU-Net 2D through its own command lines (see `spineseg.nnunet_row`); ``RUN/pred`` after."""
    import torch

    from .infer.predict import postprocess_labels
    from .io.images import read_label, write_labels_like
    from .nnunet_row import NnunetRow

    if (run / "done.json").exists():
        return
    t0 = time.perf_counter()
    budget = budget_minutes
    if budget is None and nnunet_epochs is None:
        budget = matched_budget_minutes(out, models, k)
    _log(f"[nnunet fold {k}] nnU-Net v2 2D through its own command lines"
         + (f" (budget {budget:.1f} min)" if nnunet_epochs is None else f" ({nnunet_epochs} epochs)"))
    row = NnunetRow(run, device="cuda" if torch.cuda.is_available() else "cpu")
    row.prepare(data, splits)
    info = row.train_within(k, None if nnunet_epochs is not None else budget, nnunet_epochs)
    pred = row.predict(k, info["epochs"], test_ids)
    row.keep_logs(k, info["epochs"])
    if postprocess != "none":  # the same post-processing as every other row
        for f in sorted(pred.glob("*.nii.gz")):
            lab = read_label(f)
            cleaned = np.stack([postprocess_labels(s, postprocess, lab.spacing) for s in lab.data])
            write_labels_like(f, cleaned, lab)
    atomic_write_text(run / "done.json", json.dumps({**info, "wall_seconds": time.perf_counter() - t0,
                                                     "budget_minutes": budget}, indent=1) + "\n")


def _predict_and_evaluate(m: str, k: int, run: Path, test_ids, by_id, data, postprocess: str) -> None:
    from .eval.evaluate import evaluate_folders, write_reports
    from .infer.predict import Predictor
    from .io.images import read_image, write_labels_like

    pred_dir = run / "pred"
    if not (pred_dir / ".complete").exists():
        _log(f"[{m} fold {k}] predicting {len(test_ids)} test cases")
        predictor = Predictor(run / "best.pt", postprocess=postprocess)
        pred_dir.mkdir(parents=True, exist_ok=True)
        for cid in test_ids:
            img = read_image(by_id[cid].image)
            write_labels_like(pred_dir / f"{cid}.nii.gz", predictor.predict_volume(img), img)
        (pred_dir / ".complete").write_text("")
    ev = run / "eval"
    if not (ev / "summary.md").exists():
        rows = evaluate_folders(pred_dir, Path(data), cases=test_ids)
        write_reports(rows, ev, title=f"{m}, fold {k}")
        atomic_write_text(ev / "run.json", json.dumps({"name": m, "fold": k}) + "\n")


def _compare(out: Path, models, folds, eval_dirs, reference, splits, by_id) -> None:
    """Pool the folds per model, then compare the models."""
    from .eval.compare import write_comparison
    from .eval.evaluate import read_per_slice, write_reports

    cmp_dir = out / "compare"
    cmp_dir.mkdir(parents=True, exist_ok=True)
    pooled = []
    for m in models:
        d = cmp_dir / "models" / m
        rows = []
        for i, ev in enumerate(eval_dirs[m]):
            for r in read_per_slice(ev / "per_slice.csv"):
                r["fold"] = folds[i]
                rows.append(r)
        write_reports(rows, d, title=m)
        atomic_write_text(d / "run.json", json.dumps({"name": m}) + "\n")
        pooled.append(d)
    ref = reference or (models[-1] if "spineseg" not in models else "spineseg")
    write_comparison(pooled, cmp_dir, reference=ref)
    _overlay_figure(out, models, folds[0], splits, by_id, cmp_dir / "overlays.png")
    _log(f"comparison: {cmp_dir / 'tables.md'}")


def _overlay_figure(out: Path, models, fold, splits, by_id, path, n: int = 4) -> None:
    from .eval.figures import overlay_grid
    from .io.images import read_image, read_label

    test_ids = sorted(splits[fold]["test"])
    pick = [test_ids[i] for i in np.linspace(0, len(test_ids) - 1, min(n, len(test_ids))).round().astype(int)]
    images, gts, preds = [], [], {m: [] for m in models}
    for cid in pick:
        images.append(read_image(by_id[cid].image).data[0])
        gts.append(read_label(by_id[cid].label).data[0])
        for m in models:
            preds[m].append(read_label(out / "runs" / m / f"fold{fold}" / "pred" / f"{cid}.nii.gz").data[0])
    overlay_grid(images, gts, preds, path, titles=pick)
