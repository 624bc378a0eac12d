"""apple/ml-dr's reinforced datasets: per-sample files of augmentation parameters and sparse teacher
probabilities, read as a kdcache cache.

The layout (ml-dr's ``reinforce.py`` and ``dr/data.py``, docs/interop.md): a folder with
``config.pth.tar`` (the run's configuration, ``config["reinforce"]`` holding ``image_augmentation``,
``num_samples`` and ``topk``) and one ``<index>.pth.tar`` per sample, a ``torch.save`` (or joblib) of
``(index, [{"params": ..., "prob": (probs, ids)} for each of num_samples views])``. ``index`` is the
sample's position in torchvision's ``ImageFolder`` order. ``params`` is a dict, or the list that
``dr.transforms.Compose.compress`` makes of it; pixel boxes are on the sample's own image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.augment import Recipe
from kdcache.augment.geometry import PilResizedCrop
from kdcache.augment.torchvision_ops import PaddedCrop, TensorRandAugment
from kdcache.data.images import Source
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.interop import pickles
from kdcache.interop.boxes import crop_boxes, view_boxes
from kdcache.interop.imported import Import, files_digest, folder_order, image_sizes, top_k
from kdcache.interop.mldr_recipe import (
    NO_PARAM,
    RENDERINGS,
    crop_offsets,
    randaugment_rows,
    recipe_of,
    shape_after,
    transforms,
)
from kdcache.locations import guard
from kdcache.models.preprocess import Preprocess

FORMAT = "ml-dr"
#: The layout of apple/ml-dr's first release (c72c884): the only one there is.
VERSION = 1
CONFIG = "config.pth.tar"
MAX_VIEWS = 100_000  # views per sample, and top-k, a configuration may declare (ml-dr stores 50 to 800 views)


def sample_file(src: Path, index: int) -> Path:
    """The file of sample ``index``: ``<index>.pth.tar`` (a ``torch.save``, or with ``reinforce.joblib`` a
    joblib dump under the same name)."""
    return src / f"{index}.pth.tar"


def read_config(src: Path) -> dict[str, Any]:
    """``config.pth.tar`` of an ml-dr folder, read as plain data; MissingData where there is none."""
    guard(src, "ml-dr source")
    guard(src / CONFIG, "ml-dr config")
    if not (src / CONFIG).is_file():
        what = "is not a folder" if not src.is_dir() else f"has no {CONFIG}"
        raise MissingData(f"{src} {what} — pass the folder ml-dr's reinforce.py wrote (reinforced_data/)")
    config = pickles.load(src / CONFIG)
    reinforce = config.get("reinforce") if isinstance(config, Mapping) else None
    if not isinstance(reinforce, Mapping) or not isinstance(reinforce.get("image_augmentation"), Mapping):
        raise DataCorrupt(f"{src / CONFIG} has no reinforce.image_augmentation — it is not an ml-dr configuration")
    return config


def decompress(params: Any, names: Sequence[str]) -> dict[str, Any]:
    """A view's params as ml-dr's dict: ``dr.transforms.Compose.decompress`` for a compressed list."""
    if isinstance(params, Mapping):
        return dict(params)
    rest = list(params)
    out: dict[str, Any] = {}
    pair = None
    if "mixup" in names or "cutmix" in names:
        pair, rest = rest[0], rest[1:]
        if pair is not None:
            out["id2"] = pair
    with_params = [n for n in names if n not in NO_PARAM]
    if len(rest) != len(with_params):  # compress writes one entry per transform, None where it was skipped
        raise ValueError(f"{len(rest)} params for the {len(with_params)} transforms {', '.join(with_params)}")
    for value, name in zip(rest, with_params):
        if value is None:
            continue
        if name == "cutmix":
            out[name] = (value[0], tuple(value[1:]))
        elif name == "mixup":
            out[name] = value
        elif pair is not None and len(value) > 1:
            out[name] = (value[0], value[1])
        else:
            out[name] = (value,)
    return out


def plan(src: str | Path, source: Source, progress: bool = False, randaugment_on: str = "pil",
         passes: int = 2) -> Import:
    """The import of the ml-dr folder ``src`` onto the train split of ``source`` (``progress``: a bar while
    its files are hashed). ``randaugment_on``: ``pil`` replays RandAugment as ml-dr's reader renders it for
    the student it trains, ``tensor`` as its writer rendered it for the teacher (docs/interop.md); ``passes``:
    how its Pillow resizes run (kdcache.augment.op.PASSES)."""
    if randaugment_on not in RENDERINGS:
        raise InvalidSpec(f"--randaugment-on {randaugment_on!r} is not one of {', '.join(RENDERINGS)}")
    root = Path(src).expanduser()
    config = read_config(root)
    where = str(root)
    notes: list[str] = []
    try:
        steps = transforms(config, where, notes)
        recipe, side, interpolation = recipe_of(steps, where, lambda: _all_sizes(source), randaugment_on, passes)
        reinforce = config["reinforce"]
        views, k = (_count(reinforce[key], key, MAX_VIEWS) for key in ("num_samples", "topk"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidSpec(f"{root / CONFIG} is not an ml-dr configuration kdcache can read ({type(exc).__name__}: "
                          f"{exc}) — pass the config.pth.tar reinforce.py wrote") from None
    n = len(source.train)
    files = [sample_file(root, i) for i in range(n)]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise MissingData(f"{missing} is missing: the dataset has {n} training samples and ml-dr writes one file per "
                          "sample — pass the --dataset the reinforcement was made for, or copy every file")
    norm = steps.get("normalize", {})
    channels = source.channels
    pre = Preprocess(tuple(float(m) for m in norm.get("mean", (0.0,) * channels)),
                     tuple(float(s) for s in norm.get("std", (1.0,) * channels)), side, interpolation, origin=FORMAT)
    reader = _Reader(files, source, list(steps), recipe, views, k, side)
    about = {"version": VERSION, "source": str(root), "files": n,
             "reinforce": jsonable({key: reinforce[key] for key in reinforce}),
             "teacher": jsonable(config.get("teacher"))}
    if "rand_augment" in steps:
        about["randaugment_on"] = randaugment_on
        notes.append(f"{where}: ml-dr's writer ran RandAugment on uint8 tensors for the teacher, its reader runs it "
                     f"on PIL images for the student (tens of levels apart); this import replays the "
                     f"{'reader' if randaugment_on == 'pil' else 'writer'}'s — --randaugment-on "
                     f"{'tensor' if randaugment_on == 'pil' else 'pil'} for the "
                     f"{'teacher' if randaugment_on == 'pil' else 'student'}'s")
    return Import(FORMAT, about, recipe, views, k, pre, _teacher_name(config), _digest(root, files, progress), str(root),
                  reader.read, notes=notes)


class _Reader:
    """Per-view arrays of blocks of kdcache samples, from ml-dr's per-sample files."""

    def __init__(self, files: list[Path], source: Source, names: list[str], recipe: Recipe, views: int, k: int,
                 side: int) -> None:
        self.files, self.source, self.names, self.recipe = files, source, names, recipe
        self.views, self.k, self.side = views, k, side
        self.order = folder_order(source)  # ml-dr index -> kdcache index
        self.index = np.argsort(self.order)  # kdcache index -> ml-dr index
        self.sizes: dict[int, tuple[int, int]] = {}

    def size(self, i: int) -> tuple[int, int]:
        if i not in self.sizes:
            h, w = image_sizes(self.source, np.array([i]))
            self.sizes[i] = (int(h[0]), int(w[0]))
        return self.sizes[i]

    def read(self, block: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.sample(int(i)) for i in block]
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Every per-view array of kdcache sample ``i``: ``[views, ...]`` each."""
        t = int(self.index[i])
        where = f"{self.files[t]}"
        stored = pickles.load(self.files[t])
        if not (isinstance(stored, (tuple, list)) and len(stored) == 2 and stored[0] == t):
            raise DataCorrupt(f"{where} does not hold (index {t}, views) — it is not this sample's ml-dr file")
        entries = stored[1]
        if not isinstance(entries, list) or len(entries) != self.views:
            raise DataCorrupt(f"{where} holds {len(entries) if isinstance(entries, list) else 'no'} views, the "
                              f"configuration says {self.views} — the file is damaged")
        views = [self.checked_view(e, i, f"{where} view {v}") for v, e in enumerate(entries)]
        out = {f"aug/{name}": np.stack([v[name] for v in views]) for name in views[0]}
        probs, ids = zip(*[_sparse(e.get("prob"), self.k, f"{where} view {v}") for v, e in enumerate(entries)])
        out["topk/values"], out["topk/indices"] = top_k(np.array(probs), np.array(ids), self.source.num_classes, where)
        return out

    def checked_view(self, entry: Any, i: int, at: str) -> dict[str, np.ndarray]:
        """:meth:`view` of a stored entry; DataCorrupt where its params are not what ml-dr writes."""
        try:
            return self.view(decompress(entry["params"], self.names), i, at)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise DataCorrupt(f"{at}: its params are not ml-dr's for this configuration ({type(exc).__name__}: "
                              f"{exc}) — the file is damaged or from another reinforcement") from None

    def view(self, params: dict[str, Any], i: int, at: str) -> dict[str, np.ndarray]:
        """The ``aug/`` arrays of one view of kdcache sample ``i``."""
        mixes = [name for name in ("mixup", "cutmix") if params.get(name) is not None]
        partner = int(self.order[self.partner(params["id2"], at)]) if mixes else -1
        sides = [(0, self.size(i))] + ([(1, self.size(partner))] if mixes else [])
        out: dict[str, np.ndarray] = {}
        ops = self.recipe.ops
        for slot, (h, w) in sides:
            prefix = "partner_" if slot else ""
            for k, op in enumerate(ops):
                if isinstance(op, PilResizedCrop):
                    top, left, height, width = params["random_resized_crop"][slot]
                    out[prefix + "rrc"] = crop_boxes(top, left, height, width, *shape_after(ops[:k], h, w, 0), at)
                elif isinstance(op, PaddedCrop):
                    out[prefix + "padcrop"] = crop_offsets(params["random_crop"][slot], op,
                                                           *shape_after(ops[:k], h, w, 0), at)
                elif isinstance(op, TensorRandAugment):
                    out[prefix + op.name] = randaugment_rows(_slot(params, "rand_augment", slot, None), op.num_ops, at)
            if "random_horizontal_flip" in self.names:
                flip = _slot(params, "random_horizontal_flip", slot, False)
                if not isinstance(flip, (bool, np.bool_)):
                    raise DataCorrupt(f"{at}: random_horizontal_flip is {flip!r}, not a bool — the source is damaged")
                out[prefix + "flip"] = np.uint8(bool(flip))
            if "random_erase" in self.names:
                box = _slot(params, "random_erase", slot, None)
                x, y, eh, ew = box if box is not None and box[0] != -1 else (0, 0, 0, 0)
                out[prefix + "erase"] = view_boxes(x, y, eh, ew, self.side, at)
        for name, (tail, dtype) in self.recipe.fields().items():
            if name not in out and name.startswith("partner_"):
                out[name] = np.zeros(tail, dtype)
        return {**out, **self.mixing(params, mixes, partner, at)}

    def partner(self, id2: Any, at: str) -> int:
        """The mixing partner's ml-dr index, refused unless it is one of the dataset's samples."""
        n = len(self.order)
        if not isinstance(id2, (int, np.integer)) or isinstance(id2, (bool, np.bool_)) or not 0 <= id2 < n:
            raise DataCorrupt(f"{at}: the mixing partner id2 is {id2!r}, not a sample index below {n} — the source "
                              "is damaged, or made over other data")
        return int(id2)

    def mixing(self, params: dict[str, Any], mixes: list[str], partner: int, at: str) -> dict[str, np.ndarray]:
        """The arrays of each configured mix (MixUp, then CutMix, with the one partner): -1 and λ 1 where the
        view did not mix that way."""
        out: dict[str, np.ndarray] = {}
        for name in ("mixup", "cutmix"):
            if name not in self.names:
                continue
            out |= {f"{name}_partner": np.int64(partner if name in mixes else -1), f"{name}_lam": np.float32(1.0)}
            if name == "cutmix":
                out["cutmix_box"] = np.zeros(4, np.float32)
            if name not in mixes:
                continue
            if name == "mixup":
                out["mixup_lam"] = np.float32(_fraction(params["mixup"], at, "the mixup λ"))
                continue
            lam, (x1, y1, x2, y2) = params["cutmix"]
            _fraction(lam, at, "the cutmix λ")
            out["cutmix_box"] = view_boxes(x1, y1, x2 - x1, y2 - y1, self.side, at)
            out["cutmix_lam"] = np.float32(1.0 - (x2 - x1) * (y2 - y1) / (self.side * self.side))
        return out


def _all_sizes(source: Source) -> np.ndarray:
    """(height, width) of every training image [N, 2]."""
    h, w = image_sizes(source, np.arange(len(source.train)))
    return np.stack([h, w], axis=1)


def _count(value: Any, key: str, limit: int) -> int:
    """A positive integer setting of the configuration, at most ``limit``; ValueError otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise ValueError(f"reinforce.{key} is {value!r}, not an integer from 1 to {limit}")
    return value


