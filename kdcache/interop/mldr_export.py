"""A top-k kdcache cache in apple/ml-dr's layout, so that a trainer written for ml-dr reads it.

Each sample becomes ``<index>.pth.tar`` (``torch.save``, protocol 4, as ml-dr writes) holding
``(index, [{"params": dict, "prob": (probabilities, class ids)} per view])`` with ``index`` in
torchvision's ``ImageFolder`` order, and ``config.pth.tar`` holds the ``reinforce`` section ml-dr's
``ReinforcedDataset`` composes its transforms from. Params are the uncompressed dict that
``dr.transforms.Compose.reapply`` (apple/ml-dr a21113c) takes: it runs a transform only when its name is a key,
so the dict names ``to_tensor`` and ``normalize`` too, as ml-dr's own writer does, with ``(NO_PARAM, NO_PARAM)``
pairs; pixel boxes are computed on each image's own size. Checked with ml-dr's real reader (docs/interop.md).

A sample's file is written whole (renamed into place) and ``config.pth.tar`` last; ``.kdcache-export`` names
the cache being exported, so a rerun of a killed export finishes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdcache import checks, data
from kdcache.augment import Recipe
from kdcache.augment.geometry import HorizontalFlip, PilResizedCrop, RandomErasing, RandomResizedCrop
from kdcache.augment.mixing import CutMix, MixUp
from kdcache.augment.op import BOX_SCALE
from kdcache.cache.logits import decode_logits
from kdcache.cache.store import Cache, open_cache
from kdcache.errors import CacheCorrupt, CacheMismatch, InvalidSpec
from kdcache.interop.boxes import spans
from kdcache.interop.imported import folder_order, image_sizes
from kdcache.interop.mldr import CONFIG, VERSION
from kdcache.interop.mldr_recipe import PIL_CODES
from kdcache.interop.pickles import dump_torch
from kdcache.locations import guard

_PIL_CODES = {name: code for code, name in PIL_CODES.items()}
MARKER = ".kdcache-export"  # the id of the cache an (unfinished) export folder holds


@dataclass
class ExportResult:
    out: str
    samples: int
    views: int
    exact: bool  # whether ml-dr's reader renders the very pixels kdcache replays (a pilrrc recipe)


def export(cache_path: str, out: str, dataset: str | None = None, progress: bool = True) -> ExportResult:
    """Write the top-k cache at ``cache_path`` into folder ``out`` in ml-dr's layout."""
    cache = open_cache(cache_path)
    entry = cache.manifest["outputs"]["logits"]
    if entry["mode"] != "topk":
        raise CacheMismatch(f"cache {cache.path} stores {entry['mode']} logits; ml-dr stores top-k probabilities — "
                            "export a cache made with --logits topk:K")
    parsed = data.parse(dataset or cache.manifest["dataset"]["spec"])
    checks.outside("--out", out, parsed.local_root(), "the dataset")
    source = data.open_source(parsed)
    cache.check_dataset(source.spec, source.fingerprint, source.num_classes, len(source.train), source.parts)
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    side = int(cache.manifest["recipe"]["input_size"])
    reinforce = reinforce_section(recipe, cache, side)
    target = _claim_folder(Path(out).expanduser(), out, cache.id)
    order = folder_order(source)  # ImageFolder index -> kdcache index
    index = np.argsort(order)
    names = [name for name in cache.array_names if name.startswith("aug/") or name.startswith("topk/")]
    with tqdm(total=cache.num_samples, unit="sample", desc="export ml-dr", disable=not progress, leave=False) as bar:
        for start in range(0, cache.num_samples, cache.chunk_samples):  # one read per chunk of every array
            stop = min(start + cache.chunk_samples, cache.num_samples)
            if all((target / f"{int(index[i])}.pth.tar").is_file() for i in range(start, stop)):
                bar.update(stop - start)  # written whole by the run this one finishes
                continue
            block = {name: cache.read_samples(name, start, stop, bound=True) for name in names}
            stored = {name[4:]: v.reshape(-1, *v.shape[2:]) for name, v in block.items() if name.startswith("aug/")}
            why = recipe.stored_problem(stored, cache.num_samples)
            if why is not None:
                raise CacheCorrupt(f"cache {cache.path}: samples {start}..{stop - 1}: {why} — no op writes that; the "
                                   "cache is damaged or forged, so the export stops unfinished")
            for i in range(start, stop):
                rows = _views(cache, recipe, source, i, {name: values[i - start] for name, values in block.items()},
                              side, index)
                t = int(index[i])
                dump_torch((t, rows), target / f"{t}.pth.tar")
            bar.update(stop - start)
    config = {"reinforce": reinforce, "teacher": {"name": "+".join(m["spec"] for m in cache.manifest["teacher"]["members"])},
              "kdcache": {"cache_id": cache.id, "layout_version": VERSION}}
    dump_torch(config, target / CONFIG)  # last: a folder without it is not taken for a whole export
    return ExportResult(str(target), cache.num_samples, cache.views, isinstance(recipe.ops[0], PilResizedCrop))


