"""ONNX export of a segmentation network, with what inference needs to preprocess its input.

The network is traced (TorchScript-based exporter): Python loops, such as the farthest-point
initialisation and the Lloyd iterations of clustered attention's k-means, unroll into a fixed graph;
every shape follows from the input size, so none depends on the data. The batch axis stays dynamic.
The model's config, preprocessing and name travel in the ONNX file's metadata, so a ``.onnx`` file
alone is enough for ``spineseg predict --engine onnx``.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..errors import SpinesegError
from ..io.atomic import atomic_write_bytes
from .checkpoint import load_checkpoint, load_model

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
METADATA_PREFIX = "spineseg."


def onnx_bytes(model: torch.nn.Module, input_size: int, metadata: dict | None = None) -> bytes:
    """Serialised ONNX graph of ``model`` for ``(batch, 1, input_size, input_size)`` inputs."""
    import onnx

    model = model.eval().cpu()
    example = torch.randn(1, 1, input_size, input_size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic frozen into the graph: intended
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=ONNX_OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    graph = onnx.load_from_string(buf.getvalue())
    for key, value in (metadata or {}).items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value)
    return graph.SerializeToString()


def checkpoint_onnx_bytes(checkpoint: dict) -> bytes:
    """ONNX bytes of a loaded checkpoint's network, carrying its config, preprocessing and name."""
    model = load_model(checkpoint, "cpu")
    size = int(checkpoint["preprocess"].get("target_size", 512))
    meta = {"config": checkpoint["config"], "preprocess": checkpoint["preprocess"],
            "model_name": checkpoint.get("model_name"), "version": __version__}
    return onnx_bytes(model, size, meta)


def export_onnx(checkpoint_path: str | Path, onnx_path: str | Path) -> Path:
    """Write the network of ``checkpoint_path`` to ``onnx_path`` (atomically)."""
    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():
        raise SpinesegError("is a folder; give the .onnx file to write", onnx_path)
    if not onnx_path.parent.is_dir():
        raise SpinesegError("parent folder does not exist", onnx_path.parent)
    checkpoint = load_checkpoint(checkpoint_path)
    try:
        graph = checkpoint_onnx_bytes(checkpoint)
    except SpinesegError:
        raise
    except Exception as exc:  # a network the tracer cannot follow (SegNet's unpooling): one line, nothing written
        detail = " ".join(str(exc).split())[:200]
        raise SpinesegError(f"model {checkpoint.get('model_name') or '?'} cannot be exported to ONNX "
                            f"({type(exc).__name__}: {detail}); predict runs it with --engine torch",
                            checkpoint_path) from None
    atomic_write_bytes(onnx_path, graph)
    return onnx_path


def onnx_metadata(model_bytes: bytes, source: str | Path = "") -> dict:
    """The spineseg entries (config, preprocess, model_name, version) of an exported ONNX model."""
    import onnx

    try:
        graph = onnx.load_from_string(model_bytes)
    except Exception as exc:  # protobuf raises its own decode errors
        raise SpinesegError(f"not a readable ONNX model ({type(exc).__name__})", source) from None
    try:
        meta = {p.key[len(METADATA_PREFIX):]: json.loads(p.value) for p in graph.metadata_props
                if p.key.startswith(METADATA_PREFIX)}
    except ValueError:
        raise SpinesegError("ONNX model's spineseg metadata is damaged (not JSON); export it again", source) from None
    if not {"config", "preprocess"} <= set(meta):
        raise SpinesegError("ONNX model was not exported by spineseg (no config / preprocess metadata)", source)
    if not (isinstance(meta["config"], dict) and isinstance(meta["preprocess"], dict)):
        raise SpinesegError("ONNX model's spineseg metadata is damaged (config / preprocess are not mappings); "
                            "export it again", source)
    return meta
