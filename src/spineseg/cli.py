"""The ``spineseg`` command line. Bad input prints one line and exits 2 (``--debug`` shows the traceback)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import SpinesegError
from .anatomy.postprocess import DEFAULT_POSTPROCESS, POSTPROCESS


# ----------------------------------------------------------------------------------------------- commands

def cmd_phantom(a) -> int:
    from .data.phantom_dataset import write_phantom_dataset

    out = write_phantom_dataset(a.out, a.patients, a.slices_per_patient, size=a.size, spacing=a.spacing,
                                seed=a.seed, contrast=a.contrast, preview=a.preview, overwrite=a.overwrite,
                                progress=not a.quiet, randomize=a.randomize,
                                **({"positions": a.positions} if a.positions else {}))
    print(f"wrote {a.patients * a.slices_per_patient} slices of {a.patients} virtual patients to {out}")
    if a.preview:
        print(f"preview: {a.preview}")
    return 0


def cmd_split(a) -> int:
    from .data.splits import make_splits, write_splits
    from .io.layouts import load_dataset

    cases = load_dataset(a.data)
    cases = [c for c in cases if c.subset == "train"]
    splits = make_splits(cases, a.scheme)
    out = Path(a.out) if a.out else Path(a.data) / "splits.json"
    write_splits(out, splits)
    n_pat = len({c.patient for c in cases})
    print(f"{a.scheme}: {len(splits)} splits over {n_pat} patients ({len(cases)} cases) -> {out}")
    for i, s in enumerate(splits):
        print(f"  split {i}: train {len(s['train'])}, val {len(s['val'])}, test {len(s.get('test', []))} cases")
    return 0


def cmd_preprocess(a) -> int:
    from .data.dataset import prepare_slices
    from .io.layouts import load_dataset
    from .io.preview import preview_grid
    from .preprocess.pipeline import PreprocessCache, PreprocessConfig

    cfg = PreprocessConfig(target_size=a.size, target_spacing=a.target_spacing)
    cases = load_dataset(a.data, require_labels=False)
    cache = PreprocessCache(a.cache)
    recs = prepare_slices(cases, cfg, cache, spacing=a.spacing, progress=not a.quiet)
    print(f"preprocessed {len(recs)} slices of {len(cases)} cases at {a.size}x{a.size}; cache: {cache.root}")
    if a.preview:
        sel = recs[:8]
        preview_grid([r.image for r in sel], [r.label for r in sel] if all(r.label is not None for r in sel) else None,
                     a.preview, [f"{r.case_id}[{r.index}]" for r in sel])
        print(f"preview: {a.preview}")
    return 0


def cmd_info(a) -> int:
    from .io.images import input_format, read_images, stack_geometry

    images = read_images(a.input, spacing=a.spacing)
    stacks = []
    for img in images:
        row = {"stack": img.stack, **stack_geometry(img), "display_shape": list(img.data.shape),
               "rows": img.data.shape[1], "cols": img.data.shape[2], "spacing_mm": img.spacing,
               "slice_thickness_mm": img.slice_thickness, "min": float(img.data.min()), "max": float(img.data.max())}
        if img.sources:
            first = img.sources[0]
            row.update({k: first[k] for k in ("series_instance_uid", "series_number", "series_description",
                                               "image_type", "echo_numbers")})
        stacks.append(row)
    print(json.dumps({"source": str(a.input), "format": input_format(a.input), "stack_count": len(images),
                      "stacks": stacks}, indent=1, default=str))
    return 0


def cmd_train(a) -> int:
    from .train.config import parse_set
    from .train.distributed import session
    from .train.loop import train

    sets = parse_set(a.set)
    with session(a.device) as ranks:  # under torchrun: one process group for the whole command
        res = train(data=a.data, model=a.model, out=a.out, config=a.config, fold=a.fold, split=a.split,
                    resume=a.resume, seed=a.seed, device=a.device, cache=a.cache, splits_file=a.splits,
                    progress=not a.quiet, sets=sets, case_is_patient=a.case_is_patient,
                    unlabeled=a.unlabeled, unlabeled_spacing=a.unlabeled_spacing,
                    unlabeled_no_body=a.unlabeled_no_body, unlabeled_body=a.unlabeled_body, init=a.init)
    if ranks.is_main:
        print(json.dumps(res))
        print(f"checkpoints: {Path(a.out) / 'best.pt'} (best validation Dice), {Path(a.out) / 'last.pt'}")
    return 0


def cmd_predict(a) -> int:
    from .infer.measure import StenosisThresholds
    from .infer.predict import predict_run, run_test_inputs

    thresholds = StenosisThresholds.parse(a.stenosis_area, a.stenosis_ap)
    if a.run and a.input:
        raise SpinesegError("give --input or --run, not both")
    if a.run:
        if not a.data:
            raise SpinesegError("--run needs --data: the data set folder the run was trained on")
        checkpoint, inputs = run_test_inputs(a.run, a.data)
        checkpoint = a.model or checkpoint
    else:
        if not a.input or not a.model:
            raise SpinesegError("give --model and --input, or --run RUN --data DIR")
        checkpoint, inputs = a.model, a.input
    res = predict_run(checkpoint, inputs, a.out, spacing=a.spacing, device=a.device, overlays=not a.no_overlays,
                      progress=not a.quiet, postprocess=a.postprocess, engine=a.engine, precision=a.precision,
                      batch_size=a.batch_size, threads=a.threads, dicom_seg=a.dicom_seg, report=a.report,
                      thresholds=thresholds, tta=a.tta)
    failed = f"; {len(res.errors)} failed (inputs, or stacks of a multi-stack input: named above)" if res.errors else ""
    print(f"wrote {len(res.written)} label maps to {a.out}{failed}")
    print("measurements: " + ", ".join(str(p) for p in res.measurements))
    for s in res.summaries:
        if s.get("narrowest_slice") is not None:
            print(f"  {s['case']}: narrowest canal at slice {s['narrowest_slice']} ({s['position_mm']:.1f} mm): "
                  f"{s['canal_area_mm2']:.0f} mm2, AP {s['canal_ap_mm']:.1f} mm ({s['stenosis']}; research only)")
    if res.dicom_seg:
        print(f"DICOM SEG: {len(res.dicom_seg)} files ({res.dicom_seg[0].name}, ...)")
    if res.report:
        print(f"report: {res.report}")
    return 2 if res.errors else 0


def cmd_export(a) -> int:
    from .infer.predict import resolve_checkpoint
    from .models.export import export_onnx

    dst = export_onnx(resolve_checkpoint(a.model), a.onnx)
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB); use it with: spineseg predict --model {dst} --input ... --out ...")
    return 0


def cmd_evaluate(a) -> int:
    from .eval.evaluate import dataset_cases_csv, evaluate_folders, fold_test_cases, training_run_fold, write_reports

    splits, fold, gt, pred = a.splits, a.fold, a.gt, a.pred
    if a.run:
        if splits or fold is not None:
            raise SpinesegError("give either --run or --splits with --fold, not both")
        splits, fold, data = training_run_fold(a.run)
        gt = gt or data
        pred = pred or str(Path(a.run) / "pred")
    elif (splits is None) != (fold is None):
        raise SpinesegError("--splits and --fold go together (or give --run)")
    if not pred or not gt:
        raise SpinesegError("give --pred and --gt (with --run they default to RUN/pred and the run's data set)")
    cases = fold_test_cases(splits, fold) if splits else None
    rows = evaluate_folders(pred, gt, hd95=a.hd95, spacing=a.spacing, cases=cases, fold=fold)
    what = f"fold {fold} of {splits}: " if splits else ""
    write_reports(rows, a.out, title=f"{what}{pred} vs {gt}", cases_csv=dataset_cases_csv(Path(gt)))
    print((Path(a.out) / "summary.md").read_text())
    n = len({(r["case"], r["slice"]) for r in rows})
    n_cases = len({r["case"] for r in rows})
    scope = f"the {n_cases} test cases of fold {fold} ({splits})" if splits else f"{n_cases} cases"
    extra = ", by_position.json" if (Path(a.out) / "by_position.json").is_file() else ""
    print(f"{n} slices of {scope} evaluated (HD95: {a.hd95}); wrote per_slice.csv, summary.md/.csv/.tex{extra} "
          f"to {a.out}")
    return 0


def cmd_compare(a) -> int:
    from .eval.compare import write_comparison

    res = write_comparison(a.runs, a.out, reference=a.reference, test=a.test, pairing=a.pairing,
                           correction=a.correction, patients=a.patients)
    print((Path(a.out) / "tables.md").read_text())
    print(f"reference: {res['reference']}; {res['n_patients']} patients, {res['n_slices']} slices; "
          f"patients: {res['patients_from']}; wrote tables.md/.tex/.csv and bar charts to {a.out}")
    return 0


def cmd_experiment(a) -> int:
    from .experiment import parse_folds, run_experiment

    models = [m.strip() for m in a.models.split(",") if m.strip()]
    folds = parse_folds(a.folds)
    from .train.config import parse_set
    from .train.distributed import session

    sets = parse_set(a.set)
    with session():  # under torchrun: every rank trains each model; rank 0 alone predicts, evaluates, compares
        run_experiment(a.data, models, a.out, split=a.split, folds=folds, budget_minutes=a.budget_minutes,
                       epochs=a.epochs, config=a.config, seed=a.seed, reference=a.reference, progress=not a.quiet,
                       argv=sys.argv[1:], postprocess=a.postprocess, sets=sets, case_is_patient=a.case_is_patient,
                       nnunet_epochs=a.nnunet_epochs)
    return 0


def cmd_nnunet(a) -> int:
    from .io import nnunet

    if a.action == "export":
        splits = None
        if a.split_file:
            from .data.splits import load_splits

            splits = load_splits(a.split_file)
        folder = nnunet.export_nnunet(a.data, a.out, splits, a.id, a.name, overwrite=a.overwrite,
                                      splits_source=a.split_file)
        print(f"wrote {folder}")
        print(f"next: export nnUNet_raw={Path(a.out).resolve()} nnUNet_preprocessed=... nnUNet_results=...; "
              f"nnUNetv2_plan_and_preprocess -d {a.id} -c 2d --verify_dataset_integrity; copy "
              f"{folder.name}/splits_final.json into nnUNet_preprocessed/{folder.name}/; "
              f"python -m spineseg.nnunet_cli nnUNetv2_train {a.id} 2d 0 -device cpu")
    else:
        out = nnunet.import_nnunet(a.pred_dir, a.out, a.name, overwrite=a.overwrite)
        print(f"imported into {out}/pred; evaluate with: spineseg evaluate --pred {out}/pred --gt DATA --out {out}/eval")
    return 0


def cmd_sanity(a) -> int:
    from .eval.sanity import run_sanity, summary_line
    from .infer.predict import Predictor

    slices = None
    if a.slices:
        try:
            slices = tuple(int(x) for x in a.slices.split(":"))
            assert len(slices) == 2
        except (ValueError, AssertionError):
            raise SpinesegError(f"--slices must look like a:b (got {a.slices!r})") from None
    pred = Predictor(a.model, device=a.device, postprocess=a.postprocess, tta=a.tta, engine=a.engine)
    rep = run_sanity(pred, a.input, a.out, spacing=a.spacing, slices=slices, progress=not a.quiet)
    for r in rep["rows"]:
        if not (r["order_raw"] and r["order_post"]):
            print(f"  {r['source']} [{r['slice']}]: raw: {r['reason_raw'] or 'pass'} | "
                  f"post: {r['reason_post'] or 'pass'}")
    for name, summ in rep["inputs"].items():
        print(summary_line(name, summ))
    if len(rep["inputs"]) > 1:
        print(summary_line("overall", rep["overall"]))
    print(f"wrote {Path(a.out) / 'sanity.csv'}, sanity.json and {len(rep['montages'])} montage(s) to {a.out}")
    return 0


def cmd_pack(a) -> int:
    from .models.checkpoint import pack_checkpoint

    dst = pack_checkpoint(a.model, a.out, half=not a.float32, critics=a.with_critics)
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_bench(a) -> int:
    from .bench import attention_benchmark

    attention_benchmark(json_path=a.json, sizes=a.sizes)
    return 0


# ----------------------------------------------------------------------------------------------- parser

def _shares(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _spacing_mm(text: str) -> float:
    """A pixel spacing in mm: a finite number above 0 (a negative one would turn the image round)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel spacing in mm, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"a pixel spacing must be a finite number of mm above 0, got {text!r}")
    return value


