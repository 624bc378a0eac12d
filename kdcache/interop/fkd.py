"""szq0214/FKD's soft labels: one file per image with the crops its teacher saw, read as a kdcache cache.

Follows FKD at afd5294 (``FKD_SLG/generate_soft_label.py`` and ``FKD_SLG/utils.py`` write, ``train_FKD.py`` and
``utils_FKD.py`` read; docs/interop.md). For ``<data>/train/<class>/<name>.<ext>`` the generator writes
``<save_path>/<data>/train/<class>/<stem>.tar`` (``stem``: the name before its first dot), a ``torch.save`` of
three NumPy arrays: ``coords`` [N, 4] = ``(i/H, j/W, h/H, w/W)`` of the integer crop ``(i, j, h, w)`` it drew on
the W x H image (float32, float16 with ``--use_fp16``), ``flip`` [N] and ``labels`` (``marginal_smoothing_k5``:
[N, 2, 5], class ids as floats over their probabilities). The teacher saw each crop resized to ``input_size``
with bicubic on the PIL image, then flipped. Nothing in the files says ``input_size`` or the rest of the run's
arguments: ``--source-config`` gives them (generate_soft_label.py's defaults otherwise, with a note).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.augment import Recipe
from kdcache.augment.geometry import HorizontalFlip, PilResizedCrop
from kdcache.data.images import Source
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.interop import pickles
from kdcache.interop.boxes import crop_boxes
from kdcache.interop.imported import Import, files_digest, image_sizes, top_k
from kdcache.locations import file_size, guard
from kdcache.models.preprocess import Preprocess
from kdcache.textfiles import parse_yaml, read_text

FORMAT = "fkd"
#: The layout of FKD's generate_soft_label.py (afd5294): the only one there is.
VERSION = 1
#: generate_soft_label.py's arguments that decide the views and targets, with its defaults.
DEFAULTS: dict[str, Any] = {"arch": "resnet18", "input_size": 475, "min_scale_crops": 0.08, "max_scale_crops": 0.936,
                            "temp": 1.0, "label_type": "marginal_smoothing_k5",
                            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
LABEL_TYPES = {"marginal_smoothing_k5": 5, "marginal_renorm_k5": 5, "marginal_smoothing_k10": 10, "smoothing": 1,
               "hard": 1}
MAX_VIEWS = 100_000  # crops per file
MAX_SIDE = 8192
EXACT_IDS = {np.dtype(np.float16): 2048, np.dtype(np.float32): 1 << 24}  # floats that name every class id below


def read_settings(config_path: str | Path | None, notes: list[str]) -> dict[str, Any]:
    """The run's arguments: ``--source-config`` (YAML or JSON, generate_soft_label.py's argument names) over its
    defaults; InvalidSpec for a value the import cannot use."""
    settings = dict(DEFAULTS)
    if config_path is None:
        notes.append("no --source-config: taking generate_soft_label.py's defaults (input_size 475, bicubic, "
                     "ImageNet mean/std, marginal_smoothing_k5) — pass the arguments your run used if they differ")
        return settings
    path = Path(config_path).expanduser()
    guard(path, "FKD source config")
    given = parse_yaml(read_text(path, "FKD source config"), f"FKD source config {path}")
    if not isinstance(given, Mapping) or not set(given) & set(DEFAULTS):
        raise InvalidSpec(f"FKD source config {path} is not a mapping of generate_soft_label.py's arguments (it names "
                          f"none of {', '.join(DEFAULTS)}) — pass the arguments your run used")
    for key in sorted(set(given) - set(DEFAULTS)):
        notes.append(f"{path}: {key!r} does not decide the views or targets — ignored")
    settings.update({key: value for key, value in given.items() if key in DEFAULTS})
    side = settings["input_size"]
    if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_SIDE:
        raise InvalidSpec(f"{path}: input_size {side!r} is not a side from 1 to {MAX_SIDE} px")
    for key in ("min_scale_crops", "max_scale_crops", "temp"):
        if not _number(settings[key]) or settings[key] <= 0:
            raise InvalidSpec(f"{path}: {key} {settings[key]!r} is not a positive number")
    if not settings["min_scale_crops"] <= settings["max_scale_crops"] <= 1:
        raise InvalidSpec(f"{path}: min_scale_crops {settings['min_scale_crops']!r} and max_scale_crops "
                          f"{settings['max_scale_crops']!r} are not an area range within (0, 1]")
    for key in ("mean", "std"):
        values = settings[key]
        if not isinstance(values, list) or len(values) != 3 or not all(_number(v) for v in values) \
                or key == "std" and min(values) <= 0:
            raise InvalidSpec(f"{path}: {key} {values!r} is not a list of 3 numbers{' above 0' if key == 'std' else ''}")
    if not isinstance(settings["label_type"], str) or settings["label_type"] not in LABEL_TYPES:
        raise InvalidSpec(f"{path}: label_type {settings['label_type']!r} is not one of {', '.join(LABEL_TYPES)}")
    return settings


#: Layouts of the projects built on FKD that kdcache does not import, how to tell them, and why.
NOT_FKD = (
    ("epoch_0", "SRe2L's relabel files (epoch_<e>/batch_<b>.tar) name no image: which image a row holds follows "
                "from re-running torch's RandomSampler (--fkd-seed) at the relabel's batch size and torch version, "
                "none of which the files record, so nothing can check that a view's logits belong to its image (the "
                "failure SRe2L's issues #1, #17 and #21 report)"),
    ("syn_data", "RDED writes no soft labels: its teacher runs online on each mixed batch (validation/main.py) — "
                 "relabel its images with SRe2L's relabel, or precompute a cache over them with kdcache"),
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def label_files(src: Path, source: Source) -> list[Path]:
    """Each training image's label file under ``src``: FKD's generator names it after the image path's last four
    parts, ``<save_path>/<data>/<split>/<class>/<stem>.tar`` (``stem``: the name before its first dot), and its
    trainer, given ``--softlabel_path`` (one level lower), after the last three, ``<split>/<class>/<name>`` cut
    at the first dot; ``src`` may be either."""
    guard(src, "FKD soft-label folder")
    for marker, why in NOT_FKD:
        if (src / marker).is_dir() or src.name == marker:
            raise InvalidSpec(f"{src}: {why}")
    root = getattr(source.train, "root", None)
    files = getattr(source.train, "files", None)
    if root is None or files is None:
        raise InvalidSpec("FKD names its label files after image paths — import over the imagefolder: dataset the "
                          "labels were made from")
    paths = [Path(root) / rel for rel in files]
    generator = [src.joinpath(*p.parts[-4:-1], p.name.split(".")[0] + ".tar") for p in paths]
    trainer = [src / ("/".join(p.parts[-3:]).split(".")[0] + ".tar") for p in paths]
    for rule in (generator, trainer):
        if rule[0].is_file():
            return rule
    raise MissingData(f"{src} holds neither {generator[0].relative_to(src)} nor {trainer[0].relative_to(src)} (the "
                      "label file of the first image) — pass FKD's --save_path, or the --softlabel_path its trainer "
                      "reads, of labels made over this --dataset")


def plan(src: str | Path, source: Source, config_path: str | Path | None, progress: bool = False,
         passes: int = 2) -> Import:
    """The import of FKD's soft labels under ``src`` over the train split of the image folder ``source``
    (``passes``: how its Pillow resizes run, kdcache.augment.op.PASSES)."""
    notes: list[str] = []
    settings = read_settings(config_path, notes)
    base = Path(src).expanduser()
    files = label_files(base, source)
    taken: dict[Path, int] = {}
    for i, path in enumerate(files):
        if path in taken:
            raise InvalidSpec(f"images {source.train.files[taken[path]]} and {source.train.files[i]} share the label "
                              f"file {path} (FKD keeps the name before its first dot) — FKD gave both one image's "
                              "labels; rename one and generate its labels again")
        taken[path] = i
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise MissingData(f"{missing} is missing: FKD writes one file per training image — pass the --dataset the "
                          "labels were made from, or copy every file")
    first = _load(files[0])
    views, k = len(first[0]), LABEL_TYPES[settings["label_type"]]
    if not 1 <= views <= MAX_VIEWS:
        raise DataCorrupt(f"{files[0]} holds {views} crops, not 1 to {MAX_VIEWS}")
    side = settings["input_size"]
    scale = (float(settings["min_scale_crops"]), float(settings["max_scale_crops"]))
    recipe = Recipe((PilResizedCrop(*scale, passes=passes), HorizontalFlip(0.5)))
    mean, std = (tuple(float(v) for v in settings[key])[: source.channels] for key in ("mean", "std"))
    pre = Preprocess(mean, std, side, "bicubic", origin=FORMAT)
    if settings["label_type"] == "marginal_renorm_k5":
        notes.append("marginal_renorm_k5 files hold the same arrays as marginal_smoothing_k5: kdcache's target spreads "
                     "the missing mass over the other classes (FKD's trainer renormalises the top 5 only under its "
                     "own name, marginal_renorm)")
    if float(settings["temp"]) != 1.0:
        notes.append(f"the probabilities are softmax(logits / {settings['temp']}) as FKD stored them; kdcache's losses "
                     "apply their own temperature on top")
    about = {"version": VERSION, "source": str(base), "files": len(files), "settings": settings}
    reader = _Reader(files, source, views, k, settings["label_type"])
    return Import(FORMAT, about, recipe, views, k, pre, str(settings["arch"]), _digest(files, progress), str(base),
                  reader.read, notes=notes)


def _load(path: Path) -> list[np.ndarray]:
    stored = pickles.load(path)
    if not (isinstance(stored, (list, tuple)) and len(stored) == 3 and all(isinstance(a, np.ndarray) for a in stored)):
        raise DataCorrupt(f"{path} does not hold FKD's [coords, flip, labels] arrays — it is damaged or not FKD's")
    return list(stored)


def pixels(coords: np.ndarray, height: int, width: int, where: str) -> tuple[int, int, int, int]:
    """The integer crop ``(top, left, height, width)`` whose fractions FKD stored, in the stored float type: each the
    one integer that gives its value, refused where more than one does (float16 on large images)."""
    kind = coords.dtype.type
    out = []
    for value, n in zip(coords.tolist(), (height, width, height, width)):
        if not 0 <= value <= 1:  # NaN too
            raise DataCorrupt(f"{where}: the crop fraction {value!r} is not in [0, 1] — the file is damaged")
        guess = int(round(value * n))
        hits = [v for v in (guess - 1, guess, guess + 1) if 0 <= v <= n and kind(np.float32(v / n)) == kind(value)]
        if hits != [guess]:
            raise DataCorrupt(f"{where}: the {coords.dtype} crop fraction {value!r} names {len(hits) or 'no'} pixel "
                              f"edges of a {width}x{height} image — float16 crops name the teacher's pixels only on "
                              "smaller images; generate the labels without --use_fp16")
        out.append(guess)
    return out[0], out[1], out[2], out[3]


class _Reader:
    """Per-view arrays of blocks of kdcache samples, from FKD's per-image files."""

    def __init__(self, files: list[Path], source: Source, views: int, k: int, label_type: str) -> None:
        self.files, self.source, self.views, self.k, self.label_type = files, source, views, k, label_type

    def read(self, block: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.sample(int(i)) for i in block]
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}

    def sample(self, i: int) -> dict[str, np.ndarray]:
        path = self.files[i]
        coords, flip, labels = _load(path)
        where = str(path)
        if coords.shape != (self.views, 4) or flip.shape != (self.views,):
            raise DataCorrupt(f"{where} holds crops of shape {coords.shape} and flips {flip.shape}, not the "
                              f"({self.views}, 4) and ({self.views},) of the first file — every file holds as many crops")
        if coords.dtype.kind != "f":
            raise DataCorrupt(f"{where}: the crops are {coords.dtype}, not the float fractions FKD stores — the file "
                              "is damaged")
        if flip.dtype != np.bool_:
            raise DataCorrupt(f"{where}: flip is {flip.dtype}, not bool — the file is damaged")
        h, w = (int(v[0]) for v in image_sizes(self.source, np.array([i])))
        boxes = np.array([pixels(c, h, w, f"{where} crop {v}") for v, c in enumerate(coords)], dtype=np.int64)
        rrc = crop_boxes(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], h, w, where)
        probs, ids = self.targets(labels, where)
        values, indices = top_k(probs, ids, self.source.num_classes, where)
        return {"aug/rrc": rrc, "aug/flip": flip.astype(np.uint8), "topk/values": values, "topk/indices": indices}

    def targets(self, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, integer class ids) [views, k] of a file's labels as its ``label_type`` stores them."""
        n, k = self.views, self.k
        if labels.dtype.kind not in "iuf":
            raise DataCorrupt(f"{where}: the labels are {labels.dtype}, not numbers — the file is damaged")
        if self.label_type == "hard":
            if labels.shape != (n,):
                raise DataCorrupt(f"{where}: hard labels of shape {labels.shape}, not ({n},)")
            return np.ones((n, 1)), self.whole(labels.reshape(n, 1), where)
        if labels.shape != ((n, 2) if k == 1 else (n, 2, k)):
            raise DataCorrupt(f"{where}: labels of shape {labels.shape} are not {self.label_type}'s for {n} crops — "
                              "pass the label_type the labels were made with")
        rows = labels.reshape(n, 2, 1) if k == 1 else labels
        return rows[:, 1].astype(np.float64), self.whole(rows[:, 0], where)

    def whole(self, ids: np.ndarray, where: str) -> np.ndarray:
        """Class ids stored as integers, or as floats (float16 with --use_fp16) that name them exactly."""
        if ids.dtype.kind in "iu":
            return ids.astype(np.int64)
        exact = EXACT_IDS.get(ids.dtype, 0)
        if self.source.num_classes > exact or not np.isfinite(ids).all() or not np.array_equal(ids, np.round(ids)):
            raise DataCorrupt(f"{where}: the class ids are not whole numbers a {ids.dtype} names exactly for "
                              f"{self.source.num_classes} classes — the file is damaged")
        return ids.astype(np.int64)


def _digest(files: list[Path], progress: bool) -> str:
    """sha256 over every label file, in the dataset's order: the identity of the outputs."""
    from tqdm import tqdm

    def checked() -> Iterator[tuple[str, Path]]:
        for path in tqdm(files, unit="file", desc="hash FKD files", disable=not progress, leave=False):
            file_size(path, "FKD label file", pickles.MAX_FILE_BYTES, "MAX_FILE_BYTES")
            yield f"{path.parent.name}/{path.name}", path

    return files_digest(checked())
