"""Hugging Face transformers image classifiers (``hf:PATH``, ``kdcache[hf]``): a folder made by
``save_pretrained()`` or a hub id already in the local cache, with the preprocessing of its image processor.
They come with their weights, so they are teachers and evaluated models, never untrained students."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import InvalidSpec, MissingData
from kdcache.extras import require
from kdcache.models.hub import hub_cache
from kdcache.models.loaded import PRETRAINED, LoadedModel
from kdcache.models.preprocess import Preprocess
from kdcache.models.weights import file_sha256

_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def build(spec: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    raise InvalidSpec(f"{spec} is a pretrained Hugging Face model, loaded with its weights — use it as "
                      "--teacher, --online-teacher or in eval, and pick another spec for a student")


def takes(weights: str | None) -> bool:
    """A Hugging Face model always brings its own weights."""
    return True


def pretrained(spec: str, name: str, weights: str | None) -> LoadedModel:
    """The classifier at ``name`` (a folder or a cached hub id)."""
    if weights not in (None, PRETRAINED):
        raise InvalidSpec(f"teacher {spec} takes its weights from its folder — drop --weights {weights}")
    return _huggingface(spec, name)


class HFClassifier(nn.Module):
    """A transformers image classifier whose forward returns its logits; its layers are ``model.*``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _huggingface(spec: str, path: str) -> LoadedModel:
    transformers = require("transformers", "hf", f"model {spec}")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    folder = _hf_folder(spec, path)
    weights = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    if not weights:
        raise MissingData(f"{folder} has no model.safetensors — save the model there with save_pretrained()")
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidSpec(f"cannot load {spec} as an image classifier: {reason} — save an "
                          "AutoModelForImageClassification there with save_pretrained()") from None
    count = int(model.config.num_labels)
    labels = getattr(model.config, "id2label", None) or {}
    classes = tuple(str(labels[i]) for i in range(count)) if len(labels) == count else None
    if classes and all(c == f"LABEL_{i}" for i, c in enumerate(classes)):
        classes = None  # transformers' placeholder names
    return LoadedModel(HFClassifier(model), spec, str(folder), _folder_sha256(folder, weights), count, None,
                       _hf_preprocess(transformers, folder, spec), classes)


def _hf_folder(spec: str, path: str) -> Path:
    """A local model folder, or the snapshot of a hub id in the local cache."""
    folder = Path(path).expanduser()
    if not folder.is_dir() and "/" in path and not path.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(path, local_files_only=True, cache_dir=str(hub_cache())))
        except Exception:  # noqa: BLE001 - not cached, whatever the hub client's reason
            raise MissingData(f"{spec}: no folder {path}, and hub model {path} is not in the Hugging Face cache at "
                              f"{hub_cache()} — pass a folder made by save_pretrained(), or copy the model into "
                              "the cache") from None
    if not folder.is_dir():
        raise MissingData(f"{spec}: folder {path} not found — pass a folder made by save_pretrained()")
    if not (folder / "config.json").is_file():
        raise MissingData(f"{spec}: {folder} has no config.json — pass a folder made by save_pretrained()")
    return folder


def _folder_sha256(folder: Path, weights: list[Path]) -> str:
    """One hash of the config and every weights file, as read."""
    digest = hashlib.sha256()
    for f in [folder / "config.json", *weights]:
        digest.update(f"{f.name}\t{file_sha256(f)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def _hf_preprocess(transformers: Any, folder: Path, spec: str) -> Preprocess | None:
    """The image processor's normalisation, size, resampling and crop; None without a processor."""
    if not (folder / "preprocessor_config.json").is_file():
        return None
    proc = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    size = dict(getattr(proc, "size", None) or {})
    crop = dict(getattr(proc, "crop_size", None) or {}) if getattr(proc, "do_center_crop", False) else {}
    side = int(crop.get("height") or size.get("height") or size.get("shortest_edge") or 224)
    crop_pct = getattr(proc, "crop_pct", None)
    if crop_pct is None:
        crop_pct = side / int(size["shortest_edge"]) if crop and size.get("shortest_edge") else 1.0
    mean = tuple(float(m) for m in (getattr(proc, "image_mean", None) or (0.5, 0.5, 0.5)))
    std = tuple(float(s) for s in (getattr(proc, "image_std", None) or (0.5, 0.5, 0.5)))
    resample = _PIL_RESAMPLE.get(int(getattr(proc, "resample", 2) or 2), "bilinear")
    return Preprocess(mean, std, side, resample, float(min(crop_pct, 1.0)), f"{spec} image processor")
