import logging

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
    model = Predictor("pretrained", threads=2, engine="torch").model
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


def _logits(predictor, x):
    return predictor.engine.logits(x[None, None])


def test_a_checkpoint_runs_on_onnx_by_default_from_a_cached_export(phantom_input, tmp_path, monkeypatch):
    import spineseg.models.export as export

    _, x = phantom_input
    monkeypatch.setenv("SPINESEG_CACHE", str(tmp_path / "cache"))
    first = Predictor("pretrained", device="cpu", threads=2)
    assert first.engine.name == "onnx"
    cached = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(cached) == 1
    reference = _logits(Predictor("pretrained", device="cpu", threads=2, engine="torch"), x)
    assert np.abs(_logits(first, x) - reference).max() <= 1e-4

    def no_export(checkpoint):
        raise AssertionError("exported again although the graph is cached")

    monkeypatch.setattr(export, "checkpoint_onnx_bytes", no_export)
    again = Predictor("pretrained", device="cpu", threads=2)  # from the cache: no export
    assert again.engine.name == "onnx" and np.abs(_logits(again, x) - reference).max() <= 1e-4
    monkeypatch.undo()
    monkeypatch.setenv("SPINESEG_CACHE", str(tmp_path / "cache"))
    cached[0].write_bytes(b"damaged")  # a damaged entry is exported again and replaced
    repaired = Predictor("pretrained", device="cpu", threads=2)
    assert np.abs(_logits(repaired, x) - reference).max() <= 1e-4 and cached[0].stat().st_size > 10**6
    # torch where onnx does not apply: bf16 (onnx runs fp32 only)
    assert Predictor("pretrained", device="cpu", precision="bf16", require_native_bf16=False).engine.name == "torch"


def test_a_changed_checkpoint_file_is_never_run_from_a_stale_graph(phantom_input, tmp_path, monkeypatch):
    _, x = phantom_input
    monkeypatch.setenv("SPINESEG_CACHE", str(tmp_path / "cache"))
    ck = load_checkpoint(resolve_checkpoint("pretrained"))
    path = tmp_path / "model.pt"
    torch.save(ck, path)
    before = _logits(Predictor(path, device="cpu", threads=2), x)
    ck["model"]["head.bias"] = ck["model"]["head.bias"] + torch.tensor([0.0, 5.0, 0.0, 0.0]).to(ck["model"]["head.bias"])
    torch.save(ck, path)  # same path, new weights
    after = Predictor(path, device="cpu", threads=2)
    assert after.engine.name == "onnx"
    assert np.abs(_logits(after, x) - before).max() > 4.0
    assert np.abs(_logits(after, x) - _logits(Predictor(path, device="cpu", threads=2, engine="torch"), x)).max() <= 1e-3


def test_without_a_writable_cache_or_a_traceable_graph_predict_still_runs(phantom_input, tmp_path, monkeypatch,
                                                                          caplog):
    import spineseg.models.export as export

    _, x = phantom_input
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SPINESEG_CACHE", str(tmp_path / "file"))  # a file: the cache folder cannot be made
    p = Predictor("pretrained", device="cpu", threads=2)
    assert p.engine.name == "onnx" and _logits(p, x).shape == (1, 4, 192, 192)

    def fails(checkpoint):
        raise RuntimeError("cannot trace")

    monkeypatch.setattr(export, "checkpoint_onnx_bytes", fails)
    with caplog.at_level(logging.WARNING, logger="spineseg"):
        assert Predictor("pretrained", device="cpu", threads=2).engine.name == "torch"
    assert "cannot run on onnxruntime" in caplog.text  # a spineseg warning line, as the CLI prints them
    with pytest.raises(RuntimeError):  # asked for by name, onnx does not fall back
        Predictor("pretrained", device="cpu", threads=2, engine="onnx")


