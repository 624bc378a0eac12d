"""The teacher of a cache: one model, or an ensemble whose members' outputs are combined.

``--teacher A --weights WA --teacher B --weights WB`` builds the members in order, hashes each
weights file for the cache id, and wraps them in :class:`Ensemble`, whose forward pass returns the
combined logits the rest of stage 1 stores (docs/format.md, "Teacher ensembles"):

- ``mean-prob`` (the default, as dataset reinforcement does): the target is the mean of the members'
  softmax at T = 1. Its logits are ``log(mean_m softmax(z_m)) + mean_m logsumexp(z_m)``: their
  softmax is exactly the mean probability, and the shift gives them the members' average logit
  scale, so the energy ``-T·logsumexp(z/T)`` of the ensemble target is the members' mean energy at
  T = 1 rather than a constant 0.
- ``mean-logit``: the mean of the members' logits.

With ``--keep-members`` each member's own dense logits are stored too (``members/<i>/logits``).

A cache records each member's spec and sha256; :func:`load_recorded` rebuilds that teacher for
``extend`` and ``verify --recompute`` and applies the one rule of which weights are the recorded ones.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from kdcache.models.class_maps import apply_class_map, check_classes, map_entry, read_class_map
from kdcache.errors import InvalidSpec, MissingData, WeightsMismatch
from kdcache.models.preprocess import Preprocess
from kdcache.models import PRETRAINED, LoadedModel, is_zoo_reference, load_model

ENSEMBLE_MODES = ("mean-prob", "mean-logit")


def member_pairs(teacher: str | Sequence[str], weights: str | Sequence[str] | None) -> list[tuple[str, str | None]]:
    """(spec, weights file) of every member: ``--teacher`` and ``--weights`` paired in order."""
    specs = [teacher] if isinstance(teacher, str) else list(teacher)
    if weights is None:
        files: list[str | None] = [None] * len(specs)
    else:
        files = [weights] if isinstance(weights, (str, os.PathLike)) else [str(w) for w in weights]
    if not specs:
        raise InvalidSpec("precompute needs at least one --teacher — e.g. --teacher cnn --weights teacher.pt")
    if len(files) != len(specs):
        raise InvalidSpec(f"{len(specs)} --teacher but {len(files)} --weights — give one --weights per --teacher, "
                          "in the same order")
    return [(spec, None if w is None else str(w)) for spec, w in zip(specs, files)]


def combine(member_logits: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """The ensemble's logits [B, C] (float32) from its members' logits, as the module docstring defines."""
    if len(member_logits) == 1:
        return member_logits[0].float()
    z = torch.stack([m.float() for m in member_logits])  # [M, B, C]
    if mode == "mean-logit":
        return z.mean(dim=0)
    if mode != "mean-prob":
        raise InvalidSpec(f"--ensemble {mode!r} is not one of {', '.join(ENSEMBLE_MODES)}")
    log_mean_p = torch.logsumexp(torch.log_softmax(z, dim=2), dim=0) - math.log(len(member_logits))
    return log_mean_p + torch.logsumexp(z, dim=2).mean(dim=0).unsqueeze(1)


class Ensemble(nn.Module):
    """Members run on the same inputs; the output is :func:`combine` of their logits.

    Member ``i``'s layers are named ``members.<i>.<layer>`` (what ``--features`` takes for an
    ensemble). With ``keep`` the members' float32 logits of the last forward stay in ``last``.
    """

    def __init__(self, members: Sequence[nn.Module], mode: str = "mean-prob", keep: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.mode, self.keep = mode, keep
        self.last: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [member(x).float() for member in self.members]
        self.last = outs if self.keep else []
        return combine(outs, self.mode)


def state_sha256(model: nn.Module) -> str:
    """Hash of a model's parameters and buffers, for teachers handed over as objects."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


class Teachers(NamedTuple):
    """What :func:`load_teachers` builds."""

    module: nn.Module  # one model, or an Ensemble; logits in the dataset's class order
    section: dict[str, Any]  # the manifest's teacher section
    preprocess: Preprocess | None  # the members' own preprocessing; None: the dataset's statistics


def load_teachers(
    teacher: str | Sequence[str], weights: str | Sequence[str] | None, num_classes: int, channels: int,
    ensemble: str = "mean-prob", keep_members: bool = False,
    modules: nn.Module | Sequence[nn.Module] | None = None,
    class_map: str | Sequence[int] | None = None, dataset_classes: Sequence[str] = (),
) -> Teachers:
    """The teacher to run (one model or an :class:`Ensemble`), the manifest's ``teacher`` section and
    the members' preprocessing.

    ``modules`` are teachers handed over as objects (hashed by their parameters); otherwise each
    member is loaded by kdcache/models/registry.py (a weights file, hashed by its bytes, or zoo weights).
    ``class_map`` (a file, or the indices a cache recorded) selects the teacher columns of the
    dataset's classes (kdcache/models/class_maps.py); without one the class counts must agree.
    """
    if ensemble not in ENSEMBLE_MODES:
        raise InvalidSpec(f"--ensemble {ensemble!r} is not one of {', '.join(ENSEMBLE_MODES)}")
    pairs = member_pairs(teacher, weights)
    loaded = (_given(pairs, modules, num_classes, mapped=class_map is not None) if modules is not None
              else [_load(s, w, num_classes, channels) for s, w in pairs])
    section: dict[str, Any] = {"members": [m.entry() for m in loaded], "ensemble": None}
    counts = {m.num_classes for m in loaded}
    if len(counts) > 1:
        raise InvalidSpec(f"ensemble members have {sorted(counts)} classes — give members with the same classes")
    count = counts.pop()
    if class_map is not None:
        indices = (read_class_map(class_map, dataset_classes, loaded[0].classes, count) if isinstance(class_map, str)
                   else [int(i) for i in class_map])
        section["class_map"] = map_entry(indices, count)
        for member in loaded:
            apply_class_map(member.module, indices)
    else:
        check_classes(loaded[0].spec, count, num_classes, has_map=False)
    pre = _shared_preprocess(loaded)
    nets = [m.module for m in loaded]
    if len(nets) == 1:
        if keep_members:
            raise InvalidSpec("--keep-members needs an ensemble — give two or more --teacher/--weights pairs")
        return Teachers(nets[0], section, pre)
    section["ensemble"] = ensemble
    return Teachers(Ensemble(nets, ensemble, keep_members), section, pre)


