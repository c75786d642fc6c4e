"""Checkpoints for spanet training: atomic saves, safe loads, RNG state, weight loading.

* **Atomic.** :func:`save_checkpoint` writes to a temporary file in the target
  directory, flushes and fsyncs it, then ``os.replace``-s it over the target
  (and fsyncs the directory). A crash at any moment leaves either the old or
  the new file, never a torn one; a good checkpoint is never overwritten by a
  failed save.
* **Safe.** Everything stored is a tensor or a primitive container (dict, list,
  tuple, str, int, float, bool, None), so every checkpoint loads with
  ``torch.load(weights_only=True)``. :func:`load_checkpoint` turns any read
  failure (truncated file, not a torch file, foreign pickle) into a
  :class:`CheckpointError` naming the file and the reason.
* **Complete.** A training checkpoint (:data:`FORMAT`) holds the model, EMA,
  optimizer, scheduler, grad scaler, epoch, step and every process's RNG
  state (torch, CUDA, numpy, python ``random``); together with the sampler seed
  and epoch that fixes the data order, a resumed run replays an uninterrupted
  one exactly.
* **Published weights.** :func:`load_model_weights` also takes a plain state
  dict (e.g. the official SPANet release files) and passes it through the
  model's ``checkpoint_filter_fn``, as timm's pretrained loading does.
"""
from __future__ import annotations

import collections
import hashlib
import os
import random
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Mapping

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "copy_checkpoint",
    "load_checkpoint",
    "load_training_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "load_model_weights",
    "state_dict_sha256",
]

#: Value of the ``"format"`` key of every training checkpoint written by spanet-train.
FORMAT = "spanet-train-checkpoint"
#: Bumped when the layout of a training checkpoint changes incompatibly.
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, is not of the expected kind, or does not fit the model."""


def _fsync_dir(path: str) -> None:
    # Make the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write_fn) -> None:
    """Write ``path`` through ``write_fn(binary_file)`` into a temporary file, fsynced, then renamed over it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


_PRIMITIVES = (str, int, float, bool, type(None))
_CONTAINERS = (dict, collections.OrderedDict, list, tuple)  # what torch.load(weights_only=True) rebuilds


def _check_loadable(obj: Any, where: str) -> None:
    # Exact type checks: str/int subclasses (e.g. torch.__version__, a TorchVersion) are pickled by class
    # and would make the file unloadable with weights_only=True.
    if type(obj) in _PRIMITIVES or isinstance(obj, torch.Tensor):
        return
    if type(obj) in _CONTAINERS:
        is_map = isinstance(obj, dict)
        for key, value in (obj.items() if is_map else enumerate(obj)):
            if is_map and type(key) not in _PRIMITIVES:
                raise TypeError(f"checkpoint key {where}[{key!r}] is a {type(key).__name__}, not a plain value")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {type(obj).__module__}.{type(obj).__qualname__}; only tensors and "
        "plain containers load with weights_only=True"
    )


def save_checkpoint(state: Mapping[str, Any], path: str) -> None:
    """Atomically write ``state`` to ``path``.

    Raises ``TypeError`` (before touching ``path``) if ``state`` holds anything
    but tensors and plain containers of str/int/float/bool/None.
    """
    state = dict(state)
    _check_loadable(state, "state")
    atomic_write(path, lambda f: torch.save(state, f))


def copy_checkpoint(src: str, dst: str) -> None:
    """Atomically copy the checkpoint file ``src`` to ``dst`` (used for ``best.pth``)."""

    def _copy(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)

    atomic_write(dst, _copy)


def load_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with failures reported as :class:`CheckpointError`.

    ``mmap=True`` maps tensor storage instead of reading it (cheap peeks at metadata).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        # For weights_only refusals the useful line is the unpickler's, not the generic preamble.
        detail = [ln for ln in lines if ln.startswith("WeightsUnpickler error")]
        reason = (detail or lines or [type(e).__name__])[0]
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: {reason} (the file is corrupt, truncated, or holds "
            "objects other than tensors and plain containers)"
        ) from e


def load_training_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """Load a spanet-train checkpoint and check its format and version."""
    ckpt = load_checkpoint(path, map_location, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path!r} is not a spanet-train checkpoint (no format={FORMAT!r} key); "
            "to start from plain model weights use --initial-checkpoint instead of --resume"
        )
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {version}, this spanet reads version {FORMAT_VERSION}"
        )
    return ckpt


# ----------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> Dict[str, Any]:
    """This process's RNG states (torch CPU, all CUDA devices, numpy global, python ``random``) as tensors."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_state[0]),
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "internal": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npd = state["numpy"]
    np.random.set_state(
        (npd["bit_generator"], npd["key"].numpy().astype(np.uint32), npd["pos"], npd["has_gauss"],
         npd["cached_gaussian"])
    )
    pyd = state["python"]
    random.setstate((pyd["version"], tuple(int(v) for v in pyd["internal"].tolist()), pyd["gauss_next"]))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# ----------------------------------------------------------------------------------- model weights
def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict (exact equality check)."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _extract_state_dict(obj: Any, use_ema: bool, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == FORMAT:
        if use_ema:
            if obj.get("model_ema") is None:
                raise CheckpointError(f"checkpoint {path!r} has no EMA weights (trained without --model-ema)")
            return obj["model_ema"]
        return obj["model"]
    # Common wrappers of plain checkpoints (timm, DeiT/MetaFormer scripts).
    if use_ema:
        for key in ("state_dict_ema", "model_ema"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        raise CheckpointError(f"checkpoint {path!r} has no EMA weights (no state_dict_ema/model_ema entry)")
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # DDP ('module.') and torch.compile ('_orig_mod.') wrappers leave prefixes on every key.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _filter_fn(model: torch.nn.Module):
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_model_weights(
    model: torch.nn.Module,
    path: str,
    *,
    use_ema: bool = False,
    drop_mismatched_head: bool = False,
) -> Dict[str, Any]:
    """Load model weights from a spanet-train checkpoint or a plain (e.g. published) state dict.

    Plain state dicts go through the model module's ``checkpoint_filter_fn``
    (as timm does for pretrained weights), which e.g. maps the official SPANet
    layout onto the spanet modules. With ``drop_mismatched_head`` the classifier
    weights are skipped when their shape differs (fine-tuning to a new number
    of classes). Returns ``{"dropped": [names of the skipped head tensors]}``.
    Raises :class:`CheckpointError` if the weights do not fit the model.
    """
    obj = load_checkpoint(path)
    sd = _strip_prefixes(dict(_extract_state_dict(obj, use_ema, path)))
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path!r} is not a state dict: {bad[:3]} are not tensors")
    filter_fn = _filter_fn(model)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path!r} does not fit {type(model).__name__} ({type(e).__name__}: {e})"
            ) from e
    dropped: List[str] = []
    if drop_mismatched_head:
        own = model.state_dict()
        classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ""
        heads = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
        for k in list(sd):
            is_head = any(h and (k == h or k.startswith(h + ".")) for h in heads)
            if is_head and k in own and own[k].shape != sd[k].shape:
                dropped.append(k)
                del sd[k]
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items() if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the model ({len(mismatched)} shape mismatches, e.g. "
            f"{mismatched[0]}); check --model and --num-classes"
        )
    # Check before loading so that a bad checkpoint leaves the model untouched.
    missing = [k for k in own if k not in sd and k not in dropped]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}; check --model"
        )
    model.load_state_dict(sd, strict=False)
    return {"dropped": dropped}