def test_pack_keeps_only_what_inference_needs_in_float16(phantom_input, tmp_path):
    # a training checkpoint (float32 weights, optimiser and critic state) packs into float16 weights, config,
    # preprocessing and version; the packed model predicts what the float32 one does
    from spineseg.models.checkpoint import float32_weights

    _, x = phantom_input
    ck = load_checkpoint(resolve_checkpoint("pretrained"))
    g = torch.Generator().manual_seed(0)  # float32 detail below float16's resolution, which packing must drop
    ck["model"] = {k: v + 1e-4 * v.abs().max() * torch.rand(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in float32_weights(ck["model"]).items()}
    ck.update(opt={"state": {0: torch.zeros(1000)}}, critic={"w": torch.ones(3)}, scaler={}, rng={"torch": 1},
              model_train=ck["model"], ema_updates=3)
    full = tmp_path / "full.pt"
    torch.save(ck, full)
    assert main(["pack", "--model", str(full), "--out", str(tmp_path / "packed.pt")]) == 0
    packed = load_checkpoint(tmp_path / "packed.pt")
    assert set(packed) == {"model", "config", "preprocess", "version", "model_name", "epoch", "best"}
    assert packed["config"] == ck["config"] and packed["preprocess"] == ck["preprocess"]
    assert all(v.dtype == torch.float16 for v in packed["model"].values() if v.is_floating_point())
    assert any(not torch.equal(packed["model"][k].float(), v) for k, v in ck["model"].items() if v.is_floating_point())
    reference = _logits(Predictor(full, device="cpu", engine="torch"), x)
    got = _logits(Predictor(tmp_path / "packed.pt", device="cpu", engine="torch"), x)
    assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()
    assert (got.argmax(1) == reference.argmax(1)).mean() > 0.999


def test_a_network_the_tracer_cannot_follow_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import spineseg.models.export as export

    def untraceable(checkpoint):  # what tracing SegNet's unpooling raises
        raise TypeError("cond must be a bool, but got a Tensor")

    monkeypatch.setattr(export, "checkpoint_onnx_bytes", untraceable)
    (tmp_path / "m.onnx").write_bytes(b"an earlier export")
    assert main(["export", "--model", "pretrained", "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be exported to ONNX (TypeError" in err and "--engine torch" in err
    assert (tmp_path / "m.onnx").read_bytes() == b"an earlier export"


@pytest.mark.parametrize("damage", ["missing weight", "extra weight", "wrong shape", "other model name",
                                    "no model section", "unknown model"])
def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_line_naming_the_file(tmp_path, capsys, damage):
    # weights that do not fit the network the config describes, or a config that names no buildable network, are
    # refused when the file is read (predict, export, pack, --init, --resume), as one line naming the file
    ck = load_checkpoint(resolve_checkpoint("pretrained"))
    first = next(iter(ck["model"]))
    if damage == "missing weight":
        del ck["model"][first]
    elif damage == "extra weight":
        ck["model"]["head.extra.weight"] = torch.zeros(3)
    elif damage == "wrong shape":
        ck["model"][first] = torch.zeros(1, *ck["model"][first].shape)
    elif damage == "other model name":  # same network, but the file names another row than its config
        ck["model_name"] = "resunet_ctm_dconv"
    elif damage == "no model section":
        del ck["config"]["model"]
    else:
        ck["config"]["model"]["name"] = ck["model_name"] = "no_such_model"
    bad = tmp_path / "bad.pt"
    torch.save(ck, bad)
    for args in (["export", "--model", str(bad), "--onnx", str(tmp_path / "m.onnx")],
                 ["pack", "--model", str(bad), "--out", str(tmp_path / "p.pt")],
                 ["predict", "--model", str(bad), "--engine", "torch", "--input", str(tmp_path),
                  "--out", str(tmp_path / "out")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"spineseg: error: {bad}: "), err
        assert "cannot be exported" not in err[0]
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "p.pt").exists()


def test_pack_refuses_weights_that_float16_cannot_hold_rather_than_write_a_model_of_nan(tmp_path, capsys):
    # float16 tops out at 65504: a larger weight (a batch-norm running variance, say) would become inf and every
    # prediction of the packed model NaN; pack says so, naming the tensor, and --float32 still packs it
    from spineseg.models.checkpoint import float32_weights

    ck = load_checkpoint(resolve_checkpoint("pretrained"))
    ck["model"] = float32_weights(ck["model"])
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name] = ck["model"][name].clone()
    ck["model"][name].view(-1)[0] = 1e5
    torch.save(ck, tmp_path / "big.pt")
    assert main(["pack", "--model", str(tmp_path / "big.pt"), "--out", str(tmp_path / "p.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "big.pt") in err[0] and name in err[0] and "--float32" in err[0], err
    assert not (tmp_path / "p.pt").exists()
    assert main(["pack", "--model", str(tmp_path / "big.pt"), "--out", str(tmp_path / "p.pt"), "--float32"]) == 0
    assert torch.equal(load_checkpoint(tmp_path / "p.pt")["model"][name], ck["model"][name])


def test_an_onnx_file_with_damaged_spineseg_metadata_is_one_line_naming_it(exported, tmp_path, capsys):
    import onnx

    graph = onnx.load(str(exported))
    for entry in graph.metadata_props:
        if entry.key == "spineseg.preprocess":
            entry.value = entry.value[:-5]  # cut short: no longer JSON
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    assert main(["predict", "--model", str(tmp_path / "bad.onnx"), "--input", str(tmp_path), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"spineseg: error: {tmp_path / 'bad.onnx'}: ") and "metadata" in err[0]
