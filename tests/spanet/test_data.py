"""Tests for spanet.data: the embedded digits split, the digits images, ImageFolder reading and errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from spanet import data as data_lib


def test_digits_split_is_deterministic_stratified_and_complete():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    train = data_lib.digits_split_indices("train")
    val = data_lib.digits_split_indices("val")
    # Known sizes: within each class every fifth image (positions 4, 9, ...) is a val image.
    assert (len(train), len(val)) == (1442, 355)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1797))
    for c in range(10):
        members = np.flatnonzero(targets == c)
        assert np.array_equal(np.intersect1d(val, members), members[4::5])
    assert np.array_equal(val, data_lib.digits_split_indices("val"))


def test_digits_images_are_the_sklearn_pixels():
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = data_lib.digits_split_indices("val")
    ds = data_lib.DigitsDataset("val", image_size=8)  # no resampling at the native size
    img, target = ds[3]
    expected = np.round(digits.images[idx[3]] * 255.0 / 16.0).astype(np.uint8)
    arr = np.asarray(img)
    assert arr.shape == (8, 8, 3) and target == digits.target[idx[3]]
    for ch in range(3):
        assert np.array_equal(arr[..., ch], expected)


def test_digits_upscaled_size_and_transform():
    ds = data_lib.DigitsDataset("train", image_size=32)
    img, _ = ds[0]
    assert img.size == (32, 32) and len(ds) == 1442
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 1.0, "crop_mode": "center"}
    ds.transform = data_lib.build_transform(cfg, is_training=False)
    x, _ = ds[0]
    # Eval transform at crop_pct 1.0 is resize-to-same + normalise: exactly (pixel/255 - 0.5) / 0.5.
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_digits_bad_arguments():
    with pytest.raises(data_lib.DataError, match="image_size"):
        data_lib.DigitsDataset("train", image_size=4)
    with pytest.raises(data_lib.DataError, match="split"):
        data_lib.digits_split_indices("test")


def _make_tree(root, splits=("train", "val"), classes=("cat", "dog"), per_class=3):
    for split in splits:
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((12, 12, 3), 40 * ci + i, np.uint8)).save(d / f"{i}.png")


def test_imagefolder_layout(tmp_path):
    _make_tree(tmp_path)
    train = data_lib.create_split_dataset(str(tmp_path), "train", is_training=True)
    val = data_lib.create_split_dataset(str(tmp_path), "val", is_training=False,
                                        class_map=data_lib.dataset_class_to_idx(train))
    assert len(train) == 6 and len(val) == 6
    assert data_lib.dataset_num_classes(train) == 2
    assert data_lib.dataset_class_to_idx(val) == {"cat": 0, "dog": 1}
    img, target = val[4]  # dog/1.png
    assert target == 1 and np.asarray(img)[0, 0, 0] == 41


def test_val_classes_must_exist_in_train(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "val" / "bird").mkdir()
    train = data_lib.create_split_dataset(str(tmp_path), "train", is_training=True)
    with pytest.raises(data_lib.DataError, match=r"1 class folders missing from the train split, e.g. \['bird'\]"):
        data_lib.check_val_classes(str(tmp_path), "val", data_lib.dataset_class_to_idx(train))
    (tmp_path / "val" / "bird").rmdir()
    data_lib.check_val_classes(str(tmp_path), "val", data_lib.dataset_class_to_idx(train))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(data_lib.DataError, match="does not exist"):
        data_lib.create_split_dataset(str(tmp_path / "nope"), "train", is_training=True)
    _make_tree(tmp_path, splits=("train",))
    with pytest.raises(data_lib.DataError, match="no 'val' split folder"):
        data_lib.create_split_dataset(str(tmp_path), "val", is_training=False)


def test_loaders_order_depends_only_on_seed_and_epoch():
    ds = torch.utils.data.TensorDataset(torch.arange(40))

    def order(epoch):
        loader, sampler = data_lib.build_train_loader(ds, batch_size=8, num_workers=0, seed=3)
        sampler.set_epoch(epoch)
        return torch.cat([b[0] for b in loader]).tolist()

    assert order(1) == order(1) and order(1) != order(2)
    assert sorted(order(1)) == list(range(40))
    # Two ranks: disjoint shards; eval shards are strided and cover every item once.
    shards = []
    for rank in range(2):
        loader, sampler = data_lib.build_train_loader(ds, batch_size=4, num_workers=0, seed=3, rank=rank,
                                                      world_size=2)
        sampler.set_epoch(0)
        shards.append(torch.cat([b[0] for b in loader]).tolist())
    assert not set(shards[0]) & set(shards[1])
    evals = [torch.cat([b[0] for b in data_lib.build_eval_loader(ds, batch_size=7, num_workers=0, rank=r,
                                                                 world_size=3)]).tolist() for r in range(3)]
    assert sorted(sum(evals, [])) == list(range(40)) and evals[1][:2] == [1, 4]
    assert data_lib.subset_indices(10, 4) == [0, 2, 5, 7] and data_lib.subset_indices(3, None) == [0, 1, 2]
    with pytest.raises(data_lib.DataError, match="fewer than one global batch"):
        data_lib.build_train_loader(ds, batch_size=32, num_workers=0, seed=0, world_size=2)
