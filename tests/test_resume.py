"""Training runs that survive interruptions: exact resume, refused changes, crash-safe checkpoints and logs."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from spineseg.cli import main
from spineseg.errors import SpinesegError
from spineseg.models.checkpoint import load_checkpoint
from spineseg.train.loop import Trainer

# adversarial from the second epoch on: the critic, its optimiser and the gradient penalty's RNG all matter
TINY = {"preprocess": {"target_size": 64}, "model": {"base": 4, "clusters": 8}, "critic": {"base": 4},
        "train": {"batch_size": 4, "lr": 1e-3, "adv_start_epoch": 1, "max_minutes": None}}


def _train(data, out, epochs, resume=False, train=None, **kw):
    """``train``: more train.* settings for a new run (a resumed run keeps its own)."""
    sets = {"train": {"epochs": epochs}}
    if resume:
        t = Trainer(None, None, out, resume=True, sets=sets, progress=False, cache=out.parent / "cache", **kw)
    else:
        sets["train"].update(train or {})
        t = Trainer(data, "spineseg", out, overrides=TINY, sets=sets, progress=False, cache=out.parent / "cache", **kw)
    t.fit()
    return t


def _max_weight_difference(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    diffs = [float((ca[part][k].float() - cb[part][k].float()).abs().max())
             for part in ("model", "critic") for k in ca[part]]
    return max(diffs)


def _epochs_in_log(run):
    with open(run / "log.csv", newline="") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def test_extended_run_ends_with_the_weights_of_an_uninterrupted_run(small_phantom, tmp_path):
    _train(small_phantom, tmp_path / "once", 4)
    _train(small_phantom, tmp_path / "twice", 2)
    _train(small_phantom, tmp_path / "twice", 4, resume=True)
    assert load_checkpoint(tmp_path / "twice" / "last.pt")["epoch"] == 4
    assert _max_weight_difference(tmp_path / "once" / "last.pt", tmp_path / "twice" / "last.pt") <= 1e-6
    assert _epochs_in_log(tmp_path / "twice") == [1, 2, 3, 4]


def test_a_run_saved_before_newer_config_keys_existed_resumes_with_their_defaults(small_phantom, tmp_path):
    from spineseg.models.checkpoint import save_checkpoint

    _train(small_phantom, tmp_path / "old", 1)
    ck = load_checkpoint(tmp_path / "old" / "last.pt")
    for key in ("pseudo_weak_view", "pseudo_max_change"):  # what a checkpoint of an older version lacks
        del ck["config"]["train"][key]
    save_checkpoint(tmp_path / "old" / "last.pt", ck)
    t = _train(small_phantom, tmp_path / "old", 2, resume=True)
    assert t.epoch == 2 and load_checkpoint(tmp_path / "old" / "last.pt")["epoch"] == 2
    assert t.cfg["train"]["pseudo_weak_view"] is False and t.cfg["train"]["pseudo_max_change"] == 1.0


def test_resume_refuses_any_other_change_and_names_it(small_phantom, tmp_path, capsys):
    run = tmp_path / "r"
    _train(small_phantom, run, 1)
    for sets, key in (({"model": {"base": 8}}, "model.base"), ({"augment": {"rotate_deg": 3.0}}, "augment.rotate_deg"),
                      ({"train": {"lr": 0.5}}, "train.lr")):
        with pytest.raises(SpinesegError, match=key):
            Trainer(None, None, run, resume=True, sets=sets, progress=False)
    with pytest.raises(SpinesegError, match="--seed"):
        Trainer(None, None, run, resume=True, seed=7, progress=False)
    with pytest.raises(SpinesegError, match="--model"):
        Trainer(None, "unet", run, resume=True, progress=False)
    # the same data moved elsewhere is accepted; different content is not
    moved = tmp_path / "moved"
    shutil.copytree(small_phantom, moved)
    Trainer(moved, None, run, resume=True, sets={"train": {"epochs": 1}}, progress=False, cache=tmp_path / "cache")
    (moved / "cases.csv").write_text((moved / "cases.csv").read_text().replace(",P007,", ",P006,"))
    with pytest.raises(SpinesegError, match="differs in content"):
        Trainer(moved, None, run, resume=True, progress=False, cache=tmp_path / "cache")
    # a finished run says so instead of silently doing nothing
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert "already finished its 1 epochs" in capsys.readouterr().out


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, sys, time, torch
    import spineseg.models.checkpoint as ck
    real_save = torch.save
    saves = []
    def slow_save(obj, f, *a, **k):
        if ".last.pt." in str(f):
            saves.append(f)
        if len(saves) == 2 and ".last.pt." in str(f):  # epoch 2's last.pt: write half of it, then hang
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
                fh.flush()
            print("WRITING", flush=True)
            time.sleep(60)
        return real_save(obj, f, *a, **k)
    torch.save = slow_save
    from spineseg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_while_writing_a_checkpoint_leaves_a_loadable_run_and_no_duplicate_log_rows(small_phantom, tmp_path):
    import yaml

    run = tmp_path / "r"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    base = ["train", "--data", str(small_phantom), "--model", "spineseg", "--config", str(cfg), "--out", str(run),
            "--cache", str(tmp_path / "cache"), "--quiet", "--set", "train.epochs=3"]
    proc = subprocess.Popen([sys.executable, "-c", _KILL_DURING_SAVE] + base, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "WRITING" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "WRITING" in line, "the training process never reached the checkpoint write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # every earlier output is intact and loadable; the killed write left a temporary beside it
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert load_checkpoint(run / "best.pt")["epoch"] in (1, 2)
    debris = [p for p in os.listdir(run) if "spineseg-tmp" in p]
    assert debris
    # the next start cleans the debris and finishes with each epoch logged once
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--cache", str(tmp_path / "cache")]) == 0
    assert not [p for p in os.listdir(run) if "spineseg-tmp" in p]
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
    assert _epochs_in_log(run) == [1, 2, 3]


def test_a_log_row_lost_after_its_checkpoint_is_restored_on_resume(small_phantom, tmp_path):
    run = tmp_path / "r"
    _train(small_phantom, run, 2)
    lines = (run / "log.csv").read_text().splitlines()
    (run / "log.csv").write_text("\n".join(lines[:-1]) + "\n")  # killed between last.pt and the log row
    _train(small_phantom, run, 3, resume=True)
    assert _epochs_in_log(run) == [1, 2, 3]


def test_critic_learning_rate_follows_the_generator_schedule(small_phantom, tmp_path):
    t = Trainer(small_phantom, "spineseg", tmp_path / "r", overrides=TINY,
                sets={"train": {"epochs": 3, "schedule_epochs": 3, "lr_critic": 1e-2}}, progress=False,
                cache=tmp_path / "cache")
    t.fit()
    g, d = t.opt.param_groups[0]["lr"], t.opt_d.param_groups[0]["lr"]
    assert g < 1e-3 and d / g == pytest.approx(10.0)


@pytest.mark.parametrize("text,key", [
    ("augment: {rotate: 3}\n", "augment.rotate"),
    ("critic: {bogus: 1}\n", "critic.bogus"),
    ("train: {epochs: two}\n", "train.epochs"),
    ("model: {base: 4.5}\n", "model.base"),
])
def test_bad_config_fails_before_any_work_for_every_model(small_phantom, tmp_path, capsys, text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    for model in ("unet", "spineseg"):  # a critic typo is refused for a supervised model too
        run = tmp_path / f"r-{model}"
        rc = main(["train", "--data", str(small_phantom), "--model", model, "--config", str(cfg), "--out", str(run),
                   "--cache", str(tmp_path / "cache"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and key in err, err
        assert not run.exists() and not (tmp_path / "cache").exists()  # nothing written, nothing preprocessed


def test_binary_config_and_bad_set_are_one_line(small_phantom, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(bytes(range(256)) * 4)
    rc = main(["train", "--data", str(small_phantom), "--model", "unet", "--config", str(cfg), "--out",
               str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "c.yaml" in err
    rc = main(["train", "--data", str(small_phantom), "--model", "unet", "--set", "train.epochs", "--out",
               str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "KEY=VALUE" in err


def test_set_reaches_the_stored_config(small_phantom, tmp_path):
    assert main(["train", "--data", str(small_phantom), "--model", "unet", "--out", str(tmp_path / "r"), "--quiet",
                 "--cache", str(tmp_path / "cache"), "--set", "preprocess.target_size=64", "--set", "model.base=4",
                 "--set", "train.epochs=1", "--set", "train.batch_size=8"]) == 0
    cfg = load_checkpoint(tmp_path / "r" / "last.pt")["config"]
    assert cfg["model"]["base"] == 4 and cfg["train"]["epochs"] == 1 and cfg["train"]["batch_size"] == 8



def test_unlabeled_images_add_a_domain_critic_and_resume_exactly(small_phantom, tmp_path):
    unlabeled = [small_phantom / "imagesTr"]  # stands in for unlabelled real slices

    def run(out, epochs, resume=False, weight=0.5):
        sets = {"train": {"epochs": epochs, "domain_weight": weight}}
        if resume:
            t = Trainer(None, None, out, resume=True, sets={"train": {"epochs": epochs}}, progress=False,
                        cache=tmp_path / "cache")
        else:
            t = Trainer(small_phantom, "unet", out, overrides=TINY, sets=sets, progress=False, cache=tmp_path / "cache",
                        unlabeled=unlabeled)
        t.fit()
        return t

    t = run(tmp_path / "once", 2)
    assert len(t.unlabeled) == 16 and t.domain_critic is not None
    with open(tmp_path / "once" / "log.csv", newline="") as fh:
        assert all(r["loss_domain"] and r["loss_domain_d"] for r in csv.DictReader(fh))
    run(tmp_path / "twice", 1)
    run(tmp_path / "twice", 2, resume=True)
    ca, cb = load_checkpoint(tmp_path / "once" / "last.pt"), load_checkpoint(tmp_path / "twice" / "last.pt")
    for part in ("model", "domain_critic"):
        assert max(float((ca[part][k] - cb[part][k]).abs().max()) for k in ca[part]) <= 1e-6
    # the domain term changes what is learnt
    plain = Trainer(small_phantom, "unet", tmp_path / "plain", overrides=TINY, sets={"train": {"epochs": 2}},
                    progress=False, cache=tmp_path / "cache")
    plain.fit()
    cp = load_checkpoint(tmp_path / "plain" / "last.pt")
    assert max(float((ca["model"][k] - cp["model"][k]).abs().max()) for k in ca["model"]) > 1e-4
    with pytest.raises(SpinesegError, match="domain_weight and train.pseudo_weight are 0"):
        Trainer(small_phantom, "unet", tmp_path / "zero", overrides=TINY, sets={"train": {"domain_weight": 0.0}},
                progress=False, cache=tmp_path / "cache", unlabeled=unlabeled)


@pytest.mark.parametrize("weak_view", [False, True])
def test_self_training_alone_needs_no_domain_critic_and_logs_what_it_accepts(small_phantom, tmp_path, monkeypatch,
                                                                             weak_view):
    """... and with train.pseudo_weak_view every self-training loss reads its targets from the network's output
    on a second, pixel-aligned view of the batch; without it, from the output it trains."""
    from spineseg.train.selftrain import SelfTraining

    given, original = [], SelfTraining.loss

    def spy(self, logits, spacing, no_body=None, target_logits=None):
        given.append(target_logits is not None and target_logits.shape == logits.shape
                     and not target_logits.requires_grad and not torch.equal(target_logits, logits))
        return original(self, logits, spacing, no_body, target_logits)

    monkeypatch.setattr(SelfTraining, "loss", spy)
    sets = {"train": {"epochs": 1, "domain_weight": 0.0, "pseudo_weight": 1.0, "pseudo_weak_view": weak_view}}
    t = Trainer(small_phantom, "unet", tmp_path / "st", overrides=TINY, sets=sets, progress=False,
                cache=tmp_path / "cache", unlabeled=[small_phantom / "imagesTr"])
    assert t.domain_critic is None and t.step.self_training is not None and t.step.domain is None
    t.fit()
    assert given and all(g == weak_view for g in given)
    with open(tmp_path / "st" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["loss_pseudo"] and 0 <= float(r["pseudo_accepted"]) <= 1 and not r["loss_domain"]
                        for r in rows)
    with pytest.raises(SpinesegError, match="nothing to self-train on"):
        Trainer(small_phantom, "unet", tmp_path / "none", overrides=TINY, sets=sets, progress=False,
                cache=tmp_path / "cache")
    if weak_view:
        with pytest.raises(SpinesegError, match="pseudo_weak_view is set but self-training is off"):
            Trainer(small_phantom, "unet", tmp_path / "off", overrides=TINY, progress=False, cache=tmp_path / "cache",
                    sets={"train": {"epochs": 1, "pseudo_weak_view": True}}, unlabeled=[small_phantom / "imagesTr"])
        no_intensity = {**sets, "augment": {"intensity": 0.0, "gamma": 0.0, "bias": 0.0, "noise": 0.0, "blur": 0.0}}
        with pytest.raises(SpinesegError, match="needs an intensity augmentation"):
            Trainer(small_phantom, "unet", tmp_path / "same", overrides=TINY, progress=False, cache=tmp_path / "cache",
                    sets=no_intensity, unlabeled=[small_phantom / "imagesTr"])


def test_slices_known_to_hold_no_body_reach_self_training_and_are_part_of_the_run(small_phantom, tmp_path,
                                                                                   monkeypatch):
    """--unlabeled-no-body: the named slices (and only they) arrive flagged at the self-training loss; the list
    is checked against the images, needs self-training, and a resumed run refuses a different list."""
    from spineseg.train.selftrain import SelfTraining

    images = sorted((small_phantom / "imagesTr").iterdir())
    csv_path = tmp_path / "no_body.csv"
    csv_path.write_text(f"image,slice\n{images[0].name},0\n{images[3].name},0\n")
    seen = []
    original = SelfTraining.loss

    def spy(self, logits, spacing, no_body=None, target_logits=None):
        seen.append(None if no_body is None else no_body.clone())
        return original(self, logits, spacing, no_body, target_logits)

    monkeypatch.setattr(SelfTraining, "loss", spy)
    sets = {"train": {"epochs": 1, "domain_weight": 0.0, "pseudo_weight": 1.0, "domain_batch_size": 16}}
    kw = dict(overrides=TINY, progress=False, cache=tmp_path / "cache", unlabeled=[small_phantom / "imagesTr"])
    t = Trainer(small_phantom, "unet", tmp_path / "nb", sets=sets, unlabeled_no_body=csv_path, **kw)
    flagged = {(r.case_id, r.index) for r in t.unlabeled if r.no_body}
    assert len(flagged) == 2 and len(t.unlabeled) == 16
    t.fit()
    assert seen and all(v is not None and v.dtype == torch.bool for v in seen)
    assert all(int(v.sum()) == 2 for v in seen)  # a batch of all 16 unlabelled slices holds both flagged ones
    assert t.cfg["run"]["unlabeled_no_body"] == str(csv_path.resolve())
    # a different list: a resumed run refuses it
    other = tmp_path / "other.csv"
    other.write_text(f"image,slice\n{images[1].name},0\n")
    with pytest.raises(SpinesegError, match="differs in content"):
        Trainer(None, None, tmp_path / "nb", resume=True, sets={"train": {"epochs": 2}}, progress=False,
                cache=tmp_path / "cache", unlabeled_no_body=other)
    # bad lists and missing self-training: one clear error naming the file; all but a slice the images do not
    # have (known only once they are read) before any data is preprocessed
    import spineseg.train.loop as loop_module

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("the labelled data were preprocessed before the slice list was checked")

    for text, problem, early in ((f"image,slice\nnot-an-image.nii.gz,0\n", "not one of the --unlabeled images", True),
                                 (f"image,slice\n{images[0].name},x\n", "not a whole number", True),
                                 ("case,index\nA,0\n", "columns image,slice", True),
                                 (f"image,slice\n{images[0].name},5\n", "slice 5 of .* does not exist", False)):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with monkeypatch.context() as m, pytest.raises(SpinesegError, match=problem) as err:
            if early:
                m.setattr(loop_module, "load_training_data", no_preprocessing)
            Trainer(small_phantom, "unet", tmp_path / "bad", sets=sets, unlabeled_no_body=bad, **kw)
        assert err.value.path == bad.resolve() or str(err.value.path) == str(bad.resolve())
    with pytest.raises(SpinesegError, match="needs --unlabeled and train.pseudo_weight"):
        Trainer(small_phantom, "unet", tmp_path / "np", sets={"train": {"domain_weight": 0.01}},
                unlabeled_no_body=csv_path, **kw)


def test_init_starts_a_new_run_from_a_checkpoints_weights(small_phantom, tmp_path):
    src = _train(small_phantom, tmp_path / "src", 2)  # adversarial in epoch 2: the checkpoint has a trained critic
    ck = load_checkpoint(tmp_path / "src" / "last.pt")
    fresh = Trainer(small_phantom, "spineseg", tmp_path / "fresh", overrides=TINY, progress=False,
                    cache=tmp_path / "cache", seed=5)
    tuned = Trainer(small_phantom, "spineseg", tmp_path / "tuned", overrides=TINY, progress=False,
                    cache=tmp_path / "cache", seed=5, init=tmp_path / "src" / "last.pt")
    for part, trainer in (("model", tuned.model), ("critic", tuned.critic)):
        state = trainer.state_dict()
        assert all(torch.equal(state[k], ck[part][k]) for k in state), part
    assert not all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in tuned.model.state_dict().items())
    # a new run: epoch 0, fresh optimiser, the source recorded
    assert tuned.epoch == 0 and not tuned.opt.state
    assert tuned.cfg["run"]["init"]["loaded"] == ["network", "critic"]
    assert src.cfg["run"].get("init") is None


def test_a_file_packed_with_its_critics_fine_tunes_from_them(small_phantom, tmp_path):
    # pack --with-critics keeps the critics (float16) so that --init of the small file starts from trained critics;
    # a plain pack has none, and a file without critics cannot be asked for them
    from spineseg.cli import main

    _train(small_phantom, tmp_path / "src", 2)
    ck = load_checkpoint(tmp_path / "src" / "last.pt")
    assert main(["pack", "--model", str(tmp_path / "src" / "last.pt"), "--out", str(tmp_path / "c.pt"),
                 "--with-critics"]) == 0
    assert main(["pack", "--model", str(tmp_path / "src" / "last.pt"), "--out", str(tmp_path / "p.pt")]) == 0
    packed = load_checkpoint(tmp_path / "c.pt")
    assert "critic" in packed and "critic" not in load_checkpoint(tmp_path / "p.pt")
    assert all(v.dtype == torch.float16 for v in packed["critic"].values() if v.is_floating_point())
    tuned = Trainer(small_phantom, "spineseg", tmp_path / "tuned", overrides=TINY, progress=False,
                    cache=tmp_path / "cache", seed=5, init=tmp_path / "c.pt")
    assert tuned.cfg["run"]["init"]["loaded"] == ["network", "critic"]
    state = tuned.critic.state_dict()
    assert all(torch.equal(state[k], ck["critic"][k].half().float()) for k in state if state[k].is_floating_point())
    plain = Trainer(small_phantom, "spineseg", tmp_path / "plain", overrides=TINY, progress=False,
                    cache=tmp_path / "cache", seed=5, init=tmp_path / "p.pt")
    assert plain.cfg["run"]["init"]["loaded"] == ["network"]
    assert main(["pack", "--model", str(tmp_path / "p.pt"), "--out", str(tmp_path / "pp.pt"), "--with-critics"]) != 0
    assert not (tmp_path / "pp.pt").exists()


def test_init_refuses_another_network_and_resume(small_phantom, tmp_path):
    _train(small_phantom, tmp_path / "src", 1)
    with pytest.raises(SpinesegError, match=r"model\.base is 4 in the checkpoint but 8"):
        Trainer(small_phantom, "spineseg", tmp_path / "wide", overrides={**TINY, "model": {"base": 8, "clusters": 8}},
                progress=False, cache=tmp_path / "cache", init=tmp_path / "src" / "best.pt")
    with pytest.raises(SpinesegError, match="--init starts a new run"):
        Trainer(None, None, tmp_path / "src", resume=True, progress=False, init=tmp_path / "src" / "best.pt")
    assert not (tmp_path / "wide" / "last.pt").exists()
    # a bad checkpoint is named before any data is read
    with pytest.raises(SpinesegError, match="missing.pt: checkpoint not found"):
        Trainer(tmp_path / "no-data", "spineseg", tmp_path / "x", overrides=TINY, progress=False,
                init=tmp_path / "missing.pt")


def test_validation_every_n_epochs_and_always_after_the_last(small_phantom, tmp_path):
    t = Trainer(small_phantom, "unet", tmp_path / "r", overrides=TINY, progress=False, cache=tmp_path / "cache",
                sets={"train": {"epochs": 3, "val_every": 2, "adversarial": "none"}})
    t.fit()
    with open(tmp_path / "r" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["val_dice_mean"] != "" for r in rows] == [False, True, True]  # epoch 2 by the rule, 3 as the last
    assert load_checkpoint(tmp_path / "r" / "best.pt")["epoch"] in (2, 3)


def test_weight_average_is_what_the_checkpoint_serves_and_it_follows_the_ema_recursion(small_phantom, tmp_path,
                                                                                       monkeypatch):
    import spineseg.train.loop as loop

    # every step sets the weights to the step number k: the average is e_1 = 1, e_k = d e_(k-1) + (1 - d) k, d 0.75;
    # the checkpoint's "model" (what predict and pack read) is the average, "model_train" the trained weights
    t = Trainer(small_phantom, "spineseg", tmp_path / "run", overrides=TINY, progress=False, cache=tmp_path / "cache",
                sets={"train": {"epochs": 1, "ema_decay": 0.75}})
    steps = []

    class Step:
        adversary = None

        def __call__(self, *args, **kwargs):
            steps.append(len(steps) + 1)
            with torch.no_grad():
                for p in t.model.parameters():
                    p.fill_(float(steps[-1]))
            return {}

    t.step = Step()
    validated = []
    real_validation = loop.validation_dice
    monkeypatch.setattr(loop, "validation_dice",
                        lambda model, *a: validated.append(model) or real_validation(model, *a))
    t.fit()
    assert validated and all(m is t.ema.module for m in validated)  # validation (and best.pt) judge the average
    expected = 1.0
    for k in steps[1:]:
        expected = 0.75 * expected + 0.25 * k
    assert len(steps) >= 3
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    params = dict(t.model.named_parameters())
    assert all(torch.allclose(ck["model"][k], torch.full_like(ck["model"][k], expected)) for k in params)
    assert all(torch.allclose(ck["model_train"][k], torch.full_like(ck["model_train"][k], float(steps[-1])))
               for k in params)
    assert ck["ema_updates"] == len(steps)


def test_a_run_with_a_weight_average_resumes_exactly(small_phantom, tmp_path):
    _train(small_phantom, tmp_path / "once", 3, train={"ema_decay": 0.9})
    _train(small_phantom, tmp_path / "twice", 1, train={"ema_decay": 0.9})
    _train(small_phantom, tmp_path / "twice", 3, resume=True)
    a, b = load_checkpoint(tmp_path / "once" / "last.pt"), load_checkpoint(tmp_path / "twice" / "last.pt")
    for part in ("model", "model_train"):
        assert max(float((a[part][k] - b[part][k]).abs().max()) for k in a[part]) <= 1e-6, part
    assert max(float((a["model"][k] - a["model_train"][k]).abs().max()) for k in a["model"]) > 1e-4


def test_a_weight_averaged_run_from_init_serves_the_init_weights_before_its_first_step(small_phantom, tmp_path):
    _train(small_phantom, tmp_path / "src", 1)
    src = load_checkpoint(tmp_path / "src" / "last.pt")["model"]
    Trainer(small_phantom, "spineseg", tmp_path / "zero", overrides=TINY, progress=False, cache=tmp_path / "cache",
            sets={"train": {"epochs": 0, "ema_decay": 0.9}}, init=tmp_path / "src" / "last.pt").fit()
    served = load_checkpoint(tmp_path / "zero" / "best.pt")["model"]
    assert all(torch.equal(served[k], src[k]) for k in src)


def _training_dtypes(trainer) -> set:
    """The dtypes the generator's convolutions compute in while ``trainer`` trains (validation left out)."""
    seen = set()
    for m in trainer.model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, args, out_: seen.add(out_.dtype) if mod.training else None)
    return seen


