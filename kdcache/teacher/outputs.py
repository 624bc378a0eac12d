"""What the teacher's outputs become in the cache, per view: the target in one of three logit modes
(dense logits, top-k log-probabilities, or N classes drawn from the teacher distribution as ids and
counts), energies from the full float32 logits, and feature maps of named layers captured by hooks.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from kdcache import models
from kdcache.augment.rng import Draws
from kdcache.cache.arrays import MAP_CODEC, MAP_LEVEL, ArraySpec
from kdcache.cache.logits import SAMPLE_STREAM, from_device, storage_dtype, stored_tensor
from kdcache.errors import InvalidSpec
from kdcache.runtime import HostCopier



def energy(logits: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """``E = -T·logsumexp(z/T)`` per row and temperature: [B, len(temperatures)], float32."""
    z = logits.float()
    return torch.stack([-t * torch.logsumexp(z / t, dim=1) for t in temperatures], dim=1)


def topk_log_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest log-probabilities ``log_softmax(z)`` per row, descending, and their class ids."""
    values, indices = torch.log_softmax(logits.float(), dim=1).topk(k, dim=1)
    return values, indices


def sample_counts(logits: torch.Tensor, uniforms: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``N = uniforms.shape[1]`` classes per row from ``softmax(z)`` by inverting its CDF.

    Returns the distinct drawn ids and their counts, ``[B, width]`` each, by descending count (ties:
    lower id first), padded with id -1 and count 0. ``counts / N`` is an unbiased estimate of the
    teacher distribution (arXiv 2503.16870).
    """
    cdf = torch.softmax(logits.double(), dim=1).cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]
    drawn = torch.searchsorted(cdf, uniforms.to(cdf), right=True).clamp_max_(cdf.shape[1] - 1)
    counts = torch.zeros(cdf.shape, dtype=torch.int32, device=cdf.device)
    counts.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.int32))
    top, ids = counts.sort(dim=1, descending=True, stable=True)
    top, ids = top[:, :width], ids[:, :width]
    return torch.where(top > 0, ids, -1), top


def class_uniforms(seed: int, indices: np.ndarray, views: np.ndarray, draws: int) -> np.ndarray:
    """The uniforms behind the class draws of views (i, v), float64 [B, draws]: Philox stream SAMPLE_STREAM."""
    return Draws(seed, indices, views, SAMPLE_STREAM).uniform(draws)


def feature_shape(layer: str, shape: tuple[int, ...], mode: str) -> tuple[int, ...]:
    """Per-view shape stored for a layer whose output is ``shape`` (without the batch axis)."""
    if mode == "full":
        return shape
    if mode == "pooled":
        return shape[:1]
    if len(shape) != 3:
        raise InvalidSpec(f"layer {layer} outputs shape {list(shape)}, attention needs a [C,H,W] map — "
                          f"use --features {layer}:full or {layer}:pooled")
    return shape[1:]


def reduce_feature(output: torch.Tensor, mode: str) -> torch.Tensor:
    """What is kept of a layer's batch output, float16: the map, its spatial mean, or its attention map.

    attention is ``q = a / (||a||₂ + 1e-6)`` with ``a = Σ_c F_c²`` (computed in float32), the
    normalised map angular-margin distillation compares; normalised, it cannot overflow float16.
    """
    if mode == "full":
        return output.detach().to(torch.float16, copy=True)
    x = output.detach().float()
    if mode == "pooled":
        return (x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x).to(torch.float16)
    a = x.pow(2).sum(dim=1)
    return (a / (a.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-6)).to(torch.float16)


class FeatureCapture:
    """Forward hooks that keep, per forward pass, only the reduced output of each requested layer.

    A caller that copies the maps out before the next pass may :meth:`give_back` what
    :meth:`take` returned; full maps are then copied into that memory instead of fresh memory,
    which costs the model's thread page faults (docs/benchmarks.md).
    """

    def __init__(self, model: torch.nn.Module, modes: dict[str, str]):
        modules = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self._lent: dict[str, torch.Tensor] = {}
        self._spare: dict[str, torch.Tensor] = {}
        self._handles = [modules[layer].register_forward_hook(self._hook(layer, mode)) for layer, mode in modes.items()]

    def _hook(self, layer: str, mode: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
            if layer in self.out:  # a module called twice in one pass: its first call, as `kdcache layers`
                return
            spare = self._spare.pop(layer, None)
            if mode == "full" and spare is not None and spare.shape == output.shape and spare.device == output.device:
                self.out[layer] = spare.copy_(output.detach())
            else:
                self.out[layer] = reduce_feature(output, mode)
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The maps of the last forward pass, reduced as requested (float16)."""
        out, self.out = self.out, {}
        self._lent = out
        return out

    def give_back(self) -> None:
        """Declare the maps :meth:`take` returned last unused from now on: the next pass may overwrite them."""
        self._spare, self._lent = dict(self._lent), {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def feature_entries(teacher: torch.nn.Module, spec: str, modes: dict[str, str],
                    input_shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Manifest entries of the requested feature layers, checked against the teacher's named layers."""
    if not modes:
        return []
    shapes = dict(models.list_layers(teacher, input_shape))
    entries = []
    for layer, mode in modes.items():
        if layer not in shapes:
            names = ", ".join(list(shapes)[:12])
            raise InvalidSpec(f"teacher {spec} has no layer {layer!r} with a tensor output — e.g. {names} "
                              f"(`kdcache layers {spec}` lists all)")
        tail = feature_shape(layer, tuple(shapes[layer]), mode)
        entries.append({"layer": layer, "mode": mode, "shape": list(tail), "dtype": "float16",
                        "array": f"features/{layer}"})
    return entries


def teacher_targets(logits: torch.Tensor, entry: dict[str, Any],
                    uniforms: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The target arrays of one batch in logit mode ``entry``, computed and cast on the logits' device
    (bfloat16 as int16 bits; see :func:`host_arrays`)."""
    if entry["mode"] == "dense":
        return {"logits": stored_tensor(logits, entry["dtype"])}
    if entry["mode"] == "topk":
        values, indices = topk_log_probs(logits, entry["k"])
        return {"topk/values": stored_tensor(values, entry["dtype"]), "topk/indices": indices}
    ids, counts = sample_counts(logits, uniforms, entry["width"])
    return {"sampled/ids": ids, "sampled/counts": counts}


def batch_outputs(capture: FeatureCapture, logits: torch.Tensor, outputs: dict[str, Any], uniforms: torch.Tensor | None,
                  params: dict[str, np.ndarray], members: Sequence[torch.Tensor] = (),
                  copier: HostCopier | None = None) -> dict[str, np.ndarray]:
    """Every per-view array the cache stores for one teacher batch (``outputs``: the manifest's section;
    ``members``: the ensemble members' float32 logits, stored when the manifest keeps them). Everything is
    computed on the device and crosses to the host in one go (``copier``: pinned buffers, one sync)."""
    on_device = {
        **teacher_targets(logits, outputs["logits"], uniforms),
        "energy": energy(logits, tuple(outputs["energy"]["temperatures"])),
        **{f"features/{layer}": fmap for layer, fmap in capture.take().items()},
        **member_outputs(members, outputs),
    }
    host = (copier or HostCopier()).copy(on_device)
    return {**host_arrays(host, outputs), **{f"aug/{name}": values for name, values in params.items()}}


def host_arrays(host: dict[str, torch.Tensor], outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The stored numpy arrays of host copies of :func:`batch_outputs`' tensors: bfloat16 bits as uint16,
    class ids and counts in their stored integer dtypes."""
    entry, kept = outputs["logits"], outputs.get("members") or {}
    logical = {"logits": entry.get("dtype"), "topk/values": entry.get("dtype"),
               **{name: kept.get("dtype") for name in kept.get("arrays", [])}}
    casts = {"topk/indices": entry.get("index_dtype"), "sampled/ids": entry.get("index_dtype"),
             "sampled/counts": entry.get("count_dtype")}
    out = {}
    for name, tensor in host.items():
        array = from_device(tensor, logical[name]) if name in logical else tensor.numpy()
        out[name] = array.astype(casts[name]) if name in casts else array
    return out


def member_outputs(members: Sequence[torch.Tensor], outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The kept member logits ``members/<i>/logits`` of one batch, cast to the stored dtype on the device."""
    kept = outputs.get("members")
    if not kept or not members:
        return {}
    return {name: stored_tensor(z, kept["dtype"]) for name, z in zip(kept["arrays"], members)}


def feature_specs(entries: Sequence[dict[str, Any]]) -> list[ArraySpec]:
    """The arrays of feature entries; full maps take the codec measured best for them (docs/format.md)."""
    return [ArraySpec(f["array"], tuple(f["shape"]), "float16",
                      **({"codec": MAP_CODEC, "level": MAP_LEVEL} if f["mode"] == "full" else {})) for f in entries]


def member_specs(outputs: dict[str, Any], num_classes: int) -> list[ArraySpec]:
    """The arrays of kept member logits, ``members/<i>/logits [N, K, C]``."""
    kept = outputs.get("members")
    if not kept:
        return []
    return [ArraySpec(name, (num_classes,), storage_dtype(kept["dtype"]), kept["dtype"]) for name in kept["arrays"]]
