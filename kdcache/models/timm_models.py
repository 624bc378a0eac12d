"""timm's models: ``timm:NAME`` untrained (``kdcache[timm]``), or with ``--weights pretrained`` timm's weights
from the local Hugging Face cache and the preprocessing of the model's ``pretrained_cfg``."""

from __future__ import annotations

from torch import nn

from kdcache.errors import InvalidSpec
from kdcache.extras import require
from kdcache.models.hub import cached_file
from kdcache.models.loaded import PRETRAINED, LoadedModel
from kdcache.models.preprocess import DEFAULT_CROP_PCT, Preprocess
from kdcache.models.weights import apply_state, file_sha256, read_state_dict


def build(spec: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    """timm's ``name``, untrained, for ``num_classes`` and ``in_channels``."""
    timm = require("timm", "timm", f"model timm:{name}")
    if not timm.is_model(name):
        raise InvalidSpec(f"unknown timm model {name!r} — see timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def takes(weights: str | None) -> bool:
    """Whether ``--weights`` names timm's pretrained weights."""
    return weights == PRETRAINED


def pretrained(spec: str, name: str, weights: str | None) -> LoadedModel:
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
    path = cached_file(repo, ("model.safetensors", "pytorch_model.bin"), spec)
    apply_state(module, read_state_dict(path), f"weights {path}", spec)
    chans, height = int(cfg["input_size"][0]), int(cfg["input_size"][1])
    pre = Preprocess(tuple(cfg["mean"])[:chans], tuple(cfg["std"])[:chans], height,
                     cfg.get("interpolation") or "bilinear", float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
                     f"timm:{cfg['architecture']}.{cfg['tag']}")
    return LoadedModel(module, spec, str(path), file_sha256(path), int(module.num_classes), f"timm:{repo}", pre,
                       _timm_classes(module))


def _timm_classes(module: nn.Module) -> tuple[str, ...] | None:
    """ImageNet synset ids (n01440764, …) of a timm ImageNet classifier, else None."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(module)
        return tuple(ImageNetInfo(subset).label_names()) if subset else None
    except Exception:  # noqa: BLE001 - class names are a convenience; indices always work
        return None