def _claim_folder(target: Path, out: str, cid: str) -> Path:
    """The export folder: new or empty, or one an earlier export of the same cache left (resumed, its
    half-written files removed); any other non-empty folder is refused."""
    guard(target, "--out")
    if target.exists() and not target.is_dir():
        raise InvalidSpec(f"--out {out} is a file — export into a new folder")
    marker = target / MARKER
    if target.is_dir() and any(target.iterdir()):
        if not marker.is_file() or marker.read_text().strip() != cid:
            raise InvalidSpec(f"--out {out} is not empty (and holds no unfinished export of cache {cid}) — export "
                              "into a new folder")
        for partial in target.glob("*.tmp"):
            partial.unlink()
        (target / CONFIG).unlink(missing_ok=True)  # written again last
        return target
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InvalidSpec(f"--out {out} lies under a file — export into a new folder") from None
    except PermissionError:
        raise InvalidSpec(f"--out {out} cannot be created (permission denied) — export into a folder you may write"
                          ) from None
    marker.write_text(cid + "\n")
    return target


def reinforce_section(recipe: Recipe, cache: Cache, side: int) -> dict[str, Any]:
    """ml-dr's ``config["reinforce"]`` of ``recipe``; InvalidSpec for an op ml-dr has no transform for."""
    rec = cache.manifest["recipe"]
    steps: dict[str, Any] = {}
    if not recipe.ops or not isinstance(recipe.ops[0], RandomResizedCrop):
        raise InvalidSpec(f"recipe {recipe.spec!r} does not start with rrc or pilrrc — ml-dr's views crop first")
    for op in recipe.ops:
        if isinstance(op, RandomResizedCrop):
            steps["random_resized_crop"] = {"size": side, "scale": [op.min_scale, op.max_scale],
                                            "ratio": [op.min_ratio, op.max_ratio],
                                            "interpolation": _PIL_CODES[rec.get("interpolation", "bilinear")]}
        elif isinstance(op, HorizontalFlip):
            steps["random_horizontal_flip"] = {"p": op.p}
        elif isinstance(op, RandomErasing):
            steps["random_erase"] = {"p": op.p, "scale": [op.min_scale, op.max_scale],
                                     "ratio": [op.min_ratio, op.max_ratio]}
        elif isinstance(op, (MixUp, CutMix)):
            steps[op.name] = {"alpha": op.alpha, "p": op.p}
        else:
            raise InvalidSpec(f"recipe op {op.name!r} has no ml-dr transform that replays it — export a cache whose "
                              "recipe uses rrc or pilrrc, flip, erase, mixup or cutmix")
    steps["to_tensor"] = {}  # ml-dr composes it after the flip and before erasing
    steps["normalize"] = {"mean": list(rec["mean"]), "std": list(rec["std"])}
    k = int(cache.manifest["outputs"]["logits"]["k"])
    return {"num_samples": cache.views, "topk": k, "image_augmentation": steps, "densify": "smooth",
            "compress": False, "joblib": False}


