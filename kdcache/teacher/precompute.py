"""Stage 1: run the teacher once over K recorded views per sample and write the cache.

Work is planned in whole shards; a shard's arrays are written together and only then is the shard
marked done, so an interrupted run resumes by skipping done shards without running the teacher on
them. The cache goes to ``ROOT/<cache id>``: a second run with the same inputs finds it and runs no
teacher forward at all.

Several processes (``torchrun`` or ``--nproc``) split the shards: rank r of W writes shards r,
r+W, …, so no shard ever has two writers. Rank 0 holds the writer lock (kdcache/cache/lock.py),
creates or resumes the layout before the other ranks open it, and marks the cache complete after
all of them are done. What is stored per view is kdcache/teacher/outputs.py's business.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from kdcache import data, distributed
from kdcache.models import preprocess
from kdcache.augment import Recipe
from kdcache.cache.arrays import ArraySpec
from kdcache.cache.claim import ClaimOptions, claim
from kdcache.cache.lock import WriterLock
from kdcache.cache.manifest import cache_id, provenance
from kdcache.cache.roots import alias_name, join
from kdcache.cache.store import CacheWriter, limit_codec_threads, open_cache, open_writer
from kdcache.models.preprocess import Preprocess
from kdcache.runtime import codec_threads, loader_workers, pick_device, resolve_precision
from kdcache.teacher import extra_views
from kdcache.teacher.config import PrecomputeConfig, PrecomputeSettings, resolve
from kdcache.teacher.ensemble import load_teachers, members_entry
from kdcache.cache.logits import logits_entry, target_specs
from kdcache.teacher.outputs import feature_entries, feature_specs, member_specs
from kdcache.teacher.passes import cache_shards, compiled_forward, run_shards
from kdcache.views import Renderer


@dataclass
class PrecomputeResult:
    path: str  # the cache itself, ROOT/<cache id>: what `train --cache` takes
    cache_id: str
    reused: bool
    views_computed: int  # by every rank together
    seconds: float
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)
    alias: str | None = None  # ROOT/<alias>, a readable name that opens the same cache

    @property
    def views_per_second(self) -> float:
        return self.views_computed / self.seconds if self.seconds > 0 else 0.0


def run_config(cfg: PrecomputeConfig) -> dict[str, Any]:
    """The fully resolved settings of a run, as JSON (the manifest's ``config``; not part of the cache id):
    ``PrecomputeConfig(**run_config(cfg))`` reruns it."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(cfg).items()}


def build_manifest(
    settings: PrecomputeSettings, source: data.Source, recipe: Recipe, teacher: dict[str, Any], pre: Preprocess,
    device: torch.device, features: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The manifest of the cache ``settings`` describe (id and layout are added by the store);
    ``teacher`` is its teacher section (members and ensemble, see kdcache/teacher/ensemble.py)."""
    cfg = settings.config
    return {
        "teacher": teacher,
        "dataset": source.manifest_entry(),
        "recipe": {
            "views": cfg.views,
            "seed": cfg.seed,
            "augment": recipe.to_manifest(),
            **pre.to_manifest(),  # the teacher's preprocessing: input_size, mean, std, interpolation, crop_pct
            **({"decode": cfg.decode} if cfg.decode != "full" else {}),  # it changes the pixels: part of the id
        },
        "outputs": {
            "precision": resolve_precision(cfg.precision, device),  # it changes every output
            "logits": logits_entry(settings.logits, source.num_classes, cfg.logit_dtype),
            "energy": {"temperatures": [float(t) for t in cfg.energy_t]},
            "features": features or [],
            **members_entry(len(teacher["members"]), cfg.keep_members, cfg.logit_dtype),
        },
        "provenance": provenance(),
        "config": run_config(cfg),
    }


def prepare(
    cfg: PrecomputeConfig | PrecomputeSettings, teacher: torch.nn.Module | list[torch.nn.Module] | None = None,
    device: torch.device | None = None,
) -> tuple[data.Source, Recipe, Preprocess, torch.nn.Module, dict[str, Any], list[ArraySpec]]:
    """Everything a run needs before it touches storage: source, recipe, the teacher's preprocessing
    (kdcache/models/preprocess.py), the teacher to run (loaded, see kdcache/teacher/ensemble.py), manifest and
    array specs. ``device`` (default: the one ``--device`` names) decides the recorded precision."""
    settings = resolve(cfg)
    cfg = settings.config
    device = device if device is not None else pick_device(cfg.device)
    source = data.open_source(settings.dataset)
    recipe = Recipe.parse(cfg.augment)
    recipe.check_sampled()
    recipe.check_channels(source.channels)
    teacher, section, own = load_teachers(cfg.teacher, cfg.weights, source.num_classes, source.channels,
                                          cfg.ensemble, cfg.keep_members, modules=teacher, class_map=cfg.class_map,
                                          dataset_classes=source.classes)
    size = cfg.teacher_size or (own.size if own is not None else None) or source.image_size
    pre = preprocess.resolve(own, source.mean, source.std, source.channels, size, cfg.teacher_norm)
    spec = "+".join(m["spec"] for m in section["members"])
    features = feature_entries(teacher, spec, dict(settings.features), (source.channels, size, size))
    manifest = build_manifest(settings, source, recipe, section, pre, device, features)
    extra_views.add_to_manifest(manifest, settings.extra_views, recipe)
    entry = manifest["outputs"]["logits"]
    specs = [
        *target_specs(entry, source.num_classes),
        ArraySpec("energy", (len(cfg.energy_t),), "float32"),
        *feature_specs(features),
        *[ArraySpec(f"aug/{name}", tuple(tail), dtype) for name, (tail, dtype) in recipe.fields().items()],
        *member_specs(manifest["outputs"], source.num_classes),
    ]
    return source, recipe, pre, teacher, manifest, specs


def check(cfg: PrecomputeConfig | PrecomputeSettings) -> None:
    """Raise what :func:`precompute` would raise about ``cfg`` before it touches storage: options,
    dataset, recipe, teachers and their weights. ``--nproc`` runs it once before starting the ranks."""
    prepare(cfg)


def precompute(
    cfg: PrecomputeConfig | PrecomputeSettings,
    teacher: torch.nn.Module | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> PrecomputeResult:
    """Run stage 1 as ``cfg`` says and return where the cache is.

    The cache goes to ``cfg.out/<cache id>`` with a readable alias beside it. ``teacher`` may be
    given as a module instead of ``cfg.teacher``/``cfg.weights`` (its parameters are hashed for the
    cache id). A complete cache with the same id is reused without running the teacher; an
    incomplete one is resumed. ``on_batch(inputs, logits)`` sees every teacher batch (for tests and
    custom logging).
    """
    began = time.perf_counter()
    settings = resolve(cfg)
    cfg = settings.config
    device = pick_device(cfg.device)
    source, recipe, pre, teacher, manifest, specs = prepare(settings, teacher, device)

    rank, _ = distributed.rank_world()
    device = distributed.init_if_needed(device)
    cache, alias, lock = _claim(cfg, manifest, source, specs)
    try:
        if cache.complete:
            return PrecomputeResult(cache.path, cache.id, True, 0, time.perf_counter() - began, cache.manifest, alias)
        images = source.train.recording() if cache.binds_inputs else source.train  # the crc32c the cache keeps
        computed = _compute(cfg, cache, teacher, Renderer.for_model(images, recipe, pre, cfg.decode), device, lock,
                            on_batch)
        distributed.barrier()
        if rank == 0:  # the extra views need every sample's energy: one writer, after all shards
            bound = source.train.bound(cache.input_checksums(), cache.path)
            computed += extra_views.add_extra_views(cache, teacher.to(device).eval(), bound, device,
                                                    cfg.batch_size, loader_workers(cfg.workers, device), cfg.progress)
        total = int(distributed.all_sum([computed], device)[0])
        if rank == 0:
            cache.finish()
        distributed.barrier()  # every rank returns once the cache is complete
    finally:
        if lock is not None:
            lock.release()
    manifest = cache.manifest if rank == 0 else open_cache(cache.path).manifest
    return PrecomputeResult(cache.path, cache.id, False, total, time.perf_counter() - began, manifest, alias)


def _compute(cfg: PrecomputeConfig, cache: CacheWriter, teacher: torch.nn.Module, renderer: Renderer,
             device: torch.device, lock: WriterLock | None,
             on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None) -> int:
    """Run the teacher over this rank's unfinished shards and write each as it completes; the views computed.

    Rank r owns shards r, r+W, …: a fixed split, so ranks that read the done flags at different
    moments still never share a shard.
    """
    rank, world = distributed.rank_world()
    done = cache.shards_done()
    shards = cache_shards(cache, np.arange(cache.views, dtype=np.int64),
                          [s for s in range(rank, cache.num_shards, world) if not done[s]])
    limit_codec_threads(codec_threads(device))
    teacher = teacher.to(device).eval()
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    return run_shards(
        teacher, renderer, shards,
        cache.manifest["outputs"], lambda shard, arrays: cache.write_shard(shard.key, arrays),
        batch_size=cfg.batch_size,
        before_write=lock.check if lock is not None else None,  # stop before writing if --break-lock took it over
        seed=cfg.seed, num_samples=len(renderer.images), device=device, workers=loader_workers(cfg.workers, device),
        progress=cfg.progress and rank == 0, desc="precompute", on_batch=on_batch,
        forward=compiled_forward(teacher) if cfg.compile else None,
    )


def _claim(cfg: PrecomputeConfig, manifest: dict[str, Any], source: data.Source,
           specs: list[ArraySpec]) -> tuple[CacheWriter, str, WriterLock | None]:
    """The cache to reuse or write (kdcache/cache/claim.py), and the writer lock that rank 0 holds while it is
    incomplete. Rank 0 claims it; only then do the other ranks open it."""
    rank, _ = distributed.rank_world()
    if rank == 0:
        held = claim(cfg.out, manifest, source.train.labels, specs,
                     ClaimOptions(wait=cfg.wait, break_lock=cfg.break_lock, rebuild=cfg.rebuild),
                     chunk_samples=cfg.chunk_samples, sharded=cfg.sharded, inputs=True)
    distributed.barrier()
    if rank > 0:
        cache = open_writer(join(cfg.out, cache_id(manifest)), allow_incomplete=True)
        return cache, join(cfg.out, alias_name(manifest, cache.id)), None
    return held.cache, held.alias, held.lock
