"""Weights files: state dicts read without running pickled code (``weights_only`` or safetensors), checked
entry by entry against the model they are loaded into, and hashed to identify a teacher in a cache."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kdcache.errors import MissingData, MissingDependency, WeightsMismatch
from kdcache.extras import require
from kdcache.locations import guard


def load_weights(model: nn.Module, path: str | os.PathLike, spec: str | None = None) -> None:
    """Load a weights file into ``model``: a state dict (``torch.save`` or ``.safetensors``), or a dict
    holding one under ``state_dict`` or ``model``; DDP (``module.``) and torch.compile (``_orig_mod.``)
    prefixes are stripped. Any missing, unexpected or mis-shaped entry is a one-line WeightsMismatch."""
    apply_state(model, read_state_dict(path), f"weights {path}", spec or type(model).__name__)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, read without running pickled code (``weights_only`` or
    safetensors); unreadable files are one-line WeightsMismatch errors that never suggest
    ``weights_only=False``."""
    guard(path, "weights file")
    if not Path(path).is_file():
        raise MissingData(f"weights file {path} not found — pass the path of a saved state dict")
    how = "save it with torch.save(model.state_dict(), path)"
    try:
        if str(path).endswith(".safetensors"):
            obj = require("safetensors.torch", "timm", f"weights file {path} (safetensors)").load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except MissingDependency:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsMismatch(f"cannot read weights file {path}: {_reason(e)} — {how}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatch(f"cannot read weights file {path}: it holds no state dict — {how}")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _reason(error: Exception) -> str:
    """The first line of a loading error, without torch's advice to unpickle untrusted code."""
    text = str(error).strip()
    if "Unsupported global" in text:
        return "it is not a plain state dict (it holds pickled code or objects, which kdcache never runs)"
    if ("weights_only" in text or isinstance(error, (EOFError, OSError)) or "PytorchStreamReader" in text
            or "zip archive" in text):
        return "the file is truncated or not a PyTorch/safetensors file"
    return text.splitlines()[0] if text else type(error).__name__


def apply_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, name: str) -> None:
    """Load ``state`` into ``model`` after checking every entry fits (one-line WeightsMismatch)."""
    problem = _first_mismatch(model.state_dict(), state)
    if problem:
        raise WeightsMismatch(f"{what} do not fit {name}: {problem}")
    model.load_state_dict(state, strict=False)


def _strip_prefixes(key: str) -> str:
    while key.startswith(("module.", "_orig_mod.")):
        key = key.partition(".")[2]
    return key


def _first_mismatch(expected: Mapping[str, torch.Tensor],
                    found: Mapping[str, torch.Tensor]) -> str | None:
    """Describe the first entry (in model order) that is missing or mis-shaped, else the first
    unexpected one; None when the file fits."""
    classifier = next(reversed(expected), "").rpartition(".")[0] + "."
    for key, tensor in expected.items():
        if key not in found:
            # BatchNorm's step counter only matters with momentum=None; old checkpoints lack it.
            if key.endswith("num_batches_tracked"):
                continue
            return f"{key} is missing from the file — was it saved from another model?"
        if found[key].shape != tensor.shape:
            hint = ("was it trained for another dataset?" if key.startswith(classifier)
                    else "was it saved from another model?")
            return (f"{key} has shape {tuple(found[key].shape)} in the file but "
                    f"{tuple(tensor.shape)} in the model — {hint}")
    extra = next((k for k in found if k not in expected), None)
    if extra is not None:
        return f"the file has {extra}, which the model lacks — was it saved from another model?"
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file, read in 1 MiB blocks: identifies teacher weights in a cache."""
    if not Path(path).is_file():
        raise MissingData(f"weights file {path} not found — pass the path of a saved state dict")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"
