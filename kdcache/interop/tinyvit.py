"""microsoft/Cream TinyViT's saved teacher logits, read as a kdcache cache.

Follows TinyViT at Cream 4a13c40 (its saved-logits layout is unchanged since the release, d23b323).
The layout (TinyViT's ``data/augmentation/manager.py``, ``dataset_wrapper.py`` and ``save_logits.py``,
docs/interop.md): one folder ``logits_top<K>_epoch<E>`` per epoch, in each a ``rank<R>-keys.txt`` (one
sample key per line, ``str(index)`` in torchvision's ``ImageFolder`` order) and a ``rank<R>-values.bin``
of fixed-size items in the same order: the int32 augmentation seed, K int16 class ids and K float16
softmax probabilities (sorted). The augmentation is not stored: TinyViT re-draws it from the seed with
``numpy.random.Generator(PCG64(seed))`` (``aug_random.py``), so the import re-draws its crop and flip the
same way, on each image's own size, and stores them. An epoch is a view.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.augment import Recipe
from kdcache.augment.geometry import HorizontalFlip, PilResizedCrop
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.data.images import Source
from kdcache.interop.boxes import crop_boxes
from kdcache.interop.imported import Import, folder_order, image_sizes, top_k
from kdcache.locations import guard
from kdcache.textfiles import parse_yaml, read_text
from kdcache.models.preprocess import Preprocess

FORMAT = "tinyvit"
#: The layout of TinyViT's save_logits.py (Cream d23b323 to 4a13c40): the only one there is.
VERSION = 1
_EPOCH = re.compile(r"logits_top(\d+)_epoch(\d+)$")
#: TinyViT's defaults (its config.py) for the keys a config file may leave out.
DEFAULTS = {"DATA.IMG_SIZE": 224, "DATA.INTERPOLATION": "bicubic", "DATA.MEAN_AND_STD_TYPE": "default",
            "AUG.COLOR_JITTER": 0.4, "AUG.AUTO_AUGMENT": "rand-m9-mstd0.5-inc1", "AUG.REPROB": 0.25,
            "AUG.MIXUP": 0.8, "AUG.CUTMIX": 1.0, "AUG.CUTMIX_MINMAX": None, "MODEL.NAME": "unknown"}
NORMS = {"default": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
         "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}
MAX_SIDE = 8192  # DATA.IMG_SIZE at most
SCALE, RATIO, HFLIP = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0), 0.5  # transforms_imagenet_train's defaults


def setting(config: Mapping[str, Any], key: str) -> Any:
    """``config[A][B]`` for ``key`` ``"A.B"``, TinyViT's default where the file leaves it out."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return DEFAULTS[key]
        node = node[part]
    return node


def teacher_precision(config: Mapping[str, Any]) -> str:
    """The teacher forward's precision: ``AMP_ENABLE`` (Cream 680976f on; True, the default: fp16 autocast),
    else an older config's ``AMP_OPT_LEVEL`` (apex; ``O0`` is fp32)."""
    if "AMP_ENABLE" in config:
        return "fp16" if bool(config["AMP_ENABLE"]) else "fp32"
    if "AMP_OPT_LEVEL" in config:
        return "fp32" if str(config["AMP_OPT_LEVEL"]) == "O0" else "fp16"
    return "fp16"


def read_config(path: Path) -> dict[str, Any]:
    """TinyViT's config.json (YAML text), read within kdcache.textfiles' limits."""
    guard(path, "TinyViT config")
    if not path.is_file():
        raise MissingData(f"TinyViT config {path} not found — pass --source-config, the config.json save_logits.py wrote "
                          "into its output folder (or the --cfg yaml with the same options)")
    config = parse_yaml(read_text(path, "TinyViT config"), f"TinyViT config {path}")
    return config if isinstance(config, dict) else {}


def check_augmentation(config: Mapping[str, Any], where: str) -> tuple[int, str]:
    """The view side and interpolation; InvalidSpec for a TinyViT augmentation kdcache cannot replay."""
    refused = {
        "AUG.AUTO_AUGMENT": ("none", "TinyViT's RandAugment (timm's, on PIL images) has no exact kdcache op"),
        "AUG.COLOR_JITTER": (0, "TinyViT applies color jitter only without RandAugment, where its save_logits.py "
                                "fails (aug_random has no shuffle)"),
        "AUG.REPROB": (0, "TinyViT's random erasing fills with random noise, which kdcache's erase does not"),
        "AUG.MIXUP": (0, "TinyViT's pair2 mixing (adjacent rows of its sampler's permutation) is not imported"),
        "AUG.CUTMIX": (0, "TinyViT's pair2 mixing (adjacent rows of its sampler's permutation) is not imported"),
    }
    for key, (off, why) in refused.items():
        value = setting(config, key)
        if value not in (off, None) and not (isinstance(value, (int, float)) and value <= 0):
            raise InvalidSpec(f"{where}: {key} {value!r} — {why}; import logits saved with {key} {off}")
    if setting(config, "AUG.CUTMIX_MINMAX") is not None:
        raise InvalidSpec(f"{where}: AUG.CUTMIX_MINMAX is set — TinyViT's pair2 mixing is not imported")
    side = setting(config, "DATA.IMG_SIZE")
    if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_SIDE:
        raise InvalidSpec(f"{where}: DATA.IMG_SIZE {side!r} is not a side from 1 to {MAX_SIDE} px — pass the config the "
                          "logits were saved with")
    if side <= 32:
        raise InvalidSpec(f"{where}: DATA.IMG_SIZE {side} makes TinyViT use a padded RandomCrop, which has no kdcache op")
    interpolation = setting(config, "DATA.INTERPOLATION")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise InvalidSpec(f"{where}: DATA.INTERPOLATION {interpolation!r} — kdcache replays bilinear, bicubic or "
                          "nearest (TinyViT cannot save logits with a random one)")
    return side, interpolation


