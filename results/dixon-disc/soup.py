"""A uniform "model soup" (Wortsman et al. 2022): the network weights of several checkpoints of one architecture,
averaged, as one checkpoint that `--model` takes.

    python results/dixon-disc/soup.py --out runs/S3.pt runs/E3/last.pt runs/E3s1/last.pt runs/H/last.pt

Floating-point tensors (weights, BatchNorm statistics) are averaged; integer buffers are taken from the first
checkpoint. Configuration and preprocessing come from the first checkpoint; all must agree on them.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from spineseg.errors import SpinesegError  # noqa: E402
from spineseg.models.checkpoint import inference_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402


def soup(paths: list[Path]) -> dict:
    cks = [load_checkpoint(p) for p in paths]
    first = cks[0]
    for p, ck in zip(paths[1:], cks[1:]):
        if ck["config"]["model"] != first["config"]["model"] or ck["preprocess"] != first["preprocess"] \
                or ck["model"].keys() != first["model"].keys():
            raise SpinesegError("not the same architecture and preprocessing as the first checkpoint", p)
    weights = {k: (torch.stack([ck["model"][k].double() for ck in cks]).mean(0).to(v.dtype) if v.is_floating_point()
                   else v) for k, v in first["model"].items()}
    return dict(inference_checkpoint(first, weights), best=None, soup_of=[str(p) for p in paths])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    save_checkpoint(a.out, soup(a.checkpoints))
    print(f"{a.out}: the average of {len(a.checkpoints)} checkpoints")


if __name__ == "__main__":
    main()