def _fraction(value: Any, at: str, what: str) -> float:
    """``value`` as a float in [0, 1] (a mixing λ), refused otherwise."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)) \
            or not 0.0 <= float(value) <= 1.0:
        raise DataCorrupt(f"{at}: {what} is {value!r}, not a number in [0, 1] — the source is damaged")
    return float(value)


def _slot(params: Mapping[str, Any], name: str, slot: int, default: Any) -> Any:
    """The own (slot 0) or partner (slot 1) params of transform ``name``; ``default`` where it was skipped."""
    value = params.get(name)
    return value[slot] if value is not None and len(value) > slot else default


def _sparse(prob: Any, k: int, where: str) -> tuple[list[float], list[int]]:
    """A view's ``prob``, ml-dr's ``sparsify`` pair ``(probabilities, class ids)`` of length ``k``."""
    if not (isinstance(prob, (tuple, list)) and len(prob) == 2 and len(prob[0]) == k and len(prob[1]) == k):
        raise InvalidSpec(f"{where}: prob is not a sparse pair of {k} probabilities and ids — kdcache imports "
                          "ml-dr's top-k form (reinforce.topk)")
    return list(prob[0]), list(prob[1])


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON: tuples become lists, NumPy scalars numbers, anything else its text."""
    if isinstance(obj, Mapping):
        return {str(key): jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    return str(obj)


def _teacher_name(config: Mapping[str, Any]) -> str:
    teacher = config.get("teacher")
    if isinstance(teacher, Mapping):
        for key in ("name", "arch", "model"):
            if isinstance(teacher.get(key), str):
                return teacher[key]
    return "unknown"


def _digest(root: Path, files: list[Path], progress: bool) -> str:
    """sha256 over the configuration and every sample file, in index order: the identity of the outputs."""
    from tqdm import tqdm

    paths = tqdm([root / CONFIG, *files], unit="file", desc="hash ml-dr files", disable=not progress, leave=False)
    return files_digest((path.name, path) for path in paths)