def _add_tta(s) -> None:
    # the choices of spineseg.infer.predict.TTA (not imported here: it would load torch for --help)
    s.add_argument("--tta", choices=["flip", "none"], default="none",
                   help="none (default): one network pass; flip: average each slice's prediction with its left-right "
                   "mirror image's (twice the network time)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spineseg", description="Segmentation of axial lumbar spine MRI: "
                                "vertebral body, vertebral foramen (canal), lamina.")
    p.add_argument("--version", action="version", version=f"spineseg {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("phantom", help="generate the synthetic axial lumbar MRI data set (nnU-Net raw layout)")
    s.add_argument("--out", required=True, help="folder to write the data set to (nnU-Net raw layout)")
    s.add_argument("--patients", type=int, required=True, help="number of virtual patients")
    s.add_argument("--slices-per-patient", type=int, required=True, help="slices per patient (one vertebral level each)")
    s.add_argument("--size", type=int, default=512, help="image size in pixels (without --randomize)")
    s.add_argument("--spacing", type=_spacing_mm, default=0.3906, help="pixel spacing in mm (without --randomize)")
    s.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same files, byte for byte")
    s.add_argument("--contrast", default="t2", help="t2, t2fs, water, fat, t1, random or mixed")
    s.add_argument("--preview", help="write a PNG grid of slices with label outlines")
    s.add_argument("--randomize", action="store_true",
                   help="domain randomisation per slice: contrast, field of view 180-420 mm, pixel size, blur, noise, "
                        "bias, spine position (overrides --size, --spacing, --contrast)")
    s.add_argument("--positions", type=_shares, default=None, metavar="D,E,I,P",
                   help="shares of slices at the disc, the endplate, below the pedicles and through the pedicles, "
                        "normalised (default 0.25,0.20,0.20,0.35; phantoms made before 2026-11-24 used "
                        "0.14,0.22,0.24,0.40)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_phantom)

    s = sub.add_parser("split", help="write patient-level splits.json (kfold or paper)")
    s.add_argument("--data", required=True, help="data set folder")
    s.add_argument("--scheme", choices=["kfold", "paper"], default="kfold", help="kfold: 5 folds over patients; paper: five random 60/10/30 patient splits")
    s.add_argument("--out", help="default: DATA/splits.json")
    s.set_defaults(func=cmd_split)

    s = sub.add_parser("preprocess", help="run (and cache) the paper's preprocessing on a data set")
    s.add_argument("--data", required=True, help="data set folder")
    s.add_argument("--size", type=int, default=512, help="network input size in pixels")
    s.add_argument("--target-spacing", type=_spacing_mm, default=None, help="working resolution in mm (default: fit ROI)")
    s.add_argument("--spacing", type=_spacing_mm, default=None, help="pixel spacing for PNG/TIFF inputs (mm)")
    s.add_argument("--cache", default=None, help="cache folder ($SPINESEG_CACHE if set, else ~/.cache/spineseg/preprocessed)")
    s.add_argument("--preview", help="write a PNG of preprocessed slices")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("info", help="print the geometry of every stack of an image or DICOM folder (JSON)")
    s.add_argument("input", help="image file or DICOM folder")
    s.add_argument("--spacing", type=_spacing_mm, default=None, help="pixel spacing (mm) of a PNG / TIFF input")
    s.set_defaults(func=cmd_info)

    from .models.registry import model_names

    s = sub.add_parser("train", help="train a model (an ablation row or the full adversarial model)")
    s.add_argument("--data", help="data set folder (nnU-Net raw layout or images/ + masks/); with --resume: the same "
                   "data, possibly moved (checked by content)")
    s.add_argument("--model", choices=model_names(), help="registry row to train (with --resume: must match the run)")
    s.add_argument("--config", help="YAML schedule, e.g. configs/paper.yaml or cpu-quick (default: built-in)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override one config value, dotted key (repeatable), e.g. --set train.epochs=2")
    s.add_argument("--fold", type=int, default=None, help="fold of the split to train (default 0)")
    s.add_argument("--split", choices=["kfold", "paper"], default=None, help="split scheme (default kfold)")
    s.add_argument("--splits", help="use this splits.json instead of computing one (checked for patient leakage)")
    s.add_argument("--case-is-patient", action="store_true",
                   help="the data set has no cases.csv and every case is its own patient")
    s.add_argument("--unlabeled", nargs="+", metavar="PATH",
                   help="unlabelled real images (files, DICOM folders or folders of them) for output-space domain "
                   "adaptation: a label-map critic makes predictions on them look like those on the training data "
                   "(weight train.domain_weight), and / or self-training on their anatomically plausible "
                   "predictions (weight train.pseudo_weight, off by default)")
    s.add_argument("--unlabeled-spacing", type=_spacing_mm, default=None,
                   help="pixel spacing (mm) of unlabelled PNG / TIFF images")
    s.add_argument("--unlabeled-no-body", metavar="CSV", default=None,
                   help="self-training: CSV (columns image,slice) of unlabelled slices known to hold no vertebral "
                   "body (disc level, e.g. from a Dixon pair's fat fraction); their target has no body")
    s.add_argument("--unlabeled-body", metavar="CSV", default=None,
                   help="self-training: CSV (columns image,slice) of unlabelled slices known to hold a vertebral body; "
                   "each gets a term of its own (weight train.body_label_weight): a body of at least "
                   "train.body_label_area_mm2 is somewhere on it")
    s.add_argument("--init", metavar="CHECKPOINT", default=None,
                   help="fine-tune: start from this checkpoint's weights (RUN/best.pt, a packed model, or "
                   "'pretrained'; same network config), with fresh optimisers and schedule")
    s.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, tb/)")
    s.add_argument("--resume", action="store_true", help="continue OUT/last.pt; only train.epochs and "
                   "train.max_minutes may change (through --set)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    s.add_argument("--cache", default=None, help="preprocessing cache folder (default $SPINESEG_CACHE or "
                   "~/.cache/spineseg/preprocessed)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("predict", help="segment images with a trained model; measure the canal; DICOM SEG, report")
    s.add_argument("--model", help="checkpoint (RUN/best.pt), an exported .onnx file, or 'pretrained'")
    s.add_argument("--input", nargs="+", help="NIfTI / MHA / DICOM series folder / PNG, or folders")
    s.add_argument("--run", help="a training run folder: predict the test patients of its split (with --data)")
    s.add_argument("--data", help="the data set folder of --run")
    s.add_argument("--out", required=True, help="output folder for label maps, overlays, measurements and reports")
    s.add_argument("--spacing", type=_spacing_mm, default=None, help="pixel spacing for PNG/TIFF inputs (mm)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run the network")
    s.add_argument("--engine", choices=["torch", "onnx"], default=None,
                   help="torch or onnxruntime (fp32, CPU); default: onnx on the CPU in fp32 (a .pt is exported once and cached), else torch")
    s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast, only where the processor has native bfloat16")
    s.add_argument("--batch-size", type=int, default=1, help="slices per network call")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: every available core)")
    s.add_argument("--no-overlays", action="store_true", help="do not write overlay PNGs")
    s.add_argument("--postprocess", choices=list(POSTPROCESS), default=DEFAULT_POSTPROCESS,
                   help="anatomical rules (body nearest the canal, one lamina per side), each structure's largest region, or none (raw)")
    _add_tta(s)
    s.add_argument("--dicom-seg", action="store_true", help="also write {name}.seg.dcm for DICOM inputs")
    s.add_argument("--report", action="store_true", help="also write a self-contained report.html")
    s.add_argument("--stenosis-area", default="100,75", metavar="REL,ABS",
                   help="canal area thresholds (mm2) of relative / absolute stenosis (research only)")
    s.add_argument("--stenosis-ap", default="12,10", metavar="REL,ABS",
                   help="canal AP diameter thresholds (mm) of relative / absolute stenosis (research only)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("export", help="export a model to ONNX (clustered attention included)")
    s.add_argument("--model", required=True, help="checkpoint (RUN/best.pt) or 'pretrained'")
    s.add_argument("--onnx", required=True, help="the .onnx file to write")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("evaluate", help="per-slice metrics (Dice, IoU, PPV, sensitivity, HD, HD95 in mm) and summaries")
    s.add_argument("--pred", help="folder of predicted label maps (NIfTI or PNG); with --run default RUN/pred")
    s.add_argument("--gt", help="folder of ground-truth label maps, or a data set root (with --run: the run's data)")
    s.add_argument("--out", required=True, help="folder for per_slice.csv and the summaries")
    s.add_argument("--splits", help="splits.json: evaluate only the test cases of --fold")
    s.add_argument("--fold", type=int, default=None, help="fold of --splits whose test cases are evaluated")
    s.add_argument("--run", help="training run folder (splits.json + config.json): evaluate its fold's test cases")
    s.add_argument("--hd95", choices=["monai", "pooled"], default="monai",
                   help="monai: max of the directed 95th percentiles (default); pooled: MedPy's definition")
    s.add_argument("--spacing", type=_spacing_mm, default=None, help="pixel spacing for PNG label maps (mm)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("compare", help="paper-style tables with paired tests between evaluated runs")
    s.add_argument("runs", nargs="+", help="folders holding per_slice.csv (or eval/per_slice.csv); folders "
                   "sharing a name (run.json) are folds of one model and are pooled")
    s.add_argument("--out", required=True, help="folder for tables and figures")
    s.add_argument("--reference", help="run the p-values refer to (default: the last run)")
    s.add_argument("--test", choices=["ttest", "wilcoxon"], default="ttest",
                   help="test that marks significance (both are in tables.csv; default: paired t-test)")
    s.add_argument("--pairing", choices=["patient", "slice"], default="patient",
                   help="pair on per-patient means (default) or per slice (slices of a patient are not independent)")
    s.add_argument("--correction", choices=["holm", "none"], default="holm",
                   help="Holm's correction over all tests of the table (default) or none")
    s.add_argument("--patients", help="cases.csv (case,patient) for per_slice.csv files without a patient column; "
                   "without one each case is its own patient")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("experiment", help="train, predict, evaluate several models on one split, then compare")
    s.add_argument("--data", required=True, help="data set folder")
    s.add_argument("--models", required=True, help="comma-separated registry names, and nnunet for nnU-Net v2 2D "
                   "trained through its own command lines")
    s.add_argument("--split", choices=["kfold", "paper"], default="kfold", help="split scheme")
    s.add_argument("--folds", default="0", help="comma-separated fold indices")
    budget = s.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-minutes", type=float, help="equal training wall time per model")
    budget.add_argument("--epochs", type=int, help="equal number of epochs per model")
    s.add_argument("--config", default="cpu-quick", help="YAML schedule every model is trained with")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override one config value for every model, dotted key (repeatable)")
    s.add_argument("--case-is-patient", action="store_true",
                   help="the data set has no cases.csv and every case is its own patient")
    s.add_argument("--nnunet-epochs", type=int, default=None,
                   help="length of the nnunet row (nnUNetTrainer_<N>epochs); default: the longest that fits the budget")
    s.add_argument("--reference", help="row the p-values refer to (default: spineseg if present, else the last)")
    s.add_argument("--postprocess", choices=list(POSTPROCESS), default=DEFAULT_POSTPROCESS,
                   help="anatomical rules (body nearest the canal, one lamina per side), each structure's largest region, or none (raw)")
    s.add_argument("--seed", type=int, default=0, help="random seed of every training run")
    s.add_argument("--out", required=True, help="experiment folder (runs, predictions, evaluations, comparison)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_experiment)

    s = sub.add_parser("nnunet", help="export a data set to nnU-Net v2 / import its predictions")
    nsub = s.add_subparsers(dest="action", required=True)
    e = nsub.add_parser("export", help="write a data set as an nnU-Net v2 raw data set (with its patient map and splits)")
    e.add_argument("--data", required=True, help="data set folder to export")
    e.add_argument("--out", required=True, help="nnUNet_raw folder")
    e.add_argument("--split-file", help="splits.json to turn into a patient-grouped splits_final.json")
    e.add_argument("--id", type=int, default=501, help="nnU-Net data set id (1-999)")
    e.add_argument("--name", default="LumbarAxial", help="nnU-Net data set name")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export")
    e.set_defaults(func=cmd_nnunet)
    i = nsub.add_parser("import", help="turn nnU-Net predictions into a run folder that evaluate and compare read")
    i.add_argument("pred_dir", help="nnU-Net's prediction folder")
    i.add_argument("--out", required=True, help="run folder to create")
    i.add_argument("--name", default="nnunet", help="row name in tables")
    i.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    i.set_defaults(func=cmd_nnunet)

    s = sub.add_parser("sanity", help="anatomical plausibility of raw and post-processed predictions on unlabelled scans")
    s.add_argument("--model", required=True, help="checkpoint, or 'pretrained'")
    s.add_argument("--input", required=True, nargs="+",
                   help="volumes, DICOM series folders, PNG slices, or folders of them (a folder of single slices "
                        "is one input with one montage)")
    s.add_argument("--out", default="sanity", help="folder for sanity.csv, sanity.json and montage_INPUT.png")
    s.add_argument("--slices", help="only slices a:b of each volume")
    s.add_argument("--postprocess", choices=list(POSTPROCESS), default=DEFAULT_POSTPROCESS,
                   help="post-processing checked beside the raw prediction")
    _add_tta(s)
    s.add_argument("--spacing", type=_spacing_mm, default=None, help="pixel spacing for PNG/TIFF inputs (mm)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run the network")
    s.add_argument("--engine", choices=["torch", "onnx"], default=None,
                   help="as in predict (default: onnx on the CPU in fp32, else torch)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_sanity)

    s = sub.add_parser("pack", help="write a small inference-only copy of a checkpoint (float16 weights)")
    s.add_argument("--model", required=True, help="checkpoint to pack (RUN/best.pt)")
    s.add_argument("--out", required=True, help="file to write")
    s.add_argument("--float32", action="store_true", help="keep float32 weights (default: float16, half the size)")
    s.add_argument("--with-critics", action="store_true",
                   help="keep the critics' weights too, for fine-tuning the packed file with train --init")
    s.set_defaults(func=cmd_pack)

    s = sub.add_parser("bench", help="benchmarks")
    s.add_argument("what", choices=["attention"], help="what to measure: naive vs SDPA vs clustered attention")
    s.add_argument("--json", default=None, help="also write the rows as JSON")
    s.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="token counts N")
    s.set_defaults(func=cmd_bench)
    _finish(p)
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (where it has one worth showing)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every sub-command shows defaults in its help and takes --quiet."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                sp.formatter_class = _HelpFormatter
                if not any("--quiet" in a.option_strings for a in sp._actions) and not any(
                        isinstance(a, argparse._SubParsersAction) for a in sp._actions):
                    sp.add_argument("--quiet", action="store_true", help="no progress output")
                _finish(sp)


# output paths that name a file (sub-command -> argument); every other `--out` names a folder
FILE_OUTPUTS = {"split": ("out",), "pack": ("out",), "bench": ("json",), "preprocess": ("preview",),
                "phantom": ("preview",), "export": ("onnx",)}


def check_outputs(a) -> None:
    """Refuse unusable output paths with one line before any work starts; clean a killed run's debris."""
    from .io.atomic import check_output_file, check_output_folder, remove_stale_temporaries

    files = FILE_OUTPUTS.get(a.command, ())
    for name in files:
        if getattr(a, name, None):
            check_output_file(getattr(a, name))
    if "out" not in files and getattr(a, "out", None):
        out = check_output_folder(a.out)
        remove_stale_temporaries(out)


def _warnings_to_stderr() -> None:
    """Library warnings (e.g. a DICOM folder's skipped files or split stacks) as one plain stderr line each."""
    import logging

    log = logging.getLogger("spineseg")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("spineseg: warning: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _warnings_to_stderr()
    try:
        check_outputs(a)
        return int(a.func(a) or 0)
    except SpinesegError as exc:
        if a.debug:
            raise
        print(f"spineseg: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a file system that refuses a write mid-way: still one line
        if a.debug:
            raise
        where = exc.filename or getattr(a, "out", None) or ""
        print(f"spineseg: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spineseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
