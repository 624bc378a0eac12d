"""Stage 1: run the teacher once over K recorded views per sample and write the cache.

Work is planned in whole shards; a shard's arrays are written together and only then is the shard
marked done, so an interrupted run resumes by skipping done shards without running the teacher on
them. The cache goes to ``ROOT/<cache id>``: a second run with the same inputs finds it and runs no
teacher forward at all.

Several processes (``torchrun`` or ``--nproc``) split the shards: rank r of W writes shards r,
r+W, …, so no shard ever has two writers. Rank 0 holds the writer lock (kdcache/lock.py), creates
or resumes the layout before the other ranks open it, and marks the cache complete after all of
them are done.

What is stored per view (docs/format.md): the teacher target in one of three logit modes (dense
logits, top-k log-probabilities, or N classes sampled from the teacher distribution as ids and
counts), energies from the full float32 logits, feature maps of named layers captured by forward
hooks, and the augmentation params.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kdcache import data, distributed, heda, models, teachers
from kdcache.augment import Recipe
from kdcache.augment.rng import Draws
from kdcache.errors import CacheCorrupt, CacheMismatch, InvalidSpec, KdcacheError, MissingData
from kdcache.lock import WriterLock
from kdcache.roots import alias_name, join, write_alias
from kdcache.store import (
    MAP_CODEC, MAP_LEVEL, ArraySpec, Cache, cache_exists, cache_id, create_cache, limit_codec_threads, open_cache,
    provenance, storage_dtype,
)
from kdcache.teachers import state_sha256  # noqa: F401  (re-exported: kdcache.precompute.state_sha256)
from kdcache.views import Renderer, prefetched

LOGIT_DTYPES = ("float16", "bfloat16", "float32")
FEATURE_MODES = ("full", "pooled", "attention")
SAMPLE_STREAM = 0xFFFF  # Philox stream of the class draws of ``sampled`` logits (ops use 0.. and 2**15 + k)
MAX_DRAWS = 65535  # counts are stored as uint8 (N <= 255) or uint16


@dataclass
class PrecomputeConfig:
    """Everything that decides what a precompute run stores (and where)."""

    dataset: str
    teacher: str | tuple[str, ...]  # several specs: an ensemble (kdcache/teachers.py)
    out: str
    weights: str | tuple[str, ...] | None = None  # one file per teacher spec, in order
    ensemble: str = "mean-prob"  # mean-prob | mean-logit, for two or more teachers
    keep_members: bool = False  # also store each ensemble member's dense logits
    views: int = 8
    seed: int = 0
    augment: str = "rrc+flip"
    teacher_size: int | None = None
    energy_t: tuple[float, ...] = (1.0, 4.0)
    logits: str = "dense"  # dense | topk:K | sampled:N
    logit_dtype: str = "float16"
    features: tuple[str, ...] = ()  # LAYER[:full|pooled|attention], mode attention by default
    batch_size: int = 256
    workers: int | None = None  # None: see loader_workers
    device: str = "auto"
    chunk_samples: int | None = None
    sharded: bool | None = None  # None: Zarr shards when an array would have > 10k chunk files
    progress: bool = True
    wait: bool = False  # another writer holds the cache: wait for it instead of stopping
    break_lock: bool = False  # remove the lock of a writer whose heartbeat stopped (kdcache/lock.py)
    he_extra: str | None = None  # R:K2[:cutmix|mixup], energy-guided extra mixed views (kdcache/heda.py)


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


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InvalidSpec(f"unknown device {device!r} — use auto, cpu or cuda[:N]") from exc


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader worker processes: ``requested``, or by default up to 4 beside a CUDA device and none
    on CPU, where a worker takes its core from the model's own threads."""
    if requested is not None:
        if requested < 0:
            raise InvalidSpec(f"--workers must be 0 or more, got {requested}")
        return requested
    if device.type != "cuda":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def codec_threads(device: torch.device) -> int | None:
    """Threads Zarr may compress and decompress on beside a model on ``device``: on a CPU the cores
    the model's threads leave free, at least one; beside a GPU, Zarr's own default (None)."""
    if device.type == "cuda":
        return None
    return max(1, (os.cpu_count() or 1) - torch.get_num_threads())


