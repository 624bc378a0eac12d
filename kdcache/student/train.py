"""Stage 2: train a student from a cache (the teacher is never loaded), from an online teacher, or
alone with cross-entropy.

Read top to bottom: settings, evaluation, the pieces of a run (data, loss, optimizer, checkpoint),
then the loop in :func:`train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdcache import data, distributed, losses, models, preprocess
from kdcache.augment import Recipe
from kdcache.cache.manifest import energy_temperature
from kdcache.cache.store import Cache, limit_codec_threads, open_cache
from kdcache.errors import InvalidSpec, TrainingDiverged
from kdcache.preprocess import Preprocess
from kdcache.runtime import AUTOCAST, codec_threads, loader_workers, pick_device, prefetched, resolve_precision
from kdcache.student import robust
from kdcache.student.config import TrainConfig
from kdcache.student.ema import EMA
from kdcache.student.evaluate import eval_loader, evaluate
from kdcache.student.extra_views import with_extra_views
from kdcache.student.online import OnlineTeacher, check_online
from kdcache.student.reader import TrainViews
from kdcache.student.targets import CacheTargets, StudentFeatures, layer_pairs, teacher_inputs
from kdcache.views import Renderer

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
# Settings that may differ between a run and its --resume without changing what it computes.
_RESUMABLE = {"resume", "progress", "workers", "device", "precision", "compile"}  # auto precision follows the device


@dataclasses.dataclass
class TrainResult:
    out: str
    metrics: list[dict[str, Any]]
    model: torch.nn.Module = dataclasses.field(repr=False)

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}


def _validate(cfg: TrainConfig) -> None:
    cfg.validate()
    pick_device(cfg.device)  # a device that is not there is refused before anything is written
    if cfg.optimizer not in OPTIMIZERS:
        raise InvalidSpec(f"--optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise InvalidSpec(f"--schedule {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if cfg.teacher_weights and not cfg.online_teacher:
        raise InvalidSpec("--weights is the online teacher's weights file — add --online-teacher MODEL")
    if cfg.class_map and not cfg.online_teacher:
        raise InvalidSpec("--class-map maps the online teacher's classes (a cache records its own) — add "
                          "--online-teacher MODEL, or drop --class-map")


def _criterion(cfg: TrainConfig, cache: Cache | None) -> losses.Loss:
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


def _student_preprocess(cfg: TrainConfig, source: data.Source, cache: Cache | None) -> Preprocess:
    """The student's preprocessing: ``--norm`` (else the dataset's statistics) at ``--size`` (else the
    cache's teacher size, else the images' side); bilinear, with the default evaluation crop."""
    size = cfg.size or (int(cache.manifest["recipe"]["input_size"]) if cache is not None else source.image_size)
    return preprocess.resolve(None, source.mean, source.std, source.channels, size, cfg.norm)


def _training_labels(cfg: TrainConfig, source: data.Source) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels the student's CE sees for all N samples, sorted kept sample indices or None for all)."""
    labels, kept = source.train.labels, None
    if cfg.imbalance != 1:
        kept = robust.long_tail_indices(labels, cfg.imbalance, source.num_classes, cfg.seed)
    if cfg.label_noise:
        labels = robust.noisy_labels(labels, cfg.label_noise, source.num_classes, cfg.seed, among=kept)
    return labels, kept


def _schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
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


def _optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.momentum > 0)


def _soft_labels(batch: dict[str, torch.Tensor], num_classes: int, device: torch.device) -> torch.Tensor | None:
    lam = batch["lam"].float()
    if bool((lam >= 1).all()):
        return None
    own = F.one_hot(batch["label"], num_classes).float()
    partner = F.one_hot(batch["partner_label"], num_classes).float()
    return (lam[:, None] * own + (1 - lam[:, None]) * partner).to(device)


def _teacher_batch(batch: dict[str, torch.Tensor], inputs: torch.Tensor, online: OnlineTeacher | None,
                   targets: CacheTargets | None, device: torch.device) -> losses.TeacherBatch:
    """The teacher's outputs for this batch: run online, read from the cache, or none (plain CE)."""
    if online is not None:
        return losses.TeacherBatch(logits=online(inputs))
    if targets is not None:
        return targets(batch, device)
    return losses.TeacherBatch()


def _check_resumable(out: Path, run: dict[str, Any]) -> None:
    """Refuse to continue a run with other settings: the result would match neither run."""
    saved_path = out / "run.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    changed = sorted(k for k, v in run.items() if k not in _RESUMABLE and saved.get(k, v) != v)
    if changed:
        raise InvalidSpec(f"--resume with other settings than {out} was started with ({', '.join(changed)}) "
                          "— repeat the original options, or train into a new --out")


def check(cfg: TrainConfig) -> None:
    """Raise what :func:`train` would raise about ``cfg`` before it trains: options, dataset, cache,
    student model, loss and online teacher. ``--nproc`` runs it once before starting the ranks."""
    _validate(cfg)
    source = data.open_source(cfg.dataset)
    cache = open_cache(cfg.cache) if cfg.cache else None
    if cache is not None:
        cache.check_dataset(source.spec, source.fingerprint, source.num_classes, len(source.train))
        cache.check_readable()
    models.create_model(cfg.model, source.num_classes, source.channels)
    _criterion(cfg, cache)
    if cfg.online_teacher:
        OnlineTeacher(cfg.online_teacher, cfg.teacher_weights, source, torch.device("cpu"), class_map=cfg.class_map)
    _student_preprocess(cfg, source, cache)


