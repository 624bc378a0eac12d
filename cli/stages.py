"""The pipeline's commands: precompute, train, eval, quickstart."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from kdcache_cli.app import BREAK_LOCK_HELP, REBUILD_HELP, WAIT_HELP, app, parse_params

from kdcache import checks
from kdcache.student.config import EvalConfig, TrainConfig
from kdcache.teacher.config import ExtendConfig, PrecomputeConfig

NPROC_HELP = "Processes on this machine (re-runs the command under torchrun; each rank writes/trains its share)."


def _relaunch(nproc: int, check: Callable[[], None]) -> None:
    """With ``--nproc N > 1`` outside torchrun: ``check()`` the options here, so that bad input is one
    error line from this process, then run this very command as N torchrun ranks and exit."""
    from kdcache import distributed

    if nproc > 1 and not distributed.under_torchrun():
        check()
        raise SystemExit(distributed.launch(nproc, sys.argv[1:]))


def _one_or_all(values: list[str]) -> str | tuple[str, ...]:
    """A repeatable option's values: the value itself when given once (one teacher), else all of them."""
    return values[0] if len(values) == 1 else tuple(values)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _save_run_config(out: Path, options: dict[str, object]) -> None:
    """``OUT/run.toml``: every option of this run, resolved, so ``--config OUT/run.toml`` reruns it
    (``--resume`` is left out: rerunning means training again)."""
    from kdcache_cli.config import write_toml

    out.mkdir(parents=True, exist_ok=True)
    values = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if k != "resume"}
    (out / "run.toml").write_text(write_toml(values))


