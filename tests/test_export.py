import numpy as np
import pytest
import torch

from spineseg.cli import main
from spineseg.infer.predict import Predictor, resolve_checkpoint
from spineseg.models.checkpoint import load_checkpoint

# the slices these tests were written for (the same seeds under the older position mix), each with a body
from spineseg.data.phantom import POSITION_P_BEFORE_2026_11 as BEFORE_DISC_CHANGE  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped model (clustered attention in three stages) exported with ``spineseg export``."""
    path = tmp_path_factory.mktemp("onnx") / "spineseg.onnx"
    assert main(["export", "--model", "pretrained", "--onnx", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def phantom_input():
    """One phantom slice, preprocessed as the shipped model expects (192 x 192 at 1 mm)."""
    from spineseg.data.phantom import phantom_slice
    from spineseg.preprocess.pipeline import PreprocessConfig, preprocess_slice

    s = phantom_slice(0, 4, 1, size=256, spacing=0.9, positions=BEFORE_DISC_CHANGE)
    pp = PreprocessConfig.from_dict(load_checkpoint(resolve_checkpoint("pretrained"))["preprocess"])
    return s, preprocess_slice(s.image, s.spacing, pp)[0]


def test_onnx_logits_match_pytorch_on_a_phantom_slice(exported, phantom_input):
    import onnxruntime as ort

    _, x = phantom_input
    model = Predictor("pretrained", threads=2).model
    with torch.no_grad():
        reference = model(torch.from_numpy(x)[None, None]).numpy()
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x[None, None]})[0]
    assert got.shape == reference.shape == (1, 4, 192, 192)
    assert np.abs(got - reference).max() <= 1e-4
    # the batch axis is dynamic: two slices in one call give the same logits
    two = session.run(None, {"image": np.concatenate([x[None, None], x[None, None, ::-1].copy()])})[0]
    assert np.abs(two[:1] - reference).max() <= 1e-4


def test_onnx_file_carries_the_model_config_and_preprocessing(exported):
    from spineseg.models.export import onnx_metadata

    ck = load_checkpoint(resolve_checkpoint("pretrained"))
    meta = onnx_metadata(exported.read_bytes())
    assert meta["config"] == ck["config"] and meta["preprocess"] == ck["preprocess"]
    assert meta["model_name"] == ck["model_name"]
    assert Predictor(str(exported)).engine.name == "onnx"  # an .onnx model runs on onnxruntime by default


def test_predict_engine_onnx_gives_the_torch_labels(exported, phantom_input, tmp_path):
    from spineseg.io.images import read_label, save_slice_nifti

    s, _ = phantom_input
    save_slice_nifti(tmp_path / "p.nii.gz", s.image, s.spacing)
    for engine, model in (("torch", "pretrained"), ("onnx", str(exported))):
        assert main(["predict", "--model", model, "--engine", engine, "--input", str(tmp_path / "p.nii.gz"), "--out",
                     str(tmp_path / engine), "--no-overlays", "--quiet", "--threads", "2"]) == 0
    by_torch = read_label(tmp_path / "torch" / "p.nii.gz").data
    by_onnx = read_label(tmp_path / "onnx" / "p.nii.gz").data
    assert set(np.unique(by_torch)) == {0, 1, 2, 3}
    assert (by_torch == by_onnx).mean() > 0.999


def test_export_refusals_are_one_line(tmp_path, capsys):
    assert main(["export", "--model", "pretrained", "--onnx", str(tmp_path / "no" / "m.onnx")]) == 2
    assert main(["export", "--model", str(tmp_path / "none.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert main(["predict", "--model", str(tmp_path / "bad.onnx"), "--engine", "onnx", "--input", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("spineseg: error: ") for line in err), err
    assert "does not exist" in err[0] and "not found" in err[1] and "ONNX" in err[2]
    assert not (tmp_path / "m.onnx").exists()
