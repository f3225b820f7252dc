import numpy as np
import pytest
import torch

from spineseg.data.augment import AugmentConfig, augment
from spineseg.data.dataset import make_loader, prepare_slices
from spineseg.data.splits import kfold_splits, load_splits, paper_splits, write_splits
from spineseg.errors import SpinesegError
from spineseg.io.layouts import Case, load_dataset
from spineseg.preprocess.pipeline import PreprocessConfig


def _cases(n_pat=23, per=3):
    return [Case(f"P{p}_{k}", None, None, f"P{p}") for p in range(n_pat) for k in range(per)]


def _patients(ids):
    return {i.split("_")[0] for i in ids}


def test_kfold_patient_level_and_complete():
    splits = kfold_splits(_cases())
    assert len(splits) == 5
    seen = []
    for s in splits:
        tr, va, te = (_patients(s[k]) for k in ("train", "val", "test"))
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert len(tr | va | te) == 23 and va
        seen.extend(te)
    assert sorted(seen) == sorted({f"P{p}" for p in range(23)})  # every patient in exactly one test fold


def test_paper_splits_fractions_and_seeds():
    splits = paper_splits(_cases(20, 2))
    assert len(splits) == 5
    for s in splits:
        tr, va, te = (_patients(s[k]) for k in ("train", "val", "test"))
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert (len(tr), len(va), len(te)) == (12, 2, 6)
    assert splits[0]["test"] != splits[1]["test"]


def test_splits_file_roundtrip_and_errors(tmp_path):
    s = kfold_splits(_cases(10, 1))
    write_splits(tmp_path / "splits.json", s)
    assert load_splits(tmp_path / "splits.json") == s
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SpinesegError, match="bad.json"):
        load_splits(tmp_path / "bad.json")
    with pytest.raises(SpinesegError):
        kfold_splits(_cases(3, 1))


def test_augment_is_joint_and_label_safe():
    img = torch.zeros(1, 64, 64)
    mask = torch.zeros(64, 64, dtype=torch.long)
    img[0, 20:40, 10:30] = 1.0
    mask[20:40, 10:30] = 3
    g = torch.Generator().manual_seed(0)
    cfg = AugmentConfig(intensity=0.0)
    for _ in range(5):
        a, m = augment(img, mask, cfg, g)
        assert a.shape == img.shape and m.shape == mask.shape
        assert set(m.unique().tolist()) <= {0, 3}
        # the mask moved with the image: bright pixels are where the mask is
        assert a[0][m == 3].mean() > 0.9 and a[0][m == 0].mean() < 0.2
    ident = AugmentConfig(rotate_deg=0, scale=(1, 1), shift=0, intensity=0)
    a, m = augment(img, mask, ident, g)
    assert torch.allclose(a, img, atol=1e-5) and torch.equal(m, mask)


def test_loader_over_phantom(small_phantom):
    cases = load_dataset(small_phantom)
    assert {c.patient for c in cases} == {f"P{p:03d}" for p in range(8)}
    recs = prepare_slices(cases[:4], PreprocessConfig(target_size=64))
    batch = next(iter(make_loader(recs, 2, True, AugmentConfig())))
    assert batch["image"].shape == (2, 1, 64, 64) and batch["label"].shape == (2, 64, 64)
    assert batch["label"].dtype == torch.long and int(batch["label"].max()) <= 3


def test_pairs_layout_and_mismatch(tmp_path):
    from spineseg.io.images import save_png

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    save_png(tmp_path / "images" / "a.png", np.zeros((32, 32), np.uint8) + 5)
    save_png(tmp_path / "masks" / "a.png", np.zeros((30, 32), np.uint8))
    cases = load_dataset(tmp_path)
    assert [c.case_id for c in cases] == ["a"]
    with pytest.raises(SpinesegError, match="does not match"):
        prepare_slices(cases, PreprocessConfig(target_size=32), spacing=1.0)
    (tmp_path / "images" / "b.png").write_bytes(b"garbage")
    with pytest.raises(SpinesegError, match="no mask for image b.png"):
        load_dataset(tmp_path)


