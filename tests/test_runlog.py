"""log.csv of a run: an older version's log gets today's columns before a resumed run appends to it."""

import csv

from spineseg.train.runlog import FIELDS, RunLog


def test_a_log_with_older_columns_is_rewritten_before_rows_are_appended(tmp_path):
    old = [f for f in FIELDS if f not in ("loss_pseudo", "pseudo_accepted")]
    with open(tmp_path / "log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old, lineterminator="\n")
        w.writeheader()
        w.writerow({f: "" for f in old} | {"epoch": "1", "loss_seg": "0.5", "val_dice_mean": "0.7"})
    log = RunLog(tmp_path, epoch=1, tensorboard=False)
    log.write({"epoch": 2, "loss_seg": 0.4, "loss_pseudo": 0.1, "pseudo_accepted": 0.25})
    log.close()
    with open(tmp_path / "log.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == FIELDS
    assert all(None not in r for r in rows)  # no row longer than the header
    assert rows[0]["loss_seg"] == "0.5" and rows[0]["val_dice_mean"] == "0.7" and rows[0]["loss_pseudo"] == ""
    assert rows[1]["loss_pseudo"] == "0.1" and rows[1]["pseudo_accepted"] == "0.25"
