"""A recipe: the ordered ops of a spec like ``rrc+flip+trivial+erase+cutmix:0.5``.

Replay of one view at output size S (see docs/recipes.md):
1. If the recipe has no op that sizes the view (a crop or resize), the uint8 image is first resized to
   S x S (antialiased).
2. Geometric/colour ops (rrc, flip, trivial, randaugment, ...), then erase, run in spec order on the
   uint8 image; ``rrc`` crops and resizes to S x S wherever it stands. The view must then be S x S.
3. The result becomes float32 in [0, 1] (x / 255).
4. The mixing ops (always last; ``mixup+cutmix`` applies both, with one partner) render the partner the
   same way from the ``partner_*`` params and blend it into the float view, in spec order.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from kdcache.augment.autoaugment import RandAugment, TrivialAugment
from kdcache.augment.geometry import HorizontalFlip, PilResizedCrop, RandomErasing, RandomResizedCrop
from kdcache.augment.mixing import CutMix, MixOp, MixUp, check_mixable
from kdcache.augment.op import ERASE, MIX, PIXEL, Fields, Op, box_row, from_pil, to_pil
from kdcache.augment.rng import PARTNER_STREAM, RNG_NAME, RNG_VERSION, Draws, check_seed
from kdcache.augment.timm_ops import NoiseErasing, PairMix, TimmRandAugment, check_side
from kdcache.augment.timm_recipe import TimmRecipe
from kdcache.augment.torchvision_ops import CenterCrop, PaddedCrop, PilRandAugment, Resize, TensorRandAugment
from kdcache.errors import InvalidSpec, UnsupportedFormat

OPS: dict[str, type[Op]] = {
    cls.name: cls
    for cls in (RandomResizedCrop, PilResizedCrop, HorizontalFlip, TrivialAugment, RandAugment, RandomErasing, MixUp,
                CutMix, Resize, CenterCrop, PaddedCrop, TensorRandAugment, PilRandAugment, TimmRecipe, TimmRandAugment,
                NoiseErasing, PairMix)
}
NONE = "none"
PARTNER = "partner_"
_VALID = f"valid ops: {', '.join(OPS)} (or '{NONE}'), joined with '+', e.g. rrc+flip"


def resize_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic evaluation view: uint8 [C,H,W] -> float32 [C,size,size] in [0,1] (antialiased resize)."""
    _check_image(image)
    return F.to_dtype(F.resize(image, [size, size], antialias=True), torch.float32, scale=True)


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"augmentations take a uint8 [C,H,W] tensor, got {got}")


