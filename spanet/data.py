"""Datasets, transforms and loaders for spanet training and validation.

Two sources, one interface:

* ``--data-dir DIR``: an ImageFolder tree in the ImageNet layout the published
  scripts use, ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*.JPEG``
  (timm's split synonyms ``training``, ``validation``, ``eval`` ... are
  accepted). Read by timm's ``create_dataset``.
* no data dir: the **embedded digits set**, the 1,797 real 8x8 handwritten
  digits shipped inside scikit-learn (``sklearn.datasets.load_digits``),
  10 classes, nothing to download. It is split deterministically (within each
  class, every fifth image in file order goes to ``val``: 1,442 train /
  355 val) and upscaled (bicubic) to a configurable square size, 32 by default,
  as RGB PIL images, so that timm's ``create_transform`` applies unchanged.

Every transform is timm's ``create_transform``; samplers are PyTorch's
``DistributedSampler`` (also with one process, so that the shuffling order is a
pure function of ``(seed, epoch)`` and a resumed run replays it exactly).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = [
    "DIGITS_NAME",
    "DataError",
    "DigitsDataset",
    "digits_split_indices",
    "find_split_dir",
    "create_split_dataset",
    "dataset_num_classes",
    "dataset_class_to_idx",
    "check_val_classes",
    "AugConfig",
    "build_transform",
    "build_train_loader",
    "build_eval_loader",
    "subset_indices",
]

#: Name under which the embedded scikit-learn digits set is reported and logged.
DIGITS_NAME = "digits"
_TRAIN_SPLITS = ("train", "training")
_VAL_SPLITS = ("val", "validation", "valid", "eval", "evaluation")


class DataError(ValueError):
    """A data directory or dataset argument is unusable (missing, wrong layout, empty)."""


@functools.lru_cache(maxsize=1)
def _load_digits():
    # Importing sklearn.datasets costs seconds; load the 1,797 images once per process.
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def digits_split_indices(split: str) -> np.ndarray:
    """Indices of the embedded digits set that belong to ``split`` ('train' or 'val').

    Deterministic and independent of any RNG: within each class, taken in the
    order scikit-learn ships the images, every fifth image (positions 4, 9, ...)
    is a validation image. The split is stratified (35-37 val images per class).
    """
    if split not in ("train", "val"):
        raise DataError(f"digits split must be 'train' or 'val', got {split!r}")
    _, targets = _load_digits()
    is_val = np.zeros(len(targets), dtype=bool)
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        is_val[members[4::5]] = True
    return np.flatnonzero(is_val if split == "val" else ~is_val)


class DigitsDataset(Dataset):
    """The scikit-learn handwritten digits as an image dataset (RGB PIL images, int targets).

    Args:
        split: ``'train'`` or ``'val'`` (see :func:`digits_split_indices`).
        image_size: side of the square image the 8x8 digits are upscaled to (>= 8).
        transform: applied to each PIL image (e.g. from :func:`build_transform`).
    """

    num_classes = 10

    def __init__(self, split: str = "train", image_size: int = 32, transform=None):
        if int(image_size) < 8:
            raise DataError(f"digits image_size must be >= 8 (the digits are 8x8), got {image_size}")
        images, targets = _load_digits()
        self.split = split
        self.image_size = int(image_size)
        self.transform = transform
        idx = digits_split_indices(split)
        # Pixel values are 0..16 in the source; scale to the full 8-bit range once.
        pixels = np.round(images[idx] * (255.0 / 16.0)).astype(np.uint8)
        self.targets: List[int] = [int(t) for t in targets[idx]]
        self.images: List[Image.Image] = [
            Image.fromarray(p, mode="L")
            .resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            .convert("RGB")
            for p in pixels
        ]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def find_split_dir(data_dir: str, split: str) -> str:
    """Return ``data_dir/<split>`` (or a timm synonym of it), raising :class:`DataError` if absent.

    timm's ``create_dataset`` silently falls back to the root when a split
    folder is missing, which would turn ``train/`` and ``val/`` into two
    classes; this check turns that mistake into a clear error.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"data dir {data_dir!r} does not exist or is not a directory")
    synonyms = _TRAIN_SPLITS if split in _TRAIN_SPLITS else _VAL_SPLITS if split in _VAL_SPLITS else ()
    for name in (split,) + tuple(s for s in synonyms if s != split):
        candidate = os.path.join(data_dir, name)
        if os.path.isdir(candidate):
            return candidate
    tried = ", ".join((split,) + tuple(s for s in synonyms if s != split))
    raise DataError(
        f"data dir {data_dir!r} has no {split!r} split folder (looked for: {tried}); expected the "
        "ImageNet layout DIR/train/<class>/<image> and DIR/val/<class>/<image>"
    )


