"""Caches other systems made, as kdcache caches, and kdcache caches in their layouts: ``kdcache import`` and
``kdcache export`` (docs/interop.md).

Each format has one module that knows its files (mldr.py, tinyvit.py, fkd.py); imported.py writes the cache, so
an imported cache is an ordinary one that trains with every logit loss. The files another system wrote are
read as data only: pickles through a restricted unpickler (pickles.py), raw binaries with their sizes
checked.
"""

from __future__ import annotations

#: ``kdcache import FORMAT``: what each format is.
IMPORT_FORMATS = {
    "ml-dr": "apple/ml-dr reinforcements: <index>.pth.tar per sample (params + top-k probabilities) and config.pth.tar",
    "tinyvit": "microsoft/Cream TinyViT saved logits: logits_top<K>_epoch<E>/rank<R>-{keys.txt,values.bin}",
    "fkd": "szq0214/FKD soft labels: <split>/<class>/<stem>.tar per image (crops, flips, top-k probabilities)",
}
#: ``kdcache export FORMAT``.
EXPORT_FORMATS = {"ml-dr": IMPORT_FORMATS["ml-dr"]}
