"""Pretrained-model fixtures made offline: files laid out where each zoo keeps them, holding tiny or
randomly initialised models (kdcache never downloads, and neither do the tests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TV_MODEL, TV_TAG = "shufflenet_v2_x0_5", "IMAGENET1K_V1"
TIMM_MODEL = "test_resnet.r160_in1k"
_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def torchvision_hub(root: Path, name: str = TV_MODEL, tag: str = TV_TAG, seed: int = 0) -> Path:
    """Random weights of torchvision ``name`` saved under ``root/hub/checkpoints`` with the file name
    torchvision's weights enum gives ``tag``; set TORCH_HOME=root to use them."""
    import torchvision.models

    weights = torchvision.models.get_model_weights(name)[tag]
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=len(weights.meta["categories"]))
    folder = root / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / os.path.basename(weights.url)
    torch.save(model.state_dict(), path)
    return path


def timm_hub(cache: Path, name: str = TIMM_MODEL, seed: int = 0) -> Path:
    """Random weights of timm ``name`` as ``model.safetensors`` in a Hugging Face cache layout at
    ``cache`` (what HF_HUB_CACHE points at)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    repo = cache / f"models--{model.pretrained_cfg['hf_hub_id'].replace('/', '--')}"
    snapshot = repo / "snapshots" / _COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(_COMMIT)
    path = snapshot / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def hf_classifier(folder: Path, num_labels: int = 5, seed: int = 0, labels: list[str] | None = None,
                  processor: bool = True) -> Path:
    """A tiny randomly initialised transformers ResNet image classifier saved with save_pretrained,
    with a ConvNext-style image processor (shortest edge 40, crop_pct 0.875, bicubic, CLIP statistics)."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    names = labels or [f"class{i}" for i in range(num_labels)]
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=len(names), id2label=dict(enumerate(names)),
                          label2id={n: i for i, n in enumerate(names)})
    ResNetForImageClassification(config).save_pretrained(folder)
    if processor:
        ConvNextImageProcessor(size={"shortest_edge": 35}, crop_pct=0.875, resample=3,
                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(folder)
    return folder


def jpeg_folder(root: Path, classes: int = 3, train: int = 4, val: int = 3, sides: tuple[int, int] = (240, 330),
                seed: int = 0) -> Path:
    """An ImageNet-shaped folder: ``root/{train,val}/c<k>/*.jpg``, non-square RGB JPEGs with sides drawn
    from ``sides``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(*sides, size=2))
                base = rng.integers(0, 255, size=(1, 1, 3))
                noise = rng.integers(0, 60, size=(h, w, 3))
                pixels = np.clip(base + noise + np.linspace(0, 80, w)[None, :, None], 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root
