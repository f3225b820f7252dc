"""Training configuration: one schema, built-in defaults <- the model row's file <- ``--config`` <- ``--set``.

Every key is declared once, here (the ``preprocess`` and ``augment`` sections are the dataclasses the
pipeline itself uses), and every config is validated against it before any work starts: an unknown
key or a wrong type anywhere is one clear error naming the key and where it came from.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import STRUCTURES
from ..data.augment import AugmentConfig
from ..errors import SpinesegError
from ..preprocess.pipeline import PreprocessConfig

ADVERSARIAL_MODES = ("none", "wgan-gp", "wgan-clip", "bce")
# what a resumed run may change: its budget
EXTENDABLE = ("train.epochs", "train.max_minutes")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelOptions(_Section):
    name: str | None = None  # the registry row; set from --model
    base: int = Field(32, ge=1)
    heads: int = Field(4, ge=1)
    clusters: int = Field(100, ge=1)
    kmeans_iters: int = Field(3, ge=0)
    attention_stages: list[int] = [2, 3, 4]
    norm: Literal["instance", "batch", "group"] = "instance"


class CriticOptions(_Section):
    base: int = Field(32, ge=1)
    norm: Literal["instance", "layer"] = "instance"
    layers: int = Field(6, ge=1)


class TrainOptions(_Section):
    epochs: int = Field(500, ge=0)
    batch_size: int = Field(4, ge=1)
    max_minutes: float | None = Field(None, ge=0)  # wall-time cap; None or 0: no cap
    lr: float = Field(1e-4, gt=0)
    lr_critic: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = Field(0.0, ge=0)
    # poly decay over a fixed horizon of `schedule_epochs` (not over `epochs`, so that a run extended with
    # --resume --set train.epochs=N follows the same schedule as an N-epoch run); under a time cap the
    # schedule follows the elapsed fraction of the cap instead, when that is further along
    lr_schedule: Literal["poly", "constant"] = "poly"
    schedule_epochs: int = Field(500, ge=1)
    adversarial: Literal["none", "wgan-gp", "wgan-clip", "bce"] = "none"
    adv_start_epoch: int = Field(0, ge=0)
    n_critic: int = Field(1, ge=1)
    alpha: float = 0.01
    beta: float = 1.0
    gamma: float = 1.0
    # soft Dice over the whole batch per class (nnU-Net's batch Dice) rather than per image; false keeps older runs'
    # per-image Dice, under which a body drawn on a slice without one (disc level) costs the Dice term nothing
    dice_batch: bool = False
    gp_lambda: float = Field(10.0, ge=0)
    clip: float = Field(0.01, gt=0)
    # output-space domain adaptation with unlabelled real slices (`train --unlabeled`): a label-map critic
    # tells the generator's softmax on real slices from its softmax on phantom slices
    domain_weight: float = Field(0.01, ge=0)  # only with unlabelled images (`train --unlabeled`)
    domain_objective: Literal["bce", "wgan-gp"] = "bce"
    domain_batch_size: int = Field(4, ge=1)
    domain_start_epoch: int = Field(0, ge=0)  # also when self-training starts
    # the run's first N optimisation steps update the critics only (the WGAN critic where adversarial, the domain
    # critic where there are unlabelled images), on the generator's present output; the generator waits. For a
    # fine-tune (--init) from a file without critics, such as a packed model, whose fresh critics would otherwise
    # push the generator at random
    critic_warmup_steps: int = Field(0, ge=0)
    # self-training on the same unlabelled slices (`train.selftrain`): anatomically accepted pseudo-labels
    pseudo_weight: float = Field(0.0, ge=0)  # 0: off
    pseudo_confidence: float = Field(0.9, ge=0, le=1)  # pixels at least this confident are targets
    pseudo_max_change: float = Field(1.0, ge=0)  # a slice whose post-processing changed more of its raw foreground is not used
    # a slice whose accepted pseudo-label has no body is not used unless --unlabeled-no-body lists it (a vertebral slice
    # whose body was dropped would otherwise teach dropping it)
    pseudo_require_body: bool = False
    # targets read from a geometry-only view of each unlabelled slice, learnt on its intensity-augmented view
    # (FixMatch-style consistency); false: both from the one augmented view
    pseudo_weak_view: bool = False
    # a term of its own for the pixels the post-processing changed (specks removed, holes filled): weight x the mean CE
    # over them alone, on top of the plain mean over all targets; 0: off
    pseudo_change_weight: float = Field(0.0, ge=0)
    # which corrections that term counts: a changed pixel whose raw or corrected label is one of these structures
    pseudo_change_structures: list[Literal["vertebral_body", "vertebral_foramen", "lamina"]] = Field(
        default_factory=lambda: list(STRUCTURES), min_length=1)
    # and only the corrections of raw regions up to this area (mm²): a speck removed or a small hole filled counts, a
    # removed piece of lamina or body does not; None: any size
    pseudo_change_max_area_mm2: float | None = Field(None, gt=0)
    # a weak label of its own on the --unlabeled-body slices (known to hold a vertebral body): weight x the mean of
    # -log p(body) over the body_label_area_mm2 of each slice's pixels most likely to be body (multiple-instance: "a
    # body of at least this area is somewhere here"); 0: off
    body_label_weight: float = Field(0.0, ge=0)
    body_label_area_mm2: float = Field(300.0, gt=0)
    # its negative counterpart on the --unlabeled-no-body slices: weight x the mean of -log(1 - p(body)) over the
    # same area of most body-like pixels (a disc drawn as body is pushed down where it is most body-like); 0: off
    no_body_label_weight: float = Field(0.0, ge=0)
    # the same negative term on the labelled (phantom) slices whose reference holds no body (disc-level slices): weight
    # x the mean of -log(1 - p(body)) over the body_label_area_mm2 of most body-like pixels, added to the supervised
    # loss (the per-pixel loss barely sees a small false body on a disc); needs no --unlabeled; 0: off
    labelled_no_body_weight: float = Field(0.0, ge=0)
    # exponential moving average of the network's weights, updated after every generator step; 0: off. With it,
    # validation, best.pt / last.pt "model" (what predict, pack and --init read) are the average; "model_train"
    # holds the trained weights for --resume
    ema_decay: float = Field(0.0, ge=0, lt=1)
    num_workers: int = Field(0, ge=0)
    val_every: int = Field(1, ge=1)
    amp: bool = True  # CUDA: fp16 autocast of the generator's forward passes with a gradient scaler
    # CPU: bf16 autocast where the processor has native bfloat16 (faster steps: benchmarks/train.json); off by default:
    # on the one fine-tune compared (results/dixon-disc, E3p against E3pf) it lost real-scan passes
    cpu_bf16: bool = False
    threads: int | None = Field(None, ge=1)  # CPU threads; None: all cores


class RunOptions(_Section):
    data: str
    data_fingerprint: str = ""
    fold: int = Field(0, ge=0)
    split: Literal["kfold", "paper"] = "kfold"
    seed: int = Field(0, ge=0, lt=2**32)
    case_is_patient: bool = False
    splits_file: str | None = None
    unlabeled: list[str] = []  # unlabelled real images for domain adaptation (files or folders)
    unlabeled_spacing: float | None = Field(None, gt=0)  # pixel spacing (mm) of unlabelled PNG / TIFF slices
    unlabeled_no_body: str | None = None  # CSV of unlabelled slices without a vertebral body (self-training)
    unlabeled_body: str | None = None  # CSV of unlabelled slices known to hold a vertebral body (self-training)
    unlabeled_fingerprint: str = ""
    init: dict | None = None  # the checkpoint a fine-tune (--init) started from


class Config(_Section):
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelOptions = ModelOptions()
    critic: CriticOptions = CriticOptions()
    train: TrainOptions = TrainOptions()
    run: RunOptions | None = None


DEFAULTS: dict = Config().model_dump(mode="json", exclude={"run"})

# bounds of the preprocess and augment sections (dataclasses the pipeline itself uses, so checked here):
# (section, key, lowest, whether the lowest is allowed, highest or None); a None value passes
_BOUNDS = (
    ("preprocess", "target_spacing", 0, False, None), ("preprocess", "clahe_clip", 0, True, None),
    ("preprocess", "roi_margin_mm", 0, True, None),
    ("augment", "rotate_deg", 0, True, None), ("augment", "shift", 0, True, None),
    ("augment", "intensity", 0, True, None), ("augment", "gamma", 0, True, None), ("augment", "bias", 0, True, None),
    ("augment", "noise", 0, True, None), ("augment", "blur", 0, True, 1), ("augment", "random_conv", 0, True, 1),
)


def _check_bounds(out: dict, source) -> None:
    for section, key, low, inclusive, high in _BOUNDS:
        v = out[section][key]
        if v is None:
            continue
        if v < low or (v == low and not inclusive) or (high is not None and v > high):
            need = (f"from {low} to {high}" if high is not None
                    else f"{'at least' if inclusive else 'greater than'} {low}")
            raise SpinesegError(f"config: {section}.{key}: must be {need} (got {v!r})", source)
    lo, hi = out["augment"]["scale"]
    if not 0 < lo <= hi:
        raise SpinesegError(f"config: augment.scale: must be [low, high] with 0 < low <= high (got {[lo, hi]!r})",
                            source)
    size = out["preprocess"]["target_size"]
    if size < 16 or size % 16:
        raise SpinesegError(f"config: preprocess.target_size must be a positive multiple of 16 (got {size!r})", source)


RUN_SECTION_IS_RECORDED = ("the run section is recorded by training, not a setting: give the data, fold, seed and "
                           "split on the command line (--data, --fold, --seed, --split / --splits)")


def refuse_run_settings(sets: dict | None) -> None:
    """``--set run.*`` is refused: what a run is trained on comes from the command line."""
    if sets and "run" in sets:
        key = next(iter(sets["run"]), "") if isinstance(sets["run"], dict) else ""
        raise SpinesegError(f"config: run.{key}: {RUN_SECTION_IS_RECORDED}", "--set")


def without_recorded_run(cfg: dict, source) -> dict:
    """A config file without its ``run`` section: a run's own config.json records one (it has a data
    fingerprint) and it is left out, as the command line sets what it records; any other is refused."""
    if "run" not in cfg:
        return cfg
    run = cfg["run"]
    if not (isinstance(run, dict) and run.get("data_fingerprint")):
        raise SpinesegError(f"config: run: {RUN_SECTION_IS_RECORDED}", source)
    validate_config(cfg, source)  # a recorded section of this schema; any other key is still an error
    return {k: v for k, v in cfg.items() if k != "run"}


def validate_config(cfg: dict, source: str | Path | None = None) -> dict:
    """Check ``cfg`` against the schema; return it complete (defaults filled) as plain data."""
    try:
        model = Config.model_validate(cfg)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        what = "unknown key" if err["type"] in ("extra_forbidden", "unexpected_keyword_argument") else err["msg"]
        got = "" if what == "unknown key" else f" (got {err.get('input')!r})"
        raise SpinesegError(f"config: {key}: {what}{got}", source) from None
    out = model.model_dump(mode="json")
    if out["run"] is None:
        del out["run"]
    _check_bounds(out, source)
    return out


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
    """A config file: a path, or the name of a shipped config (``cpu-quick``, ``paper``)."""
    p = Path(path)
    if not p.exists():
        alt = config_dir() / (p.name if p.suffix else f"{p.name}.yaml")
        if not alt.exists():
            raise SpinesegError("config file not found", path)
        p = alt
    if p.is_dir():
        raise SpinesegError("is a folder, not a config file", p)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise SpinesegError("not a text file (a YAML config was expected)", p) from None
    except yaml.YAMLError as exc:
        raise SpinesegError(f"not valid YAML ({str(exc).splitlines()[0]})", p) from None
    if not isinstance(data, dict):
        raise SpinesegError("config must be a mapping of sections (preprocess, augment, model, critic, train)", p)
    return data


def parse_set(items: list[str] | None) -> dict:
    """``--set train.epochs=2 --set augment.flip_lr=true`` -> a nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise SpinesegError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpinesegError(f"--set {item!r}: {part} is set twice")
        node[parts[-1]] = value
    return out


