"""Caches outlive the code: caches written by earlier states of kdcache (tests/fixtures/compat, made by
that code with tests/fixtures/compat/make.py) are read, verified, trained from and extended by today's,
and a change to the manifest's keys cannot land without a new format version and a reader for the old form."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests_support import run_cli

from kdcache import PrecomputeConfig, open_cache, precompute
from kdcache.cache import formats
from kdcache.cache.formats import FORMAT_VERSION, KEYS, UPGRADES, key_paths, normalise
from kdcache.cache.manifest import cache_id
from kdcache.teacher.extend import add_members, extend

COMPAT = Path(__file__).parent / "fixtures" / "compat"
INDEX = json.loads((COMPAT / "fixtures.json").read_text())
FIXTURES = [(state, cache) for state in INDEX for cache in INDEX[state]["caches"]]
EXTENDABLE = {"dense-features", "topk"}  # extend refuses a cache with extra views, whatever its format


def stored_manifest(state: str, cache: str) -> dict:
    return json.loads((COMPAT / state / cache / "zarr.json").read_text())["attributes"]["kdcache"]


@pytest.fixture
def fixture_copy(tmp_path, request):
    """A writable copy of one fixture cache, and the image folder it was made from."""
    state, cache = request.param
    shutil.copytree(COMPAT / "folder", tmp_path / "folder")
    shutil.copytree(COMPAT / state / cache, tmp_path / "root" / cache)
    return str(tmp_path / "root" / cache), f"imagefolder:{tmp_path / 'folder'}"


@pytest.fixture(scope="module")
def today(tmp_path_factory) -> dict[str, dict]:
    """Today's manifests of the fixtures' builds: the same data, teacher and options."""
    out = tmp_path_factory.mktemp("today")
    shutil.copytree(COMPAT / "folder", out / "folder")
    argv = INDEX["format-1-last"]["caches"]
    built = {}
    for name, options in argv.items():
        cfg = PrecomputeConfig(dataset=f"imagefolder:{out / 'folder'}", teacher="cnn",
                               weights=str(COMPAT / "teacher.pt"), out=str(out / name), progress=False,
                               **_options(options["argv"]))
        built[name] = open_cache(precompute(cfg).path).manifest
    return built


def _options(argv: list[str]) -> dict:
    """The PrecomputeConfig fields a fixture's precompute argv sets."""
    flags = [a for a in argv if a != "--quiet"]
    out: dict = {}
    for flag, value in zip(flags[::2], flags[1::2]):
        key = flag.removeprefix("--").replace("-", "_")
        if key == "features":
            out["features"] = (*out.get("features", ()), value)
        elif key in ("views", "seed", "batch_size"):
            out[key] = int(value)
        elif key != "teacher":
            out[key] = value
    return out


def test_every_older_format_has_a_reader_and_a_fixture_of_real_old_bytes():
    versions = {stored_manifest(s, c)["format_version"] for s, c in FIXTURES}
    assert set(UPGRADES) == set(range(1, FORMAT_VERSION)), "every older version needs its step in formats.UPGRADES"
    assert versions >= set(range(1, FORMAT_VERSION)), \
        "bumping FORMAT_VERSION: add a fixture of the last state that wrote the old one (tests/fixtures/compat/make.py)"
    assert len(INDEX) >= 3


@pytest.mark.parametrize("state,cache", FIXTURES)
def test_a_fixture_holds_only_the_keys_of_its_version_and_reads_as_todays_form(state, cache, today):
    stored = stored_manifest(state, cache)
    assert key_paths(stored) <= KEYS[stored["format_version"]]
    now = normalise(stored)
    assert now["format_version"] == FORMAT_VERSION and now["cache_id"] == stored["cache_id"]
    bound = {"layout.bound", "layout.inputs"}  # absent before format 5: the cache binds neither (its meaning)
    assert key_paths(now) == key_paths(today[cache]) - (bound if stored["format_version"] < 5 else set())
    # The content is the same as today's build's, so once upgraded it takes today's id.
    assert cache_id(now | {"dataset": today[cache]["dataset"]}) == today[cache]["cache_id"]
    assert normalise(now) == now


