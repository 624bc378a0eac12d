"""The local Hugging Face hub cache, where timm and transformers weights are looked up (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

from kdcache.errors import MissingData


def hub_cache() -> Path:
    """The local Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def cached_file(repo: str, names: tuple[str, ...], spec: str) -> Path:
    """The first of ``names`` of hub repo ``repo`` in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    for filename in names:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(hub_cache()))
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    folder = hub_cache() / f"models--{repo.replace('/', '--')}"
    raise MissingData(f"the weights of {spec} ({repo}) are not in the Hugging Face cache at {folder} — copy that "
                      "folder from a machine that has them (kdcache never downloads; HF_HUB_CACHE sets the cache)")
