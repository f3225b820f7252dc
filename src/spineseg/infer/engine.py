"""Inference engines: the network as a function from a batch of preprocessed slices to logits.

``torch`` runs the PyTorch model (fp32, or bf16 autocast where the processor has native bfloat16
arithmetic); ``onnx`` runs an exported graph with onnxruntime. Both take ``(B, 1, S, S)`` float32 and
return ``(B, C, S, S)`` float32 logits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import SpinesegError

ENGINES = ("torch", "onnx")
PRECISIONS = ("fp32", "bf16")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (AVX512-BF16 / AMX on a CPU; Ampere or later on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class LoadedModel:
    """What inference needs from a checkpoint or an exported ONNX file."""

    config: dict
    preprocess: dict
    name: str
    source: Path
    checkpoint: dict | None = field(default=None, repr=False)  # None for an ONNX file
    onnx: bytes | None = field(default=None, repr=False)


def load_for_inference(path: str | Path) -> LoadedModel:
    """A spineseg checkpoint (``.pt``) or an ONNX file written by ``spineseg export``."""
    from ..models.checkpoint import load_checkpoint

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from ..models.export import onnx_metadata

        if not path.is_file():
            raise SpinesegError("ONNX model not found", path)
        data = path.read_bytes()
        meta = onnx_metadata(data, path)
        return LoadedModel(meta["config"], meta["preprocess"], meta.get("model_name") or "?", path, onnx=data)
    ck = load_checkpoint(path, map_location="cpu")
    return LoadedModel(ck["config"], ck["preprocess"], ck.get("model_name") or "?", path, checkpoint=ck)


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

        from ..models.export import INPUT_NAME, checkpoint_onnx_bytes

        model = loaded.onnx if loaded.onnx is not None else checkpoint_onnx_bytes(loaded.checkpoint)
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
    """The named engine over ``loaded`` (None: onnx for an ONNX file, torch for a checkpoint) on ``threads``
    CPU threads (the Predictor resolves its every-core default)."""
    from ..models.checkpoint import pick_device

    engine = engine or ("onnx" if loaded.onnx is not None else "torch")
    if engine not in ENGINES:
        raise SpinesegError(f"engine must be one of {ENGINES}")
    if precision not in PRECISIONS:
        raise SpinesegError(f"precision must be one of {PRECISIONS}")
    if threads < 1:
        raise SpinesegError(f"--threads must be at least 1 (got {threads})")
    if engine == "onnx":
        if precision != "fp32":
            raise SpinesegError("the onnx engine runs in fp32 only; use --engine torch for bf16")
        if device == "cuda":
            raise SpinesegError("the onnx engine runs on the CPU only; use --engine torch for --device cuda")
        return OnnxEngine(loaded, threads)
    dev = pick_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    return TorchEngine(loaded, dev, precision, require_native_bf16)
