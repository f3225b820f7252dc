"""Prediction: any supported image -> preprocess -> model -> back to the source grid -> NIfTI + overlay PNG."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .. import NUM_CLASSES
from ..errors import SpinesegError
from ..progress import progress as progress_bar
from ..io.images import case_stem, read_image, write_labels_like
from ..io.layouts import collect_inputs
from ..preprocess.morphology import largest_component
from ..preprocess.pipeline import PreprocessConfig, preprocess_slice, probabilities_to_labels


PRETRAINED = "pretrained"


def resolve_checkpoint(name: str | Path) -> Path:
    """``pretrained`` names the small phantom-trained model shipped inside the package."""
    if str(name) == PRETRAINED:
        from importlib import resources

        p = Path(str(resources.files("spineseg") / "pretrained" / "spineseg-phantom.pt"))
        if not p.exists():
            raise SpinesegError("the pretrained model is not installed with this package", p)
        return p
    return Path(name)


POSTPROCESS = ("largest", "none")


def postprocess_labels(labels: np.ndarray, method: str = "largest", spacing=None) -> np.ndarray:
    """Apply the named post-processing (see ``POSTPROCESS``) to one slice's label map."""
    if method == "none":
        return labels
    if method == "largest":
        return keep_largest_components(labels)
    raise SpinesegError(f"postprocess must be one of {POSTPROCESS}")


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Per structure, keep only its largest 8-connected region (nnU-Net's 'remove all but the largest')."""
    out = labels.copy()
    for k in range(1, NUM_CLASSES):
        m = labels == k
        out[m & ~largest_component(m, eight_connected=True)] = 0
    return out


class Predictor:
    def __init__(self, checkpoint: str | Path, device: str = "auto", threads: int | None = 2,
                 postprocess: str = "largest"):
        from ..models.checkpoint import load_checkpoint, load_model, pick_device

        if postprocess not in POSTPROCESS:
            raise SpinesegError(f"postprocess must be one of {POSTPROCESS}")
        self.postprocess = postprocess
        checkpoint = resolve_checkpoint(checkpoint)
        self.device = pick_device(device)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        ck = load_checkpoint(checkpoint, map_location=self.device)
        self.config = ck["config"]
        self.pp = PreprocessConfig.from_dict(ck["preprocess"])
        self.model = load_model(ck, self.device)
        self.name = ck.get("model_name", "?")

    @torch.no_grad()
    def probabilities(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)[None, None].to(self.device)
        return torch.softmax(self.model(t).float(), 1)[0].cpu().numpy()

    def raw_slice(self, img2d: np.ndarray, spacing) -> np.ndarray:
        """The argmax label map of one slice on its own grid, before post-processing."""
        x, _, g = preprocess_slice(img2d, spacing, self.pp)
        return probabilities_to_labels(self.probabilities(x), g)

    def predict_slice(self, img2d: np.ndarray, spacing) -> np.ndarray:
        return postprocess_labels(self.raw_slice(img2d, spacing), self.postprocess, spacing)

    def predict_both(self, image) -> tuple[np.ndarray, np.ndarray]:
        """``(raw, post-processed)`` label maps ``(S, H, W)`` of a whole image (post-processing: this predictor's)."""
        raw = np.stack([self.raw_slice(image.data[i], image.spacing) for i in range(image.num_slices)])
        return raw, np.stack([postprocess_labels(r, self.postprocess, image.spacing) for r in raw])

    def predict_volume(self, image) -> np.ndarray:
        return self.predict_both(image)[1]


def output_name(path: Path) -> str:
    stem = case_stem(path)
    return stem[:-5] if stem.endswith("_0000") else stem


def overlay_png(path: Path, image: np.ndarray, labels: np.ndarray, max_slices: int = 16) -> None:
    from ..io.preview import preview_grid

    n = image.shape[0]
    idx = np.linspace(0, n - 1, min(n, max_slices)).round().astype(int) if n > 1 else [0]
    preview_grid([image[i] for i in idx], [labels[i] for i in idx], path,
                 [f"slice {i}" for i in idx] if n > 1 else None, ncols=4)


def predict_paths(checkpoint, inputs, out, spacing: float | None = None, device: str = "auto",
                  overlays: bool = True, progress: bool = True, postprocess: str = "largest") -> tuple[list[Path], list[str]]:
    """Predict every input; a bad input is reported and skipped. Returns (written files, error lines)."""
    pred = Predictor(checkpoint, device, postprocess=postprocess)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, errors = [], []
    for p in progress_bar(collect_inputs(inputs), desc="predict", unit="image", disable=not progress):
        try:
            img = read_image(p, spacing=spacing)
            labels = pred.predict_volume(img)
            name = output_name(p)
            dst = out / f"{name}.nii.gz"
            write_labels_like(dst, labels, img)
            if overlays:
                overlay_png(out / "overlays" / f"{name}.png", img.data, labels)
            written.append(dst)
        except SpinesegError as exc:
            errors.append(str(exc))
            print(f"spineseg: error: {exc}", file=sys.stderr)
    return written, errors
