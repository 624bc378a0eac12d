"""Dataset sources: shapes, fixed splits, fingerprints and one-line errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdcache import data
from kdcache.data import folder
from kdcache.data import ImageSet, open_source
from kdcache.errors import InvalidSpec, MissingData


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and " — " in message, message
    return message


def write_folder(root: Path, mode: str = "RGB", second_split: str = "val") -> Path:
    """train/{cat,dog} with 3 images each and <second_split>/{cat,dog} with 1 each, 12x10 pixels."""
    rng = np.random.default_rng(0)
    shape = (10, 12, 3) if mode == "RGB" else (10, 12)
    for split, count in (("train", 3), (second_split, 1)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{k}.png")
    return root


def test_mnist5k_is_4000_train_1000_test_gray_28x28_uint8():
    source = open_source("mnist5k")
    assert (len(source.train), len(source.test)) == (4000, 1000)
    assert (source.num_classes, source.channels, source.image_size) == (10, 1, 28)
    image, label = source.train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
    assert label == source.train.labels[0] and 0 <= label < 10
    assert source.classes == tuple("0123456789")
    assert 0.1 < source.mean[0] < 0.15 and 0.25 < source.std[0] < 0.35


def test_mnist5k_split_is_stratified_and_disjoint():
    source = open_source("mnist5k")
    assert np.bincount(source.test.labels).tolist() == [100] * 10
    train = {bytes(img.numpy()) for img in source.train.images}
    assert not any(bytes(img.numpy()) in train for img in source.test.images[:200])


def test_digits_is_8x8_gray_scaled_to_full_uint8_range():
    source = open_source("digits")
    assert len(source.train) + len(source.test) == 1797
    assert (len(source.train), len(source.test)) == (1438, 359)
    assert (source.channels, source.image_size, source.num_classes) == (1, 8, 10)
    assert source.train.images.dtype == torch.uint8
    assert int(source.train.images.min()) == 0 and int(source.train.images.max()) == 255
    # round-half-up(v * 255 / 16): only these 17 values can occur
    allowed = {(v * 255 + 8) // 16 for v in range(17)}
    assert set(source.train.images.unique().tolist()) <= allowed


def test_fake_has_n_train_and_quarter_test_rgb_images():
    source = open_source("fake:8")
    assert (len(source.train), len(source.test)) == (8, 2)
    assert (source.num_classes, source.channels, source.image_size) == (10, 3, 32)
    image, label = source.test[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label < 10
    assert len(open_source("fake:3").test) == 1


def test_fake_takes_classes_and_size_and_normalises_spec():
    source = open_source("fake:8:3:16")
    assert (source.num_classes, source.image_size, source.spec) == (3, 16, "fake:8:3:16")
    assert source.train.images.shape == (8, 3, 16, 16)
    assert set(source.train.labels.tolist()) <= {0, 1, 2}
    assert open_source(" fake:8:10:32 ").spec == "fake:8"
    assert open_source("fake:8:3").spec == "fake:8:3"


def test_fingerprint_is_stable_across_opens_and_processes():
    first = open_source("fake:8").fingerprint
    data._kept.cache_clear()
    second = open_source("fake:8").fingerprint
    script = "from kdcache.data import open_source; print(open_source('fake:8').fingerprint)"
    other_process = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout.strip()
    assert first.startswith("sha256:") and first == second == other_process


def test_fake_images_depend_only_on_their_index():
    small, large = open_source("fake:8"), open_source("fake:16")
    assert torch.equal(small.train.images, large.train.images[:8])
    assert torch.equal(small.test.images, large.test.images[:2])
    assert np.array_equal(small.train.labels, large.train.labels[:8])


def _mix64(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_fake_images_follow_the_documented_formula():
    """Written from docs/datasets-and-models.md in plain Python integers, not through kdcache.fake."""
    source = open_source("fake:4:7:5")
    for index, (image, label) in enumerate([source.train[3], source.test[0]]):
        i = (3, 10**9)[index]
        stream = b"".join(_mix64(i * 2**24 + j).to_bytes(8, "little") for j in range(10))
        assert image.numpy().tobytes() == stream[: 3 * 5 * 5]
        assert label == _mix64(i * 2**24 + 2**24 - 1) % 7


def test_fake_images_are_the_same_on_every_machine():
    """Fixed hashes: a change here changes every fake: dataset's fingerprint and every cache made from one."""
    import hashlib

    source = open_source("fake:64")
    digests = [hashlib.sha256(im.numpy().tobytes()).hexdigest()[:16]
               for im in (source.train.images[0], source.train.images[63], source.test.images[15])]
    assert digests == ["877dbe0255c923c7", "f101e5588cd2ceb3", "fad01b07e4cea10f"]
    assert source.train.labels[:8].tolist() == [1, 2, 3, 9, 4, 5, 5, 8]
    assert source.fingerprint == "sha256:5bfb557738d3e62522ef92d8a2699fe774af16c5b11e04113a860af4061d1cfd"


def test_fingerprint_differs_between_datasets():
    prints = {open_source(s).fingerprint for s in ("fake:8", "fake:9", "fake:8:3", "digits")}
    assert len(prints) == 4


