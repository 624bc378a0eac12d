"""microsoft/Cream TinyViT's saved teacher logits, read as a kdcache cache.

Follows TinyViT at Cream 4a13c40 (its saved-logits layout is unchanged since the release, d23b323).
The layout (TinyViT's ``data/augmentation/manager.py``, ``dataset_wrapper.py`` and ``save_logits.py``,
docs/interop.md): one folder ``logits_top<K>_epoch<E>`` per epoch, in each a ``rank<R>-keys.txt`` (one
sample key per line, ``str(index)`` in torchvision's ``ImageFolder`` order) and a ``rank<R>-values.bin``
of fixed-size items in the same order: the int32 augmentation seed, K int16 class ids and K float16
softmax probabilities (sorted). The augmentation is not stored: TinyViT re-draws it from the seed with
``numpy.random.Generator(PCG64(seed))`` (``aug_random.py``), so the import re-draws it the same way
(tinyvit_draws.py: crop and flip on each image's own size, RandAugment, random erasing) and stores what each
step did. An epoch is a view. Keys that are file names (ImageNet-22k's ``n00007846_10000``) name the image
of the dataset with that file stem; with pair2 mixing, where they stand in the sampler's rows gives TinyViT's own
list order (tinyvit_files.list_order).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdcache.augment import Recipe
from kdcache.augment.geometry import HorizontalFlip, PilResizedCrop
from kdcache.augment.timm_ops import NoiseErasing, PairMix, TimmRandAugment
from kdcache.data.images import Source
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.interop.boxes import crop_boxes
from kdcache.interop.imported import Import, files_digest, folder_order, image_sizes, top_k
from kdcache.interop.tinyvit_draws import HFLIP, RATIO, SCALE, RandAugmentConfig, Stream, crop, erase, randaugment
from kdcache.interop.tinyvit_files import Epoch, Spill, epochs, key_resolver, list_order, names_keyed
from kdcache.interop.tinyvit_pairs import MixConfig, pair_params
from kdcache.locations import guard
from kdcache.models.preprocess import Preprocess
from kdcache.textfiles import parse_yaml, read_text

FORMAT = "tinyvit"
#: The layout of TinyViT's save_logits.py (Cream d23b323 to 4a13c40): the only one there is.
VERSION = 1
#: TinyViT's defaults (its config.py) for the keys a config file may leave out.
DEFAULTS = {"DATA.IMG_SIZE": 224, "DATA.INTERPOLATION": "bicubic", "DATA.MEAN_AND_STD_TYPE": "default",
            "AUG.COLOR_JITTER": 0.4, "AUG.AUTO_AUGMENT": "rand-m9-mstd0.5-inc1", "AUG.REPROB": 0.25,
            "AUG.REMODE": "pixel", "AUG.RECOUNT": 1, "AUG.MIXUP": 0.8, "AUG.CUTMIX": 1.0, "AUG.CUTMIX_MINMAX": None,
            "AUG.MIXUP_PROB": 1.0, "AUG.MIXUP_SWITCH_PROB": 0.5, "DATA.BATCH_SIZE": 128, "MODEL.NAME": "unknown"}
NORMS = {"default": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
         "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}
MAX_SIDE = 8192  # DATA.IMG_SIZE at most
PIL_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}
MODES = ("const", "rand", "pixel")


def setting(config: Mapping[str, Any], key: str) -> Any:
    """``config[A][B]`` for ``key`` ``"A.B"``, TinyViT's default where the file leaves it out."""
    node: Any = config
    parts = key.split(".")
    for k, part in enumerate(parts):
        if not isinstance(node, Mapping):
            raise InvalidSpec(f"TinyViT config: {'.'.join(parts[:k])} is {node!r}, not a section of settings — pass the "
                              "config the logits were saved with")
        if part not in node:
            return DEFAULTS[key]
        node = node[part]
    return node


