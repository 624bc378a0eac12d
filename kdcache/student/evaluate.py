"""Evaluation as torchvision and timm do it: un-augmented views of a split, top-1, top-5, ECE and CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from kdcache import data, preprocess
from kdcache.augment import Recipe
from kdcache.class_map import apply_class_map, check_classes, read_class_map
from kdcache.errors import InvalidSpec
from kdcache.preprocess import Preprocess
from kdcache.runtime import pick_device
from kdcache.views import Renderer
from kdcache.zoo import load_model


class EvalViews(Dataset):
    """Un-augmented views of a split, for evaluation: (input, label)."""

    def __init__(self, renderer: Renderer):
        self.renderer = renderer

    def __len__(self) -> int:
        return len(self.renderer.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.renderer.plain(index), int(self.renderer.images.labels[index])


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins (Guo et al., 2017)."""
    confidence, predicted = probs.max(dim=1)
    correct = predicted.eq(labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Top-1, top-5 (in %), ECE and mean CE of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    all_probs, all_labels = [], []
    for inputs, labels in loader:
        logits = model(inputs.to(device)).float()
        all_probs.append(logits.softmax(dim=1).cpu())
        all_labels.append(labels)
    model.train(was_training)
    probs, labels = torch.cat(all_probs), torch.cat(all_labels)
    k = min(5, probs.shape[1])
    top = probs.topk(k, dim=1).indices
    return {
        "top1": 100.0 * float(top[:, 0].eq(labels).float().mean()),
        "top5": 100.0 * float(top.eq(labels[:, None]).any(dim=1).float().mean()),
        "ece": expected_calibration_error(probs, labels),
        "loss": float(F.nll_loss(probs.clamp_min(1e-12).log(), labels)),
    }


SPLITS = ("train", "test", "val")  # val is the test split: image folders call it val/


def split_images(source: data.Source, split: str) -> data.ImageSet:
    """The images of a named split; ``val`` is accepted as ``test``."""
    if split not in SPLITS:
        raise InvalidSpec(f"--split {split!r} is not a split — use train, test or val (val is the same as test)")
    return source.train if split == "train" else source.test


def eval_loader(source: data.Source, split: str, pre: Preprocess | int, batch_size: int,
                workers: int = 0) -> DataLoader:
    """Un-augmented views of ``split`` (train, test or val) with the model's preprocessing ``pre``
    (an int: the dataset's statistics at that size)."""
    images = split_images(source, split)
    if isinstance(pre, int):
        pre = preprocess.resolve(None, source.mean, source.std, source.channels, pre)
    renderer = Renderer.for_model(images, Recipe.parse("none"), pre)
    return DataLoader(EvalViews(renderer), batch_size=batch_size, num_workers=workers)


def evaluate_weights(model_spec: str, weights: str | None, dataset: str, split: str = "test",
                     size: int | None = None, batch_size: int = 256, device: str = "auto",
                     norm: str | None = None, class_map: str | None = None, workers: int = 0) -> dict[str, float]:
    """``kdcache eval``: ``model_spec`` with ``weights`` (a file, torchvision:TAG, pretrained, or none for
    hf:PATH) evaluated on ``split`` of ``dataset`` with the model's own preprocessing."""
    source = data.open_source(dataset)
    split_images(source, split)
    if norm is not None:
        preprocess.parse_norm(norm, None)
    loaded = load_model(model_spec, weights, source.num_classes, source.channels)
    if class_map is not None:
        apply_class_map(loaded.module, read_class_map(class_map, source.classes, loaded.classes, loaded.num_classes))
    else:
        check_classes(model_spec, loaded.num_classes, source.num_classes, has_map=False)
    own = loaded.preprocess
    pre = preprocess.resolve(own, source.mean, source.std, source.channels,
                             size or (own.size if own is not None else None) or source.image_size, norm)
    dev = pick_device(device)
    loader = eval_loader(source, split, pre, batch_size, workers)
    return evaluate(loaded.module.to(dev), loader, dev)