def energy(logits: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """``E = -T·logsumexp(z/T)`` per row and temperature: [B, len(temperatures)], float32."""
    z = logits.float()
    return torch.stack([-t * torch.logsumexp(z / t, dim=1) for t in temperatures], dim=1)


def parse_logits(text: str, num_classes: int, dtype: str) -> dict[str, Any]:
    """The manifest entry of ``--logits dense|topk:K|sampled:N`` for ``num_classes`` classes."""
    mode, _, size = text.partition(":")
    usage = f"--logits {text!r} is not dense, topk:K or sampled:N — e.g. --logits topk:10 or --logits sampled:50"
    if mode == "dense" and not size:
        return {"mode": "dense", "dtype": dtype}
    if mode not in ("topk", "sampled") or not size.isdigit() or int(size) < 1:
        raise InvalidSpec(usage)
    n = int(size)
    index_dtype = "int16" if num_classes <= np.iinfo(np.int16).max else "int32"
    if mode == "topk":
        if n > num_classes:
            raise InvalidSpec(f"--logits topk:{n} keeps more classes than the dataset's {num_classes} — "
                              f"use K <= {num_classes} (or --logits dense)")
        return {"mode": "topk", "k": n, "dtype": dtype, "values": "log_softmax", "index_dtype": index_dtype}
    if n > MAX_DRAWS:
        raise InvalidSpec(f"--logits sampled:{n} draws more than {MAX_DRAWS} classes per view — use N <= {MAX_DRAWS}")
    return {"mode": "sampled", "draws": n, "width": min(n, num_classes), "temperature": 1.0,
            "index_dtype": index_dtype, "count_dtype": "uint8" if n <= 255 else "uint16",
            "rng": {"stream": SAMPLE_STREAM}}


def target_specs(entry: dict[str, Any], num_classes: int) -> list[ArraySpec]:
    """The arrays that store the teacher target of logit mode ``entry``."""
    if entry["mode"] == "dense":
        return [ArraySpec("logits", (num_classes,), storage_dtype(entry["dtype"]), entry["dtype"])]
    if entry["mode"] == "topk":
        k = (entry["k"],)
        return [ArraySpec("topk/values", k, storage_dtype(entry["dtype"]), entry["dtype"]),
                ArraySpec("topk/indices", k, entry["index_dtype"])]
    width = (entry["width"],)
    return [ArraySpec("sampled/ids", width, entry["index_dtype"]),
            ArraySpec("sampled/counts", width, entry["count_dtype"])]


def topk_log_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest log-probabilities ``log_softmax(z)`` per row, descending, and their class ids."""
    values, indices = torch.log_softmax(logits.float(), dim=1).topk(k, dim=1)
    return values, indices


def sample_counts(logits: torch.Tensor, uniforms: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``N = uniforms.shape[1]`` classes per row from ``softmax(z)`` by inverting its CDF.

    Returns the distinct drawn ids and their counts, ``[B, width]`` each, by descending count (ties:
    lower id first), padded with id -1 and count 0. ``counts / N`` is an unbiased estimate of the
    teacher distribution (arXiv 2503.16870).
    """
    cdf = torch.softmax(logits.double(), dim=1).cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]
    drawn = torch.searchsorted(cdf, uniforms.to(cdf), right=True).clamp_max_(cdf.shape[1] - 1)
    counts = torch.zeros(cdf.shape, dtype=torch.int32, device=cdf.device)
    counts.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.int32))
    top, ids = counts.sort(dim=1, descending=True, stable=True)
    top, ids = top[:, :width], ids[:, :width]
    return torch.where(top > 0, ids, -1), top