def _views(cache: Cache, recipe: Recipe, source: Any, i: int, arrays: dict[str, np.ndarray], side: int,
           index: np.ndarray) -> list[dict[str, Any]]:
    """ml-dr's list of ``{"params", "prob"}`` for every view of kdcache sample ``i`` (``arrays``: its rows)."""
    params = {name.removeprefix("aug/"): values for name, values in arrays.items() if name.startswith("aug/")}
    probs = np.exp(decode_logits(arrays["topk/values"], cache.logit_dtype).astype(np.float64))
    probs = np.stack([densify_as_stored(p, cache.num_classes) for p in probs])
    ids = arrays["topk/indices"].astype(np.int64)
    partner, _ = recipe.mixing(params)
    h, w = image_sizes(source, np.array([i]))
    out = []
    for v in range(cache.views):
        row = {name: values[v] for name, values in params.items()}
        mixed = int(partner[v]) >= 0
        slots = [_slot(recipe, row, "", int(h[0]), int(w[0]), side)]
        if mixed:
            ph, pw = image_sizes(source, np.array([int(partner[v])]))
            slots.append(_slot(recipe, row, "partner_", int(ph[0]), int(pw[0]), side))
        mixes = [op for op in recipe.ops if isinstance(op, (MixUp, CutMix))]  # MixUp, then CutMix, as ml-dr
        if mixes and not mixed:
            slots.append(dict.fromkeys(slots[0]))  # ml-dr's reader loads a partner image even when it mixes none
        p: dict[str, Any] = {name: tuple(s[name] for s in slots) for name in slots[0]}
        p |= {"to_tensor": ((), ()), "normalize": ((), ())}  # reapply runs only the transforms its dict names
        for mix in mixes:  # like transform_batch, id2 is set whenever a mixing transform is configured
            on = int(row[mix.partner_field]) >= 0
            p[mix.name] = _mixing(mix, row, float(row[mix.lam_field]), side, i, v) if on else None
        if mixes:
            p["id2"] = int(index[int(partner[v])] if mixed else index[i])
        out.append({"params": p, "prob": (probs[v].tolist(), ids[v].tolist())})
    return out


def densify_as_stored(p: np.ndarray, num_classes: int) -> np.ndarray:
    """Top-k probabilities that ml-dr's ``densify`` (dr/utils.py) turns into kdcache's target.

    kdcache spreads the missing mass ``1 − Σp`` over the other classes, or, where the stored values sum above 1,
    renormalises them (kdcache.cache.logits.densify_tensors). ml-dr takes ``softmax(p)`` when its float32 sum
    exceeds 1 (``r < 0``), so such a view is written as ``p/Σp``, scaled down by float32 steps until ml-dr's
    float32 ``1 − Σp`` is not negative; so is a view that keeps every class (no class left to spread onto).
    """
    import torch

    def short(values: np.ndarray) -> bool:
        return bool(1.0 - torch.tensor(values.tolist(), dtype=torch.float32).sum() < 0.0)

    if len(p) == num_classes or short(p):
        p = p / p.sum()
        while short(p):
            p = p * (1.0 - 2.0**-23)
    return p


def _slot(recipe: Recipe, row: dict[str, np.ndarray], prefix: str, h: int, w: int, side: int) -> dict[str, Any]:
    """The own or partner params of one view, as ml-dr's pixel tuples."""
    q = np.asarray(row[prefix + "rrc"], dtype=np.int64)
    left, width = spans(q[0] / BOX_SCALE, q[2] / BOX_SCALE, np.int64(w), 1)
    top, height = spans(q[1] / BOX_SCALE, q[3] / BOX_SCALE, np.int64(h), 1)
    out: dict[str, Any] = {"random_resized_crop": (int(top), int(left), int(height), int(width))}
    names = {op.name for op in recipe.ops}
    if "flip" in names:
        out["random_horizontal_flip"] = bool(row[prefix + "flip"])
    if "erase" in names:
        x0, y0, ew, eh = np.asarray(row[prefix + "erase"], dtype=np.float32).astype(np.float64)
        ex, ew_px = spans(x0, ew, np.int64(side), 0)
        ey, eh_px = spans(y0, eh, np.int64(side), 0)
        out["random_erase"] = (int(ey), int(ex), int(eh_px), int(ew_px)) if ew_px and eh_px else None
    return out


def _mixing(mix: MixUp | CutMix, row: dict[str, np.ndarray], lam: float, side: int, i: int, v: int) -> Any:
    """ml-dr's mixup lambda, or cutmix ``(lambda, (x1, y1, x2, y2))`` with x along the rows."""
    if isinstance(mix, MixUp):
        return lam
    x0, y0, w, h = (float(c) for c in np.asarray(row["cutmix_box"], dtype=np.float32))
    steps = [round(c * mix.grid) for c in (x0, x0 + w, y0, y0 + h)]
    pixels = [s * side / mix.grid for s in steps]
    if any(p != int(p) for p in pixels):
        raise InvalidSpec(f"sample {i} view {v}: its cutmix box cuts pixels of the {side}px view (grid {mix.grid}) — "
                          "ml-dr pastes whole pixels; export a cache whose view side is a multiple of the grid")
    left, right, top, bottom = (int(p) for p in pixels)
    return lam, (top, left, bottom, right)
