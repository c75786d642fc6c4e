"""Tests for spanet.checkpoint: atomic saves, safe loads, integrity checks, RNG round trips, weight loading."""
import os
import random
import stat
import struct
import zipfile

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
        ck.atomic_write(path, lambda f: (f.write(b"partial"), torch.save(lambda: 0, f)))
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
    # What is wrong is said in words, not as a bare error number of the zip reader.
    with pytest.raises(ck.CheckpointError, match=r"truncated.pth' is not a PyTorch checkpoint: it has no zip "
                                                 r"directory at its end.*\(truncated, or another kind of file\)"):
        ck.load_checkpoint(str(truncated))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00garbage")
    with pytest.raises(ck.CheckpointError, match="garbage.pth' is not a PyTorch checkpoint"):
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


def _record_data_offset(path, record_suffix):
    """Byte offset of the data of the zip record whose name ends with ``record_suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_a_damaged_weight_record_is_refused_before_loading(tmp_path):
    """4 KiB of 0xFF written into a weight tensor: torch.load alone returns the altered weights."""
    path = str(tmp_path / "last.pth")
    weights = torch.randn(64, 64)  # 16 KiB of float32: one zip record
    ck.save_checkpoint({"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "model": {"w": weights}}, path)
    offset, size = _record_data_offset(path, "data/0")
    assert size == weights.numel() * 4
    with open(path, "r+b") as f:
        f.seek(offset + 1024)
        f.write(b"\xff" * 4096)
    assert torch.isnan(torch.load(path, weights_only=True)["model"]["w"]).any()  # the damage torch.load misses
    with pytest.raises(ck.CheckpointError, match=r"last.pth' is damaged: record '.*data/0' fails its CRC-32 check"):
        ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="is damaged"):
        ck.load_training_checkpoint(path)


def test_non_finite_weights_are_refused(tmp_path):
    model = _tiny_model()
    sd = model.state_dict()
    sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"].clone()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = str(tmp_path / "nan.pth")
    torch.save(sd, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ck.CheckpointError, match=r"nan.pth' holds non-finite weights: 'layer1.0.conv1.weight'"):
        ck.load_model_weights(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    nested = {"a": torch.ones(2), "b": {"c": [torch.zeros(1), torch.tensor([float("inf")])]}}
    assert ck.first_nonfinite(nested) == "b.c.1"
    assert ck.first_nonfinite({"a": torch.ones(2), "n": torch.arange(3)}) is None
    with pytest.raises(ck.CheckpointError, match="non-finite optimizer state: '3.exp_avg'"):
        ck.check_finite({3: {"exp_avg": torch.tensor([float("-inf")])}}, "x.pth", "optimizer state")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        ck.save_checkpoint({"w": torch.ones(1)}, str(tmp_path / "last.pth"))
        ck.copy_checkpoint(str(tmp_path / "last.pth"), str(tmp_path / "best.pth"))
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(old)
    for name in ("last.pth", "best.pth", "plain.txt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name


def test_stale_temporaries_are_removed(tmp_path):
    ck.save_checkpoint({"w": torch.ones(1)}, str(tmp_path / "last.pth"))
    # What a SIGKILL during atomic_write leaves: the temp name atomic_write uses.
    (tmp_path / ".last.pth.0123456789abcdef.tmp").write_bytes(b"partial")
    (tmp_path / ".metrics.csv.fedcba9876543210.tmp").write_bytes(b"partial")
    (tmp_path / ".notes.tmp").write_bytes(b"the user's")  # not ours: kept
    (tmp_path / "x.0123456789abcdef.tmp").write_bytes(b"the user's")
    # The name atomic_write really uses, seen during a write, is one the clean-up recognises.
    during = []
    ck.atomic_write(str(tmp_path / "summary.json"), lambda f: during.extend(os.listdir(tmp_path)))
    temp = [n for n in during if n.startswith(".summary.json.")]
    assert len(temp) == 1 and ck._TEMP_NAME.match(temp[0])
    removed = ck.remove_stale_temporaries(str(tmp_path))
    assert removed == [".last.pth.0123456789abcdef.tmp", ".metrics.csv.fedcba9876543210.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".notes.tmp", "last.pth", "summary.json", "x.0123456789abcdef.tmp"]


def test_extract_state_dict_is_the_one_unwrapping_policy(tmp_path):
    """Model weights unless the EMA is asked for; no silent fallback; DDP/compile prefixes removed."""
    model, ema = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    own = {"format": ck.FORMAT, "model": model, "model_ema": ema}
    assert torch.equal(ck.extract_state_dict(own, "a.pth")["w"], model["w"])
    assert torch.equal(ck.extract_state_dict(own, "a.pth", use_ema=True)["w"], ema["w"])
    timm_style = {"state_dict": {"module.w": torch.ones(2)}, "state_dict_ema": {"_orig_mod.module.w": torch.zeros(2)}}
    assert list(ck.extract_state_dict(timm_style, "b.pth")) == ["w"]
    assert torch.equal(ck.extract_state_dict(timm_style, "b.pth", use_ema=True)["w"], torch.zeros(2))
    with pytest.raises(ck.CheckpointError, match="has no EMA weights"):
        ck.extract_state_dict({"model": model}, "c.pth", use_ema=True)
    with pytest.raises(ck.CheckpointError, match=r"is not a state dict: \['n'\] are not tensors"):
        ck.extract_state_dict({"n": 3}, "d.pth")


def test_safetensors_weights_roundtrip_and_load(tmp_path):
    src = _tiny_model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    src = src.to(memory_format=torch.channels_last)  # non-contiguous parameters are written contiguous
    path = str(tmp_path / "model.safetensors")
    ck.save_safetensors(src.state_dict(), path, {"format": ck.WEIGHTS_FORMAT, "epoch": "3"})
    weights, meta = ck.read_safetensors(path)
    assert meta == {"format": ck.WEIGHTS_FORMAT, "epoch": "3"}
    dst = _tiny_model()
    ck.load_model_weights(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v) and torch.equal(weights[k], v), k
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ck.CheckpointError, match="bad.safetensors' is not a readable safetensors file"):
        ck.load_model_weights(dst, str(tmp_path / "bad.safetensors"))
