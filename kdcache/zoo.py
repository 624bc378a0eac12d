"""Models with their weights: a state-dict file, or pretrained weights of a model zoo, never downloaded.

``load_model(spec, weights, ...)`` is the one way a model with weights is built (teachers, ``eval``,
the online teacher). Weights references:

- a file path: a state dict of ``spec`` built for the dataset's classes (kdcache's own checkpoints);
- ``torchvision:TAG`` (``IMAGENET1K_V2``, ``DEFAULT``, …) with ``--teacher torchvision:NAME``: the file
  torchvision's weights enum names, read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``);
- ``pretrained`` with ``timm:NAME[.TAG]`` (or ``torchvision:NAME``, meaning its DEFAULT weights): timm's
  weights from the local Hugging Face cache;
- none with ``hf:PATH``: a transformers image classifier in a local folder, or a hub id already in
  the local Hugging Face cache.

Files are read with ``weights_only`` or as safetensors. Each loaded model carries the sha256 of what was
read, its class count, its class names where known, and its own preprocessing (kdcache/preprocess.py).
See docs/teachers.md.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache import models
from kdcache.errors import InvalidSpec, MissingData
from kdcache.extras import require
from kdcache.preprocess import DEFAULT_CROP_PCT, Preprocess

PRETRAINED = "pretrained"
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass
class LoadedModel:
    """A model with weights, and what identifies and describes them."""

    module: nn.Module
    spec: str
    weights: str | None  # the file or folder read (not part of a cache id: where it lay)
    sha256: str
    num_classes: int
    tag: str | None = None  # the zoo reference, e.g. torchvision:IMAGENET1K_V1; None for a plain file
    preprocess: Preprocess | None = None  # None: the dataset's statistics
    classes: tuple[str, ...] | None = None  # the model's class names, where its weights say them

    def entry(self) -> dict[str, Any]:
        """The manifest's record of this member."""
        out: dict[str, Any] = {"spec": self.spec, "sha256": self.sha256, "weights": self.weights}
        if self.tag is not None:
            out["tag"] = self.tag
        return out


def is_zoo_reference(spec: str, weights: str | None) -> bool:
    """Whether ``weights`` names zoo weights (or ``spec`` is a Hugging Face model) rather than a file."""
    return spec.strip().startswith("hf:") or weights == PRETRAINED or str(weights or "").startswith("torchvision:")


def load_model(spec: str, weights: str | None, num_classes: int, channels: int) -> LoadedModel:
    """``spec`` with ``weights`` loaded, in eval mode. A file is loaded into a model built for
    ``num_classes``; zoo weights keep their own class count (see kdcache/class_map.py)."""
    spec = spec.strip()
    kind, _, name = spec.partition(":")
    if kind == "hf":
        if weights not in (None, PRETRAINED):
            raise InvalidSpec(f"teacher {spec} takes its weights from its folder — drop --weights {weights}")
        loaded = _huggingface(spec, name)
    elif weights is None:
        raise InvalidSpec(f"model {spec} needs weights — pass --weights FILE (a saved state dict), "
                          "--weights torchvision:TAG or --weights pretrained")
    elif str(weights).startswith("torchvision:") or (weights == PRETRAINED and kind == "torchvision"):
        if kind != "torchvision":
            raise InvalidSpec(f"--weights {weights} names torchvision weights, but the model is {spec} — "
                              "use --teacher torchvision:NAME")
        tag = "DEFAULT" if weights == PRETRAINED else str(weights).partition(":")[2]
        loaded = _torchvision(spec, name, tag)
    elif weights == PRETRAINED:
        if kind != "timm":
            raise InvalidSpec(f"--weights pretrained needs a timm:NAME or torchvision:NAME model, not {spec} — "
                              "pass a weights file instead")
        loaded = _timm(spec, name)
    else:
        module = models.create_model(spec, num_classes, channels)
        models.load_weights(module, weights, spec=spec)
        loaded = LoadedModel(module, spec, str(weights), models.file_sha256(weights), num_classes)
    if loaded.preprocess is not None and len(loaded.preprocess.mean) != channels:
        raise InvalidSpec(f"{spec} takes {len(loaded.preprocess.mean)}-channel images, the dataset has {channels} "
                          "— use an RGB dataset with this model")
    loaded.module.eval()
    return loaded


# ---------------------------------------------------------------------------------------------
# torchvision


