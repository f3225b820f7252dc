import json

import nibabel as nib
import numpy as np
import pytest
import torch

from spineseg.cli import main
from spineseg.infer.predict import Predictor
from spineseg.io.images import read_image, save_nifti
from spineseg.models.checkpoint import load_checkpoint
from spineseg.train.loop import Trainer

TINY = {"preprocess": {"target_size": 64}, "model": {"base": 4, "clusters": 8}, "critic": {"base": 4},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "adv_start_epoch": 1}}


@pytest.fixture(scope="module")
def trained(small_phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    t = Trainer(small_phantom, "spineseg", out, overrides=TINY, cache=out.parent / "cache", progress=False)
    t.fit()
    return out, t


@pytest.fixture(scope="module")
def run(trained):
    return trained[0]


def test_run_folder_contents(run):
    for f in ("best.pt", "last.pt", "log.csv", "splits.json", "config.json"):
        assert (run / f).exists(), f
    assert list((run / "tb").iterdir())
    lines = (run / "log.csv").read_text().splitlines()
    assert len(lines) == 3 and "val_dice_lamina" in lines[0] and "loss_d" in lines[0]
    # the adversarial phase started at epoch 2: the critic loss is logged there only
    hdr = lines[0].split(",")
    assert lines[1].split(",")[hdr.index("loss_d")] == "" and lines[2].split(",")[hdr.index("loss_d")] != ""
    ck = load_checkpoint(run / "last.pt")
    assert ck["config"]["train"]["adversarial"] == "wgan-gp" and ck["critic"] is not None
    assert ck["preprocess"]["target_size"] == 64 and ck["version"]


def test_saved_model_predicts_like_the_trained_one(trained, small_phantom):
    from spineseg.preprocess.pipeline import preprocess_slice, probabilities_to_labels

    out, trainer = trained
    img = read_image(sorted((small_phantom / "imagesTr").iterdir())[0])
    x, _, g = preprocess_slice(img.data[0], img.spacing, trainer.pp)
    trainer.model.eval()
    with torch.no_grad():  # the in-memory model after the last epoch ...
        probs = torch.softmax(trainer.model(torch.from_numpy(x)[None, None]), 1)[0].numpy()
    expected = probabilities_to_labels(probs, g)
    # ... and the same model written to last.pt and loaded back for inference
    got = Predictor(out / "last.pt", postprocess="none", tta="none").predict_volume(img)[0]
    assert np.array_equal(got, expected)
    assert (expected > 0).any()


def test_existing_run_is_not_overwritten(run, small_phantom):
    from spineseg.errors import SpinesegError

    with pytest.raises(SpinesegError, match="already holds"):
        Trainer(small_phantom, "unet", run, overrides=TINY, progress=False)


def test_predict_nifti_keeps_geometry(run, tmp_path, capsys):
    vol = np.random.default_rng(0).integers(0, 500, (48, 40, 3)).astype(np.int16)
    aff = np.diag([1.2, 1.3, 4.0, 1.0])
    aff[:3, 3] = [3, 4, 5]
    save_nifti(tmp_path / "vol.nii.gz", vol, aff)
    (tmp_path / "bad.nii.gz").write_bytes(b"junk" * 40)
    rc = main(["predict", "--model", str(run / "best.pt"), "--input", str(tmp_path / "vol.nii.gz"),
               str(tmp_path / "bad.nii.gz"), "--out", str(tmp_path / "pred"), "--quiet"])
    assert rc == 2  # one input failed ...
    err = capsys.readouterr().err
    assert "bad.nii.gz" in err
    out = nib.load(str(tmp_path / "pred" / "vol.nii.gz"))  # ... and the other still ran
    assert out.shape == vol.shape and np.allclose(out.affine, aff)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 3}
    assert (tmp_path / "pred" / "overlays" / "vol.png").exists()


def test_keep_largest_components():
    from spineseg.infer.predict import keep_largest_components

    lab = np.zeros((20, 20), np.uint8)
    lab[2:8, 2:8] = 1
    lab[15:17, 15:17] = 1  # a stray fragment
    lab[10:12, 2:12] = 3
    out = keep_largest_components(lab)
    assert (out == 1).sum() == 36 and out[16, 16] == 0 and (out == 3).sum() == 20


def test_predict_postprocess_option(run, small_phantom, tmp_path):
    img = read_image(sorted((small_phantom / "imagesTr").iterdir())[1])
    from scipy import ndimage as ndi

    from spineseg.anatomy.postprocess import anatomical_postprocess

    predictor = Predictor(run / "best.pt", postprocess="none")
    raw, default = predictor.predict_both(img)
    largest = Predictor(run / "best.pt", postprocess="largest").predict_volume(img)
    for k in (1, 2, 3):
        assert ndi.label(largest[0] == k, structure=np.ones((3, 3)))[1] <= 1
        assert ((largest[0] == k) & (raw[0] != k)).sum() == 0  # keeping the largest region only removes
    assert np.array_equal(default, raw)  # "none" is the raw argmax
    anatomical = Predictor(run / "best.pt").predict_volume(img)  # the default: anatomical rules
    assert np.array_equal(anatomical[0], anatomical_postprocess(raw[0], img.spacing))
    from spineseg.errors import SpinesegError

    with pytest.raises(SpinesegError):
        Predictor(run / "best.pt", postprocess="bogus")


def test_validation_mean_skips_a_structure_no_slice_has_without_a_warning():
    import warnings

    import numpy as np

    from spineseg.train.loop import mean_dice, nan_mean

    rows = np.array([[0.5, np.nan, 1.0], [0.7, np.nan, np.nan]])  # no validation slice shows the canal
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "mean of empty slice" would be one
        means = mean_dice(rows)
        assert np.isnan(nan_mean(means[1:2])) and nan_mean(means) == 0.8
    assert means[0] == 0.6 and np.isnan(means[1]) and means[2] == 1.0
