import json
import shutil

import numpy as np
import pytest

from spineseg.cli import main
from spineseg.errors import SpinesegError
from spineseg.eval.evaluate import evaluate_folders, read_per_slice, write_reports
from spineseg.eval.figures import FN_COLOR, FP_COLOR, error_overlay
from spineseg.io.images import read_label, save_slice_nifti


@pytest.fixture()
def pred_gt(tmp_path, small_phantom):
    """Predictions = ground truth with the lamina dilated in some cases (known errors)."""
    from scipy import ndimage as ndi

    gt_dir = small_phantom / "labelsTr"
    pred = tmp_path / "pred"
    pred.mkdir()
    for i, f in enumerate(sorted(gt_dir.iterdir())[:6]):
        lab = read_label(f)
        p = lab.data[0].copy()
        if i % 2:
            p[ndi.binary_dilation(p == 3)] = 3
        save_slice_nifti(pred / f.name, p, lab.spacing)
    return pred, small_phantom


def test_evaluate_folders_and_reports(pred_gt, tmp_path):
    pred, gt = pred_gt
    cases = sorted(p.name[:-7] for p in pred.iterdir())
    rows = evaluate_folders(pred, gt, cases=cases)
    assert len(rows) == 6 * 3
    lam = [r for r in rows if r["structure"] == "lamina"]
    assert [r["dice"] == pytest.approx(1.0) for r in lam] == [True, False] * 3
    body = [r for r in rows if r["structure"] == "vertebral_body"]
    # a disc-level slice has no body in truth or prediction: skipped, not scored; every other body is exact
    assert 0 < sum(r["absent_both"] for r in body) < len(body)
    assert all(r["dice"] == pytest.approx(1.0) and r["hd95"] == 0 for r in body if not r["absent_both"])
    summ = write_reports(rows, tmp_path / "ev")
    for f in ("per_slice.csv", "summary.md", "summary.csv", "summary.tex"):
        assert (tmp_path / "ev" / f).exists()
    back = read_per_slice(tmp_path / "ev" / "per_slice.csv")
    assert len(back) == 18 and set(back[0]) >= {"case", "structure", "dice", "iou", "ppv", "sensitivity", "hd", "hd95"}
    assert summ["lamina"]["dice"] < 1.0 and summ["vertebral_body"]["dice"] == pytest.approx(1.0)
    written = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert written["slices"] == 6
    assert written["structures"]["lamina"]["dice"] == pytest.approx(np.mean([r["dice"] for r in lam]))


def test_missing_prediction_is_an_error_naming_it(pred_gt, capsys, tmp_path):
    pred, gt = pred_gt
    rc = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "no prediction for ground-truth case" in err and err.count("\n") == 1


def test_rows_carry_the_patient_of_the_data_set_map(pred_gt):
    pred, gt = pred_gt
    rows = evaluate_folders(pred, gt, cases=["P000_00", "P000_01", "P001_00"], fold=3)
    assert {(r["case"], r["patient"]) for r in rows} == {("P000_00", "P000"), ("P000_01", "P000"), ("P001_00", "P001")}
    assert {r["fold"] for r in rows} == {3}


def test_rows_without_patient_map_leave_the_patient_empty(pred_gt, tmp_path):
    pred, gt = pred_gt
    labels = tmp_path / "labels"  # a bare label folder: no cases.csv anywhere near it
    shutil.copytree(gt / "labelsTr", labels)
    rows = evaluate_folders(pred, labels, cases=["P000_00"])
    assert {r["patient"] for r in rows} == {""}


def _splits_with_one_fold_per_patient_pair(path, patients_per_fold=(("P000", "P001"), ("P002",))):
    folds = [{"train": [], "val": [], "test": [f"{p}_{k:02d}" for p in ps for k in range(2)]}
             for ps in patients_per_fold]
    path.write_text(json.dumps(folds))
    return folds


def _evaluated_cases(out):
    return sorted({r["case"] for r in read_per_slice(out / "per_slice.csv")})


