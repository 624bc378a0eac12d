"""Energy-guided extra views (HE-DA at precompute time, Kim et al., arXiv 2311.14334).

``precompute --he-extra R:K2[:cutmix|mixup]``: once the K regular views are cached, samples are ranked
by their mean teacher energy over those views (at T=4 when stored, else the first stored T; high
energy = low confidence) and the highest-energy fraction R gets K2 extra *mixed* views whose teacher
outputs are cached too. ``train --he-da`` adds them to every epoch, one extra view per chosen sample
(cycling through the K2), with no teacher.

Layout (docs/format.md): ``he/indices [M]`` (chosen samples, sorted), ``he/status [shards]``, and for
every per-view array of the cache its mirror ``he/<array> [M, K2, ...]`` — teacher target, energy,
features — with ``he/aug/<field>`` holding the params of the HE recipe: the cache's view ops (any
mixing op dropped) followed by ``cutmix`` (λ~Beta(1,1)) or ``mixup:0.2``, mixing every view.
Extra view v of sample i samples its params as view index ``VIEW_BASE + v``: pure in (seed, i, v)
and never the index of a regular view, however many views a cache has or grows to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset
from tqdm import tqdm

from kdcache.augment import Recipe
from kdcache.augment.mixing import CutMix, MixUp
from kdcache.data import ImageSet
from kdcache.errors import CacheCorrupt, CacheMismatch, InvalidSpec
from kdcache.store import ArraySpec, Cache
from kdcache.views import Block, Renderer, TrainViews, plan_epoch

if TYPE_CHECKING:
    from kdcache.replay import ViewSet

PREFIX = "he/"
VIEW_BASE = 1 << 31
MIX_OPS = {"cutmix": CutMix(), "mixup": MixUp(alpha=0.2)}  # the paper's HE-DA settings (losses.md)


def parse(text: str) -> dict[str, Any]:
    """``R:K2[:cutmix|mixup]`` (R in (0, 1], default op cutmix) as ``{"fraction", "views", "op"}``."""
    parts = text.split(":")
    usage = f"--he-extra {text!r} is not R:K2[:cutmix|mixup] — e.g. --he-extra 0.5:4 or 0.3:2:mixup"
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in MIX_OPS):
        raise InvalidSpec(usage)
    try:
        fraction, views = float(parts[0]), int(parts[1])
    except ValueError as exc:
        raise InvalidSpec(usage) from exc
    if not 0 < fraction <= 1 or views < 1:
        raise InvalidSpec(f"--he-extra {text!r} needs 0 < R <= 1 and K2 >= 1 — e.g. --he-extra 0.5:4")
    return {"fraction": fraction, "views": views, "op": parts[2] if len(parts) == 3 else "cutmix"}


def recipe_for(recipe: Recipe, op: str) -> Recipe:
    """The recipe of the extra views: the cache's view ops, then ``op`` mixing every view."""
    return Recipe((*(o for o in recipe.ops if o.name not in MIX_OPS), MIX_OPS[op]))


def add_to_manifest(manifest: dict[str, Any], text: str | None, recipe: Recipe, temperatures: tuple[float, ...]) -> None:
    """Record ``--he-extra`` under ``recipe.he_extra``, part of the cache id; nothing when ``text`` is None."""
    if text is None:
        return
    entry = parse(text)
    temps = [float(t) for t in temperatures]
    entry |= {"energy_temperature": 4.0 if 4.0 in temps else temps[0], "view_base": VIEW_BASE,
              "augment": recipe_for(recipe, entry["op"]).to_manifest()}
    manifest["recipe"]["he_extra"] = entry


def choose(cache: Cache, fraction: float, temperature: float) -> tuple[np.ndarray, float]:
    """(sorted indices of the top-``fraction`` samples by mean energy over the K views, the lowest chosen
    energy). ``M = max(1, round(fraction·N))``; ties go to the lower index."""
    mean = cache.all_energy(temperature).astype(np.float64).mean(axis=1)
    m = min(len(mean), max(1, round(fraction * len(mean))))
    order = np.lexsort((np.arange(len(mean)), -mean))
    return np.sort(order[:m]).astype(np.int64), float(mean[order[m - 1]])


