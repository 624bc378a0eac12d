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
from kdcache.errors import CacheMismatch, InvalidSpec
from kdcache.store import Cache, decode_logits

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


def energy_temperature(cache: Cache) -> float:
    """The energy temperature losses see: 4 when stored (the energy-KD default), else the first."""
    temps = [float(t) for t in cache.manifest["outputs"]["energy"]["temperatures"]]
    return 4.0 if 4.0 in temps else temps[0]


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
    """Turns the ``teacher/<array>`` entries of a loader batch into a :class:`losses.TeacherBatch`.

    Reads the teacher target (dense logits or sparse probabilities) and, when the loss needs them,
    the energy and the feature maps of its layers.
    """

    def __init__(self, cache: Cache, criterion: losses.Loss):
        self.cache = cache
        self.dense = cache.dense_logits
        self.targets = list(cache.target_arrays())  # read even for ce: agreement with the teacher is logged
        self.energy_column = cache.energy_column(energy_temperature(cache)) if "energy" in criterion.needs else None
        cached = cache.feature_layers()
        self.features = {layer: cached[layer]["array"] for _, layer in criterion.layer_pairs()}

    def arrays(self) -> list[str]:
        """Cache array names the loader must read for every item."""
        energy = ["energy"] if self.energy_column is not None else []
        return [*self.targets, *energy, *self.features.values()]

    def teacher_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-view shape of each paired teacher layer's cached map, keyed by teacher layer."""
        cached = self.cache.feature_layers()
        return {layer: tuple(cached[layer]["shape"]) for layer in self.features}

    def __call__(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> losses.TeacherBatch:
        teacher = losses.TeacherBatch()
        if self.targets:
            block = {name: batch[f"teacher/{name}"].numpy() for name in self.targets}
            if self.dense:
                logits = decode_logits(block["logits"], self.cache.logit_dtype)
                teacher.logits = torch.from_numpy(logits).to(device)
            else:
                teacher.probs = torch.from_numpy(np.asarray(self.cache.teacher_probs(block), np.float32)).to(device)
        if self.energy_column is not None:
            teacher.energy = batch["teacher/energy"][:, self.energy_column].float().to(device)
        for layer, name in self.features.items():
            teacher.features[layer] = batch[f"teacher/{name}"].to(device).float()
        return teacher


class FeatureTap:
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