def class_uniforms(seed: int, indices: np.ndarray, views: np.ndarray, draws: int) -> np.ndarray:
    """The uniforms behind the class draws of views (i, v), float64 [B, draws]: Philox stream SAMPLE_STREAM."""
    return Draws(seed, indices, views, SAMPLE_STREAM).uniform(draws)


def parse_features(specs: tuple[str, ...]) -> dict[str, str]:
    """``LAYER[:full|pooled|attention]`` entries as layer -> mode (attention when no mode is given)."""
    out: dict[str, str] = {}
    for spec in specs:
        layer, _, mode = spec.partition(":")
        mode = mode or "attention"
        if not layer or mode not in FEATURE_MODES:
            raise InvalidSpec(f"--features {spec!r} is not LAYER[:full|pooled|attention] — "
                              "e.g. --features layer3:attention")
        if layer in out:
            raise InvalidSpec(f"--features names layer {layer} twice — store one mode per layer")
        out[layer] = mode
    return out


def feature_shape(layer: str, shape: tuple[int, ...], mode: str) -> tuple[int, ...]:
    """Per-view shape stored for a layer whose output is ``shape`` (without the batch axis)."""
    if mode == "full":
        return shape
    if mode == "pooled":
        return shape[:1]
    if len(shape) != 3:
        raise InvalidSpec(f"layer {layer} outputs shape {list(shape)}, attention needs a [C,H,W] map — "
                          f"use --features {layer}:full or {layer}:pooled")
    return shape[1:]


def reduce_feature(output: torch.Tensor, mode: str) -> torch.Tensor:
    """What is kept of a layer's batch output, float16: the map, its spatial mean, or its attention map.

    attention is ``q = a / (||a||₂ + 1e-6)`` with ``a = Σ_c F_c²`` (computed in float32), the
    normalised map angular-margin distillation compares; normalised, it cannot overflow float16.
    """
    if mode == "full":
        return output.detach().to(torch.float16, copy=True)
    x = output.detach().float()
    if mode == "pooled":
        return (x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x).to(torch.float16)
    a = x.pow(2).sum(dim=1)
    return (a / (a.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-6)).to(torch.float16)


class FeatureTap:
    """Forward hooks that keep, per forward pass, only the reduced output of each requested layer.

    A caller that copies the maps out before the next pass may :meth:`give_back` what
    :meth:`take` returned; full maps are then copied into that memory instead of fresh memory,
    which costs the model's thread page faults (docs/benchmarks.md).
    """

    def __init__(self, model: torch.nn.Module, modes: dict[str, str]):
        modules = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self._lent: dict[str, torch.Tensor] = {}
        self._spare: dict[str, torch.Tensor] = {}
        self._handles = [modules[layer].register_forward_hook(self._hook(layer, mode)) for layer, mode in modes.items()]

    def _hook(self, layer: str, mode: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
            if layer in self.out:  # a module called twice in one pass: its first call, as `kdcache layers`
                return
            spare = self._spare.pop(layer, None)
            if mode == "full" and spare is not None and spare.shape == output.shape and spare.device == output.device:
                self.out[layer] = spare.copy_(output.detach())
            else:
                self.out[layer] = reduce_feature(output, mode)
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The maps of the last forward pass, reduced as requested (float16)."""
        out, self.out = self.out, {}
        self._lent = out
        return out

    def give_back(self) -> None:
        """Declare the maps :meth:`take` returned last unused from now on: the next pass may overwrite them."""
        self._spare, self._lent = dict(self._lent), {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def feature_entries(teacher: torch.nn.Module, spec: str, modes: dict[str, str],
                    input_shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Manifest entries of the requested feature layers, checked against the teacher's named layers."""
    if not modes:
        return []
    shapes = dict(models.list_layers(teacher, input_shape))
    entries = []
    for layer, mode in modes.items():
        if layer not in shapes:
            names = ", ".join(list(shapes)[:12])
            raise InvalidSpec(f"teacher {spec} has no layer {layer!r} with a tensor output — e.g. {names} "
                              f"(`kdcache layers {spec}` lists all)")
        tail = feature_shape(layer, tuple(shapes[layer]), mode)
        entries.append({"layer": layer, "mode": mode, "shape": list(tail), "dtype": "float16",
                        "array": f"features/{layer}"})
    return entries


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
    loader_workers(cfg.workers, torch.device("cpu"))  # a negative count is refused before anything is written
    parse_logits(cfg.logits, 1 << 20, cfg.logit_dtype)  # syntax only; the class count is checked later
    parse_features(tuple(cfg.features))


def run_config(cfg: PrecomputeConfig) -> dict[str, Any]:
    """The fully resolved settings of a run, as JSON (the manifest's ``config``; not part of the cache id):
    ``PrecomputeConfig(**run_config(cfg))`` reruns it."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(cfg).items()}


def build_manifest(
    cfg: PrecomputeConfig, source: data.Source, recipe: Recipe, teacher: dict[str, Any], size: int,
    features: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The manifest of the cache ``cfg`` describes (id and layout are added by the store);
    ``teacher`` is its teacher section (members and ensemble, see kdcache/teachers.py)."""
    return {
        "teacher": teacher,
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
            "logits": parse_logits(cfg.logits, source.num_classes, cfg.logit_dtype),
            "energy": {"temperatures": [float(t) for t in cfg.energy_t]},
            "features": features or [],
            **teachers.members_entry(len(teacher["members"]), cfg.keep_members, cfg.logit_dtype),
        },
        "provenance": provenance(),
        "config": run_config(cfg),
    }


