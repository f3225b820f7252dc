import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spineseg.cli import main
from spineseg.errors import SpinesegError
from spineseg.infer.predict import Predictor, output_name, plan_outputs, resolve_checkpoint
from spineseg.io.images import read_image, save_nifti, save_slice_nifti


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    """Two phantom slices at 1.2 mm (NIfTI) and a two-slice volume of them."""
    from spineseg.data.phantom import phantom_slice

    d = tmp_path_factory.mktemp("inputs")
    slices = [phantom_slice(0, p, 0, size=160, spacing=1.2) for p in (1, 2)]
    for i, s in enumerate(slices):
        save_slice_nifti(d / f"slice{i}.nii.gz", s.image, s.spacing)
    vol = np.stack([s.image.T for s in slices], axis=-1)  # (column, row, slice), display layout
    save_nifti(d / "volume.nii.gz", vol, np.diag([-1.2, -1.2, 4.0, 1.0]))
    return d


@pytest.fixture(scope="module")
def predictor():
    return Predictor("pretrained", threads=2)


@pytest.fixture
def run_cli(capsys):
    """The CLI in this process: exit code and stderr lines (an exception other than a one-line error fails)."""
    def run(*args):
        rc = main([str(a) for a in args])
        return rc, capsys.readouterr().err.strip().splitlines()
    return run


def test_channel_suffix_stripped_only_in_nnunet_image_folders(tmp_path):
    assert output_name(Path("ds/imagesTs/P001_00_0000.nii.gz")) == "P001_00"
    assert output_name(Path("ds/imagesTr/P001_00_0000.nii.gz")) == "P001_00"
    assert output_name(Path("photos/x_0000.png")) == "x_0000"
    assert output_name(Path("ds/imagesTs/x.nii.gz")) == "x"
    names = [n for _, n in plan_outputs([Path("a/x_0000.png"), Path("a/x.png")])]
    assert names == ["x_0000", "x"]


@pytest.mark.parametrize("files", [("a/x.nii.gz", "b/x.nii.gz"), ("x.mha", "x.nrrd"),
                                   ("imagesTs/x_0000.nii.gz", "x.nii.gz"), ("s", "s_stack1.nii.gz")])
def test_colliding_output_names_refused_before_anything_is_written(tmp_path, files, run_cli):
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).mkdir() if "." not in f else (tmp_path / f).write_bytes(b"x")
    out = tmp_path / "out"
    rc, err = run_cli("predict", "--model", "pretrained", "--input", *[tmp_path / f for f in files], "--out", out)
    assert rc == 2 and len(err) == 1 and err[0].startswith("spineseg: error: ")
    assert "same output" in err[0] or "could also be a stack" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("case", ["existing file", "missing parent", "not writable"])
def test_unusable_out_folder_is_one_line(tmp_path, case, run_cli):
    out = {"existing file": tmp_path / "f.txt", "missing parent": tmp_path / "no" / "such" / "out",
           "not writable": Path("/proc/self")}[case]  # /proc refuses new files, even to root
    if case == "existing file":
        out.write_text("mine")
    (tmp_path / "x.nii.gz").write_bytes(b"x")
    rc, err = run_cli("predict", "--model", "pretrained", "--input", tmp_path / "x.nii.gz", "--out", out)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"spineseg: error: {out}: "), err
    assert {"existing file": "not a folder", "missing parent": "does not exist", "not writable": "not writable"}[case] \
        in err[0]
    assert not (tmp_path / "no").exists()
    if case == "existing file":
        assert out.read_text() == "mine"


def test_degenerate_images_are_no_image_content_and_the_rest_runs(tmp_path, phantom_files, run_cli):
    aff = np.eye(4)
    save_nifti(tmp_path / "zero.nii.gz", np.zeros((64, 64, 1), np.int16), aff)
    save_nifti(tmp_path / "constant.nii.gz", np.full((64, 64, 1), 7, np.int16), aff)
    save_nifti(tmp_path / "pixel.nii.gz", np.full((1, 1, 1), 7, np.int16), aff)
    dot = np.zeros((64, 64, 1), np.int16)
    dot[30:32, 30:32] = 100  # a bright speck: no body outline
    save_nifti(tmp_path / "dot.nii.gz", dot, aff)
    shutil.copy(phantom_files / "slice0.nii.gz", tmp_path / "good.nii.gz")
    rc, err = run_cli("predict", "--model", "pretrained", "--input", tmp_path, "--out", tmp_path / "out", "--quiet")
    assert rc == 2
    assert sorted(err) == sorted(f"spineseg: error: {tmp_path / n}.nii.gz: no image content (empty, constant or too "
                                 "small, or no body outline)" for n in ("zero", "constant", "pixel", "dot")), err
    assert [p.name for p in (tmp_path / "out").glob("*.nii.gz")] == ["good.nii.gz"]


