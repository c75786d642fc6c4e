"""Data for spanet-dense: an embedded synthetic shapes set, COCO-format instances, ADE20K-style segmentation.

Samples follow torchvision's detection and segmentation conventions:

* detection/instance: ``(image, target)``, ``image`` a float tensor ``(3, H, W)``
  in [0, 1], ``target`` a dict with ``boxes`` (``(N, 4)`` float, ``x1 y1 x2 y2``
  in pixels), ``labels`` (``(N,)`` int64, 1..K, 0 is the background),
  ``masks`` (``(N, H, W)`` uint8, instance task only) and ``image_id``;
* semantic: ``(image, label)``, ``label`` ``(H, W)`` int64 with classes
  0..K-1 and :data:`IGNORE_INDEX` for unlabelled pixels.

Sources:

* :class:`SyntheticShapes` (no ``--data-dir``): discs, rectangles and
  triangles (reddish, greenish, bluish) of random sizes on grey gradients, overlapping
  (a later shape hides what it covers), drawn at start-up from a seed; each
  image is a function of ``(seed, split, index)`` alone.
* :class:`CocoInstances`: torchvision's ``CocoDetection`` (``annotations/*.json``
  plus an image folder) with the annotations turned into targets (crowd
  regions dropped, categories mapped to 1..K in id order and back for the
  evaluation).
* :class:`FolderSegmentation`: ADE20K's layout, ``images/<split>/*.jpg`` and
  ``annotations/<split>/*.png`` (label 0 is "other" and ignored, 1..150 become
  0..149, as mmsegmentation's ``reduce_zero_label``).

Training augmentations draw from the global RNGs, which
:class:`spanet.data.SampleSeededDataset` seeds per ``(seed, epoch, index)``.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data import DataError

__all__ = [
    "IGNORE_INDEX",
    "SHAPE_CLASSES",
    "draw_shapes",
    "SyntheticShapes",
    "CocoInstances",
    "FolderSegmentation",
    "DetectionTrainTransform",
    "SegmentationTransform",
    "find_coco_annotations",
    "coco_from_targets",
    "collate_samples",
]

#: Label of pixels that no class covers in the loss and the metric (mmsegmentation's and torchvision's 255).
IGNORE_INDEX = 255
#: Classes of the synthetic set, labels 1, 2, 3 (0: background).
SHAPE_CLASSES = ("disc", "rectangle", "triangle")


# ------------------------------------------------------------------------------------ synthetic shapes
def _shape_mask(rng: np.random.Generator, kind: int, size: int, min_extent: float, max_extent: float) -> np.ndarray:
    """Full (unoccluded) mask of one shape of class ``kind`` (1-3) in a ``size`` x ``size`` image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    extent = rng.uniform(min_extent, max_extent) * size  # about the shape's width
    cx, cy = rng.uniform(extent / 2, size - extent / 2, size=2)
    if kind == 1:  # disc
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= (extent / 2) ** 2
    if kind == 2:  # rectangle, aspect ratio 1:2 to 2:1, axis-aligned
        aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
        half_w, half_h = extent / 2 * math.sqrt(aspect), extent / 2 / math.sqrt(aspect)
        return (np.abs(xx - cx) <= half_w) & (np.abs(yy - cy) <= half_h)
    # triangle: equilateral, any rotation, circumradius extent / 2 (positive orientation)
    angle = rng.uniform(0, 2 * math.pi)
    corners = [(cx + extent / 2 * math.cos(angle + k * 2 * math.pi / 3),
                cy + extent / 2 * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    inside = np.ones((size, size), dtype=bool)
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


#: Hue of each class's colour (red discs, green rectangles, blue triangles), jittered per shape.
_CLASS_HUES = (0.0, 1.0 / 3.0, 2.0 / 3.0)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    import colorsys

    return np.asarray(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float64)


def draw_shapes(rng: np.random.Generator, size: int, max_objects: int = 4, min_visible: float = 0.4
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic image: ``(image (H, W, 3) uint8, masks (N, H, W) bool, labels (N,) int64)``.

    Background: a linear gradient between two grey levels, slightly tinted,
    with noise. Then 1 to ``max_objects`` shapes of random class, size (15-45%
    of the side) and position, each hiding what it covers; a shape's colour is
    saturated, with its class's hue (:data:`_CLASS_HUES`) jittered, so a
    network trained from scratch for minutes can tell the classes apart. The
    masks are the visible parts; a shape left with less than ``min_visible``
    of its area (or under 16 pixels) is left out of the image altogether, so
    every shape seen is labelled.
    """
    levels = rng.uniform(0.15, 0.85, size=2)
    tint = rng.uniform(-0.05, 0.05, size=3)
    t = np.linspace(0, 1, size)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = math.cos(direction) * t[None, :] + math.sin(direction) * t[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    grey = levels[0] + (levels[1] - levels[0]) * ramp
    background = grey[..., None] + tint + rng.normal(0, 0.04, size=(size, size, 3))
    count = int(rng.integers(1, max_objects + 1))
    shapes = []
    for _ in range(count):
        kind = int(rng.integers(1, len(SHAPE_CLASSES) + 1))
        mask = _shape_mask(rng, kind, size, 0.15, 0.45)
        colour = _hsv_to_rgb(_CLASS_HUES[kind - 1] + rng.uniform(-0.06, 0.06), rng.uniform(0.6, 1.0),
                             rng.uniform(0.55, 1.0))
        shapes.append((kind, mask, colour, rng.normal(0, 0.02, size=(size, size, 3))))
    while True:  # drop the shapes mostly hidden by later ones, until every remaining one shows enough
        owner = np.full((size, size), -1, dtype=np.int64)
        for index, (_, mask, _, _) in enumerate(shapes):
            owner[mask] = index
        hidden = [i for i, (_, mask, _, _) in enumerate(shapes)
                  if (owner == i).sum() < max(16, min_visible * mask.sum())]
        if not hidden:
            break
        shapes = [s for i, s in enumerate(shapes) if i not in hidden]
    image = background.copy()
    masks = []
    for index, (_, _, colour, noise) in enumerate(shapes):
        visible = owner == index
        image[visible] = colour + noise[visible]
        masks.append(visible)
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    mask_array = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
    return image, mask_array, np.asarray([s[0] for s in shapes], dtype=np.int64)


def _boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # pixel edges
    return boxes


_SPLIT_CODES = {"train": 0, "val": 1}


class SyntheticShapes(Dataset):
    """The embedded set: ``num_images`` synthetic ``image_size`` x ``image_size`` images, drawn at construction.

    Args:
        num_images: images in the split.
        image_size: side in pixels.
        seed: the set's seed; image ``i`` of a split depends only on ``(seed, split, i)``.
        split: ``"train"`` or ``"val"`` (disjoint draws).
        task: ``"detection"`` (boxes, labels), ``"instance"`` (and masks) or
            ``"semantic"`` (a label map: 0 background, 1-3 the shapes).
        transforms: ``transforms(image, target)`` applied to each sample (augmentation).
        max_objects: shapes per image (1 to this).
    """

    def __init__(self, num_images: int, image_size: int = 128, *, seed: int = 0, split: str = "train",
                 task: str = "instance", transforms=None, max_objects: int = 4):
        if num_images < 1:
            raise DataError(f"the synthetic set needs at least one image, got {num_images}")
        if image_size < 32:
            raise DataError(f"synthetic images must be at least 32 px (the backbone's stride), got {image_size}")
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if task not in ("detection", "instance", "semantic"):
            raise ValueError(f"task must be detection, instance or semantic, got {task!r}")
        self.task = task
        self.image_size = int(image_size)
        self.transforms = transforms
        self.num_classes = len(SHAPE_CLASSES) + 1  # with the background (a class of the semantic task too)
        self.class_names = ("background",) + SHAPE_CLASSES
        self.images, self.masks, self.labels = [], [], []
        for index in range(num_images):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
            image, masks, labels = draw_shapes(rng, image_size, max_objects)
            self.images.append(image)
            self.masks.append(masks)
            self.labels.append(labels)

    def __len__(self) -> int:
        return len(self.images)

    def target(self, index: int) -> Dict[str, Tensor]:
        """The detection/instance target of image ``index`` (before augmentation)."""
        masks = self.masks[index]
        target = {"boxes": torch.from_numpy(_boxes_from_masks(masks)),
                  "labels": torch.from_numpy(self.labels[index]),
                  "image_id": index}
        if self.task == "instance":
            target["masks"] = torch.from_numpy(masks.astype(np.uint8))
        return target

    def label_map(self, index: int) -> Tensor:
        """The semantic label map of image ``index``: 0 background, else the visible shape's class."""
        label = np.zeros((self.image_size, self.image_size), dtype=np.int64)
        for mask, cls in zip(self.masks[index], self.labels[index]):
            label[mask] = cls
        return torch.from_numpy(label)

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(255)
        target = self.label_map(index) if self.task == "semantic" else self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def coco(self):
        """The ground truth as a pycocotools ``COCO`` object (for the box and mask mAP)."""
        targets = [self.target(i) for i in range(len(self))]
        sizes = [(self.image_size, self.image_size)] * len(self)
        masks = [t.pop("masks", None) for t in targets]
        if self.task != "instance":
            masks = [torch.from_numpy(m.astype(np.uint8)) for m in self.masks]
        return coco_from_targets(targets, sizes, masks, list(SHAPE_CLASSES))


def coco_from_targets(targets: Sequence[Dict[str, Any]], sizes: Sequence[Tuple[int, int]],
                      masks: Sequence[Optional[Tensor]], class_names: Sequence[str]):
    """A pycocotools ``COCO`` ground truth from torchvision-style targets (labels 1..K become category ids).

    ``masks[i]`` (``(N, H, W)``) gives the instances' segmentations and areas; without it the box area is used.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    images, annotations = [], []
    for target, (height, width), image_masks in zip(targets, sizes, masks):
        image_id = int(target["image_id"])
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        boxes = target["boxes"].tolist()
        for k, (box, label) in enumerate(zip(boxes, target["labels"].tolist())):
            x1, y1, x2, y2 = box
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0, "area": (x2 - x1) * (y2 - y1)}
            if image_masks is not None:
                rle = mask_utils.encode(np.asfortranarray(image_masks[k].numpy().astype(np.uint8)))
                ann["area"] = float(mask_utils.area(rle))
                rle["counts"] = rle["counts"].decode("ascii")
                ann["segmentation"] = rle
            annotations.append(ann)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ------------------------------------------------------------------------------------------ transforms
def _hflip_target(target: Dict[str, Any], width: int) -> Dict[str, Any]:
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return target


class DetectionTrainTransform:
    """Horizontal flip with probability ``hflip`` (the detectors resize, and multi-scale, themselves)."""

    def __init__(self, hflip: float = 0.5):
        self.hflip = float(hflip)

    def __call__(self, image: Tensor, target: Dict[str, Any]):
        if self.hflip > 0 and torch.rand(()).item() < self.hflip:
            image, target = image.flip(-1), _hflip_target(target, image.shape[-1])
        return image, target


class SegmentationTransform:
    """Resize, and for training random rescale, crop, flip: the ADE20K pipeline of mmsegmentation.

    The image is resized to fit ``scale`` (long side, short side) keeping its
    aspect ratio (mmsegmentation's ``Resize(img_scale=(2048, 512), keep_ratio=True)``).
    In training the fit is multiplied by a ratio drawn from ``ratio_range``, a
    ``crop_size`` window is cut at random (padded with 0 and
    :data:`IGNORE_INDEX` where the image is smaller) and the result is flipped
    with probability ``hflip``. Training labels are resized with nearest
    neighbours; evaluation labels keep their size (the logits are resized to them).
    """

    def __init__(self, scale: Tuple[int, int], train: bool, crop_size: Optional[int] = None,
                 ratio_range: Tuple[float, float] = (1.0, 1.0), hflip: float = 0.5):
        if train and crop_size is None:
            raise ValueError("a training SegmentationTransform needs crop_size")
        self.scale = (int(max(scale)), int(min(scale)))
        self.train = bool(train)
        self.crop_size = crop_size
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.hflip = float(hflip)

    def _size(self, image: Tensor, ratio: float) -> List[int]:
        height, width = image.shape[-2:]
        fit = min(self.scale[0] / max(height, width), self.scale[1] / min(height, width)) * ratio
        return [max(1, int(height * fit + 0.5)), max(1, int(width * fit + 0.5))]

    def __call__(self, image: Tensor, label: Tensor):
        import torchvision.transforms.v2.functional as TF

        bilinear, nearest = TF.InterpolationMode.BILINEAR, TF.InterpolationMode.NEAREST
        if not self.train:  # the label keeps its size: predictions are scored at the original resolution
            size = self._size(image, 1.0)
            if size != list(image.shape[-2:]):
                image = TF.resize(image, size, interpolation=bilinear, antialias=True)
            return image, label
        low, high = self.ratio_range
        size = self._size(image, low + (high - low) * torch.rand(()).item())
        if size != list(image.shape[-2:]):
            image = TF.resize(image, size, interpolation=bilinear, antialias=True)
            label = TF.resize(label[None], size, interpolation=nearest)[0]
        crop = self.crop_size
        height, width = image.shape[-2:]
        top = int(torch.randint(0, max(height - crop, 0) + 1, ()).item())
        left = int(torch.randint(0, max(width - crop, 0) + 1, ()).item())
        image = image[:, top:top + crop, left:left + crop]
        label = label[top:top + crop, left:left + crop]
        if image.shape[-2:] != (crop, crop):
            pad_h, pad_w = crop - image.shape[-2], crop - image.shape[-1]
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = torch.nn.functional.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        if self.hflip > 0 and torch.rand(()).item() < self.hflip:
            image, label = image.flip(-1), label.flip(-1)
        return image, label


def collate_samples(batch):
    """A tuple of images and a tuple of targets (or labels), as torchvision's detection references batch."""
    return tuple(zip(*batch))


# ------------------------------------------------------------------------------------------------ COCO
def find_coco_annotations(data_dir: str, split: str) -> Tuple[str, str]:
    """``(annotation file, image folder)`` of ``split`` in a COCO-format folder.

    Looks for ``annotations/instances_<split>.json`` then ``annotations/<split>.json``,
    and for the images in ``<split>/`` then ``images/<split>/``. Raises
    :class:`~spanet.data.DataError` naming what is missing.
    """
    candidates = [os.path.join(data_dir, "annotations", f"instances_{split}.json"),
                  os.path.join(data_dir, "annotations", f"{split}.json")]
    ann_file = next((c for c in candidates if os.path.isfile(c)), None)
    if ann_file is None:
        raise DataError(f"--data-dir {data_dir!r} has no annotation file for split {split!r} (looked for "
                        f"{' and '.join(os.path.relpath(c, data_dir) for c in candidates)})")
    folders = [os.path.join(data_dir, split), os.path.join(data_dir, "images", split)]
    image_dir = next((f for f in folders if os.path.isdir(f)), None)
    if image_dir is None:
        raise DataError(f"--data-dir {data_dir!r} has no image folder for split {split!r} (looked for "
                        f"{' and '.join(os.path.relpath(f, data_dir) for f in folders)})")
    return ann_file, image_dir


class CocoInstances(Dataset):
    """A COCO-format split through torchvision's ``CocoDetection``, as ``(image, target)`` samples.

    Crowd annotations and boxes without area are dropped (as torchvision's
    references do); ``train=True`` also drops images left without
    annotations. Category ids map to labels 1..K in increasing id order
    (:attr:`category_ids` maps back). ``with_masks`` decodes the polygons/RLEs
    into ``masks``.
    """

    def __init__(self, data_dir: str, split: str, *, with_masks: bool, train: bool, transforms=None,
                 category_ids: Optional[Sequence[int]] = None):
        from torchvision.datasets import CocoDetection

        ann_file, image_dir = find_coco_annotations(data_dir, split)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.base = CocoDetection(image_dir, ann_file)
        except (ValueError, KeyError, OSError) as e:
            raise DataError(f"cannot read the COCO annotations {ann_file!r}: {e}") from e
        self.coco = self.base.coco
        own_ids = sorted(self.coco.getCatIds())
        if not own_ids:
            raise DataError(f"{ann_file!r} defines no categories")
        #: COCO category id of label ``k`` is ``category_ids[k - 1]``.
        self.category_ids: List[int] = list(category_ids) if category_ids is not None else own_ids
        unknown = sorted(set(own_ids) - set(self.category_ids))
        if unknown:
            raise DataError(f"{ann_file!r} has categories {unknown[:5]} that the training split lacks")
        self._label_of = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        self.class_names = ("background",) + tuple(self.coco.cats[c]["name"] for c in self.category_ids
                                                   if c in self.coco.cats)
        self.num_classes = len(self.category_ids) + 1
        self.with_masks = bool(with_masks)
        self.transforms = transforms
        self.positions = list(range(len(self.base.ids)))
        if train:
            self.positions = [p for p in self.positions if self._annotations(self.base.ids[p])]
            if not self.positions:
                raise DataError(f"{ann_file!r} has no image with a usable (non-crowd, non-empty) annotation")

    def _annotations(self, image_id: int) -> List[Dict[str, Any]]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]

    def __len__(self) -> int:
        return len(self.positions)

    def image_id(self, index: int) -> int:
        """COCO image id of sample ``index``."""
        return int(self.base.ids[self.positions[index]])

    def __getitem__(self, index: int):
        from torchvision.transforms.functional import pil_to_tensor

        position = self.positions[index]
        image_id = int(self.base.ids[position])
        try:
            pil = self.base._load_image(image_id)
        except OSError as e:
            raise DataError(f"cannot read the image of COCO id {image_id}: {e}") from e
        image = pil_to_tensor(pil).float().div_(255)
        height, width = image.shape[-2:]
        anns = self._annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target: Dict[str, Any] = {
            "boxes": boxes[keep],
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64)[keep],
            "image_id": image_id,
        }
        if self.with_masks:
            with warnings.catch_warnings():
                # pycocotools' decoder trips numpy 2's __array__(copy=) deprecation; the masks are right.
                warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy",
                                        category=DeprecationWarning)
                masks = [torch.from_numpy(self.coco.annToMask(a)) for a, k in zip(anns, keep.tolist()) if k]
            target["masks"] = torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# ---------------------------------------------------------------------------------- ADE20K-style folders
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class FolderSegmentation(Dataset):
    """Images and label PNGs in ADE20K's layout: ``images/<split>/NAME.jpg``, ``annotations/<split>/NAME.png``.

    ``num_classes``: the classes of the labels. With ``reduce_zero_label``
    (ADE20K: 0 is "other") label 0 becomes :data:`IGNORE_INDEX` and the others
    shift down by one; otherwise labels are class indices as they are. Values
    that are neither a class nor 255 raise :class:`~spanet.data.DataError`.
    """

    def __init__(self, data_dir: str, split: str, *, num_classes: int, reduce_zero_label: bool = True,
                 transforms=None):
        image_dir = os.path.join(data_dir, "images", split)
        label_dir = os.path.join(data_dir, "annotations", split)
        for folder in (image_dir, label_dir):
            if not os.path.isdir(folder):
                raise DataError(f"--data-dir {data_dir!r} has no folder {os.path.relpath(folder, data_dir)!r} "
                                "(ADE20K layout: images/<split>/*.jpg and annotations/<split>/*.png)")
        labels = {os.path.splitext(n)[0]: n for n in os.listdir(label_dir) if n.lower().endswith(".png")}
        self.items: List[Tuple[str, str]] = []
        unlabelled = []
        for name in sorted(os.listdir(image_dir)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in _IMAGE_EXTENSIONS:
                continue
            if stem not in labels:
                unlabelled.append(name)
                continue
            self.items.append((os.path.join(image_dir, name), os.path.join(label_dir, labels[stem])))
        if unlabelled:
            raise DataError(f"{len(unlabelled)} images in {image_dir!r} have no label PNG in {label_dir!r}, "
                            f"e.g. {unlabelled[0]!r}")
        if not self.items:
            raise DataError(f"{image_dir!r} holds no images")
        self.num_classes = int(num_classes)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.transforms = transforms
        self.class_names = tuple(str(i) for i in range(self.num_classes))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        image_path, label_path = self.items[index]
        try:
            image = pil_to_tensor(Image.open(image_path).convert("RGB")).float().div_(255)
            label = torch.from_numpy(np.array(Image.open(label_path), dtype=np.int64))
        except OSError as e:
            raise DataError(f"cannot read {image_path!r} or {label_path!r}: {e}") from e
        if label.dim() != 2 or label.shape != image.shape[-2:]:
            raise DataError(f"label {label_path!r} is {tuple(label.shape)}, not a single-channel map of the "
                            f"image's size {tuple(image.shape[-2:])}")
        if self.reduce_zero_label:
            label = torch.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bool(bad.any()):
            raise DataError(f"label {label_path!r} holds class {int(label[bad].max())} but there are "
                            f"{self.num_classes} classes (set --num-classes)")
        if self.transforms is not None:
            image, label = self.transforms(image, label)
        return image, label
