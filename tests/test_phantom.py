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
    # every structure on every slice, except the vertebral body on a slice through the disc
    for s in slices:
        vals = set(np.unique(s.label).tolist())
        expected = {0, 2, 3} if s.meta["position"] == "disc" else {0, 1, 2, 3}
        assert vals == expected, f"labels {vals} in {s.meta}"
        assert s.image.shape == s.label.shape
    positions = [s.meta["position"] for s in slices]
    assert {"disc", "endplate", "infrapedicular", "pedicle"} <= set(positions), positions


def test_every_label_covers_only_its_own_tissues(slices):
    # a label is cleared wherever something else (foraminal fat, roots, ligaments, disc) is painted over it
    randomized = [phantom_slice(1, p, 0, randomize=True) for p in range(8)]
    for s in slices + randomized:
        for lab, own in STRUCTURE_TISSUES.items():
            foreign = (s.label == lab) & ~np.isin(s.tissue, own)
            names = sorted({TISSUE_NAMES[t] for t in np.unique(s.tissue[foreign])})
            assert not foreign.any(), f"label {lab} over {names} ({foreign.sum()} px) in {s.meta}"


def test_tissues_of_one_structure_lie_under_its_label(slices):
    # CSF and epidural fat fill the canal label, marrow foci / vein / Modic change only the body label
    from spineseg.data.phantom import BASIVERTEBRAL_VEIN, CSF, EPIFAT, MODIC, YELLOW_MARROW

    owner = {CSF: 2, EPIFAT: 2, BASIVERTEBRAL_VEIN: 1, MODIC: 1}
    for s in slices:
        for tissue, lab in owner.items():
            assert np.all(s.label[s.tissue == tissue] == lab), (TISSUE_NAMES[tissue], s.meta)
        assert np.all(np.isin(s.label[s.tissue == YELLOW_MARROW], (1,))), s.meta


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
            expected = 0 if k == 1 and s.meta["position"] == "disc" else 1
            assert n == expected, f"label {k} has {n} components ({s.meta})"


def test_anatomical_order_body_canal_lamina(slices):
    # anterior at the top: body (or the disc that replaces it) row < canal centroid row < lamina centroid row
    from spineseg.data.phantom import ANNULUS, NUCLEUS

    for s in slices[:20]:
        front = (s.label == 1) if s.meta["position"] != "disc" else np.isin(s.tissue, (ANNULUS, NUCLEUS))
        rows = [np.argwhere(m)[:, 0].mean() for m in (front, s.label == 2, s.label == 3)]
        assert rows[0] < rows[1] < rows[2], s.meta


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


def test_disc_level_slices_replace_the_body_by_disc():
    # through the disc: no body label, the disc where the body would be; at the endplate: disc inside a body rim
    from spineseg.data.phantom import ANNULUS, NUCLEUS

    seen = set()
    for p in range(30):
        s = phantom_slice(0, p, 0, size=128, spacing=1.5625)
        disc = np.isin(s.tissue, (ANNULUS, NUCLEUS)).sum() * 1.5625 ** 2
        if s.meta["position"] == "disc":
            assert not (s.label == 1).any() and disc > 700, s.meta
        elif s.meta["position"] == "endplate":
            assert (s.label == 1).any() and disc > 100, s.meta
        seen.add(s.meta["position"])
    assert {"disc", "endplate"} <= seen


def test_posterior_surface_coil_darkens_the_front():
    # the same tissue (fat) is bright behind the spine and dark in front of it when a surface coil is used
    from spineseg.data.phantom import FAT

    def fat_back_over_front(s):
        lam_rows = np.nonzero((s.label == 3).any(1))[0]
        body_rows = np.nonzero(np.isin(s.label, (1, 2)).any(1))[0]
        fat = s.tissue == FAT
        back, front = fat.copy(), fat.copy()
        back[:lam_rows.max()] = False
        front[body_rows.min() - 20:] = False
        return s.image[back].mean() / s.image[front].mean()

    ratios = {True: [], False: []}
    for seed in range(3):  # several scanners; some have no surface coil
        for p in range(8):
            s = phantom_slice(seed, p, 1, size=96, spacing=2.0833)
            ratios[s.meta["coil"]].append(fat_back_over_front(s))
    assert ratios[True] and ratios[False]
    assert np.median(ratios[True]) > 2.0 and np.median(ratios[False]) < 1.5, ratios


def test_thick_slices_blend_the_anatomy_above_and_below(monkeypatch):
    # where the anatomy half a slice away differs (e.g. pedicle -> foramen), the image mixes it in; labels do not
    import spineseg.data.phantom as P

    case = next((p, k) for p in range(40) for k in range(2)
                if phantom_slice(0, p, k, size=32, spacing=6.25).meta["slab"])
    thick = phantom_slice(0, *case, size=256, spacing=0.78125)
    scanner = P._scanner_params
    monkeypatch.setattr(P, "_scanner_params", lambda *a: dict(scanner(*a), slab_weight=0.0))
    thin = phantom_slice(0, *case, size=256, spacing=0.78125)
    assert np.array_equal(thick.label, thin.label) and np.array_equal(thick.tissue, thin.tissue)
    a, g = P._plan_slice(0, *case, 256, 0.78125)
    changed = np.zeros(thick.label.shape, bool)
    for cut in P._slab_cuts(a, scanner(0, a["pp"]["scanner"])):
        changed |= P._paint(g, a, cut, P._paint_soft_tissue(g, a))[0] != thick.tissue
    diff = np.abs(thick.image.astype(float) - thin.image)
    from scipy import ndimage as ndi

    far = ~ndi.binary_dilation(changed, iterations=6)
    assert changed.sum() > 50, thick.meta
    assert diff[changed].mean() > 5 * diff[far].mean(), (diff[changed].mean(), diff[far].mean())


def test_dural_sac_fills_a_variable_part_of_the_canal(slices):
    # the canal label is the whole canal space: sometimes mostly CSF, sometimes a small sac in epidural fat
    from spineseg.data.phantom import CSF, NERVE

    sac_share = [np.isin(s.tissue[s.label == 2], (CSF, NERVE)).mean() for s in slices]
    assert min(sac_share) < 0.5 and max(sac_share) > 0.75, (min(sac_share), max(sac_share))


def test_slice_position_shares():
    from collections import Counter

    from spineseg.data.phantom import POSITIONS, _plan_slice, check_positions

    def shares(positions):
        n = Counter(_plan_slice(0, p, k, 64, 3.0, positions=check_positions(positions))[0]["position"]
                    for p in range(150) for k in range(4))
        return np.array([n[pos] / 600 for pos in POSITIONS])

    # the default: a quarter of the slices at the disc; the old mix on request (normalised)
    assert np.allclose(shares((0.25, 0.20, 0.20, 0.35)), (0.25, 0.20, 0.20, 0.35), atol=0.05)
    assert np.allclose(shares((14, 22, 24, 40)), (0.14, 0.22, 0.24, 0.40), atol=0.05)
    only_disc = phantom_slice(3, 0, 0, size=128, spacing=1.5625, positions=(1, 0, 0, 0))
    assert only_disc.meta["position"] == "disc" and not (only_disc.label == 1).any()
    with pytest.raises(ValueError, match="non-negative"):
        check_positions((0.5, -0.1, 0.3, 0.3))