def draw(seed: int, width: int, height: int) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) that TinyViT's transforms draw from ``seed`` for a width x height image:
    ``RandomResizedCropAndInterpolation.get_params`` then ``RandomHorizontalFlip``, both on aug_random's stream."""
    rng = np.random.Generator(np.random.PCG64(seed))

    def randint(a: int, b: int) -> int:
        return min(int(rng.random() * (b - a + 1)) + a, b)

    area = width * height
    for _ in range(10):
        target_area = (rng.random() * (SCALE[1] - SCALE[0]) + SCALE[0]) * area
        log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
        aspect_ratio = math.exp(rng.random() * (log_ratio[1] - log_ratio[0]) + log_ratio[0])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= width and h <= height:
            i, j = randint(0, height - h), randint(0, width - w)
            break
    else:
        in_ratio = width / height
        if in_ratio < min(RATIO):
            w, h = width, int(round(width / min(RATIO)))
        elif in_ratio > max(RATIO):
            w, h = int(round(height * max(RATIO))), height
        else:
            w, h = width, height
        i, j = (height - h) // 2, (width - w) // 2
    return i, j, h, w, rng.random() < HFLIP


class Epoch:
    """One ``logits_top<K>_epoch<E>`` folder: where each sample's item is, and the items (memory-mapped).

    A key the sampler padded into several rank files (one entry per file) is read from the highest rank, as
    TinyViT's reader reads it once it has loaded every rank file: ``_Reader.find_item_in_packages``
    (manager.py) maps each key to the file it loaded last that lists it, loading files lazily in rank order
    from its own rank on, so every read after the first few of an epoch gets the highest rank's entry.
    """

    def __init__(self, folder: Path, k: int, num_samples: int) -> None:
        self.item = np.dtype([("seed", "<i4"), ("ids", "<i2", (k,)), ("probs", "<f2", (k,))])
        ranks = sorted((int(m.group(1)), p) for p in folder.glob("rank*-keys.txt")
                       if (m := re.fullmatch(r"rank(\d+)-keys\.txt", p.name)))
        if not ranks:
            raise MissingData(f"{folder} has no rank<R>-keys.txt — it is not a TinyViT logits folder")
        self.rank = np.full(num_samples, -1, np.int64)
        self.row = np.zeros(num_samples, np.int64)
        self.values = []
        for slot, (_, keys_file) in enumerate(ranks):
            keys = _keys(keys_file)
            self.values.append(self._values(keys_file, len(keys)))
            for row, key in enumerate(keys):
                if not key.isdigit() or int(key) >= num_samples:
                    raise InvalidSpec(f"{keys_file}: key {key!r} is not a sample index below {num_samples} — kdcache "
                                      "imports TinyViT logits keyed by index, of the --dataset they were saved for")
                t = int(key)
                if self.rank[t] < 0 or slot > self.rank[t]:  # padded into several ranks: the highest (docstring)
                    self.rank[t], self.row[t] = slot, row
        if (self.rank < 0).any():
            raise MissingData(f"{folder} has no logits of sample {int(np.argmax(self.rank < 0))} — the dataset has "
                              f"{num_samples} samples; pass the --dataset the logits were saved for")

    def _values(self, keys_file: Path, rows: int) -> np.ndarray:
        path = keys_file.with_name(keys_file.name.replace("-keys.txt", "-values.bin"))
        size = path.stat().st_size if path.is_file() else -1
        if size != rows * self.item.itemsize:
            raise DataCorrupt(f"{path} holds {max(size, 0)} bytes, but {keys_file.name} lists {rows} keys of "
                              f"{self.item.itemsize} bytes each — the file is truncated; copy it again")
        return np.memmap(path, dtype=self.item, mode="r", shape=(rows,)) if rows else np.zeros(0, self.item)

    def items(self, t: np.ndarray) -> np.ndarray:
        out = np.empty(len(t), self.item)
        for slot, values in enumerate(self.values):
            here = self.rank[t] == slot
            out[here] = values[self.row[t][here]]
        return out