class _ShardBatches(Dataset):
    """Batch ``k`` of the pending work: its shard, offset, params, class-draw uniforms and rendered inputs.

    Params and uniforms are drawn inside the worker: both are pure functions of (seed, i, v), so this
    equals drawing them in the main process, and no per-shard state needs to travel to workers.
    """

    def __init__(self, renderer: Renderer, recipe: Recipe, seed: int, views: int, num_samples: int,
                 batches: list[tuple[int, int, int, int]], draws: int = 0):
        self.renderer, self.recipe, self.seed = renderer, recipe, seed
        self.views, self.num_samples, self.batches, self.draws = views, num_samples, batches, draws

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[int, int, dict[str, np.ndarray], np.ndarray | None, torch.Tensor]:
        shard, shard_start, lo, hi = self.batches[k]
        pairs = np.arange(lo, hi, dtype=np.int64)
        indices = shard_start + pairs // self.views
        views = pairs % self.views
        params = self.recipe.sample(self.seed, indices, views, self.num_samples)
        uniforms = class_uniforms(self.seed, indices, views, self.draws) if self.draws else None
        return shard, lo, params, uniforms, self.renderer.batch(indices, params)


def _plan(cache: Cache, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, int, int, int]]:
    """(shard, first sample of shard, first pair, end pair) for every batch of this rank's unfinished shards.

    Rank r owns shards r, r+W, …: a fixed split, so ranks that read the done flags at different
    moments still never share a shard.
    """
    batches = []
    done = cache.shards_done()
    for shard in range(rank, cache.num_shards, world):
        if done[shard]:
            continue
        start, stop = cache.shard_range(shard)
        pairs = (stop - start) * cache.views
        batches += [(shard, start, lo, min(lo + batch_size, pairs)) for lo in range(0, pairs, batch_size)]
    return batches


def teacher_targets(logits: torch.Tensor, entry: dict[str, Any],
                    uniforms: torch.Tensor | None) -> dict[str, np.ndarray]:
    """The target arrays of one batch in logit mode ``entry``, computed on the logits' device."""
    if entry["mode"] == "dense":
        return {"logits": _numpy(logits.to(getattr(torch, entry["dtype"])))}
    if entry["mode"] == "topk":
        values, indices = topk_log_probs(logits, entry["k"])
        return {"topk/values": _numpy(values.to(getattr(torch, entry["dtype"]))),
                "topk/indices": indices.cpu().numpy().astype(entry["index_dtype"])}
    ids, counts = sample_counts(logits, uniforms, entry["width"])
    return {"sampled/ids": ids.cpu().numpy().astype(entry["index_dtype"]),
            "sampled/counts": counts.cpu().numpy().astype(entry["count_dtype"])}


