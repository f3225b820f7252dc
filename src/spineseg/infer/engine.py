"""Inference engines: the network as a function from a batch of preprocessed slices to logits.

``torch`` runs the PyTorch model (fp32, or bf16 autocast where the processor has native bfloat16
arithmetic); ``onnx`` runs an exported graph with onnxruntime. Both take ``(B, 1, S, S)`` float32 and
return ``(B, C, S, S)`` float32 logits.

By default a checkpoint (``.pt``) runs on onnx when it runs on the CPU in fp32: onnxruntime computes the
same labels about 1.4x faster there (``benchmarks/inference.json``). The graph is exported once per
checkpoint file and kept in a cache (``$SPINESEG_CACHE``, else ``$XDG_CACHE_HOME/spineseg`` or
``~/.cache/spineseg``), keyed by the file's SHA-256 and the spineseg, torch and onnx versions; where the
cache cannot be written, the graph is exported in memory each time. On CUDA, or in bf16, torch runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import SpinesegError
from ..precision import native_bf16

ENGINES = ("torch", "onnx")
PRECISIONS = ("fp32", "bf16")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class LoadedModel:
    """What inference needs from a checkpoint or an exported ONNX file."""

    config: dict
    preprocess: dict
    name: str
    source: Path
    checkpoint: dict | None = field(default=None, repr=False)  # None for an ONNX file
    onnx: bytes | None = field(default=None, repr=False)
    sha256: str = ""  # of the model file (for a checkpoint also the key of its exported graph in the cache)


def onnx_cache_dir() -> Path:
    """Where exported graphs of checkpoints are kept (see the module docstring)."""
    root = os.environ.get("SPINESEG_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spineseg"
    return Path(root) / "onnx"


def _onnx_cache_key(loaded: LoadedModel) -> str:
    import onnx

    from .. import __version__

    text = f"{loaded.sha256} spineseg {__version__} torch {torch.__version__} onnx {onnx.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def checkpoint_graph(loaded: LoadedModel) -> bytes:
    """The ONNX graph of a loaded checkpoint: from the cache, else exported (and cached where possible)."""
    from ..io.atomic import atomic_write_bytes
    from ..models.export import checkpoint_onnx_bytes, onnx_metadata

    path = onnx_cache_dir() / f"{_onnx_cache_key(loaded)}.onnx"
    if path.is_file():
        try:
            data = path.read_bytes()
            onnx_metadata(data, path)  # a damaged entry is exported again below
            return data
        except (OSError, SpinesegError):
            pass
    data = checkpoint_onnx_bytes(loaded.checkpoint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except (OSError, SpinesegError):
        pass  # the cache only saves time
    return data


def load_for_inference(path: str | Path) -> LoadedModel:
    """A spineseg checkpoint (``.pt``) or an ONNX file written by ``spineseg export``."""
    from ..models.checkpoint import load_checkpoint, read_checkpoint_file

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from ..models.export import onnx_metadata

        if not path.is_file():
            raise SpinesegError("ONNX model not found", path)
        data = path.read_bytes()
        meta = onnx_metadata(data, path)
        return LoadedModel(meta["config"], meta["preprocess"], meta.get("model_name") or "?", path, onnx=data,
                           sha256=hashlib.sha256(data).hexdigest())
    data = read_checkpoint_file(path)  # read once: the weights and the graph cache's key come from the same bytes
    ck = load_checkpoint(path, map_location="cpu", data=data)
    return LoadedModel(ck["config"], ck["preprocess"], ck.get("model_name") or "?", path, checkpoint=ck,
                       sha256=hashlib.sha256(data).hexdigest())


class TorchEngine:
    name = "torch"

    def __init__(self, loaded: LoadedModel, device: torch.device, precision: str = "fp32",
                 require_native_bf16: bool = True):
        from ..models.checkpoint import load_model

        if loaded.checkpoint is None:
            raise SpinesegError("the torch engine needs a checkpoint (.pt); use --engine onnx for an .onnx file",
                                loaded.source)
        if precision == "bf16" and require_native_bf16 and not native_bf16(device):
            raise SpinesegError(f"--precision bf16 needs native bfloat16 arithmetic, which this {device.type.upper()} "
                                "lacks (emulated it is many times slower); use --precision fp32")
        self.device, self.precision = device, precision
        self.model = load_model(loaded.checkpoint, device)

    @torch.no_grad()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.model(x)
        return out.float().cpu().numpy()


class OnnxEngine:
    name = "onnx"

    def __init__(self, loaded: LoadedModel, threads: int):
        import onnxruntime as ort

        from ..models.export import INPUT_NAME

        model = loaded.onnx if loaded.onnx is not None else checkpoint_graph(loaded)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # onnxruntime's own warnings are not the user's concern
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise SpinesegError(f"onnxruntime cannot load the model ({str(exc).splitlines()[0][:200]})",
                                loaded.source) from None
        self.input_name = INPUT_NAME
        self.precision = "fp32"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


def make_engine(loaded: LoadedModel, engine: str | None = None, device: str = "auto", precision: str = "fp32",
                threads: int = 1, require_native_bf16: bool = True):
    """The named engine over ``loaded`` on ``threads`` CPU threads (the Predictor resolves its every-core
    default). ``engine`` None: onnx for an ONNX file, and for a checkpoint on the CPU in fp32; else torch."""
    from ..models.checkpoint import pick_device

    if engine is not None and engine not in ENGINES:
        raise SpinesegError(f"engine must be one of {ENGINES}")
    if precision not in PRECISIONS:
        raise SpinesegError(f"precision must be one of {PRECISIONS}")
    if threads < 1:
        raise SpinesegError(f"--threads must be at least 1 (got {threads})")
    # a checkpoint left to the default falls back to torch where its graph cannot be exported
    fallback = engine is None and loaded.onnx is None
    if engine is None:
        engine = ("onnx" if loaded.onnx is not None or (precision == "fp32" and pick_device(device).type == "cpu")
                  else "torch")
    if engine == "onnx":
        if precision != "fp32":
            raise SpinesegError("the onnx engine runs in fp32 only; use --engine torch for bf16")
        if device == "cuda":
            raise SpinesegError("the onnx engine runs on the CPU only; use --engine torch for --device cuda")
        try:
            return OnnxEngine(loaded, threads)
        except Exception as exc:  # e.g. segnet: the tracer cannot follow max_unpool2d's size check
            if not fallback:
                raise
            logging.getLogger(__name__).warning("%s: cannot run on onnxruntime (export failed: %s); running on torch",
                                                loaded.source, type(exc).__name__)
    dev = pick_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    return TorchEngine(loaded, dev, precision, require_native_bf16)