def _given(pairs: list[tuple[str, str | None]], modules: nn.Module | Sequence[nn.Module], num_classes: int,
           mapped: bool) -> list[LoadedModel]:
    """Teachers handed over as modules: taken to have the dataset's classes, or with a class map the
    outputs of their last Linear layer."""
    given = [modules] if isinstance(modules, nn.Module) else list(modules)
    if len(given) != len(pairs):
        raise InvalidSpec(f"{len(given)} teacher modules but {len(pairs)} teacher specs — name each module")
    return [LoadedModel(m, spec, w, state_sha256(m), _outputs(m, num_classes) if mapped else num_classes)
            for (spec, w), m in zip(pairs, given)]


def _outputs(model: nn.Module, default: int) -> int:
    """The class count of a module handed over: its last Linear's outputs, else the dataset's."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else default


def _load(spec: str, path: str | None, num_classes: int, channels: int) -> LoadedModel:
    if path is None and not is_zoo_reference(spec, path):
        raise InvalidSpec(f"precompute needs --weights for teacher {spec}: a file (train one with `kdcache train`), "
                          "torchvision:TAG or pretrained")
    if path is not None and not is_zoo_reference(spec, path) and not os.path.isfile(path):
        raise MissingData(f"weights file {path} not found — check the path given to --weights")
    return load_model(spec, path, num_classes, channels)


def _shared_preprocess(loaded: list[LoadedModel]) -> Preprocess | None:
    """The members' common preprocessing (members with none follow the others)."""
    records = [(m.spec, m.preprocess) for m in loaded if m.preprocess is not None]
    for spec, pre in records[1:]:
        if (pre.mean, pre.std) != (records[0][1].mean, records[0][1].std):
            raise InvalidSpec(f"ensemble members normalise differently ({records[0][0]}: {list(records[0][1].mean)}, "
                              f"{spec}: {list(pre.mean)}) — pass --teacher-norm to give them the same inputs")
    return records[0][1] if records else None


def members_entry(num_members: int, keep_members: bool, dtype: str) -> dict[str, Any]:
    """``{"members": {...}}`` for the manifest's outputs when members' logits are kept, else ``{}``
    (so caches without kept members keep the id they always had)."""
    if not keep_members or num_members < 2:
        return {}
    return {"members": {"dtype": dtype, "arrays": [f"members/{i}/logits" for i in range(num_members)]}}


def recorded_reference(member: Mapping[str, Any]) -> str | None:
    """The ``--weights`` value that loads a recorded member again: its zoo tag, else its file."""
    tag = member.get("tag")
    if isinstance(tag, str) and tag.startswith("torchvision:"):
        return tag
    if isinstance(tag, str) and tag.startswith("timm:"):
        return PRETRAINED
    return None if str(member["spec"]).startswith("hf:") else member.get("weights")


def load_recorded(manifest: Mapping[str, Any], weights: Sequence[str] | None = None,
                  modules: nn.Module | Sequence[nn.Module] | None = None) -> nn.Module:
    """The teacher a cache was made with, rebuilt from its manifest, in eval mode.

    Weights come from ``weights`` (one per member, in the manifest's order), else from the recorded
    zoo tags or paths; ``modules`` may stand in for files. A member is accepted when the sha256 of its
    weights, or of its loaded parameters and buffers (what a cache made from a module records), is the
    recorded one; anything else is refused before the teacher runs. A recorded class map is applied.
    """
    members, ds = manifest["teacher"]["members"], manifest["dataset"]
    files = [str(w) for w in weights] if weights else [recorded_reference(m) for m in members]
    if modules is None and any(f is None and not is_zoo_reference(m["spec"], None) for f, m in zip(files, members)):
        raise InvalidSpec("the cache was made from teacher modules, not weights files — pass the modules "
                          "(teacher=...) or --weights FILE per member")
    if modules is None and len(files) != len(members):
        raise InvalidSpec(f"the cache was made by {len(members)} teacher(s) but {len(files)} --weights were given — "
                          "give one --weights per teacher, in the manifest's order (`kdcache info`)")
    recorded_map = manifest["teacher"].get("class_map")
    teacher, section, _ = load_teachers([m["spec"] for m in members], None if modules is not None else files,
                                        int(ds["num_classes"]), int(ds["channels"]),
                                        manifest["teacher"].get("ensemble") or "mean-prob",
                                        "members" in manifest["outputs"], modules=modules,
                                        class_map=recorded_map["indices"] if recorded_map else None)
    nets = list(teacher.members) if isinstance(teacher, Ensemble) else [teacher]
    for net, have, want in zip(nets, section["members"], members):
        if have["sha256"] != want["sha256"] and state_sha256(net) != want["sha256"]:
            raise WeightsMismatch(f"teacher {want['spec']} weights {have.get('weights') or '(module)'} hash to "
                                  f"{have['sha256'][:19]}…, the cache was made with {want['sha256'][:19]}… — "
                                  "pass the weights the cache was made with (--weights)")
    return teacher.eval()
