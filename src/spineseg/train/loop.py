"""A training run: composes its parts (config, data, model and optimisers, step, validation, checkpoint, log).

- config: `train.config` (one schema; ``--set`` overrides; a resume may only extend the budget)
- data: `train.data` (patient map, leak-proof splits, preprocessed slices)
- the step: `train.steps` (supervised; the adversarial part is a strategy)
- resume state: weights, both optimisers, the critic, the GradScaler, the RNG states, the epoch and
  the best score, in ``last.pt``; the log row of each epoch is written after its checkpoint
- logging: `train.runlog` (log.csv + TensorBoard, one row per epoch even across kills and resumes)
- several processes: `train.distributed` (torchrun, DistributedDataParallel; rank 0 alone writes)

With an epoch budget and no time cap, a run resumed with ``--resume --set train.epochs=N`` ends with
the same weights as an uninterrupted N-epoch run. Under a time cap the learning rate follows the
elapsed time, so runs are not reproducible to the bit (see the README).

Under torchrun every rank keeps its own random stream (the gradient penalty's interpolation), saved
per rank in ``last.pt``; resumed on as many processes, each rank continues its own stream. Distributed
runs are not promised to be bit-exact (gradient all-reduce order may vary with more than two ranks or
NCCL); only the single-process resume is.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import NUM_CLASSES, STRUCTURES, __version__
from ..data.augment import AugmentConfig, for_unlabeled
from ..data.dataset import make_loader
from ..data.splits import write_splits
from ..errors import SpinesegError
from ..io.atomic import atomic_write_text, remove_stale_temporaries
from ..models.checkpoint import (float32_weights, load_checkpoint, model_from_config, resolve_checkpoint,
                                save_checkpoint)
from ..models.critic import Critic
from ..overlap import dice_per_structure
from ..precision import dtype_name, training_autocast_dtype
from ..preprocess.pipeline import PreprocessCache, PreprocessConfig
from ..progress import progress as progress_bar
from .config import (EXTENDABLE, config_differences, describe_value, refuse_run_settings, resolve_config,
                     validate_config)
from .data import (check_unlabeled_spacing, dataset_fingerprint, load_training_data, load_unlabeled, read_slice_list,
                   resolve_splits, training_cases, unlabeled_cases)
from .distributed import current as current_ranks, rank_seed
from .losses import seg_loss_from_config
from .runlog import RunLog
from .selftrain import SelfTraining
from .state import capture_rng, restore_rng, seed_everything
from .steps import DomainAdversary, GeneratorStep, adversary_from_config, critic_optimizer, generator_optimizer


@torch.no_grad()
def validation_dice(model, loader, device) -> np.ndarray:
    """Dice per structure of each validation slice, (slices, structures) (the one Dice of `spineseg.overlap`)."""
    model.eval()
    rows = [np.zeros((0, NUM_CLASSES - 1))]
    for batch in loader:
        logits = model(batch["image"].to(device))
        rows.append(dice_per_structure(logits.argmax(1).cpu().numpy(), batch["label"].numpy(), NUM_CLASSES))
    model.train()
    return np.concatenate(rows)


def nan_mean(values: np.ndarray, axis=None) -> np.ndarray | float:
    """The mean over the values that are not NaN; NaN where there are none (NumPy's nanmean, without its
    "mean of empty slice" warning: a validation set may lack a structure)."""
    values = np.asarray(values, dtype=float)
    have = ~np.isnan(values)
    count, total = have.sum(axis), np.where(have, values, 0.0).sum(axis)
    return np.divide(total, count, out=np.full(np.shape(count), np.nan), where=count > 0)[()]


def mean_dice(rows: np.ndarray) -> np.ndarray:
    """Mean Dice per structure over validation slices; NaN where no slice has a value."""
    return nan_mean(np.reshape(rows, (-1, NUM_CLASSES - 1)), axis=0)


def lr_factor(cfg_train: dict, epoch: int, elapsed: float) -> float:
    """Learning-rate multiplier at the start of ``epoch`` (0-based)."""
    if cfg_train["lr_schedule"] == "constant":
        return 1.0
    progress = epoch / cfg_train["schedule_epochs"]
    cap = cfg_train.get("max_minutes") or 0
    if cap:
        progress = max(progress, elapsed / (cap * 60))
    return max(1e-3, (1.0 - min(progress, 0.999)) ** 0.9)


def _run_options(data, fold, split, seed, case_is_patient, splits_file) -> dict:
    if seed is not None and not 0 <= int(seed) < 2**32:  # what numpy and torch accept as a seed
        raise SpinesegError(f"--seed {seed}: must be a whole number from 0 to 2**32 - 1")
    return {"data": str(Path(data).resolve()), "fold": 0 if fold is None else int(fold),
            "split": split or "kfold", "seed": 0 if seed is None else int(seed),
            "case_is_patient": bool(case_is_patient), "splits_file": None if splits_file is None else str(splits_file)}


TRAINING_STATE = ("opt", "epoch", "best")


def _require_training_state(ck: dict, path: Path) -> None:
    """A run's last.pt holds its optimiser and epoch; a packed or inference-only file in its place does not."""
    missing = [k for k in TRAINING_STATE if k not in ck or (k == "opt" and ck[k] is None)]
    if missing or "run" not in (ck.get("config") or {}):
        raise SpinesegError("not a training checkpoint (no optimiser / epoch state: a packed or inference-only "
                            "file?), so the run cannot be resumed; fine-tune from it with --init and a new --out "
                            "instead", path)


