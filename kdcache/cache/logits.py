"""The stored teacher target: each logit mode's manifest entry and arrays, the bfloat16 codec, densified
probabilities.

numpy has no bfloat16, so bfloat16 values are stored as their uint16 bit patterns: :func:`to_stored`
and :func:`decode_logits` are the one place that knows it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import numpy as np

from kdcache.cache.arrays import ArraySpec
from kdcache.errors import InvalidSpec, UnsupportedFormat

if TYPE_CHECKING:  # torch is imported where a tensor is handled: ls, info and verify never load it
    import torch

LOGIT_DTYPES = ("float16", "bfloat16", "float32")
SAMPLE_STREAM = 0xFFFF  # Philox stream of the class draws of ``sampled`` logits (ops use 0.. and 2**15 + k)
MAX_DRAWS = 65535  # counts are stored as uint8 (N <= 255) or uint16

#: The arrays holding the teacher target, per logit mode.
TARGET_ARRAYS = {
    "dense": ("logits",),
    "topk": ("topk/values", "topk/indices"),
    "sampled": ("sampled/ids", "sampled/counts"),
}


class LogitRequest(NamedTuple):
    """``--logits dense|topk:K|sampled:N`` parsed: the mode and K or N (0 for dense)."""

    mode: str
    size: int = 0


def parse_logit_option(text: str) -> LogitRequest:
    """``--logits`` as a :class:`LogitRequest`; the class count is checked by :func:`logits_entry`."""
    mode, _, size = text.partition(":")
    if mode == "dense" and not size:
        return LogitRequest("dense")
    if mode not in ("topk", "sampled") or not size.isdigit() or int(size) < 1:
        raise InvalidSpec(f"--logits {text!r} is not dense, topk:K or sampled:N — e.g. --logits topk:10 or "
                          "--logits sampled:50")
    if mode == "sampled" and int(size) > MAX_DRAWS:
        raise InvalidSpec(f"--logits sampled:{size} draws more than {MAX_DRAWS} classes per view — use N <= {MAX_DRAWS}")
    return LogitRequest(mode, int(size))


def logits_entry(request: LogitRequest, num_classes: int, dtype: str) -> dict[str, Any]:
    """The manifest entry of the logit mode ``request`` for ``num_classes`` classes."""
    mode, n = request
    if mode == "dense":
        return {"mode": "dense", "dtype": dtype}
    index_dtype = "int16" if num_classes <= np.iinfo(np.int16).max else "int32"
    if mode == "topk":
        if n > num_classes:
            raise InvalidSpec(f"--logits topk:{n} keeps more classes than the dataset's {num_classes} — "
                              f"use K <= {num_classes} (or --logits dense)")
        return {"mode": "topk", "k": n, "dtype": dtype, "values": "log_softmax", "index_dtype": index_dtype}
    return {"mode": "sampled", "draws": n, "width": min(n, num_classes), "temperature": 1.0,
            "index_dtype": index_dtype, "count_dtype": "uint8" if n <= 255 else "uint16",
            "rng": {"stream": SAMPLE_STREAM}}


def parse_logits(text: str, num_classes: int, dtype: str) -> dict[str, Any]:
    """The manifest entry of ``--logits dense|topk:K|sampled:N`` for ``num_classes`` classes."""
    return logits_entry(parse_logit_option(text), num_classes, dtype)


def target_specs(entry: dict[str, Any], num_classes: int) -> list[ArraySpec]:
    """The arrays that store the teacher target of logit mode ``entry``."""
    if entry["mode"] == "dense":
        return [ArraySpec("logits", (num_classes,), storage_dtype(entry["dtype"]), entry["dtype"])]
    if entry["mode"] == "topk":
        k = (entry["k"],)
        return [ArraySpec("topk/values", k, storage_dtype(entry["dtype"]), entry["dtype"]),
                ArraySpec("topk/indices", k, entry["index_dtype"])]
    width = (entry["width"],)
    return [ArraySpec("sampled/ids", width, entry["index_dtype"]),
            ArraySpec("sampled/counts", width, entry["count_dtype"])]


def storage_dtype(dtype: str) -> str:
    """The Zarr dtype a logical dtype is stored as: bfloat16 as its uint16 bit pattern."""
    return "uint16" if dtype == "bfloat16" else dtype


def decode_logits(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored logits (any logical dtype) as float32."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    return values.astype(np.float32)


def to_stored(values: torch.Tensor, dtype: str) -> np.ndarray:
    """``values`` cast to the logical ``dtype`` (float16, bfloat16, float32) as the numpy array that is stored."""
    return from_device(stored_tensor(values, dtype).cpu(), dtype)


def stored_tensor(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """``values`` cast to the logical ``dtype`` on their own device; bfloat16 as its int16 bit patterns
    (numpy has no bfloat16), so the tensor can be copied to the host as it is stored."""
    import torch

    t = values.to(getattr(torch, dtype))
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def from_device(host: torch.Tensor, dtype: str) -> np.ndarray:
    """The stored numpy array of a host copy of :func:`stored_tensor` (bfloat16 bits as uint16)."""
    return host.numpy().view(np.uint16) if dtype == "bfloat16" else host.numpy()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def densify(spec: Mapping[str, Any], num_classes: int, block: Mapping[str, np.ndarray],
            temperature: float = 1.0) -> np.ndarray:
    """Dense teacher probabilities ``[..., C]`` float32 from the target arrays of one logit mode.

    - dense: ``softmax(z / T)``;
    - topk: the stored values are log-probabilities, so ``exp(v)`` are the exact top-k
      probabilities; the missing mass ``1 - Σ exp(v)`` is spread uniformly over the other classes;
    - sampled: ``counts / N``, the unbiased sparse estimate of the teacher distribution.

    For sparse modes ``T != 1`` tempers the densified distribution, ``p^(1/T)`` renormalised: exact
    on the stored classes' ratios, approximate on the tail (and no longer unbiased for sampled).
    """
    mode = spec["mode"]
    if mode == "dense":
        z = decode_logits(block["logits"], spec["dtype"]).astype(np.float64)
        return _softmax(z / temperature).astype(np.float32)
    if mode == "topk":
        p = np.exp(decode_logits(block["topk/values"], spec["dtype"]).astype(np.float64))
        k = p.shape[-1]
        rest = np.clip(1.0 - p.sum(axis=-1, keepdims=True), 0.0, None) / max(num_classes - k, 1)
        probs = np.repeat(rest, num_classes, axis=-1)
        np.put_along_axis(probs, block["topk/indices"].astype(np.int64), p, axis=-1)
    elif mode == "sampled":
        ids = block["sampled/ids"].astype(np.int64)
        probs = np.zeros((*ids.shape[:-1], num_classes + 1))  # the last column absorbs the -1 padding
        np.put_along_axis(probs, np.where(ids >= 0, ids, num_classes), block["sampled/counts"].astype(np.float64),
                          axis=-1)
        probs = probs[..., :num_classes]
    else:
        raise UnsupportedFormat(f"logit mode {mode!r} is unknown to this kdcache — upgrade kdcache")
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


def decode_logits_tensor(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """:func:`decode_logits` in torch, on the tensor's own device (the trainer's, for cached targets that
    cross to it as stored)."""
    import torch

    if dtype == "bfloat16":
        return (values.to(torch.int32) << 16).view(torch.float32)
    return values.float()


def densify_tensors(spec: Mapping[str, Any], num_classes: int, block: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """:func:`densify` at T = 1 in torch, on the block's device: float32 ``[B, C]`` probabilities."""
    import torch

    mode = spec["mode"]
    if mode == "dense":
        return decode_logits_tensor(block["logits"], spec["dtype"]).softmax(dim=-1)
    if mode == "topk":
        p = decode_logits_tensor(block["topk/values"], spec["dtype"]).double().exp()
        k = p.shape[-1]
        rest = (1.0 - p.sum(dim=-1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)
        probs = rest.expand(*p.shape[:-1], num_classes).clone()
        probs.scatter_(-1, block["topk/indices"].long(), p)
    elif mode == "sampled":
        ids = block["sampled/ids"].long()
        probs = torch.zeros((*ids.shape[:-1], num_classes + 1), dtype=torch.float64, device=ids.device)
        probs.scatter_(-1, torch.where(ids >= 0, ids, num_classes), block["sampled/counts"].double())
        probs = probs[..., :num_classes]
    else:
        raise UnsupportedFormat(f"logit mode {mode!r} is unknown to this kdcache — upgrade kdcache")
    return (probs / probs.sum(dim=-1, keepdim=True)).float()