@app.command()
def precompute(
    dataset: Annotated[str, typer.Option(help="Dataset spec (see `kdcache datasets`).")],
    teacher: Annotated[list[str], typer.Option(help="Teacher model spec (see `kdcache models`); repeat for an ensemble.")],
    out: Annotated[str, typer.Option(help="Root folder or fsspec URL; the cache goes to OUT/<cache id>, with a readable alias OUT/<alias>.")],
    weights: Annotated[Optional[list[str]], typer.Option(help="Teacher weights, one per --teacher, in order: a file (state dict or .safetensors, never unpickled code), torchvision:TAG (e.g. IMAGENET1K_V1, DEFAULT; from the torch hub cache) or pretrained (timm, from the Hugging Face cache); none for hf:PATH. See docs/teachers.md.")] = None,
    views: Annotated[int, typer.Option(help="Recorded augmented views per sample (K).")] = PrecomputeConfig.views,
    seed: Annotated[int, typer.Option(help="Seed of the view plan; params are a pure function of (seed, i, v).")] = PrecomputeConfig.seed,
    augment: Annotated[str, typer.Option(help="Augmentation recipe, ops joined by '+'.")] = PrecomputeConfig.augment,
    teacher_size: Annotated[Optional[int], typer.Option(help="Teacher input side in pixels (default: the weights' input size, else the dataset's).")] = PrecomputeConfig.teacher_size,
    teacher_norm: Annotated[Optional[str], typer.Option(help="Teacher normalisation: dataset, imagenet, clip, inception or M,M,M/S,S,S (default: the weights' own, else the dataset's statistics).")] = PrecomputeConfig.teacher_norm,
    class_map: Annotated[Optional[str], typer.Option(help="File with one line per dataset class (in class order): the teacher's class index or name; the cache keeps those teacher logits.")] = PrecomputeConfig.class_map,
    energy_t: Annotated[list[float], typer.Option(help="Energy temperature; repeat for several.")] = list(PrecomputeConfig.energy_t),
    logits: Annotated[str, typer.Option(help="Teacher target: dense, topk:K (top-K log-probabilities) or sampled:N (N classes drawn from the teacher, ids + counts).")] = PrecomputeConfig.logits,
    logit_dtype: Annotated[str, typer.Option(help="Stored logit dtype (dense and topk): float16, bfloat16 or float32.")] = PrecomputeConfig.logit_dtype,
    features: Annotated[Optional[list[str]], typer.Option(help="Teacher layer to store, LAYER[:full|pooled|attention] (default attention); repeatable. `kdcache layers MODEL` lists names.")] = None,
    batch_size: Annotated[int, typer.Option(help="Teacher batch size (views per forward pass).")] = PrecomputeConfig.batch_size,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes rendering views (0: in-process; default: up to 4 with CUDA, 0 on CPU).")] = PrecomputeConfig.workers,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu or cuda[:N].")] = PrecomputeConfig.device,
    compile: Annotated[bool, typer.Option("--compile", help="Run the teacher through torch.compile (worth it for long runs on a GPU; the first batches compile).")] = False,
    precision: Annotated[str, typer.Option(help="The teacher's forward: fp32, bf16 or fp16 (autocast; energies, top-k and draws from the float32-upcast logits); auto is bf16 on a CUDA GPU that supports it, else fp32. Part of the cache id.")] = PrecomputeConfig.precision,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help=WAIT_HELP)] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help=REBUILD_HELP)] = False,
    break_lock: Annotated[bool, typer.Option("--break-lock", help=BREAK_LOCK_HELP)] = False,
    nproc: Annotated[int, typer.Option(help=NPROC_HELP)] = 1,
    extra_views: Annotated[Optional[str], typer.Option(help="Energy-guided extra views (HE-DA) R:K2[:cutmix|mixup]: the fraction R of samples with the highest mean teacher energy get K2 extra mixed views, cached too (e.g. 0.5:4).")] = PrecomputeConfig.extra_views,
    decode: Annotated[str, typer.Option(help="full, or reduced: decode a JPEG at the smallest M/8 of its size at which the view's crop keeps the teacher's input side in pixels (libjpeg-turbo DCT scaling via simplejpeg, kdcache[decode]; other pixels than full, so part of the cache id; the student replays it).")] = PrecomputeConfig.decode,
    he_extra: Annotated[Optional[str], typer.Option(hidden=True, help="Old name of --extra-views (kept for one release).")] = None,
    ensemble: Annotated[str, typer.Option(help="How several teachers combine: mean-prob (mean of softmax) or mean-logit.")] = PrecomputeConfig.ensemble,
    keep_members: Annotated[bool, typer.Option("--keep-members", help="Also store each ensemble member's dense logits (members/<i>/logits).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write nothing: print teacher passes, estimated bytes per array and time, from a short warm-up.")] = False,
) -> None:
    """Stage 1: run the teacher over K recorded views per sample and write the Zarr v3 cache."""
    cfg = PrecomputeConfig(
        dataset=dataset, teacher=_one_or_all(teacher), weights=_one_or_all(list(weights)) if weights else None,
        out=out, views=views, seed=seed, augment=augment, teacher_size=teacher_size, teacher_norm=teacher_norm,
        class_map=class_map, energy_t=tuple(energy_t), logits=logits, logit_dtype=logit_dtype,
        features=tuple(features or ()), batch_size=batch_size, workers=workers, device=device, precision=precision,
        compile=compile, progress=not quiet,
        wait=wait, break_lock=break_lock, rebuild=rebuild, extra_views=extra_views or he_extra, ensemble=ensemble,
        keep_members=keep_members, decode=decode)
    settings = cfg.resolve()  # once, before torch is imported: a wrong value is reported at once
    checks.at_least("--nproc", nproc, 1)
    from kdcache import distributed
    from kdcache.teacher.precompute import check
    from kdcache.teacher.precompute import precompute as run

    if not dry_run:
        _relaunch(nproc, lambda: check(settings))
    if dry_run:
        from kdcache_cli.plan import print_plan

        print_plan(settings)
        return
    result = run(settings)
    if not distributed.is_main():
        return
    if result.reused:
        typer.echo(f"reusing complete cache {result.cache_id} at {result.path} (no teacher forward run)")
    else:
        typer.echo(f"cache {result.cache_id} written to {result.path}: {result.views_computed} views in "
                   f"{result.seconds:.1f} s ({result.views_per_second:.0f} views/s)")
    typer.echo(f"alias {result.alias} — train with --cache {result.path}")


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="Dataset spec; must be the one the cache was made from.")],
    model: Annotated[str, typer.Option(help="Student model spec (see `kdcache models`).")],
    out: Annotated[Path, typer.Option(help="Run directory: model.pt, checkpoint.pt, metrics.jsonl, run.json.")],
    cache: Annotated[Optional[str], typer.Option(help="Cache to distil from; without it, plain CE training.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Loss name (see `kdcache losses`); default kd with a teacher, ce without.")] = None,
    loss_param: Annotated[Optional[list[str]], typer.Option("--loss-param", "-p", help="Loss hyper-parameter KEY=VALUE; repeatable.")] = None,
    student_layer: Annotated[Optional[list[str]], typer.Option(help="Feature losses: student layer paired with the cached teacher layers, in order; repeatable.")] = None,
    online_teacher: Annotated[Optional[str], typer.Option(help="Classic online KD: run this teacher model on every batch (the cache's views, or live ones).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Weights of --online-teacher: a file, torchvision:TAG or pretrained (see precompute --weights).")] = None,
    class_map: Annotated[Optional[str], typer.Option(help="The --online-teacher's class of each dataset class, one line per class (see precompute --class-map).")] = TrainConfig.class_map,
    epochs: Annotated[int, typer.Option(help="Epochs; with a cache each epoch uses one stored view per sample.")] = TrainConfig.epochs,
    batch_size: Annotated[int, typer.Option(help="Batch size (per process).")] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = TrainConfig.lr,
    optimizer: Annotated[str, typer.Option(help="sgd (Nesterov) or adamw.")] = TrainConfig.optimizer,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = TrainConfig.momentum,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = TrainConfig.weight_decay,
    schedule: Annotated[str, typer.Option(help="cosine, step (x0.1 at 30/60/90%) or constant.")] = TrainConfig.schedule,
    warmup_epochs: Annotated[int, typer.Option(help="Linear warm-up epochs.")] = TrainConfig.warmup_epochs,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip gradient norm to this value.")] = TrainConfig.grad_clip,
    ema: Annotated[Optional[float], typer.Option(help="Keep an exponential moving average of the weights with this decay (e.g. 0.999): evaluated each epoch (ema_test_*) and saved as model_ema.pt.")] = TrainConfig.ema,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing eps of the CE term: target (1 - eps) * labels + eps / C.")] = TrainConfig.label_smoothing,
    compile: Annotated[bool, typer.Option("--compile", help="Train the student through torch.compile (the first steps compile).")] = False,
    precision: Annotated[str, typer.Option(help="Student forward precision: fp32, bf16 or fp16 (autocast; fp16 with a gradient scaler); auto is bf16 on a CUDA GPU (fp16 on one without bf16), fp32 on a CPU.")] = TrainConfig.precision,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="--no-amp forces fp32 whatever --precision says.")] = TrainConfig.amp,
    label_noise: Annotated[float, typer.Option(help="Fraction of training labels replaced by another class (seeded; 0: none).")] = TrainConfig.label_noise,
    imbalance: Annotated[float, typer.Option(help="Long-tailed training split with this n_max/n_min ratio (seeded; 1: all samples).")] = TrainConfig.imbalance,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, label noise, imbalance and, without a cache, of the views.")] = TrainConfig.seed,
    size: Annotated[Optional[int], typer.Option(help="Student input side (default: the cache's teacher size, at which the student renders the teacher's very pixels).")] = TrainConfig.size,
    interpolation: Annotated[Optional[str], typer.Option(help="Resize of the student's views: bilinear, bicubic or nearest (default: the interpolation the cache records for its teacher; bilinear without a cache).")] = TrainConfig.interpolation,
    allow_version_drift: Annotated[bool, typer.Option("--allow-version-drift", help="Replay a timm: recipe although timm, torch, torchvision, Pillow or NumPy differ from the versions the cache recorded (a warning; its views may differ from the teacher's: check with kdcache verify CACHE --recompute N --allow-version-drift).")] = TrainConfig.allow_version_drift,
    norm: Annotated[Optional[str], typer.Option(help="Student normalisation: dataset, imagenet, clip, inception or M,M,M/S,S,S (default: the dataset's statistics).")] = TrainConfig.norm,
    augment: Annotated[str, typer.Option(help="Recipe without a cache (a cache replays its own).")] = TrainConfig.augment,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes reading and rendering views (0: in-process; default: up to 4 with CUDA, 0 on CPU).")] = TrainConfig.workers,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu or cuda[:N].")] = TrainConfig.device,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars, and no first line on the views.")] = False,
    nproc: Annotated[int, typer.Option(help=NPROC_HELP + " DDP; --batch-size is per process.")] = 1,
    extra_views: Annotated[bool, typer.Option("--extra-views", help="Also train on the cache's energy-guided extra mixed views (precompute --extra-views), one per chosen sample per epoch.")] = TrainConfig.extra_views,
    he_da: Annotated[bool, typer.Option("--he-da", hidden=True, help="Old name of --extra-views (kept for one release).")] = False,
) -> None:
    """Stage 2: train a student from a cache (teacher never loaded), with an online teacher, or alone with CE."""
    options = dict(locals()) | {"extra_views": extra_views or he_da}
    options.pop("he_da")
    cfg = TrainConfig(
        dataset=dataset, model=model, out=str(out), cache=cache, loss=loss, loss_params=parse_params(loss_param),
        student_layers=tuple(student_layer or ()), online_teacher=online_teacher,
        teacher_weights=weights, class_map=class_map, norm=norm, epochs=epochs, batch_size=batch_size, lr=lr,
        optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
        warmup_epochs=warmup_epochs, grad_clip=grad_clip, ema=ema, label_smoothing=label_smoothing, amp=amp, precision=precision, compile=compile, label_noise=label_noise, imbalance=imbalance,
        seed=seed, size=size, interpolation=interpolation, augment=augment, workers=workers, device=device, resume=resume, progress=not quiet,
        extra_views=extra_views or he_da, allow_version_drift=allow_version_drift)
    settings = cfg.resolve()  # once, before torch is imported: a wrong value is reported at once
    checks.at_least("--nproc", nproc, 1)
    from kdcache import distributed
    from kdcache.student.train import check
    from kdcache.student.train import train as run

    _relaunch(nproc, lambda: check(settings))
    if resume and not (out / "checkpoint.pt").exists() and distributed.is_main():
        typer.echo(f"--resume: no checkpoint in {out} yet — starting afresh", err=True)
    written = distributed.is_main() and not (out / "run.toml").exists()
    if distributed.is_main():
        _save_run_config(out, options)
    try:
        result = run(settings, on_start=lambda r: _say_views(r, quiet))
    except BaseException:
        if written and not (out / "checkpoint.pt").exists():  # nothing to resume: leave nothing behind
            (out / "run.toml").unlink(missing_ok=True)
            _remove_if_empty(out)
        raise
    if not distributed.is_main():
        return
    for m in result.metrics:
        typer.echo(f"epoch {m['epoch']:>3}  loss {m['loss']:.4f}  train top-1 {m['train_top1']:6.2f}  "
                   f"test top-1 {m['test_top1']:6.2f}  {m['images_per_s']:7.0f} img/s", err=True)
    final = result.final
    typer.echo(f"{model} on {dataset}: test top-1 {final['test_top1']:.2f}%  top-5 {final['test_top5']:.2f}%  "
               f"ECE {final['test_ece']:.4f}  → {out / 'model.pt'}")