def prepare(
    cfg: PrecomputeConfig, teacher: torch.nn.Module | list[torch.nn.Module] | None = None,
) -> tuple[data.Source, Recipe, int, torch.nn.Module, dict[str, str], dict[str, Any], list[ArraySpec]]:
    """Everything a run needs before it touches storage: source, recipe, teacher input size, the
    teacher to run (loaded, see kdcache/teachers.py), feature modes, manifest and array specs."""
    _validate(cfg)
    source = data.open_source(cfg.dataset)
    recipe = Recipe.parse(cfg.augment)
    size = cfg.teacher_size or source.image_size
    teacher, section = teachers.load_teachers(cfg.teacher, cfg.weights, source.num_classes, source.channels,
                                              cfg.ensemble, cfg.keep_members, modules=teacher)
    modes = parse_features(tuple(cfg.features))
    spec = "+".join(m["spec"] for m in section["members"])
    features = feature_entries(teacher, spec, modes, (source.channels, size, size))
    manifest = build_manifest(cfg, source, recipe, section, size, features)
    heda.add_to_manifest(manifest, cfg.he_extra, recipe, tuple(cfg.energy_t))
    entry = manifest["outputs"]["logits"]
    specs = [
        *target_specs(entry, source.num_classes),
        ArraySpec("energy", (len(cfg.energy_t),), "float32"),
        *[ArraySpec(f["array"], tuple(f["shape"]), "float16", **_map_codec(f["mode"])) for f in features],
        *[ArraySpec(f"aug/{name}", tuple(tail), dtype) for name, (tail, dtype) in recipe.fields().items()],
        *teachers.member_specs(manifest["outputs"], source.num_classes),
    ]
    return source, recipe, size, teacher, modes, manifest, specs


def check(cfg: PrecomputeConfig) -> None:
    """Raise what :func:`precompute` would raise about ``cfg`` before it touches storage: options,
    dataset, recipe, teachers and their weights. ``--nproc`` runs it once before starting the ranks."""
    prepare(cfg)


