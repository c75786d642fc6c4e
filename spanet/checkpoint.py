"""Checkpoints for spanet training: atomic saves, safe loads, RNG state, weight loading.

* **Atomic.** :func:`save_checkpoint` writes to a temporary file in the target
  directory, flushes and fsyncs it, then ``os.replace``-s it over the target
  (and fsyncs the directory). A crash at any moment leaves either the old or
  the new file, never a torn one; a good checkpoint is never overwritten by a
  failed save.
  Files follow the umask like any other file (a temporary from ``mkstemp``
  would be 0600), and the temporaries a kill leaves behind are removed by
  :func:`remove_stale_temporaries` when the run is resumed.
* **Safe.** Everything stored is a tensor or a primitive container (dict, list,
  tuple, str, int, float, bool, None), so every checkpoint loads with
  ``torch.load(weights_only=True)``. :func:`load_checkpoint` first checks the
  CRC-32 of every record of the zip archive ``torch.save`` writes (``torch.load``
  does not), then turns any read failure (truncated file, not a torch file,
  damaged record, foreign pickle) into a :class:`CheckpointError` naming the
  file and what is wrong with it. Weights holding NaN or infinity are refused
  (:func:`check_finite`).
* **Complete.** A training checkpoint (:data:`FORMAT`) holds the model, EMA,
  optimizer, scheduler, grad scaler, epoch, step and every process's RNG
  state (torch, CUDA, numpy, python ``random``); together with the sampler seed
  and epoch that fixes the data order, a resumed run replays an uninterrupted
  one exactly.
* **Published weights.** :func:`load_model_weights` also takes a plain state
  dict (e.g. the official SPANet release files) or a ``.safetensors`` file
  and passes it through the model's ``checkpoint_filter_fn``, as timm's
  pretrained loading does; :func:`extract_state_dict` is the one place that
  unwraps containers (model weights unless the EMA is asked for).
"""
from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import secrets
import shutil
import sys
import zipfile
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_FORMAT",
    "CheckpointError",
    "atomic_write",
    "plain_values",
    "remove_stale_temporaries",
    "save_checkpoint",
    "copy_checkpoint",
    "load_checkpoint",
    "load_training_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "extract_state_dict",
    "save_safetensors",
    "read_safetensors",
    "load_model_weights",
    "first_nonfinite",
    "check_finite",
    "state_dict_sha256",
]

#: Value of the ``"format"`` key of every training checkpoint written by spanet-train.
FORMAT = "spanet-train-checkpoint"
#: Bumped when the layout of a training checkpoint changes incompatibly.
FORMAT_VERSION = 1
#: ``format`` metadata of the ``model.safetensors`` weights spanet-train writes beside ``best.pth``.
WEIGHTS_FORMAT = "spanet-train-weights"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, is not of the expected kind, or does not fit the model."""


def plain_values(value: Any) -> Any:
    """``value`` with every leaf a str, int, float, bool or None (lists for tuples, str keys): what
    ``torch.load(weights_only=True)`` reads back. Anything else becomes its ``str``."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain_values(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_values(v) for k, v in value.items()}
    return str(value)


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


#: Temporary files of :func:`atomic_write`: ``.<target name>.<16 hex digits>.tmp`` beside the target.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{16}\.tmp$")


def atomic_write(path: str, write_fn) -> None:
    """Write ``path`` through ``write_fn(binary_file)`` into a temporary file, fsynced, then renamed over it.

    The temporary is created with mode 0666 less the umask, as ``open`` would
    create ``path`` itself (``tempfile.mkstemp`` would make every file 0600).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


def remove_stale_temporaries(directory: str) -> List[str]:
    """Delete the temporaries that :func:`atomic_write` calls killed mid-save left in ``directory``.

    Only call it while no other process writes into ``directory`` (spanet-train
    does when it resumes a run). Returns the names removed.
    """
    removed = []
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if _TEMP_NAME.match(name) and os.path.isfile(full):
            os.unlink(full)
            removed.append(name)
    return removed


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


def _damaged_record(path: str) -> Optional[str]:
    # torch.save writes a zip archive whose records carry CRC-32s that torch.load never checks.
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def load_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` after an integrity check; failures are :class:`CheckpointError`.

    The CRC-32 of every record of the zip archive is verified first, so a file
    damaged after it was written (a flipped block, a bad copy) is refused
    instead of loading altered weights. A file of the pre-1.6 (non-zip) format
    has no checksums and is read as is. ``mmap=True`` maps tensor storage
    instead of reading it (cheap peeks at metadata).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            bad = _damaged_record(path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path!r} is damaged: its zip archive cannot be read ({e})") from e
        if bad is not None:
            raise CheckpointError(
                f"checkpoint {path!r} is damaged: record {bad!r} fails its CRC-32 check (the file changed "
                "after it was written: a disk or copy error); use another copy"
            )
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and is_zip)
    except Exception as e:
        if not is_zip:
            raise CheckpointError(
                f"checkpoint {path!r} is not a PyTorch checkpoint: it has no zip directory at its end, as "
                "torch.save writes (truncated, or another kind of file), and does not read as the legacy "
                "format either"
            ) from e
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        # For weights_only refusals the useful line is the unpickler's, not the generic preamble.
        detail = [ln for ln in lines if ln.startswith("WeightsUnpickler error")]
        reason = (detail or lines or [type(e).__name__])[0]
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: {reason} (only tensors and plain containers are loaded, "
            "with torch.load(weights_only=True))"
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


def first_nonfinite(tensors: Mapping[str, Any]) -> Optional[str]:
    """Name of the first floating-point tensor of ``tensors`` (nested dicts/lists too) holding NaN or infinity."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                return str(name)
        elif isinstance(value, (dict, list, tuple)):
            inner = first_nonfinite(value if isinstance(value, dict) else dict(enumerate(value)))
            if inner is not None:
                return f"{name}.{inner}"
    return None