def _say_views(run, quiet: bool) -> None:
    """train's first line: what the student renders of the cache's views."""
    from kdcache.student.train import describe_views

    if run.rank == 0 and not quiet and (views := describe_views(run)):
        typer.echo(views, err=True)


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Model spec.")],
    dataset: Annotated[str, typer.Option(help="Dataset spec.")],
    weights: Annotated[Optional[str], typer.Option(help="Weights: a file, torchvision:TAG or pretrained (see precompute --weights); none for hf:PATH.")] = EvalConfig.weights,
    split: Annotated[str, typer.Option(help="train, test or val (the same as test).")] = EvalConfig.split,
    size: Annotated[Optional[int], typer.Option(help="Input side in pixels (default: the weights' input size, else the dataset's).")] = EvalConfig.size,
    norm: Annotated[Optional[str], typer.Option(help="Normalisation: dataset, imagenet, clip, inception or M,M,M/S,S,S (default: the weights' own, else the dataset's).")] = EvalConfig.norm,
    class_map: Annotated[Optional[str], typer.Option(help="The model's class of each dataset class, one line per class (see precompute --class-map).")] = EvalConfig.class_map,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = EvalConfig.batch_size,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = EvalConfig.device,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Evaluate weights on a split: top-1, top-5 (%) and ECE (15 bins); images larger than the input are
    resized (shorter side to size / crop_pct) and center-cropped, as torchvision and timm evaluate."""
    cfg = EvalConfig(model=model, dataset=dataset, weights=weights, split=split, size=size, norm=norm,
                     class_map=class_map, batch_size=batch_size, device=device)
    cfg.validate()
    from kdcache.student.evaluate import evaluate_config

    result = evaluate_config(cfg)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{model} on {dataset}/{split}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
                   f"ECE {result['ece']:.4f}")


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Directory for the teacher, cache and students.")] = Path("quickstart"),
    dataset: Annotated[Optional[str], typer.Option(help="Dataset spec. [default: mnist5k]")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher model spec. [default: resnet20]")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student model spec. [default: resnet8]")] = None,
    size: Annotated[Optional[int], typer.Option(help="Input side in pixels, teacher and student. [default: 16]")] = None,
    teacher_epochs: Annotated[Optional[int], typer.Option(help="Teacher training epochs. [default: 6]")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of each student. [default: 5]")] = None,
    views: Annotated[Optional[int], typer.Option(help="Views per sample in the cache. [default: 8]")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Loss of the online and the cached student (see `kdcache losses`). [default: kd]")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads for every stage, so that the result does not depend on the machine. [default: 2]")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the teacher, the cache's views and the students.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Teacher → cache → the student alone, with the teacher online, and from the cache, on built-in data;
    prints a table and what the cache saved."""
    from kdcache.quickstart import QuickstartConfig, run_quickstart, summary, table

    given = dict(dataset=dataset, teacher=teacher, student=student, size=size, teacher_epochs=teacher_epochs,
                 student_epochs=epochs, views=views, loss=loss, threads=threads)
    cfg = QuickstartConfig(out=str(out), seed=seed, progress=not quiet,
                           **{key: value for key, value in given.items() if value is not None})
    cfg.validate()
    stages = run_quickstart(cfg, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(table(stages))
    typer.echo(summary(stages))


@app.command()
def extend(
    cache: Annotated[str, typer.Argument(help="Cache path, alias path or URL to grow (it must be complete).")],
    views: Annotated[Optional[int], typer.Option(help="Grow to this many views per sample (adds views K..VIEWS-1).")] = ExtendConfig.views,
    features: Annotated[Optional[list[str]], typer.Option(help="Add a feature array LAYER[:full|pooled|attention]; repeatable (runs the teacher on every view).")] = None,
    teacher: Annotated[Optional[list[str]], typer.Option(help="Add this ensemble member (repeatable; the cache needs --keep-members); --weights then pairs with these.")] = None,
    weights: Annotated[Optional[list[Path]], typer.Option(help="Weights file per member, in the manifest's order (default: the recorded paths; sha256 must match) — or, with --teacher, of the new members.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset spec where the data has moved since the cache was made (default: the manifest's; the fingerprint must match).")] = ExtendConfig.dataset,
    batch_size: Annotated[int, typer.Option(help="Teacher batch size (views per forward pass).")] = ExtendConfig.batch_size,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu or cuda[:N].")] = ExtendConfig.device,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help=WAIT_HELP)] = ExtendConfig.wait,
    break_lock: Annotated[bool, typer.Option("--break-lock", help=BREAK_LOCK_HELP)] = ExtendConfig.break_lock,
) -> None:
    """Grow a cache in place: more views (teacher runs only on them), new feature layers, or new ensemble members.

    The result equals a cache built in one go with the final settings and takes its id; the folder
    stays where it is, with aliases OUT/<new id> and a new readable alias naming it. A cache made by
    an earlier kdcache is brought to today's format on the way (docs/format.md §Versions).
    """
    cfg = ExtendConfig(cache=cache, views=views, features=tuple(features or ()), teacher=tuple(teacher or ()),
                       weights=tuple(str(w) for w in weights or ()), dataset=dataset, batch_size=batch_size,
                       device=device, progress=not quiet, wait=wait, break_lock=break_lock)
    cfg.validate()
    from kdcache.teacher.extend import run_extend

    result = run_extend(cfg)
    typer.echo(f"cache {result.previous_id} extended to {result.cache_id} at {result.path}: "
               f"{result.views_computed} teacher views in {result.seconds:.1f} s")
    typer.echo(f"aliases {', '.join(result.aliases)}")