def _keys(path: Path) -> list[str]:
    """The keys of a ``rank<R>-keys.txt``, one per line; DataCorrupt for a file that is not ASCII text."""
    try:
        return path.read_bytes().decode("ascii").split()
    except UnicodeDecodeError:
        raise DataCorrupt(f"{path} is not a list of sample keys (it is not ASCII text) — the file is damaged") from None


def epochs(src: Path) -> tuple[int, list[Path]]:
    """(K, the epoch folders in epoch order); InvalidSpec where epochs are missing or K differs."""
    guard(src, "TinyViT logits folder")
    found = [(m, p) for p in sorted(src.iterdir()) if p.is_dir() and (m := _EPOCH.match(p.name))] if src.is_dir() else []
    if not found:
        raise MissingData(f"{src} holds no logits_top<K>_epoch<E> folders — pass TinyViT's DISTILL.TEACHER_LOGITS_PATH")
    ks = {int(m.group(1)) for m, _ in found}
    if len(ks) > 1:
        raise InvalidSpec(f"{src} holds logits of top-{sorted(ks)} — import one K at a time from a folder of its own")
    by_epoch = {int(m.group(2)): p for m, p in found}
    missing = sorted(set(range(max(by_epoch) + 1)) - set(by_epoch))
    if missing:
        raise MissingData(f"{src} lacks epoch {missing[0]} of 0..{max(by_epoch)} — every epoch up to the last is a view")
    return ks.pop(), [by_epoch[e] for e in sorted(by_epoch)]


def plan(src: str | Path, source: Source, config_path: str | Path | None) -> Import:
    """The import of TinyViT's logits folder ``src`` (saved with the config at ``config_path``)."""
    root = Path(src).expanduser()
    if config_path is None:
        raise InvalidSpec("tinyvit import needs --source-config, the config.json TinyViT's save_logits.py wrote — it says "
                          "which augmentation the seeds drew")
    config_file = Path(config_path).expanduser()
    config = read_config(config_file)
    side, interpolation = check_augmentation(config, str(config_file))
    k, folders = epochs(root)
    n = len(source.train)
    loaded = [Epoch(folder, k, n) for folder in folders]
    norm = str(setting(config, "DATA.MEAN_AND_STD_TYPE"))
    if norm not in NORMS:  # TinyViT itself raises KeyError (build.py)
        raise InvalidSpec(f"{config_file}: DATA.MEAN_AND_STD_TYPE {norm!r} is not one of {', '.join(NORMS)} — "
                          "TinyViT would not run with it; pass the config the logits were saved with")
    mean, std = NORMS[norm]
    pre = Preprocess(mean[: source.channels] if source.channels == 3 else (sum(mean) / 3,),
                     std[: source.channels] if source.channels == 3 else (sum(std) / 3,), side, interpolation,
                     origin=FORMAT)
    recipe = Recipe((PilResizedCrop(*SCALE, *RATIO), HorizontalFlip(HFLIP)))
    order = folder_order(source)
    reader = _Reader(loaded, source, np.argsort(order), k)
    about = {"version": VERSION, "source": str(root), "epochs": len(folders), "config": str(config_file),
             "model": str(setting(config, "MODEL.NAME")), "interpolation": interpolation, "img_size": side}
    precision = teacher_precision(config)
    return Import(FORMAT, about, recipe, len(folders), k, pre, str(setting(config, "MODEL.NAME")),
                  _digest(config_file, folders), str(root), reader.read, precision)


class _Reader:
    def __init__(self, loaded: list[Epoch], source: Source, index: np.ndarray, k: int) -> None:
        self.loaded, self.source, self.index, self.k = loaded, source, index, k

    def read(self, block: np.ndarray) -> dict[str, np.ndarray]:
        t = self.index[block]
        items = np.stack([epoch.items(t) for epoch in self.loaded], axis=1)  # [n, views]
        heights, widths = image_sizes(self.source, block)
        drawn = np.array([[draw(int(seed), int(widths[r]), int(heights[r])) for seed in items["seed"][r]]
                          for r in range(len(block))], dtype=np.int64).reshape(len(block), len(self.loaded), 5)
        where = f"TinyViT samples {int(t.min())}..{int(t.max())}"
        box = crop_boxes(drawn[..., 0], drawn[..., 1], drawn[..., 2], drawn[..., 3], heights[:, None],
                         widths[:, None], where)
        values, ids = top_k(items["probs"], items["ids"], self.source.num_classes, where)
        return {"topk/values": values, "topk/indices": ids, "aug/rrc": box, "aug/flip": drawn[..., 4].astype(np.uint8)}


def _digest(config_file: Path, folders: list[Path]) -> str:
    """sha256 over the config and every keys and values file, in epoch and rank order."""
    digest = hashlib.sha256(config_file.read_bytes())
    for folder in folders:
        for path in sorted(folder.glob("rank*")):
            digest.update(f"{folder.name}/{path.name}\n".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return f"sha256:{digest.hexdigest()}"
