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
