"""Verification by recompute: replay stored views, rerun the teacher, compare with the cache.

``kdcache verify CACHE --recompute N --weights W`` checks what a checksum cannot: that the numbers
in the cache are still what the teacher says about the views the params describe. For each of N
(sample, view) pairs, chosen as ``sorted(numpy.random.default_rng(SEED).choice(P, N, replace=False))``
over the P pairs of written shards (regular views first, then HE extra views, in row-major order):

1. the params are sampled afresh from (seed, i, v) and must equal the stored ``aug/*`` rows bit for
   bit — a difference names the field and its op (a tampered row, or an op that samples differently);
2. the view is replayed from the *stored* params, as training would replay it, and the teacher is
   rerun on it in float32; every cached output must match within the tolerance below — a difference
   names the array (a tampered value, or an op that renders differently).

Tolerances (``|Δ|`` per element, ``ε`` the machine epsilon of the stored dtype: 2^-10 float16,
2^-7 bfloat16, 2^-23 float32): ``|Δ| ≤ r·(|z| + 1)`` with ``r = max(4ε, 1e-4)``. Four epsilons
cover the rounding to the stored dtype (half an ulp) plus float32 noise from another batch
composition; the 1e-4 floor is that noise for float32 outputs. It applies to dense logits, top-k
log-probabilities (the recomputed log-probability at each stored class, and the recomputed top-k
values), energies (float32) and feature maps (float16). Sampled targets are recomputed with the
same class-draw uniforms and must equal the stored ids and counts exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache import data, models, teachers
from kdcache.augment import Recipe
from kdcache.errors import CacheMismatch, InvalidSpec, WeightsMismatch
from kdcache.inspect import Findings, Problem
from kdcache.precompute import FeatureTap, class_uniforms, energy, pick_device, sample_counts, topk_log_probs
from kdcache.store import Cache, decode_logits, open_cache
from kdcache.teachers import state_sha256
from kdcache.views import Renderer

EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23}
NOISE = 1e-4  # float32 difference between two batch compositions, relative


@dataclass(frozen=True)
class ViewSet:
    """A family of cached views: arrays under ``prefix``, row r is sample ``samples[r]``, its view v was
    sampled as view index ``view_base + v`` of ``recipe``."""

    name: str
    prefix: str
    recipe: Recipe
    samples: np.ndarray
    views: int
    view_base: int


@dataclass
class Replay(Findings):
    """What ``verify --recompute`` found; ``ok`` when every replayed pair matched."""

    path: str
    cache_id: str
    pairs: int
    seed: int
    problems: list[Problem] = field(default_factory=list)


def tolerance(values: np.ndarray, dtype: str) -> np.ndarray:
    """Largest accepted ``|Δ|`` per element for outputs stored as ``dtype`` (see the module docstring)."""
    return max(4 * EPSILON[dtype], NOISE) * (np.abs(values) + 1.0)


def view_sets(cache: Cache) -> list[ViewSet]:
    """The regular views of the written shards and, when the cache has them, the HE extra views."""
    from kdcache import heda

    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    done = np.repeat(cache.shards_done(), cache.shard_samples)[: cache.num_samples]
    sets = [ViewSet("view", "", recipe, np.flatnonzero(done), cache.views, 0)]
    extra = heda.view_set(cache)
    return sets + ([extra] if extra is not None else [])


def load_teacher(cache: Cache, weights: list[str]) -> torch.nn.Module:
    """The cache's teacher (one model or its ensemble) from the manifest's specs and ``weights``, one file
    per member in order; a file that does not hash as the manifest says is refused before any replay."""
    members, ds = cache.manifest["teacher"]["members"], cache.manifest["dataset"]
    if len(weights) != len(members):
        raise InvalidSpec(f"cache {cache.id} was made by {len(members)} teacher(s), got {len(weights)} --weights "
                          "— pass one weights file per teacher, in the manifest's order (`kdcache info`)")
    for member, path in zip(members, weights):
        sha = models.file_sha256(path)
        if sha == member["sha256"]:
            continue
        model = models.create_model(member["spec"], int(ds["num_classes"]), int(ds["channels"]))
        models.load_weights(model, path, spec=member["spec"])
        if state_sha256(model) != member["sha256"]:  # a cache made from a module hashes its state instead
            raise WeightsMismatch(f"weights {path} ({sha[:19]}…) are not those of teacher {member['spec']} that "
                                  f"cache {cache.id} was made with ({member['sha256'][:19]}…) — pass that file")
    keep = bool(cache.manifest["outputs"].get("members"))
    teacher, _ = teachers.load_teachers([m["spec"] for m in members], list(weights), int(ds["num_classes"]),
                                        int(ds["channels"]), cache.manifest["teacher"].get("ensemble") or "mean-prob",
                                        keep)
    return teacher.eval()


def pick_pairs(sets: list[ViewSet], n: int, seed: int) -> list[tuple[ViewSet, np.ndarray, np.ndarray]]:
    """(view set, rows, views) of ``n`` pairs drawn without replacement over every set, in order."""
    sizes = [len(s.samples) * s.views for s in sets]
    total = sum(sizes)
    flat = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    out, offset = [], 0
    for s, size in zip(sets, sizes):
        mine = flat[(flat >= offset) & (flat < offset + size)] - offset
        if len(mine):
            out.append((s, mine // s.views, mine % s.views))
        offset += size
    return out


def recompute(path: str, n: int, weights: list[str], seed: int = 0, dataset: str | None = None,
              batch_size: int = 64, device: str = "cpu") -> Replay:
    """Replay ``n`` seeded (sample, view) pairs of the cache at ``path`` and compare (module docstring).

    ``dataset`` overrides the manifest's dataset spec (an image folder that moved); its fingerprint
    must still match.
    """
    if n <= 0:
        raise InvalidSpec(f"--recompute needs a positive number of pairs, got {n}")
    cache = open_cache(path)
    teacher = load_teacher(cache, list(weights))
    made = cache.manifest["dataset"]
    source = data.open_source(dataset or made["spec"])
    if source.fingerprint != made["fingerprint"]:
        raise CacheMismatch(f"dataset {source.spec} is not the one cache {cache.id} was made from ({made['spec']}) "
                            "— pass that dataset with --dataset")
    dev = pick_device(device)
    teacher = teacher.to(dev)
    modes = {f["layer"]: f["mode"] for f in cache.manifest["outputs"].get("features", [])}
    tap = FeatureTap(teacher, modes)
    report = Replay(cache.path, cache.id, 0, seed)
    try:
        for vset, rows, views in pick_pairs(view_sets(cache), n, seed):
            for lo in range(0, len(rows), batch_size):
                r, v = rows[lo : lo + batch_size], views[lo : lo + batch_size]
                report.problems += _check_batch(cache, vset, source, teacher, tap, r, v, dev)
                report.pairs += len(r)
    finally:
        tap.close()
    return report


def _check_batch(cache: Cache, vset: ViewSet, source: data.Source, teacher: torch.nn.Module, tap: FeatureTap,
                 rows: np.ndarray, views: np.ndarray, dev: torch.device) -> list[Problem]:
    recipe, prefix, seed = vset.recipe, vset.prefix, int(cache.manifest["recipe"]["seed"])
    samples = vset.samples[rows]
    stored = {name: cache.read_views(f"{prefix}aug/{name}", rows, views) for name in recipe.fields()}
    fresh = recipe.sample(seed, samples, vset.view_base + views, cache.num_samples)
    renderer = Renderer(source.train, recipe, int(cache.manifest["recipe"]["input_size"]),
                        cache.manifest["recipe"]["mean"], cache.manifest["recipe"]["std"])
    with torch.inference_mode():
        logits = teacher(renderer.batch(samples, stored).to(dev)).float()
        maps = {layer: t.float().cpu().numpy() for layer, t in tap.take().items()}
    excess = _output_excess(cache, prefix, logits, maps, samples, vset.view_base + views, rows, views, seed)
    if vset.prefix == "":  # kept ensemble members' logits exist for regular views only
        kept = cache.manifest["outputs"].get("members") or {"arrays": [], "dtype": "float16"}
        for name, z in zip(kept["arrays"], getattr(teacher, "last", [])):
            stored_z = decode_logits(cache.read_views(name, rows, views), kept["dtype"])
            excess[name] = _excess(stored_z, z.cpu().numpy(), kept["dtype"])
    owners = _field_ops(recipe)
    problems = []
    for j, (i, v) in enumerate(zip(samples.tolist(), views.tolist())):
        where = f"({i}, {v})" if not prefix else f"({i}, extra view {v})"
        outputs = [(name, d) for name, d in excess.items() if d[j] > 0]
        said = "; ".join(f"{name} {_differ(d[j])}" for name, d in outputs)
        changed = [name for name in stored if not np.array_equal(stored[name][j], fresh[name][j])]
        for name in changed:
            delta = float(np.max(np.abs(stored[name][j].astype(np.float64) - fresh[name][j].astype(np.float64))))
            shown = f"{delta:.0f}" if stored[name].dtype.kind in "iu" else f"{delta:.3g}"  # ids, fixed-point boxes
            consequence = f"replays to a different view: {said}" if outputs else "outputs still match"
            problems.append(Problem(f"{prefix}aug/{name}", cache.chunk_key(f"{prefix}aug/{name}", int(rows[j]), v),
                                     f"{where} holds params that op {owners[name]} does not sample for it "
                                     f"(max |Δ| {shown}); it {consequence}"))
        if outputs and not changed:
            for name, d in outputs:
                problems.append(Problem(name, cache.chunk_key(name, int(rows[j]), v),
                                         f"{where} replays (recipe {recipe.spec}) to outputs that {_differ(d[j])} "
                                         "— the value was modified, or an op renders differently in this "
                                         "kdcache/torchvision"))
    return problems


def _differ(amount: float) -> str:
    return "differ from the recomputed draws" if np.isinf(amount) else f"differ by {amount:.3g} beyond tolerance"


def _field_ops(recipe: Recipe) -> dict[str, str]:
    """Stored param field -> the op that samples it (``<op> of the mixing partner`` for partner fields)."""
    owners = {}
    for op in recipe.ops:
        for name in op.fields():
            owners[name] = op.name
            owners[f"partner_{name}"] = f"{op.name} of the mixing partner"
    return owners


def _excess(stored: np.ndarray, recomputed: np.ndarray, dtype: str) -> np.ndarray:
    """Per row: max ``|Δ|`` when any element exceeds its tolerance, else 0."""
    delta = np.abs(stored.astype(np.float64) - recomputed.astype(np.float64))
    over = (delta > tolerance(recomputed, dtype)).reshape(len(delta), -1).any(axis=1)
    return np.where(over, delta.reshape(len(delta), -1).max(axis=1), 0.0)


def _output_excess(cache: Cache, prefix: str, logits: torch.Tensor, maps: dict[str, np.ndarray], samples: np.ndarray,
                   param_views: np.ndarray, rows: np.ndarray, views: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Per cached output array, per pair: max ``|Δ|`` where it exceeds the tolerance (``inf`` for an
    exact mismatch), else 0."""
    def read(name: str) -> np.ndarray:
        return cache.read_views(prefix + name, rows, views)

    entry = cache.manifest["outputs"]["logits"]
    z = logits.cpu().numpy()
    out: dict[str, np.ndarray] = {}
    if entry["mode"] == "dense":
        out[prefix + "logits"] = _excess(decode_logits(read("logits"), entry["dtype"]), z, entry["dtype"])
    elif entry["mode"] == "topk":
        values = decode_logits(read("topk/values"), entry["dtype"])
        logp = torch.log_softmax(logits, dim=1).cpu().numpy()
        at_stored = np.take_along_axis(logp, read("topk/indices").astype(np.int64), axis=1)
        top = topk_log_probs(logits, entry["k"])[0].cpu().numpy()
        out[prefix + "topk/indices"] = _excess(values, at_stored, entry["dtype"])
        out[prefix + "topk/values"] = _excess(values, top, entry["dtype"])
    else:
        uniforms = torch.as_tensor(class_uniforms(seed, samples, param_views, entry["draws"])).to(logits.device)
        ids, counts = sample_counts(logits, uniforms, entry["width"])
        for name, again in (("sampled/ids", ids), ("sampled/counts", counts)):
            same = (read(name).astype(np.int64) == again.cpu().numpy()).all(axis=1)
            out[prefix + name] = np.where(same, 0.0, np.inf)
    temps = tuple(float(t) for t in cache.manifest["outputs"]["energy"]["temperatures"])
    out[prefix + "energy"] = _excess(read("energy"), energy(logits, temps).cpu().numpy(), "float32")
    for f in cache.manifest["outputs"].get("features", []):
        out[prefix + f["array"]] = _excess(read(f["array"]).astype(np.float32), maps[f["layer"]], "float16")
    return out
