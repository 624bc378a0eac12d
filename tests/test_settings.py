"""Configs resolve once (kdcache/teacher/config.py, kdcache/student/config.py): ``cfg.resolve()`` parses and
checks every option into a frozen value, torch-free, and the stages read that value instead of checking again."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from tests_support import precompute_config

from kdcache import data, runtime
from kdcache.data.spec import DatasetSpec
from kdcache.errors import InvalidSpec
from kdcache.student import setup
from kdcache.student.config import TrainConfig, TrainSettings
from kdcache.teacher import precompute as stage1
from kdcache.teacher.config import PrecomputeConfig, PrecomputeSettings


class Calls:
    """Counts the calls of the functions it wraps."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch, self.count = monkeypatch, {}

    def wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.count[name] = self.count.get(name, 0) + 1
            return original(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, counted)


def test_a_precompute_config_resolves_into_frozen_parsed_values_without_torch():
    code = ("import sys; from kdcache.teacher.config import PrecomputeConfig; "
            "s = PrecomputeConfig(dataset='wds:s-{0..3}.tar?image=png', teacher='cnn', out='o', logits='topk:5', "
            "features=('layer1:pooled', 'fc'), extra_views='0.5:2:mixup', teacher_norm='clip').resolve(); "
            "print(s.dataset.kind, s.logits, s.features, s.extra_views, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert out[0] == "wds"
    assert out[1].strip() == ("LogitRequest(mode='topk', size=5) (('layer1', 'pooled'), ('fc', 'attention')) "
                              "ExtraViews(fraction=0.5, views=2, op='mixup') False")
    settings = PrecomputeConfig(dataset="fake:8", teacher="cnn", out="o").resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.dataset = None


@pytest.mark.parametrize(("change", "message"), [
    ({"logits": "topk:x"}, "--logits"), ({"features": ("a:huge",)}, "--features"),
    ({"extra_views": "2:4"}, "--extra-views"), ({"logit_dtype": "int8"}, "--logit-dtype"),
    ({"dataset": "wds:x.tar?colour=red"}, "unknown option 'colour'"), ({"teacher_norm": "bogus"}, "normalisation"),
])
def test_every_option_is_refused_when_resolved(change, message):
    with pytest.raises(InvalidSpec, match=message):
        PrecomputeConfig(**({"dataset": "fake:8", "teacher": "cnn", "out": "o"} | change)).resolve()


def test_precompute_resolves_once_and_picks_its_device_once(tmp_path, teacher_weights, monkeypatch):
    calls = Calls(monkeypatch)
    calls.wrap(PrecomputeConfig, "resolve")
    calls.wrap(stage1, "pick_device")
    opened = []
    original = data.open_source
    monkeypatch.setattr(data, "open_source", lambda spec: opened.append(spec) or original(spec))
    stage1.precompute(precompute_config(tmp_path / "c", teacher_weights, dataset="fake:16", views=1,
                                        extra_views="0.5:1", features=("layer1",)))
    assert calls.count == {"resolve": 1, "pick_device": 1}
    assert all(isinstance(spec, DatasetSpec) for spec in opened)  # the parsed spec, never the text again


def test_resolved_settings_are_taken_as_they_are(tmp_path, teacher_weights, monkeypatch):
    settings = precompute_config(tmp_path / "c", teacher_weights, dataset="fake:16", views=1).resolve()
    assert isinstance(settings, PrecomputeSettings) and settings.extra_views is None
    calls = Calls(monkeypatch)
    calls.wrap(PrecomputeConfig, "resolve")
    stage1.precompute(settings)
    assert calls.count == {}


def test_training_resolves_once_and_picks_its_device_once(tmp_path, monkeypatch):
    calls = Calls(monkeypatch)
    calls.wrap(TrainConfig, "resolve")
    calls.wrap(setup, "pick_device")
    calls.wrap(runtime, "pick_device")
    from kdcache.student.train import train

    train(TrainConfig(dataset="fake:16", model="cnn", out=str(tmp_path / "r"), epochs=1, progress=False))
    assert calls.count == {"resolve": 1, "pick_device": 1}
    settings = TrainConfig(dataset="fake:16", model="cnn", out="o", optimizer="adamw").resolve()
    assert isinstance(settings, TrainSettings) and settings.dataset == data.parse("fake:16")
    with pytest.raises(InvalidSpec, match="--optimizer"):
        TrainConfig(dataset="fake:16", model="cnn", out="o", optimizer="lion").resolve()
