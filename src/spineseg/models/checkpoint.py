"""Checkpoints and model construction: what training writes and inference reads (below both).

A checkpoint is a ``torch.save``'d dict loaded with ``weights_only=True``: ``model`` (state dict),
``config`` (the full resolved config), ``preprocess``, ``version``, ``model_name``; training adds its
resume state (optimisers, critic, RNG states, epoch, ...).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..errors import SpinesegError
from ..io.atomic import atomic_path
from .registry import build_model


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


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpinesegError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def model_from_config(cfg: dict) -> torch.nn.Module:
    """Build the network a resolved config describes (``cfg["model"]``, with its ``name``)."""
    m = dict(cfg["model"])
    name = m.pop("name")
    return build_model(name, **m)


def save_checkpoint(path: str | Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint_file(path: str | Path) -> bytes:
    """The bytes of a checkpoint file, with one clear error for a missing file or a folder."""
    path = Path(path)
    if not path.exists():
        raise SpinesegError("checkpoint not found", path)
    if path.is_dir():
        raise SpinesegError("is a folder, not a checkpoint file (give RUN/best.pt)", path)
    return path.read_bytes()


def load_checkpoint(path: str | Path, map_location="cpu", data: bytes | None = None) -> dict:
    """The checkpoint at ``path``; ``data``: its bytes, where the caller has read them already."""
    path = Path(path)
    if data is None:
        data = read_checkpoint_file(path)
    try:
        ck = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise SpinesegError(f"not a readable spineseg checkpoint ({type(exc).__name__})", path) from None
    if not isinstance(ck, dict) or not {"model", "config", "preprocess"} <= set(ck):
        raise SpinesegError("not a spineseg checkpoint (no model / config / preprocess entries)", path)
    _check_network(ck, path)
    return ck


def _check_network(ck: dict, path: Path) -> None:
    """The weights must be exactly those of the network the config describes (built on the meta device: no
    memory, no time), and the file's model name its config's, so that a mismatched file fails here, naming it,
    rather than as a traceback in predict or a misleading 'cannot be exported' in export, or packed as it is."""
    cfg, weights = ck["config"], ck["model"]
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not model.get("name"):
        raise SpinesegError("not a spineseg checkpoint (its config has no model section naming the network)", path)
    name = model["name"]
    if ck.get("model_name") is not None and ck["model_name"] != name:
        raise SpinesegError(f"damaged checkpoint: it names model {ck['model_name']!r} but its config describes "
                            f"{name!r}", path)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise SpinesegError("not a spineseg checkpoint (its model entry is not a set of weights)", path)
    try:
        with torch.device("meta"):
            expected = {k: v.shape for k, v in model_from_config(cfg).state_dict().items()}
    except SpinesegError as exc:
        raise SpinesegError(f"the checkpoint's network cannot be built here: {exc.problem}", path) from None
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k]]
    if missing or extra or wrong:
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else
                f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else
                f"{len(wrong)} of the wrong shape (e.g. {wrong[0]}: {tuple(weights[wrong[0]].shape)}, "
                f"expected {tuple(expected[wrong[0]])})")
        raise SpinesegError(f"the weights do not fit the {name} network its config describes: {what}", path)


def float32_weights(state: dict) -> dict:
    """A state dict with its floating-point tensors in float32 (packed checkpoints store float16)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def load_model(ck: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The network of a loaded checkpoint, weights in float32, in eval mode."""
    model = model_from_config(ck["config"])
    model.load_state_dict(float32_weights(ck["model"]))
    return model.to(device).eval()


def inference_checkpoint(ck: dict, weights: dict | None = None) -> dict:
    """The inference-only part of a checkpoint (no optimiser, critic or RNG state), with ``weights`` in place of
    its network's where given."""
    return {"model": ck["model"] if weights is None else weights, "config": ck["config"],
            "preprocess": ck["preprocess"], "version": ck["version"], "model_name": ck.get("model_name"),
            "epoch": ck.get("epoch"), "best": ck.get("best")}


PACKABLE_CRITICS = ("critic", "domain_critic")


def _same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def pack_checkpoint(src: str | Path, dst: str | Path, half: bool = True, critics: bool = False) -> Path:
    """A small inference-only copy: weights (optionally float16), config, preprocessing, version. With ``critics``
    also the critics' weights (same precision), so that a fine-tune (``train --init``) of the packed file starts
    from trained critics rather than fresh ones, which cost the laminae on real scans (README, runs E3pf / E3)."""
    if _same_file(src, dst):  # a run's last.pt packed onto itself would lose the run's resume state
        raise SpinesegError("--out is the checkpoint being packed; packing writes a new, smaller file: give another "
                            "--out (e.g. model.pt)", dst)
    ck = load_checkpoint(src)

    def cast(state: dict) -> dict:
        out = {k: (v.half() if half and v.is_floating_point() else v) for k, v in state.items()}
        for k, v in out.items():  # beyond float16's range (65504) a weight becomes inf, and every prediction NaN
            if v.is_floating_point() and not bool(torch.isfinite(v).all()) and bool(torch.isfinite(state[k]).all()):
                raise SpinesegError(f"weight {k} exceeds float16's range (largest {state[k].abs().max().item():.4g}); "
                                    "pack it with --float32", src)
        return out

    packed = inference_checkpoint(ck, cast(ck["model"]))
    if critics:
        found = {name: cast(ck[name]) for name in PACKABLE_CRITICS if ck.get(name) is not None}
        if not found:
            raise SpinesegError("--with-critics: the checkpoint has no critic (a packed model or a run without an "
                                "adversary); pack a run's last.pt or best.pt", src)
        packed.update(found)
    save_checkpoint(Path(dst), packed)
    return Path(dst)
