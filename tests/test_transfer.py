import hashlib

import numpy as np
import pytest

from spineseg import STRUCTURES
from spineseg.data.phantom import area_range, phantom_slice
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
        m = s.meta
        for k, name in enumerate(STRUCTURES, start=1):
            lo, hi = area_range(name, m["position"], m["stenosis"], m["protrusion"])
            assert lo <= (s.label == k).sum() * s.spacing[0] ** 2 <= hi, (name, m)
