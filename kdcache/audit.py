"""Verification by recompute: replay stored views, rerun the teacher, compare with the cache.

``kdcache verify CACHE --recompute N --weights W`` checks what a checksum cannot: that the numbers
in the cache are still what the teacher says about the views the params describe. For each of N
(sample, view) pairs, chosen as ``sorted(numpy.random.default_rng(SEED).choice(P, N, replace=False))``
over the P pairs of written shards (regular views first, then extra views, in row-major order):

1. the params are sampled afresh from (seed, i, v) and must equal the stored ``aug/*`` rows bit for
   bit — a difference names the field and its op (a tampered row, or an op that samples differently);
2. the view is replayed from the *stored* params through the student's path (``ViewReplay``: the teacher's
   size, interpolation and decode; the teacher's normalisation), and the teacher is
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

from kdcache import data
from kdcache.augment import Recipe
from kdcache.cache.integrity import Findings, Problem
from kdcache.cache.logits import decode_logits
from kdcache.cache.manifest import refuse_imported
from kdcache.cache.store import Cache, open_cache
from kdcache.cache.view_sets import ViewSet, view_sets
from kdcache.errors import InvalidSpec
from kdcache.models.preprocess import Preprocess
from kdcache.runtime import pick_device
from kdcache.teacher.ensemble import load_recorded
from kdcache.teacher.outputs import topk_log_probs
from kdcache.teacher.passes import PassOutput, ViewBatch, run_teacher
from kdcache.views import ViewReplay

EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23}


NOISE = 1e-4  # float32 difference between two batch compositions, relative


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


def recompute(path: str, n: int, weights: list[str] | None = None, seed: int = 0, dataset: str | None = None,
              batch_size: int = 64, device: str = "auto", allow_version_drift: bool = False) -> Replay:
    """Replay ``n`` seeded (sample, view) pairs of the cache at ``path`` and compare (module docstring).

    ``weights`` default to the paths the manifest records (their hashes are checked either way);
    ``dataset`` overrides the manifest's dataset spec (an image folder that moved); its fingerprint
    must still match. ``allow_version_drift``: replay a ``timm:`` recipe under other package versions than
    it recorded, which is what this check is for.
    """
    if n <= 0:
        raise InvalidSpec(f"--recompute needs a positive number of pairs, got {n}")
    cache = open_cache(path)
    refuse_imported(cache.manifest, cache.path, "verify --recompute")
    teacher = load_recorded(cache.manifest, weights)
    source = data.open_source(dataset or cache.manifest["dataset"]["spec"])
    cache.check_dataset(source.spec, source.fingerprint, source.num_classes, len(source.train), source.parts)
    dev = pick_device(device)
    teacher = teacher.to(dev)
    rec = cache.manifest["recipe"]
    teacher_pre = Preprocess.from_manifest(rec)  # the student's path (ViewReplay) with the teacher's normalisation
    report = Replay(cache.path, cache.id, 0, seed)
    sets = view_sets(cache, allow_version_drift)
    for vset in sets:
        vset.recipe.check_versions()
        vset.recipe.check_pillow(cache.manifest.get("provenance", {}).get("pillow"))
    for vset, rows, views in pick_pairs(sets, n, seed):
        batches = []
        for lo in range(0, len(rows), batch_size):
            r, v = rows[lo : lo + batch_size], views[lo : lo + batch_size]
            stored = {name: cache.read_views(f"{vset.prefix}aug/{name}", r, v) for name in vset.recipe.fields()}
            keep, problems = _screen(cache, vset, stored, r, v)
            report.problems += problems
            if keep.any():
                r, v, stored = r[keep], v[keep], {name: values[keep] for name, values in stored.items()}
                batches.append(ViewBatch(vset.samples[r], vset.view_base + v, stored, tag=(r, v)))
        images = source.train.bound(cache.input_checksums(), cache.path)
        renderer = ViewReplay.of(rec).renderer(images, vset.recipe, teacher_pre.mean, teacher_pre.std)
        for out in run_teacher(teacher, renderer, batches, cache.manifest["outputs"], seed=int(rec["seed"]),
                               num_samples=cache.num_samples, device=dev):
            report.problems += _check_batch(cache, vset, out)
            report.pairs += len(out.inputs)
    return report


def _screen(cache: Cache, vset: ViewSet, stored: dict[str, np.ndarray], rows: np.ndarray,
            views: np.ndarray) -> tuple[np.ndarray, list[Problem]]:
    """(which pairs to replay, a problem for each other one): stored params that no op writes are reported, not
    rendered (they would crash, hang or render something else)."""
    keep = np.ones(len(rows), dtype=bool)
    if vset.recipe.stored_problem(stored, cache.num_samples) is None:
        return keep, []
    problems = []
    for j in range(len(rows)):
        why = vset.recipe.stored_problem({name: values[j : j + 1] for name, values in stored.items()},
                                         cache.num_samples)
        if why is not None:
            keep[j] = False
            problems.append(Problem(f"{vset.prefix}aug", None, f"({int(vset.samples[rows[j]])}, {int(views[j])}): "
                                    f"{why} — no op writes that; the cache is damaged or forged"))
    return keep, problems


def _check_batch(cache: Cache, vset: ViewSet, out: PassOutput) -> list[Problem]:
    recipe, prefix, seed = vset.recipe, vset.prefix, int(cache.manifest["recipe"]["seed"])
    (rows, views), samples, stored = out.batch.tag, out.batch.samples, out.batch.params
    fresh = recipe.sample(seed, samples, out.batch.views, cache.num_samples)
    excess = _output_excess(cache, prefix, out, rows, views)
    if vset.prefix == "":  # kept ensemble members' logits are checked on regular views
        kept = cache.manifest["outputs"].get("members") or {"arrays": [], "dtype": "float16"}
        for name, z in zip(kept["arrays"], out.members):
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
    """Per row: max ``|Δ|`` when any element exceeds its tolerance, else 0; a NaN on one side only exceeds any
    (``inf``), equal infinities do not."""
    a, b = stored.astype(np.float64), recomputed.astype(np.float64)
    with np.errstate(invalid="ignore"):
        delta = np.abs(a - b)
        delta = np.where(a == b, 0.0, np.where(np.isnan(delta), np.inf, delta))
    over = ~(delta <= tolerance(recomputed, dtype))
    over = over.reshape(len(delta), -1).any(axis=1)
    return np.where(over, delta.reshape(len(delta), -1).max(axis=1), 0.0)


def _output_excess(cache: Cache, prefix: str, out: PassOutput, rows: np.ndarray,
                   views: np.ndarray) -> dict[str, np.ndarray]:
    """Per cached output array, per pair: max ``|Δ|`` where it exceeds the tolerance (``inf`` for an
    exact mismatch), else 0."""
    def read(name: str) -> np.ndarray:
        return cache.read_views(prefix + name, rows, views)

    entry = cache.manifest["outputs"]["logits"]
    logits = out.logits
    result: dict[str, np.ndarray] = {}
    if entry["mode"] == "dense":
        result[prefix + "logits"] = _excess(decode_logits(read("logits"), entry["dtype"]), logits.cpu().numpy(),
                                            entry["dtype"])
    elif entry["mode"] == "topk":
        values = decode_logits(read("topk/values"), entry["dtype"])
        logp = torch.log_softmax(logits, dim=1).cpu().numpy()
        at_stored = np.take_along_axis(logp, read("topk/indices").astype(np.int64), axis=1)
        top = topk_log_probs(logits, entry["k"])[0].cpu().numpy()
        result[prefix + "topk/indices"] = _excess(values, at_stored, entry["dtype"])
        result[prefix + "topk/values"] = _excess(values, top, entry["dtype"])
    else:
        for name in ("sampled/ids", "sampled/counts"):
            same = (read(name).astype(np.int64) == out.arrays[name].astype(np.int64)).all(axis=1)
            result[prefix + name] = np.where(same, 0.0, np.inf)
    result[prefix + "energy"] = _excess(read("energy"), out.arrays["energy"], "float32")
    for f in cache.manifest["outputs"].get("features", []):
        result[prefix + f["array"]] = _excess(read(f["array"]).astype(np.float32),
                                              out.arrays[f["array"]].astype(np.float32), "float16")
    return result
