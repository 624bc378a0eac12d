"""Class maps: which teacher output stands for each dataset class.

An ImageNet-1k teacher distilled on a 100-class subset (or on Imagenette) has 1000 outputs, the
dataset 100 classes. ``--class-map FILE`` holds one line per dataset class, in the dataset's class
order: the teacher's class index, or its class name where the teacher's weights list them. The
teacher's logits are then the mapped columns, in dataset order; energies, top-k and samples are
computed from those (docs/format.md, "Class maps").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kdcache.errors import InvalidSpec, MissingData
from kdcache.locations import guard


def read_class_map(path: str, dataset_classes: Sequence[str], teacher_classes: Sequence[str] | None,
                   teacher_count: int) -> list[int]:
    """The teacher index of every dataset class, from the lines of ``path``."""
    file = Path(path).expanduser()
    guard(file, "class map")
    if not file.is_file():
        raise MissingData(f"class map {path} not found — write one line per dataset class: the teacher's class "
                          "index or name")
    lines = [line.split("#", 1)[0].strip() for line in file.read_text().splitlines()]
    lines = [line for line in lines if line]
    if len(lines) != len(dataset_classes):
        raise InvalidSpec(f"class map {path} has {len(lines)} lines, the dataset {len(dataset_classes)} classes — "
                          "write one line per dataset class, in the dataset's class order")
    by_name = {name: i for i, name in enumerate(teacher_classes or ())}
    out = []
    for number, (line, klass) in enumerate(zip(lines, dataset_classes), start=1):
        if line.lstrip("-").isdigit():
            index = int(line)
            if not 0 <= index < teacher_count:
                raise InvalidSpec(f"class map {path} line {number} ({klass}): index {index} is outside the teacher's "
                                  f"0..{teacher_count - 1} — use a teacher class index")
        elif line in by_name:
            index = by_name[line]
        else:
            known = "its class names are not known, so use indices" if not by_name else (
                f"names are the teacher's, e.g. {', '.join(list(by_name)[:3])}")
            raise InvalidSpec(f"class map {path} line {number} ({klass}): {line!r} is not a teacher class — {known}")
        out.append(index)
    if len(set(out)) != len(out):
        twice = next(i for i in out if out.count(i) > 1)
        raise InvalidSpec(f"class map {path} maps two dataset classes to teacher class {twice} — map each dataset "
                          "class to its own teacher class")
    return out


def map_entry(indices: list[int], teacher_count: int) -> dict[str, Any]:
    """The manifest's record of a class map (part of the cache id: it changes every stored output)."""
    return {"teacher_classes": int(teacher_count), "indices": [int(i) for i in indices]}


def check_classes(spec: str, teacher_count: int, num_classes: int, has_map: bool) -> None:
    """Refuse a teacher whose class count differs from the dataset's without a map."""
    if not has_map and teacher_count != num_classes:
        raise InvalidSpec(f"teacher {spec} has {teacher_count} classes, the dataset {num_classes} — pass "
                          "--class-map FILE (one line per dataset class: the teacher class index or name)")


def apply_class_map(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Make ``model``'s logits its ``indices`` columns, in that order, by a forward hook: the model, its
    layer names and its state dict stay what they were (feature layers are named as without a map)."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    placed: dict[torch.device, torch.Tensor] = {}

    def select(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        if output.device not in placed:
            placed[output.device] = index.to(output.device)
        return output.index_select(1, placed[output.device])

    model.register_forward_hook(select)
    return model