def precompute(
    cfg: PrecomputeConfig,
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
    source, recipe, size, teacher, modes, manifest, specs = prepare(cfg, teacher)
    entry = manifest["outputs"]["logits"]

    rank, _ = distributed.rank_world()
    device = distributed.init_if_needed(pick_device(cfg.device))
    cache, alias, lock = _claim(cfg, manifest, source, specs)
    try:
        if cache.complete:
            return PrecomputeResult(cache.path, cache.id, True, 0, time.perf_counter() - began, cache.manifest, alias)
        computed = _compute(cfg, cache, teacher, source, recipe, size, entry, specs, modes, device, lock, on_batch)
        distributed.barrier()
        if rank == 0:  # the extra views need every sample's energy: one writer, after all shards
            computed += heda.add_extra_views(cache, teacher.to(device).eval(), source.train, device, cfg.batch_size,
                                    cfg.progress)
        total = int(distributed.all_sum([computed], device)[0])
        if rank == 0:
            cache.finish()
        distributed.barrier()  # every rank returns once the cache is complete
    finally:
        if lock is not None:
            lock.release()
    manifest = cache.manifest if rank == 0 else open_cache(cache.path).manifest
    return PrecomputeResult(cache.path, cache.id, False, total, time.perf_counter() - began, manifest, alias)


def _compute(cfg: PrecomputeConfig, cache: Cache, teacher: torch.nn.Module, source: data.Source, recipe: Recipe,
             size: int, entry: dict[str, Any], specs: list[ArraySpec], modes: dict[str, str], device: torch.device,
             lock: WriterLock | None, on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None) -> int:
    """Run the teacher over this rank's unfinished shards and write each as it completes; the views computed."""
    rank, world = distributed.rank_world()
    teacher = teacher.to(device).eval()
    renderer = Renderer(source.train, recipe, size, source.mean, source.std)
    batches = _plan(cache, cfg.batch_size, rank, world)
    draws = entry["draws"] if entry["mode"] == "sampled" else 0
    workers = loader_workers(cfg.workers, device)
    loader = DataLoader(
        _ShardBatches(renderer, recipe, cfg.seed, cfg.views, len(source.train), batches, draws),
        batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
    )
    total = sum(hi - lo for _, _, lo, hi in batches)
    buffers: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}
    limit_codec_threads(codec_threads(device))
    tap = FeatureTap(teacher, modes)
    writer = _ShardWriter(cache, specs)
    try:
        with torch.inference_mode(), tqdm(total=total, unit="view", desc="precompute",
                                          disable=not cfg.progress or rank > 0, dynamic_ncols=True) as bar:
            for shard, lo, params, uniforms, inputs in (prefetched(loader) if workers == 0 else loader):
                logits = teacher(inputs.to(device, non_blocking=True)).float()
                if on_batch is not None:
                    on_batch(inputs, logits)
                if uniforms is not None:
                    uniforms = torch.as_tensor(uniforms).to(device)
                out = batch_outputs(teacher, tap, logits, cache.manifest["outputs"], uniforms, params)
                if shard not in buffers:
                    buffers[shard] = writer.buffers(shard)
                buf = buffers[shard]
                for name, values in out.items():
                    flat = buf[name].reshape(-1, *buf[name].shape[2:])
                    flat[lo : lo + len(values)] = values
                tap.give_back()  # the maps are copied into the shard's buffers
                filled[shard] = filled.get(shard, 0) + len(inputs)
                if filled[shard] == buf["energy"].shape[0] * cache.views:
                    if lock is not None:
                        lock.check()  # stop before writing if a --break-lock took this cache over
                    writer.submit(shard, buffers.pop(shard))
                bar.update(len(inputs))
            writer.wait()
    finally:
        tap.close()
        writer.close()
    return total


