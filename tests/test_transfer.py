import hashlib

import numpy as np
import pytest

from spineseg.data.phantom import phantom_slice
from spineseg.eval.sanity import check_slice, sanity_report
from spineseg.io.images import Image
from spineseg.preprocess.pipeline import PreprocessConfig, preprocess_slice, probabilities_to_labels

WORKING = PreprocessConfig(target_size=192, target_spacing=1.0, posterior_shift=0.2)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("size,spacing", [(400, 1.0185), (224, 0.9), (208, 1.1)])
def test_working_spacing_round_trip(size, spacing):
    s = phantom_slice(0, 2, 1, size=size, spacing=spacing)
    x, lab, g = preprocess_slice(s.image, s.spacing, WORKING, s.label)
    assert x.shape == (192, 192)
    assert g.out_spacing == pytest.approx((1.0, 1.0), rel=0.02)  # the network sees 1 mm pixels
    back = probabilities_to_labels(np.eye(4, dtype=np.float32)[lab].transpose(2, 0, 1), g)
    assert back.shape == s.label.shape and g.spacing == s.spacing
    for k in (1, 2, 3):
        assert _dice(back == k, s.label == k) >= 0.98, (k, spacing)


def test_working_spacing_round_trip_from_a_fine_scan():
    # 0.39 mm -> 1.0 mm -> 0.39 mm: bounded by what a 1 mm grid can carry (README quotes these values)
    s = phantom_slice(0, 2, 1, size=512, spacing=0.3906)
    x, lab, g = preprocess_slice(s.image, s.spacing, WORKING, s.label)
    back = probabilities_to_labels(np.eye(4, dtype=np.float32)[lab].transpose(2, 0, 1), g)
    assert back.shape == s.label.shape
    for k in (1, 2, 3):
        assert _dice(back == k, s.label == k) >= 0.96, k


def test_same_anatomy_same_scale_whatever_the_scan_resolution():
    fine = phantom_slice(0, 5, 0, size=512, spacing=0.3906)
    coarse = phantom_slice(0, 5, 0, size=200, spacing=1.0)
    _, lf, _ = preprocess_slice(fine.image, fine.spacing, WORKING, fine.label)
    _, lc, _ = preprocess_slice(coarse.image, coarse.spacing, WORKING, coarse.label)
    for k in (1, 2, 3):  # structure areas in working-grid pixels agree
        assert abs(int((lf == k).sum()) - int((lc == k).sum())) <= 0.08 * (lc == k).sum()


def test_randomized_phantom_is_deterministic_and_varied():
    a = [phantom_slice(4, p, 0, randomize=True) for p in range(6)]
    b = [phantom_slice(4, p, 0, randomize=True) for p in range(6)]
    for x, y in zip(a, b):
        assert hashlib.sha1(x.image.tobytes()).digest() == hashlib.sha1(y.image.tobytes()).digest()
        assert np.array_equal(x.label, y.label)
    assert len({s.meta["contrast"] for s in a}) >= 3
    assert len({s.spacing for s in a}) == 6
    for s in a:  # anatomy in mm is unchanged by randomisation
        for k, (lo, hi) in zip((1, 2, 3), ((250, 2000), (35, 300), (150, 650))):
            assert lo <= (s.label == k).sum() * s.spacing[0] ** 2 <= hi


def test_check_slice_passes_truth_and_catches_errors():
    s = phantom_slice(0, 1, 0, size=256, spacing=0.78125)
    assert check_slice(s.label, s.spacing)["passed"]
    no_lamina = np.where(s.label == 3, 0, s.label)
    r = check_slice(no_lamina, s.spacing)
    assert not r["passed"] and "lamina missing" in r["reason"]
    swapped = s.label.copy()  # canal moved in front of the body
    swapped[s.label == 2] = 0
    rows = np.argwhere(s.label == 1)[:, 0]
    swapped[rows.min() - 20:rows.min() - 8, 120:136] = 2
    assert "canal not between" in check_slice(swapped, s.spacing)["reason"]
    split = s.label.copy()
    cols = np.argwhere(s.label == 1)[:, 1]
    split[:, (cols.min() + cols.max()) // 2] = np.where(split[:, (cols.min() + cols.max()) // 2] == 1, 0,
                                                        split[:, (cols.min() + cols.max()) // 2])
    assert "vertebral_body in 2 regions" in check_slice(split, s.spacing)["reason"]


def test_sanity_report_on_synthetic_volume(tmp_path):
    sl = [phantom_slice(0, p, 0, size=160, spacing=1.25) for p in range(3)]
    data = np.stack([s.image for s in sl]).astype(np.float32)
    labels = np.stack([s.label for s in sl])
    labels[2][labels[2] == 3] = 0  # one slice without laminae fails
    img = Image(data, (1.25, 1.25), 4.0, "synthetic", np.eye(4), data.shape, None)
    rep = sanity_report(img, labels, tmp_path / "s")
    assert rep["slices"] == 3 and rep["passed"] == 2 and rep["fraction"] == pytest.approx(2 / 3)
    assert (tmp_path / "s" / "montage.png").stat().st_size > 5000
    assert len((tmp_path / "s" / "sanity.csv").read_text().splitlines()) == 4


def test_sanity_command_on_real_volumes(realdata, tmp_path, capsys):
    from spineseg.cli import main
    from spineseg.infer.predict import resolve_checkpoint

    try:
        resolve_checkpoint("pretrained")
    except Exception:
        pytest.skip("no pretrained model shipped")
    for name in ("TUM01", "TUM02"):
        out = tmp_path / name
        assert main(["sanity", "--model", "pretrained", "--input",
                     str(realdata / f"{name}_water_img_img_L2-L5.nii.gz"), "--out", str(out)]) == 0
        lines = (out / "sanity.csv").read_text().splitlines()
        assert len(lines) == 30
        passed = sum(line.split(",")[1] == "True" for line in lines[1:])
        # the shipped model passed 29/29 (TUM01) and 27/29 (TUM02) when it was packed; guard against regressions
        assert passed >= 25, (name, passed)
        assert "slices pass" in capsys.readouterr().out
