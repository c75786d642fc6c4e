"""Tests for spanet.checkpoint: atomic saves, safe loads, RNG round trips, weight loading."""
import os
import random

import numpy as np
import pytest
import timm
import torch

from spanet import checkpoint as ck


def _tiny_model(num_classes=10):
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=num_classes)


def test_atomic_save_roundtrip_and_weights_only(tmp_path):
    path = str(tmp_path / "a.pth")
    state = {"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "w": torch.arange(5.0),
             "nested": {"list": [1, 2.5, "x", None], "tuple": (True, 3)}}
    ck.save_checkpoint(state, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["nested"] == state["nested"]
    assert ck.load_training_checkpoint(path)["nested"]["tuple"] == (True, 3)
    assert os.listdir(tmp_path) == ["a.pth"]  # no temp file left behind


def test_failed_save_keeps_the_good_checkpoint(tmp_path):
    path = str(tmp_path / "last.pth")
    ck.save_checkpoint({"w": torch.ones(3)}, path)
    before = open(path, "rb").read()
    with pytest.raises(TypeError, match=r"state\['bad'\]\[1\] is a torch.torch_version.TorchVersion"):
        ck.save_checkpoint({"w": torch.zeros(3), "bad": [1, torch.__version__]}, path)
    with pytest.raises(Exception):
        # Passes the type check (a plain list) but fails inside torch.save: the good file must survive.
        ck._atomic_write(path, lambda f: (f.write(b"partial"), torch.save(lambda: 0, f)))
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.pth"]


def test_copy_checkpoint(tmp_path):
    ck.save_checkpoint({"w": torch.ones(3)}, str(tmp_path / "last.pth"))
    ck.copy_checkpoint(str(tmp_path / "last.pth"), str(tmp_path / "best.pth"))
    assert open(tmp_path / "best.pth", "rb").read() == open(tmp_path / "last.pth", "rb").read()


def test_corrupt_truncated_and_foreign_checkpoints_give_clear_errors(tmp_path):
    good = str(tmp_path / "good.pth")
    ck.save_checkpoint({"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(good, "rb").read()[:40])
    with pytest.raises(ck.CheckpointError, match="cannot read checkpoint .*truncated.pth"):
        ck.load_checkpoint(str(truncated))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ck.CheckpointError, match="cannot read checkpoint"):
        ck.load_checkpoint(str(garbage))
    foreign = str(tmp_path / "foreign.pth")
    torch.save({"obj": random.Random(0)}, foreign)  # an arbitrary pickled object: refused by weights_only
    with pytest.raises(ck.CheckpointError, match="cannot read checkpoint .*Unsupported global"):
        ck.load_checkpoint(foreign)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(str(tmp_path / "missing.pth"))
    plain = str(tmp_path / "plain.pth")
    torch.save({"w": torch.ones(1)}, plain)
    with pytest.raises(ck.CheckpointError, match="not a spanet-train checkpoint"):
        ck.load_training_checkpoint(plain)
    old = str(tmp_path / "old.pth")
    torch.save({"format": ck.FORMAT, "format_version": 999}, old)
    with pytest.raises(ck.CheckpointError, match="format version 999"):
        ck.load_training_checkpoint(old)


def test_rng_state_roundtrip_through_a_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = ck.capture_rng_state()
    path = str(tmp_path / "rng.pth")
    ck.save_checkpoint({"rng": state}, path)
    expected = (torch.rand(4), np.random.randn(4), [random.random() for _ in range(3)], random.gauss(0, 1))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ck.restore_rng_state(ck.load_checkpoint(path)["rng"])
    got = (torch.rand(4), np.random.randn(4), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_load_model_weights_plain_wrapped_and_prefixed(tmp_path):
    src = _tiny_model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    sd = src.state_dict()
    for name, obj in (("plain", sd), ("wrapped", {"state_dict": sd}),
                      ("ddp", {"model": {"module." + k: v for k, v in sd.items()}})):
        path = str(tmp_path / f"{name}.pth")
        torch.save(obj, path)
        dst = _tiny_model()
        ck.load_model_weights(dst, path)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)


def test_load_model_weights_mismatch_and_head_drop(tmp_path):
    src = _tiny_model(num_classes=7)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)  # differ from the freshly seeded destination
    path = str(tmp_path / "w.pth")
    torch.save(src.state_dict(), path)
    dst = _tiny_model(num_classes=10)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ck.CheckpointError, match="shape mismatches"):
        ck.load_model_weights(dst, path)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # untouched on failure
    info = ck.load_model_weights(dst, path, drop_mismatched_head=True)
    assert sorted(info["dropped"]) == ["fc.bias", "fc.weight"]
    assert torch.equal(dst.state_dict()["fc.weight"], before["fc.weight"])
    assert torch.equal(dst.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    other = str(tmp_path / "other.pth")
    torch.save({"unrelated.weight": torch.ones(2)}, other)
    with pytest.raises(ck.CheckpointError, match="missing keys"):
        ck.load_model_weights(dst, other)
    with pytest.raises(ck.CheckpointError, match="no EMA weights"):
        ck.load_model_weights(dst, path, use_ema=True)


def test_state_dict_sha256():
    a = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.ones(2, dtype=torch.bfloat16)}
    b = {k: v.clone() for k, v in a.items()}
    assert ck.state_dict_sha256(a) == ck.state_dict_sha256(b)
    b["x"][1, 2] = torch.nextafter(b["x"][1, 2], torch.tensor(10.0))
    assert ck.state_dict_sha256(a) != ck.state_dict_sha256(b)
