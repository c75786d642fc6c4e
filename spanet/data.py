"""Datasets, transforms and loaders for spanet training and validation.

Two sources, one interface:

* ``--data-dir DIR``: an ImageFolder tree in the ImageNet layout the published
  scripts use, ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*.JPEG``
  (timm's split synonyms ``training``, ``validation``, ``eval`` ... are
  accepted). Read by timm's ``create_dataset``.
* no data dir: the **embedded digits set**, the 1,797 real 8x8 handwritten
  digits of the UCI Optical Recognition of Handwritten Digits data (CC BY 4.0),
  as scikit-learn's ``load_digits`` distributes them, shipped in this package
  (``spanet/assets/digits.npz``, 45 KB; source and licence in
  ``spanet/assets/README.md``): 10 classes, nothing to download or install.
  It is split deterministically (within each class, every fifth image in file
  order goes to ``val``: 1,442 train / 355 val) and upscaled (bicubic) to a configurable square size, 32 by default,
  as RGB PIL images, so that timm's ``create_transform`` applies unchanged.

Every transform is timm's ``create_transform`` (with one repair: a RandAugment
posterize to 0 bits gives the black image older Pillow gave, where recent
Pillow raises). Samplers are PyTorch's ``DistributedSampler`` (also with one
process, so that the shuffling order is a pure function of ``(seed, epoch)``), and every
training sample is drawn with python ``random``, numpy and torch seeded from
``(seed, epoch, sample index)`` (:class:`SampleSeededDataset`), so the
augmented stream does not depend on the number of loader workers and a resumed
run replays it exactly whatever ``--workers`` it uses.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = [
    "DIGITS_NAME",
    "DIGITS_FILE",
    "DataError",
    "DigitsDataset",
    "digits_split_indices",
    "find_split_dir",
    "create_split_dataset",
    "dataset_num_classes",
    "dataset_class_to_idx",
    "check_val_classes",
    "AugConfig",
    "INTERPOLATIONS",
    "check_preprocessing",
    "resolve_data_config",
    "build_transform",
    "SampleSeededDataset",
    "EpochSampler",
    "sample_rng_seeds",
    "build_train_loader",
    "build_eval_loader",
    "subset_indices",
    "resolve_workers",
]

#: Name under which the embedded digits set is reported and logged.
DIGITS_NAME = "digits"
#: The embedded digits: ``images`` (1797, 8, 8) uint8 in 0..16 and ``targets``, in scikit-learn's order.
DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits.npz")
_TRAIN_SPLITS = ("train", "training")
_VAL_SPLITS = ("val", "validation", "valid", "eval", "evaluation")


class DataError(ValueError):
    """A data directory or dataset argument is unusable (missing, wrong layout, empty)."""


@functools.lru_cache(maxsize=1)
def _load_digits():
    # Shipped rather than drawn through scikit-learn, which would bring scikit-learn, scipy and joblib
    # (and seconds of import time) for 115 KB of pixels.
    with np.load(DIGITS_FILE) as digits:
        return digits["images"], digits["targets"].astype(np.int64)


def digits_split_indices(split: str) -> np.ndarray:
    """Indices of the embedded digits set that belong to ``split`` ('train' or 'val').

    Deterministic and independent of any RNG: within each class, taken in the
    order the images are stored (scikit-learn's), every fifth image (positions 4, 9, ...)
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
    """The embedded handwritten digits as an image dataset (PIL images, int targets).

    Args:
        split: ``'train'`` or ``'val'`` (see :func:`digits_split_indices`).
        image_size: side of the square image the 8x8 digits are upscaled to (>= 8).
        transform: applied to each PIL image (e.g. from :func:`build_transform`).
        in_chans: 3 for RGB images (the grey value in every channel), 1 for grayscale (mode ``L``).
    """

    num_classes = 10

    def __init__(self, split: str = "train", image_size: int = 32, transform=None, in_chans: int = 3):
        if int(image_size) < 8:
            raise DataError(f"digits image_size must be >= 8 (the digits are 8x8), got {image_size}")
        mode = _image_mode(in_chans)
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
            .convert(mode)
            for p in pixels
        ]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _image_mode(in_chans: int) -> str:
    if in_chans not in (1, 3):
        raise DataError(f"--in-chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    return "L" if in_chans == 1 else "RGB"


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
    in_chans: int = 3,
) -> Dataset:
    """Create the dataset for one split.

    ``data_dir=None`` selects the embedded digits set (``split`` 'train' or a
    validation synonym, mapped to 'val'). Otherwise ``data_dir`` must hold a
    ``split`` subfolder in ImageFolder layout, read by ``timm.data.create_dataset``.
    ``class_map`` pins the class-name -> index mapping (the validation split must
    use the training split's mapping). ``in_chans`` 1 reads grayscale images, 3 RGB.
    """
    if data_dir is None:
        digits_split = "train" if split in _TRAIN_SPLITS else "val" if split in _VAL_SPLITS else split
        return DigitsDataset(digits_split, image_size=image_size, transform=transform, in_chans=in_chans)
    from timm.data import create_dataset

    root = find_split_dir(data_dir, split)
    try:
        ds = create_dataset(
            "", root=root, split=split, search_split=False, is_training=is_training,
            class_map=class_map or "", input_img_mode=_image_mode(in_chans),
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

    @classmethod
    def from_args(cls, args: Any, default_interpolation: str) -> "AugConfig":
        """The knobs of spanet-train's flags (``--scale``, ``--aa``, ...); ``--train-interpolation`` '' or None
        means ``default_interpolation`` (the eval interpolation)."""
        return cls(
            scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
            color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, train_interpolation=args.train_interpolation or default_interpolation,
            no_aug=args.no_aug,
        )


#: Resize interpolations timm's transforms accept (``random`` is for training only).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def check_preprocessing(
    *,
    img_size: Optional[int] = None,
    crop_pct: Optional[float] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    interpolation: Optional[str] = None,
    train_interpolation: Optional[str] = None,
) -> None:
    """Raise :class:`DataError` naming the flag (``--img-size``, ``--crop-pct``, ...) whose value is unusable."""
    if img_size is not None and img_size < 1:
        raise DataError(f"--img-size must be >= 1, got {img_size}")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise DataError(f"--crop-pct must be in (0, 1] (the fraction of the resized image kept), got {crop_pct}")
    if mean is not None and not all(math.isfinite(m) for m in mean):
        raise DataError(f"--mean must be finite, got {' '.join(map(str, mean))}")
    if std is not None and not all(math.isfinite(v) and v > 0 for v in std):
        raise DataError(f"--std must be finite and > 0 (images are divided by it), got {' '.join(map(str, std))}")
    if interpolation and interpolation not in INTERPOLATIONS:
        raise DataError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if train_interpolation and train_interpolation not in INTERPOLATIONS + ("random",):
        raise DataError(f"--train-interpolation must be random or one of {', '.join(INTERPOLATIONS)}, "
                        f"got {train_interpolation!r}")


