"""The run's log: one CSV row and TensorBoard scalars per epoch, written only after that epoch's checkpoint.

A resumed run first makes the log agree with its checkpoint: rows after the checkpoint's epoch are
dropped, and a row the checkpoint holds but the log lost (killed between the two writes) is added, so
after any resume every epoch appears exactly once.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .. import STRUCTURES
from ..io.atomic import atomic_write_text

FIELDS = (["epoch", "seconds", "lr", "loss_g", "loss_seg", "loss_adv", "loss_d", "loss_domain", "loss_domain_d",
           "loss_pseudo", "pseudo_accepted", "loss_body",
           "loss_no_body", "loss_no_body_labelled"] + [f"val_dice_{s}" for s in STRUCTURES] + ["val_dice_mean"])


class RunLog:
    def __init__(self, folder: Path, epoch: int = 0, pending_row: dict | None = None, tensorboard: bool = True):
        self.path = folder / "log.csv"
        rows, header = self._read()
        kept = [r for r in rows if int(r["epoch"]) <= epoch]
        if pending_row is not None and not any(int(r["epoch"]) == int(pending_row["epoch"]) for r in kept):
            kept.append({k: pending_row.get(k, "") for k in FIELDS})
        if kept != rows or header != FIELDS:  # a log of an older version is rewritten with today's columns
            self._rewrite(kept)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events of epochs after the checkpoint that an earlier, killed session wrote
            self.tb = SummaryWriter(str(folder / "tb"), purge_step=epoch + 1 if epoch else None)
            if pending_row is not None and not any(int(r["epoch"]) == int(pending_row["epoch"]) for r in rows):
                self._tb_row(pending_row)

    def _read(self) -> tuple[list[dict], list[str] | None]:
        if not self.path.exists():
            return [], None
        with open(self.path, newline="") as fh:
            reader = csv.DictReader(fh)
            return [r for r in reader if r.get("epoch", "").strip().isdigit()], reader.fieldnames

    def _rewrite(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n", extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def _tb_row(self, row: dict) -> None:
        for k, v in row.items():
            if k != "epoch" and v not in ("", None):
                self.tb.add_scalar(k, float(v), int(row["epoch"]))

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n", extrasaction="ignore").writerow(
                {k: row.get(k, "") for k in FIELDS})
            fh.flush()
            os.fsync(fh.fileno())
        if self.tb is not None:
            self._tb_row(row)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
