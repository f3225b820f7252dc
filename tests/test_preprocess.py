import numpy as np
import pytest

from spineseg.data.phantom import phantom_slice
from spineseg.preprocess.pipeline import (PreprocessCache, PreprocessConfig, inverse_geometry, plan_geometry,
                                          preprocess_slice, probabilities_to_labels)

# the slices these tests were written for (the same seeds under the older position mix), each with a body
from spineseg.data.phantom import POSITION_P_BEFORE_2026_11 as BEFORE_DISC_CHANGE  # noqa: E402


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("cfg", [PreprocessConfig(target_size=512), PreprocessConfig(target_size=256),
                                 PreprocessConfig(target_size=192, target_spacing=1.0)])
def test_label_forward_and_back(cfg):
    s = phantom_slice(0, 4, 1, size=400, spacing=0.5, positions=BEFORE_DISC_CHANGE)
    img, lab, g = preprocess_slice(s.image, s.spacing, cfg, s.label)
    assert img.shape == lab.shape == (cfg.target_size, cfg.target_size)
    assert abs(float(img[lab > 0].mean())) < 5 and np.isfinite(img).all()
    back = inverse_geometry(lab, g, order=0)
    assert back.shape == s.label.shape and g.spacing == s.spacing
    thr = 0.99 if cfg.target_size >= 400 else 0.9  # down-sampling to 256 loses thin lamina pixels
    for k in (1, 2, 3):
        assert _dice(back == k, s.label == k) >= thr, (k, cfg)


def test_probabilities_back_to_labels_is_at_least_as_good_as_nearest():
    s = phantom_slice(0, 2, 0, size=400, spacing=0.5, positions=BEFORE_DISC_CHANGE)
    img, lab, g = preprocess_slice(s.image, s.spacing, PreprocessConfig(target_size=256), s.label)
    onehot = np.eye(4, dtype=np.float32)[lab].transpose(2, 0, 1)
    back = probabilities_to_labels(onehot, g)
    near = inverse_geometry(lab, g, order=0)
    for k in (1, 2, 3):
        assert _dice(back == k, s.label == k) >= _dice(near == k, s.label == k) - 0.01


def _smooth_probabilities(rng, size: int) -> np.ndarray:
    """Softmax of smooth random logits with background leading: blobs of each class, with near-ties at their edges."""
    from scipy import ndimage as ndi

    logits = ndi.gaussian_filter(rng.normal(size=(4, size, size)), (0, 3, 3)) * rng.uniform(5, 40)
    logits[0] += rng.uniform(0, 3)
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32)


def test_mapping_back_equals_resampling_the_whole_grid():
    """probabilities_to_labels resamples only around the foreground; its labels must be exactly those of
    resampling every class over the whole original grid and taking the argmax (crops, padding, up- and
    down-sampling, near-ties between background and a class)."""
    rng = np.random.default_rng(0)
    windowed = 0
    for _ in range(40):
        H, W = (int(v) for v in rng.integers(80, 300, 2))
        r0, c0 = (int(v) for v in rng.integers(0, 15, 2))
        crop = (r0, H - int(rng.integers(0, 15)), c0, W - int(rng.integers(0, 15)))
        spacing = float(rng.uniform(0.3, 1.3))
        cfg = PreprocessConfig(target_size=int(rng.choice([48, 64, 96])), target_spacing=1.0)
        g = plan_geometry((H, W), (spacing, spacing), crop, cfg)
        probs = _smooth_probabilities(rng, g.out_size)
        expected = inverse_geometry(probs, g, order=1, fill=0.0).argmax(0)
        got = probabilities_to_labels(probs, g)
        assert got.dtype == np.uint8 and got.shape == (H, W)
        np.testing.assert_array_equal(got, expected)
        windowed += spacing < 1.0 and 0 < (expected > 0).mean() < 0.5
    assert windowed >= 10  # the windowed path was exercised, on slices with background around the foreground


def test_mapping_back_keeps_a_class_that_leads_background_narrowly():
    g = plan_geometry((200, 180), (0.5, 0.5), (10, 190, 5, 175), PreprocessConfig(target_size=64, target_spacing=1.0))
    probs = np.full((4, 64, 64), 0.02, np.float32)
    probs[0] = 0.94
    probs[:, 30:35, 28:33] = np.array([0.49999, 0.5, 0.00001, 0.0], np.float32)[:, None, None]
    got = probabilities_to_labels(probs, g)
    np.testing.assert_array_equal(got, inverse_geometry(probs, g, order=1, fill=0.0).argmax(0))
    assert (got == 1).sum() > 50


def test_zscore_and_padding():
    s = phantom_slice(0, 1, 0, size=256, spacing=0.78125)
    img = np.pad(s.image, ((0, 0), (60, 60)))  # a wide image: padding rows are needed
    out, _, g = preprocess_slice(img, s.spacing, PreprocessConfig(target_size=128))
    valid = np.zeros_like(out, bool)
    orr, oc = g.offset
    valid[orr:orr + g.window[1] - g.window[0], oc:oc + g.window[3] - g.window[2]] = True
    assert abs(out[valid].mean()) < 1e-3 and abs(out[valid].std() - 1) < 1e-2
    assert np.all(out[~valid] == 0)


def test_cache_avoids_recomputation(tmp_path, small_phantom, monkeypatch):
    from spineseg.data import dataset as dsmod
    from spineseg.io.layouts import load_dataset

    cases = load_dataset(small_phantom)[:3]
    cfg = PreprocessConfig(target_size=64)
    cache = PreprocessCache(tmp_path / "cache")
    first = dsmod.prepare_slices(cases, cfg, cache)

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(dsmod, "preprocess_slice", boom)
    second = dsmod.prepare_slices(cases, cfg, cache)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) for a, b in zip(first, second))
    # other parameters are another key: computed again
    with pytest.raises(AssertionError, match="recomputed"):
        dsmod.prepare_slices(cases, PreprocessConfig(target_size=64, clahe=False), cache)


def test_the_preprocess_cache_keeps_a_raster_read_at_another_spacing_apart(tmp_path):
    """A PNG's pixel spacing is given, not stored: the cache must not hand back slices preprocessed at the
    spacing of an earlier run (a wrong --spacing corrected) as if they were read at the new one."""
    from spineseg.data.dataset import prepare_slices
    from spineseg.io.images import save_png
    from spineseg.io.layouts import Case

    s = phantom_slice(0, 4, 1, size=160, spacing=1.0, positions=BEFORE_DISC_CHANGE)
    save_png(tmp_path / "a.png", s.image)
    case, cfg, cache = Case("a", tmp_path / "a.png", None, "a"), PreprocessConfig(target_size=64), \
        PreprocessCache(tmp_path / "cache")
    for spacing in (0.5, 1.0, 0.5):
        (rec,) = prepare_slices([case], cfg, cache, spacing=spacing)
        assert rec.geometry.spacing == (spacing, spacing)
