"""The settings of a precompute run: a plain dataclass that CLI flags, a ``--config`` file or Python fill,
and the frozen :class:`PrecomputeSettings` it resolves into, once, that the stage reads.

Kept free of heavy imports so that the command line takes its defaults from here at start-up, and a wrong
value is refused before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdcache import checks
from kdcache.cache.logits import LOGIT_DTYPES, LogitRequest, parse_logit_option
from kdcache.data.spec import DatasetSpec
from kdcache.data.spec import parse as parse_dataset
from kdcache.errors import InvalidSpec
from kdcache.extras import require
from kdcache.models.preprocess import parse_norm

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FEATURE_MODES = ("full", "pooled", "attention")
EXTRA_VIEW_OPS = ("cutmix", "mixup")


@dataclass
class PrecomputeConfig:
    """Everything that decides what a precompute run stores (and where)."""

    dataset: str
    teacher: str | tuple[str, ...]  # several specs: an ensemble (kdcache/teacher/ensemble.py)
    out: str
    weights: str | tuple[str, ...] | None = None  # one file per teacher spec, in order
    ensemble: str = "mean-prob"  # mean-prob | mean-logit, for two or more teachers
    keep_members: bool = False  # also store each ensemble member's dense logits
    views: int = 8
    seed: int = 0
    augment: str = "rrc+flip"
    teacher_size: int | None = None  # default: the teacher weights' input size, else the images' side
    teacher_norm: str | None = None  # dataset | imagenet | clip | inception | M,M,M/S,S,S; default: the weights' own
    class_map: str | None = None  # file: one teacher class (index or name) per dataset class (kdcache/models/class_maps.py)
    energy_t: tuple[float, ...] = (1.0, 4.0)
    logits: str = "dense"  # dense | topk:K | sampled:N
    logit_dtype: str = "float16"
    features: tuple[str, ...] = ()  # LAYER[:full|pooled|attention], mode attention by default
    batch_size: int = 256
    workers: int | None = None  # None: see kdcache.runtime.loader_workers
    device: str = "auto"
    compile: bool = False  # run the teacher through torch.compile (not part of the cache id)
    precision: str = "auto"  # the teacher's forward: fp32 | bf16 | fp16 (autocast); auto: bf16 on CUDA, fp32 on CPU
    chunk_samples: int | None = None
    sharded: bool | None = None  # None: Zarr shards when an array would have > 10k chunk files
    progress: bool = True
    wait: bool = False  # another writer holds the cache: wait for it instead of stopping
    rebuild: bool = False  # delete whatever lies at OUT/<cache id> (a damaged cache) and write it anew
    break_lock: bool = False  # remove the lock of a writer whose heartbeat stopped (kdcache/cache/lock.py)
    extra_views: str | None = None  # R:K2[:cutmix|mixup], energy-guided extra mixed views (kdcache/teacher/extra_views.py)
    decode: str = "full"  # full | reduced: JPEGs decoded at M/8 of their size where the crop allows (kdcache/views.py)

    def validate(self) -> None:
        """Refuse option values that are wrong whatever the data, teacher and storage (no torch needed)."""
        self.resolve()

    def resolve(self) -> PrecomputeSettings:
        """These settings parsed and checked, once, into the frozen value the stage reads (no torch needed)."""
        dataset = parse_dataset(self.dataset)
        checks.at_least_at_most("--views", self.views, 1)
        checks.at_least_at_most("--batch-size", self.batch_size, 1)
        checks.seed(self.seed)
        checks.positive("--teacher-size", self.teacher_size)
        checks.at_most("--teacher-size", self.teacher_size)
        checks.at_least_at_most("--workers", self.workers, 0)
        checks.device(self.device)
        if self.decode not in ("full", "reduced"):
            raise InvalidSpec(f"--decode {self.decode!r} is not one of full, reduced")
        if self.decode == "reduced":
            require("simplejpeg", "decode", "--decode reduced")
        if self.precision not in PRECISIONS:
            raise InvalidSpec(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.logit_dtype not in LOGIT_DTYPES:
            raise InvalidSpec(f"--logit-dtype {self.logit_dtype!r} is not one of {', '.join(LOGIT_DTYPES)}")
        checks.output_folder("--out", self.out)
        checks.outside("--out", self.out, dataset.local_root(), "the dataset")
        if not self.energy_t:
            raise InvalidSpec("--energy-t needs at least one temperature, e.g. --energy-t 1")
        for t in self.energy_t:
            checks.positive("--energy-t", t, allow_none=False)
        if self.chunk_samples is not None:
            checks.at_least_at_most("--chunk-samples", self.chunk_samples, 1)
        return PrecomputeSettings(
            config=self, dataset=dataset, logits=parse_logit_option(self.logits),
            features=tuple(parse_features(tuple(self.features)).items()),
            extra_views=parse_extra_views(self.extra_views) if self.extra_views is not None else None,
            teacher_norm=parse_norm(self.teacher_norm, None) if self.teacher_norm is not None else None)


@dataclass(frozen=True)
class ExtraViews:
    """``--extra-views R:K2[:cutmix|mixup]``: the fraction R of samples with the highest mean teacher energy
    get K2 extra views mixed by ``op`` (kdcache/teacher/extra_views.py)."""

    fraction: float
    views: int
    op: str = "cutmix"


@dataclass(frozen=True)
class PrecomputeSettings:
    """A :class:`PrecomputeConfig` resolved once: the parsed values the stage reads beside the config as given
    (``config``, recorded in the manifest). ``teacher_norm`` is (mean, std), or None for the weights' own or
    ``dataset``."""

    config: PrecomputeConfig
    dataset: DatasetSpec
    logits: LogitRequest
    features: tuple[tuple[str, str], ...] = ()  # (layer, mode), in the order given
    extra_views: ExtraViews | None = None
    teacher_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None)


def resolve(cfg: PrecomputeConfig | PrecomputeSettings) -> PrecomputeSettings:
    """``cfg`` resolved (settings already resolved are taken as they are)."""
    return cfg if isinstance(cfg, PrecomputeSettings) else cfg.resolve()


def parse_features(specs: tuple[str, ...]) -> dict[str, str]:
    """``LAYER[:full|pooled|attention]`` entries as layer -> mode (attention when no mode is given)."""
    out: dict[str, str] = {}
    for spec in specs:
        layer, _, mode = spec.partition(":")
        mode = mode or "attention"
        if not layer or mode not in FEATURE_MODES:
            raise InvalidSpec(f"--features {spec!r} is not LAYER[:full|pooled|attention] — "
                              "e.g. --features layer3:attention")
        if layer in out:
            raise InvalidSpec(f"--features names layer {layer} twice — store one mode per layer")
        out[layer] = mode
    return out


def parse_extra_views(text: str) -> ExtraViews:
    """``R:K2[:cutmix|mixup]`` (R in (0, 1], default op cutmix)."""
    parts = text.split(":")
    usage = f"--extra-views {text!r} is not R:K2[:cutmix|mixup] — e.g. --extra-views 0.5:4 or 0.3:2:mixup"
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in EXTRA_VIEW_OPS):
        raise InvalidSpec(usage)
    try:
        fraction, views = float(parts[0]), int(parts[1])
    except ValueError as exc:
        raise InvalidSpec(usage) from exc
    if not 0 < fraction <= 1 or views < 1:
        raise InvalidSpec(f"--extra-views {text!r} needs 0 < R <= 1 and K2 >= 1 — e.g. --extra-views 0.5:4")
    return ExtraViews(fraction, views, parts[2] if len(parts) == 3 else "cutmix")


@dataclass
class ExtendConfig:
    """Settings of ``kdcache extend``: grow a complete cache in place (kdcache/teacher/extend.py)."""

    cache: str
    views: int | None = None  # grow to this many views per sample
    features: tuple[str, ...] = ()  # add feature arrays LAYER[:full|pooled|attention]
    teacher: tuple[str, ...] = ()  # add these ensemble members (a cache made with keep_members)
    weights: tuple[str, ...] = ()  # per recorded member (default: the recorded paths), or of the new members
    dataset: str | None = None  # the data's spec where it moved (default: the manifest's; fingerprint must match)
    batch_size: int = 256
    device: str = "auto"
    progress: bool = True
    wait: bool = False
    break_lock: bool = False

    def validate(self) -> None:
        """Refuse option values that are wrong whatever the cache (no torch needed)."""
        if self.dataset is not None:
            parse_dataset(self.dataset)
        checks.at_least_at_most("--views", self.views, 1)
        checks.at_least_at_most("--batch-size", self.batch_size, 1)
        checks.device(self.device)
        if self.teacher and (self.views or self.features):
            raise InvalidSpec("add ensemble members in an extend call of their own — run extend once with --teacher, "
                              "once with --views/--features")
