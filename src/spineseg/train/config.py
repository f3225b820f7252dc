"""Training configuration: built-in defaults <- the model row's file <- the user's --config file."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import yaml

from ..errors import SpinesegError

DEFAULTS: dict = {
    "preprocess": {"target_size": 512},
    "augment": {"rotate_deg": 15.0, "scale": [0.85, 1.15], "shift": 0.08, "flip_lr": False, "intensity": 0.1},
    "model": {"base": 32, "heads": 4, "clusters": 100, "kmeans_iters": 3, "attention_stages": [2, 3, 4]},
    "critic": {"base": 32, "norm": "instance"},
    "train": {
        "epochs": 500, "batch_size": 4, "max_minutes": None, "lr": 1e-4, "lr_critic": 1e-4, "betas": [0.5, 0.9],
        "weight_decay": 0.0, "lr_schedule": "poly", "adversarial": "none", "adv_start_epoch": 0, "n_critic": 1,
        "alpha": 0.01, "beta": 1.0, "gamma": 1.0, "gp_lambda": 10.0, "clip": 0.01, "num_workers": 0,
        "val_every": 1, "amp": True, "threads": 2,
    },
}
ADVERSARIAL_MODES = ("none", "wgan-gp", "wgan-clip", "bce")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def config_dir() -> Path:
    return Path(str(resources.files("spineseg") / "configs"))


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        alt = config_dir() / p.name
        if not p.suffix:
            alt = config_dir() / f"{p.name}.yaml"
        if alt.exists():
            p = alt
        else:
            raise SpinesegError("config file not found", path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpinesegError(f"not valid YAML ({exc})", p) from None
    if not isinstance(data, dict):
        raise SpinesegError("config must be a mapping", p)
    return data


def resolve_config(model: str, config: str | Path | None = None, overrides: dict | None = None) -> dict:
    from ..models.registry import ARCHITECTURES

    if model not in ARCHITECTURES:
        raise SpinesegError(f"unknown model {model!r}; choose from {', '.join(ARCHITECTURES)}")
    cfg = copy.deepcopy(DEFAULTS)
    row = config_dir() / "models" / f"{model}.yaml"
    if row.exists():
        cfg = _merge(cfg, read_yaml(row))
    if config is not None:
        cfg = _merge(cfg, read_yaml(config))
    cfg = _merge(cfg, overrides or {})
    cfg["model"]["name"] = model
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise SpinesegError(f"unknown config sections {sorted(unknown)}", config)
    bad = set(cfg["train"]) - set(DEFAULTS["train"])
    if bad:
        raise SpinesegError(f"unknown train options {sorted(bad)}", config)
    if cfg["train"]["adversarial"] not in ADVERSARIAL_MODES:
        raise SpinesegError(f"train.adversarial must be one of {ADVERSARIAL_MODES}", config)
    if cfg["preprocess"].get("target_size", 512) % 16:
        raise SpinesegError("preprocess.target_size must be a multiple of 16", config)
    return cfg