def number(config: Mapping[str, Any], key: str, where: str) -> Any:
    """:func:`setting` of a numeric key (None allowed: TinyViT's "off"), refused when it is not a number (TinyViT
    itself fails comparing one)."""
    value = setting(config, key)
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise InvalidSpec(f"{where}: {key} {value!r} is not a number — pass the config the logits were saved with")
    return value


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
    if not isinstance(config, dict) or not config:
        raise InvalidSpec(f"TinyViT config {path} is {'empty' if not config else 'not a mapping of sections'} — pass "
                          "the config.json save_logits.py wrote (an empty file would silently mean TinyViT's defaults)")
    return config


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What TinyViT's config makes its training transform do, as far as the views depend on it."""

    side: int
    interpolation: str
    randaugment: RandAugmentConfig | None
    erase_p: float
    erase_mode: str
    erase_count: int
    mix: MixConfig | None = None


def check_augmentation(config: Mapping[str, Any], where: str) -> Augmentation:
    """TinyViT's augmentation settings; InvalidSpec for one kdcache cannot replay (or TinyViT cannot run)."""
    mix = check_mixing(config, where)
    side = setting(config, "DATA.IMG_SIZE")
    if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_SIDE:
        raise InvalidSpec(f"{where}: DATA.IMG_SIZE {side!r} is not a side from 1 to {MAX_SIDE} px — pass the config the "
                          "logits were saved with")
    if side <= 32:
        raise InvalidSpec(f"{where}: DATA.IMG_SIZE {side} makes TinyViT use a padded RandomCrop on Python's global "
                          "random, which its seeds do not draw")
    interpolation = setting(config, "DATA.INTERPOLATION")
    if not isinstance(interpolation, str) or interpolation not in PIL_CODES:
        raise InvalidSpec(f"{where}: DATA.INTERPOLATION {interpolation!r} — kdcache replays bilinear, bicubic or "
                          "nearest (TinyViT cannot save logits with a random one)")
    auto = setting(config, "AUG.AUTO_AUGMENT")
    ra = None
    if auto not in ("none", None, ""):
        try:
            ra = RandAugmentConfig.parse(str(auto))
        except ValueError as exc:
            raise InvalidSpec(f"{where}: AUG.AUTO_AUGMENT {auto!r} — {exc}; kdcache replays TinyViT's RandAugment "
                              "(rand-...)") from None
    elif _positive(number(config, "AUG.COLOR_JITTER", where)):
        raise InvalidSpec(f"{where}: AUG.COLOR_JITTER without RandAugment — TinyViT's save_logits.py fails there "
                          "(its aug_random has no shuffle), so no saved logits have it")
    p, mode, count = number(config, "AUG.REPROB", where), str(setting(config, "AUG.REMODE")).lower(), \
        setting(config, "AUG.RECOUNT")
    if _positive(p) and (mode not in MODES or not isinstance(count, int) or not 1 <= count <= 64):
        raise InvalidSpec(f"{where}: AUG.REMODE {mode!r} / AUG.RECOUNT {count!r} — TinyViT erases in const, rand "
                          "or pixel mode, 1 to 64 boxes")
    return Augmentation(side, interpolation, ra, float(p) if _positive(p) else 0.0, mode, count if _positive(p) else 1,
                        mix)