def test_labels_are_read_only_and_source_is_shared():
    source = open_source("fake:8")
    assert open_source("fake:8") is source
    with pytest.raises(ValueError):
        source.train.labels[0] = 1
    image, _ = source.train[0]
    image.zero_()
    assert source.train[0][0].any()


def test_imagefolder_decodes_lazily_with_sorted_classes(tmp_path):
    source = open_source(f"imagefolder:{write_folder(tmp_path)}")
    assert source.classes == ("cat", "dog") and source.num_classes == 2
    assert (len(source.train), len(source.test)) == (6, 2)
    assert sorted(source.train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert (source.channels, source.image_size) == (3, 10)
    k = source.train.files.index("train/dog/1.png")
    image, label = source.train[k]
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 12) and label == 1
    expected = np.array(Image.open(tmp_path / "train" / "dog" / "1.png")).transpose(2, 0, 1)
    assert torch.equal(image, torch.from_numpy(expected))


def test_imagefolder_train_order_mixes_classes_and_is_fixed(tmp_path):
    # Training shuffles within a few contiguous blocks of samples: a class-by-class order would give
    # batches of one class. The test split keeps the folder order.
    for name in ("a", "b", "c", "d"):
        for k in range(16):
            for split in ("train", "val"):
                (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
                if split == "train" or k == 0:
                    Image.new("RGB", (4, 4), (k, 0, 0)).save(tmp_path / split / name / f"{k}.png")
    source = open_source(f"imagefolder:{tmp_path}")
    first = source.train.labels[:16]
    assert len(set(first.tolist())) >= 3
    assert all(label == "abcd".index(f.split("/")[1]) for label, f in zip(source.train.labels, source.train.files))
    assert source.test.labels.tolist() == [0, 1, 2, 3]
    assert folder.open_folder(data.parse(f"imagefolder:{tmp_path}")).train.files == source.train.files  # fixed


def test_imagefolder_of_grayscale_images_has_one_channel(tmp_path):
    source = open_source(f"imagefolder:{write_folder(tmp_path, mode='L')}")
    assert source.channels == 1 and len(source.mean) == 1
    assert source.test[0][0].shape == (1, 10, 12)


def test_imagefolder_accepts_test_as_second_split(tmp_path):
    source = open_source(f"imagefolder:{write_folder(tmp_path, second_split='test')}")
    assert len(source.test) == 2


def test_imagefolder_set_pickles_small_and_still_decodes(tmp_path):
    source = open_source(f"imagefolder:{write_folder(tmp_path)}")
    blob = pickle.dumps(source.train)
    assert len(blob) < 2000
    clone: ImageSet = pickle.loads(blob)
    assert torch.equal(clone[3][0], source.train[3][0])


def test_imagefolder_fingerprint_changes_when_a_file_changes_size(tmp_path):
    spec = f"imagefolder:{write_folder(tmp_path)}"
    before = open_source(spec).fingerprint
    assert open_source(spec).fingerprint == before
    Image.new("RGB", (40, 30)).save(tmp_path / "val" / "cat" / "0.png")
    assert open_source(spec).fingerprint != before


def test_imagefolder_with_different_val_classes_is_refused(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(MissingData) as excinfo:
        open_source(f"imagefolder:{tmp_path}")
    assert "'bird'" in one_line_error(excinfo)


@pytest.mark.parametrize("layout", ["missing", "no_train", "no_images"])
def test_imagefolder_without_usable_data_says_where_to_put_it(tmp_path, layout):
    root = tmp_path / "images"
    if layout == "no_train":
        root.mkdir()
    if layout == "no_images":
        for split in ("train", "val"):
            (root / split / "cat").mkdir(parents=True)
            (root / split / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(MissingData) as excinfo:
        open_source(f"imagefolder:{root}")
    assert "train/<class>" in one_line_error(excinfo)


def test_torchvision_dataset_that_is_not_downloaded_is_missing_data(tmp_path):
    with pytest.raises(MissingData) as excinfo:
        open_source(f"torchvision:cifar10:{tmp_path}")
    assert "never downloads" in one_line_error(excinfo)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic 0x08 (uint8) + ndim, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_files_load_as_uint8_tensors(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    source = open_source(f"torchvision:mnist:{tmp_path}")
    assert source.spec == f"torchvision:MNIST:{tmp_path}"
    assert (len(source.train), len(source.test), source.num_classes) == (6, 3, 10)
    assert source.train.images.shape == (6, 1, 28, 28) and source.channels == 1
    assert source.test.labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize("spec", ["nope", "fake", "fake:0", "fake:-3", "fake:x", "fake:8:0",
                                  "fake:1:2:3:4", "torchvision:ImageNet:/data", "imagefolder:"])
def test_bad_dataset_spec_is_invalid(spec):
    with pytest.raises(InvalidSpec) as excinfo:
        open_source(spec)
    one_line_error(excinfo)


def test_unknown_spec_lists_available_sources():
    with pytest.raises(InvalidSpec) as excinfo:
        open_source("cifar")
    message = one_line_error(excinfo)
    assert all(pattern in message for pattern, _ in data.available())