@pytest.mark.parametrize("fixture_copy", FIXTURES, indirect=True, ids=[f"{s}/{c}" for s, c in FIXTURES])
def test_todays_commands_read_verify_recompute_train_and_extend_an_old_cache(fixture_copy, tmp_path, capsys):
    path, dataset = fixture_copy
    stored = open_cache(path).stored_format
    code, out, _ = run_cli(["info", path, "--quick"], capsys)
    assert code == 0 and f"format {stored} (read as {FORMAT_VERSION}; `kdcache upgrade` rewrites it)" in out
    code, out, _ = run_cli(["verify", path, "--recompute", "4", "--weights", str(COMPAT / "teacher.pt"),
                            "--dataset", dataset, "--device", "cpu"], capsys)
    assert code == 0 and "intact" in out and "4 views replayed" in out
    code, out, err = run_cli(["train", "--dataset", dataset, "--model", "cnn", "--cache", path, "--loss", "kd",
                              "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0, err
    argv = ["extend", path, "--views", "3", "--weights", str(COMPAT / "teacher.pt"), "--dataset", dataset, "--quiet"]
    code, out, err = run_cli(argv, capsys)
    if Path(path).name not in EXTENDABLE:
        assert code == 2 and err.count("\n") == 1 and "extra-views" in err
        return
    assert code == 0, err
    grown = open_cache(path)
    assert grown.stored_format == FORMAT_VERSION and grown.views == 3
    assert grown.manifest["history"][-1]["format"] == [stored, FORMAT_VERSION]
    assert run_cli(["verify", path], capsys)[0] == 0


def test_todays_manifests_hold_only_the_keys_of_the_current_version(tmp_path, teacher_weights):
    """A new, renamed or moved manifest key fails here until FORMAT_VERSION, formats.KEYS and a reader of the
    old form in formats.UPGRADES say what changed (docs/contributing.md, 'A new cache array')."""
    base = dict(dataset="fake:32", out=str(tmp_path), views=2, batch_size=32, chunk_samples=8, progress=False)
    paths = [precompute(PrecomputeConfig(teacher="cnn", weights=teacher_weights, logits="dense",
                                         augment="rrc+flip+cutmix", features=("layer1:attention",),
                                         extra_views="0.5:2", **base)).path,
             precompute(PrecomputeConfig(teacher="cnn", weights=teacher_weights, logits="sampled:8", **base)).path]
    members = precompute(PrecomputeConfig(teacher=("cnn", "cnn"), weights=(teacher_weights, teacher_weights),
                                          logits="topk:3", keep_members=True, **base)).path
    add_members(members, ["cnn"], [teacher_weights], batch_size=32, progress=False)
    grown = precompute(PrecomputeConfig(teacher="cnn", weights=teacher_weights, logits="topk:3", seed=1, **base)).path
    extend(grown, views=3, features=("layer2:pooled",), batch_size=32, progress=False)
    for path in [*paths, members, grown]:
        stored = json.loads((Path(path) / "zarr.json").read_text())["attributes"]["kdcache"]
        unknown = key_paths(stored) - KEYS[FORMAT_VERSION]
        assert not unknown, (f"manifest keys {sorted(unknown)} are not in formats.KEYS[{FORMAT_VERSION}] — a change "
                             "to the manifest's keys needs a new FORMAT_VERSION with its KEYS and an UPGRADES step "
                             "that reads the old form")
        assert stored["format_version"] == FORMAT_VERSION and normalise(stored) == stored


def test_opaque_subtrees_are_owned_by_their_own_versions():
    assert formats.OPAQUE == ("recipe.augment", "recipe.he_extra.augment", "provenance", "imported")
    assert "imported" not in formats.KEYS[3] and "imported" in formats.KEYS[4]
    assert key_paths({"recipe": {"augment": {"ops": [{"op": "rrc", "anything": 1}]}}}) == {"recipe.augment"}
