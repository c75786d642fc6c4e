"""Metrics of spanet-dense: COCO box/mask mAP through pycocotools, mIoU from a confusion matrix.

* :func:`detections_to_coco` turns torchvision detector outputs into COCO
  result entries (boxes as ``x y w h``, masks thresholded at 0.5 and
  RLE-encoded, labels mapped to category ids); :func:`coco_map` runs
  pycocotools' ``COCOeval`` on them and returns its twelve summary numbers per
  IoU type, in percent (``box_AP``, ``box_AP50``, ... ``mask_AP``, ...).
* :class:`ConfusionMatrix` accumulates per-pixel predictions against labels
  (ignoring :data:`~spanet.dense.data.IGNORE_INDEX`) and gives mIoU, the mean
  accuracy and the overall pixel accuracy, as mmsegmentation reports them
  (classes absent from both labels and predictions do not count in the means).
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .data import IGNORE_INDEX

__all__ = ["COCO_STATS", "detections_to_coco", "coco_map", "ConfusionMatrix"]

#: Names of ``COCOeval.stats`` in order (AP over IoU 0.5:0.95, at 0.5, at 0.75, by size; AR by count and size).
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(output: Dict[str, Tensor], image_id: int, category_ids: Optional[Sequence[int]] = None,
                       with_masks: bool = False, mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
    """COCO result entries of one image's torchvision detections (``boxes``, ``scores``, ``labels``[, ``masks``]).

    ``category_ids[k - 1]`` is the category id of label ``k`` (default: the label itself).
    """
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist() if len(boxes) else []
    entries = []
    if with_masks:
        masks = (output["masks"].detach().float().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
    for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        category = category_ids[label - 1] if category_ids is not None else label
        entry = {"image_id": int(image_id), "category_id": int(category), "bbox": [float(v) for v in box],
                 "score": float(score)}
        if with_masks:
            rle = mask_utils.encode(np.asfortranarray(masks[k]))
            rle["counts"] = rle["counts"].decode("ascii")
            entry["segmentation"] = rle
        entries.append(entry)
    return entries


def coco_map(coco_gt, results: List[Dict[str, Any]], iou_types: Sequence[str] = ("bbox",),
             image_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """pycocotools' ``COCOeval`` summary of ``results`` against ``coco_gt``, in percent.

    ``iou_types``: ``"bbox"`` and/or ``"segm"`` (reported as ``box_*`` and
    ``mask_*``). ``image_ids``: the images evaluated (default: all of
    ``coco_gt``). With no detections at all every AP is 0.
    """
    from pycocotools.cocoeval import COCOeval

    out: Dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_types must be 'bbox' or 'segm', got {iou_type!r}")
        prefix = "box" if iou_type == "bbox" else "mask"
        if not results:
            out.update({f"{prefix}_{name}": 0.0 for name in COCO_STATS})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(int(i) for i in image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # COCOeval reports -1 where no ground truth exists (e.g. no large objects): reported as 0.
        out.update({f"{prefix}_{name}": max(float(v), 0.0) * 100.0 for name, v in zip(COCO_STATS, evaluator.stats)})
    return out


class ConfusionMatrix:
    """Pixel confusion matrix of a ``num_classes`` segmentation (rows: label, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, prediction: Tensor, label: Tensor) -> None:
        """Count ``prediction`` (class indices) against ``label`` (same shape; ``ignore_index`` skipped)."""
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
        prediction, label = prediction.reshape(-1).cpu(), label.reshape(-1).cpu()
        valid = label != self.ignore_index
        index = label[valid] * self.num_classes + prediction[valid]
        self.matrix += torch.bincount(index, minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (call on every rank)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def compute(self) -> Dict[str, Any]:
        """``mIoU``, ``mAcc`` and ``aAcc`` in percent, plus the per-class ``IoU`` list (NaN for absent classes)."""
        m = self.matrix.double()
        true_positive = m.diag()
        labelled = m.sum(1)
        union = labelled + m.sum(0) - true_positive
        iou = true_positive / union  # NaN where a class is neither labelled nor predicted
        accuracy = true_positive / labelled
        total = m.sum()
        return {
            "mIoU": float(torch.nanmean(iou) * 100) if bool(torch.isfinite(iou).any()) else 0.0,
            "mAcc": float(torch.nanmean(accuracy) * 100) if bool(torch.isfinite(accuracy).any()) else 0.0,
            "aAcc": float(true_positive.sum() / total * 100) if total > 0 else 0.0,
            "IoU": [float(v * 100) for v in iou],
        }