def train(cfg: TrainConfig) -> TrainResult:
    """Run stage 2 as ``cfg`` says; writes model.pt, checkpoint.pt, metrics.jsonl, run.json to ``cfg.out``."""
    _validate(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    device = distributed.init_if_needed(pick_device(cfg.device))  # torchrun: DDP, one rank per process
    rank, world = distributed.rank_world()

    # data
    source = data.open_source(cfg.dataset)
    cache = open_cache(cfg.cache) if cfg.cache else None
    if cache is not None:
        cache.check_dataset(source.spec, source.fingerprint, source.num_classes, len(source.train))
        cache.check_readable()
        recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
        seed, views = int(cache.manifest["recipe"]["seed"]), cache.views
        block = cache.chunk_samples
    else:
        recipe, seed, views = Recipe.parse(cfg.augment), cfg.seed, None
        block = 256
    labels, kept = _training_labels(cfg, source)

    # teacher side and loss
    criterion = _criterion(cfg, cache)
    pre = _student_preprocess(cfg, source, cache)
    online = (OnlineTeacher(cfg.online_teacher, cfg.teacher_weights, source, device, pre, cfg.class_map)
              if cfg.online_teacher else None)
    targets = CacheTargets.for_loss(cache, criterion) if cache is not None and online is None else None
    if targets is not None and "energy" in criterion.needs:
        criterion.prepare(torch.from_numpy(cache.all_energy(energy_temperature(cache.manifest)).reshape(-1)))

    size = pre.size
    renderer = Renderer.for_model(source.train, recipe, pre)
    keep = None if kept is None else np.isin(np.arange(len(labels)), kept)
    stream = TrainViews(renderer, labels, block, seed, cfg.cache, targets.arrays() if targets else [], views,
                        batch_size=cfg.batch_size, keep=keep, rank=rank, world=world)
    if len(stream) == 0:
        raise InvalidSpec(f"rank {rank} of {world} has no training samples — use fewer processes")
    if cfg.extra_views:
        stream = with_extra_views(stream, cache, source.train, pre)
    workers = loader_workers(cfg.workers, device)
    limit_codec_threads(codec_threads(device))
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)  # no restart cost per epoch; see TrainViews.set_epoch
    test_loader = eval_loader(source, "test", pre, max(cfg.batch_size, 256), rank=rank, world=world)

    # model, feature hooks, adaptors, optimizer
    model = models.create_model(cfg.model, source.num_classes, source.channels).to(device)
    tap = StudentFeatures(model, criterion.layer_pairs()) if criterion.layer_pairs() else None
    if tap is not None:
        criterion.build(tap.shapes(model, (source.channels, size, size), device), targets.teacher_shapes())
    criterion.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # convolution kernels' preferred layout
    net = distributed.wrap(model, device, extras=criterion)  # DDP with several ranks, else the model
    step_net = torch.compile(net) if cfg.compile else net
    params = [*model.parameters(), *criterion.parameters()]
    optimizer = _optimizer(params, cfg)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    steps_per_epoch = stream.num_batches()  # with --extra-views, both streams' batches
    scheduler = _schedule(optimizer, cfg, steps_per_epoch)
    precision = resolve_precision(cfg.precision if cfg.amp else "fp32", device, older_gpu="fp16")
    autocast_dtype = AUTOCAST[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # checkpoint
    fresh = not (out / "checkpoint.pt").exists() and not (out / "run.json").exists()
    out.mkdir(parents=True, exist_ok=True)
    metrics: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint_path = out / "checkpoint.pt"
    run = json.loads(json.dumps(dataclasses.asdict(cfg))) | {
        "loss": criterion.name, "hparams": dict(criterion.hparams), "size": size, "train_samples": len(stream),
        "preprocess": pre.to_manifest(), "precision": precision,
        "cache_id": cache.id if cache else None, "online_teacher_sha256": online.sha256 if online else None,
    }
    if cfg.resume and checkpoint_path.exists():
        _check_resumable(out, run)
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        criterion.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch = int(state["epoch"]) + 1
        metrics = _read_metrics(out / "metrics.jsonl")[:start_epoch]
    if rank == 0:
        (out / "run.json").write_text(json.dumps(run, indent=2))

    with _discarded_on_failure(out, fresh and rank == 0):  # a run that never finished an epoch leaves nothing
        for epoch in range(start_epoch, cfg.epochs):
            stream.set_epoch(epoch)
            model.train()
            began = time.perf_counter()
            tally = RunningSums(device, every=1 if device.type == "cpu" else LOG_EVERY)
            batches = prefetched(loader) if workers == 0 else loader  # workers, if any, already run ahead
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img",
                       unit_scale=cfg.batch_size,
                       disable=not cfg.progress or rank > 0, dynamic_ncols=True, leave=False)
            for batch in distributed.uneven(bar, net):
                inputs = batch["input"].to(device, non_blocking=True)
                if device.type == "cuda":
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                labels = batch["label"].to(device)
                info = losses.Batch(labels=labels, soft_labels=_soft_labels(batch, source.num_classes, device),
                                    epoch=epoch, mixed=(batch["lam"] < 1).to(device),
                                    label_smoothing=cfg.label_smoothing)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = step_net(inputs)
                    teacher = _teacher_batch(batch, inputs, online, targets, device)
                student = losses.StudentOutput(logits=logits.float(), features=tap.take() if tap else {})
                total, terms = criterion(student, teacher, info)
                reference = teacher.logits if teacher.logits is not None else teacher.probs
                tally.add(len(labels), total, terms, logits.argmax(dim=1), labels, reference)
                tally.check(epoch, checkpoint_path, bar)  # a non-finite loss stops before its step
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update(model)

            tally.check(epoch, checkpoint_path, bar, force=True)
            seconds = time.perf_counter() - began
            names, values = tally.totals()  # one read of the device sums per epoch
            seen, correct, agree, *totals = distributed.all_sum(values, device)
            sums = dict(zip(names, totals))  # every rank's views: the epoch's figures, whatever the number of ranks
            test = evaluate(model, test_loader, device)
            ema_test = evaluate(ema.module, test_loader, device) if ema is not None else {}
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                **{name: value / seen for name, value in sums.items()},
                "train_top1": 100.0 * correct / seen,
                **({"teacher_agreement": 100.0 * agree / seen} if cache is not None or online else {}),
                "test_top1": test["top1"],
                "test_top5": test["top5"],
                "test_ece": test["ece"],
                "test_loss": test["loss"],
                **{f"ema_test_{name}": value for name, value in ema_test.items()},
                "lr": scheduler.get_last_lr()[0],
                "images_per_s": seen / seconds,
                "seconds": seconds,
            }
            metrics.append(record)
            if rank > 0:
                continue
            _write_metrics(out / "metrics.jsonl", metrics)
            torch.save({"model": model.state_dict(), "loss": criterion.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch,
                        "ema": ema.state_dict() if ema is not None else None}, checkpoint_path)
            torch.save(model.state_dict(), out / "model.pt")  # the student alone: adaptors stay in checkpoint.pt
            if ema is not None:
                torch.save(ema.state_dict(), out / "model_ema.pt")
    return TrainResult(str(out), metrics, model)


