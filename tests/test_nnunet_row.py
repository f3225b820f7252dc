import subprocess
import sys

import pytest

from spineseg.nnunet_row import EPOCH_VARIANTS, trainer_name, variant_for


def test_the_longest_nnunet_variant_that_fits_the_budget_is_chosen():
    assert variant_for(600, 100) == 5  # 5 x 100 s fits 10 min, 10 x 100 s does not
    assert variant_for(600, 59) == 10
    assert variant_for(60, 100) == 1  # nothing fits: nnU-Net's shortest run
    assert trainer_name(1) == "nnUNetTrainer_1epoch" and trainer_name(20) == "nnUNetTrainer_20epochs"
    assert all(n in EPOCH_VARIANTS for n in (1, 5, 10, 20, 50, 100))


def test_nnunet_finds_its_epoch_trainers_through_the_shim():
    # nnU-Net imports every trainer module while looking for one, Primus's too (which needs timm and torchvision)
    find = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "print(f('nnUNetTrainer_5epochs').__name__)")
    shim = "import spineseg.nnunet_cli as c; c._placeholder_for_primus(); " + find
    r = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "nnUNetTrainer_5epochs", r.stderr[-500:]
    try:
        import timm  # noqa: F401
    except ImportError:  # without the shim the search breaks on Primus: the reason the shim exists
        r = subprocess.run([sys.executable, "-c", find], capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "timm" in r.stderr


def test_experiment_with_nnunet_says_how_to_install_it(small_phantom, tmp_path, monkeypatch, capsys):
    import spineseg.nnunet_row as row
    from spineseg.cli import main

    monkeypatch.setattr(row, "nnunet_installed", lambda: False)
    rc = main(["experiment", "--data", str(small_phantom), "--models", "unet,nnunet", "--epochs", "1",
               "--out", str(tmp_path / "e"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "make install" in err and err.count("\n") == 1 and not (tmp_path / "e").exists()
    with pytest.raises(SystemExit):
        main(["experiment", "--data", str(small_phantom), "--models", "unet,nnunet", "--epochs", "1",
              "--nnunet-epochs", "3x", "--out", str(tmp_path / "e")])


def _row(tmp_path, monkeypatch):
    import spineseg.nnunet_row as row

    monkeypatch.setattr(row, "nnunet_installed", lambda: True)
    return row.NnunetRow(tmp_path / "run")


def test_an_interrupted_plan_and_preprocess_is_run_again(small_phantom, tmp_path, monkeypatch):
    # nnU-Net writes nnUNetPlans.json before it preprocesses: killed there, a rerun must not skip preprocessing
    from spineseg.errors import SpinesegError
    from spineseg.io.layouts import load_dataset

    cases = load_dataset(small_phantom)
    test = [c.case_id for c in cases if c.patient in {cases[0].patient, cases[-1].patient}]
    splits = [{"train": [c.case_id for c in cases if c.case_id not in test], "val": [], "test": test}]
    r = _row(tmp_path, monkeypatch)
    calls = []

    def fake(*args, log):
        calls.append(args[0])
        pre = r.run / "nnUNet_preprocessed" / r.folder
        pre.mkdir(parents=True, exist_ok=True)
        (pre / "nnUNetPlans.json").write_text("{}")
        if len(calls) == 1:
            raise SpinesegError("nnUNetv2_plan_and_preprocess failed (exit -9); see its output", log)
        return 1.0

    monkeypatch.setattr(r, "_nnunet", fake)
    with pytest.raises(SpinesegError):
        r.prepare(small_phantom, splits)
    r.prepare(small_phantom, splits)
    assert calls == ["nnUNetv2_plan_and_preprocess"] * 2
    assert (r.run / "nnUNet_preprocessed" / r.folder / "splits_final.json").exists()
    r.prepare(small_phantom, splits)  # complete now: not run a third time
    assert len(calls) == 2


def test_a_rerun_reports_the_training_time_nnunet_took_not_zero(tmp_path, monkeypatch):
    # a rerun (e.g. after a crash in prediction) finds checkpoint_final.pth and skips training; done.json's
    # train_seconds must still be the time the training took
    import spineseg.nnunet_row as row

    def fake(self, *args, log):
        epochs = int(args[args.index("-tr") + 1].split("_")[1].rstrip("epochs").rstrip("epoch"))
        final = self._model_folder(epochs) / "fold_0" / "checkpoint_final.pth"
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_text("")
        return 10.0 * epochs

    monkeypatch.setattr(row.NnunetRow, "_nnunet", fake)
    assert _row(tmp_path, monkeypatch).train_within(0, None, 5)["train_seconds"] == 50.0
    assert _row(tmp_path, monkeypatch).train_within(0, None, 5)["train_seconds"] == 50.0
    first = _row(tmp_path / "b", monkeypatch).train_within(0, 2.0, None)  # 1 epoch: 10 s; 10 epochs fit 120 s
    assert first["epochs"] == 10 and first["train_seconds"] == 100.0
    again = _row(tmp_path / "b", monkeypatch).train_within(0, 2.0, None)
    assert again["epochs"] == 10 and again["one_epoch_seconds"] == 10.0 and again["train_seconds"] == 100.0
