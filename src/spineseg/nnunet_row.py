"""The nnU-Net 2D row of a comparison, trained and applied by nnU-Net v2 through its own command lines.

On the experiment's data set, split and fold: export (with the patient map and a ``splits_final.json`` whose
"val" is our held-out test fold), ``nnUNetv2_plan_and_preprocess -c 2d``, ``nnUNetv2_train ... -tr
nnUNetTrainer_<N>epochs``, ``nnUNetv2_predict`` on the fold's test cases, then import into ``pred/`` so
that our evaluation reads it like every other row. nnU-Net's training log, progress plot, plans and
dataset fingerprint are kept in ``nnunet/`` beside it.

nnU-Net's training length comes in fixed variants (1, 5, 10, ... epochs of 250 iterations). Under a
wall-clock budget the row first trains one epoch to measure nnU-Net's time per epoch on this machine,
then trains the longest variant that fits the budget (keeping the one-epoch model when nothing longer
fits); ``nnunet.json`` records what was chosen and why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import SpinesegError
from .io.atomic import atomic_write_text

NNUNET = "nnunet"  # the row's name in `spineseg experiment --models`
EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000)
DATASET_NAME = "SpinesegComparison"
KEEP = ("plans.json", "dataset.json", "dataset_fingerprint.json", "debug.json", "progress.png")


def nnunet_installed() -> bool:
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        return False
    return True


INSTALL_HINT = ("nnU-Net v2 is not installed; `make install` installs it CPU-only (pip install --no-deps "
                "nnunetv2==2.8.1 dynamic-network-architectures==0.4.4, then its requirements by hand; see the README)")


def trainer_name(epochs: int) -> str:
    return "nnUNetTrainer_1epoch" if epochs == 1 else f"nnUNetTrainer_{epochs}epochs"


def variant_for(budget_seconds: float, seconds_per_epoch: float) -> int:
    """The longest epoch variant whose estimated training time fits the budget (at least 1)."""
    fitting = [n for n in EPOCH_VARIANTS if n * seconds_per_epoch <= budget_seconds]
    return max(fitting) if fitting else 1


class NnunetRow:
    def __init__(self, run: str | Path, dataset_id: int = 599, device: str = "cpu", progress: bool = True):
        if not nnunet_installed():
            raise SpinesegError(INSTALL_HINT)
        self.run = Path(run)
        self.id = dataset_id
        self.device = device
        self.progress = progress
        self.env = dict(os.environ, nnUNet_raw=str(self.run / "nnUNet_raw"),
                        nnUNet_preprocessed=str(self.run / "nnUNet_preprocessed"),
                        nnUNet_results=str(self.run / "nnUNet_results"), nnUNet_n_proc_DA="1")
        self.folder = f"Dataset{dataset_id:03d}_{DATASET_NAME}"

    def _nnunet(self, *args: str, log: Path) -> float:
        """Run one nnU-Net command (through `spineseg.nnunet_cli`); its output goes to ``log``. Returns seconds."""
        cmd = [sys.executable, "-m", "spineseg.nnunet_cli", *args]
        t0 = time.perf_counter()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write("$ " + " ".join(args) + "\n")
            fh.flush()
            r = subprocess.run(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise SpinesegError(f"{args[0]} failed (exit {r.returncode}); see its output", log)
        return time.perf_counter() - t0

    def prepare(self, data: str | Path, splits: list[dict]) -> None:
        from .io.nnunet import export_nnunet

        raw = self.run / "nnUNet_raw" / self.folder
        if not (raw / "dataset.json").exists():
            export_nnunet(data, self.run / "nnUNet_raw", splits, self.id, DATASET_NAME, overwrite=True)
        pre = self.run / "nnUNet_preprocessed" / self.folder
        # nnU-Net writes nnUNetPlans.json before it preprocesses, so that file does not say preprocessing finished
        done = self.run / "nnunet" / "plan_and_preprocess.done"
        if not done.exists():
            self._nnunet("nnUNetv2_plan_and_preprocess", "-d", str(self.id), "-c", "2d", "-np", "1",
                         "--verify_dataset_integrity", log=self.run / "nnunet" / "plan_and_preprocess.log")
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text("")
        shutil.copy(raw / "splits_final.json", pre / "splits_final.json")

    def _model_folder(self, epochs: int) -> Path:
        return self.run / "nnUNet_results" / self.folder / f"{trainer_name(epochs)}__nnUNetPlans__2d"

    def train(self, fold: int, epochs: int) -> float:
        """Seconds the training took; a rerun that finds the trained model returns the recorded time."""
        final = self._model_folder(epochs) / f"fold_{fold}" / "checkpoint_final.pth"
        times = self.run / "nnunet" / "train_seconds.json"
        key = f"{trainer_name(epochs)}/fold_{fold}"
        recorded = json.loads(times.read_text()) if times.exists() else {}
        if final.exists():
            return recorded.get(key, 0.0)  # 0.0: trained before this record existed
        seconds = self._nnunet("nnUNetv2_train", str(self.id), "2d", str(fold), "-tr", trainer_name(epochs),
                               "-device", self.device, log=self.run / "nnunet" / f"train_{trainer_name(epochs)}.log")
        times.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(times, json.dumps({**recorded, key: seconds}, indent=1) + "\n")
        return seconds

    def train_within(self, fold: int, budget_minutes: float | None, epochs: int | None) -> dict:
        """Train for ``epochs`` (a variant), or the longest variant fitting ``budget_minutes`` (calibrated)."""
        if epochs is not None:
            if epochs not in EPOCH_VARIANTS:
                raise SpinesegError(f"nnU-Net trains in fixed lengths: choose --nnunet-epochs from {EPOCH_VARIANTS}")
            return {"epochs": epochs, "train_seconds": self.train(fold, epochs), "chosen_by": "--nnunet-epochs"}
        budget = budget_minutes * 60
        t1 = self.train(fold, 1)
        log = json.loads((self.run / "nnunet.json").read_text()) if (self.run / "nnunet.json").exists() else {}
        t1 = t1 or log.get("one_epoch_seconds", 0.0)
        chosen = variant_for(budget, t1) if t1 else 1
        info = {"budget_seconds": budget, "one_epoch_seconds": t1, "epochs": chosen,
                "chosen_by": f"longest variant with epochs x {t1:.0f} s <= budget"}
        atomic_write_text(self.run / "nnunet.json", json.dumps(info, indent=1) + "\n")
        info["train_seconds"] = t1 if chosen == 1 else self.train(fold, chosen)
        return info

    def predict(self, fold: int, epochs: int, test_ids: list[str]) -> Path:
        """nnU-Net's predictions of the fold's test cases, imported as ``RUN/pred`` ({case}.nii.gz)."""
        from .io.nnunet import import_nnunet

        pred = self.run / "pred"
        if (pred / ".complete").exists():
            return pred
        raw = self.run / "nnUNet_raw" / self.folder
        images = self.run / "nnunet_test_images"
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(parents=True)
        wanted = set(test_ids)
        for f in sorted((raw / "imagesTr").iterdir()):
            case = f.name[: -len("_0000.nii.gz")]
            if case in wanted or case.rsplit("_s", 1)[0] in wanted:
                shutil.copy(f, images / f.name)
        out = self.run / "nnunet_predictions"
        shutil.rmtree(out, ignore_errors=True)
        self._nnunet("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(self.id), "-c", "2d",
                     "-f", str(fold), "-tr", trainer_name(epochs), "-device", self.device, "-npp", "1", "-nps", "1",
                     log=self.run / "nnunet" / "predict.log")
        imported = import_nnunet(out, self.run / "imported", name="nnunet", overwrite=True)
        shutil.rmtree(pred, ignore_errors=True)
        shutil.move(str(imported / "pred"), pred)
        shutil.rmtree(imported, ignore_errors=True)
        (pred / ".complete").write_text("")
        return pred

    def keep_logs(self, fold: int, epochs: int) -> None:
        """nnU-Net's own training log, progress plot, plans and fingerprint, next to our results."""
        dest = self.run / "nnunet"
        dest.mkdir(parents=True, exist_ok=True)
        model = self._model_folder(epochs)
        for f in list(model.glob("*.json")) + list((model / f"fold_{fold}").glob("*")):
            if f.is_file() and (f.name in KEEP or f.name.startswith("training_log")):
                shutil.copy(f, dest / f.name)
        pre = self.run / "nnUNet_preprocessed" / self.folder
        for name in ("nnUNetPlans.json", "dataset_fingerprint.json"):
            if (pre / name).exists():
                shutil.copy(pre / name, dest / name)
