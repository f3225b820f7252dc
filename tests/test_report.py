import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image as PILImage

from spineseg.cli import main
from spineseg.infer.report import RAW_COLOR, montage_png
from spineseg.io.images import read_image, save_nifti, save_slice_nifti
from spineseg.io.preview import LABEL_COLORS

LAMINA_RGB = np.array(LABEL_COLORS[3]) * 255


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``predict --report`` on a two-slice phantom volume and a single slice, with the shipped model."""
    from spineseg.data.phantom import phantom_slice

    d = tmp_path_factory.mktemp("report")
    slices = [phantom_slice(0, p, 1, size=160, spacing=1.2) for p in (5, 6)]
    save_nifti(d / "volume.nii.gz", np.stack([s.image.T for s in slices], -1), np.diag([-1.2, -1.2, 4.0, 1.0]))
    save_slice_nifti(d / "single.nii.gz", slices[0].image, slices[0].spacing)
    assert main(["predict", "--model", "pretrained", "--input", str(d / "volume.nii.gz"), str(d / "single.nii.gz"),
                 "--out", str(d / "out"), "--report", "--quiet", "--stenosis-ap", "13,9"]) == 0
    return d / "out" / "report.html"


def colour_pixels(rgb: np.ndarray, colour, tolerance: float = 40.0) -> int:
    return int((np.abs(rgb[..., :3].astype(float) - np.asarray(colour, float)).max(-1) < tolerance).sum())


def test_report_is_self_contained_with_every_part(report):
    text = report.read_text()
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)  # 2 cases x 2 images
    assert not re.search(r"(href|src)=\"?(https?:|//|file:)", text) and "<script" not in text
    for part in ("<h2>volume</h2>", "<h2>single</h2>", "Narrowest canal: slice", "canal_area_mm2", "lamina_thickness_mm",
                 "target_size", "spineseg-phantom.pt", "<b>relative</b> below 100 mm² or 13 mm", "research only"):
        assert part in text, part
    assert text.count("<tr class=") == 3  # one row per slice: two of the volume, one single slice


def test_raw_and_postprocessed_outlines_are_distinguishable(tmp_path):
    post = np.zeros((1, 80, 80), np.uint8)
    post[0, 20:50, 20:50] = 1
    raw = post.copy()
    raw[0, 60:72, 60:72] = 1  # a fragment post-processing removed
    image = np.random.default_rng(0).normal(100, 10, (80, 80, 1)).astype(np.float32)
    save_nifti(tmp_path / "i.nii.gz", image, np.diag([-1.0, -1.0, 1.0, 1.0]))
    img = read_image(tmp_path / "i.nii.gz")

    def red(raw_labels):
        png = montage_png(img, raw_labels, post, [0])
        return colour_pixels(np.array(PILImage.open(io.BytesIO(png)).convert("RGB")), np.array(RAW_COLOR) * 255)

    # the removed fragment shows as a red outline of its own, beyond the legend's red line
    assert red(raw) > red(post) + 20


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, ("Debian's chromium is needed to render the report (`make chromium`, or apt-get install chromium); "
                      "this test fails rather than skips without it")
    png = tmp_path / "report.png"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,1800", f"--screenshot={png}", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert png.exists(), r.stderr[-2000:]
    rgb = np.array(PILImage.open(png).convert("RGB"))
    assert rgb.shape[:2] == (1800, 1200)
    assert (rgb.min(-1) < 200).mean() > 0.05  # not a blank page: text, tables, images
    assert colour_pixels(rgb, LAMINA_RGB) > 50  # the embedded overlay montage was drawn (lamina outlines)
    assert len(np.unique(rgb.reshape(-1, 3) // 16, axis=0)) > 100  # MR grey levels and plots, not just text
