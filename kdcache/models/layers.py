"""What a model is made of: its named layers and their output shapes (``kdcache layers``), and the one change
kdcache makes to a model it did not build, its stem's input channels."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def list_layers(model: nn.Module,
                input_shape: tuple[int, int, int]) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape without the batch dimension) of every named submodule whose
    output is a tensor, in the order one forward pass on zeros of ``input_shape`` runs them.
    These names are what feature outputs can be recorded from."""
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and name not in seen:
                seen[name] = tuple(output.shape[1:])
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None else torch.float32)
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return list(seen.items())


def set_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first Conv2d (in definition order: the stem of every torchvision classifier) by
    one taking ``in_channels``; a no-op when it already does or the model has no Conv2d."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)),
                      ("", None))
    if conv is None or conv.in_channels == in_channels:
        return model
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model