LOG_EVERY = 25  # steps between reads of the running sums on an accelerator (progress bar, non-finite check)


class RunningSums:
    """An epoch's running sums, kept on the device: read every ``every`` steps (the progress bar and the
    non-finite check) and once at the end, not once per step and term."""

    def __init__(self, device: torch.device, every: int) -> None:
        self.device, self.every = device, every
        self.seen, self.steps, self.checked = 0, 0, 0
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.agree = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, n: int, total: torch.Tensor, terms: dict[str, Any], predicted: torch.Tensor, labels: torch.Tensor,
            reference: torch.Tensor | None) -> None:
        self.seen += n
        self.steps += 1
        for name, value in {"loss": total, **terms}.items():
            value = torch.as_tensor(value, device=self.device).detach().to(torch.float64) * n
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.correct += predicted.eq(labels).sum()
        if reference is not None:
            self.agree += predicted.eq(reference.argmax(dim=1)).sum()

    def check(self, epoch: int, checkpoint: Path, bar: tqdm, force: bool = False) -> None:
        """Every ``every`` steps (and with ``force``): refuse a non-finite loss, naming the steps, and
        update the progress bar."""
        if not self.steps or (self.steps % self.every and not force) or self.checked == self.steps:
            return
        loss = float(self.sums["loss"]) / self.seen
        if not math.isfinite(loss):
            where = (f"step {self.steps}" if self.steps == self.checked + 1
                     else f"steps {self.checked + 1}–{self.steps}")
            kept = (f"{checkpoint} keeps the last good epoch (--resume continues from it)" if checkpoint.exists()
                    else "no epoch had finished, so nothing was kept")
            raise TrainingDiverged(f"the loss became {loss} at epoch {epoch + 1}, {where} — lower --lr or check "
                                   f"the loss parameters; {kept}")
        self.checked = self.steps
        bar.set_postfix(loss=f"{loss:.3f}")

    def totals(self) -> tuple[list[str], list[float]]:
        """(names of the sums, [seen, correct, agree, *sums]) as host numbers: one read."""
        names = list(self.sums)
        values = torch.stack([self.correct, self.agree, *self.sums.values()]).tolist()
        return names, [self.seen, *values]


@contextlib.contextmanager
def _discarded_on_failure(out: Path, fresh: bool) -> Iterator[None]:
    """Remove what a fresh run wrote when it fails before its first checkpoint: nothing would resume
    from it, and a later run must not take it for a started one."""
    try:
        yield
    except BaseException:
        if fresh and not (out / "checkpoint.pt").exists():
            for name in ("run.json", "metrics.jsonl", "run.toml"):
                (out / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    os.replace(tmp, path)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
