"""Prediction: any supported image -> preprocess -> model -> back to the source grid -> label maps and answers.

``predict_run`` writes, per stack of every input, ``{name}.nii.gz`` (and ``overlays/{name}.png``,
optionally ``{name}.seg.dcm`` for DICOM input), then ``measurements.csv`` for the whole run and,
optionally, ``report.html``. Every check that can refuse the run (colliding output names, an unusable
output folder, the model) runs before anything is written; a bad input is reported in one line and
skipped.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import NUM_CLASSES, __version__
from ..errors import SpinesegError
from ..io.atomic import check_output_folder
from ..io.images import case_stem, file_ext, image_loaders, stack_name, write_labels_like, DICOM_EXT, IMAGE_EXT
from ..io.intensity import percentile_window
from ..io.layouts import collect_inputs
from ..preprocess.morphology import largest_component
from ..preprocess.pipeline import MIN_SIDE_PX, PreprocessConfig, body_outline, preprocess_slice, probabilities_to_labels
from ..progress import progress as progress_bar
from .engine import available_cores, load_for_inference, make_engine
from ..models.checkpoint import PRETRAINED, resolve_checkpoint  # noqa: F401  (re-exported)
from ..anatomy.postprocess import DEFAULT_POSTPROCESS, POSTPROCESS, anatomical_postprocess
from .measure import StenosisThresholds, measure_image, narrowest, write_measurements

NNUNET_IMAGE_FOLDERS = ("imagesTr", "imagesTs")  # where a trailing _0000 is nnU-Net's channel suffix
TTA = ("flip", "none")
DEFAULT_TTA = "none"  # mirroring no longer helps the shipped model on real scans (README, "Real scans")
CONTENT_CHECK_SIDE = 128  # pixels: the body-outline check looks at slices subsampled to about this size


def postprocess_labels(labels: np.ndarray, method: str = DEFAULT_POSTPROCESS, spacing=None) -> np.ndarray:
    """Apply the named post-processing (see ``POSTPROCESS``) to one slice's label map (``spacing`` in mm)."""
    if method == "none":
        return labels
    if method == "largest":
        return keep_largest_components(labels)
    if method == "anatomical":
        if spacing is None:
            raise SpinesegError("anatomical post-processing needs the slice's pixel spacing")
        return anatomical_postprocess(labels, spacing)
    raise SpinesegError(f"postprocess must be one of {POSTPROCESS}")


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Per structure, keep only its largest 8-connected region (nnU-Net's 'remove all but the largest')."""
    out = labels.copy()
    for k in range(1, NUM_CLASSES):
        m = labels == k
        out[m & ~largest_component(m, eight_connected=True)] = 0
    return out


def has_image_content(slice2d: np.ndarray) -> bool:
    """False for a slice the model cannot read: tiny, constant (all zero included), or with no body outline."""
    if min(slice2d.shape) < MIN_SIDE_PX or float(np.ptp(slice2d)) == 0.0:
        return False
    step = max(1, max(slice2d.shape) // CONTENT_CHECK_SIDE)  # a coarse look is enough to find a body, and 10x faster
    return body_outline(percentile_window(slice2d[::step, ::step])) is not None


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Predictor:
    """A trained network with its preprocessing, run by an engine (``torch`` or ``onnx``; by default
    ``onnx`` for an exported ``.onnx`` file, ``torch`` for a checkpoint).

    ``threads``: CPU threads (default: every core this process may use); ``batch_size``: slices per
    network call; ``precision``: ``fp32`` or ``bf16`` (torch engine, where the processor has native bf16);
    ``tta``: ``none`` (default) runs the network once; ``flip`` averages the class probabilities of each slice and
    of its left-right mirror image (test-time mirroring, as nnU-Net does by default; twice the network time).
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto", threads: int | None = None,
                 postprocess: str = DEFAULT_POSTPROCESS, engine: str | None = None, precision: str = "fp32", batch_size: int = 1,
                 require_native_bf16: bool = True, tta: str = DEFAULT_TTA):
        if postprocess not in POSTPROCESS:
            raise SpinesegError(f"postprocess must be one of {POSTPROCESS}")
        if tta not in TTA:
            raise SpinesegError(f"tta must be one of {TTA} (got {tta!r})")
        self.tta = tta
        if batch_size < 1:
            raise SpinesegError(f"--batch-size must be at least 1 (got {batch_size})")
        self.postprocess, self.batch_size = postprocess, int(batch_size)
        loaded = load_for_inference(resolve_checkpoint(checkpoint))
        self.source, self.sha256 = loaded.source, loaded.sha256
        self.config = loaded.config
        self.pp = PreprocessConfig.from_dict(loaded.preprocess)
        self.name = loaded.name
        self.threads = available_cores() if threads is None else int(threads)
        self.engine = make_engine(loaded, engine, device, precision, self.threads, require_native_bf16)

    @property
    def model(self):
        """The PyTorch network (torch engine only)."""
        return getattr(self.engine, "model", None)

    def describe(self) -> dict:
        """What produced the predictions: model, engine and preprocessing (for reports)."""
        return {"checkpoint": str(self.source), "sha256": self.sha256, "model_name": self.name,
                "model": self.config.get("model", {}),
                "preprocess": self.pp.to_dict(), "engine": self.engine.name, "precision": self.engine.precision,
                "threads": self.threads, "batch_size": self.batch_size, "postprocess": self.postprocess, "tta": self.tta,
                "spineseg": __version__}

    def batch_probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities ``(B, C, S, S)`` of preprocessed slices ``(B, 1, S, S)``; with ``tta="flip"`` the
        mean of the slices' and their mirror images' (mirrored back), in one network call."""
        if self.tta == "none":
            return _softmax(self.engine.logits(batch))
        n = len(batch)
        probs = _softmax(self.engine.logits(np.concatenate([batch, batch[..., ::-1]])))
        return 0.5 * (probs[:n] + probs[n:, ..., ::-1])

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``(C, S, S)`` of one preprocessed slice ``(S, S)``."""
        return self.batch_probabilities(x[None, None])[0]

    def raw_slice(self, img2d: np.ndarray, spacing) -> np.ndarray:
        """The argmax label map of one slice on its own grid, before post-processing."""
        x, _, g = preprocess_slice(img2d, spacing, self.pp)
        return probabilities_to_labels(self.probabilities(x), g)

    def predict_slice(self, img2d: np.ndarray, spacing) -> np.ndarray:
        return postprocess_labels(self.raw_slice(img2d, spacing), self.postprocess, spacing)

    def raw_labels(self, image, progress: bool = False) -> np.ndarray:
        """Argmax label maps ``(S, H, W)`` of a whole image, ``batch_size`` slices per network call.

        Slices without image content stay background; an image with none at all is refused.
        """
        out = np.zeros(image.data.shape, np.uint8)
        readable = [s for s in range(image.num_slices) if has_image_content(image.data[s])]
        if not readable:
            raise SpinesegError("no image content (empty, constant or too small, or no body outline)", image.source)
        batches = [readable[i:i + self.batch_size] for i in range(0, len(readable), self.batch_size)]
        # the slices of a batch are prepared and mapped back in parallel (numpy, scipy, pywt and skimage
        # release the GIL); the network itself uses every thread
        with ThreadPoolExecutor(max_workers=min(self.threads, self.batch_size)) as pool:
            for batch in progress_bar(batches, desc="slices", unit="batch", disable=not progress, leave=False,
                                      log_lines=False):
                prepared = list(pool.map(lambda s: preprocess_slice(image.data[s], image.spacing, self.pp), batch))
                probs = self.batch_probabilities(np.stack([x for x, _, _ in prepared])[:, None])
                geometries = [geometry for _, _, geometry in prepared]
                for s, labels in zip(batch, pool.map(probabilities_to_labels, probs, geometries)):
                    out[s] = labels
        return out

    def predict_both(self, image, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(raw, post-processed)`` label maps ``(S, H, W)`` of a whole image (post-processing: this predictor's)."""
        raw = self.raw_labels(image, progress)
        return raw, np.stack([postprocess_labels(r, self.postprocess, image.spacing) for r in raw])

    def predict_volume(self, image) -> np.ndarray:
        return self.predict_both(image)[1]


# ----------------------------------------------------------------------------------------------- outputs

def output_name(path: Path) -> str:
    """Output name of an input: its file name without extension, and without nnU-Net's ``_0000`` channel
    suffix where it is one (an image inside an ``imagesTr`` / ``imagesTs`` folder)."""
    path = Path(path)
    stem = case_stem(path)
    if path.parent.name in NNUNET_IMAGE_FOLDERS and stem.endswith("_0000") and len(stem) > 5:
        return stem[:-5]
    return stem


def plan_outputs(inputs) -> list[tuple[Path, str]]:
    """``(input, output name)`` pairs; refuses, before anything is written, two inputs that would write
    the same name (a multi-stack input writes ``{name}_stack{k}``, so that suffix counts too)."""
    planned, by_name, seen = [], {}, set()
    for p in map(Path, inputs):
        key = p.resolve() if p.exists() else p
        if key in seen:  # the same input given twice is predicted once
            continue
        seen.add(key)
        name = output_name(p)
        if name in by_name:
            raise SpinesegError(f"would write the same output {name}.nii.gz as {by_name[name]}; "
                                "rename one of them or predict them into different folders", p)
        by_name[name] = p
        planned.append((p, name))
    for name, p in by_name.items():
        base = re.fullmatch(r"(.+)_stack\d+", name)
        if base and base.group(1) in by_name and _may_hold_stacks(by_name[base.group(1)]):
            raise SpinesegError(f"output {name}.nii.gz could also be a stack of {by_name[base.group(1)]}; "
                                "rename one of them or predict them into different folders", p)
    return planned


def _may_hold_stacks(path: Path) -> bool:
    """Only a DICOM series (a folder, or a file without an image extension) can hold several stacks."""
    return path.is_dir() or file_ext(path) in DICOM_EXT or file_ext(path) not in IMAGE_EXT


def run_test_inputs(run: str | Path, data: str | Path) -> tuple[Path, list[Path]]:
    """The checkpoint of a training run and the images of its split's test patients in ``data``."""
    import json

    from ..data.splits import load_splits
    from ..io.layouts import load_dataset

    run = Path(run)
    if not run.is_dir():
        raise SpinesegError("training run folder does not exist", run)
    try:
        fold = int(json.loads((run / "config.json").read_text())["run"]["fold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpinesegError(f"cannot read the run's fold from config.json ({type(exc).__name__}: {exc})",
                            run / "config.json") from None
    splits = load_splits(run / "splits.json")
    if not 0 <= fold < len(splits):
        raise SpinesegError(f"fold {fold} does not exist ({len(splits)} splits)", run / "splits.json")
    test_ids = splits[fold].get("test") or []
    if not test_ids:
        raise SpinesegError(f"fold {fold} of the split has no test patients", run / "splits.json")
    by_id = {c.case_id: c.image for c in load_dataset(data, require_labels=False)}
    missing = [cid for cid in test_ids if cid not in by_id]
    if missing:
        raise SpinesegError(f"{len(missing)} test cases of the run are not in the data set, e.g. {missing[:3]}", data)
    return run / "best.pt", [by_id[cid] for cid in test_ids]


def overlay_png(path: Path, image: np.ndarray, labels: np.ndarray, max_slices: int = 16) -> None:
    from ..io.preview import preview_grid

    n = image.shape[0]
    idx = np.linspace(0, n - 1, min(n, max_slices)).round().astype(int) if n > 1 else [0]
    preview_grid([image[i] for i in idx], [labels[i] for i in idx], path,
                 [f"slice {i}" for i in idx] if n > 1 else None, ncols=4)


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)  # label maps
    errors: list[str] = field(default_factory=list)  # one line per failed input
    measurements: list[Path] = field(default_factory=list)
    dicom_seg: list[Path] = field(default_factory=list)
    report: Path | None = None
    summaries: list[dict] = field(default_factory=list)  # per volume: its narrowest slice (see measure.narrowest)


def predict_run(checkpoint, inputs, out, spacing: float | None = None, device: str = "auto", overlays: bool = True,
                progress: bool = True, postprocess: str = DEFAULT_POSTPROCESS, engine: str | None = None, precision: str = "fp32",
                batch_size: int = 1, threads: int | None = None, dicom_seg: bool = False, report: bool = False,
                thresholds: StenosisThresholds = StenosisThresholds(), tta: str = DEFAULT_TTA) -> PredictResult:
    """Everything ``spineseg predict`` writes; see the module docstring."""
    out = Path(out)
    planned = plan_outputs(collect_inputs(inputs))
    if not planned:
        raise SpinesegError("no inputs to predict")
    check_output_folder(out)
    predictor = Predictor(checkpoint, device, threads=threads, postprocess=postprocess, engine=engine,
                          precision=precision, batch_size=batch_size, tta=tta)
    out.mkdir(exist_ok=True)
    res, rows, sections = PredictResult(), [], []
    for path, name in progress_bar(planned, desc="predict", unit="input", disable=not progress):
        try:
            loaders = image_loaders(path, spacing=spacing)
        except Exception as exc:  # a bad input is reported in one line; the others go on
            _report_failure(res, exc, path, out)
            continue
        for k, load in enumerate(loaders):
            name_k = stack_name(name, k, len(loaders))
            try:  # per stack: one that fails (a localizer without image content) spares the others
                image = load()
                raw, labels = predictor.predict_both(image, progress=progress)
                dst = out / f"{name_k}.nii.gz"
                write_labels_like(dst, labels, image)
                res.written.append(dst)
                if overlays:
                    overlay_png(out / "overlays" / f"{name_k}.png", image.data, labels)
                case_rows = measure_image(labels, image, name_k, thresholds)
                rows.extend(case_rows)
                if len(case_rows) > 1:
                    res.summaries.append(narrowest(case_rows))
                if report:  # before the SEG: a stack whose SEG is refused keeps the section of what was written
                    from .report import case_section

                    sections.append(case_section(name_k, image, raw, labels, case_rows, thresholds))
                if dicom_seg:
                    res.dicom_seg.extend(_write_dicom_seg(out, name_k, labels, image, predictor))
            except Exception as exc:
                which = None if len(loaders) == 1 else f"stack {k} of {len(loaders)} ({name_k})"
                _report_failure(res, exc, path, out, which)
    res.measurements = write_measurements(out, rows)
    if report:
        from .report import write_report

        res.report = write_report(out / "report.html", sections, predictor.describe(), thresholds, res.errors)
    return res


_WRITE_ERRNOS = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EIO") if hasattr(errno, n)}


def _report_failure(res: PredictResult, exc: Exception, path: Path, out: Path, stack: str | None = None) -> None:
    """Report one failed input or stack in one line and go on; errors of the machine itself still stop the run.

    A :class:`SpinesegError` is a bad input; any other exception is unexpected, and is named by type (no
    traceback) so that the other inputs and ``measurements.csv`` are still written. ``MemoryError`` and an
    ``OSError`` writing the outputs (a full disk, a read-only file system: every next input would fail the
    same way) propagate, as do ``KeyboardInterrupt`` and ``SystemExit``, which are not ``Exception``.
    """
    if isinstance(exc, MemoryError):
        raise exc
    if isinstance(exc, OSError) and (exc.errno in _WRITE_ERRNOS or _inside(exc.filename, out)):
        raise exc
    if isinstance(exc, SpinesegError):
        where, problem = exc.path or str(path), exc.problem
    else:
        detail = " ".join(str(exc).split())[:300]
        where, problem = str(path), f"unexpected error reading or predicting it ({type(exc).__name__}: {detail})"
    if stack is not None:
        problem = f"{stack}: {problem}"
        if where != str(path):
            problem += f" (in {path})"
    err = SpinesegError(problem, where)
    res.errors.append(str(err))
    print(f"spineseg: error: {err}", file=sys.stderr)


def _inside(filename, folder: Path) -> bool:
    if not filename:
        return False
    try:
        return Path(os.fsdecode(filename)).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, TypeError):
        return False


def _write_dicom_seg(out: Path, stack_name: str, labels: np.ndarray, image, predictor: Predictor) -> list[Path]:
    from ..io.dicomseg import dicom_sources, write_dicom_seg

    sources = dicom_sources(image)
    if sources is None:
        print(f"spineseg: note: {image.source}: not a DICOM input, so no DICOM SEG", file=sys.stderr)
        return []
    if not labels.any():  # a SEG needs at least one frame, and an empty frame would say nothing
        print(f"spineseg: note: {image.source}: no structure found, so no DICOM SEG", file=sys.stderr)
        return []
    dst = out / f"{stack_name}.seg.dcm"
    write_dicom_seg(dst, labels, image, sources, algorithm=predictor.name)
    return [dst]