def test_a_volume_with_one_empty_slice_predicts_the_rest(tmp_path, phantom_files, predictor):
    vol = np.asarray(nib.load(str(phantom_files / "volume.nii.gz")).dataobj).copy()
    vol[:, :, 1] = 0
    save_nifti(tmp_path / "v.nii.gz", vol, np.diag([-1.2, -1.2, 4.0, 1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy / skimage warnings from the empty slice
        labels = predictor.predict_volume(read_image(tmp_path / "v.nii.gz"))
    assert labels[1].max() == 0 and set(np.unique(labels[0])) == {0, 1, 2, 3}


def test_batches_give_the_same_labels_as_single_slices(phantom_files):
    image = read_image(phantom_files / "volume.nii.gz")
    one = Predictor("pretrained", threads=1, batch_size=1).predict_volume(image)
    both = Predictor("pretrained", threads=1, batch_size=2).predict_volume(image)
    assert one.shape == (2, 160, 160) and not np.array_equal(one[0], one[1])
    assert (one == both).mean() > 0.999  # batching may change the last bits of a sum, nothing more


def test_threads_default_to_every_available_core(monkeypatch):
    import torch

    import spineseg.infer.engine as engine

    before = torch.get_num_threads()
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    try:
        p = Predictor("pretrained", device="cpu")  # onnx, the CPU default
        assert p.threads == 3 and p.describe()["threads"] == 3
        assert p.engine.session.get_session_options().intra_op_num_threads == 3
        assert Predictor("pretrained", engine="torch").threads == 3 and torch.get_num_threads() == 3
        assert Predictor("pretrained", engine="torch", threads=1).threads == 1 and torch.get_num_threads() == 1
        with pytest.raises(SpinesegError, match="at least 1"):  # 0 is a mistake, not "every core"
            Predictor("pretrained", threads=0)
    finally:
        torch.set_num_threads(before)


def test_bf16_refused_where_the_processor_has_no_native_bfloat16(monkeypatch, tmp_path):
    import spineseg.infer.engine as engine

    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    with pytest.raises(SpinesegError, match="native bfloat16"):
        Predictor("pretrained", precision="bf16")
    with pytest.raises(SpinesegError, match="fp32 only"):
        Predictor("pretrained", engine="onnx", precision="bf16")


def test_bf16_autocast_stays_close_to_fp32():
    """The bf16 path on a tiny network (emulated here when the processor lacks native bf16)."""
    import torch

    from spineseg.infer.engine import LoadedModel, TorchEngine
    from spineseg.models.checkpoint import model_from_config

    cfg = {"model": {"name": "spineseg", "base": 4, "clusters": 8}}
    torch.manual_seed(0)
    weights = model_from_config(cfg).state_dict()
    loaded = LoadedModel(cfg, {}, "tiny", Path("tiny.pt"), checkpoint={"model": weights, "config": cfg})
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    fp32 = TorchEngine(loaded, torch.device("cpu"), "fp32").logits(x)
    bf16 = TorchEngine(loaded, torch.device("cpu"), "bf16", require_native_bf16=False).logits(x)
    assert bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)  # it did run in reduced precision
    assert np.abs(bf16 - fp32).max() < 0.1 * np.abs(fp32).max()


def test_run_predicts_the_test_patients_of_its_split(small_phantom, tmp_path, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(resolve_checkpoint("pretrained"), run / "best.pt")
    (run / "config.json").write_text(json.dumps({"run": {"fold": 1}}))
    splits = [{"train": [], "val": ["P000_00"], "test": ["P001_00"]}, {"train": [], "val": ["P002_00"],
                                                                      "test": ["P003_01", "P005_00"]}]
    (run / "splits.json").write_text(json.dumps(splits))
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run), "--data", str(small_phantom), "--out", str(out), "--quiet",
                 "--no-overlays"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["P003_01.nii.gz", "P005_00.nii.gz"]
    rc, err = run_cli("predict", "--run", run, "--out", tmp_path / "o2")
    assert rc == 2 and len(err) == 1 and "--data" in err[0]


def test_predict_writes_measurements_per_slice_and_readable_log_lines(tmp_path, phantom_files, run_cli):
    out = tmp_path / "out"
    rc, err = run_cli("predict", "--model", "pretrained", "--input", phantom_files / "volume.nii.gz",
                      phantom_files / "slice1.nii.gz", "--out", out, "--stenosis-area", "300,250")
    assert rc == 0, err
    assert not any("\r" in line for line in err) and len(err) <= 3  # a log file gets a few plain lines
    import csv

    with open(out / "measurements.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["case"], r["slice"]) for r in rows] == [("volume", "0"), ("volume", "1"), ("slice1", "0")]
    assert [r["position_mm"] for r in rows] == ["0.00", "4.00", "0.00"]
    # canal areas of 150-300 mm2 are all below an area threshold of 250 / 300 mm2
    assert all(r["stenosis"] in ("relative", "absolute") and 100 < float(r["canal_area_mm2"]) < 300 for r in rows)
    assert (out / "measurements_summary.csv").read_text().count("\n") == 2  # the volume only
    assert (out / "overlays" / "volume.png").exists()


def test_flip_tta_is_left_right_equivariant_and_none_is_one_pass():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 1, 64, 64)).astype(np.float32)
    x[1] = x[0] * 0.5 + rng.normal(size=(1, 64, 64)) * 0.5  # two different slices in one batch
    flip = Predictor("pretrained", threads=1, tta="flip", engine="torch")  # any input size
    p = flip.batch_probabilities(x)
    assert np.allclose(p.sum(1), 1.0, atol=1e-5)
    # the mirror image's prediction is the mirrored prediction (left-right only: not up-down) ...
    assert np.allclose(flip.batch_probabilities(x[..., ::-1]), p[..., ::-1], atol=1e-5)
    assert not np.allclose(flip.batch_probabilities(x[..., ::-1, :]), p[..., ::-1, :], atol=1e-3)
    # ... the mean of the two passes, slice by slice, which one network pass is not
    once = Predictor("pretrained", threads=1, tta="none", engine="torch")
    single, mirrored = once.batch_probabilities(x), once.batch_probabilities(x[..., ::-1])[..., ::-1]
    assert not np.allclose(single, mirrored, atol=1e-3)
    assert np.allclose(p, 0.5 * (single + mirrored), atol=1e-5)
    with pytest.raises(SpinesegError, match="tta must be one of"):
        Predictor("pretrained", tta="rotate")


def test_the_command_line_and_the_library_default_to_the_same_tta():
    from spineseg.cli import build_parser
    from spineseg.infer.predict import DEFAULT_TTA

    parser = build_parser()
    for command in (["predict", "--model", "m", "--input", "x", "--out", "o"], ["sanity", "--model", "m", "--input", "x", "--out", "o"]):
        assert parser.parse_args(command).tta == DEFAULT_TTA, command


def _write_dicom_slices(folder, planes, spacing, time, series_uid):
    """One single-frame MR image per plane (axial, 4 mm apart), acquired at ``time``."""
    import pydicom

    from conftest import new_mr_dataset

    folder.mkdir(parents=True, exist_ok=True)
    for k, plane in enumerate(planes):
        ds = new_mr_dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3.4", series_uid, "1.2.3.5"
        ds.Modality, ds.InstanceNumber = "MR", k + 1
        ds.AcquisitionDate, ds.AcquisitionTime = "20240102", time
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], 4.0
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, 4.0 * k]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(plane, np.uint16).tobytes()
        pydicom.dcmwrite(str(folder / f"{series_uid[-6:]}_{k}.dcm"), ds, enforce_file_format=True)


