import json
import subprocess
import sys
from pathlib import Path

import pytest

from spineseg.cli import main


def test_phantom_command_layout(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["phantom", "--out", str(out), "--patients", "2", "--slices-per-patient", "2", "--size", "96",
                 "--spacing", "2.0", "--preview", str(tmp_path / "p.png"), "--quiet"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T2"} and meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "vertebral_body": 1, "vertebral_foramen": 2, "lamina": 3}
    assert sorted(p.name for p in (out / "imagesTr").iterdir())[0] == "P000_00_0000.nii.gz"
    assert len(list((out / "labelsTr").iterdir())) == 4
    header = (out / "cases.csv").read_text().splitlines()[0]
    assert header.startswith("case,patient,level,position,stenosis")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    import nibabel as nib

    img = nib.load(str(out / "imagesTr" / "P000_00_0000.nii.gz"))
    assert img.shape == (96, 96, 1) and abs(img.header.get_zooms()[0] - 2.0) < 1e-6


def test_existing_output_is_not_touched(tmp_path, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["phantom", "--out", str(out), "--patients", "1", "--slices-per-patient", "1", "--size", "64",
               "--spacing", "3", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(out) in err[0] and "not empty" in err[0]
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.")]  # no partial folder left


def test_bad_input_one_line_no_traceback(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"\x00garbage" * 50)
    r = subprocess.run([sys.executable, "-m", "spineseg.cli", "info", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "x.nii.gz" in r.stderr and "Traceback" not in r.stderr


def test_split_command(small_phantom, tmp_path):
    assert main(["split", "--data", str(small_phantom), "--scheme", "paper", "--out", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert len(s) == 5 and set(s[0]) == {"train", "val", "test"}


def test_every_option_of_every_command_has_a_help_text():
    import argparse

    from spineseg.cli import build_parser

    def options(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                described = {c.dest for c in action._choices_actions if (c.help or "").strip()}
                for name, sub in action.choices.items():
                    assert name in described, f"{prefix}{name} has no help text"
                    yield from options(sub, f"{prefix}{name} ")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield prefix.strip(), action

    missing = [(cmd, a.option_strings or a.dest) for cmd, a in options(build_parser()) if not (a.help or "").strip()]
    assert not missing
    commands = {cmd for cmd, _ in options(build_parser()) if cmd}  # "" holds the global --debug
    for cmd in commands:  # and --quiet everywhere
        assert any(a.option_strings == ["--quiet"] for c, a in options(build_parser()) if c == cmd), cmd


def test_help_shows_defaults():
    from spineseg.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    text = sub.choices["train"].format_help() + sub.choices["predict"].format_help()
    assert "(default: auto)" in text and "(default: anatomical)" in text


def test_every_shipped_resource_is_in_the_package_data():
    """A non-editable install carries only the globs of pyproject.toml: a config missing there is a
    model row silently trained without its own settings (spineseg would lose its critic)."""
    import fnmatch
    import re

    root = Path(__file__).resolve().parents[1]
    line = re.search(r"^spineseg = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.M).group(1)
    globs = re.findall(r'"([^"]+)"', line)  # the [tool.setuptools.package-data] line (no tomllib on 3.10)
    package = root / "src" / "spineseg"
    resources = [p.relative_to(package).as_posix() for d in ("configs", "pretrained")
                 for p in (package / d).rglob("*") if p.is_file() and p.suffix in (".yaml", ".pt")]
    assert any(r.startswith("configs/models/") for r in resources)
    missing = [r for r in resources if not any(fnmatch.fnmatchcase(r, g) and r.count("/") == g.count("/") for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def _spacing_options():
    """Every option whose name says it is a spacing, with the sub-command it belongs to."""
    import argparse

    from spineseg.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            for opt in action.option_strings:
                if opt.endswith("spacing"):
                    yield name, opt, action


def test_every_spacing_option_takes_only_finite_millimetres_above_0(capsys):
    from spineseg.cli import build_parser

    options = list(_spacing_options())
    assert {("predict", "--spacing"), ("info", "--spacing"), ("train", "--unlabeled-spacing")} <= \
        {(c, o) for c, o, _ in options}
    for command, opt, action in options:
        for bad in ("0", "-0.5", "nan", "inf", "-inf"):
            with pytest.raises(SystemExit) as e:
                build_parser().parse_args([command, f"{opt}={bad}"])
            assert e.value.code == 2, (command, opt, bad)
            err = capsys.readouterr().err
            assert f"argument {opt}: a pixel spacing must be a finite number of mm above 0, got '{bad}'" in err
            assert "Traceback" not in err
        assert action.type("0.8") == 0.8 and action.type("1e-1") == 0.1