def _step(op: Op, image: torch.Tensor | Image.Image, row: Mapping[str, np.ndarray], size: int,
          mode: F.InterpolationMode) -> torch.Tensor | Image.Image:
    """One op of a view. Consecutive ops that run on PIL images pass the PIL image on, converting once."""
    if isinstance(op, PilResizedCrop):
        return op.crop_pil(image, row, size, mode)
    if isinstance(image, Image.Image):
        if op.pil:
            return op.apply_pil(image, row, size)
        image = from_pil(image)
    elif op.prefers_pil:
        return op.apply_pil(to_pil(image), row, size)
    return op.crop(image, row, size, mode) if isinstance(op, RandomResizedCrop) else op.apply(image, row, size)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Ordered recorded-augmentation ops; samples params purely from (seed, index, view) and replays them."""

    ops: tuple[Op, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        names = [op.name for op in self.ops]
        for i, op in enumerate(self.ops):
            if op.name in names[:i]:
                raise InvalidSpec(f"op {op.name!r} appears twice in {self.spec!r} — use each op at most once")
            if i and op.stage < self.ops[i - 1].stage and self.ops[i - 1].stage == MIX:
                raise InvalidSpec(
                    f"mixing op {self.ops[i - 1].name!r} must come after every other op in {self.spec!r} — "
                    f"e.g. rrc+flip+{self.ops[i - 1].name}"
                )
            if i and op.stage < self.ops[i - 1].stage:
                raise InvalidSpec(
                    f"{op.name!r} comes after {self.ops[i - 1].name!r} in {self.spec!r} — "
                    "order ops geometric/colour, then erase, then mixup/cutmix, e.g. rrc+flip+trivial+erase"
                )
        crops = [op.name for op in self.ops if isinstance(op, RandomResizedCrop)]
        if len(crops) > 1:
            raise InvalidSpec(f"{' and '.join(crops)} both crop in {self.spec!r} — use one of them")
        floats = [k for k, op in enumerate(self._view_ops) if op.floats]
        if floats and floats[0] != len(self._view_ops) - 1:
            raise InvalidSpec(f"{self._view_ops[floats[0]].name} renders the finished view, so it comes last in "
                              f"{self.spec!r} (before mixup or cutmix only)")
        whole = [op.name for op in self._view_ops if getattr(op, "whole", False)]
        if whole and len(self._view_ops) > 1:
            raise InvalidSpec(f"{whole[0]} renders the whole view, so {self.spec!r} may add only mixup or cutmix to it "
                              f"— e.g. {whole[0]}:rand-m9-mstd0.5-inc1+mixup:0.8")

    @classmethod
    def parse(cls, spec: str) -> Recipe:
        """Recipe from a spec such as ``rrc:0.35+flip+cutmix:0.5``; InvalidSpec on anything else."""
        text = "".join(str(spec).split()).lower()
        if text == NONE:
            return cls(())
        if not text:
            raise InvalidSpec(f"empty augmentation spec — {_VALID}, or '{NONE}' for plain resized views")
        ops = []
        for token in text.split("+"):
            name, *args = token.split(":")
            if name not in OPS:
                shown = f"empty op in {spec!r}" if not token else f"unknown augmentation op {name!r} in {spec!r}"
                raise InvalidSpec(f"{shown} — {_VALID}")
            ops.append(OPS[name].parse(args))
        return cls(tuple(ops))

    @property
    def spec(self) -> str:
        """Normalised spec, e.g. ``rrc+flip`` or ``rrc:0.35+cutmix:0.5``."""
        return "+".join(op.spec() for op in self.ops) or NONE

    def __str__(self) -> str:
        return self.spec

    @property
    def mixes(self) -> bool:
        """Whether views blend with a partner sample (labels become soft; see ``mixing``)."""
        return bool(self._mixes)

    @property
    def _mixes(self) -> tuple[MixOp, ...]:
        return tuple(op for op in self.ops if isinstance(op, MixOp))

    def check_sampled(self) -> None:
        """InvalidSpec unless kdcache can draw every op's params (some only replay imported ones)."""
        replay_only = [op.name for op in self.ops if not op.sampled]
        if replay_only:
            raise InvalidSpec(
                f"{', '.join(replay_only)} in {self.spec!r} only replay params imported from another project's files "
                "— to draw views, use rrc, randaugment or a timm: recipe (docs/recipes.md)"
            )

    @property
    def _view_ops(self) -> tuple[Op, ...]:
        return tuple(op for op in self.ops if op.stage in (PIXEL, ERASE))

    def source_box(self, params: Mapping[str, np.ndarray]) -> tuple[float, float, float, float] | None:
        """The normalised box ``(x0, y0, w, h)`` of the whole image that one view's first step resizes to
        the output: the ``rrc`` box, or the whole image in a recipe without one. None when another op
        works on the full image first (then nothing may be decoded at reduced size)."""
        ops = self._view_ops
        if ops and isinstance(ops[0], RandomResizedCrop):
            return box_row(params, "rrc")
        return None if any(op.sizes for op in ops) else (0.0, 0.0, 1.0, 1.0)

    def fields(self) -> Fields:
        """Every stored param array: field name -> (tail shape, numpy dtype name)."""
        out: Fields = {}
        for op in self._view_ops:
            out.update(op.fields())
        for mix in self._mixes:
            out.update(mix.fields())
        if self._mixes:
            out.update({PARTNER + k: v for op in self._view_ops for k, v in op.fields().items()})
        return out

    def stored_problem(self, params: Mapping[str, np.ndarray], num_samples: int) -> str | None:
        """Why stored params (field -> [B, *tail], as :meth:`fields` names them) hold values no op of this recipe
        writes, or None: each field's dtype and shape, each op's domain (Op.check_stored), its mixing partner's
        view too, and one partner for every mixing op of a view."""
        for name, (tail, dtype) in self.fields().items():
            values = np.asarray(params[name])
            if values.dtype != np.dtype(dtype) or values.shape[1:] != tuple(tail):
                return f"aug/{name} is stored as {values.dtype} {list(values.shape[1:])}, its op writes {dtype} {list(tail)}"
        for mix in self._mixes:
            why = mix.check_stored(params, num_samples)
            if why is not None:
                return why
        mixed = self.mixing(params)[0] >= 0 if self._mixes else None  # a view not mixed stores zeros for its partner
        partners = {key: np.asarray(value)[mixed] for key, value in params.items() if key.startswith(PARTNER)} \
            if mixed is not None else {}
        for op in self._view_ops:
            why = op.check_stored(params, num_samples) or (
                op.check_stored(partners, num_samples, PARTNER) if mixed is not None and mixed.any() else None)
            if why is not None:
                return why
        named = np.stack([np.asarray(params[mix.partner_field]) for mix in self._mixes]) if self._mixes else None
        if named is not None and len(named) > 1:
            both = (named >= 0).all(axis=0)
            if (named[:, both] != named[0, both]).any():
                return "the mixing ops of a view name different partners, where a chain mixes with one"
        return None

    def sample(self, seed: int, indices: np.ndarray, views: np.ndarray, num_samples: int) -> dict[str, np.ndarray]:
        """Params of a batch of (index, view) pairs, field -> [B, *tail].

        Element-wise pure: op k of view (i, v) draws from the Philox stream keyed by ``seed`` at
        counter (i, v, k, ·); a mixing partner j's params come from stream (j, v, PARTNER_STREAM + k).
        Mixing ops after the first mix with the first one's candidate partner.
        """
        self.check_sampled()
        seed = check_seed(seed)
        idx, views = np.asarray(indices), np.asarray(views)
        if idx.ndim != 1 or idx.shape != views.shape or idx.dtype.kind not in "iu" or views.dtype.kind not in "iu":
            raise ValueError(
                f"indices and views must be 1-D integer arrays of equal length, got {idx.shape} and {views.shape}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= num_samples or views.min() < 0 or views.max() >= 2**32):
            raise ValueError(f"indices must lie in [0, {num_samples}) and views in [0, 2**32)")
        idx, views = idx.astype(np.int64), views.astype(np.int64)
        out: dict[str, np.ndarray] = {}
        for stream, op in enumerate(self._view_ops):
            out.update(op.sample(Draws(seed, idx, views, stream)))
        if self._mixes:
            check_mixable(num_samples)
            first = len(self.ops) - len(self._mixes)
            candidate = None
            for stream, mix in enumerate(self._mixes, start=first):
                out.update(mix.sample_mix(Draws(seed, idx, views, stream), idx, num_samples, candidate))
                if candidate is None:
                    candidate = mix.draw(Draws(seed, idx, views, stream), idx, num_samples)[1]
            partner = np.max([out[mix.partner_field] for mix in self._mixes], axis=0)
            mixed = partner >= 0
            for stream, op in enumerate(self._view_ops):
                draws = Draws(seed, np.where(mixed, partner, 0), views, PARTNER_STREAM + stream)
                for key, values in op.sample(draws).items():
                    values[~mixed] = 0
                    out[PARTNER + key] = values
        return out

    def apply(
        self,
        image: torch.Tensor,
        params: Mapping[str, np.ndarray],
        size: int,
        partner: Callable[[int], torch.Tensor] | None = None,
        interpolation: str = "bilinear",
    ) -> torch.Tensor:
        """Replay one view: uint8 [C,H,W] + that view's params -> float32 [C,size,size] in [0,1].

        ``partner(j)`` returns the uint8 image of sample j; only mixed views call it. ``interpolation``
        (the model's own, see kdcache/models/preprocess.py) is used where the view is resized to ``size``.
        """
        view = self._render(image, params, size, "", interpolation)
        mixed = [mix for mix in self._mixes if int(np.asarray(params[mix.partner_field])) >= 0]
        if not mixed:
            return view
        j = int(np.asarray(params[mixed[0].partner_field]))
        if partner is None:
            raise ValueError(f"this view mixes with sample {j}: pass partner=<callable returning its uint8 image>")
        other = self._render(partner(j), params, size, PARTNER, interpolation)
        for mix in mixed:
            view = mix.mix(view, other, params)
        return view

    def _render(self, image: torch.Tensor, params: Mapping[str, np.ndarray], size: int, prefix: str,
                interpolation: str) -> torch.Tensor:
        _check_image(image)
        mode = F.InterpolationMode(interpolation)
        row = {key[len(prefix) :]: value for key, value in params.items() if key.startswith(prefix)}
        if not any(op.sizes for op in self.ops):
            image = F.resize(image, [size, size], interpolation=mode, antialias=True)
        for op in self._view_ops:
            image = _step(op, image, row, size, mode)
        if isinstance(image, Image.Image):
            image = from_pil(image)
        if tuple(image.shape[-2:]) != (size, size):
            raise InvalidSpec(f"recipe {self.spec!r} renders {image.shape[-2]}x{image.shape[-1]} views, the view size "
                              f"is {size}x{size} — end its resizes and crops at {size}")
        return F.to_dtype(image, torch.float32, scale=True)

    def mixing(self, params: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(partner int64 [B], -1 where unmixed; lam float32 [B], weight of the sample's own label).

        Soft labels are lam * onehot(y_i) + (1 - lam) * onehot(y_partner). Chained mixes keep the product of
        their lambdas (the own pixels MixUp keeps, outside the box CutMix pastes).
        """
        if self._mixes:
            partner = np.max([np.asarray(params[m.partner_field], dtype=np.int64) for m in self._mixes], axis=0)
            lam = np.prod([np.asarray(params[m.lam_field], dtype=np.float32) for m in self._mixes], axis=0)
            return partner, lam.astype(np.float32)
        if not params:
            raise ValueError(f"recipe {self.spec!r} stores no params, so mixing() cannot tell the batch size")
        batch = len(next(iter(params.values())))
        return np.full(batch, -1, dtype=np.int64), np.ones(batch, dtype=np.float32)

    def to_manifest(self) -> dict[str, Any]:
        """JSON-able, complete description: spec, random generator, and every op's version and hyper-params."""
        return {
            "spec": self.spec,
            "rng": {"name": RNG_NAME, "version": RNG_VERSION},
            "ops": [{"op": op.name, "version": op.version, **op.hyper()} for op in self.ops],
        }

    def check_pillow(self, recorded: str | None) -> None:
        """Warn where a one-pass Pillow resize (``pilrrc`` or ``resize`` with passes 1, the installed Pillow's own
        order) replays under another Pillow than the one that recorded the views (``recorded``; None: unknown):
        Pillow 13 resizes some crops in another pass order than Pillow 9.5-12.2."""
        import PIL

        one_pass = [op.name for op in self.ops if isinstance(op, (PilResizedCrop, Resize)) and op.passes == 1]
        if one_pass and recorded is not None and recorded != PIL.__version__:
            warnings.warn(f"this cache's views were recorded under Pillow {recorded}, this machine has "
                          f"{PIL.__version__}: {' and '.join(one_pass)} resize in Pillow's own pass order, which "
                          "changed in Pillow 13, so some views may differ from the teacher's (passes 2 gives the "
                          "same pixels under any Pillow; imports use it unless --pillow-order installed)",
                          stacklevel=2)

    def check_size(self, size: int) -> None:
        """InvalidSpec, in one line, where an op replays pixel boxes recorded at another view size than ``size``
        (TinyViT's erasing noise and pair boxes)."""
        for op in self.ops:
            check_side(op, size)

    def check_channels(self, channels: int) -> None:
        """InvalidSpec where an op cannot render images of ``channels`` (timm's transforms take RGB)."""
        if channels != 3 and any(isinstance(op, TimmRecipe) for op in self.ops):
            raise InvalidSpec(f"a timm recipe renders RGB images, the dataset has {channels} channel(s) — use "
                              "kdcache's own ops (rrc+flip+randaugment...)")

    def check_versions(self) -> None:
        """Refuse, in one line, ops whose pixels depend on package versions other than the recorded ones (a
        ``timm:`` recipe), unless the recipe was read with ``allow_version_drift`` (then a warning)."""
        for op in self.ops:
            if isinstance(op, TimmRecipe):
                op.check_versions()

    @classmethod
    def from_manifest(cls, d: Mapping[str, Any], allow_version_drift: bool = False) -> Recipe:
        """Inverse of ``to_manifest``; refuses op or generator versions this kdcache does not replay.
        ``allow_version_drift``: replay a ``timm:`` recipe under other package versions than it recorded."""
        if not isinstance(d, Mapping) or not isinstance(d.get("ops"), list) or not isinstance(d.get("rng"), Mapping):
            raise InvalidSpec("augmentation manifest lacks 'ops' or 'rng' — it was not written by Recipe.to_manifest")
        rng = (d["rng"].get("name"), d["rng"].get("version"))
        if rng != (RNG_NAME, RNG_VERSION):
            raise UnsupportedFormat(
                f"augmentation params were drawn with generator {rng}, this kdcache has {(RNG_NAME, RNG_VERSION)} — "
                "use the kdcache version that wrote the cache"
            )
        ops = []
        for entry in d["ops"]:
            hyper = dict(entry)
            name, version = hyper.pop("op", None), hyper.pop("version", None)
            if name not in OPS:
                raise InvalidSpec(f"unknown augmentation op {name!r} in manifest — {_VALID}")
            current = OPS[name].version
            if isinstance(version, int) and not isinstance(version, bool) and version < current:
                raise UnsupportedFormat(
                    f"augmentation op {name!r} was sampled by an older kdcache (op version {version}, this one "
                    f"is {current}) — re-run precompute to rebuild the cache, or use the kdcache that wrote it"
                )
            if version != current:
                raise UnsupportedFormat(
                    f"augmentation op {name!r} is version {version}, this kdcache replays version "
                    f"{current} — use the kdcache version that wrote the cache"
                )
            op = OPS[name].from_hyper(hyper)
            ops.append(dataclasses.replace(op, drift_ok=True) if allow_version_drift and isinstance(op, TimmRecipe)
                       else op)
        recipe = cls(tuple(ops))
        if d.get("spec") != recipe.spec:
            raise InvalidSpec(
                f"manifest spec {d.get('spec')!r} disagrees with its ops ({recipe.spec!r}) — restore the manifest"
            )
        return recipe