@pytest.mark.parametrize("native,cpu_bf16,expected", [(True, True, torch.bfloat16), (False, True, torch.float32),
                                                      (True, None, torch.float32)])
def test_cpu_training_runs_the_generator_in_bf16_only_when_asked_and_native(small_phantom, tmp_path, monkeypatch,
                                                                            native, cpu_bf16, expected):
    from spineseg import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    out = tmp_path / "run"
    sets = {"train": {"epochs": 1} | ({} if cpu_bf16 is None else {"cpu_bf16": cpu_bf16})}  # None: the default
    t = Trainer(small_phantom, "spineseg", out, overrides=TINY, sets=sets, progress=False, device="cpu",
                cache=tmp_path / "cache")
    seen = _training_dtypes(t)
    t.fit()
    assert seen == {expected}
    assert load_checkpoint(out / "last.pt")["precision"] == {torch.bfloat16: "bf16", torch.float32: "fp32"}[expected]


def test_mixed_precision_on_cuda_stays_fp16_with_a_gradient_scaler():
    from spineseg.precision import training_autocast_dtype

    cuda = torch.device("cuda")  # no GPU needed: the choice, not the arithmetic
    assert training_autocast_dtype(cuda, amp=True, cpu_bf16=True) is torch.float16
    assert training_autocast_dtype(cuda, amp=False) is None


