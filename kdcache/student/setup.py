"""The setup of a training run, before its first step: options checked, the data and the cache, the
teacher side and the loss, the student, its optimizer and schedule. :func:`set_up` returns all of it
as one :class:`Run` that kdcache/student/epoch.py and kdcache/student/checkpoint.py read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcache import data, distributed, losses, models
from kdcache.models import preprocess
from kdcache.augment import Recipe
from kdcache.cache.manifest import energy_temperature
from kdcache.cache.store import Cache, limit_codec_threads, open_cache
from kdcache.errors import InvalidSpec
from kdcache.models.preprocess import Preprocess
from kdcache.runtime import codec_threads, loader_workers, pick_device, resolve_precision
from kdcache.student import robust
from kdcache.student.config import TrainConfig, TrainSettings, resolve
from kdcache.student.ema import EMA
from kdcache.student.evaluate import eval_loader
from kdcache.student.extra_views import with_extra_views
from kdcache.student.online import OnlineTeacher, check_online
from kdcache.student.reader import TrainViews
from kdcache.student.targets import CacheTargets, StudentFeatures, layer_pairs, teacher_inputs
from kdcache.views import Renderer, ViewReplay

@dataclasses.dataclass
class Run:
    """Everything one training run holds: what it reads, what it trains and how it steps."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    source: data.Source
    cache: Cache | None
    criterion: losses.Loss
    pre: Preprocess
    online: OnlineTeacher | None
    targets: CacheTargets | None
    stream: TrainViews
    loader: DataLoader
    workers: int
    test_loader: DataLoader
    model: torch.nn.Module
    tap: StudentFeatures | None
    net: torch.nn.Module  # DDP with several ranks, else the model
    step_net: torch.nn.Module  # net, through torch.compile with --compile
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: EMA | None
    precision: str
    steps_per_epoch: int

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def record(self) -> dict[str, Any]:
        """What run.json holds: the settings, resolved, and what the run was made of."""
        return json.loads(json.dumps(dataclasses.asdict(self.cfg))) | {
            "loss": self.criterion.name, "hparams": dict(self.criterion.hparams), "size": self.pre.size,
            "train_samples": len(self.stream), "preprocess": self.pre.to_manifest(), "precision": self.precision,
            "cache_id": self.cache.id if self.cache else None,
            "views": views.to_record() if (views := student_views(self.cfg, self.cache)) else None,
            "online_teacher_sha256": self.online.sha256 if self.online else None,
        }


def criterion_for(cfg: TrainConfig, cache: Cache | None) -> losses.Loss:
    """The loss, its ``layers`` filled for feature losses, checked against what the teacher offers."""
    online = cfg.online_teacher is not None
    name = cfg.loss or ("kd" if cache is not None or online else "ce")
    cls = {c.name: c for c in losses.available()}.get(name)
    if cls is None:
        return losses.get(name)  # raises the registry's one-line error
    if online:
        check_online(name, cls.needs)
    elif cache is None and cls.needs:
        raise InvalidSpec(f"loss {name} needs teacher outputs — pass --cache PATH or --online-teacher MODEL "
                          "--weights FILE (or use --loss ce)")
    params = dict(cfg.loss_params)
    if "layers" in cls.defaults:
        params["layers"] = layer_pairs(cls, params, cfg.student_layers, cache)
    elif cfg.student_layers:
        raise InvalidSpec(f"--student-layer is for feature losses (amd, fitnet); loss {name} uses no layers "
                          "— drop --student-layer")
    criterion = losses.get(name, **params)
    if cache is not None and not online:
        criterion.check(teacher_inputs(cache))
    return criterion


def student_views(cfg: TrainConfig, cache: Cache | None) -> ViewReplay | None:
    """How the student renders the cache's recorded views (None without a cache): the teacher's own
    view at its size, else its crops at ``--size`` with ``--interpolation`` or the recorded one."""
    if cache is None:
        return None
    return ViewReplay.of(cache.manifest["recipe"], cfg.size, cfg.interpolation)


def student_preprocess(cfg: TrainConfig, source: data.Source, cache: Cache | None) -> Preprocess:
    """The student's preprocessing: ``--norm`` (else the dataset's statistics) at the size and
    interpolation of :func:`student_views` (without a cache: ``--size`` else the images' side, and
    ``--interpolation`` else bilinear), with the default evaluation crop."""
    views = student_views(cfg, cache)
    size = views.size if views is not None else cfg.size or source.image_size
    interpolation = views.interpolation if views is not None else cfg.interpolation or "bilinear"
    pre = preprocess.resolve(None, source.mean, source.std, source.channels, size, cfg.norm)
    return dataclasses.replace(pre, interpolation=interpolation)


def training_labels(cfg: TrainConfig, source: data.Source) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels the student's CE sees for all N samples, sorted kept sample indices or None for all)."""
    labels, kept = source.train.labels, None
    if cfg.imbalance != 1:
        kept = robust.long_tail_indices(labels, cfg.imbalance, source.num_classes, cfg.seed)
    if cfg.label_noise:
        labels = robust.noisy_labels(labels, cfg.label_noise, source.num_classes, cfg.seed, among=kept)
    return labels, kept


def schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Warm-up, then cosine, step (x0.1 at 30, 60 and 90 %) or constant, per step."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if cfg.schedule == "step":
            return 0.1 ** ((step * 10) // (3 * max(total, 1)))  # x0.1 at 30%, 60%, 90% of training
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_for(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.momentum > 0)


def open_checked_cache(cfg: TrainConfig, source: data.Source) -> Cache | None:
    """The cache ``cfg`` names, refused unless it was made from ``source`` and is whole."""
    cache = open_cache(cfg.cache) if cfg.cache else None
    if cache is not None:
        cache.check_dataset(source.spec, source.fingerprint, source.num_classes, len(source.train), source.parts)
        cache.check_readable()
    return cache


def check(cfg: TrainConfig | TrainSettings) -> None:
    """Raise what :func:`set_up` would raise about ``cfg`` before it trains: options, dataset, cache,
    student model, loss and online teacher. ``--nproc`` runs it once before starting the ranks."""
    settings = resolve(cfg)
    cfg = settings.config
    pick_device(cfg.device)  # a device that is not there is refused before anything is written
    source = data.open_source(settings.dataset)
    cache = open_checked_cache(cfg, source)
    models.create_model(cfg.model, source.num_classes, source.channels)
    criterion_for(cfg, cache)
    if cfg.online_teacher:
        OnlineTeacher(cfg.online_teacher, cfg.teacher_weights, source, torch.device("cpu"), class_map=cfg.class_map)
    student_preprocess(cfg, source, cache)


def set_up(cfg: TrainConfig | TrainSettings) -> Run:
    """Everything a run needs before its first step (torchrun: DDP, one rank per process)."""
    settings = resolve(cfg)
    cfg = settings.config
    torch.manual_seed(cfg.seed)
    device = distributed.init_if_needed(pick_device(cfg.device))
    rank, world = distributed.rank_world()
    source = data.open_source(settings.dataset)
    cache = open_checked_cache(cfg, source)

    criterion = criterion_for(cfg, cache)
    pre = student_preprocess(cfg, source, cache)
    online = (OnlineTeacher(cfg.online_teacher, cfg.teacher_weights, source, device, pre, cfg.class_map)
              if cfg.online_teacher else None)
    targets = CacheTargets.for_loss(cache, criterion) if cache is not None and online is None else None
    if targets is not None and "energy" in criterion.needs:
        criterion.prepare(torch.from_numpy(cache.all_energy(energy_temperature(cache.manifest)).reshape(-1)))

    stream = _stream(cfg, source, cache, pre, targets, rank, world)
    workers = loader_workers(cfg.workers, device)
    limit_codec_threads(codec_threads(device))
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)  # no restart cost per epoch; see TrainViews.set_epoch
    test_loader = eval_loader(source, "test", pre, max(cfg.batch_size, 256), rank=rank, world=world)

    model = models.create_model(cfg.model, source.num_classes, source.channels).to(device)
    tap = StudentFeatures(model, criterion.layer_pairs()) if criterion.layer_pairs() else None
    if tap is not None:
        criterion.build(tap.shapes(model, (source.channels, pre.size, pre.size), device), targets.teacher_shapes())
    criterion.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # convolution kernels' preferred layout
    net = distributed.wrap(model, device, extras=criterion)
    params = [*model.parameters(), *criterion.parameters()]
    optimizer = optimizer_for(params, cfg)
    steps_per_epoch = stream.num_batches()  # with --extra-views, both streams' batches
    precision = resolve_precision(cfg.precision if cfg.amp else "fp32", device, older_gpu="fp16")
    return Run(cfg=cfg, out=Path(cfg.out), device=device, rank=rank, world=world, source=source, cache=cache,
               criterion=criterion, pre=pre, online=online, targets=targets, stream=stream, loader=loader,
               workers=workers, test_loader=test_loader, model=model, tap=tap, net=net,
               step_net=torch.compile(net) if cfg.compile else net, params=params, optimizer=optimizer,
               scheduler=schedule(optimizer, cfg, steps_per_epoch),
               scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
               ema=EMA(model, cfg.ema) if cfg.ema else None, precision=precision, steps_per_epoch=steps_per_epoch)


def _stream(cfg: TrainConfig, source: data.Source, cache: Cache | None, pre: Preprocess,
            targets: CacheTargets | None, rank: int, world: int) -> TrainViews:
    """This rank's training views: the cache's recorded views (and extra views), else ``cfg.augment``."""
    if cache is not None:
        recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"], cfg.allow_version_drift)
        recipe.check_versions()
        recipe.check_pillow(cache.manifest.get("provenance", {}).get("pillow"))
        seed, views, block = int(cache.manifest["recipe"]["seed"]), cache.views, cache.chunk_samples
    else:
        recipe, seed, views, block = Recipe.parse(cfg.augment), cfg.seed, None, 256
        recipe.check_sampled()
    labels, kept = training_labels(cfg, source)
    replay = student_views(cfg, cache)
    if replay is not None:
        recipe.check_size(replay.size)
    images = source.train.bound(cache.input_checksums(), cache.path) if cache is not None else source.train
    renderer = (replay.renderer(images, recipe, pre.mean, pre.std, pre.crop_pct) if replay is not None
                else Renderer.for_model(images, recipe, pre))
    keep = None if kept is None else np.isin(np.arange(len(labels)), kept)
    stream = TrainViews(renderer, labels, block, seed, cfg.cache, targets.arrays() if targets else [], views,
                        batch_size=cfg.batch_size, keep=keep, rank=rank, world=world)
    if len(stream) == 0:
        raise InvalidSpec(f"rank {rank} of {world} has no training samples — use fewer processes")
    if cfg.extra_views:
        stream = with_extra_views(stream, cache, images, pre, cfg.allow_version_drift)
    return stream
