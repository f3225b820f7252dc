import json

from spineseg.cli import main


def test_experiment_runs_compares_and_resumes(small_phantom, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exp"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("preprocess: {target_size: 64}\nmodel: {base: 4, clusters: 8}\ncritic: {base: 4}\n"
                   "train: {batch_size: 4}\n")
    args = ["experiment", "--data", str(small_phantom), "--models", "unet,segnet", "--epochs", "1",
            "--config", str(cfg), "--out", str(out), "--quiet"]
    assert main(args) == 0
    for m in ("unet", "segnet"):
        assert (out / "runs" / m / "fold0" / "done.json").exists()
        assert (out / "runs" / m / "fold0" / "eval" / "per_slice.csv").exists()
    for f in ("tables.md", "tables.tex", "tables.csv", "bar_dice.png", "bar_hd95.png", "overlays.png"):
        assert (out / "compare" / f).exists(), f
    meta = json.loads((out / "experiment.json").read_text())
    assert meta["models"] == ["unet", "segnet"] and meta["phantom"]["seed"] == 3
    # a second call finds everything done: no training happens
    from spineseg.train import loop

    monkeypatch.setattr(loop.Trainer, "fit", lambda self: (_ for _ in ()).throw(AssertionError("retrained")))
    assert main(args) == 0
    # a later call with other settings is refused before anything is reused or experiment.json rewritten
    stored = (out / "experiment.json").read_text()
    done = (out / "runs" / "unet" / "fold0" / "done.json").read_text()
    for extra in (["--epochs", "2"], ["--seed", "5"], ["--postprocess", "none"], ["--set", "model.base=8"],
                  ["--models", "unet"]):
        changed = list(args)
        if extra[0] in changed:
            changed[changed.index(extra[0]) + 1] = extra[1]
        else:
            changed += extra
        capsys.readouterr()
        assert main(changed) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "experiment.json" in err, err
        assert (out / "experiment.json").read_text() == stored
    # the same config file path with other content: the runs' config.json records what they were trained with
    cfg.write_text(cfg.read_text().replace("base: 4, clusters", "base: 6, clusters"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "runs/unet/fold0/config.json" in err.replace("\\", "/") and "model.base" in err, err
    assert (out / "experiment.json").read_text() == stored
    assert (out / "runs" / "unet" / "fold0" / "done.json").read_text() == done


def test_experiment_may_only_add_models_or_folds(tmp_path):
    import pytest

    from spineseg.errors import SpinesegError
    from spineseg.experiment import check_same_settings

    meta = {"data": "/d", "models": ["unet", "segnet"], "folds": [0], "epochs": 1, "seed": 0, "sets": {}}
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(meta))
    check_same_settings(path, {**meta, "models": ["unet", "segnet", "spineseg"], "folds": [0, 1]})
    for change in ({"models": ["segnet"]}, {"folds": [1]}, {"epochs": 2}, {"sets": {"model": {"base": 8}}}):
        with pytest.raises(SpinesegError, match="experiment.json"):
            check_same_settings(path, {**meta, **change})


def test_experiment_refuses_bad_arguments_before_any_work(small_phantom, tmp_path, monkeypatch, capsys):
    from spineseg.train import loop

    monkeypatch.setattr(loop.Trainer, "fit", lambda self: (_ for _ in ()).throw(AssertionError("trained")))
    out = tmp_path / "exp"
    for models, more, says in (("unet,segnet", ["--folds", "a"], "--folds"),
                               ("unet,segnet", ["--folds", ""], "--folds"),
                               ("unet,segnet", ["--folds", "0,0"], "--folds"),
                               ("unet,segnet", ["--folds", "-1"], "--folds"),
                               ("unet,unet", [], "more than once"),
                               (",", [], "no model"),
                               ("unet,nosuch", [], "unknown models"),
                               ("unet,segnet", ["--reference", "foo"], "--reference")):
        args = ["experiment", "--data", str(small_phantom), "--models", models, "--epochs", "1",
                "--out", str(out), "--quiet", *more]
        capsys.readouterr()
        rc = main(args)  # no traceback: one line, exit 2
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and says in err, (models, more, err)
        assert not out.exists(), (models, more)


def test_nnunet_budget_counts_a_resumed_row_whole(tmp_path):
    from spineseg.experiment import matched_budget_minutes

    def done(model, record):
        (tmp_path / "runs" / model / "fold0").mkdir(parents=True)
        (tmp_path / "runs" / model / "fold0" / "done.json").write_text(json.dumps(record))

    done("unet", {"epochs": 4, "seconds": 600.0, "wall_seconds": 60.0})  # resumed: the last process ran 1 of 10 min
    done("segnet", {"epochs": 4, "seconds": 1200.0, "wall_seconds": 1210.0})
    assert matched_budget_minutes(tmp_path, ["unet", "segnet", "nnunet"], 0) == 15.0