def test_a_bf16_run_resumed_without_native_bfloat16_goes_on_in_fp32_and_says_so(small_phantom, tmp_path, monkeypatch,
                                                                                capsys):
    from spineseg import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    _train(small_phantom, tmp_path / "bf16", 1, train={"cpu_bf16": True})
    assert load_checkpoint(tmp_path / "bf16" / "last.pt")["precision"] == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    t = Trainer(None, None, tmp_path / "bf16", resume=True, sets={"train": {"epochs": 2}}, progress=True,
                device="cpu", cache=tmp_path / "cache")
    seen = _training_dtypes(t)
    t.fit()
    assert seen == {torch.float32} and "trained in bf16" in capsys.readouterr().out


def test_batch_dice_reaches_the_training_loss(small_phantom, tmp_path):
    t = Trainer(small_phantom, "spineseg", tmp_path / "run", overrides=TINY, sets={"train": {"dice_batch": True}},
                progress=False, cache=tmp_path / "cache")
    assert t.step.seg_loss.dice.batch is True
    t = Trainer(small_phantom, "spineseg", tmp_path / "run2", overrides=TINY, progress=False, cache=tmp_path / "cache")
    assert t.step.seg_loss.dice.batch is False  # the default keeps older runs' per-image Dice


def test_critic_warmup_trains_the_critics_alone_for_its_steps_then_the_generator(small_phantom, tmp_path, capsys):
    unlabeled = [small_phantom / "imagesTr"]  # stands in for unlabelled real slices
    tiny = TINY | {"train": TINY["train"] | {"adv_start_epoch": 0}}

    def run(out, warmup):
        t = Trainer(small_phantom, "spineseg", out, overrides=tiny, progress=True, cache=tmp_path / "cache",
                    unlabeled=unlabeled, sets={"train": {"epochs": 2, "critic_warmup_steps": warmup}})
        assert -(-len(t.data.train) // 4) == steps_per_epoch  # batches of 4 an epoch
        before = {part: {k: v.clone() for k, v in getattr(t, part).state_dict().items()}
                  for part in ("model", "critic", "domain_critic")}
        t.fit()
        ck = load_checkpoint(out / "last.pt")
        moved = {part: max(float((ck[part][k].float() - v.float()).abs().max()) for k, v in before[part].items())
                 for part in before}
        with open(out / "log.csv", newline="") as fh:
            return moved, list(csv.DictReader(fh))

    steps_per_epoch = 3
    moved, rows = run(tmp_path / "all", 2 * steps_per_epoch)  # both epochs warm up
    assert moved["model"] == 0.0 and moved["critic"] > 0 and moved["domain_critic"] > 0
    assert all(r["loss_d"] and r["loss_domain_d"] and not r["loss_g"] for r in rows)
    assert "epoch 1: loss - (critic warm-up)" in capsys.readouterr().out
    moved, rows = run(tmp_path / "one", steps_per_epoch)  # the first epoch warms up, the second trains all
    assert moved["model"] > 0 and not rows[0]["loss_g"] and rows[1]["loss_g"]


def test_resume_refuses_unlabelled_images_the_run_was_trained_without_or_another_spacing(small_phantom, tmp_path):
    """Resuming with --unlabeled would silently add a domain critic to a run trained without; another
    --unlabeled-spacing changes the slices learnt from. A run without unlabelled images still resumes."""
    unlabeled = [small_phantom / "imagesTr"]
    _train(small_phantom, tmp_path / "plain", 1)
    with pytest.raises(SpinesegError, match="trained without --unlabeled"):
        Trainer(None, None, tmp_path / "plain", resume=True, sets={"train": {"epochs": 2}}, progress=False,
                cache=tmp_path / "cache", unlabeled=unlabeled)
    assert load_checkpoint(tmp_path / "plain" / "last.pt")["epoch"] == 1
    _train(small_phantom, tmp_path / "plain", 2, resume=True)  # and without them it goes on
    _train(small_phantom, tmp_path / "u", 1, train={"domain_weight": 0.5}, unlabeled=unlabeled,
           unlabeled_spacing=0.8)
    with pytest.raises(SpinesegError, match="--unlabeled-spacing 0.5 differs"):
        Trainer(None, None, tmp_path / "u", resume=True, sets={"train": {"epochs": 2}}, progress=False,
                cache=tmp_path / "cache", unlabeled=unlabeled, unlabeled_spacing=0.5)
    # the spacing is part of the unlabelled data's fingerprint, which the run records
    run = load_checkpoint(tmp_path / "u" / "last.pt")["config"]["run"]
    t = Trainer(small_phantom, "unet", tmp_path / "v", overrides=TINY, sets={"train": {"domain_weight": 0.5}},
                progress=False, cache=tmp_path / "cache", unlabeled=unlabeled, unlabeled_spacing=0.5)
    assert t.cfg["run"]["unlabeled_fingerprint"] != run["unlabeled_fingerprint"]


def test_a_run_is_not_packed_onto_its_own_last_pt_nor_resumed_from_a_packed_file(small_phantom, tmp_path, capsys):
    from spineseg.models.checkpoint import pack_checkpoint

    run = tmp_path / "r"
    _train(small_phantom, run, 1)
    before = (run / "last.pt").read_bytes()
    for out in (run / "last.pt", tmp_path / "r" / ".." / "r" / "last.pt"):
        assert main(["pack", "--model", str(run / "last.pt"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "last.pt" in err and "another --out" in err
    assert (run / "last.pt").read_bytes() == before
    pack_checkpoint(run / "last.pt", tmp_path / "packed.pt")
    shutil.copy(tmp_path / "packed.pt", run / "last.pt")  # what an older version's pack onto itself left
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--set", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a training checkpoint" in err and "last.pt" in err


@pytest.mark.parametrize("setting,key", [
    ("preprocess.target_size=0", "preprocess.target_size"), ("preprocess.target_size=-16", "preprocess.target_size"),
    ("preprocess.target_spacing=0", "preprocess.target_spacing"), ("preprocess.clahe_clip=-1", "preprocess.clahe_clip"),
    ("augment.noise=-1", "augment.noise"), ("augment.bias=-3", "augment.bias"), ("augment.scale=[0,0]", "augment.scale"),
    ("augment.scale=[1.2,0.8]", "augment.scale"), ("augment.blur=2", "augment.blur"),
])
def test_out_of_range_settings_are_one_line_before_any_work(small_phantom, tmp_path, capsys, setting, key):
    run = tmp_path / "r"
    rc = main(["train", "--data", str(small_phantom), "--model", "unet", "--set", "train.epochs=0", "--set",
               "preprocess.target_size=64", "--set", setting, "--out", str(run), "--cache", str(tmp_path / "cache"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and key in err and "must be" in err, err
    assert not run.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_out_of_range_is_one_line(small_phantom, tmp_path, capsys, seed):
    rc = main(["train", "--data", str(small_phantom), "--model", "unet", "--seed", str(seed), "--out",
               str(tmp_path / "r"), "--cache", str(tmp_path / "cache"), "--quiet", "--set", "train.epochs=0",
               "--set", "preprocess.target_size=64"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--seed" in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()


def test_the_run_section_is_set_on_the_command_line_and_a_runs_config_json_is_a_valid_config(small_phantom, tmp_path,
                                                                                           capsys):
    """run.* is what training records (data, fold, seed, ...): --set run.seed=7 or a hand-written run: section
    would be validated and then ignored, so both are refused; a run's own config.json is a config to start from,
    its recorded run section left out."""
    import json

    import yaml

    base = ["train", "--data", str(small_phantom), "--model", "unet", "--quiet", "--cache", str(tmp_path / "cache"),
            "--set", "train.epochs=0"]
    for extra in (["--set", "run.seed=7"], ["--set", "run.fold=3"]):
        assert main(base + extra + ["--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "run section is recorded by training" in err and "--seed" in err, err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"seed": 7}}))
    assert main(base + ["--config", str(cfg), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c.yaml" in err and "run section is recorded by training" in err, err
    assert not (tmp_path / "s").exists()
    first = tmp_path / "first"
    t = _train(small_phantom, first, 1, seed=3)
    second = tmp_path / "second"
    base[base.index("unet")] = "spineseg"  # the network _train trains
    assert main(base + ["--config", str(first / "config.json"), "--out", str(second), "--seed", "3",
                        "--set", "train.epochs=1"]) == 0
    a, b = (json.loads((r / "config.json").read_text()) for r in (first, second))
    assert {k: v for k, v in a.items() if k != "run"} == {k: v for k, v in b.items() if k != "run"}
    assert b["run"]["seed"] == 3 and t.cfg["run"]["seed"] == 3


def test_restoring_captured_random_states_repeats_every_stream():
    """A resume continues Python's, NumPy's (with its cached Gaussian) and torch's streams where the run left them."""
    import random

    import numpy as np

    from spineseg.train.state import capture_rng, restore_rng, seed_everything

    def draws():
        return (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(0, 10 ** 9),
                torch.rand(3).tolist())

    seed_everything(3)
    draws()
    np.random.standard_normal()  # an odd number of normals leaves NumPy's second Gaussian cached
    state = capture_rng()
    expected = draws()
    seed_everything(4)
    draws()
    restore_rng(state)
    assert draws() == expected


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    # the rename is what makes last.pt the new one; were the data not flushed first, a power loss soon after could
    # leave an empty or partial last.pt in place of the good one it replaced (the rename reaches the disk first)
    import os

    from spineseg.models.checkpoint import save_checkpoint

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"epoch": 3})
    replaced = [e for e in events if e[0] == "replace"]
    assert len(replaced) == 1 and replaced[0][2] == str(target)
    tmp = replaced[0][1]
    assert ("fsync", tmp) in events[:events.index(replaced[0])]  # the data, before the rename
    assert ("fsync", str(tmp_path)) in events[events.index(replaced[0]):]  # and the rename itself, after it
    assert torch.load(target)["epoch"] == 3 and os.listdir(tmp_path) == ["last.pt"]


def test_a_run_saved_on_a_machine_with_more_gpus_resumes_on_one_with_fewer(monkeypatch):
    # capture_rng keeps every visible GPU's stream; a run moved to a node with fewer GPUs restores the streams of the
    # GPUs it has, instead of failing on a device that is not there (torch indexes its generators by device)
    import torch.cuda.random as cuda_random

    from spineseg.train.state import capture_rng, restore_rng

    restored = {}

    def set_rng_state(new_state, device="cuda"):
        index = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index
        if index >= 1:  # what torch.cuda.default_generators[index] does on a one-GPU machine
            raise IndexError("tuple index out of range")
        restored[index] = new_state

    state = capture_rng()
    state["cuda"] = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda_random, "set_rng_state", set_rng_state)
    restore_rng(state)
    assert list(restored) == [0] and torch.equal(restored[0], state["cuda"][0])
