"""`make demo` end to end at toy size: phantom, training, prediction and the metrics file it writes."""

import hashlib
import json

from spineseg import STRUCTURES
from spineseg.demo import TARGETS, main
from spineseg.models.checkpoint import load_checkpoint


def test_demo_writes_metrics_that_name_the_model_file_it_tested(tmp_path, capsys, monkeypatch):
    import spineseg.eval.metrics as metrics_module

    summarise = metrics_module.summarise

    def no_lamina_hd95(rows):  # as when no test slice has both a predicted and a true lamina
        out = summarise(rows)
        out["lamina"] = {**out["lamina"], "hd95": None, "hd95_std": None}
        return out

    monkeypatch.setattr(metrics_module, "summarise", no_lamina_hd95)
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--patients", "6", "--slices-per-patient", "1", "--minutes", "0.01",
                 "--set", "train.dice_batch=true"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "run" / "config.json").read_text())["train"]["dice_batch"] is True  # --set reached it
    assert m["config_changes"] == {"train.dice_batch": True, "train.max_minutes": 0.01}
    assert m["train_precision"] == load_checkpoint(out / "run" / "last.pt")["precision"]
    tested = out / "run" / "best.pt"
    assert m["predictor"]["sha256"] == hashlib.sha256(tested.read_bytes()).hexdigest()
    assert m["predictor"]["checkpoint"] == str(tested)
    assert m["predictor"]["engine"] in ("torch", "onnx") and m["predictor"]["postprocess"] == "anatomical"
    per_slice = json.loads((out / "per_slice.json").read_text())
    assert m["test_slices"] == len(per_slice) >= 1
    for s in STRUCTURES:
        assert 0.0 <= m[s]["dice"] <= 1.0 and m[s]["target_dice"] == TARGETS[s]
    printed = capsys.readouterr().out
    assert "held-out test patients" in printed and m["lamina"]["hd95"] is None
    lamina_row = next(line for line in printed.splitlines() if line.startswith("lamina"))
    assert lamina_row.split()[3] == "-"  # structure, Dice, ±std, HD95


def test_an_unknown_set_key_fails_before_the_phantom_is_made(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--patients", "6", "--slices-per-patient", "1", "--set", "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err
    assert not out.exists()


def test_a_demo_refuses_a_phantom_left_by_other_settings_rather_than_misreport_it(tmp_path, capsys):
    # metrics.json says which phantom it tested on (randomized_phantom, the patient count); an --out holding one
    # generated with other settings would be reused silently and described by this call's flags
    from spineseg.data.phantom_dataset import write_phantom_dataset

    out = tmp_path / "demo"
    write_phantom_dataset(out / "phantom", 2, 1, size=64, spacing=3.0, seed=0, progress=False, randomize=False)
    assert main(["--out", str(out), "--patients", "2", "--slices-per-patient", "1", "--minutes", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "phantom.json" in err and "randomize" in err
    assert not (out / "run").exists()  # refused before any training


def test_a_rerun_demo_takes_its_new_minutes_as_train_resume_does(tmp_path):
    # --minutes on a rerun (the run resumes) used to be dropped: the old cap stayed, and metrics.json reported it
    out = tmp_path / "demo"
    args = ["--out", str(out), "--patients", "6", "--slices-per-patient", "1"]
    assert main(args + ["--minutes", "0.01"]) == 0
    assert main(args + ["--minutes", "0.02"]) == 0
    assert json.loads((out / "run" / "config.json").read_text())["train"]["max_minutes"] == 0.02
    assert json.loads((out / "metrics.json").read_text())["config_changes"]["train.max_minutes"] == 0.02
