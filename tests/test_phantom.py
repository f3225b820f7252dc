import hashlib

import numpy as np
import pytest

from spineseg import STRUCTURES
from spineseg.data.phantom import STRUCTURE_TISSUES, TISSUE_NAMES, area_range, phantom_slice
from spineseg.data.phantom_dataset import write_phantom_dataset
from spineseg.eval.threshold_baseline import ThresholdBaseline


@pytest.fixture(scope="module")
def slices():
    # 40 slices at 256 x 0.78 mm (200 mm FOV) and 6 at the default 512 x 0.3906 mm
    out = [phantom_slice(1, p, k, size=256, spacing=0.78125) for p in range(20) for k in range(2)]
    out += [phantom_slice(1, p, 0) for p in range(20, 26)]
    return out


def test_label_values_and_all_structures(slices):
    for s in slices:
        vals = set(np.unique(s.label).tolist())
        assert vals <= {0, 1, 2, 3}
        assert vals == {0, 1, 2, 3}, f"missing structure in {s.meta}"
        assert s.image.shape == s.label.shape


def test_every_label_covers_only_its_own_tissues(slices):
    # a label is cleared wherever something else (foraminal fat, roots, ligaments, disc) is painted over it
    randomized = [phantom_slice(1, p, 0, randomize=True) for p in range(8)]
    for s in slices + randomized:
        for lab, own in STRUCTURE_TISSUES.items():
            foreign = (s.label == lab) & ~np.isin(s.tissue, own)
            names = sorted({TISSUE_NAMES[t] for t in np.unique(s.tissue[foreign])})
            assert not foreign.any(), f"label {lab} over {names} ({foreign.sum()} px) in {s.meta}"


def test_areas_within_anatomical_ranges(slices):
    for s in slices:
        px = s.spacing[0] * s.spacing[1]
        m = s.meta
        for k, name in enumerate(STRUCTURES, start=1):
            area = float((s.label == k).sum()) * px
            lo, hi = area_range(name, m["position"], m["stenosis"], m["protrusion"])
            assert lo <= area <= hi, f"{name} area {area:.0f} mm2 outside [{lo}, {hi}] for {m}"


def test_each_structure_is_one_region(slices):
    from scipy import ndimage as ndi

    for s in slices:
        for k in (1, 2):
            n = ndi.label(s.label == k)[1]
            assert n == 1, f"label {k} has {n} components ({s.meta})"


def test_anatomical_order_body_canal_lamina(slices):
    # anterior at the top: body centroid row < canal centroid row < lamina centroid row
    for s in slices[:20]:
        rows = [np.argwhere(s.label == k)[:, 0].mean() for k in (1, 2, 3)]
        assert rows[0] < rows[1] < rows[2]


def test_stenosis_occurs_and_is_narrow():
    found = []
    for p in range(40):
        s = phantom_slice(0, p, 0, size=256, spacing=0.78125)
        if s.meta["stenosis"]:
            found.append((s.label == 2).sum() * 0.78125 ** 2)
    assert found, "no stenotic slice among 40 patients"
    assert max(found) < 100


def test_same_seed_same_bytes(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", 2, 2, size=96, spacing=2.0, seed=5, progress=False)
    b = write_phantom_dataset(tmp_path / "b", 2, 2, size=96, spacing=2.0, seed=5, progress=False)
    c = write_phantom_dataset(tmp_path / "c", 2, 2, size=96, spacing=2.0, seed=6, progress=False)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "phantom.json"}

    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_contrasts_change_appearance_not_anatomy():
    t2 = phantom_slice(0, 3, 1, size=128, spacing=1.5625, contrast="t2")
    t1 = phantom_slice(0, 3, 1, size=128, spacing=1.5625, contrast="t1")
    assert np.array_equal(t2.label, t1.label)
    from spineseg.data.phantom import CSF, MARROW

    def ratio(s):  # CSF over marrow: bright fluid on T2, dark fluid on T1
        return s.image[s.tissue == CSF].mean() / s.image[s.tissue == MARROW].mean()

    assert ratio(t2) > 1.5 and ratio(t1) < 0.7


def test_threshold_baseline_fails_on_lamina():
    train = [phantom_slice(2, p, k, size=256, spacing=0.78125) for p in range(6) for k in range(2)]
    test = [phantom_slice(2, p, k, size=256, spacing=0.78125) for p in range(6, 10) for k in range(2)]
    b = ThresholdBaseline().fit([s.image for s in train], [s.label for s in train])
    scores = b.score([s.image for s in test], [s.label for s in test])
    assert scores["lamina"] < 0.6
