"""The settings of a training run: a plain dataclass that CLI flags, a ``--config`` file or Python fill.

Kept free of heavy imports so that the command line takes its defaults from here at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdcache import checks
from kdcache.data.spec import DatasetSpec
from kdcache.data.spec import parse as parse_dataset
from kdcache.errors import InvalidSpec
from kdcache.models.preprocess import INTERPOLATIONS, parse_norm


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Settings of one training run; the CLI fills it from flags."""

    dataset: str
    model: str
    out: str
    cache: str | None = None
    loss: str | None = None  # default: kd with a teacher (cache or online), ce without
    loss_params: dict[str, Any] = field(default_factory=dict)
    student_layers: tuple[str, ...] = ()  # feature losses: student layers paired with the teacher's, in order
    online_teacher: str | None = None  # model spec of a teacher run on every batch (classic online KD)
    teacher_weights: str | None = None  # its weights: a file, torchvision:TAG or pretrained (kdcache/models/registry.py)
    class_map: str | None = None  # the online teacher's class of each dataset class (kdcache/models/class_maps.py)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0
    grad_clip: float | None = None
    ema: float | None = None  # decay of an exponential moving average of the weights, e.g. 0.999 (kdcache/student/ema.py)
    label_smoothing: float = 0.0  # eps of the CE term: target (1 - eps) * labels + eps / C
    label_noise: float = 0.0  # fraction of training labels replaced by another class (seeded)
    imbalance: float = 1.0  # long-tail imbalance factor n_max/n_min of the kept training split; 1 = all
    seed: int = 0
    size: int | None = None  # student input side; default: the cache's teacher size or the data's
    interpolation: str | None = None  # resize of the student's views; default: the cache's recorded one (bilinear without)
    allow_version_drift: bool = False  # replay a timm: recipe under other package versions than the cache recorded
    norm: str | None = None  # student normalisation: dataset (default) | imagenet | clip | inception | M,M,M/S,S,S
    augment: str = "rrc+flip"  # used only without a cache (a cache carries its own recipe)
    workers: int | None = None  # None: see kdcache.runtime.loader_workers
    device: str = "auto"
    amp: bool = True  # False (--no-amp): precision fp32 whatever the device
    compile: bool = False  # train the student through torch.compile
    precision: str = "auto"  # fp32 | bf16 | fp16 (autocast; fp16 with a grad scaler); auto: bf16 on CUDA, fp32 on CPU
    resume: bool = False
    progress: bool = True
    extra_views: bool = False  # also train on the cache's energy-guided extra mixed views (kdcache/student/extra_views.py)

    def validate(self) -> None:
        """Refuse option values that are wrong whatever the data, model and cache (no torch needed)."""
        self.resolve()

    def resolve(self) -> TrainSettings:
        """These settings parsed and checked, once, into the frozen value the stage reads (no torch needed)."""
        dataset = parse_dataset(self.dataset)
        checks.at_least_at_most("--epochs", self.epochs, 1)
        checks.at_least_at_most("--batch-size", self.batch_size, 1)
        checks.positive("--lr", self.lr, allow_none=False)
        checks.at_least("--momentum", self.momentum, 0)
        checks.at_least("--weight-decay", self.weight_decay, 0)
        checks.at_least_at_most("--warmup-epochs", self.warmup_epochs, 0)
        checks.positive("--grad-clip", self.grad_clip)
        if self.ema is not None:
            checks.in_unit("--ema", self.ema)
            checks.positive("--ema", self.ema, allow_none=False)
        checks.in_unit("--label-smoothing", self.label_smoothing)
        checks.in_unit("--label-noise", self.label_noise, closed_high=True)
        checks.at_least("--imbalance", self.imbalance, 1)
        checks.seed(self.seed)
        checks.positive("--size", self.size)
        checks.at_most("--size", self.size)
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise InvalidSpec(f"--interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        checks.at_least_at_most("--workers", self.workers, 0)
        checks.device(self.device)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise InvalidSpec(f"--precision {self.precision!r} is not one of auto, fp32, bf16, fp16")
        checks.output_folder("--out", self.out)
        checks.outside("--out", self.out, dataset.local_root(), "the dataset")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidSpec(f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise InvalidSpec(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.teacher_weights and not self.online_teacher:
            raise InvalidSpec("--weights is the online teacher's weights file — add --online-teacher MODEL")
        if self.class_map and not self.online_teacher:
            raise InvalidSpec("--class-map maps the online teacher's classes (a cache records its own) — add "
                              "--online-teacher MODEL, or drop --class-map")
        return TrainSettings(self, dataset, parse_norm(self.norm, None) if self.norm is not None else None)


@dataclass(frozen=True)
class TrainSettings:
    """A :class:`TrainConfig` resolved once: the parsed values the stage reads beside the config as given
    (``config``, recorded in run.json). ``norm`` is (mean, std), or None for the dataset's statistics."""

    config: TrainConfig
    dataset: DatasetSpec
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def resolve(cfg: TrainConfig | TrainSettings) -> TrainSettings:
    """``cfg`` resolved (settings already resolved are taken as they are)."""
    return cfg if isinstance(cfg, TrainSettings) else cfg.resolve()


EVAL_SPLITS = ("train", "test", "val")


@dataclass
class EvalConfig:
    """Settings of ``kdcache eval``: weights evaluated on a split with the model's own preprocessing."""

    model: str
    dataset: str
    weights: str | None = None  # a file, torchvision:TAG or pretrained; none for hf:PATH
    split: str = "test"  # train, test or val (the same as test)
    size: int | None = None  # default: the weights' input size, else the dataset's
    norm: str | None = None  # dataset | imagenet | clip | inception | M,M,M/S,S,S; default: the weights' own
    class_map: str | None = None  # the model's class of each dataset class (kdcache/models/class_maps.py)
    batch_size: int = 256
    device: str = "auto"

    def validate(self) -> None:
        """Refuse option values that are wrong whatever the data and model (no torch needed)."""
        parse_dataset(self.dataset)
        if self.split not in EVAL_SPLITS:
            raise InvalidSpec(f"--split {self.split!r} is not a split — use train, test or val (val is the same as test)")
        checks.positive("--size", self.size)
        checks.at_least_at_most("--batch-size", self.batch_size, 1)
        checks.device(self.device)
        if self.norm is not None:
            parse_norm(self.norm, None)