def test_evaluate_one_fold_of_a_splits_file(pred_gt, tmp_path):
    pred, gt = pred_gt  # predictions exist for 6 cases (P000-P002); fold 1 tests only P002
    folds = _splits_with_one_fold_per_patient_pair(tmp_path / "splits.json")
    out = tmp_path / "ev"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out),
                 "--splits", str(tmp_path / "splits.json"), "--fold", "1"]) == 0
    assert _evaluated_cases(out) == sorted(folds[1]["test"])
    rows = read_per_slice(out / "per_slice.csv")
    assert {r["fold"] for r in rows} == {"1"} and {r["patient"] for r in rows} == {"P002"}


def test_evaluate_the_fold_of_a_training_run(pred_gt, tmp_path):
    pred, gt = pred_gt
    run = tmp_path / "run"
    run.mkdir()
    folds = _splits_with_one_fold_per_patient_pair(run / "splits.json")
    (run / "config.json").write_text(json.dumps({"run": {"fold": 0, "data": str(gt)}}))
    shutil.copytree(pred, run / "pred")
    out = tmp_path / "ev"
    assert main(["evaluate", "--run", str(run), "--out", str(out)]) == 0  # pred and gt default from the run
    assert _evaluated_cases(out) == sorted(folds[0]["test"])


def test_a_fold_without_test_list_is_refused_in_one_line(pred_gt, tmp_path, capsys):
    pred, gt = pred_gt
    (tmp_path / "splits.json").write_text(json.dumps([{"train": ["P000_00"], "val": ["P001_00"]}]))
    rc = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "e"),
               "--splits", str(tmp_path / "splits.json"), "--fold", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "fold 0 has no test list" in err and err.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_error_overlay_colours():
    img = np.zeros((10, 10))
    gt = np.zeros((10, 10), np.uint8)
    pred = np.zeros((10, 10), np.uint8)
    gt[2:5, 2:5] = 1
    pred[3:6, 3:6] = 1
    rgb = error_overlay(img, pred, gt, alpha=1.0)
    assert tuple(rgb[5, 5]) == FP_COLOR and tuple(rgb[2, 2]) == FN_COLOR
    assert tuple(rgb[3, 3]) != FP_COLOR and rgb[3, 3, 2] > rgb[3, 3, 0]  # TP in the body colour (blue)


def test_nnunet_export_and_import(small_phantom, tmp_path):
    from spineseg.data.splits import kfold_splits
    from spineseg.io.layouts import load_dataset
    from spineseg.io.nnunet import export_nnunet, import_nnunet

    splits = kfold_splits(load_dataset(small_phantom))
    folder = export_nnunet(small_phantom, tmp_path / "raw", splits, 502, "Test")
    assert folder.name == "Dataset502_Test"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 16 and meta["labels"]["lamina"] == 3
    nn = json.loads((folder / "splits_final.json").read_text())
    assert len(nn) == 5
    pat = lambda ids: {i.split("_")[0] for i in ids}  # noqa: E731
    for s, o in zip(nn, splits):
        assert not (pat(s["train"]) & pat(s["val"])) and sorted(s["val"]) == sorted(o["test"])
    import csv

    with open(folder / "cases.csv", newline="") as fh:  # the patient map travels with the exported cases
        exported = {r["case"]: r["patient"] for r in csv.DictReader(fh)}
    assert exported == {c.case_id: c.patient for c in load_dataset(small_phantom)}
    img = read_label(folder / "labelsTr" / "P000_00.nii.gz")
    assert img.spacing == pytest.approx((1.5625, 1.5625))
    # nnU-Net's predictions come back as {case}.nii.gz
    preds = tmp_path / "nnpred"
    preds.mkdir()
    for f in sorted((folder / "labelsTr").iterdir())[:3]:
        shutil.copy(f, preds / f.name)
    run = import_nnunet(preds, tmp_path / "nnrun")
    assert len(list((run / "pred").iterdir())) == 3 and json.loads((run / "run.json").read_text())["name"] == "nnunet"
    rows = evaluate_folders(run / "pred", small_phantom, cases=[f.name[:-7] for f in sorted(preds.iterdir())])
    assert all(r["dice"] == pytest.approx(1.0) for r in rows if not r["absent_both"])
    assert sum(not r["absent_both"] for r in rows) >= 7  # canal and laminae on every slice, a body on most


