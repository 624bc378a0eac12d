"""Stage 1: run the teacher once over K recorded views per sample and write the cache.

Work is planned in whole shards; a shard's arrays are written together and only then is the shard
marked done, so an interrupted run resumes by skipping done shards without running the teacher on
them.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kdcache import data, models
from kdcache.augment import Recipe
from kdcache.errors import CacheMismatch, InvalidSpec, MissingData
from kdcache.store import (
    ArraySpec, Cache, cache_exists, cache_id, create_cache, open_cache, provenance, storage_dtype,
)
from kdcache.views import Renderer, row

LOGIT_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class PrecomputeConfig:
    """Everything that decides what a precompute run stores (and where)."""

    dataset: str
    teacher: str
    out: str
    weights: str | None = None
    views: int = 8
    seed: int = 0
    augment: str = "rrc+flip"
    teacher_size: int | None = None
    energy_t: tuple[float, ...] = (1.0, 4.0)
    logit_dtype: str = "float16"
    batch_size: int = 256
    workers: int = 0
    device: str = "auto"
    chunk_samples: int | None = None
    progress: bool = True


@dataclass
class PrecomputeResult:
    path: str
    cache_id: str
    reused: bool
    views_computed: int
    seconds: float
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def views_per_second(self) -> float:
        return self.views_computed / self.seconds if self.seconds > 0 else 0.0


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InvalidSpec(f"unknown device {device!r} — use auto, cpu or cuda[:N]") from exc


def energy(logits: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """``E = -T·logsumexp(z/T)`` per row and temperature: [B, len(temperatures)], float32."""
    z = logits.float()
    return torch.stack([-t * torch.logsumexp(z / t, dim=1) for t in temperatures], dim=1)


def state_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's parameters and buffers, for teachers handed over as objects."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _validate(cfg: PrecomputeConfig) -> None:
    if cfg.views <= 0:
        raise InvalidSpec(f"--views must be at least 1, got {cfg.views}")
    if cfg.batch_size <= 0:
        raise InvalidSpec(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.logit_dtype not in LOGIT_DTYPES:
        raise InvalidSpec(f"--logit-dtype {cfg.logit_dtype!r} is not one of {', '.join(LOGIT_DTYPES)}")
    if not cfg.energy_t or any(t <= 0 for t in cfg.energy_t):
        raise InvalidSpec(f"--energy-t needs positive temperatures, got {list(cfg.energy_t)}")
    if cfg.teacher_size is not None and cfg.teacher_size <= 0:
        raise InvalidSpec(f"--teacher-size must be positive, got {cfg.teacher_size}")


def build_manifest(
    cfg: PrecomputeConfig, source: data.Source, recipe: Recipe, weights_sha: str, size: int
) -> dict[str, Any]:
    """The manifest of the cache ``cfg`` describes (id and layout are added by the store)."""
    return {
        "teacher": {
            "members": [{"spec": cfg.teacher, "sha256": weights_sha, "weights": cfg.weights}],
            "ensemble": None,
        },
        "dataset": {
            "spec": source.spec,
            "split": "train",
            "fingerprint": source.fingerprint,
            "num_samples": len(source.train),
            "num_classes": source.num_classes,
            "channels": source.channels,
            "classes": list(source.classes),
        },
        "recipe": {
            "views": cfg.views,
            "seed": cfg.seed,
            "augment": recipe.to_manifest(),
            "input_size": size,
            "mean": list(source.mean),
            "std": list(source.std),
        },
        "outputs": {
            "logits": {"mode": "dense", "dtype": cfg.logit_dtype},
            "energy": {"temperatures": [float(t) for t in cfg.energy_t]},
            "features": [],
        },
        "provenance": provenance(),
    }


class _ShardBatches(Dataset):
    """Batch ``k`` of the pending work: its shard, offset, params and rendered inputs.

    Params are sampled inside the worker: ``Recipe.sample`` is pure, so this equals sampling them in
    the main process, and no per-shard state needs to travel to workers.
    """

    def __init__(self, renderer: Renderer, recipe: Recipe, seed: int, views: int, num_samples: int,
                 batches: list[tuple[int, int, int, int]]):
        self.renderer, self.recipe, self.seed = renderer, recipe, seed
        self.views, self.num_samples, self.batches = views, num_samples, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[int, int, dict[str, np.ndarray], torch.Tensor]:
        shard, shard_start, lo, hi = self.batches[k]
        pairs = np.arange(lo, hi, dtype=np.int64)
        indices = shard_start + pairs // self.views
        views = pairs % self.views
        params = self.recipe.sample(self.seed, indices, views, self.num_samples)
        inputs = torch.stack([self.renderer(int(i), row(params, j)) for j, i in enumerate(indices)])
        return shard, lo, params, inputs


def _plan(cache: Cache, batch_size: int) -> list[tuple[int, int, int, int]]:
    """(shard, first sample of shard, first pair, end pair) for every batch of every unfinished shard."""
    batches = []
    done = cache.shards_done()
    for shard in range(cache.num_shards):
        if done[shard]:
            continue
        start, stop = cache.shard_range(shard)
        pairs = (stop - start) * cache.views
        batches += [(shard, start, lo, min(lo + batch_size, pairs)) for lo in range(0, pairs, batch_size)]
    return batches


def precompute(
    cfg: PrecomputeConfig,
    teacher: torch.nn.Module | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> PrecomputeResult:
    """Run stage 1 as ``cfg`` says and return where the cache is.

    ``teacher`` may be given as a module instead of ``cfg.teacher``/``cfg.weights`` (its parameters
    are hashed for the cache id). A complete cache with the same id at ``cfg.out`` is reused; an
    incomplete one is resumed; a different cache there is an error, never overwritten.
    ``on_batch(inputs, logits)`` sees every teacher batch (for tests and custom logging).
    """
    _validate(cfg)
    began = time.perf_counter()
    source = data.open_source(cfg.dataset)
    recipe = Recipe.parse(cfg.augment)
    size = cfg.teacher_size or source.image_size
    if teacher is None:
        teacher = models.create_model(cfg.teacher, source.num_classes, source.channels)
        if cfg.weights is None:
            raise InvalidSpec("precompute needs --weights FILE for the teacher — train one with `kdcache train`")
        if not os.path.isfile(cfg.weights):
            raise MissingData(f"weights file {cfg.weights} not found — check the path given to --weights")
        weights_sha = models.file_sha256(cfg.weights)
        models.load_weights(teacher, cfg.weights, spec=cfg.teacher)
    else:
        weights_sha = state_sha256(teacher)
    manifest = build_manifest(cfg, source, recipe, weights_sha, size)
    specs = [
        ArraySpec("logits", (source.num_classes,), storage_dtype(cfg.logit_dtype)),
        ArraySpec("energy", (len(cfg.energy_t),), "float32"),
        *[ArraySpec(f"aug/{name}", tuple(tail), dtype) for name, (tail, dtype) in recipe.fields().items()],
    ]

    cache = _open_or_create(cfg, manifest, source, specs)
    if cache.complete:
        return PrecomputeResult(cache.path, cache.id, True, 0, time.perf_counter() - began, cache.manifest)

    device = pick_device(cfg.device)
    teacher = teacher.to(device).eval()
    renderer = Renderer(source.train, recipe, size, source.mean, source.std)
    batches = _plan(cache, cfg.batch_size)
    loader = DataLoader(
        _ShardBatches(renderer, recipe, cfg.seed, cfg.views, len(source.train), batches),
        batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda",
    )
    total = sum(hi - lo for _, _, lo, hi in batches)
    buffers: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}
    logit_dtype = getattr(torch, cfg.logit_dtype)
    with torch.inference_mode(), tqdm(total=total, unit="view", desc="precompute", disable=not cfg.progress,
                                      dynamic_ncols=True) as bar:
        for shard, lo, params, inputs in loader:
            logits = teacher(inputs.to(device, non_blocking=True)).float()
            if on_batch is not None:
                on_batch(inputs, logits)
            out = {
                "logits": _numpy(logits.to(logit_dtype)),
                "energy": energy(logits, cfg.energy_t).cpu().numpy(),
                **{f"aug/{name}": values for name, values in params.items()},
            }
            buf = buffers.setdefault(shard, _shard_buffers(cache, shard, specs))
            for name, values in out.items():
                flat = buf[name].reshape(-1, *buf[name].shape[2:])
                flat[lo : lo + len(values)] = values
            filled[shard] = filled.get(shard, 0) + len(inputs)
            if filled[shard] == buf["logits"].shape[0] * cache.views:
                cache.write_shard(shard, buffers.pop(shard))
            bar.update(len(inputs))
    cache.finish()
    return PrecomputeResult(cache.path, cache.id, False, total, time.perf_counter() - began, cache.manifest)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """Tensor to numpy; bfloat16, which numpy lacks, is kept as its uint16 bit pattern."""
    if t.dtype == torch.bfloat16:
        return t.cpu().view(torch.int16).numpy().view(np.uint16)
    return t.cpu().numpy()


def _shard_buffers(cache: Cache, shard: int, specs: list[ArraySpec]) -> dict[str, np.ndarray]:
    start, stop = cache.shard_range(shard)
    out = {}
    for spec in specs:
        dtype = cache.group[spec.name].dtype
        out[spec.name] = np.zeros((stop - start, cache.views, *spec.tail), dtype=dtype)
    return out


def _open_or_create(cfg: PrecomputeConfig, manifest: dict[str, Any], source: data.Source,
                    specs: list[ArraySpec]) -> Cache:
    wanted = cache_id(manifest)
    if cache_exists(cfg.out):
        cache = open_cache(cfg.out, mode="r+", allow_incomplete=True)
        if cache.id != wanted:
            raise CacheMismatch(
                f"{cfg.out} holds cache {cache.id} made from other inputs (this run would make {wanted}) — "
                "choose another --out or delete it"
            )
        return cache
    return create_cache(cfg.out, manifest, source.train.labels, specs, chunk_samples=cfg.chunk_samples)