def check_finite(tensors: Mapping[str, Any], path: str, what: str = "weights") -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the tensor if any of ``tensors`` is NaN or infinite."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path!r} holds non-finite {what}: {bad!r} contains NaN or infinity (the run that "
            "wrote it had diverged); resume from an earlier checkpoint"
        )


def extract_state_dict(obj: Any, path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights a loaded checkpoint holds: the one place spanet-train and spanet-validate unwrap files.

    A spanet-train checkpoint gives ``model`` (``model_ema`` with ``use_ema``);
    other containers (timm's ``state_dict``/``state_dict_ema``, the DeiT and
    MetaFormer scripts' ``model``/``model_ema``) the same way, and a plain state
    dict itself. The model weights unless ``use_ema`` asks for the EMA: a file
    without EMA weights is then refused rather than silently read as the model's.
    (timm's own ``load_state_dict`` prefers the EMA whenever present, and falls
    back silently; spanet-validate's ``--use-ema`` follows timm's ``validate.py``.)
    DDP and ``torch.compile`` prefixes are removed with timm's ``clean_state_dict``.
    """
    from timm.models import clean_state_dict

    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == FORMAT:
        keys = ("model_ema",) if use_ema else ("model",)
    else:
        keys = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model")
    found = next((obj[k] for k in keys if isinstance(obj.get(k), dict)), None)
    if found is None and use_ema:
        raise CheckpointError(f"checkpoint {path!r} has no EMA weights (no {'/'.join(keys)} entry; trained without "
                              "--model-ema?)")
    sd = clean_state_dict(found if found is not None else obj)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path!r} is not a state dict: {bad[:3]} are not tensors")
    return sd


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str]) -> None:
    """Atomically write ``state_dict`` as a ``.safetensors`` file (contiguous CPU copies) with string ``metadata``."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = save(tensors, metadata=dict(metadata))
    atomic_write(path, lambda f: f.write(data))


def read_safetensors(path: str):
    """``(state_dict, metadata)`` of a ``.safetensors`` file; failures are :class:`CheckpointError`."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path!r} is not a readable safetensors file ({reason})") from e


def _filter_fn(model: torch.nn.Module):
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_model_weights(
    model: torch.nn.Module,
    path: str,
    *,
    use_ema: bool = False,
    drop_mismatched_head: bool = False,
    adapt_input_conv: bool = False,
) -> Dict[str, Any]:
    """Load model weights from a spanet-train checkpoint, a plain (e.g. published) state dict or a ``.safetensors``.

    Plain state dicts go through the model module's ``checkpoint_filter_fn``
    (as timm does for pretrained weights), which e.g. maps the official SPANet
    layout onto the spanet modules. With ``drop_mismatched_head`` the classifier
    weights are skipped when their shape differs (fine-tuning to a new number
    of classes); with ``adapt_input_conv`` the first conv (``pretrained_cfg``'s
    ``first_conv``) is adapted to the model's input channels with timm's
    ``adapt_input_conv``, as timm's pretrained loading does. Returns
    ``{"dropped": [names of the skipped head tensors], "adapted": [first conv names]}``.
    Raises :class:`CheckpointError` if the weights do not fit the model or are not finite.
    """
    if path.endswith(".safetensors"):
        sd = extract_state_dict(read_safetensors(path)[0], path)
    else:
        sd = extract_state_dict(load_checkpoint(path), path, use_ema)
    check_finite(sd, path)
    filter_fn = _filter_fn(model)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path!r} does not fit {type(model).__name__} ({type(e).__name__}: {e})"
            ) from e
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    adapted: List[str] = []
    if adapt_input_conv and cfg.get("first_conv"):
        from timm.models import adapt_input_conv as adapt

        for name in (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]:
            key = name + ".weight"
            if key in sd and key in own and sd[key].shape[1] != own[key].shape[1]:
                sd[key] = adapt(own[key].shape[1], sd[key])
                adapted.append(key)
    dropped: List[str] = []
    if drop_mismatched_head:
        classifier = cfg.get("classifier") or ""
        heads = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
        for k in list(sd):
            is_head = any(h and (k == h or k.startswith(h + ".")) for h in heads)
            if is_head and k in own and own[k].shape != sd[k].shape:
                dropped.append(k)
                del sd[k]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items() if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the model ({len(mismatched)} shape mismatches, e.g. "
            f"{mismatched[0]}); check --model, --num-classes and --in-chans"
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
    return {"dropped": dropped, "adapted": adapted}
