"""Evaluation as torchvision and timm do it: un-augmented views of a split, top-1, top-5, ECE and CE."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from kdcache import data, distributed
from kdcache.models import preprocess
from kdcache.augment import Recipe
from kdcache.models.class_maps import apply_class_map, check_classes, read_class_map
from kdcache.errors import InvalidSpec
from kdcache.models.preprocess import Preprocess
from kdcache.runtime import pick_device
from kdcache.student.config import EVAL_SPLITS, EvalConfig
from kdcache.views import Renderer
from kdcache.models import load_model


class EvalViews(Dataset):
    """Un-augmented views of a split, for evaluation: (input, label); with ``world`` ranks, rank ``rank``
    takes samples rank, rank + world, … (the ranks' metrics are summed by :func:`evaluate`)."""

    def __init__(self, renderer: Renderer, rank: int = 0, world: int = 1):
        self.renderer = renderer
        self.indices = range(rank, len(renderer.images), world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        index = self.indices[k]
        return self.renderer.plain(index), int(self.renderer.images.labels[index])


ECE_BINS = 15


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
    """Top-1, top-5 (in %), ECE and mean CE of ``model`` over ``loader``; under ``torchrun`` each rank
    passes its share of the split (``eval_loader(rank=, world=)``) and the sums are all-reduced, so every
    rank returns the metrics of the whole split."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4 + 3 * ECE_BINS, dtype=torch.float64, device=device)
    for inputs, labels in loader:
        sums += eval_sums(model(inputs.to(device)).float(), labels.to(device))
    model.train(was_training)
    return eval_metrics(distributed.all_sum(sums.tolist(), device))


def eval_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What evaluation adds up per batch: count, top-1 and top-5 hits, summed CE, and per confidence bin
    the count, summed confidence and summed correctness (bins ``(k/15, (k+1)/15]``)."""
    probs = logits.softmax(dim=1)
    top = probs.topk(min(5, probs.shape[1]), dim=1).indices
    confidence = probs.max(dim=1).values
    correct = top[:, 0].eq(labels).double()
    nll = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum()
    edges = torch.linspace(0, 1, ECE_BINS + 1, device=logits.device)[1:]
    bins = torch.bucketize(confidence, edges).clamp_max(ECE_BINS - 1)
    per_bin = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=logits.device)
    per_bin[0].index_add_(0, bins, torch.ones_like(correct))
    per_bin[1].index_add_(0, bins, confidence.double())
    per_bin[2].index_add_(0, bins, correct)
    head = torch.stack([torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device), correct.sum(),
                        top.eq(labels[:, None]).any(dim=1).double().sum(), nll.double()])
    return torch.cat([head, per_bin.flatten()])


def eval_metrics(sums: list[float]) -> dict[str, float]:
    """The metrics of :func:`evaluate` from summed :func:`eval_sums`."""
    n, top1, top5, nll = sums[:4]
    per_bin = torch.tensor(sums[4:], dtype=torch.float64).view(3, ECE_BINS)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n,
            "ece": float((per_bin[1] - per_bin[2]).abs().sum() / n), "loss": nll / n}


def split_images(source: data.Source, split: str) -> data.ImageSet:
    """The images of a named split; ``val`` is accepted as ``test``."""
    if split not in EVAL_SPLITS:  # val is the test split: image folders call it val/
        raise InvalidSpec(f"--split {split!r} is not a split — use train, test or val (val is the same as test)")
    return source.train if split == "train" else source.test


def eval_loader(source: data.Source, split: str, pre: Preprocess | int, batch_size: int,
                workers: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    """Un-augmented views of ``split`` (train, test or val) with the model's preprocessing ``pre``
    (an int: the dataset's statistics at that size); rank ``rank`` of ``world`` gets its share."""
    images = split_images(source, split)
    if isinstance(pre, int):
        pre = preprocess.resolve(None, source.mean, source.std, source.channels, pre)
    renderer = Renderer.for_model(images, Recipe.parse("none"), pre)
    return DataLoader(EvalViews(renderer, rank, world), batch_size=batch_size, num_workers=workers)


def evaluate_config(cfg: EvalConfig) -> dict[str, float]:
    """``kdcache eval`` from its settings (see :func:`evaluate_weights`)."""
    cfg.validate()
    return evaluate_weights(cfg.model, cfg.weights, cfg.dataset, cfg.split, cfg.size, cfg.batch_size, cfg.device,
                            cfg.norm, cfg.class_map)


def evaluate_weights(model_spec: str, weights: str | None, dataset: str, split: str = "test",
                     size: int | None = None, batch_size: int = EvalConfig.batch_size, device: str = EvalConfig.device,
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
