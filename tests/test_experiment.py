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