def resolve_data_config(
    model: torch.nn.Module,
    *,
    img_size: Optional[int] = None,
    crop_pct: Optional[float] = None,
    interpolation: Optional[str] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    recorded: Optional[Dict[str, Any]] = None,
    in_chans: Optional[int] = None,
) -> Dict[str, Any]:
    """The preprocessing of spanet-train and spanet-validate, in plain values.

    Given values first, then ``recorded`` (the data config a spanet-train
    checkpoint carries), then the model's ``pretrained_cfg``, resolved by
    timm's ``resolve_data_config``. With one input channel an RGB mean/std
    of the model becomes its average. Raises :class:`DataError` for bad values.
    """
    from timm.data import resolve_data_config as timm_resolve

    check_preprocessing(img_size=img_size, crop_pct=crop_pct, mean=mean, std=std, interpolation=interpolation)
    base: Dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in (recorded or {}).items()}
    given = {"crop_pct": crop_pct, "interpolation": interpolation or None,
             "mean": tuple(mean) if mean is not None else None, "std": tuple(std) if std is not None else None}
    channels = in_chans or base.get("input_size", (3,))[0]
    if img_size is not None:
        given["input_size"] = (channels, img_size, img_size)
    base.update({k: v for k, v in given.items() if v is not None})
    cfg = timm_resolve(base, model=model)
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return {
        "input_size": (channels,) + tuple(int(v) for v in cfg["input_size"][1:]),
        "interpolation": str(cfg["interpolation"]),
        "mean": mean,
        "std": std,
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


def _posterize(img, bits_to_keep, **kwargs):
    # Recent Pillow refuses 0 bits; older Pillow returned the black image, which is what RandAugment's
    # posterize at full magnitude means (the recipe's rand-m9-mstd0.5-inc1 reaches it).
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _repair_posterize(transform) -> None:
    # Swap our posterize into the AutoAugment/RandAugment/AugMix ops of this transform only (no global patch).
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", ()):
        ops = list(getattr(t, "ops", ()))
        for sub_policy in getattr(t, "policy", ()):
            ops += list(sub_policy)
        for op in ops:
            if isinstance(op, auto_augment.AugmentOp) and op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize


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
    transform = create_transform(
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
    _repair_posterize(transform)
    return transform


def sample_rng_seeds(seed: int, epoch: int, index: int) -> Tuple[int, np.ndarray, int]:
    """Seeds (python ``random``, numpy, torch) of one training sample: a function of the triple only."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(6)
    return (int(words[0]) << 32 | int(words[1])), words[2:4], (int(words[4]) << 32 | int(words[5]))


@contextlib.contextmanager
def _seeded_global_rngs(seeds: Tuple[int, np.ndarray, int]):
    # timm's transforms draw from the global python/numpy/torch RNGs: seed them for one sample, then put
    # back what was there, so the main process's own streams (drop path, MixUp) are left as they were.
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seeds[0])
    np.random.seed(seeds[1])
    torch.default_generator.manual_seed(seeds[2])  # the CPU generator only: CUDA streams are not touched
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SampleSeededDataset(Dataset):
    """``dataset`` whose sample ``i`` is drawn with the global RNGs seeded from ``(seed, epoch, i)``.

    The augmentation of a sample then depends neither on which process draws
    it (the main one or any loader worker) nor on what was drawn before it, so
    the stream is the same for every ``num_workers`` and a resumed epoch
    replays exactly. :meth:`set_epoch` is called by :class:`EpochSampler`.
    """

    def __init__(self, dataset: Dataset, seed: int):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws the following samples make."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with _seeded_global_rngs(sample_rng_seeds(self.seed, self.epoch, int(index))):
            return self.dataset[index]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` whose ``set_epoch`` also sets the epoch of its :class:`SampleSeededDataset`."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)


def resolve_workers(requested: Optional[int], data_dir: Optional[str], local_world_size: int = 1) -> int:
    """``--workers``: as given, else 0 for the embedded digits (in memory: worker start-up costs more than it
    saves), else timm's 4, fewer when the process's share of the CPUs is smaller (one core stays for it)."""
    if requested is not None:
        return requested
    if data_dir is None:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(local_world_size, 1) - 1))


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

    The sampler's order depends only on ``(seed, epoch)`` and each sample's
    augmentation only on ``(seed, epoch, index)`` (:class:`SampleSeededDataset`),
    so the data stream of an epoch is the same for any ``num_workers`` and is
    replayed exactly on resume.
    """
    ds = SampleSeededDataset(_limit(ds, limit), seed)
    if len(ds) < batch_size * world_size:
        raise DataError(
            f"the training split has {len(ds)} images, fewer than one global batch "
            f"({batch_size} x {world_size} processes); lower --batch-size"
        )
    sampler = EpochSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=False,  # fresh workers each epoch copy the dataset with its new epoch
        generator=torch.Generator(),  # the loader's base seed then does not consume the global torch RNG
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
