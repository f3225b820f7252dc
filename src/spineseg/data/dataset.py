"""PyTorch datasets over any supported layout: one item = one preprocessed axial slice."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import SpinesegError
from ..progress import progress as progress_bar
from ..io.images import read_image, read_label
from ..io.layouts import Case, check_label_grid
from ..preprocess.pipeline import NO_CONTENT, Geometry, PreprocessCache, PreprocessConfig, preprocess_slice
from .augment import AugmentConfig, augment, geometry_only


@dataclass
class SliceRecord:
    case_id: str
    patient: str
    index: int  # slice index within the case's volume
    image: np.ndarray  # (S, S) float32, network grid
    label: np.ndarray | None  # (S, S) uint8, network grid
    geometry: Geometry
    no_body: bool = False  # an unlabelled slice known to hold no vertebral body (disc level)
    has_body: bool = False  # an unlabelled slice known to hold one


def prepare_slices(cases: list[Case], cfg: PreprocessConfig, cache: PreprocessCache | None = None,
                   spacing: float | None = None, progress: bool = False,
                   skip_empty: bool = False) -> list[SliceRecord]:
    """Read, check and preprocess every slice of ``cases`` (through the cache when one is given).

    ``skip_empty``: leave out slices with no image content (e.g. the empty end slices of a volume)
    instead of refusing them; each is named in a warning.
    """
    out: list[SliceRecord] = []
    for case in progress_bar(cases, desc="preprocess", unit="case", disable=not progress):
        if cache is not None and _single_slice(case.image):
            hit = cache.get(cache.key(case.image, case.label, 0, cfg, spacing))
            if hit is not None:  # a cached single-slice case needs no read at all
                out.append(SliceRecord(case.case_id, case.patient, 0, *hit))
                continue
        img = read_image(case.image, spacing=spacing)
        lab = None
        if case.label is not None:
            lab = read_label(case.label, spacing=spacing)
            check_label_grid(img, lab)
        for i in range(img.num_slices):
            key = cache.key(case.image, case.label, i, cfg, spacing) if cache is not None else None
            hit = cache.get(key) if key is not None else None
            if hit is None:
                try:
                    hit = preprocess_slice(img.data[i], img.spacing, cfg, None if lab is None else lab.data[i])
                except SpinesegError as exc:
                    if exc.path:
                        raise
                    where = f" (slice {i})" if img.num_slices > 1 else ""
                    if skip_empty and exc.problem.startswith(NO_CONTENT):
                        logging.getLogger(__name__).warning("%s%s: %s; left out", case.image, where, exc.problem)
                        continue
                    raise SpinesegError(exc.problem + where, case.image) from None
                if key is not None:
                    cache.put(key, *hit)
            out.append(SliceRecord(case.case_id, case.patient, i, *hit))
    return out


def _single_slice(path) -> bool:
    from ..io.images import NIFTI_EXT, file_ext

    if file_ext(path) not in NIFTI_EXT:
        return False
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception:
        return False
    return len(shape) == 2 or (len(shape) >= 3 and shape[2] == 1)


class SliceDataset(Dataset):
    """Items: ``{"image": (1,S,S) float, "label": (S,S) long, "case": str, "index": int, "spacing": (2,) mm}``
    (``spacing``: the network grid's pixel spacing before augmentation); unlabelled slices have ``no_body``
    and ``has_body`` (bool) in place of ``label``.

    ``weak_view``: items also hold ``"weak"``, the same slice with the same random geometry but no intensity
    change (:func:`~spineseg.data.augment.geometry_only`), pixel-aligned with ``"image"``: the view a
    self-training target is read from while the network learns on the intensity-augmented one.
    """

    def __init__(self, records: list[SliceRecord], augment: AugmentConfig | None = None, seed: int = 0,
                 weak_view: bool = False):
        if not records:
            raise SpinesegError("no slices to load")
        if weak_view and augment is None:
            raise SpinesegError("a weak view needs augmentation")
        self.records = records
        self.augment, self.weak_view = augment, weak_view
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        img = torch.from_numpy(r.image)[None]
        lab = torch.from_numpy(r.label.astype(np.int64)) if r.label is not None else None
        weak = None
        if self.augment is not None:
            seed = hash((self.seed, self.epoch, i)) & 0x7FFFFFFF
            content = torch.from_numpy(r.geometry.content_mask())
            if self.weak_view:
                weak, _ = augment(img, None, geometry_only(self.augment), torch.Generator().manual_seed(seed), content)
            img, lab = augment(img, lab, self.augment, torch.Generator().manual_seed(seed), content)
        item = {"image": img.float(), "case": r.case_id, "index": r.index,
                "spacing": torch.tensor(r.geometry.out_spacing, dtype=torch.float64)}
        if weak is not None:
            item["weak"] = weak.float()
        if lab is not None:
            item["label"] = lab
        else:
            item["no_body"] = torch.tensor(r.no_body)
            item["has_body"] = torch.tensor(r.has_body)
        return item


def make_loader(records, batch_size: int, shuffle: bool, augment: AugmentConfig | None = None, seed: int = 0,
                num_workers: int = 0, epoch: int = 0, shard: tuple[int, int] | None = None,
                weak_view: bool = False) -> DataLoader:
    """A loader over ``records``; augmentation is seeded by (seed, epoch, slice index), so it is the same whichever
    process draws a slice.

    With ``shard=(rank, world_size)`` this process draws its own share of the slices through a
    `DistributedSampler`: one permutation per (seed, epoch), shared by every rank, split into disjoint parts
    (padded with a few repeats to a multiple of the world size, so every rank takes as many steps).
    ``weak_view``: see :class:`SliceDataset`.
    """
    ds = SliceDataset(records, augment=augment, seed=seed, weak_view=weak_view)
    ds.epoch = epoch
    if shard is not None:
        rank, world_size = shard
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=False)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=gen,
                      drop_last=False)
