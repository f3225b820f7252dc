"""Supervised and adversarial training with validation, logs and atomic checkpoints."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .. import NUM_CLASSES, STRUCTURES, __version__
from ..data.augment import AugmentConfig
from ..data.dataset import make_loader, prepare_slices
from ..data.splits import load_splits, make_splits, write_splits
from ..errors import SpinesegError
from ..progress import progress as progress_bar
from ..io.atomic import atomic_write_text
from ..io.layouts import load_dataset
from ..models.checkpoint import load_checkpoint, model_from_config, pick_device, save_checkpoint
from ..models.critic import Critic
from ..overlap import dice_per_structure
from ..preprocess.pipeline import PreprocessCache, PreprocessConfig
from .config import resolve_config
from .losses import SegLoss, critic_loss, generator_adv_loss, one_hot


@torch.no_grad()
def validate(model, loader, device) -> np.ndarray:
    model.eval()
    rows = []
    for batch in loader:
        logits = model(batch["image"].to(device))
        rows.append(dice_per_structure(logits.argmax(1).cpu().numpy(), batch["label"].numpy(), NUM_CLASSES))
    model.train()
    return np.nanmean(np.concatenate(rows), axis=0) if rows else np.full(NUM_CLASSES - 1, np.nan)


class Trainer:
    def __init__(self, data: str | Path, model: str, out: str | Path, config: str | Path | None = None,
                 fold: int = 0, split: str = "kfold", resume: bool = False, seed: int = 0, device: str = "auto",
                 cache: str | Path | None = None, overrides: dict | None = None, progress: bool = True,
                 splits_file: str | Path | None = None):
        self.out = Path(out)
        self.resume = resume
        self.progress = progress
        if resume:
            if not (self.out / "last.pt").exists():
                raise SpinesegError("--resume given but the run has no last.pt", self.out)
            ck = load_checkpoint(self.out / "last.pt")
            self.cfg = ck["config"]
        else:
            if (self.out / "last.pt").exists():
                raise SpinesegError("run folder already holds a training run (use --resume or another --out)", self.out)
            self.cfg = resolve_config(model, config, overrides)
            self.cfg["run"] = {"data": str(Path(data).resolve()), "fold": fold, "split": split, "seed": seed}
        run = self.cfg["run"]
        self.seed = run["seed"]
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        tc = self.cfg["train"]
        self.device = pick_device(device)
        if self.device.type == "cpu" and tc.get("threads"):
            torch.set_num_threads(int(tc["threads"]))
        self.pp = PreprocessConfig.from_dict(self.cfg["preprocess"])

        cases = [c for c in load_dataset(run["data"]) if c.subset == "train"]
        split_path = self.out / "splits.json"
        if split_path.exists():
            splits = load_splits(split_path)
        elif splits_file is not None:
            splits = load_splits(splits_file)
        else:
            splits = make_splits(cases, run["split"])
        if not 0 <= run["fold"] < len(splits):
            raise SpinesegError(f"fold {run['fold']} does not exist ({len(splits)} splits)")
        self.splits = splits
        self.split = splits[run["fold"]]
        by_id = {c.case_id: c for c in cases}
        missing = [cid for k in ("train", "val") for cid in self.split[k] if cid not in by_id]
        if missing:
            raise SpinesegError(f"splits name cases not in the data set: {missing[:3]}")
        self.cache = PreprocessCache(cache)
        self.train_recs = prepare_slices([by_id[c] for c in self.split["train"]], self.pp, self.cache, progress=progress)
        self.val_recs = prepare_slices([by_id[c] for c in self.split["val"]], self.pp, self.cache, progress=progress)
        if not self.val_recs:
            self.val_recs = self.train_recs[: max(1, len(self.train_recs) // 10)]

        self.model = model_from_config(self.cfg).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=tc["lr"], betas=tuple(tc["betas"]),
                                    weight_decay=tc["weight_decay"])
        self.adv = tc["adversarial"]
        # weight clipping trains the plain Wasserstein objective; the clipping itself happens after each step
        self.adv_objective = "wgan" if self.adv == "wgan-clip" else self.adv
        self.critic = self.opt_d = None
        if self.adv != "none":
            self.critic = Critic(1 + NUM_CLASSES, **self.cfg["critic"]).to(self.device)
            self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=tc["lr_critic"], betas=tuple(tc["betas"]))
        self.seg_loss = SegLoss(tc["beta"], tc["gamma"])
        self.use_amp = bool(tc["amp"]) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch = 0
        self.best = -1.0
        self.elapsed = 0.0
        if resume:
            self._load_state(ck)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "epoch": self.epoch, "best": self.best, "elapsed": self.elapsed, "config": self.cfg,
            "preprocess": self.pp.to_dict(), "version": __version__, "model_name": self.cfg["model"]["name"],
        }

    def _load_state(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["opt"])
        if self.critic is not None and ck.get("critic") is not None:
            self.critic.load_state_dict(ck["critic"])
            self.opt_d.load_state_dict(ck["opt_d"])
        self.epoch, self.best, self.elapsed = int(ck["epoch"]), float(ck["best"]), float(ck.get("elapsed", 0.0))

    # ------------------------------------------------------------------ steps
    def _lr_factor(self, progress: float) -> float:
        if self.cfg["train"]["lr_schedule"] == "poly":
            return max(1e-3, (1.0 - min(progress, 0.999)) ** 0.9)
        return 1.0

    def _step(self, img, lab, adversarial: bool) -> dict:
        tc = self.cfg["train"]
        logs = {}
        dev = self.device.type
        if adversarial:
            real = one_hot(lab, NUM_CLASSES)
            for _ in range(int(tc["n_critic"])):
                with torch.no_grad(), torch.autocast(dev, enabled=self.use_amp):
                    fake = torch.softmax(self.model(img).float(), 1)
                d_loss = critic_loss(self.adv_objective, self.critic, img, real, fake,
                                     tc["gp_lambda"])
                self.opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                self.opt_d.step()
                if self.adv == "wgan-clip":
                    for p in self.critic.parameters():
                        p.data.clamp_(-tc["clip"], tc["clip"])
            logs["loss_d"] = float(d_loss.detach())
        with torch.autocast(dev, enabled=self.use_amp):
            logits = self.model(img)
        loss = self.seg_loss(logits, lab)
        logs["loss_seg"] = float(loss.detach())
        if adversarial:
            for p in self.critic.parameters():
                p.requires_grad_(False)
            adv = generator_adv_loss(self.adv_objective, self.critic, img,
                                     torch.softmax(logits.float(), 1))
            for p in self.critic.parameters():
                p.requires_grad_(True)
            loss = loss + tc["alpha"] * adv
            logs["loss_adv"] = float(adv.detach())
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        logs["loss_g"] = float(loss.detach())
        return logs

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        tc = self.cfg["train"]
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.out / "splits.json").exists():
            write_splits(self.out / "splits.json", self.splits)
        atomic_write_text(self.out / "config.json", json.dumps(self.cfg, indent=1) + "\n")
        aug = AugmentConfig.from_dict(self.cfg["augment"])
        val_loader = make_loader(self.val_recs, tc["batch_size"], False)
        log_path = self.out / "log.csv"
        fields = ["epoch", "seconds", "lr", "loss_g", "loss_seg", "loss_adv", "loss_d"] + [f"val_dice_{s}" for s in STRUCTURES] + ["val_dice_mean"]
        new_log = not log_path.exists()
        tb = SummaryWriter(str(self.out / "tb"))
        budget = tc["max_minutes"] * 60 if tc.get("max_minutes") else None
        t_start = time.perf_counter() - self.elapsed
        with open(log_path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            if new_log:
                w.writeheader()
            while self.epoch < tc["epochs"]:
                progress = self.epoch / tc["epochs"]
                if budget:
                    progress = max(progress, (time.perf_counter() - t_start) / budget)
                    if progress >= 1.0:
                        break
                lr_f = self._lr_factor(progress)
                for g in self.opt.param_groups:
                    g["lr"] = tc["lr"] * lr_f
                loader = make_loader(self.train_recs, tc["batch_size"], True, aug, seed=self.seed + self.epoch,
                                     num_workers=tc["num_workers"])
                loader.dataset.epoch = self.epoch
                adversarial = self.adv != "none" and self.epoch >= tc["adv_start_epoch"]
                sums: dict[str, float] = {}
                n = 0
                bar = progress_bar(loader, desc=f"epoch {self.epoch + 1}/{tc['epochs']}", leave=False, disable=not self.progress, log_lines=False)
                for batch in bar:
                    logs = self._step(batch["image"].to(self.device), batch["label"].to(self.device), adversarial)
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n += 1
                    bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
                self.epoch += 1
                row = {k: sums[k] / n for k in sums}
                val = validate(self.model, val_loader, self.device)
                mean = float(np.nanmean(val))
                self.elapsed = time.perf_counter() - t_start
                row.update({"epoch": self.epoch, "seconds": round(self.elapsed, 1), "lr": tc["lr"] * lr_f,
                            "val_dice_mean": mean, **{f"val_dice_{s}": float(v) for s, v in zip(STRUCTURES, val)}})
                w.writerow({k: row.get(k, "") for k in fields})
                fh.flush()
                for k, v in row.items():
                    if k != "epoch":
                        tb.add_scalar(k, v, self.epoch)
                if self.progress:
                    print(f"epoch {self.epoch}: loss {row.get('loss_g', math.nan):.4f}  val Dice "
                          + " / ".join(f"{v:.3f}" for v in val) + f"  ({self.elapsed:.0f} s)", flush=True)
                if mean > self.best:
                    self.best = mean
                    save_checkpoint(self.out / "best.pt", self._state())
                save_checkpoint(self.out / "last.pt", self._state())
        tb.close()
        if not (self.out / "best.pt").exists():  # e.g. a zero budget: still leave a usable model
            save_checkpoint(self.out / "best.pt", self._state())
        return {"epochs": self.epoch, "best_val_dice_mean": self.best, "seconds": self.elapsed}


def train(**kw) -> dict:
    return Trainer(**kw).fit()
