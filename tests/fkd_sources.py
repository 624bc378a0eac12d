"""A small FKD soft-label folder written by FKD's rules, and the views its teacher saw.

Nothing here imports kdcache: a transcription of szq0214/FKD afd5294, ``FKD/FKD_SLG/generate_soft_label.py``
(the file path rule of ``main_worker``'s loop, ``label_quantization``, the fp16 branch) and ``FKD_SLG/utils.py``
(``RandomResizedCropWithCoords``: torchvision's ``get_params`` on the PIL image, the crop's fractions as a
``torch.FloatTensor``; ``RandomHorizontalFlipWithRes``; ``ImageFolder_FKD_GSL``). Checked against that code, run
unchanged (docs/interop.md, "Checked against the real code").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torchvision import transforms as T
from torchvision.transforms import functional as F


def teacher_view(img: Any, box: tuple[int, int, int, int], flip: bool, size: int) -> torch.Tensor:
    """``RandomResizedCropWithCoords`` (bicubic, ``input_size``) then ``RandomHorizontalFlipWithRes`` then
    ``ToTensor``: the teacher's view of one crop, before Normalize."""
    view = F.resized_crop(img, *box, [size, size], interpolation=T.InterpolationMode.BICUBIC)
    return F.to_tensor(F.hflip(view) if flip else view)


def quantise(probs: torch.Tensor, label_type: str) -> np.ndarray:
    """``label_quantization``: per crop the argmax, [id, p], or the top 5/10 ids over their probabilities."""
    out = []
    for p in probs:
        if label_type == "hard":
            out.append(torch.argmax(p))
        elif label_type == "smoothing":
            top = torch.argmax(p)
            out.append(torch.stack([top.float(), p[top]]))
        else:
            k = 10 if label_type.endswith("k10") else 5
            order = torch.argsort(p, descending=True)[:k]
            out.append(torch.stack([order.float(), p[order]]))
    return torch.stack(out).numpy()


def write_fkd(folder: Path, save_path: Path, num_crops: int = 3, size: int = 24, label_type: str = "marginal_smoothing_k5",
              fp16: bool = False, seed: int = 0, scale: tuple[float, float] = (0.08, 0.936),
              teacher: Any = None, classes: int = 10) -> dict[tuple[int, int], tuple[torch.Tensor, np.ndarray]]:
    """FKD's files for ``folder/train`` under ``save_path``, with ``teacher`` (a module on normalised views) or
    random logits over ``classes``; returns {(ImageFolder index, crop): (teacher view, stored label row)}."""
    torch.manual_seed(seed)
    ds = torchvision.datasets.ImageFolder(str(folder / "train"))
    crop = T.RandomResizedCrop(size, scale=scale)
    normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    views: dict[tuple[int, int], tuple[torch.Tensor, np.ndarray]] = {}
    for index, (path, _) in enumerate(ds.samples):
        img = ds.loader(path)
        boxes = [crop.get_params(img, crop.scale, crop.ratio) for _ in range(num_crops)]
        coords = torch.stack([torch.FloatTensor((i / img.size[1], j / img.size[0], h / img.size[1], w / img.size[0]))
                              for i, j, h, w in boxes])
        flips = torch.stack([torch.rand(1) < 0.5 for _ in range(num_crops)]).reshape(num_crops)
        rendered = [teacher_view(img, box, bool(f), size) for box, f in zip(boxes, flips)]
        batch = normalize(torch.stack(rendered)) if len(rendered[0]) == 3 else torch.stack(rendered)
        logits = teacher(batch) if teacher is not None else torch.randn(num_crops, classes) * 3
        labels = quantise(torch.softmax(logits, dim=1), label_type)
        state = [np.float16(coords.numpy()), flips.numpy(), np.float16(labels)] if fp16 else \
            [coords.numpy(), flips.numpy(), labels]
        target = save_path / "/".join(path.split("/")[-4:-1]) / (path.split("/")[-1].split(".")[0] + ".tar")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():  # "resume": an existing file is skipped
            torch.save(state, target)
        for k in range(num_crops):
            views[(index, k)] = (rendered[k], state[2][k])
    return views
