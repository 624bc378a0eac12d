"""``kdcache upgrade``: rewrite an older cache's manifest in today's format, in place.

Only the manifest changes (one write of the group's zarr.json, taken under the writer lock); no array
byte is read into a new object or rewritten. The upgraded manifest is what :func:`normalise` reads
anyway, plus two things only a writer may settle:

- ``layout.every_chunk`` becomes true when a listing finds every chunk object present, so reads refuse
  a missing chunk from then on (format-1 writers skipped chunks equal to the fill value);
- the cache takes the id today's code gives its content, recorded in ``history``, with an alias
  ``ROOT/<new id>`` beside the folder, so a precompute of the same settings finds and reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from kdcache.cache.formats import FORMAT_VERSION
from kdcache.cache.claim import ClaimOptions
from kdcache.cache.claim import lock as claim_lock
from kdcache.cache.manifest import record_change
from kdcache.cache.roots import publish_aliases
from kdcache.cache.store import Cache, open_cache, open_writer


@dataclass
class UpgradeResult:
    path: str
    previous_format: int
    format_version: int
    previous_id: str
    cache_id: str
    every_chunk: bool  # reads now refuse a missing chunk
    missing_chunks: int  # chunk objects absent (read as the fill value); 0 when every_chunk
    aliases: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.previous_format != self.format_version


def upgrade(path: str, wait: bool = False, break_lock: bool = False) -> UpgradeResult:
    """Bring the complete cache at ``path`` to :data:`FORMAT_VERSION`; a current cache is left as it is
    (its aliases are written again, so a run that stopped after the manifest is finished by the next)."""
    lock = claim_lock(open_cache(path).path, ClaimOptions(wait=wait, break_lock=break_lock))
    try:
        cache = open_writer(path)  # read again under the lock: another writer may have been first
        before, old_id = cache.stored_format, cache.id
        missing = 0
        if before < FORMAT_VERSION:
            manifest = cache.manifest  # already in today's form (kdcache/cache/formats.py)
            missing = _count_missing(cache)
            manifest["layout"]["every_chunk"] = missing == 0
            record_change(manifest, old_id, {"format": [before, FORMAT_VERSION]})
            cache.save_manifest(manifest)
        elif not cache.manifest["layout"].get("every_chunk"):
            missing = _count_missing(cache)
    finally:
        lock.release()
    return UpgradeResult(cache.path, before, FORMAT_VERSION, old_id, cache.id,
                         bool(cache.manifest["layout"].get("every_chunk")), missing,
                         publish_aliases(cache.path, cache.manifest))


def _count_missing(cache: Cache) -> int:
    """Chunk objects absent from storage, over ``labels``, every per-view array and the extra views."""
    done = cache.shards_done()
    count = sum(len(cache.missing_chunks(name, done=done)) for name in ["labels", *cache.array_names])
    return count + sum(len(cache.missing_chunks(name, every=True)) for name in cache.expected_extra_arrays())