def create_split_dataset(
    data_dir: Optional[str],
    split: str,
    *,
    is_training: bool,
    image_size: int = 32,
    transform=None,
    class_map: Optional[Dict[str, int]] = None,
) -> Dataset:
    """Create the dataset for one split.

    ``data_dir=None`` selects the embedded digits set (``split`` 'train' or a
    validation synonym, mapped to 'val'). Otherwise ``data_dir`` must hold a
    ``split`` subfolder in ImageFolder layout, read by ``timm.data.create_dataset``.
    ``class_map`` pins the class-name -> index mapping (the validation split must
    use the training split's mapping).
    """
    if data_dir is None:
        digits_split = "train" if split in _TRAIN_SPLITS else "val" if split in _VAL_SPLITS else split
        return DigitsDataset(digits_split, image_size=image_size, transform=transform)
    from timm.data import create_dataset

    root = find_split_dir(data_dir, split)
    try:
        ds = create_dataset(
            "", root=root, split=split, search_split=False, is_training=is_training,
            class_map=class_map or "",
        )
    except Exception as e:  # timm raises bare RuntimeError/AssertionError for empty trees
        raise DataError(f"cannot read ImageFolder split {root!r}: {e}") from e
    if len(ds) == 0:
        raise DataError(f"ImageFolder split {root!r} holds no images")
    ds.transform = transform
    return ds


def dataset_num_classes(ds: Dataset) -> int:
    """Number of classes of a dataset made by :func:`create_split_dataset`."""
    if isinstance(ds, Subset):
        return dataset_num_classes(ds.dataset)
    if isinstance(ds, DigitsDataset):
        return DigitsDataset.num_classes
    class_to_idx = getattr(getattr(ds, "reader", None), "class_to_idx", None)
    if not class_to_idx:
        raise DataError("cannot determine the number of classes of the dataset; pass --num-classes")
    return len(class_to_idx)


def dataset_class_to_idx(ds: Dataset) -> Optional[Dict[str, int]]:
    """The class-name -> index mapping of an ImageFolder split (None for the digits set)."""
    return getattr(getattr(ds, "reader", None), "class_to_idx", None)


@dataclass
class AugConfig:
    """Training augmentation knobs passed straight to ``timm.data.create_transform``."""

    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    auto_augment: Optional[str] = None
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    train_interpolation: str = "random"
    no_aug: bool = False


def build_transform(data_config: Dict[str, Any], is_training: bool, aug: Optional[AugConfig] = None):
    """timm's ``create_transform`` for a resolved data config (input_size, interpolation, mean, std, crop_pct)."""
    from timm.data import create_transform

    if not is_training:
        return create_transform(
            input_size=data_config["input_size"],
            is_training=False,
            interpolation=data_config["interpolation"],
            mean=data_config["mean"],
            std=data_config["std"],
            crop_pct=data_config["crop_pct"],
            crop_mode=data_config.get("crop_mode", "center"),
        )
    aug = aug or AugConfig()
    return create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        no_aug=aug.no_aug,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        vflip=aug.vflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment or None,
        interpolation=aug.train_interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=aug.re_prob,
        re_mode=aug.re_mode,
        re_count=aug.re_count,
    )


def subset_indices(total: int, limit: Optional[int]) -> List[int]:
    """The ``limit`` evenly spaced indices out of ``total`` used by ``--train-samples``/``--samples``.

    Evenly spaced, not a prefix: ImageFolder datasets are sorted by class, so a
    prefix would hold only the first classes.
    """
    if limit is None or limit >= total:
        return list(range(total))
    return [i * total // limit for i in range(limit)]


def _limit(ds: Dataset, limit: Optional[int]) -> Dataset:
    if limit is None or limit >= len(ds):
        return ds
    return Subset(ds, subset_indices(len(ds), limit))


def build_train_loader(
    ds: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    limit: Optional[int] = None,
    pin_memory: bool = False,
) -> Tuple[DataLoader, DistributedSampler]:
    """Shuffled, drop-last training loader; call ``sampler.set_epoch(epoch)`` before each epoch.

    The sampler's order depends only on ``(seed, epoch)``; the loader's own
    generator (which seeds worker processes) is re-seeded per epoch by the
    trainer, so the whole data stream of an epoch is reproducible on resume.
    """
    ds = _limit(ds, limit)
    if len(ds) < batch_size * world_size:
        raise DataError(
            f"the training split has {len(ds)} images, fewer than one global batch "
            f"({batch_size} x {world_size} processes); lower --batch-size"
        )
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator(),
    )
    return loader, sampler


def build_eval_loader(
    ds: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    limit: Optional[int] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """In-order evaluation loader; with several processes each takes every ``world_size``-th image.

    Sharding with a stride (no padding, unlike ``DistributedSampler``) keeps the
    summed metrics exact: every image is counted once across ranks.
    """
    ds = _limit(ds, limit)
    if world_size > 1:
        ds = Subset(ds, range(rank, len(ds), world_size))
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        drop_last=False,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )


def check_val_classes(data_dir: str, val_split: str, class_to_idx: Dict[str, int]) -> None:
    """Raise :class:`DataError` if the val split has class folders the train split lacks.

    timm's reader silently drops images whose folder is not in the class map,
    which would quietly shrink the validation set.
    """
    root = find_split_dir(data_dir, val_split)
    extra = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d not in class_to_idx)
    if extra:
        raise DataError(
            f"val split {root!r} has {len(extra)} class folders missing from the train split, e.g. {extra[:3]}"
        )