class Trainer:
    def __init__(self, data: str | Path | None, model: str | None, out: str | Path, config: str | Path | None = None,
                 fold: int | None = None, split: str | None = None, resume: bool = False, seed: int | None = None,
                 device: str = "auto", cache: str | Path | None = None, overrides: dict | None = None,
                 progress: bool = True, splits_file: str | Path | None = None, sets: dict | None = None,
                 case_is_patient: bool = False, unlabeled: list | None = None, unlabeled_spacing: float | None = None,
                 unlabeled_no_body: str | Path | None = None, unlabeled_body: str | Path | None = None,
                 init: str | Path | None = None):
        self.out = Path(out)
        self.ranks = current_ranks()  # several processes under torchrun (see `train.distributed`)
        self.progress = progress and self.ranks.is_main
        self.finished_before = False
        ck = None
        if resume and init is not None:
            raise SpinesegError("--init starts a new run from a checkpoint's weights; a resumed run already has its "
                                "own (drop --init or --resume)", init)
        init_src = resolve_checkpoint(init) if init is not None else None
        init_ck = load_checkpoint(init_src) if init_src is not None else None  # a bad file fails before any work
        if resume:
            if not (self.out / "last.pt").exists():
                raise SpinesegError("--resume given but the run has no last.pt", self.out)
            if self.ranks.is_main:
                remove_stale_temporaries(self.out)
            ck = load_checkpoint(self.out / "last.pt")
            _require_training_state(ck, self.out / "last.pt")
            self.cfg = self._resume_config(ck, data, model, config, fold, split, seed, overrides, sets, splits_file,
                                           case_is_patient)
            if unlabeled:  # the same unlabelled images, possibly moved: checked by content below
                stored_spacing = self.cfg["run"].get("unlabeled_spacing")
                if self.cfg["run"].get("unlabeled") and unlabeled_spacing != stored_spacing:
                    raise SpinesegError(f"--unlabeled-spacing {unlabeled_spacing} differs from this run's "
                                        f"{stored_spacing}; refusing to resume", self.out)
                self.cfg["run"].update(unlabeled=[str(Path(u).resolve()) for u in unlabeled],
                                       unlabeled_spacing=unlabeled_spacing)
            if unlabeled_no_body is not None:
                self.cfg["run"]["unlabeled_no_body"] = str(Path(unlabeled_no_body).resolve())
            if unlabeled_body is not None:
                self.cfg["run"]["unlabeled_body"] = str(Path(unlabeled_body).resolve())
        else:
            if (self.out / "last.pt").exists():
                raise SpinesegError("run folder already holds a training run (use --resume or another --out)", self.out)
            if data is None or model is None:
                raise SpinesegError("a new training run needs --data and --model")
            self.cfg = resolve_config(model, config, overrides, sets)  # validated before anything else happens
            self.cfg["run"] = _run_options(data, fold, split, seed, case_is_patient, splits_file)
            self.cfg["run"].update(unlabeled=[str(Path(u).resolve()) for u in unlabeled or []],
                                   unlabeled_spacing=unlabeled_spacing,
                                   unlabeled_no_body=None if unlabeled_no_body is None
                                   else str(Path(unlabeled_no_body).resolve()),
                                   unlabeled_body=None if unlabeled_body is None
                                   else str(Path(unlabeled_body).resolve()))
        run = self.cfg["run"]
        seed_everything(run["seed"])
        tc = self.cfg["train"]
        if tc["pseudo_weight"] and not run.get("unlabeled"):  # before any data is read
            raise SpinesegError("train.pseudo_weight is set but there is nothing to self-train on: "
                                "give the unlabelled images with --unlabeled")
        if tc["pseudo_weak_view"] and not tc["pseudo_weight"]:
            raise SpinesegError("train.pseudo_weak_view is set but self-training is off: set train.pseudo_weight > 0")
        if tc["pseudo_change_weight"] and not tc["pseudo_weight"]:
            raise SpinesegError("train.pseudo_change_weight is set but self-training is off: set train.pseudo_weight > 0")
        if run.get("unlabeled_no_body") and not (run.get("unlabeled") and tc["pseudo_weight"]):
            raise SpinesegError("--unlabeled-no-body names slices for self-training: it needs --unlabeled and "
                                "train.pseudo_weight > 0", run["unlabeled_no_body"])
        if bool(run.get("unlabeled_body")) != bool(tc["body_label_weight"]):
            raise SpinesegError("--unlabeled-body and train.body_label_weight > 0 go together: the list names the "
                                "slices, the weight is their term's", run.get("unlabeled_body"))
        if tc["no_body_label_weight"] and not run.get("unlabeled_no_body"):
            raise SpinesegError("train.no_body_label_weight weighs a term on the --unlabeled-no-body slices: give the "
                                "list")
        if run.get("unlabeled_body") and not (run.get("unlabeled") and tc["pseudo_weight"]):
            raise SpinesegError("--unlabeled-body names slices for self-training: it needs --unlabeled and "
                                "train.pseudo_weight > 0", run["unlabeled_body"])
        self.device = self.ranks.device(device)
        if self.device.type == "cpu" and tc.get("threads"):
            torch.set_num_threads(int(tc["threads"]))
        self.pp = PreprocessConfig(**self.cfg["preprocess"])
        self.augment = AugmentConfig.from_dict(self.cfg["augment"])
        unlabeled_augment = for_unlabeled(self.augment)
        if tc["pseudo_weak_view"] and not (unlabeled_augment.intensity or unlabeled_augment.randomises_intensity):
            raise SpinesegError("train.pseudo_weak_view needs an intensity augmentation (augment.intensity, gamma, bias, "
                                "noise or blur): without one the two views are the same")

        cases = training_cases(data if (resume and data is not None) else run["data"], run["case_is_patient"])
        fingerprint = dataset_fingerprint(cases)
        if resume and run.get("data_fingerprint") and fingerprint != run["data_fingerprint"]:
            raise SpinesegError("--data differs in content from the data this run was trained on; refusing to resume",
                                data or run["data"])
        run["data_fingerprint"] = fingerprint
        splits = resolve_splits(cases, run["split"], self.out / "splits.json", run.get("splits_file"), resume)
        unlabeled = self._unlabeled_inputs(run, resume)  # a bad slice list fails before any preprocessing
        self.data = load_training_data(cases, splits, run["fold"], self.pp, PreprocessCache(cache), self.progress)
        self.unlabeled = []
        if unlabeled is not None:
            unlabeled_cases_, no_body, no_body_csv, body, body_csv = unlabeled
            self.unlabeled = load_unlabeled(unlabeled_cases_, run.get("unlabeled_spacing"), self.pp,
                                            PreprocessCache(cache), self.progress, no_body, no_body_csv, body, body_csv)

        self.model = model_from_config(self.cfg).to(self.device)
        size = self.pp.target_size
        image = torch.zeros(2, 1, size, size, device=self.device)  # what the networks see, to wrap them for DDP
        self.opt = generator_optimizer(self.model, tc)
        # mixed precision: fp16 + a gradient scaler on CUDA (train.amp); bf16 on a CPU with native bfloat16 where
        # train.cpu_bf16 asks for it; else fp32
        self.amp_dtype = training_autocast_dtype(self.device, tc["amp"], tc["cpu_bf16"])
        if tc["cpu_bf16"] and self.device.type == "cpu" and self.amp_dtype is None and self.ranks.is_main:
            print("note: train.cpu_bf16 is set but this CPU has no native bfloat16 (emulated, it is many times slower "
                  "than fp32): training in fp32", flush=True)
        self.precision = dtype_name(self.amp_dtype)
        # a run saved before precision was recorded trained as train.amp meant then (fp16 on CUDA, fp32 on the CPU),
        # which is what today's defaults give it
        saved = None if ck is None else ck.get("precision", self.precision)
        if saved not in (None, self.precision) and self.ranks.is_main:
            print(f"note: {self.out} trained in {saved}, which this {self.device.type} cannot run at speed; it continues "
                  f"in {self.precision}, so the resumed run is not bit-exact", flush=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.critic = self.opt_d = None
        adversary = None
        if tc["adversarial"] != "none":
            self.critic = Critic(1 + NUM_CLASSES, **self.cfg["critic"]).to(self.device)
            self.opt_d = critic_optimizer(self.critic, tc)
            critic = self.ranks.wrap(self.critic, image, torch.zeros(2, NUM_CLASSES, size, size, device=self.device))
            adversary = adversary_from_config(critic, self.opt_d, tc)
        self.domain_critic = self.opt_domain = None
        domain = None
        if self.unlabeled and tc["domain_weight"]:
            maps = torch.zeros(2, NUM_CLASSES, size, size, device=self.device)
            self.domain_critic = Critic(NUM_CLASSES, **self.cfg["critic"]).to(self.device)
            self.opt_domain = critic_optimizer(self.domain_critic, tc)
            domain = DomainAdversary(self.ranks.wrap(self.domain_critic, None, maps), self.opt_domain,
                                     tc["domain_objective"], tc["domain_weight"], tc["gp_lambda"])
        self_training = SelfTraining(tc["pseudo_weight"], tc["pseudo_confidence"], tc["pseudo_max_change"],
                                     tc["pseudo_change_weight"], tc["pseudo_change_structures"],
                                     tc["pseudo_change_max_area_mm2"], tc["pseudo_require_body"],
                                     tc["body_label_weight"], tc["body_label_area_mm2"], tc["no_body_label_weight"]) \
            if self.unlabeled and tc["pseudo_weight"] else None
        self.step = GeneratorStep(self.ranks.wrap(self.model, image), self.opt, seg_loss_from_config(tc), self.scaler,
                                  self.device, self.amp_dtype, adversary, domain, self_training,
                                  tc["labelled_no_body_weight"], tc["body_label_area_mm2"])
        # the average starts from the network's weights once they are loaded (below); a resume restores it
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tc["ema_decay"]), use_buffers=True) \
            if tc["ema_decay"] else None
        self.epoch, self.best, self.elapsed = 0, -1.0, 0.0
        self.rng = self.rng_ranks = None
        self.pending_row = None
        if ck is not None:
            self._load_state(ck)
        elif init_ck is not None:
            self._warm_start(init_src, init_ck)
        if self.ema is not None and ck is None:  # a run that ends before its first step serves these weights
            self.ema.module.load_state_dict(self.model.state_dict())

    def _unlabeled_inputs(self, run: dict, resume: bool) -> tuple | None:
        """The unlabelled real images for domain adaptation / self-training, checked: ``(cases, no-body slices,
        their list's path)``, or None when the run has none."""
        if not run.get("unlabeled"):
            return None
        if not (self.cfg["train"]["domain_weight"] or self.cfg["train"]["pseudo_weight"]):
            raise SpinesegError("--unlabeled images are given but train.domain_weight and train.pseudo_weight are 0, "
                                "so they would be ignored")
        cases = unlabeled_cases(run["unlabeled"])
        check_unlabeled_spacing(cases, run.get("unlabeled_spacing"))
        no_body_csv = run.get("unlabeled_no_body")
        no_body = read_slice_list(no_body_csv, cases) if no_body_csv else None
        body_csv = run.get("unlabeled_body")
        body = read_slice_list(body_csv, cases, "--unlabeled-body") if body_csv else None
        fingerprint = dataset_fingerprint(cases)
        if no_body_csv:  # the slice list is part of what the run learns from
            fingerprint = hashlib.sha1((fingerprint + repr(sorted(no_body))).encode()).hexdigest()
        if body_csv:
            fingerprint = hashlib.sha1((fingerprint + "body" + repr(sorted(body))).encode()).hexdigest()
        # the spacing given to PNG / TIFF slices is part of what is learnt (runs saved before it was fingerprinted
        # stored the digest without it; their spacing is compared directly in __init__)
        before_spacing = fingerprint
        if run.get("unlabeled_spacing") is not None:
            fingerprint = hashlib.sha1((fingerprint + f"spacing{float(run['unlabeled_spacing'])!r}").encode()).hexdigest()
        stored = run.get("unlabeled_fingerprint") or ""
        if resume and not stored:  # trained without unlabelled images: resuming with them would change the run
            raise SpinesegError("this run was trained without --unlabeled images; refusing to resume with them "
                                "(start a new run, e.g. with --init from this one)", self.out)
        if resume and fingerprint != stored and before_spacing != stored:
            raise SpinesegError("--unlabeled (or --unlabeled-no-body, --unlabeled-body, --unlabeled-spacing) differs "
                                "in content from what this run was trained with; refusing to resume",
                                run["unlabeled"][0])
        run["unlabeled_fingerprint"] = fingerprint
        return cases, no_body, no_body_csv, body, body_csv

    # the split actually trained on (kept as attributes for callers)
    @property
    def split(self) -> dict:
        return self.data.split

    @property
    def splits(self) -> list[dict]:
        return self.data.splits

    # ------------------------------------------------------------------ resume
    def _resume_config(self, ck, data, model, config, fold, split, seed, overrides, sets, splits_file,
                       case_is_patient) -> dict:
        stored = ck["config"]
        run = dict(stored["run"])
        name = stored["model"]["name"]
        if model is not None and model != name:
            raise SpinesegError(f"--model {model} differs from this run's model {name}; refusing to resume", self.out)
        for flag, given, key in (("--fold", fold, "fold"), ("--split", split, "split"), ("--seed", seed, "seed")):
            if given is not None and given != run[key]:
                raise SpinesegError(f"{flag} {given} differs from this run's {key} {run[key]}; refusing to resume",
                                    self.out)
        if case_is_patient and not run.get("case_is_patient"):
            raise SpinesegError("--case-is-patient differs from this run's setting; refusing to resume", self.out)
        refuse_run_settings(sets)
        if splits_file is not None:
            from ..data.splits import load_splits

            if load_splits(splits_file) != load_splits(self.out / "splits.json"):
                raise SpinesegError("--splits differs from this run's splits.json; refusing to resume", splits_file)
        if config is not None:
            requested = resolve_config(name, config, overrides, sets)
        else:
            from .config import _merge

            requested = validate_config(_merge(_merge({k: v for k, v in stored.items() if k != "run"}, overrides or {}),
                                               sets or {}), "--set")
        requested["model"]["name"] = name
        # keys added to the schema since this run was saved take their defaults, which keep an older run's behaviour
        current = validate_config({k: v for k, v in stored.items() if k != "run"}, self.out)
        diffs = [d for d in config_differences(current, requested) if d not in EXTENDABLE]
        if diffs:
            d = diffs[0]
            raise SpinesegError(f"{d} is {describe_value(requested, d)!r} but this run was trained with "
                                f"{describe_value(current, d)!r}; a resumed run may only change "
                                f"{' and '.join(EXTENDABLE)}", self.out)
        requested["run"] = run
        return requested

    def _state(self, log_row: dict | None, rng_ranks: list[dict] | None = None) -> dict:
        state = {
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "domain_critic": self.domain_critic.state_dict() if self.domain_critic is not None else None,
            "opt_domain": self.opt_domain.state_dict() if self.opt_domain is not None else None,
            "scaler": self.scaler.state_dict(), "rng": capture_rng(),
            "epoch": self.epoch, "best": self.best, "elapsed": self.elapsed, "config": self.cfg,
            "preprocess": self.pp.to_dict(), "version": __version__, "model_name": self.cfg["model"]["name"],
            "log_row": log_row, "precision": self.precision,
        }
        if self.ema is not None:  # what inference reads is the average; training resumes from its own weights
            state.update(model=self.ema.module.state_dict(), model_train=state["model"],
                         ema_updates=int(self.ema.n_averaged))
        if rng_ranks is not None:  # every rank's stream, so that a resume on as many processes continues each
            state["rng_ranks"] = rng_ranks
        return state

    def _load_state(self, ck: dict) -> None:
        self.model.load_state_dict(ck.get("model_train", ck["model"]))
        if self.ema is not None and "model_train" in ck:
            self.ema.module.load_state_dict(ck["model"])
            self.ema.n_averaged.fill_(int(ck["ema_updates"]))
        self.opt.load_state_dict(ck["opt"])
        if self.critic is not None and ck.get("critic") is not None:
            self.critic.load_state_dict(ck["critic"])
            self.opt_d.load_state_dict(ck["opt_d"])
        if self.domain_critic is not None and ck.get("domain_critic") is not None:
            self.domain_critic.load_state_dict(ck["domain_critic"])
            self.opt_domain.load_state_dict(ck["opt_domain"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.best, self.elapsed = int(ck["epoch"]), float(ck["best"]), float(ck.get("elapsed", 0.0))
        self.rng, self.rng_ranks = ck.get("rng"), ck.get("rng_ranks")
        self.pending_row = ck.get("log_row")
        self.finished_before = self.epoch >= self.cfg["train"]["epochs"]

    def _warm_start(self, src: Path, ck: dict) -> None:
        """Fine-tuning: start from the network weights of a checkpoint (a run's best.pt / last.pt, a packed
        model, or ``pretrained``), and from its critics where it has them and they fit; optimisers, epoch and
        learning-rate schedule start afresh. The architecture must be the same."""
        stored = {"model": dict(ck["config"]["model"])}
        diffs = config_differences(stored, {"model": self.cfg["model"]})
        if diffs:
            d = diffs[0]
            raise SpinesegError(f"--init: {d} is {describe_value(stored, d)!r} in the checkpoint but "
                                f"{describe_value(self.cfg, d)!r} in this run's config; fine-tuning needs the same "
                                "network (pass the --config it was trained with)", src)
        self.model.load_state_dict(float32_weights(ck["model"]))
        loaded = ["network"]
        for name, net in (("critic", self.critic), ("domain_critic", self.domain_critic)):
            weights = ck.get(name)
            if net is None or weights is None:
                continue
            mine = net.state_dict()
            if set(weights) == set(mine) and all(weights[k].shape == mine[k].shape for k in mine):
                net.load_state_dict(weights)
                loaded.append(name)
        if ck["preprocess"] != self.pp.to_dict() and self.ranks.is_main:
            print(f"note: --init {src} was trained with other preprocessing than this run's config "
                  f"({', '.join(config_differences(ck['preprocess'], self.pp.to_dict()))})", flush=True)
        self.cfg["run"]["init"] = {"checkpoint": str(Path(src).resolve()), "loaded": loaded,
                                   "sha256": hashlib.sha256(Path(src).read_bytes()).hexdigest()}
        if self.ranks.is_main and self.progress:
            print(f"fine-tuning from {src}: {', '.join(loaded)} loaded; optimisers and schedule start afresh",
                  flush=True)

    # ------------------------------------------------------------------ loop
    def _set_lr(self, factor: float) -> float:
        tc = self.cfg["train"]
        for g in self.opt.param_groups:
            g["lr"] = tc["lr"] * factor
        for opt in (self.opt_d, self.opt_domain):  # the critics follow the generator's schedule
            for g in (opt.param_groups if opt is not None else []):
                g["lr"] = tc["lr_critic"] * factor
        return tc["lr"] * factor

    def _restore_rng(self) -> bool:
        """Continue the random streams where the checkpoint left them, each rank its own; False where they
        start afresh instead (a new run, or a checkpoint written by another number of processes)."""
        ranks = self.ranks
        if self.rng_ranks is not None and len(self.rng_ranks) == ranks.world_size:
            restore_rng(self.rng_ranks[ranks.rank])
            return True
        if not ranks.distributed:
            if self.rng is not None:
                restore_rng(self.rng)
            return self.rng is not None
        # the networks are built alike on every rank (same seed); what follows must differ between ranks
        seed_everything(rank_seed(self.cfg["run"]["seed"], ranks.rank, self.epoch))
        return False

    def _train_epoch(self, lr: float) -> tuple[dict, list]:
        """One pass over this rank's training slices: the log row (losses averaged over every step of every
        rank) and the (case, slice index) of each slice this rank drew."""
        tc, ranks = self.cfg["train"], self.ranks
        shard = (ranks.rank, ranks.world_size) if ranks.distributed else None
        # one process reseeds its shuffle every epoch; a DistributedSampler derives it from (seed, epoch) itself
        seed = self.cfg["run"]["seed"] + (0 if shard else self.epoch)
        loader = make_loader(self.data.train, tc["batch_size"], True, self.augment, seed=seed,
                             num_workers=tc["num_workers"], epoch=self.epoch, shard=shard)
        adversarial = self.step.adversary is not None and self.epoch >= tc["adv_start_epoch"]
        unlabeled = self._unlabeled_batches(seed, shard) if self.unlabeled and self.epoch >= tc["domain_start_epoch"] \
            else None
        sums: dict[str, float] = {}
        drawn: list[tuple[str, int]] = []
        bar = progress_bar(loader, desc=f"epoch {self.epoch + 1}/{tc['epochs']}", leave=False,
                           disable=not self.progress, log_lines=False)
        counts: dict[str, int] = {}  # steps that logged each loss (critic warm-up steps log the critics' only)
        for i, batch in enumerate(bar):
            real = next(unlabeled) if unlabeled is not None else None
            # the run's first critic_warmup_steps steps train the critics alone (e.g. fresh critics after --init)
            warmup = self.epoch * len(loader) + i < tc["critic_warmup_steps"]
            logs = self.step(batch["image"].to(self.device), batch["label"].to(self.device), adversarial,
                             None if real is None else real["image"].to(self.device),
                             None if real is None else real["spacing"], None if real is None else real["no_body"],
                             None if real is None or "weak" not in real else real["weak"].to(self.device),
                             critics_only=warmup,
                             unlabeled_has_body=None if real is None else real["has_body"],
                             spacing=batch["spacing"])
            if self.ema is not None and not warmup:
                self.ema.update_parameters(self.model)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            drawn.extend(zip(batch["case"], batch["index"].tolist()))
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
        per_rank = ranks.gather((sums, counts))
        keys = dict.fromkeys(k for rank_sums, _ in per_rank for k in rank_sums)  # in the order they were logged
        return {k: sum(s.get(k, 0.0) for s, _ in per_rank) / sum(c.get(k, 0) for _, c in per_rank)
                for k in keys} | {"lr": lr}, drawn

    def _unlabeled_batches(self, seed: int, shard):
        """Endless augmented batches of this rank's unlabelled slices, reshuffled on every pass."""
        tc = self.cfg["train"]
        passes = 0
        while True:
            yield from make_loader(self.unlabeled, tc["domain_batch_size"], True, for_unlabeled(self.augment),
                                   seed=seed + 7919 * passes, epoch=self.epoch, shard=shard,
                                   weak_view=bool(tc["pseudo_weak_view"]))  # refused without pseudo_weight (__init__)
            passes += 1

    def _validate(self, loader) -> np.ndarray:
        """Mean Dice per structure over the validation slices: each rank scores its part, every rank gets the
        whole (the plain network, not its DDP wrapper, which would wait for the other ranks' batches)."""
        model = self.ema.module if self.ema is not None else self.model
        return mean_dice(np.concatenate(self.ranks.gather(validation_dice(model, loader, self.device))))

    def _processes(self, rng_continued: bool) -> dict:
        """What this distributed session is: processes, backend, batch per rank and in all, learning rates."""
        tc, ranks = self.cfg["train"], self.ranks
        return {"world_size": ranks.world_size, "backend": ranks.backend, "device": self.device.type,
                "batch_per_rank": tc["batch_size"], "effective_batch": tc["batch_size"] * ranks.world_size,
                "lr": tc["lr"], "lr_critic": tc["lr_critic"] if self.critic is not None else None,
                "lr_scaled_with_world_size": False, "from_epoch": self.epoch,
                "random_streams": "continued per rank" if rng_continued else "new per rank"}

    def _announce(self, session: dict, resumed: bool) -> None:
        line = (f"distributed: {session['world_size']} processes ({session['backend']}, {session['device']}), batch "
                f"{session['batch_per_rank']} per process = effective batch {session['effective_batch']}; lr "
                f"{session['lr']:g}" + (f", critic lr {session['lr_critic']:g}" if session["lr_critic"] else "")
                + " (not scaled with the number of processes)")
        if resumed and session["random_streams"] != "continued per rank":
            line += "; resumed from a checkpoint of another number of processes: new random streams, not bit-exact"
        print(line, flush=True)

    def _write_sessions(self, sessions: list[dict]) -> None:
        atomic_write_text(self.out / "distributed.json", json.dumps({"sessions": sessions}, indent=1) + "\n")

    def fit(self) -> dict:
        tc, ranks = self.cfg["train"], self.ranks
        if self.finished_before:
            if ranks.is_main:
                print(f"{self.out}: this run already finished its {self.epoch} epochs; nothing to do "
                      f"(extend it with --resume --set train.epochs=N)", flush=True)
            return {"epochs": self.epoch, "best_val_dice_mean": self.best, "seconds": self.elapsed, "finished_before": True}
        log = None
        if ranks.is_main:  # rank 0 alone writes the run folder
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out)
            if not (self.out / "splits.json").exists():
                write_splits(self.out / "splits.json", self.data.splits)
            atomic_write_text(self.out / "config.json", json.dumps(self.cfg, indent=1) + "\n")
            log = RunLog(self.out, self.epoch, self.pending_row)
        resumed = self.rng is not None
        rng_continued = self._restore_rng()
        sessions = []
        if ranks.distributed and ranks.is_main:
            past = self.out / "distributed.json"
            sessions = (json.loads(past.read_text())["sessions"] if past.exists() else []) + [
                self._processes(rng_continued)]
            self._announce(sessions[-1], resumed)
            self._write_sessions(sessions)
        if ranks.is_main and self.progress:
            print(f"precision: {self.precision}" + (" (autocast of the generator's forward passes; critics, losses and "
                                                    "validation in fp32)" if self.amp_dtype is not None else ""),
                  flush=True)
        val_part = ranks.shard(self.data.val)
        val_loader = make_loader(val_part, tc["batch_size"], False) if val_part else ()
        cap = (tc.get("max_minutes") or 0) * 60
        t_start = time.perf_counter() - self.elapsed
        first_epoch = self.epoch
        try:
            while self.epoch < tc["epochs"]:
                # rank 0's clock for every rank: the same learning rate, and the same epoch to stop at
                elapsed = ranks.broadcast(time.perf_counter() - t_start)
                if cap and elapsed >= cap:
                    break
                row, drawn = self._train_epoch(self._set_lr(lr_factor(tc, self.epoch, elapsed)))
                self.epoch += 1
                # validate every `val_every` epochs and always after the last one (the last that fits the cap)
                now = ranks.broadcast(time.perf_counter() - t_start)
                last = self.epoch >= tc["epochs"] or bool(cap and now + (now - elapsed) >= cap)
                validated = self.epoch % tc["val_every"] == 0 or last
                val = self._validate(val_loader) if validated else None
                mean = float(nan_mean(val)) if validated else math.nan  # never better than the best
                self.elapsed = time.perf_counter() - t_start
                row.update({"epoch": self.epoch, "seconds": round(self.elapsed, 1)})
                if validated:  # the validation columns stay empty on the other epochs
                    row.update({"val_dice_mean": mean, **{f"val_dice_{s}": float(v) for s, v in zip(STRUCTURES, val)}})
                rng_ranks = ranks.gather(capture_rng()) if ranks.distributed else None
                if ranks.distributed and self.epoch == first_epoch + 1:  # evidence of who trained on what
                    drawn_by_rank = ranks.gather(drawn)
                    if ranks.is_main:
                        sessions[-1]["first_epoch"] = {"epoch": self.epoch, "slices_by_rank": drawn_by_rank}
                        self._write_sessions(sessions)
                if mean > self.best:
                    self.best = mean
                    if ranks.is_main:
                        save_checkpoint(self.out / "best.pt", self._state(row, rng_ranks))
                if not ranks.is_main:
                    continue
                save_checkpoint(self.out / "last.pt", self._state(row, rng_ranks))
                log.write(row)  # only once this epoch's checkpoint is safely on disk
                if self.progress:
                    scores = (" / ".join(f"{v:.3f}" for v in val) if validated
                              else f"- (every {tc['val_every']} epochs)")
                    loss = f"{row['loss_g']:.4f}" if "loss_g" in row else "- (critic warm-up)"
                    print(f"epoch {self.epoch}: loss {loss}  val Dice {scores}  ({self.elapsed:.0f} s)", flush=True)
        finally:
            if log is not None:
                log.close()
        if ranks.is_main and not (self.out / "best.pt").exists():  # e.g. a zero budget: still a usable model
            save_checkpoint(self.out / "best.pt", self._state(None))
        ranks.barrier()  # when fit returns, the run folder is complete for every rank
        return {"epochs": self.epoch, "best_val_dice_mean": self.best, "seconds": self.elapsed}


def train(**kw) -> dict:
    return Trainer(**kw).fit()