def test_nnunet_verify_dataset_integrity(small_phantom, tmp_path):
    import nnunetv2  # noqa: F401  (installed by `make test`; a missing install must fail, not skip)
    import os
    import shutil as sh
    import subprocess
    import sys
    from pathlib import Path

    from spineseg.io.nnunet import export_nnunet

    export_nnunet(small_phantom, tmp_path / "raw", None, 503, "Verify")
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"))
    exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    exe = str(exe) if exe.exists() else sh.which("nnUNetv2_plan_and_preprocess")
    r = subprocess.run([exe, "-d", "503", "--verify_dataset_integrity", "-c", "2d",
                        "-np", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def test_dice_by_slice_position(tmp_path):
    from spineseg.eval.evaluate import dice_by_position

    (tmp_path / "cases.csv").write_text("case,patient,position\nA,P0,disc\nB,P0,pedicle\nC,P1,disc\n")
    body = lambda d: {"dice": d}  # noqa: E731
    rows = [{"case": "A", "slice": 0, "vertebral_body": body(0.0), "vertebral_foramen": body(0.8), "lamina": None},
            {"case": "C", "slice": 0, "vertebral_body": None, "vertebral_foramen": body(0.6), "lamina": body(0.5)},
            {"case": "B", "slice": 0, "vertebral_body": body(0.9), "vertebral_foramen": body(0.7), "lamina": body(0.7)}]
    out = dice_by_position(rows, tmp_path / "cases.csv")
    # the disc slice whose body is absent in truth and prediction is left out; the one with a false body counts 0
    assert out["disc"]["vertebral_body"] == {"slices": 1, "dice": 0.0}
    assert out["disc"]["vertebral_foramen"] == {"slices": 2, "dice": 0.7}
    assert out["pedicle"]["vertebral_body"]["dice"] == 0.9 and "lamina" in out["disc"]
    (tmp_path / "plain.csv").write_text("case,patient\nA,P0\n")
    assert dice_by_position(rows, tmp_path / "plain.csv") is None


def test_evaluate_writes_dice_by_position_for_a_phantom(tmp_path):
    """`spineseg evaluate` on a phantom data set (its cases.csv names each slice's position) writes
    by_position.json from the same per-slice rows as the summary; on a data set without positions it writes
    none and removes one left by an earlier evaluation in the same folder."""
    import csv
    from collections import Counter

    import nibabel as nib

    from spineseg.data.phantom_dataset import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", patients=3, slices_per_patient=2, size=96, seed=3, progress=False)
    pred = tmp_path / "pred"
    shutil.copytree(data / "labelsTr", pred)
    positions = {r["case"]: r["position"] for r in csv.DictReader((data / "cases.csv").open())}
    victim = sorted(pred.iterdir())[0]  # this prediction loses its canal
    nii = nib.load(victim)
    arr = np.asarray(nii.dataobj).astype(np.uint8)
    arr[arr == 2] = 0
    nib.save(nib.Nifti1Image(arr, nii.affine, nii.header), victim)
    assert main(["evaluate", "--pred", str(pred), "--gt", str(data), "--out", str(tmp_path / "ev")]) == 0
    got = json.loads((tmp_path / "ev" / "by_position.json").read_text())
    assert {p: v["vertebral_foramen"]["slices"] for p, v in got.items()} == dict(Counter(positions.values()))
    hit = positions[victim.name.split(".")[0]]
    n_hit = Counter(positions.values())[hit]
    assert got[hit]["vertebral_foramen"]["dice"] == round((n_hit - 1) / n_hit, 4)
    assert all(v["vertebral_foramen"]["dice"] == 1.0 for p, v in got.items() if p != hit)
    (data / "cases.csv").write_text("case,patient\n" + "".join(f"{c},P{i}\n" for i, c in enumerate(positions)))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(data), "--out", str(tmp_path / "ev")]) == 0
    assert not (tmp_path / "ev" / "by_position.json").exists()


