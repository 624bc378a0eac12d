"""What a loss receives each step besides the labels: the teacher's side, read from a cache, and
the student's hooked feature maps.

The trainer asks three questions here before its first step: what does the cache offer
(:func:`teacher_inputs`, the vocabulary of ``Loss.check``), which student and teacher layers does a
feature loss pair (:func:`layer_pairs`), and which cache arrays must the loader read
(:class:`CacheTargets`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdcache import losses
from kdcache.cache.logits import decode_logits, decode_logits_tensor, densify_tensors
from kdcache.cache.manifest import energy_temperature
from kdcache.cache.store import Cache
from kdcache.errors import CacheMismatch, InvalidSpec

_MAP_WORDS = {"attention": "attention maps", "full": "full feature maps", "pooled": "pooled features"}


def teacher_inputs(cache: Cache) -> set[str]:
    """What teacher outputs ``cache`` offers, in the vocabulary of ``Loss.check``.

    ``logits`` for dense logits, ``probs`` whenever a teacher distribution is stored (dense or
    sparse), ``energy``, and ``features:<mode>:<layer>`` for every cached feature layer.
    """
    available = set()
    if cache.target_arrays():
        available.add("probs")
        if cache.dense_logits:
            available.add("logits")
    if "energy" in cache.array_names:
        available.add("energy")
    for layer, info in cache.feature_layers().items():
        available.add(f"features:{info['mode']}:{layer}")
    return available


def layer_pairs(loss: type[losses.Loss], params: Mapping[str, Any], student_layers: Sequence[str],
                cache: Cache | None) -> str:
    """The ``layers`` hyper-parameter of a feature loss, filled from ``--student-layer`` and the cache.

    - ``-p layers=...`` alone is used as given (``layer3`` or ``student=teacher`` entries);
    - ``--student-layer S`` (repeatable) pairs S with the teacher layers named in ``-p layers`` or,
      without them, with the layers the cache holds, in order;
    - with neither, every cached layer is paired with the student layer of the same name.
    """
    given = params.get("layers", ())
    named = [e.strip() for e in given.split(",") if e.strip()] if isinstance(given, str) else list(given)
    if named and not student_layers:
        return ",".join(named)
    if named:
        if any("=" in e for e in named):
            raise InvalidSpec(f"--student-layer pairs with teacher layer names, but -p layers={given} already names "
                              "student=teacher pairs — give one or the other")
        teacher = named
    else:
        usable = {} if cache is None else cache.feature_layers()
        teacher = [layer for layer, info in usable.items() if info["mode"] in loss.feature_modes]
        if not teacher:
            mode = loss.feature_modes[0]
            raise CacheMismatch(f"loss {loss.name} needs {_MAP_WORDS[mode]} of a teacher layer; this cache has none "
                                f"— re-run precompute with --features layer3:{mode}")
    student = list(student_layers) or teacher
    if len(student) != len(teacher):
        raise InvalidSpec(f"{len(student)} --student-layer for {len(teacher)} teacher layers ({', '.join(teacher)}) "
                          "— give one --student-layer per teacher layer, in order")
    return ",".join(s if s == t else f"{s}={t}" for s, t in zip(student, teacher))


class CacheTargets:
    """Turns the ``teacher/<array>`` entries of a loader batch into the teacher's side of a loss.

    Always reads the teacher target (dense logits or sparse probabilities: agreement with the teacher
    is logged even for ce); ``energy`` adds the energy at :func:`energy_temperature`'s temperature (all
    stored temperatures in :meth:`decode`), ``layers`` the cached maps of those teacher layers.
    """

    def __init__(self, cache: Cache, energy: bool = False, layers: Sequence[str] = ()):
        self.cache = cache
        self.dense = cache.dense_logits
        self.targets = list(cache.target_arrays())
        self.energy_column = cache.energy_column(energy_temperature(cache.manifest)) if energy else None
        cached = cache.feature_layers()
        missing = [layer for layer in layers if layer not in cached]
        if missing:
            raise CacheMismatch(f"cache {cache.path} has no features of layer {missing[0]!r} (it has: "
                                f"{', '.join(cached) or 'none'}) — re-run precompute with --features {missing[0]}")
        self.features = {layer: cached[layer]["array"] for layer in layers}

    @classmethod
    def for_loss(cls, cache: Cache, criterion: losses.Loss) -> CacheTargets:
        """What ``criterion`` needs from ``cache``."""
        return cls(cache, "energy" in criterion.needs, [layer for _, layer in criterion.layer_pairs()])

    def arrays(self) -> list[str]:
        """Cache array names the loader must read for every item."""
        energy = ["energy"] if self.energy_column is not None else []
        return [*self.targets, *energy, *self.features.values()]

    def teacher_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-view shape of each paired teacher layer's cached map, keyed by teacher layer."""
        cached = self.cache.feature_layers()
        return {layer: tuple(cached[layer]["shape"]) for layer in self.features}

    def decode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The teacher's side of a batch as float32 CPU tensors: ``logits`` or ``probs``, ``energy``
        (every stored temperature), ``features`` by teacher layer."""
        block = {name: batch[f"teacher/{name}"].numpy() for name in self.targets}
        out: dict[str, Any] = {}
        if self.dense:
            out["logits"] = torch.from_numpy(decode_logits(block["logits"], self.cache.logit_dtype))
        else:
            out["probs"] = torch.from_numpy(np.asarray(self.cache.teacher_probs(block), np.float32))
        if self.energy_column is not None:
            out["energy"] = batch["teacher/energy"].float()
        out["features"] = {layer: batch[f"teacher/{name}"].float() for layer, name in self.features.items()}
        return out

    def __call__(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> losses.TeacherBatch:
        """The teacher's side of a training batch on ``device``: the stored arrays cross as they are
        (float16 or bfloat16 bits, ids and counts; non-blocking from the loader's pinned memory) and are
        decoded and densified there."""
        block = {name: batch[f"teacher/{name}"].to(device, non_blocking=True) for name in self.targets}
        teacher = losses.TeacherBatch()
        if self.dense:
            teacher.logits = decode_logits_tensor(block["logits"], self.cache.logit_dtype)
        else:
            teacher.probs = densify_tensors(self.cache.manifest["outputs"]["logits"], self.cache.num_classes, block)
        if self.energy_column is not None:
            teacher.energy = batch["teacher/energy"][:, self.energy_column].to(device, non_blocking=True).float()
        teacher.features = {layer: batch[f"teacher/{name}"].to(device, non_blocking=True).float()
                            for layer, name in self.features.items()}
        return teacher


class StudentFeatures:
    """Forward hooks on the student's paired layers; ``features`` maps teacher layer -> last output."""

    def __init__(self, model: torch.nn.Module, pairs: Sequence[tuple[str, str]]):
        modules = dict(model.named_modules())
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for student, teacher in pairs:
            if student not in modules or not student:
                names = ", ".join(n for n in modules if n and "." not in n)
                raise InvalidSpec(f"the student has no layer {student!r} — use one of: {names} "
                                  "(`kdcache layers MODEL` lists them all)")
            self._handles.append(modules[student].register_forward_hook(self._record(teacher)))

    def _record(self, teacher: str):
        def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
            self.features[teacher] = output
        return hook

    def shapes(self, model: torch.nn.Module, input_shape: tuple[int, int, int], device: torch.device
               ) -> dict[str, tuple[int, ...]]:
        """Per-sample output shape of each hooked layer, from one forward pass on zeros in eval mode."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(1, *input_shape, device=device))
        finally:
            model.train(was_training)
        shapes = {layer: tuple(out.shape[1:]) for layer, out in self.features.items()}
        self.features = {}
        return shapes

    def take(self) -> dict[str, torch.Tensor]:
        """The maps recorded by the last forward pass (and forget them)."""
        features, self.features = self.features, {}
        return features