def _specs(cache: Cache, recipe: Recipe) -> list[ArraySpec]:
    specs = []
    for a in cache.manifest["layout"]["arrays"]:
        if a["name"].startswith("aug/"):
            continue
        codec, _, level = a["codec"].rpartition(":")
        specs.append(ArraySpec(a["name"], tuple(a["tail"]), a["dtype"], a.get("logical_dtype"), codec, int(level)))
    return specs + [ArraySpec(f"aug/{name}", tuple(tail), dtype) for name, (tail, dtype) in recipe.fields().items()]


def _layout(cache: Cache, entry: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """Create (or find) the ``he/`` arrays; returns the manifest's ``he`` section."""
    indices, threshold = choose(cache, entry["fraction"], entry["energy_temperature"])
    if "he" in cache.manifest and cache.has_array(f"{PREFIX}status"):
        if not np.array_equal(cache.read_array(f"{PREFIX}indices"), indices):
            raise CacheCorrupt(f"cache {cache.path} chose other HE samples before — delete its he/ folder and rerun")
        return cache.manifest["he"]
    m, k2, specs = len(indices), entry["views"], _specs(cache, recipe)
    chunk = min(cache.chunk_samples, m)
    shard = chunk * max(1, cache.shard_samples // cache.chunk_samples)
    cache.add_view_group(PREFIX, specs, indices, k2, chunk, shard)
    cache.manifest["he"] = {
        "samples": m, "views": k2, "threshold_energy": threshold, "chunk_samples": chunk, "shard_samples": shard,
        "arrays": [{"name": PREFIX + s.name, "tail": list(s.tail), "dtype": s.dtype,
                    "logical_dtype": s.logical or s.dtype} for s in specs],
    }
    cache.save_manifest(cache.manifest)
    return cache.manifest["he"]


def add_extra_views(cache: Cache, teacher: torch.nn.Module, images: ImageSet, device: torch.device, batch_size: int = 256,
           progress: bool = True) -> int:
    """Compute and write the extra views the manifest asks for (none without ``he_extra``); returns how
    many were computed. Every regular shard must be done: the choice needs every sample's energy.
    HE shards are written whole and marked done in ``he/status``, so a rerun resumes them."""
    from kdcache.precompute import FeatureTap, _numpy, class_uniforms, energy, teacher_targets

    entry = cache.manifest["recipe"].get("he_extra")
    if entry is None:
        return 0
    recipe = Recipe.from_manifest(entry["augment"])
    he = _layout(cache, entry, recipe)
    indices = cache.read_array(f"{PREFIX}indices")
    seed, k2, rows = int(cache.manifest["recipe"]["seed"]), he["views"], he["shard_samples"]
    rec = cache.manifest["recipe"]
    renderer = Renderer(images, recipe, int(rec["input_size"]), rec["mean"], rec["std"])
    target = cache.manifest["outputs"]["logits"]
    temps = tuple(float(t) for t in cache.manifest["outputs"]["energy"]["temperatures"])
    tap = FeatureTap(teacher, {f["layer"]: f["mode"] for f in cache.manifest["outputs"].get("features", [])})
    todo = np.flatnonzero(cache.read_array(f"{PREFIX}status") == 0).tolist()
    computed = 0
    try:
        with torch.inference_mode(), tqdm(total=sum(min(rows, len(indices) - s * rows) * k2 for s in todo),
                                          unit="view", desc="he-extra", disable=not progress) as bar:
            for shard in todo:
                lo, hi = shard * rows, min((shard + 1) * rows, len(indices))
                pairs = np.arange((hi - lo) * k2)
                buf: dict[str, np.ndarray] = {}
                for a in range(0, len(pairs), batch_size):
                    p = pairs[a : a + batch_size]
                    samples, views = indices[lo + p // k2], VIEW_BASE + p % k2
                    params = recipe.sample(seed, samples, views, cache.num_samples)
                    logits = teacher(renderer.batch(samples, params).to(device)).float()
                    uniforms = (torch.as_tensor(class_uniforms(seed, samples, views, target["draws"])).to(device)
                                if target["mode"] == "sampled" else None)
                    out = {**teacher_targets(logits, target, uniforms), "energy": energy(logits, temps).cpu().numpy(),
                           **{f"features/{layer}": _numpy(t) for layer, t in tap.take().items()},
                           **{f"aug/{name}": values for name, values in params.items()}}
                    for name, values in out.items():
                        if name not in buf:
                            buf[name] = np.zeros((len(pairs), *values.shape[1:]), dtype=values.dtype)
                        buf[name][a : a + len(values)] = values
                    bar.update(len(p))
                for name, values in buf.items():
                    cache.write_views(PREFIX + name, lo, 0, values.reshape(hi - lo, k2, *values.shape[1:]))
                cache.mark_done(f"{PREFIX}status", shard)
                computed += len(pairs)
    finally:
        tap.close()
    return computed


def view_set(cache: Cache) -> ViewSet | None:
    """The extra views of a cache as a :class:`kdcache.replay.ViewSet`, or None when it has none."""
    from kdcache.replay import ViewSet

    entry, he = cache.manifest["recipe"].get("he_extra"), cache.manifest.get("he")
    if entry is None or he is None:
        return None
    indices = cache.read_array(f"{PREFIX}indices").astype(np.int64)
    return ViewSet("extra view", PREFIX, Recipe.from_manifest(entry["augment"]), indices, int(he["views"]), VIEW_BASE)


# ---- training: the extra views as a second stream --------------------------------------------
class ExtraViews(TrainViews):
    """The ``he/`` views of a cache, one per chosen sample per epoch (cycling through the K2), read and
    batched like :class:`TrainViews` reads the regular ones. Teacher arrays keep their plain names, so
    the loss sees them exactly as regular views."""

    prefix, view_base = PREFIX, VIEW_BASE

    def __init__(self, renderer: Renderer, labels: np.ndarray, samples: np.ndarray, block: int, seed: int,
                 cache_path: str, teacher_arrays: list[str], views: int, batch_size: int,
                 keep: np.ndarray | None = None, rank: int = 0, world: int = 1):
        super().__init__(renderer, labels, block, seed, cache_path, teacher_arrays, views, rank=rank, world=world,
                         batch_size=batch_size, keep=keep)
        self.samples = np.asarray(samples, dtype=np.int64)

    def num_rows(self) -> int:
        return len(self.samples)

    def __len__(self) -> int:
        blocks = plan_epoch(len(self.samples), self.block, self.views, self.seed, 0, self.rank, self.world)
        if self.keep is None:
            return sum(b.stop - b.start for b in blocks)
        return sum(int(self.keep[self.samples[b.start : b.stop]].sum()) for b in blocks)

    def _samples(self, block: Block) -> np.ndarray:
        return self.samples[block.start : block.stop]


class Interleaved(IterableDataset):
    """Batches of two batch-yielding streams, interleaved in proportion to their lengths."""

    def __init__(self, first: TrainViews, second: TrainViews):
        self.first, self.second = first, second

    def set_epoch(self, epoch: int) -> None:
        self.first.set_epoch(epoch)
        self.second.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def num_batches(self) -> int:
        """Batches per epoch: each stream's own, as they are not merged into shared batches."""
        return self.first.num_batches() + self.second.num_batches()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        streams = [iter(self.first), iter(self.second)]
        sizes = [max(1, s.num_batches()) for s in (self.first, self.second)]
        sent = [0, 0]
        while streams[0] is not None or streams[1] is not None:
            live = [k for k in (0, 1) if streams[k] is not None]
            k = min(live, key=lambda k: ((sent[k] + 1) / sizes[k], k))
            try:
                yield next(streams[k])
                sent[k] += 1
            except StopIteration:
                streams[k] = None


def with_extra_views(stream: TrainViews, cache: Cache | None, images: ImageSet, size: int) -> Interleaved:
    """``stream`` plus the cache's extra views (``train --he-da``); a one-line error when there are none."""
    if cache is None:
        raise InvalidSpec("--he-da trains on the extra views a cache stores — pass --cache PATH")
    entry, he = cache.manifest["recipe"].get("he_extra"), cache.manifest.get("he")
    if entry is None or he is None:
        raise CacheMismatch(f"cache {cache.path} has no energy-guided extra views — precompute it with "
                            "--he-extra 0.5:4, or train without --he-da")
    rec = cache.manifest["recipe"]
    renderer = Renderer(images, Recipe.from_manifest(entry["augment"]), size, rec["mean"], rec["std"])
    samples = cache.read_array(f"{PREFIX}indices").astype(np.int64)
    extra = ExtraViews(renderer, stream.labels, samples, int(he["chunk_samples"]), stream.seed, stream.cache_path,
                       stream.teacher_arrays, int(he["views"]), stream.batch_size, stream.keep, stream.rank,
                       stream.world)
    return Interleaved(stream, extra)
