"""Every sub-command: an unusable output path is one line `spineseg: error: <path>: <problem>`, exit 2,
no traceback, and nothing created; a write that fails mid-way (a full disk) is one line too."""

import errno
from pathlib import Path

import pytest

from spineseg.cli import main

UNWRITABLE = Path("/proc/self")  # refuses new files, even to root


def _commands(ph, tmp):
    img = ph / "imagesTr" / "P000_00_0000.nii.gz"
    return {  # name: (arguments before the output, output flag, the output is a file)
        "phantom": (["phantom", "--patients", "1", "--slices-per-patient", "1", "--size", "64", "--spacing", "3"],
                    "--out", False),
        "split": (["split", "--data", str(ph)], "--out", True),
        "preprocess": (["preprocess", "--data", str(ph), "--size", "64", "--cache", str(tmp / "c")], "--preview", True),
        "train": (["train", "--data", str(ph), "--model", "unet"], "--out", False),
        "predict": (["predict", "--model", "pretrained", "--input", str(img)], "--out", False),
        "evaluate": (["evaluate", "--pred", str(ph / "labelsTr"), "--gt", str(ph)], "--out", False),
        "compare": (["compare", str(tmp)], "--out", False),
        "experiment": (["experiment", "--data", str(ph), "--models", "unet", "--epochs", "1"], "--out", False),
        "nnunet export": (["nnunet", "export", "--data", str(ph)], "--out", False),
        "nnunet import": (["nnunet", "import", str(ph / "labelsTr")], "--out", False),
        "sanity": (["sanity", "--model", "pretrained", "--input", str(img)], "--out", False),
        "pack": (["pack", "--model", "pretrained"], "--out", True),
        "bench": (["bench", "attention", "--sizes", "16"], "--json", True),
        "export": (["export", "--model", "pretrained"], "--onnx", True),
    }


COMMANDS = ["phantom", "split", "preprocess", "train", "predict", "evaluate", "compare", "experiment", "nnunet export",
            "nnunet import", "sanity", "pack", "bench", "export"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("problem", ["existing file or folder", "missing parent", "not writable"])
def test_unusable_output_path_is_one_line_for_every_command(small_phantom, tmp_path, capsys, command, problem):
    args, flag, is_file = _commands(small_phantom, tmp_path)[command]
    if problem == "existing file or folder":  # a file where a folder is wanted, a folder where a file is
        out = tmp_path / "taken"
        out.mkdir() if is_file else out.write_text("mine")
        expect = "is a folder" if is_file else "not a folder"
    elif problem == "missing parent":
        out, expect = tmp_path / "no" / "such" / "out", "does not exist"
    else:
        out, expect = UNWRITABLE / "out", "not writable"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(args + [flag, str(out)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"spineseg: error: {out}: ") and expect in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    if problem == "existing file or folder" and not is_file:
        assert out.read_text() == "mine"


def test_a_write_that_fails_mid_way_is_one_line(small_phantom, tmp_path, capsys, monkeypatch):
    import os

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "s.json"))

    monkeypatch.setattr("spineseg.io.atomic.os.replace", full_disk)
    rc = main(["split", "--data", str(small_phantom), "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0] and "s.json" in err[0]
    assert not [p for p in tmp_path.iterdir() if "spineseg-tmp" in p.name]  # the temporary is removed
