"""SPANet weights through timm's Hugging Face hub format: ``save_for_hf`` / ``push_to_hf_hub`` and
``timm.create_model("local-dir:PATH" | "hf-hub:ID", pretrained=True)``. No network is used.

A hub folder is ``model.safetensors`` (the plain state dict, in the published layout) plus
``config.json`` (architecture, model arguments, ``pretrained_cfg`` with the preprocessing).
Loading one rebuilds the same module with the same tensors, so the logits are compared with
``torch.equal``: the same code runs on the same weights and input in one process.

``hf-hub:`` ids are tested through the hub's local cache with the hub client offline
(``huggingface_hub.constants.HF_HUB_OFFLINE``): timm's hf-hub path runs exactly as after a
download; the download itself cannot be tested without network. ``push_to_hf_hub`` is tested
up to the upload, with the hub client replaced by one that records the folder it is given.
"""
import json

import pytest
import torch

import spanet  # noqa: F401  (registers the models)
import timm
from spanet.models import SPANet
from tests.spanet.reference_model import randomize_
from timm.models import push_to_hf_hub, save_for_hf

#: A one-block-per-stage network with the published stage layout; non-default arguments
#: so that the test sees them recorded in config.json and used again.
TINY = dict(depths=(1, 1, 1, 1), dims=(24, 48, 96, 192), num_classes=7)
DIGITS_DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return randomize_(timm.create_model("spanet_small", **TINY), seed=1).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(2))


def _save(model, path, **kwargs):
    save_for_hf(model, str(path), safe_serialization=True, **kwargs)
    return path


def _logits(model, x):
    with torch.inference_mode():
        return model.eval()(x)


def test_save_for_hf_writes_safetensors_and_config(tiny_model, tmp_path):
    from safetensors.torch import load_file

    folder = _save(tiny_model, tmp_path / "hub", data_config=DIGITS_DATA_CONFIG)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(folder / "model.safetensors")
    expected = tiny_model.state_dict()
    assert tensors.keys() == expected.keys()  # the published layout, filter buffers included
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "spanet_small"
    assert config["num_classes"] == 7
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in config["model_args"].items()} == {
        **TINY, "in_chans": 3, "global_pool": "avg"}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == [0.5] * 3 and cfg["crop_pct"] == 1.0
    assert cfg["license"] == "mit" and cfg["paper_ids"] == "arXiv:2308.11568"


def test_local_dir_gives_identical_logits(tiny_model, image, tmp_path):
    folder = _save(tiny_model, tmp_path / "hub", data_config=DIGITS_DATA_CONFIG)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert isinstance(loaded, SPANet)
    assert torch.equal(_logits(loaded, image), _logits(tiny_model, image))
    # The preprocessing travels with the weights.
    data_config = timm.data.resolve_data_config(model=loaded)
    assert data_config["input_size"] == (3, 32, 32) and data_config["crop_pct"] == 1.0
    assert tuple(data_config["mean"]) == (0.5, 0.5, 0.5)


def test_local_dir_fine_tunes_with_a_new_head(tiny_model, tmp_path):
    folder = _save(tiny_model, tmp_path / "hub")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3)
    assert model.get_classifier().weight.shape == (3, TINY["dims"][-1])
    saved = tiny_model.state_dict()
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert body and all(torch.equal(v, saved[k]) for k, v in body.items())


def test_local_dir_features_only(tiny_model, image, tmp_path):
    folder = _save(tiny_model, tmp_path / "hub")
    feats = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True).eval()
    with torch.inference_mode():
        stages = tiny_model.forward_intermediates(image, intermediates_only=True)
        got = feats(image)
    assert [f.shape[1] for f in got] == list(TINY["dims"])
    assert all(torch.equal(a, b) for a, b in zip(got, stages))


def test_hf_hub_id_loads_from_the_hub_cache_offline(tiny_model, image, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--spanet-tiny"
    _save(tiny_model, repo / "snapshots" / revision, data_config=DIGITS_DATA_CONFIG)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    loaded = timm.create_model("hf-hub:someone/spanet-tiny", pretrained=True, cache_dir=tmp_path / "cache")
    assert loaded.pretrained_cfg["hf_hub_id"] == "someone/spanet-tiny"
    assert torch.equal(_logits(loaded, image), _logits(tiny_model, image))


def test_push_to_hf_hub_uploads_weights_config_and_card(tiny_model, tmp_path, monkeypatch):
    import timm.models._hub as hub

    uploaded = {}

    class RecordingApi:
        """Stands in for huggingface_hub.HfApi: records the folder instead of uploading it."""

        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def file_exists(self, **kwargs):
            return False

        def upload_folder(self, repo_id, folder_path, **kwargs):
            from pathlib import Path

            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()}, repo_id=repo_id)
            return "recorded"

    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    card = dict(license="mit", citation="@inproceedings{yun2023spanet, ...}")
    assert push_to_hf_hub(tiny_model, "someone/spanet-tiny", model_card=card, safe_serialization=True) == "recorded"
    assert uploaded.pop("repo_id") == "someone/spanet-tiny"
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    readme = uploaded["README.md"].decode()
    assert "license: mit" in readme and "library_name: timm" in readme and "yun2023spanet" in readme
    assert json.loads(uploaded["config.json"])["architecture"] == "spanet_small"