def test_dataset_root_gt_finds_named_cases_in_labelsTr_beside_labelsTs(small_phantom, tmp_path):
    from spineseg.eval.evaluate import gt_label_files

    root = tmp_path / "ds"
    shutil.copytree(small_phantom, root)
    (root / "labelsTs").mkdir()
    tr = sorted((root / "labelsTr").iterdir())
    shutil.copy(tr[0], root / "labelsTs" / "T000_00.nii.gz")  # a test-set case of its own
    assert list(gt_label_files(root)) == ["T000_00"]  # all cases of a root: its test set
    named = [tr[1].name[:-7], tr[2].name[:-7]]  # a run's test fold, drawn from labelsTr
    assert {k: v.parent.name for k, v in gt_label_files(root, named).items() if k in named} == dict.fromkeys(
        named, "labelsTr")
    pred = tmp_path / "pred"
    pred.mkdir()
    for f in tr[1:3]:
        shutil.copy(f, pred / f.name)
    rows = evaluate_folders(pred, root, cases=named)
    assert {r["case"] for r in rows} == set(named) and all(r["dice"] == 1.0 for r in rows if not r["absent_both"])
    shutil.copy(tr[1], root / "labelsTs" / tr[1].name)  # now ambiguous
    with pytest.raises(SpinesegError, match="in both labelsTs and labelsTr"):
        gt_label_files(root, named)


def test_a_prediction_on_another_grid_is_refused_not_scored_voxel_by_voxel(tmp_path, capsys):
    import nibabel as nib

    from spineseg.data.phantom_dataset import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", patients=2, slices_per_patient=1, size=64, seed=4, progress=False)
    pred = tmp_path / "pred"
    shutil.copytree(data / "labelsTr", pred)
    victim = sorted(pred.iterdir())[0]
    nii = nib.load(victim)
    affine = nii.affine.copy()
    affine[:3, :2] *= 2  # the same labels, voxels twice as large in plane
    nib.save(nib.Nifti1Image(np.asarray(nii.dataobj), affine), victim)
    out = tmp_path / "ev"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "prediction grid differs" in err and victim.name in err and err.count("\n") == 1
    assert not out.exists()
    affine = nii.affine.copy()
    affine[:3, 3] += 7.0  # the same voxel size, moved by 7 mm
    nib.save(nib.Nifti1Image(np.asarray(nii.dataobj), affine), victim)
    assert main(["evaluate", "--pred", str(pred), "--gt", str(data), "--out", str(out)]) == 2
    assert "prediction grid differs" in capsys.readouterr().err
    nib.save(nii, victim)  # back on the truth's grid: scored
    assert main(["evaluate", "--pred", str(pred), "--gt", str(data), "--out", str(out)]) == 0


def test_a_case_missing_from_a_phantom_cases_csv_is_one_error_and_leaves_earlier_reports(tmp_path, capsys):
    from spineseg.data.phantom_dataset import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "ph", patients=2, slices_per_patient=2, size=64, seed=5, progress=False)
    pred = tmp_path / "pred"
    shutil.copytree(data / "labelsTr", pred)
    out = tmp_path / "ev"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(data), "--out", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    first = sorted((data / "labelsTr").iterdir())[0]
    shutil.copy(first, data / "labelsTr" / "EXTRA.nii.gz")
    shutil.copy(first, pred / "EXTRA.nii.gz")
    assert main(["evaluate", "--pred", str(pred), "--gt", str(data / "labelsTr"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "EXTRA" in err and "cases.csv" in err and err.count("\n") == 1
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