def _torchvision(spec: str, name: str, tag: str) -> LoadedModel:
    import torchvision.models

    if name not in torchvision.models.list_models(torchvision.models):
        raise InvalidSpec(f"unknown torchvision model {name!r} — see torchvision.models.list_models() for "
                          "the classification models")
    enum = torchvision.models.get_model_weights(name)
    tags = list(enum.__members__)
    if tag not in tags:
        raise InvalidSpec(f"torchvision {name} has no weights {tag!r} — use one of {', '.join(tags)}")
    weights = enum[tag]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(weights.url)
    if not path.is_file():
        raise MissingData(f"weights file {path.name} of torchvision:{name} {weights} is not in {folder} — copy it "
                          "there (kdcache never downloads; set TORCH_HOME to use another hub folder)")
    state = models.read_state_dict(path)
    module = torchvision.models.get_model(name, weights=None, **_weights_kwargs(name, weights))
    _fix_legacy_keys(name, state)
    models.apply_state(module, state, f"weights {path}", spec)
    t = weights.transforms()
    size, resize = int(t.crop_size[0]), int(t.resize_size[0])
    pre = Preprocess(tuple(t.mean), tuple(t.std), size, t.interpolation.value, size / resize,
                     f"torchvision:{name}:{weights.name}")
    classes = tuple(weights.meta["categories"])
    return LoadedModel(module, spec, str(path), models.file_sha256(path), len(classes), f"torchvision:{weights.name}",
                       pre, classes)


def _weights_kwargs(name: str, weights: Any) -> dict[str, Any]:
    """The architecture arguments torchvision's builders set when given these weights."""
    kwargs: dict[str, Any] = {"num_classes": len(weights.meta["categories"])}
    if name in ("inception_v3", "googlenet"):
        kwargs |= {"transform_input": True, "aux_logits": True, "init_weights": False}
    elif name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif name.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


def _fix_legacy_keys(name: str, state: dict[str, torch.Tensor]) -> None:
    """DenseNet checkpoints name ``norm.1`` what the model calls ``norm1`` (torchvision renames them too)."""
    if not name.startswith("densenet"):
        return
    import re

    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")
    for key in list(state):
        match = pattern.match(key)
        if match:
            state[match.group(1) + match.group(2)] = state.pop(key)


# ---------------------------------------------------------------------------------------------
# timm


def hub_cache() -> Path:
    """The local Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _timm(spec: str, name: str) -> LoadedModel:
    timm = require("timm", "timm", f"model {spec}")
    if not timm.is_model(name):
        raise InvalidSpec(f"unknown timm model {name!r} — see timm.list_models()")
    if not timm.is_model_pretrained(name):
        raise InvalidSpec(f"timm model {name!r} has no pretrained weights — see timm.list_pretrained('{name}*')")
    module = timm.create_model(name, pretrained=False)
    cfg = dict(module.pretrained_cfg)
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise InvalidSpec(f"timm model {name!r} keeps its weights outside the Hugging Face hub — download them and "
                          f"pass the file: --teacher timm:{name} --weights FILE")
    path = _cached_file(repo, ("model.safetensors", "pytorch_model.bin"), spec)
    models.apply_state(module, models.read_state_dict(path), f"weights {path}", spec)
    chans, height = int(cfg["input_size"][0]), int(cfg["input_size"][1])
    pre = Preprocess(tuple(cfg["mean"])[:chans], tuple(cfg["std"])[:chans], height,
                     cfg.get("interpolation") or "bilinear", float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
                     f"timm:{cfg['architecture']}.{cfg['tag']}")
    return LoadedModel(module, spec, str(path), models.file_sha256(path), int(module.num_classes), f"timm:{repo}", pre,
                       _timm_classes(module))


def _timm_classes(module: nn.Module) -> tuple[str, ...] | None:
    """ImageNet synset ids (n01440764, …) of a timm ImageNet classifier, else None."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(module)
        return tuple(ImageNetInfo(subset).label_names()) if subset else None
    except Exception:  # noqa: BLE001 - class names are a convenience; indices always work
        return None


def _cached_file(repo: str, names: tuple[str, ...], spec: str) -> Path:
    """The first of ``names`` of hub repo ``repo`` in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    for filename in names:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(hub_cache()))
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    folder = hub_cache() / f"models--{repo.replace('/', '--')}"
    raise MissingData(f"the weights of {spec} ({repo}) are not in the Hugging Face cache at {folder} — copy that "
                      "folder from a machine that has them (kdcache never downloads; HF_HUB_CACHE sets the cache)")


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers


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
        digest.update(f"{f.name}\t{models.file_sha256(f)}\n".encode())
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
