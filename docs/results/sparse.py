"""The sparse-cache tables of docs/losses.md: kd, dkd, dist and energy_kd trained from a dense, a
top-k:3 and a sampled:20 cache of the same views (mnist5k, 3 seeds), and the angle between each sparse
cache's loss gradient and the dense cache's on the same batches (the measure of arXiv 2503.16870).

    python docs/results/sparse.py [OUT]      # default OUT: results-sparse; reruns reuse what exists

CPU only, two students at a time with one thread each; about 25 minutes on 2 idle cores.
"""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from kdcache import PrecomputeConfig, TrainConfig, loader, losses, models, open_cache, precompute, train
from kdcache.cache.manifest import energy_temperature

MODES = ("dense", "topk:3", "sampled:20")
LOSSES = {"kd": {}, "dkd": {"warmup": 1}, "dist": {}, "energy_kd": {}}
SEEDS = (0, 1, 2)
DATA = dict(dataset="mnist5k", size=16, progress=False)
STUDENT = dict(model="resnet8", epochs=5, batch_size=128, lr=0.05)


def teacher(out: Path) -> str:
    weights = out / "teacher" / "model.pt"
    if not weights.exists():
        train(TrainConfig(model="resnet20", epochs=8, lr=0.1, out=str(out / "teacher"), **DATA))
    return str(weights)


def caches(out: Path, weights: str) -> dict[str, str]:
    return {mode: precompute(PrecomputeConfig(dataset="mnist5k", teacher="resnet20", weights=weights, teacher_size=16,
                                              views=8, logits=mode, out=str(out / "caches"), progress=False)).path
            for mode in MODES}


def student(job: tuple[str, str, str, int]) -> tuple[str, str, int, float]:
    out, cache, loss, seed = job
    torch.set_num_threads(1)
    run = Path(out)
    if not (run / "run.json").exists():
        train(TrainConfig(cache=cache, loss=loss, loss_params=LOSSES[loss], seed=seed, out=out, **DATA, **STUDENT))
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    return run.parent.name, loss, seed, float(final["test_top1"])


def accuracy_table(out: Path, paths: dict[str, str]) -> str:
    jobs = [(str(out / "runs" / mode.replace(":", "") / f"{loss}-s{seed}"), paths[mode], loss, seed)
            for mode in MODES for loss in LOSSES for seed in SEEDS]
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(student, jobs))
    top1: dict[tuple[str, str], list[float]] = {}
    for mode, loss, _, value in results:
        top1.setdefault((mode, loss), []).append(value)
    lines = ["| loss | dense | topk:3 | sampled:20 |", "|---|---:|---:|---:|"]
    for loss in LOSSES:
        cells = [f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" for v in
                 (top1[(m.replace(":", ""), loss)] for m in MODES)]
        lines.append(f"| `{loss}` | {' | '.join(cells)} |")
    return "\n".join(lines)


def gradient(model: torch.nn.Module, loss: losses.Loss, batch: dict) -> torch.Tensor:
    model.zero_grad()
    teacher = losses.TeacherBatch(logits=batch["teacher"].get("logits"), probs=batch["teacher"].get("probs"),
                                  energy=batch["teacher"]["energy"][:, batch["energy_column"]])
    total, _ = loss(losses.StudentOutput(model(batch["input"])), teacher, losses.Batch(batch["label"], epoch=5))
    total.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def angle_table(out: Path, paths: dict[str, str], batches: int = 8) -> str:
    """Degrees between each sparse cache's gradient and the dense cache's, over the first ``batches``
    batches of 256 views, for the student at initialisation and after training (dense kd, seed 0)."""
    column = {m: open_cache(p).energy_column(energy_temperature(open_cache(p).manifest)) for m, p in paths.items()}
    streams = {m: list(zip(range(batches), loader(p, "mnist5k", size=16, batch_size=256, energy=True)))
               for m, p in paths.items()}
    trained = torch.load(out / "runs" / "dense" / "kd-s0" / "model.pt", weights_only=True)
    lines = ["| loss | student | topk:3 (°) | sampled:20 (°) |", "|---|---|---:|---:|"]
    for name, params in LOSSES.items():
        loss = losses.get(name, **params)
        if name == "energy_kd":
            dense = open_cache(paths["dense"])
            loss.prepare(torch.from_numpy(dense.all_energy(energy_temperature(dense.manifest)).reshape(-1)))
        for state in ("init", "trained"):
            torch.manual_seed(0)
            model = models.create_model("resnet8", 10, 1)
            if state == "trained":
                model.load_state_dict(trained)
            model.eval()  # batch norm in eval mode: the three caches see one function
            cells = []
            for mode in MODES[1:]:
                degrees = []
                for (_, ref), (_, other) in zip(streams["dense"], streams[mode], strict=True):
                    assert torch.equal(ref["input"], other["input"]), "the caches must hold the same views"
                    g_ref = gradient(model, loss, {**ref, "energy_column": column["dense"]})
                    g = gradient(model, loss, {**other, "energy_column": column[mode]})
                    cos = torch.nn.functional.cosine_similarity(g_ref, g, dim=0).clamp(-1, 1)
                    degrees.append(math.degrees(math.acos(cos.item())))
                cells.append(f"{np.mean(degrees):.1f} ± {np.std(degrees, ddof=1):.1f}")
            lines.append(f"| `{name}` | {state} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results-sparse")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    paths = caches(out, teacher(out))
    report = ["## test top-1 (%), mean ± std over seeds 0, 1, 2", "", accuracy_table(out, paths), "",
              "## gradient angle to the dense cache's, mean ± std over 8 batches of 256 views", "",
              angle_table(out, paths), ""]
    (out / "sparse.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
