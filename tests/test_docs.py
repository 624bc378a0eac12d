"""The docs stay true: the generated CLI reference matches the CLI, and every doc link resolves."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_matches_the_commands():
    typer_cli = Path(sys.executable).parent / "typer"
    generated = subprocess.run(
        [str(typer_cli), "kdcache_cli.main", "utils", "docs", "--name", "kdcache",
         "--title", "kdcache command reference"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    stored = (ROOT / "docs" / "cli-reference.md").read_text()
    assert generated.strip() == stored.strip(), "docs/cli-reference.md is stale — run `make docs`"


def test_relative_links_in_docs_and_readme_point_to_files():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.slow
def test_the_worked_example_of_teachers_md_runs(tmp_path):
    """docs/teachers.md's example, run by bash as written, on a generated Imagenette-style folder with
    random ResNet-18 weights in a temporary torch hub."""
    from zoo_support import jpeg_folder, torchvision_hub

    text = (ROOT / "docs" / "teachers.md").read_text()
    block = re.search(r"## Worked example.*?```bash\n(.*?)```", text, re.S).group(1)
    folder = jpeg_folder(tmp_path / "imagenette", classes=3, train=4, val=2)
    for k, wnid in enumerate(("n01440764", "n02102040", "n02979186")):
        for split in ("train", "val"):
            (folder / split / f"c{k}").rename(folder / split / wnid)
    torchvision_hub(tmp_path / "torch", "resnet18", "IMAGENET1K_V1")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision:resnet18 on imagefolder:imagenette/val: top-1" in done.stdout
    assert "resnet8x4 on imagefolder:imagenette/val: top-1" in done.stdout
    assert (tmp_path / "runs" / "r8x4" / "model.pt").is_file()


def test_the_commands_of_contributing_md_run(tmp_path):
    """Every command of docs/contributing.md runs here: pytest invocations collect (their markers and
    paths are real, without running the suite inside the suite), `make` targets resolve, the CLI
    reference it regenerates equals the stored one, and the fixture script finds every fixture made."""
    text = (ROOT / "docs" / "contributing.md").read_text()
    lines = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines() if line.strip()]
    assert len(lines) >= 8
    python = str(Path(sys.executable))
    fixtures = ROOT / "tests" / "fixtures" / "compat" / "fixtures.json"
    before = fixtures.read_text()
    for line in lines:
        words = shlex.split(line.replace(".venv/bin/python", python))
        env = dict(os.environ)
        while "=" in words[0]:
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words[0] == "make":
            done = subprocess.run(["make", "-n", "--no-print-directory", *words[1:]], cwd=ROOT, capture_output=True,
                                  text=True)
            assert done.returncode == 0, f"{line}: {done.stderr}"
            if words[1:] == ["docs"]:
                out = tmp_path / "cli-reference.md"
                command = next(c for c in done.stdout.replace("\\\n", " ").splitlines() if " utils docs " in c)
                argv = shlex.split(command)
                argv[0], argv[-1] = str(Path(python).parent / "typer"), str(out)
                subprocess.run(argv, cwd=ROOT, check=True, env=env)
                assert out.read_text().strip() == (ROOT / "docs" / "cli-reference.md").read_text().strip()
            continue
        if words[1:3] == ["-m", "pytest"]:
            words.append("--collect-only")
        done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, f"{line}: {done.stdout[-800:]} {done.stderr[-800:]}"
        if "--collect-only" in words:
            assert re.search(r"[1-9]\d* tests? collected", done.stdout), f"{line} collects no test"
    assert fixtures.read_text() == before


@pytest.mark.parametrize("section", ["wds:PATTERN", "hfds:PATH[:SPLIT]"])
def test_the_worked_examples_of_the_sharded_sources_run(tmp_path, section):
    """docs/datasets-and-models.md's wds and hfds examples, run by bash as written: on a generated
    ImageNet-shaped folder pets/ (and a DatasetDict saved from it), with a random `cnn` teacher."""
    import numpy as np
    import torch
    from zoo_support import jpeg_folder

    from kdcache import models

    text = (ROOT / "docs" / "datasets-and-models.md").read_text()
    block = re.search(rf"### {re.escape(section)}\n.*?Worked example.*?```bash\n(.*?)```", text, re.S).group(1)
    folder = jpeg_folder(tmp_path / "pets", classes=3, train=4, val=2, sides=(40, 70))
    torch.manual_seed(0)
    torch.save(models.create_model("cnn", 3, 3).state_dict(), tmp_path / "teacher.pt")
    if section.startswith("hfds"):
        datasets = pytest.importorskip("datasets")
        from PIL import Image

        def split(name: str):
            files = sorted((folder / name).glob("*/*.jpg"))
            return datasets.Dataset.from_dict(
                {"image": [Image.open(f) for f in files], "label": [int(f.parent.name[1:]) for f in files]},
                features=datasets.Features({"image": datasets.Image(),
                                            "label": datasets.ClassLabel(names=["c0", "c1", "c2"])}))
        datasets.DatasetDict({"train": split("train"), "validation": split("val")}).save_to_disk(
            str(tmp_path / "pets-hf"))
        assert np.asarray(split("train")["label"]).tolist()  # the folder's labels went in
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top-1" in done.stdout


def test_the_worked_example_of_interop_md_runs(tmp_path):
    """docs/interop.md's example, run by bash as written, on a folder pets/ with an ml-dr reinforcement and TinyViT
    logits of it written by those projects' rules (tests/interop_sources.py)."""
    from interop_sources import make_folder, tinyvit_config, write_mldr, write_tinyvit

    text = (ROOT / "docs" / "interop.md").read_text()
    block = re.search(r"## Worked example.*?```bash\n(.*?)```", text, re.S).group(1)
    folder = make_folder(tmp_path / "pets")
    write_mldr(folder, tmp_path / "reinforced_data", mix="cutmix", erase=True)
    write_tinyvit(folder, tmp_path / "teacher_logits")
    tinyvit_config(tmp_path / "config.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported  from ml-dr" in done.stdout and "in ml-dr's layout" in done.stdout
    assert (tmp_path / "runs" / "dkd" / "model.pt").is_file()
    assert (tmp_path / "exported" / "config.pth.tar").is_file()
    assert "imported from tinyvit" in done.stdout