def _copy_without_patient_map(src, dst):
    import shutil

    shutil.copytree(src, dst)
    (dst / "cases.csv").unlink()
    return dst


def test_training_without_a_patient_map_is_refused_unless_each_case_is_a_patient(small_phantom, tmp_path, capsys):
    from spineseg.cli import main

    data = _copy_without_patient_map(small_phantom, tmp_path / "data")
    args = ["train", "--data", str(data), "--model", "unet", "--out", str(tmp_path / "r"), "--quiet",
            "--cache", str(tmp_path / "cache"), "--set", "preprocess.target_size=64", "--set", "model.base=4",
            "--set", "train.epochs=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "patient map" in err and "--case-is-patient" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
    assert main(args + ["--case-is-patient"]) == 0
    assert main(["experiment", "--data", str(data), "--models", "unet", "--epochs", "1",
                 "--out", str(tmp_path / "e"), "--quiet"]) == 2
    assert "patient map" in capsys.readouterr().err


def test_training_on_a_missing_data_folder_says_so(tmp_path, capsys):
    from spineseg.cli import main

    missing = tmp_path / "nodata"
    assert main(["train", "--data", str(missing), "--model", "unet", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spineseg: error: {missing}: data set folder does not exist") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_splits_file_that_leaks_a_patient_is_refused_naming_it(small_phantom, tmp_path, capsys):
    import json

    from spineseg.cli import main

    cases = load_dataset(small_phantom)
    good = kfold_splits(cases)
    leaky = json.loads(json.dumps(good))
    moved = next(c for c in leaky[0]["test"])  # one slice of a test patient moves to training
    leaky[0]["test"].remove(moved)
    leaky[0]["train"].append(moved)
    patient = moved.split("_")[0]
    (tmp_path / "leaky.json").write_text(json.dumps(leaky))
    rc = main(["train", "--data", str(small_phantom), "--model", "unet", "--splits", str(tmp_path / "leaky.json"),
               "--out", str(tmp_path / "r"), "--quiet",
               "--set", "train.epochs=1", "--set", "train.max_minutes=0.05"])  # a missed refusal fails fast
    err = capsys.readouterr().err
    assert rc == 2 and f"patient '{patient}'" in err and "leakage" in err and "leaky.json" in err
    assert not (tmp_path / "r").exists()


def test_experiment_refuses_a_split_without_test_patients(small_phantom, tmp_path, capsys):
    import json

    from spineseg.cli import main

    splits = kfold_splits(load_dataset(small_phantom))
    for s in splits:
        s["train"] += s.pop("test")
    out = tmp_path / "e"
    out.mkdir()
    (out / "splits.json").write_text(json.dumps(splits))
    rc = main(["experiment", "--data", str(small_phantom), "--models", "unet", "--epochs", "1", "--out", str(out),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no test list" in err
    assert sorted(p.name for p in out.iterdir()) == ["splits.json"]  # nothing trained or written


@pytest.fixture(scope="module")
def padded_record():
    """A wide phantom slice at a fixed working resolution: the network canvas holds zero padding."""
    from spineseg.data.dataset import SliceRecord
    from spineseg.data.phantom import phantom_slice
    from spineseg.preprocess.pipeline import preprocess_slice

    s = phantom_slice(0, 1, 0, size=160, spacing=1.0)
    cfg = PreprocessConfig(target_size=192, target_spacing=1.0)
    img, lab, g = preprocess_slice(s.image, s.spacing, cfg, s.label)
    assert not g.content_mask().all()
    return SliceRecord("c", "p", 0, img, lab, g), s, cfg


NO_CHANGE = dict(rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0, intensity=0.0)


def test_training_sample_without_random_changes_equals_the_inference_input(padded_record):
    from spineseg.data.dataset import SliceDataset
    from spineseg.preprocess.pipeline import preprocess_slice

    rec, s, cfg = padded_record
    item = SliceDataset([rec], AugmentConfig(**NO_CHANGE))[0]
    inference_input, _, _ = preprocess_slice(s.image, s.spacing, cfg)
    assert torch.allclose(item["image"][0], torch.from_numpy(inference_input), atol=1e-5)  # float32 resampling


def test_intensity_randomisation_keeps_padding_at_zero_and_zscores_the_content(padded_record):
    from spineseg.data.dataset import SliceDataset

    rec, _, _ = padded_record
    content = torch.from_numpy(rec.geometry.content_mask())
    for noise in (0.0, 0.2):
        ds = SliceDataset([rec], AugmentConfig(**NO_CHANGE, gamma=0.5, bias=0.3, blur=1.0, noise=noise))
        for epoch in range(3):
            ds.epoch = epoch
            x = ds[0]["image"][0]
            assert torch.all(x[~content] == 0)  # padding untouched, as at inference
            if not noise:
                assert abs(float(x[content].mean())) < 1e-4 and abs(float(x[content].std()) - 1) < 1e-3


def test_random_contrast_and_offset_survive_intensity_randomisation(padded_record):
    from spineseg.data.dataset import SliceDataset

    rec, _, _ = padded_record
    content = torch.from_numpy(rec.geometry.content_mask())
    ds = SliceDataset([rec], AugmentConfig(**dict(NO_CHANGE, intensity=0.3), gamma=0.5, bias=0.3))
    means, stds = [], []
    for epoch in range(12):
        ds.epoch = epoch
        x = ds[0]["image"][0][content]
        means.append(float(x.mean()))
        stds.append(float(x.std()))
    assert np.std(means) > 0.05 and np.std(stds) > 0.05  # not re-normalised away


def test_images_are_low_pass_filtered_before_downsampling():
    from spineseg.preprocess.pipeline import _resize

    stripes = np.tile(np.array([0.0, 1.0], np.float32), (64, 32))  # 1-pixel stripes: pure high frequency
    small = _resize(stripes, (21, 21), order=1)
    assert float(small.std()) < 0.05  # anti-aliased: a flat grey, not a moire pattern
    assert np.array_equal(_resize(stripes.astype(np.uint8), (21, 21), order=0).astype(bool),
                          _resize(stripes.astype(np.uint8), (21, 21), order=0).astype(bool))


@pytest.mark.parametrize("img", [np.zeros((64, 64)), np.full((64, 64), 7.0), np.ones((1, 1)),
                                 np.pad(np.ones((4, 4)), 30)])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # refused in one error, not with numpy warnings first
def test_degenerate_images_have_no_image_content(img):
    from spineseg.preprocess.pipeline import preprocess_slice

    with pytest.raises(SpinesegError, match="no image content"):
        preprocess_slice(img.astype(np.float32), (1.0, 1.0), PreprocessConfig(target_size=64))


def test_random_convolution_randomises_each_tissues_contrast_and_keeps_padding_and_labels(padded_record):
    """augment.random_conv: a new random contrast per draw (the order of two tissues' mean intensities flips
    between draws), the padding stays 0, the content z-scored, and the label map untouched."""
    from spineseg.data.dataset import SliceDataset

    rec, _, _ = padded_record
    content = torch.from_numpy(rec.geometry.content_mask())
    lab = torch.from_numpy(rec.label.astype(np.int64))
    body, canal = lab == 1, lab == 2
    ds = SliceDataset([rec], AugmentConfig(**NO_CHANGE, random_conv=1.0))
    plain = SliceDataset([rec], AugmentConfig(**NO_CHANGE))
    brighter = []
    for epoch in range(16):
        ds.epoch = plain.epoch = epoch
        item = ds[0]
        x = item["image"][0]
        assert torch.all(x[~content] == 0)
        assert abs(float(x[content].mean())) < 1e-4 and abs(float(x[content].std()) - 1) < 1e-3
        assert torch.equal(item["label"], lab)
        assert not torch.allclose(x, plain[0]["image"][0], atol=1e-3)
        brighter.append(bool(x[body].mean() > x[canal].mean()))
    assert 0 < sum(brighter) < len(brighter)  # the body is brighter than the canal in some draws, darker in others
    # off by default: a config without it is the same sample as before the option existed
    assert torch.equal(SliceDataset([rec], AugmentConfig(gamma=0.5, bias=0.3, random_conv=0.0))[0]["image"],
                       SliceDataset([rec], AugmentConfig(gamma=0.5, bias=0.3))[0]["image"])


def _with_cases_csv(src, dst, text):
    import shutil

    shutil.copytree(src, dst)
    (dst / "cases.csv").write_text(text, encoding="utf-8")
    return dst


def test_a_patient_map_that_leaves_cases_out_lists_one_twice_or_gives_no_patient_is_refused(small_phantom, tmp_path,
                                                                                           capsys):
    """A case missing from cases.csv would be a patient of its own (its patient's other slices could be tested on
    while it is trained on): every case must be mapped, once, to a patient."""
    from spineseg.cli import main

    rows = (small_phantom / "cases.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    # keyed by file name instead of case id: no case matches
    by_file = [r.replace(r.split(",")[0], r.split(",")[0] + "_0000.nii.gz", 1) for r in body]
    data = _with_cases_csv(small_phantom, tmp_path / "byfile", "\n".join([header] + by_file) + "\n")
    with pytest.raises(SpinesegError, match=r"case 'P000_00' is not in cases.csv \(16 of 16") as err:
        load_dataset(data)
    assert err.value.path == str(data / "cases.csv")
    args = ["train", "--data", str(data), "--model", "unet", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(args) == 2
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and "cases.csv" in out and "P000_00" in out and not (tmp_path / "r").exists()
    # one case left out
    data = _with_cases_csv(small_phantom, tmp_path / "short", "\n".join([header] + body[:-1]) + "\n")
    missing = body[-1].split(",")[0]
    with pytest.raises(SpinesegError, match=f"case '{missing}' is not in cases.csv \\(1 of 16"):
        load_dataset(data)
    # a case twice, a case without a patient
    data = _with_cases_csv(small_phantom, tmp_path / "twice", "\n".join([header] + body + [body[0]]) + "\n")
    with pytest.raises(SpinesegError, match="'P000_00' is listed twice"):
        load_dataset(data)
    blank = body[0].split(",")
    blank[1] = " "
    data = _with_cases_csv(small_phantom, tmp_path / "blank", "\n".join([header, ",".join(blank)] + body[1:]) + "\n")
    with pytest.raises(SpinesegError, match="line 2: case 'P000_00' has no patient"):
        load_dataset(data)
    # a spreadsheet's "CSV UTF-8" (a byte-order mark) is read as it is meant
    data = tmp_path / "bom"
    _with_cases_csv(small_phantom, data, "")
    (data / "cases.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    assert [c.patient for c in load_dataset(data)] == [c.patient for c in load_dataset(small_phantom)]


def test_a_new_run_refuses_a_leftover_splits_json_of_another_split(small_phantom, tmp_path, capsys):
    """A run killed in its first epoch leaves splits.json and no last.pt: a new run in that folder must not train
    on it while its config records the split asked for; the same split is fine, and the file is kept."""
    from spineseg.cli import main
    from spineseg.train.loop import Trainer

    out = tmp_path / "r"
    out.mkdir()
    cases = [c for c in load_dataset(small_phantom) if c.subset == "train"]
    write_splits(out / "splits.json", paper_splits(cases))
    before = (out / "splits.json").read_bytes()
    tiny = {"preprocess": {"target_size": 64}, "model": {"base": 4}}
    with pytest.raises(SpinesegError, match="already holds a splits.json.*kfold split.*remove it, or choose another") \
            as err:
        Trainer(small_phantom, "unet", out, overrides=tiny, progress=False, cache=tmp_path / "cache")
    assert err.value.path == str(out / "splits.json")
    other = tmp_path / "other.json"
    write_splits(other, kfold_splits(cases))
    rc = main(["train", "--data", str(small_phantom), "--model", "unet", "--splits", str(other), "--out", str(out),
               "--quiet", "--set", "preprocess.target_size=64", "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "other.json" in err and "splits.json" in err
    assert (out / "splits.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["splits.json"]
    t = Trainer(small_phantom, "unet", out, split="paper", overrides=tiny, progress=False, cache=tmp_path / "cache")
    assert t.splits == paper_splits(cases)


def _nifti(path, data, affine=None):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))


def test_two_images_or_two_masks_of_one_case_name_are_refused_naming_both(tmp_path):
    """``a.nii`` and ``a.nii.gz`` are one case name: which mask pairs with which image must not be a guess."""
    img, lab = np.ones((8, 8, 1), np.float32), np.zeros((8, 8, 1), np.uint8)
    _nifti(tmp_path / "images" / "a.nii.gz", img)
    _nifti(tmp_path / "masks" / "a.nii.gz", lab)
    _nifti(tmp_path / "masks" / "a.nii", lab + 1)
    with pytest.raises(SpinesegError, match=r"a\.nii.*a\.nii\.gz.*one case name") as err:
        load_dataset(tmp_path)
    assert "masks" in err.value.path
    (tmp_path / "masks" / "a.nii").unlink()
    _nifti(tmp_path / "images" / "a.nii", img)
    with pytest.raises(SpinesegError, match=r"a\.nii.*a\.nii\.gz.*one case name"):
        load_dataset(tmp_path, require_labels=False)


def test_a_mask_without_its_image_is_refused_naming_it(tmp_path):
    """A mask that pairs with no image (``case1.nii.gz`` beside ``Case1.nii.gz``) is a naming slip, not a mask to drop:
    an unlabelled-allowed read would otherwise treat the image as unlabelled without a word."""
    _nifti(tmp_path / "images" / "Case1.nii.gz", np.ones((8, 8, 1), np.float32))
    _nifti(tmp_path / "masks" / "case1.nii.gz", np.zeros((8, 8, 1), np.uint8))
    with pytest.raises(SpinesegError, match=r"no image.*Case1\.nii\.gz") as err:
        load_dataset(tmp_path, require_labels=False)
    assert err.value.path.endswith("case1.nii.gz")


def test_nnunet_images_not_named_case_0000_with_the_file_ending_are_refused_naming_them(tmp_path):
    """An imagesTr file without ``_0000`` + ``file_ending`` was dropped without a word (or, when all were, the
    data set 'held no images'), so a case could silently be missing from training."""
    import json

    (tmp_path / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    img, lab = np.ones((8, 8, 1), np.float32), np.zeros((8, 8, 1), np.uint8)
    _nifti(tmp_path / "imagesTr" / "a_0000.nii.gz", img)
    _nifti(tmp_path / "labelsTr" / "a.nii.gz", lab)
    _nifti(tmp_path / "imagesTr" / "b.nii.gz", img)
    _nifti(tmp_path / "labelsTr" / "b.nii.gz", lab)
    with pytest.raises(SpinesegError, match=r"_0000\.nii\.gz") as err:
        load_dataset(tmp_path)
    assert err.value.path.endswith("b.nii.gz")
    (tmp_path / "imagesTr" / "b.nii.gz").unlink()
    _nifti(tmp_path / "imagesTr" / "b_0000.nii", img)  # .nii where dataset.json says .nii.gz
    with pytest.raises(SpinesegError, match=r"file_ending") as err:
        load_dataset(tmp_path)
    assert err.value.path.endswith("b_0000.nii")
    (tmp_path / "imagesTr" / "b_0000.nii").unlink()
    _nifti(tmp_path / "imagesTr" / "a_0001.nii.gz", img)  # a second channel spineseg would not read
    with pytest.raises(SpinesegError, match=r"channel") as err:
        load_dataset(tmp_path)
    assert err.value.path.endswith("a_0001.nii.gz")
    (tmp_path / "imagesTr" / "a_0001.nii.gz").unlink()
    assert [c.case_id for c in load_dataset(tmp_path)] == ["a"]


def test_a_patient_written_with_surrounding_spaces_is_the_same_patient(tmp_path):
    """``c2, P1`` (a space after the comma) is patient P1: read as ' P1' it became a second patient, and P1's
    slices could be split between training and test."""
    for c in ("c1", "c2", "c3"):
        _nifti(tmp_path / "images" / f"{c}.nii.gz", np.ones((8, 8, 1), np.float32))
        _nifti(tmp_path / "masks" / f"{c}.nii.gz", np.zeros((8, 8, 1), np.uint8))
    (tmp_path / "cases.csv").write_text("case,patient\nc1,P1\nc2, P1\n c3 ,P2 \n")
    assert {c.case_id: c.patient for c in load_dataset(tmp_path)} == {"c1": "P1", "c2": "P1", "c3": "P2"}


def test_a_mask_on_another_voxel_grid_than_its_image_is_refused(tmp_path):
    """Image and mask of one shape but another spacing or axis direction (a mask saved with an identity affine,
    say) were paired voxel by voxel after each was turned to the display convention by its own header: the mask
    came out mirrored or mis-scaled against the image without a word. The same grid stored in another voxel
    order is the same pair and is read."""
    from spineseg.data.phantom import phantom_slice
    from spineseg.io.images import save_slice_nifti, slice_affine
    from spineseg.io.nnunet import export_nnunet

    s = phantom_slice(0, 4, 1, size=128, spacing=1.5)
    img, lab = s.image.T[:, :, None].astype(np.float32), s.label.T[:, :, None].astype(np.uint8)
    good = slice_affine(s.spacing)
    save_slice_nifti(tmp_path / "images" / "a.nii.gz", s.image.astype(np.float32), s.spacing)
    cfg = PreprocessConfig(target_size=64)
    for name, affine in (("identity", np.eye(4)), ("mirrored", good @ np.diag([-1.0, 1.0, 1.0, 1.0]))):
        _nifti(tmp_path / "masks" / "a.nii.gz", lab, affine)
        with pytest.raises(SpinesegError, match="voxel grid") as err:
            prepare_slices(load_dataset(tmp_path), cfg)
        assert err.value.path.endswith("a.nii.gz") and "masks" in err.value.path, name
        with pytest.raises(SpinesegError, match="voxel grid"):
            export_nnunet(tmp_path, tmp_path / "raw")
        assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    # the same grid stored left-right reversed (another tool's voxel order): the same pair
    flip = good @ np.array([[-1, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    _nifti(tmp_path / "masks" / "a.nii.gz", lab[::-1], flip)
    (rec,) = prepare_slices(load_dataset(tmp_path), cfg)
    _nifti(tmp_path / "masks" / "a.nii.gz", lab, good)
    (same,) = prepare_slices(load_dataset(tmp_path), cfg)
    assert np.array_equal(rec.label, same.label) and rec.label.any()


def test_nnunet_export_and_import_keep_every_case_whatever_its_name(tmp_path):
    """A single-slice case named like a volume's slice (``a_s001`` beside the 3-slice case ``a``, or ``x_s002``)
    was written over ``a``'s slice file on export, and on import re-joined under the wrong case name."""
    import shutil

    from spineseg.io.images import read_label
    from spineseg.io.nnunet import export_nnunet, import_nnunet

    rng = np.random.default_rng(0)
    labels = {"a": rng.integers(0, 4, (6, 5, 3)), "a_s001": rng.integers(0, 4, (6, 5, 1)),
              "x_s002": rng.integers(0, 4, (6, 5, 1))}
    for cid, lab in labels.items():
        _nifti(tmp_path / "data" / "images" / f"{cid}.nii.gz", rng.random(lab.shape).astype(np.float32))
        _nifti(tmp_path / "data" / "masks" / f"{cid}.nii.gz", lab.astype(np.uint8))
    folder = export_nnunet(tmp_path / "data", tmp_path / "raw")
    assert len(list((folder / "labelsTr").iterdir())) == 5 == len(list((folder / "imagesTr").iterdir()))
    pred = tmp_path / "nnpred"  # nnU-Net's predictions: here the exported labels themselves
    shutil.copytree(folder / "labelsTr", pred)
    run = import_nnunet(pred, tmp_path / "run")
    assert sorted(p.name for p in (run / "pred").iterdir()) == ["a.nii.gz", "a_s001.nii.gz", "x_s002.nii.gz"]
    for cid in labels:
        got = read_label(run / "pred" / f"{cid}.nii.gz").data
        assert np.array_equal(got, read_label(tmp_path / "data" / "masks" / f"{cid}.nii.gz").data), cid
    (pred / "a_s001.nii.gz").unlink()  # a volume's slice nnU-Net did not predict: refused, not skipped over
    with pytest.raises(SpinesegError, match="no prediction for slice 001"):
        import_nnunet(pred, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_nnunet_export_writes_a_patient_map_it_reads_back(tmp_path):
    """The exported cases.csv is CSV: a patient id holding a comma ("Doe, J") comes back whole, not cut at it."""
    from spineseg.io.layouts import read_patient_map
    from spineseg.io.nnunet import export_nnunet

    for cid in ("c1", "c2"):
        _nifti(tmp_path / "data" / "images" / f"{cid}.nii.gz", np.ones((6, 5, 1), np.float32))
        _nifti(tmp_path / "data" / "masks" / f"{cid}.nii.gz", np.zeros((6, 5, 1), np.uint8))
    (tmp_path / "data" / "cases.csv").write_text('case,patient\nc1,"Doe, J"\nc2,"Doe, K"\n')
    folder = export_nnunet(tmp_path / "data", tmp_path / "raw")
    assert read_patient_map(folder / "cases.csv") == {"c1": "Doe, J", "c2": "Doe, K"}


def test_nnunet_export_refuses_a_split_file_that_puts_one_patient_on_both_sides(tmp_path):
    """nnU-Net would train on one of P1's cases and test on the other: the exported splits_final.json must be
    patient-level like every split spineseg trains on."""
    from spineseg.io.nnunet import export_nnunet

    for cid in ("c1", "c2", "c3"):
        _nifti(tmp_path / "data" / "images" / f"{cid}.nii.gz", np.ones((6, 5, 1), np.float32))
        _nifti(tmp_path / "data" / "masks" / f"{cid}.nii.gz", np.zeros((6, 5, 1), np.uint8))
    (tmp_path / "data" / "cases.csv").write_text("case,patient\nc1,P1\nc2,P1\nc3,P2\n")
    leaky = [{"train": ["c1", "c3"], "val": [], "test": ["c2"]}]
    with pytest.raises(SpinesegError, match="patient 'P1'.*leakage") as e:
        export_nnunet(tmp_path / "data", tmp_path / "raw", leaky, splits_source=tmp_path / "splits.json")
    assert str(e.value).startswith(str(tmp_path / "splits.json"))  # the error names the file the splits came from
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    export_nnunet(tmp_path / "data", tmp_path / "raw", [{"train": ["c3"], "val": [], "test": ["c1", "c2"]}])


def test_the_random_flip_mirrors_left_and_right_never_front_and_back():
    """flip_lr mirrors the columns (patient right <-> left) of image and mask together; the rows (anterior ->
    posterior: body in front of the canal) are never turned upside down."""
    img = torch.arange(64 * 48, dtype=torch.float32).reshape(1, 64, 48) / (64 * 48)
    mask = torch.zeros(64, 48, dtype=torch.long)
    mask[5:20, 3:15] = 1  # top left: an asymmetric mask
    flip = AugmentConfig(rotate_deg=0, scale=(1, 1), shift=0, intensity=0, flip_lr=True)
    g = torch.Generator().manual_seed(0)
    flipped = kept = 0
    for _ in range(16):
        a, m = augment(img, mask, flip, g)
        if torch.equal(m, mask):
            assert torch.allclose(a, img, atol=1e-5)
            kept += 1
        else:
            assert torch.equal(m, mask.flip(-1)) and torch.allclose(a, img.flip(-1), atol=1e-5)
            flipped += 1
    assert flipped and kept  # a coin toss per sample


def test_check_splits_refuses_a_patient_in_two_subsets_and_names_it():
    from spineseg.data.splits import check_splits

    cases = _cases(n_pat=6, per=2)
    good = kfold_splits(cases, folds=3)
    check_splits(good, cases)  # patient-level splits pass
    leaky = [dict(good[0], train=good[0]["train"] + good[0]["test"][:1], test=good[0]["test"][1:])]
    patient = good[0]["test"][0].split("_")[0]
    with pytest.raises(SpinesegError, match=f"patient '{patient}'.*leakage"):
        check_splits(leaky, cases)