def resolve_config(model: str, config: str | Path | None = None, overrides: dict | None = None,
                   sets: dict | None = None) -> dict:
    """Defaults <- ``configs/models/MODEL.yaml`` <- ``config`` <- ``overrides`` <- ``sets``, validated."""
    from ..models.registry import ARCHITECTURES

    if model not in ARCHITECTURES:
        raise SpinesegError(f"unknown model {model!r}; choose from {', '.join(ARCHITECTURES)}")
    cfg = copy.deepcopy(DEFAULTS)
    row = config_dir() / "models" / f"{model}.yaml"
    if row.exists():
        row_cfg = read_yaml(row)
        validate_config(row_cfg, row)
        cfg = _merge(cfg, row_cfg)
    if config is not None:
        user = without_recorded_run(read_yaml(config), config)
        validate_config(user, config)
        cfg = _merge(cfg, user)
    cfg = _merge(cfg, overrides or {})
    refuse_run_settings(sets)
    if sets:
        validate_config(_merge(cfg, sets), "--set")
        cfg = _merge(cfg, sets)
    cfg["model"]["name"] = model
    return validate_config(cfg, config)


def config_differences(stored: dict, requested: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (both complete)."""
    out = []
    for k in sorted(set(stored) | set(requested)):
        a, b = stored.get(k), requested.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, key + ".")
        elif a != b:
            out.append(key)
    return out


def describe_value(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