def test_a_failing_stack_spares_the_later_stacks_and_is_named(tmp_path, phantom_files, run_cli):
    vol = np.asarray(nib.load(str(phantom_files / "volume.nii.gz")).dataobj)  # (column, row, slice)
    planes = [np.clip(vol[:, :, k].T, 0, None) * (3000.0 / vol.max()) for k in range(2)]
    series = tmp_path / "series"
    _write_dicom_slices(series, [np.zeros((160, 160))], 1.2, "090000", "1.2.3.4.100001")  # blank localizer first
    _write_dicom_slices(series, planes, 1.2, "100000", "1.2.3.4.100002")
    out = tmp_path / "out"
    rc, err = run_cli("predict", "--model", "pretrained", "--input", series, "--out", out, "--quiet", "--no-overlays")
    assert rc == 2
    assert err == [f"spineseg: error: {series}: stack 0 of 2 (series_stack0): no image content (empty, constant or "
                   "too small, or no body outline)"]
    assert [p.name for p in out.glob("*.nii.gz")] == ["series_stack1.nii.gz"]  # the later stack was predicted
    assert "series_stack1,1,1," in (out / "measurements.csv").read_text()


def test_an_unexpected_error_is_one_line_and_the_other_inputs_are_still_measured(tmp_path, phantom_files, run_cli,
                                                                                   monkeypatch):
    import spineseg.infer.predict as predict

    measure = predict.measure_image

    def flaky(labels, image, name, thresholds):
        if name == "bad":
            raise ValueError("axes don't match\narray")
        return measure(labels, image, name, thresholds)

    monkeypatch.setattr(predict, "measure_image", flaky)
    for n in ("bad", "good"):
        shutil.copy(phantom_files / "slice0.nii.gz", tmp_path / f"{n}.nii.gz")
    out = tmp_path / "out"
    rc, err = run_cli("predict", "--model", "pretrained", "--input", tmp_path / "bad.nii.gz", tmp_path / "good.nii.gz",
                      "--out", out, "--quiet", "--no-overlays")
    assert rc == 2
    assert err == [f"spineseg: error: {tmp_path / 'bad.nii.gz'}: unexpected error reading or predicting it "
                   "(ValueError: axes don't match array)"]
    rows = (out / "measurements.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("good,0,0,")

    def out_of_memory(*args):
        raise MemoryError

    monkeypatch.setattr(predict, "measure_image", out_of_memory)  # the machine's own trouble still stops the run
    with pytest.raises(MemoryError):
        predict.predict_run("pretrained", [tmp_path / "good.nii.gz"], tmp_path / "o2", progress=False, overlays=False)


def test_a_new_run_replaces_the_summary_of_an_earlier_one(tmp_path, phantom_files, run_cli):
    out = tmp_path / "out"
    rc, err = run_cli("predict", "--model", "pretrained", "--input", phantom_files / "volume.nii.gz", "--out", out,
                      "--quiet", "--no-overlays")
    assert rc == 0, err
    assert (out / "measurements_summary.csv").read_text().count("\n") == 2  # the volume's summary
    rc, err = run_cli("predict", "--model", "pretrained", "--input", phantom_files / "slice1.nii.gz", "--out", out,
                      "--quiet", "--no-overlays")
    assert rc == 0, err
    assert (out / "measurements.csv").read_text().count("\n") == 2 and "slice1" in (out / "measurements.csv").read_text()
    summary = (out / "measurements_summary.csv").read_text()
    assert summary.startswith("case,stack,slices,") and summary.count("\n") == 1  # the header only: nothing stale


def test_a_refused_dicom_seg_keeps_the_report_section_of_what_was_written(tmp_path, phantom_files, monkeypatch):
    import spineseg.infer.predict as predict

    def refused(out, stack_name, labels, image, predictor):
        raise SpinesegError("no DICOM SEG: the series is not axial", image.source)

    monkeypatch.setattr(predict, "_write_dicom_seg", refused)
    res = predict.predict_run("pretrained", [phantom_files / "slice0.nii.gz"], tmp_path / "out", progress=False,
                              overlays=False, dicom_seg=True, report=True)
    assert len(res.errors) == 1 and "not axial" in res.errors[0]  # the SEG the user asked for is an error ...
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>slice0</h2>" in page and "not axial" in page  # ... beside the case's label map and measurements
    assert (tmp_path / "out" / "slice0.nii.gz").exists()
