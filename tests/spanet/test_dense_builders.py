"""spanet.dense builders: training steps lower the loss, eval outputs are well formed; schedule, metrics, data.

Each builder trains a few AdamW steps on one batch of the synthetic set (64 px, narrow heads) and must lower
its total loss, measured before and after with the same RNG seed so the detectors' box samplers draw alike.
Known values: the learning-rate schedule at its milestones, COCO mAP of perfect and of shifted detections,
mIoU of a hand-counted confusion matrix, the synthetic set's boxes against its masks.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spanet.data import DataError
from spanet.dense import fasterrcnn, maskrcnn, retinanet, semantic_fpn
from spanet.dense.data import (
    IGNORE_INDEX,
    CocoInstances,
    DetectionTrainTransform,
    FolderSegmentation,
    SegmentationTransform,
    SyntheticShapes,
)
from spanet.dense.engine import learning_rate
from spanet.dense.metrics import ConfusionMatrix, coco_map, detections_to_coco

SIZE = 64
SMALL_RCNN = dict(fpn_channels=32, representation_size=64, anchor_sizes=(8, 16, 32, 64, 128), min_size=SIZE,
                  max_size=SIZE, rpn_batch_size_per_image=64, box_batch_size_per_image=32,
                  rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=50)


def _batch(task, n=2):
    ds = SyntheticShapes(n, SIZE, seed=3, task=task)
    images, targets = zip(*[ds[i] for i in range(n)])
    return list(images), list(targets), ds


def _loss(model, images, targets):
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        if isinstance(targets[0], torch.Tensor):
            logits = model(torch.stack(images))["out"]
            return float(F.cross_entropy(logits, torch.stack(targets), ignore_index=IGNORE_INDEX))
        return float(sum(model(images, targets).values()))


def _train_steps(model, images, targets, steps=5, lr=1e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        if isinstance(targets[0], torch.Tensor):
            losses = {"ce": F.cross_entropy(model(torch.stack(images))["out"], torch.stack(targets))}
        else:
            losses = model(images, targets)
        assert all(math.isfinite(float(v.detach())) for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def _check_detections(outputs, num_classes, with_masks):
    for out in outputs:
        boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
        n = len(boxes)
        assert boxes.shape == (n, 4) and scores.shape == (n,) and labels.shape == (n,)
        assert bool((boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all())
        assert bool((boxes >= 0).all() and (boxes <= SIZE).all())
        assert bool(((scores >= 0) & (scores <= 1)).all())
        assert bool(((labels >= 1) & (labels < num_classes)).all())
        if with_masks:
            assert out["masks"].shape == (n, 1, SIZE, SIZE)
            assert bool(((out["masks"] >= 0) & (out["masks"] <= 1)).all())


@pytest.mark.parametrize("build, task", [
    (lambda: fasterrcnn(4, **SMALL_RCNN), "detection"),
    (lambda: maskrcnn(4, mask_layers=(32,), **SMALL_RCNN), "instance"),
    (lambda: retinanet(4, fpn_channels=32, anchor_sizes=(8, 16, 32, 64, 128), min_size=SIZE, max_size=SIZE),
     "detection"),
], ids=["fasterrcnn", "maskrcnn", "retinanet"])
def test_detector_trains_and_evaluates(build, task):
    torch.manual_seed(0)
    model = build()
    images, targets, _ = _batch(task)
    before = _loss(model, images, targets)
    _train_steps(model, images, targets)
    after = _loss(model, images, targets)
    assert math.isfinite(before) and after < before, (before, after)
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == len(images)
    _check_detections(outputs, 4, task == "instance")


def test_semantic_fpn_trains_and_predicts_at_the_input_size():
    torch.manual_seed(0)
    model = semantic_fpn(4, fpn_channels=32, head_channels=32)
    images, labels, _ = _batch("semantic")
    before = _loss(model, images, labels)
    _train_steps(model, images, labels)
    after = _loss(model, images, labels)
    assert after < before, (before, after)
    model.eval()
    x = torch.stack(images)
    with torch.no_grad():
        out = model(x)["out"]
        # The head's logits are at 1/4 of the input; the output is their bilinear upsampling.
        normalised = (x - model.image_mean) / model.image_std
        quarter = model.head(list(model.backbone(normalised).values()))
    assert quarter.shape[-2:] == (SIZE // 4, SIZE // 4)
    torch.testing.assert_close(out, F.interpolate(quarter, size=(SIZE, SIZE), mode="bilinear",
                                                  align_corners=False), atol=1e-6, rtol=0)
    assert out.shape == (2, 4, SIZE, SIZE)


def test_builder_arguments():
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        fasterrcnn(1)
    with pytest.raises(ValueError, match="anchor_sizes needs one base size per pyramid level"):
        fasterrcnn(3, anchor_sizes=(16, 32))
    with pytest.raises(ValueError, match="mask_layers"):
        maskrcnn(3, mask_layers=())
    with pytest.raises(TypeError, match="unexpected arguments"):
        semantic_fpn(3, min_size=100)
    model = retinanet(3, trainable_layers=2, model_kwargs={"drop_path_rate": 0.1})
    assert model.backbone.body.norm_names == ["norm2", "norm4", "norm6"]
    assert model.backbone.body.trainable_layers == 2
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333  # torchvision's defaults
    assert model.head.classification_head.num_classes == 3


# ------------------------------------------------------------------------------------------ schedule
def test_learning_rate_schedules():
    common = dict(base_lr=1e-4, total_steps=1200, steps_per_epoch=100)
    step = dict(common, schedule="step", lr_steps=(8, 11), warmup_steps=500, warmup_ratio=0.001)
    assert learning_rate(0, **step) == pytest.approx(1e-7)  # warm-up starts at ratio x lr
    assert learning_rate(250, **step) == pytest.approx(1e-4 * (1 - 0.5 * 0.999))
    assert learning_rate(500, **step) == pytest.approx(1e-4)
    assert learning_rate(799, **step) == pytest.approx(1e-4)
    assert learning_rate(800, **step) == pytest.approx(1e-5)  # epoch 8
    assert learning_rate(1100, **step) == pytest.approx(1e-6)  # epoch 11
    poly = dict(common, schedule="poly", power=0.9, min_lr=1e-6)
    assert learning_rate(0, **poly) == pytest.approx(1e-4)
    assert learning_rate(600, **poly) == pytest.approx((1e-4 - 1e-6) * 0.5 ** 0.9 + 1e-6)
    assert learning_rate(1200, **poly) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(0, **dict(common, schedule="cosine"))


# ------------------------------------------------------------------------------------------- metrics
def test_coco_map_of_perfect_and_of_shifted_detections():
    ds = SyntheticShapes(6, SIZE, seed=5, task="instance")
    coco = ds.coco()
    perfect, shifted = [], []
    for i in range(len(ds)):
        target = ds.target(i)
        n = len(target["labels"])
        output = {"boxes": target["boxes"], "scores": torch.linspace(0.9, 0.5, n), "labels": target["labels"],
                  "masks": target["masks"][:, None].float()}
        perfect += detections_to_coco(output, i, with_masks=True)
        moved = dict(output, boxes=target["boxes"] + torch.tensor([2 * SIZE, 0, 2 * SIZE, 0]))
        shifted += detections_to_coco(moved, i)
    stats = coco_map(coco, perfect, ("bbox", "segm"))
    assert stats["box_AP"] == pytest.approx(100.0) and stats["mask_AP"] == pytest.approx(100.0)
    assert coco_map(coco, shifted)["box_AP"] == 0.0  # no overlap with any object
    assert coco_map(coco, [])["box_AP50"] == 0.0
    entry = perfect[0]
    box = ds.target(0)["boxes"][0].tolist()
    assert entry["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]])
    mapped = detections_to_coco({"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                 "labels": torch.tensor([2])}, 7, category_ids=[3, 9])
    assert mapped[0]["category_id"] == 9 and mapped[0]["image_id"] == 7


def test_confusion_matrix_miou_by_hand():
    matrix = ConfusionMatrix(3)
    label = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    matrix.update(prediction, label)
    out = matrix.compute()
    # class 0: tp 1, fn 1, fp 1 -> 1/3; class 1: tp 3, fp 1 -> 3/4; class 2: tp 1, fn 1 -> 1/2
    assert out["IoU"] == pytest.approx([100 / 3, 75.0, 50.0])
    assert out["mIoU"] == pytest.approx((100 / 3 + 75 + 50) / 3)
    assert out["aAcc"] == pytest.approx(500 / 7)
    assert out["mAcc"] == pytest.approx((50 + 100 + 50) / 3)
    absent = ConfusionMatrix(4)
    absent.update(prediction, label)  # class 3 neither labelled nor predicted: not in the mean
    assert absent.compute()["mIoU"] == pytest.approx(out["mIoU"])


# ---------------------------------------------------------------------------------------------- data
def test_synthetic_set_is_deterministic_and_consistent():
    a = SyntheticShapes(8, SIZE, seed=11, task="instance")
    b = SyntheticShapes(8, SIZE, seed=11, task="instance")
    val = SyntheticShapes(8, SIZE, seed=11, split="val", task="instance")
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert not any(np.array_equal(x, y) for x, y in zip(a.images, val.images))
    assert np.array_equal(SyntheticShapes(3, SIZE, seed=11).images[2], a.images[2])  # index-wise draws
    semantic = SyntheticShapes(8, SIZE, seed=11, task="semantic")
    for i in range(len(a)):
        image, target = a[i]
        masks = target["masks"].bool()
        assert image.shape == (3, SIZE, SIZE) and 0 <= float(image.min()) and float(image.max()) <= 1
        assert int(masks.sum(0).max()) <= 1  # visible parts do not overlap
        for mask, box in zip(masks, target["boxes"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        label = semantic[i][1]
        expected = torch.zeros(SIZE, SIZE, dtype=torch.int64)
        for mask, cls in zip(masks, target["labels"]):
            expected[mask] = cls
        assert torch.equal(label, expected)
    assert {int(c) for i in range(len(a)) for c in a.labels[i]} <= {1, 2, 3}


def test_flip_moves_boxes_with_the_masks():
    ds = SyntheticShapes(2, SIZE, seed=1, task="instance")
    image, target = ds[0]
    flip = DetectionTrainTransform(hflip=1.0)
    flipped_image, flipped = flip(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    for mask, box in zip(flipped["masks"].bool(), flipped["boxes"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_segmentation_transform_crops_pads_and_keeps_the_eval_label():
    torch.manual_seed(0)
    image = torch.rand(3, 40, 60)
    label = torch.randint(0, 5, (40, 60))
    train = SegmentationTransform((120, 80), True, crop_size=64, ratio_range=(0.5, 0.5), hflip=0.0)
    out_image, out_label = train(image, label)
    # fit into (120, 80): scale 2, times 0.5 -> 40 x 60, cropped to 40 x 60 and padded to 64 x 64
    assert out_image.shape == (3, 64, 64) and out_label.shape == (64, 64)
    assert torch.equal(out_image[:, :40, :60], image) and torch.equal(out_label[:40, :60], label)
    assert bool((out_label[40:] == IGNORE_INDEX).all() and (out_label[:, 60:] == IGNORE_INDEX).all())
    evaluation = SegmentationTransform((120, 80), False)
    resized, kept = evaluation(image, label)
    assert resized.shape == (3, 80, 120) and torch.equal(kept, label)  # scored at the label's own size


def test_folder_segmentation_reduces_the_zero_label(tmp_path):
    for split in ("training",):
        os.makedirs(tmp_path / "images" / split)
        os.makedirs(tmp_path / "annotations" / split)
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(tmp_path / "images" / "training" / "a.jpg")
    raw = np.array([[0, 1, 2, 3, 150, 0]] * 4, dtype=np.uint8)
    Image.fromarray(raw).save(tmp_path / "annotations" / "training" / "a.png")
    ds = FolderSegmentation(str(tmp_path), "training", num_classes=150)
    _, label = ds[0]
    assert label[0].tolist() == [IGNORE_INDEX, 0, 1, 2, 149, IGNORE_INDEX]
    assert FolderSegmentation(str(tmp_path), "training", num_classes=151,
                              reduce_zero_label=False)[0][1][0].tolist() == raw[0].tolist()
    with pytest.raises(DataError, match="holds class 149 but there are 100 classes"):
        FolderSegmentation(str(tmp_path), "training", num_classes=100)[0]
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(tmp_path / "images" / "training" / "b.jpg")
    with pytest.raises(DataError, match="have no label PNG"):
        FolderSegmentation(str(tmp_path), "training", num_classes=150)
    with pytest.raises(DataError, match="has no folder"):
        FolderSegmentation(str(tmp_path), "validation", num_classes=150)


def _write_coco(root, split):
    os.makedirs(root / split)
    os.makedirs(root / "annotations", exist_ok=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.full((20, 30, 3), 128, dtype=np.uint8)).save(root / split / name)
    doc = {
        "images": [{"id": 5, "file_name": "a.png", "height": 20, "width": 30},
                   {"id": 8, "file_name": "b.png", "height": 20, "width": 30},
                   {"id": 9, "file_name": "c.png", "height": 20, "width": 30}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 3, 10, 6], "area": 60, "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]]},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1,
             "segmentation": {"counts": [0, 20 * 30], "size": [20, 30]}},
            {"id": 3, "image_id": 8, "category_id": 3, "bbox": [20, 10, 10, 8], "area": 80, "iscrowd": 0,
             "segmentation": [[20, 10, 30, 10, 30, 18, 20, 18]]},
        ],
    }
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(doc, f)


def test_coco_instances_targets_and_evaluation_round_trip(tmp_path):
    _write_coco(tmp_path, "train2017")
    train = CocoInstances(str(tmp_path), "train2017", with_masks=True, train=True)
    assert len(train) == 2  # image 9 has no annotation: dropped for training
    assert train.category_ids == [3, 7] and train.num_classes == 3
    _, target = train[0]
    assert target["image_id"] == 5
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 9.0]]  # the crowd region is dropped
    assert target["labels"].tolist() == [2]  # category 7 is the second id
    assert target["masks"].shape == (1, 20, 30) and int(target["masks"].sum()) > 40
    _, target = train[1]
    assert target["boxes"].tolist() == [[20.0, 10.0, 30.0, 18.0]] and target["labels"].tolist() == [1]
    val = CocoInstances(str(tmp_path), "train2017", with_masks=True, train=False, category_ids=train.category_ids)
    assert len(val) == 3
    results = []
    for i in range(len(val)):
        _, t = val[i]
        out = {"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"],
               "masks": t["masks"][:, None].float()}
        results += detections_to_coco(out, t["image_id"], val.category_ids, with_masks=True)
    stats = coco_map(val.coco, results, ("bbox",))
    assert results[0]["category_id"] == 7 and stats["box_AP"] == pytest.approx(100.0)
    with pytest.raises(DataError, match="no annotation file for split 'val2017'"):
        CocoInstances(str(tmp_path), "val2017", with_masks=False, train=False)
