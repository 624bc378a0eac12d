"""Any source written as WebDataset shards (``kdcache.data.wds_writer.write_shards``): for tests, benchmarks
and users who move a folder of images into shards."""

from __future__ import annotations

import io
import os
import tarfile

from kdcache.data.images import ImageSet, Source


def write_shards(source: Source, out: str, per_shard: int = 1000) -> tuple[list[str], list[str]]:
    """Write ``source``'s splits as WebDataset shards ``OUT/train-000000.tar`` … and ``OUT/val-…``: one
    ``<key>.<ext>`` image member (its file's own bytes where the source has files, else PNG) and one
    ``<key>.cls`` label per sample, in sample order. Returns the train and val shard paths."""
    written: dict[str, list[str]] = {}
    for split, images in (("train", source.train), ("val", source.test)):
        written[split] = []
        for first in range(0, len(images), per_shard):
            path = os.path.join(out, f"{split}-{first // per_shard:06d}.tar")
            os.makedirs(out, exist_ok=True)
            with tarfile.open(path + ".partial", "w") as tar:
                for i in range(first, min(first + per_shard, len(images))):
                    data, ext = _member_bytes(images, i)
                    label = b"%d" % images.labels[i]
                    for name, body in ((f"{split}{i:08d}.{ext}", data), (f"{split}{i:08d}.cls", label)):
                        info = tarfile.TarInfo(name)
                        info.size = len(body)
                        tar.addfile(info, io.BytesIO(body))
            os.replace(path + ".partial", path)
            written[split].append(path)
    return written["train"], written["val"]


def _member_bytes(images: ImageSet, i: int) -> tuple[bytes, str]:
    files = getattr(images, "files", None)
    if files is not None:  # an image folder: the file as it is, so the shards decode to the same pixels
        path = images.root / files[i]
        ext = path.suffix.lower().lstrip(".")
        return path.read_bytes(), "jpg" if ext == "jpeg" else ext
    from PIL import Image

    image, _ = images[i]
    buffer = io.BytesIO()
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, "PNG")
    return buffer.getvalue(), "png"