class _ShardWriter:
    """Writes finished shards on one background thread while the teacher computes the next.

    Compression and storage I/O release the GIL, so on a CPU with a spare core (or with the teacher
    on a GPU) the write costs the teacher nothing. At most one shard waits, which bounds memory to
    two shards' buffers; shards are written in order and each is marked done only after its arrays.
    A written shard's buffers are handed out again: filling fresh memory would cost the teacher's
    thread a page fault per 4 KiB (measurable with full feature maps, docs/benchmarks.md).
    """

    def __init__(self, cache: Cache, specs: list[ArraySpec]):
        from concurrent.futures import ThreadPoolExecutor

        self.cache, self.specs = cache, specs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer")
        self._pending: tuple[Any, dict[str, np.ndarray]] | None = None
        self._spare: dict[str, np.ndarray] | None = None

    def buffers(self, shard: int) -> dict[str, np.ndarray]:
        """Arrays ``[rows, K, ...]`` to fill with ``shard``'s views; every row must be filled before
        :meth:`submit`, since a recycled buffer still holds the views of a shard written before."""
        start, stop = self.cache.shard_range(shard)
        spare, self._spare = self._spare, None
        if spare is not None and len(spare["energy"]) == stop - start:
            return spare
        return {s.name: np.empty((stop - start, self.cache.views, *s.tail), dtype=s.dtype) for s in self.specs}

    def submit(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        self.wait()
        self._pending = (self._pool.submit(self.cache.write_shard, shard, arrays), arrays)

    def wait(self) -> None:
        """Block until the pending shard is written; re-raises its error."""
        if self._pending is not None:
            (future, arrays), self._pending = self._pending, None
            future.result()
            self._spare = arrays

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _map_codec(mode: str) -> dict[str, Any]:
    """Full feature maps take the codec measured best for them (docs/format.md); the rest the default."""
    return {"codec": MAP_CODEC, "level": MAP_LEVEL} if mode == "full" else {}


def _numpy(t: torch.Tensor) -> np.ndarray:
    """Tensor to numpy; bfloat16, which numpy lacks, is kept as its uint16 bit pattern."""
    if t.dtype == torch.bfloat16:
        return t.cpu().view(torch.int16).numpy().view(np.uint16)
    return t.cpu().numpy()


def _claim(cfg: PrecomputeConfig, manifest: dict[str, Any], source: data.Source,
           specs: list[ArraySpec]) -> tuple[Cache, str, WriterLock | None]:
    """The cache to reuse or write, and the writer lock that rank 0 holds while it is incomplete.

    A complete cache is reused without locking (readers never lock, and may lack write permission).
    Otherwise rank 0 takes the lock, then creates or resumes the layout — it may have been
    completed by the writer it waited for — and only then do the other ranks open it.
    """
    rank, _ = distributed.rank_world()
    path = join(cfg.out, cache_id(manifest))
    lock = None
    if rank == 0:
        if not _complete(path):
            lock = WriterLock(path, wait=cfg.wait, break_stale=cfg.break_lock).acquire()
        try:
            cache, alias = _open_or_create(cfg, manifest, source, specs)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if cache.complete and lock is not None:
            lock.release()
            lock = None
    distributed.barrier()
    if rank > 0:
        cache = open_cache(path, mode="r+", allow_incomplete=True)
        alias = join(cfg.out, alias_name(manifest, cache.id))
    return cache, alias, lock


def _complete(path: str) -> bool:
    try:
        return open_cache(path, allow_incomplete=True).complete
    except KdcacheError:
        return False


def _open_or_create(cfg: PrecomputeConfig, manifest: dict[str, Any], source: data.Source,
                    specs: list[ArraySpec]) -> tuple[Cache, str]:
    """The cache at ``cfg.out/<id>``: found (to reuse or resume) or created, and its alias path."""
    if cache_exists(cfg.out):
        raise InvalidSpec(f"--out {cfg.out} is itself a cache; --out is the root folder caches are kept under "
                          "— pass its parent folder")
    wanted = cache_id(manifest)
    path = join(cfg.out, wanted)
    try:
        cache = open_cache(path, mode="r+", allow_incomplete=True)
    except (MissingData, CacheCorrupt):  # nothing there yet, or a layout whose creation was interrupted
        cache = create_cache(path, manifest, source.train.labels, specs, chunk_samples=cfg.chunk_samples,
                             sharded=cfg.sharded)
    if cache.id != wanted and any(h.get("previous_id") == wanted for h in cache.manifest.get("history", [])):
        raise CacheMismatch(f"{path} was extended into cache {cache.id} ({cache.views} views), which holds every view "
                            f"of {wanted} — train from it, or precompute into another --out to rebuild {wanted}")
    if cache.id != wanted:
        raise CacheCorrupt(f"{path} holds cache {cache.id}, not {wanted} as its name says — delete that folder")
    return cache, write_alias(cfg.out, alias_name(manifest, wanted), wanted)


def batch_outputs(teacher: torch.nn.Module, tap: FeatureTap, logits: torch.Tensor, outputs: dict[str, Any],
                  uniforms: torch.Tensor | None, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every per-view array precompute stores for one teacher batch (``outputs``: the manifest's)."""
    return {
        **teacher_targets(logits, outputs["logits"], uniforms),
        "energy": energy(logits, tuple(outputs["energy"]["temperatures"])).cpu().numpy(),
        **{f"features/{layer}": fmap.cpu().numpy() for layer, fmap in tap.take().items()},
        **{f"aug/{name}": values for name, values in params.items()},
        **teachers.member_outputs(teacher, outputs),
    }
