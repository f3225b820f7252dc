import numpy as np
import pytest
import torch

from spineseg.data.augment import AugmentConfig, random_affine
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
        a, m = random_affine(img, mask, cfg, g)
        assert a.shape == img.shape and m.shape == mask.shape
        assert set(m.unique().tolist()) <= {0, 3}
        # the mask moved with the image: bright pixels are where the mask is
        assert a[0][m == 3].mean() > 0.9 and a[0][m == 0].mean() < 0.2
    ident = AugmentConfig(rotate_deg=0, scale=(1, 1), shift=0, intensity=0)
    a, m = random_affine(img, mask, ident, g)
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
