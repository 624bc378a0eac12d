"""The manifest: the JSON that makes a cache self-describing — its identity, provenance, the rule for
which energy temperature losses and the extra views use, and the check that data matches a cache.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import platform
import time
from typing import Any, Mapping, Sequence

import zarr

from kdcache.errors import CacheMismatch

#: Manifest sections whose canonical JSON defines a cache's identity.
IDENTITY_KEYS = ("teacher", "dataset", "recipe", "outputs")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def cache_id(manifest: Mapping[str, Any]) -> str:
    """Content id of a cache: a hash of what determines its contents, nothing else."""
    identity = json.loads(canonical_json({key: manifest[key] for key in IDENTITY_KEYS}))
    for member in identity["teacher"]["members"]:
        member.pop("weights", None)  # where the weights file lay does not change the outputs
        if str(member.get("spec", "")).startswith("hf:"):
            member["spec"] = "hf"  # nor where a Hugging Face folder lay: its sha256 covers config and weights
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def record_change(manifest: dict[str, Any], previous_id: str, change: Mapping[str, Any]) -> None:
    """Give ``manifest`` its id and append a ``history`` entry for ``change`` (extend, add_members, upgrade)."""
    from kdcache import __version__

    manifest["cache_id"] = cache_id(manifest)
    manifest.setdefault("history", []).append({
        **change, "previous_id": previous_id, "cache_id": manifest["cache_id"], "kdcache": __version__,
        "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def provenance() -> dict[str, str]:
    """Versions, host and time of the run that writes a cache."""
    import numcodecs
    import torch

    from kdcache import __version__

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    import PIL

    return {
        "kdcache": __version__,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "user": user,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def refuse_imported(manifest: Mapping[str, Any], path: str, what: str) -> None:
    """Refuse ``what`` (work that runs the cache's teacher) on a cache ``kdcache import`` made: its teacher ran
    in another system and is not here."""
    imported = manifest.get("imported")
    if imported:
        raise CacheMismatch(f"cache {path} was imported from {imported.get('format')}: its teacher ran elsewhere, so "
                            f"{what} cannot run here — precompute with the teacher itself for a cache that can")


def energy_temperature(manifest: Mapping[str, Any]) -> float:
    """The energy temperature that energy-based losses and the choice of extra views use: 4 when stored
    (the energy-KD default), else the first stored one."""
    temps = [float(t) for t in manifest["outputs"]["energy"]["temperatures"]]
    return 4.0 if 4.0 in temps else temps[0]


def check_dataset(manifest: Mapping[str, Any], path: str, spec: str, fingerprint: str, num_classes: int,
                  num_samples: int, parts: Sequence[Mapping[str, Any]] = ()) -> None:
    """Refuse data other than what the cache at ``path`` was made from: its teacher outputs would be lies.
    ``parts`` (a sharded source's shards) let the refusal say which shard differs."""
    made = manifest["dataset"]
    if made["fingerprint"] != fingerprint:
        what = part_difference(made.get("parts") or [], parts)
        raise CacheMismatch(
            f"cache {path} was made from dataset {made['spec']} ({made['fingerprint'][:19]}…), "
            f"not from {spec} ({fingerprint[:19]}…){': ' + what if what else ''} — pass the dataset the cache "
            "was made from, or precompute a cache for this one"
        )
    if made["num_classes"] != num_classes or made["num_samples"] != num_samples:
        raise CacheMismatch(
            f"cache {path} has {made['num_classes']} classes and {made['num_samples']} samples, "
            f"dataset {spec} has {num_classes} and {num_samples} — use the matching dataset"
        )


def part_difference(made: Sequence[Mapping[str, Any]], given: Sequence[Mapping[str, Any]]) -> str:
    """What differs between the recorded shards and the given ones, in a few words ('' when unknown)."""
    if not made or not given:
        return ""
    names, now = [p["name"] for p in made], [p["name"] for p in given]
    added, gone = [n for n in now if n not in names], [n for n in names if n not in now]
    if added or gone:
        return "; ".join([*(f"shard {n} added" for n in added[:2]), *(f"shard {n} missing" for n in gone[:2])])
    if names != now:
        at = next(i for i, (a, b) in enumerate(zip(names, now)) if a != b)
        return f"the shards are in another order (position {at} holds {now[at]}, the cache's was {names[at]})"
    by_name = {p["name"]: p for p in made}
    for part in given:
        if part["sha256"] != by_name[part["name"]]["sha256"]:
            return (f"the samples of shard {part['name']} differ (keys, image sizes or labels; "
                    f"{part['samples']} now, {by_name[part['name']]['samples']} then)")
    return ""
