"""Training on two processes with torchrun (gloo on CPU): one run, written once, that one process can use."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spineseg
from spineseg.data.dataset import make_loader, prepare_slices
from spineseg.infer.predict import Predictor
from spineseg.io.images import read_image
from spineseg.io.layouts import load_dataset
from spineseg.models.checkpoint import load_checkpoint, load_model
from spineseg.preprocess.pipeline import PreprocessConfig
from spineseg.train.loop import mean_dice, validation_dice

# model `spineseg`, adversarial from the first epoch: the critic is wrapped and trained on both ranks too
TINY = ["preprocess.target_size=64", "model.base=4", "model.clusters=8", "critic.base=4", "train.epochs=2",
        "train.batch_size=2", "train.adv_start_epoch=0"]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(spineseg.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "spineseg.cli"]
    return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def distributed_run(small_phantom, tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    sets = [a for s in TINY for a in ("--set", s)]
    proc = torchrun(["train", "--data", str(small_phantom), "--model", "spineseg", "--out", "run",
                     "--cache", "cache", *sets], work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def test_two_processes_write_one_run_once(distributed_run):
    work, stdout = distributed_run
    assert sorted(p.name for p in work.iterdir()) == ["cache", "run"]
    run = work / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "distributed.json", "last.pt",
                                                     "log.csv", "splits.json", "tb"]
    with open(run / "log.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]
    assert len(list((run / "tb").iterdir())) == 1  # one TensorBoard writer
    assert stdout.count("epoch 2:") == 1 and stdout.count('"epochs": 2') == 1


def test_the_run_states_processes_effective_batch_and_learning_rate(distributed_run):
    work, stdout = distributed_run
    (session,) = json.loads((work / "run" / "distributed.json").read_text())["sessions"]
    assert session["world_size"] == 2 and session["backend"] == "gloo" and session["device"] == "cpu"
    assert session["batch_per_rank"] == 2 and session["effective_batch"] == 4
    assert session["lr"] == load_checkpoint(work / "run" / "last.pt")["config"]["train"]["lr"]
    assert "effective batch 4" in stdout


def test_both_ranks_drew_disjoint_halves_of_the_training_slices(distributed_run):
    work, _ = distributed_run
    (session,) = json.loads((work / "run" / "distributed.json").read_text())["sessions"]
    rank0, rank1 = ({tuple(s) for s in slices} for slices in session["first_epoch"]["slices_by_rank"])
    train_cases = json.loads((work / "run" / "splits.json").read_text())[0]["train"]
    assert len(rank0) == len(rank1) == len(train_cases) // 2  # one slice per case in this data set
    assert not rank0 & rank1
    assert {case for case, _ in rank0 | rank1} == set(train_cases)


def test_checkpoint_loads_into_a_single_process_predictor(distributed_run, small_phantom):
    work, _ = distributed_run
    ck = load_checkpoint(work / "run" / "last.pt")
    assert not any(k.startswith("module.") for part in ("model", "critic") for k in ck[part])
    image = read_image(sorted((small_phantom / "imagesTr").iterdir())[0])
    labels = Predictor(work / "run" / "last.pt", postprocess="none").predict_volume(image)
    assert labels.shape == image.data.shape


def test_logged_validation_is_one_pass_over_every_validation_slice(distributed_run, small_phantom):
    work, _ = distributed_run
    ck = load_checkpoint(work / "run" / "last.pt")
    val_ids = set(json.loads((work / "run" / "splits.json").read_text())[0]["val"])
    val = prepare_slices([c for c in load_dataset(small_phantom) if c.case_id in val_ids],
                         PreprocessConfig(**ck["preprocess"]))
    assert len(val) >= 2  # so that each rank validated a part
    expected = mean_dice(validation_dice(load_model(ck), make_loader(val, 2, False), torch.device("cpu")))
    with open(work / "run" / "log.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    assert float(last["val_dice_mean"]) == pytest.approx(float(np.nanmean(expected)), abs=1e-9)


def test_each_rank_keeps_its_own_random_stream(distributed_run):
    work, _ = distributed_run
    rank0, rank1 = load_checkpoint(work / "run" / "last.pt")["rng_ranks"]
    assert not torch.equal(rank0["torch"], rank1["torch"])  # e.g. the gradient penalty's interpolation


def test_resume_under_torchrun_continues_each_rank_and_logs_every_epoch_once(distributed_run):
    work, _ = distributed_run
    shutil.copytree(work / "run", work / "resumed")
    proc = torchrun(["train", "--out", "resumed", "--resume", "--cache", "cache", "--set", "train.epochs=3"], work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = work / "resumed"
    with open(run / "log.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    first, second = json.loads((run / "distributed.json").read_text())["sessions"]
    assert second["from_epoch"] == 2 and second["random_streams"] == "continued per rank"
    rank0, rank1 = load_checkpoint(run / "last.pt")["rng_ranks"]
    assert not torch.equal(rank0["torch"], rank1["torch"])
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