def check_mixing(config: Mapping[str, Any], where: str) -> MixConfig | None:
    """TinyViT's pair2 MixUp/CutMix settings, or None without mixing; InvalidSpec for what is not imported."""
    mixup, cutmix = number(config, "AUG.MIXUP", where), number(config, "AUG.CUTMIX", where)
    if setting(config, "AUG.CUTMIX_MINMAX") is not None:
        raise InvalidSpec(f"{where}: AUG.CUTMIX_MINMAX is set — its min-max boxes are not imported; import logits "
                          "saved with CUTMIX_MINMAX null")
    if not (_positive(mixup) or _positive(cutmix)):
        return None
    batch = setting(config, "DATA.BATCH_SIZE")
    if not isinstance(batch, int) or batch % 2:
        raise InvalidSpec(f"{where}: DATA.BATCH_SIZE {batch!r} is not even — TinyViT's pair2 mixing needs even batches "
                          "(its mixup asserts it)")
    prob, switch = setting(config, "AUG.MIXUP_PROB"), setting(config, "AUG.MIXUP_SWITCH_PROB")
    for key, value in (("AUG.MIXUP_PROB", prob), ("AUG.MIXUP_SWITCH_PROB", switch)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise InvalidSpec(f"{where}: {key} {value!r} is not a probability — pass the config the logits were "
                              "saved with")
    return MixConfig(float(mixup) if _positive(mixup) else 0.0, float(cutmix) if _positive(cutmix) else 0.0,
                     float(prob), float(switch))


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def recipe_for(aug: Augmentation, mean: tuple[float, ...], std: tuple[float, ...], passes: int = 2) -> Recipe:
    """kdcache's ops for TinyViT's transform: the crop (resized by Pillow), the flip, RandAugment (its fill is the
    mean in levels, its resample the interpolation) and noise erasing (in the normalised space of mean, std)."""
    ops: list[Any] = [PilResizedCrop(*SCALE, *RATIO, passes=passes), HorizontalFlip(HFLIP)]
    if aug.randaugment is not None:
        fill = tuple(min(255, round(255 * m)) for m in mean)
        ops.append(TimmRandAugment(aug.randaugment.num_layers, *fill, resample=PIL_CODES[aug.interpolation]))
    if aug.erase_p > 0:
        ops.append(NoiseErasing(aug.erase_count, MODES.index(aug.erase_mode), aug.side, *mean, *std))
    if aug.mix is not None:
        ops.append(PairMix(side=aug.side))
    return Recipe(tuple(ops))


def draw_view(seed: int, width: int, height: int, aug: Augmentation) -> dict[str, np.ndarray]:
    """What TinyViT's transform did under ``seed`` on a width x height image, as the recipe's arrays."""
    stream = Stream(seed)
    top, left, h, w = crop(stream, width, height)
    out = {"crop": np.array([top, left, h, w], np.int64), "flip": np.uint8(stream.random() < HFLIP)}
    if aug.randaugment is not None:
        out["timmra"] = randaugment(stream, aug.randaugment)
    if aug.erase_p > 0:
        out["noiseerase"] = erase(stream, aug.side, aug.erase_p, aug.erase_mode, aug.erase_count)
    return out


def plan(src: str | Path, source: Source, config_path: str | Path | None, progress: bool = True,
         passes: int = 2) -> Import:
    """The import of TinyViT's logits folder ``src`` (saved with the config at ``config_path``; ``progress``: a bar
    over the epochs as they are indexed; ``passes``: how its Pillow resizes run, kdcache.augment.op.PASSES)."""
    root = Path(src).expanduser()
    if config_path is None:
        raise InvalidSpec("tinyvit import needs --source-config, the config.json TinyViT's save_logits.py wrote — it says "
                          "which augmentation the seeds drew")
    config_file = Path(config_path).expanduser()
    config = read_config(config_file)
    aug = check_augmentation(config, str(config_file))
    side, interpolation = aug.side, aug.interpolation
    norm = str(setting(config, "DATA.MEAN_AND_STD_TYPE"))
    if norm not in NORMS:  # TinyViT itself raises KeyError (build.py)
        raise InvalidSpec(f"{config_file}: DATA.MEAN_AND_STD_TYPE {norm!r} is not one of {', '.join(NORMS)} — "
                          "TinyViT would not run with it; pass the config the logits were saved with")
    mean, std = NORMS[norm]
    pre = Preprocess(mean[: source.channels] if source.channels == 3 else (sum(mean) / 3,),
                     std[: source.channels] if source.channels == 3 else (sum(std) / 3,), side, interpolation,
                     origin=FORMAT)
    recipe = recipe_for(aug, tuple(pre.mean), tuple(pre.std), passes)
    k, folders = epochs(root)
    order = list_order(folders[0], source) if aug.mix is not None and names_keyed(folders[0]) else folder_order(source)
    loaded, spill = _read_epochs(folders, k, source, key_resolver(source, order), order, aug.mix is not None, progress)
    notes: list[str] = []
    try:
        use = substitutions(loaded, notes)
        digest = _digest(config_file, folders)
    except BaseException:
        spill.close()
        raise
    reader = _Reader(loaded, spill, source, np.argsort(order), aug, use)
    if aug.erase_p > 0:
        notes.append(f"{config_file}: erasing drew its noise in the space of mean {list(pre.mean)}, std "
                     f"{list(pre.std)}; train with --norm {','.join(map(str, pre.mean))}/{','.join(map(str, pre.std))} "
                     "to give the student TinyViT's normalised input")
    about = {"version": VERSION, "source": str(root), "epochs": len(folders), "config": str(config_file),
             "model": str(setting(config, "MODEL.NAME")), "interpolation": interpolation, "img_size": side,
             "auto_augment": str(setting(config, "AUG.AUTO_AUGMENT")), "reprob": aug.erase_p,
             "substituted": [[e, int(t), e2] for e, moved in use.items() for t, e2 in moved.items()]}
    return Import(FORMAT, about, recipe, len(folders), k, pre, str(setting(config, "MODEL.NAME")), digest, str(root),
                  reader.read, teacher_precision(config), notes=notes, close=spill.close)


def _read_epochs(folders: list[Path], k: int, source: Source, resolve: Callable[[str, str], int],
                 order: np.ndarray, paired: bool, progress: bool) -> tuple[list[Epoch], Spill]:
    """Each epoch folder read once, its entries spilled (tinyvit_files.Spill), with a bar over the epochs."""
    n = len(source.train)
    loaded, spill = [], Spill(len(folders), n, paired)
    try:
        for e, folder in enumerate(tqdm(folders, unit="epoch", desc="index tinyvit", leave=False,
                                        disable=not progress)):
            loaded.append(Epoch(folder, k))
            spill.entries[e] = loaded[-1].entries(n, resolve, order, paired)
    except BaseException:
        spill.close()
        raise
    return loaded, spill


def substitutions(loaded: list[Epoch], notes: list[str]) -> dict[int, dict[int, int]]:
    """{epoch: {TinyViT index: the epoch whose view it takes}} for each view that cannot be replayed (a row of
    pair2 mixing whose mate was a padded copy with an unsaved seed: one per epoch for an odd N on one rank): the
    sample's view of the nearest epoch that can be. InvalidSpec where none can."""
    use: dict[int, dict[int, int]] = {}
    for e, epoch in enumerate(loaded):
        for t in epoch.lost.tolist():
            others = sorted((abs(e2 - e), e2) for e2, other in enumerate(loaded) if t not in set(other.lost.tolist()))
            if not others:
                raise InvalidSpec(f"{epoch.folder}: sample {t} was mixed with a padded copy whose saved seed belongs to "
                                  "an earlier row of the same rank in every epoch, so its logits cannot be replayed "
                                  "(TinyViT trains on them silently) — import logits saved without mixing")
            use.setdefault(e, {})[t] = others[0][1]
    if use:
        count = sum(len(moved) for moved in use.values())
        notes.append(f"{count} view(s) cannot be replayed: TinyViT mixed the sample with a padded copy whose seed it "
                     "did not save (it trains on their logits regardless); each takes the sample's view of the "
                     "nearest epoch that can be — imported.substituted lists them")
    return use


class _Reader:
    def __init__(self, loaded: list[Epoch], spill: Spill, source: Source, index: np.ndarray, aug: Augmentation,
                 use: dict[int, dict[int, int]]) -> None:
        self.loaded, self.spill, self.source, self.index, self.aug, self.use = loaded, spill, source, index, aug, use

    def epoch_of(self, e: int, t: np.ndarray) -> np.ndarray:
        """The epoch whose entry each of TinyViT samples ``t`` reads for view ``e`` (substitutions())."""
        moved = self.use.get(e, {})
        return np.array([moved.get(int(i), e) for i in t], dtype=np.int64)

    def gather(self, e: int, block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """View ``e`` of kdcache samples ``block``: (their items, their mates' kdcache indices, the mates' items;
        without mixing the last two are -1 and unset)."""
        source = self.epoch_of(e, self.index[block])
        paired = self.aug.mix is not None
        items, mate_items = np.empty(len(block), self.loaded[0].item), np.empty(len(block), self.loaded[0].item)
        mates = np.full(len(block), -1, np.int64)
        for e2 in np.unique(source).tolist():
            here = source == e2
            entries = self.spill.entries[e2, block[here]]
            items[here] = self.loaded[e2].items(entries["at"])
            if paired:
                mates[here], mate_items[here] = entries["mate"], self.loaded[e2].items(entries["mate_at"])
        return items, mates, mate_items

    def read(self, block: np.ndarray) -> dict[str, np.ndarray]:
        t = self.index[block]
        drawn = [self.gather(e, block) for e in range(len(self.loaded))]
        items = np.stack([d[0] for d in drawn], axis=1)  # [n, views]
        where = f"TinyViT samples {int(t.min())}..{int(t.max())}"
        mate_seeds = np.stack([d[2]["seed"] for d in drawn], axis=1) if self.aug.mix is not None else items["seed"]
        if (items["seed"] < 0).any() or (mate_seeds < 0).any():
            raise DataCorrupt(f"{where}: a saved augmentation seed is negative — TinyViT draws them from [0, 2**31); "
                              "the values file is damaged")
        out = self.views(block, items["seed"], "", where)
        if self.aug.mix is not None:
            mates = np.stack([d[1] for d in drawn], axis=1)
            out |= self.views(mates, mate_seeds, "partner_", where)
            out |= self.mixing(items["seed"], mate_seeds, mates)
        out["topk/values"], out["topk/indices"] = top_k(items["probs"], items["ids"], self.source.num_classes, where)
        return out

    def views(self, samples: np.ndarray, seeds: np.ndarray, prefix: str, where: str) -> dict[str, np.ndarray]:
        """The view arrays of kdcache samples ``samples`` [n] or [n, views] under ``seeds`` [n, views]."""
        samples = np.broadcast_to(samples.reshape(len(seeds), -1), seeds.shape)
        sizes = {int(i): image_sizes(self.source, np.array([int(i)])) for i in np.unique(samples)}
        heights = np.vectorize(lambda i: int(sizes[int(i)][0][0]))(samples)
        widths = np.vectorize(lambda i: int(sizes[int(i)][1][0]))(samples)
        drawn = [[draw_view(int(seeds[r, v]), int(widths[r, v]), int(heights[r, v]), self.aug)
                  for v in range(seeds.shape[1])] for r in range(len(seeds))]
        arrays = {key: np.array([[view[key] for view in row] for row in drawn]) for key in drawn[0][0]}
        box = arrays.pop("crop")
        out = {f"aug/{prefix}rrc": crop_boxes(box[..., 0], box[..., 1], box[..., 2], box[..., 3], heights, widths,
                                              where)}
        return out | {f"aug/{prefix}{key}": value for key, value in arrays.items()}

    def mixing(self, seeds: np.ndarray, mate_seeds: np.ndarray, mates: np.ndarray) -> dict[str, np.ndarray]:
        """The pairmix arrays of each view: TinyViT's λ, switch and box from the pair's two seeds."""
        drawn = [[pair_params(int(a), int(b), self.aug.mix, self.aug.side) for a, b in zip(row_a, row_b)]
                 for row_a, row_b in zip(seeds.tolist(), mate_seeds.tolist())]
        lam = np.array([[d[0] for d in row] for row in drawn], dtype=np.float64)
        box = np.array([[d[2] for d in row] for row in drawn], dtype=np.int64)
        cut = np.array([[d[1] for d in row] for row in drawn], dtype=bool)
        empty = cut & ((box[..., 1] <= box[..., 0]) | (box[..., 3] <= box[..., 2]))
        mixed = (lam != 1.0) & ~empty
        return {"aug/pairmix_partner": np.where(mixed, mates, -1).astype(np.int64),
                "aug/pairmix_lam": np.where(mixed, lam, 1.0).astype(np.float32),
                "aug/pairmix_weight": np.where(mixed & ~cut, lam, 1.0), "aug/pairmix_box": box * mixed[..., None]}


def _digest(config_file: Path, folders: list[Path]) -> str:
    """sha256 over the config and every keys and values file, in epoch and rank order."""
    files = [p for folder in folders for p in sorted(folder.glob("rank*"))
             if re.fullmatch(r"rank[0-9]+-(keys\.txt|values\.bin)", p.name)]
    for path in files:
        guard(path, "TinyViT logits file")
    return files_digest(((f"{p.parent.name}/{p.name}", p) for p in files), start=config_file.read_bytes())
